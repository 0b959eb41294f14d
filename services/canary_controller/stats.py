"""The canary's statistics: exact one-sided tests on error counts and on the p95 latency.

Pure: no I/O, no clock. Both tests answer "is the canary *significantly* worse than the
threshold?", so noise alone rolls back a healthy canary with probability at most `alpha` per look
(see docs/canary-statistics.md for the proofs, the choice of alpha and simulated figures).

- Error rate: exact binomial test of H0: p <= max_error_rate on (errors, requests).
- Latency: H0: canary p95 <= (1 + max_p95_increase) x stable p95. T = (1 + delta) x an upper
  confidence bound of the stable p95 (an order statistic); under H0 a canary request exceeds T
  with probability <= 5%, so k = #canary > T is tested against Binomial(n, 0.05).

p95 means what the metrics queries compute (ClickHouse `quantileExactInclusive(0.95)`, numpy's
default percentile): linear interpolation between the sorted values at ranks floor(h) and
floor(h) + 1, h = 0.95 x (n - 1), so the numbers we print match the queries'. The tests
themselves use order statistics of the population quantile, which need no such definition.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Final, Literal, Protocol

import numpy as np
from numpy.typing import NDArray

_Floats = Sequence[float] | NDArray[np.float64]

__all__ = [
    "P95_LEVEL",
    "Assessment",
    "TestResult",
    "WindowLike",
    "assess",
    "binomial_sf",
    "error_rate_test",
    "latency_test",
    "per_look_alpha",
    "percentile_inclusive",
    "stable_p95_upper_bound",
]

P95_LEVEL: Final = 0.95
TestName = Literal["error_rate", "error_ratio", "latency", "ttft"]
# Relative slack when comparing with a threshold: 360/300 - 1 is 0.19999999999999996 but
# 2.46/2.05 - 1 is 0.20000000000000018 (and 1.2 x 2.05 < 2.46); "exactly at the threshold" must
# read as within it whatever the rounding.
_FLOAT_SLACK: Final = 1e-12
# The tail sums stop once a term adds less than this fraction of the running total.
_TAIL_EPS: Final = 1e-17


class WindowLike(Protocol):
    """One role's measurements over the analysis window (services.metrics.queries.RoleWindow)."""

    @property
    def requests(self) -> int: ...
    @property
    def errors(self) -> int: ...
    @property
    def p95_ms(self) -> float | None: ...
    @property
    def latencies_ms(self) -> tuple[float, ...]:
        """Raw latencies in the window; may be a uniform sample of them."""
        ...

    @property
    def ttft_ms(self) -> tuple[float, ...]:
        """Times to first token of the streamed responses in the window (may be a sample)."""
        ...


@dataclass(frozen=True)
class TestResult:
    """The outcome of one test at one look; `reason` is one sentence with the numbers."""

    __test__ = False  # not a pytest class, whatever its name

    name: TestName
    outcome: Literal["pass", "fail", "insufficient"]  # fail = significantly over threshold
    observed: float | None  # canary error rate, or canary p95 / stable p95 - 1
    threshold: float  # max_error_rate, or max_p95_increase
    within_threshold: bool | None  # point estimate <= threshold (None: not computable)
    p_value: float | None
    alpha: float
    n: int  # canary samples used
    reason: str
    e_value: float | None = None  # e-process method: the evidence against H0 (>= 1/alpha: fail)


@dataclass(frozen=True)
class Assessment:
    """The verdict of one look at the canary; a failed test wins over missing data."""

    verdict: Literal["healthy", "unhealthy", "insufficient_data", "no_data"]
    trigger: TestName | None  # the failed test (the stronger evidence)
    reason: str
    tests: tuple[TestResult, ...]


# ---- exact binomial tail ----------------------------------------------------------------------


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exact to ~1e-9 relative for n up to 1e6 and beyond.

    The tail is summed from its largest term outwards (terms fall geometrically away from the
    mode), in units of that term so nothing underflows until the final scale; the side of the
    mode k falls on decides whether the sum is the tail itself or its complement, so a small
    answer is never computed as 1 minus something close to 1.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= p <= 1.0:  # also rejects NaN
        raise ValueError(f"p must be in [0, 1], got {p}")
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p == 0.0:
        return 0.0
    if p == 1.0:
        return 1.0
    q = 1.0 - p
    mode = math.floor((n + 1) * p)
    if k >= mode:
        # Upper tail from k upwards: terms are non-increasing.
        return min(1.0, _scaled_sum(k, n, p, q, upward=True))
    # k - 1 < mode: the lower tail from k - 1 downwards is non-increasing; P(X >= k) >= ~1/2.
    return max(0.0, 1.0 - _scaled_sum(k - 1, n, p, q, upward=False))


def _log_pmf(j: int, n: int, p: float) -> float:
    return (
        math.lgamma(n + 1)
        - math.lgamma(j + 1)
        - math.lgamma(n - j + 1)
        + j * math.log(p)
        + (n - j) * math.log1p(-p)
    )


def _scaled_sum(start: int, n: int, p: float, q: float, *, upward: bool) -> float:
    """Sum of pmf(j) for j from `start` to n (upward) or to 0 (downward)."""
    odds = p / q
    total = 1.0  # in units of pmf(start)
    term = 1.0
    j = start
    if upward:
        while j < n:
            term *= (n - j) / (j + 1) * odds
            j += 1
            total += term
            if term < total * _TAIL_EPS:
                break
    else:
        while j > 0:
            term *= j / (n - j + 1) / odds
            j -= 1
            total += term
            if term < total * _TAIL_EPS:
                break
    log_value = _log_pmf(start, n, p) + math.log(total)
    return math.exp(log_value) if log_value > -745.0 else 0.0


# ---- quantiles --------------------------------------------------------------------------------


def percentile_inclusive(sorted_values: _Floats, level: float) -> float:
    """ClickHouse's quantileExactInclusive(level) of sorted values (numpy's default percentile)."""
    n = len(sorted_values)
    if n == 0:
        raise ValueError("percentile of no values")
    h = level * (n - 1)
    low = math.floor(h)
    below = float(sorted_values[low])
    if low + 1 >= n:
        return below
    above = float(sorted_values[low + 1])
    if above == below:  # also inf == inf, where the formula below would give NaN
        return below
    return below + (h - low) * (above - below)


def stable_p95_upper_bound(sorted_stable: _Floats, confidence: float) -> float | None:
    """An order statistic that is >= the stable population's p95 with prob. >= `confidence`.

    X_(j) (1-based) is below the true quantile q only if at least j samples are below q, and the
    number of samples below q is at most Binomial(m, 0.95) (exactly, for continuous latencies;
    stochastically smaller with ties). So the smallest j with P(Bin(m, 0.95) >= j) <= 1 -
    confidence is the bound. None when even the largest sample is not enough (m too small).
    """
    m = len(sorted_stable)
    gamma = 1.0 - confidence
    if m == 0 or binomial_sf(m, m, P95_LEVEL) > gamma:
        return None
    lo, hi = 1, m  # binomial_sf(j, m, .95) is decreasing in j; find the first j where <= gamma
    while lo < hi:
        mid = (lo + hi) // 2
        if binomial_sf(mid, m, P95_LEVEL) <= gamma:
            hi = mid
        else:
            lo = mid + 1
    return float(sorted_stable[lo - 1])


def _min_stable_for(confidence: float) -> int:
    """The fewest stable samples for which stable_p95_upper_bound is finite."""
    return math.ceil(math.log(1.0 - confidence) / math.log(P95_LEVEL))


# ---- the tests --------------------------------------------------------------------------------


def error_rate_test(
    errors: int, requests: int, max_error_rate: float, alpha: float, min_requests: int
) -> TestResult:
    """One-sided exact binomial test of H0: canary error rate <= max_error_rate.

    Fails (significantly over) when P(X >= errors | requests, max_error_rate) < alpha, even below
    min_requests: the exact test already bounds false alarms, so 10 errors in 30 need not wait.
    """
    _check_alpha(alpha)
    if not 0.0 <= max_error_rate <= 1.0:
        raise ValueError(f"max_error_rate must be in [0, 1], got {max_error_rate}")

    result = _ResultOf("error_rate", max_error_rate, alpha, max(requests, 0))

    if requests < 0 or errors < 0 or errors > requests:
        return result(
            "insufficient", f"inconsistent canary counts: {errors} errors in {requests} requests"
        )
    if requests == 0:
        return result("insufficient", "no canary requests in the window")
    rate = errors / requests
    p_value = binomial_sf(errors, requests, max_error_rate)
    numbers = f"error rate {_pct(rate)} ({errors}/{requests})"
    if p_value < alpha:
        reason = f"{numbers} > {_pct(max_error_rate)} (p={_p(p_value)} < α={_p(alpha)})"
        return result("fail", reason, rate, p_value)
    if requests < min_requests:
        reason = f"{numbers} from only {requests} canary requests, need {min_requests}"
        return result("insufficient", reason, rate, p_value)
    relation = "<=" if _within(rate, max_error_rate) else "above, not significantly,"
    reason = f"{numbers} {relation} {_pct(max_error_rate)} (p={_p(p_value)} ≥ α={_p(alpha)})"
    return result("pass", reason, rate, p_value)


def latency_test(
    canary_ms: Sequence[float],
    stable_ms: Sequence[float],
    max_p95_increase: float,
    alpha: float,
    min_requests: int,
    min_stable: int = 20,
) -> TestResult:
    """Quantile test of H0: canary p95 <= (1 + max_p95_increase) x stable p95.

    alpha is split in two halves so the whole test keeps level alpha: the stable p95's upper
    bound holds with probability >= 1 - alpha/2, and the binomial test on canary exceedances
    runs at alpha/2. NaN latencies are dropped (they are no measurement); +inf counts as slow.
    """
    _check_alpha(alpha)
    if not max_p95_increase >= 0.0:
        raise ValueError(f"max_p95_increase must be >= 0, got {max_p95_increase}")
    canary = _sorted(canary_ms)
    stable = _sorted(stable_ms)
    n, m = len(canary), len(stable)
    factor = 1.0 + max_p95_increase

    result = _ResultOf("latency", max_p95_increase, alpha, n)

    if n == 0:
        return result("insufficient", "no canary latencies in the window")
    if m == 0:
        return result("insufficient", "no stable traffic in the window")
    canary_p95 = percentile_inclusive(canary, P95_LEVEL)
    stable_p95 = percentile_inclusive(stable, P95_LEVEL)
    observed = _increase(canary_p95, stable_p95)
    p95s = f"canary p95 {_ms(canary_p95)} vs stable {_ms(stable_p95)}"
    if observed is not None:
        p95s += f" ({observed:+.0%})"
    confidence = 1.0 - alpha / 2
    need_stable = max(min_stable, _min_stable_for(confidence))
    bound = stable_p95_upper_bound(stable, confidence)
    if m < min_stable or bound is None:
        reason = f"{p95s}: only {m} stable samples, need {need_stable} to bound the stable p95"
        return result("insufficient", reason, observed)
    limit = factor * bound
    # A canary exactly at the limit is not over it, whatever the last bit of the product says.
    exceed = int(np.count_nonzero(canary > limit * (1.0 + _FLOAT_SLACK)))
    p_value = min(1.0, 2.0 * binomial_sf(exceed, n, 1.0 - P95_LEVEL))  # level alpha overall
    over = f"{exceed}/{n} canary requests over {_ms(limit)} ({factor:.2f} x stable bound)"
    if p_value < alpha:
        limit_pct = f"+{max_p95_increase:.0%}"
        reason = f"{p95s} > {limit_pct}: {over} (p={_p(p_value)} < α={_p(alpha)})"
        return result("fail", reason, observed, p_value)
    if n < min_requests:
        reason = f"{p95s} from only {n} canary latencies, need {min_requests}"
        return result("insufficient", reason, observed, p_value)
    relation = (
        "within" if _within(observed or 0.0, max_p95_increase) else "above, not significantly,"
    )
    reason = f"{p95s} {relation} +{max_p95_increase:.0%}: {over} (p={_p(p_value)} ≥ α={_p(alpha)})"
    return result("pass", reason, observed, p_value)


def per_look_alpha(budget: float, looks: int) -> float:
    """Bonferroni: each of `looks` planned tests of one rollout runs at budget / looks.

    The union bound holds whatever the dependence between looks (cumulative windows, windows that
    restart at each step, two tests on the same requests), which the Gaussian recursions behind
    Pocock's constants do not describe; the price is a slightly stricter per-look level.
    """
    if not 0.0 < budget < 1.0:
        raise ValueError(f"false-rollback budget must be in (0, 1), got {budget}")
    if looks < 1:
        raise ValueError(f"looks must be >= 1, got {looks}")
    return budget / looks


def assess(
    canary: WindowLike,
    stable: WindowLike,
    *,
    max_error_rate: float,
    max_p95_increase: float,
    min_canary_requests: int,
    alpha: float,
    max_ttft_p95_increase: float | None = None,
) -> Assessment:
    """Both tests on one window: unhealthy if either fails, else healthy only with enough data.

    With `max_ttft_p95_increase` and streamed responses in the window (TTFT recorded), a third
    test compares the canary's TTFT p95 with the stable's the same way as the latency; it can
    fail the canary, but too few streamed requests never hold a step (most traffic may not
    stream).
    """
    error = error_rate_test(
        canary.errors, canary.requests, max_error_rate, alpha, min_canary_requests
    )
    latency = latency_test(
        canary.latencies_ms, stable.latencies_ms, max_p95_increase, alpha, min_canary_requests
    )
    tests: tuple[TestResult, ...] = (error, latency)
    ttft = ttft_test(canary, stable, max_ttft_p95_increase, alpha, min_canary_requests)
    if ttft is not None:
        tests = (*tests, ttft)
    failed = [t for t in tests if t.outcome == "fail"]
    if failed:
        worst = min(failed, key=lambda t: t.p_value if t.p_value is not None else 1.0)
        return Assessment("unhealthy", worst.name, worst.reason, tests)
    if canary.requests <= 0:
        return Assessment("no_data", None, "no canary requests in the window", tests)
    if canary.requests < min_canary_requests:
        reason = f"only {canary.requests} canary requests in the window, need {min_canary_requests}"
        return Assessment("insufficient_data", None, reason, tests)
    short = [t for t in tests if t.outcome == "insufficient" and t.name != "ttft"]
    if short:
        return Assessment("insufficient_data", None, short[0].reason, tests)
    return Assessment("healthy", None, "; ".join(t.reason for t in tests), tests)


def has_ttft(canary: WindowLike, stable: WindowLike) -> bool:
    return bool(getattr(canary, "ttft_ms", ()) or getattr(stable, "ttft_ms", ()))


def ttft_test(
    canary: WindowLike,
    stable: WindowLike,
    max_increase: float | None,
    alpha: float,
    min_requests: int,
) -> TestResult | None:
    """The latency test on times to first token; None when not gated or nothing streamed."""
    if max_increase is None or not has_ttft(canary, stable):
        return None
    result = latency_test(
        getattr(canary, "ttft_ms", ()),
        getattr(stable, "ttft_ms", ()),
        max_increase,
        alpha,
        min_requests,
    )
    reason = "TTFT " + result.reason.replace("canary latencies", "canary TTFTs")
    return replace(result, name="ttft", reason=reason, within_threshold=result.within_threshold)


# ---- small pieces -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _ResultOf:
    """Builds one test's results: what varies is the outcome, the reason and the numbers."""

    name: TestName
    threshold: float
    alpha: float
    n: int

    def __call__(
        self,
        outcome: Literal["pass", "fail", "insufficient"],
        reason: str,
        observed: float | None = None,
        p_value: float | None = None,
    ) -> TestResult:
        within = None if observed is None else _within(observed, self.threshold)
        return TestResult(
            name=self.name,
            outcome=outcome,
            observed=observed,
            threshold=self.threshold,
            within_threshold=within,
            p_value=p_value,
            alpha=self.alpha,
            n=self.n,
            reason=reason,
        )


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def _sorted(values: Sequence[float]) -> NDArray[np.float64]:
    """The values without NaN, ascending (the queries already sort them: then no sort)."""
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    array = array[~np.isnan(array)]
    if len(array) > 1 and not bool(np.all(array[:-1] <= array[1:])):
        array = np.sort(array)
    return array


def _within(observed: float, threshold: float) -> bool:
    return observed <= threshold or math.isclose(observed, threshold, rel_tol=_FLOAT_SLACK)


def _increase(canary_p95: float, stable_p95: float) -> float | None:
    if stable_p95 > 0.0 and math.isfinite(stable_p95):
        return canary_p95 / stable_p95 - 1.0
    return None  # a ratio to 0 ms (or to infinity) says nothing


def _pct(x: float) -> str:
    return f"{x:.1%}" if x == 0 or x >= 0.001 else f"{x:.2%}"


def _ms(x: float) -> str:
    return f"{x:.0f} ms" if math.isfinite(x) and abs(x) >= 10 else f"{x:.3g} ms"


def _p(x: float) -> str:
    """A p-value or alpha: 0.56, 0.012, 8e-5, 3e-9."""
    if x >= 0.01:
        return f"{x:.2g}"
    mantissa, exponent = f"{x:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"
