"""One event to every channel it is meant for, each once.

Per channel, a notice is looked up in the ledger; if absent, the intent to post is recorded
(`status: posting`), the notice is sent, then recorded as sent. A redelivered event that finds
"sent" sends nothing. One that finds "posting" cannot know whether the delivery that wrote it
died before or after the channel took the notice, so it asks the channel (`Channel.find`: Slack
messages carry the ledger key in their metadata) and sends only if the notice is not there. A
channel that cannot be asked (webhooks, the console) is sent the notice again: at-least-once,
never lost; webhook receivers drop the repeat by its `X-Preflight-Notice-Id`.

A rollout's progress is one message per updatable channel: the first step posts it, later steps
and the outcome edit it (`rank` keeps a late, stale event from rolling the message back). Its
record, too, is an intent before the post: whichever event of the rollout finds the intent looks
the message up by its key before anyone posts another.

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
from datetime import datetime, timedelta
from typing import Any, Final

from services.contracts.events import CanaryStepStarted, DeploymentHeld, Requester
from services.notifier import messages
from services.notifier.channels.base import CannotTell, Channel, DeliveryError, Notice, Receipt
from services.notifier.dedup import NoticeLedger, progress_key, sent_key
from services.notifier.messages import FINAL_RANK, NoticeEvent, ProgressRank

log = logging.getLogger("preflight.notifier")

# Compare-and-set rounds on the progress record before giving up (another instance keeps writing).
PROGRESS_WRITE_ROUNDS: Final = 5
# A ledger record's status while its notice is being sent (written before the channel is called).
POSTING: Final = "posting"
# A channel is searched from this long before the intent was written: clocks differ.
LOOKUP_MARGIN: Final = timedelta(minutes=5)
# Another event of the rollout takes over a progress intent this old: its delivery is gone for
# good (a redelivery would have come within ack_wait).
PENDING_STALE: Final = timedelta(minutes=10)


def make_notice(
    event: NoticeEvent, requested_by: Requester | None = None, rollout_url: str | None = None
) -> Notice:
    """Render an event once for every kind of channel (pure)."""
    step = event.step_index if isinstance(event, CanaryStepStarted | DeploymentHeld) else None
    return Notice(
        event=event,
        kind=messages.kind_of(event),
        step=step,
        occurrence=messages.occurrence_of(event),
        message=messages.render(event, requested_by=requested_by, rollout_url=rollout_url),
        progress=messages.render_progress(
            event, requested_by=requested_by, rollout_url=rollout_url
        ),
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

    def __init__(
        self,
        ledger: NoticeLedger,
        clock: Callable[[], datetime],
        *,
        stale_after: timedelta = PENDING_STALE,
    ) -> None:
        self.ledger = ledger
        self.clock = clock
        self.stale_after = stale_after
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
        record = await self.ledger.get(key)
        if record is not None and record.get("status") != POSTING:
            log.info(
                "notice %s already %s on %s: not sent again",
                notice.notice_id,
                record.get("status", "sent"),
                channel.key,
            )
            return False
        if record is None:
            if not await self.ledger.create(key, self._intent(notice)):
                log.info("notice %s is being sent on %s by another delivery", key, channel.key)
                return False
        elif (found := await self._lookup(channel, key, record)) is not None:
            log.info(
                "notice %s was posted on %s by a delivery that stopped before recording it: "
                "not sent again",
                notice.notice_id,
                channel.key,
            )
            await self._record_sent(key, found)
            return False
        receipt = await channel.post(notice, progress=progress, key=key)
        await self._record_sent(key, receipt)
        return True

    def _intent(self, notice: Notice, **extra: Any) -> dict[str, Any]:
        return {"status": POSTING, "notice": notice.notice_id, "at": self._now(), **extra}

    async def _record_sent(self, key: str, receipt: Receipt) -> None:
        record = {"status": "sent", "at": self._now(), "channel": receipt.channel, "ts": receipt.ts}
        try:
            await self.ledger.put(key, record)
        except Exception:
            # Sent, not recorded: the intent stays, so a redelivery looks for the message before
            # sending it again; the other channels must still get it.
            log.warning("notice %s sent but not recorded", key, exc_info=True)

    async def _lookup(self, channel: Channel, key: str, intent: dict[str, Any]) -> Receipt | None:
        """The message that the delivery which wrote `intent` posted, if the channel has it.
        None: not there, or the channel cannot tell (the notice is then sent again)."""
        try:
            return await channel.find(key, since=self._since(intent))
        except CannotTell as exc:
            log.warning("notice %s may be sent twice on %s: %s", key, channel.key, exc)
            return None

    def _since(self, intent: dict[str, Any]) -> datetime:
        try:
            began = datetime.fromisoformat(str(intent.get("at")))
        except ValueError:
            began = self.clock() - self.stale_after
        return began - LOOKUP_MARGIN

    def _stale(self, intent: dict[str, Any]) -> bool:
        """The delivery that wrote this progress intent will not finish it."""
        if intent.get("abandoned"):
            return True
        try:
            began = datetime.fromisoformat(str(intent.get("at")))
        except ValueError:
            return True
        return self.clock() - began > self.stale_after

    async def _progress(self, channel: Channel, notice: Notice, *, create: bool) -> None:
        rank = messages.progress_rank(notice.event)
        if rank is None:
            return  # e.g. degraded: the rollout goes on, its message is not this event's to edit
        key = progress_key(notice.event.deployment_id, channel.key)
        for _ in range(PROGRESS_WRITE_ROUNDS):
            found = await self.ledger.read(key)
            if found is None:
                if create:
                    if await self.ledger.create(key, self._intent(notice, rank=list(rank))):
                        await self._post_progress(channel, notice, key, rank)
                        return
                    continue  # another delivery began the message meanwhile: read it again
                if rank[0] < FINAL_RANK:
                    return  # no rollout message to edit yet (held before any step was posted)
                # Finished before any progress message: remember it, so a step handled after the
                # outcome (a backlog, a slow instance) posts no message that looks live forever.
                if await self.ledger.create(key, self._progress_record(Receipt(), rank)):
                    return
                continue  # a step created it meanwhile: edit that message
            record, revision = found
            if record.get("status") == POSTING:
                done = await self._settle_progress(
                    channel, notice, key, rank, record, revision, create=create
                )
                if done:
                    return
                continue
            if stored_rank(record) > rank:
                log.info(
                    "progress of %s is already past %s: not rolled back", key, notice.notice_id
                )
                return
            if not record.get("ts"):
                return  # the rollout finished without a progress message: nothing to edit
            current = Receipt(channel=str(record.get("channel", "")), ts=str(record.get("ts", "")))
            receipt = await channel.update(current, notice, key=key)
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

    async def _post_progress(
        self, channel: Channel, notice: Notice, key: str, rank: ProgressRank
    ) -> None:
        """Post the progress message under the intent this delivery holds, then record it."""
        try:
            receipt = await channel.post(notice, progress=True, key=key)
        except DeliveryError:
            # Say so, so the rollout's next step need not wait for the intent to go stale (a
            # failed step is dead-lettered, not redelivered). The next one still looks for the
            # message first: a post that timed out may have been taken.
            await self._mark_abandoned(key, notice)
            raise
        record = self._progress_record(receipt, rank)
        try:
            for _ in range(PROGRESS_WRITE_ROUNDS):
                found = await self.ledger.read(key)
                if found is None or found[0].get("status") != POSTING:
                    # Another delivery found the message by its key and recorded it meanwhile.
                    log.info("progress message %s was recorded by another delivery", key)
                    return
                if found[0].get("notice") != notice.notice_id:
                    log.warning("two progress messages for %s: another delivery took over", key)
                    return
                if await self.ledger.update(key, record, found[1]):
                    return
            log.warning("progress message %s posted; its record kept changing", key)
        except Exception:
            # Posted, not recorded: the intent stays, and the rollout's next event looks the
            # message up by its key instead of posting another.
            log.warning("progress message %s posted but not recorded", key, exc_info=True)

    async def _mark_abandoned(self, key: str, notice: Notice) -> None:
        try:
            found = await self.ledger.read(key)
            if found is not None and found[0].get("notice") == notice.notice_id:
                await self.ledger.update(key, {**found[0], "abandoned": True}, found[1])
        except Exception:
            log.warning("progress intent %s not released", key, exc_info=True)

    async def _settle_progress(
        self,
        channel: Channel,
        notice: Notice,
        key: str,
        rank: ProgressRank,
        intent: dict[str, Any],
        revision: int,
        *,
        create: bool,
    ) -> bool:
        """A delivery meant to post the progress message: find out what became of it. True when
        this notice's part is done; False to read the record again."""
        found = await self._lookup(channel, key, intent)
        if found is not None:
            # It was posted: record it as that delivery would have, then edit it as usual.
            log.info("progress message %s found on %s by its key", key, channel.key)
            await self.ledger.update(
                key, self._progress_record(found, stored_rank(intent)), revision
            )
            return False
        ours = intent.get("notice") == notice.notice_id
        if not ours and not self._stale(intent):
            if rank[0] < FINAL_RANK:
                log.info("progress message %s is being posted by another delivery", key)
                return True
            # The final word must reach the message: try again once it is there.
            raise DeliveryError(
                channel.key, "the progress message is still being posted", permanent=False
            )
        if not create:
            if rank[0] < FINAL_RANK:
                return True  # a hold: a step posts the message, not this
            # The step that meant to post it is gone: the rollout ends without one.
            await self.ledger.update(key, self._progress_record(Receipt(), rank), revision)
            return False
        # The delivery that wrote the intent stopped before Slack took the message (or it was
        # this very notice, redelivered): post it now. `at` stays, so a later lookup still covers
        # the first attempt.
        taken = {**intent, "notice": notice.notice_id, "rank": list(rank), "abandoned": False}
        if not await self.ledger.update(key, taken, revision):
            return False
        await self._post_progress(channel, notice, key, rank)
        return True

    def _progress_record(self, receipt: Receipt, rank: ProgressRank) -> dict[str, Any]:
        return {
            "channel": receipt.channel,
            "ts": receipt.ts,
            "rank": list(rank),
            "at": self._now(),
        }
