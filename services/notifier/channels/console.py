"""The embedded default: notices on standard output."""

from __future__ import annotations

import sys
from datetime import datetime
from typing import TextIO

from services.notifier.channels.base import CannotTell, Notice, Receipt


class ConsoleChannel:
    """Prints every notice; progress is one line per step (a terminal cannot edit a line)."""

    key = "console"
    updatable = False

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream

    async def post(self, notice: Notice, *, progress: bool = False, key: str = "") -> Receipt:
        print(notice.console, file=self.stream or sys.stdout, flush=True)
        return Receipt()

    async def update(self, receipt: Receipt, notice: Notice, *, key: str = "") -> Receipt:
        return receipt

    async def find(self, key: str, *, since: datetime) -> Receipt | None:
        raise CannotTell("the console cannot be read back")
