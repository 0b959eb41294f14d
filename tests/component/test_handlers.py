"""Handlers on FastStream's in-memory TestNatsBroker: parse, call the domain, publish."""

from __future__ import annotations

import json
from typing import Any

from faststream.nats import JStream, TestNatsBroker
from faststream.nats.annotations import NatsMessage

from services.contracts import subjects
from services.contracts.events import DeploymentRequested
from services.runtime import registry
from services.runtime.service import ServiceApp
from services.runtime.settings import Settings

REQUEST = DeploymentRequested(deployment_id="d-1", model="org/m.v2", version="2", location="/m")


def in_memory(svc: ServiceApp) -> ServiceApp:
    """A service for FastStream's in-memory broker, whose messages carry no JetStream metadata:
    the check that only the service's own durable delivered a message cannot apply there
    (tests/integration/test_bus.py tries it on a real server)."""
    svc.require_own_delivery = False
    return svc


def collector(svc: Any, subject: str, stream: str = subjects.EVENTS_STREAM) -> list[dict[str, Any]]:
    """Subscribe an in-memory sink to `subject` of `stream`; returns the list it fills."""
    seen: list[dict[str, Any]] = []

    @svc.broker.subscriber(subject, stream=JStream(stream, declare=False))
    async def sink(msg: NatsMessage) -> None:
        seen.append(json.loads(msg.body))

    return seen


async def test_validator_publishes_validation_completed() -> None:
    svc = in_memory(registry.build("validator", Settings(instance="v-test")))
    completed = collector(svc, subjects.stage_filter("validated"))
    async with TestNatsBroker(svc.broker) as broker:
        await broker.publish(
            REQUEST.model_dump_json().encode(),
            subjects.stage(REQUEST.model, REQUEST.deployment_id, "requested"),
            stream=subjects.EVENTS_STREAM,
        )
    assert len(completed) == 1
    event = completed[0]
    assert event["type"] == "ValidationCompleted"
    assert event["report"]["status"] == "failed"  # /m does not exist: fail closed
    assert "/m: no such file or directory" in event["report"]["reason"]
    assert event["request"]["deployment_id"] == "d-1"


async def test_malformed_request_goes_to_dead_letters_with_the_reason() -> None:
    svc = in_memory(registry.build("validator", Settings(instance="v-test")))
    dead = collector(svc, subjects.DEADLETTER_SUBJECTS, subjects.DEADLETTER_STREAM)
    completed = collector(svc, subjects.stage_filter("validated"))
    async with TestNatsBroker(svc.broker) as broker:
        await broker.publish(
            b'{"type": "DeploymentRequested", "model": "m"}',
            "preflight.stage.m.d-9.requested",
            stream=subjects.EVENTS_STREAM,
        )
        await broker.publish(
            b"\xff\xfe not json", "preflight.stage.m.d-8.requested", stream=subjects.EVENTS_STREAM
        )
    assert completed == []
    assert [d["service"] for d in dead] == ["validator", "validator"]
    assert "deployment_id: Field required" in dead[0]["reason"]
    assert dead[0]["payload_text"] == '{"type": "DeploymentRequested", "model": "m"}'
    assert dead[0]["subject"] == "preflight.stage.m.d-9.requested"
    assert dead[1]["payload_b64"] and dead[1]["payload_text"] is None


async def test_notifier_renders_every_outcome_it_receives(capsys: Any) -> None:
    from services.contracts.events import DeploymentBlocked
    from services.notifier.app import build
    from services.notifier.dedup import MemoryLedger
    from services.notifier.history import NoRequests

    svc = in_memory(
        build(Settings(instance="n-test"), ledger=MemoryLedger(), requests=NoRequests())
    )
    blocked = DeploymentBlocked(
        deployment_id="d-1",
        model="m",
        version="2",
        stage="validation",
        reasons=("checksum: model.safetensors differs",),
    )
    async with TestNatsBroker(svc.broker) as broker:
        await broker.publish(
            blocked.model_dump_json().encode(),
            subjects.outcome("m", "d-1", "blocked"),
            stream=subjects.EVENTS_STREAM,
        )
    printed = capsys.readouterr().out
    assert "BLOCKED: m 2 (d-1)" in printed
    assert "checksum: model.safetensors differs" in printed


async def test_a_command_from_a_user_not_allowed_to_send_it_is_dead_lettered() -> None:
    """The sender is the subject's last token (the server checks it); the body's claim is
    replaced, and a user outside `command_users` gets a dead letter, not a rollout change."""
    from services.contracts.events import AbortDeployment, Requester

    svc = in_memory(
        registry.build("canary-controller", Settings(instance="c-test", controller_http_port=0))
    )
    dead = collector(svc, subjects.DEADLETTER_SUBJECTS, subjects.DEADLETTER_STREAM)
    claimed = Requester(user="mallory", nats_user="client")  # a claim in the body, ignored
    command = AbortDeployment(deployment_id="d-1", model="m", version="1", requested_by=claimed)
    async with TestNatsBroker(svc.broker) as broker:
        await broker.publish(
            command.model_dump_json().encode(),
            subjects.command("m", "d-1", "abort", "router"),
            stream=subjects.EVENTS_STREAM,
        )
    (letter,) = dead
    assert "NATS user 'router' may not send commands" in letter["reason"]
