"""`preflight analyse`: the decision re-run over the stored request records of a past rollout.

A fresh rollout is started where the original started, then simulated time moves on tick by
tick exactly as the engine's loop does (`engine.Engine.step`): a look when `analysis_due` says
so or a deadline has just passed, the same `observe` (the same windows and queries), `decide`,
`apply`. Each look is recorded with its verdict, action and the tests' p-values or e-values.

Exactness: the stored records carry the ORIGINAL rollout's weights. Where the replayed policy
changes the weight at another time than the original did (or the original ended), the records
no longer show what the replayed weight would have produced, so the replay is exact only up to
the first such divergence; it is found from the two schedules and reported. Weights are treated
as applied at once (`decide(..., traffic=None)`): a step never waits for a router to confirm.

`RecordedMetrics` answers the controller's `window` and `buckets` questions from the rollout's
records, read once (one query): the same results as `ClickHouseMetrics` (tests prove it on real
chDB), without ~2 queries per look (a 300 s rollout at 1 s looks would be ~600 of them).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import re
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import numpy as np
import yaml
from numpy.typing import NDArray
from pydantic import ValidationError

from services.canary_controller import decision as rules
from services.canary_controller.observe import observe
from services.canary_controller.state import Phase, RolloutState
from services.contracts.events import (
    CanaryAnalysed,
    CanaryStepStarted,
    DeploymentHeld,
    DeploymentPromoted,
    DeploymentRolledBack,
    Event,
)
from services.contracts.policy import (
    CanaryPolicy,
    CanaryThresholds,
    Policy,
    PolicyError,
    load_policy_file,
)
from services.metrics import queries
from services.metrics.queries import BucketCounts, MetricsUnavailable, RoleWindow, WindowResult
from services.runtime.clickhouse import check_table_name

__all__ = [
    "TICK_S",
    "Ending",
    "Look",
    "OriginalRun",
    "RecordedMetrics",
    "Replay",
    "as_dict",
    "original_run",
    "policy_from_file",
    "replay",
    "snapshot_chdb",
    "summary_lines",
]

TICK_S: Final = 0.5
"""The live engine's tick (`engine.run_ticks`): looks and deadlines are checked this often."""
QUANTILE_LEVELS: Final = (0.5, 0.95, 0.99)  # queries.QUANTILES
RAW_LIMIT: Final[int] = inspect.signature(queries.query_window).parameters["raw_limit"].default
"""The raw-latency sample size the live controller reads (`query_window`'s default)."""


# ---- the records, in memory -----------------------------------------------------------------


def _quantile(sorted_values: NDArray[np.float64], level: float) -> float:
    """ClickHouse `quantileExactInclusive`, bit for bit: a[n-1] + (h - n)(a[n] - a[n-1]) with
    h = level (size - 1) + 1 (numpy's percentile differs from it in the last bit now and then)."""
    size = len(sorted_values)
    h = level * (size - 1) + 1
    n = int(h)
    if n >= size:
        return float(sorted_values[-1])
    if n < 1:
        return float(sorted_values[0])
    low = float(sorted_values[n - 1])
    return low + (h - n) * (float(sorted_values[n]) - low)


@dataclass(frozen=True)
class _RoleRecords:
    """One role's records, ordered by time; `errors_cum[i]` counts the errors before row i."""

    ts_ms: NDArray[np.int64]
    latency_ms: NDArray[np.float64]
    errors_cum: NDArray[np.int64]
    sample_key: NDArray[np.uint64]  # cityHash64(batch_id, seq): the raw samples' order
    has_ttft: NDArray[np.bool_]
    ttft_ms: NDArray[np.float64]  # meaningful where has_ttft

    @classmethod
    def of(cls, columns: Mapping[str, NDArray[Any]], mask: NDArray[np.bool_]) -> _RoleRecords:
        ts = columns["ts_ms"][mask]
        order = np.argsort(ts, kind="stable")
        errors_cum = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(columns["error"][mask][order], out=errors_cum[1:])
        return cls(
            ts_ms=ts[order],
            latency_ms=columns["latency_ms"][mask][order],
            errors_cum=errors_cum,
            sample_key=columns["sample_key"][mask][order],
            has_ttft=columns["has_ttft"][mask][order],
            ttft_ms=columns["ttft_value"][mask][order],
        )

    def span(self, start_ms: int, end_ms: int) -> tuple[int, int]:
        i = int(np.searchsorted(self.ts_ms, start_ms, side="left"))
        j = int(np.searchsorted(self.ts_ms, end_ms, side="left"))
        return i, j


_DTYPES: Final = {
    "canary": bool,
    "ts_ms": np.int64,
    "latency_ms": np.float64,
    "error": bool,
    "sample_key": np.uint64,
    "has_ttft": bool,
    "ttft_value": np.float64,
}
"""The columns read (`RecordedMetrics.sql`; no alias may shadow a column: ClickHouse resolves
aliases everywhere in the query)."""


class RecordedMetrics:
    """A deployment's request records over `[start, end)`, read once, answering the
    controller's questions (`MetricsSource`, `BucketSource`) exactly as `query_window` and
    `query_buckets` do on ClickHouse: windows `[start, end)` on `ts`, `ERROR_CONDITION`, exact
    inclusive percentiles, rows read `FINAL`, raw latencies and TTFTs sorted (the `raw_limit`
    rows whose `cityHash64(batch_id, seq)` is lowest when there are more)."""

    def __init__(
        self,
        deployment_id: str,
        start: datetime,
        end: datetime,
        columns: Mapping[str, Sequence[Any]],
        *,
        raw_limit: int = RAW_LIMIT,
    ) -> None:
        self.deployment_id = deployment_id
        self.start_ms, self.end_ms = queries.window_ms(start, end)
        self.raw_limit = raw_limit
        arrays = {name: np.asarray(columns[name], dtype=kind) for name, kind in _DTYPES.items()}
        canary = arrays["canary"]
        self.records = len(canary)
        self.roles: dict[queries.Role, _RoleRecords] = {
            "canary": _RoleRecords.of(arrays, canary),
            "stable": _RoleRecords.of(arrays, ~canary),
        }

    @staticmethod
    def sql(table: str) -> str:
        # S608: only the checked table name is formatted in; values are bound parameters.
        return (
            "SELECT role = 'canary' AS canary, toUnixTimestamp64Milli(ts) AS ts_ms, latency_ms, "  # noqa: S608
            f"{queries.ERROR_CONDITION} AS error, cityHash64(batch_id, seq) AS sample_key, "
            "isNotNull(ttft_ms) AS has_ttft, ifNull(ttft_ms, 0) AS ttft_value "
            f"FROM {check_table_name(table)} FINAL WHERE {queries.WINDOW_FILTER}"
        )

    @classmethod
    def load(
        cls,
        client: Any,
        table: str,
        deployment_id: str,
        start: datetime,
        end: datetime,
        *,
        timeout_s: float = 60.0,
    ) -> RecordedMetrics:
        """One query for every record of the deployment in `[start, end)`.
        Raises `MetricsUnavailable` when the store fails."""
        start_ms, end_ms = queries.window_ms(start, end)
        params = {"deployment_id": deployment_id, "start_ms": start_ms, "end_ms": end_ms}
        try:
            result = client.query(
                cls.sql(table),
                parameters=params,
                settings={"max_execution_time": max(1, math.ceil(timeout_s))},
            )
            names = list(result.column_names)
            data = result.result_columns if result.row_count else [[] for _ in names]
        except Exception as exc:
            raise MetricsUnavailable(
                f"request-metrics store did not answer: {type(exc).__name__}: {exc}"
            ) from exc
        return cls(deployment_id, start, end, dict(zip(names, data, strict=True)))

    def _span(self, deployment_id: str, start: datetime, end: datetime) -> tuple[int, int]:
        start_ms, end_ms = queries.window_ms(start, end)
        if deployment_id != self.deployment_id:
            raise MetricsUnavailable(f"only the records of {self.deployment_id} were read")
        if start_ms < self.start_ms or end_ms > self.end_ms:
            raise MetricsUnavailable(
                f"window {start.isoformat()} .. {end.isoformat()} is outside the records read"
            )
        return start_ms, end_ms

    async def window(
        self, deployment_id: str, start: datetime, end: datetime, *, raw: bool
    ) -> WindowResult:
        start_ms, end_ms = self._span(deployment_id, start, end)
        canary, stable = (
            self._role_window(role, self.roles[role], start_ms, end_ms, raw)
            for role in ("canary", "stable")
        )
        return WindowResult(
            deployment_id=deployment_id, start=start, end=end, canary=canary, stable=stable
        )

    def _sample(self, values: NDArray[np.float64], keys: NDArray[np.uint64]) -> tuple[float, ...]:
        """Sorted `values`; over `raw_limit`, those of the rows with the lowest keys."""
        if len(values) > self.raw_limit:
            values = values[np.argpartition(keys, self.raw_limit - 1)[: self.raw_limit]]
        return tuple(np.sort(values).tolist())

    def _role_window(
        self, role: queries.Role, records: _RoleRecords, start_ms: int, end_ms: int, raw: bool
    ) -> RoleWindow:
        i, j = records.span(start_ms, end_ms)
        n = j - i
        if n == 0:
            return RoleWindow(role, 0, 0, None, None, None)
        values = np.sort(records.latency_ms[i:j])
        p50, p95, p99 = (_quantile(values, level) for level in QUANTILE_LEVELS)
        latencies: tuple[float, ...] = ()
        ttfts: tuple[float, ...] = ()
        if raw:
            if n <= self.raw_limit:
                latencies = tuple(values.tolist())
            else:
                latencies = self._sample(records.latency_ms[i:j], records.sample_key[i:j])
            streamed = records.has_ttft[i:j]
            if streamed.any():
                ttfts = self._sample(
                    records.ttft_ms[i:j][streamed], records.sample_key[i:j][streamed]
                )
        return RoleWindow(
            role=role,
            requests=n,
            errors=int(records.errors_cum[j] - records.errors_cum[i]),
            p50_ms=p50,
            p95_ms=p95,
            p99_ms=p99,
            latencies_ms=latencies,
            sampled=raw and n > self.raw_limit,
            ttft_ms=ttfts,
        )

    async def buckets(
        self,
        deployment_id: str,
        start: datetime,
        end: datetime,
        bucket_s: float,
        latency_limit_ms: float | None,
        *,
        ttft_limit_ms: float | None = None,
    ) -> BucketCounts:
        start_ms, end_ms = self._span(deployment_id, start, end)
        bucket_ms = round(bucket_s * 1000)
        if not math.isfinite(bucket_s) or bucket_ms < 1:
            raise ValueError(f"bucket_s must be at least 0.001, got {bucket_s}")
        size = -(-(end_ms - start_ms) // bucket_ms)
        if size > queries.MAX_BUCKETS:
            raise ValueError(
                f"more than {queries.MAX_BUCKETS} buckets of {bucket_s} s; use wider buckets"
            )
        limit = math.inf if latency_limit_ms is None else float(latency_limit_ms)
        if not math.isfinite(limit):
            limit = 1e300  # as query_buckets binds it

        def count(
            records: _RoleRecords, i: int, j: int, where: NDArray[np.bool_] | None = None
        ) -> tuple[int, ...]:
            index = (records.ts_ms[i:j] - start_ms) // bucket_ms
            if where is not None:
                index = index[where]
            return tuple(np.bincount(index, minlength=size).tolist())

        c, s = self.roles["canary"], self.roles["stable"]
        ci, cj = c.span(start_ms, end_ms)
        si, sj = s.span(start_ms, end_ms)
        c_errors = np.diff(c.errors_cum[ci : cj + 1]).astype(bool)
        s_errors = np.diff(s.errors_cum[si : sj + 1]).astype(bool)
        canary_ttft: tuple[int, ...] = ()
        canary_ttft_over: tuple[int, ...] = ()
        if ttft_limit_ms is not None:
            streamed = c.has_ttft[ci:cj]
            canary_ttft = count(c, ci, cj, streamed)
            canary_ttft_over = count(c, ci, cj, streamed & (c.ttft_ms[ci:cj] > ttft_limit_ms))
        return BucketCounts(
            bucket_s=bucket_ms / 1000,
            latency_limit_ms=latency_limit_ms,
            canary_requests=count(c, ci, cj),
            canary_errors=count(c, ci, cj, c_errors),
            canary_over=count(c, ci, cj, c.latency_ms[ci:cj] > limit)
            if latency_limit_ms is not None
            else (0,) * size,
            stable_requests=count(s, si, sj),
            stable_errors=count(s, si, sj, s_errors),
            ttft_limit_ms=ttft_limit_ms,
            canary_ttft=canary_ttft,
            canary_ttft_over=canary_ttft_over,
        )


# ---- what happened ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ending:
    """How a rollout ended, or would have: promoted, rolled_back, held, or (replay) ran_out /
    (original) running. `at_s` counts from the first step's start."""

    outcome: str
    at: datetime
    at_s: float
    step_index: int
    weight: float
    baking: bool = False
    trigger: str | None = None
    reason: str = ""

    @property
    def where(self) -> str:
        return _where(self.step_index, self.weight, self.baking)


@dataclass(frozen=True)
class OriginalRun:
    """The original rollout as far as it can be known: its weights over time, its first stop
    (held, rolled back or promoted), and its looks (from the event stream when given)."""

    started_at: datetime
    data_end: datetime
    schedule: tuple[tuple[datetime, float], ...]  # (from, canary weight), in time order
    ending: Ending
    looks: int | None = None  # CanaryAnalysed events; None without the event stream
    finished: bool = True

    def weight_at(self, at: datetime) -> float:
        return _weight_at(self.schedule, at)


def _weight_at(schedule: Sequence[tuple[datetime, float]], at: datetime) -> float:
    weight = 0.0
    for start, w in schedule:
        if start > at:
            break
        weight = w
    return weight


def _where(step_index: int, weight: float, baking: bool) -> str:
    return f"bake, {weight:g}%" if baking else f"step {step_index}, {weight:g}%"


def original_run(
    rollout: RolloutState,
    events: Iterable[Event] = (),
    *,
    now: datetime | None = None,
) -> OriginalRun:
    """What the rollout did: from its stored state, refined by its events where given
    (CanaryStepStarted: every weight change, resumed steps included; DeploymentHeld,
    DeploymentRolledBack with its trigger, DeploymentPromoted; CanaryAnalysed: the looks).
    A rollout that has not finished is read up to `now`. Raises ValueError for one that never
    started a step (queued, or rolled back while queued)."""
    mine = [e for e in events if e.deployment_id == rollout.deployment_id]
    steps = [e for e in mine if isinstance(e, CanaryStepStarted)]
    if not rollout.step_starts and not steps:
        if rollout.phase is Phase.QUEUED:
            raise ValueError(
                f"{rollout.deployment_id} is queued behind another rollout of {rollout.model}: "
                "no canary traffic to replay yet"
            )
        raise ValueError(
            f"{rollout.deployment_id} never started a canary step ({rollout.phase.value}: "
            f"{rollout.last_reason or 'no reason recorded'}): no canary traffic to replay"
        )
    policy = rollout.policy
    schedule: list[tuple[datetime, float]]
    if steps:
        schedule = [(e.occurred_at, e.weight) for e in steps]
    else:
        schedule = [
            (at, policy.steps[i].weight)
            for i, at in enumerate(rollout.step_starts)
            if i < len(policy.steps)
        ]
        if rollout.baking and rollout.step_started_at is not None:
            schedule.append((rollout.step_started_at, 100.0))
    schedule.sort(key=lambda item: item[0])
    started = schedule[0][0]
    finished = rollout.phase.terminal and rollout.finished_at is not None
    data_end = rollout.finished_at if finished and rollout.finished_at else (now or _utc_now())

    held = [e for e in mine if isinstance(e, DeploymentHeld)]
    rolled = [e for e in mine if isinstance(e, DeploymentRolledBack)]
    promoted = [e for e in mine if isinstance(e, DeploymentPromoted)]

    def ending(
        outcome: str, at: datetime, trigger: str | None, reason: str, step: int | None = None
    ) -> Ending:
        weight = _weight_at(schedule, at - timedelta(microseconds=1)) if at > started else 0.0
        index = step if step is not None else _step_at(steps, rollout, at)
        index = min(index, len(policy.steps) - 1)
        at_s = (at - started).total_seconds()
        return Ending(outcome, at, at_s, index, weight, weight >= 100.0, trigger, reason)

    first: Ending
    if held:
        e = held[0]
        first = ending("held", e.occurred_at, "inconclusive", "; ".join(e.reasons), e.step_index)
    elif rolled:
        e2 = rolled[0]
        first = ending(
            "rolled_back", e2.occurred_at, e2.trigger, "; ".join(e2.reasons), e2.step_index
        )
    elif promoted:
        e3 = promoted[0]
        first = ending("promoted", e3.occurred_at, None, "; ".join(e3.reasons))
    elif rollout.held_since is not None:
        first = ending("held", rollout.held_since, "inconclusive", rollout.last_reason)
    elif finished and rollout.finished_at is not None:
        first = ending(rollout.phase.value, rollout.finished_at, None, rollout.last_reason)
    else:
        first = ending("running", data_end, None, rollout.last_reason)
    if finished and rollout.finished_at is not None:
        end_weight = 100.0 if rollout.phase is Phase.PROMOTED else 0.0
        schedule.append((rollout.finished_at, end_weight))
    looks = sum(1 for e in mine if isinstance(e, CanaryAnalysed)) if mine else None
    return OriginalRun(
        started_at=started,
        data_end=data_end,
        schedule=tuple(schedule),
        ending=first,
        looks=looks,
        finished=finished,
    )


def _step_at(steps: Sequence[CanaryStepStarted], rollout: RolloutState, at: datetime) -> int:
    index = 0
    if steps:
        for e in steps:
            if e.occurred_at < at:
                index = min(e.step_index, len(rollout.policy.steps) - 1)
        return index
    for i, start in enumerate(rollout.step_starts):
        if start < at:
            index = i
    return index


def _utc_now() -> datetime:
    return datetime.now(UTC)


# ---- the replay -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TestLook:
    """One test at one look: what the decision read."""

    __test__ = False  # not a pytest class, whatever its name

    name: str
    outcome: str
    observed: float | None
    threshold: float
    p_value: float | None
    e_value: float | None
    alpha: float
    n: int


@dataclass(frozen=True)
class Look:
    """One look of the replayed rollout (the state before it acted)."""

    at: datetime
    at_s: float
    phase: str
    step_index: int
    baking: bool
    weight: float
    original_weight: float
    verdict: str | None
    action: str
    trigger: str | None
    reason: str
    canary_requests: int | None
    canary_errors: int | None
    stable_requests: int | None
    stable_errors: int | None
    tests: tuple[TestLook, ...]
    exact: bool = True

    @property
    def where(self) -> str:
        return _where(self.step_index, self.weight, self.baking)


@dataclass(frozen=True)
class Divergence:
    """The first time the replayed weight differs from the weight the records were made at."""

    at: datetime
    at_s: float
    replay_weight: float
    original_weight: float


@dataclass(frozen=True)
class Replay:
    deployment_id: str
    policy: CanaryPolicy
    thresholds: CanaryThresholds
    same_policy: bool
    started_at: datetime
    data_end: datetime
    tick_s: float
    records: int | None
    looks: tuple[Look, ...]
    ending: Ending
    original: OriginalRun
    divergence: Divergence | None
    agrees: bool | None
    comparison: str
    notes: tuple[str, ...] = field(default=())
    elapsed_s: float = 0.0

    @property
    def verdict_line(self) -> str:
        e = self.ending
        if e.outcome == "ran_out":
            return f"ran out of recorded traffic at {e.at_s:.1f} s while in {e.where}" + (
                f": {e.reason}" if e.reason else ""
            )
        verb = {
            "rolled_back": "rolled back",
            "promoted": "promoted",
            "held": "held for a person",
        }[e.outcome]
        return f"would have {verb} at {e.at_s:.1f} s ({e.where}): {e.reason}"


async def replay(
    metrics: Any,
    rollout: RolloutState,
    policy: CanaryPolicy | None = None,
    thresholds: CanaryThresholds | None = None,
    *,
    tick_s: float = TICK_S,
    original: OriginalRun | None = None,
    records: int | None = None,
) -> Replay:
    """Re-run the decision over `metrics` (the records of `rollout`) from the original's first
    step start to its end (`original.data_end`), under `policy`/`thresholds` (default: the
    rollout's own). `metrics` is a `MetricsSource` (with `buckets` for the e-process method):
    `RecordedMetrics` or `ClickHouseMetrics`."""
    clock = time.perf_counter()
    original = original or original_run(rollout)
    policy = policy or rollout.policy
    thresholds = thresholds or rollout.thresholds
    same = policy == rollout.policy and thresholds == rollout.thresholds
    started = original.started_at
    end = original.data_end
    state = rules.start_rollout(
        rollout.request,
        earlier=rollout.earlier,
        policy=policy,
        thresholds=thresholds,
        stable=rollout.stable,
        canary=rollout.canary,
        now=min(rollout.created_at, started),
        queued=True,
    )
    state = rules.apply(state, rules.Decision("start", "canary starts"), started)
    looks: list[Look] = []
    changes: list[tuple[datetime, float]] = [(started, state.weight)]
    ending: Ending | None = None
    tick = 0
    while ending is None:
        tick += 1
        now = started + timedelta(seconds=tick * tick_s)
        if now > end:
            last = started + timedelta(seconds=(tick - 1) * tick_s)
            ending = Ending(
                "ran_out",
                last,
                (last - started).total_seconds(),
                state.step_index,
                state.weight,
                state.baking,
                None,
                f"the {'original rollout ended' if original.finished else 'records end'} there"
                + (f"; last look: {state.last_reason}" if state.last_reason else ""),
            )
            break
        if not rules.look_due(state, now):  # engine.Engine.step's rule, without the effects
            continue
        observation = await observe(metrics, state, now)
        decision = rules.decide(state, observation, state.policy, state.thresholds, now)
        if decision.action == "wait" and not decision.analysed and decision.verdict is None:
            continue
        looks.append(_look(state, decision, now, started, original.weight_at(now)))
        before = state
        state = rules.apply(state, decision, now)
        if _served(state) != _served(before):
            changes.append((now, _served(state)))
        if state.phase.terminal or state.phase is Phase.HELD:
            outcome = "held" if state.phase is Phase.HELD else state.phase.value
            ending = Ending(
                outcome,
                now,
                (now - started).total_seconds(),
                before.step_index,
                before.weight,
                before.baking,
                decision.trigger,
                decision.reason,
            )
    divergence = _divergence(changes, original.schedule, started, ending.at, tick_s)
    if divergence is not None:
        looks = [look if look.at <= divergence.at else _inexact(look) for look in looks]
    agrees, comparison = _compare(ending, original, same)
    notes = _notes(rollout, original, same, divergence)
    return Replay(
        deployment_id=rollout.deployment_id,
        policy=policy,
        thresholds=thresholds,
        same_policy=same,
        started_at=started,
        data_end=end,
        tick_s=tick_s,
        records=records if records is not None else getattr(metrics, "records", None),
        looks=tuple(looks),
        ending=ending,
        original=original,
        divergence=divergence,
        agrees=agrees,
        comparison=comparison,
        notes=notes,
        elapsed_s=time.perf_counter() - clock,
    )


def _served(state: RolloutState) -> float:
    """The new version's share of requests (promoted: all of it, as the stable version)."""
    return 100.0 if state.phase is Phase.PROMOTED else state.weight


def _inexact(look: Look) -> Look:
    return dataclasses.replace(look, exact=False)


def _look(
    state: RolloutState,
    decision: rules.Decision,
    now: datetime,
    started: datetime,
    original_weight: float,
) -> Look:
    window = decision.window
    tests: tuple[TestLook, ...] = ()
    if decision.assessment is not None:
        tests = tuple(
            TestLook(t.name, t.outcome, t.observed, t.threshold, t.p_value, t.e_value, t.alpha, t.n)
            for t in decision.assessment.tests
        )
    return Look(
        at=now,
        at_s=(now - started).total_seconds(),
        phase=state.phase.value,
        step_index=state.step_index,
        baking=state.baking,
        weight=state.weight,
        original_weight=original_weight,
        verdict=decision.verdict,
        action=decision.action,
        trigger=decision.trigger,
        reason=decision.reason,
        canary_requests=window.canary.requests if window else None,
        canary_errors=window.canary.errors if window else None,
        stable_requests=window.stable.requests if window else None,
        stable_errors=window.stable.errors if window else None,
        tests=tests,
    )


def _divergence(
    replayed: Sequence[tuple[datetime, float]],
    original: Sequence[tuple[datetime, float]],
    started: datetime,
    stop: datetime,
    tolerance_s: float,
) -> Divergence | None:
    """The first time in [started, stop) the two weight schedules differ for longer than
    `tolerance_s` (one tick: the live engine's own ticks fall anywhere within one). What
    happens at `stop`, where the replay ended, no look reads."""
    points = sorted({t for t, _ in (*replayed, *original) if started <= t < stop} | {started})
    for i, at in enumerate(points):
        mine, theirs = _weight_at(replayed, at), _weight_at(original, at)
        if mine == theirs:
            continue
        until = next(
            (p for p in points[i + 1 :] if _weight_at(replayed, p) == _weight_at(original, p)),
            None,
        )
        lasted = ((until or stop) - at).total_seconds()
        if until is None or lasted > tolerance_s:
            return Divergence(at, (at - started).total_seconds(), mine, theirs)
    return None


def _compare(ending: Ending, original: OriginalRun, same: bool) -> tuple[bool | None, str]:
    them = original.ending
    what = (
        f"{them.outcome} at {them.at_s:.1f} s ({them.where}"
        + (f", trigger {them.trigger}" if them.trigger else "")
        + ")"
    )
    if them.outcome == "running":
        if ending.outcome == "ran_out":
            return None, f"still running ({them.where}); the replay had not decided by now either"
        return None, f"still running ({them.where}); the replay has decided (see above)"
    if them.trigger in ("manual", "superseded"):
        cause = "a person's command" if them.trigger == "manual" else "a newer deployment"
        return False, (
            f"differs: the original ended by {cause}, which a replay does not repeat: {what}"
        )
    agrees = ending.outcome == them.outcome and (
        ending.outcome != "rolled_back" or them.trigger is None or ending.trigger == them.trigger
    )
    if agrees:
        delta = ending.at_s - them.at_s
        when = "at the same moment" if abs(delta) < 1e-6 else f"{delta:+.1f} s from it"
        return True, f"agrees with what happened: {what}; the replay decided {when}"
    if ending.outcome == "ran_out":
        mine = f"had not decided by {ending.at_s:.1f} s ({ending.where})"
    else:
        mine = (
            f"{ending.outcome} at {ending.at_s:.1f} s ({ending.where}"
            + (f", trigger {ending.trigger}" if ending.trigger else "")
            + ")"
        )
    hint = "" if not same else " (same policy: see the notes on what a replay cannot repeat)"
    return False, f"differs: the original {what}; the replay {mine}{hint}"


def _notes(
    rollout: RolloutState,
    original: OriginalRun,
    same: bool,
    divergence: Divergence | None,
) -> tuple[str, ...]:
    notes = [
        "weights are treated as applied at once (decide with traffic=None): a replayed step "
        "never waits for a router to confirm its weight",
        "the replay reads every record with a timestamp before each look; the live controller "
        "read those ingested by then (records arrive in batches, late by up to a flush)",
    ]
    if divergence is not None:
        notes.append(
            f"exact only up to {divergence.at_s:.1f} s: from there the replayed rollout is at "
            f"{divergence.replay_weight:g}% while the records were made at "
            f"{divergence.original_weight:g}% (later looks are marked ~)"
        )
    if not original.finished:
        notes.append("the rollout is still running: replayed over its records up to now")
    if rollout.bus_outages or rollout.judge_after is not None:
        notes.append(
            "the original allowed for bus outages (its step clock stopped); the replay does not"
        )
    if not same:
        notes.append("replayed under another policy than the rollout's own")
    return tuple(notes)


# ---- output -------------------------------------------------------------------------------------


def _tests_text(look: Look) -> str:
    parts = []
    for t in look.tests:
        if t.e_value is not None:
            parts.append(f"{t.name} e={t.e_value:.3g}")
        elif t.p_value is not None:
            parts.append(f"{t.name} p={t.p_value:.3g}")
    return " ".join(parts)


def look_line(look: Look) -> str:
    counts = ""
    if look.canary_requests is not None:
        counts = (
            f" canary {look.canary_requests}/{look.canary_errors}err"
            f" stable {look.stable_requests}/{look.stable_errors}err"
        )
    tests = _tests_text(look)
    return (
        f"{'~' if not look.exact else ' '}{look.at_s:8.1f} s  {look.where:<13} "
        f"{look.action:<8} {look.verdict or '-':<17}{counts}"
        + (f"  {tests}" if tests else "")
        + f"  {look.reason}"
    )


def shown_looks(looks: Sequence[Look], every: int = 0, most: int = 30) -> list[Look]:
    """Looks that changed something (an action, a new verdict or phase, the first and the last),
    plus every `every`-th (0: as many as keep the list near `most`)."""
    if not looks:
        return []
    step = every or max(1, math.ceil(len(looks) / most))
    shown = []
    previous: Look | None = None
    for i, look in enumerate(looks):
        changed = (
            previous is None
            or look.action != "wait"
            or look.verdict != previous.verdict
            or look.where != previous.where
            or look.exact != previous.exact
            or i == len(looks) - 1
        )
        if changed or i % step == 0:
            shown.append(look)
        previous = look
    return shown


def summary_lines(result: Replay, every: int = 0) -> list[str]:
    policy = result.policy
    steps = ", ".join(f"{s.weight:g}% {s.duration_s:g} s" for s in policy.steps)
    interval = rules.look_interval_s(policy)
    lines = [
        f"replay of {result.deployment_id}: {result.records if result.records is not None else '?'}"
        f" records, {(result.data_end - result.started_at).total_seconds():.1f} s from the first "
        f"step; {'its own policy' if result.same_policy else 'another policy'} "
        f"({policy.method}, steps {steps}"
        + (f", bake {policy.bake_s:g} s" if policy.bake_s else "")
        + f", a look every {interval:g} s, ticks of {result.tick_s:g} s)",
        f"{len(result.looks)} looks"
        + (f" (the original made {result.original.looks})" if result.original.looks else "")
        + "; shown: each that changed something, and some between:",
    ]
    lines += [look_line(look) for look in shown_looks(result.looks, every)]
    lines.append(result.verdict_line)
    lines.append(result.comparison)
    lines += [f"note: {n}" for n in result.notes]
    lines.append(f"replayed in {result.elapsed_s:.2f} s")
    return lines


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def as_dict(result: Replay) -> dict[str, Any]:
    def ending(e: Ending) -> dict[str, Any]:
        return {**e.__dict__, "where": e.where}

    looks = [
        {**{k: v for k, v in look.__dict__.items() if k != "tests"},
         "tests": [t.__dict__ for t in look.tests]}
        for look in result.looks
    ]  # fmt: skip
    out: dict[str, Any] = _jsonable(
        {
            "deployment_id": result.deployment_id,
            "same_policy": result.same_policy,
            "policy": result.policy.model_dump(mode="json"),
            "thresholds": result.thresholds.model_dump(mode="json"),
            "started_at": result.started_at,
            "data_end": result.data_end,
            "tick_s": result.tick_s,
            "traffic_confirmation": "treated as applied (decide with traffic=None)",
            "records": result.records,
            "looks": looks,
            "outcome": {**ending(result.ending), "summary": result.verdict_line},
            "original": {
                **ending(result.original.ending),
                "finished": result.original.finished,
                "looks": result.original.looks,
                "schedule": [{"from": t, "weight": w} for t, w in result.original.schedule],
            },
            "agrees": result.agrees,
            "comparison": result.comparison,
            "exact_until_s": result.divergence.at_s if result.divergence else None,
            "divergence": result.divergence.__dict__ if result.divergence else None,
            "notes": list(result.notes),
            "elapsed_s": result.elapsed_s,
        }
    )
    return out


# ---- the policy to replay under -----------------------------------------------------------------

_FILE_KEYS: Final = frozenset({"defaults", "teams", "models"})


def policy_from_file(rollout: RolloutState, path: Path) -> tuple[CanaryPolicy, CanaryThresholds]:
    """The canary policy and thresholds `path` gives this rollout.

    A policy file (`defaults` / `teams` / `models`, as PREFLIGHT_POLICY_FILE): resolved for the
    deployment as the controller would (its model, team, class and request overrides). Any other
    mapping is a partial policy (as `preflight deploy --policy`) laid over the rollout's own
    stored policy and thresholds. Raises PolicyError.
    """
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read policy file: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise PolicyError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise PolicyError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    request = rollout.request
    if _FILE_KEYS & raw.keys():
        policy = load_policy_file(path).resolve(
            model=request.model, team=request.requested_by.team, overrides=request.policy_overrides
        )
        return policy.canary, policy.canary_thresholds(request.model_class)
    base_canary = rollout.policy.model_dump(mode="json")
    base_canary["thresholds"] = rollout.thresholds.model_dump(mode="json")
    merged = _merge({"canary": base_canary}, raw)
    try:
        policy = Policy.model_validate(merged)
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()
        ]
        raise PolicyError(f"{path}: " + "; ".join(problems)) from None
    cls = request.model_class
    class_override = (raw.get("model_classes") or {}).get(cls) or {}
    thresholds = policy.canary.thresholds
    if "canary" in class_override:
        thresholds = policy.canary_thresholds(cls)
    return policy.canary, thresholds


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# ---- reading a chDB path another process owns -------------------------------------------------

_DAY_PART = re.compile(r"(\d{8})_\d+_\d+_\d+(_\d+)?")


def snapshot_chdb(source: Path, target: Path, days: Iterable[str] | None = None) -> int:
    """Copy a chDB data path that another process holds open (the running stack's controller:
    chDB allows one process per path) so that this one can open the copy: every file but the
    owner's lock (`status`), in-progress parts (`tmp_*`) and, with `days` (YYYYMMDD), the daily
    partitions' parts of other days. Parts are immutable once written, so the copy is what a
    crash at that moment would have left: ClickHouse opens it as after a restart. Returns the
    bytes copied. A file deleted while copying (a merged-away part) is skipped."""
    wanted = set(days) if days is not None else None
    copied = 0

    def ignore(directory: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n.startswith("tmp_") or n in ("status", "detached")}
        if Path(directory) == source:
            skip |= {n for n in names if n == "tmp"}
        if wanted is not None:
            for name in names:
                match = _DAY_PART.fullmatch(name)
                if match and match.group(1) not in wanted:
                    skip.add(name)
        return skip

    def copy(src: str, dst: str) -> str:
        nonlocal copied
        try:
            shutil.copy2(src, dst)
            copied += os.path.getsize(dst)
        except FileNotFoundError:
            pass  # removed while we copied: a part merged away, covered by its successor
        return dst

    try:
        shutil.copytree(
            source, target, symlinks=True, ignore=ignore, copy_function=copy, dirs_exist_ok=True
        )
    except shutil.Error as exc:
        # A directory that vanished under us (a part merged away) is not a failure; others are.
        problems = [e for e in exc.args[0] if "No such file" not in str(e[-1])]
        if problems:
            raise
    return copied


def days_between(start: datetime, end: datetime) -> list[str]:
    """The daily partition ids (YYYYMMDD, UTC) that records in [start, end] fall in."""
    day = start.astimezone(UTC).date()
    last = end.astimezone(UTC).date()
    out = []
    while day <= last:
        out.append(day.strftime("%Y%m%d"))
        day += timedelta(days=1)
    return out
