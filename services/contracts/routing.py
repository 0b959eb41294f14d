"""Where each event is published and under which JetStream message id (the dedup key)."""

from __future__ import annotations

from typing import Final

from services.contracts import subjects
from services.contracts.events import (
    AbortDeployment,
    BenchmarkCompleted,
    CanaryAnalysed,
    CanaryStepStarted,
    Command,
    DeploymentBlocked,
    DeploymentDegraded,
    DeploymentFailed,
    DeploymentHeld,
    DeploymentPromoted,
    DeploymentRequested,
    DeploymentRolledBack,
    Event,
    PauseDeployment,
    PromoteDeployment,
    ResumeDeployment,
    ValidationCompleted,
)

_STAGES: Final[dict[type[Event], subjects.StageName]] = {
    DeploymentRequested: "requested",
    ValidationCompleted: "validated",
    BenchmarkCompleted: "benchmarked",
    CanaryStepStarted: "canary_step",
    CanaryAnalysed: "canary_analysed",
}
_OUTCOMES: Final[dict[type[Event], subjects.OutcomeName]] = {
    DeploymentBlocked: "blocked",
    DeploymentDegraded: "degraded",
    DeploymentPromoted: "promoted",
    DeploymentRolledBack: "rolled_back",
    DeploymentHeld: "held",
    DeploymentFailed: "failed",
}
_COMMANDS: Final[dict[type[Event], subjects.CommandName]] = {
    PromoteDeployment: "promote",
    AbortDeployment: "abort",
    PauseDeployment: "pause",
    ResumeDeployment: "resume",
}


def subject_for(event: Event) -> str:
    kind = type(event)
    if kind in _STAGES:
        return subjects.stage(event.model, event.deployment_id, _STAGES[kind])
    if kind in _OUTCOMES:
        return subjects.outcome(event.model, event.deployment_id, _OUTCOMES[kind])
    if isinstance(event, Command):
        sender = event.requested_by.nats_user
        return subjects.command(event.model, event.deployment_id, _COMMANDS[kind], sender)
    raise TypeError(f"no subject for {kind.__name__}")


def message_id_for(event: Event, nonce: str | None = None) -> str:
    """Dedup key: one per deployment and event (and step), so republishing is harmless.

    Commands are intents a person may repeat (pause, resume, pause): they carry a nonce chosen
    once per invocation, so a retried publish of the same invocation is still deduplicated.
    """
    kind = type(event)
    name = _COMMANDS.get(kind) or _STAGES.get(kind) or _OUTCOMES.get(kind)
    if name is None:
        raise TypeError(f"no subject for {kind.__name__}")
    # A step can start (and a rollout be held) more than once: resumed after a hold, the step
    # starts again. The start time, or the deadline, tells the occurrences apart.
    if isinstance(event, CanaryStepStarted):
        stamp = event.occurred_at.strftime("%Y%m%dT%H%M%S.%f")
        return subjects.message_id(event.deployment_id, name, f"{event.step_index}:{stamp}")
    if isinstance(event, DeploymentHeld):
        stamp = event.deadline.strftime("%Y%m%dT%H%M%S.%f")
        return subjects.message_id(event.deployment_id, name, f"{event.step_index}:{stamp}")
    if isinstance(event, CanaryAnalysed):
        stamp = event.window_end.strftime("%Y%m%dT%H%M%S.%f")
        return subjects.message_id(event.deployment_id, name, f"{event.step_index}:{stamp}")
    if isinstance(event, Command):
        if nonce is None:
            raise ValueError("commands need a nonce for their message id")
        return subjects.message_id(event.deployment_id, name, nonce)
    return subjects.message_id(event.deployment_id, name)
