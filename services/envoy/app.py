"""envoy-receiver service: Envoy's gRPC access logs in, request-metric batches on the bus out.

`python -m services.envoy.app` runs it with settings from `PREFLIGHT_*`; `serve(settings)` is the
same from Python. It connects to NATS as the configured user (one allowed to publish
`preflight.metrics.>`: the `router` user of deploy/nats/nats.conf) and publishes on
`preflight.metrics.envoy-<instance>`.

Settings it reads (with these defaults while Settings does not declare them):
`envoy_receiver_host` 127.0.0.1, `envoy_receiver_port` 9902, `envoy_receiver_http_port` None
(a port: GET /healthz and /metrics there).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.envoy.receiver import RunningReceiver, start_receiver
from services.router.metrics import JetStreamSink, PublisherConfig
from services.runtime import bus
from services.runtime.processes import stop_on_signals
from services.runtime.settings import Settings, redact_url

NAME: Final = "envoy-receiver"
DEFAULT_RECEIVER_HOST: Final = "127.0.0.1"
DEFAULT_RECEIVER_PORT: Final = 9902
log = logging.getLogger("preflight.envoy.receiver")


def receiver_address(settings: Any) -> tuple[str, int]:
    host = getattr(settings, "envoy_receiver_host", None) or DEFAULT_RECEIVER_HOST
    port = getattr(settings, "envoy_receiver_port", None)
    return str(host), int(DEFAULT_RECEIVER_PORT if port is None else port)


def source_of(settings: Settings) -> str:
    """The batches' `source` (and subject token): apart from a built-in router's on the host."""
    return f"envoy-{settings.instance}"


async def serve(settings: Settings, *, ready: Callable[[str], None] | None = None) -> None:
    """Run until cancelled or SIGTERM/SIGINT; `ready` gets the receiver's host:port."""
    stop = asyncio.Event()
    with stop_on_signals(stop):
        nc = await bus.connect(settings, f"preflight-{NAME}-{settings.instance}", reconnect=True)
        try:
            host, port = receiver_address(settings)
            config = replace(PublisherConfig.from_settings(settings), source=source_of(settings))
            running = await start_receiver(
                JetStreamSink(nc.jetstream()), config, host=host, port=port
            )
            site_runner: web.AppRunner | None = None
            try:
                http_port = getattr(settings, "envoy_receiver_http_port", None)
                if http_port is not None:
                    site_runner = await _serve_http(running, nc, host, int(http_port))
                log.info(
                    "%s on %s (NATS %s as %s)",
                    NAME,
                    running.address,
                    redact_url(settings.nats_url),
                    settings.nats_user or "no user",
                )
                if ready is not None:
                    ready(running.address)
                await stop.wait()
            finally:
                if site_runner is not None:
                    await site_runner.cleanup()
                await running.close()
        finally:
            with contextlib.suppress(Exception):
                await nc.drain()


async def _serve_http(running: RunningReceiver, nc: Any, host: str, port: int) -> web.AppRunner:
    """GET /healthz (200 while NATS is connected and the publisher runs) and /metrics."""

    async def healthz(_: web.Request) -> web.Response:
        problems = []
        if not nc.is_connected:
            problems.append("not connected to NATS")
        if running.task.done():
            problems.append("metrics publisher stopped")
        body = {
            "status": "ok" if not problems else "unavailable",
            "problems": problems,
            "records": running.receiver.records,
            "unmapped": running.receiver.unmapped,
            "metrics": {
                "buffered": running.publisher.buffered,
                "dropped": running.publisher.dropped,
                "published": running.publisher.published,
                "last_error": running.publisher.last_error,
            },
        }
        return web.json_response(body, status=200 if not problems else 503)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(running.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def main() -> None:
    """`python -m services.envoy.app`: settings from the environment, logs to stderr."""
    settings = Settings()
    logging.basicConfig(
        level=settings.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(serve(settings))
    except (bus.BusUnavailable, OSError) as exc:
        print(f"{NAME}: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
