"""What running the benchmark in a child process costs (services/benchmarker/isolated.py).

One small sample model, a short policy, side by side in one run, rounds alternating the order:

    in-process  run_benchmarks(...) in this process (torch already imported: the old path)
    cold child  Runner(...).run(job): a new child imports torch and transformers, then measures
    warm spare  Runner(keep_spare=True): the spare was started `--settle` seconds before the job,
                as the service keeps one, so only the measuring remains

Prints each path's median wall time per deployment and the child's overhead over in-process.
Run from the repository root: `.venv/bin/python bench/benchmark_isolation_bench.py [--rounds N]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from machine import command_line  # bench/machine.py (scripts run from bench/)

from services.benchmarker.isolated import Job, Limits, Runner
from services.benchmarker.run import run_benchmarks
from services.contracts.events import Status
from services.contracts.policy import PolicyFile
from services.stack.samples import write_sample_model

SHORT = {
    "consistency_prompts": 5,
    "latency_runs": 3,
    "latency_warmup_runs": 1,
    "max_length": 128,
    "stride": 128,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--settle", type=float, default=10.0, help="seconds a spare gets")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args()
    policy = PolicyFile().resolve(model="m", overrides={"benchmark": SHORT})
    times: dict[str, list[float]] = {"in-process": [], "cold child": [], "warm spare": []}
    with tempfile.TemporaryDirectory() as tmp:
        model = str(write_sample_model(Path(tmp) / "m", layers=2, hidden=64, heads=4, vocab=64))
        job = Job.of(model, model, policy, device="cpu")
        run_benchmarks(model, model, policy, device="cpu")  # warm this process's imports
        for round_ in range(args.rounds):
            order = list(times) if round_ % 2 == 0 else list(reversed(times))
            for path in order:
                spare = Runner(Limits(), keep_spare=True) if path == "warm spare" else None
                if spare is not None:
                    spare.start()
                    time.sleep(args.settle)  # the spare imports while nothing is asked of it
                started = time.perf_counter()
                if path == "in-process":
                    report, _ = run_benchmarks(model, model, policy, device="cpu")
                elif spare is not None:
                    report, _ = spare.run(job)
                else:
                    report, _ = Runner(Limits()).run(job)
                times[path].append(time.perf_counter() - started)
                if spare is not None:
                    spare.close()
                if report.status is not Status.PASSED:
                    raise SystemExit(f"{path}: {report.status}: {report.reason}")
    base = statistics.median(times["in-process"])
    if args.json:
        medians = {path: statistics.median(walls) for path, walls in times.items()}
        print(json.dumps({"command": command_line(), "walls_s": times, "medians_s": medians}))
        return
    print(f"command : {command_line()}")
    print(f"machine : {os.cpu_count()} CPUs; {args.rounds} rounds, order alternating")
    for path, walls in times.items():
        median = statistics.median(walls)
        extra = "" if path == "in-process" else f"  (+{median - base:.2f} s, {median / base:.2f}x)"
        shown = ", ".join(f"{w:.2f}" for w in walls)
        print(f"{path:11s}: median {median:.2f} s per deployment{extra}  [{shown}]")


if __name__ == "__main__":
    main()
