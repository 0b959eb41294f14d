"""Which exceptions from third-party model code are results to report, and which stop a process."""

from __future__ import annotations

import asyncio

# What a process raises to stop itself, or asyncio to cancel a task: never swallowed.
_STOPPING = (KeyboardInterrupt, SystemExit, GeneratorExit, asyncio.CancelledError)


def is_contained(exc: BaseException) -> bool:
    """Whether `exc`, raised while loading or running a model, is the model's fault and so a
    result, not a reason to stop.

    Rust libraries bound with pyo3 (tokenizers, safetensors) turn a panic into
    `pyo3_runtime.PanicException`, which derives from BaseException, not Exception: a
    tokenizer.json with a charsmap that does not parse, or a pre-tokenizer regex that runs out
    of backtracking, raises it. `except Exception` lets it through and the whole service dies on
    one hostile file. Everything but the exceptions a process stops with is contained."""
    return not isinstance(exc, _STOPPING)


def describe(exc: BaseException) -> str:
    """`Type: first line` of an exception, for a one-line reason."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
