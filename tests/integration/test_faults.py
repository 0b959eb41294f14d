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
import secrets
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
    AbortDeployment,
    CanaryStepStarted,
    Command,
    DeadLetter,
    DeploymentEvent,
    DeploymentFailed,
    DeploymentPromoted,
    DeploymentRequested,
    DeploymentRolledBack,
    ModelRef,
    PauseDeployment,
    Requester,
    ValidationCompleted,
    new_deployment_id,
)
from services.contracts.routing import subject_for
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
        nc = await bus.connect(stack.settings_as(user), "test-faults", timeout=2.0)
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
        admin = await bus.connect(stack.settings_as(nats_users.ADMIN), "test-faults-admin")
        client = await bus.connect(stack.settings_as(nats_users.CLIENT), "test-faults-client")
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
    return faults.malformed_messages(count, random.Random(seed), limit, {}, cycle=True)


def test_malformed_messages_on_every_consumed_subject_are_dead_lettered_once(
    stack: Stack,
) -> None:
    before = pids(stack)
    messages = generate(stack, 600, seed=13)
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
    """Bodies sent as application/json that are not JSON, and JSON nested past Python's
    recursion limit: FastStream's own decoder used to raise on them before the service's
    handler ran, and they were redelivered, then dropped without a dead letter."""
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


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from services.benchmarker.samples import write_trained_model

    return write_trained_model(tmp_path_factory.mktemp("model") / "model", seed=0)


def request_for(model: Path, name: str, version: str, **extra: Any) -> DeploymentRequested:
    from services.stack.demo import _expected_digests

    return DeploymentRequested(
        deployment_id=new_deployment_id(),
        model=name,
        version=version,
        location=str(model),
        expected_sha256=_expected_digests(model),
        **extra,
    )


def send(stack: Stack, event: DeploymentRequested | Command) -> None:
    """As the `client` user (people and CI), with a nonce for a command's message id."""

    async def publish(js: JetStreamContext) -> Any:
        return await bus.publish_event(js, event, secrets.token_hex(4))

    on_bus(stack, publish, user=nats_users.CLIENT)


def follow(
    stack: Stack,
    deployment_id: str,
    until: Callable[[list[DeploymentEvent]], bool],
    timeout: float = 60.0,
) -> list[DeploymentEvent]:
    deadline = time.monotonic() + timeout
    events: list[DeploymentEvent] = []
    while time.monotonic() < deadline:
        stack.check_children()
        events = history(stack, deployment_id) or events
        if until(events):
            return events
        time.sleep(0.2)
    pytest.fail(f"{deployment_id}: not there within {timeout:g} s: {[type(e) for e in events]}")


def ended(events: list[DeploymentEvent]) -> bool:
    return any(isinstance(e, TERMINAL_TYPES) for e in events)


def dead_letters_for(stack: Stack, subject: str, timeout: float = 5.0) -> list[DeadLetter]:
    """The dead letters of messages on `subject`, once there are any (well under a second)."""

    async def letters(js: JetStreamContext) -> list[DeadLetter]:
        return [x for x in await faults.read_dead_letters(js) if x.subject == subject]

    deadline = time.monotonic() + timeout
    while not (found := on_bus(stack, letters)) and time.monotonic() < deadline:
        time.sleep(0.3)
    return found


def test_commands_for_a_finished_rollout_are_dead_lettered(stack: Stack, model: Path) -> None:
    first = request_for(model, "fault-late", "1")
    send(stack, first)
    follow(stack, first.deployment_id, ended)
    stable = ModelRef(name="fault-late", version="1", location=str(model))
    canary = request_for(model, "fault-late", "2", stable=stable)
    send(stack, canary)
    follow(
        stack, canary.deployment_id, lambda ev: any(isinstance(e, CanaryStepStarted) for e in ev)
    )
    who = Requester(user="test", nats_user=nats_users.CLIENT)
    ids = {"deployment_id": canary.deployment_id, "model": "fault-late", "version": "2"}
    # A command on another model's subject, for this rollout's id: refused, not obeyed.
    elsewhere = AbortDeployment(**{**ids, "model": "someone-else"}, requested_by=who)
    send(stack, elsewhere)
    found = dead_letters_for(stack, subject_for(elsewhere))
    assert found and "the rollout with that id is of 'fault-late'" in found[0].reason
    assert not ended(history(stack, canary.deployment_id) or [])
    send(stack, AbortDeployment(**ids, requested_by=who))
    rolled = [
        e for e in follow(stack, canary.deployment_id, ended) if isinstance(e, TERMINAL_TYPES)
    ]
    if not (isinstance(rolled[0], DeploymentRolledBack) and rolled[0].trigger == "manual"):
        pytest.fail(f"the abort did not roll back: {rolled}")

    late = PauseDeployment(**ids, requested_by=who)
    send(stack, late)
    found = dead_letters_for(stack, subject_for(late))
    assert [letter.service for letter in found] == ["canary-controller"]
    assert "ended" in found[0].reason


def history(stack: Stack, deployment_id: str) -> list[DeploymentEvent] | None:
    async def read(js: JetStreamContext) -> list[DeploymentEvent]:
        return await bus.read_history(js, subjects.deployment_events(deployment_id))

    try:
        return on_bus(stack, read)
    except (bus.BusUnavailable, OSError, TimeoutError):
        return None  # nats-server is down: the supervisor brings it back


def test_a_deployment_reaches_its_one_outcome_through_a_nats_server_sigkill(
    stack: Stack, model: Path
) -> None:
    request = request_for(model, "fault-suite", "1")
    send(stack, request)
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


# --- what a user of the bus can try beyond malformed bodies ---------------------------------


def test_a_message_id_taken_by_another_user_does_not_drop_a_services_event(stack: Stack) -> None:
    """Message ids are predictable (`<deployment>:validated`) and any user may put any
    Nats-Msg-Id on what it may publish. The `client` sends junk carrying the validator's two
    ids for a deployment, then requests that deployment: JetStream answers the validator's
    publishes as duplicates of the junk, and before the check the deployment got no outcome,
    no notice and no dead letter."""
    deployment_id = new_deployment_id()

    async def take_ids(js: JetStreamContext) -> None:
        junk = subjects.stage("fault-model", new_deployment_id(), "requested")
        for name in ("validated", "blocked"):
            msg_id = subjects.message_id(deployment_id, name)
            await js.publish(junk, b"{}", headers={bus.MSG_ID_HEADER: msg_id})

    on_bus(stack, take_ids, user=nats_users.CLIENT)
    send(
        stack,
        DeploymentRequested(
            deployment_id=deployment_id, model="fault-model", version="1", location="/nonexistent"
        ),
    )
    events = follow(stack, deployment_id, ended, timeout=30)
    assert [type(e).__name__ for e in events] == [
        "DeploymentRequested",
        "ValidationCompleted",
        "DeploymentBlocked",
    ]


def test_an_event_on_another_events_subject_is_dead_lettered_not_believed(stack: Stack) -> None:
    """The validator may publish on `.failed` only among outcomes; the server checks the
    subject, never the body. A DeploymentPromoted body there made the notifier announce a
    promotion and `preflight status` show one."""
    deployment_id = new_deployment_id()
    forged = DeploymentPromoted(deployment_id=deployment_id, model="fault-model", version="6.6.6")

    async def forge(js: JetStreamContext) -> int:
        subject = subjects.outcome("fault-model", deployment_id, "failed")
        ack = await js.publish(subject, bus.encode(forged), stream=subjects.EVENTS_STREAM)
        return int(ack.seq)

    seq = on_bus(stack, forge, user="validator")
    deadline = time.monotonic() + 15
    letters: list[DeadLetter] = []
    while time.monotonic() < deadline and not letters:
        time.sleep(0.3)
        letters = [
            letter
            for letter in on_bus(stack, faults.read_dead_letters)
            if letter.stream_sequence == seq
        ]
    assert letters, "the forged outcome was not dead-lettered"
    assert "notifier" in {letter.service for letter in letters}
    assert "belongs on preflight.outcome.fault-model." in letters[0].reason
    assert history(stack, deployment_id) == []  # not history either


def test_a_request_whose_next_event_cannot_fit_fails_at_once(stack: Stack, tmp_path: Path) -> None:
    """A request just under max_payload fits, but the ValidationCompleted that embeds it and
    its report (each listed shard missing) does not: the handler was retried five times
    (about 18 s of checks) before its dead letter."""
    from services.stack.samples import write_sample_model

    deployment_id = new_deployment_id()
    model = write_sample_model(tmp_path / "m")

    def request_of(shards: int) -> DeploymentRequested:
        digests = {f"weights/shard-{i:05d}-of-99999.safetensors": "0" * 64 for i in range(shards)}
        return DeploymentRequested(
            deployment_id=deployment_id,
            model="fault-model",
            version="1",
            location=str(model),
            expected_sha256=digests,
        )

    shards = 9000
    while len(bus.encode(request_of(shards + 1))) < 1024 * 1024 - 2500:
        shards += 1  # the request fits with its headers; its report (~4 KB) added does not
    request = request_of(shards)
    send(stack, request)
    events = follow(stack, deployment_id, ended, timeout=30)
    assert [type(e).__name__ for e in events] == ["DeploymentRequested", "DeploymentFailed"]
    failed = events[-1]
    assert isinstance(failed, DeploymentFailed)
    assert "over the server's max_payload" in failed.error
    letters = [
        letter
        for letter in on_bus(stack, faults.read_dead_letters)
        if deployment_id in letter.subject
    ]
    assert [letter.delivery_attempt for letter in letters] == [1]
