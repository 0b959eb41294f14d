"""canary-controller service: BenchmarkCompleted -> rollout -> DeploymentPromoted/RolledBack.

Wiring only: the decision is in decision.py, the transitions in engine.py, the lease in
lease.py. Replicas run side by side; the one holding the lease is active: it opens the metrics
store, ticks and consumes. The others only serve the rollout page (from KV) and wait for the
lease; they never pull from the controller's durables. In the embedded stack the active process
also owns the chDB data path (one owner per path), so it runs the metrics ingest too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import signal
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from services.canary_controller import decision as rules
from services.canary_controller.engine import (
    Engine,
    RolloutStore,
    TickHealth,
    canary_target,
    run_ticks,
    stable_target,
)
from services.canary_controller.lease import RENEW_S, Lease
from services.canary_controller.outages import BusOutages, watch_connection
from services.canary_controller.prom import DecisionMetrics, keep_refreshed
from services.canary_controller.state import RolloutState
from services.canary_controller.upstreams import TcpProbe
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
from services.runtime.service import EventSink, Rejected, ServiceApp, build_service
from services.runtime.settings import Settings
from services.traffic import RouterCache
from services.traffic.base import RouterConfigError, RouterContext

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

    async def buckets(
        self,
        deployment_id: str,
        start: datetime,
        end: datetime,
        bucket_s: float,
        latency_limit_ms: float | None,
        *,
        ttft_limit_ms: float | None = None,
    ) -> queries.BucketCounts:
        async with self._lock:
            return await asyncio.to_thread(
                functools.partial(
                    queries.query_buckets,
                    self.client,
                    self.table,
                    deployment_id,
                    start,
                    end,
                    bucket_s,
                    latency_limit_ms,
                    ttft_limit_ms=ttft_limit_ms,
                )
            )


class PageSeries:
    """The page's charts: the metrics store once this replica is active and has opened it."""

    def __init__(self) -> None:
        self.metrics: ClickHouseMetrics | None = None

    async def series(
        self, deployment_id: str, start: datetime, end: datetime, bucket_s: float
    ) -> list[dict[str, Any]]:
        if self.metrics is None:
            raise queries.MetricsUnavailable(
                "this controller replica is the standby: the active replica owns the metrics "
                "store and draws the charts"
            )
        return await self.metrics.series(deployment_id, start, end, bucket_s)


@dataclass
class GuardedSink:
    """Events from handlers go out only while this replica may act (it holds the lease)."""

    sink: EventSink
    engine: Engine

    async def publish_event(self, event: Event) -> None:
        await self.engine.ensure_may_act()
        await self.sink.publish_event(event)


def lease_holder(settings: Settings) -> str:
    """Unique per process: two replicas may share an instance name (compose `replicas: 2`)."""
    return f"{settings.instance}/{os.getpid()}-{secrets.token_hex(2)}"


async def open_metrics_store(settings: Settings) -> Any:
    """The request-metrics client; with chDB, waits while another process holds the data path
    (the previous active replica, still exiting)."""

    def create() -> Any:
        client = clickhouse.open_client(settings)
        clickhouse.ensure_metrics_table(client, settings)
        return client

    warned = False
    while True:
        try:
            return await asyncio.to_thread(create)
        except clickhouse.MetricsStoreLocked as exc:
            if not warned:
                log.warning("%s; waiting for it to be free", exc)
                warned = True
            await asyncio.sleep(0.5)


async def parked() -> None:
    """Never returns: an on_startup hook that must not let FastStream start the consumers waits
    here until FastStream, shutting down, cancels it."""
    await asyncio.Event().wait()


def build(settings: Settings) -> ServiceApp:
    svc = build_service(NAME, settings)
    state: dict[str, Any] = {}
    stop = asyncio.Event()
    outages = BusOutages()
    page_series = PageSeries()
    tasks: list[asyncio.Task[None]] = []
    registry = CollectorRegistry()  # GET /metrics on the page's port
    decision_metrics = DecisionMetrics(registry)
    ticks = TickHealth()

    def link(rollout: RolloutState, now: datetime) -> str | None:
        return metrics_url(
            settings,
            rollout.deployment_id,
            rollout.model,
            rollout.created_at,
            rollout.finished_at or now,
        )

    def deposed() -> None:
        # Every write already refuses (the lease says so); exit so that the supervisor
        # (compose, Kubernetes, `preflight up`) starts this replica again as a standby, which
        # with chDB also frees the data path for the new leader.
        log.error("another replica holds the lease: stopping this one (it restarts as standby)")
        os.kill(os.getpid(), signal.SIGTERM)

    @svc.app.on_startup  # before consuming: consumers start only once this hook returns
    async def open_stores() -> None:
        nc = await bus.connect(settings, f"preflight-{NAME}-{settings.instance}", reconnect=True)
        js = nc.jetstream()
        state["nc"] = nc
        rollouts = await js.key_value(subjects.ROLLOUTS_BUCKET)
        routes = await js.key_value(subjects.ROUTES_BUCKET)
        lease = Lease(
            await js.key_value(subjects.LEASES_BUCKET), lease_holder(settings), on_deposed=deposed
        )
        state["lease"] = lease
        decision_metrics.track_leader(lease.active)
        watch_connection(nc, outages, on_reconnected=lease.bus_reconnected)
        tasks.append(asyncio.create_task(lease.run(stop), name="lease"))
        if settings.controller_http_port:

            def health() -> dict[str, Any]:
                problems = []
                if not nc.is_connected:
                    problems.append("not connected to NATS")
                problems += [f"{t.get_name()} stopped" for t in tasks if t.done()]
                if (stuck := ticks.problem()) is not None:
                    problems.append(stuck)
                status = "unavailable" if problems else "ok"
                return {
                    "status": status,
                    "problems": problems,
                    "instance": settings.instance,
                    **lease.describe(),
                }

            def ready() -> dict[str, Any]:
                return {"status": "ok" if lease.active() else "standby", **lease.describe()}

            state["page"] = await start_page(
                settings, RolloutStore(rollouts), page_series, health, ready, registry
            )
        log.info("waiting for the controller lease (standby until it is free)")
        if not await lease.wait_active(stop):
            await parked()  # stopping, or deposed before acting: consumers must never start

        client = await open_metrics_store(settings)
        state["clickhouse"] = client
        where = settings.chdb_path() if settings.clickhouse_url == "chdb" else "server"
        log.info("request-metrics table %s ready (%s)", settings.metrics_table, where)
        metrics = ClickHouseMetrics(client, settings.metrics_table)
        state["metrics"] = metrics
        page_series.metrics = metrics
        engine = Engine(
            js,
            rollouts,
            routes,
            metrics,
            metrics_url=link,
            may_act=lease.active,
            act_wait_s=2 * RENEW_S,  # a renewal delayed by a bus blip, not a lost lease
            outages=outages.known,
            upstreams=TcpProbe(),
            routers=RouterCache(RouterContext(settings, js)),
            decision_metrics=decision_metrics,
        )
        state["engine"] = engine

        async def live_rollouts() -> list[RolloutState]:
            return [s.state for s in await engine.store.all(live_only=True)]

        # Only the active replica exports rollout series: they come from its decisions.
        tasks.append(
            asyncio.create_task(
                keep_refreshed(decision_metrics, live_rollouts, stop), name="decision-metrics"
            )
        )
        svc.sink = GuardedSink(svc.sink, engine)
        tasks.append(
            asyncio.create_task(run_ticks(engine, stop, health=ticks), name="rollout-ticks")
        )
        if settings.clickhouse_url == "chdb":
            from services.metrics.ingest import run_ingest

            # chDB: one process per data path, so the ingest lives with the queries.
            tasks.append(
                asyncio.create_task(run_ingest(js, client, settings, stop), name="metrics-ingest")
            )
            log.info("metrics ingest runs in this process (embedded ClickHouse engine)")
        if stop.is_set():
            await parked()

    @svc.app.after_shutdown
    async def close_stores() -> None:
        stop.set()
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        lease = state.get("lease")
        if lease is not None:
            await lease.release()  # nothing acts any more: the standby may take over now
        runner = state.get("page")
        if runner is not None:
            await runner.cleanup()
        engine = state.get("engine")
        if engine is not None and isinstance(engine.routers, RouterCache):
            with contextlib.suppress(Exception):
                await engine.routers.aclose()  # data-plane clients (Envoy admin, Kubernetes)
        nc = state.get("nc")
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.drain()

    @svc.consume(subjects.CONTROLLER_DURABLE, BenchmarkCompleted)
    async def on_benchmarked(benchmarked: BenchmarkCompleted) -> None:
        engine: Engine = state["engine"]
        await engine.ensure_may_act()  # NotLeader: nak'ed, so the active replica takes it
        try:
            policy: Policy | None = pipeline.resolve_policy(svc.policy_file, benchmarked.request)
        except PolicyError:
            policy = None  # handle_benchmarked reports it
        for event in handle_benchmarked(benchmarked, svc.policy_file, settings):
            if isinstance(event, DeploymentPromoted):
                # Canary off for this one: a rollout of the model still running would have its
                # route taken from under it, so it is rolled back (superseded) first.
                await engine.supersede(
                    benchmarked.model, benchmarked.deployment_id, benchmarked.version
                )
                await engine.write_route(
                    promoted_route(event, canary_target(benchmarked)),
                    policy.canary.traffic if policy else None,
                )
            await svc.sink.publish_event(event)
        if policy is None:
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
        stored = await engine.store.get(command.deployment_id)
        if stored is None:
            raise Rejected(
                f"{command.type} for {command.deployment_id} refused: no rollout with that id "
                "(unknown, or a deployment that never reached its canary)"
            )
        if stored.state.model != command.model:
            # Permissions (and a team's own tooling) go by the subject's model: a command for
            # one model must not steer another's rollout that happens to have this id.
            raise Rejected(
                f"{command.type} for {command.deployment_id} refused: the command is for model "
                f"{command.model!r}, the rollout with that id is of {stored.state.model!r}"
            )
        outcome = await engine.on_command(command)
        if not outcome.applied:
            # Well-formed but changes nothing (the rollout ended, or the phase does not allow
            # it): the sender's answer is a dead letter with the reason, not only a log line.
            raise Rejected(f"{command.type} for {command.deployment_id}: {outcome.reason}")
        log.info("%s for %s: %s", command.type, command.deployment_id, outcome.reason)

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
        await engine.write_route(promoted_route(promoted, canary), policy.canary.traffic)
        await svc.sink.publish_event(promoted)
        return
    try:
        thresholds = policy.canary_thresholds(request.model_class)
        engine.routers(policy.canary.traffic)  # the router's own options, checked up front
    except RouterConfigError as exc:
        error = PolicyError(f"canary.traffic: {exc}")
        await svc.sink.publish_event(pipeline.policy_failure(request, "canary", error))
        return
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
    store: RolloutStore,
    series: PageSeries,
    health: Callable[[], dict[str, Any]],
    ready: Callable[[], dict[str, Any]],
    registry: CollectorRegistry | None = None,
) -> Any:
    """The rollout page (the link target in the embedded stack); none if not built. Every
    replica serves it from the rollout KV; only the active one has charts and is ready.
    `GET /metrics` serves `registry` (the active replica's has the decision series)."""
    try:
        from services.canary_controller.page import build_page_app
    except ImportError:
        log.warning("rollout page not available in this build")
        return None

    class Reader:
        async def get(self, deployment_id: str) -> RolloutState | None:
            stored = await store.get(deployment_id)
            return stored.state if stored else None

        async def list(self) -> list[RolloutState]:
            return [s.state for s in await store.all()]

    # The page gives up on a slow series query a little after the store's own timeout would.
    app = build_page_app(
        Reader(),
        series,
        health=health,
        ready=ready,
        series_timeout_s=queries.DEFAULT_TIMEOUT_S + 2,
        metrics=registry,
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
