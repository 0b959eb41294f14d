"""Request-metrics ingest and window queries on a real nats-server and chDB (issue #5).

Three figures, side by side in one run, in one process (the embedded stack's layout: the ingest
and the queries share the chDB engine):

    throughput  N batches of 500 records already in the stream; `run_ingest` starts; timed until
                the last record is queryable (count FINAL == N * 500)
    lag         a simulated router publishes records at a steady rate in batches (every 200 ms
                or 500 records, like services/router); a poller counts rows every 20 ms; lag of
                a record = first poll that sees it - its ts
    query       `query_window` over a 180 s window holding 1.8M rows of one deployment (plus
                other deployments' rows and re-inserted duplicate batches), repeated; the same
                query without FINAL alongside, to show what deduplication costs

Run `python bench/ingest_bench.py --help`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import secrets
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
from machine import command_line, describe_machine  # bench/machine.py (scripts run from bench/)
from nats.js import JetStreamContext

from services.contracts import subjects
from services.contracts.events import RequestMetricsBatch, RequestRecord
from services.metrics import ingest, queries
from services.runtime import bus, clickhouse
from services.runtime.nats_server import NatsServer
from services.runtime.settings import Settings

RECORDS_PER_BATCH: Final = 500
MODEL: Final = "org/chat-7b"
POLL_S: Final = 0.02


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def synthetic_batch(
    deployment_id: str, stamps: Sequence[float], rng: np.random.Generator
) -> RequestMetricsBatch:
    latencies = rng.gamma(2.0, 20.0, len(stamps))
    statuses = np.where(rng.random(len(stamps)) < 0.01, 503, 200)
    return RequestMetricsBatch(
        batch_id=f"bench-{secrets.token_hex(8)}",
        source="bench-router",
        records=tuple(
            RequestRecord(
                ts=datetime.fromtimestamp(t, UTC),
                deployment_id=deployment_id,
                model=MODEL,
                version="2" if k % 10 == 0 else "1",
                role="canary" if k % 10 == 0 else "stable",
                latency_ms=float(latencies[k]),
                ttfb_ms=float(latencies[k]) / 4,
                status=int(statuses[k]),
            )
            for k, t in enumerate(stamps)
        ),
    )


async def publish(js: JetStreamContext, batch: RequestMetricsBatch) -> None:
    await js.publish(
        subjects.metrics("bench-router"),
        batch.model_dump_json().encode(),
        stream=subjects.METRICS_STREAM,
        headers={bus.MSG_ID_HEADER: batch.batch_id},
    )


def count_rows(client: Any, table: str, deployment_id: str) -> int:
    sql = f"SELECT count() FROM {table} FINAL WHERE deployment_id = {{d:String}}"  # noqa: S608
    return int(client.query(sql, parameters={"d": deployment_id}).result_rows[0][0])


class Ingesting:
    """`run_ingest` as a task, with its stats."""

    def __init__(self, js: JetStreamContext, client: Any, settings: Settings) -> None:
        self.stats = ingest.IngestStats()
        self.stop = asyncio.Event()
        self.inserted = asyncio.Event()
        self.task = asyncio.create_task(
            ingest.run_ingest(
                js, client, settings, self.stop, lambda _: self.inserted.set(), stats=self.stats
            )
        )

    async def until(self, records: int) -> None:
        """Until the ingest has inserted at least this many records."""
        while self.stats.records < records:
            self.inserted.clear()
            await asyncio.wait_for(self.inserted.wait(), 60)

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 30)


# ---- throughput ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Throughput:
    records: int
    batches: int
    inserts: int
    publish_s: float
    ingest_s: float
    records_per_s: float


async def measure_throughput(
    js: JetStreamContext, client: Any, settings: Settings, batches: int, rng: np.random.Generator
) -> Throughput:
    deployment_id = f"d-bench-tp-{secrets.token_hex(3)}"
    t0 = time.time() - 600
    prepared = [
        synthetic_batch(
            deployment_id,
            [t0 + (b * RECORDS_PER_BATCH + k) * 1e-3 for k in range(RECORDS_PER_BATCH)],
            rng,
        )
        for b in range(batches)
    ]
    payloads = [(b.batch_id, b.model_dump_json().encode()) for b in prepared]
    start = time.perf_counter()
    for batch_id, data in payloads:
        await js.publish_async(
            subjects.metrics("bench-router"),
            data,
            stream=subjects.METRICS_STREAM,
            headers={bus.MSG_ID_HEADER: batch_id},
        )
    await js.publish_async_completed()
    publish_s = time.perf_counter() - start
    total = batches * RECORDS_PER_BATCH

    running = Ingesting(js, client, settings)
    start = time.perf_counter()
    await running.until(total)
    elapsed = time.perf_counter() - start
    await running.close()
    stored = await asyncio.to_thread(count_rows, client, settings.metrics_table, deployment_id)
    if stored != total:
        raise RuntimeError(f"throughput: {stored} rows queryable, expected {total}")
    return Throughput(
        records=total,
        batches=batches,
        inserts=running.stats.inserts,
        publish_s=round(publish_s, 3),
        ingest_s=round(elapsed, 3),
        records_per_s=round(total / elapsed),
    )


# ---- lag ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lag:
    rate_per_s: int
    seconds: float
    records: int
    batches: int
    polls: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float


class Poller(threading.Thread):
    """Counts a deployment's rows every POLL_S on its own client, noting when each count came."""

    def __init__(self, client: Any, table: str, deployment_id: str) -> None:
        super().__init__(daemon=True)
        self.client, self.table, self.deployment_id = client, table, deployment_id
        self.seen: list[tuple[float, int]] = []
        self.halt = threading.Event()
        self.target: int | None = None
        self.reached = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            count = count_rows(self.client, self.table, self.deployment_id)
            self.seen.append((time.time(), count))
            if self.target is not None and count >= self.target:
                self.reached.set()
            self.halt.wait(POLL_S)


async def measure_lag(
    js: JetStreamContext,
    client: Any,
    poll_client: Any,
    settings: Settings,
    rate: int,
    seconds: float,
    rng: np.random.Generator,
) -> Lag:
    """A router's batching (200 ms or 500 records) at a steady request rate, then visibility."""
    deployment_id = f"d-bench-lag-{secrets.token_hex(3)}"
    interval = settings.metrics_batch_interval_s
    running = Ingesting(js, client, settings)
    poller = Poller(poll_client, settings.metrics_table, deployment_id)
    poller.start()
    stamps: list[float] = []
    batches = 0
    start = time.time()
    next_request = start
    pending: list[float] = []
    flush_at = start + interval
    while next_request < start + seconds:
        now = time.time()
        while next_request <= now and len(pending) < RECORDS_PER_BATCH:
            pending.append(next_request)
            next_request += 1.0 / rate
        if pending and (len(pending) >= RECORDS_PER_BATCH or now >= flush_at):
            await publish(js, synthetic_batch(deployment_id, pending, rng))
            stamps.extend(pending)
            batches += 1
            pending = []
            flush_at = now + interval
        await asyncio.sleep(0.002)
    if pending:
        await publish(js, synthetic_batch(deployment_id, pending, rng))
        stamps.extend(pending)
        batches += 1
    await running.until(len(stamps))
    poller.target = len(stamps)
    if not await asyncio.to_thread(poller.reached.wait, 30):
        raise RuntimeError("lag: the poller never saw every record")
    poller.halt.set()
    await asyncio.to_thread(poller.join)
    await running.close()

    # One ingest, one consumer, in-order fetches: records become visible in publish order.
    lags: list[float] = []
    polls = iter(poller.seen)
    seen_at, seen_count = next(polls)
    for i, ts in enumerate(stamps):
        while seen_count <= i:
            seen_at, seen_count = next(polls)
        lags.append((seen_at - ts) * 1000)
    return Lag(
        rate_per_s=rate,
        seconds=seconds,
        records=len(stamps),
        batches=batches,
        polls=len(poller.seen),
        p50_ms=round(percentile(lags, 50), 1),
        p95_ms=round(percentile(lags, 95), 1),
        p99_ms=round(percentile(lags, 99), 1),
        max_ms=round(max(lags), 1),
    )


# ---- query --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueryTimes:
    label: str
    runs: int
    p50_ms: float
    p95_ms: float
    canary_requests: int
    stable_requests: int


@dataclass(frozen=True)
class QueryPhase:
    """One state of the table and the timings of every query variant on it."""

    name: str
    duplicate_rows: int
    active_parts: int
    times: list[QueryTimes]


@dataclass(frozen=True)
class QueryReport:
    window_rows: int
    other_rows: int
    load_s: float
    phases: list[QueryPhase]


@dataclass(frozen=True)
class QuerySpec:
    rows: int
    other: int
    dup_share: float
    runs: int
    block: int


def arrow_rows(
    deployment_id: str, start_ms: int, total: int, offset: int, n: int, rng: np.random.Generator
) -> Any:
    """Rows offset..offset+n of `total` spread evenly over 180 s from `start_ms`."""
    idx = np.arange(offset, offset + n)
    canary = idx % 10 == 0
    return pa.Table.from_arrays(
        [
            pa.array(start_ms + idx * 180_000 // total, pa.timestamp("ms", tz="UTC")),
            pa.array([deployment_id] * n),
            pa.array([MODEL] * n),
            pa.array(np.where(canary, "2", "1")),
            pa.array(np.where(canary, "canary", "stable")),
            pa.array(rng.gamma(2.0, 20.0, n)),
            pa.nulls(n, pa.float64()),
            pa.array(np.where(rng.random(n) < 0.01, 503, 200), pa.uint16()),
            pa.array([""] * n),
            pa.array([f"{deployment_id}-{i // RECORDS_PER_BATCH}" for i in idx]),
            pa.array(idx % RECORDS_PER_BATCH, pa.uint32()),
        ],
        schema=ingest.ARROW_SCHEMA,
    )


class QueryTable:
    """The 180 s window's rows, loaded in inserts of one fetch's size (what the ingest writes),
    with other deployments' rows in the same period."""

    deployment_id: Final = "d-bench-query"

    def __init__(self, client: Any, spec: QuerySpec, rng: np.random.Generator) -> None:
        self.client, self.spec, self.rng = client, spec, rng
        self.table = f"bench_query_{secrets.token_hex(3)}"
        self.start = (datetime.now(UTC) - timedelta(hours=1)).replace(microsecond=0)
        self.start_ms = queries.epoch_ms(self.start)
        self.duplicate_rows = 0

    def load(self) -> float:
        self.client.command(clickhouse.metrics_table_ddl(self.table, 30))
        t0 = time.perf_counter()
        spec = self.spec
        for dep, total in (
            ("d-bench-other-a", spec.other // 2),
            (self.deployment_id, spec.rows),
            ("d-bench-other-b", spec.other - spec.other // 2),
        ):
            for s in range(0, total, spec.block):
                k = min(spec.block, total - s)
                rows = arrow_rows(dep, self.start_ms, total, s, k, self.rng)
                self.client.insert_arrow(self.table, rows)
        return time.perf_counter() - t0

    def store_duplicates(self) -> None:
        """Every 1/dup_share-th batch of the window stored again, in one insert: the worst case
        for FINAL (one part that overlaps every other part of the window)."""
        every = max(1, round(1 / self.spec.dup_share))
        offsets = range(0, self.spec.rows, every * RECORDS_PER_BATCH)
        tables = [
            arrow_rows(
                self.deployment_id, self.start_ms, self.spec.rows, o, RECORDS_PER_BATCH, self.rng
            )
            for o in offsets
        ]
        self.client.insert_arrow(self.table, pa.concat_tables(tables))
        self.duplicate_rows += len(tables) * RECORDS_PER_BATCH

    def active_parts(self) -> int:
        rows = self.client.query(
            "SELECT count() FROM system.parts WHERE active AND table = {t:String}",
            parameters={"t": self.table},
        ).result_rows
        return int(rows[0][0])

    def measure(self, name: str) -> QueryPhase:
        client, table, dep = self.client, self.table, self.deployment_id
        start, end = self.start, self.start + timedelta(seconds=180)
        params = {
            "deployment_id": dep,
            "start_ms": queries.epoch_ms(start),
            "end_ms": queries.epoch_ms(end),
        }

        def final() -> tuple[int, int]:
            r = queries.query_window(client, table, dep, start, end)
            return r.canary.requests, r.stable.requests

        def plain() -> tuple[int, int]:
            sql = queries.window_sql(table, final=False)
            got = {row[0]: int(row[1]) for row in client.query(sql, parameters=params).result_rows}
            return got.get("canary", 0), got.get("stable", 0)

        def raw() -> tuple[int, int]:
            r = queries.query_window(client, table, dep, start, end, raw=True)
            return len(r.canary.latencies_ms), len(r.stable.latencies_ms)

        variants = [
            ("query_window (FINAL: duplicates collapsed)", final),
            ("same query without FINAL (duplicates counted)", plain),
        ]
        if not self.duplicate_rows:
            variants.append(("query_window raw=True (+ latencies, 20k sample per role)", raw))
        parts = self.active_parts()
        samples: dict[str, list[float]] = {label: [] for label, _ in variants}
        answers = {label: fn() for label, fn in variants}  # warm-up: first touch of the parts
        for _ in range(self.spec.runs):  # interleaved: machine noise lands on every variant
            for label, fn in variants:
                t0 = time.perf_counter()
                answers[label] = fn()
                samples[label].append((time.perf_counter() - t0) * 1000)
        return QueryPhase(
            name=name,
            duplicate_rows=self.duplicate_rows,
            active_parts=parts,
            times=[
                QueryTimes(
                    label=label,
                    runs=self.spec.runs,
                    p50_ms=round(statistics.median(samples[label]), 1),
                    p95_ms=round(percentile(samples[label], 95), 1),
                    canary_requests=answers[label][0],
                    stable_requests=answers[label][1],
                )
                for label, _ in variants
            ],
        )


def measure_queries(client: Any, spec: QuerySpec, rng: np.random.Generator) -> QueryReport:
    table = QueryTable(client, spec, rng)
    load_s = table.load()
    phases = [table.measure("as the ingest leaves it (duplicates skipped before insert)")]
    if spec.dup_share > 0:
        table.store_duplicates()
        phases.append(table.measure(f"worst case: {spec.dup_share:.0%} of batches stored twice"))
    # Background merges leave one part per partition in the end; FINAL then has little to do.
    client.command(f"OPTIMIZE TABLE {table.table} FINAL")
    phases.append(table.measure("after the parts are merged (OPTIMIZE TABLE ... FINAL)"))
    return QueryReport(spec.rows, spec.other, round(load_s, 2), phases)


# ---- report -------------------------------------------------------------------------------------


@dataclass
class Report:
    command: str
    when_utc: str
    machine: dict[str, Any]
    params: dict[str, Any]
    throughput: list[Throughput]
    lag: Lag
    query: QueryReport


def machine_info() -> dict[str, Any]:
    return describe_machine(
        ("chdb-core", "clickhouse-connect", "pyarrow", "nats-py", "pydantic"), nats_server=True
    )


def render(report: Report) -> str:
    m, p = report.machine, report.params
    tp = report.throughput
    rates = [t.records_per_s for t in tp]
    lines = [
        "preflight bench: request-metrics ingest and window queries (issue #5)",
        f"command : {report.command}",
        f"when    : {report.when_utc}",
        f"machine : {m['nproc']} CPUs, {m['cpu_model']}, {m['os']}, "
        f"load {m['loadavg_1m_at_start']} at start",
        f"software: Python {m['python']}, nats-server {m['nats_server']}, nats-py {m['nats-py']}, "
        f"chdb-core {m['chdb-core']}, clickhouse-connect {m['clickhouse-connect']}, "
        f"pyarrow {m['pyarrow']}, pydantic {m['pydantic']}",
        "",
        f"Ingest throughput: {tp[0].batches} batches x {RECORDS_PER_BATCH} records in the stream,"
        f" fetch {p['fetch_batch']} per insert; until all are queryable (goal >= 50,000/s)",
        f"  {'round':<8}{'records':>10}{'inserts':>9}{'ingest s':>10}{'records/s':>11}"
        f"{'(publish s)':>13}",
    ]
    for i, t in enumerate(tp, 1):
        lines.append(
            f"  {i:<8}{t.records:>10}{t.inserts:>9}{t.ingest_s:>10.2f}{t.records_per_s:>11}"
            f"{t.publish_s:>13.2f}"
        )
    lines.append(f"  median {statistics.median(rates):,.0f} records/s")
    lag = report.lag
    lines += [
        "",
        f"Lag from request (record ts) to queryable: {lag.rate_per_s} records/s for "
        f"{lag.seconds:.0f} s, router-style batches (200 ms or 500 records), poll every "
        f"{POLL_S * 1000:.0f} ms (goal p95 <= 1 s)",
        f"  {lag.records} records in {lag.batches} batches, {lag.polls} polls: "
        f"p50 {lag.p50_ms:.0f} ms, p95 {lag.p95_ms:.0f} ms, p99 {lag.p99_ms:.0f} ms, "
        f"max {lag.max_ms:.0f} ms",
    ]
    q = report.query
    lines += [
        "",
        f"Window query: 180 s window holding {q.window_rows:,} rows of one deployment "
        f"(+{q.other_rows:,} rows of other deployments), loaded in {q.load_s:.1f} s "
        "(goal <= 50 ms)",
    ]
    for phase in q.phases:
        lines += [
            f"  {phase.name}: {phase.duplicate_rows:,} duplicate rows, "
            f"{phase.active_parts} active parts",
            f"    {'query':<58}{'p50 ms':>8}{'p95 ms':>8}{'canary':>10}{'stable':>10}",
        ]
        for qt in phase.times:
            lines.append(
                f"    {qt.label:<58}{qt.p50_ms:>8.1f}{qt.p95_ms:>8.1f}{qt.canary_requests:>10}"
                f"{qt.stable_requests:>10}"
            )
        final, plain = phase.times[0], phase.times[1]
        lines.append(
            f"    FINAL costs {final.p50_ms - plain.p50_ms:+.1f} ms at p50 "
            f"({final.p50_ms / plain.p50_ms:.2f}x); {final.runs} runs each, interleaved"
        )
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> Report:
    rng = np.random.default_rng(args.seed)
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="preflight-ingest-bench-") as tmp:
        server = NatsServer(Path(tmp) / "nats").start()
        try:
            settings = Settings(
                nats_url=server.url,
                data_dir=Path(tmp) / "data",
                instance="bench",
                metrics_table=f"bench_ingest_{secrets.token_hex(3)}",
            )
            client = clickhouse.open_client(settings)
            poll_client = clickhouse.open_client(settings)  # same path, its own handle
            clickhouse.ensure_metrics_table(client, settings)
            nc = await bus.connect(settings, "bench-ingest")
            js = nc.jetstream()
            await bus.ensure_topology(js, settings)
            try:
                throughput = [
                    await measure_throughput(js, client, settings, args.batches, rng)
                    for _ in range(args.rounds)
                ]
                lag = await measure_lag(
                    js, client, poll_client, settings, args.rate, args.seconds, rng
                )
            finally:
                await nc.close()
            spec = QuerySpec(
                rows=args.rows,
                other=args.other,
                dup_share=args.dup_share,
                runs=args.runs,
                block=settings.ingest_fetch_batch * RECORDS_PER_BATCH,
            )
            query = await asyncio.to_thread(measure_queries, client, spec, rng)
        finally:
            server.stop()
    return Report(
        command=command_line(),
        when_utc=datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        machine=machine,
        params={
            **{k: v for k, v in vars(args).items() if k != "json"},
            "fetch_batch": settings.ingest_fetch_batch,
        },
        throughput=throughput,
        lag=lag,
        query=query,
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--batches", type=int, default=400, help="throughput: batches of 500")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds")
    parser.add_argument("--rate", type=int, default=10_000, help="lag: records per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="lag: publishing time")
    parser.add_argument("--rows", type=int, default=1_800_000, help="query: rows in the window")
    parser.add_argument("--other", type=int, default=600_000, help="query: other deployments")
    parser.add_argument(
        "--dup-share", type=float, default=0.01, help="query: share of batches inserted twice"
    )
    parser.add_argument("--runs", type=int, default=30, help="query: timed runs per variant")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = asyncio.run(run(args))
    print(json.dumps(asdict(report), indent=2) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
