"""The one interface the canary-controller drives traffic through, whatever the data plane.

A router takes the route the controller wants for a model (who is stable, who is canary, at what
weight: `services.contracts.events.Route`), writes it into its data plane, and reads back what is
really in force. The controller never starts counting a step on a weight it has not seen applied:
`read` returning `Applied(confirmed=False, ...)` keeps the step from ending, and past the policy's
`traffic.confirm_timeout_s` the rollout is held with `Applied.detail` as the reason.

One module per router under services/traffic/, picked by name (`ROUTERS` in __init__.py) from
the policy's `canary.traffic.router` (per model; per request only where the operator allows
it), the way the notifier picks its channels: no if-chains in the engine.

Every router that can also installs a header route, so a tester can pin themselves to one role:
requests with `PIN_HEADER: canary` (or `: stable`) go there whatever the weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol, runtime_checkable

from services.contracts.events import Route

PIN_HEADER: Final = "X-Preflight-Pin"
"""Request header that pins a request to `canary` or `stable`, where the router supports it."""

PIN_VALUES: Final = ("canary", "stable")

WEIGHT_TOLERANCE: Final = 0.01
"""Percent: data planes that store integer weights (or per-mille) round; within this it matches.
Routers whose data plane rounds more coarsely compare against what they wrote, not the float."""


class RouterError(RuntimeError):
    """The router could not write or read its data plane; `str()` is one line a person can act
    on (which object, which API, what it answered). Never holds credentials."""


class RouterConfigError(ValueError):
    """The policy's `canary.traffic.options` do not fit this router (unknown key, missing name):
    refused when the rollout starts, with the router's name and the key."""


@dataclass(frozen=True)
class Applied:
    """What the data plane has in force for a model, read back after a write.

    `confirmed`: the data plane serves exactly the requested stable/canary targets at the
    requested weight (within its rounding). `weight`: the canary weight read back (percent), None
    when it could not be read. `detail`: in words, what was read back and from where, or why it
    cannot be confirmed (this becomes the held reason)."""

    confirmed: bool
    weight: float | None
    detail: str


@runtime_checkable
class TrafficRouter(Protocol):
    """One data plane. Implementations are cheap to build and keep no rollout state: everything
    they need is in the route, their options and the process settings."""

    name: str
    """The registry name, as in the policy (`builtin`, `envoy`, `gateway-api`, ...)."""

    supports_pin: bool
    """Whether `apply` installs the `PIN_HEADER` route."""

    async def apply(self, route: Route) -> None:
        """Write `route` whole into the data plane (idempotent: a replay after a crash writes the
        same thing). `route.canary is None` means all traffic to stable. Raise RouterError."""
        ...

    async def read(self, route: Route) -> Applied:
        """Whether `route` is in force, read back from the data plane itself (never from what
        this process wrote last). Raise RouterError only for a failure to read at all."""
        ...

    async def aclose(self) -> None:
        """Release clients and connections."""
        ...


class RouterContext:
    """What a router's `build` gets as `settings`: the process settings (attributes read through,
    e.g. `settings.envoy_admin_url`) plus the controller's bus connection as `.js` for routers
    whose data plane is on the bus (the built-in one)."""

    def __init__(self, settings: Any, js: Any = None) -> None:
        self.settings = settings
        self.js = js

    def __getattr__(self, name: str) -> Any:
        return getattr(self.settings, name)


class RouterFactory(Protocol):
    def __call__(self, options: Mapping[str, Any], settings: Any) -> TrafficRouter: ...
