"""Temperature-0 consistency: greedy outputs of pinned prompts, run twice, compared per token."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

NEW_TOKENS = 16
BATCH_SIZE = 1  # fixed: batch composition must not change what is compared


@dataclass(frozen=True)
class Divergence:
    prompt_index: int
    first_diverging_token: int


@dataclass(frozen=True)
class ConsistencyResult:
    prompts: int
    identical: int
    divergences: tuple[Divergence, ...]
    settings: dict[str, Any] = field(default_factory=dict)


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token, or None when the sequences are identical."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare_runs(
    first: Sequence[Sequence[int]], second: Sequence[Sequence[int]], settings: dict[str, Any]
) -> ConsistencyResult:
    """Pure: how many prompts produced identical tokens, and where the others diverged."""
    divergences = []
    for i, (a, b) in enumerate(zip(first, second, strict=True)):
        at = first_divergence(a, b)
        if at is not None:
            divergences.append(Divergence(i, at))
    return ConsistencyResult(
        len(first), len(first) - len(divergences), tuple(divergences), settings
    )


def deterministic_settings(device: str) -> dict[str, Any]:
    """Turn on deterministic kernels and say which settings the comparison ran under."""
    import os

    import torch

    if device.startswith("cuda"):
        # cuBLAS needs a fixed workspace for deterministic GEMMs (set before the first GEMM).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(0)
    return {
        "torch.use_deterministic_algorithms": True,
        "batch_size": BATCH_SIZE,
        "decoding": "greedy (do_sample=False), temperature 0",
        "new_tokens": NEW_TOKENS,
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }


def greedy_outputs(
    loaded: Any, prompts: Sequence[str], new_tokens: int = NEW_TOKENS
) -> list[list[int]]:
    import torch

    model, tokenizer, device = loaded.model, loaded.tokenizer, loaded.device
    outputs: list[list[int]] = []
    with torch.inference_mode():
        for prompt in prompts:
            inputs = tokenizer(prompt, return_tensors="pt").to(device)
            generated = model.generate(
                **inputs,
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            outputs.append(generated[0, inputs.input_ids.shape[1] :].tolist())
    return outputs


def check_consistency(
    loaded: Any,
    prompts: Sequence[str],
    generate: Callable[[Any, Sequence[str]], list[list[int]]] = greedy_outputs,
) -> tuple[ConsistencyResult, list[list[int]]]:
    """Run every prompt twice; returns the comparison and the first run's tokens (for comparing
    against the previous version)."""
    settings = deterministic_settings(loaded.device)
    first = generate(loaded, prompts)
    second = generate(loaded, prompts)
    return compare_runs(first, second, settings), first
