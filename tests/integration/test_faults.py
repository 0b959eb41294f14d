"""The fault suite's short version, on the real embedded stack (issue #13; the long one, with
its figures, is bench/faults.py): malformed messages on every consumed subject are each
dead-lettered once with a reason and restart no service, and a deployment reaches its one
outcome through a nats-server SIGKILL mid-pipeline.

The messages come from the bench's generator, which checks every body against the consuming
service's own strict parser, so "malformed" is never a guess.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from nats.js import JetStreamContext

from services.contracts import subjects
from services.contracts.events import (
    TERMINAL_TYPES,
    DeploymentEvent,
    DeploymentPromoted,
    DeploymentRequested,
    ValidationCompleted,
    new_deployment_id,
)
from services.runtime import bus, nats_users
from services.runtime.service import MAX_DEAD_LETTER_PAYLOAD
from services.runtime.settings import Settings
from services.stack.supervisor import Stack

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import faults  # bench/faults.py: the long suite's generator and tallies

pytestmark = pytest.mark.integration

T = TypeVar("T")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`preflight up`'s stack: the shipped NATS users, every service as its own process; a
    short `ack_wait` so a message held by a dead process comes back within seconds."""
    root = tmp_path_factory.mktemp("faults")
    policy = root / "policy.yaml"
    policy.write_text(yaml.safe_dump(faults.FAST_BENCHMARK))
    settings = Settings(data_dir=root / "data", policy_file=policy, ack_wait_s=3.0)
    running = Stack(settings, say=lambda _: None, notices_to_terminal=False)
    running.start()
    try:
        running.wait_ready(60)
        yield running
    finally:
        running.stop()


def on_bus(stack: Stack, fn: Callable[[JetStreamContext], Awaitable[T]], user: str = "admin") -> T:
    async def call() -> T:
        nc = await bus.connect(stack._settings_as(user), "test-faults", timeout=2.0)
        try:
            return await fn(nc.jetstream())
        finally:
            await nc.close()

    return asyncio.run(call())


def pids(stack: Stack) -> dict[str, int]:
    stack.check_children()
    return {name: child.proc.pid for name, child in stack.children.items()}


def publish(stack: Stack, messages: list[faults.Malformed]) -> list[faults.Published]:
    async def send() -> list[faults.Published]:
        admin = await bus.connect(stack._service_settings(), "test-faults-admin")
        client = await bus.connect(stack._settings_as(nats_users.CLIENT), "test-faults-client")
        try:
            sent, refused = await faults.publish_malformed(
                admin.jetstream(), client.jetstream(), messages
            )
        finally:
            await admin.close()
            await client.close()
        assert refused == [], refused[:3]
        return sent

    return asyncio.run(send())


def wait_consumed(stack: Stack, sent: list[faults.Published], timeout: float = 60.0) -> None:
    """Until every consumer has delivered its last message and has nothing unacked."""
    targets: dict[str, int] = {}
    for p in sent:
        targets[p.message.durable] = max(targets.get(p.message.durable, 0), p.seq)

    async def behind(js: JetStreamContext) -> dict[str, tuple[int, int]]:
        return await faults.consumers_caught_up(js, targets)

    deadline = time.monotonic() + timeout
    while (left := on_bus(stack, behind)) and time.monotonic() < deadline:
        stack.check_children()
        time.sleep(0.3)
    assert left == {}, f"consumers still behind after {timeout:g} s: {left}"


def generate(stack: Stack, count: int, seed: int) -> list[faults.Malformed]:
    async def max_payload(js: JetStreamContext) -> int:
        return int(js._nc.max_payload)

    limit = on_bus(stack, max_payload)
    return faults.malformed_messages(count, random.Random(seed), limit, [], cycle=True)


def test_malformed_messages_on_every_consumed_subject_are_dead_lettered_once(
    stack: Stack,
) -> None:
    before = pids(stack)
    messages = [
        m
        for m in generate(stack, 700, seed=13)
        if m.expects_dead_letter and not faults.decoder_refuses(m)  # those: the xfail below
    ]
    assert len(messages) >= 500
    assert {m.family for m in messages} == set(faults.FAMILIES)
    kinds = {m.category for m in messages}
    assert {"near_max_payload", "held_integer_deadline", "command_sender_not_allowed"} <= kinds
    sent = publish(stack, messages)
    wait_consumed(stack, sent)

    found = faults.tally(sent, on_bus(stack, faults.read_dead_letters))
    lost = [(p.message.family, p.message.category, p.message.payload[:80]) for p in found.lost]
    assert lost == []
    assert found.received == found.expected == len(sent)
    assert (found.duplicated, found.wrong_service, found.without_reason) == (0, 0, 0)
    # Letters of payloads over 256 KiB keep a prefix, the sha256 and the stream sequence.
    assert found.truncated == sum(1 for m in messages if len(m.payload) > MAX_DEAD_LETTER_PAYLOAD)
    assert pids(stack) == before, "a service restarted"


def test_bodies_the_json_decoder_raises_on_are_dead_lettered_too(stack: Stack) -> None:
    messages = [m for m in generate(stack, 700, seed=14) if faults.decoder_refuses(m)][:30]
    assert {m.category for m in messages} >= {"deep_nesting", "truncated_json"}
    sent = publish(stack, messages)
    deadline = time.monotonic() + 8  # a dead letter takes well under a second when it works
    while time.monotonic() < deadline:
        found = faults.tally(sent, on_bus(stack, faults.read_dead_letters))
        if not found.lost:
            break
        time.sleep(0.5)
    assert [(p.message.service, p.message.category) for p in found.lost] == []


def test_commands_for_unknown_deployments_are_dead_lettered(stack: Stack) -> None:
    messages = [
        m for m in generate(stack, 1400, seed=15) if m.category == "command_unknown_deployment"
    ]
    assert messages
    sent = publish(stack, messages)
    wait_consumed(stack, sent)
    found = faults.tally(sent, on_bus(stack, faults.read_dead_letters))
    assert found.well_formed_lettered == found.well_formed == len(sent)


def history(stack: Stack, deployment_id: str) -> list[DeploymentEvent] | None:
    async def read(js: JetStreamContext) -> list[DeploymentEvent]:
        return await bus.read_history(js, subjects.deployment_events(deployment_id))

    try:
        return on_bus(stack, read)
    except (bus.BusUnavailable, OSError, TimeoutError):
        return None  # nats-server is down: the supervisor brings it back


def test_a_deployment_reaches_its_one_outcome_through_a_nats_server_sigkill(
    stack: Stack, tmp_path: Path
) -> None:
    from services.benchmarker.samples import write_trained_model
    from services.stack.demo import _expected_digests

    model = write_trained_model(tmp_path / "model", variant="good", seed=0)
    request = DeploymentRequested(
        deployment_id=new_deployment_id(),
        model="fault-suite",
        version="1",
        location=str(model),
        expected_sha256=_expected_digests(model),
    )

    async def deploy(js: JetStreamContext) -> Any:
        return await bus.publish_event(js, request)

    on_bus(stack, deploy, user=nats_users.CLIENT)
    restarts = stack.nats_restart_count
    killed = False
    events: list[DeploymentEvent] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        stack.check_children()  # what `preflight up` runs: restarts a dead nats-server too
        events = history(stack, request.deployment_id) or events
        if not killed and any(isinstance(e, ValidationCompleted) for e in events):
            assert stack.nats is not None and stack.nats.proc is not None
            os.kill(stack.nats.proc.pid, signal.SIGKILL)  # the benchmark is running now
            stack.nats.proc.wait(timeout=10)
            killed = True
        if any(isinstance(e, TERMINAL_TYPES) for e in events):
            break
        time.sleep(0.2)
    time.sleep(2)  # a second outcome, if any, would arrive now
    events = history(stack, request.deployment_id) or events

    assert killed, "the pipeline never reached the benchmark"
    ends = [type(e).__name__ for e in events if isinstance(e, TERMINAL_TYPES)]
    assert ends == [DeploymentPromoted.__name__], [type(e).__name__ for e in events]
    assert faults.duplicated_events(events) == {}
    assert stack.nats_restart_count == restarts + 1
    info = json.loads((stack.data_dir / "stack.json").read_text())
    assert stack.nats is not None and stack.nats.proc is not None
    assert info["nats_pid"] == stack.nats.proc.pid
    assert info["nats_restarts"] == stack.nats_restart_count
    assert info["nats_url"] == stack.nats.url
