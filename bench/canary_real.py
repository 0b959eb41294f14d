"""Time from a canary going bad to its rollback, on the real embedded stack (issue #6).

Everything real: nats-server, validator, benchmarker, the canary-controller with chDB and its
ingest, the router, synthetic inference servers, and users sending `--rps` requests a second
through the router. The default canary policy (5% for 180 s, then 50% for 120 s, analysis every
5 s over the step and the last 30 s, 50 canary requests minimum, 1% false-rollback budget), with
a fast benchmark profile so each trial reaches its canary in seconds.

    errors    the canary's server answers 10% of requests with 500 from its first request
    latency   the canary's server is 50% slower (median latency x1.5) from its first request
    late      a healthy canary turns to 10% errors `--late-s` seconds into step 1

Measured from the moment the canary went bad (step start, or the knob change) to the
DeploymentRolledBack event. Run from the repository root:
`.venv/bin/python bench/canary_real.py [--trials 3] [--rps 100]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from machine import command_line  # bench/machine.py (scripts run from bench/)
from rich.console import Console

from services.contracts import subjects
from services.contracts.events import (
    CanaryStepStarted,
    DeploymentPromoted,
    DeploymentRequested,
    DeploymentRolledBack,
    ModelRef,
    new_deployment_id,
)
from services.runtime import bus, nats_users
from services.runtime.settings import Settings
from services.stack.demo import MODEL, InferenceServers, Traffic, _expected_digests
from services.stack.supervisor import Stack

FAST_BENCHMARK = {
    "defaults": {
        "benchmark": {
            "consistency_prompts": 5,
            "latency_runs": 3,
            "latency_warmup_runs": 1,
            "max_length": 128,
            "stride": 128,
        }
    }
}
MEDIAN_MS = 40.0


def set_knobs(url: str, **knobs: float) -> None:
    req = urllib.request.Request(  # noqa: S310 - a loopback http:// URL we started
        f"{url}/admin/config",
        data=json.dumps(knobs).encode(),
        method="PUT",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 - loopback
        resp.read()


async def follow(
    settings: Settings, request: DeploymentRequested, late: tuple[str, float] | None
) -> dict[str, Any]:
    """Publish, follow to the outcome; with `late`, turn the canary bad that long into step 1."""
    nc = await bus.connect(settings, "bench-canary-real")
    went_bad: float | None = None
    step_at: float | None = None
    outcome: DeploymentRolledBack | DeploymentPromoted | None = None
    flip: asyncio.Task[None] | None = None
    try:
        js = nc.jetstream()
        await bus.publish_event(js, request)
        async for event in bus.follow(js, subjects.deployment_events(request.deployment_id)):
            if isinstance(event, CanaryStepStarted) and event.step_index == 0:
                step_at = time.monotonic()
                if late is None:
                    went_bad = step_at
                else:

                    async def turn_bad(url: str, after: float) -> None:
                        nonlocal went_bad
                        await asyncio.sleep(after)
                        await asyncio.to_thread(set_knobs, url, error_rate=0.10)
                        went_bad = time.monotonic()

                    flip = asyncio.create_task(turn_bad(*late))
            if isinstance(event, DeploymentRolledBack | DeploymentPromoted):
                outcome = event
                break
    finally:
        if flip is not None:
            flip.cancel()
        await nc.close()
    done = time.monotonic()
    rolled = isinstance(outcome, DeploymentRolledBack)
    return {
        "outcome": type(outcome).__name__ if outcome else "none",
        "trigger": outcome.trigger if isinstance(outcome, DeploymentRolledBack) else None,
        "seconds": round(done - went_bad, 1) if rolled and went_bad is not None else None,
        "reason": outcome.reasons[0] if outcome and outcome.reasons else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--trials", type=int, default=3, help="per scenario (3)")
    parser.add_argument("--rps", type=float, default=100.0, help="users' requests/s (100)")
    parser.add_argument("--late-s", type=float, default=60.0, help="onset of the late case (60)")
    parser.add_argument(
        "--scenarios", nargs="+", default=["errors", "latency", "late"], help="which to run"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["bonferroni", "e-process"],
        choices=["bonferroni", "e-process"],
        help="canary methods, each trial run once per method (policy_overrides per request)",
    )
    args = parser.parse_args()
    from services.benchmarker.samples import write_trained_model

    console = Console(stderr=True)
    started = datetime.now(UTC)
    load1 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="canary-real-") as tmp:
        root = Path(tmp)
        policy = root / "policy.yaml"
        policy.write_text(yaml.safe_dump(FAST_BENCHMARK))
        models = root / "models"
        stable_dir = write_trained_model(models / "v1", variant="good", seed=0)
        canary_dir = write_trained_model(models / "v2", variant="good", seed=1)
        settings = Settings(data_dir=root / "data", policy_file=policy)
        stack = Stack(
            settings,
            say=lambda line: console.print(line, highlight=False),
            notices_to_terminal=False,
        )
        servers = InferenceServers(root / "data" / "logs")
        results: dict[tuple[str, str], list[dict[str, Any]]] = {
            (s, m): [] for s in args.scenarios for m in args.methods
        }
        traffic: Traffic | None = None
        try:
            stack.start()
            stack.wait_ready()
            assert stack.nats is not None
            bus_settings = stack.settings_as(nats_users.CLIENT)  # requests, as a person would
            stable_url = servers.start("v1", 0.0)
            first = DeploymentRequested(
                deployment_id=new_deployment_id(),
                model=MODEL,
                version="v1",
                location=str(stable_dir),
                endpoint=stable_url,
                expected_sha256=_expected_digests(stable_dir),
            )
            asyncio.run(follow(bus_settings, first, None))  # first version: promoted at once
            for url in (stable_url,):
                set_knobs(url, latency_ms=MEDIAN_MS, latency_jitter=0.3)
            traffic = Traffic(stack.router_url, args.rps)
            traffic.start()
            time.sleep(2)
            stable_ref = ModelRef(
                name=MODEL, version="v1", location=str(stable_dir), endpoint=stable_url
            )
            for scenario, method, trial in [
                (s, m, t) for s in args.scenarios for t in range(args.trials) for m in args.methods
            ]:
                version = f"{scenario}-{trial}-{method}"
                url = servers.start(version, 0.0)
                knobs = {"latency_ms": MEDIAN_MS, "latency_jitter": 0.3, "error_rate": 0.0}
                if scenario == "errors":
                    knobs["error_rate"] = 0.10
                if scenario == "latency":
                    knobs["latency_ms"] = MEDIAN_MS * 1.5
                set_knobs(url, **knobs)
                request = DeploymentRequested(
                    deployment_id=new_deployment_id(),
                    model=MODEL,
                    version=version,
                    location=str(canary_dir),
                    endpoint=url,
                    expected_sha256=_expected_digests(canary_dir),
                    stable=stable_ref,
                    policy_overrides={"canary": {"method": method}},
                )
                late = (url, args.late_s) if scenario == "late" else None
                result = asyncio.run(follow(bus_settings, request, late))
                console.print(f"{scenario} {method} trial {trial}: {result}", highlight=False)
                results[(scenario, method)].append(result)
        finally:
            if traffic is not None:
                traffic.stop()
            servers.stop()
            stack.stop()

    print(f"command: {command_line()}")
    print(
        f"machine: {os.cpu_count()} CPUs, {platform.platform()}, Python "
        f"{platform.python_version()}, 1-minute load {load1:.2f} at start"
    )
    print(f"date: {started:%Y-%m-%d %H:%M} UTC")
    print(f"users: {args.rps:g} requests/s through the router; canary median {MEDIAN_MS:g} ms")
    if traffic is not None:
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(traffic.by_status.items()))
        print(f"requests sent: {traffic.sent} ({statuses})")
    print()
    print(
        "| scenario | method | trials | rolled back | trigger | seconds to rollback (each) "
        "| median |"
    )
    print("|---|---|---|---|---|---|---|")
    for (scenario, method), rows in results.items():
        times = [r["seconds"] for r in rows if r["seconds"] is not None]
        triggers = sorted({str(r["trigger"]) for r in rows if r["trigger"]})
        median = f"{statistics.median(times):.1f}" if times else "-"
        each = ", ".join(f"{t:.1f}" for t in times) or "-"
        rolled = sum(1 for r in rows if r["outcome"] == "DeploymentRolledBack")
        print(
            f"| {scenario} | {method} | {len(rows)} | {rolled} | {', '.join(triggers) or '-'} | "
            f"{each} | {median} |"
        )


if __name__ == "__main__":
    main()
