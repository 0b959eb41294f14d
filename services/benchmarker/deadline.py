"""The benchmark's hard time limit: measurements check it between steps and stop once past it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_DEADLINE: ContextVar[tuple[float, float] | None] = ContextVar("benchmark_deadline", default=None)


class OverTime(RuntimeError):
    """The benchmark ran past its time limit; the message says during what."""


@contextmanager
def limited(seconds: float | None) -> Iterator[None]:
    """Measurements inside (in this thread) stop at the next `check` after `seconds`."""
    token = _DEADLINE.set((time.monotonic() + seconds, seconds) if seconds else None)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def check(during: str) -> None:
    """Raise OverTime once past the limit. Called between windows, runs and prompts: a single
    forward pass or generation is not interrupted, so the limit is overrun by at most one."""
    deadline = _DEADLINE.get()
    if deadline is not None and time.monotonic() > deadline[0]:
        raise OverTime(
            f"the benchmark ran past its time limit of {deadline[1]:g} s "
            f"(PREFLIGHT_BENCHMARK_TIME_LIMIT_S) during {during}"
        )


def passed() -> bool:
    deadline = _DEADLINE.get()
    return deadline is not None and time.monotonic() > deadline[0]
