"""The rollout engine on a real nats-server (KV, events) and the real ClickHouse engine (chDB).

Time is injected: the test moves the clock and writes the request metrics a gateway would
have produced in that time, then lets the engine tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from nats.js import JetStreamContext

from services.canary_controller import decision as rules
from services.canary_controller.app import ClickHouseMetrics
from services.canary_controller.effects import effects
from services.canary_controller.engine import Conflict, Engine
from services.canary_controller.state import Phase
from services.contracts import subjects
from services.contracts.events import (
    AbortDeployment,
    CanaryStepStarted,
    DeploymentHeld,
    DeploymentPromoted,
    DeploymentRequested,
    DeploymentRolledBack,
    PauseDeployment,
    Requester,
    ResumeDeployment,
    Route,
    RouteTarget,
)
from services.contracts.policy import CanaryPolicy, CanaryStep, CanaryThresholds, TrafficPolicy
from services.router.report import Reporter
from services.router.routes import RouteTable
from services.router.watch import RouteWatcher
from services.runtime import bus
from services.runtime.settings import Settings
from services.traffic.builtin import BuiltinOptions, BuiltinRouter

pytestmark = pytest.mark.integration

POLICY = CanaryPolicy(
    steps=(CanaryStep(weight=5, duration_s=60), CanaryStep(weight=50, duration_s=40)),
    analysis_interval_s=5,
    min_canary_requests=50,
    max_step_extension_s=30,
    held_timeout_s=120,
)
COLUMNS = [
    "ts", "deployment_id", "model", "version", "role", "latency_ms", "ttfb_ms", "status",
    "error_kind", "batch_id", "seq",
]  # fmt: skip


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)

    def __call__(self) -> datetime:
        return self.now


class Traffic:
    """Writes what a gateway would have measured: `rps` requests a second, split by weight."""

    def __init__(self, client: Any, deployment_id: str, model: str, seed: int = 7) -> None:
        self.client = client
        self.deployment_id = deployment_id
        self.model = model
        self.rng = random.Random(seed)

    def run(
        self,
        start: datetime,
        seconds: float,
        weight: float,
        *,
        rps: float = 100.0,
        canary_error_rate: float = 0.0,
        canary_slowdown: float = 1.0,
    ) -> None:
        rows = []
        batch = secrets.token_hex(8)
        for i in range(int(seconds * rps)):
            canary = self.rng.random() * 100 < weight
            latency = self.rng.lognormvariate(0, 0.35) * 80 * (canary_slowdown if canary else 1)
            failed = canary and self.rng.random() < canary_error_rate
            rows.append(
                (
                    start + timedelta(seconds=i / rps),
                    self.deployment_id,
                    self.model,
                    "v2" if canary else "v1",
                    "canary" if canary else "stable",
                    latency,
                    None,
                    500 if failed else 200,
                    "http_5xx" if failed else "",
                    batch,
                    i,
                )
            )
        if rows:
            self.client.insert("request_metrics", rows, column_names=COLUMNS)


def request(model: str, version: str = "v2") -> DeploymentRequested:
    return DeploymentRequested(
        deployment_id=f"d-{secrets.token_hex(4)}",
        model=model,
        version=version,
        location=f"/models/{version}",
        endpoint="http://127.0.0.1:9002",
        requested_by=Requester(user="ana", system="cli"),
    )


async def make_engine(js: JetStreamContext, client: Any, clock: Clock) -> Engine:
    return Engine(
        js,
        await js.key_value(subjects.ROLLOUTS_BUCKET),
        await js.key_value(subjects.ROUTES_BUCKET),
        ClickHouseMetrics(client, "request_metrics"),
        metrics_url=lambda state, now: f"http://page/rollouts/{state.deployment_id}",
        clock=clock,
    )


def new_rollout(req: DeploymentRequested, clock: Clock, policy: CanaryPolicy = POLICY) -> Any:
    return rules.start_rollout(
        req,
        earlier=(),
        policy=policy,
        thresholds=CanaryThresholds(),
        stable=RouteTarget(deployment_id="d-stable", version="v1", upstream="http://s"),
        canary=RouteTarget(deployment_id=req.deployment_id, version="v2", upstream="http://c"),
        now=clock(),
        queued=True,
    )


async def route_of(engine: Engine, model: str) -> Route:
    route = await engine.current_route(model)
    assert route is not None
    return route


async def events_of(js: JetStreamContext, deployment_id: str) -> list[Any]:
    return await bus.read_history(js, subjects.deployment_events(deployment_id))


@pytest.fixture(autouse=True)
async def builtin_router(js: JetStreamContext) -> AsyncIterator[None]:
    """A built-in router instance's route watch and status report (services/router), in this
    process: the engine's steps end only on a weight a router reports it serves."""
    table = RouteTable()
    watcher = RouteWatcher(js, table)
    reporter = Reporter(js, table, "engine-test-router", live=lambda: watcher.live)
    table._on_update = lambda update, route: reporter.changed()
    tasks = [asyncio.create_task(watcher.run()), asyncio.create_task(reporter.run())]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def served(engine: Engine, model: str, timeout: float = 5.0) -> None:
    """Wait (real time) until the router reports the model's current route: what a gateway
    would be serving before the next request, where the test's clock has no real time."""
    route = await engine.current_route(model)
    if route is None:
        return
    router = BuiltinRouter(BuiltinOptions(), engine.js)
    deadline = asyncio.get_running_loop().time() + timeout
    while not (await router.read(route)).confirmed:
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"the router did not report {model}'s route within {timeout} s")
        await asyncio.sleep(0.02)


async def drive(
    engine: Engine,
    traffic: Traffic,
    clock: Clock,
    seconds: float,
    *,
    tick_s: float = 5.0,
    **behaviour: Any,
) -> None:
    """Let `seconds` of traffic happen at the route's current weight, ticking as we go."""
    elapsed = 0.0
    while elapsed < seconds:
        await served(engine, traffic.model)
        route = await route_of(engine, traffic.model)
        traffic.run(clock.now, tick_s, route.canary_weight, **behaviour)
        clock.now += timedelta(seconds=tick_s)
        elapsed += tick_s
        await engine.tick()


async def test_a_healthy_canary_is_promoted_through_every_step(
    js: JetStreamContext, chdb_client: Any
) -> None:
    clock = Clock()
    engine = await make_engine(js, chdb_client, clock)
    req = request("org/healthy")
    traffic = Traffic(chdb_client, req.deployment_id, req.model)
    await engine.begin(new_rollout(req, clock))
    assert (await route_of(engine, req.model)).canary_weight == 5
    weights = []
    for _ in range(40):
        await drive(engine, traffic, clock, 5)
        weights.append((await route_of(engine, req.model)).canary_weight)
        stored = await engine.store.get(req.deployment_id)
        assert stored is not None
        if stored.state.phase.terminal:
            break
    assert stored is not None and stored.state.phase is Phase.PROMOTED, stored
    assert 50 in weights
    final = await route_of(engine, req.model)
    assert final.stable is not None and final.stable.version == "v2" and final.canary is None
    history = await events_of(js, req.deployment_id)
    steps = [e for e in history if isinstance(e, CanaryStepStarted)]
    assert [(s.step_index, s.weight) for s in steps] == [(0, 5), (1, 50)]
    [promoted] = [e for e in history if isinstance(e, DeploymentPromoted)]
    assert promoted.steps_completed == 2 and promoted.previous_version == "v1"
    assert promoted.canary is not None and promoted.canary.requests >= POLICY.min_canary_requests
    assert promoted.metrics_url == f"http://page/rollouts/{req.deployment_id}"
    # Step 1 started when step 0's time was up, not before.
    assert (steps[1].occurred_at - steps[0].occurred_at).total_seconds() >= 60


async def test_a_failing_canary_is_rolled_back_within_seconds(
    js: JetStreamContext, chdb_client: Any
) -> None:
    clock = Clock()
    engine = await make_engine(js, chdb_client, clock)
    req = request("org/failing")
    traffic = Traffic(chdb_client, req.deployment_id, req.model)
    await engine.begin(new_rollout(req, clock))
    started = clock.now
    for _ in range(12):
        await drive(engine, traffic, clock, 5, canary_error_rate=0.10)
        stored = await engine.store.get(req.deployment_id)
        assert stored is not None
        if stored.state.phase.terminal:
            break
    assert stored is not None and stored.state.phase is Phase.ROLLED_BACK
    assert (clock.now - started).total_seconds() <= 15
    route = await route_of(engine, req.model)
    assert route.canary is None and route.canary_weight == 0
    assert route.stable is not None and route.stable.version == "v1"
    [rolled] = [
        e for e in await events_of(js, req.deployment_id) if isinstance(e, DeploymentRolledBack)
    ]
    assert rolled.trigger == "error_rate" and rolled.threshold == 0.01
    assert rolled.canary is not None and rolled.canary.errors > 0
    assert rolled.stable is not None and rolled.stable.requests > rolled.canary.requests
    assert rolled.window_start is not None and rolled.window_end is not None


async def test_an_e_process_rollout_rolls_a_failing_canary_back_from_the_real_store(
    js: JetStreamContext, chdb_client: Any
) -> None:
    """method: e-process through the engine: observe() reads the per-bucket counts from chDB,
    the looks come every second, and the rollback says it is anytime-valid."""
    clock = Clock()
    engine = await make_engine(js, chdb_client, clock)
    req = request("org/failing-eprocess")
    traffic = Traffic(chdb_client, req.deployment_id, req.model)
    policy = POLICY.model_copy(update={"method": "e-process"})
    await engine.begin(new_rollout(req, clock, policy))
    started = clock.now
    for _ in range(30):
        await drive(engine, traffic, clock, 1, tick_s=1.0, canary_error_rate=0.10)
        stored = await engine.store.get(req.deployment_id)
        assert stored is not None
        if stored.state.phase.terminal:
            break
    assert stored is not None and stored.state.phase is Phase.ROLLED_BACK, stored
    assert (clock.now - started).total_seconds() <= 30
    [rolled] = [
        e for e in await events_of(js, req.deployment_id) if isinstance(e, DeploymentRolledBack)
    ]
    assert rolled.trigger in ("error_rate", "error_ratio"), rolled
    assert any("anytime-valid" in r for r in rolled.reasons) and rolled.threshold is not None


async def test_pending_effects_are_replayed_after_a_crash_and_published_once(
    js: JetStreamContext, chdb_client: Any
) -> None:
    clock = Clock()
    engine = await make_engine(js, chdb_client, clock)
    req = request("org/crashy")
    await engine.begin(new_rollout(req, clock))
    stored = await engine.store.get(req.deployment_id)
    assert stored is not None
    # The controller decided to abort and wrote the state with its effects, then died.
    decision = rules.command(stored.state, "AbortDeployment", "ana", clock())
    after = rules.apply(stored.state, decision, clock())
    pending = effects(stored.state, after, decision, clock(), None)
    await engine.store.update(after.model_copy(update={"pending": pending}), stored.revision)
    assert (await route_of(engine, req.model)).canary_weight == 5  # not yet carried out
    # A fresh controller finds the pending effects and carries them out; twice is harmless.
    for _ in range(2):
        restarted = await make_engine(js, chdb_client, clock)
        await restarted.tick()
    assert (await route_of(engine, req.model)).canary is None
    rolled = [
        e for e in await events_of(js, req.deployment_id) if isinstance(e, DeploymentRolledBack)
    ]
    assert len(rolled) == 1 and rolled[0].trigger == "manual"
    final = await engine.store.get(req.deployment_id)
    assert final is not None and final.state.pending is None


async def test_two_controllers_never_advance_the_same_step_twice(
    js: JetStreamContext, chdb_client: Any
) -> None:
    clock = Clock()
    first = await make_engine(js, chdb_client, clock)
    second = await make_engine(js, chdb_client, clock)
    req = request("org/raced")
    await first.begin(new_rollout(req, clock))
    stale = await second.store.get(req.deployment_id)
    assert stale is not None
    await first.on_command(PauseDeployment(**ids(req), requested_by=Requester(user="ana")))
    with pytest.raises(Conflict):
        await second.transition(stale, rules.Decision("advance", "stale"), clock())
    stored = await first.store.get(req.deployment_id)
    assert stored is not None and stored.state.phase is Phase.PAUSED
    steps = [e for e in await events_of(js, req.deployment_id) if isinstance(e, CanaryStepStarted)]
    assert [s.step_index for s in steps] == [0]


def ids(req: DeploymentRequested) -> dict[str, str]:
    return {"deployment_id": req.deployment_id, "model": req.model, "version": req.version}


async def test_manual_pause_resume_and_abort(js: JetStreamContext, chdb_client: Any) -> None:
    clock = Clock()
    engine = await make_engine(js, chdb_client, clock)
    req = request("org/manual")
    traffic = Traffic(chdb_client, req.deployment_id, req.model)
    await engine.begin(new_rollout(req, clock))
    await engine.on_command(PauseDeployment(**ids(req), requested_by=Requester(user="ana")))
    await drive(engine, traffic, clock, 120)  # long past the step's end: paused, so no advance
    stored = await engine.store.get(req.deployment_id)
    assert stored is not None and stored.state.phase is Phase.PAUSED
    assert (await route_of(engine, req.model)).canary_weight == 5
    await engine.on_command(ResumeDeployment(**ids(req), requested_by=Requester(user="ana")))
    stored = await engine.store.get(req.deployment_id)
    assert stored is not None and stored.state.phase is Phase.STEP
    await engine.on_command(
        AbortDeployment(**ids(req), requested_by=Requester(user="bo"), reason="bad vibes")
    )
    [rolled] = [
        e for e in await events_of(js, req.deployment_id) if isinstance(e, DeploymentRolledBack)
    ]
    assert rolled.trigger == "manual" and "bo via cli (bad vibes)" in rolled.reasons[0]
    assert (await route_of(engine, req.model)).canary is None
    late = await engine.on_command(ResumeDeployment(**ids(req), requested_by=Requester(user="ana")))
    assert not late.applied and "already ended (rolled_back)" in late.reason


async def test_a_second_version_waits_for_the_first_rollout_of_its_model(
    js: JetStreamContext, chdb_client: Any
) -> None:
    clock = Clock()
    engine = await make_engine(js, chdb_client, clock)
    first, second = request("org/queued", "v2"), request("org/queued", "v3")
    await engine.begin(new_rollout(first, clock))
    await engine.begin(new_rollout(second, clock))
    stored = await engine.store.get(second.deployment_id)
    assert stored is not None and stored.state.phase is Phase.QUEUED
    route = await route_of(engine, "org/queued")
    assert route.canary is not None and route.canary.deployment_id == first.deployment_id
    await engine.on_command(AbortDeployment(**ids(first), requested_by=Requester(user="ana")))
    await engine.tick()
    stored = await engine.store.get(second.deployment_id)
    assert stored is not None and stored.state.phase is Phase.STEP
    route = await route_of(engine, "org/queued")
    assert route.canary is not None and route.canary.deployment_id == second.deployment_id


async def test_a_metrics_store_that_fails_is_never_read_as_healthy(
    js: JetStreamContext, chdb_client: Any, settings: Settings
) -> None:
    class Broken(ClickHouseMetrics):
        async def window(self, *args: Any, **kwargs: Any) -> Any:
            from services.metrics.queries import MetricsUnavailable

            raise MetricsUnavailable("connection refused")

    clock = Clock()
    engine = await make_engine(js, chdb_client, clock)
    engine.metrics = Broken(chdb_client, "request_metrics")
    req = request("org/blind")
    await engine.begin(new_rollout(req, clock))
    for _ in range(25):  # the step, its extension, and then some
        clock.now += timedelta(seconds=5)
        await engine.tick()
    stored = await engine.store.get(req.deployment_id)
    assert stored is not None and stored.state.phase is Phase.HELD
    assert stored.state.last_verdict == "no_data"


async def test_rollouts_of_different_models_run_side_by_side(
    js: JetStreamContext, chdb_client: Any
) -> None:
    clock = Clock()
    engine = await make_engine(js, chdb_client, clock)
    healthy, failing = request("org/side-a"), request("org/side-b")
    traffic_a = Traffic(chdb_client, healthy.deployment_id, healthy.model, seed=1)
    traffic_b = Traffic(chdb_client, failing.deployment_id, failing.model, seed=2)
    await engine.begin(new_rollout(healthy, clock))
    await engine.begin(new_rollout(failing, clock))
    for _ in range(6):  # 30 s: the failing one is caught, the healthy one keeps going
        for traffic, bad in ((traffic_a, 0.0), (traffic_b, 0.10)):
            weight = (await route_of(engine, traffic.model)).canary_weight
            traffic.run(clock.now, 5, weight, canary_error_rate=bad)
        clock.now += timedelta(seconds=5)
        await engine.tick()
    a = await engine.store.get(healthy.deployment_id)
    b = await engine.store.get(failing.deployment_id)
    assert a is not None and a.state.phase is Phase.STEP
    assert b is not None and b.state.phase is Phase.ROLLED_BACK
    assert (await route_of(engine, "org/side-a")).canary_weight == 5
    assert (await route_of(engine, "org/side-b")).canary is None


async def test_a_rollout_entry_that_does_not_parse_does_not_stop_the_others(
    js: JetStreamContext, chdb_client: Any
) -> None:
    clock = Clock()
    engine = await make_engine(js, chdb_client, clock)
    await engine.store.kv.put("d-garbage", b'{"not": "a rollout"}')
    req = request("org/next-to-garbage")
    await engine.begin(new_rollout(req, clock))
    await engine.on_command(AbortDeployment(**ids(req), requested_by=Requester(user="ana")))
    stored = await engine.store.get(req.deployment_id)
    assert stored is not None and stored.state.phase is Phase.ROLLED_BACK
    await engine.tick()  # no exception escapes


async def test_a_finished_rollouts_replayed_route_never_clobbers_the_next_one(
    js: JetStreamContext, chdb_client: Any
) -> None:
    clock = Clock()
    engine = await make_engine(js, chdb_client, clock)
    first, second = request("org/replay", "v2"), request("org/replay", "v3")
    await engine.begin(new_rollout(first, clock))
    stored = await engine.store.get(first.deployment_id)
    assert stored is not None
    # Aborted, state written with its effects, then the controller died before doing them.
    decision = rules.command(stored.state, "AbortDeployment", "ana", clock())
    after = rules.apply(stored.state, decision, clock())
    pending = effects(stored.state, after, decision, clock(), None)
    await engine.store.update(after.model_copy(update={"pending": pending}), stored.revision)
    # After the restart, the next version arrives before the first tick: it must wait.
    restarted = await make_engine(js, chdb_client, clock)
    await restarted.begin(new_rollout(second, clock))
    waiting = await restarted.store.get(second.deployment_id)
    assert waiting is not None and waiting.state.phase is Phase.QUEUED
    await restarted.tick()  # replays the abort's route, then starts the second rollout
    await restarted.tick()
    route = await route_of(restarted, "org/replay")
    assert route.canary is not None and route.canary.deployment_id == second.deployment_id


async def test_queued_versions_start_in_the_order_they_arrived(
    js: JetStreamContext, chdb_client: Any
) -> None:
    clock = Clock()
    engine = await make_engine(js, chdb_client, clock)
    running, older, newer = (request("org/order", v) for v in ("v2", "v3", "v4"))
    await engine.begin(new_rollout(running, clock))
    await engine.begin(new_rollout(older, clock))
    clock.now += timedelta(seconds=1)
    await engine.on_command(AbortDeployment(**ids(running), requested_by=Requester(user="ana")))
    await engine.begin(new_rollout(newer, clock))  # arrives before the next tick
    stored = await engine.store.get(newer.deployment_id)
    assert stored is not None and stored.state.phase is Phase.QUEUED
    await engine.tick()
    route = await route_of(engine, "org/order")
    assert route.canary is not None and route.canary.deployment_id == older.deployment_id


def closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # nothing listens on it any more


async def test_a_hold_without_canary_traffic_names_an_upstream_that_refuses_connections(
    js: JetStreamContext, chdb_client: Any
) -> None:
    from services.canary_controller.upstreams import TcpProbe

    clock = Clock()
    engine = await make_engine(js, chdb_client, clock)
    engine.upstreams = TcpProbe(timeout_s=1.0)
    req = request("org/unreachable")
    dead = f"http://127.0.0.1:{closed_port()}"
    rollout = new_rollout(req, clock).model_copy(
        update={"canary": RouteTarget(deployment_id=req.deployment_id, version="v2", upstream=dead)}
    )
    traffic = Traffic(chdb_client, req.deployment_id, req.model)
    await engine.begin(rollout)
    for _ in range(25):  # the step and its extension, with stable traffic only
        traffic.run(clock.now, 5, 0.0)
        clock.now += timedelta(seconds=5)
        await engine.tick()
    stored = await engine.store.get(req.deployment_id)
    assert stored is not None and stored.state.phase is Phase.HELD
    said = f"no canary requests in the window; the canary upstream {dead} refuses connections"
    assert said in stored.state.last_reason
    [held] = [e for e in await events_of(js, req.deployment_id) if isinstance(e, DeploymentHeld)]
    assert said in held.reasons[0]


async def test_a_replica_without_a_fresh_lease_writes_nothing(
    js: JetStreamContext, chdb_client: Any
) -> None:
    from services.canary_controller.engine import NotLeader

    clock = Clock()
    leader = {"fresh": True}
    engine = await make_engine(js, chdb_client, clock)
    engine.may_act = lambda: leader["fresh"]
    req = request("org/lapsed")
    await engine.begin(new_rollout(req, clock))
    before = await engine.store.get(req.deployment_id)
    route = await route_of(engine, req.model)
    leader["fresh"] = False  # the lease lapsed (or was taken) mid-rollout
    with pytest.raises(NotLeader):
        await engine.on_command(AbortDeployment(**ids(req), requested_by=Requester(user="ana")))
    with pytest.raises(NotLeader):
        await engine.write_route(Route(model=req.model, stable=route.stable))
    after = await engine.store.get(req.deployment_id)
    assert before is not None and after is not None and after.revision == before.revision
    assert await route_of(engine, req.model) == route
    assert not [
        e for e in await events_of(js, req.deployment_id) if isinstance(e, DeploymentRolledBack)
    ]


async def test_a_bus_outage_is_allowed_for_once_even_across_a_failover(
    js: JetStreamContext, chdb_client: Any
) -> None:
    clock = Clock()
    t0 = clock.now
    seen = [(t0 + timedelta(seconds=10), t0 + timedelta(seconds=36))]  # 26 s down
    engine = await make_engine(js, chdb_client, clock)
    engine.outages = lambda now: seen
    req = request("org/outage-once")
    traffic = Traffic(chdb_client, req.deployment_id, req.model)
    await engine.begin(new_rollout(req, clock))
    await drive(engine, traffic, clock, 40)
    stored = await engine.store.get(req.deployment_id)
    assert stored is not None and stored.state.phase is Phase.STEP
    assert stored.state.step_ends_at == t0 + timedelta(seconds=60 + 26)
    assert stored.state.judge_after == seen[0][1] + rules.OUTAGE_GRACE
    # The new leader saw the same outage a little differently: only the difference counts.
    successor = await make_engine(js, chdb_client, clock)
    successor.outages = lambda now: [(t0 + timedelta(seconds=9), t0 + timedelta(seconds=36))]
    await drive(successor, traffic, clock, 5)
    again = await successor.store.get(req.deployment_id)
    assert again is not None and again.state.step_ends_at == t0 + timedelta(seconds=60 + 27)
    # The step ends on the moved schedule: not at 60 s, at 87 s.
    await drive(successor, traffic, clock, 50)
    steps = [e for e in await events_of(js, req.deployment_id) if isinstance(e, CanaryStepStarted)]
    assert [s.step_index for s in steps] == [0, 1]
    assert (steps[1].occurred_at - t0).total_seconds() >= 87


async def test_a_weight_no_router_confirms_holds_the_rollout_with_the_routers_reason(
    js: JetStreamContext, chdb_client: Any
) -> None:
    """The one router instance here serves the route, but the policy wants two: the step must
    not end on it, and past confirm_timeout_s the rollout is held, saying why."""
    clock = Clock()
    engine = await make_engine(js, chdb_client, clock)
    req = request("org/unconfirmed")
    traffic = Traffic(chdb_client, req.deployment_id, req.model)
    policy = POLICY.model_copy(
        update={
            "traffic": TrafficPolicy(options={"min_instances": 2}, confirm_timeout_s=20),
        }
    )
    await engine.begin(new_rollout(req, clock, policy))
    for _ in range(3):  # 15 s: healthy traffic, but no confirmation yet
        await drive(engine, traffic, clock, 5)
    stored = await engine.store.get(req.deployment_id)
    assert stored is not None and stored.state.phase is Phase.STEP
    assert "waiting for the builtin router to apply canary weight 5%" in stored.state.last_reason
    await drive(engine, traffic, clock, 10)
    stored = await engine.store.get(req.deployment_id)
    assert stored is not None
    assert stored.state.phase is Phase.HELD, stored.state.last_reason
    [held] = [e for e in await events_of(js, req.deployment_id) if isinstance(e, DeploymentHeld)]
    assert "the builtin router has not confirmed canary weight 5%" in held.reasons[0]
    assert "1 of 1 router instances serve canary weight 5%" in held.reasons[0]
    assert "2 needed" in held.reasons[0]
    steps = [e for e in await events_of(js, req.deployment_id) if isinstance(e, CanaryStepStarted)]
    assert [s.step_index for s in steps] == [0]  # never advanced
