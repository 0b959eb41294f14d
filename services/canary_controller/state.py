"""Rollout state: what the controller keeps in the rollouts KV bucket, one key per deployment."""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from services.contracts.events import (
    DeploymentRequested,
    RoleMeasurement,
    RouteTarget,
    StageReport,
)
from services.contracts.policy import CanaryPolicy, CanaryThresholds


class Phase(StrEnum):
    """Where a rollout is. `step_index` points into `policy.steps` while in STEP, HELD, PAUSED."""

    QUEUED = "queued"
    """Waits for an earlier rollout of the model to finish: two canaries never share a route."""
    STEP = "step"
    """The canary takes `steps[step_index].weight` percent of requests until the step ends."""
    HELD = "held"
    """Inconclusive at a step's end: the weight stays, a person decides before `held_deadline`."""
    PAUSED = "paused"
    """A person paused it: the step clock is stopped, automatic rollback still applies."""
    BAKE = "bake"
    """Promoted to 100% and watched for `policy.bake_s`; a rollback is still possible."""
    PROMOTED = "promoted"
    """Done: the canary is the stable version."""
    ROLLED_BACK = "rolled_back"
    """Done: the canary is out of traffic."""

    @property
    def terminal(self) -> bool:
        return self in (Phase.PROMOTED, Phase.ROLLED_BACK)

    @property
    def holds_route(self) -> bool:
        """Whether the rollout owns its model's route (a canary is, or may be, in traffic)."""
        return self in (Phase.STEP, Phase.HELD, Phase.PAUSED, Phase.BAKE)


class PendingEffects(BaseModel):
    """What a transition must still do outside the KV value: replayed after a crash.

    Both effects are idempotent: the route is written whole, and each event carries a message id
    that JetStream deduplicates, so doing them twice is harmless and doing them never is not.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    route_json: str | None = None
    events_json: tuple[str, ...] = ()


class Interval(BaseModel):
    """A span of wall-clock time, start before end (a bus outage)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    start: datetime
    end: datetime

    @property
    def seconds(self) -> float:
        return max(0.0, (self.end - self.start).total_seconds())


class RolloutState(BaseModel):
    """The controller's whole truth about one rollout; the step clock lives here, not in memory."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    deployment_id: str
    model: str
    version: str
    request: DeploymentRequested
    earlier: tuple[StageReport, ...] = ()
    policy: CanaryPolicy
    thresholds: CanaryThresholds
    stable: RouteTarget | None = None
    canary: RouteTarget
    phase: Phase
    step_index: int = Field(default=0, ge=0)
    created_at: datetime
    step_started_at: datetime | None = None
    step_starts: tuple[datetime, ...] = Field(
        default=(), description="When each step so far started (the page draws them)."
    )
    step_ends_at: datetime | None = Field(
        default=None, description="Nominal end of the current step (bake: end of the bake)."
    )
    paused_from: Phase | None = None
    paused_remaining_s: float | None = None
    held_deadline: datetime | None = None
    held_since: datetime | None = Field(
        default=None, description="When it was held: bus outages after this extend the hold."
    )
    bus_outages: tuple[Interval, ...] = Field(
        default=(),
        description=(
            "Bus outages in the current step (or hold) already allowed for, merged: their time "
            "did not count against it. Kept here so a failover does not allow for them twice."
        ),
    )
    judge_after: datetime | None = Field(
        default=None,
        description=(
            "No decision on time (a step's end, a deadline) before this: after a bus outage the "
            "request metrics buffered by routers are still arriving."
        ),
    )
    looks: int = Field(default=0, ge=0, description="Analyses so far (alpha is spent per look).")
    last_analysis_at: datetime | None = None
    canary_measurement: RoleMeasurement | None = None
    stable_measurement: RoleMeasurement | None = None
    last_verdict: str | None = None
    last_reason: str = ""
    steps_completed: int = 0
    baking: bool = Field(
        default=False, description="Past the last step, at 100% (the bake, or held/paused in it)."
    )
    finished_at: datetime | None = None
    pending: PendingEffects | None = None

    @property
    def weight(self) -> float:
        """The canary's share of requests in this phase."""
        if self.baking and self.phase in (Phase.BAKE, Phase.HELD, Phase.PAUSED):
            return 100.0
        if self.phase in (Phase.STEP, Phase.HELD, Phase.PAUSED):
            return self.policy.steps[self.step_index].weight
        if self.phase is Phase.BAKE:
            return 100.0
        return 0.0

    @property
    def step_deadline(self) -> datetime | None:
        """The latest a step may run when short of traffic: its nominal end plus the extension."""
        if self.step_ends_at is None:
            return None
        if self.baking:
            return self.step_ends_at
        return self.step_ends_at + timedelta(seconds=self.policy.max_step_extension_s)

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> RolloutState:
        return cls.model_validate_json(data)
