"""What writes the completion: synthetic words, or a small real model on CPU (torch optional)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any, Protocol

WORDS = ("the", "model", "answers", "with", "a", "steady", "stream", "of", "plain", "tokens")


class Generator(Protocol):
    """Turns a prompt into up to `max_tokens` text pieces (one per streamed chunk)."""

    mode: str

    async def complete(self, prompt: str, max_tokens: int) -> list[str]: ...


class SyntheticGenerator:
    """Deterministic filler text: costs nothing, so latency is what the knobs say."""

    mode = "synthetic"

    async def complete(self, prompt: str, max_tokens: int) -> list[str]:
        start = len(prompt)
        return [" " + WORDS[(start + i) % len(WORDS)] for i in range(max_tokens)]


class ModelUnavailable(RuntimeError):
    """Model mode cannot start; the message says why in one line."""


class ModelGenerator:
    """Greedy decoding with transformers on CPU, one request at a time (in a thread)."""

    mode = "model"

    def __init__(self, model_dir: Path, *, threads: int | None = None) -> None:
        try:
            import torch
        except ImportError as exc:
            raise ModelUnavailable(
                "model mode needs torch and transformers: install preflight[benchmark], "
                "or run with --synthetic"
            ) from exc
        from services.benchmarker.loading import LoadError, load_model

        if threads:
            torch.set_num_threads(threads)
        try:
            self._loaded = load_model(str(model_dir), device="cpu")
        except LoadError as exc:
            raise ModelUnavailable(str(exc)) from exc
        self._lock = threading.Lock()  # generate() is not meant to run concurrently

    def _generate(self, prompt: str, max_tokens: int) -> list[str]:
        import torch

        tokenizer: Any = self._loaded.tokenizer
        model: Any = self._loaded.model
        with self._lock, torch.no_grad():
            inputs = tokenizer(prompt or tokenizer.eos_token, return_tensors="pt")
            output = model.generate(
                **inputs,
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = output[0][inputs["input_ids"].shape[1] :].tolist()
        return [tokenizer.decode([t], skip_special_tokens=True) for t in new]

    async def complete(self, prompt: str, max_tokens: int) -> list[str]:
        return await asyncio.to_thread(self._generate, prompt, max_tokens)
