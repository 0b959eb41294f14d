"""The request-metrics table on the real ClickHouse engine (chDB through clickhouse-connect)."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from services.contracts.events import RequestMetricsBatch, RequestRecord
from services.metrics import ingest, queries
from services.runtime import clickhouse
from services.runtime.settings import Settings

pytestmark = pytest.mark.integration

_ROUND_TRIP = """
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from services.runtime import clickhouse
from services.runtime.settings import Settings

settings = Settings(data_dir=Path(sys.argv[1]))
client = clickhouse.open_client(settings)
clickhouse.ensure_metrics_table(client, settings)
if sys.argv[2] == "write":
    t0 = datetime.now(UTC) - timedelta(hours=1)  # inside the TTL
    rows = [
        (t0 + timedelta(milliseconds=i), "d-1", "m", "2", role, float(i % 100), None,
         500 if i % 50 == 0 else 200, "", "batch-1", i)
        for i, role in ((i, "canary" if i % 10 == 0 else "stable") for i in range(1000))
    ]
    columns = ["ts", "deployment_id", "model", "version", "role", "latency_ms", "ttfb_ms",
               "status", "error_kind", "batch_id", "seq"]
    client.insert(settings.metrics_table, rows, column_names=columns)
    client.insert(settings.metrics_table, rows, column_names=columns)  # a redelivered batch
result = client.query(
    "SELECT role, count(), countIf(status >= 500), quantileExact(0.95)(latency_ms) "
    "FROM request_metrics FINAL WHERE deployment_id = {d:String} GROUP BY role ORDER BY role",
    parameters={"d": "d-1"},
)
print(sorted(result.result_rows))
"""


def run(data_dir: Path, mode: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", _ROUND_TRIP, str(data_dir), mode],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_metrics_table_survives_a_reopen_and_dedups_redelivered_batches(tmp_path: Path) -> None:
    # Each step in its own process: chDB allows one owner per data path at a time.
    written = run(tmp_path, "write")
    assert written == "[('canary', 100, 20, 90.0), ('stable', 900, 0, 95.0)]"
    assert run(tmp_path, "read") == written


def test_ddl_is_idempotent_and_has_a_ttl() -> None:
    ddl = clickhouse.metrics_table_ddl("request_metrics", 7)
    assert "IF NOT EXISTS" in ddl and "INTERVAL 7 DAY" in ddl
    with pytest.raises(ValueError, match="invalid table name"):
        clickhouse.metrics_table_ddl("x; DROP TABLE y", 7)


def test_unknown_clickhouse_url_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="must be `chdb` or http"):
        clickhouse.open_client(Settings(clickhouse_url="tcp://host:9000"))


def test_the_engine_keeps_the_key_partitions_and_ttl(chdb_client: Any) -> None:
    chdb_client.command(clickhouse.metrics_table_ddl("metrics_ddl_check", 7))
    shown = str(chdb_client.command("SHOW CREATE TABLE metrics_ddl_check"))
    assert "ReplacingMergeTree" in shown
    assert "PARTITION BY toYYYYMMDD(ts)" in shown
    assert "ORDER BY (deployment_id, role, ts, batch_id, seq)" in shown
    assert "toIntervalDay(7)" in shown


def test_rows_past_the_ttl_are_dropped(chdb_client: Any) -> None:
    table = "metrics_ttl_check"
    chdb_client.command(clickhouse.metrics_table_ddl(table, 30))
    now = datetime.now(UTC)
    rows = [
        (
            now - timedelta(days=age),
            "d-ttl",
            "m",
            "1",
            "stable",
            1.0,
            None,
            None,
            None,
            None,
            200,
            "",
            False,
            f"b-{age}",
            0,
        )
        for age in (40, 31, 1, 0)
    ]
    chdb_client.insert(table, rows, column_names=list(clickhouse.METRICS_COLUMNS))
    chdb_client.command(f"OPTIMIZE TABLE {table} FINAL")
    kept = chdb_client.query(f"SELECT batch_id FROM {table} ORDER BY batch_id").result_rows  # noqa: S608
    assert kept == [("b-0",), ("b-1",)]


@pytest.mark.parametrize("name", ["", "1table", "a-b", "x; DROP TABLE y", "t" * 65])
def test_only_plain_identifiers_are_table_names(name: str) -> None:
    with pytest.raises(ValueError, match="invalid table name"):
        clickhouse.check_table_name(name)


# ---- time to first token, inter-token latency, output tokens ----------------------------------


def streamed_records(t0: datetime) -> list[RequestRecord]:
    """40 requests; the first 30 streamed (TTFT: canary 3x the stable's), the rest plain."""
    out = []
    for i in range(40):
        role = "canary" if i % 2 else "stable"
        streamed = i < 30
        out.append(
            RequestRecord(
                ts=t0 + timedelta(milliseconds=10 * i),
                deployment_id="d-tokens",
                model="m",
                version="2" if role == "canary" else "1",
                role=role,
                latency_ms=400.0 + i,
                ttft_ms=(i + 1) * (3.0 if role == "canary" else 1.0) if streamed else None,
                itl_ms=2.5 if streamed else None,
                output_tokens=i + 1 if streamed else None,
                status=200,
            )
        )
    return out


def test_token_columns_round_trip_and_the_window_reads_ttft(chdb_client: Any) -> None:
    table = "metrics_tokens_check"
    chdb_client.command(f"DROP TABLE IF EXISTS {table}")
    chdb_client.command(clickhouse.metrics_table_ddl(table, 30))
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    records = streamed_records(t0)
    batch = RequestMetricsBatch(batch_id="batch-tokens", source="test", records=tuple(records))
    chdb_client.insert_arrow(table, ingest.to_arrow([batch]))
    chdb_client.insert_arrow(table, ingest.to_arrow([batch]))  # redelivered: FINAL counts once

    stored = chdb_client.query(
        f"SELECT ttft_ms, itl_ms, output_tokens FROM {table} FINAL ORDER BY seq"  # noqa: S608
    ).result_rows
    assert stored == [(r.ttft_ms, r.itl_ms, r.output_tokens) for r in records]

    end = t0 + timedelta(minutes=1)
    window = queries.query_window(chdb_client, table, "d-tokens", t0, end, raw=True)
    canary = sorted(r.ttft_ms for r in records if r.role == "canary" and r.ttft_ms is not None)
    stable = sorted(r.ttft_ms for r in records if r.role == "stable" and r.ttft_ms is not None)
    assert window.canary.ttft_ms == tuple(canary) and len(canary) == 15
    assert window.stable.ttft_ms == tuple(stable)
    assert (window.canary.requests, window.stable.requests) == (20, 20)  # plain ones count too
    ttft_p95 = chdb_client.query(
        f"SELECT role, quantileExactInclusive(0.95)(ttft_ms) FROM {table} FINAL "  # noqa: S608
        "GROUP BY role"
    ).result_rows
    for role, p95 in ttft_p95:
        assert window.role(role).measurement().ttft_p95_ms == pytest.approx(p95)
    assert window.canary.measurement().ttft_p95_ms == pytest.approx(85.8)  # 6, 12, .., 90

    plain = queries.query_window(chdb_client, table, "d-tokens", t0, end)
    assert plain.canary.ttft_ms == () and plain.canary.measurement().ttft_p95_ms is None
    sample = queries.query_window(chdb_client, table, "d-tokens", t0, end, raw=True, raw_limit=4)
    assert len(sample.canary.ttft_ms) == 4 and set(sample.canary.ttft_ms) <= set(canary)
    again = queries.query_window(chdb_client, table, "d-tokens", t0, end, raw=True, raw_limit=4)
    assert again.canary.ttft_ms == sample.canary.ttft_ms  # the same sample every time

    # The last 10 requests (100 ms from 300 ms on) are plain: their buckets have no TTFT p95.
    points = queries.query_series(chdb_client, table, "d-tokens", t0, end, 0.1)
    by_bucket = {(p["start"], p["role"]): p["ttft_p95_ms"] for p in points}
    assert by_bucket[(t0, "canary")] == pytest.approx(
        queries.quantile_inclusive([3.0 * (i + 1) for i in range(1, 10, 2)], 0.95)
    )
    assert by_bucket[(t0 + timedelta(milliseconds=300), "stable")] is None
    assert sum(p["requests"] for p in points) == 40


def test_a_table_from_an_older_version_gets_the_new_columns(chdb_client: Any) -> None:
    table = "metrics_upgrade_check"
    chdb_client.command(f"DROP TABLE IF EXISTS {table}")
    old = clickhouse.metrics_table_ddl(table, 30)
    for name, kind, _ in clickhouse.ADDED_COLUMNS:
        old = old.replace(f"{name} {kind},", "")
    chdb_client.command(old)
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    chdb_client.insert(
        table,
        [(t0, "d-up", "m", "1", "stable", 5.0, None, 200, "", "b-old", 0)],
        column_names=[
            c
            for c in clickhouse.METRICS_COLUMNS
            if c not in {name for name, _, _ in clickhouse.ADDED_COLUMNS}
        ],
    )
    settings = Settings(metrics_table=table)
    clickhouse.ensure_metrics_table(chdb_client, settings)
    clickhouse.ensure_metrics_table(chdb_client, settings)  # current: nothing to do
    columns = chdb_client.query(
        "SELECT name, type FROM system.columns WHERE database = currentDatabase() "
        "AND table = {t:String} ORDER BY position",
        parameters={"t": table},
    ).result_rows
    assert tuple(name for name, _ in columns) == clickhouse.METRICS_COLUMNS
    assert dict(columns)["output_tokens"] == "Nullable(UInt32)"
    new = streamed_records(t0)[:2]
    batch = RequestMetricsBatch(batch_id="batch-new", source="test", records=tuple(new))
    chdb_client.insert_arrow(table, ingest.to_arrow([batch]))
    rows = chdb_client.query(
        f"SELECT batch_id, ttft_ms, output_tokens, pinned FROM {table} "  # noqa: S608
        "ORDER BY batch_id, seq"
    ).result_rows
    assert rows == [
        ("b-old", None, None, False),
        ("batch-new", 1.0, 1, False),
        ("batch-new", 6.0, 2, False),
    ]
    assert clickhouse.missing_columns_sql(table, set(clickhouse.METRICS_COLUMNS)) is None
