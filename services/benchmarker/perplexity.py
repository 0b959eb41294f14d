"""Sliding-window token perplexity and bits per byte on a pinned evaluation text."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from services.benchmarker import deadline, loading


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    bits_per_byte: float
    tokens: int
    bytes: int
    windows: int
    max_length: int
    stride: int

    @property
    def byte_perplexity(self) -> float:
        """2^bits-per-byte: comparable across tokenizers."""
        return float(2**self.bits_per_byte)


def sliding_window_perplexity(
    loaded: Any, text: str, *, max_length: int, stride: int
) -> PerplexityResult:
    """The Hugging Face recipe: windows of `max_length` tokens advanced by `stride`; each token
    is scored once, with up to `max_length - stride` tokens of context before it."""
    import torch

    model = loaded.model
    limit = getattr(model.config, "n_positions", None) or getattr(
        model.config, "max_position_embeddings", None
    )
    if limit is not None:
        max_length = min(max_length, int(limit))
        stride = min(stride, max_length)
    ids = loading.encode(loaded, text, "evaluation text").input_ids
    seq_len = ids.size(1)
    nll_sum = 0.0
    scored = 0
    prev_end = 0
    windows = 0
    with torch.inference_mode():
        for begin in range(0, seq_len, stride):
            deadline.check(f"perplexity (window {windows + 1})")
            end = min(begin + max_length, seq_len)
            target_len = end - prev_end
            window = ids[:, begin:end]
            targets = window.clone()
            targets[:, :-target_len] = -100
            out = model(window, labels=targets)
            # The loss is a mean over the scored targets (one fewer: labels are shifted).
            n = int((targets[:, 1:] != -100).sum())
            nll_sum += float(out.loss) * n
            scored += n
            windows += 1
            prev_end = end
            if end == seq_len:
                break
    n_bytes = len(text.encode("utf-8"))
    mean = nll_sum / max(scored, 1)
    return PerplexityResult(
        perplexity=math.exp(mean) if mean < 709 else math.inf,  # NaN stays NaN: callers check
        bits_per_byte=nll_sum / math.log(2) / n_bytes,
        tokens=scored,
        bytes=n_bytes,
        windows=windows,
        max_length=max_length,
        stride=stride,
    )
