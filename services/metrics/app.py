"""metrics-ingest service: the standalone ingest for production (ClickHouse over HTTP).

In the embedded stack the canary controller runs the same loop in its own process instead,
because chDB allows one process per data path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from typing import Any

from services.metrics.ingest import IngestStats, run_ingest
from services.runtime import bus, clickhouse
from services.runtime.service import ServiceApp, build_service
from services.runtime.settings import Settings

NAME = "metrics-ingest"
log = logging.getLogger(f"preflight.{NAME}")


def _stop_if_died(task: asyncio.Task[None]) -> None:
    """The ingest is this service's only work: if it dies, stop, so the process is restarted
    (compose `restart`, a Deployment, the embedded supervisor) instead of idling healthy."""
    if task.cancelled() or task.exception() is None:
        return
    exc = task.exception()
    log.error("metrics ingest stopped: %s: %s; stopping the service", type(exc).__name__, exc)
    os.kill(os.getpid(), signal.SIGTERM)


def build(
    settings: Settings,
    *,
    stats: IngestStats | None = None,
    on_insert: Callable[[IngestStats], object] | None = None,
) -> ServiceApp:
    """A service with no FastStream handler: its work is the raw pull loop of `run_ingest`.

    The loop is a plain nats-py pull on the durable consumer (one insert per fetch), which a
    per-message FastStream handler cannot express; FastStream still gives it the same start,
    topology and shutdown as every other service. `stats` is filled while it runs.
    """
    svc = build_service(NAME, settings)
    stats = stats if stats is not None else IngestStats()
    stop = asyncio.Event()
    state: dict[str, Any] = {}

    @svc.app.on_startup  # after the topology hook: the consumer exists
    async def start_ingest() -> None:
        if settings.clickhouse_url == "chdb":
            log.warning(
                "metrics-ingest with the embedded engine: the canary controller must not run "
                "on the same data path (in the embedded stack it runs the ingest itself)"
            )

        def create() -> Any:
            client = clickhouse.open_client(settings)
            clickhouse.ensure_metrics_table(client, settings)
            return client

        client = await asyncio.to_thread(create)
        nc = await bus.connect(settings, f"preflight-{NAME}-{settings.instance}", reconnect=True)
        state.update(client=client, nc=nc)
        task = asyncio.create_task(
            run_ingest(nc.jetstream(), client, settings, stop, on_insert, stats=stats), name=NAME
        )
        task.add_done_callback(_stop_if_died)
        state["task"] = task
        log.info("metrics ingest into %s started", settings.metrics_table)

    @svc.app.after_shutdown
    async def stop_ingest() -> None:
        stop.set()
        task = state.get("task")
        if task is not None:
            await asyncio.wait([task], timeout=10)
            task.cancel()
        nc = state.get("nc")
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.drain()
        client = state.get("client")
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(client.close)

    return svc
