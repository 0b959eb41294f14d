"""The controller's decisions as Prometheus series, so a team can alert on preflight itself.

`DecisionMetrics.observe(before, after, decision)` is called by the engine after each transition
it stored (a decision that lost its revision check is not counted: the replica that won counts
it). `refresh(read)` reconciles the per-rollout gauges with the rollouts KV bucket: the active
replica calls it every few seconds, so rollouts it has not decided on yet (after a failover, or
queued ones) are there too, and the series of a rollout that finished elsewhere go away.

Cardinality: counters carry model, action, verdict and trigger (small, fixed sets per model);
series labelled with a deployment id exist only while that rollout is live and are removed when
it ends (promoted or rolled back). Series (the router's style: `prometheus_client`, one registry
per process, served at `GET /metrics` by the rollout page's HTTP server):

    preflight_canary_decisions_total{model,action,verdict}    every decision stored (a look that
                                                              waits is action="wait")
    preflight_canary_rollbacks_total{model,trigger}           rollouts that ended rolled back
    preflight_canary_promotions_total{model}                  rollouts that ended promoted
    preflight_canary_rollouts{phase}                          live rollouts by phase
    preflight_canary_weight{model,deployment_id}              canary weight in percent
    preflight_canary_held{model,deployment_id}                1 while held for a person, else 0
    preflight_canary_test_evidence{model,deployment_id,test,kind}
                                                              the last look's p-value or e-value
    preflight_canary_test_alpha{model,deployment_id,test}     that test's significance level
    preflight_canary_test_observed{model,deployment_id,test}  what it measured (error rate, or
                                                              relative p95 increase)
    preflight_canary_last_look_timestamp_seconds{model,deployment_id}
    preflight_canary_controller_active                        1 on the replica holding the lease
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge

from services.canary_controller.decision import Decision
from services.canary_controller.state import Phase, RolloutState
from services.runtime.aio import wait_event

__all__ = ["LIVE_PHASES", "NONE", "DecisionMetrics"]

log = logging.getLogger("preflight.canary-controller.prom")

NONE = "none"  # the label value for a decision without a verdict or trigger
LIVE_PHASES = tuple(p for p in Phase if not p.terminal)
REFRESH_S = 15.0


@dataclass
class _Rollout:
    """What this process exports for one live rollout: the label sets to remove when it ends."""

    model: str
    phase: Phase
    evidence: set[tuple[str, str]] = field(default_factory=set)  # (test, kind)
    tests: set[str] = field(default_factory=set)


class DecisionMetrics:
    """The decision series on `registry`; `observe` after each transition, `refresh` now and
    then. Neither raises for a state it does not expect (the engine guards the call anyway)."""

    def __init__(self, registry: CollectorRegistry, prefix: str = "preflight_canary") -> None:
        self.decisions = Counter(
            f"{prefix}_decisions",
            "Decisions the controller stored, by action and verdict (a look that waits counts).",
            ["model", "action", "verdict"],
            registry=registry,
        )
        self.rollbacks = Counter(
            f"{prefix}_rollbacks",
            "Rollouts that ended rolled back, by trigger (error_rate, latency, ttft, "
            "error_ratio, inconclusive, manual, superseded).",
            ["model", "trigger"],
            registry=registry,
        )
        self.promotions = Counter(
            f"{prefix}_promotions",
            "Rollouts that ended promoted (after the bake, or by a person).",
            ["model"],
            registry=registry,
        )
        self.rollouts = Gauge(
            f"{prefix}_rollouts", "Live rollouts by phase.", ["phase"], registry=registry
        )
        self.weight = Gauge(
            f"{prefix}_weight",
            "The canary's share of requests in percent (0 while queued); gone once it ends.",
            ["model", "deployment_id"],
            registry=registry,
        )
        self.held = Gauge(
            f"{prefix}_held",
            "1 while the rollout is held for a person to decide, else 0; gone once it ends.",
            ["model", "deployment_id"],
            registry=registry,
        )
        self.evidence = Gauge(
            f"{prefix}_test_evidence",
            "The last look's evidence per test: kind p_value (fails below alpha) or e_value "
            "(fails at or above 1/alpha).",
            ["model", "deployment_id", "test", "kind"],
            registry=registry,
        )
        self.alpha = Gauge(
            f"{prefix}_test_alpha",
            "The significance level the last look's test was run at.",
            ["model", "deployment_id", "test"],
            registry=registry,
        )
        self.observed = Gauge(
            f"{prefix}_test_observed",
            "What the last look's test measured: the canary error rate, or the relative "
            "increase of the canary's p95 (latency, ttft) or error rate (error_ratio).",
            ["model", "deployment_id", "test"],
            registry=registry,
        )
        self.last_look = Gauge(
            f"{prefix}_last_look_timestamp_seconds",
            "When the controller last looked at the rollout's metrics (Unix time).",
            ["model", "deployment_id"],
            registry=registry,
        )
        self.active = Gauge(
            f"{prefix}_controller_active",
            "1 on the replica that holds the controller lease (its series are the ones that "
            "count), 0 on a standby.",
            registry=registry,
        )
        self._live: dict[str, _Rollout] = {}
        self._seq = itertools.count(1)
        self._changed: dict[str, int] = {}  # deployment id -> sequence number of its last observe
        self._phases_shown = False

    # ---- the engine's hook ------------------------------------------------------------------

    def observe(self, before: RolloutState, after: RolloutState, decision: Decision) -> None:
        """Count `decision` (which took `before` to `after`, stored) and update the gauges."""
        model = after.model
        self.decisions.labels(model, decision.action, decision.verdict or NONE).inc()
        if after.phase is not before.phase:
            if after.phase is Phase.ROLLED_BACK:
                self.rollbacks.labels(model, decision.trigger or NONE).inc()
            elif after.phase is Phase.PROMOTED:
                self.promotions.labels(model).inc()
        self._changed[after.deployment_id] = next(self._seq)
        self._set_state(after)
        if not after.phase.terminal and decision.assessment is not None:
            self._set_tests(after, decision)
        self._show_phases()

    def track_leader(self, active: Callable[[], bool]) -> None:
        """`preflight_canary_controller_active` reads `active()` at every scrape."""
        self.active.set_function(lambda: 1.0 if active() else 0.0)

    async def refresh(self, read: Callable[[], Awaitable[Iterable[RolloutState]]]) -> None:
        """Make the per-rollout gauges match the stored rollouts `read()` returns (the live ones,
        or all). A rollout observed while the read was under way keeps what `observe` set."""
        started = next(self._seq)
        states = list(await read())
        live = {}
        for state in states:
            if self._changed.get(state.deployment_id, 0) > started:
                continue  # newer than what was read
            if state.phase.terminal:
                self._forget(state.deployment_id)
            else:
                live[state.deployment_id] = state
                self._set_state(state)
        for deployment_id in list(self._live):
            if deployment_id not in live and self._changed.get(deployment_id, 0) <= started:
                self._forget(deployment_id)  # gone from the store, or finished elsewhere
        self._changed = {k: v for k, v in self._changed.items() if v > started}
        self._show_phases(force=True)

    # ---- the gauges -------------------------------------------------------------------------

    def _set_state(self, state: RolloutState) -> None:
        deployment_id = state.deployment_id
        if state.phase.terminal:
            self._forget(deployment_id)
            return
        rollout = self._live.get(deployment_id)
        if rollout is None:
            rollout = self._live[deployment_id] = _Rollout(state.model, state.phase)
        rollout.phase = state.phase
        self.weight.labels(state.model, deployment_id).set(state.weight)
        self.held.labels(state.model, deployment_id).set(1 if state.phase is Phase.HELD else 0)
        if state.last_analysis_at is not None:
            self.last_look.labels(state.model, deployment_id).set(
                state.last_analysis_at.timestamp()
            )

    def _set_tests(self, state: RolloutState, decision: Decision) -> None:
        """The last look's tests replace the previous look's (a test it did not run goes)."""
        assert decision.assessment is not None
        rollout = self._live[state.deployment_id]
        labels = (state.model, state.deployment_id)
        evidence: set[tuple[str, str]] = set()
        tests: set[str] = set()
        for test in decision.assessment.tests:
            tests.add(test.name)
            self.alpha.labels(*labels, test.name).set(test.alpha)
            if test.observed is not None and not math.isnan(test.observed):
                self.observed.labels(*labels, test.name).set(test.observed)
            else:
                self.observed.remove(*labels, test.name)
            for kind, value in (("p_value", test.p_value), ("e_value", test.e_value)):
                if value is not None:
                    evidence.add((test.name, kind))
                    self.evidence.labels(*labels, test.name, kind).set(value)
        for name, kind in rollout.evidence - evidence:
            self.evidence.remove(*labels, name, kind)
        for name in rollout.tests - tests:
            self.alpha.remove(*labels, name)
            self.observed.remove(*labels, name)
        rollout.evidence, rollout.tests = evidence, tests

    def _forget(self, deployment_id: str) -> None:
        """Remove every series labelled with the rollout: it ended."""
        rollout = self._live.pop(deployment_id, None)
        if rollout is None:
            return
        labels = (rollout.model, deployment_id)
        self.weight.remove(*labels)
        self.held.remove(*labels)
        self.last_look.remove(*labels)
        for name, kind in rollout.evidence:
            self.evidence.remove(*labels, name, kind)
        for name in rollout.tests:
            self.alpha.remove(*labels, name)
            self.observed.remove(*labels, name)

    def _show_phases(self, *, force: bool = False) -> None:
        """Every live phase gets a value (0 too), so `== 0` and absent never differ."""
        if not (force or self._phases_shown or self._live):
            return
        self._phases_shown = True
        counts = dict.fromkeys(LIVE_PHASES, 0)
        for rollout in self._live.values():
            counts[rollout.phase] += 1
        for phase, n in counts.items():
            self.rollouts.labels(phase.value).set(n)


async def keep_refreshed(
    metrics: DecisionMetrics,
    read: Callable[[], Awaitable[Iterable[RolloutState]]],
    stop: asyncio.Event,
    interval_s: float = REFRESH_S,
) -> None:
    """`metrics.refresh(read)` every `interval_s` until `stop` is set; a failed read is logged
    (once until one succeeds) and retried, never fatal."""
    warned = False
    while not stop.is_set():
        try:
            await metrics.refresh(read)
            warned = False
        except Exception as exc:
            if not warned:
                log.warning("decision metrics: reading the rollouts failed (%s); retrying", exc)
                warned = True
        await wait_event(stop, interval_s)
