"""Time the bus itself was down does not count against a step: nats-server stopped mid-step.

The real controller process, a real nats-server stopped and started again on the same port and
store (the shipped users and permissions), and a gateway that keeps its request records while
the bus is down and publishes them a few seconds after it is back, as a router does. Without
allowing for the outage, the step's deadline passes during it, the rollout is held on the few
records from before it and rolled back at the held deadline, while hundreds of healthy canary
requests are still in transit. With it, the step runs on by the outage and is judged once the
records had time to arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.js import JetStreamContext

from services.contracts import subjects
from services.contracts.events import (
    CanaryStepStarted,
    DeploymentHeld,
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
    free_port,
    lease_value,
    set_stable,
    start_bus,
    wait_until,
    write_policy,
)

pytestmark = pytest.mark.integration

STEP0_S = 8.0
MIN_CANARY_REQUESTS = 120
POLICY: dict[str, object] = {
    "steps": [{"weight": 20, "duration_s": STEP0_S}, {"weight": 50, "duration_s": 4}],
    "analysis_interval_s": 0.5,
    "lookback_s": 2,
    # ~40 canary requests a second at 20%: 3 s of records, but only ~1.5 s arrive before the
    # outage; the rest comes after it.
    "min_canary_requests": MIN_CANARY_REQUESTS,
    "max_step_extension_s": 2,
    "held_timeout_s": 2,
}
DOWN_AFTER_S = 1.5  # into the first step
OUTAGE_S = 10.0
TRANSIT_S = 4.0  # the gateway publishes what it kept this long after it is connected again


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Bus, Controller]]:
    bus_ = start_bus(tmp_path, port=free_port())
    policy = write_policy(tmp_path / "policy.yaml", POLICY)
    one = controller(bus_, tmp_path, "replica-a", policy)
    try:
        yield bus_, one
    finally:
        one.stop()
        bus_.server.stop()


async def history(js: JetStreamContext, deployment_id: str) -> list[Any]:
    """The deployment's events; [] while the bus is down."""
    with contextlib.suppress(Exception):
        return await asyncio.wait_for(
            bus.read_history(js, subjects.deployment_events(deployment_id)), 3
        )
    return []


def test_a_bus_outage_mid_step_does_not_count_against_the_step(
    world: tuple[Bus, Controller],
) -> None:
    bus_, one = world
    model = "org/outage"

    async def scenario() -> tuple[list[Any], float, Gateway]:
        nc = await bootstrap(bus_)
        js = nc.jetstream()
        stop = asyncio.Event()
        gateway = Gateway(js, model, transit_delay_s=TRANSIT_S)
        traffic: asyncio.Task[None] | None = None
        try:
            one.start()

            async def active() -> bool:
                return await lease_value(js) is not None

            await wait_until(active, 30, "the controller holds the lease")
            await set_stable(js, model)
            traffic = asyncio.create_task(gateway.run(stop))
            deployment_id = f"d-{secrets.token_hex(3)}"
            await bus.publish_event(js, benchmarked(deployment_id, model))

            async def stepping() -> bool:
                events = await history(js, deployment_id)
                return any(isinstance(e, CanaryStepStarted) for e in events)

            await wait_until(stepping, 30, "the first step starts", poll=0.2)
            await asyncio.sleep(DOWN_AFTER_S)
            await asyncio.to_thread(bus_.server.stop)
            down_at = time.monotonic()
            await asyncio.sleep(OUTAGE_S)
            # On this thread: children get a parent-death signal when the thread that started
            # them ends, and a worker thread of asyncio's pool ends with the loop.
            bus_.server.start()
            outage = time.monotonic() - down_at

            async def finished() -> bool:
                events = await history(js, deployment_id)
                return any(isinstance(e, DeploymentPromoted | DeploymentRolledBack) for e in events)

            await wait_until(finished, 45, "the rollout ends", poll=0.5)
            return await history(js, deployment_id), outage, gateway
        finally:
            stop.set()
            if traffic is not None:
                await traffic
            await nc.close()

    events, outage, gateway = asyncio.run(scenario())
    names = [type(e).__name__ for e in events]
    assert gateway.kept_max >= OUTAGE_S * 5 * 0.8, "the gateway kept records through the outage"
    assert not [e for e in events if isinstance(e, DeploymentHeld)], names
    assert not [e for e in events if isinstance(e, DeploymentRolledBack)], names
    [promoted] = [e for e in events if isinstance(e, DeploymentPromoted)]
    steps = [e for e in events if isinstance(e, CanaryStepStarted)]
    assert [s.step_index for s in steps] == [0, 1]
    step0 = (steps[1].occurred_at - steps[0].occurred_at).total_seconds()
    # The step ran its 8 s plus the outage, and waited for the records in transit.
    assert step0 >= STEP0_S + outage - 1, (step0, outage)
    assert promoted.canary is not None and promoted.canary.requests > MIN_CANARY_REQUESTS
    log = one.log_text()
    assert "not counted against its step" in log
    print(f"outage {outage:.1f} s; step 0 lasted {step0:.1f} s (nominal {STEP0_S:.0f} s)")
