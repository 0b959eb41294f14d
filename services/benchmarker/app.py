"""benchmarker service: ValidationCompleted -> BenchmarkCompleted (+ Degraded / Blocked)."""

from __future__ import annotations

from services.contracts import subjects
from services.contracts.events import Event, StageReport, ValidationCompleted
from services.contracts.policy import Policy, PolicyError, PolicyFile
from services.runtime import pipeline
from services.runtime.service import ServiceApp, build_service
from services.runtime.settings import Settings

NAME = "benchmarker"


def run_benchmarks(validated: ValidationCompleted, policy: Policy, instance: str) -> StageReport:
    """The benchmark stage. Its measurements arrive with issue #4; until then it says so."""
    if not policy.benchmark.enabled:
        return pipeline.disabled("benchmark", instance)
    return pipeline.not_built("benchmark", instance)


def handle_validated(
    validated: ValidationCompleted, policy_file: PolicyFile, instance: str
) -> list[Event]:
    if not pipeline.should_benchmark(validated):
        return []  # the validator already published DeploymentBlocked
    try:
        policy = pipeline.resolve_policy(policy_file, validated.request)
    except PolicyError as exc:
        return [pipeline.policy_failure(validated.request, "benchmark", exc)]
    report = run_benchmarks(validated, policy, instance)
    return pipeline.after_benchmark(validated, report, policy, device=None)


def build(settings: Settings) -> ServiceApp:
    svc = build_service(NAME, settings)

    @svc.consume(subjects.BENCHMARKER_DURABLE, ValidationCompleted)
    async def on_validated(validated: ValidationCompleted) -> None:
        for event in handle_validated(validated, svc.policy_file, settings.instance):
            await svc.sink.publish_event(event)

    return svc
