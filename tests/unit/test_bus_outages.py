"""Bus outages as the controller records them: monotonic durations, wall-clock placement."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from services.canary_controller.outages import BusOutages, watch_connection

T0 = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


class Clocks:
    def __init__(self) -> None:
        self.mono = 500.0
        self.wall = T0

    def pass_(self, seconds: float, *, wall_jump: float = 0.0) -> None:
        self.mono += seconds
        self.wall += timedelta(seconds=seconds + wall_jump)


def tracker(clocks: Clocks) -> BusOutages:
    return BusOutages(clock=lambda: clocks.wall, monotonic=lambda: clocks.mono)


def test_an_outage_is_measured_by_the_monotonic_clock_and_ends_at_the_reconnect() -> None:
    clocks = Clocks()
    outages = tracker(clocks)
    clocks.pass_(10)
    outages.disconnected()
    clocks.pass_(26, wall_jump=-3600)  # the wall clock was set back an hour meanwhile
    span = outages.reconnected()
    assert span is not None
    start, end = span
    assert end == clocks.wall and (end - start) == timedelta(seconds=26)
    assert outages.known() == [span] and not outages.down


def test_an_ongoing_outage_counts_up_to_now() -> None:
    clocks = Clocks()
    outages = tracker(clocks)
    outages.disconnected()
    clocks.pass_(4)
    outages.disconnected()  # nats-py says it again at each failed attempt: the start stays
    clocks.pass_(3)
    [(start, end)] = outages.known(clocks.wall)
    assert end == clocks.wall and (end - start).total_seconds() == 7
    assert outages.down


def test_a_reconnect_without_a_disconnect_is_nothing() -> None:
    outages = tracker(Clocks())
    assert outages.reconnected() is None and outages.known() == []


def test_old_outages_are_forgotten() -> None:
    clocks = Clocks()
    outages = BusOutages(
        clock=lambda: clocks.wall, monotonic=lambda: clocks.mono, keep=timedelta(hours=1)
    )
    outages.disconnected()
    clocks.pass_(5)
    outages.reconnected()
    clocks.pass_(7200)
    outages.disconnected()
    clocks.pass_(2)
    latest = outages.reconnected()
    assert outages.known() == [latest]


class FakeConnection:
    def __init__(self) -> None:
        self.is_closed = False
        self.calls: list[str] = []

        async def down() -> None:
            self.calls.append("theirs-down")

        self._disconnected_cb: Any = down
        self._reconnected_cb: Any = None


async def test_the_connection_hooks_record_outages_and_keep_existing_callbacks() -> None:
    clocks = Clocks()
    outages = tracker(clocks)
    nc = FakeConnection()
    reconnects: list[bool] = []
    watch_connection(nc, outages, on_reconnected=lambda: reconnects.append(True))
    await nc._disconnected_cb()
    assert outages.down and nc.calls == ["theirs-down"]
    clocks.pass_(8)
    await nc._reconnected_cb()
    assert not outages.down and reconnects == [True]
    [(start, end)] = outages.known()
    assert (end - start).total_seconds() == 8
    nc.is_closed = True  # our own close at shutdown is not an outage
    await nc._disconnected_cb()
    assert not outages.down and nc.calls == ["theirs-down", "theirs-down"]
