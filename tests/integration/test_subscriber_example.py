"""examples/subscribe_outcomes.py, run in its own process, against a real nats-server.

Outcomes are published with the project's bus helpers; what the example prints is read back.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest
from nats.js import JetStreamContext

from services.contracts.events import (
    DeploymentBlocked,
    DeploymentPromoted,
    DeploymentRequested,
    DeploymentRolledBack,
    Event,
    Requester,
)
from services.runtime import bus
from services.runtime.settings import Settings

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "subscribe_outcomes.py"
BOB = Requester(user="bob")


def outcomes() -> list[Event]:
    return [
        DeploymentBlocked(
            deployment_id="d-sub-1",
            model="org/chat-7b.v2",
            version="1",
            stage="validation",
            reasons=("checksum: differs",),
            requested_by=BOB,
        ),
        DeploymentPromoted(
            deployment_id="d-sub-2",
            model="org/other",
            version="5",
            metrics_url="http://grafana.local/d/x",
        ),
        DeploymentRolledBack(
            deployment_id="d-sub-3", model="org/chat-7b.v2", version="2", trigger="latency"
        ),
    ]


async def run_example(
    url: str, *args: str, password: str = "", timeout: float = 30.0
) -> tuple[str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        "--server",
        url,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "NATS_PASSWORD": password},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        raise AssertionError(f"example did not finish:\n{out.decode()}\n{err.decode()}") from None
    assert proc.returncode == 0, err.decode()
    return out.decode(), err.decode()


async def test_it_follows_every_outcome_and_skips_what_fails_its_schema(
    js: JetStreamContext, settings: Settings
) -> None:
    await bus.publish_event(
        js, DeploymentRequested(deployment_id="d-sub-0", model="m", version="1", location="/m")
    )
    await js.publish("preflight.outcome.m.d-bad.blocked", b'{"type": "DeploymentBlocked"}')
    for event in outcomes():
        await bus.publish_event(js, event)
    out, err = await run_example(settings.nats_url, "--from-start", "--count", "3")
    lines = out.splitlines()
    assert len(lines) == 3, out
    assert " blocked    org/chat-7b.v2 1 d-sub-1 by bob: checksum: differs" in lines[0]
    assert "promoted   org/other 5 d-sub-2" in lines[1] and "[http://grafana.local/d/x]" in lines[1]
    assert "rolledback org/chat-7b.v2 2 d-sub-3" in lines[2]
    assert "skipped preflight.outcome.m.d-bad.blocked: DeploymentBlocked does not match" in err
    assert "DeploymentRequested" not in out  # stage events are not outcomes


async def test_a_durable_subscriber_gets_one_model_and_resumes_where_it_stopped(
    js: JetStreamContext, settings: Settings
) -> None:
    for event in outcomes():
        await bus.publish_event(js, event)
    args = ("--model", "org/chat-7b.v2", "--durable", "audit")
    first, _ = await run_example(settings.nats_url, *args, "--count", "2")
    assert [line.split()[4] for line in first.splitlines()] == ["d-sub-1", "d-sub-3"]
    later = DeploymentPromoted(deployment_id="d-sub-4", model="org/chat-7b.v2", version="3")
    await bus.publish_event(
        js, DeploymentPromoted(deployment_id="d-sub-5", model="org/x", version="1")
    )
    await bus.publish_event(js, later)
    again, _ = await run_example(settings.nats_url, *args, "--count", "1")
    assert [line.split()[4] for line in again.splitlines()] == ["d-sub-4"]
