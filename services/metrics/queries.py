"""The controller's questions to the request-metrics table: one window, or a series of buckets.

Definitions (docs/metrics.md says why):

- a window is `[start, end)` on the record's `ts`;
- an error is a request with no response (status 0), a 5xx, or a non-empty `error_kind`;
  4xx are the client's mistakes, not the version's, so they count as requests, not errors;
- percentiles are exact, with linear interpolation between the two closest ranks (ClickHouse
  `quantilesExactInclusive`, numpy's default `percentile`, Excel's `PERCENTILE.INC`): p95 of
  1..100 is 95.05, and one request's latency is every percentile of it;
- rows are read `FINAL`, so a redelivered batch counts once.

Every value travels as a bound `{name:Type}` parameter; only the (validated) table name is
placed into the SQL text.

Exceptions::

    ValueError              bad arguments (naive datetimes, empty window, bad table name)
    MetricsUnavailable      the store failed or timed out: never read as "no errors"
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Final, Literal, get_args

from services.contracts.events import RoleMeasurement
from services.runtime.clickhouse import check_table_name

__all__ = [
    "ERROR_CONDITION",
    "BucketCounts",
    "MetricsUnavailable",
    "Role",
    "RoleWindow",
    "WindowResult",
    "query_buckets",
    "query_series",
    "query_window",
    "series_sql",
    "ttft_sql",
    "window_sql",
]

Role = Literal["stable", "canary"]
ROLES: Final[tuple[Role, ...]] = get_args(Role)

# A user who hangs up mid-stream ("stop generating") is recorded, but is not the model's error.
ERROR_CONDITION: Final = (
    "(status = 0 OR status >= 500 OR (error_kind != '' AND error_kind != 'client_closed'))"
)
QUANTILES: Final = "quantilesExactInclusive(0.5, 0.95, 0.99)(latency_ms)"
# Pinned requests (X-Preflight-Pin) are a tester's choice of role, not the weight's: counted,
# they let anyone dilute a failing canary's error rate with requests that cannot fail.
WINDOW_FILTER: Final = (
    "deployment_id = {deployment_id:String}"
    " AND ts >= fromUnixTimestamp64Milli({start_ms:Int64}, 'UTC')"
    " AND ts < fromUnixTimestamp64Milli({end_ms:Int64}, 'UTC')"
    " AND NOT pinned"
)
DEFAULT_TIMEOUT_S: Final = 10.0
MAX_BUCKETS: Final = 10_000


class MetricsUnavailable(RuntimeError):
    """The metrics store could not answer (engine error, timeout, closed client)."""


@dataclass(frozen=True)
class RoleWindow:
    """Request metrics of one role in one window."""

    role: Role
    requests: int
    errors: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    latencies_ms: tuple[float, ...] = ()
    """Only with `raw=True`: every latency, or a uniform sample when over `raw_limit`; sorted."""
    sampled: bool = False
    """True when `latencies_ms` holds a sample, not every request's latency."""
    ttft_ms: tuple[float, ...] = ()
    """Only with `raw=True`: time to first token of the streamed responses (the records that
    carry one), like `latencies_ms`: all, or a uniform sample; sorted."""

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    @property
    def ttft_p95_ms(self) -> float | None:
        """p95 of `ttft_ms` (exact unless `sampled`); None without streamed responses."""
        return quantile_inclusive(self.ttft_ms, 0.95) if self.ttft_ms else None

    def measurement(self) -> RoleMeasurement:
        return RoleMeasurement(
            requests=self.requests,
            errors=self.errors,
            error_rate=self.error_rate,
            p50_ms=self.p50_ms,
            p95_ms=self.p95_ms,
            p99_ms=self.p99_ms,
            ttft_p95_ms=self.ttft_p95_ms,
        )


@dataclass(frozen=True)
class WindowResult:
    """Both roles of one deployment over `[start, end)`."""

    deployment_id: str
    start: datetime
    end: datetime
    canary: RoleWindow
    stable: RoleWindow

    def role(self, role: Role) -> RoleWindow:
        return self.canary if role == "canary" else self.stable


def window_sql(table: str, *, final: bool = True) -> str:
    """Counts and percentiles per role. `final=False` exists only to measure what FINAL costs."""
    # S608: only the checked table name is formatted in; values are bound parameters.
    return (
        f"SELECT role, count(), countIf{ERROR_CONDITION}, {QUANTILES} "  # noqa: S608
        f"FROM {check_table_name(table)}{' FINAL' if final else ''} "
        f"WHERE {WINDOW_FILTER} GROUP BY role"
    )


def raw_sql(table: str) -> str:
    """Latencies per role; over the limit, the rows whose (batch_id, seq) hash lowest: a
    uniform sample without replacement that is the same on every call."""
    return (
        f"SELECT role, latency_ms FROM {check_table_name(table)} FINAL "  # noqa: S608
        f"WHERE {WINDOW_FILTER} "
        "ORDER BY role, cityHash64(batch_id, seq) LIMIT {raw_limit:UInt32} BY role"
    )


def ttft_sql(table: str) -> str:
    """Time to first token per role, of the records that carry one: sampled like `raw_sql`."""
    return (
        f"SELECT role, ttft_ms FROM {check_table_name(table)} FINAL "  # noqa: S608
        f"WHERE {WINDOW_FILTER} AND ttft_ms IS NOT NULL "
        "ORDER BY role, cityHash64(batch_id, seq) LIMIT {raw_limit:UInt32} BY role"
    )


def series_sql(table: str) -> str:
    # A quantile of a Nullable column skips NULLs: NULL where no record of the bucket has TTFT.
    return (
        "SELECT intDiv(toUnixTimestamp64Milli(ts) - {start_ms:Int64}, {bucket_ms:Int64})"  # noqa: S608
        f" AS bucket, role, count(), countIf{ERROR_CONDITION},"
        " quantileExactInclusive(0.95)(latency_ms), quantileExactInclusive(0.95)(ttft_ms) "
        f"FROM {check_table_name(table)} FINAL WHERE {WINDOW_FILTER} "
        "GROUP BY bucket, role ORDER BY bucket, role"
    )


def query_window(
    client: Any,
    table: str,
    deployment_id: str,
    start: datetime,
    end: datetime,
    *,
    raw: bool = False,
    raw_limit: int = 20_000,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> WindowResult:
    """Requests, errors and p50/p95/p99 per role of one deployment over `[start, end)`.

    A role with no requests comes back with zeros and `None` percentiles. With `raw=True` each
    role also carries its latencies (a uniform sample of `raw_limit` when there are more), and
    the time to first token of its records that have one (`ttft_ms`, sampled the same way).
    Raises `MetricsUnavailable` for any failure of the store.
    """
    start_ms, end_ms = window_ms(start, end)
    if raw and raw_limit < 1:
        raise ValueError(f"raw_limit must be >= 1, got {raw_limit}")
    params: dict[str, Any] = {
        "deployment_id": deployment_id,
        "start_ms": start_ms,
        "end_ms": end_ms,
    }
    rows = run_query(client, window_sql(table), params, timeout_s)
    latencies: dict[str, list[float]] = {role: [] for role in ROLES}
    ttfts: dict[Role, list[float]] = {role: [] for role in ROLES}
    if raw:
        sampled = {**params, "raw_limit": raw_limit}
        for role, latency in run_query(client, raw_sql(table), sampled, timeout_s):
            latencies[str(role)].append(float(latency))
        for role, ttft in run_query(client, ttft_sql(table), sampled, timeout_s):
            if ttft is not None and role in ttfts:
                ttfts[role].append(float(ttft))
    by_role = {str(row[0]): row for row in rows}
    windows = {
        role: role_window(role, by_role.get(role), sorted(latencies[role]), raw_limit if raw else 0)
        for role in ROLES
    }
    for role, values in ttfts.items():
        if values and windows[role].requests:
            windows[role] = replace(windows[role], ttft_ms=tuple(sorted(values)))
    return WindowResult(
        deployment_id=deployment_id,
        start=start,
        end=end,
        canary=windows["canary"],
        stable=windows["stable"],
    )


def query_series(
    client: Any,
    table: str,
    deployment_id: str,
    start: datetime,
    end: datetime,
    bucket_s: float,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[dict[str, Any]]:
    """Per time bucket and role: requests, errors, error_rate, p95_ms, ttft_p95_ms (for the
    rollout page).

    Buckets are `bucket_s` wide from `start`; only buckets with requests appear, ordered by time
    then role. Each point: `{"start": datetime, "role", "requests", "errors", "error_rate",
    "p95_ms", "ttft_p95_ms"}`; `ttft_p95_ms` is None where no record of the bucket has a time
    to first token (no streamed responses).
    """
    start_ms, end_ms = window_ms(start, end)
    bucket_ms = round(bucket_s * 1000)
    if not math.isfinite(bucket_s) or bucket_ms < 1:
        raise ValueError(f"bucket_s must be at least 0.001, got {bucket_s}")
    if (end_ms - start_ms) / bucket_ms > MAX_BUCKETS:
        raise ValueError(f"more than {MAX_BUCKETS} buckets of {bucket_s} s; use wider buckets")
    params = {
        "deployment_id": deployment_id,
        "start_ms": start_ms,
        "end_ms": end_ms,
        "bucket_ms": bucket_ms,
    }
    points: list[dict[str, Any]] = []
    for bucket, role, requests, errors, p95, ttft_p95 in run_query(
        client, series_sql(table), params, timeout_s
    ):
        n, e = int(requests), int(errors)
        points.append(
            {
                "start": datetime.fromtimestamp((start_ms + int(bucket) * bucket_ms) / 1000, UTC),
                "role": str(role),
                "requests": n,
                "errors": e,
                "error_rate": e / n if n else None,
                "p95_ms": finite(p95),
                "ttft_p95_ms": finite(ttft_p95),
            }
        )
    return points


@dataclass(frozen=True)
class BucketCounts:
    """Per-bucket counts from a step's start, in time order, for the sequential tests.

    Bucket i covers [start + i x bucket_s, start + (i + 1) x bucket_s); every bucket up to the
    window's end is present (zeros where no request came). `canary_over` counts canary requests
    slower than `latency_limit_ms` (0 everywhere when no limit was given).
    """

    bucket_s: float
    latency_limit_ms: float | None
    canary_requests: tuple[int, ...]
    canary_errors: tuple[int, ...]
    canary_over: tuple[int, ...]
    stable_requests: tuple[int, ...]
    stable_errors: tuple[int, ...]
    ttft_limit_ms: float | None = None
    canary_ttft: tuple[int, ...] = ()
    """Canary requests that carry a time to first token (streamed responses), per bucket."""
    canary_ttft_over: tuple[int, ...] = ()
    """Of those, the ones over `ttft_limit_ms` (empty when no limit was given)."""


def buckets_sql(table: str, *, ttft: bool = False) -> str:
    streamed = (
        ", countIf(isNotNull(ttft_ms)), countIf(ttft_ms > {ttft_limit_ms:Float64})" if ttft else ""
    )
    return (
        "SELECT intDiv(toUnixTimestamp64Milli(ts) - {start_ms:Int64}, {bucket_ms:Int64})"  # noqa: S608
        f" AS bucket, role, count(), countIf{ERROR_CONDITION},"
        f" countIf(latency_ms > {{limit_ms:Float64}}){streamed} "
        f"FROM {check_table_name(table)} FINAL WHERE {WINDOW_FILTER} "
        "GROUP BY bucket, role ORDER BY bucket, role"
    )


def query_buckets(
    client: Any,
    table: str,
    deployment_id: str,
    start: datetime,
    end: datetime,
    bucket_s: float,
    latency_limit_ms: float | None,
    *,
    ttft_limit_ms: float | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> BucketCounts:
    """Requests, errors and (canary) requests over a latency limit per bucket and role; with
    `ttft_limit_ms`, also the canary requests with a TTFT and those over that limit."""
    start_ms, end_ms = window_ms(start, end)
    bucket_ms = round(bucket_s * 1000)
    if not math.isfinite(bucket_s) or bucket_ms < 1:
        raise ValueError(f"bucket_s must be at least 0.001, got {bucket_s}")
    size = -(-(end_ms - start_ms) // bucket_ms)
    if size > MAX_BUCKETS:
        raise ValueError(f"more than {MAX_BUCKETS} buckets of {bucket_s} s; use wider buckets")
    limit = math.inf if latency_limit_ms is None else float(latency_limit_ms)
    params = {
        "deployment_id": deployment_id,
        "start_ms": start_ms,
        "end_ms": end_ms,
        "bucket_ms": bucket_ms,
        "limit_ms": limit if math.isfinite(limit) else 1e300,
    }
    ttft = ttft_limit_ms is not None
    if ttft:
        params["ttft_limit_ms"] = float(ttft_limit_ms)  # type: ignore[arg-type]
    columns = {k: [0] * size for k in ("cr", "ce", "co", "sr", "se", "ct", "cto")}
    for row in run_query(client, buckets_sql(table, ttft=ttft), params, timeout_s):
        i = int(row[0])
        if not 0 <= i < size:
            continue
        if row[1] == "canary":
            for key, value in zip(("cr", "ce", "co", "ct", "cto"), row[2:], strict=False):
                columns[key][i] = int(value)
        else:
            columns["sr"][i], columns["se"][i] = int(row[2]), int(row[3])
    return BucketCounts(
        bucket_s=bucket_ms / 1000,
        latency_limit_ms=latency_limit_ms,
        canary_requests=tuple(columns["cr"]),
        canary_errors=tuple(columns["ce"]),
        canary_over=tuple(columns["co"]) if latency_limit_ms is not None else (0,) * size,
        stable_requests=tuple(columns["sr"]),
        stable_errors=tuple(columns["se"]),
        ttft_limit_ms=ttft_limit_ms,
        canary_ttft=tuple(columns["ct"]) if ttft else (),
        canary_ttft_over=tuple(columns["cto"]) if ttft else (),
    )


# ---- pieces -----------------------------------------------------------------------------------


def window_ms(start: datetime, end: datetime) -> tuple[int, int]:
    """Epoch milliseconds of a window; times must carry a zone (a naive one is ambiguous)."""
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("window start and end must carry a time zone (UTC)")
    start_ms, end_ms = epoch_ms(start), epoch_ms(end)
    if end_ms <= start_ms:
        raise ValueError(f"empty window: start {start.isoformat()} >= end {end.isoformat()}")
    return start_ms, end_ms


def epoch_ms(value: datetime) -> int:
    """Milliseconds since the epoch, floored like DateTime64(3) stores them."""
    delta = value - datetime(1970, 1, 1, tzinfo=UTC)
    return delta.days * 86_400_000 + delta.seconds * 1000 + delta.microseconds // 1000


def run_query(
    client: Any, sql: str, parameters: dict[str, Any], timeout_s: float
) -> list[tuple[Any, ...]]:
    try:
        result = client.query(
            sql,
            parameters=parameters,
            settings={"max_execution_time": max(1, math.ceil(timeout_s))},
        )
        return [tuple(row) for row in result.result_rows]
    except Exception as exc:
        raise MetricsUnavailable(
            f"request-metrics store did not answer: {type(exc).__name__}: {exc}"
        ) from exc


def role_window(
    role: Role, row: tuple[Any, ...] | None, latencies: list[float], raw_limit: int
) -> RoleWindow:
    if row is None:
        return RoleWindow(role, 0, 0, None, None, None)
    requests, errors, quantiles = int(row[1]), int(row[2]), row[3]
    p50, p95, p99 = (finite(q) for q in quantiles)
    return RoleWindow(
        role=role,
        requests=requests,
        errors=errors,
        p50_ms=p50,
        p95_ms=p95,
        p99_ms=p99,
        latencies_ms=tuple(latencies),
        sampled=bool(raw_limit) and requests > raw_limit,
    )


def finite(value: Any) -> float | None:
    """ClickHouse answers NaN for the quantile of nothing (NULL for a Nullable column)."""
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def quantile_inclusive(sorted_values: Sequence[float], level: float) -> float:
    """`quantileExactInclusive(level)` of sorted values, as QUANTILES computes them in SQL
    (the same rule as services.canary_controller.stats.percentile_inclusive)."""
    n = len(sorted_values)
    if n == 0:
        raise ValueError("quantile of no values")
    h = level * (n - 1)
    low = math.floor(h)
    below = float(sorted_values[low])
    if low + 1 >= n:
        return below
    above = float(sorted_values[low + 1])
    if above == below:
        return below
    return below + (h - low) * (above - below)
