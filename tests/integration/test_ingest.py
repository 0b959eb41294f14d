"""Metric batches from a real JetStream stream into the real ClickHouse engine, and back out.

chDB opens one data path per process, so every test shares the session's `chdb_client`
(tests/conftest.py) and keeps apart by table name.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import itertools
import json
import secrets
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from faststream.nats import TestApp
from nats.js import JetStreamContext

from services.contracts import subjects
from services.contracts.events import DeadLetter, RequestMetricsBatch, RequestRecord
from services.metrics import app as ingest_app
from services.metrics import ingest, queries
from services.runtime import bus, clickhouse
from services.runtime.settings import Settings
from tests.dead_letters import sized_dead_letters
from tests.inbox_replay import aim_push_consumers

pytestmark = pytest.mark.integration

# Inside the TTL, so the engine keeps the rows; whole milliseconds, as DateTime64(3) stores.
T0 = (datetime.now(UTC) - timedelta(hours=1)).replace(microsecond=0)
_TABLES = itertools.count()


def new_table(client: Any) -> str:
    table = f"metrics_{secrets.token_hex(3)}_{next(_TABLES)}"
    client.command(clickhouse.metrics_table_ddl(table, 30))
    return table


def rec(
    i: int,
    role: str,
    latency: float,
    status: int = 200,
    error_kind: str | None = None,
    deployment_id: str = "d-ingest-1",
) -> RequestRecord:
    return RequestRecord(
        ts=T0 + timedelta(milliseconds=10 * i),
        deployment_id=deployment_id,
        model="org/chat-7b",
        version="2" if role == "canary" else "1",
        role=role,
        latency_ms=latency,
        status=status,
        error_kind=error_kind,
    )


def batch(records: Sequence[RequestRecord], batch_id: str | None = None) -> RequestMetricsBatch:
    return RequestMetricsBatch(
        batch_id=batch_id or f"batch-{secrets.token_hex(6)}",
        source="router-test",
        records=tuple(records),
    )


async def publish(js: JetStreamContext, data: bytes, msg_id: str | None = None) -> None:
    await js.publish(
        subjects.metrics("router-test"),
        data,
        stream=subjects.METRICS_STREAM,
        headers={bus.MSG_ID_HEADER: msg_id or secrets.token_hex(8)},
    )


async def publish_batch(js: JetStreamContext, b: RequestMetricsBatch, msg_id: str = "") -> None:
    await publish(js, b.model_dump_json().encode(), msg_id or b.batch_id)


class Waiter:
    """Wakes tests when the ingest has inserted (at least) a number of records."""

    def __init__(self) -> None:
        self.changed = asyncio.Event()

    def __call__(self, stats: ingest.IngestStats) -> None:
        self.changed.set()

    async def until(self, check: Any, timeout: float = 20.0) -> None:
        async def loop() -> None:
            while not check():
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), 0.2)

        await asyncio.wait_for(loop(), timeout)


@contextlib.asynccontextmanager
async def ingesting(
    js: JetStreamContext, client: Any, settings: Settings
) -> AsyncIterator[tuple[ingest.Ingestor, Waiter]]:
    waiter = Waiter()
    ingestor = ingest.Ingestor(
        js, client, settings, on_insert=waiter, fetch_timeout_s=0.2, retry_base_s=0.05
    )
    stop = asyncio.Event()
    task = asyncio.create_task(ingestor.run(stop))
    try:
        yield ingestor, waiter
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def count_rows(client: Any, table: str, deployment_id: str) -> int:
    rows = client.query(
        f"SELECT count() FROM {table} FINAL WHERE deployment_id = {{d:String}}",  # noqa: S608
        parameters={"d": deployment_id},
    ).result_rows
    return int(rows[0][0])


def window(client: Any, table: str, deployment_id: str = "d-ingest-1", **kw: Any) -> Any:
    return queries.query_window(client, table, deployment_id, T0, T0 + timedelta(minutes=10), **kw)


async def dead_letters(js: JetStreamContext, expected: int) -> list[DeadLetter]:
    sub = await js.pull_subscribe(
        subjects.deadletter(ingest.SERVICE), stream=subjects.DEADLETTER_STREAM
    )
    msgs = await sub.fetch(expected, timeout=5)
    return [DeadLetter.model_validate_json(m.data) for m in msgs]


@pytest.fixture
def table(chdb_client: Any) -> str:
    return new_table(chdb_client)


@pytest.fixture
def ingest_settings(settings: Settings, table: str) -> Settings:
    return settings.model_copy(update={"metrics_table": table})


# ---- end to end ---------------------------------------------------------------------------------


async def test_batches_on_the_stream_become_exact_window_numbers(
    js: JetStreamContext, chdb_client: Any, table: str, ingest_settings: Settings
) -> None:
    # Canary: latencies 1..100; 5 x 503 and 2 x no response and 1 x timeout are errors, the
    # 3 x 404 are the client's. Stable: 200 requests, one 500.
    canary_status = [503] * 5 + [0] * 2 + [404] * 3 + [200] * 90
    canary = [
        rec(i, "canary", float(i + 1), canary_status[i], "timeout" if i == 50 else None)
        for i in range(100)
    ]
    stable_latencies = [float((7 * i) % 200) + 0.5 for i in range(200)]
    stable = [
        rec(100 + i, "stable", stable_latencies[i], 500 if i == 3 else 200) for i in range(200)
    ]
    other = [rec(0, "canary", 9999.0, deployment_id="d-someone-else")]
    outside = [
        rec(-1, "canary", 5000.0),  # 10 ms before the window
        rec(60_000, "canary", 5000.0),  # exactly at its end: [start, end) excludes it
    ]
    records = [*canary, *stable]
    batches = [batch(records[i : i + 50]) for i in range(0, len(records), 50)]
    batches += [batch(other), batch(outside)]
    for b in batches:
        await publish_batch(js, b)

    async with ingesting(js, chdb_client, ingest_settings) as (ingestor, waiter):
        await waiter.until(lambda: ingestor.stats.records == 303)
        assert ingestor.stats.batches == len(batches)
        assert ingestor.stats.last_insert_lag_s is not None

    result = queries.query_window(
        chdb_client, table, "d-ingest-1", T0, T0 + timedelta(milliseconds=10 * 60_000)
    )
    assert (result.canary.requests, result.canary.errors) == (100, 8)
    assert result.canary.error_rate == pytest.approx(0.08)
    assert result.canary.p95_ms == pytest.approx(95.05)  # linear interpolation, like numpy
    assert result.canary.p50_ms == pytest.approx(50.5)
    assert result.canary.p99_ms == pytest.approx(99.01)
    assert (result.stable.requests, result.stable.errors) == (200, 1)
    expected = np.percentile(stable_latencies, [50, 95, 99])
    assert [result.stable.p50_ms, result.stable.p95_ms, result.stable.p99_ms] == pytest.approx(
        expected.tolist()
    )
    assert result.canary.measurement().error_rate == pytest.approx(0.08)


async def test_pinned_requests_are_stored_but_do_not_dilute_the_canary_s_window(
    js: JetStreamContext, chdb_client: Any, table: str, ingest_settings: Settings
) -> None:
    """The attack: a canary failing 20% of its requests, and 2,000 requests pinned to it on a
    path that answers 404 (not an error). Counted, they read as 1% errors and the canary was
    promoted; pinned, they stay out of the window."""
    failing = [rec(i, "canary", 10.0, 503 if i % 5 == 0 else 200) for i in range(100)]
    stable = [rec(100 + i, "stable", 10.0) for i in range(200)]
    noise = [
        RequestRecord.model_validate(
            rec(300 + i, "canary", 1.0, 404).model_dump() | {"pinned": True}
        )
        for i in range(2000)
    ]
    records = [*failing, *stable, *noise]
    for i in range(0, len(records), 500):
        await publish_batch(js, batch(records[i : i + 500]))
    async with ingesting(js, chdb_client, ingest_settings) as (ingestor, waiter):
        await waiter.until(lambda: ingestor.stats.records == len(records))
    assert count_rows(chdb_client, table, "d-ingest-1") == len(records)  # stored, all of them
    result = window(chdb_client, table, raw=True)
    assert (result.canary.requests, result.canary.errors) == (100, 20)
    assert result.canary.error_rate == pytest.approx(0.2)
    assert len(result.canary.latencies_ms) == 100 and min(result.canary.latencies_ms) == 10.0
    assert result.stable.requests == 200


async def test_records_aimed_at_the_ingest_s_inbox_are_not_stored(
    js: JetStreamContext, chdb_client: Any, table: str, ingest_settings: Settings
) -> None:
    """A `client` may publish any body on `.requested`; a consumer of the events stream
    delivering that into the ingest's inbox (nats-server does not check deliver subjects:
    nats-io/nats-server#8274) would store forged records for a canary. Only what the ingest's
    durable delivered is stored."""
    forged = batch([rec(i, "canary", 1.0, deployment_id="d-forged") for i in range(20)])
    stored = subjects.stage("org/chat-7b", "d-forged", "requested")
    await js.publish(stored, forged.model_dump_json().encode(), stream=subjects.EVENTS_STREAM)
    async with ingesting(js, chdb_client, ingest_settings) as (ingestor, waiter):
        await asyncio.sleep(0.5)  # bound and fetching
        inboxes = [sub.subject for sub in js._nc._subs.values()]  # the ingest shares js
        await aim_push_consumers(js, inboxes, stored, "forge")
        real = batch([rec(i, "canary", 2.0, deployment_id="d-real") for i in range(5)])
        await publish_batch(js, real)
        await waiter.until(lambda: ingestor.stats.records >= 5)
        await asyncio.sleep(0.5)
    assert count_rows(chdb_client, table, "d-real") == 5
    assert count_rows(chdb_client, table, "d-forged") == 0  # before: 20
    assert ingestor.stats.foreign >= 1


async def test_raw_latencies_come_whole_or_as_a_uniform_sample(
    js: JetStreamContext, chdb_client: Any, table: str, ingest_settings: Settings
) -> None:
    records = [rec(i, "canary" if i % 4 == 0 else "stable", float(i)) for i in range(400)]
    await publish_batch(js, batch(records))
    async with ingesting(js, chdb_client, ingest_settings) as (ingestor, waiter):
        await waiter.until(lambda: ingestor.stats.records == 400)

    whole = window(chdb_client, table, raw=True)
    assert whole.canary.latencies_ms == tuple(float(i) for i in range(0, 400, 4))
    assert not whole.canary.sampled and len(whole.stable.latencies_ms) == 300
    sample = window(chdb_client, table, raw=True, raw_limit=50)
    assert sample.stable.sampled and len(sample.stable.latencies_ms) == 50
    assert set(sample.stable.latencies_ms) <= set(whole.stable.latencies_ms)
    assert sample == window(chdb_client, table, raw=True, raw_limit=50)  # same sample each time
    assert window(chdb_client, table).canary.latencies_ms == ()


async def test_series_buckets_per_role(
    js: JetStreamContext, chdb_client: Any, table: str, ingest_settings: Settings
) -> None:
    # 10 ms apart: records 0..99 in the first second, 100..149 in the next.
    records = [rec(i, "canary", float(i), 503 if i >= 100 else 200) for i in range(150)]
    await publish_batch(js, batch(records))
    async with ingesting(js, chdb_client, ingest_settings) as (ingestor, waiter):
        await waiter.until(lambda: ingestor.stats.records == 150)

    points = queries.query_series(
        chdb_client, table, "d-ingest-1", T0, T0 + timedelta(seconds=5), bucket_s=1.0
    )
    assert [(p["start"], p["role"], p["requests"], p["errors"]) for p in points] == [
        (T0, "canary", 100, 0),
        (T0 + timedelta(seconds=1), "canary", 50, 50),
    ]
    assert points[1]["error_rate"] == 1.0
    assert points[0]["p95_ms"] == pytest.approx(np.percentile(range(100), 95))


async def test_a_missing_role_is_zero_requests_and_no_percentiles(
    chdb_client: Any, table: str
) -> None:
    result = window(chdb_client, table, deployment_id="d-nothing-here")
    assert result.canary.requests == 0 and result.canary.p95_ms is None
    assert result.stable.error_rate is None


# ---- idempotency --------------------------------------------------------------------------------


async def test_a_batch_published_again_is_counted_once(
    js: JetStreamContext, chdb_client: Any, table: str, ingest_settings: Settings
) -> None:
    first = batch([rec(i, "canary", float(i), 503 if i < 10 else 200) for i in range(100)])
    other = batch([rec(200 + i, "stable", 1.0) for i in range(50)])
    # Twice in one fetch (different Nats-Msg-Id, so the stream keeps both)...
    await publish_batch(js, first, "copy-1")
    await publish_batch(js, first, "copy-2")
    async with ingesting(js, chdb_client, ingest_settings) as (ingestor, waiter):
        await waiter.until(lambda: ingestor.stats.batches == 1)
        assert ingestor.stats.duplicates == 1
        # ...and once more later, regrouped with another batch in a different fetch.
        await publish_batch(js, first, "copy-3")
        await publish_batch(js, other)
        await waiter.until(lambda: ingestor.stats.batches == 2)
        assert ingestor.stats.duplicates == 2  # the third copy was found in the table

    result = window(chdb_client, table)
    assert (result.canary.requests, result.canary.errors) == (100, 10)
    assert result.stable.requests == 50


def test_rows_stored_twice_by_racing_instances_are_counted_once(
    chdb_client: Any, table: str
) -> None:
    # Two instances can only both insert a batch if JetStream redelivered it while the first
    # was still inserting (ack_wait passed): the pre-insert check misses it, FINAL does not.
    b = batch([rec(i, "canary", float(i), 503 if i < 4 else 200) for i in range(40)])
    chdb_client.insert_arrow(table, ingest.to_arrow([b]))
    chdb_client.insert_arrow(table, ingest.to_arrow([b]))
    result = window(chdb_client, table)
    assert (result.canary.requests, result.canary.errors) == (40, 4)
    assert result.canary.p95_ms == pytest.approx(np.percentile(range(40), 95))


class InsertsThenFails:
    """The insert lands, but the caller hears a failure (a lost reply, a crash before the ack)."""

    def __init__(self, client: Any, times: int = 1) -> None:
        self.client = client
        self.left = times

    def insert_arrow(self, table: str, data: Any) -> Any:
        self.client.insert_arrow(table, data)
        if self.left > 0:
            self.left -= 1
            raise ConnectionError("reply lost after the insert")
        return None

    def command(self, sql: str) -> Any:
        return self.client.command(sql)

    def query(self, sql: str, parameters: dict[str, Any]) -> Any:
        return self.client.query(sql, parameters=parameters)


async def test_a_redelivery_after_a_stored_insert_is_not_counted_twice(
    js: JetStreamContext, chdb_client: Any, table: str, ingest_settings: Settings
) -> None:
    b = batch([rec(i, "stable", float(i), 500 if i % 10 == 0 else 200) for i in range(200)])
    await publish_batch(js, b)
    client = InsertsThenFails(chdb_client)
    async with ingesting(js, client, ingest_settings) as (ingestor, waiter):
        await waiter.until(lambda: ingestor.stats.duplicates == 1)
        assert ingestor.stats.insert_failures == 1
        assert ingestor.stats.redelivered == 1
        assert ingestor.stats.batches == 0  # the redelivery found its rows already stored

    assert count_rows(chdb_client, table, "d-ingest-1") == 200
    result = window(chdb_client, table)
    assert (result.stable.requests, result.stable.errors) == (200, 20)


# ---- failures ----------------------------------------------------------------------------------


class FailsOnce:
    """The store refuses the first insert outright, then recovers."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.failed = False

    def insert_arrow(self, table: str, data: Any) -> Any:
        if not self.failed:
            self.failed = True
            raise ConnectionError("store restarting")
        return self.client.insert_arrow(table, data)

    def command(self, sql: str) -> Any:
        return self.client.command(sql)

    def query(self, sql: str, parameters: dict[str, Any]) -> Any:
        return self.client.query(sql, parameters=parameters)


async def test_an_insert_failure_loses_nothing(
    js: JetStreamContext, chdb_client: Any, table: str, ingest_settings: Settings
) -> None:
    batches = [batch([rec(10 * k + i, "canary", 1.0) for i in range(10)]) for k in range(5)]
    for b in batches:
        await publish_batch(js, b)
    async with ingesting(js, FailsOnce(chdb_client), ingest_settings) as (ingestor, waiter):
        await waiter.until(lambda: ingestor.stats.records == 50)
        assert ingestor.stats.insert_failures == 1 and ingestor.stats.dead_letters == 0
    assert count_rows(chdb_client, table, "d-ingest-1") == 50


class RefusesOneBatch:
    """The store is up but always refuses inserts holding one particular batch."""

    def __init__(self, client: Any, batch_id: str) -> None:
        self.client = client
        self.batch_id = batch_id

    def insert_arrow(self, table: str, data: Any) -> Any:
        if self.batch_id in data.column("batch_id").to_pylist():
            raise ValueError("Cannot parse input: value out of range")
        return self.client.insert_arrow(table, data)

    def command(self, sql: str) -> Any:
        return self.client.command(sql)

    def query(self, sql: str, parameters: dict[str, Any]) -> Any:
        return self.client.query(sql, parameters=parameters)


async def test_a_batch_the_store_keeps_refusing_is_dead_lettered_alone(
    js: JetStreamContext, chdb_client: Any, table: str, ingest_settings: Settings
) -> None:
    good = [batch([rec(10 * k + i, "stable", 1.0) for i in range(10)]) for k in range(3)]
    poison = batch([rec(100, "canary", 1.0)], batch_id="batch-poison")
    for b in (good[0], poison, *good[1:]):
        await publish_batch(js, b)
    client = RefusesOneBatch(chdb_client, "batch-poison")
    async with ingesting(js, client, ingest_settings) as (ingestor, waiter):
        await waiter.until(lambda: ingestor.stats.records == 30)
        await waiter.until(lambda: ingestor.stats.dead_letters == 1)

    (letter,) = await dead_letters(js, 1)
    assert "insert failed on attempt 3" in letter.reason and "out of range" in letter.reason
    assert RequestMetricsBatch.model_validate_json(letter.payload_text or "") == poison
    assert count_rows(chdb_client, table, "d-ingest-1") == 30


async def test_a_malformed_batch_is_dead_lettered_and_the_rest_inserted(
    js: JetStreamContext, chdb_client: Any, table: str, ingest_settings: Settings
) -> None:
    good = batch([rec(i, "canary", 2.0) for i in range(20)])
    await publish(js, b'{"type": "RequestMetricsBatch", "records": "nope"}', "bad-1")
    await publish_batch(js, good)
    async with ingesting(js, chdb_client, ingest_settings) as (ingestor, waiter):
        await waiter.until(lambda: ingestor.stats.records == 20)
        await waiter.until(lambda: ingestor.stats.dead_letters == 1)

    (letter,) = await dead_letters(js, 1)
    assert letter.service == "metrics-ingest"
    assert "does not validate" in letter.reason and "records" in letter.reason
    assert json.loads(letter.payload_text or "")["records"] == "nope"
    assert letter.subject == subjects.metrics("router-test")
    info = await js.consumer_info(subjects.METRICS_STREAM, subjects.INGEST_DURABLE)
    assert info.num_ack_pending == 0 and info.num_pending == 0  # nothing left to redeliver


# ---- the standalone service ---------------------------------------------------------------------


async def test_the_standalone_service_ingests(
    js: JetStreamContext, chdb_client: Any, ingest_settings: Settings
) -> None:
    # The same process may open the same chDB path again (one path per process, many clients).
    settings = ingest_settings.model_copy(
        update={"clickhouse_path": Path(chdb_client.path), "metrics_table": new_table(chdb_client)}
    )
    await publish_batch(js, batch([rec(i, "stable", 3.0) for i in range(30)]))
    waiter, stats = Waiter(), ingest.IngestStats()
    async with TestApp(ingest_app.build(settings, stats=stats, on_insert=waiter).app):
        await waiter.until(lambda: stats.records == 30)
    assert count_rows(chdb_client, settings.metrics_table, "d-ingest-1") == 30


async def test_a_partly_stored_batch_is_stored_whole_on_redelivery(
    js: JetStreamContext, chdb_client: Any, table: str, ingest_settings: Settings
) -> None:
    """An insert across two daily partitions can land in one and fail in the other."""
    whole = batch([rec(i, "canary", float(i), 500 if i % 10 == 0 else 200) for i in range(40)])
    half = whole.model_copy(update={"records": whole.records[:20]})
    arrow = ingest.to_arrow([half])  # seq = index in the batch, as for the whole batch
    chdb_client.insert_arrow(table, arrow)
    await publish_batch(js, whole)
    async with ingesting(js, chdb_client, ingest_settings) as (ingestor, waiter):
        await waiter.until(lambda: ingestor.stats.batches == 1)
        assert ingestor.stats.duplicates == 0  # not taken for stored: 20 of 40 were there
    result = window(chdb_client, table)
    assert (result.canary.requests, result.canary.errors) == (40, 4)


def test_a_user_who_hangs_up_mid_stream_is_not_an_error(chdb_client: Any, table: str) -> None:
    records = [rec(i, "canary", 5.0) for i in range(98)]
    records += [rec(100 + i, "canary", 5.0, 200, "client_closed") for i in range(2)]
    records += [rec(200, "canary", 5.0, 200, "timeout")]
    chdb_client.insert_arrow(table, ingest.to_arrow([batch(records)]))
    result = window(chdb_client, table)
    assert (result.canary.requests, result.canary.errors) == (101, 1)


# ---- dead letters that always fit, and nothing left in redelivery (issue #13) -----------------


def garbage(max_payload: int) -> dict[str, bytes]:
    """What a broken or hostile gateway can publish, near-max payloads included."""
    good = batch([rec(0, "canary", 1.0)]).model_dump(mode="json")
    near_max = max_payload - 2048  # the message's headers need the rest
    return {
        "random bytes": secrets.token_bytes(1000),
        "near-max random bytes": secrets.token_bytes(near_max),
        "near-max JSON": json.dumps({**good, "source": "x" * near_max})[:near_max].encode(),
        "near-max valid JSON, wrong schema": json.dumps(
            {**good, "extra": "é" * ((near_max - 400) // 2)}, ensure_ascii=False
        ).encode(),
        "truncated JSON": json.dumps(good).encode()[:-7],
        "wrong types": json.dumps({**good, "records": [{"ts": 12345}]}).encode(),
        "control characters": b'{"type": "RequestMetricsBatch", "batch_id": "\x00\x01\x1b[2J"}',
        "extra field": json.dumps({**good, "admin": True}).encode(),
        "wrong schema_version": json.dumps({**good, "schema_version": 2}).encode(),
        "ts out of range": json.dumps(
            {**good, "records": [{**good["records"][0], "ts": "2300-01-01T00:00:00Z"}]}
        ).encode(),
    }


async def published(js: JetStreamContext, data: bytes) -> int:
    ack = await js.publish(
        subjects.metrics("router-test"),
        data,
        stream=subjects.METRICS_STREAM,
        headers={bus.MSG_ID_HEADER: secrets.token_hex(8)},
    )
    return int(ack.seq)


async def every_dead_letter(js: JetStreamContext) -> list[tuple[int, DeadLetter]]:
    """(size on the wire, letter) of every ingest dead letter, in order."""
    return await sized_dead_letters(js)


async def nothing_left(js: JetStreamContext, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        info = await js.consumer_info(subjects.METRICS_STREAM, subjects.INGEST_DURABLE)
        if info.num_ack_pending == 0 and info.num_pending == 0:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"messages left in redelivery: {info}")
        await asyncio.sleep(0.05)


async def test_garbage_and_near_max_payloads_all_end_dead_lettered_and_acked(
    js: JetStreamContext, chdb_client: Any, table: str, ingest_settings: Settings
) -> None:
    max_payload = js._nc.max_payload
    sent = garbage(max_payload)
    seqs = {await published(js, data): (name, data) for name, data in sent.items()}
    good = batch([rec(i, "canary", 2.0) for i in range(20)])
    await publish_batch(js, good)
    async with ingesting(js, chdb_client, ingest_settings) as (ingestor, waiter):
        await waiter.until(lambda: ingestor.stats.records == 20)
        await waiter.until(lambda: ingestor.stats.dead_letters == len(sent))
        await nothing_left(js)
        assert ingestor.stats.dead_letter_failures == 0

    letters = await every_dead_letter(js)
    assert sorted(letter.stream_sequence or 0 for _, letter in letters) == sorted(seqs)
    for size, letter in letters:
        name, original = seqs[letter.stream_sequence or 0]
        assert size <= max_payload - 1024, name  # it fitted, with room for headers
        assert letter.service == ingest.SERVICE and letter.stream == subjects.METRICS_STREAM
        assert letter.reason, name
        kept = (letter.payload_text or "").encode() or base64.b64decode(letter.payload_b64 or "")
        if letter.truncated:
            assert original.startswith(kept) and len(kept) < len(original), name
            assert hashlib.sha256(original).hexdigest() in letter.reason, name
        else:
            assert kept == original, name
    truncated = {seqs[letter.stream_sequence or 0][0] for _, letter in letters if letter.truncated}
    assert truncated == {n for n in sent if n.startswith("near-max")}
    assert count_rows(chdb_client, table, "d-ingest-1") == 20


async def test_a_letter_the_dead_letter_stream_refuses_goes_again_without_its_payload(
    js: JetStreamContext, chdb_client: Any, ingest_settings: Settings
) -> None:
    await set_dead_letter_limit(js, 4096)  # full letters of a 100 kB payload are refused
    original = b'{"records": "' + b"y" * 100_000 + b'"}'
    seq = await published(js, original)
    async with ingesting(js, chdb_client, ingest_settings) as (ingestor, waiter):
        await waiter.until(lambda: ingestor.stats.dead_letters == 1)
        await nothing_left(js)
    [(_, letter)] = await every_dead_letter(js)
    assert letter.payload_text is None and letter.payload_b64 is None and letter.truncated
    assert "does not validate" in letter.reason and "not kept" in letter.reason
    assert hashlib.sha256(original).hexdigest() in letter.reason
    assert (letter.stream, letter.stream_sequence) == (subjects.METRICS_STREAM, seq)
    assert f"{subjects.METRICS_STREAM} sequence {seq}" in letter.reason


async def test_a_message_that_cannot_be_dead_lettered_yet_waits_then_is(
    js: JetStreamContext, chdb_client: Any, ingest_settings: Settings
) -> None:
    """The dead-letter stream takes nothing for a while: the message is kept, not lost."""
    await set_dead_letter_limit(js, 64)
    await published(js, b"not json at all")
    async with ingesting(js, chdb_client, ingest_settings) as (ingestor, waiter):
        await waiter.until(lambda: ingestor.stats.dead_letter_failures >= 2)
        assert ingestor.stats.dead_letters == 0
        await set_dead_letter_limit(js, 9 * 1024 * 1024)
        await waiter.until(lambda: ingestor.stats.dead_letters == 1)
        await nothing_left(js)
    [(_, letter)] = await every_dead_letter(js)
    assert letter.payload_text == "not json at all" and not letter.truncated


async def set_dead_letter_limit(js: JetStreamContext, max_msg_size: int) -> None:
    info = await js.stream_info(subjects.DEADLETTER_STREAM)
    config = info.config
    config.max_msg_size = max_msg_size
    await js.update_stream(config)
