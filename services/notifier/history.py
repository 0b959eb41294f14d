"""The deployment's own request, read back from the events stream (its `notify` and policy)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from nats.js import JetStreamContext

from services.contracts import subjects
from services.contracts.events import DeploymentRequested
from services.runtime import bus


class RequestFinder(Protocol):
    async def find(self, deployment_id: str) -> DeploymentRequested | None: ...


class StreamRequests:
    """Finds `DeploymentRequested` by deployment id in PREFLIGHT_EVENTS; remembers the last few.

    None when the stream no longer holds it (aged out) or never did (published elsewhere): the
    policy's and the settings' channels apply then.
    """

    def __init__(self, jetstream: Callable[[], JetStreamContext], size: int = 1024) -> None:
        self.jetstream = jetstream
        self.size = size
        self.cache: OrderedDict[str, DeploymentRequested | None] = OrderedDict()

    async def find(self, deployment_id: str) -> DeploymentRequested | None:
        if deployment_id in self.cache:
            self.cache.move_to_end(deployment_id)
            return self.cache[deployment_id]
        events = await bus.read_history(self.jetstream(), subjects.request_of(deployment_id))
        found = next((e for e in events if isinstance(e, DeploymentRequested)), None)
        self.cache[deployment_id] = found
        while len(self.cache) > self.size:
            self.cache.popitem(last=False)
        return found


class NoRequests:
    """For in-memory tests: no request is ever found."""

    async def find(self, deployment_id: str) -> DeploymentRequested | None:
        return None
