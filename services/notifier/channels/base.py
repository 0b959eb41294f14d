"""What every notice channel is: one Protocol, the notice it takes, its receipt and its errors.

DeliveryError            a channel could not deliver; `permanent` says whether asking again
                         can help (429, 5xx, timeouts: no; a wrong channel or token: yes)
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Protocol

from services.notifier.messages import NoticeEvent, NoticeKind, SlackMessage


@dataclass(frozen=True)
class Notice:
    """One event, rendered once for every kind of channel."""

    event: NoticeEvent
    kind: NoticeKind
    step: int | None
    message: SlackMessage
    progress: SlackMessage
    console: str
    body: bytes

    @property
    def notice_id(self) -> str:
        """Stable id of this notice: receivers use it to drop a rare duplicate delivery."""
        step = "" if self.step is None else f":{self.step}"
        return f"{self.event.deployment_id}:{self.kind}{step}"


@dataclass(frozen=True)
class Receipt:
    """Where a posted message is, for a later update (Slack: channel id and `ts`)."""

    channel: str = ""
    ts: str = ""


class DeliveryError(Exception):
    """A channel could not deliver a notice (after its own retries)."""

    def __init__(self, channel: str, reason: str, *, permanent: bool) -> None:
        super().__init__(f"{channel}: {reason}")
        self.channel = channel
        self.reason = reason
        self.permanent = permanent


class Channel(Protocol):
    """Somewhere notices go. `post` must be safe to call again after a failure; a channel that
    cannot edit what it posted says so with `updatable = False`."""

    @property
    def key(self) -> str:
        """Stable name for dedup records (KV-key safe), e.g. `slack-ml-deploys-1a2b3c4d`."""
        ...

    @property
    def updatable(self) -> bool: ...

    async def post(self, notice: Notice, *, progress: bool = False) -> Receipt:
        """Send the notice (its progress rendering when `progress`); raise `DeliveryError`."""
        ...

    async def update(self, receipt: Receipt, notice: Notice) -> Receipt:
        """Replace the progress message at `receipt`; raise `DeliveryError`."""
        ...


def channel_key(kind: str, name: str) -> str:
    """A KV-key-safe, collision-resistant name: readable prefix plus a hash of the full name."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")[:40]
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{kind}-{slug}-{digest}" if slug else f"{kind}-{digest}"
