"""The metrics publisher: batching, the bound, retries with the same batch id, flush on close."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry

from services.contracts import subjects
from services.contracts.events import RequestMetricsBatch, RequestRecord
from services.router.metrics import MetricsPublisher, PublisherConfig, PublisherMetrics


def record(i: int = 0) -> RequestRecord:
    return RequestRecord(
        ts=datetime(2026, 11, 25, tzinfo=UTC),
        deployment_id="d-canary",
        model="org/m",
        version="2",
        role="canary" if i % 2 else "stable",
        latency_ms=1.0 + i,
        status=200,
    )


@dataclass
class FakeSink:
    """Stores batches; fails the first `failures` publishes; `hang` makes publishes never end."""

    failures: int = 0
    hang: bool = False
    calls: list[str] = field(default_factory=list)
    stored: list[RequestMetricsBatch] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    called: asyncio.Event = field(default_factory=asyncio.Event)

    async def publish(self, subject: str, payload: bytes, batch_id: str) -> None:
        self.calls.append(batch_id)
        self.called.set()
        if self.hang:
            await asyncio.Event().wait()
        if self.failures > 0:
            self.failures -= 1
            raise TimeoutError("no ack")
        batch = RequestMetricsBatch.model_validate_json(payload)
        assert batch.batch_id == batch_id and subject == "preflight.metrics.gw_1"
        self.stored.append(batch)
        self.arrived.set()


def publisher(sink: FakeSink, **config: float) -> tuple[MetricsPublisher, CollectorRegistry]:
    registry = CollectorRegistry()
    settings = {
        "batch_max_records": 3,
        "interval_s": 3600.0,
        "buffer_max_records": 10,
        "retry_initial_s": 0.001,
        "retry_max_s": 0.002,
        "close_timeout_s": 0.05,
        **config,
    }
    cfg = PublisherConfig(source="gw.1", **settings)  # type: ignore[arg-type]
    return MetricsPublisher(sink, cfg, PublisherMetrics(registry)), registry


@contextlib.asynccontextmanager
async def running(pub: MetricsPublisher) -> AsyncIterator[None]:
    task = asyncio.create_task(pub.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_batches_hold_at_most_the_max_and_keep_order() -> None:
    sink = FakeSink()
    pub, _ = publisher(sink)
    for i in range(7):
        assert pub.record(record(i))
    while pub.buffered:
        assert await pub.flush_once()
    assert [len(b.records) for b in sink.stored] == [3, 3, 1]
    assert [r.latency_ms for b in sink.stored for r in b.records] == [1.0 + i for i in range(7)]
    assert {b.source for b in sink.stored} == {"gw.1"}
    assert len({b.batch_id for b in sink.stored}) == 3
    assert pub.published == 7 and pub.dropped == 0


async def test_a_full_batch_is_sent_at_once_without_waiting_for_the_interval() -> None:
    sink = FakeSink()
    pub, _ = publisher(sink)  # interval: an hour
    async with running(pub):
        for i in range(3):
            pub.record(record(i))
        await asyncio.wait_for(sink.arrived.wait(), 2.0)
    assert len(sink.stored[0].records) == 3


async def test_a_partial_batch_is_sent_when_the_interval_passes() -> None:
    sink = FakeSink()
    pub, _ = publisher(sink, interval_s=0.01)
    async with running(pub):
        pub.record(record())
        await asyncio.wait_for(sink.arrived.wait(), 2.0)
    assert len(sink.stored[0].records) == 1


async def test_a_failed_publish_is_retried_with_the_same_batch_id() -> None:
    sink = FakeSink(failures=2)
    pub, registry = publisher(sink)
    async with running(pub):
        for i in range(3):
            pub.record(record(i))
        await asyncio.wait_for(sink.arrived.wait(), 2.0)
    assert len(sink.calls) == 3 and len(set(sink.calls)) == 1
    assert sink.stored[0].batch_id == sink.calls[0]
    assert registry.get_sample_value("preflight_router_metrics_publish_failures_total") == 2
    assert registry.get_sample_value("preflight_router_metrics_published_records_total") == 3
    assert pub.last_error is None


def test_recording_never_waits_and_drops_beyond_the_bound() -> None:
    sink = FakeSink(hang=True)
    pub, registry = publisher(sink)
    accepted = [pub.record(record(i)) for i in range(25)]  # synchronous: no event loop needed
    assert accepted == [True] * 10 + [False] * 15
    assert pub.dropped == 15 and pub.buffered == 10
    assert registry.get_sample_value("preflight_router_metrics_dropped_total") == 15
    assert registry.get_sample_value("preflight_router_metrics_buffered") == 10


async def test_a_batch_being_retried_counts_against_the_bound() -> None:
    sink = FakeSink(failures=1_000_000)
    pub, _ = publisher(sink)
    for i in range(3):
        pub.record(record(i))
    assert not await pub.flush_once()  # the batch stays, same id next time
    assert pub.buffered == 3
    accepted = sum(pub.record(record(i)) for i in range(10))
    assert accepted == 7 and pub.dropped == 3


async def test_a_hanging_bus_does_not_block_recording() -> None:
    sink = FakeSink(hang=True)
    pub, _ = publisher(sink, interval_s=0.001)
    async with running(pub):
        for i in range(3):
            pub.record(record(i))
        await asyncio.wait_for(sink.called.wait(), 2.0)
        # The publish is stuck; recording still returns at once and stays bounded.
        results = [pub.record(record(i)) for i in range(20)]
    assert results.count(True) == 7 and pub.dropped == 13


async def test_close_flushes_what_is_left() -> None:
    sink = FakeSink()
    pub, _ = publisher(sink)
    for i in range(5):
        pub.record(record(i))
    await pub.close()
    assert sum(len(b.records) for b in sink.stored) == 5
    assert pub.buffered == 0 and pub.dropped == 0
    assert not pub.record(record())  # closed: counted, not kept
    assert pub.dropped == 1


async def test_close_gives_up_in_bounded_time_and_counts_what_it_lost() -> None:
    sink = FakeSink(hang=True)
    pub, registry = publisher(sink, close_timeout_s=0.05)
    for i in range(5):
        pub.record(record(i))
    await asyncio.wait_for(pub.close(), 2.0)
    assert pub.dropped == 5 and pub.buffered == 0
    assert registry.get_sample_value("preflight_router_metrics_dropped_total") == 5


def test_the_subject_is_the_sources_metrics_subject() -> None:
    pub, _ = publisher(FakeSink())
    assert pub.subject == subjects.metrics("gw.1") == "preflight.metrics.gw_1"
