"""Request records buffered in memory and published in batches; a slow bus never blocks a request.

Any gateway can reuse `MetricsPublisher`: call `record()` (synchronous, never awaits the bus) for
each request, run `run()` as a background task, and `close()` on shutdown.

    record() -> pending deque (bounded) --every interval or N records--> batch --publish-->
                                  ^ full: drop + count             failure: keep the batch (same
                                                                    batch_id), retry with backoff
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry, Counter, Gauge

from services.contracts import subjects
from services.contracts.events import RequestMetricsBatch, RequestRecord
from services.runtime import aio, bus
from services.runtime.settings import Settings

log = logging.getLogger("preflight.router.metrics")


class BatchSink(Protocol):
    """Where batches go. Raising means "not stored": the batch is kept and retried."""

    async def publish(self, subject: str, payload: bytes, batch_id: str) -> None: ...


@dataclass
class JetStreamSink:
    """JetStream publish to the metrics stream; `Nats-Msg-Id` = batch id makes retries harmless."""

    js: JetStreamContext
    timeout_s: float = 2.0

    async def publish(self, subject: str, payload: bytes, batch_id: str) -> None:
        await self.js.publish(
            subject,
            payload,
            timeout=self.timeout_s,
            stream=subjects.METRICS_STREAM,
            headers={bus.MSG_ID_HEADER: batch_id, **bus.CONTENT_TYPE},
        )


@dataclass(frozen=True)
class PublisherConfig:
    source: str
    batch_max_records: int = 500
    interval_s: float = 0.2
    buffer_max_records: int = 50_000
    retry_initial_s: float = 0.1
    retry_max_s: float = 5.0
    close_timeout_s: float = 5.0

    @classmethod
    def from_settings(cls, settings: Settings) -> PublisherConfig:
        return cls(
            source=settings.instance,
            batch_max_records=settings.metrics_batch_max_records,
            interval_s=settings.metrics_batch_interval_s,
            buffer_max_records=settings.metrics_buffer_max_records,
        )


def batch_json(batch_id: str, source: str, records: list[RequestRecord | bytes]) -> bytes:
    """The `RequestMetricsBatch` JSON of `records`; encoded ones are spliced into the batch's own
    JSON (its `records` array left empty by pydantic, then filled) instead of parsed again."""
    if not any(isinstance(r, bytes) for r in records):
        objects = tuple(r for r in records if isinstance(r, RequestRecord))
        batch = RequestMetricsBatch(batch_id=batch_id, source=source, records=objects)
        return batch.model_dump_json().encode()
    empty = RequestMetricsBatch(batch_id=batch_id, source=source, records=()).model_dump_json()
    if not empty.endswith('"records":[]}'):  # field order changed: splice point gone
        raise AssertionError("RequestMetricsBatch must end with its records")
    parts = [r if isinstance(r, bytes) else r.model_dump_json().encode() for r in records]
    return b"".join((empty[:-2].encode(), b",".join(parts), b"]}"))


@dataclass
class _Pending:
    """A batch built and serialised once; retried with the same id until stored."""

    batch_id: str
    payload: bytes
    size: int
    attempts: int = 0


class PublisherMetrics:
    """Prometheus series of the publisher, on the registry the gateway exposes."""

    def __init__(self, registry: CollectorRegistry, prefix: str = "preflight_router") -> None:
        self.dropped = Counter(
            f"{prefix}_metrics_dropped",
            "Request records dropped: the buffer was full (bus slow or absent) or shut down.",
            registry=registry,
        )
        self.published = Counter(
            f"{prefix}_metrics_published_records",
            "Request records stored in the metrics stream.",
            registry=registry,
        )
        self.batches = Counter(
            f"{prefix}_metrics_batches", "Batches stored in the metrics stream.", registry=registry
        )
        self.failures = Counter(
            f"{prefix}_metrics_publish_failures",
            "Batch publishes that failed or timed out (each is retried).",
            registry=registry,
        )
        self.buffered = Gauge(
            f"{prefix}_metrics_buffered",
            "Request records held in memory, not yet stored.",
            registry=registry,
        )


@dataclass
class MetricsPublisher:
    """Bounded buffer of request records plus the task that publishes them in batches."""

    sink: BatchSink
    config: PublisherConfig
    prom: PublisherMetrics
    clock: Callable[[], float] = time.monotonic
    _records: deque[RequestRecord | bytes] = field(default_factory=deque)
    _unsent: _Pending | None = None
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _closing: bool = False
    dropped: int = 0
    published: int = 0
    last_error: str | None = None

    @property
    def subject(self) -> str:
        return subjects.metrics(self.config.source)

    @property
    def buffered(self) -> int:
        """Records in memory: waiting plus the batch being retried."""
        return len(self._records) + (self._unsent.size if self._unsent else 0)

    def record(self, rec: RequestRecord | bytes) -> bool:
        """Keep one record for the next batch; False (and counted) when the buffer is full.

        `bytes` is a record already encoded as `RequestRecord`'s JSON (the Envoy receiver's hot
        path, services/envoy/access_log.RecordEncoder): spliced into the batch as it is."""
        if self._closing or self.buffered >= self.config.buffer_max_records:
            self.drop(1)
            return False
        self._records.append(rec)
        self.prom.buffered.set(self.buffered)
        if len(self._records) >= self.config.batch_max_records:
            self._wake.set()
        return True

    def drop(self, n: int) -> None:
        """Count records lost (buffer full, shut down, or a gateway could not build one)."""
        self.dropped += n
        self.prom.dropped.inc(n)

    def _next_batch(self) -> _Pending | None:
        if self._unsent is not None:
            return self._unsent
        if not self._records:
            return None
        n = min(len(self._records), self.config.batch_max_records)
        taken = [self._records.popleft() for _ in range(n)]
        batch_id = uuid.uuid4().hex
        self._unsent = _Pending(batch_id, batch_json(batch_id, self.config.source, taken), n)
        return self._unsent

    async def flush_once(self) -> bool:
        """Publish one batch if there is one; False if it failed (it stays for a retry)."""
        pending = self._next_batch()
        if pending is None:
            return True
        pending.attempts += 1
        try:
            await self.sink.publish(self.subject, pending.payload, pending.batch_id)
        except Exception as exc:  # any failure: keep the batch, nothing is lost yet
            self.prom.failures.inc()
            self.last_error = f"{type(exc).__name__}: {exc}"
            if pending.attempts == 1 or pending.attempts % 20 == 0:
                log.warning(
                    "metrics batch %s (%d records) not stored (attempt %d): %s; retrying",
                    pending.batch_id,
                    pending.size,
                    pending.attempts,
                    self.last_error,
                )
            return False
        self._unsent = None
        self.published += pending.size
        self.last_error = None
        self.prom.published.inc(pending.size)
        self.prom.batches.inc()
        self.prom.buffered.set(self.buffered)
        return True

    async def run(self) -> None:
        """Flush every interval, or as soon as a full batch is waiting; retry with backoff."""
        backoff = self.config.retry_initial_s
        while True:
            if self._unsent is None and len(self._records) < self.config.batch_max_records:
                self._wake.clear()
                await aio.wait_event(self._wake, self.config.interval_s)
            ok = await self.flush_once()
            while ok and len(self._records) >= self.config.batch_max_records:
                ok = await self.flush_once()
            if ok:
                backoff = self.config.retry_initial_s
            else:
                await aio.sleep(backoff)
                backoff = min(backoff * 2, self.config.retry_max_s)

    async def close(self) -> None:
        """Stop taking records and publish what is left within `close_timeout_s`; the rest is
        dropped and counted."""
        self._closing = True
        deadline = self.clock() + self.config.close_timeout_s
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.close_timeout_s):
                while self.buffered and self.clock() < deadline:
                    if not await self.flush_once():
                        await asyncio.sleep(self.config.retry_initial_s)
        left = self.buffered
        if left:
            log.warning("shutting down with %d request records not stored: dropped", left)
            self._records.clear()
            self._unsent = None
            self.drop(left)
        self.prom.buffered.set(0)
