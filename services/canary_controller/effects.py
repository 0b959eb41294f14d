"""What a transition does outside the state: the route to write and the events to publish (pure)."""

from __future__ import annotations

from datetime import datetime

from services.canary_controller.decision import Decision
from services.canary_controller.state import PendingEffects, Phase, RolloutState
from services.contracts.events import (
    CanaryAnalysed,
    CanaryStepStarted,
    CheckResult,
    DeploymentHeld,
    DeploymentPromoted,
    DeploymentRolledBack,
    Event,
    RoleMeasurement,
    Route,
    StageReport,
    Status,
)


def route_for(state: RolloutState, now: datetime) -> Route:
    """The route the model should have in `state`: who is stable, who is canary, at what weight."""
    if state.phase is Phase.PROMOTED:
        return Route(model=state.model, stable=state.canary, canary=None, updated_at=now)
    if state.phase.holds_route:
        return Route(
            model=state.model,
            stable=state.stable,
            canary=state.canary,
            canary_weight=state.weight,
            updated_at=now,
        )
    return Route(model=state.model, stable=state.stable, canary=None, updated_at=now)


def canary_report(state: RolloutState, decision: Decision) -> StageReport:
    """The canary stage as a report, with the last look's tests as checks."""
    if state.phase is Phase.PROMOTED:
        status = Status.PASSED
    elif state.phase is Phase.ROLLED_BACK:
        status = Status.FAILED
    else:
        status = Status.SKIPPED
    checks: list[CheckResult] = []
    if decision.assessment is not None:
        for test in decision.assessment.tests:
            checks.append(
                CheckResult(
                    name=test.name,
                    status={
                        "pass": Status.PASSED,
                        "fail": Status.FAILED,
                        "insufficient": Status.SKIPPED,
                    }[test.outcome],
                    reason=test.reason,
                    value=test.observed,
                    threshold=test.threshold,
                    unit="ratio",
                    details={"p_value": test.p_value, "alpha": test.alpha, "n": test.n},
                )
            )
    steps = len(state.policy.steps)
    reason = f"{status.value}: {decision.reason} (steps completed {state.steps_completed}/{steps})"
    return StageReport(stage="canary", status=status, reason=reason, checks=tuple(checks))


def analysed_event(state: RolloutState, decision: Decision) -> CanaryAnalysed | None:
    window = decision.window
    if not decision.analysed or window is None or decision.verdict is None:
        return None
    return CanaryAnalysed(
        deployment_id=state.deployment_id,
        model=state.model,
        version=state.version,
        step_index=state.step_index,
        window_start=window.start,
        window_end=window.end,
        canary=window.canary.measurement(),
        stable=window.stable.measurement(),
        verdict=decision.verdict,
        reason=decision.reason,
    )


def effects(
    before: RolloutState,
    after: RolloutState,
    decision: Decision,
    now: datetime,
    metrics_url: str | None,
) -> PendingEffects | None:
    """Route and events for the transition `before` -> `after`; None when nothing changes."""
    events: list[Event] = []
    analysed = analysed_event(before, decision)
    if analysed is not None:
        events.append(analysed)
    # Only a rollout that holds (or held) its model's route writes it: a queued one must not.
    route_changes = (
        before.phase.holds_route
        or after.phase.holds_route
        or (after.phase is Phase.PROMOTED and not before.phase.terminal)
    ) and (after.phase != before.phase or after.step_index != before.step_index)
    # A new step (or the bake) starts its clock; resuming from a pause keeps the old one.
    if after.phase in (Phase.STEP, Phase.BAKE) and after.step_started_at != before.step_started_at:
        index = len(after.policy.steps) if after.phase is Phase.BAKE else after.step_index
        assert after.step_started_at is not None and after.step_ends_at is not None
        events.append(
            CanaryStepStarted(
                deployment_id=after.deployment_id,
                model=after.model,
                version=after.version,
                step_index=index,
                weight=after.weight,
                duration_s=(after.step_ends_at - after.step_started_at).total_seconds(),
                occurred_at=now,
            )
        )
    common = {
        "deployment_id": after.deployment_id,
        "model": after.model,
        "version": after.version,
        "requested_by": after.request.requested_by,
        "metrics_url": metrics_url,
        "occurred_at": now,
    }
    if after.phase is Phase.HELD and before.phase is not Phase.HELD:
        assert after.held_deadline is not None
        window = decision.window
        events.append(
            DeploymentHeld(
                **common,
                stages=(*after.earlier, canary_report(after, decision)),
                reasons=(decision.reason,),
                step_index=after.step_index,
                weight=after.weight,
                deadline=after.held_deadline,
                canary=_measure(decision, "canary"),
                stable=_measure(decision, "stable"),
                window_start=window.start if window else None,
                window_end=window.end if window else None,
            )
        )
    if after.phase is Phase.ROLLED_BACK and not before.phase.terminal:
        window = decision.window
        trigger = decision.trigger or "manual"
        threshold = None
        if trigger == "error_rate":
            threshold = after.thresholds.max_error_rate
        elif trigger == "latency":
            threshold = after.thresholds.max_p95_increase
        elif trigger == "error_ratio":
            threshold = after.thresholds.max_error_ratio
        elif trigger == "ttft":
            threshold = after.thresholds.max_ttft_p95_increase
        events.append(
            DeploymentRolledBack(
                **common,
                stages=(*after.earlier, canary_report(after, decision)),
                reasons=(decision.reason,),
                trigger=trigger,
                step_index=after.step_index,
                canary=_measure(decision, "canary") or after.canary_measurement,
                stable=_measure(decision, "stable") or after.stable_measurement,
                threshold=threshold,
                window_start=window.start if window else None,
                window_end=window.end if window else None,
            )
        )
    if after.phase is Phase.PROMOTED and not before.phase.terminal:
        events.append(
            DeploymentPromoted(
                **common,
                stages=(*after.earlier, canary_report(after, decision)),
                reasons=(decision.reason,),
                previous_version=after.stable.version if after.stable else None,
                promoted_by=decision.by,
                steps_completed=after.steps_completed,
                canary=_measure(decision, "canary") or after.canary_measurement,
                stable=_measure(decision, "stable") or after.stable_measurement,
            )
        )
    route = route_for(after, now) if route_changes else None
    if route is None and not events:
        return None
    return PendingEffects(
        route_json=route.model_dump_json() if route else None,
        events_json=tuple(e.model_dump_json() for e in events),
    )


def _measure(decision: Decision, role: str) -> RoleMeasurement | None:
    if decision.window is None:
        return None
    return (decision.window.canary if role == "canary" else decision.window.stable).measurement()
