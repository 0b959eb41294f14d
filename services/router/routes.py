"""The route table read from the KV bucket, and the pure choice of role and upstream per request."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, Literal

from pydantic import ValidationError

from services.contracts.events import Route, RouteTarget

Role = Literal["stable", "canary"]

MODEL_HEADER: Final = "X-Preflight-Model"
_HASH_SPAN: Final = float(1 << 64)


def sticky_point(client: str, canary_deployment_id: str) -> float:
    """Where a client sits on [0, 100): stable per (client, canary rollout).

    The canary's deployment id is in the hash so each rollout picks a fresh set of early clients,
    while within one rollout a client's point never moves: raising the weight only moves clients
    from stable to canary.
    """
    digest = hashlib.blake2b(
        f"{canary_deployment_id}\0{client}".encode(), digest_size=8, person=b"preflight"
    ).digest()
    return int.from_bytes(digest, "big") / _HASH_SPAN * 100.0


def canary_live(route: Route) -> bool:
    """True while a canary target we can reach exists and takes some traffic.

    A canary without an upstream (a deployment with no endpoint) stays in the route for
    gateways that route by version, but this router keeps its users on the stable version
    rather than answering them 503.
    """
    return (
        route.canary is not None and route.canary.upstream is not None and route.canary_weight > 0
    )


def pick_role(route: Route, *, draw: float, client: str | None = None) -> Role:
    """Stable or canary for one request.

    `draw` is a uniform number in [0, 100) (the caller's RNG, so tests inject it); `client` is the
    sticky header's value, if any, and then replaces the draw with the client's fixed point.
    """
    if not canary_live(route):
        return "stable"
    if route.stable is None or route.canary_weight >= 100:
        return "canary"
    canary = route.canary
    assert canary is not None  # canary_live
    point = draw if client is None else sticky_point(client, canary.deployment_id or "")
    return "canary" if point < route.canary_weight else "stable"


def record_deployment_id(route: Route) -> str:
    """The deployment id both roles' records carry (see `RequestRecord.deployment_id`)."""
    if canary_live(route):
        assert route.canary is not None
        return route.canary.deployment_id or ""
    if route.stable is not None:
        return route.stable.deployment_id or ""
    return ""


@dataclass(frozen=True)
class Selection:
    """Where one request goes and what its record says."""

    model: str
    role: Role
    target: RouteTarget | None
    deployment_id: str
    pinned: bool = False
    """The pin header chose the role (the record is left out of the analysis)."""

    @property
    def upstream(self) -> str | None:
        return self.target.upstream if self.target is not None else None

    @property
    def version(self) -> str | None:
        return self.target.version if self.target is not None else None


def select(
    route: Route, *, draw: float, client: str | None = None, pin: str | None = None
) -> Selection:
    """`pin`: the request's X-Preflight-Pin header (services/traffic/base.py): `canary` or
    `stable` sends it there whatever the weight, while that role exists, and marks the
    selection `pinned`; anything else is ignored (the weighted choice)."""
    role = pick_role(route, draw=draw, client=client)
    wanted = (pin or "").strip().lower()
    pinned = False
    if wanted == "canary" and route.canary is not None and route.canary.upstream is not None:
        role, pinned = "canary", True
    elif wanted == "stable" and route.stable is not None:
        role, pinned = "stable", True
    target = route.canary if role == "canary" else route.stable
    return Selection(route.model, role, target, record_deployment_id(route), pinned)


class NoModel(LookupError):
    """The request names no model and none can be inferred (HTTP 400)."""


class UnknownModel(LookupError):
    """The named model has no route (HTTP 404)."""


def resolve_model(header: str | None, default: str | None, routes: Mapping[str, Route]) -> Route:
    """The route a request is for: its header, else the default model, else the only route."""
    name = header.strip() if header else None
    if not name:
        name = default
    if not name:
        if len(routes) == 1:
            return next(iter(routes.values()))
        known = f"{len(routes)} routes exist" if routes else "no routes exist yet"
        raise NoModel(f"set the {MODEL_HEADER} header to choose a model ({known})")
    route = routes.get(name)
    if route is None:
        raise UnknownModel(f"no route for model {name!r}")
    return route


class Change(StrEnum):
    """What one KV entry did to the table."""

    APPLIED = "applied"
    """A valid route replaced (or created) the model's route."""
    REMOVED = "removed"
    """A delete or purge removed the model's route."""
    MALFORMED = "malformed"
    """The value did not parse; the previous route for the key stays."""


@dataclass(frozen=True)
class Update:
    change: Change
    key: str
    reason: str = ""


class RouteTable:
    """Current route per model, fed by KV entries; readers never see a half-applied change."""

    def __init__(self, on_update: Callable[[Update, Route | None], None] | None = None) -> None:
        self._routes: dict[str, Route] = {}
        self._on_update = on_update

    @property
    def routes(self) -> Mapping[str, Route]:
        return self._routes

    def get(self, model: str) -> Route | None:
        return self._routes.get(model)

    def apply(self, key: str, value: bytes | None, *, deleted: bool = False) -> Update:
        """Apply one KV entry; the key is the model name, the value a `Route` as JSON."""
        route: Route | None = None
        if deleted or value is None:
            self._routes.pop(key, None)
            update = Update(Change.REMOVED, key)
        else:
            try:
                route = Route.model_validate_json(value)
            except ValidationError as exc:
                update = Update(Change.MALFORMED, key, _describe(exc))
            else:
                if route.model != key:
                    route = None
                    update = Update(
                        Change.MALFORMED, key, "the route's model does not match its key"
                    )
                else:
                    self._routes[key] = route
                    update = Update(Change.APPLIED, key)
        if self._on_update is not None:
            self._on_update(update, route)
        return update


def _describe(exc: ValidationError) -> str:
    parts = [f"{'.'.join(map(str, e['loc'])) or '<value>'}: {e['msg']}" for e in exc.errors()[:5]]
    return "Route does not validate: " + "; ".join(parts)
