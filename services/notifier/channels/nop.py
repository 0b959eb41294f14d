"""A channel that keeps what it is given: the fake beside the Protocol (tests, benchmarks)."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.notifier.channels.base import Notice, Receipt


@dataclass
class NopChannel:
    """Sends nothing; records every post and update."""

    key: str = "nop"
    updatable: bool = True
    posted: list[tuple[Notice, bool]] = field(default_factory=list)
    updated: list[tuple[Receipt, Notice]] = field(default_factory=list)

    async def post(self, notice: Notice, *, progress: bool = False) -> Receipt:
        self.posted.append((notice, progress))
        return Receipt(channel=self.key, ts=str(len(self.posted)))

    async def update(self, receipt: Receipt, notice: Notice) -> Receipt:
        self.updated.append((receipt, notice))
        return receipt
