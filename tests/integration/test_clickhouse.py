"""The request-metrics table on the real ClickHouse engine (chDB through clickhouse-connect)."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

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
        (now - timedelta(days=age), "d-ttl", "m", "1", "stable", 1.0, None, 200, "", f"b-{age}", 0)
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
