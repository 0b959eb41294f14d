"""The rollout engine: reads state from KV, asks `decide`, writes state back, then acts.

Crash safety: every transition first writes the new state WITH its pending effects (route and
events) under a revision check, then carries the effects out, then clears them. A controller
killed between the two writes finds the pending effects at restart and replays them; both are
idempotent (the route is written whole, events carry JetStream message ids). A second controller
that read the same revision loses the revision check and does nothing, so no step advances twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from pydantic import ValidationError

from services.canary_controller import decision as rules
from services.canary_controller.effects import effects
from services.canary_controller.observe import MetricsSource
from services.canary_controller.observe import observe as observation_of
from services.canary_controller.outages import Span
from services.canary_controller.prom import DecisionMetrics
from services.canary_controller.state import Phase, RolloutState
from services.canary_controller.upstreams import UpstreamProbe, unreachable
from services.contracts.events import (
    DEPLOYMENT_EVENT,
    BenchmarkCompleted,
    Command,
    Route,
    RouteTarget,
    utc_now,
)
from services.contracts.policy import TrafficPolicy
from services.runtime import bus
from services.runtime.aio import wait_event
from services.traffic import RouterCache
from services.traffic.base import (
    Applied,
    RouterConfigError,
    RouterContext,
    RouterError,
    TrafficRouter,
)

log = logging.getLogger("preflight.canary-controller")


class Conflict(RuntimeError):
    """Another controller changed the rollout since we read it."""


# What a request to a bus that is down or restarting raises (timeouts, closed connections).
BUS_ERRORS = (
    TimeoutError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.NoRespondersError,
    nats.errors.TimeoutError,
)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class NotLeader(RuntimeError):
    """This replica does not hold a fresh lease: it must not write state, routes or events."""


async def _always() -> None:
    return None


@dataclass(frozen=True)
class CommandOutcome:
    """What a person's command did: `applied` is False when it changed nothing (the rollout
    already ended, or the command does not apply in its phase); `reason` says why, in words."""

    applied: bool
    reason: str


@dataclass
class Stored:
    state: RolloutState
    revision: int


class RolloutStore:
    """Rollout states in the KV bucket, one key per deployment, written with revision checks."""

    def __init__(self, kv: KeyValue, guard: Callable[[], Awaitable[None]] = _always) -> None:
        self.kv = kv
        self.guard = guard  # raises NotLeader before a write by a replica that must not act
        # Finished rollouts never change again: once seen, `all` stops reading them.
        self.finished: set[str] = set()

    async def get(self, deployment_id: str) -> Stored | None:
        try:
            entry = await self.kv.get(deployment_id)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        if entry.value is None or entry.revision is None:
            return None
        try:
            state = RolloutState.from_bytes(entry.value)
        except ValidationError as exc:
            # One bad entry (hand-edited, or from another version) must not stop the others.
            log.error("rollout %s in KV does not parse, skipped: %s", deployment_id, exc)
            return None
        return Stored(state, entry.revision)

    async def all(self, *, live_only: bool = False) -> list[Stored]:
        """Every rollout that parses; with `live_only`, finished ones with nothing pending."""
        keys = await bus.kv_keys(self.kv._js, self.kv._name)  # no consumer, unlike kv.keys()
        out = []
        for key in keys:
            if live_only and key in self.finished:
                continue
            stored = await self.get(key)
            if stored is None:
                continue
            if stored.state.phase.terminal and stored.state.pending is None:
                self.finished.add(key)
                if live_only:
                    continue
            out.append(stored)
        return out

    async def create(self, state: RolloutState) -> int:
        await self.guard()
        try:
            return await self.kv.create(state.deployment_id, state.to_bytes())
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise Conflict(f"rollout {state.deployment_id} exists already") from exc

    async def update(self, state: RolloutState, revision: int) -> int:
        await self.guard()
        try:
            return await self.kv.update(state.deployment_id, state.to_bytes(), last=revision)
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise Conflict(f"rollout {state.deployment_id} changed under us") from exc


class Engine:
    """Drives every rollout: one `tick` looks at each live rollout that is due."""

    def __init__(
        self,
        js: JetStreamContext,
        rollouts: KeyValue,
        routes: KeyValue,
        metrics: MetricsSource,
        *,
        metrics_url: Callable[[RolloutState, datetime], str | None],
        clock: Callable[[], datetime] = utc_now,
        may_act: Callable[[], bool] = lambda: True,
        act_wait_s: float = 0.0,
        outages: Callable[[datetime], Sequence[Span]] = lambda now: (),
        outage_grace: timedelta = rules.OUTAGE_GRACE,
        upstreams: UpstreamProbe | None = None,
        routers: Callable[[TrafficPolicy], TrafficRouter] | None = None,
        reapply_s: float = 5.0,
        decision_metrics: DecisionMetrics | None = None,
    ) -> None:
        """`may_act`: whether this replica holds a fresh lease (every write checks it, waiting up
        to `act_wait_s` for a renewal first). `outages`: the bus outages seen so far, given now.
        `upstreams`: checks the route's upstreams when a rollout is held without traffic.
        `routers`: the traffic router for a rollout's `canary.traffic` policy (default: one per
        name and options, built from services/traffic); a weight it does not confirm is written
        to it again every `reapply_s` (writes are idempotent)."""
        self.js = js
        self.store = RolloutStore(rollouts, guard=self.ensure_may_act)
        self.routes = routes
        self.metrics = metrics
        self.metrics_url = metrics_url
        self.clock = clock
        self.may_act = may_act
        self.act_wait_s = act_wait_s
        self.outages = outages
        self.outage_grace = outage_grace
        self.upstreams = upstreams
        self.routers = routers or RouterCache(RouterContext(None, js))
        self.reapply_s = reapply_s
        self.decision_metrics = decision_metrics  # Prometheus series of each stored decision
        self._applied_at: dict[str, datetime] = {}
        self._model_locks: dict[str, asyncio.Lock] = {}

    async def ensure_may_act(self) -> None:
        """Return when this replica may write; raise `NotLeader` if it may not (soon enough).

        A deposed leader's late write cannot clobber the new leader's: rollout states are
        written under a revision check anyway; routes and events are not, so they wait here.
        """
        if self.may_act():
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.act_wait_s
        while loop.time() < deadline:
            await asyncio.sleep(0.1)
            if self.may_act():
                return
        raise NotLeader("this controller replica does not hold the lease")

    # ---- routes ---------------------------------------------------------------------------

    async def current_route(self, model: str) -> Route | None:
        try:
            entry = await self.routes.get(model)
        except nats.js.errors.KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        try:
            return Route.model_validate_json(entry.value)
        except ValueError:
            log.error("route of %s in KV does not parse; treating as absent", model)
            return None

    async def write_route(self, route: Route, traffic: TrafficPolicy | None = None) -> None:
        """Put the route in the routes KV bucket (the record of intent, and the built-in
        router's source), then write it into the model's data plane. RouterError propagates."""
        await self.ensure_may_act()
        await self.routes.put(route.model, route.model_dump_json().encode())
        await self.apply_traffic(route, traffic or TrafficPolicy())

    async def apply_traffic(self, route: Route, traffic: TrafficPolicy) -> None:
        router = self.routers(traffic)
        self._applied_at[route.model] = self.clock()
        await router.apply(route)

    async def confirm_traffic(self, state: RolloutState) -> Applied:
        """What the rollout's data plane has in force, read back from it. Not confirmed: the
        route is written to it again (at most every `reapply_s`: a data plane that restarted
        empty, or a write that failed, heals), and the reason says what was read back."""
        traffic = state.policy.traffic
        route = await self.current_route(state.model)
        if route is None:
            return Applied(False, None, f"no route for {state.model} in the routes bucket")
        try:
            router = self.routers(traffic)
            applied = await router.read(route)
        except (RouterError, RouterConfigError) as exc:
            applied = Applied(False, None, str(exc))
        if applied.confirmed:
            return applied
        last = self._applied_at.get(route.model)
        now = self.clock()
        if last is None or (now - last).total_seconds() >= self.reapply_s:
            try:
                await self.ensure_may_act()
                await self.apply_traffic(route, traffic)
            except (RouterError, RouterConfigError) as exc:
                return Applied(False, applied.weight, f"{applied.detail}; writing it failed: {exc}")
        return applied

    # ---- starting ---------------------------------------------------------------------------

    async def active_for_model(self, model: str, *, exclude: str = "") -> list[Stored]:
        """Rollouts of `model` that hold its route, or have a route write still to replay."""
        return [
            s
            for s in await self.store.all(live_only=True)
            if s.state.model == model
            and s.state.deployment_id != exclude
            and (
                s.state.phase.holds_route
                or (s.state.pending is not None and s.state.pending.route_json is not None)
            )
        ]

    async def queued_before(self, state: RolloutState) -> list[Stored]:
        """Queued rollouts of the same model that arrived earlier: they go first."""
        return [
            s
            for s in await self.store.all(live_only=True)
            if s.state.model == state.model
            and s.state.phase is Phase.QUEUED
            and s.state.deployment_id != state.deployment_id
            and (s.state.created_at, s.state.deployment_id)
            < (state.created_at, state.deployment_id)
        ]

    async def begin(self, state: RolloutState) -> None:
        """Store a new rollout (queued) and start it now if its model's route is free."""
        try:
            revision = await self.store.create(state)
        except Conflict:
            log.info(
                "rollout %s already known (a redelivery): nothing to start", state.deployment_id
            )
            return
        await self.maybe_start(Stored(state, revision))

    async def supersede(self, model: str, by_id: str, by_version: str = "") -> None:
        """Roll back every running rollout of `model` in favour of deployment `by_id`."""
        for stored in await self.active_for_model(model, exclude=by_id):
            if stored.state.pending is not None:
                stored = await self.finish_pending(stored)
            if stored.state.phase.terminal:
                continue
            decision = rules.Decision(
                "rollback",
                f"superseded by {by_version or 'a newer deployment'} ({by_id})",
                trigger="superseded",
            )
            await self.transition(stored, decision, self.clock())

    async def maybe_start(self, stored: Stored) -> None:
        # One start decision per model at a time in this process: two queued rollouts of one
        # model must not both see the route free.
        lock = self._model_locks.setdefault(stored.state.model, asyncio.Lock())
        async with lock:
            fresh = await self.store.get(stored.state.deployment_id)
            if fresh is not None:
                await self._maybe_start(fresh)

    async def _maybe_start(self, stored: Stored) -> None:
        state = stored.state
        if state.phase is not Phase.QUEUED:
            return
        if await self.active_for_model(state.model, exclude=state.deployment_id):
            return  # waits its turn; the tick retries
        if await self.queued_before(state):
            return  # an older version of the model was queued first
        route = await self.current_route(state.model)
        if route is not None and route.stable is not None:
            state = state.model_copy(update={"stable": route.stable})
        await self.transition(
            Stored(state, stored.revision),
            rules.Decision("start", "canary starts"),
            self.clock(),
        )

    # ---- the loop ---------------------------------------------------------------------------

    async def tick(self) -> None:
        """One pass over every live rollout; errors in one rollout do not stop the others."""
        stored_all = await self.store.all(live_only=True)
        # Oldest first, so queued rollouts start in the order they arrived.
        for stored in sorted(stored_all, key=lambda s: s.state.created_at):
            if stored.state.phase.terminal and stored.state.pending is None:
                continue
            try:
                await self.step(stored)
            except NotLeader:
                log.warning("lease lost during a tick: stopped acting")
                return
            except Conflict:
                log.info("rollout %s moved on elsewhere; re-reading", stored.state.deployment_id)
            except BUS_ERRORS as exc:
                log.warning(
                    "rollout %s: the bus did not answer (%s); will retry",
                    stored.state.deployment_id,
                    describe(exc),
                )
            except Exception:
                log.exception("rollout %s: tick failed; will retry", stored.state.deployment_id)

    async def step(self, stored: Stored) -> None:
        if stored.state.pending is not None:
            # Re-read first: an older snapshot's effects must not be replayed over newer ones.
            fresh = await self.store.get(stored.state.deployment_id)
            if fresh is None:
                return
            stored = await self.finish_pending(fresh)
        state = stored.state
        if state.phase.terminal:
            return
        if state.phase is Phase.QUEUED:
            await self.maybe_start(stored)
            return
        now = self.clock()
        stored = await self.allow_for_outages(stored, now)
        state = stored.state
        if not rules.look_due(state, now):
            return
        observation = await self.observe(state, now)
        traffic = None
        if state.phase in (Phase.STEP, Phase.BAKE):
            traffic = await self.confirm_traffic(state)
        decision = rules.decide(
            state, observation, state.policy, state.thresholds, now, traffic=traffic
        )
        if decision.action == "wait" and not decision.analysed and decision.verdict is None:
            return
        overdue = state.step_ends_at is not None and now >= state.step_ends_at
        if overdue or state.phase is Phase.HELD or decision.trigger == "inconclusive":
            decision = await self.explain_silence(state, decision)
        await self.transition(stored, decision, now)

    async def allow_for_outages(self, stored: Stored, now: datetime) -> Stored:
        """Store the rollout with the bus outages it has not allowed for yet (once: failover
        and the other replica's view of the same outage add nothing)."""
        allowed = rules.allow_for_outages(stored.state, self.outages(now), self.outage_grace)
        if allowed == stored.state:
            return stored
        revision = await self.store.update(allowed, stored.revision)
        log.warning(
            "rollout %s: %.1f s of bus outage not counted against its %s; no decision on time "
            "before %s",
            allowed.deployment_id,
            sum(i.seconds for i in allowed.bus_outages),
            "hold" if allowed.phase is Phase.HELD else "step",
            allowed.judge_after.isoformat() if allowed.judge_after else "-",
        )
        return Stored(allowed, revision)

    async def explain_silence(
        self, state: RolloutState, decision: rules.Decision
    ) -> rules.Decision:
        """A step past its end, a hold, or a held rollout's end without traffic in a role: say if
        that role's upstream is to blame (no endpoint, or no TCP connection)."""
        if self.upstreams is None:
            return decision
        found = await unreachable(decision.window, state.canary, state.stable, self.upstreams)
        if not found:
            return decision
        return dataclasses.replace(decision, reason=f"{decision.reason}; {'; '.join(found)}")

    async def observe(self, state: RolloutState, now: datetime) -> rules.Observation | None:
        return await observation_of(self.metrics, state, now)

    # ---- transitions ------------------------------------------------------------------------

    async def transition(self, stored: Stored, decision: rules.Decision, now: datetime) -> None:
        before = stored.state
        after = rules.apply(before, decision, now)
        pending = effects(before, after, decision, now, self.metrics_url(after, now))
        after = after.model_copy(update={"pending": pending})
        revision = await self.store.update(after, stored.revision)
        if self.decision_metrics is not None:
            try:  # counted once stored: a decision that lost the revision check is not
                self.decision_metrics.observe(before, after, decision)
            except Exception:
                log.exception("rollout %s: decision metrics not updated", after.deployment_id)
        if decision.action != "wait":
            log.info(
                "rollout %s (%s %s): %s -> %s: %s",
                after.deployment_id,
                after.model,
                after.version,
                before.phase.value,
                after.phase.value,
                decision.reason,
            )
        if pending is not None:
            await self.finish_pending(Stored(after, revision))

    async def finish_pending(self, stored: Stored) -> Stored:
        """Carry out the stored effects (again, after a crash), then clear them."""
        pending = stored.state.pending
        if pending is None:
            return stored
        if pending.route_json is not None:
            route = Route.model_validate_json(pending.route_json)
            try:
                await self.write_route(route, stored.state.policy.traffic)
            except (RouterError, RouterConfigError) as exc:
                # In KV; the data plane refused. The step cannot end on it (confirm_traffic
                # writes it again and a lasting refusal holds the rollout with this reason).
                log.warning(
                    "rollout %s: the %s router did not take the route: %s",
                    stored.state.deployment_id,
                    stored.state.policy.traffic.router,
                    exc,
                )
        for raw in pending.events_json:
            event = DEPLOYMENT_EVENT.validate_json(raw)
            await self.ensure_may_act()
            await bus.publish_event(self.js, event)
        cleared = stored.state.model_copy(update={"pending": None})
        revision = await self.store.update(cleared, stored.revision)
        return Stored(cleared, revision)

    # ---- commands ---------------------------------------------------------------------------

    async def on_command(self, command: Command) -> CommandOutcome:
        """Apply a person's command; says whether it applied and what happened."""
        by = command.requested_by
        who = f"{by.user} via {by.system}"
        if by.nats_user:
            who += f" as NATS user {by.nats_user}"
        if command.reason:
            who += f" ({command.reason})"
        for _ in range(5):
            stored = await self.store.get(command.deployment_id)
            if stored is None:
                return CommandOutcome(
                    False,
                    f"{type(command).__name__} for {command.deployment_id}: no rollout with "
                    "that id",
                )
            if stored.state.pending is not None:
                stored = await self.finish_pending(stored)
            decision = rules.command(stored.state, type(command).__name__, who, self.clock())
            if decision.action == "wait":
                return CommandOutcome(False, decision.reason)
            try:
                await self.transition(stored, decision, self.clock())
            except Conflict:
                continue
            return CommandOutcome(True, decision.reason)
        raise Conflict(
            f"{type(command).__name__} for {command.deployment_id}: rollout kept changing"
        )


def canary_target(benchmarked: BenchmarkCompleted) -> RouteTarget:
    request = benchmarked.request
    return RouteTarget(
        deployment_id=request.deployment_id,
        version=request.version,
        location=request.location,
        upstream=request.endpoint,
    )


def stable_target(benchmarked: BenchmarkCompleted, route: Route | None) -> RouteTarget | None:
    """The version the canary is compared with: the route's stable, else the request's."""
    if route is not None and route.stable is not None:
        return route.stable
    stable = benchmarked.request.stable
    if stable is None:
        return None
    return RouteTarget(version=stable.version, location=stable.location, upstream=stable.endpoint)


@dataclass
class TickHealth:
    """Whether the ticks that judge every rollout are getting through, for /healthz: a tick
    that keeps failing (the server's consumer limit reached, a store that refuses) stops all
    analysis and rollbacks while the process looks alive."""

    failing_since: float | None = None
    error: str = ""
    clock: Callable[[], float] = time.monotonic

    def succeeded(self) -> None:
        self.failing_since, self.error = None, ""

    def failed(self, error: str) -> None:
        if self.failing_since is None:
            self.failing_since = self.clock()
        self.error = error

    def problem(self, grace_s: float = 10.0) -> str | None:
        """A sentence for /healthz once ticks have failed for `grace_s` in a row."""
        if self.failing_since is None:
            return None
        failing = self.clock() - self.failing_since
        if failing < grace_s:
            return None
        return f"rollout ticks failing for {failing:.0f} s: {self.error}"


async def run_ticks(
    engine: Engine,
    stop: asyncio.Event,
    interval_s: float = 0.5,
    health: TickHealth | None = None,
) -> None:
    """Tick until `stop` is set; a failing tick is logged and retried, never fatal."""
    health = health or TickHealth()
    while not stop.is_set():
        try:
            if engine.may_act():  # a standby, or a leader whose lease lapsed, does nothing
                await engine.tick()
            health.succeeded()
        except BUS_ERRORS as exc:  # an outage: said once by the connection, not as a traceback
            log.warning("controller tick: the bus did not answer (%s); retrying", describe(exc))
            health.failed(describe(exc))
        except Exception as exc:
            log.exception("controller tick failed; retrying")
            health.failed(describe(exc))
        await wait_event(stop, interval_s)
