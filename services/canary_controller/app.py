"""canary-controller service: BenchmarkCompleted -> rollout -> DeploymentPromoted/RolledBack.

In the embedded stack this process also owns the chDB data path (one owner per path) and
creates the request-metrics table there.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from services.contracts import subjects
from services.contracts.events import (
    ANY_COMMAND,
    AnyCommand,
    BenchmarkCompleted,
    DeploymentPromoted,
    Event,
    Route,
    RouteTarget,
    StageReport,
)
from services.contracts.policy import Policy, PolicyError, PolicyFile
from services.runtime import clickhouse, pipeline
from services.runtime.service import ServiceApp, build_service
from services.runtime.settings import Settings

NAME = "canary-controller"
ROLLOUTS_BUILT = False  # traffic shifting arrives with issue #6
log = logging.getLogger(f"preflight.{NAME}")


def metrics_url(settings: Settings, deployment_id: str, model: str) -> str | None:
    """The link sent with outcomes; none until a metrics page or dashboard is configured."""
    if not settings.metrics_url_template:
        return None
    values = {"deployment_id": deployment_id, "model": model, "from_ms": "", "to_ms": ""}
    try:
        return settings.metrics_url_template.format_map(values)
    except (KeyError, ValueError, IndexError):
        return settings.metrics_url_template


def canary_report(policy: Policy, instance: str) -> StageReport:
    """The canary stage. Traffic shifting arrives with issue #6; until then it says so."""
    if not policy.canary.enabled:
        return pipeline.disabled("canary", instance)
    return pipeline.not_built("canary", instance)


def handle_benchmarked(
    benchmarked: BenchmarkCompleted, policy_file: PolicyFile, settings: Settings
) -> list[Event]:
    try:
        policy = pipeline.resolve_policy(policy_file, benchmarked.request)
    except PolicyError as exc:
        return [pipeline.policy_failure(benchmarked.request, "canary", exc)]
    if not pipeline.proceeds_to_canary(benchmarked, policy):
        return []  # the benchmarker already published DeploymentBlocked
    report = canary_report(policy, settings.instance)
    url = metrics_url(settings, benchmarked.deployment_id, benchmarked.model)
    return [pipeline.promoted_without_canary(benchmarked, report, url)]


def promoted_route(promoted: DeploymentPromoted, location: str) -> Route:
    return Route(
        model=promoted.model,
        stable=RouteTarget(
            deployment_id=promoted.deployment_id, version=promoted.version, location=location
        ),
        canary=None,
        canary_weight=0.0,
    )


def build(settings: Settings) -> ServiceApp:
    svc = build_service(NAME, settings)
    state: dict[str, Any] = {}

    @svc.app.on_startup  # before consuming: a ready controller has its metrics store open
    async def open_metrics_store() -> None:
        def create() -> Any:
            client = clickhouse.open_client(settings)
            clickhouse.ensure_metrics_table(client, settings)
            return client

        state["clickhouse"] = await asyncio.to_thread(create)
        where = settings.chdb_path() if settings.clickhouse_url == "chdb" else "server"
        log.info("request-metrics table %s ready (%s)", settings.metrics_table, where)

    @svc.consume(subjects.CONTROLLER_DURABLE, BenchmarkCompleted)
    async def on_benchmarked(benchmarked: BenchmarkCompleted) -> None:
        kv = await svc.broker.key_value(subjects.ROUTES_BUCKET, declare=False)
        for event in handle_benchmarked(benchmarked, svc.policy_file, settings):
            if isinstance(event, DeploymentPromoted):
                route = promoted_route(event, benchmarked.request.location)
                await kv.put(event.model, route.model_dump_json().encode())
            await svc.sink.publish_event(event)

    @svc.consume(subjects.CONTROLLER_COMMANDS_DURABLE, ANY_COMMAND)
    async def on_command(command: AnyCommand) -> None:
        log.warning(
            "canary stage not built yet (issue #6): %s for %s recorded, no rollout to act on",
            command.__class__.__name__,
            command.deployment_id,
        )

    return svc
