"""One event to every channel it is meant for, each at most once in practice.

Per channel, a notice is looked up in the ledger, sent, then recorded. A redelivered event finds
its record and is not sent again. What is left is the crash window: a process that dies after the
channel accepted a notice and before the record is written sends it once more when the stream
redelivers the event (at-least-once, never lost). Webhook receivers can drop that duplicate by
its `X-Preflight-Notice-Id`.

A rollout's progress is one message per updatable channel: the first step posts it, later steps
and the outcome edit it (`rank` keeps a late, stale event from rolling the message back).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from services.contracts.events import CanaryStepStarted, DeploymentHeld, Requester
from services.notifier import messages
from services.notifier.channels.base import Channel, DeliveryError, Notice, Receipt
from services.notifier.dedup import NoticeLedger, progress_key, sent_key
from services.notifier.messages import NoticeEvent

log = logging.getLogger("preflight.notifier")


def make_notice(event: NoticeEvent, requested_by: Requester | None = None) -> Notice:
    """Render an event once for every kind of channel (pure)."""
    step = event.step_index if isinstance(event, CanaryStepStarted | DeploymentHeld) else None
    return Notice(
        event=event,
        kind=messages.kind_of(event),
        step=step,
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


class Deliverer:
    """Sends notices through channels with the ledger's dedup and progress records."""

    def __init__(self, ledger: NoticeLedger, clock: Callable[[], datetime]) -> None:
        self.ledger = ledger
        self.clock = clock

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
        for channel in channels:
            try:
                if notice.kind == "progress":
                    if not progress:
                        continue
                    if channel.updatable:
                        await self._progress(channel, notice, create=True)
                        report.sent.append(channel.key)
                    elif await self._once(channel, notice, progress=True):
                        report.sent.append(channel.key)
                    else:
                        report.skipped.append(channel.key)
                    continue
                if progress and channel.updatable:
                    try:
                        await self._progress(channel, notice, create=False)
                    except DeliveryError as exc:
                        # The outcome's own notice says the same; it must not wait on an edit.
                        log.warning("progress of %s not updated: %s", notice.notice_id, exc)
                if post:
                    if await self._once(channel, notice, progress=False):
                        report.sent.append(channel.key)
                    else:
                        report.skipped.append(channel.key)
            except DeliveryError as exc:
                log.warning("notice %s not delivered: %s", notice.notice_id, exc)
                report.failed.append(exc)
        return report

    async def mark_dead_lettered(self, notice: Notice, failure: DeliveryError) -> None:
        """A notice that can never go out on a channel is not tried again on redelivery."""
        key = sent_key(notice.event.deployment_id, notice.kind, notice.step, failure.channel)
        await self.ledger.put(
            key, {"status": "dead_lettered", "reason": failure.reason, "at": self._now()}
        )

    def _now(self) -> str:
        return self.clock().isoformat()

    async def _once(self, channel: Channel, notice: Notice, *, progress: bool) -> bool:
        event = notice.event
        key = sent_key(event.deployment_id, notice.kind, notice.step, channel.key)
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
        if not await self.ledger.create(key, record):
            log.warning("notice %s was sent twice on %s (a concurrent delivery)", key, channel.key)
        return True

    async def _progress(self, channel: Channel, notice: Notice, *, create: bool) -> None:
        key = progress_key(notice.event.deployment_id, channel.key)
        rank = messages.progress_rank(notice.event)
        record = await self.ledger.get(key)
        if record is None:
            if not create:
                return  # no rollout message to finish (e.g. blocked before any canary step)
            receipt = await channel.post(notice, progress=True)
            if not await self.ledger.create(key, self._progress_record(receipt, rank)):
                log.warning("two progress messages for %s on %s", notice.notice_id, channel.key)
            return
        if float(record.get("rank", -1)) > rank:
            log.info("progress of %s is already past %s: not rolled back", key, notice.notice_id)
            return
        current = Receipt(channel=str(record.get("channel", "")), ts=str(record.get("ts", "")))
        receipt = await channel.update(current, notice)
        await self.ledger.put(key, self._progress_record(receipt, rank))

    def _progress_record(self, receipt: Receipt, rank: float) -> dict[str, Any]:
        return {"channel": receipt.channel, "ts": receipt.ts, "rank": rank, "at": self._now()}
