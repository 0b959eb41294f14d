"""Bus hop latency and one-process service throughput on a real JetStream nats-server (issue #2).

Three paths are measured side by side in one run, each answered by its own child process so
every figure includes a real process hop:

    core     nats-py request/reply to an echo process (the floor: two core NATS hops)
    relay    raw nats-py JetStream: publish (acked) -> durable pull consumer -> publish (acked)
    service  the validator service (FastStream, pydantic, dead-letter wrapper) doing the same:
             DeploymentRequested -> ValidationCompleted

Latency samples are interleaved path by path in rounds, so noise on a shared machine lands on
all paths alike and the ratios stay meaningful. Run `python bench/bus_hop.py --help`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol

import nats
from machine import command_line, describe_machine  # bench/machine.py (scripts run from bench/)
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from services.contracts import subjects
from services.contracts.events import DeploymentRequested
from services.contracts.policy import load_policy_file
from services.contracts.routing import subject_for
from services.runtime import bus, processes, registry
from services.runtime.nats_server import NatsServer
from services.runtime.settings import Settings
from services.validator.app import handle_requested

ECHO_SUBJECT: Final = "bench.echo"
RELAY_STREAM: Final = "BENCH_RELAY"
RELAY_IN: Final = "bench.relay.in"
RELAY_OUT: Final = "bench.relay.out"
RELAY_DURABLE: Final = "relay"
MODEL: Final = "bench-model"
# The token that carries the request key in both reply subjects:
# preflight.stage.<model>.<deployment_id>.validated and bench.relay.out.<key>.
KEY_TOKEN: Final = 3
HOP_TIMEOUT_S: Final = 10.0
READY_TIMEOUT_S: Final = 60.0


# ---- children: the processes that answer ----------------------------------------------------


async def run_echo(url: str) -> None:
    """Core NATS responder: replies with the request's body."""
    nc = await nats.connect(url, name="bench-echo")

    async def reply(msg: Msg) -> None:
        await msg.respond(msg.data)

    await nc.subscribe(ECHO_SUBJECT, cb=reply)
    await nc.flush()
    await asyncio.Event().wait()


async def run_relay(url: str) -> None:
    """Raw nats-py JetStream worker, shaped like a service without FastStream or pydantic.

    Same pull pattern as the services (batch 10, 1 s lingering pull), same acked publish of the
    result into a file stream with a dedup id, then an explicit ack of the input.
    """
    nc = await nats.connect(url, name="bench-relay")
    js = nc.jetstream()
    sub = await js.pull_subscribe_bind(RELAY_DURABLE, stream=RELAY_STREAM)
    while True:
        try:
            msgs = await sub.fetch(10, timeout=1.0)
        except TimeoutError:
            continue
        for msg in msgs:
            key = msg.subject.rsplit(".", 1)[1]
            await js.publish(
                f"{RELAY_OUT}.{key}",
                msg.data,
                stream=RELAY_STREAM,
                headers={bus.MSG_ID_HEADER: f"{key}:out"},
            )
            await msg.ack()


async def run_validator() -> None:
    """The validator service exactly as deployed, settings from PREFLIGHT_* in the environment."""
    svc = registry.build("validator", Settings())
    await svc.app.run()


def run_child(kind: str) -> None:
    url = os.environ["PREFLIGHT_NATS_URL"]
    mains: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {
        "echo": lambda: run_echo(url),
        "relay": lambda: run_relay(url),
        "validator": run_validator,
    }
    asyncio.run(mains[kind]())


# ---- measuring --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hop:
    """One request's round trip and, for JetStream paths, how long the publish ack took."""

    total_s: float
    ack_s: float | None = None


@dataclass(frozen=True)
class Outgoing:
    """A prepared JetStream publish; built before the clock starts."""

    key: str
    subject: str
    payload: bytes
    stream: str
    headers: dict[str, str]


class Arrivals:
    """Arrival times (perf_counter) of reply messages, matched to requests by subject token."""

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Future[float]] = {}

    def expect(self, key: str) -> asyncio.Future[float]:
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._waiting[key] = future
        return future

    def forget(self, key: str) -> None:
        self._waiting.pop(key, None)

    async def on_msg(self, msg: Msg) -> None:
        now = time.perf_counter()
        future = self._waiting.pop(msg.subject.split(".")[KEY_TOKEN], None)
        if future is not None and not future.done():
            future.set_result(now)


class BenchPath(Protocol):
    """One way of getting a message to another process and an answer back."""

    name: str
    label: str

    async def hop(self, key: str, limit_s: float) -> Hop: ...


@dataclass
class CorePath:
    nc: NATS
    payload: bytes
    name: str = "core"
    label: str = "core request/reply (nats-py -> echo process)"

    async def hop(self, key: str, limit_s: float) -> Hop:
        t0 = time.perf_counter()
        await self.nc.request(ECHO_SUBJECT, self.payload, timeout=limit_s)
        return Hop(time.perf_counter() - t0)


@dataclass
class JetStreamPath:
    """Acked JetStream publish in, reply event observed on a core subscription."""

    js: JetStreamContext
    arrivals: Arrivals
    prepare: Callable[[str], Outgoing]
    name: str
    label: str

    async def hop(self, key: str, limit_s: float) -> Hop:
        out = self.prepare(key)
        arrived = self.arrivals.expect(key)
        t0 = time.perf_counter()
        try:
            await self.js.publish(
                out.subject, out.payload, timeout=limit_s, stream=out.stream, headers=out.headers
            )
            t_ack = time.perf_counter()
            t1 = await asyncio.wait_for(arrived, limit_s)
        finally:
            self.arrivals.forget(key)
        return Hop(t1 - t0, t_ack - t0)

    async def burst(self, keys: Sequence[str], limit_s: float) -> Burst:
        """Publish every key as fast as acks allow; time until the last reply event arrives."""
        outs = [self.prepare(k) for k in keys]
        arrived = [self.arrivals.expect(k) for k in keys]
        acks: list[asyncio.Future[api.PubAck]] = []
        t0 = time.perf_counter()
        for out in outs:
            acks.append(
                await self.js.publish_async(
                    out.subject, out.payload, stream=out.stream, headers=out.headers
                )
            )
        await asyncio.wait_for(self.js.publish_async_completed(), limit_s)
        t_published = time.perf_counter()
        failed = sum(1 for a in acks if a.exception() is not None)
        if failed:
            raise RuntimeError(f"{self.name}: {failed} of {len(acks)} publishes were not acked")
        done, pending = await asyncio.wait(arrived, timeout=limit_s)
        for k in keys:
            self.arrivals.forget(k)
        if pending:
            raise RuntimeError(
                f"{self.name}: only {len(done)} of {len(keys)} replies within {limit_s} s"
            )
        t_last = max(f.result() for f in done)
        return Burst(
            path=self.name,
            messages=len(keys),
            elapsed_s=round(t_last - t0, 3),
            events_per_s=round(len(keys) / (t_last - t0), 1),
            published_per_s=round(len(keys) / (t_published - t0), 1),
        )


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Latency:
    path: str
    label: str
    samples: int
    p50_us: float
    p99_us: float
    mean_us: float
    max_us: float
    ack_p50_us: float | None
    x_core_p50: float = 0.0


@dataclass(frozen=True)
class Burst:
    path: str
    messages: int
    elapsed_s: float
    events_per_s: float
    published_per_s: float


def summarise(path: BenchPath, hops: Sequence[Hop]) -> Latency:
    totals = [h.total_s * 1e6 for h in hops]
    acks = [h.ack_s * 1e6 for h in hops if h.ack_s is not None]
    return Latency(
        path=path.name,
        label=path.label,
        samples=len(totals),
        p50_us=round(percentile(totals, 50), 1),
        p99_us=round(percentile(totals, 99), 1),
        mean_us=round(sum(totals) / len(totals), 1),
        max_us=round(max(totals), 1),
        ack_p50_us=round(percentile(acks, 50), 1) if acks else None,
    )


@dataclass(frozen=True)
class HandlerWork:
    """The validator's per-message work without any bus: parse, policy, build, encode."""

    iterations: int
    p50_us: float
    mean_us: float


def measure_handler_work(payload: bytes, iterations: int) -> HandlerWork:
    policy_file = load_policy_file(None)
    costs: list[float] = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        request = DeploymentRequested.model_validate_json(payload)
        for event in handle_requested(request, policy_file, "bench"):
            bus.encode(event)
            bus.headers_for(event)
        costs.append((time.perf_counter() - t0) * 1e6)
    return HandlerWork(
        iterations, round(percentile(costs, 50), 1), round(sum(costs) / len(costs), 1)
    )


async def wait_ready(path: BenchPath, keys: KeySource) -> None:
    """Retry one hop until the child process answers (its start-up is not measured)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        try:
            await path.hop(keys.next(f"{path.name}-ready"), limit_s=5.0)
            return
        except (TimeoutError, nats.errors.NoRespondersError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{path.name}: no answer within {READY_TIMEOUT_S} s") from None
            await asyncio.sleep(0.1)


@dataclass
class KeySource:
    """Unique request keys (deployment ids): valid ids and subject tokens, unique per run."""

    run: str = field(default_factory=lambda: secrets.token_hex(3))
    count: int = 0

    def next(self, tag: str) -> str:
        self.count += 1
        return f"b{self.run}-{tag}-{self.count}"


# ---- wiring -----------------------------------------------------------------------------------


def deployment_request(key: str, location: str) -> Outgoing:
    event = DeploymentRequested(deployment_id=key, model=MODEL, version="1", location=location)
    return Outgoing(
        key=key,
        subject=subject_for(event),
        payload=bus.encode(event),
        stream=subjects.EVENTS_STREAM,
        headers=bus.headers_for(event),
    )


def relay_request(key: str, payload: bytes) -> Outgoing:
    return Outgoing(
        key=key,
        subject=f"{RELAY_IN}.{key}",
        payload=payload,
        stream=RELAY_STREAM,
        headers={bus.MSG_ID_HEADER: f"{key}:in", **bus.CONTENT_TYPE},
    )


async def ensure_relay_topology(js: JetStreamContext, settings: Settings) -> None:
    await js.add_stream(
        api.StreamConfig(
            name=RELAY_STREAM,
            subjects=[f"{RELAY_IN}.*", f"{RELAY_OUT}.*"],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            duplicate_window=settings.events_duplicate_window_s,
        )
    )
    await js.add_consumer(
        RELAY_STREAM, bus.consumer_config(RELAY_DURABLE, [f"{RELAY_IN}.*"], settings)
    )


def spawn_child(kind: str, settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PREFLIGHT_NATS_URL": settings.nats_url,
        "PREFLIGHT_DATA_DIR": str(settings.data_dir),
        "PREFLIGHT_INSTANCE": f"bench-{kind}",
    }
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", kind]
    return processes.spawn(argv, env=env, log=log)


@dataclass
class Report:
    command: str
    when_utc: str
    machine: dict[str, Any]
    params: dict[str, int]
    latency: list[Latency]
    handler_work: HandlerWork
    throughput: list[Burst]
    notes: list[str]


async def measure(args: argparse.Namespace, settings: Settings, logs: Path) -> Report:
    """Start the answering children, measure every path, stop the children."""
    rounds = max(1, min(args.rounds, args.n))
    machine = machine_info()
    started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    location = "/models/bench-model/1"
    payload = deployment_request("b000-payload", location).payload
    nc = await bus.connect(settings, "bench-bus-hop")
    children: list[subprocess.Popen[bytes]] = []
    try:
        js = nc.jetstream()
        await bus.ensure_topology(js, settings)
        await ensure_relay_topology(js, settings)
        arrivals = Arrivals()
        await nc.subscribe(subjects.stage_filter("validated"), cb=arrivals.on_msg)
        await nc.subscribe(f"{RELAY_OUT}.*", cb=arrivals.on_msg)
        await nc.flush()
        for kind in ("echo", "relay", "validator"):
            children.append(spawn_child(kind, settings, logs / f"{kind}.log"))

        core = CorePath(nc, payload)
        relay = JetStreamPath(
            js,
            arrivals,
            lambda k: relay_request(k, payload),
            name="relay",
            label="JetStream relay (raw nats-py pull + acked publish)",
        )
        service = JetStreamPath(
            js,
            arrivals,
            lambda k: deployment_request(k, location),
            name="service",
            label="validator service (FastStream + pydantic)",
        )
        paths: list[BenchPath] = [core, relay, service]
        keys = KeySource()
        for path in paths:
            await wait_ready(path, keys)
            for _ in range(args.warmup):
                await path.hop(keys.next(f"{path.name}-warm"), HOP_TIMEOUT_S)

        hops: dict[str, list[Hop]] = {p.name: [] for p in paths}
        for r in range(rounds):
            share = args.n // rounds + (1 if r < args.n % rounds else 0)
            for path in paths[r % len(paths) :] + paths[: r % len(paths)]:
                for _ in range(share):
                    hops[path.name].append(
                        await path.hop(keys.next(f"{path.name}-lat"), HOP_TIMEOUT_S)
                    )
        latency = [summarise(p, hops[p.name]) for p in paths]
        core_p50 = latency[0].p50_us
        latency = [replace(lat, x_core_p50=round(lat.p50_us / core_p50, 2)) for lat in latency]

        # CPU only, in this process while the children idle: what the service adds on top of the
        # relay that is not FastStream.
        handler_work = measure_handler_work(payload, max(200, args.n))

        throughput = []
        for jpath in (relay, service):
            burst_keys = [keys.next(f"{jpath.name}-burst") for _ in range(args.burst)]
            throughput.append(await jpath.burst(burst_keys, limit_s=args.burst_timeout))
    finally:
        for child in children:
            processes.terminate(child, timeout=5.0)
        await nc.close()
    return Report(
        command=command_line(),
        when_utc=started,
        machine=machine,
        params={
            "n": args.n,
            "warmup": args.warmup,
            "rounds": rounds,
            "burst": args.burst,
            "payload_bytes": len(payload),
        },
        latency=latency,
        handler_work=handler_work,
        throughput=throughput,
        notes=[
            "Each path is answered by its own child process; publisher, answerer and "
            "nats-server share the machine's cores.",
            "Latency: sequential, one request in flight; JetStream paths time from publish to "
            "the reply event arriving on a core subscription (publish ack included).",
            "Throughput: js.publish_async of the whole burst, then time until the last reply "
            "event arrives.",
        ],
    )


def machine_info() -> dict[str, Any]:
    return describe_machine(("nats-py", "faststream", "pydantic"), nats_server=True)


def render(report: Report) -> str:
    m = report.machine
    p = report.params
    lines = [
        "preflight bench: bus hop latency and service throughput (issue #2)",
        f"command : {report.command}",
        f"when    : {report.when_utc}",
        f"machine : {m['nproc']} CPUs, {m['cpu_model']}, {m['os']}, "
        f"load {m['loadavg_1m_at_start']} at start",
        f"software: Python {m['python']}, nats-server {m['nats_server']}, "
        f"nats-py {m['nats-py']}, FastStream {m['faststream']}, pydantic {m['pydantic']}",
        "",
        f"Hop latency: {p['n']} sequential requests per path after {p['warmup']} warm-up, "
        f"interleaved in {p['rounds']} rounds; payload {p['payload_bytes']} B",
        f"  {'path':<52}{'p50 us':>9}{'p99 us':>9}{'mean us':>9}{'ack p50':>9}{'x core':>8}",
    ]
    for lat in report.latency:
        ack = f"{lat.ack_p50_us:.0f}" if lat.ack_p50_us is not None else "-"
        lines.append(
            f"  {lat.label:<52}{lat.p50_us:>9.0f}{lat.p99_us:>9.0f}{lat.mean_us:>9.0f}"
            f"{ack:>9}{lat.x_core_p50:>8.1f}"
        )
    work = report.handler_work
    lines.append(
        f"  validator handler work alone, no bus (parse + policy + events + encode): "
        f"p50 {work.p50_us:.0f} us, mean {work.mean_us:.0f} us ({work.iterations} runs)"
    )
    lines += [
        "",
        f"Throughput: burst of {p['burst']} requests into one answering process",
        f"  {'path':<52}{'events/s':>10}{'published/s':>13}{'elapsed s':>11}",
    ]
    labels = {lat.path: lat.label for lat in report.latency}
    for b in report.throughput:
        lines.append(
            f"  {labels[b.path]:<52}{b.events_per_s:>10.0f}{b.published_per_s:>13.0f}"
            f"{b.elapsed_s:>11.2f}"
        )
    lines += ["", *(f"note: {n}" for n in report.notes)]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=500, help="sequential requests per path (500)")
    parser.add_argument("--warmup", type=int, default=50, help="warm-up requests per path (50)")
    parser.add_argument("--rounds", type=int, default=10, help="interleaving rounds (10)")
    parser.add_argument("--burst", type=int, default=5000, help="burst size per path (5000)")
    parser.add_argument(
        "--burst-timeout", type=float, default=40.0, help="seconds to wait for a burst (40)"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--child", choices=("echo", "relay", "validator"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.n < 1 or args.burst < 1 or args.warmup < 0:
        parser.error("--n and --burst must be positive, --warmup not negative")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        run_child(args.child)
        return 0
    with tempfile.TemporaryDirectory(prefix="preflight-bench-") as tmp:
        root = Path(tmp)
        server = NatsServer(root / "nats").start()
        try:
            settings = Settings(nats_url=server.url, data_dir=root / "data", instance="bench")
            try:
                report = asyncio.run(measure(args, settings, root / "logs"))
            except Exception:
                for log in sorted((root / "logs").glob("*.log")):
                    tail = log.read_text(errors="replace")[-2000:]
                    print(f"--- {log.name} (tail) ---\n{tail}", file=sys.stderr)
                raise
        finally:
            server.stop()
    print(json.dumps(asdict(report), indent=2) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
