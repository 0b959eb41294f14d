"""Two canary-controller replicas, one active through the lease: SIGKILL the active one mid-canary.

Both replicas are real processes (`preflight service run canary-controller`, as the supervisor
starts them) on one data directory, so with chDB only the active one may open the metrics store;
the bus runs the shipped users and permissions. One rollout runs undisturbed as the reference,
then a second one has its active controller SIGKILLed a second into its first step: the standby
must take over within 10 s and the rollout end the same way, on the same schedule, with no event
published twice.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from nats.js import JetStreamContext

from services.contracts import subjects
from services.contracts.events import (
    CanaryAnalysed,
    CanaryStepStarted,
    DeploymentPromoted,
    DeploymentRolledBack,
)
from services.runtime import bus
from tests.integration.controllers import (
    Bus,
    Controller,
    Gateway,
    benchmarked,
    bootstrap,
    controller,
    lease_value,
    set_stable,
    start_bus,
    wait_until,
    write_policy,
)

pytestmark = pytest.mark.integration

STEP0_S, STEP1_S = 12.0, 6.0
POLICY = {
    "steps": [{"weight": 20, "duration_s": STEP0_S}, {"weight": 50, "duration_s": STEP1_S}],
    "analysis_interval_s": 0.5,
    "lookback_s": 2,
    "min_canary_requests": 20,
    "max_step_extension_s": 30,
}
KILL_AFTER_S = 1.0  # into the first step
TOLERANCE_S = 1.5  # step boundaries of the two runs may differ by a tick and an ingest batch


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[tuple[Bus, Controller, Controller]]:
    bus_ = start_bus(tmp_path)
    policy = write_policy(tmp_path / "policy.yaml", POLICY)
    first = controller(bus_, tmp_path, "replica-a", policy)
    second = controller(bus_, tmp_path, "replica-b", policy)
    try:
        yield bus_, first, second
    finally:
        for c in (first, second):
            c.stop()
        bus_.server.stop()


def occurred(event: Any) -> datetime:
    value: datetime = event.occurred_at
    return value


async def kill_and_time(
    js: JetStreamContext, active: Controller, standby: Controller
) -> dict[str, float]:
    """SIGKILL `active`; seconds until `standby` holds the lease, and the terms before and after."""
    before = await lease_value(js)
    active.kill()

    async def standby_holds() -> bool:
        now = await lease_value(js)
        return now is not None and now.holder.startswith(standby.name + "/")

    seconds = await wait_until(standby_holds, 15, "the standby holds the lease")
    after = await lease_value(js)
    assert before is not None and after is not None
    return {"lease": seconds, "term_before": before.term, "term_after": after.term}


async def run_rollout(
    js: JetStreamContext,
    model: str,
    *,
    kill: tuple[Controller, Controller] | None = None,
) -> tuple[list[Any], dict[str, float]]:
    """One rollout to its outcome; with `kill` = (active, standby), SIGKILL the active one
    KILL_AFTER_S into the first step and time the standby's takeover."""
    await set_stable(js, model)
    deployment_id = f"d-{secrets.token_hex(3)}"
    stop = asyncio.Event()
    gateway = Gateway(js, model)
    traffic = asyncio.create_task(gateway.run(stop))
    timings: dict[str, float] = {}
    killed_at: datetime | None = None
    await bus.publish_event(js, benchmarked(deployment_id, model))
    started = time.monotonic()
    try:
        async for event in bus.follow(js, subjects.deployment_events(deployment_id)):
            if kill is not None and isinstance(event, CanaryStepStarted) and event.step_index == 0:
                await asyncio.sleep(KILL_AFTER_S)
                active, standby = kill
                kill = None
                killed_at = datetime.now(UTC)
                timings |= await kill_and_time(js, active, standby)
            if (
                killed_at is not None
                and "acting" not in timings
                and isinstance(event, CanaryAnalysed)
                and event.occurred_at > killed_at
            ):
                # The first look by the new leader: its metrics store is open and it ticks.
                timings["acting"] = (event.occurred_at - killed_at).total_seconds()
            if isinstance(event, DeploymentPromoted | DeploymentRolledBack):
                break
            assert time.monotonic() - started < 60, "rollout did not finish"
        await asyncio.sleep(1.5)  # a duplicate, if any, would arrive now
        events = await bus.read_history(js, subjects.deployment_events(deployment_id))
    finally:
        stop.set()
        await traffic
    return events, timings


def schedule(events: list[Any]) -> tuple[float, float]:
    """(step 1 start, outcome) in seconds after step 0 started."""
    steps = [e for e in events if isinstance(e, CanaryStepStarted)]
    [outcome] = [e for e in events if isinstance(e, DeploymentPromoted | DeploymentRolledBack)]
    t0 = occurred(steps[0])
    return (occurred(steps[1]) - t0).total_seconds(), (occurred(outcome) - t0).total_seconds()


def assert_published_once(events: list[Any]) -> None:
    bodies = [e.model_dump_json() for e in events]
    assert len(bodies) == len(set(bodies)), "an event was published twice"
    steps = [(e.step_index, e.weight) for e in events if isinstance(e, CanaryStepStarted)]
    assert steps == [(0, 20), (1, 50)]
    outcomes = [e for e in events if isinstance(e, DeploymentPromoted | DeploymentRolledBack)]
    assert len(outcomes) == 1
    looks = [(e.step_index, e.window_end) for e in events if isinstance(e, CanaryAnalysed)]
    assert len(looks) == len(set(looks)), "one look published twice"


def test_the_standby_takes_over_a_killed_active_controller_mid_canary(
    replicas: tuple[Bus, Controller, Controller],
) -> None:
    bus_, first, second = replicas

    async def scenario() -> None:
        nc = await bootstrap(bus_)
        js = nc.jetstream()
        try:
            first.start()

            async def first_active() -> bool:
                value = await lease_value(js)
                return value is not None and value.holder.startswith("replica-a/")

            await wait_until(first_active, 30, "replica-a holds the lease")
            second.start()

            async def second_standby() -> bool:
                status, body = second.get("/healthz")
                return status == 200 and body.get("role") == "standby"

            await wait_until(second_standby, 30, "replica-b serves /healthz as the standby")
            assert second.get("/readyz")[0] == 503
            assert first.get("/readyz")[0] == 200

            reference, _ = await run_rollout(js, "org/failover-ref")
            disturbed, timings = await run_rollout(js, "org/failover-kill", kill=(first, second))

            status, body = second.get("/readyz")
            assert status == 200 and body["role"] == "active", body

            # The killed replica comes back (its supervisor restarts it) as the standby, and a
            # standby stops cleanly without ever having acted.
            first.start()

            async def first_standby() -> bool:
                status, body = first.get("/healthz")
                return status == 200 and body.get("role") == "standby"

            await wait_until(first_standby, 30, "replica-a is back as the standby")
            stopping = time.monotonic()
            first.stop()
            assert first.proc is not None and first.proc.returncode == 0
            assert time.monotonic() - stopping < 10
            assert first.log_text().count("is now the active controller") == 1
        finally:
            await nc.close()

        for events in (reference, disturbed):
            assert_published_once(events)
            assert [type(e) for e in events if isinstance(e, DeploymentPromoted)] == [
                DeploymentPromoted
            ]
        print(f"takeover: lease {timings['lease']:.2f} s, acting {timings['acting']:.2f} s")
        assert timings["lease"] < 10 and timings["acting"] < 10, timings
        assert timings["term_after"] == timings["term_before"] + 1
        ref_step1, ref_end = schedule(reference)
        step1, end = schedule(disturbed)
        assert abs(step1 - ref_step1) < TOLERANCE_S, (step1, ref_step1)
        assert abs(end - ref_end) < TOLERANCE_S, (end, ref_end)
        assert step1 >= STEP0_S and end - step1 >= STEP1_S
        # The standby never touched the metrics store before it was active.
        log = second.log_text()
        assert log.index("is now the active controller") < log.index("request-metrics table")

    asyncio.run(scenario())
