"""The e-process method (services/canary_controller/sequential.py): the guarantees, checked.

Exact where they can be (the expectation of an e-value under the null, by summing over the
binomial), by simulation otherwise (Ville's bound over many looks, the stable bound's coverage
at every sample size), and through `decide` for what a rollout does with them.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from services.canary_controller import decision as rules
from services.canary_controller import sequential, stats
from services.canary_controller.state import RolloutState
from services.contracts.events import DeploymentRequested, RouteTarget
from services.contracts.policy import CanaryPolicy, CanaryStep, CanaryThresholds
from services.metrics.queries import BucketCounts, RoleWindow, WindowResult

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
POLICY = CanaryPolicy(
    steps=(CanaryStep(weight=5, duration_s=180), CanaryStep(weight=50, duration_s=120)),
    method="e-process",
)
THRESHOLDS = CanaryThresholds()


def binom_pmf(n: int, p: float) -> np.ndarray:
    k = np.arange(n + 1)
    logs = (
        np.array([math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) for j in k])
        + k * math.log(p)
        + (n - k) * math.log1p(-p)
    )
    return np.asarray(np.exp(logs), dtype=np.float64)


@pytest.mark.parametrize("p0", [0.001, 0.01, 0.05, 0.3])
@pytest.mark.parametrize("n", [1, 10, 200])
def test_the_e_value_has_expectation_at_most_one_at_and_below_the_null(p0: float, n: int) -> None:
    ks = np.arange(n + 1)
    log_e = sequential.log_e_counts(ks, np.full_like(ks, n), p0)

    def expectation(p: float) -> float:
        with np.errstate(divide="ignore"):
            terms = np.log(binom_pmf(n, p)) + log_e
        top = terms.max()
        return float(math.exp(top) * np.exp(terms - top).sum())

    for p in (p0, p0 / 2, p0 / 10):
        assert expectation(p) <= 1.0 + 1e-9
    assert expectation(p0) == pytest.approx(1.0, rel=1e-9)  # a martingale at p0


def test_the_e_value_grows_with_bad_draws_and_shrinks_with_good_ones() -> None:
    logs = sequential.log_e_counts([0, 1, 2, 5], [50, 50, 50, 50], 0.01)
    assert list(logs) == sorted(logs) and logs[0] < 0 < logs[-1]


def test_edge_nulls_say_what_they_mean() -> None:
    assert list(sequential.log_e_counts([0, 1], [10, 10], 0.0)) == [0.0, math.inf]
    assert list(sequential.log_e_counts([3], [3], 1.0)) == [0.0]
    with pytest.raises(ValueError, match="p0 must be in"):
        sequential.log_e_counts([0], [1], 1.5)


def test_change_point_weights_sum_to_at_most_one_whatever_the_step_length() -> None:
    for buckets, nominal, planned in [(1, 1, 1), (10, 4, 8), (500, 36, 96), (3, 36, 96)]:
        w = sequential.change_weights(buckets, nominal, planned)
        assert w[0] == sequential.START_WEIGHT and w.sum() <= 1.0 + 1e-12 and (w >= 0).all()
    assert sequential.change_weights(500, 36, 96).sum() == pytest.approx(1.0)
    assert sequential.change_weights(500, 36, 96)[96:].sum() == 0.0  # none past the plan


def test_villes_bound_holds_over_every_look_of_healthy_streams_at_the_threshold() -> None:
    """2,000 streams exactly at the null (1% errors), looked at after every 5-request bucket for
    60 buckets, with change detection: the share that ever reaches 1/alpha stays under alpha."""
    rng = np.random.default_rng(15)
    alpha, p0, streams, buckets = 0.05, 0.01, 2000, 60
    weights = sequential.change_weights(buckets, 20, 50)
    errors = rng.binomial(5, p0, size=(streams, buckets))
    crossed = 0
    for row in errors:
        ever = False
        for end in range(1, buckets + 1):
            log_e, _ = sequential.log_e_detector(row[:end], [5] * end, p0, weights)
            if log_e >= math.log(1 / alpha):
                ever = True
                break
        crossed += ever
    # Binomial(2000, 0.05) exceeds 120 with probability < 1e-3; the true rate is far lower.
    assert crossed / streams < alpha + 0.01, crossed


def test_the_stable_bound_covers_the_p95_at_every_sample_size_at_once() -> None:
    rng = np.random.default_rng(6)
    gamma, misses, runs = 0.05, 0, 300
    q95 = math.exp(1.6448536269514722 * 0.35)  # lognormal(0, 0.35)
    for _ in range(runs):
        sample = np.exp(rng.normal(0, 0.35, 3000))
        for m in range(200, 3001, 200):
            bound = sequential.stable_p95_bound(np.sort(sample[:m]), gamma)
            if bound is not None and bound < q95:
                misses += 1
                break
    assert misses / runs <= gamma


def test_the_stable_bound_needs_enough_samples() -> None:
    assert sequential.stable_p95_bound(np.sort(np.ones(20)), 0.001) is None
    assert sequential.stable_p95_bound(np.sort(np.arange(1.0, 5001.0)), 0.001) is not None


def spent(b: sequential.Budget) -> float:
    """Every share of a phase: its tests' alphas and the gammas of the stable bounds in use."""
    bounds = b.bound_gamma * ((1 if b.latency else 0) + (1 if b.ttft else 0))
    return sum(b.shares.values()) + bounds


@pytest.mark.parametrize("ttft_gated", [True, False])
def test_the_budget_is_the_policys_whatever_the_number_of_looks(ttft_gated: bool) -> None:
    for policy in (POLICY, POLICY.model_copy(update={"bake_s": 60.0})):
        weights = [s.weight for s in policy.steps] + ([100.0] if policy.bake_s else [])
        parts = [sequential.budget(policy, w, ttft_gated=ttft_gated) for w in weights]
        assert sum(spent(b) for b in parts) == pytest.approx(policy.false_rollback_rate)
        assert all(b.phases == len(weights) for b in parts)
        assert all(b.phase == pytest.approx(spent(b)) for b in parts)


def test_a_class_that_does_not_gate_ttft_gives_its_share_to_the_other_tests() -> None:
    gated = sequential.budget(POLICY, 5.0)
    ungated = sequential.budget(POLICY, 5.0, ttft_gated=False)
    assert ungated.ttft == 0.0 and gated.ttft == gated.latency
    for name in ("error_rate", "error_ratio", "latency"):
        assert ungated.shares[name] == pytest.approx(gated.shares[name] * 4 / 3)
    assert ungated.bound_gamma == pytest.approx(gated.bound_gamma * 4 / 3)
    ungated_class = THRESHOLDS.model_copy(update={"max_ttft_p95_increase": None})
    assert sequential.gates_ttft(THRESHOLDS) and not sequential.gates_ttft(ungated_class)


def test_a_phase_with_less_traffic_gets_more_of_the_budget() -> None:
    first, second = (sequential.budget(POLICY, s.weight) for s in POLICY.steps)
    assert first.phase / second.phase == pytest.approx(50 / 5)  # 1 / weight
    baked = POLICY.model_copy(update={"bake_s": 60.0})
    bake = sequential.budget(baked, 100.0)
    assert bake.error_rate == bake.phase and bake.latency == bake.error_ratio == 0.0
    with pytest.raises(ValueError, match="weight"):
        sequential.budget(POLICY, 0.0)


def test_the_joint_test_fails_where_no_test_alone_would() -> None:
    levels = sequential.budget(POLICY, 5.0)

    def result(name: stats.TestName, e: float | None, alpha: float) -> stats.TestResult:
        return stats.TestResult(name, "pass", None, 0.0, None, None, alpha, 100, "", e)

    # Each at 60% of its own 1/alpha: no test alone fails, together they do.
    rate = result("error_rate", 0.6 / levels.error_rate, levels.error_rate)
    ratio = result("error_ratio", 0.6 / levels.error_ratio, levels.error_ratio)
    latency = result("latency", None, levels.latency)  # no stable bound yet: a constant 1
    joint = sequential.joint_evidence([rate, ratio, latency], levels)
    assert joint == pytest.approx(1.2 + 2 * levels.latency)  # TTFT absent: a constant 1 too
    assert sequential.joint_evidence([rate], levels) < 1.0


def test_the_joint_test_at_the_threshold_keeps_villes_bound() -> None:
    """sum_k alpha_k E_k >= 1 over healthy streams at the thresholds: at most A of them, A the sum
    of the shares (each E_k a test supermartingale; their average one too)."""
    rng = np.random.default_rng(11)
    levels = sequential.budget(POLICY, 5.0)
    loud = sequential.Budget(levels.phases, 0.2, 0.05, 0.05, 0.05, 0.05)  # A = 0.2: countable
    weights = sequential.change_weights(36, 36, 36)
    crossings, runs = 0, 400
    for _ in range(runs):
        n = rng.poisson(25, 36)
        errors = rng.binomial(n, 0.01).tolist()  # at max_error_rate exactly
        over = rng.binomial(n, 0.05).tolist()  # at the p95 exactly
        total = n.tolist()
        for t in range(1, 37):
            e_rate = math.exp(sequential.log_e_detector(errors[:t], total[:t], 0.01, weights)[0])
            e_lat = math.exp(sequential.log_e_detector(over[:t], total[:t], 0.05, weights)[0])
            tests = [
                stats.TestResult("error_rate", "pass", None, 0.0, None, None, 0.05, 1, "", e_rate),
                stats.TestResult("latency", "pass", None, 0.0, None, None, 0.05, 1, "", e_lat),
            ]
            if sequential.joint_evidence(tests, loud) >= 1.0:
                crossings += 1
                break
    assert crossings / runs <= 0.2


# ---- through decide ---------------------------------------------------------------------------


def counts(buckets: list[tuple[int, int, int, int, int]], limit: float | None) -> BucketCounts:
    cr, ce, co, sr, se = (tuple(b[i] for b in buckets) for i in range(5))
    return BucketCounts(5.0, limit, cr, ce, co, sr, se)


def role_window(name: str, requests: int, errors: int, latencies: list[float]) -> RoleWindow:
    s = sorted(latencies)
    p95 = stats.percentile_inclusive(s, 0.95) if s else None
    return RoleWindow(name, requests, errors, p95, p95, p95, tuple(s))  # type: ignore[arg-type]


def state_at_step_one(thresholds: CanaryThresholds = THRESHOLDS) -> RolloutState:
    request = DeploymentRequested(
        deployment_id="d-seq", model="org/chat", version="v2", location="/models/v2"
    )
    return rules.start_rollout(
        request,
        earlier=(),
        policy=POLICY,
        thresholds=thresholds,
        stable=RouteTarget(deployment_id="d-stable", version="v1"),
        canary=RouteTarget(deployment_id="d-seq", version="v2"),
        now=T0,
    )


def observation(
    buckets: list[tuple[int, int, int, int, int]],
    seconds: float,
    thresholds: CanaryThresholds = THRESHOLDS,
) -> rules.Observation:
    rng = np.random.default_rng(1)
    stable = list(np.exp(rng.normal(math.log(80), 0.35, sum(b[3] for b in buckets))))
    canary = list(np.exp(rng.normal(math.log(80), 0.35, sum(b[0] for b in buckets))))
    limit = sequential.latency_limit(stable, thresholds, POLICY, 5.0)
    window = WindowResult(
        "d-seq",
        T0,
        T0 + timedelta(seconds=seconds),
        role_window("canary", sum(b[0] for b in buckets), sum(b[1] for b in buckets), canary),
        role_window("stable", sum(b[3] for b in buckets), sum(b[4] for b in buckets), stable),
    )
    return rules.Observation(step=window, counts=counts(buckets, limit))


def test_a_canary_with_ten_percent_errors_is_rolled_back_within_seconds() -> None:
    state = state_at_step_one()
    # 15 s at 5 rps to the canary, 10% errors; stable 95 rps at 0.2%.
    buckets = [(25, 3, 0, 475, 1)] * 3
    now = T0 + timedelta(seconds=15)
    decision = rules.decide(state, observation(buckets, 15), POLICY, THRESHOLDS, now)
    assert decision.action == "rollback", decision.reason
    assert decision.trigger in ("error_rate", "error_ratio")
    assert "anytime-valid" in decision.reason and decision.assessment is not None
    failed = [t for t in decision.assessment.tests if t.outcome == "fail"]
    assert failed and all(t.e_value is not None and t.e_value >= 1 / t.alpha for t in failed)


def test_a_canary_that_turns_bad_mid_step_is_judged_on_the_requests_since_the_change() -> None:
    state = state_at_step_one()
    good, bad = (25, 0, 0, 475, 1), (25, 4, 0, 475, 1)
    buckets = [good] * 20 + [bad] * 3  # bad from 100 s on
    now = T0 + timedelta(seconds=115)
    decision = rules.decide(state, observation(buckets, 115), POLICY, THRESHOLDS, now)
    assert decision.action == "rollback", decision.reason
    assert "100 s into the phase" in decision.reason


def test_a_healthy_canary_waits_out_its_step_and_is_never_failed() -> None:
    state = state_at_step_one()
    buckets = [(25, 0, 1, 475, 1)] * 10
    now = T0 + timedelta(seconds=50)
    decision = rules.decide(state, observation(buckets, 50), POLICY, THRESHOLDS, now)
    assert decision.action == "wait" and decision.verdict == "healthy", decision.reason
    assert decision.assessment is not None
    assert {t.name for t in decision.assessment.tests} == {"error_rate", "error_ratio", "latency"}
    assert all(t.outcome == "pass" for t in decision.assessment.tests)


def test_the_e_process_looks_every_second_and_without_counts_there_is_no_verdict() -> None:
    state = state_at_step_one().model_copy(update={"last_analysis_at": T0})
    assert rules.analysis_due(state, T0 + timedelta(seconds=1))
    empty = rules.Observation(step=observation([(25, 0, 0, 475, 1)], 5).step, counts=None)
    decision = rules.decide(state, empty, POLICY, THRESHOLDS, T0 + timedelta(seconds=5))
    assert decision.action == "wait" and decision.verdict == "no_data"


def test_two_error_tests_short_of_their_own_levels_roll_back_together() -> None:
    state = state_at_step_one()
    # 5 s: 4 of 25 canary requests failed, 1 of 475 stable ones. Neither error test reaches its
    # own 1/alpha; their shares' sum of evidence does.
    buckets = [(25, 4, 0, 475, 1)]
    decision = rules.decide(
        state, observation(buckets, 5), POLICY, THRESHOLDS, T0 + timedelta(seconds=5)
    )
    assert decision.action == "rollback", decision.reason
    assert decision.trigger == "error_rate" and "jointly" in decision.reason
    assert decision.assessment is not None
    alone = {t.name: (t.e_value or 0.0) * t.alpha for t in decision.assessment.tests}
    assert max(alone.values()) < 1.0 <= sum(alone.values())


def test_a_class_without_a_ttft_gate_judges_with_the_larger_shares() -> None:
    buckets = [(25, 0, 1, 475, 1)] * 10
    now = T0 + timedelta(seconds=50)
    ungated = THRESHOLDS.model_copy(update={"max_ttft_p95_increase": None})
    alphas = {}
    for thresholds in (THRESHOLDS, ungated):
        state = state_at_step_one(thresholds)
        seen = observation(buckets, 50, thresholds)  # its latency bound at the class's gamma
        decision = rules.decide(state, seen, POLICY, thresholds, now)
        assert decision.assessment is not None, decision.reason
        alphas[thresholds is ungated] = {t.name: t.alpha for t in decision.assessment.tests}
    gated, loose = observation(buckets, 50).counts, observation(buckets, 50, ungated).counts
    assert gated is not None and loose is not None
    gated_limit, ungated_limit = gated.latency_limit_ms, loose.latency_limit_ms
    assert gated_limit is not None and ungated_limit is not None
    assert ungated_limit <= gated_limit  # a larger gamma: a bound at least as tight
    assert alphas[True].keys() == alphas[False].keys() == {"error_rate", "error_ratio", "latency"}
    for name, alpha in alphas[False].items():
        assert alphas[True][name] == pytest.approx(alpha * 4 / 3)
