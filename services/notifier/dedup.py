"""Records of notices already sent, in the `preflight_notices` KV bucket: dedup and message ids.

Keys (KV-key safe: deployment ids and channel keys hold only `[A-Za-z0-9_-]`):

    <deployment_id>.sent.<kind>[.<step>].<channel>   a notice went out (or was dead-lettered)
    <deployment_id>.progress.<channel>               the rollout's progress message (channel, ts)
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


def sent_key(deployment_id: str, kind: str, step: int | None, channel: str) -> str:
    middle = kind if step is None else f"{kind}.{step}"
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


@dataclass
class MemoryLedger:
    """The in-memory fake (unit and in-memory broker tests)."""

    entries: dict[str, dict[str, Any]] = field(default_factory=dict)

    async def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    async def create(self, key: str, value: dict[str, Any]) -> bool:
        if key in self.entries:
            return False
        self.entries[key] = value
        return True

    async def put(self, key: str, value: dict[str, Any]) -> None:
        self.entries[key] = value
