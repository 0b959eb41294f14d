"""The spine on a real nats-server with JetStream: topology, dedup, durability, dead letters."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from faststream.nats import TestApp
from nats.js import JetStreamContext

from services.contracts import subjects
from services.contracts.events import (
    BenchmarkCompleted,
    DeploymentPromoted,
    DeploymentRequested,
    Route,
    StageReport,
    Status,
    ValidationCompleted,
)
from services.contracts.routing import subject_for
from services.runtime import bus, registry
from services.runtime.nats_server import NatsServer
from services.runtime.service import ServiceApp
from services.runtime.settings import Settings
from tests.inbox_replay import aim_push_consumers

pytestmark = pytest.mark.integration


def request(
    deployment_id: str, model: str = "org/m.v2", location: str = "/models/none"
) -> DeploymentRequested:
    return DeploymentRequested(
        deployment_id=deployment_id, model=model, version="2", location=location
    )


@contextlib.asynccontextmanager
async def running(*apps: ServiceApp) -> AsyncIterator[None]:
    async with contextlib.AsyncExitStack() as stack:
        for svc in apps:
            await stack.enter_async_context(TestApp(svc.app))
        yield


async def collect(
    js: JetStreamContext, filter_subject: str, count: int, timeout: float = 10.0
) -> list[Any]:
    events: list[Any] = []

    async def take() -> None:
        async for event in bus.follow(js, filter_subject):
            events.append(event)
            if len(events) == count:
                return

    await asyncio.wait_for(take(), timeout)
    return events


async def stream_count(js: JetStreamContext, filter_subject: str, stream: str) -> int:
    info = await js.stream_info(stream, subjects_filter=filter_subject)
    return sum((info.state.subjects or {}).values())


async def test_topology_is_idempotent_and_follows_config_changes(
    js: JetStreamContext, settings: Settings
) -> None:
    await bus.ensure_topology(js, settings)  # the fixture already ran it once
    info = await js.stream_info(subjects.EVENTS_STREAM)
    assert getattr(info.config.storage, "value", info.config.storage) == "file"
    assert info.config.duplicate_window == settings.events_duplicate_window_s
    assert info.config.max_bytes == settings.events_max_bytes  # a flood ages out, never fills
    letters = await js.stream_info(subjects.DEADLETTER_STREAM)
    assert letters.config.max_bytes == settings.deadletter_max_bytes
    assert getattr(letters.config.discard, "value", letters.config.discard) == "old"
    changed = settings.model_copy(
        update={"events_duplicate_window_s": 600.0, "max_deliver": 7, "events_max_bytes": 1 << 30}
    )
    await bus.ensure_topology(js, changed)
    info = await js.stream_info(subjects.EVENTS_STREAM)
    assert info.config.duplicate_window == 600.0
    assert info.config.max_bytes == 1 << 30
    consumer = await js.consumer_info(subjects.EVENTS_STREAM, subjects.VALIDATOR_DURABLE)
    assert consumer.config.max_deliver == 7
    for bucket in (subjects.ROUTES_BUCKET, subjects.ROLLOUTS_BUCKET):
        status = await (await js.key_value(bucket)).status()
        assert status.bucket == bucket
    names = {c.name for c in await js.consumers_info(subjects.EVENTS_STREAM)}
    assert {
        subjects.VALIDATOR_DURABLE,
        subjects.BENCHMARKER_DURABLE,
        subjects.NOTIFIER_DURABLE,
    } <= names


async def test_a_deployment_travels_the_pipeline_to_an_outcome(
    js: JetStreamContext, settings: Settings, sample_model: Path
) -> None:
    apps = [registry.build(n, settings) for n in ("validator", "benchmarker", "canary-controller")]
    async with running(*apps):
        await bus.publish_event(js, request("d-flow", location=str(sample_model)))
        # A real benchmark of the sample model runs in between: ~10 s on a quiet 2-core
        # machine, so 10 s was a coin toss (CI at bcef7fe); the flow, not its speed, is tested.
        events = await collect(js, subjects.deployment_events("d-flow"), 4, timeout=90.0)
    assert [type(e) for e in events] == [
        DeploymentRequested,
        ValidationCompleted,
        BenchmarkCompleted,
        DeploymentPromoted,
    ], [type(e).__name__ for e in events]
    promoted = events[-1]
    # The sample has random weights and a character tokenizer: its benchmark runs (the first
    # version: nothing to compare with), and with no endpoint there is no canary to run. A model
    # without tokenizer files is blocked by the validator (tests/unit/validator).
    assert promoted.stages[0].status.value == "passed"
    assert promoted.stages[-1].status.value == "skipped"
    kv = await js.key_value(subjects.ROUTES_BUCKET)
    entry = await kv.get("org/m.v2")
    route = Route.model_validate_json(entry.value or b"")
    assert route.stable is not None and route.stable.version == "2"
    assert route.canary_weight == 0


async def test_republishing_a_request_is_harmless(js: JetStreamContext, settings: Settings) -> None:
    first = await bus.publish_event(js, request("d-dup"))
    again = await bus.publish_event(js, request("d-dup"))
    assert again.duplicate and again.seq == first.seq
    async with running(registry.build("validator", settings)):
        await collect(js, subjects.stage("org/m.v2", "d-dup", "validated"), 1)
        await asyncio.sleep(0.5)  # give a second, wrong, ValidationCompleted time to appear
    for name in ("requested", "validated"):
        subject = subjects.stage("org/m.v2", "d-dup", name)
        assert await stream_count(js, subject, subjects.EVENTS_STREAM) == 1, name


async def test_a_reused_deployment_id_for_another_model_is_still_deduplicated(
    js: JetStreamContext,
) -> None:
    """`preflight deploy --id` reused for another model was deduplicated before the duplicate
    read-back, and is still: the stored request is of the same kind, not a stolen id."""
    first = await bus.publish_event(js, request("d-reuse", model="org/a"))
    again = await bus.publish_event(js, request("d-reuse", model="org/b"))
    assert again.duplicate and again.seq == first.seq


async def test_an_id_taken_on_another_kind_of_subject_does_not_drop_the_event(
    js: JetStreamContext,
) -> None:
    """Junk on a `.requested` subject carrying the validator's message id: the validator's
    event is published under an id of its own content, not dropped as a duplicate."""
    junk = subjects.stage("org/m.v2", "d-other", "requested")
    await js.publish(junk, b"{}", headers={bus.MSG_ID_HEADER: "d-taken:validated"})
    event = ValidationCompleted(
        deployment_id="d-taken",
        model="org/m.v2",
        version="2",
        report=StageReport(stage="validation", status=Status.PASSED, reason="ok"),
        request=request("d-taken"),
    )
    ack = await bus.publish_event(js, event)
    assert not ack.duplicate
    stored = await js.get_msg(subjects.EVENTS_STREAM, seq=ack.seq, direct=True)
    assert stored.subject == subject_for(event)
    assert (stored.headers or {})[bus.MSG_ID_HEADER].startswith("d-taken:validated~")
    again = await bus.publish_event(js, event)  # a retry of the same event: deduplicated
    assert again.duplicate and again.seq == ack.seq


async def test_a_service_that_was_down_catches_up(js: JetStreamContext, settings: Settings) -> None:
    for i in range(3):
        await bus.publish_event(js, request(f"d-late{i}"))
    async with running(registry.build("validator", settings)):
        done = await collect(js, subjects.stage_filter("validated"), 3)
    assert sorted(e.deployment_id for e in done) == ["d-late0", "d-late1", "d-late2"]


async def test_instances_of_one_service_split_the_work_exactly_once(
    js: JetStreamContext, settings: Settings
) -> None:
    instances = [
        registry.build("validator", settings.model_copy(update={"instance": f"v{i}"}))
        for i in range(2)
    ]
    n = 40
    async with running(*instances):
        await asyncio.gather(*(bus.publish_event(js, request(f"d-q{i:02d}")) for i in range(n)))
        done = await collect(js, subjects.stage_filter("validated"), n, timeout=20)
        await asyncio.sleep(0.5)
    ids = [e.deployment_id for e in done]
    assert sorted(ids) == [f"d-q{i:02d}" for i in range(n)]
    total = await stream_count(js, subjects.stage_filter("validated"), subjects.EVENTS_STREAM)
    assert total == n, "a request was handled twice"
    workers = {e.report.service for e in done}
    assert workers == {"v0", "v1"}, f"one instance took everything: {workers}"


async def dead_letters(js: JetStreamContext, count: int) -> list[dict[str, Any]]:
    sub = await js.subscribe(
        subjects.DEADLETTER_SUBJECTS, stream=subjects.DEADLETTER_STREAM, ordered_consumer=True
    )
    try:
        return [json.loads((await sub.next_msg(timeout=10)).data) for _ in range(count)]
    finally:
        await sub.unsubscribe()


async def test_malformed_events_are_dead_lettered_and_the_service_goes_on(
    js: JetStreamContext, settings: Settings
) -> None:
    async with running(registry.build("validator", settings)):
        await js.publish(
            "preflight.stage.m.d-bad.requested", b'{"model": 1}', stream=subjects.EVENTS_STREAM
        )
        await bus.publish_event(js, request("d-good"))
        [letter] = await dead_letters(js, 1)
        [done] = await collect(js, subjects.stage_filter("validated"), 1)
    assert letter["service"] == "validator"
    assert letter["subject"] == "preflight.stage.m.d-bad.requested"
    assert letter["payload_text"] == '{"model": 1}'
    assert "deployment_id: Field required" in letter["reason"]
    assert done.deployment_id == "d-good"


async def test_what_the_schemas_reject_is_dead_lettered_not_coerced(
    js: JetStreamContext, settings: Settings
) -> None:
    # Lax pydantic reads 1796000000 as a datetime and "2" as an int; schemas/ says a date-time
    # string and an integer, and so must the services (issue #13).
    lax = json.loads(request("d-lax").model_dump_json())
    lax["occurred_at"] = 1796000000
    lax["target"]["gpu_count"] = "2"
    async with running(registry.build("validator", settings)):
        await js.publish(
            subject_for(request("d-lax")),
            json.dumps(lax).encode(),
            stream=subjects.EVENTS_STREAM,
        )
        [letter] = await dead_letters(js, 1)
    assert "occurred_at" in letter["reason"] and "gpu_count" in letter["reason"], letter["reason"]


async def test_a_handler_that_keeps_failing_is_retried_then_dead_lettered(
    js: JetStreamContext, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def broken(*args: Any) -> Any:
        calls.append("x")
        raise RuntimeError("disk on fire")

    from services.validator import app as validator_app

    monkeypatch.setattr(validator_app, "run_checks", broken)
    handle: Callable[..., Any] = validator_app.handle_requested
    assert handle is not None
    async with running(registry.build("validator", settings)):
        await bus.publish_event(js, request("d-fail"))
        [letter] = await dead_letters(js, 1)
    assert len(calls) == settings.max_deliver
    assert letter["delivery_attempt"] == settings.max_deliver
    assert "RuntimeError: disk on fire" in letter["reason"]
    assert json.loads(letter["payload_text"])["deployment_id"] == "d-fail"
    # ... and the deployment ends, so `preflight deploy --wait` does not wait forever.
    events = await collect(js, subjects.deployment_events("d-fail"), 2)
    assert events[-1].type == "DeploymentFailed"
    assert events[-1].stage == "validator"


async def service_inboxes(monitor_url: str, connection_prefix: str) -> list[str]:
    """What anyone on the host reads from the monitoring port: each subscription of a
    service's connections, its pull inbox among them."""
    import urllib.request

    def read() -> dict[str, Any]:
        url = f"{monitor_url}/connz?subs=detail"  # http://127.0.0.1:<port>, from the server
        with urllib.request.urlopen(url, timeout=5) as reply:  # noqa: S310
            found: dict[str, Any] = json.load(reply)
            return found

    connz = await asyncio.to_thread(read)
    return [
        sub["subject"]
        for conn in connz["connections"]
        if str(conn.get("name", "")).startswith(connection_prefix)
        for sub in conn.get("subscriptions_list_detail", [])
    ]


async def test_stored_events_aimed_at_a_service_s_inbox_are_not_handled(
    js: JetStreamContext,
    settings: Settings,
    nats_server: NatsServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A consumer of one's own delivering into a service's pull inbox (nats-server does not
    check a deliver subject: nats-io/nats-server#8274), or a pull from it with that inbox as
    the reply subject, or a direct get answered there, replays stored events into the service.
    A replayed refused promote promoted a held canary. The service handles only what its own
    durable delivered."""
    handled: list[str] = []

    def counting(request: DeploymentRequested, *args: Any) -> Any:
        handled.append(request.deployment_id)
        raise RuntimeError("counted")

    from services.validator import app as validator_app

    monkeypatch.setattr(validator_app, "run_checks", counting)
    stored = subjects.stage("org/m.v2", "d-replayed", "requested")
    async with running(registry.build("validator", settings)):
        await bus.publish_event(js, request("d-replayed"))
        await dead_letters(js, 1)  # handled max_deliver times by its durable, then given up
        assert handled.count("d-replayed") == settings.max_deliver
        inboxes = await service_inboxes(nats_server.monitor_url, "preflight-validator-")
        assert inboxes, inboxes
        await aim_push_consumers(js, inboxes, stored, "replay-push")
        for i, inbox in enumerate(inboxes):
            await js.add_consumer(
                subjects.EVENTS_STREAM, name=f"replay-pull-{i}", filter_subject=stored
            )
            nc = js._nc
            await nc.publish(
                f"$JS.API.CONSUMER.MSG.NEXT.{subjects.EVENTS_STREAM}.replay-pull-{i}",
                json.dumps({"batch": 1}).encode(),
                reply=inbox.replace("*", "y"),
            )
            await nc.publish(
                f"$JS.API.DIRECT.GET.{subjects.EVENTS_STREAM}",
                json.dumps({"last_by_subj": stored}).encode(),
                reply=inbox.replace("*", "z"),
            )
        await asyncio.sleep(2.0)
    assert handled.count("d-replayed") == settings.max_deliver  # before: replays handled too


async def test_listing_rollouts_leaves_no_consumer_behind(js: JetStreamContext) -> None:
    """nats-py's `kv.keys()` made a consumer per call that lingered: 300 GETs of the rollout
    page (no password) took the server from 579 to 879 consumers, and at its limit of 1,000
    the controller's ticks failed."""
    from services.canary_controller.engine import RolloutStore

    kv = await js.key_value(subjects.ROLLOUTS_BUCKET)
    for i in range(3):
        await kv.put(f"d-list-{i}", b"{}")
    await kv.delete("d-list-2")
    assert sorted(await bus.kv_keys(js, subjects.ROLLOUTS_BUCKET)) == [
        "d-list-0",
        "d-list-1",
        "d-list-2",  # a delete marker: `get` answers None for it
    ]
    before = (await js.account_info()).consumers
    store = RolloutStore(kv)
    for _ in range(50):
        assert await store.all() == []  # "{}" does not parse as a rollout: skipped, logged
    assert (await js.account_info()).consumers == before
    assert await bus.kv_keys(js, subjects.LEASES_BUCKET) == []


async def test_bootstrap_says_why_a_durable_could_not_be_made(
    js: JetStreamContext, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It used to suppress any error on its second try and say "ready" for a durable that did
    not exist (the server's consumer limit reached)."""
    from nats.js.errors import BadRequestError

    await js.delete_consumer(subjects.EVENTS_STREAM, subjects.NOTIFIER_DURABLE)
    real = js.add_consumer

    async def refused(stream: str, config: Any = None, **kwargs: Any) -> Any:
        if config is not None and config.durable_name == subjects.NOTIFIER_DURABLE:
            raise BadRequestError(description="maximum consumers limit reached")
        return await real(stream, config, **kwargs)

    monkeypatch.setattr(js, "add_consumer", refused)
    said: list[str] = []
    with pytest.raises(bus.TopologyMissing, match="notifier could not be created: maximum"):
        await bus.ensure_topology(js, settings, said.append)
    assert not any("notifier: ready" in line for line in said)


async def test_only_the_first_request_under_an_id_is_validated(
    js: JetStreamContext, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    handled: list[str] = []

    def counting(request: DeploymentRequested, *args: Any) -> Any:
        handled.append(request.model)
        raise RuntimeError("counted")

    from services.validator import app as validator_app

    monkeypatch.setattr(validator_app, "run_checks", counting)
    first = request("d-first-wins", model="evil/m")
    later = request("d-first-wins", model="org/m.v2")
    async with running(registry.build("validator", settings)):
        headers = {**bus.headers_for(first), bus.MSG_ID_HEADER: "mallory-1"}  # its own id
        await js.publish(subject_for(first), bus.encode(first), headers=headers)
        await bus.publish_event(js, later)  # not a duplicate: stored, and refused
        letters = await dead_letters(js, 2)
    refused = [x for x in letters if "was first requested for evil/m" in x["reason"]]
    assert refused and "a later request under it is not validated" in refused[0]["reason"]
    assert set(handled) == {"evil/m"}


def rust_panic() -> BaseException:
    """The real `pyo3_runtime.PanicException`, as tokenizers raises it on a hostile file."""
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = {
        "version": "1.0",
        "normalizer": {"type": "Precompiled", "precompiled_charsmap": "AQ=="},
        "model": {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"},
    }
    try:
        tokenizers.Tokenizer.from_str(json.dumps(tokenizer))
    except BaseException as exc:  # the point: it is not an Exception
        return exc
    raise AssertionError("tokenizers no longer panics on this charsmap")


async def test_a_rust_panic_in_a_handler_ends_the_deployment_and_the_service_goes_on(
    js: JetStreamContext, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    panic = rust_panic()
    assert not isinstance(panic, Exception)
    calls: list[str] = []

    def panicking(request: DeploymentRequested, *args: Any) -> Any:
        calls.append(request.deployment_id)
        if request.deployment_id == "d-panic":
            raise panic
        raise RuntimeError("reached the next request")

    from services.validator import app as validator_app

    monkeypatch.setattr(validator_app, "run_checks", panicking)
    async with running(registry.build("validator", settings)):
        await bus.publish_event(js, request("d-panic"))
        [letter] = await dead_letters(js, 1)
        # Before: the panic escaped the handler; no ack, no dead letter, and the message came
        # back to crash the next instance. Now the same instance takes the next request.
        await bus.publish_event(js, request("d-after"))
        await dead_letters(js, 2)
    assert calls.count("d-panic") == settings.max_deliver
    assert "d-after" in calls
    assert "PanicException" in letter["reason"]
    events = await collect(js, subjects.deployment_events("d-panic"), 2)
    assert events[-1].type == "DeploymentFailed"


async def test_history_reads_back_one_deployment_and_one_model(
    js: JetStreamContext, settings: Settings
) -> None:
    await bus.publish_event(js, request("d-h1", model="alpha"))
    await bus.publish_event(js, request("d-h2", model="beta.v1"))
    assert [
        e.deployment_id for e in await bus.read_history(js, subjects.deployment_events("d-h1"))
    ] == ["d-h1"]
    assert [e.model for e in await bus.read_history(js, subjects.model_events("beta.v1"))] == [
        "beta.v1"
    ]
    assert await bus.read_history(js, subjects.deployment_events("d-none")) == []


async def test_a_corrupted_upload_is_blocked_by_the_validator(
    js: JetStreamContext, settings: Settings, tmp_path: Path
) -> None:
    from services.contracts.events import DeploymentBlocked
    from services.stack.samples import write_sample_model

    model = write_sample_model(tmp_path / "model")
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # a single flipped bit: what a bad upload looks like
    weights.write_bytes(bytes(data))
    # No controller here: chDB allows one engine path per process, and the flow test has it.
    apps = [registry.build(n, settings) for n in ("validator", "benchmarker")]
    async with running(*apps):
        await bus.publish_event(js, request("d-corrupt", location=str(model)))
        events = await collect(js, subjects.deployment_events("d-corrupt"), 3)
        await asyncio.sleep(0.5)  # nothing may follow a block
    assert [type(e) for e in events] == [
        DeploymentRequested,
        ValidationCompleted,
        DeploymentBlocked,
    ]
    blocked = events[-1]
    assert blocked.reasons == (
        "checksum: model.safetensors: sha256 mismatch (corrupted or altered)",
    )
    report = events[1].report
    assert {c.name: c.status.value for c in report.checks}["checksum"] == "failed"
    total = await stream_count(js, subjects.deployment_events("d-corrupt"), subjects.EVENTS_STREAM)
    assert total == 3
