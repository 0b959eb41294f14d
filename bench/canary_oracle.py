"""What any canary test could do: the most powerful test's time to rollback (Neyman-Pearson).

A rollout method whose false-rollback probability is at most alpha has, for every time t, the
event "rolled back by t" as a level-alpha test of the data visible by t. So no method can roll
back by t more often than the most powerful level-alpha test of that data, and the Neyman-Pearson
lemma says what that test is and how often it rejects. Given the oracle's advantages (it knows
the alternative exactly, the onset, and the stable version's true error rate and p95), its
figures bound every real method's from below:

- errors: canary requests are Bernoulli(p). Not rolling back is required while p <= p0 with
  p0 = min(max_error_rate, max_error_ratio x stable's rate) (within both of the policy's
  limits); the alternative is p1. The data are (n, k): n ~ Poisson(rate x (t - lag)) canary
  requests, k errors among them; n's law is the same under both, so the likelihood ratio is
  (p1/p0)^k ((1-p1)/(1-p0))^(n-k), and by monotone likelihood ratio the test at p0 is most
  powerful against p1 for every null p <= p0.
- latency: H0 is a quantile statement, P(canary > (1 + delta) q_stable95) <= 5%; for a quantile
  the count of requests over the limit is the most powerful statistic (the least favourable null
  matches the alternative's shape on both sides of the limit: Lehmann & Romano, *Testing
  Statistical Hypotheses*, least favourable distributions, the test of a quantile), so it is
  the same count problem with p0 = 0.05 and p1 = P(canary > (1 + delta) q_stable95).

`oracle_time` is the earliest t at which that test's power reaches `level` (0.95 for a p95 of
time to rollback, 0.5 for a median): no level-alpha method has a smaller p95 / median.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

Z95 = 1.6448536269514722


def _log_poisson(n: NDArray[np.float64], lam: float) -> NDArray[np.float64]:
    lg = np.vectorize(math.lgamma)
    return np.asarray(n * math.log(lam) - lam - lg(n + 1.0), dtype=np.float64)


def np_power(p0: float, p1: float, lam: float, alpha: float) -> float:
    """Power against p1 of the most powerful level-alpha test of H0: p = p0 from (n, k),
    n ~ Poisson(lam), k ~ Binomial(n, p); randomised at the boundary, so exactly level alpha."""
    if lam <= 0:
        return alpha  # no data: the best test is a coin
    spread = 10.0 * math.sqrt(lam) + 10.0
    ns = np.arange(max(0, math.floor(lam - spread)), math.ceil(lam + spread) + 1, dtype=np.float64)
    lg = np.vectorize(math.lgamma)
    log_pn = _log_poisson(ns, lam)
    rows_n, rows_k = [], []
    for n in ns.astype(int):
        ks = np.arange(n + 1)
        rows_n.append(np.full(n + 1, n))
        rows_k.append(ks)
    n_all = np.concatenate(rows_n).astype(np.float64)
    k_all = np.concatenate(rows_k).astype(np.float64)
    log_choose = lg(n_all + 1) - lg(k_all + 1) - lg(n_all - k_all + 1)
    offset = (n_all - ns[0]).astype(int)
    log_pn_all = log_pn[offset]

    def law(p: float) -> NDArray[np.float64]:
        return np.asarray(
            np.exp(
                log_pn_all + log_choose + k_all * math.log(p) + (n_all - k_all) * math.log1p(-p)
            ),
            dtype=np.float64,
        )

    q0, q1 = law(p0), law(p1)
    log_lr = k_all * math.log(p1 / p0) + (n_all - k_all) * math.log((1 - p1) / (1 - p0))
    order = np.argsort(-log_lr, kind="stable")
    c0, c1, lr = q0[order], q1[order], log_lr[order]
    # Whole likelihood-ratio levels at once (ties share the randomisation).
    levels, starts = np.unique(-lr, return_index=True)
    del levels
    bounds = [*starts.tolist(), len(lr)]
    size = power = 0.0
    for a, b in itertools.pairwise(bounds):
        m0, m1 = float(c0[a:b].sum()), float(c1[a:b].sum())
        if size + m0 <= alpha:
            size, power = size + m0, power + m1
            continue
        share = (alpha - size) / m0 if m0 > 0 else 0.0
        return power + share * m1
    return power


def oracle_time(
    p0: float,
    p1: float,
    per_s: float,
    alpha: float,
    level: float,
    lag_s: float,
    *,
    horizon_s: float = 600.0,
) -> float:
    """Earliest t (s, to 0.1 s) at which the most powerful level-alpha test has power >= level,
    with per_s canary requests a second visible lag_s after they happened."""

    def power(t: float) -> float:
        return np_power(p0, p1, per_s * max(0.0, t - lag_s), alpha)

    if power(horizon_s) < level:
        return math.inf
    lo, hi = 0.0, horizon_s
    while hi - lo > 0.05:
        mid = (lo + hi) / 2
        if power(mid) >= level:
            hi = mid
        else:
            lo = mid
    return math.ceil(hi * 10) / 10


def exceed_probability(scale: float, delta: float, sigma: float) -> float:
    """P(scale x X > (1 + delta) x X's p95) for lognormal X with log-sd sigma."""
    z = Z95 + math.log((1.0 + delta) / scale) / sigma
    return 0.5 * math.erfc(z / math.sqrt(2.0))


@dataclass(frozen=True)
class Bound:
    figure: str
    goal_s: float
    level: float
    p0: float
    p1: float
    per_s: float
    alpha: float
    best_s: float
    power_at_goal: float

    @property
    def reachable(self) -> bool:
        return self.best_s <= self.goal_s


def bounds(
    *,
    rps: float,
    weight: float,
    lag_s: float,
    stable_error_rate: float,
    max_error_rate: float,
    max_error_ratio: float,
    max_p95_increase: float,
    sigma: float,
    alpha: float,
) -> list[Bound]:
    """The oracle's figures for issue #15's three goals at level alpha."""
    per_s = rps * weight
    p0_err = min(max_error_rate, max_error_ratio * stable_error_rate)
    p1_lat = exceed_probability(1.5, max_p95_increase, sigma)
    cases = (
        ("10% errors at 5% from t=0: p95 s", 12.0, 0.95, p0_err, 0.10),
        ("10% errors, onset in step 1: median s", 12.0, 0.5, p0_err, 0.10),
        ("p95 +50% at 5% from t=0: median s", 20.0, 0.5, 0.05, p1_lat),
    )
    out = []
    for figure, goal, level, p0, p1 in cases:
        best = oracle_time(p0, p1, per_s, alpha, level, lag_s)
        at_goal = np_power(p0, p1, per_s * max(0.0, goal - lag_s), alpha)
        out.append(Bound(figure, goal, level, p0, p1, per_s, alpha, best, at_goal))
    return out
