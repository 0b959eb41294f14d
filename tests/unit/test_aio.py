"""The cancellation-safe waits: a stop that lands as the wake fires is not lost."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import pytest

from services.runtime.aio import bounded, wait_event


async def _loop_on(
    wait: Callable[[asyncio.Event, float], Awaitable[object]], ev: asyncio.Event
) -> None:
    while True:  # the shape of every service loop: wake or poll, forever, until cancelled
        await wait(ev, 10.0)
        ev.clear()


async def _cancel_as_it_wakes(wait: Callable[[asyncio.Event, float], Awaitable[object]]) -> bool:
    """True when the task stopped: the event is set and the task cancelled in one iteration."""
    ev = asyncio.Event()
    task = asyncio.create_task(_loop_on(wait, ev))
    await asyncio.sleep(0.01)
    ev.set()
    await asyncio.sleep(0)  # wait_for's inner task completes on this step ...
    task.cancel()  # ... and the cancellation arrives before the outer one resumes
    done, _ = await asyncio.wait({task}, timeout=0.3)
    if not done:
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
    return bool(done) and task.cancelled()


async def _wait_for_event(ev: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(ev.wait(), seconds)


async def test_wait_event_never_swallows_a_cancellation() -> None:
    assert all([await _cancel_as_it_wakes(wait_event) for _ in range(20)])


async def test_the_race_it_replaces_is_real_on_this_python() -> None:
    """Proof the test above can fail: 3.11's wait_for loses the same cancellation."""
    import sys

    lost = False
    for _ in range(20):
        lost = not await _cancel_as_it_wakes(_wait_for_event)
        if lost:
            break
    # fixed upstream in 3.12; the helper stays correct either way
    assert lost == (sys.version_info < (3, 12))


async def test_wait_event_reports_set_or_timed_out() -> None:
    ev = asyncio.Event()
    assert await wait_event(ev, 0.01) is False
    ev.set()
    assert await wait_event(ev, 0.01) is True


async def test_bounded_returns_or_raises_timeout() -> None:
    async def slow() -> int:
        await asyncio.sleep(1)
        return 1

    async def quick() -> int:
        return 2

    assert await bounded(quick(), 1.0) == 2
    with pytest.raises(TimeoutError):
        await bounded(slow(), 0.01)


async def test_a_cancellation_swallowed_by_a_library_is_raised_at_the_next_wait() -> None:
    inside = asyncio.Event()

    async def library_call() -> None:
        """Swallows a cancellation, as 3.11's wait_for does when its future is already done."""
        inside.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.get_running_loop().create_future()

    async def service_loop() -> None:
        while True:
            await library_call()
            await wait_event(asyncio.Event(), 0.01)

    task = asyncio.create_task(service_loop())
    await inside.wait()
    task.cancel()  # lands inside library_call, which swallows it
    done, _ = await asyncio.wait({task}, timeout=1.0)
    if not done:
        task.cancel()
    assert done and task.cancelled()
