"""The canary decision: a pure function of (state, measurements, policy, now). No I/O, no clock.

`decide` says what to do; `apply` returns the state after doing it. Manual commands go through
`command`. Effects outside the state (route writes, events) are built in `effects.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from services.canary_controller import sequential, stats
from services.canary_controller.state import Interval, Phase, RolloutState
from services.contracts.events import DeploymentRequested, RouteTarget, StageReport
from services.contracts.policy import CanaryPolicy, CanaryThresholds
from services.metrics.queries import BucketCounts, WindowResult
from services.traffic.base import Applied

Action = Literal["wait", "advance", "promote", "rollback", "hold", "pause", "resume", "start"]
Verdict = Literal["healthy", "unhealthy", "insufficient_data", "no_data"]
Trigger = Literal[
    "error_rate", "error_ratio", "latency", "ttft", "inconclusive", "manual", "superseded"
]

# A step start a little in the future is clock skew between controllers, not a jump.
CLOCK_TOLERANCE = timedelta(seconds=2)
TESTS_PER_WINDOW = 2  # error rate and latency
# After the bus comes back, routers publish the request records they buffered while it was down,
# and the ingest stores them: no decision on time until they had this long to arrive.
OUTAGE_GRACE = timedelta(seconds=10)


@dataclass(frozen=True)
class Observation:
    """What the metrics store said for one look: the step so far and the recent lookback."""

    step: WindowResult
    recent: WindowResult | None = None
    counts: BucketCounts | None = None  # the e-process method: per bucket from the step start


@dataclass(frozen=True)
class Decision:
    """What to do now, and why. `analysed` marks a look that counts against the alpha budget."""

    action: Action
    reason: str
    verdict: Verdict | None = None
    trigger: Trigger | None = None
    assessment: stats.Assessment | None = None
    window: WindowResult | None = None
    analysed: bool = False
    by: Literal["pipeline", "manual"] = "pipeline"
    details: dict[str, float] = field(default_factory=dict)


def planned_looks(policy: CanaryPolicy) -> int:
    """Analyses a rollout may make at most: every step at full extension, plus the bake."""
    seconds = sum(s.duration_s + policy.max_step_extension_s for s in policy.steps) + policy.bake_s
    return max(1, math.ceil(seconds / policy.analysis_interval_s))


def alpha_per_test(policy: CanaryPolicy, look: int, tests: int) -> float:
    """The significance level of each test at the `look`-th analysis (1-based) of a rollout.

    The false-rollback budget is spent half front-loaded, half evenly: look k gets
    budget/2 · 6/(π² k²) (a series that sums to budget/2 over any number of looks, so extensions
    and holds cannot overspend it) plus budget/2 / planned_looks while k is within the planned
    looks. The union bound then caps the chance that a healthy canary is ever rolled back at the
    budget, whatever the dependence between looks and windows. Front-loading buys fast detection
    in a step's first seconds, where a broken canary does its damage; the even half keeps late
    looks sensitive. `tests` splits a look's share between its tests (Bonferroni).
    """
    k = max(1, look)
    budget = policy.false_rollback_rate
    early = budget / 2 * 6 / (math.pi**2 * k**2)
    planned = planned_looks(policy)
    even = budget / 2 / planned if k <= planned else 0.0
    return (early + even) / max(1, tests)


def start_rollout(
    request: DeploymentRequested,
    *,
    earlier: tuple[StageReport, ...],
    policy: CanaryPolicy,
    thresholds: CanaryThresholds,
    stable: RouteTarget | None,
    canary: RouteTarget,
    now: datetime,
    queued: bool = False,
) -> RolloutState:
    """A new rollout: at its first step, or queued behind a running rollout of the model."""
    state = RolloutState(
        deployment_id=request.deployment_id,
        model=request.model,
        version=request.version,
        request=request,
        earlier=earlier,
        policy=policy,
        thresholds=thresholds,
        stable=stable,
        canary=canary,
        phase=Phase.QUEUED,
        created_at=now,
    )
    return state if queued else begin_step(state, 0, now)


def begin_step(state: RolloutState, index: int, now: datetime) -> RolloutState:
    step = state.policy.steps[index]
    return state.model_copy(
        update={
            "phase": Phase.STEP,
            "step_index": index,
            "step_started_at": now,
            "step_starts": (*state.step_starts[:index], now),
            "step_ends_at": now + timedelta(seconds=step.duration_s),
            "held_deadline": None,
            "held_since": None,
            "bus_outages": (),  # they were in the steps before: this one's clock starts now
            "paused_from": None,
            "paused_remaining_s": None,
        }
    )


def begin_bake(state: RolloutState, now: datetime) -> RolloutState:
    return state.model_copy(
        update={
            "phase": Phase.BAKE,
            "baking": True,
            "step_started_at": now,
            "step_ends_at": now + timedelta(seconds=state.policy.bake_s),
            "held_deadline": None,
            "held_since": None,
            "bus_outages": (),  # they were in the steps before: this one's clock starts now
            "paused_from": None,
            "paused_remaining_s": None,
        }
    )


def analysis_due(state: RolloutState, now: datetime) -> bool:
    """Time for a look: the interval has passed since the last one (or none yet this step)."""
    if state.phase.terminal or state.phase is Phase.QUEUED:
        return False
    last = state.last_analysis_at
    if last is None or state.step_started_at is None or last < state.step_started_at:
        return True
    if now < last:  # the clock went back: look again rather than wait out the gap
        return True
    return (now - last).total_seconds() >= look_interval_s(state.policy)


def look_due(state: RolloutState, now: datetime) -> bool:
    """Whether the engine (and a replay of it) looks at the rollout now: the cadence is due, or
    a deadline passed since the last look. A deadline earns one look of its own; after that the
    normal cadence applies, so a step's extension does not spend a look on every tick. Never
    at or before the step start (nothing to measure yet)."""
    last = state.last_analysis_at
    deadline_passed = any(
        t is not None and now >= t and (last is None or last < t)
        for t in (state.step_ends_at, state.step_deadline, state.held_deadline, state.judge_after)
    )
    if not analysis_due(state, now) and not deadline_passed:
        return False
    return now > (state.step_started_at or state.created_at)


def look_interval_s(policy: CanaryPolicy) -> float:
    """Seconds between looks: an e-process may be looked at often at no cost in false alarms."""
    if policy.method == "e-process":
        return policy.e_process.look_interval_s
    return policy.analysis_interval_s


def analysis_windows(
    state: RolloutState, now: datetime
) -> tuple[tuple[datetime, datetime], tuple[datetime, datetime] | None]:
    """The step window [step start, now) and, once the step is longer, the recent lookback."""
    start = state.step_started_at or state.created_at
    end = max(now, start)
    lookback = timedelta(seconds=state.policy.lookback_s)
    recent = (end - lookback, end) if end - start > lookback else None
    return (start, end), recent


def decide(
    state: RolloutState,
    observation: Observation | None,
    policy: CanaryPolicy,
    thresholds: CanaryThresholds,
    now: datetime,
    *,
    traffic: Applied | None = None,
) -> Decision:
    """What the rollout does now. `observation` None means the metrics store did not answer.
    `traffic`: what the data plane has in force (read back by the rollout's traffic router);
    None when not read (phases where no weight is being judged).

    Rules, worst wins: a canary significantly over a threshold in the step or the recent window
    is rolled back at once, in any phase that has a canary in traffic. A step ends only when its
    time is up AND the canary had enough requests AND its point estimates are within the
    thresholds; otherwise the step runs on up to `max_step_extension_s`, then the rollout is
    held for a person (inconclusive) until `held_timeout_s`, then rolled back. Missing data is
    never read as healthy.
    """
    phase = state.phase
    if phase.terminal or phase is Phase.QUEUED:
        return Decision("wait", f"nothing to decide in phase {phase.value}")
    started = state.step_started_at
    if started is not None and now + CLOCK_TOLERANCE < started:
        return Decision(
            "wait",
            f"clock is {(started - now).total_seconds():.0f} s behind the step start "
            "(a clock jump?): not judging until it catches up",
        )
    if observation is None:
        return _without_data(state, now)

    if policy.method == "e-process":
        if observation.counts is None:
            return _without_data(state, now)
        step_s = policy.bake_s if state.baking else policy.steps[state.step_index].duration_s
        assessed = [
            (
                "e-process",
                observation.step,
                sequential.assess(
                    observation.counts,
                    observation.step,
                    thresholds,
                    policy,
                    weight=state.weight,
                    step_s=step_s,
                    bake=state.baking,
                ),
            )
        ]
    else:
        windows = [("step", observation.step)]
        if observation.recent is not None:
            windows.insert(0, ("last " + _seconds(policy.lookback_s), observation.recent))
        # A window with streamed responses runs a third test (TTFT): the split counts it.
        gated = thresholds.max_ttft_p95_increase is not None and not state.baking
        per_window = TESTS_PER_WINDOW + (
            1 if gated and stats.has_ttft(observation.step.canary, observation.step.stable) else 0
        )
        alpha = alpha_per_test(policy, state.looks + 1, per_window * len(windows))
        assessed = [
            (label, window, _assess(window, thresholds, policy, alpha, bake=state.baking))
            for label, window in windows
        ]
    for label, window, assessment in assessed:
        if assessment.verdict == "unhealthy":
            return Decision(
                "rollback",
                f"{assessment.reason} ({label})",
                verdict="unhealthy",
                trigger=assessment.trigger,
                assessment=assessment,
                window=window,
                analysed=True,
            )
    _, step_window, step_assessment = assessed[-1]
    verdict: Verdict = step_assessment.verdict
    ready = verdict == "healthy" and all(
        t.within_threshold is not False
        for t in step_assessment.tests
        if t.outcome != "insufficient"
    )
    if verdict == "healthy" and not ready:
        verdict = "insufficient_data"

    def look(action: Action, reason: str, trigger: Trigger | None = None) -> Decision:
        return Decision(action, reason, verdict, trigger, step_assessment, step_window, True)

    if in_outage_grace(state, now):
        return look("wait", f"{_grace_reason(state)}: {step_assessment.reason}")
    if traffic is not None and not traffic.confirmed and phase in (Phase.STEP, Phase.BAKE):
        # A step never ends on a weight the data plane has not confirmed; rollback above
        # still applies (taking the canary out is safe whatever is in force).
        router = policy.traffic.router
        since = state.step_started_at or state.created_at
        waited = (now - since).total_seconds()
        weight = f"canary weight {state.weight:g}%"
        if waited >= policy.traffic.confirm_timeout_s:
            return look(
                "hold",
                f"the {router} router has not confirmed {weight} {_seconds(waited)} after it "
                f"was written: {traffic.detail}",
                "inconclusive",
            )
        return look("wait", f"waiting for the {router} router to apply {weight}: {traffic.detail}")
    if phase is Phase.HELD:
        if state.held_deadline is not None and now >= state.held_deadline:
            return look(
                "rollback",
                "held without a decision until the deadline: rolled back (never promoted on "
                f"inconclusive data); last look: {step_assessment.reason}",
                "inconclusive",
            )
        return look("wait", f"held for a person: {step_assessment.reason}")
    if phase is Phase.PAUSED:
        return look("wait", f"paused: {step_assessment.reason}")

    assert state.step_ends_at is not None
    if now < state.step_ends_at:
        return look("wait", step_assessment.reason)
    if ready:
        last_step = state.baking or state.step_index + 1 >= len(policy.steps)
        action: Action = "promote" if last_step else "advance"
        return look(action, step_assessment.reason)
    deadline = state.step_deadline
    if deadline is not None and now < deadline:
        left = (deadline - now).total_seconds()
        return look(
            "wait", f"step extended ({_seconds(left)} left at most): {step_assessment.reason}"
        )
    return look(
        "hold",
        f"inconclusive after the step and its extension: {step_assessment.reason}",
        "inconclusive",
    )


def _assess(
    window: WindowResult,
    thresholds: CanaryThresholds,
    policy: CanaryPolicy,
    alpha: float,
    *,
    bake: bool,
) -> stats.Assessment:
    assessment = stats.assess(
        window.canary,
        window.stable,
        max_error_rate=thresholds.max_error_rate,
        max_p95_increase=thresholds.max_p95_increase,
        min_canary_requests=policy.min_canary_requests,
        alpha=alpha,
        max_ttft_p95_increase=None if bake else thresholds.max_ttft_p95_increase,
    )
    if not bake:
        return assessment
    # At 100% there is no stable traffic to compare latency with: judge the error rate alone.
    tests = tuple(t for t in assessment.tests if t.name == "error_rate")
    error = tests[0] if tests else None
    if error is None:
        return assessment
    if error.outcome == "fail":
        return stats.Assessment("unhealthy", "error_rate", error.reason, tests)
    if window.canary.requests == 0:
        return stats.Assessment("no_data", None, "no requests during the bake", tests)
    if error.outcome == "insufficient":
        return stats.Assessment("insufficient_data", None, error.reason, tests)
    return stats.Assessment("healthy", None, error.reason, tests)


def _without_data(state: RolloutState, now: datetime) -> Decision:
    reason = "the metrics store did not answer: no verdict (missing data is never healthy)"
    if in_outage_grace(state, now):
        return Decision("wait", f"{_grace_reason(state)}; {reason}", "no_data")
    if state.phase is Phase.HELD:
        if state.held_deadline is not None and now >= state.held_deadline:
            return Decision(
                "rollback", f"held until the deadline; {reason}", "no_data", "inconclusive"
            )
        return Decision("wait", reason, "no_data")
    if state.phase is Phase.PAUSED:
        return Decision("wait", reason, "no_data")
    deadline = state.step_deadline
    if deadline is not None and now >= deadline:
        return Decision("hold", reason, "no_data", "inconclusive")
    return Decision("wait", reason, "no_data")


def in_outage_grace(state: RolloutState, now: datetime) -> bool:
    """Whether metrics buffered during a bus outage may still be arriving (no decision on time)."""
    return state.judge_after is not None and now < state.judge_after


def _grace_reason(state: RolloutState) -> str:
    assert state.judge_after is not None
    down = sum(i.seconds for i in state.bus_outages)
    return (
        f"after a bus outage ({_seconds(down)} not counted against the step) the buffered "
        f"request metrics are still arriving: no decision on time before "
        f"{state.judge_after.strftime('%H:%M:%S')} UTC"
    )


def allow_for_outages(
    state: RolloutState,
    outages: Sequence[tuple[datetime, datetime]],
    grace: timedelta = OUTAGE_GRACE,
) -> RolloutState:
    """`state` with the bus outages it has not allowed for yet; the same state when none is new.

    Time the bus was down does not count against a step (or the bake) or a hold: the step's end
    (and with it the extension's) and the held deadline move on by the part of each outage
    inside the step or hold that is not already in `bus_outages`, and no decision on time is
    taken until `grace` after the outage ended (routers' buffered records are in transit). Outages
    already allowed for, or seen twice (two replicas), add nothing: they merge.
    """
    phase = state.phase
    if phase.terminal or phase is Phase.QUEUED:
        return state
    since = state.step_started_at or state.created_at
    covered = [(i.start, i.end) for i in state.bus_outages if i.end > since]
    added: list[tuple[datetime, datetime]] = []
    for start, end in sorted(outages):
        start = max(start, since)
        if end <= start:
            continue
        for piece in _minus((start, end), _merge([*covered, *added])):
            added.append(piece)
    if not added:
        return state
    update: dict[str, object] = {
        "bus_outages": tuple(Interval(start=a, end=b) for a, b in _merge([*covered, *added])),
        "judge_after": max(
            [t for t in (state.judge_after,) if t is not None] + [b + grace for _, b in added]
        ),
    }
    down = timedelta(seconds=sum((b - a).total_seconds() for a, b in added))
    if phase in (Phase.STEP, Phase.BAKE) and state.step_ends_at is not None:
        update["step_ends_at"] = state.step_ends_at + down
    if phase is Phase.HELD and state.held_deadline is not None:
        held_from = state.held_since or since
        in_hold = sum((b - max(a, held_from)).total_seconds() for a, b in added if b > held_from)
        update["held_deadline"] = state.held_deadline + timedelta(seconds=in_hold)
    return state.model_copy(update=update)


def _merge(spans: Sequence[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    merged: list[tuple[datetime, datetime]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _minus(
    span: tuple[datetime, datetime], covered: Sequence[tuple[datetime, datetime]]
) -> list[tuple[datetime, datetime]]:
    """The parts of `span` outside the (merged, sorted) `covered` spans."""
    start, end = span
    out = []
    for c_start, c_end in covered:
        if c_end <= start or c_start >= end:
            continue
        if c_start > start:
            out.append((start, c_start))
        start = max(start, c_end)
        if start >= end:
            return out
    if start < end:
        out.append((start, end))
    return out


def apply(state: RolloutState, decision: Decision, now: datetime) -> RolloutState:
    """The state after `decision` was carried out at `now`."""
    update: dict[str, object] = {}
    if decision.analysed:
        # Paused and held rollouts are still watched, but their looks do not spend the
        # false-rollback budget: a long hold must not blunt the tests when it resumes.
        if state.phase in (Phase.STEP, Phase.BAKE):
            update["looks"] = state.looks + 1
        update["last_analysis_at"] = now
        update["last_verdict"] = decision.verdict
        update["last_reason"] = decision.reason
        if decision.window is not None:
            update["canary_measurement"] = decision.window.canary.measurement()
            update["stable_measurement"] = decision.window.stable.measurement()
    elif decision.verdict is not None:
        update["last_analysis_at"] = now
        update["last_verdict"] = decision.verdict
        update["last_reason"] = decision.reason
    state = state.model_copy(update=update)
    action = decision.action
    if action == "advance":
        return begin_step(
            state.model_copy(update={"steps_completed": state.steps_completed + 1}),
            state.step_index + 1,
            now,
        )
    if action == "promote":
        completed = state.steps_completed + (0 if state.baking else 1)
        if decision.by == "manual":
            completed = state.steps_completed
        if not state.baking and state.policy.bake_s > 0 and decision.by != "manual":
            return begin_bake(state.model_copy(update={"steps_completed": completed}), now)
        return state.model_copy(
            update={"phase": Phase.PROMOTED, "steps_completed": completed, "finished_at": now}
        )
    if action == "rollback":
        return state.model_copy(update={"phase": Phase.ROLLED_BACK, "finished_at": now})
    if action == "hold":
        deadline = now + timedelta(seconds=state.policy.held_timeout_s)
        return state.model_copy(
            update={"phase": Phase.HELD, "held_deadline": deadline, "held_since": now}
        )
    if action == "pause":
        remaining = None
        if state.step_ends_at is not None:
            remaining = max(0.0, (state.step_ends_at - now).total_seconds())
        return state.model_copy(
            update={
                "phase": Phase.PAUSED,
                "paused_from": state.phase,
                "paused_remaining_s": remaining,
            }
        )
    if action == "resume":
        if state.phase is Phase.HELD or state.paused_from is Phase.HELD:
            # A fresh look at the same weight: the step (or the bake) starts again.
            if state.baking:
                return begin_bake(state, now)
            return begin_step(state, state.step_index, now)
        remaining = state.paused_remaining_s or 0.0
        return state.model_copy(
            update={
                "phase": state.paused_from or Phase.STEP,
                "step_ends_at": now + timedelta(seconds=remaining),
                "paused_from": None,
                "paused_remaining_s": None,
            }
        )
    if action == "start":
        return begin_step(state, 0, now)
    return state


def command(state: RolloutState, kind: str, who: str, now: datetime) -> Decision:
    """A person's command as a decision; one that does not apply says why and changes nothing."""
    phase = state.phase
    if phase.terminal:
        return Decision("wait", f"{kind} ignored: the rollout already ended ({phase.value})")
    if kind == "PromoteDeployment":
        if phase is Phase.QUEUED:
            return Decision(
                "wait",
                "promote ignored: the rollout is queued behind another rollout of the model; "
                "finish or abort that one first",
            )
        return Decision("promote", f"promoted by {who}", by="manual")
    if kind == "AbortDeployment":
        return Decision("rollback", f"aborted by {who}", trigger="manual", by="manual")
    if kind == "PauseDeployment":
        if phase not in (Phase.STEP, Phase.BAKE, Phase.HELD):
            return Decision("wait", f"pause ignored: the rollout is {phase.value}")
        return Decision("pause", f"paused by {who}", by="manual")
    if kind == "ResumeDeployment":
        if phase not in (Phase.PAUSED, Phase.HELD):
            return Decision("wait", f"resume ignored: the rollout is {phase.value}, not paused")
        return Decision("resume", f"resumed by {who}", by="manual")
    return Decision("wait", f"unknown command {kind}")


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.1f} min"
