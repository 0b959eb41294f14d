"""Request-metric batches from the metrics stream into ClickHouse: one insert per fetch.

The loop pulls up to `ingest_fetch_batch` messages from the durable `metrics-ingest` consumer,
dead-letters what does not parse, inserts the records of every good batch in one Arrow insert
and acks them only after the insert returned. A failed insert naks with a delay and pauses
fetching until the store answers again, so an outage uses up no delivery attempts; a batch that
fails alone while the store answers is dead-lettered on its last attempt. Nothing is dropped
without a dead letter, and a dead letter always fits the server's max_payload: a large payload
is cut (the letter keeps the sha256 of the whole and its stream sequence), and a letter the
dead-letter stream still refuses is sent again without the payload. Redelivered batches are
harmless: batches the table already holds are skipped before the insert, and queries read FINAL
for the rare race that slips past (docs/metrics.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final

import pyarrow as pa  # type: ignore[import-untyped]
from nats.js import JetStreamContext
from pydantic import ValidationError

from services.contracts import subjects
from services.contracts.events import DeadLetter, RequestMetricsBatch
from services.metrics import queries
from services.runtime import bus
from services.runtime.aio import wait_event
from services.runtime.clickhouse import METRICS_COLUMNS, check_table_name
from services.runtime.service import (
    DEFAULT_MAX_PAYLOAD,
    delivered_by,
    delivery_attempt,
    describe_validation_error,
    make_dead_letter,
    stream_position,
)
from services.runtime.settings import Settings

SERVICE: Final = "metrics-ingest"
log = logging.getLogger(f"preflight.{SERVICE}")

# DateTime64(3) holds 1900..2299; pyarrow's ms timestamps hold far more. Records outside this
# range are a gateway bug: the batch is dead-lettered instead of failing every insert it joins.
TS_MIN: Final = datetime(1970, 1, 1, tzinfo=UTC)
TS_MAX: Final = datetime(2200, 1, 1, tzinfo=UTC)

ARROW_SCHEMA: Final = pa.schema(
    [
        ("ts", pa.timestamp("ms", tz="UTC")),
        ("deployment_id", pa.string()),
        ("model", pa.string()),
        ("version", pa.string()),
        ("role", pa.string()),
        ("latency_ms", pa.float64()),
        ("ttfb_ms", pa.float64()),
        ("ttft_ms", pa.float64()),
        ("itl_ms", pa.float64()),
        ("output_tokens", pa.uint32()),
        ("status", pa.uint16()),
        ("error_kind", pa.string()),
        ("pinned", pa.bool_()),
        ("batch_id", pa.string()),
        ("seq", pa.uint32()),
    ]
)
assert tuple(ARROW_SCHEMA.names) == METRICS_COLUMNS


@dataclass
class IngestStats:
    """Progress of one ingest loop; the caller reads it while the loop runs."""

    records: int = 0
    """Rows inserted."""
    batches: int = 0
    """Batches inserted."""
    inserts: int = 0
    duplicates: int = 0
    """Batches skipped: already stored, or the same batch_id earlier in the same fetch."""
    redelivered: int = 0
    """Batches JetStream delivered more than once; the table's FINAL read counts them once."""
    dead_letters: int = 0
    dead_letter_failures: int = 0
    """Dead letters the stream refused even without their payload (the message comes back)."""
    insert_failures: int = 0
    foreign: int = 0
    """Messages on the inbox that the ingest's durable did not deliver: dropped unread."""
    last_insert_lag_s: float | None = None
    """From the newest record's ts to the end of the insert that made it queryable."""
    last_insert_at: datetime | None = None

    def snapshot(self) -> IngestStats:
        return replace(self)


@dataclass(frozen=True)
class Unusable:
    """Why a batch can never be inserted (it goes to the dead-letter stream)."""

    reason: str


@dataclass
class Fetched:
    """One message of a fetch and what became of it."""

    msg: Any
    batch: RequestMetricsBatch | None = None
    attempt: int | None = None
    problem: str | None = None
    duplicate: bool = False


# ---- pure pieces --------------------------------------------------------------------------------


# A batch's records may span this many days: ClickHouse refuses an insert into more than 100
# partitions (one a day), after five tries and 15 s; refused here at once, with the reason.
MAX_BATCH_DAYS = 100
# How far ahead of this host's clock a gateway's clock may run.
MAX_CLOCK_AHEAD = timedelta(days=1)


def parse_batch(
    data: bytes, *, ttl_days: int | None = None, now: datetime | None = None
) -> RequestMetricsBatch | Unusable:
    """A batch ready to insert, or why not. With `ttl_days`, a record the table would drop at
    once (older than its TTL) is refused, not acked and lost; one more than a day ahead of
    `now` too. Latencies must be finite: JSON's 1e400 reads as infinity, and one infinite
    stable sample makes a window's p95 unknown and turns the canary's latency gate off."""
    try:
        batch = RequestMetricsBatch.model_validate_json(data, strict=True)
    except ValidationError as exc:
        return Unusable(describe_validation_error(exc))
    now = now or datetime.now(UTC)
    oldest = now - timedelta(days=ttl_days) if ttl_days is not None else TS_MIN
    newest = now + MAX_CLOCK_AHEAD if ttl_days is not None else TS_MAX
    days: set[date] = set()
    for i, record in enumerate(batch.records):
        ts = record.ts if record.ts.tzinfo else record.ts.replace(tzinfo=UTC)
        if not TS_MIN <= ts < TS_MAX:
            return Unusable(f"records.{i}.ts: {record.ts.isoformat()} is outside 1970..2200")
        if not oldest <= ts <= newest:
            return Unusable(
                f"records.{i}.ts: {record.ts.isoformat()} is outside {oldest:%Y-%m-%d %H:%M} .. "
                f"{newest:%Y-%m-%d %H:%M} UTC (older than the table's {ttl_days}-day TTL, which "
                "would drop it unseen, or more than a day ahead of this host's clock)"
            )
        for name in ("latency_ms", "ttfb_ms", "ttft_ms", "itl_ms"):
            value = getattr(record, name)
            if value is not None and not math.isfinite(value):
                return Unusable(f"records.{i}.{name}: {value} is not a finite number")
        days.add(ts.astimezone(UTC).date())  # the table's partitions are UTC days
    if len(days) > MAX_BATCH_DAYS:
        return Unusable(
            f"records span {len(days)} days; a batch may span at most {MAX_BATCH_DAYS} (one "
            "ClickHouse partition a day)"
        )
    return batch


def mark_duplicates(items: Sequence[Fetched]) -> None:
    """Within one fetch, the first message of a batch_id is inserted; later ones are skipped."""
    seen: set[str] = set()
    for item in items:
        if item.batch is None:
            continue
        if item.batch.batch_id in seen:
            item.duplicate = True
        seen.add(item.batch.batch_id)


def to_arrow(batches: Sequence[RequestMetricsBatch]) -> Any:
    """One Arrow table (the fastest insert through clickhouse-connect) of all their records.

    `seq` is a record's index in its batch: with batch_id it names the record, which is what
    makes a redelivered batch collapse into the rows it wrote first. A ts without a zone is UTC.
    """
    ts: list[datetime] = []
    deployment: list[str] = []
    model: list[str] = []
    version: list[str] = []
    role: list[str] = []
    latency: list[float] = []
    ttfb: list[float | None] = []
    ttft: list[float | None] = []
    itl: list[float | None] = []
    tokens: list[int | None] = []
    status: list[int] = []
    error_kind: list[str] = []
    pinned: list[bool] = []
    batch_ids: list[str] = []
    seq: list[int] = []
    for batch in batches:
        records = batch.records
        ts.extend(r.ts for r in records)
        deployment.extend(r.deployment_id for r in records)
        model.extend(r.model for r in records)
        version.extend(r.version for r in records)
        role.extend(r.role for r in records)
        latency.extend(r.latency_ms for r in records)
        ttfb.extend(r.ttfb_ms for r in records)
        ttft.extend(r.ttft_ms for r in records)
        itl.extend(r.itl_ms for r in records)
        tokens.extend(r.output_tokens for r in records)
        status.extend(r.status for r in records)
        error_kind.extend(r.error_kind or "" for r in records)
        pinned.extend(r.pinned for r in records)
        batch_ids.extend([batch.batch_id] * len(records))
        seq.extend(range(len(records)))
    columns = (
        ts,
        deployment,
        model,
        version,
        role,
        latency,
        ttfb,
        ttft,
        itl,
        tokens,
        status,
        error_kind,
        pinned,
        batch_ids,
    )
    return pa.Table.from_arrays(
        [pa.array(c, f.type) for c, f in zip((*columns, seq), ARROW_SCHEMA, strict=True)],
        schema=ARROW_SCHEMA,
    )


def retry_delay(attempt: int | None, base_s: float, cap_s: float = 30.0) -> float:
    """Nak delay before the next delivery: base, 2x base, 4x base, ... up to `cap_s`."""
    return min(cap_s, base_s * 2.0 ** max(0, (attempt or 1) - 1))


def stored_batches_query(
    table: str, batches: Sequence[RequestMetricsBatch]
) -> tuple[str, dict[str, Any]] | None:
    """SQL and parameters that count, per batch, the records the table holds already.

    Each batch is looked up by its own deployments and ts range, so the sorting key (deployment,
    role, ts) narrows every lookup to a few granules however old the batch is. The count matters:
    an insert that spans two daily partitions can land in one and fail in the other, and such a
    batch is not stored until all of it is.
    """
    clauses: list[str] = []
    parameters: dict[str, Any] = {}
    for i, batch in enumerate(batches):
        if not batch.records:
            continue
        stamps = [epoch_ms(r.ts) for r in batch.records]
        clauses.append(
            f"(batch_id = {{b{i}:String}} AND deployment_id IN {{d{i}:Array(String)}}"
            f" AND ts >= fromUnixTimestamp64Milli({{lo{i}:Int64}}, 'UTC')"
            f" AND ts <= fromUnixTimestamp64Milli({{hi{i}:Int64}}, 'UTC'))"
        )
        parameters[f"b{i}"] = batch.batch_id
        parameters[f"d{i}"] = sorted({r.deployment_id for r in batch.records})
        parameters[f"lo{i}"], parameters[f"hi{i}"] = min(stamps), max(stamps)
    if not clauses:
        return None
    where = " OR ".join(clauses)
    # S608: only the checked table name and parameter placeholders are formatted in.
    sql = (
        f"SELECT batch_id, uniqExact(seq) FROM {check_table_name(table)} "  # noqa: S608
        f"WHERE {where} GROUP BY batch_id"
    )
    return sql, parameters


def epoch_ms(ts: datetime) -> int:
    return queries.epoch_ms(ts if ts.tzinfo else ts.replace(tzinfo=UTC))


def newest_ts(batches: Sequence[RequestMetricsBatch]) -> datetime | None:
    stamps = [r.ts if r.ts.tzinfo else r.ts.replace(tzinfo=UTC) for b in batches for r in b.records]
    return max(stamps) if stamps else None


# ---- the loop ---------------------------------------------------------------------------------


@dataclass
class Ingestor:
    """Pulls metric batches and inserts them; `run` until `stop` is set.

    `client` is a clickhouse-connect client; it is only used from worker threads (chDB's client
    is synchronous). `clock` gives epoch seconds (lag, log cadence).
    """

    js: JetStreamContext
    client: Any
    settings: Settings
    on_insert: Callable[[IngestStats], object] | None = None
    stats: IngestStats = field(default_factory=IngestStats)
    clock: Callable[[], float] = time.time
    fetch_timeout_s: float = 1.0
    retry_base_s: float = 1.0
    log_every_s: float = 30.0
    _last_log: float = field(default=0.0, init=False)
    _logged_records: int = field(default=0, init=False)
    _last_error: str = field(default="insert failed", init=False)
    _foreign_logged: float = field(default=-math.inf, init=False)

    def __post_init__(self) -> None:
        check_table_name(self.settings.metrics_table)

    async def run(self, stop: asyncio.Event) -> None:
        sub = await self._bind(stop)
        if sub is None:
            return
        self._last_log = self.clock()
        try:
            while not stop.is_set():
                try:
                    msgs = await sub.fetch(self.settings.ingest_fetch_batch, self.fetch_timeout_s)
                except TimeoutError:
                    msgs = []
                except Exception as exc:
                    log.warning("metrics fetch failed (%s: %s); retrying", type(exc).__name__, exc)
                    await wait_or_stop(stop, 1.0)
                    msgs = []
                msgs = self.own_deliveries(msgs)
                if msgs:
                    try:
                        healthy = await self.handle(msgs)
                    except Exception:
                        # Unacked messages come back after ack_wait: nothing is lost.
                        log.exception("metrics ingest: unexpected failure handling a fetch")
                        healthy = False
                    if not healthy:
                        await self.wait_for_store(stop)
                self.maybe_log()
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            self.log_progress()

    def own_deliveries(self, msgs: Sequence[Any]) -> list[Any]:
        """The messages the ingest's durable delivered. Its inbox is not private (as for the
        services: ServiceApp.require_own_delivery): a consumer of the events stream aimed at
        it would replay whatever a `client` had published there, forged request records
        included, into ClickHouse and so into the canary's analysis. The rest is dropped,
        unacked, and counted in a warning at most once a minute."""
        own = (subjects.METRICS_STREAM, subjects.INGEST_DURABLE)
        kept = [m for m in msgs if delivered_by(m) == own]
        dropped = len(msgs) - len(kept)
        if dropped:
            self.stats.foreign += dropped
            now = self.clock()
            if now - self._foreign_logged >= 60.0:
                self._foreign_logged = now
                log.warning(
                    "metrics ingest: dropped %d messages on its inbox that %s did not deliver "
                    "(%d so far): someone aims another consumer, or a reply, at this inbox",
                    dropped,
                    subjects.INGEST_DURABLE,
                    self.stats.foreign,
                )
        return kept

    async def _bind(self, stop: asyncio.Event) -> Any:
        """Bind to the durable consumer, retrying while the topology is not there yet."""
        while not stop.is_set():
            try:
                return await self.js.pull_subscribe_bind(
                    durable=subjects.INGEST_DURABLE, stream=subjects.METRICS_STREAM
                )
            except Exception as exc:
                log.warning("cannot bind the %s consumer yet: %s", subjects.INGEST_DURABLE, exc)
                await wait_or_stop(stop, 1.0)
        return None

    async def handle(self, msgs: Sequence[Any]) -> bool:
        """One fetch: dead-letter, insert, ack. False when the store is failing."""
        items = [self.parse(msg) for msg in msgs]
        for item in items:
            if item.problem is not None:
                await self.dead_letter(item, item.problem)
        mark_duplicates(items)
        good = [i for i in items if i.batch is not None and not i.duplicate]
        self.stats.redelivered += sum(1 for i in good if (i.attempt or 1) > 1)
        if not good:
            await self.ack_duplicates(items)
            return True
        if await self.insert(good):
            await self.ack_duplicates(items)
            return True
        self.stats.insert_failures += 1
        store_up = await self.store_answers()
        blame_batches = store_up  # one batch refused by a store that answers: its own fault
        if store_up and len(good) > 1:
            # The store is up but refused the group: insert one batch at a time, so one bad
            # batch does not hold back the rest.
            results = [await self.insert([item]) for item in good]
            failed = [item for item, ok in zip(good, results, strict=True) if not ok]
            # Only when others went in is a failure the batch's own; if all fail, the store is
            # refusing inserts (disk full, read-only, too many parts): wait, dead-letter nothing.
            blame_batches = len(failed) < len(good)
        else:
            failed = good
        await self.give_back(failed, dead_letter_last=blame_batches)
        await self.ack_duplicates(items, unless_in=failed)
        return store_up and (blame_batches or not failed)

    def parse(self, msg: Any) -> Fetched:
        parsed = parse_batch(msg.data, ttl_days=self.settings.metrics_ttl_days)
        attempt = delivery_attempt(msg)
        if isinstance(parsed, Unusable):
            return Fetched(msg, attempt=attempt, problem=parsed.reason)
        return Fetched(msg, batch=parsed, attempt=attempt)

    async def insert(self, items: Sequence[Fetched]) -> bool:
        """Store the batches not stored yet, then ack all of them. False if the store failed."""
        batches = [item.batch for item in items if item.batch is not None]
        try:
            stored = await asyncio.to_thread(self.stored_batch_ids, batches)
            fresh = [b for b in batches if b.batch_id not in stored]
            table = to_arrow(fresh)
            if table.num_rows:
                await asyncio.to_thread(
                    self.client.insert_arrow, self.settings.metrics_table, table
                )
        except Exception as exc:
            log.warning(
                "insert of %d metric batches failed: %s: %s", len(batches), type(exc).__name__, exc
            )
            self._last_error = f"{type(exc).__name__}: {exc}"
            return False
        for item in items:
            await item.msg.ack()
        now = self.clock()
        stats = self.stats
        stats.duplicates += len(batches) - len(fresh)
        if table.num_rows:
            stats.inserts += 1
            stats.records += table.num_rows
            stats.last_insert_at = datetime.fromtimestamp(now, UTC)
            newest = newest_ts(fresh)
            stats.last_insert_lag_s = now - newest.timestamp() if newest else None
        stats.batches += len(fresh)
        if self.on_insert is not None:
            self.on_insert(stats)
        return True

    def stored_batch_ids(self, batches: Sequence[RequestMetricsBatch]) -> set[str]:
        """Which of these batches the table already holds (a redelivery after a lost ack, or a
        batch published twice). Runs in a worker thread."""
        query = stored_batches_query(self.settings.metrics_table, batches)
        if query is None:
            return set()
        sql, parameters = query
        held = {
            str(row[0]): int(row[1])
            for row in self.client.query(sql, parameters=parameters).result_rows
        }
        # Partly stored (a partial insert): store it whole again; FINAL collapses the repeats.
        return {b.batch_id for b in batches if held.get(b.batch_id, 0) >= len(b.records) > 0}

    async def give_back(self, failed: Sequence[Fetched], *, dead_letter_last: bool = True) -> None:
        """Nak for a later try; on the last allowed delivery, dead-letter instead, unless the
        failure is the store's (then the batch waits for it, however long it takes)."""
        reason = self._last_error
        for item in failed:
            if dead_letter_last and (item.attempt or 1) >= self.settings.max_deliver:
                await self.dead_letter(item, f"insert failed on attempt {item.attempt}: {reason}")
            else:
                await item.msg.nak(delay=retry_delay(item.attempt, self.retry_base_s))

    async def ack_duplicates(
        self, items: Sequence[Fetched], unless_in: Sequence[Fetched] = ()
    ) -> None:
        """Skipped duplicates are acked once their first copy is stored (or naked with it)."""
        failed_ids = {i.batch.batch_id for i in unless_in if i.batch is not None}
        for item in items:
            if not item.duplicate or item.batch is None:
                continue
            if item.batch.batch_id in failed_ids:
                await item.msg.nak(delay=retry_delay(item.attempt, self.retry_base_s))
            else:
                self.stats.duplicates += 1
                await item.msg.ack()

    def max_payload(self) -> int:
        """The server's max_payload, as the connection learned it (a dead letter must fit)."""
        value = getattr(getattr(self.js, "_nc", None), "max_payload", None)
        return value if isinstance(value, int) and value > 0 else DEFAULT_MAX_PAYLOAD

    async def dead_letter(self, item: Fetched, reason: str) -> bool:
        """To the dead-letter stream, then `term`: True. The letter fits max_payload (a large
        payload is cut); if the stream refuses it anyway, it goes again without the payload.
        Only when even that fails (the bus itself is failing) is the message naked, to be
        dead-lettered when it comes back."""
        msg = item.msg
        payload: bytes = msg.data or b""
        stream, sequence = stream_position(msg)
        letter = make_dead_letter(
            service=SERVICE,
            subject=str(msg.subject),
            payload=payload,
            headers=dict(msg.headers or {}),
            reason=reason,
            attempt=item.attempt,
            max_bytes=self.max_payload(),
            stream=stream,
            stream_sequence=sequence,
        )
        failures: list[str] = []
        for candidate in (letter, without_payload(letter, payload)):
            try:
                await publish_dead_letter(self.js, candidate)
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
                continue
            if failures:
                log.warning("dead letter sent without its payload (%s)", failures[0])
            log.warning("dead-lettered a metrics message on %s: %s", msg.subject, reason[:300])
            self.stats.dead_letters += 1
            await msg.term()
            return True
        delay = retry_delay(item.attempt, self.retry_base_s)
        log.error(
            "could not dead-letter a metrics message (%s); it comes back in %.1f s",
            "; ".join(failures),
            delay,
        )
        self.stats.dead_letter_failures += 1
        await msg.nak(delay=delay)
        return False

    async def store_answers(self) -> bool:
        try:
            await asyncio.to_thread(self.client.command, "SELECT 1")
        except Exception:
            return False
        return True

    async def wait_for_store(self, stop: asyncio.Event) -> None:
        """Fetch nothing until the store answers: naked batches keep their delivery attempts."""
        delay = self.retry_base_s
        while not stop.is_set() and not await self.store_answers():
            log.warning("metrics store does not answer; ingest paused, next try in %.1f s", delay)
            await wait_or_stop(stop, delay)
            delay = min(delay * 2, 30.0)

    def maybe_log(self) -> None:
        if self.clock() - self._last_log >= self.log_every_s:
            self.log_progress()

    def log_progress(self) -> None:
        now = self.clock()
        s = self.stats
        elapsed = max(now - self._last_log, 1e-9)
        rate = (s.records - self._logged_records) / elapsed
        lag = f"{s.last_insert_lag_s:.2f} s" if s.last_insert_lag_s is not None else "-"
        log.info(
            "metrics ingest: %d records in %d batches (%.0f/s lately), %d duplicates skipped, "
            "%d redelivered, %d dead letters (%d refused, retried), %d failed inserts, "
            "last lag %s",
            s.records,
            s.batches,
            rate,
            s.duplicates,
            s.redelivered,
            s.dead_letters,
            s.dead_letter_failures,
            s.insert_failures,
            lag,
        )
        self._last_log, self._logged_records = now, s.records


def without_payload(letter: DeadLetter, payload: bytes) -> DeadLetter:
    """The smallest letter that still says what was lost and where the original is kept."""
    digest = hashlib.sha256(payload).hexdigest()
    where = (
        f"; the whole is {letter.stream} sequence {letter.stream_sequence}"
        if letter.stream_sequence
        else ""
    )
    note = f" [payload of {len(payload)} bytes not kept; sha256 of the whole: {digest}{where}]"
    return letter.model_copy(
        update={
            "reason": letter.reason[: 4000 - len(note)] + note,
            "payload_text": None,
            "payload_b64": None,
            "headers": {},
            "truncated": bool(payload),
        }
    )


async def publish_dead_letter(js: JetStreamContext, letter: DeadLetter) -> None:
    await js.publish(
        subjects.deadletter(letter.service),
        letter.model_dump_json().encode(),
        stream=subjects.DEADLETTER_STREAM,
        headers=dict(bus.CONTENT_TYPE),
    )


async def wait_or_stop(stop: asyncio.Event, seconds: float) -> None:
    await wait_event(stop, seconds)


async def run_ingest(
    js: JetStreamContext,
    client: Any,
    settings: Settings,
    stop: asyncio.Event,
    on_insert: Callable[[IngestStats], object] | None = None,
    *,
    stats: IngestStats | None = None,
) -> None:
    """Ingest metric batches until `stop` is set. Pass `stats` to read progress while it runs."""
    ingestor = Ingestor(js, client, settings, on_insert=on_insert, stats=stats or IngestStats())
    await ingestor.run(stop)
