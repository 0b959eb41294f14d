"""router service: the weighted stable/canary HTTP proxy, fed by the route KV bucket.

`python -m services.router.app` runs it with settings from `PREFLIGHT_*`; `serve(settings)` is the
same from Python; `build_app(settings, nc)` gives the aiohttp application alone (tests, embedding).

    GET /healthz   200 when the route watch is live and the bus connected, else 503 (JSON reason)
    GET /metrics   Prometheus text
    GET /routes    the route table as JSON
    anything else  proxied to the stable or canary upstream of the request's model
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
from aiohttp import web
from nats.aio.client import Client as NATS
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from services.contracts.events import Route
from services.router.metrics import (
    BatchSink,
    JetStreamSink,
    MetricsPublisher,
    PublisherConfig,
    PublisherMetrics,
)
from services.router.proxy import Proxy, RouterMetrics
from services.router.report import Reporter
from services.router.routes import Change, RouteTable, Update, record_deployment_id
from services.router.watch import RouteWatcher
from services.runtime import bus
from services.runtime.processes import stop_on_signals
from services.runtime.settings import Settings, redact_url

NAME: Final = "router"
log = logging.getLogger("preflight.router")


@dataclass
class Router:
    """Everything one router instance holds; the aiohttp app keeps it under `ROUTER`."""

    settings: Settings
    nc: NATS
    table: RouteTable
    watcher: RouteWatcher
    publisher: MetricsPublisher
    proxy: Proxy
    registry: CollectorRegistry
    prom: RouterMetrics
    reporter: Reporter | None = None
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    def health(self) -> tuple[bool, dict[str, Any]]:
        problems = []
        if not self.nc.is_connected:
            problems.append("not connected to NATS")
        if not self.watcher.live:
            problems.append(self.watcher.problem or "route watch not live")
        problems += [f"{t.get_name()} stopped" for t in self.tasks if t.done()]
        body: dict[str, Any] = {
            "status": "ok" if not problems else "unavailable",
            "problems": problems,
            "routes": len(self.table.routes),
            "metrics": {
                "buffered": self.publisher.buffered,
                "dropped": self.publisher.dropped,
                "published": self.publisher.published,
                "last_error": self.publisher.last_error,
            },
        }
        return not problems, body

    def routes_json(self) -> dict[str, Any]:
        return {
            model: {
                **route.model_dump(mode="json"),
                "records_deployment_id": record_deployment_id(route),
            }
            for model, route in sorted(self.table.routes.items())
        }


ROUTER: Final = web.AppKey("router", Router)


def build_app(
    settings: Settings,
    nc: NATS,
    *,
    sink: BatchSink | None = None,
    draw: Callable[[], float] | None = None,
    publisher_config: PublisherConfig | None = None,
) -> web.Application:
    """The router as an aiohttp app on an open NATS connection (which the caller closes).

    `sink` replaces the JetStream metrics publisher, `draw` the split's random numbers in
    [0, 100), `publisher_config` the batching knobs taken from `settings`.
    """
    registry = CollectorRegistry()
    prom = RouterMetrics(registry)

    def on_update(update: Update, route: Route | None) -> None:
        prom.route_updates.labels(update.change.value).inc()
        prom.routes.set(len(table.routes))
        if router.reporter is not None:
            router.reporter.changed()  # say what is in force now, not at the next heartbeat
        if update.change is Change.APPLIED and route is not None:
            prom.canary_weight.labels(update.key).set(route.canary_weight)
        elif update.change is Change.REMOVED:
            with contextlib.suppress(KeyError):
                prom.canary_weight.remove(update.key)

    table = RouteTable(on_update)
    js = nc.jetstream()
    publisher = MetricsPublisher(
        sink=sink or JetStreamSink(js),
        config=publisher_config or PublisherConfig.from_settings(settings),
        prom=PublisherMetrics(registry),
    )
    proxy = Proxy(
        table=table,
        publisher=publisher,
        prom=prom,
        default_model=settings.router_default_model,
        sticky_header=settings.router_sticky_header,
    )
    if draw is not None:
        proxy.draw = draw
    watcher = RouteWatcher(js, table)
    router = Router(
        settings=settings,
        nc=nc,
        table=table,
        watcher=watcher,
        publisher=publisher,
        proxy=proxy,
        registry=registry,
        prom=prom,
        reporter=Reporter(js, table, settings.instance, live=lambda: watcher.live),
    )
    # A report written before the watch was live says "not live"; say so again once it is,
    # not at the next heartbeat, so the controller does not wait 2 s to count this instance.
    watcher.on_live = router.reporter.changed if router.reporter is not None else None
    app = web.Application(client_max_size=0)  # bodies stream through, never buffered whole
    app[ROUTER] = router
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/routes", _routes)
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    app.cleanup_ctx.append(_lifecycle)
    return app


async def _lifecycle(app: web.Application) -> Any:
    """Start the session, route watch and metrics task; on cleanup stop them and flush."""
    router = app[ROUTER]
    settings = router.settings
    router.proxy.session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=1024, enable_cleanup_closed=True),
        timeout=aiohttp.ClientTimeout(
            total=settings.router_upstream_timeout_s,
            sock_connect=settings.router_connect_timeout_s,
        ),
        auto_decompress=False,  # bytes pass through with their Content-Encoding
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
    )
    tasks = [
        asyncio.create_task(router.watcher.run(), name="router-route-watch"),
        asyncio.create_task(router.publisher.run(), name="router-metrics"),
    ]
    if router.reporter is not None:
        tasks.append(asyncio.create_task(router.reporter.run(), name="router-status-report"))
    router.tasks = tasks
    for task in tasks:
        task.add_done_callback(_report_death)
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            # A task that died has been reported already; cleanup must still run.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if router.reporter is not None:
            await router.reporter.withdraw()
        await router.publisher.close()
        await router.proxy.session.close()


def _report_death(task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("%s stopped: %s: %s", task.get_name(), type(exc).__name__, exc, exc_info=exc)


async def _healthz(request: web.Request) -> web.Response:
    ok, body = request.app[ROUTER].health()
    return web.json_response(body, status=200 if ok else 503)


async def _metrics(request: web.Request) -> web.Response:
    data = generate_latest(request.app[ROUTER].registry)
    return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _routes(request: web.Request) -> web.Response:
    return web.json_response(request.app[ROUTER].routes_json())


async def serve(settings: Settings, *, ready: Callable[[str], None] | None = None) -> None:
    """Run the router until cancelled or SIGTERM/SIGINT; `ready` gets the URL it listens on."""
    stop = asyncio.Event()
    with stop_on_signals(stop):
        nc = await bus.connect(settings, f"preflight-router-{settings.instance}", reconnect=True)
        try:
            runner = web.AppRunner(build_app(settings, nc), access_log=None, handle_signals=False)
            await runner.setup()
            try:
                await web.TCPSite(runner, settings.router_host, settings.router_port).start()
                url = _listening_url(runner, settings)
                log.info("router listening on %s (NATS %s)", url, redact_url(settings.nats_url))
                if ready is not None:
                    ready(url)
                await stop.wait()
            finally:
                await runner.cleanup()
        finally:
            with contextlib.suppress(Exception):
                await nc.drain()


def _listening_url(runner: web.AppRunner, settings: Settings) -> str:
    addresses = runner.addresses
    port = addresses[0][1] if addresses else settings.router_port
    return f"http://{settings.router_host}:{port}"


def main() -> None:
    """`python -m services.router.app`: settings from the environment, logs to stderr."""
    settings = Settings()
    logging.basicConfig(
        level=settings.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(serve(settings))
    except bus.BusUnavailable as exc:
        print(f"router: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
