"""Temperature-0 consistency: greedy outputs of pinned prompts, run twice, compared per token."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.benchmarker import deadline, loading

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
    # Known reasons the outputs can differ (e.g. a tokenizer with BPE dropout); empty when none.
    causes: tuple[str, ...] = ()


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token, or None when the sequences are identical."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare_runs(
    first: Sequence[Sequence[int]],
    second: Sequence[Sequence[int]],
    settings: dict[str, Any],
    causes: Sequence[str] = (),
) -> ConsistencyResult:
    """Pure: how many prompts produced identical tokens, and where the others diverged."""
    divergences = []
    for i, (a, b) in enumerate(zip(first, second, strict=True)):
        at = first_divergence(a, b)
        if at is not None:
            divergences.append(Divergence(i, at))
    return ConsistencyResult(
        len(first), len(first) - len(divergences), tuple(divergences), settings, tuple(causes)
    )


def bpe_dropout(tokenizer: Any) -> float | None:
    """The BPE dropout a fast (tokenizers-backed) tokenizer applies on every encode, if any."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    dropout = getattr(getattr(backend, "model", None), "dropout", None)
    if not isinstance(dropout, float | int) or dropout <= 0:
        return None
    return round(float(dropout), 6)  # stored as f32: 0.10000000149011612 -> 0.1


def unstable_tokenizations(tokenizer: Any, prompts: Sequence[str]) -> int:
    """How many prompts the tokenizer splits differently when asked twice (0 when it is
    deterministic). Catches random tokenization whatever its mechanism."""
    return sum(tokenizer(p).input_ids != tokenizer(p).input_ids for p in prompts)


def tokenizer_causes(dropout: float | None, unstable: int, prompts: int) -> tuple[str, ...]:
    """Pure: what the tokenizer checks say about why greedy outputs may differ."""
    if dropout is not None:
        return (
            f"tokenizer applies BPE dropout {dropout:g} (tokenizer.json model.dropout, a "
            f"training-time setting): tokenization is random ({unstable}/{prompts} prompts "
            "tokenized differently on two encodes)",
        )
    if unstable:
        return (
            f"tokenization is random: {unstable}/{prompts} prompts tokenized differently on "
            "two encodes",
        )
    return ()


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

    model, tokenizer = loaded.model, loaded.tokenizer
    outputs: list[list[int]] = []
    with torch.inference_mode():
        for number, prompt in enumerate(prompts, 1):
            deadline.check(f"consistency (prompt {number} of {len(prompts)})")
            inputs = loading.encode(loaded, prompt, f"consistency prompt {number}")
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
    against the previous version). The tokenizer is checked too: random tokenization (BPE
    dropout left on) makes greedy outputs differ with every kernel deterministic."""
    settings = deterministic_settings(loaded.device)
    dropout = bpe_dropout(loaded.tokenizer)
    settings["tokenizer_bpe_dropout"] = dropout
    causes = tokenizer_causes(
        dropout, unstable_tokenizations(loaded.tokenizer, prompts), len(prompts)
    )
    first = generate(loaded, prompts)
    second = generate(loaded, prompts)
    return compare_runs(first, second, settings, causes), first
