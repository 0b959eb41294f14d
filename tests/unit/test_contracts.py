"""Events, subjects and message ids: the contract other systems build on."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from services.contracts import subjects
from services.contracts.events import (
    ALL_MESSAGES,
    ANY_OUTCOME,
    DEPLOYMENT_EVENT,
    CanaryStepStarted,
    DeploymentPromoted,
    DeploymentRequested,
    Message,
    ModelRef,
    PromoteDeployment,
    new_deployment_id,
)
from services.contracts.routing import message_id_for, subject_for


def request(**overrides: object) -> DeploymentRequested:
    fields: dict[str, object] = {
        "deployment_id": "d-1",
        "model": "org/chat-7b.v2",
        "version": "2024.06",
        "location": "/models/chat",
    }
    fields.update(overrides)
    return DeploymentRequested.model_validate(fields)


def matches(pattern: str, subject: str) -> bool:
    """NATS wildcard semantics: `*` one token, `>` one or more trailing tokens."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


def test_messages_are_frozen_strict_and_versioned() -> None:
    event = request()
    with pytest.raises(ValidationError):
        event.version = "3"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="Extra inputs"):
        request(surprise=1)
    assert event.schema_version == 1
    for model in ALL_MESSAGES:
        assert issubclass(model, Message)
        assert model.model_config.get("frozen") and model.model_config.get("extra") == "forbid"


@pytest.mark.parametrize(
    "location", ["/models/chat", "./rel/dir", "s3://bucket/key", "hf://org/model", "gs://b/m"]
)
def test_location_admits_paths_and_uris(location: str) -> None:
    assert request(location=location).location == location


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model", "has space"),
        ("model", "star*"),
        ("model", "gt>"),
        ("deployment_id", "a.b"),
        ("deployment_id", "x"),
        ("version", ""),
        ("location", ""),
    ],
)
def test_fields_that_would_break_subjects_are_rejected(field: str, value: str) -> None:
    with pytest.raises(ValidationError):
        request(**{field: value})


def test_expected_digests_must_be_sha256_hex() -> None:
    assert request(expected_sha256={"model.safetensors": "a" * 64}).expected_sha256
    with pytest.raises(ValidationError):
        request(expected_sha256={"model.safetensors": "not-a-digest"})


def test_naive_timestamps_are_rejected() -> None:
    with pytest.raises(ValidationError, match="time zone"):
        request(occurred_at=datetime(2026, 1, 1))  # naive on purpose


def test_round_trip_through_the_discriminated_union() -> None:
    original = request()
    parsed = DEPLOYMENT_EVENT.validate_json(original.model_dump_json())
    assert parsed == original
    promoted = DeploymentPromoted(deployment_id="d-1", model="m", version="1")
    assert isinstance(ANY_OUTCOME.validate_json(promoted.model_dump_json()), DeploymentPromoted)


def test_one_wildcard_takes_all_outcomes_or_one_models() -> None:
    mine = subjects.outcome("org/chat-7b.v2", "d-1", "promoted")
    other = subjects.outcome("org/chat-7b", "d-2", "blocked")
    stage = subjects.stage("org/chat-7b.v2", "d-1", "validated")
    assert matches(subjects.OUTCOME_SUBJECTS, mine) and matches(subjects.OUTCOME_SUBJECTS, other)
    assert not matches(subjects.OUTCOME_SUBJECTS, stage)
    assert matches(subjects.model_outcomes("org/chat-7b.v2"), mine)
    assert not matches(subjects.model_outcomes("org/chat-7b.v2"), other)
    assert matches(subjects.deployment_events("d-1"), mine)
    assert matches(subjects.deployment_events("d-1"), stage)
    assert not matches(subjects.deployment_events("d-1"), other)


def test_model_token_is_lossless_and_a_single_token() -> None:
    for name in ("org/chat-7b.v2", "a.b.c", "plain"):
        token = subjects.model_token(name)
        assert "." not in token
        assert subjects.model_from_token(token) == name
    with pytest.raises(ValueError, match="cannot be used"):
        subjects.model_token("bad name")


def test_deployment_subjects_have_five_tokens_and_commands_name_their_sender() -> None:
    event = request()
    for subject in (subject_for(event), subjects.outcome(event.model, "d-1", "rolled_back")):
        assert len(subject.split(".")) == 5
    command = subjects.command(event.model, "d-1", "abort", "alice.ops")
    assert command.split(".")[:5] == ["preflight", "command", "org/chat-7b%2Ev2", "d-1", "abort"]
    assert subjects.command_sender(command) == "alice.ops"
    assert subjects.command(event.model, "d-1", "abort", None).endswith(".anonymous")
    assert subjects.command_sender(subject_for(event)) is None
    assert matches(subjects.deployment_events("d-1"), command)
    with pytest.raises(ValueError, match="cannot be used"):
        subjects.user_token("a*b")


def test_message_ids_make_republishing_harmless() -> None:
    assert message_id_for(request()) == message_id_for(request()) == "d-1:requested"
    started = datetime(2026, 11, 25, 12, 0, 5, tzinfo=UTC)
    step = CanaryStepStarted(
        deployment_id="d-1",
        model="m",
        version="1",
        step_index=1,
        weight=50,
        duration_s=120,
        occurred_at=started,
    )
    assert message_id_for(step) == "d-1:canary_step:1:20261125T120005.000000"
    # The same step started again later (resumed after a hold) is a new event, not a duplicate.
    again = step.model_copy(update={"occurred_at": started.replace(minute=30)})
    assert message_id_for(again) != message_id_for(step)
    command = PromoteDeployment(deployment_id="d-1", model="m", version="1")
    with pytest.raises(ValueError, match="nonce"):
        message_id_for(command)
    assert message_id_for(command, "ab12") == "d-1:promote:ab12"


def test_deployment_ids_are_valid_and_sortable() -> None:
    first = new_deployment_id(datetime(2026, 1, 1, tzinfo=UTC))
    second = new_deployment_id(datetime(2026, 1, 2, tzinfo=UTC))
    assert re.fullmatch(r"d-\d{8}T\d{6}-[0-9a-f]{6}", first)
    assert first < second
    assert request(deployment_id=first).deployment_id == first


def test_urls_are_logged_without_credentials() -> None:
    from services.runtime.settings import redact_url

    assert redact_url("nats://user:pw@host:4222") == "nats://***@host:4222"
    assert (
        redact_url("http://a:b@ch:8123/db,nats://x:4222") == "http://***@ch:8123/db,nats://x:4222"
    )
    assert redact_url("chdb") == "chdb"


def test_an_oversized_dead_letter_is_truncated_with_a_digest() -> None:
    from services.runtime.service import MAX_DEAD_LETTER_PAYLOAD, make_dead_letter

    letter = make_dead_letter(
        service="s",
        subject="x",
        payload=b"\xff" * (MAX_DEAD_LETTER_PAYLOAD * 3),
        headers=None,
        reason="bad",
        attempt=1,
    )
    assert letter.payload_b64 is not None
    assert len(letter.model_dump_json()) < 1024 * 1024
    assert "truncated" in letter.reason and "sha256" in letter.reason


@pytest.mark.parametrize(
    "name", ["a.", "a..b", "org/..", "org/", "org//m", "org/.hidden", "x" * 129]
)
def test_model_names_nats_kv_cannot_key_are_refused_at_the_request(name: str) -> None:
    # They used to pass validation and the benchmark, then fail in the controller with
    # InvalidKeyError (issue #13). One rule for subjects and KV keys, in the contracts.
    with pytest.raises(ValidationError):
        ModelRef(name=name, version="1", location="/m")


@pytest.mark.parametrize("name", ["org/m.v2", "meta-llama/Llama-3.1-8B-Instruct", "gpt2", "a_b-c"])
def test_hub_style_model_names_are_keys_and_subject_tokens(name: str) -> None:
    from nats.js.kv import VALID_KEY_RE  # nats-py's own rule for keys

    ModelRef(name=name, version="1", location="/m")
    assert VALID_KEY_RE.match(name)
    assert "." not in subjects.model_token(name)


@pytest.mark.parametrize(
    "location",
    ["https://user:secret@models.example.com/chat/", "s3://AKIA:key@bucket/p/",
     "https://models.example.com/chat/?X-Amz-Signature=abc", "https://h/base/#frag"],
)  # fmt: skip
def test_a_location_with_credentials_is_refused_before_it_reaches_an_event(location: str) -> None:
    with pytest.raises(ValidationError) as caught:
        ModelRef(name="org/m", version="1", location=location)
    (error,) = caught.value.errors()
    assert "every event" in error["msg"]
    assert "secret" not in error["msg"] and "abc" not in error["msg"]  # what a dead letter says


@pytest.mark.parametrize(
    "location", ["hf://acme/chat-7b@v2.1", "hf://acme/chat@refs/pr/1", "s3://b/models/chat/",
                 "https://models.example.com/chat/", "/models/chat", "file:///models/chat"],
)  # fmt: skip
def test_remote_locations_are_admitted(location: str) -> None:
    assert ModelRef(name="org/m", version="1", location=location).location == location
