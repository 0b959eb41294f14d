"""What this router instance serves, reported to the router-status KV bucket.

The controller writes a route; only the router can say it is in force. Each instance puts a
`RouterReport` under its own key on every route change and every `interval_s` (a heartbeat), and
deletes it on a clean stop, so a stopped instance is not waited for. The controller
(services/traffic/builtin.py) counts a weight as applied when every instance with a fresh report
serves it, and none when no instance reports at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from nats.js import JetStreamContext

from services.contracts import subjects
from services.contracts.events import AppliedRoute, Route, RouterReport, utc_now
from services.router.routes import RouteTable
from services.runtime.aio import wait_event

log = logging.getLogger("preflight.router.report")

REPORT_INTERVAL_S = 2.0


def instance_key(instance: str) -> str:
    """A KV key for an instance name (hostname-pid, a pod name): only the characters KV takes."""
    key = re.sub(r"[^-/_=.a-zA-Z0-9]", "_", instance).strip(".") or "router"
    return re.sub(r"\.{2,}", ".", key)


def applied(route: Route) -> AppliedRoute:
    return AppliedRoute(
        updated_at=route.updated_at,
        canary_weight=route.canary_weight if route.canary is not None else 0.0,
        stable_deployment_id=route.stable.deployment_id if route.stable else None,
        canary_deployment_id=route.canary.deployment_id if route.canary else None,
    )


def report_of(instance: str, table: RouteTable, live: bool, now: datetime) -> RouterReport:
    return RouterReport(
        instance=instance,
        reported_at=now,
        live=live,
        routes={model: applied(route) for model, route in table.routes.items()},
    )


@dataclass
class Reporter:
    """Puts this instance's report on change (`changed()`) and every `interval_s`."""

    js: JetStreamContext
    table: RouteTable
    instance: str
    live: Callable[[], bool]
    interval_s: float = REPORT_INTERVAL_S
    clock: Callable[[], datetime] = utc_now
    reports: int = 0
    last_error: str | None = None
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def key(self) -> str:
        return instance_key(self.instance)

    def changed(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        kv = None
        while True:
            try:
                # Cleared before the report is made: a change during the put wakes us again.
                self._wake.clear()
                if kv is None:
                    kv = await self.js.key_value(subjects.ROUTER_STATUS_BUCKET)
                report = report_of(self.instance, self.table, self.live(), self.clock())
                await kv.put(self.key, report.model_dump_json().encode())
                self.reports += 1
                self.last_error = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the bus is down, or the bucket not made yet: retry
                if self.last_error is None:
                    log.warning(
                        "router status report failed (%s: %s); retrying", type(exc).__name__, exc
                    )
                self.last_error = f"{type(exc).__name__}: {exc}"
                kv = None
            await wait_event(self._wake, self.interval_s)

    async def withdraw(self) -> None:
        """On a clean stop: remove this instance's report so it is not waited for."""
        with contextlib.suppress(Exception):
            kv = await self.js.key_value(subjects.ROUTER_STATUS_BUCKET)
            await kv.delete(self.key)
