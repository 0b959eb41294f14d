"""The controller's `GET /metrics`: the decision series on the real service, active and standby.

Two real controller processes (`preflight service run canary-controller`) beside a real
nats-server with the shipped users and permissions, and a gateway played by the test (as in
test_controller_failover.py). While a healthy canary runs, the active replica's /metrics shows
its weight, each test's evidence and the decisions so far; the standby's shows no rollout. Once
it is promoted, the promotion is counted and no series is left labelled with its deployment.
And on the engine harness (test_canary_engine.py): a metrics hook that raises never stops a
transition.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from services.canary_controller import decision as rules
from services.canary_controller.prom import DecisionMetrics
from services.canary_controller.state import Phase, RolloutState
from services.contracts import subjects
from services.contracts.events import CanaryAnalysed, DeploymentPromoted, DeploymentRolledBack
from services.runtime import bus
from tests.integration.controllers import (
    Bus,
    Controller,
    Gateway,
    benchmarked,
    bootstrap,
    controller,
    lease_value,
    set_stable,
    start_bus,
    wait_until,
    write_policy,
)
from tests.integration.test_canary_engine import Clock, make_engine, new_rollout, request

pytestmark = pytest.mark.integration

POLICY = {
    "steps": [{"weight": 20, "duration_s": 4}],
    "analysis_interval_s": 0.5,
    "lookback_s": 2,
    "min_canary_requests": 20,
    "max_step_extension_s": 30,
}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[tuple[Bus, Controller, Controller]]:
    bus_ = start_bus(tmp_path)
    policy = write_policy(tmp_path / "policy.yaml", POLICY)
    first = controller(bus_, tmp_path, "replica-a", policy)
    second = controller(bus_, tmp_path, "replica-b", policy)
    try:
        yield bus_, first, second
    finally:
        for c in (first, second):
            c.stop()
        bus_.server.stop()


def scrape(replica: Controller) -> tuple[str, Samples]:
    """The replica's /metrics: its Content-Type and every sample by name and labels."""
    url = f"http://127.0.0.1:{replica.http_port}/metrics"
    with urllib.request.urlopen(url, timeout=2) as resp:
        content_type = resp.headers["Content-Type"]
        text = resp.read().decode()
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    return content_type, samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def labelled(samples: Samples, deployment_id: str) -> list[str]:
    return [n for n, labels in samples if ("deployment_id", deployment_id) in labels]


def test_the_active_replica_exports_its_decisions_and_the_standby_no_rollouts(
    replicas: tuple[Bus, Controller, Controller],
) -> None:
    bus_, first, second = replicas
    model = "org/metrics"
    deployment_id = f"d-{secrets.token_hex(3)}"

    async def scenario() -> tuple[Samples, Samples, Samples, str]:
        nc = await bootstrap(bus_)
        js = nc.jetstream()
        stop = asyncio.Event()
        traffic: asyncio.Task[None] | None = None
        try:
            first.start()

            async def first_active() -> bool:
                lease = await lease_value(js)
                return lease is not None and lease.holder.startswith("replica-a/")

            await wait_until(first_active, 30, "replica-a holds the lease")
            second.start()

            async def second_standby() -> bool:
                status, body = second.get("/healthz")
                return status == 200 and body.get("role") == "standby"

            await wait_until(second_standby, 30, "replica-b serves /healthz as the standby")
            await set_stable(js, model)
            traffic = asyncio.create_task(Gateway(js, model).run(stop))
            await bus.publish_event(js, benchmarked(deployment_id, model))
            during: Samples = {}
            async for event in bus.follow(js, subjects.deployment_events(deployment_id)):
                if isinstance(event, CanaryAnalysed) and not during:

                    async def evidence_shown() -> bool:
                        _, found = await asyncio.to_thread(scrape, first)
                        during.update(found)
                        return any(n == "preflight_canary_test_evidence" for n, _ in found)

                    await wait_until(evidence_shown, 10, "the active replica shows evidence")
                if isinstance(event, DeploymentPromoted | DeploymentRolledBack):
                    break
            _, standby = await asyncio.to_thread(scrape, second)

            async def forgotten() -> bool:
                _, found = await asyncio.to_thread(scrape, first)
                return not labelled(found, deployment_id)

            await wait_until(forgotten, 10, "the finished rollout's series are removed")
            content_type, after = await asyncio.to_thread(scrape, first)
            return during, standby, after, content_type
        finally:
            stop.set()
            if traffic is not None:
                await traffic
            await nc.close()

    during, standby, after, content_type = asyncio.run(scenario())
    assert content_type.startswith("text/plain; version=")
    ids = {"model": model, "deployment_id": deployment_id}

    assert value(during, "preflight_canary_weight", **ids) == 20
    assert value(during, "preflight_canary_held", **ids) == 0
    assert value(during, "preflight_canary_rollouts", phase="step") == 1
    assert value(during, "preflight_canary_controller_active") == 1
    assert (
        value(
            during, "preflight_canary_decisions_total", model=model, action="start", verdict="none"
        )
        == 1
    )
    p_error = value(
        during, "preflight_canary_test_evidence", test="error_rate", kind="p_value", **ids
    )
    assert p_error is not None and 0 <= p_error <= 1
    alpha = value(during, "preflight_canary_test_alpha", test="error_rate", **ids)
    assert alpha is not None and 0 < alpha < 0.05
    assert value(during, "preflight_canary_last_look_timestamp_seconds", **ids) is not None

    # The standby decides nothing and exports no rollout: only that it is not the active one.
    assert value(standby, "preflight_canary_controller_active") == 0
    assert not [n for n, _ in standby if n.startswith("preflight_canary_rollouts")]
    assert not labelled(standby, deployment_id)
    assert not [n for n, _ in standby if n == "preflight_canary_decisions_total"]

    assert value(after, "preflight_canary_promotions_total", model=model) == 1
    assert (
        value(
            after,
            "preflight_canary_decisions_total",
            model=model,
            action="promote",
            verdict="healthy",
        )
        == 1
    )
    waits = [
        v
        for (n, labels), v in after.items()
        if n == "preflight_canary_decisions_total" and ("action", "wait") in labels
    ]
    assert sum(waits) >= 1, "the looks before the step's end count, as action=wait"
    assert value(after, "preflight_canary_rollouts", phase="step") == 0
    assert not [n for n, _ in after if n == "preflight_canary_rollbacks_total"]
    assert labelled(after, deployment_id) == []


class Broken(DecisionMetrics):
    def observe(self, before: RolloutState, after: RolloutState, decision: rules.Decision) -> None:
        raise RuntimeError("a bug in the metrics")


async def test_a_failing_metrics_hook_never_stops_a_transition(
    js: JetStreamContext, chdb_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    engine = await make_engine(js, chdb_client, clock)
    engine.decision_metrics = Broken(CollectorRegistry())
    req = request("org/broken-metrics")
    with caplog.at_level(logging.ERROR, logger="preflight.canary-controller"):
        await engine.begin(new_rollout(req, clock))
    stored = await engine.store.get(req.deployment_id)
    assert stored is not None and stored.state.phase is Phase.STEP
    assert stored.state.pending is None, "the transition's effects were carried out"
    route = await engine.current_route(req.model)
    assert route is not None and route.canary_weight == 5
    assert f"rollout {req.deployment_id}: decision metrics not updated" in caplog.text
