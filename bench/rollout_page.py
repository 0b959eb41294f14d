"""The rollout page's cost: series query on chDB, HTTP answer, and a headless-Chromium render (#6).

For each rollout size (a steady request rate over the rollout's duration, 10% canary weight in
the data), in one process on a real chDB table:

    query    `query_series` over the whole rollout at the page's bucket width (about 120 buckets)
    api      GET /api/rollouts/{id} through aiohttp on loopback: state + steps + series as JSON
    page     GET /rollouts/{id}: the same, rendered as HTML with the data embedded
    render   only the page's own work: the same GET with the series already in memory
    browser  wall time of `chromium --headless --dump-dom` on the page (if /usr/bin/chromium),
             process start included: what the integration test pays per run

Run `python bench/rollout_page.py --help`.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
from aiohttp import ClientSession, web
from machine import command_line  # bench/machine.py (scripts run from bench/)

from services.canary_controller.page import bucket_for, build_page_app, chart_range, plan_steps
from services.canary_controller.state import Phase, RolloutState
from services.contracts.events import DeploymentRequested, RouteTarget
from services.contracts.policy import CanaryPolicy, CanaryStep, CanaryThresholds
from services.metrics import ingest, queries
from services.runtime import clickhouse
from services.runtime.settings import Settings

MODEL: Final = "org/chat-7b"
TABLE: Final = "request_metrics"
CHROMIUM: Final = Path("/usr/bin/chromium")
BLOCK: Final = 50_000


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def state_for(deployment_id: str, start: datetime, seconds: float) -> RolloutState:
    """A rollout rolled back at the end of `seconds`, its steps sized to fill them."""
    policy = CanaryPolicy(
        steps=(
            CanaryStep(weight=5, duration_s=seconds * 0.6),
            CanaryStep(weight=50, duration_s=seconds * 0.6),
        )
    )
    return RolloutState(
        deployment_id=deployment_id,
        model=MODEL,
        version="2",
        request=DeploymentRequested(
            deployment_id=deployment_id, model=MODEL, version="2", location="/m"
        ),
        policy=policy,
        thresholds=CanaryThresholds(),
        stable=RouteTarget(version="1"),
        canary=RouteTarget(version="2", deployment_id=deployment_id),
        phase=Phase.ROLLED_BACK,
        step_index=1,
        created_at=start,
        step_started_at=start + timedelta(seconds=seconds * 0.6),
        step_ends_at=start + timedelta(seconds=seconds * 1.2),
        finished_at=start + timedelta(seconds=seconds),
        steps_completed=1,
        last_verdict="unhealthy",
        last_reason="canary error rate 5.1% > 1.0%",
    )


def load(client: Any, deployment_id: str, start: datetime, rows: int, seconds: float) -> float:
    rng = np.random.default_rng(7)
    start_ms = int(start.timestamp() * 1000)
    t0 = time.perf_counter()
    for offset in range(0, rows, BLOCK):
        n = min(BLOCK, rows - offset)
        idx = np.arange(offset, offset + n)
        canary = idx % 10 == 0
        table = pa.Table.from_arrays(
            [
                pa.array(
                    start_ms + idx * int(seconds * 1000) // rows, pa.timestamp("ms", tz="UTC")
                ),
                pa.array([deployment_id] * n),
                pa.array([MODEL] * n),
                pa.array(np.where(canary, "2", "1")),
                pa.array(np.where(canary, "canary", "stable")),
                pa.array(rng.gamma(2.0, 20.0, n)),
                pa.nulls(n, pa.float64()),
                pa.array(np.where(rng.random(n) < 0.01, 503, 200), pa.uint16()),
                pa.array([""] * n),
                pa.array([f"{deployment_id}-{i // 500}" for i in idx]),
                pa.array(idx % 500, pa.uint32()),
            ],
            schema=ingest.ARROW_SCHEMA,
        )
        client.insert_arrow(TABLE, table)
    return time.perf_counter() - t0


class ChdbSeries:
    def __init__(self, client: Any) -> None:
        self.client = client

    async def series(
        self, deployment_id: str, start: datetime, end: datetime, bucket_s: float
    ) -> list[dict[str, Any]]:
        return await asyncio.to_thread(
            queries.query_series, self.client, TABLE, deployment_id, start, end, bucket_s
        )


class FixedSeries:
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    async def series(
        self, deployment_id: str, start: datetime, end: datetime, bucket_s: float
    ) -> list[dict[str, Any]]:
        return self.rows


class OneRollout:
    def __init__(self, state: RolloutState) -> None:
        self.state = state

    async def get(self, deployment_id: str) -> RolloutState | None:
        return self.state if deployment_id == self.state.deployment_id else None

    async def list(self) -> list[RolloutState]:
        return [self.state]


def app_for(
    state: RolloutState, series: ChdbSeries | FixedSeries, now: datetime
) -> web.Application:
    return build_page_app(OneRollout(state), series, clock=lambda: now)


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


async def timed_get(session: ClientSession, url: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    async with session.get(url) as resp:
        body = await resp.read()
        assert resp.status == 200, resp.status
    return (time.perf_counter() - t0) * 1000, len(body)


async def browser_runs(url: str, runs: int, tmp: Path) -> list[float]:
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp / f'profile-{i}'}", "--virtual-time-budget=5000",
            "--dump-dom", url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        out, _ = await proc.communicate()
        assert b"line line-canary" in out, "the chart was not drawn"
        times.append((time.perf_counter() - t0) * 1000)
    return times


def describe(times: Sequence[float]) -> str:
    return f"{statistics.median(times):8.1f} {percentile(times, 95):8.1f}"


def machine() -> str:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = []
    for dist in ("aiohttp", "chdb-core", "clickhouse-connect"):
        try:
            versions.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{dist} absent")
    browser = "absent"
    if CHROMIUM.exists():
        browser = subprocess.run(
            [str(CHROMIUM), "--version"], capture_output=True, text=True, check=False, timeout=30
        ).stdout.strip()
    return (
        f"machine : {len(os.sched_getaffinity(0))} CPUs, {model}, "
        f"{platform.system()} {platform.release()}, load {os.getloadavg()[0]:.2f} at start\n"
        f"software: Python {platform.python_version()}, {', '.join(versions)}, {browser}"
    )


async def main(args: argparse.Namespace) -> None:
    print("preflight bench: rollout page (issue #6, item 8)")
    print(f"command : {command_line()}")
    print(f"when    : {datetime.now(UTC).strftime('%Y-%m-%d %H:%M:%S UTC')}")
    print(machine())
    print(
        f"\n{args.runs} timed GETs per figure after 2 warm-ups; browser: {args.browser_runs} "
        f"runs; rows at {args.rps:g} requests/s, 10% canary\n"
    )
    with tempfile.TemporaryDirectory(prefix="bench-page-") as tmp_dir:
        tmp = Path(tmp_dir)
        client = clickhouse.open_client(
            Settings(clickhouse_url="chdb", clickhouse_path=tmp / "chdb", data_dir=tmp)
        )
        client.command(clickhouse.metrics_table_ddl(TABLE, 30))
        header = (
            f"  {'rollout':<22}{'rows':>9}{'points':>8}{'KiB':>7}"
            f"{'query p50/p95 ms':>19}{'api p50/p95':>19}{'page p50/p95':>19}"
            f"{'render p50/p95':>19}"
        )
        print(header)
        start = (datetime.now(UTC) - timedelta(days=1)).replace(microsecond=0)
        browser_times: list[float] = []
        for minutes in args.minutes:
            seconds = minutes * 60
            rows = int(args.rps * seconds)
            dep = f"d-bench-{minutes:g}m".replace(".", "_")
            state = state_for(dep, start, seconds)
            load(client, dep, start, rows, seconds)
            series = ChdbSeries(client)
            now = start + timedelta(seconds=seconds, hours=1)
            lo, hi = chart_range(state, plan_steps(state, now), now)
            bucket = bucket_for((hi - lo).total_seconds())  # what the page asks for
            points = queries.query_series(client, TABLE, dep, lo, hi, bucket)
            times: dict[str, list[float]] = {"query": [], "api": [], "page": [], "render": []}
            live, fixed = app_for(state, series, now), app_for(state, FixedSeries(points), now)
            async with serving(live) as live_url, serving(fixed) as fixed_url, ClientSession() as h:
                # Interleaved rounds, so background merges after the load hit every figure alike.
                for i in range(args.runs + 2):
                    t0 = time.perf_counter()
                    queries.query_series(client, TABLE, dep, lo, hi, bucket)
                    query_ms = (time.perf_counter() - t0) * 1000
                    api_ms, _ = await timed_get(h, f"{live_url}/api/rollouts/{dep}")
                    page_ms, size = await timed_get(h, f"{live_url}/rollouts/{dep}")
                    render_ms, _ = await timed_get(h, f"{fixed_url}/rollouts/{dep}")
                    if i >= 2:  # two warm-up rounds
                        for key, ms in zip(
                            times, (query_ms, api_ms, page_ms, render_ms), strict=True
                        ):
                            times[key].append(ms)
                if CHROMIUM.exists() and args.browser_runs and not browser_times:
                    url = f"{live_url}/rollouts/{dep}"
                    browser_times = await browser_runs(url, args.browser_runs, tmp)
            print(
                f"  {f'{minutes:g} min':<22}{rows:>9}{len(points):>8}{size / 1024:>7.0f}"
                + "".join(f"{describe(t):>19}" for t in times.values())
            )
        if browser_times:
            print(
                f"\n  headless Chromium --dump-dom of the {args.minutes[0]:g} min page, process "
                f"start included: p50 {statistics.median(browser_times):.0f} ms, "
                f"max {max(browser_times):.0f} ms"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, nargs="+", default=[5.0, 60.0])
    parser.add_argument("--rps", type=float, default=100.0)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--browser-runs", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
    sys.exit(0)
