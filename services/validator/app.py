"""validator service: DeploymentRequested -> ValidationCompleted (+ DeploymentBlocked)."""

from __future__ import annotations

from services.contracts import subjects
from services.contracts.events import DeploymentRequested, Event, StageReport
from services.contracts.policy import Policy, PolicyError, PolicyFile
from services.runtime import pipeline
from services.runtime.service import ServiceApp, build_service
from services.runtime.settings import Settings

NAME = "validator"


def run_checks(request: DeploymentRequested, policy: Policy, instance: str) -> StageReport:
    """The validation stage. Its checks arrive with issue #3; until then it says so."""
    if not policy.validation.enabled:
        return pipeline.disabled("validation", instance)
    return pipeline.not_built("validation", instance)


def handle_requested(
    request: DeploymentRequested, policy_file: PolicyFile, instance: str
) -> list[Event]:
    try:
        policy = pipeline.resolve_policy(policy_file, request)
    except PolicyError as exc:
        return [pipeline.policy_failure(request, "validation", exc)]
    return pipeline.after_validation(request, run_checks(request, policy, instance))


def build(settings: Settings) -> ServiceApp:
    svc = build_service(NAME, settings)

    @svc.consume(subjects.VALIDATOR_DURABLE, DeploymentRequested)
    async def on_requested(request: DeploymentRequested) -> None:
        for event in handle_requested(request, svc.policy_file, settings.instance):
            await svc.sink.publish_event(event)

    return svc
