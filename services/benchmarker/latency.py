"""Latency of a fixed greedy generation: time to first token, per-token time, total, p50/p95."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

from services.benchmarker import deadline, loading

LATENCY_PROMPT = "The default value of the argument is"
NEW_TOKENS = 32


@dataclass(frozen=True)
class Percentiles:
    p50: float
    p95: float

    @classmethod
    def of(cls, samples: list[float]) -> Percentiles:
        ordered = sorted(samples)
        return cls(p50=statistics.median(ordered), p95=_quantile(ordered, 0.95))


def _quantile(ordered: list[float], q: float) -> float:
    """Nearest-rank quantile: exact for small samples (no interpolation toward unseen values)."""
    rank = max(1, -(-len(ordered) * q // 1))
    return ordered[int(rank) - 1]


@dataclass(frozen=True)
class LatencyResult:
    ttft_ms: Percentiles
    per_token_ms: Percentiles
    generation_ms: Percentiles
    runs: int
    warmup_runs: int
    new_tokens: int


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def measure_latency(
    loaded: Any, *, runs: int, warmup_runs: int, new_tokens: int = NEW_TOKENS
) -> LatencyResult:
    import torch

    model, tokenizer, device = loaded.model, loaded.tokenizer, loaded.device
    inputs = loading.encode(loaded, LATENCY_PROMPT, "latency prompt")
    common = {
        "do_sample": False,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": None,  # always generate exactly new_tokens: a fixed amount of work
    }
    ttft: list[float] = []
    total: list[float] = []
    with torch.inference_mode():
        for i in range(warmup_runs + runs):
            deadline.check(f"latency (run {i + 1} of {warmup_runs + runs})")
            _synchronize(device)
            t0 = time.perf_counter()
            model.generate(**inputs, max_new_tokens=1, min_new_tokens=1, **common)
            _synchronize(device)
            t1 = time.perf_counter()
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **common)
            _synchronize(device)
            t2 = time.perf_counter()
            if i >= warmup_runs:
                ttft.append((t1 - t0) * 1000)
                total.append((t2 - t1) * 1000)
    per_token = [max(t - f, 0.0) / max(new_tokens - 1, 1) for t, f in zip(total, ttft, strict=True)]
    return LatencyResult(
        ttft_ms=Percentiles.of(ttft),
        per_token_ms=Percentiles.of(per_token),
        generation_ms=Percentiles.of(total),
        runs=runs,
        warmup_runs=warmup_runs,
        new_tokens=new_tokens,
    )
