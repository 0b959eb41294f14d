"""Follow the route KV bucket: current values first, then each change as it happens (no polling)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import nats
from nats.js import JetStreamContext
from nats.js.kv import KV_DEL, KV_PURGE

from services.contracts import subjects
from services.router.routes import Change, RouteTable
from services.runtime import aio

log = logging.getLogger("preflight.router.watch")


@dataclass
class RouteWatcher:
    """Feeds `table` from the bucket; `live` once the current values are in and while watching.

    nats-py's KV watch is an ordered consumer: after a reconnect it resumes from the last
    sequence it saw, so no change is missed. If the watch itself fails it is started again
    (current values first), after a short backoff.
    """

    js: JetStreamContext
    table: RouteTable
    bucket: str = subjects.ROUTES_BUCKET
    retry_initial_s: float = 0.2
    retry_max_s: float = 5.0
    live: bool = False
    problem: str | None = "route watch not started"
    on_live: Callable[[], None] | None = None  # called when the watch turns live

    def _went_live(self) -> None:
        self.live = True
        self.problem = None
        if self.on_live is not None:
            self.on_live()

    async def run(self) -> None:
        backoff = self.retry_initial_s
        while True:
            try:
                await self._watch_once()
            except asyncio.CancelledError:
                self.live = False
                raise
            except Exception as exc:
                self.live = False
                self.problem = f"route watch failed: {type(exc).__name__}: {exc}"
                log.warning("%s; retrying in %.1f s", self.problem, backoff)
            await aio.sleep(backoff)  # a cancellation nats-py swallowed stops us here
            backoff = min(backoff * 2, self.retry_max_s)

    async def _watch_once(self) -> None:
        try:
            kv = await self.js.key_value(self.bucket)
        except (nats.js.errors.NotFoundError, nats.js.errors.BucketNotFoundError):
            self.problem = f"KV bucket {self.bucket!r} does not exist yet"
            raise
        watcher = await kv.watchall()
        try:
            async for entry in watcher:
                if entry is None:  # the current values are all in
                    self._went_live()
                    log.info("route watch live: %d routes", len(self.table.routes))
                    continue
                deleted = entry.operation in (KV_DEL, KV_PURGE)
                update = self.table.apply(entry.key, entry.value, deleted=deleted)
                if update.change is Change.MALFORMED:
                    log.warning(
                        "route for %r at revision %s ignored, the previous one stays: %s",
                        entry.key,
                        entry.revision,
                        update.reason,
                    )
                else:
                    log.info("route %s %s (revision %s)", entry.key, update.change, entry.revision)
        finally:
            self.live = False
            try:
                await watcher.stop()  # type: ignore[no-untyped-call]
            except Exception:
                log.debug("stopping the KV watcher failed", exc_info=True)
        # The watcher only ends when stopped from elsewhere; start again.
        raise RuntimeError("route watch ended")
