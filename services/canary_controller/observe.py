"""What the controller reads from the metrics store for one look at a rollout.

Shared by the engine (live) and `preflight analyse` (replay over stored records): the same
windows, the same queries, so a replay sees what the controller would have seen.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Protocol

from services.canary_controller import decision as rules
from services.canary_controller import sequential
from services.canary_controller.state import RolloutState
from services.metrics.queries import BucketCounts, MetricsUnavailable, WindowResult

log = logging.getLogger("preflight.canary-controller")


class MetricsSource(Protocol):
    """Request metrics per deployment and window; raises MetricsUnavailable when it cannot say.
    `buckets` is needed only by the e-process method."""

    async def window(
        self, deployment_id: str, start: datetime, end: datetime, *, raw: bool
    ) -> WindowResult: ...


class BucketSource(Protocol):
    async def buckets(
        self,
        deployment_id: str,
        start: datetime,
        end: datetime,
        bucket_s: float,
        latency_limit_ms: float | None,
        *,
        ttft_limit_ms: float | None = None,
    ) -> BucketCounts: ...


async def observe(
    metrics: MetricsSource, state: RolloutState, now: datetime
) -> rules.Observation | None:
    """The step window (and the recent lookback, or the per-bucket counts of the e-process
    method); None when the store did not answer (never read as healthy)."""
    (start, end), recent = rules.analysis_windows(state, now)
    policy = state.policy
    try:
        step = await metrics.window(state.deployment_id, start, end, raw=True)
        if policy.method == "e-process":
            buckets = getattr(metrics, "buckets", None)
            if buckets is None:
                raise MetricsUnavailable(
                    "this metrics source has no per-bucket counts, which the e-process method needs"
                )
            limit = sequential.latency_limit(
                step.stable.latencies_ms, state.thresholds, policy, state.weight
            )
            ttft = sequential.ttft_limit(
                step.stable.ttft_ms, state.thresholds, policy, state.weight
            )
            counts = await buckets(
                state.deployment_id,
                start,
                end,
                policy.e_process.change_every_s,
                limit,
                ttft_limit_ms=ttft,
            )
            return rules.Observation(step=step, counts=counts)
        latest = None
        if recent is not None:
            latest = await metrics.window(state.deployment_id, recent[0], recent[1], raw=True)
    except MetricsUnavailable as exc:
        log.warning("rollout %s: metrics unavailable: %s", state.deployment_id, exc)
        return None
    return rules.Observation(step=step, recent=latest)
