"""The canary decision, table-style: (state, measurements, policy, now) -> what to do."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from services.canary_controller import decision as rules
from services.canary_controller.effects import effects, route_for
from services.canary_controller.state import Phase, RolloutState
from services.contracts.events import (
    DEPLOYMENT_EVENT,
    CanaryAnalysed,
    CanaryStepStarted,
    DeploymentHeld,
    DeploymentPromoted,
    DeploymentRequested,
    DeploymentRolledBack,
    RouteTarget,
)
from services.contracts.policy import CanaryPolicy, CanaryStep, CanaryThresholds
from services.metrics.queries import RoleWindow, WindowResult

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
POLICY = CanaryPolicy(
    steps=(CanaryStep(weight=5, duration_s=180), CanaryStep(weight=50, duration_s=120)),
    analysis_interval_s=5,
    min_canary_requests=50,
    max_step_extension_s=60,
    held_timeout_s=600,
)
THRESHOLDS = CanaryThresholds()


def role(name: str, latencies: Sequence[float], errors: int = 0) -> RoleWindow:
    ordered = sorted(latencies)

    def q(p: float) -> float | None:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else None

    return RoleWindow(
        role=name,  # type: ignore[arg-type]
        requests=len(ordered),
        errors=errors,
        p50_ms=q(0.5),
        p95_ms=q(0.95),
        p99_ms=q(0.99),
        latencies_ms=tuple(ordered),
    )


def lat(n: int, median: float = 80.0, seed: int = 1) -> list[float]:
    rng = random.Random(seed)
    return [rng.lognormvariate(0, 0.35) * median for _ in range(n)]


def window(canary: RoleWindow, stable: RoleWindow, end: datetime) -> WindowResult:
    return WindowResult(deployment_id="d-canary-1", start=T0, end=end, canary=canary, stable=stable)


def request() -> DeploymentRequested:
    return DeploymentRequested(
        deployment_id="d-canary-1",
        model="org/chat",
        version="v2",
        location="/models/v2",
        endpoint="http://127.0.0.1:9002",
    )


def rollout(policy: CanaryPolicy = POLICY, **update: object) -> RolloutState:
    state = rules.start_rollout(
        request(),
        earlier=(),
        policy=policy,
        thresholds=THRESHOLDS,
        stable=RouteTarget(deployment_id="d-stable-1", version="v1", upstream="http://s"),
        canary=RouteTarget(deployment_id="d-canary-1", version="v2", upstream="http://c"),
        now=T0,
    )
    return state.model_copy(update=update)


HEALTHY = (lat(400, seed=2), 0, lat(8000, seed=3), 0)
FEW = (lat(10, seed=2), 0, lat(300, seed=3), 0)


@dataclass(frozen=True)
class Case:
    name: str
    state: RolloutState
    at_s: float
    canary: tuple[list[float], int, list[float], int] | None
    action: str
    verdict: str | None = None
    trigger: str | None = None


def case_window(spec: tuple[list[float], int, list[float], int], end: datetime) -> WindowResult:
    c_lat, c_err, s_lat, s_err = spec
    return window(role("canary", c_lat, c_err), role("stable", s_lat, s_err), end)


CASES = [
    Case("healthy mid-step waits", rollout(), 60, HEALTHY, "wait", "healthy"),
    Case("healthy at the step's end advances", rollout(), 180, HEALTHY, "advance", "healthy"),
    Case(
        "healthy at the last step's end promotes",
        rollout(step_index=1),
        180,
        HEALTHY,
        "promote",
        "healthy",
    ),
    Case(
        "10% errors roll back mid-step",
        rollout(),
        20,
        (lat(100, seed=4), 10, lat(2000, seed=5), 2),
        "rollback",
        "unhealthy",
        "error_rate",
    ),
    Case(
        "p95 +50% rolls back",
        rollout(),
        60,
        ([x * 1.5 for x in lat(300, seed=6)], 0, lat(6000, seed=7), 0),
        "rollback",
        "unhealthy",
        "latency",
    ),
    Case(
        "error rate exactly at the threshold is within it",
        rollout(),
        180,
        (lat(1000, seed=8), 10, lat(19000, seed=9), 0),
        "advance",
        "healthy",
    ),
    Case(
        "too few canary requests at the end extends the step",
        rollout(),
        185,
        FEW,
        "wait",
        "insufficient_data",
    ),
    Case(
        "too few after the extension holds for a person",
        rollout(),
        241,
        FEW,
        "hold",
        "insufficient_data",
        "inconclusive",
    ),
    Case(
        "no canary traffic at all is never healthy",
        rollout(),
        241,
        ([], 0, lat(3000, seed=3), 0),
        "hold",
        "no_data",
        "inconclusive",
    ),
    Case(
        "zero stable traffic: latency cannot be compared, held",
        rollout(),
        241,
        (lat(400, seed=2), 0, [], 0),
        "hold",
        "insufficient_data",
        "inconclusive",
    ),
    Case("metrics store down mid-step waits", rollout(), 60, None, "wait", "no_data"),
    Case(
        "metrics store down past the deadline holds, never promotes",
        rollout(),
        241,
        None,
        "hold",
        "no_data",
        "inconclusive",
    ),
    Case(
        "a clock jump back before the step start judges nothing",
        rollout(),
        -30,
        HEALTHY,
        "wait",
        None,
    ),
    Case(
        "a clock jump far forward with healthy data advances once",
        rollout(),
        3600,
        HEALTHY,
        "advance",
        "healthy",
    ),
    Case(
        "held past its deadline is rolled back",
        rollout(phase=Phase.HELD, held_deadline=T0 + timedelta(seconds=300)),
        301,
        FEW,
        "rollback",
        "insufficient_data",
        "inconclusive",
    ),
    Case(
        "held with healthy data still waits for a person",
        rollout(phase=Phase.HELD, held_deadline=T0 + timedelta(seconds=300)),
        200,
        HEALTHY,
        "wait",
        "healthy",
    ),
    Case(
        "paused does not advance after the step's end",
        rollout(phase=Phase.PAUSED, paused_from=Phase.STEP, paused_remaining_s=10.0),
        400,
        HEALTHY,
        "wait",
        "healthy",
    ),
    Case(
        "paused still rolls back a failing canary",
        rollout(phase=Phase.PAUSED, paused_from=Phase.STEP, paused_remaining_s=10.0),
        60,
        (lat(200, seed=4), 30, lat(2000, seed=5), 0),
        "rollback",
        "unhealthy",
        "error_rate",
    ),
    Case(
        "bake: error rate alone judges (no stable traffic at 100%)",
        rollout(phase=Phase.BAKE, baking=True, step_ends_at=T0 + timedelta(seconds=60)),
        61,
        (lat(400, seed=2), 0, [], 0),
        "promote",
        "healthy",
    ),
    Case(
        "bake: errors roll back",
        rollout(phase=Phase.BAKE, baking=True, step_ends_at=T0 + timedelta(seconds=60)),
        30,
        (lat(400, seed=2), 40, [], 0),
        "rollback",
        "unhealthy",
        "error_rate",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_decide(case: Case) -> None:
    now = T0 + timedelta(seconds=case.at_s)
    observation = None
    if case.canary is not None:
        observation = rules.Observation(step=case_window(case.canary, now))
    got = rules.decide(case.state, observation, POLICY, THRESHOLDS, now)
    assert (got.action, got.verdict, got.trigger) == (case.action, case.verdict, case.trigger), (
        got.reason
    )
    assert got.reason


def test_a_canary_turning_bad_late_is_caught_in_the_recent_window() -> None:
    """A long good start would dilute the step window; the lookback window is not diluted."""
    now = T0 + timedelta(seconds=170)
    good = role("canary", lat(850, seed=10), 0)
    stable = role("stable", lat(16000, seed=11), 30)
    recent_canary = role("canary", lat(75, seed=12), 8)
    recent_stable = role("stable", lat(1400, seed=13), 3)
    observation = rules.Observation(
        step=window(good, stable, now), recent=window(recent_canary, recent_stable, now)
    )
    got = rules.decide(rollout(), observation, POLICY, THRESHOLDS, now)
    assert got.action == "rollback" and got.trigger == "error_rate"
    assert "last 30 s" in got.reason


def test_the_false_rollback_budget_is_never_overspent() -> None:
    looks = rules.planned_looks(POLICY)
    assert looks == (180 + 60 + 120 + 60) / 5
    # Over the planned looks and far beyond (extensions, holds), with two windows each.
    spent = sum(rules.alpha_per_test(POLICY, k, 4) * 4 for k in range(1, 100_000))
    assert spent <= POLICY.false_rollback_rate
    # Front-loaded: the first looks, where a broken canary hurts most, get the most.
    assert rules.alpha_per_test(POLICY, 1, 2) > 10 * rules.alpha_per_test(POLICY, looks, 2)


def test_advance_starts_the_next_step_clock_and_announces_it() -> None:
    before = rollout()
    now = T0 + timedelta(seconds=181)
    decision = rules.decide(
        before, rules.Observation(step=case_window(HEALTHY, now)), POLICY, THRESHOLDS, now
    )
    after = rules.apply(before, decision, now)
    assert (after.phase, after.step_index, after.weight) == (Phase.STEP, 1, 50)
    assert after.step_started_at == now and after.step_ends_at == now + timedelta(seconds=120)
    assert after.looks == before.looks + 1 and after.steps_completed == 1
    pending = effects(before, after, decision, now, "http://page/d-canary-1")
    assert pending is not None and pending.route_json is not None
    events = [DEPLOYMENT_EVENT.validate_json(e) for e in pending.events_json]
    assert [type(e) for e in events] == [CanaryAnalysed, CanaryStepStarted]
    assert route_for(after, now).canary_weight == 50


def test_rollback_sets_the_weight_to_zero_and_reports_the_numbers() -> None:
    before = rollout()
    now = T0 + timedelta(seconds=20)
    spec = (lat(100, seed=4), 10, lat(2000, seed=5), 2)
    decision = rules.decide(
        before, rules.Observation(step=case_window(spec, now)), POLICY, THRESHOLDS, now
    )
    after = rules.apply(before, decision, now)
    pending = effects(before, after, decision, now, "http://page/d-canary-1")
    assert pending is not None and pending.route_json is not None
    route = route_for(after, now)
    assert route.canary is None and route.canary_weight == 0 and route.stable is not None
    rolled = [DEPLOYMENT_EVENT.validate_json(e) for e in pending.events_json][-1]
    assert isinstance(rolled, DeploymentRolledBack)
    assert rolled.trigger == "error_rate" and rolled.threshold == 0.01
    assert rolled.canary is not None and rolled.canary.errors == 10
    assert rolled.stable is not None and rolled.stable.requests == 2000
    assert rolled.metrics_url == "http://page/d-canary-1" and rolled.window_end == now


def test_promotion_makes_the_canary_stable() -> None:
    before = rollout(step_index=1)
    now = T0 + timedelta(seconds=181)
    decision = rules.decide(
        before, rules.Observation(step=case_window(HEALTHY, now)), POLICY, THRESHOLDS, now
    )
    after = rules.apply(before, decision, now)
    assert after.phase is Phase.PROMOTED and after.steps_completed == 1
    pending = effects(before, after, decision, now, None)
    assert pending is not None
    route = route_for(after, now)
    assert route.stable is not None and route.stable.version == "v2" and route.canary is None
    promoted = [DEPLOYMENT_EVENT.validate_json(e) for e in pending.events_json][-1]
    assert isinstance(promoted, DeploymentPromoted)
    assert promoted.previous_version == "v1" and promoted.promoted_by == "pipeline"


def test_a_bake_follows_the_last_step_when_the_policy_asks() -> None:
    policy = POLICY.model_copy(update={"bake_s": 60.0})
    before = rollout(policy, step_index=1)
    now = T0 + timedelta(seconds=181)
    decision = rules.decide(
        before, rules.Observation(step=case_window(HEALTHY, now)), policy, THRESHOLDS, now
    )
    after = rules.apply(before, decision, now)
    assert after.phase is Phase.BAKE and after.weight == 100
    assert after.step_ends_at == now + timedelta(seconds=60)


def test_hold_announces_a_deadline() -> None:
    before = rollout()
    now = T0 + timedelta(seconds=241)
    decision = rules.decide(before, None, POLICY, THRESHOLDS, now)
    after = rules.apply(before, decision, now)
    assert after.phase is Phase.HELD and after.held_deadline == now + timedelta(seconds=600)
    pending = effects(before, after, decision, now, None)
    assert pending is not None
    held = [DEPLOYMENT_EVENT.validate_json(e) for e in pending.events_json][-1]
    assert isinstance(held, DeploymentHeld) and held.deadline == after.held_deadline


@pytest.mark.parametrize(
    ("phase", "kind", "action"),
    [
        (Phase.STEP, "PromoteDeployment", "promote"),
        (Phase.STEP, "AbortDeployment", "rollback"),
        (Phase.STEP, "PauseDeployment", "pause"),
        (Phase.STEP, "ResumeDeployment", "wait"),
        (Phase.PAUSED, "ResumeDeployment", "resume"),
        (Phase.HELD, "PromoteDeployment", "promote"),
        (Phase.HELD, "ResumeDeployment", "resume"),
        (Phase.QUEUED, "PromoteDeployment", "wait"),
        (Phase.QUEUED, "AbortDeployment", "rollback"),
        (Phase.PROMOTED, "AbortDeployment", "wait"),
        (Phase.ROLLED_BACK, "PromoteDeployment", "wait"),
    ],
)
def test_commands(phase: Phase, kind: str, action: str) -> None:
    got = rules.command(rollout(phase=phase), kind, "ana via cli", T0)
    assert got.action == action, got.reason


def test_pause_stops_the_step_clock_and_resume_restarts_it() -> None:
    state = rollout()
    paused = rules.apply(
        state, rules.command(state, "PauseDeployment", "x", T0), T0 + timedelta(seconds=100)
    )
    assert paused.phase is Phase.PAUSED and paused.paused_remaining_s == 80
    later = T0 + timedelta(seconds=1000)
    resumed = rules.apply(paused, rules.command(paused, "ResumeDeployment", "x", later), later)
    assert resumed.phase is Phase.STEP and resumed.step_ends_at == later + timedelta(seconds=80)
    assert effects(paused, resumed, rules.Decision("resume", "x"), later, None) is not None


def test_a_manual_promotion_skips_the_bake_and_says_who() -> None:
    policy = POLICY.model_copy(update={"bake_s": 60.0})
    before = rollout(policy)
    decision = rules.command(before, "PromoteDeployment", "ana via cli", T0)
    after = rules.apply(before, decision, T0)
    assert after.phase is Phase.PROMOTED
    pending = effects(before, after, decision, T0, None)
    assert pending is not None
    promoted = DEPLOYMENT_EVENT.validate_json(pending.events_json[-1])
    assert isinstance(promoted, DeploymentPromoted) and promoted.promoted_by == "manual"
    assert "ana via cli" in promoted.reasons[0]


def test_a_queued_rollout_never_touches_the_route() -> None:
    queued = rollout(phase=Phase.QUEUED)
    decision = rules.command(queued, "AbortDeployment", "x", T0)
    after = rules.apply(queued, decision, T0)
    pending = effects(queued, after, decision, T0, None)
    assert pending is not None and pending.route_json is None


def test_state_round_trips_through_kv_bytes() -> None:
    state = rollout()
    assert RolloutState.from_bytes(state.to_bytes()) == state


def test_pausing_or_holding_the_bake_keeps_the_canary_at_100() -> None:
    policy = POLICY.model_copy(update={"bake_s": 60.0})
    before = rollout(policy, step_index=1)
    now = T0 + timedelta(seconds=181)
    decision = rules.decide(
        before, rules.Observation(step=case_window(HEALTHY, now)), policy, THRESHOLDS, now
    )
    baking = rules.apply(before, decision, now)
    assert baking.phase is Phase.BAKE and baking.weight == 100
    paused = rules.apply(baking, rules.command(baking, "PauseDeployment", "x", now), now)
    assert paused.phase is Phase.PAUSED and paused.weight == 100
    assert route_for(paused, now).canary_weight == 100
    held = rules.apply(baking, rules.Decision("hold", "no data", trigger="inconclusive"), now)
    assert held.phase is Phase.HELD and held.weight == 100
    later = now + timedelta(seconds=30)
    resumed = rules.apply(held, rules.command(held, "ResumeDeployment", "x", later), later)
    assert resumed.phase is Phase.BAKE and resumed.step_ends_at == later + timedelta(seconds=60)


def test_paused_and_held_looks_do_not_spend_the_false_rollback_budget() -> None:
    paused = rollout(phase=Phase.PAUSED, paused_from=Phase.STEP, paused_remaining_s=10.0)
    now = T0 + timedelta(seconds=60)
    decision = rules.decide(
        paused, rules.Observation(step=case_window(HEALTHY, now)), POLICY, THRESHOLDS, now
    )
    assert decision.analysed
    assert rules.apply(paused, decision, now).looks == paused.looks


def test_a_policy_without_canary_steps_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        CanaryPolicy(steps=())


# ---- bus outages: time the bus was down does not count against a step or a hold --------------


def s(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


GRACE = timedelta(seconds=10)


@dataclass(frozen=True)
class OutageCase:
    name: str
    state: RolloutState
    outages: tuple[tuple[float, float], ...]
    step_end_s: float | None  # the step's end after allowing for them (None: unchanged)
    held_deadline_s: float | None = None
    judge_after_s: float | None = None


HELD = rollout(phase=Phase.HELD, held_deadline=s(841), held_since=s(241))
OUTAGE_CASES = [
    OutageCase(
        "a 26 s outage mid-step moves the step's end by 26 s",
        rollout(),
        ((60, 86),),
        206,
        judge_after_s=96,
    ),
    OutageCase("two outages add up", rollout(), ((10, 20), (100, 105)), 195, judge_after_s=115),
    OutageCase(
        "overlapping views of one outage count once",
        rollout(),
        ((60, 86), (58, 80)),
        208,
        judge_after_s=96,
    ),
    OutageCase("an outage before the step started does not count", rollout(), ((-50, -10),), None),
    OutageCase(
        "only the part after the step start counts", rollout(), ((-10, 5),), 185, judge_after_s=15
    ),
    OutageCase(
        "during the extension it still moves the end (and the deadline with it)",
        rollout(),
        ((200, 230),),
        210,
        judge_after_s=240,
    ),
    OutageCase(
        "a hold's deadline moves by the part after the hold began",
        HELD,
        ((200, 300),),
        None,
        held_deadline_s=900,
        judge_after_s=310,
    ),
    OutageCase(
        "a paused step's clock is stopped already",
        rollout(phase=Phase.PAUSED, paused_from=Phase.STEP, paused_remaining_s=100.0),
        ((60, 90),),
        None,
        judge_after_s=100,
    ),
]


@pytest.mark.parametrize("case", OUTAGE_CASES, ids=lambda c: c.name)
def test_bus_outages_extend_the_step_or_the_hold(case: OutageCase) -> None:
    spans = [(s(a), s(b)) for a, b in case.outages]
    after = rules.allow_for_outages(case.state, spans, GRACE)
    if case.step_end_s is None:
        assert after.step_ends_at == case.state.step_ends_at
    else:
        assert after.step_ends_at == s(case.step_end_s)
    if case.held_deadline_s is not None:
        assert after.held_deadline == s(case.held_deadline_s)
    else:
        assert after.held_deadline == case.state.held_deadline
    assert after.judge_after == (s(case.judge_after_s) if case.judge_after_s else None)
    # Allowing for the same outages again (the next tick, a failover) changes nothing.
    assert rules.allow_for_outages(after, spans, GRACE) == after


def test_an_outage_seen_longer_later_adds_only_the_difference() -> None:
    ongoing = rules.allow_for_outages(rollout(), [(s(60), s(70))], GRACE)  # counted up to now
    ended = rules.allow_for_outages(ongoing, [(s(60), s(86))], GRACE)  # then it ended
    assert ended.step_ends_at == s(206) and ended.judge_after == s(96)
    assert [(i.start, i.end) for i in ended.bus_outages] == [(s(60), s(86))]


def test_outages_survive_in_the_state_bytes_so_a_failover_does_not_count_them_twice() -> None:
    after = rules.allow_for_outages(rollout(), [(s(60), s(86))], GRACE)
    restored = RolloutState.from_bytes(after.to_bytes())
    assert rules.allow_for_outages(restored, [(s(60), s(86))], GRACE) == restored


def test_finished_and_queued_rollouts_ignore_outages() -> None:
    for state in (
        rollout(phase=Phase.ROLLED_BACK, finished_at=s(10)),
        rollout(phase=Phase.QUEUED),
    ):
        assert rules.allow_for_outages(state, [(s(0), s(100))], GRACE) == state


def test_a_new_step_starts_with_no_outages_of_its_own() -> None:
    after = rules.allow_for_outages(rollout(), [(s(60), s(86))], GRACE)
    advanced = rules.apply(after, rules.Decision("advance", "ok"), s(206))
    assert advanced.bus_outages == () and advanced.step_ends_at == s(206 + 120)
    assert rules.allow_for_outages(advanced, [(s(60), s(86))], GRACE) == advanced


def test_no_decision_on_time_while_records_are_in_transit_but_a_failing_canary_still_goes() -> None:
    state = rules.allow_for_outages(rollout(), [(s(150), s(176))], GRACE)
    assert state.step_ends_at == s(206) and state.judge_after == s(186)

    def at(t: float, spec: tuple[list[float], int, list[float], int] | None) -> rules.Decision:
        observation = rules.Observation(case_window(spec, s(t))) if spec else None
        return rules.decide(state, observation, POLICY, THRESHOLDS, s(t))

    # Without the outage a healthy canary would advance at 180; now its step runs to 206.
    assert at(185, HEALTHY).action == "wait"
    assert at(207, HEALTHY).action == "advance"
    # Too little data: waits for the records in transit, then the (moved) extension, then holds.
    in_transit = at(180, FEW)
    assert in_transit.action == "wait" and "still arriving" in in_transit.reason
    assert at(265, FEW).action == "wait"
    assert at(267, FEW).action == "hold"
    # A canary that is failing on what has arrived is rolled back at once, outage or not.
    assert at(180, (lat(100, seed=4), 10, lat(2000, seed=5), 2)).action == "rollback"
    blind = at(180, None)
    assert blind.action == "wait" and "still arriving" in blind.reason


def test_a_held_rollout_is_not_rolled_back_at_its_deadline_while_records_are_in_transit() -> None:
    state = rules.allow_for_outages(HELD, [(s(830), s(845))], GRACE)
    assert state.held_deadline == s(856) and state.judge_after == s(855)
    obs = rules.Observation(case_window(FEW, s(855)))
    assert rules.decide(state, obs, POLICY, THRESHOLDS, s(850)).action == "wait"
    assert rules.decide(state, obs, POLICY, THRESHOLDS, s(856)).action == "rollback"


def test_a_hold_records_when_it_began() -> None:
    held = rules.apply(rollout(), rules.Decision("hold", "inconclusive"), s(241))
    assert held.held_since == s(241) and held.held_deadline == s(241 + 600)
