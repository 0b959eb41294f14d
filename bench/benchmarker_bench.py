"""Benchmarker speed against a bare torch loop, and a full benchmark's wall time (issue #4).

Two parts, run in one process on the trained sample models of services/benchmarker/samples.py:

    eval   evaluation tokens/s of our sliding_window_perplexity against a bare torch loop on the
           same model and text: tokenize once, the same windows (max_length 256, stride 128, the
           policy defaults), model(input_ids), NLL with F.cross_entropy, under inference_mode.
           Rounds alternate which one goes first; the perplexities must agree (1e-4 relative)
    full   run_benchmarks(good seed 1, good seed 0, default policy) on the CPU, repeated: wall
           time per check (CheckResult.duration_ms), model loading, and the figures it reports

The eval part runs first: the consistency check turns on torch's deterministic algorithms for the
rest of the process. Models are copied from the sample cache ($PREFLIGHT_CACHE_DIR, else
~/.cache/preflight/models; trained there on first use) into a temp dir removed at the end. Run
`python bench/benchmarker_bench.py --help`; `--threads N` sets torch's thread count for both
parts (default: torch's own, which is what the benchmarker service runs with).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import torch
import torch.nn.functional as F
from machine import command_line  # bench/machine.py (scripts run from bench/)

from services.benchmarker.corpus import load_eval_text
from services.benchmarker.latency import NEW_TOKENS
from services.benchmarker.loading import Loaded, describe_device, load_model
from services.benchmarker.perplexity import sliding_window_perplexity
from services.benchmarker.run import run_benchmarks
from services.benchmarker.samples import write_trained_model
from services.contracts.events import CheckResult
from services.contracts.policy import PolicyFile

GOAL_OURS_X_BARE: Final = 0.8
SAME_PPL_RTOL: Final = 1e-4
CHECKS: Final = ("perplexity", "latency", "consistency")
NO_GPU: Final = "not measured: no GPU visible to this process"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---- part 1: evaluation tokens/s, ours against a bare torch loop ----------------------------


@dataclass(frozen=True)
class Pass:
    """One pass over the evaluation text."""

    perplexity: float
    tokens: int
    windows: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def ours_pass(loaded: Loaded, text: str, max_length: int, stride: int) -> Pass:
    _sync(loaded.device)
    t0 = time.perf_counter()
    result = sliding_window_perplexity(loaded, text, max_length=max_length, stride=stride)
    _sync(loaded.device)
    elapsed = time.perf_counter() - t0
    return Pass(result.perplexity, result.tokens, result.windows, elapsed)


def bare_pass(model: Any, ids: torch.Tensor, max_length: int, stride: int) -> Pass:
    """The floor: the same windows and scored tokens as ours, on ids tokenized beforehand.

    In a window [begin, end) the last `end - prev_end` tokens are new; each is scored from the
    logits one position earlier, and position 0 (no logits before it) never is, exactly as the
    shifted labels of ours do.
    """
    seq_len = ids.size(1)
    nll_sum = 0.0
    scored = 0
    windows = 0
    prev_end = 0
    _sync(str(ids.device))
    t0 = time.perf_counter()
    with torch.inference_mode():
        for begin in range(0, seq_len, stride):
            end = min(begin + max_length, seq_len)
            window = ids[:, begin:end]
            length = end - begin
            first = max(length - (end - prev_end), 1)  # first scored position in the window
            logits = model(window).logits
            nll = F.cross_entropy(
                logits[0, first - 1 : length - 1].float(), window[0, first:length], reduction="sum"
            )
            nll_sum += float(nll)
            scored += length - first
            windows += 1
            prev_end = end
            if end == seq_len:
                break
    _sync(str(ids.device))
    elapsed = time.perf_counter() - t0
    return Pass(math.exp(nll_sum / max(scored, 1)), scored, windows, elapsed)


@dataclass(frozen=True)
class EvalPart:
    model: str
    parameters: int
    text_bytes: int
    max_length: int
    stride: int
    tokenize_ms: float
    rounds: int
    tokens: int
    windows: int
    ours_tokens_per_s: list[float]
    bare_tokens_per_s: list[float]
    ours_median_tokens_per_s: float
    bare_median_tokens_per_s: float
    ratio_of_medians: float
    ratio_per_round: list[float]
    ratio_median_per_round: float
    ours_perplexity: float
    bare_perplexity: float
    perplexity_rel_diff: float
    same_perplexity: bool
    same_tokens: bool
    goal: float
    goal_met: bool


def bench_eval(model_dir: Path, rounds: int, device: str, max_length: int, stride: int) -> EvalPart:
    loaded = load_model(str(model_dir), device=device)
    text = load_eval_text().text
    t0 = time.perf_counter()
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids.to(loaded.device)
    tokenize_ms = (time.perf_counter() - t0) * 1000
    limit = int(loaded.model.config.n_positions)
    if max_length > limit:
        raise SystemExit(f"--max-length {max_length} exceeds the model's {limit} positions")
    # One untimed pass of each: first-call allocations and lazy initialisation.
    ours_pass(loaded, text, max_length, stride)
    bare_pass(loaded.model, ids, max_length, stride)
    ours: list[Pass] = []
    bare: list[Pass] = []
    for i in range(rounds):
        if i % 2 == 0:  # alternate which goes first, so neither always follows the other
            ours.append(ours_pass(loaded, text, max_length, stride))
            bare.append(bare_pass(loaded.model, ids, max_length, stride))
        else:
            bare.append(bare_pass(loaded.model, ids, max_length, stride))
            ours.append(ours_pass(loaded, text, max_length, stride))
    ours_tps = [p.tokens_per_s for p in ours]
    bare_tps = [p.tokens_per_s for p in bare]
    ours_med, bare_med = statistics.median(ours_tps), statistics.median(bare_tps)
    ratio = ours_med / bare_med
    per_round = [o / b for o, b in zip(ours_tps, bare_tps, strict=True)]
    o_ppl, b_ppl = ours[0].perplexity, bare[0].perplexity
    # The largest relative gap between any pass and the first bare pass.
    rel = max(abs(p.perplexity - b_ppl) / b_ppl for p in (*ours, *bare))
    return EvalPart(
        model=model_dir.name,
        parameters=sum(p.numel() for p in loaded.model.parameters()),
        text_bytes=len(text.encode("utf-8")),
        max_length=max_length,
        stride=stride,
        tokenize_ms=round(tokenize_ms, 2),
        rounds=rounds,
        tokens=ours[0].tokens,
        windows=ours[0].windows,
        ours_tokens_per_s=[round(x) for x in ours_tps],
        bare_tokens_per_s=[round(x) for x in bare_tps],
        ours_median_tokens_per_s=round(ours_med),
        bare_median_tokens_per_s=round(bare_med),
        ratio_of_medians=round(ratio, 3),
        ratio_per_round=[round(r, 3) for r in per_round],
        ratio_median_per_round=round(statistics.median(per_round), 3),
        ours_perplexity=o_ppl,
        bare_perplexity=b_ppl,
        perplexity_rel_diff=rel,
        same_perplexity=rel <= SAME_PPL_RTOL,
        same_tokens=all(p.tokens == o.tokens for p, o in zip(bare, ours, strict=True)),
        goal=GOAL_OURS_X_BARE,
        goal_met=ratio >= GOAL_OURS_X_BARE,
    )


# ---- part 2: a full benchmark with the default policy ---------------------------------------


@dataclass(frozen=True)
class FullRun:
    status: str
    total_ms: float
    checks_ms: dict[str, float]
    other_ms: float  # total minus the checks: loading both models, reading prompts, verdict
    candidate_perplexity: float | None
    baseline_perplexity: float | None
    perplexity_increase: float | None
    ttft_ms: dict[str, float]
    per_token_ms: dict[str, float]
    generation_ms: dict[str, float]
    identical: int | None
    prompts: int | None


def _one_run(candidate: Path, baseline: Path, device: str) -> tuple[FullRun, str | None]:
    policy = PolicyFile().resolve(model="m")
    report, device_name = run_benchmarks(str(candidate), str(baseline), policy, device=device)
    by_name: dict[str, CheckResult] = {c.name: c for c in report.checks}
    missing = [n for n in CHECKS if n not in by_name]
    if missing:
        raise SystemExit(f"run_benchmarks did not run {missing}: {report.reason}")
    ppl, lat, con = (by_name[n].details for n in CHECKS)
    checks_ms = {n: c.duration_ms for n, c in by_name.items()}
    return FullRun(
        status=report.status.value,
        total_ms=report.duration_ms,
        checks_ms=checks_ms,
        other_ms=round(report.duration_ms - sum(checks_ms.values()), 3),
        candidate_perplexity=ppl.get("candidate", {}).get("perplexity"),
        baseline_perplexity=ppl.get("baseline", {}).get("perplexity"),
        perplexity_increase=ppl.get("increase"),
        ttft_ms=dict(lat.get("ttft_ms", {})),
        per_token_ms=dict(lat.get("per_token_ms", {})),
        generation_ms=dict(lat.get("generation_ms", {})),
        identical=con.get("identical"),
        prompts=con.get("prompts"),
    ), device_name


@dataclass(frozen=True)
class FullPart:
    candidate: str
    baseline: str
    device: str | None
    policy: dict[str, Any]
    load_one_model_ms: list[float]
    runs: list[FullRun]
    median_total_ms: float
    median_checks_ms: dict[str, float]
    median_other_ms: float
    median_load_one_model_ms: float


def bench_full(candidate: Path, baseline: Path, runs: int, device: str) -> FullPart:
    bench = PolicyFile().resolve(model="m").benchmark
    load_ms: list[float] = []
    results: list[FullRun] = []
    device_name: str | None = None
    for _ in range(runs):
        t0 = time.perf_counter()
        load_model(str(candidate), dtype=bench.dtype, device=device)
        load_ms.append(round((time.perf_counter() - t0) * 1000, 2))
        run, device_name = _one_run(candidate, baseline, device)
        results.append(run)
    names = list(results[0].checks_ms)
    return FullPart(
        candidate=candidate.name,
        baseline=baseline.name,
        device=device_name,
        policy=bench.model_dump(),
        load_one_model_ms=load_ms,
        runs=results,
        median_total_ms=statistics.median(r.total_ms for r in results),
        median_checks_ms={n: statistics.median(r.checks_ms[n] for r in results) for n in names},
        median_other_ms=statistics.median(r.other_ms for r in results),
        median_load_one_model_ms=statistics.median(load_ms),
    )


# ---- report ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    command: str
    when_utc: str
    machine: dict[str, Any]
    params: dict[str, Any]
    setup_s: float
    wall_s: float
    loadavg_1m_at_end: float
    eval: EvalPart | None
    full: FullPart | None


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cuda = torch.cuda.is_available()
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": metadata.version("transformers"),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cuda_available": cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else NO_GPU,
        "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
    }


def _stats(d: dict[str, float]) -> str:
    return f"p50 {d.get('p50', float('nan')):.2f} / p95 {d.get('p95', float('nan')):.2f}"


def render(report: Report) -> str:
    m = report.machine
    lines = [
        "preflight bench: benchmarker (issue #4)",
        f"command : {report.command}",
        f"when    : {report.when_utc}, {report.wall_s:.0f} s wall "
        f"(of which {report.setup_s:.0f} s copying or training the sample models)",
        f"machine : {m['nproc']} CPUs, {m['cpu_model']}, {m['os']}, 1-min load "
        f"{m['loadavg_1m_at_start']} at start, {report.loadavg_1m_at_end} at end",
        f"software: Python {m['python']}, torch {m['torch']} ({m['torch_threads']} threads, "
        f"{m['torch_interop_threads']} interop), transformers {m['transformers']}",
        f"GPU     : {m['gpu']}",
    ]
    if (e := report.eval) is not None:
        lines += [
            "",
            f"1. Evaluation tokens/s: {e.model} ({e.parameters:,} parameters), eval text "
            f"{e.text_bytes} bytes, max_length {e.max_length}, stride {e.stride}: {e.tokens} "
            f"scored tokens in {e.windows} windows; {e.rounds} round(s) after 1 warm-up each",
            f"  {'path':<58}{'median tok/s':>13}  per round",
            f"  {'ours: sliding_window_perplexity (tokenizes every call)':<58}"
            f"{e.ours_median_tokens_per_s:>13}  {e.ours_tokens_per_s}",
            f"  {'bare: model(ids) + F.cross_entropy, tokenized once':<58}"
            f"{e.bare_median_tokens_per_s:>13}  {e.bare_tokens_per_s}",
            f"  ours / bare: {e.ratio_of_medians:.3f}x (median of per-round ratios "
            f"{e.ratio_median_per_round:.3f}, range "
            f"{min(e.ratio_per_round):.3f}-{max(e.ratio_per_round):.3f}); "
            f"tokenizing the text once: {e.tokenize_ms:.1f} ms",
            f"  perplexity: ours {e.ours_perplexity:.6f}, bare {e.bare_perplexity:.6f}, "
            f"relative difference {e.perplexity_rel_diff:.1e}; same (<= {SAME_PPL_RTOL:g}): "
            f"{e.same_perplexity}; same token count: {e.same_tokens}",
            f"  goal ours >= {e.goal}x bare (ratio of medians): "
            f"{'met' if e.goal_met else 'NOT met'}",
        ]
    if (f := report.full) is not None:
        p = f.policy
        lines += [
            "",
            f"2. Full benchmark: run_benchmarks({f.candidate}, baseline {f.baseline}, default "
            f"policy) on {f.device}; {len(f.runs)} run(s)",
            f"  policy: perplexity max_length {p['max_length']} stride {p['stride']}, latency "
            f"{p['latency_runs']} runs + {p['latency_warmup_runs']} warm-up, consistency "
            f"{p['consistency_prompts']} prompts, dtype {p['dtype']}",
            f"  {'run':<5}{'total s':>9}{'perplexity':>12}{'latency':>9}{'consistency':>13}"
            f"{'load etc.':>11}{'load 1 model':>14}  status",
        ]
        for i, r in enumerate(f.runs):
            c = r.checks_ms
            lines.append(
                f"  {i + 1:<5}{r.total_ms / 1000:>9.2f}{c['perplexity'] / 1000:>12.2f}"
                f"{c['latency'] / 1000:>9.2f}{c['consistency'] / 1000:>13.2f}"
                f"{r.other_ms / 1000:>11.2f}{f.load_one_model_ms[i] / 1000:>14.3f}  {r.status}"
            )
        c = f.median_checks_ms
        lines.append(
            f"  {'med':<5}{f.median_total_ms / 1000:>9.2f}{c['perplexity'] / 1000:>12.2f}"
            f"{c['latency'] / 1000:>9.2f}{c['consistency'] / 1000:>13.2f}"
            f"{f.median_other_ms / 1000:>11.2f}{f.median_load_one_model_ms / 1000:>14.3f}"
        )
        lines.append(
            "  (seconds; 'load etc.' = total minus the checks: loading candidate and baseline, "
            "prompts, verdict)"
        )
        r = f.runs[-1]
        inc = r.perplexity_increase
        lines += [
            f"  perplexity: candidate {r.candidate_perplexity:.3f}, baseline "
            f"{r.baseline_perplexity:.3f}, increase {inc:+.2%}"
            if inc is not None and r.candidate_perplexity and r.baseline_perplexity
            else "  perplexity: -",
            f"  latency ms (last run): ttft {_stats(r.ttft_ms)}, per token "
            f"{_stats(r.per_token_ms)}, {NEW_TOKENS} tokens {_stats(r.generation_ms)}",
            f"  consistency: {r.identical}/{r.prompts} prompts identical across two greedy runs",
        ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--only", action="append", choices=("eval", "full"), help="run only this part"
    )
    parser.add_argument("--rounds", type=int, default=5, help="ours/bare rounds, part 1 (5)")
    parser.add_argument("--full-runs", type=int, default=3, help="full benchmarks, part 2 (3)")
    parser.add_argument("--max-length", type=int, default=256, help="part 1 window (256)")
    parser.add_argument("--stride", type=int, default=128, help="part 1 stride (128)")
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda (default cpu; cuda is untested)"
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--tmp", type=Path, help="where to put the temp dir (default: $TMPDIR)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if min(args.rounds, args.full_runs, args.stride) < 1 or args.stride > args.max_length:
        parser.error("counts must be positive and 1 <= stride <= max-length")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    parts = set(args.only or ("eval", "full"))
    started = time.perf_counter()
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info()
    machine["device"] = describe_device(args.device)
    params = {k: v for k, v in vars(args).items() if k not in ("json", "tmp")}
    with tempfile.TemporaryDirectory(prefix="preflight-bench-benchmarker-", dir=args.tmp) as tmp:
        root = Path(tmp)
        candidate = write_trained_model(root / "good-seed1", variant="good", seed=1)
        baseline = write_trained_model(root / "good-seed0", variant="good", seed=0)
        setup_s = time.perf_counter() - started
        eval_part = (
            bench_eval(candidate, args.rounds, args.device, args.max_length, args.stride)
            if "eval" in parts
            else None
        )
        full_part = (
            bench_full(candidate, baseline, args.full_runs, args.device)
            if "full" in parts
            else None
        )
    report = Report(
        command=command_line(),
        when_utc=when,
        machine=machine,
        params=params,
        setup_s=round(setup_s, 1),
        wall_s=round(time.perf_counter() - started, 1),
        loadavg_1m_at_end=round(os.getloadavg()[0], 2),
        eval=eval_part,
        full=full_part,
    )
    print(json.dumps(asdict(report), indent=2, default=str) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
