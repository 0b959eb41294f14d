"""The envoy router: weights reach Envoy through its filesystem xDS directory; read back from
Envoy's admin `/config_dump` (docs/data-planes/envoy.md).

`apply(route)` makes `route` the model's route in the xDS directory and rewrites the RDS and CDS
files from every model's route on disk (services/envoy/xds_files.py), atomically. `read(route)`
asks Envoy itself what it serves: confirmed when the model's split, pins and clusters are the
route's, written at the route's `updated_at`, and Envoy has loaded the versions now on disk.

Options (`canary.traffic.options`): `xds_dir` (default: settings `envoy_xds_dir`, else
`<data_dir>/envoy/xds`), `admin_url` (default: settings `envoy_admin_url`, else
http://127.0.0.1:9901), `timeout_s` for admin reads.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.contracts.events import Route
from services.envoy import config
from services.envoy.config import UpstreamError, XdsOptions
from services.envoy.process import DEFAULT_ADMIN_PORT
from services.envoy.xds_files import Written, XdsDirectory, XdsError
from services.traffic.base import Applied, RouterConfigError, RouterError

NAME = "envoy"


class EnvoyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    xds_dir: str | None = Field(default=None, min_length=1, description="Envoy's watched dir.")
    admin_url: str | None = Field(
        default=None, pattern=r"^https?://[^\s/]+/?$", description="Envoy's admin interface."
    )
    timeout_s: float = Field(default=2.0, gt=0, le=60, description="Per admin read.")


class EnvoyRouter:
    name = NAME
    supports_pin = True

    def __init__(self, xds: XdsDirectory, admin_url: str, timeout_s: float = 2.0) -> None:
        self.xds = xds
        self.admin_url = admin_url.rstrip("/")
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def apply(self, route: Route) -> None:
        try:
            await asyncio.to_thread(self.xds.put, route)
        except UpstreamError as exc:
            raise RouterError(f"envoy router, model {route.model}: {exc}") from exc
        except XdsError as exc:
            raise RouterError(f"envoy router: {exc}") from exc

    async def _get(self, path: str) -> Any:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s)
            )
        async with self._session.get(f"{self.admin_url}{path}") as resp:
            body = await resp.read()
            if resp.status != 200:
                raise RouterError(
                    f"Envoy admin {self.admin_url}{path} answered {resp.status}: "
                    f"{body[:200].decode(errors='replace')}"
                )
            return json.loads(body) if body.strip() else {}

    async def read(self, route: Route) -> Applied:
        try:
            written: Written = await asyncio.to_thread(self.xds.written)
        except XdsError as exc:
            raise RouterError(f"envoy router: {exc}") from exc
        want = config.canary_units(route) / config.WEIGHT_TOTAL * 100
        wrote = f"wrote route version {written.rds_version} (canary weight {want:g}%)"
        try:
            routes_dump = await self._get("/config_dump?resource=dynamic_route_configs")
            clusters_dump = await self._get("/config_dump?resource=dynamic_active_clusters")
            versions_dump = await self._get("/config_dump?mask=version_info")
        except (aiohttp.ClientError, TimeoutError, ValueError, RouterError) as exc:
            reason = str(exc) or type(exc).__name__
            return Applied(
                False, None, f"Envoy admin {self.admin_url} not readable ({reason}); {wrote}"
            )
        try:
            found = config.served(route, routes_dump, clusters_dump, versions_dump)
        except (UpstreamError, KeyError, TypeError, ValueError) as exc:
            return Applied(False, None, f"Envoy admin {self.admin_url}: {exc}; {wrote}")
        weight = (
            found.canary_units / config.WEIGHT_TOTAL * 100
            if found.canary_units is not None
            else None
        )
        serves = (
            f"Envoy admin {self.admin_url} serves route version {found.rds_version}, "
            f"canary weight {'none' if weight is None else f'{weight:g}%'} for {route.model}"
        )
        problems = list(found.problems)
        if found.rds_version != written.rds_version:
            problems.insert(0, "an older route version than on disk")
        # (Envoy reports no CDS version for an empty file: only a route with clusters has one.)
        has_clusters = bool(config.route_clusters(route))
        if has_clusters and found.cds_version != written.cds_version:
            problems.append(f"cluster version {found.cds_version}, on disk {written.cds_version}")
        if problems and found.rds_version != written.rds_version:
            problems.append(await self._refusals())
        if problems:
            text = "; ".join(p for p in problems[:5] if p)
            return Applied(False, weight, f"{serves}; {wrote}; {text}")
        return Applied(True, weight, f"{serves} (cluster version {found.cds_version})")

    async def _refusals(self) -> str:
        """Envoy keeps its last good configuration when it refuses a file and says so only in
        its log and its `update_failure`/`update_rejected` counters: name them."""
        try:
            stats = await self._get("/stats?format=json&filter=update_(rejected|failure)$")
        except (aiohttp.ClientError, TimeoutError, ValueError, RouterError):
            return ""
        refused = {
            str(item.get("name")): int(item.get("value") or 0)
            for item in (stats.get("stats") or ())
            if isinstance(item, dict) and item.get("value")
        }
        if not refused:
            return ""
        counts = ", ".join(f"{name} {value}" for name, value in sorted(refused.items()))
        return f"Envoy refused xDS files since it started ({counts}); its log says why"

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def build(options: Mapping[str, Any], settings: Any) -> EnvoyRouter:
    try:
        parsed = EnvoyOptions.model_validate(dict(options))
    except ValidationError as exc:
        first = exc.errors()[0]
        raise RouterConfigError(
            f"traffic router {NAME!r}: {first['msg']} ({'.'.join(map(str, first['loc']))})"
        ) from exc
    xds_dir = parsed.xds_dir or getattr(settings, "envoy_xds_dir", None)
    if xds_dir is None:
        data_dir = getattr(settings, "data_dir", None)
        if data_dir is None:
            raise RouterConfigError(
                f"traffic router {NAME!r}: set options.xds_dir (the directory Envoy watches) "
                "or PREFLIGHT_ENVOY_XDS_DIR"
            )
        xds_dir = Path(data_dir) / "envoy" / "xds"
    admin_url = (
        parsed.admin_url
        or getattr(settings, "envoy_admin_url", None)
        or f"http://127.0.0.1:{DEFAULT_ADMIN_PORT}"
    )
    return EnvoyRouter(
        XdsDirectory(Path(xds_dir), XdsOptions.from_settings(settings)),
        str(admin_url),
        parsed.timeout_s,
    )
