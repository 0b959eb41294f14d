"""`preflight analyse`'s pure parts: what the original did, the policy to replay under, where a
replay stops being exact, and a replay over records held in memory (no ClickHouse)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from services.canary_controller import decision as rules
from services.canary_controller import replay as rp
from services.canary_controller.state import Phase, RolloutState
from services.contracts.events import (
    CanaryStepStarted,
    DeploymentHeld,
    DeploymentRequested,
    DeploymentRolledBack,
    RouteTarget,
)
from services.contracts.policy import CanaryPolicy, CanaryStep, CanaryThresholds, PolicyError

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
POLICY = CanaryPolicy(
    steps=(CanaryStep(weight=5, duration_s=30), CanaryStep(weight=50, duration_s=20)),
    analysis_interval_s=5,
    min_canary_requests=50,
    max_step_extension_s=20,
)
REQUEST = DeploymentRequested(
    deployment_id="d-replay1", model="org/m", version="2", location="/m", model_class="small"
)


def rollout(*, queued: bool = False, **update: Any) -> RolloutState:
    state = rules.start_rollout(
        REQUEST,
        earlier=(),
        policy=POLICY,
        thresholds=CanaryThresholds(),
        stable=RouteTarget(version="1"),
        canary=RouteTarget(version="2", deployment_id=REQUEST.deployment_id),
        now=T0,
        queued=queued,
    )
    return state.model_copy(update=update)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# ---- what the original did ----------------------------------------------------------------------


def test_a_queued_rollout_has_nothing_to_replay() -> None:
    with pytest.raises(ValueError, match="queued behind another rollout of org/m"):
        rp.original_run(rollout(queued=True))
    superseded = rollout(queued=True, phase=Phase.ROLLED_BACK, finished_at=at(3))
    with pytest.raises(ValueError, match="never started a canary step"):
        rp.original_run(superseded)


def test_the_original_from_its_state_alone() -> None:
    done = rollout(
        phase=Phase.PROMOTED, step_index=1, step_starts=(at(0), at(30)), finished_at=at(50)
    )
    original = rp.original_run(done)
    assert original.started_at == T0 and original.data_end == at(50) and original.finished
    assert [w for _, w in original.schedule] == [5, 50, 100]
    assert original.weight_at(at(29.9)) == 5 and original.weight_at(at(30)) == 50
    assert (original.ending.outcome, original.ending.at_s, original.ending.where) == (
        "promoted",
        50.0,
        "step 1, 50%",
    )
    assert original.looks is None  # no events: unknown


def test_the_original_from_its_events_stops_at_the_hold_with_its_trigger() -> None:
    held_then_rolled = rollout(
        phase=Phase.ROLLED_BACK, finished_at=at(200), held_since=at(50), step_starts=(at(0),)
    )
    common = {"deployment_id": REQUEST.deployment_id, "model": "org/m", "version": "2"}
    events = [
        CanaryStepStarted(**common, step_index=0, weight=5, duration_s=30, occurred_at=at(0)),
        DeploymentHeld(
            **common, step_index=0, weight=5, deadline=at(200), reasons=("too few requests",),
            occurred_at=at(50),
        ),
        DeploymentRolledBack(
            **common, trigger="inconclusive", step_index=0, reasons=("deadline",),
            occurred_at=at(200),
        ),
    ]  # fmt: skip
    original = rp.original_run(held_then_rolled, events)
    assert original.ending.outcome == "held" and original.ending.at_s == 50
    assert original.ending.reason == "too few requests" and original.looks == 0
    running = rollout(step_starts=(at(0),))
    assert rp.original_run(running, now=at(12)).ending.outcome == "running"
    assert not rp.original_run(running, now=at(12)).finished


# ---- where a replay stops being exact ----------------------------------------------------------


def test_a_divergence_shorter_than_a_tick_is_the_ticks_phase_not_a_divergence() -> None:
    original = [(at(0), 5.0), (at(30.2), 50.0)]
    assert rp._divergence([(at(0), 5.0), (at(30.5), 50.0)], original, T0, at(60), 0.5) is None
    late = rp._divergence([(at(0), 5.0), (at(35), 50.0)], original, T0, at(60), 0.5)
    assert late is not None and (late.at_s, late.replay_weight, late.original_weight) == (
        30.2,
        5.0,
        50.0,
    )
    # What differs only where the replay ended is read by no look.
    assert rp._divergence([(at(0), 5.0)], [(at(0), 5.0), (at(60), 0.0)], T0, at(60), 0.5) is None


# ---- the policy to replay under -----------------------------------------------------------------


def test_overrides_are_laid_over_the_rollouts_own_policy(tmp_path: Path) -> None:
    stored = rollout(thresholds=CanaryThresholds(max_error_rate=0.02))
    path = tmp_path / "tuned.yaml"
    path.write_text("canary:\n  min_canary_requests: 200\n  thresholds: {max_p95_increase: 0.5}\n")
    policy, thresholds = rp.policy_from_file(stored, path)
    assert policy.min_canary_requests == 200 and policy.steps == POLICY.steps
    assert thresholds == CanaryThresholds(max_error_rate=0.02, max_p95_increase=0.5)


def test_a_policy_file_is_resolved_for_the_deployment(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "defaults:\n  canary:\n    steps: [{weight: 10, duration_s: 60}]\n"
        "models:\n  org/m:\n    canary: {bake_s: 30}\n"
    )
    policy, _ = rp.policy_from_file(rollout(), path)
    assert [s.weight for s in policy.steps] == [10] and policy.bake_s == 30


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("canary: {steps: [{weight: 150, duration_s: 1}]}\n", "canary.steps.0.weight"),
        ("- a list\n", "top level must be a mapping"),
        ("canary: [\n", "not valid YAML"),
    ],
)
def test_a_bad_policy_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError, match=message):
        rp.policy_from_file(rollout(), path)


# ---- a replay over records in memory ----------------------------------------------------------


def records(
    seconds: float, weight: float, *, canary_error_rate: float = 0.0
) -> dict[str, list[Any]]:
    rng = random.Random(2)
    out: dict[str, list[Any]] = {name: [] for name in rp._DTYPES}
    start_ms = int(T0.timestamp() * 1000)
    for i in range(int(seconds * 100)):
        canary = rng.random() * 100 < weight
        out["canary"].append(canary)
        out["ts_ms"].append(start_ms + i * 10)
        out["latency_ms"].append(rng.lognormvariate(0, 0.3) * 80)
        out["error"].append(canary and rng.random() < canary_error_rate)
        out["sample_key"].append(rng.getrandbits(64))
        out["has_ttft"].append(False)
        out["ttft_value"].append(0.0)
    return out


async def test_a_running_rollout_is_replayed_up_to_now() -> None:
    running = rollout(step_starts=(at(0),))
    original = rp.original_run(running, now=at(20))
    metrics = rp.RecordedMetrics(REQUEST.deployment_id, T0, at(20), records(20, 5))
    result = await rp.replay(metrics, running, original=original)
    assert result.ending.outcome == "ran_out" and result.ending.at == at(20)
    assert result.agrees is None and result.comparison.startswith("still running (step 0, 5%)")
    assert "the rollout is still running: replayed over its records up to now" in result.notes
    assert [look.at_s for look in result.looks] == [0.5, 5.5, 10.5, 15.5]
    assert result.records == 2000


async def test_a_broken_canary_replays_to_a_rollback_with_its_p_values() -> None:
    ended = rollout(step_starts=(at(0),), phase=Phase.ROLLED_BACK, finished_at=at(30))
    metrics = rp.RecordedMetrics(
        REQUEST.deployment_id, T0, at(30), records(30, 5, canary_error_rate=0.2)
    )
    result = await rp.replay(metrics, ended)
    assert result.ending.outcome == "rolled_back" and result.ending.trigger == "error_rate"
    assert result.verdict_line.startswith(
        f"would have rolled back at {result.ending.at_s:.1f} s (step 0, 5%): error rate"
    )
    last = result.looks[-1]
    assert last.action == "rollback" and last.canary_errors and last.canary_requests
    assert any(t.name == "error_rate" and t.p_value is not None for t in last.tests)
    shown = rp.shown_looks(result.looks)
    assert shown[0] == result.looks[0] and shown[-1] == last
    doc = rp.as_dict(result)
    assert doc["outcome"]["trigger"] == "error_rate" and doc["looks"][-1]["tests"]
    assert doc["traffic_confirmation"].startswith("treated as applied")
