"""Pure parts of the metrics path: batches to rows, duplicates, retry delays, window results."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import pytest

from services.contracts.events import RequestMetricsBatch, RequestRecord, RoleMeasurement
from services.metrics import ingest, queries
from services.runtime.clickhouse import METRICS_COLUMNS

T0 = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)


def record(i: int, **changes: Any) -> RequestRecord:
    values: dict[str, Any] = {
        "ts": T0 + timedelta(milliseconds=i),
        "deployment_id": "d-rows",
        "model": "org/chat-7b",
        "version": "2",
        "role": "canary" if i % 2 else "stable",
        "latency_ms": float(i),
        "status": 200,
    }
    return RequestRecord(**(values | changes))


def batch(batch_id: str, *records: RequestRecord) -> RequestMetricsBatch:
    return RequestMetricsBatch(batch_id=batch_id, source="router-1", records=records)


class FakeMsg:
    def __init__(self, data: bytes) -> None:
        self.data = data


# ---- rows --------------------------------------------------------------------------------------


def test_records_of_all_batches_become_one_table_with_a_seq_per_batch() -> None:
    table = ingest.to_arrow(
        [
            batch("batch-aaa", record(0), record(1, status=503, error_kind="http_5xx")),
            batch("batch-bbb", record(2, ttfb_ms=1.5)),
        ]
    )
    assert tuple(table.column_names) == METRICS_COLUMNS
    rows = table.to_pylist()
    assert [(r["batch_id"], r["seq"]) for r in rows] == [
        ("batch-aaa", 0),
        ("batch-aaa", 1),
        ("batch-bbb", 0),
    ]
    assert [r["error_kind"] for r in rows] == ["", "http_5xx", ""]
    assert [r["ttfb_ms"] for r in rows] == [None, None, 1.5]
    assert [r["role"] for r in rows] == ["stable", "canary", "stable"]
    assert rows[1]["status"] == 503


def test_token_fields_become_nullable_columns() -> None:
    streamed = record(0, ttft_ms=42.5, itl_ms=3.25, output_tokens=16)
    table = ingest.to_arrow([batch("batch-tok", streamed, record(1))])
    rows = table.to_pylist()
    assert [(r["ttft_ms"], r["itl_ms"], r["output_tokens"]) for r in rows] == [
        (42.5, 3.25, 16),
        (None, None, None),
    ]
    assert str(table.schema.field("output_tokens").type) == "uint32"


def test_old_records_without_token_fields_still_validate() -> None:
    old = record(0).model_dump(mode="json", exclude={"ttft_ms", "itl_ms", "output_tokens"})
    parsed = RequestRecord.model_validate(old)
    assert (parsed.ttft_ms, parsed.itl_ms, parsed.output_tokens) == (None, None, None)
    with pytest.raises(ValueError, match="greater than or equal"):
        record(0, ttft_ms=-1.0)
    with pytest.raises(ValueError, match="greater than or equal"):
        record(0, output_tokens=-1)


def test_timestamps_are_stored_in_utc_and_a_naive_one_is_read_as_utc() -> None:
    paris = timezone(timedelta(hours=1))
    table = ingest.to_arrow(
        [
            batch(
                "batch-tz1",
                record(0, ts=datetime(2026, 11, 25, 13, 0, 0, 123456, tzinfo=paris)),
                record(1, ts=datetime(2026, 11, 25, 12, 0, 0, 5000)),
            )
        ]
    )
    stamps = table.column("ts").to_pylist()
    assert stamps == [
        datetime(2026, 11, 25, 12, 0, 0, 123000, tzinfo=UTC),
        datetime(2026, 11, 25, 12, 0, 0, 5000, tzinfo=UTC),
    ]


def test_an_empty_fetch_is_an_empty_table() -> None:
    assert ingest.to_arrow([]).num_rows == 0


# ---- parsing ------------------------------------------------------------------------------------


def test_a_good_batch_parses() -> None:
    good = batch("batch-good", record(0))
    assert ingest.parse_batch(good.model_dump_json().encode()) == good


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"not json", "does not validate"),
        (
            b'{"type": "RequestMetricsBatch", "batch_id": "short", "source": "r", "records": []}',
            "batch_id",
        ),
        (
            batch("batch-old", record(0, ts=datetime(1960, 1, 1, tzinfo=UTC)))
            .model_dump_json()
            .encode(),
            "records.0.ts",
        ),
    ],
    ids=["not-json", "schema", "ts-out-of-range"],
)
def test_an_unusable_batch_says_why(payload: bytes, reason: str) -> None:
    parsed = ingest.parse_batch(payload)
    assert isinstance(parsed, ingest.Unusable)
    assert reason in parsed.reason


def test_within_one_fetch_the_first_copy_of_a_batch_wins() -> None:
    first, other = batch("batch-one", record(0)), batch("batch-two", record(1))
    items = [
        ingest.Fetched(FakeMsg(b""), batch=first),
        ingest.Fetched(FakeMsg(b""), problem="bad"),
        ingest.Fetched(FakeMsg(b""), batch=other),
        ingest.Fetched(FakeMsg(b""), batch=first),
    ]
    ingest.mark_duplicates(items)
    assert [i.duplicate for i in items] == [False, False, False, True]


@pytest.mark.parametrize(
    ("attempt", "delay"), [(None, 0.5), (1, 0.5), (2, 1.0), (3, 2.0), (10, 30.0)]
)
def test_retry_delays_double_up_to_a_cap(attempt: int | None, delay: float) -> None:
    assert ingest.retry_delay(attempt, base_s=0.5) == delay


def test_insert_lag_is_measured_from_the_newest_record() -> None:
    batches = [batch("batch-lag", record(5), record(2))]
    assert ingest.newest_ts(batches) == T0 + timedelta(milliseconds=5)
    assert ingest.newest_ts([]) is None


def test_stored_batches_are_looked_up_by_bound_id_deployments_and_ts_range() -> None:
    one = batch("batch-q1", record(0), record(9, deployment_id="d-other"))
    empty = batch("batch-q2")
    query = ingest.stored_batches_query("request_metrics", [one, empty])
    assert query is not None
    sql, params = query
    assert "batch-q" not in sql and "d-other" not in sql
    assert params == {
        "b0": "batch-q1",
        "d0": ["d-other", "d-rows"],
        "lo0": 1795608000000,
        "hi0": 1795608000009,
    }
    assert ingest.stored_batches_query("request_metrics", [empty]) is None


# ---- window results -----------------------------------------------------------------------------


def test_a_role_without_requests_has_no_rate_and_no_percentiles() -> None:
    empty = queries.role_window("canary", None, [], 0)
    assert (empty.requests, empty.errors, empty.error_rate, empty.p95_ms) == (0, 0, None, None)
    assert empty.measurement() == RoleMeasurement(requests=0, errors=0)


def test_a_role_window_carries_rate_percentiles_and_sampling() -> None:
    window = queries.role_window(
        "stable", ("stable", 400, 10, [50.5, 95.05, math.nan]), [1.0, 2.0], raw_limit=2
    )
    assert window.error_rate == 0.025
    assert (window.p50_ms, window.p95_ms, window.p99_ms) == (50.5, 95.05, None)
    assert window.sampled and window.latencies_ms == (1.0, 2.0)
    assert window.measurement() == RoleMeasurement(
        requests=400, errors=10, error_rate=0.025, p50_ms=50.5, p95_ms=95.05
    )


def test_a_role_windows_ttft_p95_is_the_inclusive_percentile_of_its_ttfts() -> None:
    window = queries.role_window("canary", ("canary", 100, 0, [1.0, 2.0, 3.0]), [], 0)
    assert window.ttft_p95_ms is None and window.measurement().ttft_p95_ms is None
    streamed = replace(window, ttft_ms=tuple(float(v) for v in range(1, 101)))
    assert streamed.ttft_p95_ms == pytest.approx(95.05)  # as quantileExactInclusive: numpy's
    assert streamed.measurement().ttft_p95_ms == pytest.approx(95.05)
    assert replace(window, ttft_ms=(7.0,)).ttft_p95_ms == 7.0


@pytest.mark.parametrize("level", [0.0, 0.5, 0.95, 0.99, 1.0])
def test_the_inclusive_quantile_matches_numpy(level: float) -> None:
    np = pytest.importorskip("numpy")
    values = sorted(np.random.default_rng(3).lognormal(3, 1, 257).tolist())
    expected = float(np.percentile(values, level * 100))
    assert queries.quantile_inclusive(values, level) == pytest.approx(expected)


def test_window_times_must_carry_a_zone_and_not_be_empty() -> None:
    with pytest.raises(ValueError, match="time zone"):
        queries.window_ms(datetime(2026, 1, 1), T0)
    with pytest.raises(ValueError, match="empty window"):
        queries.window_ms(T0, T0)
    assert queries.window_ms(T0, T0 + timedelta(microseconds=1500)) == (
        1795608000000,
        1795608000001,
    )


class RecordingClient:
    """Records what a query would send; answers nothing."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.fail = fail
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def query(self, sql: str, parameters: dict[str, Any], settings: dict[str, Any]) -> Any:
        self.calls.append((sql, parameters))
        if self.fail:
            raise self.fail
        return SimpleNamespace(result_rows=[])


def test_values_are_bound_never_formatted_into_the_sql() -> None:
    client = RecordingClient()
    hostile = "d-1' OR 1=1 --"
    result = queries.query_window(
        client, "request_metrics", hostile, T0, T0 + timedelta(seconds=60), raw=True
    )
    assert result.canary.requests == 0 and result.stable.p95_ms is None
    assert len(client.calls) == 3  # counts and percentiles, latencies, times to first token
    for sql, params in client.calls:
        assert hostile not in sql and "OR 1=1" not in sql
        assert params["deployment_id"] == hostile


def test_a_failing_store_is_metrics_unavailable_never_an_empty_window() -> None:
    client = RecordingClient(fail=RuntimeError("Cannot lock file"))
    with pytest.raises(queries.MetricsUnavailable, match="Cannot lock file"):
        queries.query_window(client, "request_metrics", "d-1", T0, T0 + timedelta(seconds=1))
    with pytest.raises(queries.MetricsUnavailable):
        queries.query_series(client, "request_metrics", "d-1", T0, T0 + timedelta(seconds=1), 1)


def test_series_refuses_too_many_or_too_narrow_buckets() -> None:
    client = RecordingClient()
    with pytest.raises(ValueError, match="buckets"):
        queries.query_series(client, "t", "d-1", T0, T0 + timedelta(days=1), 1.0)
    with pytest.raises(ValueError, match="bucket_s"):
        queries.query_series(client, "t", "d-1", T0, T0 + timedelta(seconds=1), 0.0)
    assert client.calls == []


def _raw(*records: RequestRecord) -> bytes:
    return batch("batch-hostile", *records).model_dump_json().encode()


def test_an_infinite_latency_is_refused() -> None:
    """JSON's 1e400 reads as infinity; one infinite stable sample made a window's p95 unknown
    and turned the canary's latency gate off for that window."""
    payload = _raw(record(0)).replace(b'"latency_ms":0.0', b'"latency_ms":1e400')
    assert b"1e400" in payload
    parsed = ingest.parse_batch(payload)
    assert isinstance(parsed, ingest.Unusable)
    assert parsed.reason == "records.0.latency_ms: inf is not a finite number"


def test_a_record_the_ttl_would_drop_is_refused_not_lost() -> None:
    now = T0 + timedelta(days=40)
    old = _raw(record(0))  # T0: 40 days before `now`, past a 30-day TTL
    parsed = ingest.parse_batch(old, ttl_days=30, now=now)
    assert isinstance(parsed, ingest.Unusable)
    assert "older than the table's 30-day TTL" in parsed.reason
    assert not isinstance(ingest.parse_batch(old, ttl_days=60, now=now), ingest.Unusable)
    ahead = _raw(record(0, ts=now + timedelta(days=2)))
    assert isinstance(ingest.parse_batch(ahead, ttl_days=30, now=now), ingest.Unusable)


def test_a_batch_over_more_than_a_hundred_days_is_refused_at_once() -> None:
    """ClickHouse refuses an insert into more than 100 partitions (one a day): it was tried five
    times over 15 s before its dead letter."""
    spread = _raw(*(record(i, ts=T0 + timedelta(days=i)) for i in range(150)))
    parsed = ingest.parse_batch(spread)
    assert isinstance(parsed, ingest.Unusable)
    assert parsed.reason.startswith("records span 150 days")


def test_a_batch_s_days_are_counted_in_utc_as_the_table_partitions_them() -> None:
    from datetime import timezone

    utc_days = [record(i, ts=T0 + timedelta(days=i)) for i in range(100)]
    late = (T0 + timedelta(days=99)).replace(hour=23, minute=30)
    west = record(100, ts=late.astimezone(timezone(timedelta(hours=-1))).replace(hour=23))
    assert west.ts.astimezone(UTC).date() > late.date()  # its local day is one already counted
    parsed = ingest.parse_batch(_raw(*utc_days, west))
    assert isinstance(parsed, ingest.Unusable)
    assert parsed.reason.startswith("records span 101 days")
