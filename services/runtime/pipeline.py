"""Pure rules for moving a deployment from one stage to the next; handlers only publish these."""

from __future__ import annotations

from typing import Literal

from services.contracts.events import (
    BenchmarkCompleted,
    CheckResult,
    DeploymentBlocked,
    DeploymentDegraded,
    DeploymentFailed,
    DeploymentPromoted,
    DeploymentRequested,
    Event,
    StageReport,
    Status,
    ValidationCompleted,
)
from services.contracts.policy import Policy, PolicyError, PolicyFile

StageName = Literal["validation", "benchmark", "canary"]

STAGE_ISSUES: dict[StageName, int] = {"validation": 3, "benchmark": 4, "canary": 6}


def not_built(stage: StageName, service: str = "") -> StageReport:
    """An honest placeholder: the stage did not run, and says so (never `passed`)."""
    return StageReport(
        stage=stage,
        status=Status.SKIPPED,
        reason=f"skipped: not built yet (issue #{STAGE_ISSUES[stage]})",
        service=service,
    )


def disabled(stage: StageName, service: str = "") -> StageReport:
    return StageReport(
        stage=stage,
        status=Status.SKIPPED,
        reason="skipped: disabled by policy",
        service=service,
    )


def resolve_policy(policy_file: PolicyFile, request: DeploymentRequested) -> Policy:
    return policy_file.resolve(
        model=request.model, team=request.requested_by.team, overrides=request.policy_overrides
    )


def _ids(request: DeploymentRequested) -> dict[str, str]:
    return {
        "deployment_id": request.deployment_id,
        "model": request.model,
        "version": request.version,
    }


def policy_failure(
    request: DeploymentRequested, stage: str, error: PolicyError
) -> DeploymentFailed:
    return DeploymentFailed(
        **_ids(request),
        stage=stage,
        error=f"policy: {error}",
        reasons=(f"the deployment's policy cannot be used: {error}",),
        requested_by=request.requested_by,
    )


def refusal(check: str, reason: str, service: str, *, said: str | None = None) -> StageReport:
    """The validation report of a request refused before any check ran, by `check` (its reason
    `said`, else `reason`): it is blocked, saying why. Bad input gets a clear answer, never the
    crash outcome `failed`."""
    return StageReport(
        stage="validation",
        status=Status.FAILED,
        reason=reason,
        checks=(CheckResult(name=check, status=Status.FAILED, reason=said or reason),),
        service=service,
    )


def policy_refusal(error: PolicyError, service: str) -> StageReport:
    """A request whose policy cannot be used: an unknown key, a value out of range, or what
    `request_overrides` forbids a request."""
    reason = f"the deployment's policy cannot be used: {error}"
    return refusal("policy", reason, service, said=str(error))


def after_validation(request: DeploymentRequested, report: StageReport) -> list[Event]:
    """ValidationCompleted, plus DeploymentBlocked when a check failed."""
    events: list[Event] = [ValidationCompleted(**_ids(request), report=report, request=request)]
    if report.blocks:
        failed = [c for c in report.checks if c.status in (Status.FAILED, Status.ERROR)]
        reasons = tuple(f"{c.name}: {c.reason}" for c in failed) or (report.reason,)
        events.append(
            DeploymentBlocked(
                **_ids(request),
                stage="validation",
                stages=(report,),
                reasons=reasons,
                requested_by=request.requested_by,
            )
        )
    return events


def should_benchmark(validated: ValidationCompleted) -> bool:
    return not validated.report.blocks


def after_benchmark(
    validated: ValidationCompleted,
    report: StageReport,
    policy: Policy,
    device: str | None = None,
) -> list[Event]:
    """BenchmarkCompleted, plus DeploymentDegraded, plus DeploymentBlocked if policy blocks."""
    request = validated.request
    done = BenchmarkCompleted(
        **_ids(request),
        report=report,
        request=request,
        earlier=validated.stages,
        device=device,
    )
    # Outcomes first, then BenchmarkCompleted: the next stage reacts to BenchmarkCompleted, so a
    # subscriber always sees `degraded` before whatever the canary decides.
    events: list[Event] = []
    if report.status in _NOT_SHOWN_GOOD:
        failed = tuple(c for c in report.checks if c.status in _NOT_SHOWN_GOOD)
        reasons = tuple(f"{c.name}: {c.reason}" for c in failed) or (report.reason,)
        events.append(
            DeploymentDegraded(
                **_ids(request),
                stages=done.stages,
                failed_checks=failed,
                reasons=reasons,
                requested_by=request.requested_by,
            )
        )
        if policy.benchmark.on_failure == "block":
            events.append(
                DeploymentBlocked(
                    **_ids(request),
                    stage="benchmark",
                    stages=done.stages,
                    reasons=(*reasons, "policy benchmark.on_failure is `block`"),
                    requested_by=request.requested_by,
                )
            )
    events.append(done)
    return events


# A benchmark that failed, or could not run (a model without tokenizer files, a measurement
# that raised), has not shown the model is fit: degraded, or blocked where the policy blocks.
_NOT_SHOWN_GOOD = (Status.DEGRADED, Status.FAILED, Status.ERROR)


def proceeds_to_canary(benchmarked: BenchmarkCompleted, policy: Policy) -> bool:
    if benchmarked.report.status in _NOT_SHOWN_GOOD:
        return policy.benchmark.on_failure != "block"
    return True


def promoted_without_canary(
    benchmarked: BenchmarkCompleted, canary: StageReport, metrics_url: str | None
) -> DeploymentPromoted:
    request = benchmarked.request
    stages = (*benchmarked.stages, canary)
    skipped = [s for s in stages if s.status in (Status.SKIPPED, Status.ERROR)]
    reasons = ["promoted without canary traffic analysis"]
    if skipped:
        reasons.append(
            "stages that did not run: "
            + "; ".join(f"{s.stage}: {s.reason.removeprefix('skipped: ')}" for s in skipped)
        )
    return DeploymentPromoted(
        **_ids(request),
        stages=stages,
        reasons=tuple(reasons),
        requested_by=request.requested_by,
        previous_version=request.stable.version if request.stable else None,
        metrics_url=metrics_url,
    )
