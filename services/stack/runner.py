"""`preflight service run NAME`: one service in this process until SIGTERM or Ctrl-C."""

from __future__ import annotations

import asyncio
import logging
import sys

from services.runtime import registry
from services.runtime.settings import Settings, redact_url


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # FastStream logs every message at INFO through the broker logger; keep that off hot paths.
    logging.getLogger("faststream").setLevel(logging.WARNING)


def run_service(name: str, settings: Settings) -> None:
    configure_logging(settings.log_level)
    serve = registry.server_of(name)
    if serve is not None:
        logging.getLogger("preflight").info(
            "%s starting (instance %s, NATS %s)",
            name,
            settings.instance,
            redact_url(settings.nats_url),
        )
        asyncio.run(serve(settings))
        return
    svc = registry.build(name, settings)
    logging.getLogger("preflight").info(
        "%s starting (instance %s, NATS %s)", name, settings.instance, redact_url(settings.nats_url)
    )
    asyncio.run(svc.app.run(log_level=logging.getLevelName(settings.log_level.upper())))
