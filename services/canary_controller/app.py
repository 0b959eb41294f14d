"""canary-controller service: BenchmarkCompleted -> rollout -> DeploymentPromoted/RolledBack.

Wiring only: the decision is in decision.py, the transitions in engine.py. In the embedded stack
this process also owns the chDB data path (one owner per path), so it runs the metrics ingest
and serves the rollout page there too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from aiohttp import web

from services.canary_controller import decision as rules
from services.canary_controller.engine import Engine, canary_target, run_ticks, stable_target
from services.canary_controller.state import RolloutState
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
    Status,
)
from services.contracts.policy import Policy, PolicyError, PolicyFile
from services.metrics import queries
from services.runtime import bus, clickhouse, pipeline
from services.runtime.service import Rejected, ServiceApp, build_service
from services.runtime.settings import Settings

NAME = "canary-controller"
ROLLOUTS_BUILT = True
log = logging.getLogger(f"preflight.{NAME}")


def page_base_url(settings: Settings) -> str | None:
    if settings.controller_public_url:
        return settings.controller_public_url.rstrip("/")
    if not settings.controller_http_port:
        return None
    return f"http://{settings.controller_http_host}:{settings.controller_http_port}"


def metrics_url(
    settings: Settings,
    deployment_id: str,
    model: str,
    start: datetime | None = None,
    end: datetime | None = None,
    *,
    rollout: bool = True,
) -> str | None:
    """The link sent with outcomes: the configured template, else the controller's own page
    (only for deployments that had a rollout to show)."""
    values = {
        "deployment_id": deployment_id,
        "model": model,
        "from_ms": str(int(start.timestamp() * 1000)) if start else "",
        "to_ms": str(int(end.timestamp() * 1000)) if end else "",
    }
    template = settings.metrics_url_template
    if not template:
        if not rollout:
            return None
        base = page_base_url(settings)
        return f"{base}/rollouts/{deployment_id}" if base else None
    try:
        return template.format_map(values)
    except (KeyError, ValueError, IndexError):
        return template


def canary_report(policy: Policy, instance: str) -> StageReport:
    """The canary stage when no rollout runs: disabled by policy."""
    return pipeline.disabled("canary", instance)


def first_version_report(model: str, instance: str) -> StageReport:
    return StageReport(
        stage="canary",
        status=Status.SKIPPED,
        reason=f"skipped: first version of {model}: no stable version to compare a canary with",
        service=instance,
    )


def handle_benchmarked(
    benchmarked: BenchmarkCompleted, policy_file: PolicyFile, settings: Settings
) -> list[Event]:
    """Outcomes that need no rollout: canary disabled by policy. Empty when a rollout starts."""
    try:
        policy = pipeline.resolve_policy(policy_file, benchmarked.request)
    except PolicyError as exc:
        return [pipeline.policy_failure(benchmarked.request, "canary", exc)]
    if not pipeline.proceeds_to_canary(benchmarked, policy):
        return []  # the benchmarker already published DeploymentBlocked
    if policy.canary.enabled:
        return []
    report = canary_report(policy, settings.instance)
    url = metrics_url(settings, benchmarked.deployment_id, benchmarked.model, rollout=False)
    return [pipeline.promoted_without_canary(benchmarked, report, url)]


def promoted_route(promoted: DeploymentPromoted, target: RouteTarget) -> Route:
    return Route(model=promoted.model, stable=target, canary=None, canary_weight=0.0)


class ClickHouseMetrics:
    """Window queries on the request-metrics table, off the event loop (chDB is synchronous)."""

    def __init__(self, client: Any, table: str) -> None:
        self.client = client
        self.table = table
        self._lock = asyncio.Lock()

    async def window(
        self, deployment_id: str, start: datetime, end: datetime, *, raw: bool
    ) -> queries.WindowResult:
        async with self._lock:
            return await asyncio.to_thread(
                queries.query_window, self.client, self.table, deployment_id, start, end, raw=raw
            )

    async def series(
        self, deployment_id: str, start: datetime, end: datetime, bucket_s: float
    ) -> list[dict[str, Any]]:
        async with self._lock:
            return await asyncio.to_thread(
                queries.query_series, self.client, self.table, deployment_id, start, end, bucket_s
            )


def build(settings: Settings) -> ServiceApp:
    svc = build_service(NAME, settings)
    state: dict[str, Any] = {}
    stop = asyncio.Event()

    def link(rollout: RolloutState, now: datetime) -> str | None:
        return metrics_url(
            settings,
            rollout.deployment_id,
            rollout.model,
            rollout.created_at,
            rollout.finished_at or now,
        )

    @svc.app.on_startup  # before consuming: a ready controller has its stores open
    async def open_stores() -> None:
        def create() -> Any:
            client = clickhouse.open_client(settings)
            clickhouse.ensure_metrics_table(client, settings)
            return client

        client = await asyncio.to_thread(create)
        state["clickhouse"] = client
        where = settings.chdb_path() if settings.clickhouse_url == "chdb" else "server"
        log.info("request-metrics table %s ready (%s)", settings.metrics_table, where)
        nc = await bus.connect(settings, f"preflight-{NAME}-{settings.instance}", reconnect=True)
        js = nc.jetstream()
        state["nc"] = nc
        metrics = ClickHouseMetrics(client, settings.metrics_table)
        state["metrics"] = metrics
        engine = Engine(
            js,
            await js.key_value(subjects.ROLLOUTS_BUCKET),
            await js.key_value(subjects.ROUTES_BUCKET),
            metrics,
            metrics_url=link,
        )
        state["engine"] = engine
        tasks = [asyncio.create_task(run_ticks(engine, stop), name="rollout-ticks")]
        if settings.clickhouse_url == "chdb":
            from services.metrics.ingest import run_ingest

            # chDB: one process per data path, so the ingest lives with the queries.
            tasks.append(
                asyncio.create_task(run_ingest(js, client, settings, stop), name="metrics-ingest")
            )
            log.info("metrics ingest runs in this process (embedded ClickHouse engine)")
        state["tasks"] = tasks
        if settings.controller_http_port:

            def health() -> dict[str, Any]:
                problems = []
                if not nc.is_connected:
                    problems.append("not connected to NATS")
                problems += [f"{t.get_name()} stopped" for t in tasks if t.done()]
                status = "unavailable" if problems else "ok"
                return {"status": status, "problems": problems, "instance": settings.instance}

            state["page"] = await start_page(settings, engine, metrics, health)

    @svc.app.after_shutdown
    async def close_stores() -> None:
        stop.set()
        tasks = state.get("tasks", [])
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        runner = state.get("page")
        if runner is not None:
            await runner.cleanup()
        nc = state.get("nc")
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.drain()

    @svc.consume(subjects.CONTROLLER_DURABLE, BenchmarkCompleted)
    async def on_benchmarked(benchmarked: BenchmarkCompleted) -> None:
        engine: Engine = state["engine"]
        for event in handle_benchmarked(benchmarked, svc.policy_file, settings):
            if isinstance(event, DeploymentPromoted):
                # Canary off for this one: a rollout of the model still running would have its
                # route taken from under it, so it is rolled back (superseded) first.
                await engine.supersede(
                    benchmarked.model, benchmarked.deployment_id, benchmarked.version
                )
                await engine.write_route(promoted_route(event, canary_target(benchmarked)))
            await svc.sink.publish_event(event)
        try:
            policy = pipeline.resolve_policy(svc.policy_file, benchmarked.request)
        except PolicyError:
            return  # reported above
        if not pipeline.proceeds_to_canary(benchmarked, policy) or not policy.canary.enabled:
            return
        await start_rollout(engine, svc, benchmarked, policy, settings)

    @svc.consume(subjects.CONTROLLER_COMMANDS_DURABLE, ANY_COMMAND)
    async def on_command(command: AnyCommand) -> None:
        sender = command.requested_by.nats_user  # from the subject: the authenticated user
        if sender not in settings.command_senders():
            raise Rejected(
                f"{command.type} for {command.deployment_id} refused: NATS user {sender!r} may "
                f"not send commands (PREFLIGHT_COMMAND_USERS: {settings.command_users})"
            )
        engine: Engine = state["engine"]
        outcome = await engine.on_command(command)
        log.info("%s for %s: %s", command.type, command.deployment_id, outcome)

    return svc


async def start_rollout(
    engine: Engine,
    svc: ServiceApp,
    benchmarked: BenchmarkCompleted,
    policy: Policy,
    settings: Settings,
) -> None:
    request = benchmarked.request
    canary = canary_target(benchmarked)
    route = await engine.current_route(request.model)
    stable = stable_target(benchmarked, route)
    if stable is not None and stable.deployment_id == request.deployment_id:
        # A redelivery after this version was already made stable (first version): never
        # canary a version against itself; say the outcome again (deduplicated by id).
        report = first_version_report(request.model, settings.instance)
        url = metrics_url(settings, benchmarked.deployment_id, benchmarked.model, rollout=False)
        await svc.sink.publish_event(pipeline.promoted_without_canary(benchmarked, report, url))
        return
    if stable is None:
        report = first_version_report(request.model, settings.instance)
        url = metrics_url(settings, benchmarked.deployment_id, benchmarked.model, rollout=False)
        promoted = pipeline.promoted_without_canary(benchmarked, report, url)
        await engine.write_route(promoted_route(promoted, canary))
        await svc.sink.publish_event(promoted)
        return
    try:
        thresholds = policy.canary_thresholds(request.model_class)
    except PolicyError as exc:
        await svc.sink.publish_event(pipeline.policy_failure(request, "canary", exc))
        return
    rollout = rules.start_rollout(
        request,
        earlier=benchmarked.stages,
        policy=policy.canary,
        thresholds=thresholds,
        stable=stable,
        canary=canary,
        now=engine.clock(),
        queued=True,
    )
    if request.endpoint is None:
        log.warning(
            "deployment %s has no endpoint: the router cannot send it traffic; a gateway of "
            "your own must read the route bucket, or the rollout will be inconclusive",
            request.deployment_id,
        )
    if policy.canary.on_new_version == "supersede":
        await engine.supersede(request.model, rollout.deployment_id, rollout.version)
    await engine.begin(rollout)


async def start_page(
    settings: Settings,
    engine: Engine,
    metrics: ClickHouseMetrics,
    health: Callable[[], dict[str, Any]],
) -> Any:
    """The rollout page (the link target in the embedded stack); none if not built."""
    try:
        from services.canary_controller.page import build_page_app
    except ImportError:
        log.warning("rollout page not available in this build")
        return None

    class Reader:
        async def get(self, deployment_id: str) -> RolloutState | None:
            stored = await engine.store.get(deployment_id)
            return stored.state if stored else None

        async def list(self) -> list[RolloutState]:
            return [s.state for s in await engine.store.all()]

    # The page gives up on a slow series query a little after the store's own timeout would.
    app = build_page_app(
        Reader(), metrics, health=health, series_timeout_s=queries.DEFAULT_TIMEOUT_S + 2
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.controller_http_host, settings.controller_http_port)
    await site.start()
    log.info(
        "rollout page on http://%s:%s/rollouts",
        settings.controller_http_host,
        settings.controller_http_port,
    )
    return runner
