"""Canary decisions by simulation: the real decide/apply over synthetic request streams (issue #6).

Each trial is one rollout driven the way the controller's engine drives it: a tick every
`--tick-s`, an analysis when `analysis_due` says so or a deadline passes, `decide` on the
windows that `analysis_windows` names, `apply` on the decision. Only the metrics store is
simulated: requests arrive as a Poisson process at `--rps` in total, each goes to the canary
with probability equal to the current weight, its latency is lognormal and its error a
Bernoulli draw; a request becomes visible to queries `--lag-s` after it happened (router
batches + ingest).

Figures (goals from issue #6):

    1. time from the canary going bad (10% errors; p95 +50%) to the rollback decision;
    2. false rollbacks of healthy canaries (same distribution as stable);
    3. detection at the edge of the thresholds (2% errors; p95 +25%).

Trial i of scenario s draws from numpy's default_rng([seed, s, i]): rerunning with the same
seed and counts prints the same figures. Run `python bench/canary_sim.py --help`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal

import canary_oracle  # bench/canary_oracle.py (scripts run from bench/)
import numpy as np
from machine import command_line  # bench/machine.py (scripts run from bench/)
from numpy.typing import NDArray

from services.canary_controller import decision as rules
from services.canary_controller import sequential, stats
from services.canary_controller.state import Phase, RolloutState
from services.contracts.events import DeploymentRequested, RouteTarget
from services.contracts.policy import CanaryPolicy, CanaryThresholds, load_policy_file
from services.metrics.queries import BucketCounts, RoleWindow, WindowResult

T0: Final = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
GOAL_DETECT_S: Final = 15.0
GOAL_FALSE_ROLLBACKS: Final = 0.01
Z95: Final = 1.6448536269514722
Onset = Literal["start", "random", "never"]
METHODS: Final = ("bonferroni", "e-process")


@dataclass(frozen=True)
class Traffic:
    """The synthetic request stream: what stable (and a healthy canary) looks like."""

    rps: float
    median_ms: float
    sigma: float
    stable_error_rate: float
    lag_s: float
    tick_s: float
    ttft_median_ms: float | None = None  # streamed responses (TTFT recorded) when set
    # What-if, not a built feature: stable latencies from this many seconds before step 0 (at
    # `rps`, all stable) join the e-process latency bound's samples. Off (0) by default.
    baseline_s: float = 0.0
    # What-if, not buildable: the e-process latency test compares with the TRUE stable p95 (a
    # bound that is exact), the best any baseline or confidence sequence could give it.
    exact_p95: bool = False


@dataclass(frozen=True)
class Scenario:
    """A canary that behaves like stable until `onset`, then with `error_rate`, `latency_scale`."""

    key: str
    title: str
    error_rate: float | None  # None: stable's
    latency_scale: float
    onset: Onset
    trials: int
    ttft_scale: float = 1.0


@dataclass(frozen=True)
class Trial:
    """How one rollout ended; times in seconds from the rollout's start."""

    scenario: str
    index: int
    outcome: str  # promoted | rolled_back | held | running (cut off at the time limit)
    ended_s: float
    onset_s: float | None
    onset_step: int | None
    step_at_end: int
    trigger: str | None
    reason: str
    looks: int


# ---- the simulated metrics store --------------------------------------------------------------


class Stream:
    """One role's requests in time order: time, latency, error."""

    def __init__(self) -> None:
        self.t = np.empty(4096)
        self.latency = np.empty(4096)
        self.ttft = np.empty(4096)
        self.error = np.empty(4096, dtype=bool)
        self.size = 0
        # The step window grows at each look: keep it sorted and merge in what is new.
        self.cached: tuple[int, int, NDArray[np.float64]] = (0, 0, np.empty(0))

    def append(
        self,
        t: NDArray[np.float64],
        latency: NDArray[np.float64],
        error: NDArray[np.bool_],
        ttft: NDArray[np.float64],
    ) -> None:
        end = self.size + len(t)
        if end > len(self.t):
            capacity = max(end, 2 * len(self.t))
            for name in ("t", "latency", "error", "ttft"):
                old = getattr(self, name)
                new = np.empty(capacity, dtype=old.dtype)
                new[: self.size] = old[: self.size]
                setattr(self, name, new)
        self.t[self.size : end] = t
        self.latency[self.size : end] = latency
        self.ttft[self.size : end] = ttft
        self.error[self.size : end] = error
        self.size = end

    def window(
        self, role: Literal["stable", "canary"], start: float, end: float, *, grows: bool
    ) -> RoleWindow:
        """What query_window(raw=True) answers for [start, end): counts, percentiles, latencies."""
        times = self.t[: self.size]
        lo, hi = np.searchsorted(times, [start, end], side="left")
        if hi <= lo:
            return RoleWindow(role, 0, 0, None, None, None)
        lo, hi = int(lo), int(hi)
        cached_lo, cached_hi, cached = self.cached
        if grows and cached_lo == lo and cached_hi <= hi and len(cached):
            fresh = np.sort(self.latency[cached_hi:hi])
            latencies = np.sort(np.concatenate([cached, fresh]), kind="stable")  # two runs: O(n)
        else:
            latencies = np.sort(self.latency[lo:hi])
        if grows:
            self.cached = (lo, hi, latencies)
        p50, p95, p99 = (stats.percentile_inclusive(latencies, q) for q in (0.5, 0.95, 0.99))
        ttft = self.ttft[lo:hi]
        ttft_ms = tuple(np.sort(ttft[~np.isnan(ttft)]).tolist())
        return RoleWindow(
            role=role,
            requests=int(hi - lo),
            errors=int(np.count_nonzero(self.error[lo:hi])),
            p50_ms=p50,
            p95_ms=p95,
            p99_ms=p99,
            latencies_ms=tuple(latencies.tolist()),
            ttft_ms=ttft_ms,
        )


class Store:
    """Both roles of one deployment, fed by `generate`, read through `observe`."""

    def __init__(
        self,
        rng: np.random.Generator,
        traffic: Traffic,
        scenario: Scenario,
        onset_s: float,
        baseline_rng: np.random.Generator,
    ) -> None:
        self.rng = rng
        self.traffic = traffic
        self.scenario = scenario
        self.onset_s = onset_s
        self.mu = math.log(traffic.median_ms)
        self.stable = Stream()
        self.canary = Stream()
        n = round(traffic.rps * traffic.baseline_s)
        # Its own generator: every other draw of the trial is the same with or without it.
        self.baseline_ms: tuple[float, ...] = (
            tuple(np.exp(baseline_rng.normal(self.mu, traffic.sigma, n)).tolist()) if n else ()
        )

    def generate(self, start: float, end: float, weight: float) -> None:
        """Requests arriving in [start, end) while the canary has `weight` percent."""
        rng, traffic = self.rng, self.traffic
        n = int(rng.poisson(traffic.rps * (end - start)))
        t = np.sort(start + (end - start) * rng.random(n))
        latency = np.exp(rng.normal(self.mu, traffic.sigma, n))
        if traffic.ttft_median_ms:
            # Streamed: the first token comes before the last byte (the rest is generation).
            ttft = np.minimum(
                latency, np.exp(rng.normal(math.log(traffic.ttft_median_ms), traffic.sigma, n))
            )
        else:
            ttft = np.full(n, np.nan)
        errors_u = rng.random(n)
        to_canary = rng.random(n) < weight / 100.0
        stable = ~to_canary
        self.stable.append(
            t[stable], latency[stable], errors_u[stable] < traffic.stable_error_rate, ttft[stable]
        )
        ct, cl, cu = t[to_canary], latency[to_canary], errors_u[to_canary]
        bad = ct >= self.onset_s
        cl = np.where(bad, cl * self.scenario.latency_scale, cl)
        # A slower first token with the same total latency: the wait moves before the stream.
        cttft = ttft[to_canary]
        cttft = np.where(bad, np.minimum(cttft * self.scenario.ttft_scale, cl), cttft)
        rate = self.scenario.error_rate
        bad_rate = traffic.stable_error_rate if rate is None else rate
        cerr = np.where(bad, cu < bad_rate, cu < traffic.stable_error_rate)
        self.canary.append(ct, cl, cerr, cttft)

    def buckets(
        self,
        start: datetime,
        end: datetime,
        now_s: float,
        bucket_s: float,
        limit: float | None,
        ttft_limit: float | None = None,
    ) -> BucketCounts:
        """What query_buckets answers: per bucket from `start`, both roles, canary over limit."""
        a = (start - T0).total_seconds()
        b_end = (end - T0).total_seconds()
        b = min(b_end, now_s - self.traffic.lag_s)
        size = max(0, math.ceil((b_end - a) / bucket_s - 1e-9))
        edges = a + bucket_s * np.arange(size + 1)
        edges[-1] = max(edges[-1], b_end)

        def per_bucket(stream: Stream, mask: NDArray[np.bool_] | None) -> NDArray[np.int64]:
            times = stream.t[: stream.size]
            lo, hi = np.searchsorted(times, [a, b], side="left")
            t = times[lo:hi]
            if mask is not None:
                t = t[mask[lo:hi]]
            counts, _ = np.histogram(t, bins=edges) if size else (np.zeros(0, dtype=np.int64), None)
            return np.asarray(counts, dtype=np.int64)

        c, s_ = self.canary, self.stable
        over = None if limit is None else c.latency[: c.size] > limit
        zeros = tuple([0] * size)
        streamed = ~np.isnan(c.ttft[: c.size])
        ttft_over = None if ttft_limit is None else c.ttft[: c.size] > ttft_limit
        return BucketCounts(
            bucket_s=bucket_s,
            latency_limit_ms=limit,
            canary_requests=tuple(per_bucket(c, None).tolist()),
            canary_errors=tuple(per_bucket(c, c.error[: c.size]).tolist()),
            canary_over=zeros if over is None else tuple(per_bucket(c, over).tolist()),
            stable_requests=tuple(per_bucket(s_, None).tolist()),
            stable_errors=tuple(per_bucket(s_, s_.error[: s_.size]).tolist()),
            ttft_limit_ms=ttft_limit,
            canary_ttft=() if ttft_limit is None else tuple(per_bucket(c, streamed).tolist()),
            canary_ttft_over=() if ttft_over is None else tuple(per_bucket(c, ttft_over).tolist()),
        )

    def window(
        self, start: datetime, end: datetime, now_s: float, *, grows: bool = False
    ) -> WindowResult:
        a = (start - T0).total_seconds()
        b = min((end - T0).total_seconds(), now_s - self.traffic.lag_s)  # not yet ingested
        return WindowResult(
            deployment_id="d-sim",
            start=start,
            end=end,
            canary=self.canary.window("canary", a, b, grows=grows),
            stable=self.stable.window("stable", a, b, grows=grows),
        )


# ---- one rollout ------------------------------------------------------------------------------


def start_state(policy: CanaryPolicy, thresholds: CanaryThresholds) -> RolloutState:
    request = DeploymentRequested(
        deployment_id="d-sim", model="org/sim", version="v2", location="/models/v2"
    )
    return rules.start_rollout(
        request,
        earlier=(),
        policy=policy,
        thresholds=thresholds,
        stable=RouteTarget(deployment_id="d-stable", version="v1"),
        canary=RouteTarget(deployment_id="d-sim", version="v2"),
        now=T0,
    )


def nominal_s(policy: CanaryPolicy) -> float:
    return sum(step.duration_s for step in policy.steps)


def step_of(policy: CanaryPolicy, at_s: float) -> int:
    """The step a nominal (never extended) rollout is in at `at_s`."""
    elapsed = 0.0
    for index, step in enumerate(policy.steps):
        elapsed += step.duration_s
        if at_s < elapsed:
            return index
    return len(policy.steps) - 1


def observe(store: Store, state: RolloutState, now: datetime, now_s: float) -> rules.Observation:
    """What services/canary_controller/observe.py reads for one look, from the simulated store."""
    (start, end), recent = rules.analysis_windows(state, now)
    step = store.window(start, end, now_s, grows=True)
    policy = state.policy
    if policy.method == "e-process":
        limit = sequential.latency_limit(
            step.stable.latencies_ms + store.baseline_ms, state.thresholds, policy, state.weight
        )
        if store.traffic.exact_p95 and limit is not None:
            true_p95 = store.traffic.median_ms * math.exp(store.traffic.sigma * Z95)
            limit = (1.0 + state.thresholds.max_p95_increase) * true_p95
        ttft = sequential.ttft_limit(step.stable.ttft_ms, state.thresholds, policy, state.weight)
        counts = store.buckets(start, end, now_s, policy.e_process.change_every_s, limit, ttft)
        return rules.Observation(step=step, counts=counts)
    return rules.Observation(
        step=step,
        recent=None if recent is None else store.window(recent[0], recent[1], now_s),
    )


def run_trial(
    seed: int,
    scenario_index: int,
    index: int,
    scenario: Scenario,
    traffic: Traffic,
    policy: CanaryPolicy,
    thresholds: CanaryThresholds,
) -> Trial:
    rng = np.random.default_rng([seed, scenario_index, index])
    onset_s = {"start": 0.0, "never": math.inf, "random": float(rng.uniform(0, nominal_s(policy)))}[
        scenario.onset
    ]
    baseline_rng = np.random.default_rng([seed, scenario_index, index, 1])
    store = Store(rng, traffic, scenario, onset_s, baseline_rng)
    state = start_state(policy, thresholds)
    limit_s = nominal_s(policy) + len(policy.steps) * policy.max_step_extension_s + 60
    now_s = generated_s = 0.0
    last = rules.Decision("wait", "")
    while now_s < limit_s:
        now_s += traffic.tick_s
        now = T0 + timedelta(seconds=now_s)
        store.generate(generated_s, now_s, state.weight)
        generated_s = now_s
        # A deadline counts when it passes, not on every tick after it: engine.step re-decides
        # on every tick once step_ends_at is behind it, i.e. every tick of a step extension.
        before = now - timedelta(seconds=traffic.tick_s)
        deadline_passed = any(
            t is not None and before < t <= now
            for t in (state.step_ends_at, state.step_deadline, state.held_deadline)
        )
        if not rules.analysis_due(state, now) and not deadline_passed:
            continue
        observation = observe(store, state, now, now_s)
        decision = rules.decide(state, observation, state.policy, state.thresholds, now)
        if decision.action == "wait" and not decision.analysed and decision.verdict is None:
            continue
        step_index = state.step_index
        state = rules.apply(state, decision, now)
        last = decision
        if state.phase.terminal or state.phase is Phase.HELD:
            return Trial(
                scenario=scenario.key,
                index=index,
                outcome=state.phase.value,
                ended_s=now_s,
                onset_s=None if math.isinf(onset_s) else onset_s,
                onset_step=None if math.isinf(onset_s) else step_of(policy, onset_s),
                step_at_end=step_index,
                trigger=decision.trigger,
                reason=decision.reason,
                looks=state.looks,
            )
    return Trial(
        scenario.key,
        index,
        "running",
        now_s,
        None if math.isinf(onset_s) else onset_s,
        None if math.isinf(onset_s) else step_of(policy, onset_s),
        state.step_index,
        last.trigger,
        last.reason,
        state.looks,
    )


def run_chunk(
    args: tuple[int, int, range, Scenario, Traffic, CanaryPolicy, CanaryThresholds],
) -> list[Trial]:
    seed, scenario_index, indices, scenario, traffic, policy, thresholds = args
    return [
        run_trial(seed, scenario_index, i, scenario, traffic, policy, thresholds) for i in indices
    ]


# ---- figures ----------------------------------------------------------------------------------


def quantile(values: Sequence[float], level: float) -> float:
    return float(np.percentile(values, level * 100)) if values else math.nan


def upper_95(failures: int, n: int) -> float:
    """One-sided 95% Clopper-Pearson upper bound of a rate seen as failures/n."""
    if failures >= n:
        return 1.0
    lo, hi = failures / n, 1.0
    for _ in range(60):  # P(X <= failures | n, p) falls with p; find where it is 0.05
        mid = (lo + hi) / 2
        if 1.0 - stats.binomial_sf(failures + 1, n, mid) > 0.05:
            lo = mid
        else:
            hi = mid
    return hi


def detection(trials: Sequence[Trial]) -> dict[str, Any]:
    """Onset to rollback, over the trials that rolled back after the onset."""
    times = [
        t.ended_s - (t.onset_s or 0.0)
        for t in trials
        if t.outcome == "rolled_back" and t.ended_s >= (t.onset_s or 0.0)
    ]
    early = [t for t in trials if t.outcome == "rolled_back" and t.ended_s < (t.onset_s or 0.0)]
    return {
        "trials": len(trials),
        "rolled_back": len(times),
        "rolled_back_before_onset": len(early),
        "promoted": sum(t.outcome == "promoted" for t in trials),
        "held": sum(t.outcome == "held" for t in trials),
        "median_s": quantile(times, 0.5),
        "p95_s": quantile(times, 0.95),
        "max_s": max(times) if times else math.nan,
        "within_goal": sum(x <= GOAL_DETECT_S for x in times),
        "triggers": _count(t.trigger or "-" for t in trials if t.outcome == "rolled_back"),
    }


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for value in values:
        out[value] = out.get(value, 0) + 1
    return out


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    bad, healthy, edge = args.trials_bad, args.trials_healthy, args.trials_edge
    return [
        Scenario("errors10_start", "10% errors from t=0", 0.10, 1.0, "start", bad),
        Scenario("errors10_random", "10% errors from a random time", 0.10, 1.0, "random", bad),
        Scenario("p95x1.5_start", "p95 +50% from t=0", None, 1.5, "start", bad),
        Scenario("p95x1.5_random", "p95 +50% from a random time", None, 1.5, "random", bad),
        Scenario("healthy", "healthy (canary = stable)", None, 1.0, "never", healthy),
        Scenario("errors2_edge", "2% errors from t=0", 0.02, 1.0, "start", edge),
        Scenario("p95x1.25_edge", "p95 +25% from t=0", None, 1.25, "start", edge),
        *(
            [Scenario("ttft1.5_start", "TTFT +50% from t=0", None, 1.0, "start", bad, 1.5)]
            if args.ttft_median_ms
            else []
        ),
    ]


def simulate(
    args: argparse.Namespace, policy: CanaryPolicy, thresholds: CanaryThresholds, traffic: Traffic
) -> dict[str, list[Trial]]:
    chunks = []
    for s_index, scenario in enumerate(scenarios(args)):
        size = max(1, scenario.trials // (4 * args.workers))
        for first in range(0, scenario.trials, size):
            indices = range(first, min(first + size, scenario.trials))
            chunks.append((args.seed, s_index, indices, scenario, traffic, policy, thresholds))
    results: dict[str, list[Trial]] = {s.key: [] for s in scenarios(args)}
    if args.workers == 1:
        done = map(run_chunk, chunks)
        for trials in done:
            for trial in trials:
                results[trial.scenario].append(trial)
    else:
        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            for trials in pool.map(run_chunk, chunks):
                for trial in trials:
                    results[trial.scenario].append(trial)
    return results


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
    }


def render(report: dict[str, Any]) -> str:
    m, p, tr = report["machine"], report["policy"], report["traffic"]
    steps = ", ".join(f"{s['weight']:g}%/{s['duration_s']:g} s" for s in p["steps"])
    lines = [
        "preflight bench: canary decisions by simulation (issue #6)",
        f"command : {report['command']}",
        f"when    : {report['when_utc']}, {report['wall_s']:.0f} s wall, "
        f"{report['workers']} worker process(es)",
        f"machine : {m['nproc']} CPUs, {m['cpu_model']}, {m['os']}, Python {m['python']}, "
        f"numpy {m['numpy']}, 1-min load {m['loadavg_1m_at_start']} at start, "
        f"{report['loadavg_1m_at_end']} at end",
        f"traffic : {tr['rps']:g} rps in total (Poisson arrivals), canary share = step weight; "
        f"latency lognormal(median {tr['median_ms']:g} ms, sigma {tr['sigma']:g}) -> p95 "
        f"{report['stable_p95_ms']:.1f} ms; stable error rate {tr['stable_error_rate']:.1%}; a "
        f"request is visible to queries {tr['lag_s']:g} s after it; controller tick "
        f"{tr['tick_s']:g} s",
        *(
            [
                f"WHAT-IF : {tr['baseline_s']:g} s of stable latencies from before step 0 join "
                "the e-process latency bound (not built: the controller does not do this)"
            ]
            if tr.get("baseline_s")
            else []
        ),
        *(
            [
                "WHAT-IF : the e-process latency test is told the true stable p95 (its limit is "
                "1.2 x the true p95, not a bound: no controller can do this)"
            ]
            if tr.get("exact_p95")
            else []
        ),
        f"policy  : {report['policy_source']}: steps {steps} then 100%; analysis every "
        f"{p['analysis_interval_s']:g} s over the step so far and the last {p['lookback_s']:g} s; "
        f"min_canary_requests {p['min_canary_requests']}; thresholds {p['max_error_rate']:.0%} "
        f"errors, p95 +{p['max_p95_increase']:.0%}; false_rollback_rate "
        f"{p['false_rollback_rate']:g} "
        f"spent over {report['planned_looks']} planned looks; step extension up to "
        f"{p['max_step_extension_s']:g} s",
        (
            "alpha   : per test at look k (4 tests: 2 windows x 2): "
            + ", ".join(f"k={k}: {a:.2g}" for k, a in report["alpha_by_look"].items())
            if report.get("method") != "e-process"
            else "method  : e-process: a look every second over the phase so far (no lookback "
            "window), change points every 5 s, the tests judged jointly; alpha per test of step 1 "
            "at every look: "
            + ", ".join(f"{k} {a:.2g}" for k, a in report["e_process_alpha"].items())
        ),
        f"seeds   : trial i of scenario s uses numpy default_rng([{report['seed']}, s, i]); "
        f"scenario s in the order listed below, from 0",
        "",
        f"1. From going bad to the rollback decision (seconds), goal <= {GOAL_DETECT_S:g} s",
        f"  {'scenario':<34}{'trials':>7}{'rolled back':>12}{'median':>8}{'p95':>7}{'max':>7}"
        f"{'<= 15 s':>9}  other outcomes",
    ]
    det = report["detection"]
    keys = ("errors10_start", "errors10_random", "p95x1.5_start", "p95x1.5_random")
    for key in (*keys, *(["ttft1.5_start"] if "ttft1.5_start" in det else [])):
        lines.append(_detection_row(report["titles"][key], det[key]))
        for step, row in det.get(f"{key}_by_step", {}).items():
            lines.append(_detection_row(f"  onset in step {int(step) + 1}", row))
    h = report["healthy"]
    lines += [
        "",
        f"2. False rollbacks of healthy canaries (goal <= {GOAL_FALSE_ROLLBACKS:.0%})",
        f"  {h['rolled_back']}/{h['trials']} rolled back ({h['rolled_back'] / h['trials']:.1%}; "
        f"one-sided 95% upper bound {h['upper_95']:.1%}); promoted {h['promoted']}, held "
        f"{h['held']}, still running {h['running']}; rollout took median {h['median_s']:.0f} s, "
        f"max {h['max_s']:.0f} s; looks per rollout median {h['median_looks']:.0f}",
    ]
    if h["reasons"]:
        lines += [f"    rolled back: {r}" for r in h["reasons"]]
    lines += [
        "",
        "3. Detection at the edge of the thresholds (bad from t=0)",
        f"  {'scenario':<34}{'trials':>7}{'in step 1':>11}{'in rollout':>12}{'median s':>10}"
        f"{'promoted':>10}{'held':>6}",
    ]
    for key in ("errors2_edge", "p95x1.25_edge"):
        e = report["edge"][key]
        n = e["trials"]
        lines.append(
            f"  {report['titles'][key]:<34}{n:>7}{e['in_step_1']:>5} ({e['in_step_1'] / n:>4.0%})"
            f"{e['in_rollout']:>6} ({e['in_rollout'] / n:>4.0%}){e['median_s']:>10.0f}"
            f"{e['promoted']:>10}{e['held']:>6}"
        )
    return "\n".join(lines)


def _detection_row(title: str, d: dict[str, Any]) -> str:
    other = []
    if d["rolled_back_before_onset"]:
        other.append(f"{d['rolled_back_before_onset']} rolled back before the onset")
    if d["promoted"]:
        other.append(f"{d['promoted']} promoted")
    if d["held"]:
        other.append(f"{d['held']} held")
    within = d["within_goal"] / d["rolled_back"] if d["rolled_back"] else math.nan
    return (
        f"  {title:<34}{d['trials']:>7}{d['rolled_back']:>12}{d['median_s']:>8.1f}"
        f"{d['p95_s']:>7.1f}{d['max_s']:>7.1f}{within:>9.0%}  {', '.join(other) or '-'}"
    )


def report_of(
    args: argparse.Namespace,
    results: dict[str, list[Trial]],
    policy: CanaryPolicy,
    thresholds: CanaryThresholds,
    traffic: Traffic,
) -> dict[str, Any]:
    det: dict[str, Any] = {}
    for key in ("errors10_start", "errors10_random", "p95x1.5_start", "p95x1.5_random"):
        trials = results[key]
        det[key] = detection(trials)
        if key.endswith("random"):
            det[f"{key}_by_step"] = {
                str(step): detection([t for t in trials if t.onset_step == step])
                for step in range(len(policy.steps))
            }
    if "ttft1.5_start" in results:
        det["ttft1.5_start"] = detection(results["ttft1.5_start"])
    healthy = results["healthy"]
    rolled = [t for t in healthy if t.outcome == "rolled_back"]
    healthy_report = {
        "trials": len(healthy),
        "rolled_back": len(rolled),
        "upper_95": upper_95(len(rolled), len(healthy)),
        "promoted": sum(t.outcome == "promoted" for t in healthy),
        "held": sum(t.outcome == "held" for t in healthy),
        "running": sum(t.outcome == "running" for t in healthy),
        "median_s": quantile([t.ended_s for t in healthy], 0.5),
        "max_s": max(t.ended_s for t in healthy),
        "median_looks": quantile([t.looks for t in healthy], 0.5),
        "reasons": [f"trial {t.index} at {t.ended_s:.1f} s: {t.reason}" for t in rolled],
    }
    edge = {}
    for key in ("errors2_edge", "p95x1.25_edge"):
        trials = results[key]
        back = [t for t in trials if t.outcome == "rolled_back"]
        edge[key] = {
            "trials": len(trials),
            "in_step_1": sum(t.step_at_end == 0 for t in back),
            "in_rollout": len(back),
            "median_s": quantile([t.ended_s for t in back], 0.5),
            "promoted": sum(t.outcome == "promoted" for t in trials),
            "held": sum(t.outcome == "held" for t in trials),
            "triggers": _count(t.trigger or "-" for t in back),
        }
    return {
        "detection": det,
        "healthy": healthy_report,
        "edge": edge,
        "titles": {s.key: s.title for s in scenarios(args)},
        "alpha_by_look": {
            look: rules.alpha_per_test(policy, look, 2 * rules.TESTS_PER_WINDOW)
            for look in (1, 2, 6, 12, 36, 60)
        },
        "planned_looks": rules.planned_looks(policy),
        "e_process_alpha": {  # the first step's: the one the goals are about
            name.replace("_", " "): alpha
            for name, alpha in sequential.budget(
                policy, policy.steps[0].weight, ttft_gated=sequential.gates_ttft(thresholds)
            ).shares.items()
            if name != "ttft"
        },
        "stable_p95_ms": traffic.median_ms * math.exp(traffic.sigma * Z95),
        "policy": {
            "steps": [s.model_dump() for s in policy.steps],
            "analysis_interval_s": policy.analysis_interval_s,
            "lookback_s": policy.lookback_s,
            "min_canary_requests": policy.min_canary_requests,
            "false_rollback_rate": policy.false_rollback_rate,
            "max_step_extension_s": policy.max_step_extension_s,
            "max_error_rate": thresholds.max_error_rate,
            "max_error_ratio": thresholds.max_error_ratio,
            "max_p95_increase": thresholds.max_p95_increase,
        },
        "policy_source": "built-in default"
        + ("" if args.policy_override == "{}" else f" + canary {args.policy_override}"),
        "traffic": asdict(traffic),
        "seed": args.seed,
        "workers": args.workers,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seed", type=int, default=6, help="base seed (6)")
    parser.add_argument("--trials-bad", type=int, default=200, help="trials per bad scenario (200)")
    parser.add_argument("--trials-healthy", type=int, default=200, help="healthy canaries (200)")
    parser.add_argument(
        "--trials-edge", type=int, default=200, help="trials per edge scenario (200)"
    )
    parser.add_argument("--rps", type=float, default=100.0, help="requests/s in total (100)")
    parser.add_argument("--median-ms", type=float, default=80.0, help="latency median (80)")
    parser.add_argument("--sigma", type=float, default=0.35, help="lognormal sigma (0.35)")
    parser.add_argument("--stable-error-rate", type=float, default=0.002, help="(0.002)")
    parser.add_argument("--lag-s", type=float, default=0.5, help="request -> queryable (0.5)")
    parser.add_argument(
        "--ttft-median-ms",
        type=float,
        default=None,
        help="streamed responses with this TTFT median (adds the TTFT +50%% scenario); off",
    )
    parser.add_argument("--tick-s", type=float, default=0.5, help="controller tick (0.5)")
    parser.add_argument(
        "--what-if-baseline-s",
        type=float,
        default=0.0,
        help="what-if, NOT a built feature: add this many seconds of stable latencies from "
        "before step 0 to the e-process latency bound (0: off, as the controller does)",
    )
    parser.add_argument(
        "--what-if-exact-p95",
        action="store_true",
        help="what-if, NOT buildable: the e-process latency test compares the canary with the "
        "true stable p95 instead of a bound on it (the most a baseline could give it)",
    )
    parser.add_argument(
        "--policy-override",
        default="{}",
        help="JSON merged into the canary policy, e.g. '{\"min_canary_requests\": 30}'",
    )
    parser.add_argument(
        "--methods",
        default="bonferroni,e-process",
        help="canary methods to run side by side on the same seeds (bonferroni,e-process)",
    )
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if min(args.trials_bad, args.trials_healthy, args.trials_edge, args.workers) < 1:
        parser.error("trial counts and workers must be positive")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.methods or any(m not in METHODS for m in args.methods):
        parser.error(f"--methods takes a comma-separated list of {', '.join(METHODS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    machine = machine_info()
    traffic = Traffic(
        args.rps,
        args.median_ms,
        args.sigma,
        args.stable_error_rate,
        args.lag_s,
        args.tick_s,
        args.ttft_median_ms,
        args.what_if_baseline_s,
        args.what_if_exact_p95,
    )
    reports = {}
    for method in args.methods:
        started = time.perf_counter()
        override = {"method": method, **json.loads(args.policy_override)}
        policy_full = load_policy_file(None).resolve(
            model="org/sim", overrides={"canary": override}
        )
        policy = policy_full.canary
        thresholds = policy_full.canary_thresholds("default")
        results = simulate(args, policy, thresholds, traffic)
        report = report_of(args, results, policy, thresholds, traffic)
        report.update(
            command=command_line(),
            when_utc=when,
            machine=machine,
            wall_s=round(time.perf_counter() - started, 1),
            loadavg_1m_at_end=round(os.getloadavg()[0], 2),
            method=method,
        )
        reports[method] = report
    if args.json:
        print(json.dumps(reports, indent=2, default=str))
    else:
        print("\n\n".join(f"=== method: {m} ===\n{render(r)}" for m, r in reports.items()))
        print("\n" + compare(reports))
    return 0


def compare(reports: dict[str, dict[str, Any]]) -> str:
    """Issue #15's figures, the methods side by side (same seeds, same traffic)."""
    methods = list(reports)
    rows: list[tuple[str, str, Any]] = [
        ("10% errors at 5% from t=0: p95 s", "<= 12", lambda r: _d(r, "errors10_start", "p95_s")),
        ("10% errors at 5% from t=0: median s", "-", lambda r: _d(r, "errors10_start", "median_s")),
        (
            "10% errors, onset in step 1: median s",
            "<= 12",
            lambda r: r["detection"]["errors10_random_by_step"]["0"]["median_s"],
        ),
        (
            "p95 +50% at 5% from t=0: median s",
            "<= 20",
            lambda r: _d(r, "p95x1.5_start", "median_s"),
        ),
        (
            "healthy: false rollbacks",
            "0",
            lambda r: f"{r['healthy']['rolled_back']}/{r['healthy']['trials']}",
        ),
        (
            "2% errors: promoted",
            "0",
            lambda r: (
                f"{r['edge']['errors2_edge']['promoted']}/{r['edge']['errors2_edge']['trials']}"
            ),
        ),
        (
            "p95 +25%: promoted",
            "0",
            lambda r: (
                f"{r['edge']['p95x1.25_edge']['promoted']}/{r['edge']['p95x1.25_edge']['trials']}"
            ),
        ),
    ]
    if all("ttft1.5_start" in r["detection"] for r in reports.values()):
        rows.append(
            ("TTFT +50% at 5%: median s", "reported", lambda r: _d(r, "ttft1.5_start", "median_s"))
        )
        rows.append(("TTFT +50% at 5%: rolled back", "-", lambda r: _rolled(r, "ttft1.5_start")))
    width = max(len(t) for t, _, _ in rows) + 2
    lines = [
        "Side by side (issue #15 figures)",
        f"  {'figure':<{width}}{'goal':>10}" + "".join(f"{m:>14}" for m in methods),
    ]
    for title, goal, get in rows:
        cells = []
        for m in methods:
            value = get(reports[m])
            cells.append(f"{value:>14.1f}" if isinstance(value, float) else f"{value!s:>14}")
        lines.append(f"  {title:<{width}}{goal:>10}" + "".join(cells))
    return "\n".join([*lines, "", *oracle_lines(next(iter(reports.values())))])


def oracle_lines(report: dict[str, Any]) -> list[str]:
    """The same figures for the most powerful test there is (bench/canary_oracle.py): it knows
    the alternative, the onset and the stable's true error rate and p95. No method with the
    same false-rollback level does better, so a goal it misses is out of reach."""
    tr, pol = report["traffic"], report["policy"]
    shares = report["e_process_alpha"]
    weight = pol["steps"][0]["weight"] / 100.0
    common = {
        "rps": tr["rps"],
        "weight": weight,
        "lag_s": tr["lag_s"],
        "stable_error_rate": tr["stable_error_rate"],
        "max_error_rate": pol["max_error_rate"],
        "max_error_ratio": pol["max_error_ratio"],
        "max_p95_increase": pol["max_p95_increase"],
        "sigma": tr["sigma"],
    }
    whole = canary_oracle.bounds(alpha=pol["false_rollback_rate"], **common)
    errors = canary_oracle.bounds(alpha=shares["error rate"], **common)
    latency = canary_oracle.bounds(alpha=shares["latency"], **common)
    split = [errors[0], errors[1], latency[2]]
    head = (
        f"  {'figure':<40}{'goal':>7}{'oracle, α=B':>14}{'power@goal':>12}"
        f"{'oracle, α=share':>17}{'power@goal':>12}  p0 -> p1"
    )
    lines = [
        "What any test could do (Neyman-Pearson oracle at the same traffic: bench/canary_oracle.py;"
        " α=B: the whole rollout's budget on this one figure; α=share: the e-process's share)",
        head,
    ]
    for w, s in zip(whole, split, strict=True):
        verdict = "reachable" if w.reachable else "out of reach for any test"
        lines.append(
            f"  {w.figure:<40}{w.goal_s:>7g}{w.best_s:>14.1f}{w.power_at_goal:>12.1%}"
            f"{s.best_s:>17.1f}{s.power_at_goal:>12.1%}  {w.p0:.2%} -> {w.p1:.1%}; {verdict}"
        )
    return lines


def _rolled(report: dict[str, Any], key: str) -> str:
    d = report["detection"][key]
    return f"{d['rolled_back']}/{d['trials']}"


def _d(report: dict[str, Any], key: str, field: str) -> float:
    return float(report["detection"][key][field])


if __name__ == "__main__":
    raise SystemExit(main())
