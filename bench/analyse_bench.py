"""`preflight analyse`'s speed: a 300 s rollout at 100 requests/s replayed over real chDB.

The records of one finished rollout (5% for 180 s, then 50% for 120 s, promoted) are written to a
temporary chDB table; then, for each method (bonferroni: a look every 5 s; e-process: every 1 s):

    load     `RecordedMetrics.load`: every record of the rollout in one query
    replay   `replay` over those records in memory: every tick, look and decision
    sql      (--compare-sql) the same replay asking ClickHouse at every look instead
             (`ClickHouseMetrics`: 2-4 queries a look); its looks must be the same

Goal (issue #15 item 3): load + replay under 5 s. Run `python bench/analyse_bench.py --help`.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from machine import command_line, describe_machine  # bench/machine.py (scripts run from bench/)

from services.canary_controller import decision as rules
from services.canary_controller import replay as rp
from services.canary_controller.app import ClickHouseMetrics
from services.canary_controller.state import Phase, RolloutState
from services.contracts.events import DeploymentRequested, RouteTarget
from services.contracts.policy import CanaryPolicy, CanaryStep, CanaryThresholds
from services.runtime import clickhouse
from services.runtime.settings import Settings

TABLE: Final = "request_metrics"
MODEL: Final = "org/chat-7b"
COLUMNS: Final = [
    "ts", "deployment_id", "model", "version", "role", "latency_ms", "ttft_ms", "status",
    "error_kind", "batch_id", "seq",
]  # fmt: skip
STEPS: Final = (CanaryStep(weight=5, duration_s=180), CanaryStep(weight=50, duration_s=120))


def finished_rollout(deployment_id: str, start: datetime, policy: CanaryPolicy) -> RolloutState:
    """A rollout that ran 5% for 180 s, then 50% for 120 s, and was promoted."""
    request = DeploymentRequested(
        deployment_id=deployment_id, model=MODEL, version="2", location="/m"
    )
    state = rules.start_rollout(
        request,
        earlier=(),
        policy=policy,
        thresholds=CanaryThresholds(),
        stable=RouteTarget(version="1"),
        canary=RouteTarget(version="2", deployment_id=deployment_id),
        now=start,
    )
    second = start + timedelta(seconds=STEPS[0].duration_s)
    end = second + timedelta(seconds=STEPS[1].duration_s)
    return state.model_copy(
        update={
            "phase": Phase.PROMOTED,
            "step_index": 1,
            "step_starts": (start, second),
            "step_started_at": second,
            "step_ends_at": end,
            "finished_at": end,
            "steps_completed": 2,
        }
    )


def write_records(client: Any, deployment_id: str, start: datetime, rps: float) -> int:
    """What the gateway measured: `rps` requests a second at the rollout's weights."""
    rng = random.Random(3)
    rows: list[tuple[Any, ...]] = []
    offset = 0.0
    for step in STEPS:
        for i in range(round(step.duration_s * rps)):
            at = start + timedelta(seconds=offset + i / rps)
            canary = rng.random() * 100 < step.weight
            failed = rng.random() < 0.002
            rows.append(
                (
                    at,
                    deployment_id,
                    MODEL,
                    "2" if canary else "1",
                    "canary" if canary else "stable",
                    rng.lognormvariate(0, 0.35) * 80,
                    rng.lognormvariate(0, 0.3) * 20 if rng.random() < 0.5 else None,
                    500 if failed else 200,
                    "http_5xx" if failed else "",
                    f"{deployment_id}-{len(rows) // 500}",
                    len(rows) % 500,
                )
            )
        offset += step.duration_s
    client.insert(TABLE, rows, column_names=COLUMNS)
    return len(rows)


async def run(args: argparse.Namespace) -> None:
    info = describe_machine(("chdb", "clickhouse-connect", "numpy"))
    print("preflight bench: preflight analyse, a replay over stored records (issue #15 item 3)")
    print(f"command : {command_line()}")
    print(f"when    : {datetime.now(UTC).strftime('%Y-%m-%d %H:%M:%S UTC')}")
    print("machine : " + ", ".join(f"{k} {v}" for k, v in info.items()))
    with tempfile.TemporaryDirectory(prefix="bench-analyse-") as tmp_dir:
        tmp = Path(tmp_dir)
        client = clickhouse.open_client(
            Settings(clickhouse_url="chdb", clickhouse_path=tmp / "chdb", data_dir=tmp)
        )
        clickhouse.ensure_metrics_table(
            client, Settings(clickhouse_path=tmp / "chdb", data_dir=tmp)
        )
        start = (datetime.now(UTC) - timedelta(hours=1)).replace(microsecond=0)
        seconds = sum(s.duration_s for s in STEPS)
        print(f"\nrollout : {seconds:g} s at {args.rps:g} requests/s (5% 180 s, 50% 120 s)\n")
        header = f"  {'method':<12}{'records':>9}{'looks':>7}{'load s':>9}{'replay s':>10}"
        header += f"{'total s':>9}" + (f"{'sql s':>9}" if args.compare_sql else "")
        print(header)
        for method in args.methods:
            policy = CanaryPolicy(steps=STEPS, method=method)
            dep = f"d-bench-{method}"
            rollout = finished_rollout(dep, start, policy)
            write_records(client, dep, start, args.rps)
            best: tuple[float, float] | None = None
            result = None
            for _ in range(args.runs):
                t0 = time.perf_counter()
                original = rp.original_run(rollout)
                metrics = rp.RecordedMetrics.load(
                    client, TABLE, dep, original.started_at, original.data_end
                )
                t1 = time.perf_counter()
                result = await rp.replay(metrics, rollout, original=original)
                t2 = time.perf_counter()
                if best is None or (t2 - t0) < sum(best):
                    best = (t1 - t0, t2 - t1)
            assert best is not None and result is not None
            line = (
                f"  {method:<12}{metrics.records:>9}{len(result.looks):>7}{best[0]:>9.2f}"
                f"{best[1]:>10.2f}{sum(best):>9.2f}"
            )
            if args.compare_sql:
                t0 = time.perf_counter()
                sql = await rp.replay(ClickHouseMetrics(client, TABLE), rollout, original=original)
                line += f"{time.perf_counter() - t0:>9.2f}"
                same = [(k.at, k.action, k.verdict, k.reason) for k in sql.looks] == [
                    (k.at, k.action, k.verdict, k.reason) for k in result.looks
                ]
                line += "  (same looks)" if same else "  (LOOKS DIFFER)"
            print(line + f"  -> {result.verdict_line[:60]}")
    print(f"\nbest of {args.runs} runs; goal: total under 5 s")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rps", type=float, default=100.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["bonferroni", "e-process"],
        choices=["bonferroni", "e-process"],
    )
    parser.add_argument(
        "--compare-sql",
        action="store_true",
        help="also time the replay with a ClickHouse query per look (slow: tens of seconds)",
    )
    asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
