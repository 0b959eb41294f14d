"""SIGKILL the canary-controller process at several points of a real rollout: same outcome.

A real nats-server, the real controller process (with its chDB store and ingest), and a gateway
played by this test: it reads the route the controller writes and publishes the request records
a router would, at the route's current weight.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from nats.js import JetStreamContext

from services.contracts import subjects
from services.contracts.events import (
    BenchmarkCompleted,
    CanaryStepStarted,
    DeploymentPromoted,
    DeploymentRequested,
    DeploymentRolledBack,
    RequestMetricsBatch,
    RequestRecord,
    Route,
    RouterReport,
    RouteTarget,
    StageReport,
    Status,
)
from services.router.report import applied
from services.runtime import bus
from services.runtime.nats_server import NatsServer
from services.runtime.settings import Settings
from tests.integration.controllers import Controller

pytestmark = pytest.mark.e2e

MODEL = "org/crash-test"
POLICY = {
    "defaults": {
        "canary": {
            "steps": [{"weight": 20, "duration_s": 5}, {"weight": 50, "duration_s": 5}],
            "analysis_interval_s": 0.5,
            "lookback_s": 2,
            "min_canary_requests": 20,
            "max_step_extension_s": 30,
        }
    }
}


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Settings, Controller]]:
    server = NatsServer(tmp_path / "nats").start()
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(POLICY))
    settings = Settings(nats_url=server.url, data_dir=tmp_path / "data", instance="crash-test")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFLIGHT_")}
    env |= {
        "PREFLIGHT_NATS_URL": server.url,
        "PREFLIGHT_DATA_DIR": str(tmp_path / "data"),
        "PREFLIGHT_POLICY_FILE": str(policy),
        "PREFLIGHT_CONTROLLER_HTTP_PORT": "0",
        "PREFLIGHT_INSTANCE": "controller-under-test",
    }
    controller = Controller("crash-test", env, tmp_path / "controller.log")
    try:
        yield settings, controller
    finally:
        controller.stop()
        server.stop()


def benchmarked(deployment_id: str) -> BenchmarkCompleted:
    request = DeploymentRequested(
        deployment_id=deployment_id,
        model=MODEL,
        version="v2",
        location="/models/v2",
        endpoint="http://127.0.0.1:9",
    )
    passed = StageReport(stage="benchmark", status=Status.PASSED, reason="passed")
    return BenchmarkCompleted(
        deployment_id=deployment_id, model=MODEL, version="v2", report=passed, request=request
    )


async def gateway(js: JetStreamContext, stop: asyncio.Event, canary_error_rate: float) -> None:
    """200 requests a second, split by the route's weight, published as a router would."""
    kv = await js.key_value(subjects.ROUTES_BUCKET)
    status = await js.key_value(subjects.ROUTER_STATUS_BUCKET)
    rng = random.Random(3)
    while not stop.is_set():
        entry = await kv.get(MODEL)
        route = Route.model_validate_json(entry.value or b"")
        # Say what it serves, as a router does (services/router/report.py).
        report = RouterReport(instance="crash-test", live=True, routes={MODEL: applied(route)})
        await status.put("crash-test", report.model_dump_json().encode())
        live = route.canary is not None and route.canary_weight > 0
        rollout = route.canary if live and route.canary else route.stable
        records = []
        now = datetime.now(UTC)
        for _ in range(40):  # 0.2 s at 200 rps
            canary = live and rng.random() * 100 < route.canary_weight
            failed = canary and rng.random() < canary_error_rate
            records.append(
                RequestRecord(
                    ts=now,
                    deployment_id=(rollout.deployment_id if rollout else None) or "",
                    model=MODEL,
                    version="v2" if canary else "v1",
                    role="canary" if canary else "stable",
                    latency_ms=rng.lognormvariate(0, 0.3) * 40,
                    status=500 if failed else 200,
                    error_kind="http_5xx" if failed else None,
                )
            )
        batch = RequestMetricsBatch(
            batch_id=secrets.token_hex(8), source="crash-test", records=tuple(records)
        )
        await js.publish(
            subjects.metrics("crash-test"),
            batch.model_dump_json().encode(),
            stream=subjects.METRICS_STREAM,
            headers={"Nats-Msg-Id": batch.batch_id},
        )
        await asyncio.sleep(0.2)


async def rollout_with_kills(
    settings: Settings, controller: Controller, *, canary_error_rate: float, kill_at: list[str]
) -> list[Any]:
    """Run one rollout; SIGKILL the controller at each named point, restarting it at once."""
    nc = await bus.connect(settings, "crash-test")
    js = nc.jetstream()
    await bus.ensure_topology(js, settings)
    routes = await js.key_value(subjects.ROUTES_BUCKET)
    stable = Route(model=MODEL, stable=RouteTarget(deployment_id="d-stable-1", version="v1"))
    await routes.put(MODEL, stable.model_dump_json().encode())
    deployment_id = f"d-crash-{secrets.token_hex(3)}"
    stop = asyncio.Event()
    traffic = asyncio.create_task(gateway(js, stop, canary_error_rate))
    controller.start()
    await bus.publish_event(js, benchmarked(deployment_id))
    seen: list[Any] = []
    pending = list(kill_at)
    started = time.monotonic()
    try:
        async for event in bus.follow(js, subjects.deployment_events(deployment_id)):
            seen.append(event)
            point = _point(event, seen)
            while pending and pending[0] == point:
                pending.pop(0)
                if point.endswith("+1s"):
                    await asyncio.sleep(1.0)
                controller.kill()
                controller.start()
            if isinstance(event, DeploymentPromoted | DeploymentRolledBack):
                break
            assert time.monotonic() - started < 120, "rollout did not finish"
        await asyncio.sleep(2.0)  # a duplicate outcome, if any, would arrive now
        seen = await bus.read_history(js, subjects.deployment_events(deployment_id))
    finally:
        stop.set()
        await traffic
        await nc.close()
    assert not pending, f"kill points never reached: {pending}"
    return seen


def _point(event: Any, seen: list[Any]) -> str:
    if isinstance(event, CanaryStepStarted):
        return f"step{event.step_index}"
    analysed = [e for e in seen if type(e).__name__ == "CanaryAnalysed"]
    if type(event).__name__ == "CanaryAnalysed" and len(analysed) == 1:
        return "first-analysis"
    return ""


def test_sigkill_at_several_points_of_a_healthy_rollout_still_promotes_once(
    world: tuple[Settings, Controller],
) -> None:
    settings, controller = world
    events = asyncio.run(
        rollout_with_kills(
            settings,
            controller,
            canary_error_rate=0.0,
            kill_at=["step0", "first-analysis", "step1"],
        )
    )
    assert controller.kills == 3
    steps = [e for e in events if isinstance(e, CanaryStepStarted)]
    assert [(s.step_index, s.weight) for s in steps] == [(0, 20), (1, 50)]
    promoted = [e for e in events if isinstance(e, DeploymentPromoted)]
    assert len(promoted) == 1, [type(e).__name__ for e in events]
    assert not [e for e in events if isinstance(e, DeploymentRolledBack)]
    # The step clock lives in the rollout state: restarts did not shorten or reset a step.
    assert (steps[1].occurred_at - steps[0].occurred_at).total_seconds() >= 5
    assert (promoted[0].occurred_at - steps[1].occurred_at).total_seconds() >= 5
    assert promoted[0].steps_completed == 2


def test_sigkill_during_a_failing_rollout_still_rolls_back_once(
    world: tuple[Settings, Controller],
) -> None:
    settings, controller = world
    events = asyncio.run(
        rollout_with_kills(
            settings, controller, canary_error_rate=0.3, kill_at=["step0", "first-analysis"]
        )
    )
    rolled = [e for e in events if isinstance(e, DeploymentRolledBack)]
    assert len(rolled) == 1 and rolled[0].trigger == "error_rate"
    assert not [e for e in events if isinstance(e, DeploymentPromoted)]
    assert rolled[0].canary is not None and rolled[0].canary.errors > 0
