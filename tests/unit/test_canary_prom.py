"""The controller's decisions as Prometheus series (services/canary_controller/prom.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime, timedelta

from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry, generate_latest

from services.canary_controller import decision as rules
from services.canary_controller.app import PageSeries
from services.canary_controller.page import build_page_app
from services.canary_controller.prom import DecisionMetrics
from services.canary_controller.state import Phase, RolloutState
from tests.unit.test_canary_decision import T0, lat, role, rollout, window
from tests.unit.test_rollout_page import FakeRollouts

ID = "d-canary-1"
MODEL = "org/chat"
HEALTHY = (lat(400, seed=2), 0, lat(8000, seed=3), 0)
FAILING = (lat(100, seed=4), 10, lat(2000, seed=5), 2)
FEW = (lat(10, seed=2), 0, lat(300, seed=3), 0)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def look(
    state: RolloutState, seconds: float, spec: tuple[Sequence[float], int, Sequence[float], int]
) -> rules.Decision:
    c_lat, c_err, s_lat, s_err = spec
    now = at(seconds)
    measured = window(role("canary", c_lat, c_err), role("stable", s_lat, s_err), now)
    observation = rules.Observation(step=measured)
    return rules.decide(state, observation, state.policy, state.thresholds, now)


class Prom:
    """A registry with the decision series, and the engine's side: decide, apply, observe."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.metrics = DecisionMetrics(self.registry)

    def value(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)

    def apply(self, state: RolloutState, decision: rules.Decision, seconds: float) -> RolloutState:
        after = rules.apply(state, decision, at(seconds))
        self.metrics.observe(state, after, decision)
        return after

    def series(self, deployment_id: str = ID) -> list[str]:
        text = generate_latest(self.registry).decode()
        return [
            line
            for line in text.splitlines()
            if not line.startswith("#") and f'deployment_id="{deployment_id}"' in line
        ]


def test_a_look_exports_the_verdict_weight_and_each_tests_evidence() -> None:
    prom = Prom()
    state = rollout()
    decision = look(state, 60, HEALTHY)
    assert (decision.action, decision.verdict) == ("wait", "healthy")
    prom.apply(state, decision, 60)

    assert (
        prom.value(
            "preflight_canary_decisions_total", model=MODEL, action="wait", verdict="healthy"
        )
        == 1
    )
    assert prom.value("preflight_canary_weight", model=MODEL, deployment_id=ID) == 5
    assert prom.value("preflight_canary_held", model=MODEL, deployment_id=ID) == 0
    assert prom.value("preflight_canary_rollouts", phase="step") == 1
    assert prom.value("preflight_canary_rollouts", phase="held") == 0
    assert prom.value("preflight_canary_rollouts", phase="queued") == 0
    assert (
        prom.value("preflight_canary_last_look_timestamp_seconds", model=MODEL, deployment_id=ID)
        == at(60).timestamp()
    )
    assert decision.assessment is not None
    for test in decision.assessment.tests:
        labels = {"model": MODEL, "deployment_id": ID, "test": test.name}
        assert test.p_value is not None
        assert prom.value("preflight_canary_test_evidence", kind="p_value", **labels) == (
            test.p_value
        )
        assert prom.value("preflight_canary_test_evidence", kind="e_value", **labels) is None
        assert prom.value("preflight_canary_test_alpha", **labels) == test.alpha
        assert prom.value("preflight_canary_test_observed", **labels) == test.observed
    assert {t.name for t in decision.assessment.tests} == {"error_rate", "latency"}


def test_a_rollback_is_counted_by_trigger_and_the_rollouts_series_go() -> None:
    prom = Prom()
    state = prom.apply(rollout(), look(rollout(), 10, HEALTHY), 10)
    assert prom.series(), "the live rollout has series"
    decision = look(state, 20, FAILING)
    assert (decision.action, decision.trigger) == ("rollback", "error_rate")
    after = prom.apply(state, decision, 20)

    assert after.phase is Phase.ROLLED_BACK
    assert prom.value("preflight_canary_rollbacks_total", model=MODEL, trigger="error_rate") == 1
    assert (
        prom.value(
            "preflight_canary_decisions_total", model=MODEL, action="rollback", verdict="unhealthy"
        )
        == 1
    )
    assert prom.value("preflight_canary_promotions_total", model=MODEL) is None
    assert prom.series() == [], "no series is left labelled with a finished rollout"
    assert prom.value("preflight_canary_rollouts", phase="step") == 0
    # A decision stored again on the finished rollout (a command that does nothing) counts no
    # second rollback.
    prom.metrics.observe(after, after, rules.Decision("wait", "already ended"))
    assert prom.value("preflight_canary_rollbacks_total", model=MODEL, trigger="error_rate") == 1


def test_held_is_one_while_held_and_zero_after_resume() -> None:
    prom = Prom()
    state = rollout()
    decision = look(state, 241, FEW)
    assert (decision.action, decision.trigger) == ("hold", "inconclusive")
    held = prom.apply(state, decision, 241)
    assert held.phase is Phase.HELD
    assert prom.value("preflight_canary_held", model=MODEL, deployment_id=ID) == 1
    assert prom.value("preflight_canary_rollouts", phase="held") == 1
    assert prom.value("preflight_canary_rollouts", phase="step") == 0
    assert prom.value("preflight_canary_weight", model=MODEL, deployment_id=ID) == 5

    resume = rules.command(held, "ResumeDeployment", "ana via cli", at(300))
    resumed = prom.apply(held, resume, 300)
    assert resumed.phase is Phase.STEP
    assert prom.value("preflight_canary_held", model=MODEL, deployment_id=ID) == 0
    assert (
        prom.value("preflight_canary_decisions_total", model=MODEL, action="resume", verdict="none")
        == 1
    )
    # A command is no look: the last look's evidence stays.
    assert (
        prom.value(
            "preflight_canary_test_evidence",
            model=MODEL,
            deployment_id=ID,
            test="error_rate",
            kind="p_value",
        )
        is not None
    )


def test_a_promotion_through_the_steps_and_bake_is_counted_once() -> None:
    prom = Prom()
    state = rollout()
    state = prom.apply(state, look(state, 180, HEALTHY), 180)  # advance to 50%
    assert state.phase is Phase.STEP and state.step_index == 1
    assert prom.value("preflight_canary_weight", model=MODEL, deployment_id=ID) == 50
    decision = look(state, 300, HEALTHY)
    assert decision.action == "promote"
    state = prom.apply(state, decision, 300)
    assert state.phase is Phase.PROMOTED  # the test policy has no bake
    assert prom.value("preflight_canary_promotions_total", model=MODEL) == 1
    assert (
        prom.value(
            "preflight_canary_decisions_total", model=MODEL, action="advance", verdict="healthy"
        )
        == 1
    )
    assert prom.series() == []
    assert prom.value("preflight_canary_rollouts", phase="step") == 0


def test_e_values_are_exported_and_a_test_the_last_look_did_not_run_goes() -> None:
    prom = Prom()
    state = rollout()
    decision = look(state, 60, HEALTHY)
    assert decision.assessment is not None
    tests = tuple(
        dataclasses.replace(t, e_value=2.5 if t.name == "error_rate" else float("inf"))
        for t in decision.assessment.tests
    )
    with_e = dataclasses.replace(
        decision, assessment=dataclasses.replace(decision.assessment, tests=tests)
    )
    state = prom.apply(state, with_e, 60)
    labels = {"model": MODEL, "deployment_id": ID}
    assert (
        prom.value("preflight_canary_test_evidence", test="error_rate", kind="e_value", **labels)
        == 2.5
    )
    assert prom.value(
        "preflight_canary_test_evidence", test="latency", kind="e_value", **labels
    ) == float("inf")

    only_errors = dataclasses.replace(
        decision,
        assessment=dataclasses.replace(
            decision.assessment, tests=tuple(t for t in tests if t.name == "error_rate")
        ),
    )
    prom.apply(state, only_errors, 65)
    for kind in ("p_value", "e_value"):
        assert (
            prom.value("preflight_canary_test_evidence", test="latency", kind=kind, **labels)
            is None
        )
    assert prom.value("preflight_canary_test_alpha", test="latency", **labels) is None
    assert prom.value("preflight_canary_test_observed", test="latency", **labels) is None
    assert prom.value("preflight_canary_test_alpha", test="error_rate", **labels) is not None


def queued(deployment_id: str) -> RolloutState:
    return rollout().model_copy(
        update={
            "deployment_id": deployment_id,
            "phase": Phase.QUEUED,
            "step_started_at": None,
            "step_ends_at": None,
        }
    )


async def test_refresh_shows_stored_rollouts_and_forgets_those_gone_from_the_store() -> None:
    prom = Prom()
    assert prom.value("preflight_canary_rollouts", phase="step") is None, (
        "nothing before the first look or refresh (a standby exports no rollouts)"
    )
    state = prom.apply(rollout(), look(rollout(), 10, HEALTHY), 10)
    waiting = queued("d-queued-2")

    async def stored() -> list[RolloutState]:
        return [state, waiting]

    await prom.metrics.refresh(stored)
    assert prom.value("preflight_canary_rollouts", phase="queued") == 1
    assert prom.value("preflight_canary_rollouts", phase="step") == 1
    assert prom.value("preflight_canary_weight", model=MODEL, deployment_id="d-queued-2") == 0
    assert prom.value("preflight_canary_held", model=MODEL, deployment_id="d-queued-2") == 0

    # The running rollout finished on another replica (or its key was deleted).
    async def only_queued() -> list[RolloutState]:
        return [waiting]

    await prom.metrics.refresh(only_queued)
    assert prom.series() == []
    assert prom.value("preflight_canary_rollouts", phase="step") == 0
    assert prom.value("preflight_canary_rollouts", phase="queued") == 1


async def test_a_decision_observed_while_refresh_reads_is_not_undone_by_the_older_read() -> None:
    prom = Prom()
    state = prom.apply(rollout(), look(rollout(), 10, HEALTHY), 10)

    async def read_then_rolled_back() -> list[RolloutState]:
        before = state
        prom.apply(state, look(state, 20, FAILING), 20)  # stored while the read was under way
        return [before]  # what the read saw: still running

    await prom.metrics.refresh(read_then_rolled_back)
    assert prom.series() == [], "the finished rollout is not brought back by the stale read"
    assert prom.value("preflight_canary_rollouts", phase="step") == 0

    # Nor is a rollout started during the read forgotten because the read did not list it.
    other = rollout().model_copy(update={"deployment_id": "d-other-3"})

    async def read_then_started() -> list[RolloutState]:
        prom.apply(other, look(other, 10, HEALTHY), 10)
        return []

    await prom.metrics.refresh(read_then_started)
    assert prom.value("preflight_canary_weight", model=MODEL, deployment_id="d-other-3") == 5
    # A later read that does not list it (it ended elsewhere, or was deleted) forgets it.
    await prom.metrics.refresh(_none)
    assert prom.value("preflight_canary_weight", model=MODEL, deployment_id="d-other-3") is None


async def _none() -> list[RolloutState]:
    return []


def test_the_leader_gauge_reads_the_lease_at_each_scrape() -> None:
    prom = Prom()
    active = {"now": False}
    prom.metrics.track_leader(lambda: active["now"])
    assert prom.value("preflight_canary_controller_active") == 0
    active["now"] = True
    assert prom.value("preflight_canary_controller_active") == 1


async def test_the_page_serves_the_registry_at_metrics_and_404_without_one() -> None:
    prom = Prom()
    prom.apply(rollout(), look(rollout(), 10, HEALTHY), 10)
    app = build_page_app(FakeRollouts({}), PageSeries(), metrics=prom.registry)
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/metrics")
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        text = await resp.text()
    assert f'preflight_canary_weight{{deployment_id="{ID}",model="{MODEL}"}} 5.0' in text
    assert "# TYPE preflight_canary_rollbacks_total counter" in text
    async with TestClient(TestServer(build_page_app(FakeRollouts({}), PageSeries()))) as client:
        assert (await client.get("/metrics")).status == 404
