"""The canary's statistics: exact binomial tail, error-rate and p95 tests, the combined verdict."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from fractions import Fraction
from statistics import NormalDist

import numpy as np
import pytest

from services.canary_controller.stats import (
    Assessment,
    TestResult,
    assess,
    binomial_sf,
    error_rate_test,
    latency_test,
    per_look_alpha,
    percentile_inclusive,
    stable_p95_upper_bound,
)
from services.metrics.queries import RoleWindow

ALPHA = 0.01 / 120  # the default budget over 60 looks x 2 tests: what a default rollout uses
MEDIAN_MS = 80.0
SIGMA = 0.35


def exact_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) by summing every term in exact rational arithmetic."""
    q = Fraction(p)
    return float(sum(math.comb(n, j) * q**j * (1 - q) ** (n - j) for j in range(max(k, 0), n + 1)))


def lognormal(n: int, *, seed: int, scale: float = 1.0) -> tuple[float, ...]:
    rng = np.random.default_rng(seed)
    return tuple(rng.lognormal(math.log(MEDIAN_MS * scale), SIGMA, n).tolist())


def window(requests: int, errors: int = 0, *, seed: int, scale: float = 1.0) -> RoleWindow:
    """A window as the metrics queries return it (latencies sorted)."""
    return role_window(list(lognormal(requests, seed=seed, scale=scale)), errors)


def role_window(latencies: list[float], errors: int = 0) -> RoleWindow:
    latencies = sorted(latencies)

    def q(level: float) -> float | None:
        return percentile_inclusive(latencies, level) if latencies else None

    return RoleWindow("canary", len(latencies), errors, q(0.5), q(0.95), q(0.99), tuple(latencies))


NO_TRAFFIC = RoleWindow("canary", 0, 0, None, None, None)


# ---- binomial_sf ------------------------------------------------------------------------------


def test_binomial_sf_matches_brute_force_on_random_small_cases() -> None:
    rng = random.Random(20261125)
    cases = 0
    for _ in range(600):
        n = rng.randint(0, 80)
        k = rng.randint(-1, n + 1)
        p = rng.choice([0.0, 1.0, 0.5, 0.01, 0.05, 0.95, 0.999, 1e-9, rng.random()])
        got, want = binomial_sf(k, n, p), exact_sf(k, n, p)
        if want == 0.0:
            assert got == 0.0, (k, n, p)
        else:
            assert got == pytest.approx(want, rel=1e-9), (k, n, p)
        cases += 1
    assert cases == 600


@pytest.mark.parametrize(
    ("name", "k", "n", "p", "want"),
    [
        ("k <= 0 is certain", 0, 10, 0.3, 1.0),
        ("k > n is impossible", 11, 10, 0.3, 0.0),
        ("p = 0: no success ever", 1, 10, 0.0, 0.0),
        ("p = 1: every trial succeeds", 10, 10, 1.0, 1.0),
        ("n = 0", 1, 0, 0.5, 0.0),
        ("all of n", 10, 10, 0.5, 0.5**10),
        ("one or more", 1, 10, 0.1, 1 - 0.9**10),
    ],
)
def test_binomial_sf_closed_forms(name: str, k: int, n: int, p: float, want: float) -> None:
    assert binomial_sf(k, n, p) == pytest.approx(want, rel=1e-12), name


def test_binomial_sf_huge_n_is_accurate_and_does_not_underflow_midway() -> None:
    n, p = 1_000_000, 0.05
    mean, sd = n * p, math.sqrt(n * p * (1 - p))
    # Around the mean the tail is close to the normal one (continuity-corrected)...
    z = (mean + 2 * sd - 0.5 - mean) / sd
    assert binomial_sf(round(mean + 2 * sd), n, p) == pytest.approx(
        0.5 * math.erfc(z / math.sqrt(2)), rel=0.02
    )
    # ...far out it is tiny but not zero, and it falls with k.
    far = binomial_sf(round(mean + 20 * sd), n, p)
    assert 0.0 < far < 1e-80
    assert binomial_sf(round(mean + 21 * sd), n, p) < far
    assert binomial_sf(1, n, p) == 1.0
    assert binomial_sf(n, n, p) == 0.0  # 0.05^1e6 underflows to exactly zero, not NaN


def test_binomial_sf_rejects_impossible_arguments() -> None:
    with pytest.raises(ValueError, match="p must be"):
        binomial_sf(1, 10, 1.5)
    with pytest.raises(ValueError, match="p must be"):
        binomial_sf(1, 10, math.nan)
    with pytest.raises(ValueError, match="n must be"):
        binomial_sf(1, -1, 0.5)


# ---- quantiles --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "want"),
    # What chDB's quantileExactInclusive(0.95) returned for these (ClickHouse 26.9).
    [
        (list(range(1, 101)), 95.05),
        (list(range(20)), 18.05),
        ([7.0], 7.0),
        ([1.0, 2.0], 1.95),
        ([1.0, math.inf, math.inf], math.inf),
    ],
)
def test_p95_is_the_queries_quantile_exact_inclusive(values: list[float], want: float) -> None:
    assert percentile_inclusive(values, 0.95) == pytest.approx(want, rel=1e-12)


def test_p95_matches_numpy_percentile() -> None:
    values = sorted(lognormal(777, seed=3))
    assert percentile_inclusive(values, 0.95) == pytest.approx(float(np.percentile(values, 95)))


def test_stable_bound_covers_the_true_p95_and_needs_enough_samples() -> None:
    true_p95 = MEDIAN_MS * math.exp(SIGMA * 1.6448536269514722)
    confidence = 0.99
    # 1 - 0.95^m >= 0.99 needs m >= 90: below that no order statistic is a 99% bound.
    assert stable_p95_upper_bound(sorted(lognormal(89, seed=1)), confidence) is None
    assert stable_p95_upper_bound(sorted(lognormal(90, seed=1)), confidence) is not None
    misses = 0
    for seed in range(200):
        bound = stable_p95_upper_bound(sorted(lognormal(400, seed=seed)), confidence)
        assert bound is not None
        misses += bound < true_p95
    assert misses <= 8  # expected about 2 in 200 at 99% confidence


# ---- error_rate_test --------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorCase:
    name: str
    errors: int
    requests: int
    outcome: str
    within: bool | None


ERROR_CASES = [
    ErrorCase("exactly at the threshold: 1% of 500", 5, 500, "pass", True),
    ErrorCase("exactly at the threshold: 1% of 300 (float division)", 3, 300, "pass", True),
    ErrorCase("just over the threshold but not significant", 8, 500, "pass", False),
    ErrorCase("1 error in 50 is noise at a 1% threshold", 1, 50, "pass", False),
    ErrorCase("10% errors at n = 75 is a rollback", 8, 75, "fail", False),
    ErrorCase("10 errors in 30: overwhelming before min_requests", 10, 30, "fail", False),
    ErrorCase("1 error in 30: too few requests to pass", 1, 30, "insufficient", False),
    ErrorCase("no canary traffic", 0, 0, "insufficient", None),
    ErrorCase("more errors than requests (bad metrics)", 5, 3, "insufficient", None),
    ErrorCase("negative counts (bad metrics)", -1, 10, "insufficient", None),
    ErrorCase("huge n: 1.05% is significant", 10_500, 1_000_000, "fail", False),
    ErrorCase("huge n at 0.99%", 9_900, 1_000_000, "pass", True),
]


@pytest.mark.parametrize("case", ERROR_CASES, ids=lambda c: c.name)
def test_error_rate(case: ErrorCase) -> None:
    result = error_rate_test(case.errors, case.requests, 0.01, ALPHA, 50)
    assert (result.outcome, result.within_threshold) == (case.outcome, case.within), result.reason
    assert result.name == "error_rate" and result.threshold == 0.01 and result.alpha == ALPHA
    if result.p_value is not None:
        assert (result.p_value < ALPHA) == (result.outcome == "fail")


def test_error_rate_reason_carries_the_numbers() -> None:
    result = error_rate_test(21, 500, 0.01, 8e-5, 50)
    assert result.outcome == "fail"
    assert result.reason.startswith("error rate 4.2% (21/500) > 1.0% (p=6e-8 < α=8e-5)")
    assert result.observed == pytest.approx(0.042) and result.n == 500


def test_error_rate_with_zero_threshold_fails_on_any_error() -> None:
    assert error_rate_test(1, 1000, 0.0, ALPHA, 50).outcome == "fail"
    assert error_rate_test(0, 1000, 0.0, ALPHA, 50).outcome == "pass"


def test_huge_n_at_1_05_percent_is_significant() -> None:
    # 10 500 errors in a million: 5 standard deviations over 1%, p ~ 6e-7 < ALPHA.
    result = error_rate_test(10_500, 1_000_000, 0.01, ALPHA, 50)
    assert result.p_value is not None and result.p_value < 1e-6


# ---- latency_test -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyCase:
    name: str
    canary: tuple[float, ...]
    stable: tuple[float, ...]
    outcome: str
    within: bool | None


def ideal(n: int, scale: float = 1.0) -> tuple[float, ...]:
    """n latencies at the distribution's (i + 1/2)/n quantiles: a sample without sampling luck."""
    z = NormalDist()
    return tuple(MEDIAN_MS * scale * math.exp(SIGMA * z.inv_cdf((i + 0.5) / n)) for i in range(n))


STABLE = ideal(3000)
LATENCY_CASES = [
    LatencyCase("identical distributions", ideal(500), STABLE, "pass", True),
    # At n = 75 about 10 canary requests exceed 1.2 x the stable bound where 3.75 are expected
    # under H0: suggestive (p ~ 0.01), not significant at the per-look alpha; not within either.
    LatencyCase(
        "p95 +50% at n = 75: over, not yet significant", ideal(75, 1.5), STABLE, "pass", False
    ),
    LatencyCase("p95 +50% at n = 600", ideal(600, 1.5), STABLE, "fail", False),
    LatencyCase("p95 doubled at n = 75", ideal(75, 2.0), STABLE, "fail", False),
    LatencyCase("p95 +10% is within +20%", ideal(2000, 1.1), STABLE, "pass", True),
    LatencyCase("zero stable traffic", ideal(500), (), "insufficient", None),
    LatencyCase("no canary latencies", (), STABLE, "insufficient", None),
    LatencyCase(
        "stable too thin to bound its p95", (80.0,) * 500, STABLE[::60], "insufficient", True
    ),
    LatencyCase("too few canary samples to pass", (80.0,) * 30, STABLE, "insufficient", True),
    LatencyCase(
        "exactly at the threshold: 360 vs 300", (360.0,) * 100, (300.0,) * 400, "pass", True
    ),
    # 2.46 / 2.05 - 1 = 0.20000000000000018 and 1.2 x 2.05 < 2.46 in floating point.
    LatencyCase(
        "exactly at the threshold: 2.46 vs 2.05", (2.46,) * 100, (2.05,) * 400, "pass", True
    ),
    LatencyCase("just over the threshold", (360.1,) * 100, (300.0,) * 400, "fail", False),
    LatencyCase("NaN latencies are no measurement", (math.nan, *ideal(200)), STABLE, "pass", True),
    LatencyCase("infinite latencies count as slow", (math.inf,) * 60, STABLE, "fail", False),
    LatencyCase("stable all 0 ms: no ratio", (0.0,) * 100, (0.0,) * 400, "pass", None),
]


@pytest.mark.parametrize("case", LATENCY_CASES, ids=lambda c: c.name)
def test_latency(case: LatencyCase) -> None:
    result = latency_test(case.canary, case.stable, 0.20, ALPHA, 50)
    assert (result.outcome, result.within_threshold) == (case.outcome, case.within), result.reason
    assert result.name == "latency" and result.threshold == 0.20
    if result.p_value is not None:
        assert (result.p_value < ALPHA) == (result.outcome == "fail")


def test_latency_reasons_name_what_is_missing() -> None:
    assert (
        latency_test(STABLE[:100], (), 0.2, ALPHA, 50).reason == "no stable traffic in the window"
    )
    thin = latency_test(STABLE[:100], STABLE[:50], 0.2, ALPHA, 50)
    assert "only 50 stable samples, need 197 to bound the stable p95" in thin.reason
    slow = latency_test(ideal(75, 2.0), STABLE, 0.2, ALPHA, 50)
    assert slow.reason.startswith("canary p95 ")
    assert "> +20%" in slow.reason and "canary requests over" in slow.reason


def test_latency_false_alarms_stay_under_alpha_for_identical_distributions() -> None:
    # Even at a loose alpha, identical distributions almost never fail: the stable bound and the
    # +20% margin leave the exceedance probability far below 5%.
    fails = sum(
        latency_test(lognormal(100, seed=s), lognormal(500, seed=1000 + s), 0.2, 0.01, 50).outcome
        == "fail"
        for s in range(100)
    )
    assert fails <= 1


# ---- per_look_alpha ---------------------------------------------------------------------------


def test_per_look_alpha_is_bonferroni() -> None:
    assert per_look_alpha(0.01, 120) == pytest.approx(0.01 / 120)
    assert per_look_alpha(0.05, 1) == 0.05
    for budget, looks in [(0.0, 10), (1.0, 10), (0.01, 0)]:
        with pytest.raises(ValueError, match="must be"):
            per_look_alpha(budget, looks)


# ---- assess -----------------------------------------------------------------------------------


def run_assess(canary: RoleWindow, stable: RoleWindow) -> Assessment:
    return assess(
        canary,
        stable,
        max_error_rate=0.01,
        max_p95_increase=0.20,
        min_canary_requests=50,
        alpha=ALPHA,
    )


STABLE_WINDOW = window(3000, 6, seed=21)


@pytest.mark.parametrize(
    ("name", "canary", "stable", "verdict", "trigger"),
    [
        ("healthy canary like stable", window(400, 1, seed=22), STABLE_WINDOW, "healthy", None),
        ("no canary traffic", NO_TRAFFIC, STABLE_WINDOW, "no_data", None),
        (
            "too few canary requests",
            window(30, 0, seed=23),
            STABLE_WINDOW,
            "insufficient_data",
            None,
        ),
        ("zero stable traffic", window(400, 1, seed=24), NO_TRAFFIC, "insufficient_data", None),
        ("10% errors at n = 75", window(75, 8, seed=25), STABLE_WINDOW, "unhealthy", "error_rate"),
        ("10 errors in 30", window(30, 10, seed=26), STABLE_WINDOW, "unhealthy", "error_rate"),
        (
            "p95 doubled at n = 75",
            window(75, 0, seed=27, scale=2.0),
            STABLE_WINDOW,
            "unhealthy",
            "latency",
        ),
        (
            "zero stable traffic but 30% errors",
            window(100, 30, seed=28),
            NO_TRAFFIC,
            "unhealthy",
            "error_rate",
        ),
    ],
)
def test_assess(
    name: str, canary: RoleWindow, stable: RoleWindow, verdict: str, trigger: str | None
) -> None:
    result = run_assess(canary, stable)
    assert (result.verdict, result.trigger) == (verdict, trigger), f"{name}: {result.reason}"
    assert [t.name for t in result.tests] == ["error_rate", "latency"]
    assert result.reason


@pytest.mark.parametrize(
    ("name", "errors", "scale", "trigger"),
    [
        ("50% errors beat p95 +60%", 200, 1.6, "error_rate"),
        ("p95 x3 beats 3.75% errors", 15, 3.0, "latency"),
    ],
)
def test_assess_worst_wins_when_both_fail(
    name: str, errors: int, scale: float, trigger: str
) -> None:
    result = run_assess(role_window(list(ideal(400, scale)), errors), STABLE_WINDOW)
    assert all(t.outcome == "fail" for t in result.tests), name
    assert result.trigger == trigger, name
    assert result.reason == next(t.reason for t in result.tests if t.name == trigger)


def test_test_result_is_a_plain_value() -> None:
    result = error_rate_test(0, 100, 0.01, ALPHA, 50)
    assert isinstance(result, TestResult)
    assert result == error_rate_test(0, 100, 0.01, ALPHA, 50)
