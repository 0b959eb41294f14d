"""The benchmark stage: load, measure against the previous version, and give a verdict."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from services.benchmarker import consistency, deadline, latency, loading, perplexity
from services.contracts.events import CheckResult, StageReport, Status
from services.contracts.policy import BenchmarkPolicy, LatencyThresholds, Policy
from services.runtime import faults
from services.validator.checks.checksum import DigestCache, digest_of

if TYPE_CHECKING:
    from services.storage.cache import ModelCache

log = logging.getLogger("preflight.benchmarker")

# Bumped whenever a change to measurement code could change a stored perplexity.
MEASUREMENT_VERSION = 1
_FINGERPRINT_SKIP = {"README.md", "preflight-manifest.json"}


def model_fingerprint(path: Path, cache: DigestCache | None = None) -> str:
    """Digest of every file that defines the model (weights, config, tokenizer). With the
    validator's digest cache, files it already hashed are not read again."""
    outer = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if rel in _FINGERPRINT_SKIP:
            continue
        digest, _ = digest_of(file, cache)
        outer.update(f"{rel}\0{digest}\0".encode())
    return outer.hexdigest()


class ResultStore:
    """Stored perplexities, reused only when every part of the measurement config matches."""

    def __init__(self, path: Path, digests: DigestCache | None = None) -> None:
        self.path = path
        self.digests = digests

    def _load(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.path.read_text())
            return data
        except (OSError, ValueError):
            return {}

    def get(self, key: str) -> dict[str, Any] | None:
        found = self._load().get(key)
        return found if isinstance(found, dict) else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        data = self._load()
        data[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".perplexity-")
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
        os.replace(tmp, self.path)  # atomic: a crash never leaves half a file


def _config_key(fingerprint: str, config: dict[str, Any]) -> str:
    blob = json.dumps({"model": fingerprint, **config}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _check(name: str, status: Status, reason: str, started: float, **extra: Any) -> CheckResult:
    return CheckResult(
        name=name,
        status=status,
        reason=reason,
        duration_ms=round((time.perf_counter() - started) * 1000, 3),
        **extra,
    )


def _tokenizer_signature(loaded: Any) -> str:
    vocab = loaded.tokenizer.get_vocab()
    return hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()


def _measure_perplexity(
    loaded: Any, policy: BenchmarkPolicy, store: ResultStore | None, fingerprint: str | None
) -> tuple[perplexity.PerplexityResult, dict[str, Any], bool]:
    from services.benchmarker.corpus import load_eval_text

    text = load_eval_text(policy.eval_dataset)
    config = {
        "dataset": text.name,
        "dataset_sha256": text.sha256,
        "max_length": policy.max_length,
        "stride": policy.stride,
        "dtype": loaded.dtype,
        "device_type": loaded.device.split(":")[0],
        "measurement_version": MEASUREMENT_VERSION,
    }
    key = _config_key(fingerprint, config) if fingerprint and store else None
    if key and store and (stored := store.get(key)) is not None:
        return perplexity.PerplexityResult(**stored), config, True
    result = perplexity.sliding_window_perplexity(
        loaded, text.text, max_length=policy.max_length, stride=policy.stride
    )
    if key and store:
        store.put(key, asdict(result))
    return result, config, False


def perplexity_check(
    candidate: Any,
    baseline: Any | None,
    policy: BenchmarkPolicy,
    store: ResultStore | None,
) -> CheckResult:
    started = time.perf_counter()
    cand, config, _ = _measure_perplexity(candidate, policy, None, None)
    details: dict[str, Any] = {"config": config, "candidate": asdict(cand)}
    if cand.tokens == 0:
        # exp(0 / 0 tokens) reads as a perplexity of 1.000: a measurement of nothing.
        return _check(
            "perplexity",
            Status.ERROR,
            "scored 0 tokens of the evaluation text (does the tokenizer produce any?): "
            "nothing was measured",
            started,
            details=details,
        )
    if baseline is None:
        return _check(
            "perplexity",
            Status.SKIPPED,
            f"perplexity {cand.perplexity:.3f} ({cand.bits_per_byte:.4f} bits/byte); no previous "
            "version to compare against",
            started,
            value=cand.perplexity,
            details=details,
        )
    fingerprint = model_fingerprint(baseline.path, store.digests) if store else None
    base, _, reused = _measure_perplexity(baseline, policy, store, fingerprint)
    if base.tokens == 0:
        return _check(
            "perplexity",
            Status.ERROR,
            "scored 0 tokens of the evaluation text with the previous version: nothing to "
            "compare against",
            started,
            details=details,
        )
    same_tokenizer = _tokenizer_signature(candidate) == _tokenizer_signature(baseline)
    if same_tokenizer:
        metric, c, b = "token perplexity", cand.perplexity, base.perplexity
    else:
        metric, c, b = (
            "byte perplexity (tokenizers differ)",
            cand.byte_perplexity,
            base.byte_perplexity,
        )
    if not (math.isfinite(c) and math.isfinite(b)) or b <= 0:
        details |= {"compared": metric}
        text = f"{metric} is not a finite number: {c} vs {b} for the previous version"
        return _check(
            "perplexity",
            Status.FAILED,
            text,
            started,
            threshold=policy.max_perplexity_increase,
            details=details,
        )
    increase = c / b - 1
    details |= {
        "baseline": asdict(base),
        "baseline_reused_from_store": reused,
        "compared": metric,
        "increase": increase,
    }
    threshold = policy.max_perplexity_increase
    text = (
        f"{metric} {c:.3f} vs {b:.3f} for the previous version ({increase:+.1%}, limit "
        f"+{threshold:.0%}); max_length {cand.max_length}, stride {cand.stride}, {config['dtype']}"
    )
    status = Status.FAILED if increase > threshold else Status.PASSED
    return _check(
        "perplexity",
        status,
        text,
        started,
        value=round(increase, 6),
        threshold=threshold,
        unit="relative",
        details=details,
    )


def latency_check(
    loaded: Any, policy: BenchmarkPolicy, thresholds: LatencyThresholds, model_class: str
) -> CheckResult:
    started = time.perf_counter()
    result = latency.measure_latency(
        loaded, runs=policy.latency_runs, warmup_runs=policy.latency_warmup_runs
    )
    measured = {
        "ttft_p95_ms": result.ttft_ms.p95,
        "per_token_p95_ms": result.per_token_ms.p95,
        "generation_p95_ms": result.generation_ms.p95,
    }
    limits = thresholds.model_dump()
    over = [(k, v, limits[k]) for k, v in measured.items() if v > limits[k]]
    details = {
        "ttft_ms": asdict(result.ttft_ms),
        "per_token_ms": asdict(result.per_token_ms),
        "generation_ms": asdict(result.generation_ms),
        "runs": result.runs,
        "warmup_runs": result.warmup_runs,
        "new_tokens": result.new_tokens,
        "model_class": model_class,
        "thresholds": limits,
    }
    summary = (
        f"p95 ttft {result.ttft_ms.p95:.1f} ms, per token {result.per_token_ms.p95:.2f} ms, "
        f"{result.new_tokens} tokens {result.generation_ms.p95:.1f} ms over {result.runs} runs "
        f"({result.warmup_runs} warm-up excluded), class {model_class}"
    )
    if over:
        _, value, limit = over[0]
        why = "; ".join(f"{k} {v:.1f} > {lim:g}" for k, v, lim in over)
        return _check(
            "latency",
            Status.FAILED,
            f"{why} ({summary})",
            started,
            value=round(value, 3),
            threshold=limit,
            unit="ms",
            details=details,
        )
    return _check("latency", Status.PASSED, summary, started, details=details)


def consistency_check(loaded: Any, prompts: list[str]) -> tuple[CheckResult, list[list[int]]]:
    started = time.perf_counter()
    result, outputs = consistency.check_consistency(loaded, prompts)
    details = {
        "prompts": result.prompts,
        "identical": result.identical,
        "divergences": [asdict(d) for d in result.divergences],
        "settings": result.settings,
        "causes": list(result.causes),
    }
    text = f"{result.identical}/{result.prompts} prompts identical across two greedy runs"
    if result.divergences:
        where = ", ".join(
            f"prompt {d.prompt_index} at token {d.first_diverging_token}"
            for d in result.divergences[:5]
        )
        if result.causes:
            where += "; likely cause: " + "; ".join(result.causes)
        return _check(
            "consistency",
            Status.FAILED,
            f"{text}; diverged: {where}",
            started,
            value=result.identical,
            threshold=result.prompts,
            details=details,
        ), outputs
    return _check(
        "consistency",
        Status.PASSED,
        text,
        started,
        value=result.identical,
        threshold=result.prompts,
        details=details,
    ), outputs


def versus_stable_check(outputs: list[list[int]], baseline: Any, prompts: list[str]) -> CheckResult:
    started = time.perf_counter()
    stable = consistency.greedy_outputs(baseline, prompts)
    result = consistency.compare_runs(outputs, stable, {"against": "previous version"})
    text = f"{result.identical}/{result.prompts} prompts identical to the previous version"
    status = Status.PASSED if not result.divergences else Status.FAILED
    details = {"divergences": [asdict(d) for d in result.divergences]}
    return _check(
        "consistency_vs_stable",
        status,
        text,
        started,
        value=result.identical,
        threshold=result.prompts,
        details=details,
    )


def _guarded(name: str, measure: Any) -> CheckResult:
    """A measurement that raises is a result (`error`), never a crashed benchmarker."""
    started = time.perf_counter()
    try:
        result: CheckResult = measure()
        return result
    except BaseException as exc:  # any layer of torch, transformers or tokenizers; Rust panics
        if not faults.is_contained(exc):
            raise
        log.exception("benchmark %s failed", name)
        return _check(name, Status.ERROR, f"could not measure: {faults.describe(exc)}", started)


def _over_time(name: str) -> CheckResult:
    return CheckResult(
        name=name,
        status=Status.ERROR,
        reason="not run: the benchmark is past its time limit (PREFLIGHT_BENCHMARK_TIME_LIMIT_S)",
    )


@dataclass(frozen=True)
class Step:
    """Where a benchmark is: fetching or loading a model (`name`: its location), the candidate
    loaded (`name`: the device), measuring a check (`name`: the check), or a check done
    (`check`). isolated.py hears these from its child process, so that a child it must stop
    still leaves a report of what it did."""

    phase: Literal["fetching", "loading", "loaded", "measuring", "checked"]
    name: str
    check: CheckResult | None = None


OnStep = Callable[[Step], None]


def could_not_run(reason: str, service: str, started: float) -> StageReport:
    return StageReport(
        stage="benchmark",
        status=Status.ERROR,
        reason=f"could not run: {reason}",
        duration_ms=round((time.perf_counter() - started) * 1000, 3),
        service=service,
    )


def run_benchmarks(
    location: str,
    baseline_location: str | None,
    policy: Policy,
    *,
    model_class: str = "default",
    store: ResultStore | None = None,
    device: str | None = None,
    service: str = "",
    model_cache: ModelCache | None = None,
    time_limit_s: float | None = None,
    on_step: OnStep | None = None,
) -> tuple[StageReport, str | None]:
    """(report, device description). Never raises on a bad model: that is a result.

    Remote locations are fetched through `model_cache`; their snapshots are held from eviction
    until the report is made. `time_limit_s`: measurements (not loading) stop once past it
    (deadline.py). `on_step` hears each step as it starts and each check as it ends. This runs
    in the calling process: the benchmarker service runs it in a child (isolated.py)."""
    with ExitStack() as held:
        return _run_benchmarks(
            location,
            baseline_location,
            policy,
            model_class=model_class,
            store=store,
            device=device,
            service=service,
            model_cache=model_cache,
            held=held,
            time_limit_s=time_limit_s,
            on_step=on_step or (lambda step: None),
        )


def _run_benchmarks(
    location: str,
    baseline_location: str | None,
    policy: Policy,
    *,
    model_class: str,
    store: ResultStore | None,
    device: str | None,
    service: str,
    model_cache: ModelCache | None,
    held: ExitStack,
    time_limit_s: float | None,
    on_step: OnStep,
) -> tuple[StageReport, str | None]:
    started = time.perf_counter()
    bench = policy.benchmark
    if not bench.enabled:
        return StageReport(
            stage="benchmark",
            status=Status.SKIPPED,
            reason="skipped: disabled by policy",
            service=service,
        ), None
    try:
        thresholds = policy.model_class(model_class).latency
    except ValueError as exc:
        return could_not_run(str(exc), service, started), None
    checks: list[CheckResult] = []

    def add(check: CheckResult) -> None:
        checks.append(check)
        on_step(Step("checked", check.name, check))

    def phases(location: str) -> Callable[[str], None]:
        return lambda phase: on_step(Step(phase, location))  # type: ignore[arg-type]

    try:
        candidate = loading.load_model(
            location,
            dtype=bench.dtype,
            device=device,
            cache=model_cache,
            held=held,
            on_phase=phases(location),
        )
    except loading.LoadError as exc:
        return could_not_run(str(exc), service, started), None
    device_name = loading.describe_device(candidate.device)
    on_step(Step("loaded", device_name))
    baseline = None
    if baseline_location:
        try:
            baseline = loading.load_model(
                baseline_location,
                dtype=candidate.dtype,
                device=candidate.device,
                cache=model_cache,
                held=held,
                on_phase=phases(baseline_location),
            )
        except loading.LoadError as exc:
            add(
                CheckResult(name="baseline", status=Status.ERROR, reason=f"previous version: {exc}")
            )
    held.enter_context(deadline.limited(time_limit_s))  # from here: loading is not counted
    from services.benchmarker.corpus import load_prompts

    prompts = load_prompts()[: bench.consistency_prompts]
    steps: list[tuple[str, bool, Any]] = [
        (
            "perplexity",
            bench.perplexity,
            lambda: perplexity_check(candidate, baseline, bench, store),
        ),
        (
            "latency",
            bench.latency,
            lambda: latency_check(candidate, bench, thresholds, model_class),
        ),
    ]
    for name, enabled, measure in steps:
        if not enabled:
            add(CheckResult(name=name, status=Status.SKIPPED, reason="disabled by policy"))
        elif deadline.passed():
            add(_over_time(name))
        else:
            on_step(Step("measuring", name))
            add(_guarded(name, measure))
    if bench.consistency:
        outputs: list[list[int]] = []

        def run_consistency() -> CheckResult:
            check, produced = consistency_check(candidate, prompts)
            outputs.extend(produced)
            return check

        if deadline.passed():
            add(_over_time("consistency"))
        else:
            on_step(Step("measuring", "consistency"))
            add(_guarded("consistency", run_consistency))
        if bench.compare_outputs_with_stable and baseline is not None and outputs:
            stable = baseline
            on_step(Step("measuring", "consistency_vs_stable"))
            add(
                _guarded(
                    "consistency_vs_stable", lambda: versus_stable_check(outputs, stable, prompts)
                )
            )
    else:
        add(CheckResult(name="consistency", status=Status.SKIPPED, reason="disabled by policy"))
    return verdict(checks, started, service, device_name), device_name


def verdict(checks: list[CheckResult], started: float, service: str, device: str) -> StageReport:
    """Worst wins: a failed assertion degrades; a check that could not run (the previous
    version did not load, a measurement raised) makes the stage `error`, never `passed`."""
    failed = [c for c in checks if c.status is Status.FAILED]
    errored = [c for c in checks if c.status is Status.ERROR]
    elapsed = time.perf_counter() - started
    if failed:
        status = Status.DEGRADED
        reason = "; ".join(f"{c.name}: {c.reason}" for c in failed + errored)
    elif errored:
        status = Status.ERROR
        reason = "could not run: " + "; ".join(f"{c.name}: {c.reason}" for c in errored)
    elif not any(c.status is Status.PASSED for c in checks):
        # Nothing was measured: saying "passed" would be a check that always passes.
        status = Status.SKIPPED
        reason = "skipped: no check ran (" + ", ".join(f"{c.name}: {c.reason}" for c in checks)
        reason += ")"
    else:
        status = Status.PASSED
        reason = ", ".join(f"{c.name} {c.status.value}" for c in checks)
    return StageReport(
        stage="benchmark",
        status=status,
        reason=f"{reason}; {elapsed:.1f} s on {device}",
        checks=tuple(checks),
        duration_ms=round(elapsed * 1000, 3),
        service=service,
    )
