"""Bus outages as this controller saw them: when its NATS connection was down, by its own clock."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

from services.contracts.events import utc_now

log = logging.getLogger("preflight.canary-controller")

Span = tuple[datetime, datetime]


class BusOutages:
    """Intervals when the connection was down, kept for `keep` (longer than any step or hold).

    Durations come from the monotonic clock, so a wall-clock jump during an outage does not
    stretch or shrink it; the wall clock only places the interval (`end` = now at reconnect).
    """

    def __init__(
        self,
        *,
        clock: Callable[[], datetime] = utc_now,
        monotonic: Callable[[], float] = time.monotonic,
        keep: timedelta = timedelta(hours=6),
        max_kept: int = 200,
    ) -> None:
        self.clock = clock
        self.monotonic = monotonic
        self.keep = keep
        self.max_kept = max_kept
        self._down_since: float | None = None
        self._ended: list[Span] = []

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def disconnected(self) -> None:
        if self._down_since is None:
            self._down_since = self.monotonic()

    def reconnected(self) -> Span | None:
        """Close the current outage; returns it (None if the connection was not down)."""
        if self._down_since is None:
            return None
        seconds = max(0.0, self.monotonic() - self._down_since)
        self._down_since = None
        end = self.clock()
        span = (end - timedelta(seconds=seconds), end)
        self._ended.append(span)
        cutoff = end - self.keep
        self._ended = [s for s in self._ended if s[1] >= cutoff][-self.max_kept :]
        return span

    def known(self, now: datetime | None = None) -> list[Span]:
        """Every kept outage; one still going on counts up to `now`."""
        spans = list(self._ended)
        if self._down_since is not None:
            at = now or self.clock()
            spans.append((at - timedelta(seconds=self.monotonic() - self._down_since), at))
        return spans


def watch_connection(
    nc: Any,
    outages: BusOutages,
    *,
    on_reconnected: Callable[[], None] | None = None,
) -> None:
    """Record the outages of a nats-py connection made without callbacks of ours.

    nats-py reads `_disconnected_cb` and `_reconnected_cb` when it calls them, so setting them
    after `connect` works; any callbacks already there still run. (The day `bus.connect` takes
    callbacks, pass them there instead.)
    """
    before_down: Callable[[], Awaitable[None]] | None = getattr(nc, "_disconnected_cb", None)
    before_up: Callable[[], Awaitable[None]] | None = getattr(nc, "_reconnected_cb", None)

    async def disconnected() -> None:
        if nc.is_closed:  # our own close at shutdown, not an outage
            if before_down is not None:
                await before_down()
            return
        if not outages.down:
            log.warning("NATS connection lost: the outage will not count against any step")
        outages.disconnected()
        if before_down is not None:
            await before_down()

    async def reconnected() -> None:
        span = outages.reconnected()
        if span is not None:
            log.warning(
                "NATS connection back after %.1f s: steps and holds are extended by it",
                (span[1] - span[0]).total_seconds(),
            )
        if on_reconnected is not None:
            on_reconnected()
        if before_up is not None:
            await before_up()

    nc._disconnected_cb = disconnected
    nc._reconnected_cb = reconnected
