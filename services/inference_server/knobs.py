"""The synthetic server's behaviour knobs and the pure draws they drive (latency, errors)."""

from __future__ import annotations

import math
import random
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Knobs(BaseModel):
    """What `/admin/config` reads and changes while the server runs."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    latency_ms: float = Field(default=20.0, ge=0, le=600_000, description="Median delay.")
    latency_jitter: float = Field(
        default=0.2, ge=0, le=5, description="Spread: sigma of the log-normal (0: fixed delay)."
    )
    error_rate: float = Field(default=0.0, ge=0, le=1, description="Share of 500 answers.")
    token_interval_ms: float = Field(
        default=0.0, ge=0, le=60_000, description="Pause between streamed chunks."
    )
    ttft_delay_ms: float = Field(
        default=0.0,
        ge=0,
        le=600_000,
        description=(
            "Streamed answers only: extra wait before the first token, taken back out of the "
            "pauses between the later tokens (a slower prefill, a faster decode), so the total "
            "stays the same while the pauses last; the part beyond them adds to it."
        ),
    )

    def merged(self, changes: dict[str, Any]) -> Knobs:
        """A copy with `changes` applied and validated (unknown keys are refused)."""
        return Knobs.model_validate({**self.model_dump(), **changes})


def draw_delay_s(knobs: Knobs, rng: random.Random) -> float:
    """A log-normal delay whose median is `latency_ms` and whose log-sigma is `latency_jitter`."""
    if knobs.latency_ms <= 0:
        return 0.0
    if knobs.latency_jitter <= 0:
        return knobs.latency_ms / 1000.0
    return knobs.latency_ms * math.exp(rng.gauss(0.0, knobs.latency_jitter)) / 1000.0


def token_gaps_s(knobs: Knobs, tokens: int) -> tuple[float, float]:
    """Streamed answer of `tokens` chunks: (extra wait before the first, pause between later
    ones). `ttft_delay_ms` is spread back out of the `tokens - 1` pauses, down to none."""
    first = knobs.ttft_delay_ms / 1000.0
    between = knobs.token_interval_ms / 1000.0
    if first and tokens > 1:
        between = max(0.0, between - first / (tokens - 1))
    return first, between


def draw_error(knobs: Knobs, rng: random.Random) -> bool:
    return knobs.error_rate > 0 and rng.random() < knobs.error_rate
