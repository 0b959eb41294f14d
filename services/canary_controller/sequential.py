"""Anytime-valid canary tests: e-processes with change detection (policy `canary.method:
e-process`). Pure: no I/O, no clock. docs/canary-statistics.md has the proofs and references.

Each test is a test supermartingale (an e-process) over the requests of one phase (a step, or
the bake): a nonnegative process that starts at 1 and, while the canary is within its threshold,
does not grow in expectation. Ville's inequality bounds the chance that it EVER reaches 1/alpha
by alpha, so it may be looked at as often as wanted: there is no per-look budget to spend.

- Counts: the requests that are errors (or slower than a latency limit) are Bernoulli with
  probability p, H0: p <= p0. For an alternative p1 > p0 the likelihood ratio
  prod (p1/p0)^x (1-p1)/(1-p0))^(1-x) is a supermartingale under every p <= p0; a finite mixture
  of alternatives (ALTERNATIVE_ODDS x the null's odds, equal weights) is one too, and it depends
  only on the counts (k errors in n requests).
- Change detection: the same test started at every bucket of `change_every_s` from the phase's
  start (before its start it stays at 1) and mixed with weights that sum to 1 (half on the phase
  start, the rest over the planned change points): still a test supermartingale, so still
  bounded by Ville, and a canary that turns bad mid-step is judged on the requests since the
  change, not diluted by its good start. The price is log(1 / weight) of evidence.
- Error rate, absolute: p0 = the policy's max_error_rate, over canary requests.
- Error rate vs stable (Lindon & Malek's count test): each error, canary or stable, is the
  canary's with probability w r_c / (w r_c + (1 - w) r_s) when a request goes to the canary with
  probability w (the step weight) and r_c, r_s are the error rates; under H0 r_c <= R r_s that
  is at most p0 = wR / (wR + 1 - w). Only errors count, so a stable error rate far below the
  absolute threshold makes a broken canary stand out fast.
- Latency: T = (1 + max_p95_increase) x an upper confidence bound of the stable p95 that holds
  at every look at once (confidence 1 - gamma_k at look k, sum of gamma_k <= gamma); on that event
  a canary within the threshold exceeds T with probability <= 5%, so the count of canary requests
  over T is tested against p0 = 0.05.

The false-rollback budget B (`false_rollback_rate`) is split in advance, in two ways:

- over the phases in proportion to 1 / (the phase's weight): a phase at 5% of the traffic
  gathers evidence ten times slower than one at 50%, and this split minimises the sum over the
  phases of log(1/alpha) / weight, the time each needs to act on a given effect;
- within a phase over the four tests (error rate and error ratio 1/4 each, latency and TTFT 1/8
  each, their stable bounds 1/8 each; where the model class does not gate TTFT, a third each to
  the error tests and 1/6 each to latency and its bound; in the bake, whose only test is the
  error rate, all of it).

The tests of a phase are judged together: with alpha_k the tests' shares and A their sum, the
average sum_k (alpha_k / A) E_k is itself a test supermartingale (a convex mixture of
supermartingales on the same requests; a test not started is a constant 1), so by Ville it
reaches 1/A, i.e. sum_k alpha_k E_k >= 1, with probability <= A. Any one test at its own level
(E_k >= 1/alpha_k) crosses that line, so the joint test fails at least as soon as the union of
the separate ones, often sooner. The union bound over the phases and the stable bounds makes it
B over the rollout, whatever the number of looks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray

from services.canary_controller import stats
from services.contracts.policy import CanaryPolicy, CanaryThresholds
from services.metrics.queries import BucketCounts, WindowResult

__all__ = [
    "ALTERNATIVE_ODDS",
    "TESTS",
    "Budget",
    "assess",
    "budget",
    "change_weights",
    "gates_ttft",
    "latency_limit",
    "log_e_counts",
    "log_e_detector",
    "ttft_limit",
]

ALTERNATIVE_ODDS: Final = (1.5, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
"""Alternatives of the count tests as multiples of the null's odds p0 / (1 - p0)."""
TESTS: Final = 4  # error rate, error ratio, latency, TTFT: each phase's share is split in four
# (in three where TTFT is not gated)
EXCEED_P0: Final = 1.0 - stats.P95_LEVEL
START_WEIGHT: Final = 0.5  # on the phase's start; the rest on the planned change points
NOMINAL_WEIGHT: Final = 0.4  # over the change points within the step's nominal duration
_LOG_ZERO: Final = -math.inf


@dataclass(frozen=True)
class Budget:
    """Significance levels of one phase's tests, and the gamma of each of its stable bounds."""

    phases: int
    phase: float  # this phase's share of the rollout's budget
    error_rate: float
    error_ratio: float
    latency: float  # the exceedance tests (latency, TTFT); each stable bound gets `bound_gamma`
    bound_gamma: float
    ttft_gated: bool = True  # False: the TTFT test and its bound have no share

    @property
    def ttft(self) -> float:
        return self.latency if self.ttft_gated else 0.0

    @property
    def shares(self) -> dict[str, float]:
        """Each test's alpha; their sum is the joint test's level."""
        return {
            "error_rate": self.error_rate,
            "error_ratio": self.error_ratio,
            "latency": self.latency,
            "ttft": self.ttft,
        }


def budget(policy: CanaryPolicy, weight: float, *, ttft_gated: bool = True) -> Budget:
    """The budget of the phase at `weight` percent (100: the bake): B x (1/weight) / sum over the
    phases of 1/weight, split over that phase's tests (see the module's docstring). A model class
    that does not gate TTFT (`ttft_gated` False) splits it over the three other tests: a test
    that is turned off keeps no share."""
    weights = [s.weight for s in policy.steps] + ([100.0] if policy.bake_s > 0 else [])
    if not 0.0 < weight <= 100.0:
        raise ValueError(f"a phase's weight is in (0, 100], got {weight}")
    phase = policy.false_rollback_rate * (1.0 / weight) / sum(1.0 / w for w in weights)
    if weight >= 100.0:  # the bake: the error rate is its one test
        return Budget(len(weights), phase, phase, 0.0, 0.0, 0.0)
    share = phase / (TESTS if ttft_gated else TESTS - 1)
    return Budget(
        phases=len(weights),
        phase=phase,
        error_rate=share,
        error_ratio=share,
        latency=share / 2,
        bound_gamma=share / 2,  # per phase: each phase's stable samples are its own
        ttft_gated=ttft_gated,
    )


def gates_ttft(thresholds: CanaryThresholds) -> bool:
    return thresholds.max_ttft_p95_increase is not None


# ---- e-values of counts -------------------------------------------------------------------------


def _alternatives(p0: float) -> NDArray[np.float64]:
    odds = p0 / (1.0 - p0)
    alt = np.asarray(ALTERNATIVE_ODDS) * odds
    return np.asarray(alt / (1.0 + alt), dtype=np.float64)


def log_e_counts(
    k: NDArray[np.int64] | Sequence[int], n: NDArray[np.int64] | Sequence[int], p0: float
) -> NDArray[np.float64]:
    """log of the mixture e-value for k "bad" in n Bernoulli draws, H0: p <= p0 (elementwise)."""
    ks = np.asarray(k, dtype=np.float64)
    ns = np.asarray(n, dtype=np.float64)
    if not 0.0 <= p0 <= 1.0:
        raise ValueError(f"p0 must be in [0, 1], got {p0}")
    if p0 >= 1.0:
        return np.zeros_like(ks)  # nothing is over a rate of 100%
    if p0 <= 0.0:
        # H0: never bad. One bad draw refutes it for certain; none leaves the e-value at 1.
        return np.where(ks > 0, math.inf, 0.0)
    alt = _alternatives(p0)
    up = np.log(alt / p0)  # per bad draw
    down = np.log((1.0 - alt) / (1.0 - p0))  # per good draw
    terms = ks[..., None] * up + (ns - ks)[..., None] * down
    top = terms.max(axis=-1)
    out = top + np.log(np.exp(terms - top[..., None]).mean(axis=-1))
    return np.asarray(out, dtype=np.float64)


def change_weights(buckets: int, nominal: int, planned: int) -> NDArray[np.float64]:
    """Mixture weights of the candidate starts 0..buckets-1 (they sum to <= 1 over any length).

    START_WEIGHT on bucket 0; NOMINAL_WEIGHT spread over buckets 1..nominal-1 (the step's
    nominal duration); the rest over buckets nominal..planned-1 (its possible extension); none
    after `planned`, so a step that runs on past its plan gets no new change points.
    """
    w = np.zeros(buckets, dtype=np.float64)
    if buckets == 0:
        return w
    w[0] = START_WEIGHT
    nominal = max(1, nominal)
    planned = max(nominal, planned)
    in_step = NOMINAL_WEIGHT if nominal > 1 else 0.0
    if nominal > 1:
        w[1 : min(buckets, nominal)] = in_step / (nominal - 1)
    if planned > nominal:
        w[nominal : min(buckets, planned)] = (1.0 - START_WEIGHT - in_step) / (planned - nominal)
    return w


def log_e_detector(
    bad: Sequence[int], total: Sequence[int], p0: float, weights: NDArray[np.float64]
) -> tuple[float, int]:
    """log of sum_j w_j E(counts since bucket j), and the start j that carries most of it."""
    b = np.asarray(bad, dtype=np.int64)
    t = np.asarray(total, dtype=np.int64)
    if len(b) == 0:
        return 0.0, 0
    suffix_b = np.cumsum(b[::-1])[::-1]
    suffix_t = np.cumsum(t[::-1])[::-1]
    logs = log_e_counts(suffix_b, suffix_t, p0)
    with np.errstate(divide="ignore"):
        logw = np.log(weights[: len(b)])
    parts = logw + logs
    parts = np.where(np.isnan(parts), _LOG_ZERO, parts)
    best = int(np.argmax(parts))
    top = float(parts[best])
    if math.isinf(top):
        return top, best
    return top + math.log(float(np.exp(parts - top).sum())), best


# ---- the latency limit --------------------------------------------------------------------------


def stable_p95_bound(sorted_ms: NDArray[np.float64], gamma: float) -> float | None:
    """An order statistic >= the stable p95 at every sample size at once, w.p. >= 1 - gamma.

    X_(j) < q only if at least j of the m samples fall below q, and that count S_m is at most
    Binomial(m, 0.95). The mixture e-process of S_m against p0 = 0.95 (log_e_counts) passes
    1/gamma at any m with probability <= gamma (Ville), so with j_m the smallest j whose e-value
    reaches 1/gamma, S_m < j_m for every m at once and X_(j_m) >= q: a confidence sequence (in
    the style of Howard & Ramdas's for quantiles) that costs log(1/gamma) however often it is
    read, where a per-look bound would spend gamma look by look.
    """
    m = len(sorted_ms)
    if m == 0:
        return None
    need = math.log(1.0 / gamma)
    if float(log_e_counts([m], [m], stats.P95_LEVEL)[0]) < need:
        return None
    lo, hi = math.floor(stats.P95_LEVEL * m), m  # the e-value grows with j: bisect
    while lo < hi:
        mid = (lo + hi) // 2
        if float(log_e_counts([mid], [m], stats.P95_LEVEL)[0]) >= need:
            hi = mid
        else:
            lo = mid + 1
    return float(sorted_ms[max(lo, 1) - 1])


def ttft_limit(
    stable_ttft_ms: Sequence[float],
    thresholds: CanaryThresholds,
    policy: CanaryPolicy,
    weight: float,
) -> float | None:
    """(1 + max_ttft_p95_increase) x the stable TTFT p95 bound; None when not gated or short."""
    if thresholds.max_ttft_p95_increase is None or not stable_ttft_ms:
        return None
    return latency_limit(
        stable_ttft_ms,
        thresholds.model_copy(update={"max_p95_increase": thresholds.max_ttft_p95_increase}),
        policy,
        weight,
    )


def latency_limit(
    stable_ms: Sequence[float], thresholds: CanaryThresholds, policy: CanaryPolicy, weight: float
) -> float | None:
    """(1 + max_p95_increase) x a bound on the stable p95 valid at every look of the phase at
    `weight` percent. None while the stable samples are too few for that bound (or in the bake,
    which has no latency test).
    """
    gamma = budget(policy, weight, ttft_gated=gates_ttft(thresholds)).bound_gamma
    if gamma <= 0.0:
        return None
    sorted_ms = np.sort(np.asarray(stable_ms, dtype=np.float64))
    sorted_ms = sorted_ms[~np.isnan(sorted_ms)]
    bound = stable_p95_bound(sorted_ms, gamma)
    if bound is None:
        return None
    return (1.0 + thresholds.max_p95_increase) * bound


# ---- one look -----------------------------------------------------------------------------------


def assess(
    counts: BucketCounts,
    window: WindowResult,
    thresholds: CanaryThresholds,
    policy: CanaryPolicy,
    *,
    weight: float,
    step_s: float,
    bake: bool,
) -> stats.Assessment:
    """The e-process tests at one look of a phase, judged together: unhealthy as soon as
    sum_k alpha_k E_k reaches 1 (one test at its own 1/alpha_k, or several short of it)."""
    levels = budget(policy, 100.0 if bake else weight, ttft_gated=gates_ttft(thresholds))
    bucket_s = counts.bucket_s
    nominal = max(1, math.ceil(step_s / bucket_s))
    planned = max(nominal, math.ceil((step_s + policy.max_step_extension_s) / bucket_s))
    weights = change_weights(len(counts.canary_requests), nominal, planned)
    canary = window.canary
    min_n = policy.min_canary_requests
    run: dict[str, Callable[[str | None], stats.TestResult | None]] = {
        "error_rate": lambda joint: _error_rate(
            counts, canary.requests, canary.errors, thresholds, levels, weights, min_n, joint
        )
    }
    if not bake:
        run["error_ratio"] = lambda joint: _error_ratio(
            counts, thresholds, levels, weights, weight, joint
        )
        run["latency"] = lambda joint: _latency(
            counts, window, thresholds, levels, weights, min_n, joint
        )
        run["ttft"] = lambda joint: _ttft(counts, window, thresholds, levels, weights, joint)
    tests = [t for t in (test(None) for test in run.values()) if t is not None]
    failed = [t for t in tests if t.outcome == "fail"]
    if not failed:
        joint = joint_evidence(tests, levels)
        started = [t for t in tests if t.e_value is not None]
        if joint >= 1.0 and started:
            top = max(started, key=lambda t: (t.e_value or 0.0) * t.alpha)
            note = (
                f"jointly with the phase's other tests Σαe={joint:.3g} ≥ 1, "
                f"the joint test at α={_e(sum(levels.shares.values()))}"
            )
            again = run[top.name](note)
            assert again is not None  # it ran a moment ago on the same counts
            tests = [again if t.name == top.name else t for t in tests]
            failed = [again]
    if failed:
        worst = max(failed, key=lambda t: (t.e_value or 0.0) * t.alpha)
        return stats.Assessment("unhealthy", worst.name, worst.reason, tuple(tests))
    if canary.requests <= 0:
        return stats.Assessment("no_data", None, "no canary requests in the phase", tuple(tests))
    if canary.requests < min_n:
        reason = f"only {canary.requests} canary requests in the phase, need {min_n}"
        return stats.Assessment("insufficient_data", None, reason, tuple(tests))
    short = [t for t in tests if t.outcome == "insufficient" and t.name != "ttft"]
    if short:
        return stats.Assessment("insufficient_data", None, short[0].reason, tuple(tests))
    return stats.Assessment("healthy", None, "; ".join(t.reason for t in tests), tuple(tests))


def joint_evidence(tests: Sequence[stats.TestResult], levels: Budget) -> float:
    """sum_k alpha_k E_k over the phase's tests: >= 1 fails the joint test (a test that has
    not started, or did not run at this look, is a constant E = 1 with its share)."""
    seen: dict[str, float | None] = {t.name: t.e_value for t in tests}
    return sum(
        a * (1.0 if seen.get(k) is None else float(seen[k] or 0.0))
        for k, a in levels.shares.items()
    )


def _evidence(log_e: float, alpha: float, joint: str | None) -> tuple[bool, float, float, str]:
    """(fails, e-value, anytime-valid p-value, the evidence in words) of a log e-value at level
    alpha; `joint` (the joint test's sentence) fails it whatever its own level."""
    e = math.exp(min(log_e, 700.0))
    fails = joint is not None or log_e >= math.log(1.0 / alpha)
    words = f"e={_e(e)}, {joint}" if joint else f"e={_e(e)} vs 1/α={_e(1 / alpha)}"
    return fails, e, min(1.0, 1.0 / e) if e > 0 else 1.0, words


def _since(counts: BucketCounts, start: int) -> str:
    return "the phase start" if start == 0 else f"{start * counts.bucket_s:g} s into the phase"


def _error_rate(
    counts: BucketCounts,
    requests: int,
    errors: int,
    thresholds: CanaryThresholds,
    levels: Budget,
    weights: NDArray[np.float64],
    min_n: int,
    joint: str | None = None,
) -> stats.TestResult:
    p0, alpha = thresholds.max_error_rate, levels.error_rate
    log_e, start = log_e_detector(counts.canary_errors, counts.canary_requests, p0, weights)
    fails, e, p, evidence = _evidence(log_e, alpha, joint)
    rate = errors / requests if requests else None
    numbers = (
        f"error rate {stats._pct(rate)} ({errors}/{requests})" if rate is not None else "no errors"
    )
    if fails:
        k = sum(counts.canary_errors[start:])
        n = sum(counts.canary_requests[start:])
        reason = (
            f"{numbers} > {stats._pct(p0)}: {k}/{n} since {_since(counts, start)} "
            f"({evidence}, anytime-valid)"
        )
        return _result("error_rate", "fail", reason, rate, p0, p, alpha, requests, e)
    if requests == 0:
        return _result(
            "error_rate", "insufficient", "no canary requests yet", None, p0, p, alpha, 0, e
        )
    if requests < min_n:
        reason = f"{numbers} from only {requests} canary requests, need {min_n}"
        return _result("error_rate", "insufficient", reason, rate, p0, p, alpha, requests, e)
    relation = "<=" if stats._within(rate or 0.0, p0) else "above, not significantly,"
    reason = f"{numbers} {relation} {stats._pct(p0)} ({evidence})"
    return _result("error_rate", "pass", reason, rate, p0, p, alpha, requests, e)


def _error_ratio(
    counts: BucketCounts,
    thresholds: CanaryThresholds,
    levels: Budget,
    weights: NDArray[np.float64],
    weight: float,
    joint: str | None = None,
) -> stats.TestResult:
    ratio, alpha = thresholds.max_error_ratio, levels.error_ratio
    w = min(max(weight / 100.0, 0.0), 1.0)
    ce, se = sum(counts.canary_errors), sum(counts.stable_errors)
    cr, sr = sum(counts.canary_requests), sum(counts.stable_requests)
    observed = (ce / cr) / (se / sr) if cr and sr and se else None
    if w <= 0.0 or w >= 1.0:
        reason = f"no error-ratio test at canary weight {weight:g}%"
        return _result("error_ratio", "pass", reason, observed, ratio, None, alpha, ce + se, None)
    p0 = w * ratio / (w * ratio + 1.0 - w)
    both = [c + s for c, s in zip(counts.canary_errors, counts.stable_errors, strict=True)]
    log_e, start = log_e_detector(counts.canary_errors, both, p0, weights)
    fails, e, p, evidence = _evidence(log_e, alpha, joint)
    canary_rate = stats._pct(ce / cr) if cr else "-"
    rates = f"canary {canary_rate} vs stable {stats._pct(se / sr) if sr else '-'}"
    if fails:
        k = sum(counts.canary_errors[start:])
        n = sum(both[start:])
        reason = (
            f"error rate {rates}, over {ratio:g}x stable's: {k} of the {n} errors since "
            f"{_since(counts, start)} were the canary's at {weight:g}% of traffic "
            f"({evidence}, anytime-valid)"
        )
        return _result("error_ratio", "fail", reason, observed, ratio, p, alpha, ce + se, e)
    reason = f"error rate {rates}: within {ratio:g}x stable's ({evidence})"
    result = _result("error_ratio", "pass", reason, observed, ratio, p, alpha, ce + se, e)
    # Its point estimate never holds a step: with few errors the ratio of two rates is noise.
    return _unjudged(result)


def _latency(
    counts: BucketCounts,
    window: WindowResult,
    thresholds: CanaryThresholds,
    levels: Budget,
    weights: NDArray[np.float64],
    min_n: int,
    joint: str | None = None,
) -> stats.TestResult:
    canary, stable = window.canary, window.stable
    p95s = "no canary latencies yet"
    observed = None
    if canary.p95_ms is not None and stable.p95_ms is not None:
        observed = stats._increase(canary.p95_ms, stable.p95_ms)
        p95s = f"canary p95 {stats._ms(canary.p95_ms)} vs stable {stats._ms(stable.p95_ms)}"
    limit = counts.latency_limit_ms
    short = f"too few stable samples ({stable.requests}) to bound the stable p95"
    return _exceedance(
        _Exceedance("latency", "canary requests", "canary latencies", min_n),
        counts,
        (counts.canary_over, counts.canary_requests),
        limit,
        canary.requests,
        thresholds.max_p95_increase,
        levels.latency,
        weights,
        p95s,
        observed,
        short,
        joint,
    )


def _ttft(
    counts: BucketCounts,
    window: WindowResult,
    thresholds: CanaryThresholds,
    levels: Budget,
    weights: NDArray[np.float64],
    joint: str | None = None,
) -> stats.TestResult | None:
    """The latency test on times to first token; None when not gated or nothing streamed.
    Too few streamed requests never hold a step (most traffic may not stream)."""
    delta = thresholds.max_ttft_p95_increase
    if delta is None or not (sum(counts.canary_ttft) or window.stable.ttft_ms):
        return None
    canary_ms, stable_ms = window.canary.ttft_ms, window.stable.ttft_ms
    p95s = "no canary TTFT yet"
    observed = None
    if canary_ms and stable_ms:
        c95 = stats.percentile_inclusive(canary_ms, stats.P95_LEVEL)
        s95 = stats.percentile_inclusive(stable_ms, stats.P95_LEVEL)
        observed = stats._increase(c95, s95)
        p95s = f"TTFT p95 canary {stats._ms(c95)} vs stable {stats._ms(s95)}"
    limit = counts.ttft_limit_ms
    ready = limit is not None and bool(counts.canary_ttft_over)
    short = f"too few stable TTFTs ({len(stable_ms)}) to bound the stable TTFT p95"
    return _exceedance(
        _Exceedance("ttft", "canary TTFTs", None, 0),
        counts,
        (counts.canary_ttft_over, counts.canary_ttft) if ready else None,
        limit,
        sum(counts.canary_ttft),
        delta,
        levels.ttft,
        weights,
        p95s,
        observed,
        short,
        joint,
    )


@dataclass(frozen=True)
class _Exceedance:
    """What differs between the latency and the TTFT test: their names in the reasons, and
    whether too few canary samples hold the step (TTFT: never, most traffic may not stream)."""

    name: stats.TestName
    samples: str  # "canary requests": what exceeds the limit
    short_of: str | None  # "canary latencies": the "from only n ..." reason, or None: no minimum
    min_n: int


def _exceedance(
    test: _Exceedance,
    counts: BucketCounts,
    series: tuple[Sequence[int], Sequence[int]] | None,
    limit: float | None,
    n: int,
    delta: float,
    alpha: float,
    weights: NDArray[np.float64],
    p95s: str,
    observed: float | None,
    short: str,
    joint: str | None,
) -> stats.TestResult:
    """The count test of samples over `limit` (the stable bound x (1 + delta)) against 5%:
    `series` is (over, total) per bucket, None while there is nothing to count against."""
    if observed is not None:
        p95s = f"{p95s} ({observed:+.0%})"
    if series is None or limit is None:
        reason = f"{p95s}: {short}"
        return _result(test.name, "insufficient", reason, observed, delta, None, alpha, n, None)
    over, total = series
    log_e, start = log_e_detector(over, total, EXCEED_P0, weights)
    fails, e, p, evidence = _evidence(log_e, alpha, joint)
    if fails:
        k, m = sum(over[start:]), sum(total[start:])
        reason = (
            f"{p95s} > +{delta:.0%}: {k}/{m} {test.samples} over {stats._ms(limit)} since "
            f"{_since(counts, start)}, more than 5% ({evidence}, anytime-valid)"
        )
        return _result(test.name, "fail", reason, observed, delta, p, alpha, n, e)
    if test.short_of is not None and n < test.min_n:
        reason = f"{p95s} from only {n} {test.short_of}, need {test.min_n}"
        return _result(test.name, "insufficient", reason, observed, delta, p, alpha, n, e)
    relation = "within" if stats._within(observed or 0.0, delta) else "above, not significantly,"
    detail = f"{sum(over)}/{n} {test.samples} over {stats._ms(limit)}"
    reason = f"{p95s} {relation} +{delta:.0%}: {detail} ({evidence})"
    return _result(test.name, "pass", reason, observed, delta, p, alpha, n, e)


def _result(
    name: stats.TestName,
    outcome: str,
    reason: str,
    observed: float | None,
    threshold: float,
    p_value: float | None,
    alpha: float,
    n: int,
    e_value: float | None,
) -> stats.TestResult:
    return stats.TestResult(
        name=name,
        outcome=outcome,  # type: ignore[arg-type]
        observed=observed,
        threshold=threshold,
        within_threshold=None if observed is None else stats._within(observed, threshold),
        p_value=p_value,
        alpha=alpha,
        n=n,
        reason=reason,
        e_value=e_value,
    )


def _unjudged(result: stats.TestResult) -> stats.TestResult:
    from dataclasses import replace

    return replace(result, within_threshold=None)


def _e(x: float) -> str:
    if not math.isfinite(x):
        return "∞"
    if x < 1000:
        return f"{x:.3g}"
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"
