"""asyncio helpers that stay correct under cancellation on Python 3.11.

`asyncio.wait_for` on 3.11 runs its awaitable as a separate task and can swallow a cancellation
that arrives in the same loop iteration as the awaitable finishing (cpython gh-86296, fixed in
3.12 by rebuilding `wait_for` on `asyncio.timeout`). A service loop that does
`await wait_for(wake.wait(), t)` then never sees its stop: the router's status reporter did
exactly that when its wake event was set while the router shut down, and the stop hung for good.
`asyncio.timeout` cancels the current task itself, so nothing is lost.

Libraries still use `wait_for` inside (nats-py's `request`, so every KV put), so a cancellation
can be swallowed before our code runs. A swallowed one leaves `Task.cancelling()` above zero;
`wait_event`, which every service loop passes through once per turn, raises it again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


def checkpoint() -> None:
    """Raise a cancellation of the current task that something below us swallowed."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def sleep(seconds: float) -> None:
    """`asyncio.sleep` for retry loops: a swallowed cancellation stops the loop here."""
    checkpoint()
    await asyncio.sleep(seconds)


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait until `event` is set or `seconds` pass; True when it was set. Cancellation-safe,
    and a cancellation some library swallowed earlier in this turn is raised here."""
    checkpoint()
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True


async def bounded(awaitable: Awaitable[T], seconds: float) -> T:
    """`await awaitable`, raising TimeoutError after `seconds`: `wait_for` without its 3.11 race."""
    async with asyncio.timeout(seconds):
        return await awaitable
