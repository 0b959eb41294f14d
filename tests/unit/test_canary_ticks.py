"""The controller's ticks say on /healthz when they keep failing: a tick that cannot read the
rollouts stops every analysis and rollback while the process looks alive."""

from __future__ import annotations

import asyncio
from typing import Any

from services.canary_controller.engine import TickHealth, run_ticks


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_problem_only_after_the_grace_and_gone_after_one_good_tick() -> None:
    clock = Clock()
    health = TickHealth(clock=clock)
    assert health.problem() is None
    health.failed("BadRequestError: maximum consumers limit reached")
    clock.now += 9
    assert health.problem(grace_s=10) is None  # one slow moment is no outage
    clock.now += 2
    health.failed("BadRequestError: maximum consumers limit reached")
    assert health.problem(grace_s=10) == (
        "rollout ticks failing for 11 s: BadRequestError: maximum consumers limit reached"
    )
    health.succeeded()
    assert health.problem(grace_s=0) is None


async def test_run_ticks_reports_each_outcome() -> None:
    class Engine:
        calls = 0

        def may_act(self) -> bool:
            return True

        async def tick(self) -> None:
            self.calls += 1
            if self.calls < 3:
                raise RuntimeError("the store refused")
            stop.set()

    class Recording(TickHealth):
        def failed(self, error: str) -> None:
            seen.append(error)
            super().failed(error)

    stop = asyncio.Event()
    seen: list[str] = []
    health = Recording()
    engine: Any = Engine()
    await asyncio.wait_for(run_ticks(engine, stop, interval_s=0.01, health=health), 5)
    assert seen == ["RuntimeError: the store refused"] * 2
    assert health.failing_since is None  # the third tick got through
