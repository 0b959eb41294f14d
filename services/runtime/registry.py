"""The services `preflight service run NAME` knows, and how to build each."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final

from services.contracts import subjects

if TYPE_CHECKING:  # the CLI reads SERVICES on every start; FastStream loads only with a service
    from services.runtime.service import ServiceApp
    from services.runtime.settings import Settings

SERVICES: Final[dict[str, str]] = {
    "validator": "services.validator.app",
    "benchmarker": "services.benchmarker.app",
    "canary-controller": "services.canary_controller.app",
    "notifier": "services.notifier.app",
    "router": "services.router.app",
    "metrics-ingest": "services.metrics.app",
    "envoy-receiver": "services.envoy.app",
}
"""Bus services have `build(settings) -> ServiceApp`; HTTP ones (the router) `serve(settings)`."""

DATA_PLANE_SERVICES: Final[dict[str, str]] = {"builtin": "router", "envoy": "envoy-receiver"}
"""The embedded stack runs the one of these its `data_plane` names (Envoy itself is a child of
the supervisor, beside nats-server)."""

# In the embedded stack chDB allows one process per data path: the controller runs the ingest.
EMBEDDED_IN_CONTROLLER: Final = frozenset({"metrics-ingest"})


class ServiceNotBuilt(RuntimeError):
    """The service exists in the design but its issue has not landed."""


def build(name: str, settings: Settings) -> ServiceApp:
    if name not in SERVICES:
        raise KeyError(f"unknown service {name!r}; known: {', '.join(SERVICES)}")
    module = importlib.import_module(SERVICES[name])
    not_built = getattr(module, "NOT_BUILT", None)
    if not_built:
        raise ServiceNotBuilt(not_built)
    if not hasattr(module, "build"):
        raise TypeError(f"{name} is an HTTP service: run it with `serve`, not `build`")
    service: ServiceApp = module.build(settings)
    return service


def server_of(name: str) -> Callable[[Settings], Coroutine[Any, Any, None]] | None:
    """The `serve(settings)` coroutine of an HTTP service, or None for a bus service."""
    module = importlib.import_module(SERVICES[name])
    if hasattr(module, "build"):
        return None
    serve: Callable[[Settings], Coroutine[Any, Any, None]] = module.serve
    return serve


def is_built(name: str) -> bool:
    return getattr(importlib.import_module(SERVICES[name]), "NOT_BUILT", None) is None


def not_built_reason(name: str) -> str:
    reason: str = getattr(importlib.import_module(SERVICES[name]), "NOT_BUILT", "")
    return reason


_CONSUMERS: Final[dict[str, str]] = {
    "validator": subjects.VALIDATOR_DURABLE,
    "benchmarker": subjects.BENCHMARKER_DURABLE,
    "canary-controller": subjects.CONTROLLER_DURABLE,
    "notifier": subjects.NOTIFIER_DURABLE,
    "metrics-ingest": subjects.INGEST_DURABLE,
}


def consumer_of(name: str) -> str | None:
    """The durable consumer whose pull requests show that a service is taking work."""
    return _CONSUMERS.get(name)
