"""ClickHouse through clickhouse-connect: chDB in-process (embedded, tests) or HTTP server."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

import clickhouse_connect

from services.runtime.settings import Settings


def open_client(settings: Settings) -> Any:
    """A clickhouse-connect client. chDB allows one owning process per data path."""
    url = settings.clickhouse_url
    if url == "chdb":
        path = settings.chdb_path()
        path.mkdir(parents=True, exist_ok=True)
        return clickhouse_connect.get_client(interface="chdb", path=str(path))
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
    )


def metrics_table_ddl(table: str, ttl_days: int) -> str:
    """Request metrics, ordered for the controller's per-deployment, per-role window queries.

    ReplacingMergeTree on (batch_id, seq) in the key makes a redelivered batch collapse into the
    rows it already wrote.
    """
    if not table.replace("_", "").isalnum():
        raise ValueError(f"invalid table name {table!r}")
    return f"""
        CREATE TABLE IF NOT EXISTS {table} (
            ts DateTime64(3, 'UTC'),
            deployment_id LowCardinality(String),
            model LowCardinality(String),
            version LowCardinality(String),
            role Enum8('stable' = 1, 'canary' = 2),
            latency_ms Float64,
            ttfb_ms Nullable(Float64),
            status UInt16,
            error_kind LowCardinality(String),
            batch_id String,
            seq UInt32
        )
        ENGINE = ReplacingMergeTree
        ORDER BY (deployment_id, role, ts, batch_id, seq)
        TTL toDateTime(ts) + INTERVAL {int(ttl_days)} DAY
    """


def ensure_metrics_table(client: Any, settings: Settings) -> None:
    client.command(metrics_table_ddl(settings.metrics_table, settings.metrics_ttl_days))
