"""ClickHouse through clickhouse-connect: chDB in-process (embedded, tests) or HTTP server."""

from __future__ import annotations

import re
from typing import Any, Final
from urllib.parse import urlparse

import clickhouse_connect

from services.runtime.settings import Settings

# Insert order of the request-metrics columns (services/metrics/ingest.py builds them).
METRICS_COLUMNS: Final = (
    "ts",
    "deployment_id",
    "model",
    "version",
    "role",
    "latency_ms",
    "ttfb_ms",
    "ttft_ms",
    "itl_ms",
    "output_tokens",
    "status",
    "error_kind",
    "pinned",
    "batch_id",
    "seq",
)

# Columns added after the table's first layout: (name, type, the column it follows). A table made
# by an older version gets them from `ensure_metrics_table` (ALTER TABLE ... ADD COLUMN).
ADDED_COLUMNS: Final = (
    ("ttft_ms", "Nullable(Float64)", "ttfb_ms"),
    ("itl_ms", "Nullable(Float64)", "ttft_ms"),
    ("output_tokens", "Nullable(UInt32)", "itl_ms"),
    ("pinned", "Bool DEFAULT false", "error_kind"),
)

_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


class MetricsStoreLocked(RuntimeError):
    """Another process owns the chDB data path (chDB allows one process per path)."""


def check_table_name(table: str) -> str:
    """A table name safe to place in SQL (identifiers cannot be bound as parameters)."""
    if not _TABLE_NAME.fullmatch(table):
        raise ValueError(f"invalid table name {table!r}")
    return table


def open_client(settings: Settings) -> Any:
    """A clickhouse-connect client that threads may share.

    chDB allows one owning process per data path; a second process gets `MetricsStoreLocked`.
    """
    url = settings.clickhouse_url
    if url == "chdb":
        path = settings.chdb_path()
        path.mkdir(parents=True, exist_ok=True)
        try:
            return clickhouse_connect.get_client(interface="chdb", path=str(path))
        except Exception as exc:
            if "lock" in str(exc).lower():
                raise MetricsStoreLocked(
                    f"chDB data path {path} is open in another process (one owner per path; "
                    "in the embedded stack the canary controller owns it and runs the ingest)"
                ) from exc
            raise
    parts = urlparse(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"PREFLIGHT_CLICKHOUSE_URL must be `chdb` or http(s)://..., got {url!r}")
    return clickhouse_connect.get_client(
        interface=parts.scheme,
        host=parts.hostname or "localhost",
        port=parts.port or (8443 if parts.scheme == "https" else 8123),
        username=parts.username or "default",
        password=parts.password or "",
        database=parts.path.lstrip("/") or "default",
        # No HTTP session: one client is shared by the ingest thread and the query threads, and
        # ClickHouse refuses concurrent queries within one session.
        autogenerate_session_id=False,
    )


def metrics_table_ddl(table: str, ttl_days: int) -> str:
    """Request metrics, ordered for the controller's per-deployment, per-role window queries.

    ReplacingMergeTree with (batch_id, seq) at the end of the sorting key: a redelivered batch
    writes rows with the same key as the first delivery, so merges collapse them and queries
    read `FINAL` (docs/metrics.md has the measured cost). Daily partitions let the TTL drop
    whole parts instead of rewriting them; a duplicate always lands in the same partition as
    its original (same ts), so FINAL never has to merge across partitions.
    """
    check_table_name(table)
    return f"""
        CREATE TABLE IF NOT EXISTS {table} (
            ts DateTime64(3, 'UTC'),
            deployment_id LowCardinality(String),
            model LowCardinality(String),
            version LowCardinality(String),
            role Enum8('stable' = 1, 'canary' = 2),
            latency_ms Float64,
            ttfb_ms Nullable(Float64),
            ttft_ms Nullable(Float64),
            itl_ms Nullable(Float64),
            output_tokens Nullable(UInt32),
            status UInt16,
            error_kind LowCardinality(String),
            pinned Bool DEFAULT false,
            batch_id String,
            seq UInt32
        )
        ENGINE = ReplacingMergeTree
        PARTITION BY toYYYYMMDD(ts)
        ORDER BY (deployment_id, role, ts, batch_id, seq)
        TTL toDateTime(ts) + INTERVAL {int(ttl_days)} DAY
        SETTINGS ttl_only_drop_parts = 1
    """


def missing_columns_sql(table: str, present: set[str]) -> str | None:
    """The ALTER that gives a table from an older version the columns added since, or None."""
    missing = [
        f"ADD COLUMN IF NOT EXISTS {name} {kind} AFTER {after}"
        for name, kind, after in ADDED_COLUMNS
        if name not in present
    ]
    return f"ALTER TABLE {check_table_name(table)} {', '.join(missing)}" if missing else None


def ensure_metrics_table(client: Any, settings: Settings) -> None:
    """Create the table, or bring one an older version created up to date (new columns are
    nullable: its old rows read NULL there). The ALTER runs only when a column is missing, so
    a user without ALTER rights is fine once the table is current."""
    table = settings.metrics_table
    client.command(metrics_table_ddl(table, settings.metrics_ttl_days))
    present = {
        str(row[0])
        for row in client.query(
            "SELECT name FROM system.columns WHERE database = currentDatabase() "
            "AND table = {table:String}",
            parameters={"table": table},
        ).result_rows
    }
    alter = missing_columns_sql(table, present)
    if alter is not None:
        client.command(alter)
