"""Follow the route KV bucket: current values first, then each change as it happens (no polling)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import nats
from nats.js import JetStreamContext
from nats.js.kv import KV_DEL, KV_PURGE

from services.contracts import subjects
from services.router.routes import Change, RouteTable
from services.runtime import aio, bus

log = logging.getLogger("preflight.router.watch")


class WatchBehind(RuntimeError):
    """The bucket holds changes the watch never delivered; the message says which."""


@dataclass
class RouteWatcher:
    """Feeds `table` from the bucket; `live` once the current values are in and while watching.

    nats-py's KV watch is an ordered consumer: after a reconnect it resumes from the last
    sequence it saw, so no change is missed. If the watch itself fails it is started again
    (current values first), after a short backoff.

    The watch is also checked against the bucket every `check_s`: review 13 froze it from
    outside (consumer deliveries aimed at its inbox, whose name the monitoring port lists, made
    the ordered consumer resume at another stream's sequence, so an abort to weight 0 never
    arrived). When the routes stream holds a revision the watch has not delivered a second
    later, every route is read back (no consumer), the missed ones applied, and the watch
    started again.
    """

    js: JetStreamContext
    table: RouteTable
    bucket: str = subjects.ROUTES_BUCKET
    retry_initial_s: float = 0.2
    retry_max_s: float = 5.0
    check_s: float = 2.0
    catch_up_s: float = 1.0
    live: bool = False
    problem: str | None = "route watch not started"
    on_live: Callable[[], None] | None = None  # called when the watch turns live
    seen: int = 0
    """The highest revision the current watch delivered."""
    revisions: dict[str, int] = field(default_factory=dict)
    restarts: int = 0
    """Watches started again because the check found them behind."""
    _last_behind_log: float = float("-inf")

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
            except WatchBehind as exc:
                # The table was just read back whole: it is current, so the router stays live
                # while a new watch starts at once (review 15 re-froze the watch 250 times a
                # minute to make /healthz flap).
                self.restarts += 1
                if time.monotonic() - self._last_behind_log >= 60.0:
                    self._last_behind_log = time.monotonic()
                    log.warning("%s (%d restarts so far)", exc, self.restarts)
                self.live, self.problem = True, None
                backoff = self.retry_initial_s
                continue
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
        self.seen, self.revisions = 0, {}
        follow = asyncio.create_task(self._follow(watcher), name="router-route-follow")
        check = asyncio.create_task(self._check_loop(), name="router-route-check")
        try:
            done, _ = await asyncio.wait({follow, check}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises what ended it
        finally:
            for task in (follow, check):
                task.cancel()
            await asyncio.gather(follow, check, return_exceptions=True)
            try:
                await watcher.stop()  # type: ignore[no-untyped-call]
            except Exception:
                log.debug("stopping the KV watcher failed", exc_info=True)
        # The watcher only ends when stopped from elsewhere; start again.
        self.live = False
        raise RuntimeError("route watch ended")

    async def _follow(self, watcher: Any) -> None:
        async for entry in watcher:
            if entry is None:  # the current values are all in
                self._went_live()
                log.info("route watch live: %d routes", len(self.table.routes))
                continue
            self._apply(entry.key, entry.value, entry.revision, entry.operation)

    def _apply(self, key: str, value: bytes | None, revision: int, operation: Any) -> None:
        self.seen = max(self.seen, revision)
        self.revisions[key] = max(self.revisions.get(key, 0), revision)
        deleted = operation in (KV_DEL, KV_PURGE)
        update = self.table.apply(key, value, deleted=deleted)
        if update.change is Change.MALFORMED:
            log.warning(
                "route for %r at revision %s ignored, the previous one stays: %s",
                key,
                revision,
                update.reason,
            )
        else:
            log.info("route %s %s (revision %s)", key, update.change, revision)

    async def _check_loop(self) -> None:
        while True:
            await aio.sleep(self.check_s)
            if not self.live:
                continue
            try:
                await self.check()
            except WatchBehind:
                raise
            except Exception as exc:  # a read that failed says nothing of the watch
                log.warning("route watch check could not read the bucket: %s", exc)

    async def check(self) -> None:
        """Raise WatchBehind, after applying what the watch missed, when the routes stream
        holds a revision the watch has not delivered within `catch_up_s`."""
        nc = self.js._nc
        info = await bus.stream_info(nc, f"KV_{self.bucket}")
        last = int((info.get("state") or {}).get("last_seq", 0) or 0)
        if last == self.seen:
            return
        if last > self.seen:  # a change may be on its way: give the watch its second
            await aio.sleep(self.catch_up_s)
            if self.seen >= last:
                return
        delivered = self.seen
        missed = []
        keys = await bus.kv_keys(self.js, self.bucket)
        for key in keys:
            found = await bus.kv_last(nc, self.bucket, key)
            if found is not None and found[0] != self.revisions.get(key):
                revision, value, deleted = found
                self._apply(key, value, revision, KV_DEL if deleted else None)
                missed.append(f"{key} at revision {revision}")
        for key in set(self.table.routes) - set(keys):
            self.table.apply(key, None, deleted=True)
            missed.append(f"{key} removed")
        if not missed:  # the stream's last message is gone (purged, expired): nothing missed
            self.seen = last
            return
        raise WatchBehind(
            f"the routes stream is at revision {last} but the watch delivered up to "
            f"{delivered}: it missed changes (frozen from outside, or the stream was "
            f"replaced); read back and applied: {', '.join(missed)}"
        )
