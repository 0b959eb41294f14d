"""The xDS directory Envoy watches: one route file per model, and the RDS/CDS files made from them.

    <xds_dir>/rds.json           DiscoveryResponse with the one RouteConfiguration (every model)
    <xds_dir>/cds.json           DiscoveryResponse with every cluster those routes name
    <xds_dir>/routes/<m>.json    the last `Route` written for model <m> (URL-quoted name)
    <xds_dir>/routes/.lock       flock held while a writer reads and rewrites the directory

A write replaces the model's route file, then renders cds.json and rds.json from every route file
on disk, so what Envoy serves follows from the files alone: two controllers, or one restarted,
write the same thing for the same routes. Each file is written beside its final name and renamed
onto it: Envoy's watch reacts to that move (never to an in-place write) and never reads half a
file. Clusters go first, so a new route never names a cluster Envoy does not know yet; the
clusters the previous routes named stay one more write, so requests still on the previous routes
find theirs while Envoy swaps.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pydantic import ValidationError

from services.contracts.events import Route
from services.envoy import config
from services.envoy.config import XdsOptions

log = logging.getLogger("preflight.envoy.xds")


class XdsError(RuntimeError):
    """The directory could not be read or written (one line: which file, what failed)."""


@dataclass(frozen=True)
class Written:
    """The versions on disk: what Envoy should serve once it has read the directory."""

    rds_version: str | None
    cds_version: str | None


def write_atomically(path: Path, data: bytes) -> None:
    """Write beside `path`, fsync, rename onto it: readers see the old file or the new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o644)  # Envoy may run as another user (a sidecar)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def route_file_name(model: str) -> str:
    return quote(model, safe="") + ".json"


def _dump(doc: Any) -> bytes:
    return json.dumps(doc, indent=1, sort_keys=True).encode()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise XdsError(f"{path}: unreadable: {exc}") from exc


def named_clusters(rds: Any) -> set[str]:
    """The cluster names an RDS file's routes send to."""
    names: set[str] = set()
    if not isinstance(rds, dict):
        return names
    for resource in rds.get("resources") or ():
        for vhost in resource.get("virtual_hosts") or ():
            for entry in vhost.get("routes") or ():
                action = entry.get("route") or {}
                if "cluster" in action:
                    names.add(action["cluster"])
                for weighted in (action.get("weighted_clusters") or {}).get("clusters") or ():
                    names.add(weighted["name"])
    return names


class XdsDirectory:
    """Reads and writes one Envoy's watched directory (blocking: call it from a thread)."""

    def __init__(self, path: Path, options: XdsOptions | None = None) -> None:
        self.path = Path(path)
        self.options = options or XdsOptions()

    @property
    def routes_dir(self) -> Path:
        return self.path / "routes"

    @property
    def rds_path(self) -> Path:
        return self.path / config.RDS_FILE

    @property
    def cds_path(self) -> Path:
        return self.path / config.CDS_FILE

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.routes_dir.mkdir(parents=True, exist_ok=True)
            with (self.routes_dir / ".lock").open("a") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)
        except OSError as exc:
            raise XdsError(f"{self.path}: cannot write the xDS directory: {exc}") from exc

    def routes(self) -> dict[str, Route]:
        """Every model's route on disk; a file that does not parse is skipped and logged."""
        found: dict[str, Route] = {}
        if not self.routes_dir.is_dir():
            return found
        for path in sorted(self.routes_dir.glob("*.json")):
            try:
                route = Route.model_validate_json(path.read_bytes())
            except (OSError, ValidationError, ValueError) as exc:
                log.warning("%s: not a route, skipped: %s", path, str(exc).splitlines()[0])
                continue
            if route_file_name(route.model) != path.name:
                log.warning("%s: holds the route of %r, skipped", path, route.model)
                continue
            found[route.model] = route
        return found

    def put(self, route: Route) -> Written:
        """Make `route` the model's route and rewrite the xDS files. Raises XdsError, or
        config.UpstreamError for an upstream Envoy cannot route to (nothing written then)."""
        for _, target in config.route_clusters(route).values():
            if target.upstream is not None:
                config.parse_upstream(target.upstream)
        with self._locked():
            write_atomically(
                self.routes_dir / route_file_name(route.model), route.model_dump_json().encode()
            )
            return self._render()

    def sync(self) -> Written:
        """Rewrite the xDS files from the route files (at start-up: an empty directory gets
        routes that answer `no_model`/`unknown_model` and no clusters)."""
        with self._locked():
            return self._render()

    def _render(self) -> Written:
        routes = list(self.routes().values())
        new_clusters = config.clusters(routes, self.options)
        new_names = {c["name"] for c in new_clusters}
        previous = named_clusters(_read_json(self.rds_path))
        old_cds = _read_json(self.cds_path)
        kept = [
            resource
            for resource in (old_cds if isinstance(old_cds, dict) else {}).get("resources") or ()
            if resource.get("name") in previous and resource.get("name") not in new_names
        ]
        cds = config.discovery_response(
            sorted([*new_clusters, *kept], key=lambda c: str(c.get("name")))
        )
        rds = config.discovery_response([config.route_configuration(routes, self.options)])
        write_atomically(self.cds_path, _dump(cds))
        write_atomically(self.rds_path, _dump(rds))
        return Written(rds["version_info"], cds["version_info"])

    def written(self) -> Written:
        """The versions now on disk (written by any writer)."""
        rds = _read_json(self.rds_path)
        cds = _read_json(self.cds_path)
        return Written(
            rds.get("version_info") if isinstance(rds, dict) else None,
            cds.get("version_info") if isinstance(cds, dict) else None,
        )
