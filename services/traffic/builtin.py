"""The built-in router (services/router): the zero-setup data plane, and the default.

Writing a weight is the controller's route put in the routes KV bucket (the engine does that for
every router: it is the record of intent). Every router instance follows the bucket and reports
what it serves in the router-status bucket (services/router/report.py); a weight counts as applied
when every instance with a fresh report (`max_report_age_s`) serves this exact route write, and
at least `min_instances` do. The pin header is supported (services/router/routes.py `select`).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.contracts import subjects
from services.contracts.events import Route, RouterReport, utc_now
from services.runtime import bus
from services.traffic.base import Applied, RouterConfigError, RouterError

NAME = "builtin"


class BuiltinOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_report_age_s: float = Field(
        default=10.0, gt=0, description="A router instance silent this long is not counted."
    )
    min_instances: int = Field(default=1, ge=1, description="Instances that must serve it.")


class BuiltinRouter:
    name = NAME
    supports_pin = True

    def __init__(self, options: BuiltinOptions, js: Any, clock: Any = utc_now) -> None:
        self.options = options
        self.js = js
        self.clock = clock

    async def apply(self, route: Route) -> None:
        """Nothing beyond the routes KV put the engine makes: the instances follow the bucket."""

    async def reports(self) -> list[RouterReport]:
        if self.js is None:
            raise RouterError("the built-in router needs the controller's bus connection")
        stream = f"KV_{subjects.ROUTER_STATUS_BUCKET}"
        found: list[RouterReport] = []
        seq = 1
        while True:
            try:
                batch, more = await bus.direct_get(
                    self.js._nc, stream, f"$KV.{subjects.ROUTER_STATUS_BUCKET}.>", seq
                )
            except bus.BusUnavailable as exc:
                raise RouterError(f"router status unreadable: {exc}") from exc
            for sequence, _subject, payload in batch:
                seq = sequence + 1
                if not payload:  # a delete marker: an instance that stopped cleanly
                    continue
                try:
                    found.append(RouterReport.model_validate_json(payload))
                except (ValidationError, ValueError):
                    continue  # not a report (never written by a router): ignored
            if not batch or not more:
                return found

    async def read(self, route: Route) -> Applied:
        now: datetime = self.clock()
        fresh_after = now - timedelta(seconds=self.options.max_report_age_s)
        reports = await self.reports()
        fresh = [r for r in reports if r.reported_at >= fresh_after and r.live]
        want_canary = route.canary.deployment_id if route.canary else None
        want_weight = route.canary_weight if route.canary is not None else 0.0
        serving, behind = [], []
        for report in fresh:
            served = report.routes.get(route.model)
            if (
                served is not None
                and served.updated_at == route.updated_at
                and served.canary_deployment_id == want_canary
                and abs(served.canary_weight - want_weight) < 1e-9
            ):
                serving.append(report.instance)
            else:
                had = "no route" if served is None else f"{served.canary_weight:g}%"
                behind.append(f"{report.instance} serves {had}")
        stale = len(reports) - len(fresh)
        aside = (
            f"; {stale} silent or not live for {self.options.max_report_age_s:g} s" if stale else ""
        )
        if not fresh:
            return Applied(
                False,
                None,
                "no built-in router instance reports what it serves (none running, or none "
                f"connected to the bus){aside}",
            )
        if behind or len(serving) < self.options.min_instances:
            return Applied(
                False,
                None,
                f"{len(serving)} of {len(fresh)} router instances serve canary weight "
                f"{want_weight:g}% for {route.model}"
                + (f" ({'; '.join(behind[:3])})" if behind else "")
                + (
                    f"; {self.options.min_instances} needed"
                    if len(serving) < self.options.min_instances
                    else ""
                )
                + aside,
            )
        return Applied(
            True,
            want_weight,
            f"{len(serving)} router instance(s) serve canary weight {want_weight:g}%{aside}",
        )

    async def aclose(self) -> None:
        return None


def build(options: Mapping[str, Any], settings: Any) -> BuiltinRouter:
    try:
        parsed = BuiltinOptions.model_validate(dict(options))
    except ValidationError as exc:
        raise RouterConfigError(
            f"traffic router {NAME!r}: {exc.errors()[0]['msg']} "
            f"({'.'.join(map(str, exc.errors()[0]['loc']))})"
        ) from exc
    return BuiltinRouter(parsed, getattr(settings, "js", None))
