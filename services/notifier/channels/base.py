"""What every notice channel is: one Protocol, the notice it takes, its receipt and its errors.

Exception
 +-- DeliveryError       a channel could not deliver (or look); `permanent` says whether asking
 |                       again can help (429, 5xx, timeouts: yes; a wrong channel or token: no)
 +-- CannotTell          a channel cannot say whether a notice is already there (it cannot be
                         searched, or the search cannot finish): the caller sends it again
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol
from urllib.parse import quote, unquote, urlsplit

from services.notifier.messages import NoticeEvent, NoticeKind, SlackMessage


@dataclass(frozen=True)
class Notice:
    """One event, rendered once for every kind of channel."""

    event: NoticeEvent
    kind: NoticeKind
    step: int | None
    occurrence: str | None
    message: SlackMessage
    progress: SlackMessage
    console: str
    body: bytes

    @property
    def notice_id(self) -> str:
        """Stable id of this notice: receivers use it to drop a rare duplicate delivery.

        A step that starts again (a resumed hold) or a second hold at the same step is a new
        notice: its occurrence (the step's start time, the hold's deadline) is part of the id,
        as in the event's message id on the bus."""
        step = "" if self.step is None else f":{self.step}"
        occurrence = "" if self.occurrence is None else f":{self.occurrence}"
        return f"{self.event.deployment_id}:{self.kind}{step}{occurrence}"


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


class CannotTell(Exception):
    """`Channel.find` cannot say whether the message is there (not searchable, no permission to
    read, or more history than a lookup reads)."""


class Channel(Protocol):
    """Somewhere notices go. `post` must be safe to call again after a failure; a channel that
    cannot edit what it posted says so with `updatable = False`.

    `key` in `post` and `update` is the notice's ledger key: a channel that can be searched
    stores it with the message, so that `find` can tell later whether a delivery that died
    before its ledger write had already posted it.
    """

    @property
    def key(self) -> str:
        """Stable name for dedup records (KV-key safe), e.g. `slack-ml-deploys-1a2b3c4d`."""
        ...

    @property
    def updatable(self) -> bool: ...

    async def post(self, notice: Notice, *, progress: bool = False, key: str = "") -> Receipt:
        """Send the notice (its progress rendering when `progress`); raise `DeliveryError`."""
        ...

    async def update(self, receipt: Receipt, notice: Notice, *, key: str = "") -> Receipt:
        """Replace the progress message at `receipt`; raise `DeliveryError`."""
        ...

    async def find(self, key: str, *, since: datetime) -> Receipt | None:
        """The message posted under `key` at or after `since`, or None when it is not there.

        Raise `CannotTell` when the channel cannot be searched, `DeliveryError` when the search
        failed in a way a later try may fix."""
        ...


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:40]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def channel_key(kind: str, name: str) -> str:
    """A KV-key-safe, collision-resistant name: readable prefix plus a hash of the full name.

    For names that are not secret (Slack channel names). URLs go through `url_key`."""
    slug = _slug(name)
    digest = _digest(name)
    return f"{kind}-{slug}-{digest}" if slug else f"{kind}-{digest}"


def redact_url(text: str, url: str, replacement: str) -> str:
    """`text` (an exception's message) without the URL, its path or its query, whichever form
    they take there: the URL as given, as aiohttp normalises it, or in parts."""
    secrets = {url}
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = None
    if parts is not None:
        for part in (parts.path, parts.query, parts.fragment):
            if len(part) > 1:
                secrets.update({part, unquote(part), quote(unquote(part), safe="/=&")})
    secrets.discard("")
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, replacement)
    return text


def url_key(kind: str, url: str) -> str:
    """`channel_key` for a URL: the host only, plus a hash of the whole URL. Webhook URLs often
    hold a secret in their path or query; the key ends up in KV keys, error strings, dead
    letters and logs, so no part of the path or query may appear in it."""
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        host = ""
    slug = _slug(host)
    digest = _digest(url)
    return f"{kind}-{slug}-{digest}" if slug else f"{kind}-{digest}"
