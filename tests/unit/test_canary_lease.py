"""The controller lease on an in-memory KV with revisions and a clock the test moves.

Two `Lease` objects are two replicas; the fake KV checks `last=` the way NATS does, so only one
update of a revision succeeds. Time is injected: nothing sleeps on the lease's own cadence.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import nats.js.errors
import pytest
from aiohttp.test_utils import TestClient, TestServer

from services.canary_controller.app import PageSeries
from services.canary_controller.lease import LEASE_KEY, Lease, LeaseValue, Role
from services.canary_controller.page import build_page_app
from services.canary_controller.state import RolloutState
from services.metrics.queries import MetricsUnavailable

T0 = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


@dataclass
class Entry:
    value: bytes | None
    revision: int | None


class FakeKV:
    """One bucket of history 1: `create`, `update(last=)`, `get`, and an outage switch."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.sequence = 0
        self.down = False
        self.lose_answers = False  # the write lands but its answer never arrives

    def _check(self) -> None:
        if self.down:
            raise TimeoutError("bus down")

    async def get(self, key: str) -> Entry:
        self._check()
        if key not in self.entries:
            raise nats.js.errors.KeyNotFoundError
        return self.entries[key]

    async def create(self, key: str, value: bytes) -> int:
        self._check()
        if key in self.entries:
            raise nats.js.errors.KeyWrongLastSequenceError("wrong last sequence")
        return self._put(key, value)

    async def update(self, key: str, value: bytes, last: int | None = None) -> int:
        self._check()
        current = self.entries.get(key)
        if current is None or current.revision != last:
            raise nats.js.errors.KeyWrongLastSequenceError("wrong last sequence")
        return self._put(key, value)

    def _put(self, key: str, value: bytes) -> int:
        self.sequence += 1
        self.entries[key] = Entry(value, self.sequence)
        if self.lose_answers:
            raise TimeoutError("answer lost")
        return self.sequence

    def holder(self) -> str | None:
        entry = self.entries.get(LEASE_KEY)
        value = LeaseValue.parse(entry.value if entry else None)
        return value.holder if value else None


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def replica(kv: FakeKV, clock: Clock, name: str, deposed: list[str] | None = None) -> Lease:
    return Lease(
        kv,
        name,
        monotonic=clock,
        clock=lambda: T0,
        on_deposed=(lambda: deposed.append(name)) if deposed is not None else None,
    )


async def step(clock: Clock, seconds: float, *leases: Lease) -> None:
    """Let `seconds` pass in 0.5 s slices, each replica doing what its loop would."""
    for _ in range(round(seconds / 0.5)):
        clock.t += 0.5
        for lease in leases:
            if lease.role is Role.ACTIVE:
                await lease.renew()
            elif lease.role is Role.STANDBY:
                await lease.observe()


async def test_the_first_replica_creates_the_lease_and_the_second_stands_by() -> None:
    kv, clock = FakeKV(), Clock()
    a, b = replica(kv, clock, "a"), replica(kv, clock, "b")
    await a.observe()
    await b.observe()
    assert a.active() and a.term == 1
    assert b.role is Role.STANDBY and not b.active()
    await step(clock, 30, a, b)  # renewals keep the standby off, however long
    assert a.active() and b.role is Role.STANDBY and kv.holder() == "a"


async def test_the_standby_takes_over_after_the_ttl_without_a_renewal() -> None:
    kv, clock = FakeKV(), Clock()
    a, b = replica(kv, clock, "a"), replica(kv, clock, "b")
    await a.observe()
    await b.observe()
    await step(clock, 3, a, b)
    # `a` dies: no more renewals. The standby waits a whole TTL from the last revision it saw.
    await step(clock, 4.5, b)
    assert b.role is Role.STANDBY
    await step(clock, 1.0, b)
    assert b.active() and b.term == 2 and kv.holder() == "b"


async def test_a_holder_that_cannot_renew_stops_acting_before_a_standby_may_take_over() -> None:
    kv, clock = FakeKV(), Clock()
    a, b = replica(kv, clock, "a"), replica(kv, clock, "b")
    await a.observe()
    await b.observe()
    renewed_at = clock.t
    kv.down = True  # `a` cannot reach the bus; the standby's view is frozen too
    clock.t = renewed_at + a.ttl_s - a.margin_s - 0.01
    await a.renew()
    assert a.active()
    clock.t = renewed_at + a.ttl_s - a.margin_s
    await a.renew()
    assert not a.active() and a.role is Role.ACTIVE  # not acting, not deposed
    assert a.describe()["role"] == "active-not-renewed"
    kv.down = False
    await a.renew()  # nobody took over: it may act again
    assert a.active() and a.term == 1


async def test_a_holder_whose_lease_was_taken_is_deposed_at_its_next_renewal() -> None:
    kv, clock = FakeKV(), Clock()
    deposed: list[str] = []
    a, b = replica(kv, clock, "a", deposed), replica(kv, clock, "b", deposed)
    await a.observe()
    await b.observe()
    await step(clock, 6, b)  # `a` paused (a long GC, a frozen VM): it did not renew
    assert b.active()
    await a.renew()
    assert a.role is Role.DEPOSED and not a.active() and deposed == ["a"]
    assert await a.wait_active(asyncio.Event()) is False
    await step(clock, 5, a, b)
    assert kv.holder() == "b" and b.term == 2


async def test_a_renewal_whose_answer_was_lost_is_not_a_takeover() -> None:
    kv, clock = FakeKV(), Clock()
    deposed: list[str] = []
    a = replica(kv, clock, "a", deposed)
    await a.observe()
    kv.lose_answers = True
    await a.renew()  # landed, but `a` still holds the old revision
    kv.lose_answers = False
    await a.renew()  # conflict: the key holds a's own value, so it adopts the revision
    assert a.role is Role.ACTIVE and not deposed
    await a.renew()
    assert a.active()


async def test_a_released_lease_is_taken_at_once() -> None:
    kv, clock = FakeKV(), Clock()
    a, b = replica(kv, clock, "a"), replica(kv, clock, "b")
    await a.observe()
    await b.observe()
    await a.release()
    assert not a.active() and kv.holder() == ""
    await b.observe()
    assert b.active() and b.term == 2
    await a.observe()  # `run` would not even look again; nor would it take it back
    assert kv.holder() == "b"


async def test_after_a_bus_outage_the_holder_gets_a_whole_ttl_to_renew() -> None:
    kv, clock = FakeKV(), Clock()
    a, b = replica(kv, clock, "a"), replica(kv, clock, "b")
    await a.observe()
    await b.observe()
    kv.down = True
    clock.t += 30  # a long outage: nobody saw anything
    kv.down = False
    b.bus_reconnected()
    await step(clock, 1.5, b)  # `a` reconnects a little later than `b`...
    await a.renew()  # ...and renews: the standby stays one
    await step(clock, 10, a, b)
    assert kv.holder() == "a" and b.role is Role.STANDBY


async def test_a_value_that_does_not_parse_is_taken_over_after_the_ttl() -> None:
    kv, clock = FakeKV(), Clock()
    kv.entries[LEASE_KEY] = Entry(b"not json", 7)
    kv.sequence = 7
    b = replica(kv, clock, "b")
    await step(clock, 5.5, b)
    assert b.active() and kv.holder() == "b"


async def test_run_and_wait_active_on_the_real_loop() -> None:
    kv = FakeKV()
    lease = Lease(kv, "solo", poll_s=0.01, renew_s=0.01)
    stop = asyncio.Event()
    task = asyncio.create_task(lease.run(stop))
    assert await asyncio.wait_for(lease.wait_active(stop), 2) is True
    stop.set()
    await task
    await lease.release()
    assert kv.holder() == ""


@pytest.mark.parametrize("data", [b"", b"{}", b'{"holder": "a"}', b"[1]"])
def test_lease_values_that_do_not_parse(data: bytes) -> None:
    assert LeaseValue.parse(data) is None


def test_a_lease_value_round_trips() -> None:
    value = LeaseValue("replica-a/12-ab", 3, T0)
    assert LeaseValue.parse(value.to_bytes()) == value


class NoRollouts:
    async def get(self, deployment_id: str) -> RolloutState | None:
        return None

    async def list(self) -> list[RolloutState]:
        return []


async def test_a_standby_page_is_alive_not_ready_and_says_why_there_are_no_charts() -> None:
    role: dict[str, Any] = {"role": "standby"}
    app = build_page_app(
        NoRollouts(),
        PageSeries(),
        health=lambda: {"status": "ok", **role},
        ready=lambda: {"status": "ok" if role["role"] == "active" else "standby", **role},
    )
    async with TestClient(TestServer(app)) as client:
        health = await client.get("/healthz")
        assert health.status == 200 and (await health.json())["role"] == "standby"
        ready = await client.get("/readyz")
        assert ready.status == 503 and (await ready.json())["status"] == "standby"
        assert (await client.get("/api/rollouts")).status == 200  # read-only pages still work
        role["role"] = "active"
        assert (await client.get("/readyz")).status == 200
    with pytest.raises(MetricsUnavailable, match="standby"):
        await PageSeries().series("d-1", T0, T0, 1.0)


async def test_the_first_read_after_failed_ones_gives_the_holder_a_whole_ttl() -> None:
    kv, clock = FakeKV(), Clock()
    a, b = replica(kv, clock, "a"), replica(kv, clock, "b")
    await a.observe()
    await b.observe()
    kv.down = True
    await step(clock, 20, b)  # the standby's reads fail; no reconnect callback has come yet
    kv.down = False
    await b.observe()
    assert b.role is Role.STANDBY
    await a.renew()
    await step(clock, 10, a, b)
    assert kv.holder() == "a"
