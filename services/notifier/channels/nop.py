"""A channel that keeps what it is given: the fake beside the Protocol (tests, benchmarks)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from services.notifier.channels.base import Notice, Receipt


@dataclass
class NopChannel:
    """Sends nothing; records every post and update, and finds posts by their key."""

    key: str = "nop"
    updatable: bool = True
    posted: list[tuple[Notice, bool]] = field(default_factory=list)
    updated: list[tuple[Receipt, Notice]] = field(default_factory=list)
    keys: dict[str, Receipt] = field(default_factory=dict)

    async def post(self, notice: Notice, *, progress: bool = False, key: str = "") -> Receipt:
        self.posted.append((notice, progress))
        receipt = Receipt(channel=self.key, ts=str(len(self.posted)))
        if key:
            self.keys[key] = receipt
        return receipt

    async def update(self, receipt: Receipt, notice: Notice, *, key: str = "") -> Receipt:
        self.updated.append((receipt, notice))
        return receipt

    async def find(self, key: str, *, since: datetime) -> Receipt | None:
        return self.keys.get(key)
