"""Envoy access-log entries -> request records: the receiver's fast JSON encoder says exactly what
the validated `RequestRecord` says, and refuses what it refuses (services/envoy/access_log)."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2  # type: ignore[import-untyped]

from services.contracts.events import RequestMetricsBatch, RequestRecord
from services.envoy import config
from services.envoy.access_log import FLAG_KINDS, RecordEncoder, Unmapped, to_record
from services.router.metrics import batch_json


def entry(
    *,
    start_ns: int = 1_780_000_000_123_456_789,
    latency_ns: int | None = 500_000,
    duration_ns: int | None = None,
    ttfb_ns: int | None = 400_000,
    code: int | None = 200,
    details: str = "via_upstream",
    flags: tuple[str, ...] = (),
    cluster: str = "m-stable",
    headers: dict[str, str] | None = None,
) -> Any:
    e = accesslog_pb2.HTTPAccessLogEntry()
    common = e.common_properties
    common.upstream_cluster = cluster
    # Fields set directly, not FromNanoseconds: a hostile sender is not held to its range checks.
    common.start_time.seconds, common.start_time.nanos = divmod(start_ns, 10**9)
    if latency_ns is not None:
        common.time_to_last_downstream_tx_byte.FromNanoseconds(latency_ns)
    if duration_ns is not None:
        common.duration.FromNanoseconds(duration_ns)
    if ttfb_ns is not None:
        common.time_to_first_upstream_rx_byte.FromNanoseconds(ttfb_ns)
    for name in flags:
        setattr(common.response_flags, name, True)
    given = {
        "x-preflight-model": "org/chat-7b",
        config.ROLE_HEADER: "canary",
        config.VERSION_HEADER: "v2",
        config.DEPLOYMENT_HEADER: "d-123",
    }
    given.update(headers or {})
    for key, value in given.items():
        if value:
            e.request.request_headers[key] = value
    if code is not None:
        e.response.response_code.value = code
    e.response.response_code_details = details
    return e


def same_answer(e: Any, encoder: RecordEncoder | None = None) -> RequestRecord | Unmapped:
    """Asserts the encoder and `to_record` agree on `e`; returns to_record's answer."""
    reference = to_record(e)
    encoded = (encoder or RecordEncoder()).encode(e)
    if isinstance(reference, Unmapped):
        assert encoded == reference
        return reference
    assert isinstance(encoded, bytes), encoded
    assert RequestRecord.model_validate_json(encoded) == reference
    assert json.loads(encoded) == json.loads(reference.model_dump_json())
    return reference


def test_a_plain_entry_encodes_to_the_records_own_json_byte_for_byte() -> None:
    e = entry()
    record = to_record(e)
    assert isinstance(record, RequestRecord)
    assert RecordEncoder().encode(e) == record.model_dump_json().encode()
    assert record.ts.microsecond == 123_456  # nanoseconds cut to microseconds, not rounded
    assert record.latency_ms == 0.5 and record.ttfb_ms == 0.4 and record.status == 200


def test_only_the_routes_own_true_marks_a_record_pinned() -> None:
    assert not to_record(entry()).pinned  # type: ignore[union-attr]
    for value, pinned in (("true", True), ("false", False), ("1", False), ("", False)):
        record = same_answer(entry(headers={config.PINNED_HEADER: value}))
        assert isinstance(record, RequestRecord) and record.pinned is pinned


def test_random_entries_agree_with_the_validated_record() -> None:
    rng = random.Random(15)
    encoder = RecordEncoder()  # one encoder throughout: its caches must not leak between entries
    flag_names = [flag for flag, _ in FLAG_KINDS]
    for _ in range(2000):
        latency = rng.choice([None, 0, 1, 999, rng.randrange(10**12)])
        e = entry(
            start_ns=rng.choice([0, 10**9, rng.randrange(2 * 10**18)]),
            latency_ns=latency,
            duration_ns=rng.choice([None, rng.randrange(10**10)]),
            ttfb_ns=rng.choice([None, 0, rng.randrange(10**10)]),
            code=rng.choice([None, 200, 404, 500, 503]),
            details=rng.choice(["via_upstream", "", "upstream_reset_before_response_started"]),
            flags=tuple(rng.sample(flag_names, rng.choice([0, 0, 1, 2]))),
            headers={
                config.ROLE_HEADER: rng.choice(["stable", "canary"]),
                config.VERSION_HEADER: rng.choice(["v1", "v2", "2026-12-01"]),
                config.DEPLOYMENT_HEADER: rng.choice(["", "d-1", "d-2"]),
                config.PINNED_HEADER: rng.choice(["", "true", "false", "TRUE"]),
            },
        )
        same_answer(e, encoder)


def test_what_the_record_refuses_the_encoder_refuses_with_the_same_reason() -> None:
    cases = {
        "local_reply": entry(cluster=""),
        "missing_header": entry(headers={config.VERSION_HEADER: ""}),
        "bad_role": entry(headers={config.ROLE_HEADER: "shadow"}),
        "no_timing": entry(latency_ns=None, duration_ns=None),
    }
    invalid = {
        "model pattern": entry(headers={"x-preflight-model": "no spaces allowed"}),
        "version pattern": entry(headers={config.VERSION_HEADER: "v/../../x"}),
        "deployment id too long": entry(headers={config.DEPLOYMENT_HEADER: "d" * 65}),
        "negative latency": entry(latency_ns=-5),
        "negative ttfb": entry(ttfb_ns=-1_000_000),
        "status above 999": entry(code=70_000),
        "start beyond year 9999": entry(start_ns=300_000_000_000 * 10**9),
    }
    for reason, e in cases.items():
        got = same_answer(e)
        assert isinstance(got, Unmapped) and got.reason == reason, (reason, got)
    for what, e in invalid.items():
        got = same_answer(e)
        assert isinstance(got, Unmapped) and got.reason == "invalid_record", (what, got)
    # Outside the fast path's range but a record all the same: both say so.
    assert isinstance(same_answer(entry(start_ns=-(10**9))), RequestRecord)


def test_a_bad_identity_is_refused_every_time_not_only_the_first() -> None:
    encoder = RecordEncoder()
    bad = entry(headers={"x-preflight-model": "bad model"})
    assert isinstance(encoder.encode(bad), Unmapped)
    assert isinstance(encoder.encode(bad), Unmapped)
    assert isinstance(encoder.encode(entry()), bytes)


def test_the_identity_cache_is_bounded() -> None:
    encoder = RecordEncoder(max_identities=8)
    for i in range(50):
        got = encoder.encode(entry(headers={config.DEPLOYMENT_HEADER: f"d-{i}"}))
        assert isinstance(got, bytes) and f'"d-{i}"'.encode() in got
        assert len(encoder._identities) <= 8


def test_header_values_are_escaped_as_json() -> None:
    # A deployment id is not pattern-checked by the record: quotes and controls must not break
    # the batch's JSON.
    e = entry(headers={config.DEPLOYMENT_HEADER: 'd"1\\\n'})
    got = same_answer(e)
    assert isinstance(got, RequestRecord) and got.deployment_id == 'd"1\\\n'


def test_a_batch_of_encoded_and_plain_records_is_a_valid_batch() -> None:
    encoder = RecordEncoder()
    plain = to_record(entry(code=503))
    assert isinstance(plain, RequestRecord)
    encoded = [encoder.encode(entry(start_ns=10**18 + i)) for i in range(3)]
    assert all(isinstance(x, bytes) for x in encoded)
    parts: list[RequestRecord | bytes] = [plain, *(x for x in encoded if isinstance(x, bytes))]
    batch = RequestMetricsBatch.model_validate_json(batch_json("b" * 16, "envoy-h", parts))
    assert batch.batch_id == "b" * 16 and batch.source == "envoy-h"
    assert batch.records[0] == plain and len(batch.records) == 4
    assert batch.records[0].error_kind == "http_5xx"
    only_plain = batch_json("c" * 16, "r", [plain])
    assert RequestMetricsBatch.model_validate_json(only_plain).records == (plain,)


@pytest.mark.parametrize(
    ("method", "code", "votes"),
    [(3, 200, True), (3, 500, True), (0, 200, True), (1, 200, False), (2, 200, False),
     (7, 204, False), (3, 404, False), (3, 405, False), (3, 400, False), (3, 422, False),
     (3, 501, False), (3, 302, True)],
)  # fmt: skip
def test_only_inference_calls_become_records(method: int, code: int, votes: bool) -> None:
    """Review 13: GET/HEAD/OPTIONS to a path the model does not serve diluted a failing canary
    (an entry that does not say its method votes, as before)."""
    e = entry(code=code)
    e.request.request_method = method
    found = same_answer(e)
    if votes:
        assert isinstance(found, RequestRecord)
    else:
        assert isinstance(found, Unmapped) and found.reason == "not_inference"


def test_latency_is_timed_from_the_last_byte_of_the_upload() -> None:
    """Review 13 poisoned a healthy canary's p95 by trickling request bodies in: Envoy's
    duration starts at the first byte, so the upload is taken off, as the built-in router does."""
    e = entry(latency_ns=650_000_000, ttfb_ns=640_000_000)
    e.common_properties.time_to_last_rx_byte.FromNanoseconds(600_000_000)
    found = same_answer(e)
    assert isinstance(found, RequestRecord)
    assert round(found.latency_ms, 3) == 50.0
    assert found.ttfb_ms is not None and round(found.ttfb_ms, 3) == 40.0
