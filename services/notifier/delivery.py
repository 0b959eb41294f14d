"""One event to every channel it is meant for, each at most once in practice.

Per channel, a notice is looked up in the ledger, sent, then recorded. A redelivered event finds
its record and is not sent again. What is left is the crash window: a process that dies after the
channel accepted a notice and before the record is written sends it once more when the stream
redelivers the event (at-least-once, never lost). Webhook receivers can drop that duplicate by
its `X-Preflight-Notice-Id`.

A rollout's progress is one message per updatable channel: the first step posts it, later steps
and the outcome edit it (`rank` keeps a late, stale event from rolling the message back).

The events of one fetch are handled concurrently, so the notices of one deployment are delivered
one at a time (a lock per deployment in this process); between processes, the progress record
is written back only if nobody wrote it since it was read (compare-and-set on its revision).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from services.contracts.events import CanaryStepStarted, DeploymentHeld, Requester
from services.notifier import messages
from services.notifier.channels.base import Channel, DeliveryError, Notice, Receipt
from services.notifier.dedup import NoticeLedger, progress_key, sent_key
from services.notifier.messages import FINAL_RANK, NoticeEvent, ProgressRank

log = logging.getLogger("preflight.notifier")

# Compare-and-set rounds on the progress record before giving up (another instance keeps writing).
PROGRESS_WRITE_ROUNDS: Final = 5


def make_notice(event: NoticeEvent, requested_by: Requester | None = None) -> Notice:
    """Render an event once for every kind of channel (pure)."""
    step = event.step_index if isinstance(event, CanaryStepStarted | DeploymentHeld) else None
    return Notice(
        event=event,
        kind=messages.kind_of(event),
        step=step,
        occurrence=messages.occurrence_of(event),
        message=messages.render(event, requested_by=requested_by),
        progress=messages.render_progress(event, requested_by=requested_by),
        console=messages.render_console(event, requested_by=requested_by),
        body=event.model_dump_json().encode(),
    )


@dataclass
class DeliveryReport:
    """What happened to one notice on each channel."""

    sent: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[DeliveryError] = field(default_factory=list)


class KeyedLocks:
    """An `asyncio.Lock` per key, kept only while a task holds or waits for it: the dict never
    holds more than the events in flight."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    def __len__(self) -> int:
        return len(self._locks)

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


def stored_rank(record: dict[str, Any]) -> ProgressRank:
    """The rank of a progress record; records written before ranks had a time (a bare number:
    the step index, +0.5 when held) count as the start of their step."""
    raw = record.get("rank")
    if isinstance(raw, list) and len(raw) == 2:
        return (float(raw[0]), str(raw[1]))
    if isinstance(raw, int | float) and math.isfinite(raw):
        return (float(raw) if raw >= FINAL_RANK else float(math.floor(raw)), "")
    return (-1.0, "")


class Deliverer:
    """Sends notices through channels with the ledger's dedup and progress records."""

    def __init__(self, ledger: NoticeLedger, clock: Callable[[], datetime]) -> None:
        self.ledger = ledger
        self.clock = clock
        self.locks = KeyedLocks()

    async def deliver(
        self,
        notice: Notice,
        channels: Sequence[Channel],
        *,
        post: bool = True,
        progress: bool = True,
    ) -> DeliveryReport:
        """`post`: send the notice itself (policy `notify.on` has its kind); `progress`: keep
        the rollout's progress message current (policy has `progress`)."""
        report = DeliveryReport()
        async with self.locks.hold(notice.event.deployment_id):
            for channel in channels:
                try:
                    await self._deliver_one(channel, notice, report, post=post, progress=progress)
                except DeliveryError as exc:
                    log.warning("notice %s not delivered: %s", notice.notice_id, exc)
                    report.failed.append(exc)
                except Exception as exc:  # the ledger (KV) failed: this channel only, retry later
                    log.warning(
                        "notice %s on %s: the ledger failed",
                        notice.notice_id,
                        channel.key,
                        exc_info=True,
                    )
                    reason = f"notice ledger: {type(exc).__name__}: {exc}"
                    report.failed.append(DeliveryError(channel.key, reason, permanent=False))
        return report

    async def _deliver_one(
        self,
        channel: Channel,
        notice: Notice,
        report: DeliveryReport,
        *,
        post: bool,
        progress: bool,
    ) -> None:
        if notice.kind == "progress":
            if not progress:
                return
            if channel.updatable:
                await self._progress(channel, notice, create=True)
                report.sent.append(channel.key)
            elif await self._once(channel, notice, progress=True):
                report.sent.append(channel.key)
            else:
                report.skipped.append(channel.key)
            return
        # The notice itself first: it is what tells people (an edit notifies nobody).
        if post:
            if await self._once(channel, notice, progress=False):
                report.sent.append(channel.key)
            else:
                report.skipped.append(channel.key)
        if progress and channel.updatable:
            try:
                await self._progress(channel, notice, create=False)
            except DeliveryError as exc:
                if exc.permanent:
                    # Asking again cannot help, and the notice itself went out.
                    log.warning("progress of %s not updated: %s", notice.notice_id, exc)
                    return
                # Transient: the redelivery skips the notice (its record is in the ledger) and
                # tries the edit again, so the message does not say "live" forever.
                raise

    async def mark_dead_lettered(self, notice: Notice, failure: DeliveryError) -> None:
        """A notice that can never go out on a channel is not tried again on redelivery."""
        key = sent_key(
            notice.event.deployment_id, notice.kind, notice.step, failure.channel, notice.occurrence
        )
        await self.ledger.put(
            key, {"status": "dead_lettered", "reason": failure.reason, "at": self._now()}
        )

    def _now(self) -> str:
        return self.clock().isoformat()

    async def _once(self, channel: Channel, notice: Notice, *, progress: bool) -> bool:
        event = notice.event
        key = sent_key(
            event.deployment_id, notice.kind, notice.step, channel.key, notice.occurrence
        )
        if (record := await self.ledger.get(key)) is not None:
            log.info(
                "notice %s already %s on %s: not sent again",
                notice.notice_id,
                record.get("status", "sent"),
                channel.key,
            )
            return False
        receipt = await channel.post(notice, progress=progress)
        record = {"status": "sent", "at": self._now(), "channel": receipt.channel, "ts": receipt.ts}
        try:
            if not await self.ledger.create(key, record):
                log.warning(
                    "notice %s was sent twice on %s (a concurrent delivery)", key, channel.key
                )
        except Exception:
            # Sent, not recorded: a redelivery may send it again (the crash window); the other
            # channels must still get it.
            log.warning("notice %s sent on %s but not recorded", key, channel.key, exc_info=True)
        return True

    async def _progress(self, channel: Channel, notice: Notice, *, create: bool) -> None:
        rank = messages.progress_rank(notice.event)
        if rank is None:
            return  # e.g. degraded: the rollout goes on, its message is not this event's to edit
        key = progress_key(notice.event.deployment_id, channel.key)
        for _ in range(PROGRESS_WRITE_ROUNDS):
            found = await self.ledger.read(key)
            if found is None:
                if create:
                    receipt = await channel.post(notice, progress=True)
                    if not await self._write_quietly(key, self._progress_record(receipt, rank)):
                        log.warning(
                            "two progress messages for %s on %s", notice.notice_id, channel.key
                        )
                    return
                if rank[0] < FINAL_RANK:
                    return  # no rollout message to edit yet (held before any step was posted)
                # Finished before any progress message: remember it, so a step handled after the
                # outcome (a backlog, a slow instance) posts no message that looks live forever.
                if await self.ledger.create(key, self._progress_record(Receipt(), rank)):
                    return
                continue  # a step created it meanwhile: edit that message
            record, revision = found
            if stored_rank(record) > rank:
                log.info(
                    "progress of %s is already past %s: not rolled back", key, notice.notice_id
                )
                return
            if not record.get("ts"):
                return  # the rollout finished without a progress message: nothing to edit
            current = Receipt(channel=str(record.get("channel", "")), ts=str(record.get("ts", "")))
            receipt = await channel.update(current, notice)
            try:
                if await self.ledger.update(key, self._progress_record(receipt, rank), revision):
                    return
            except Exception:
                log.warning("progress of %s edited but not recorded", key, exc_info=True)
                return
            log.info("progress of %s was written meanwhile: reading it again", key)
        log.warning(
            "progress of %s: gave up after %d conflicting writes", key, PROGRESS_WRITE_ROUNDS
        )

    async def _write_quietly(self, key: str, record: dict[str, Any]) -> bool:
        """Create-if-absent after a post; a failing ledger is logged, not raised (it was sent)."""
        try:
            return await self.ledger.create(key, record)
        except Exception:
            log.warning("progress message %s posted but not recorded", key, exc_info=True)
            return True

    def _progress_record(self, receipt: Receipt, rank: ProgressRank) -> dict[str, Any]:
        return {
            "channel": receipt.channel,
            "ts": receipt.ts,
            "rank": list(rank),
            "at": self._now(),
        }
