"""Envoy's gRPC access-log service (`envoy.service.accesslog.v3.AccessLogService`), received by
preflight: every HTTP entry becomes a request record, batched onto the bus by the same
`MetricsPublisher` the built-in router uses (services/router/metrics.py).

    Envoy --StreamAccessLogs (a stream per worker, entries every flush interval)--> receiver
      entry --access_log.RecordEncoder--> a record's JSON --publisher--> preflight.metrics.<source>
            `-- not a record: counted by reason, logged once per reason; the stream goes on

    running = await start_receiver(JetStreamSink(js), PublisherConfig(source="envoy-host"),
                                   host="127.0.0.1", port=0)
    running.port ... await running.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc  # type: ignore[import-untyped]
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc  # type: ignore[import-untyped]
from prometheus_client import CollectorRegistry, Counter, Gauge

from services.envoy.access_log import RecordEncoder, Unmapped
from services.router.metrics import BatchSink, MetricsPublisher, PublisherConfig, PublisherMetrics

log = logging.getLogger("preflight.envoy.receiver")

PROM_PREFIX = "preflight_envoy_receiver"


class ReceiverMetrics:
    """The receiver's Prometheus series (the publisher's are beside them, same prefix)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.records = Counter(
            f"{PROM_PREFIX}_records",
            "Access-log entries turned into request records.",
            registry=registry,
        )
        self.unmapped = Counter(
            f"{PROM_PREFIX}_unmapped",
            "Access-log entries that are no request record, by reason (local_reply: Envoy "
            "answered itself; missing_header, bad_role, no_start_time, no_timing, "
            "invalid_record, tcp_entry, error).",
            ["reason"],
            registry=registry,
        )
        self.messages = Counter(
            f"{PROM_PREFIX}_messages", "StreamAccessLogs messages received.", registry=registry
        )
        self.streams = Gauge(
            f"{PROM_PREFIX}_streams",
            "Open access-log streams (one per Envoy worker).",
            registry=registry,
        )


@dataclass
class AccessLogReceiver:
    """The servicer: `StreamAccessLogs` is what Envoy calls (registered without subclassing
    the generated base, which has no types)."""

    publisher: MetricsPublisher
    prom: ReceiverMetrics
    records: int = 0
    unmapped: dict[str, int] = field(default_factory=dict)
    streams_seen: int = 0
    encoder: RecordEncoder = field(default_factory=RecordEncoder)

    def take(self, entry: Any) -> None:
        """One HTTP entry: a record for the publisher, or counted (logged once per reason)."""
        try:
            mapped = self.encoder.encode(entry)
        except Exception as exc:  # a shape no field check foresaw: count it, keep the stream
            mapped = Unmapped("error", f"{type(exc).__name__}: {exc}")
        if isinstance(mapped, Unmapped):
            self.count_unmapped(mapped)
            return
        self.records += 1
        self.prom.records.inc()
        self.publisher.record(mapped)

    def count_unmapped(self, why: Unmapped, n: int = 1) -> None:
        first = why.reason not in self.unmapped
        self.unmapped[why.reason] = self.unmapped.get(why.reason, 0) + n
        self.prom.unmapped.labels(why.reason).inc(n)
        if first:
            level = logging.DEBUG if why.reason == "local_reply" else logging.WARNING
            log.log(
                level,
                "access-log entry not recorded (%s): %s; further ones are only counted",
                why.reason,
                why.detail,
            )

    async def StreamAccessLogs(self, request_iterator: AsyncIterator[Any], context: Any) -> Any:
        self.streams_seen += 1
        self.prom.streams.inc()
        try:
            async for message in request_iterator:
                self.prom.messages.inc()
                if message.HasField("http_logs"):
                    for entry in message.http_logs.log_entry:
                        self.take(entry)
                elif message.HasField("tcp_logs"):
                    n = len(message.tcp_logs.log_entry)
                    if n:
                        self.count_unmapped(Unmapped("tcp_entry", "a TCP proxy's entry"), n)
        finally:
            self.prom.streams.dec()
        return als_pb2.StreamAccessLogsResponse()


@dataclass
class RunningReceiver:
    """A started gRPC server with its receiver and the publisher task."""

    server: Any
    receiver: AccessLogReceiver
    publisher: MetricsPublisher
    registry: CollectorRegistry
    task: asyncio.Task[None]
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def close(self, grace_s: float = 1.0) -> None:
        """Stop taking streams, then publish what is buffered (MetricsPublisher.close)."""
        await self.server.stop(grace_s)
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task
        await self.publisher.close()


async def start_receiver(
    sink: BatchSink,
    config: PublisherConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    registry: CollectorRegistry | None = None,
) -> RunningReceiver:
    """Serve the access-log service on host:port (0: a free port, read back as `.port`)."""
    registry = registry or CollectorRegistry()
    publisher = MetricsPublisher(
        sink=sink, config=config, prom=PublisherMetrics(registry, prefix=PROM_PREFIX)
    )
    receiver = AccessLogReceiver(publisher, ReceiverMetrics(registry))
    # No SO_REUSEPORT: a port already taken must fail here, not share the traffic silently.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(receiver, server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as exc:
        raise OSError(f"access-log receiver cannot listen on {host}:{port}: {exc}") from exc
    if not bound:
        raise OSError(f"access-log receiver cannot listen on {host}:{port}")
    await server.start()
    task = asyncio.create_task(publisher.run(), name="envoy-receiver-metrics")
    log.info("Envoy access-log receiver on %s:%d publishing to %s", host, bound, publisher.subject)
    return RunningReceiver(server, receiver, publisher, registry, task, host, int(bound))
