"""Notifier: rendering cost, outcome-to-Slack latency, burst throughput and dedup of replays (#7).

Everything runs in one process on one event loop: a throwaway JetStream nats-server (child
process), the real notifier service (`services.notifier.app.build`, FastStream app) with its KV
dedup and request lookup, and the Slack-shaped HTTP server of the tests (`tests/slack_api.py`)
that slack-sdk posts to. So every figure includes slack-sdk's HTTP round trip over loopback, and
the Slack server's own (small) work shares the loop with the notifier.

    render   make_notice (Block Kit + progress + console + JSON body) per event, no I/O
    latency  acked publish of one outcome -> its chat.postMessage arrives (one in flight)
    burst    N outcomes published at once -> all N posts arrived
    replay   the same N outcomes published again (new message ids) -> all handled, 0 posts

Run `python bench/notifier_bench.py --help`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from faststream.nats import TestApp
from machine import command_line, describe_machine  # bench/machine.py (scripts run from bench/)
from pydantic import SecretStr

# The Slack-shaped server lives with the tests; the repository root makes it importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.contracts import subjects
from services.contracts.events import (
    CanaryStepStarted,
    CheckResult,
    DeploymentDegraded,
    DeploymentRequested,
    DeploymentRolledBack,
    Requester,
    RoleMeasurement,
    Status,
)
from services.contracts.routing import subject_for
from services.notifier.app import build
from services.notifier.delivery import make_notice
from services.notifier.messages import NoticeEvent
from services.runtime import bus
from services.runtime.nats_server import NatsServer
from services.runtime.settings import Settings
from tests.slack_api import TOKEN, Call, SlackApi

MODEL = "org/bench-7b.v2"
WHO = Requester(user="bench", system="cli", team="perf")


def rolled_back(deployment_id: str) -> DeploymentRolledBack:
    end = datetime(2026, 11, 25, 18, 0, tzinfo=UTC)
    return DeploymentRolledBack(
        deployment_id=deployment_id,
        model=MODEL,
        version="2",
        trigger="error_rate",
        step_index=0,
        canary=RoleMeasurement(requests=500, errors=21, error_rate=0.042, p95_ms=312),
        stable=RoleMeasurement(requests=4812, errors=14, error_rate=0.0029, p95_ms=180),
        threshold=0.01,
        window_start=end - timedelta(seconds=60),
        window_end=end,
        reasons=("canary error rate 4.2% over the 1.0% limit",),
        requested_by=WHO,
        metrics_url=f"http://grafana.local/d/preflight?var-deployment={deployment_id}",
    )


def samples() -> dict[str, NoticeEvent]:
    check = CheckResult(
        name="perplexity", status=Status.FAILED, value=0.081, threshold=0.05, unit="relative"
    )
    ids = {"deployment_id": "d-render", "model": MODEL, "version": "2"}
    return {
        "rolled back": rolled_back("d-render"),
        "degraded": DeploymentDegraded(**ids, failed_checks=(check,), requested_by=WHO),
        "canary step": CanaryStepStarted(**ids, step_index=1, weight=50, duration_s=120),
    }


@dataclass
class Report:
    command: str
    when_utc: str
    machine: dict[str, Any]
    params: dict[str, Any]
    render_us: dict[str, float]
    latency_ms: dict[str, float]
    burst: dict[str, float]
    replay: dict[str, float]


def measure_render(iterations: int) -> dict[str, float]:
    out = {}
    for name, event in samples().items():
        make_notice(event, WHO)  # warm
        started = time.perf_counter()
        for _ in range(iterations):
            make_notice(event, WHO)
        out[name] = (time.perf_counter() - started) / iterations * 1e6
    return out


async def measure_bus(args: argparse.Namespace, settings: Settings) -> tuple[Any, Any, Any]:
    nc = await bus.connect(settings, "bench")
    js = nc.jetstream()
    await bus.ensure_topology(js, settings)
    arrived: asyncio.Queue[Call] = asyncio.Queue()
    async with SlackApi() as slack:
        slack.listeners.append(arrived.put_nowait)
        configured = settings.model_copy(
            update={
                "slack_token": SecretStr(TOKEN),
                "slack_base_url": slack.base_url,
                "slack_channel": "#bench",
            }
        )
        total = args.warmup + args.n + args.burst
        for i in range(total):  # every deployment has its request in the stream, as in life
            request = DeploymentRequested(
                deployment_id=f"d-bench-{i}", model=MODEL, version="2", location="/m"
            )
            await bus.publish_event(js, request)
        async with TestApp(build(configured).app):
            samples_ms = []
            for i in range(args.warmup + args.n):
                started = time.perf_counter()
                await bus.publish_event(js, rolled_back(f"d-bench-{i}"))
                call = await asyncio.wait_for(arrived.get(), 30)
                if i >= args.warmup:
                    samples_ms.append((time.perf_counter() - started) * 1000)
                assert call.method == "chat.postMessage" and call.status == 200
            latency = {
                "p50": statistics.median(samples_ms),
                "p95": statistics.quantiles(samples_ms, n=20)[18],
                "mean": statistics.fmean(samples_ms),
            }

            burst = [rolled_back(f"d-bench-{i}") for i in range(args.warmup + args.n, total)]
            started = time.perf_counter()
            acks = [
                await js.publish_async(subject_for(e), bus.encode(e), headers=bus.headers_for(e))
                for e in burst
            ]
            await asyncio.gather(*acks)
            for _ in burst:
                await asyncio.wait_for(arrived.get(), 60)
            elapsed = time.perf_counter() - started
            burst_figures = {
                "notices": len(burst),
                "elapsed_s": elapsed,
                "per_s": len(burst) / elapsed,
            }

            posts_before = len(slack.calls)
            started = time.perf_counter()
            last = 0
            for event in burst:
                last = (await bus.publish_event(js, event, nonce="replay")).seq
            while True:
                info = await js.consumer_info(subjects.EVENTS_STREAM, subjects.NOTIFIER_DURABLE)
                floor = info.ack_floor.stream_seq if info.ack_floor else 0
                if (floor or 0) >= last and info.num_ack_pending == 0:
                    break
                await asyncio.sleep(0.005)
            elapsed = time.perf_counter() - started
            replay = {
                "notices": len(burst),
                "elapsed_s": elapsed,
                "per_s": len(burst) / elapsed,
                "posted_again": len(slack.calls) - posts_before,
            }
    await nc.close()
    return latency, burst_figures, replay


def machine_info() -> dict[str, Any]:
    return describe_machine(("nats-py", "faststream", "slack_sdk", "aiohttp", "pydantic"))


def render(report: Report) -> str:
    m, p = report.machine, report.params
    lat, burst, replay = report.latency_ms, report.burst, report.replay
    lines = [
        "preflight bench: notifier (issue #7)",
        f"command : {report.command}",
        f"when    : {report.when_utc}",
        f"machine : {m['nproc']} CPUs, {m['cpu_model']}, {m['os']}, "
        f"load {m['loadavg_1m_at_start']} at start",
        f"software: Python {m['python']}, nats-py {m['nats-py']}, FastStream {m['faststream']}, "
        f"slack-sdk {m['slack_sdk']}, aiohttp {m['aiohttp']}, pydantic {m['pydantic']}",
        "",
        f"Rendering (make_notice: Block Kit + progress + console + JSON), {p['render_iterations']}"
        " runs each:",
        *(f"  {name:<14}{us:>8.0f} us" for name, us in report.render_us.items()),
        "",
        f"Outcome -> Slack chat.postMessage, one in flight, {p['n']} after {p['warmup']} warm-up:",
        f"  p50 {lat['p50']:.1f} ms, p95 {lat['p95']:.1f} ms, mean {lat['mean']:.1f} ms",
        "",
        f"Burst of {burst['notices']:.0f} outcomes: all posted in {burst['elapsed_s']:.2f} s "
        f"({burst['per_s']:.0f} notices/s)",
        f"Replay of the same {replay['notices']:.0f} (new message ids): handled in "
        f"{replay['elapsed_s']:.2f} s ({replay['per_s']:.0f}/s), posted again: "
        f"{replay['posted_again']:.0f}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=200, help="sequential outcomes (200)")
    parser.add_argument("--warmup", type=int, default=20, help="warm-up outcomes (20)")
    parser.add_argument("--burst", type=int, default=300, help="burst size (300)")
    parser.add_argument("--render-iterations", type=int, default=2000, help="(2000)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    machine = machine_info()
    render_us = measure_render(args.render_iterations)
    with tempfile.TemporaryDirectory(prefix="preflight-bench-") as tmp:
        server = NatsServer(Path(tmp) / "nats").start()
        try:
            settings = Settings(nats_url=server.url, data_dir=Path(tmp) / "data", instance="bench")
            latency, burst, replay = asyncio.run(measure_bus(args, settings))
        finally:
            server.stop()
    report = Report(
        command=command_line(),
        when_utc=when,
        machine=machine,
        params={k: v for k, v in vars(args).items() if k != "json"},
        render_us=render_us,
        latency_ms=latency,
        burst=burst,
        replay=replay,
    )
    print(json.dumps(asdict(report), indent=2) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
