"""Records of notices already sent, in the `preflight_notices` KV bucket: dedup and message ids.

Keys (KV-key safe: deployment ids and channel keys hold only `[A-Za-z0-9_-]`):

    <deployment_id>.sent.<kind>[.<step>.<occurrence>].<channel>   a notice went out (or was
                                                                  dead-lettered)
    <deployment_id>.progress.<channel>          the rollout's progress message (channel, ts, rank)

`<occurrence>` tells apart the starts of one step and the holds at one step (a resumed hold
starts its step again): the step's start time or the hold's deadline, `20261125T174500_000000`.

The progress record is read with its revision and written back only if nobody wrote it in
between (`update`): several notifier instances can handle events of one rollout at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue


class NoticeLedger(Protocol):
    """What the notifier remembers between deliveries (and across restarts and instances)."""

    async def get(self, key: str) -> dict[str, Any] | None: ...

    async def create(self, key: str, value: dict[str, Any]) -> bool:
        """Write if absent; False when the key already exists (someone else wrote it first)."""
        ...

    async def put(self, key: str, value: dict[str, Any]) -> None: ...

    async def read(self, key: str) -> tuple[dict[str, Any], int] | None:
        """The value and its revision (for `update`); None when absent."""
        ...

    async def update(self, key: str, value: dict[str, Any], revision: int) -> bool:
        """Write only if the key is still at `revision`; False when someone wrote it since."""
        ...


def sent_key(
    deployment_id: str, kind: str, step: int | None, channel: str, occurrence: str | None = None
) -> str:
    middle = kind if step is None else f"{kind}.{step}"
    if occurrence is not None:
        middle = f"{middle}.{occurrence.replace('.', '_').replace(':', '_')}"
    return f"{deployment_id}.sent.{middle}.{channel}"


def progress_key(deployment_id: str, channel: str) -> str:
    return f"{deployment_id}.progress.{channel}"


class KvLedger:
    """The real ledger: one JetStream KV bucket shared by every notifier instance."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def get(self, key: str) -> dict[str, Any] | None:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:  # also raised for deleted and purged keys
            return None
        value: dict[str, Any] = json.loads(entry.value or b"{}")
        return value

    async def create(self, key: str, value: dict[str, Any]) -> bool:
        try:
            await self.kv.create(key, json.dumps(value).encode())
        except KeyWrongLastSequenceError:
            return False
        return True

    async def put(self, key: str, value: dict[str, Any]) -> None:
        await self.kv.put(key, json.dumps(value).encode())

    async def read(self, key: str) -> tuple[dict[str, Any], int] | None:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None
        value: dict[str, Any] = json.loads(entry.value or b"{}")
        return value, int(entry.revision or 0)

    async def update(self, key: str, value: dict[str, Any], revision: int) -> bool:
        try:
            await self.kv.update(key, json.dumps(value).encode(), last=revision)
        except KeyWrongLastSequenceError:
            return False
        return True


@dataclass
class MemoryLedger:
    """The in-memory fake (unit and in-memory broker tests)."""

    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    revisions: dict[str, int] = field(default_factory=dict)

    async def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    async def create(self, key: str, value: dict[str, Any]) -> bool:
        if key in self.entries:
            return False
        await self.put(key, value)
        return True

    async def put(self, key: str, value: dict[str, Any]) -> None:
        self.entries[key] = value
        self.revisions[key] = self.revisions.get(key, 0) + 1

    async def read(self, key: str) -> tuple[dict[str, Any], int] | None:
        if key not in self.entries:
            return None
        return self.entries[key], self.revisions[key]

    async def update(self, key: str, value: dict[str, Any], revision: int) -> bool:
        if self.revisions.get(key) != revision:
            return False
        await self.put(key, value)
        return True
