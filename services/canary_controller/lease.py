"""Which controller replica is active: a lease in NATS KV, judged by each replica's own clock.

One key (`canary-controller`) in the `preflight_leases` bucket holds {holder, term, renewed_at}.

- No key: the first replica to `create` it is active (term 1).
- The active replica renews every `renew_s` with `update(..., last=revision)`. It acts only
  until `ttl_s - margin_s` after it SENT its last successful renewal (monotonic clock); past that
  it stops acting until a renewal succeeds again. A renewal that meets another revision means
  another replica took over: this one is deposed for good (the app then exits, so its
  supervisor starts it again as a standby; with chDB that also frees the data path).
- A standby reads the key every `poll_s`. When it has seen no new revision for `ttl_s` by ITS OWN
  monotonic clock, it takes over with `update(..., last=<the revision it saw>)`, term + 1. Only
  one replica's update of one revision can succeed. (A read, not a KV watch: a watch's ordered
  consumer has to be made again after a server restart, and an update it missed would look like
  a dead holder.)

Safety needs no synchronised wall clocks: the standby starts the TTL when it first SEES a
revision, which is after the holder sent it, so the holder has stopped acting `margin_s` before
a takeover can happen. `renewed_at` is for people reading the bucket, never compared.
A clean stop writes an empty holder, so the standby takes over at once instead of after the TTL.
After a bus outage the standby starts its TTL again (`bus_reconnected`): the holder gets a full
TTL to renew on the restored connection before anyone takes over.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import nats.errors
import nats.js.errors

from services.contracts.events import utc_now
from services.runtime.aio import bounded, wait_event

log = logging.getLogger("preflight.canary-controller")

LEASE_KEY = "canary-controller"
TTL_S = 5.0
RENEW_S = 1.5
POLL_S = 0.5
MARGIN_S = 1.0
# A request that does not answer in this long is treated as failed (the bus is down or slow).
REQUEST_TIMEOUT_S = 1.0

_BUS_ERRORS = (TimeoutError, OSError, nats.errors.Error)


class Role(StrEnum):
    """What this replica is doing about the lease."""

    STANDBY = "standby"
    """Watching the key; takes over when the holder stops renewing."""
    ACTIVE = "active"
    """Holds the lease (acting only while it is fresh: see `Lease.active`)."""
    DEPOSED = "deposed"
    """Another replica took over: never acts again (the process exits)."""


@dataclass(frozen=True)
class LeaseValue:
    """The KV value: who holds the lease, in which term, and (for people) when it was renewed."""

    holder: str
    term: int
    renewed_at: datetime

    def to_bytes(self) -> bytes:
        return json.dumps(
            {"holder": self.holder, "term": self.term, "renewed_at": self.renewed_at.isoformat()}
        ).encode()

    @classmethod
    def parse(cls, data: bytes | None) -> LeaseValue | None:
        try:
            raw = json.loads(data or b"")
            return cls(
                holder=str(raw["holder"]),
                term=int(raw["term"]),
                renewed_at=datetime.fromisoformat(str(raw["renewed_at"])),
            )
        except (ValueError, KeyError, TypeError):
            return None


class Lease:
    """This replica's side of the lease; `run` keeps it, `active` says whether to act now."""

    def __init__(
        self,
        kv: Any,
        holder: str,
        *,
        ttl_s: float = TTL_S,
        renew_s: float = RENEW_S,
        poll_s: float = POLL_S,
        margin_s: float = MARGIN_S,
        on_deposed: Callable[[], None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.kv = kv
        self.holder = holder
        self.ttl_s = ttl_s
        self.renew_s = renew_s
        self.poll_s = poll_s
        self.margin_s = margin_s
        self.on_deposed = on_deposed
        self.monotonic = monotonic
        self.clock = clock
        self.role = Role.STANDBY
        self.term = 0
        self.revision: int | None = None  # ours when active; the last seen when standby
        self.seen_holder = ""
        self._seen_at: float | None = None
        self._valid_until = 0.0
        self._stale_logged = False
        self._changed = asyncio.Event()
        self._released = False
        self._blind = False  # the last read failed: the bus (or our link to it) is down
        self.took_over_at: datetime | None = None

    # ---- what the app asks ------------------------------------------------------------------

    def active(self) -> bool:
        """Whether this replica may act now: it holds the lease and renewed it in time."""
        return self.role is Role.ACTIVE and self.monotonic() < self._valid_until

    async def wait_active(self, stop: asyncio.Event) -> bool:
        """Until this replica is active (True) or `stop` is set or it was deposed (False)."""
        while not stop.is_set() and self.role is not Role.DEPOSED:
            if self.active():
                return True
            self._changed.clear()
            await wait_event(self._changed, self.poll_s)
        return False

    def bus_reconnected(self) -> None:
        """A standby saw nothing while the bus was down: the holder gets a full TTL again."""
        if self.role is Role.STANDBY and self._seen_at is not None:
            self._seen_at = self.monotonic()

    def describe(self) -> dict[str, Any]:
        role = self.role.value
        if self.role is Role.ACTIVE and not self.active():
            role = "active-not-renewed"
        return {
            "role": role,
            "holder": self.holder if self.role is Role.ACTIVE else self.seen_holder or None,
            "term": self.term or None,
        }

    # ---- the loop ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Keep (or watch for) the lease until `stop` is set or this replica is deposed."""
        while not stop.is_set() and self.role is not Role.DEPOSED and not self._released:
            try:
                if self.role is Role.ACTIVE:
                    await self.renew()
                else:
                    await self.observe()
            except Exception:
                log.exception("lease: unexpected error; retrying")
            wait = self.renew_s if self.role is Role.ACTIVE else self.poll_s
            await wait_event(stop, wait)

    async def observe(self) -> None:
        """Standby: read the key; take over when it is absent, released, or not renewed."""
        try:
            entry = await bounded(self.kv.get(LEASE_KEY), REQUEST_TIMEOUT_S)
        except nats.js.errors.KeyNotFoundError:  # never created, or deleted by hand
            entry = None
        except _BUS_ERRORS:
            self._blind = True  # saw nothing: the TTL keeps running from the last revision seen
            return
        now = self.monotonic()
        if self._blind:
            # The first read after an outage, perhaps before the reconnect callback: whatever
            # the key says, the holder gets a whole TTL on the restored bus to renew it.
            self._blind = False
            self.bus_reconnected()
        if entry is None or entry.revision is None:
            await self._create()
            return
        value = LeaseValue.parse(entry.value)
        if entry.revision != self.revision or self._seen_at is None:
            self.revision = entry.revision
            self._seen_at = now
            self.seen_holder = value.holder if value else ""
            self.term = value.term if value else self.term
        released = value is not None and not value.holder
        if released or now - self._seen_at >= self.ttl_s:
            why = "released" if released else f"not renewed for {now - self._seen_at:.1f} s"
            await self._take_over(entry.revision, (value.term if value else self.term) + 1, why)

    async def _create(self) -> None:
        sent = self.monotonic()
        value = LeaseValue(self.holder, self.term + 1, self.clock())
        try:
            revision = await bounded(self.kv.create(LEASE_KEY, value.to_bytes()), REQUEST_TIMEOUT_S)
        except nats.js.errors.KeyWrongLastSequenceError:
            return  # another replica created it first: watch that one
        except _BUS_ERRORS:
            return
        self._became_active(value.term, revision, sent, "no lease existed", logging.INFO)

    async def _take_over(self, last: int, term: int, why: str) -> None:
        sent = self.monotonic()
        value = LeaseValue(self.holder, term, self.clock())
        try:
            revision = await bounded(
                self.kv.update(LEASE_KEY, value.to_bytes(), last=last), REQUEST_TIMEOUT_S
            )
        except nats.js.errors.KeyWrongLastSequenceError:
            return  # renewed, or taken by another standby, meanwhile: the next read shows it
        except _BUS_ERRORS:
            return
        previous = self.seen_holder or "nobody"
        self._became_active(term, revision, sent, f"lease of {previous} {why}")

    def _became_active(
        self, term: int, revision: int, sent: float, why: str, level: int = logging.WARNING
    ) -> None:
        self.role = Role.ACTIVE
        self.term = term
        self.revision = revision
        self._valid_until = sent + self.ttl_s - self.margin_s
        self.took_over_at = self.clock()
        self._changed.set()
        log.log(
            level, "lease: %s is now the active controller (term %d): %s", self.holder, term, why
        )

    async def renew(self) -> None:
        """Active: extend the lease; deposed at once if the key moved on without us."""
        sent = self.monotonic()
        value = LeaseValue(self.holder, self.term, self.clock())
        try:
            revision = await bounded(
                self.kv.update(LEASE_KEY, value.to_bytes(), last=self.revision),
                REQUEST_TIMEOUT_S,
            )
        except nats.js.errors.KeyWrongLastSequenceError:
            await self._check_conflict()
            return
        except _BUS_ERRORS as exc:
            if not self.active() and not self._stale_logged:
                self._stale_logged = True
                log.warning(
                    "lease: not renewed within %.0f s (%s): not acting until it is",
                    self.ttl_s - self.margin_s,
                    type(exc).__name__,
                )
            return
        self.revision = revision
        self._valid_until = sent + self.ttl_s - self.margin_s
        if self._stale_logged:
            self._stale_logged = False
            log.warning("lease: renewed again (term %d): acting again", self.term)

    async def _check_conflict(self) -> None:
        """The key is not at our revision: our own renewal whose answer was lost, or a takeover."""
        try:
            entry = await bounded(self.kv.get(LEASE_KEY), REQUEST_TIMEOUT_S)
        except nats.js.errors.KeyNotFoundError:
            entry = None
        except _BUS_ERRORS:
            return  # try again at the next renewal; not acting meanwhile if it runs out
        value = LeaseValue.parse(entry.value) if entry is not None else None
        if value is not None and value.holder == self.holder and value.term == self.term:
            self.revision = entry.revision  # ours: the next renewal extends it
            return
        self.depose(value.holder if value else "nobody (the key is gone)")

    def depose(self, by: str) -> None:
        if self.role is Role.DEPOSED:
            return
        self.role = Role.DEPOSED
        self._valid_until = 0.0
        self._changed.set()
        log.error("lease: %s took over from %s: this replica stops acting", by, self.holder)
        if self.on_deposed is not None:
            self.on_deposed()

    async def release(self) -> None:
        """On a clean stop, once nothing acts any more: hand the lease over at once (an empty
        holder) instead of after the TTL."""
        self._released = True  # and `run` never takes it back
        if self.role is not Role.ACTIVE:
            return
        self.role = Role.STANDBY
        self._valid_until = 0.0
        value = LeaseValue("", self.term, self.clock())
        try:
            await bounded(
                self.kv.update(LEASE_KEY, value.to_bytes(), last=self.revision),
                REQUEST_TIMEOUT_S,
            )
            log.info("lease released (term %d)", self.term)
        except (nats.js.errors.KeyWrongLastSequenceError, *_BUS_ERRORS):
            log.info("lease not released (the standby takes over after the TTL)")
