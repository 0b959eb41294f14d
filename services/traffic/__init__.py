"""Traffic routers: how the canary weight reaches the data plane (services/traffic/base.py)."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Final

from services.traffic.base import (
    PIN_HEADER,
    Applied,
    RouterConfigError,
    RouterError,
    TrafficRouter,
)

ROUTERS: Final[dict[str, str]] = {
    "builtin": "services.traffic.builtin",
    "envoy": "services.traffic.envoy",
    "gateway-api": "services.traffic.gateway_api",
    "istio": "services.traffic.istio",
    "kserve": "services.traffic.kserve",
}
"""Name in the policy -> module with `build(options, settings) -> TrafficRouter`."""


def build(name: str, options: Mapping[str, Any], settings: Any) -> TrafficRouter:
    """The router called `name`, configured by `options` (the policy's `canary.traffic.options`)
    and the process settings. Unknown names and bad options are RouterConfigError."""
    if name not in ROUTERS:
        raise RouterConfigError(f"unknown traffic router {name!r}; known: {', '.join(ROUTERS)}")
    module = importlib.import_module(ROUTERS[name])
    router: TrafficRouter = module.build(options, settings)
    return router


class RouterCache:
    """One router per (name, options) for the life of a controller: `cache(policy.traffic)`.
    Bad options raise RouterConfigError every time they are asked for (never cached)."""

    def __init__(self, context: Any) -> None:
        self.context = context
        self._routers: dict[str, TrafficRouter] = {}

    def __call__(self, traffic: Any) -> TrafficRouter:
        import json

        key = json.dumps([traffic.router, traffic.options], sort_keys=True, default=str)
        router = self._routers.get(key)
        if router is None:
            router = build(traffic.router, traffic.options, self.context)
            self._routers[key] = router
        return router

    async def aclose(self) -> None:
        for router in self._routers.values():
            await router.aclose()
        self._routers.clear()


__all__ = [
    "PIN_HEADER",
    "ROUTERS",
    "Applied",
    "RouterCache",
    "RouterConfigError",
    "RouterError",
    "TrafficRouter",
    "build",
]
