"""Router added latency at a fixed request rate, against the upstream direct and nginx (issue #5).

Three paths to the same two synthetic upstreams (latency 0), side by side in one run:

    direct   the client calls the stable upstream itself (the floor)
    router   the client calls the preflight router (a child process, routes from a real
             nats-server KV bucket, request metrics published to JetStream as in production)
    nginx    the client calls nginx (Debian package) configured as the same weighted proxy:
             `split_clients` on $request_id with the same canary weight, keepalive upstreams

The load is open-loop at a fixed rate (services/inference_server/load.py, in this process), and
the paths take turns in rounds so machine noise lands on all of them alike. "Added" is a path's
percentile minus the direct path's percentile of the same run. Run `python bench/router_bench.py
--help`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from machine import command_line, describe_machine  # bench/machine.py (scripts run from bench/)

from services.contracts import subjects
from services.contracts.events import Route, RouteTarget
from services.inference_server.load import LoadResult, generate_load
from services.runtime import bus, processes
from services.runtime.nats_server import NatsServer
from services.runtime.settings import Settings

MODEL: Final = "bench/model"
NGINX: Final = Path("/usr/sbin/nginx")
READY_TIMEOUT_S: Final = 30.0


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    url: str
    log: Path


def wait_for_line(proc: subprocess.Popen[bytes], log: Path, marker: str) -> str:
    """The first log line containing `marker` (the child prints its URL there)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if log.exists():
            for line in log.read_text(errors="replace").splitlines():
                if marker in line:
                    return line
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise RuntimeError(f"{log.stem} did not print {marker!r}:\n{tail}")


def spawn_upstream(version: str, logs: Path) -> Child:
    log = logs / f"upstream-{version}.log"
    argv = [
        sys.executable, "-m", "services.inference_server.app", "--port", "0", "--synthetic",
        "--latency-ms", "0", "--latency-jitter", "0", "--version", version,
    ]  # fmt: skip
    proc = processes.spawn(argv, log=log)
    line = wait_for_line(proc, log, "listening on ")
    return Child(f"upstream-{version}", proc, line.split("listening on ")[1].strip(), log)


def spawn_router(settings: Settings, logs: Path) -> Child:
    log = logs / "router.log"
    env = {
        **os.environ,
        "PREFLIGHT_NATS_URL": settings.nats_url,
        "PREFLIGHT_DATA_DIR": str(settings.data_dir),
        "PREFLIGHT_ROUTER_PORT": "0",
        "PREFLIGHT_INSTANCE": "bench-router",
        "PREFLIGHT_LOG_LEVEL": "INFO",  # the router logs route changes, never per request
    }
    env.pop("PREFLIGHT_ROUTER_DEFAULT_MODEL", None)
    argv = [sys.executable, "-m", "services.router.app"]
    proc = processes.spawn(argv, env=env, log=log)
    line = wait_for_line(proc, log, "router listening on ")
    return Child("router", proc, line.split("router listening on ")[1].split()[0], log)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def ensure_nginx() -> str | None:
    """None when nginx is there (installing it from Debian if needed), else why not."""
    if NGINX.exists():
        return None
    apt = shutil.which("apt-get")
    if apt is None:
        return "nginx is not installed and apt-get is not available"
    done = subprocess.run(
        [apt, "install", "-y", "--no-install-recommends", "nginx"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    if done.returncode != 0 or not NGINX.exists():
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
        return f"`apt-get install nginx` failed ({done.returncode}): {last[0]}"
    return None


def nginx_version() -> str:
    done = subprocess.run([str(NGINX), "-v"], capture_output=True, text=True, check=False)
    return done.stderr.strip().removeprefix("nginx version: ")


def nginx_conf(root: Path, port: int, stable: str, canary: str, weight: float) -> str:
    def hostport(url: str) -> str:
        return url.removeprefix("http://").rstrip("/")

    temp = root / "tmp"
    temp.mkdir(parents=True, exist_ok=True)
    return f"""
daemon off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    upstream stable {{ server {hostport(stable)}; keepalive 128; }}
    upstream canary {{ server {hostport(canary)}; keepalive 128; }}
    split_clients "${{request_id}}" $preflight_backend {{
        {weight:g}% canary;
        * stable;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://$preflight_backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_connect_timeout 2s;
            proxy_read_timeout 60s;
            add_header X-Preflight-Role $preflight_backend always;
        }}
    }}
}}
"""


def spawn_nginx(root: Path, stable: str, canary: str, weight: float) -> Child:
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = root / "nginx.conf"
    conf.write_text(nginx_conf(root, port, stable, canary, weight))
    log = root / "nginx.stderr"
    proc = processes.spawn([str(NGINX), "-c", str(conf), "-p", str(root)], log=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited: {log.read_text(errors='replace')[-1000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return Child("nginx", proc, url, log)
        except OSError:
            time.sleep(0.02)
    raise RuntimeError("nginx did not open its port")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children (nginx workers), from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if stat.parent.name == str(pid) or fields[1] == str(pid):
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


@dataclass
class PathStats:
    path: str
    label: str
    requests: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    canary_share: float | None = None
    achieved_rps: float = 0.0
    max_send_lag_ms: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    added_p50_ms: float | None = None
    added_p99_ms: float | None = None
    server_cpu_ms_per_request: float | None = None


def summarise(path: str, label: str, results: list[LoadResult], cpu_s: float | None) -> PathStats:
    merged = LoadResult()
    lags = []
    rates = []
    for r in results:
        merged.sent += r.sent
        merged.by_status.update(r.by_status)
        merged.errors.update(r.errors)
        merged.by_header.update(r.by_header)
        merged.latencies_ms.extend(r.latencies_ms)
        lags.append(r.max_send_lag_ms)
        rates.append(r.achieved_rps)
    canary = merged.by_header.get("canary", 0)
    roles = canary + merged.by_header.get("stable", 0)
    return PathStats(
        path=path,
        label=label,
        requests=merged.sent,
        ok=merged.ok(),
        errors={**{str(k): v for k, v in merged.by_status.items() if k >= 400 or k == 0}},
        canary_share=round(canary / roles, 4) if roles else None,
        achieved_rps=round(min(rates), 1),
        max_send_lag_ms=round(max(lags), 2),
        p50_ms=round(merged.percentile_ms(50) or 0, 3),
        p90_ms=round(merged.percentile_ms(90) or 0, 3),
        p99_ms=round(merged.percentile_ms(99) or 0, 3),
        server_cpu_ms_per_request=round(cpu_s * 1000 / merged.sent, 3) if cpu_s else None,
    )


@dataclass
class Report:
    command: str
    when_utc: str
    machine: dict[str, Any]
    params: dict[str, Any]
    paths: list[PathStats]
    notes: list[str]


async def measure(args: argparse.Namespace, root: Path) -> Report:
    started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    machine = machine_info()
    notes: list[str] = []
    logs = root / "logs"
    server = NatsServer(root / "nats").start()
    children: list[Child] = []
    try:
        settings = Settings(nats_url=server.url, data_dir=root / "data", instance="bench")
        nc = await bus.connect(settings, "bench-router")
        js = nc.jetstream()
        await bus.ensure_topology(js, settings)
        stable = spawn_upstream("1", logs)
        canary = spawn_upstream("2", logs)
        children += [stable, canary]
        route = Route(
            model=MODEL,
            stable=RouteTarget(deployment_id="d-bench-stable", version="1", upstream=stable.url),
            canary=RouteTarget(deployment_id="d-bench-canary", version="2", upstream=canary.url),
            canary_weight=args.weight,
        )
        kv = await js.key_value(subjects.ROUTES_BUCKET)
        await kv.put(MODEL, route.model_dump_json().encode())
        router = spawn_router(settings, logs)
        children.append(router)
        targets: dict[str, tuple[str, str, Child]] = {
            "direct": ("upstream direct (stable)", stable.url, stable),
            "router": ("preflight router", router.url, router),
        }
        if args.no_nginx:
            notes.append("nginx skipped (--no-nginx)")
        else:
            why = await asyncio.to_thread(ensure_nginx)
            if why is None:
                machine["nginx"] = await asyncio.to_thread(nginx_version)
                nginx = spawn_nginx(root / "nginx", stable.url, canary.url, args.weight)
                children.append(nginx)
                targets["nginx"] = ("nginx split_clients proxy", nginx.url, nginx)
            else:
                notes.append(f"nginx skipped: {why}")
                print(f"nginx skipped: {why}", file=sys.stderr)

        results: dict[str, list[LoadResult]] = {name: [] for name in targets}
        cpu: dict[str, float] = dict.fromkeys(targets, 0.0)
        headers = {"X-Preflight-Model": MODEL}
        for _, url, _ in targets.values():  # warm-up: connections, caches, the route watch
            await generate_load(f"{url}/v1/completions", args.rps, args.warmup, headers=headers)
        names = list(targets)
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                _, url, child = targets[name]
                before = cpu_seconds(child.proc.pid)
                results[name].append(
                    await generate_load(
                        f"{url}/v1/completions", args.rps, args.seconds, headers=headers
                    )
                )
                cpu[name] += cpu_seconds(child.proc.pid) - before
        await nc.close()
    finally:
        for child in children:
            processes.terminate(child.proc, timeout=5.0)
        server.stop()
    paths = [
        summarise(name, label, results[name], cpu[name] or None)
        for name, (label, _, _) in targets.items()
    ]
    direct = paths[0]
    for p in paths[1:]:
        p.added_p50_ms = round(p.p50_ms - direct.p50_ms, 3)
        p.added_p99_ms = round(p.p99_ms - direct.p99_ms, 3)
    notes += [
        "Client, router, nginx, both upstreams and nats-server share the machine's cores.",
        "Latency: send to last byte of a small JSON completion (POST, ~250 B each way), "
        "measured by the open-loop client; added = path percentile - direct percentile.",
        "server CPU: user+system CPU of the path's server process (for direct: the stable "
        "upstream) per request, from /proc.",
    ]
    return Report(
        command=command_line(),
        when_utc=started,
        machine=machine,
        params={
            "rps": args.rps,
            "seconds_per_round": args.seconds,
            "rounds": args.rounds,
            "warmup_s": args.warmup,
            "canary_weight": args.weight,
        },
        paths=paths,
        notes=notes,
    )


def machine_info() -> dict[str, Any]:
    return describe_machine(("aiohttp", "nats-py", "prometheus-client"))


def render(report: Report) -> str:
    m = report.machine
    p = report.params
    lines = [
        "preflight bench: router added latency (issue #5)",
        f"command : {report.command}",
        f"when    : {report.when_utc}",
        f"machine : {m['nproc']} CPUs, {m['cpu_model']}, {m['os']}, "
        f"load {m['loadavg_1m_at_start']} at start",
        f"software: Python {m['python']}, aiohttp {m['aiohttp']}, nats-py {m['nats-py']}"
        + (f", nginx {m['nginx']}" if "nginx" in m else ""),
        "",
        f"Open-loop load: {p['rps']} rps, {p['rounds']} rounds x {p['seconds_per_round']} s per "
        f"path (interleaved), canary weight {p['canary_weight']}%, upstream latency 0",
        f"  {'path':<28}{'reqs':>7}{'ok':>7}{'rps':>7}{'canary':>8}{'p50 ms':>9}{'p90 ms':>9}"
        f"{'p99 ms':>9}{'+p50':>8}{'+p99':>8}{'cpu/req':>9}{'lag ms':>8}",
    ]
    for s in report.paths:
        share = f"{s.canary_share * 100:.1f}%" if s.canary_share is not None else "-"
        add50 = f"{s.added_p50_ms:+.2f}" if s.added_p50_ms is not None else "-"
        add99 = f"{s.added_p99_ms:+.2f}" if s.added_p99_ms is not None else "-"
        cpu = f"{s.server_cpu_ms_per_request:.3f}" if s.server_cpu_ms_per_request else "-"
        lines.append(
            f"  {s.label:<28}{s.requests:>7}{s.ok:>7}{s.achieved_rps:>7.0f}{share:>8}"
            f"{s.p50_ms:>9.2f}{s.p90_ms:>9.2f}{s.p99_ms:>9.2f}{add50:>8}{add99:>8}{cpu:>9}"
            f"{s.max_send_lag_ms:>8.1f}"
        )
        if s.errors:
            lines.append(f"    non-2xx: {s.errors}")
    lines += ["", *(f"note: {n}" for n in report.notes)]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rps", type=float, default=500.0, help="offered load (500)")
    parser.add_argument("--seconds", type=float, default=5.0, help="per path per round (5)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per path (1)")
    parser.add_argument("--weight", type=float, default=5.0, help="canary weight %% (5)")
    parser.add_argument("--no-nginx", action="store_true", help="skip the nginx path")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.rps <= 0 or args.seconds <= 0 or args.rounds < 1:
        parser.error("--rps and --seconds must be positive, --rounds at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="preflight-router-bench-") as tmp:
        root = Path(tmp)
        try:
            report = asyncio.run(measure(args, root))
        except Exception:
            for log in sorted((root / "logs").glob("*.log")):
                print(f"--- {log.name} (tail) ---\n{log.read_text()[-2000:]}", file=sys.stderr)
            raise
    print(json.dumps(asdict(report), indent=2) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
