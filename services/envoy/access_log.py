"""One Envoy HTTP access-log entry (`envoy.data.accesslog.v3.HTTPAccessLogEntry`) as the request
record the built-in router publishes; pure, no I/O.

Who the request was for comes from the request headers the routes set and the access log sends
(config.LOGGED_REQUEST_HEADERS): model, role, version, deployment id, and whether the pin header
chose the role (`x-preflight-pinned: true`; records so marked stay out of the canary analysis).
Any Envoy (Envoy Gateway, Istio, a hand-written one) that sets them on its canary routes feeds
preflight the same way.

    status      the upstream's HTTP status; 0 when no response came back from it (the built-in
                router's rule), told by `response_code_details` == "via_upstream"
    error_kind  the first of the response flags below that is set, in this order; else
                `http_5xx` for an upstream 5xx
    latency_ms  start to the last byte sent downstream (`time_to_last_downstream_tx_byte`;
                the stream's `duration` when the client left before that)
    ttfb_ms     start to the first byte from the upstream (`time_to_first_upstream_rx_byte`)
    ttft_ms, itl_ms, output_tokens
                never set: Envoy sees bytes, not tokens, and its first upstream byte is the
                time to first byte (headers, a role-only event), not to the first token
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from pydantic import ValidationError

from services.contracts.events import RequestRecord, votes
from services.envoy.config import DEPLOYMENT_HEADER, PINNED_HEADER, ROLE_HEADER, VERSION_HEADER
from services.router.routes import MODEL_HEADER

FLAG_KINDS: Final = (
    ("upstream_connection_failure", "connect"),  # UF
    ("upstream_retry_limit_exceeded", "retries_exhausted"),  # URX
    ("upstream_request_timeout", "timeout"),  # UT
    ("upstream_max_stream_duration_reached", "timeout"),  # UMSDR
    ("duration_timeout", "timeout"),  # DT
    ("upstream_remote_reset", "reset"),  # UR
    ("upstream_connection_termination", "reset"),  # UC
    ("local_reset", "reset"),  # LR
    ("upstream_protocol_error", "protocol_error"),  # UPE
    ("upstream_overflow", "overflow"),  # UO: circuit breaker open
    ("no_healthy_upstream", "no_healthy_upstream"),  # UH
    ("no_cluster_found", "no_cluster"),  # NC
    ("no_route_found", "no_route"),  # NR
    ("dns_resolution_failure", "dns"),  # DF
    ("stream_idle_timeout", "timeout"),  # SI
    ("overload_manager", "overload"),  # OM
    ("rate_limited", "rate_limited"),  # RL
    ("fault_injected", "fault_injected"),  # FI
    ("downstream_connection_termination", "client_closed"),  # DC
    ("downstream_remote_reset", "client_closed"),  # DR
    ("downstream_protocol_error", "client_protocol_error"),  # DPE
)
"""Envoy response flag (field of `ResponseFlags`) -> error kind; the built-in router's words
(connect, connect_timeout, timeout, reset, client_closed) where one means the same."""

_UPSTREAM_FAILURES: Final = frozenset(
    flag for flag, kind in FLAG_KINDS if kind not in ("client_closed", "client_protocol_error")
)
_ROLES: Final = ("stable", "canary")
_MODEL: Final = MODEL_HEADER.lower()
_IDENTITY: Final = (_MODEL, ROLE_HEADER, VERSION_HEADER)


@dataclass(frozen=True)
class Unmapped:
    """An entry that is not a record: `reason` is the counter's label, `detail` the log line."""

    reason: str
    detail: str


def _seconds(duration: Any) -> float:
    return float(duration.seconds) + float(duration.nanos) / 1e9


_FLAG_ORDER: Final = {flag: i for i, (flag, _) in enumerate(FLAG_KINDS)}


def error_kind(flags: Any, details: str) -> str | None:
    # Only the flags that are set (ListFields; most of the time none), not 21 getattr calls.
    set_flags = [
        _FLAG_ORDER[f.name] for f, on in flags.ListFields() if on and f.name in _FLAG_ORDER
    ]
    if not set_flags:
        return None
    kind = FLAG_KINDS[min(set_flags)][1]
    if kind == "connect" and "connection_timeout" in details:
        return "connect_timeout"
    return kind


_METHODS: Final = {
    1: "GET",
    2: "HEAD",
    3: "POST",
    4: "PUT",
    5: "DELETE",
    6: "CONNECT",
    7: "OPTIONS",
    8: "TRACE",
    9: "PATCH",
}
"""envoy.config.core.v3.RequestMethod by number (0, METHOD_UNSPECIFIED, is absent)."""

_Fields = tuple[int, int, str, str, str, str, float, float | None, int, str | None, bool]
"""What one entry says: start seconds, start nanos, deployment id, model, version, role,
latency ms, ttfb ms, status, error kind, pinned."""


def read_entry(entry: Any) -> _Fields | Unmapped:
    """The record's fields from one `HTTPAccessLogEntry` (not validated yet), or why there are
    none. Shared by `to_record` and `RecordEncoder`, so the two cannot disagree."""
    common = entry.common_properties
    headers = entry.request.request_headers
    if not common.upstream_cluster:
        # Answered by Envoy itself (no_model, unknown_model): not a request to either version.
        return Unmapped("local_reply", "entry without an upstream cluster (a local reply)")
    model = headers.get(_MODEL)
    role = headers.get(ROLE_HEADER)
    version = headers.get(VERSION_HEADER)
    if not (model and role and version):
        missing = [
            name for name, got in zip(_IDENTITY, (model, role, version), strict=True) if not got
        ]
        return Unmapped(
            "missing_header",
            f"entry for cluster {common.upstream_cluster!r} lacks request header(s) "
            f"{', '.join(missing)}: the route must set them (docs/data-planes/envoy.md)",
        )
    if role not in _ROLES:
        return Unmapped("bad_role", f"{ROLE_HEADER} is {role[:40]!r}, not stable or canary")
    if not common.HasField("start_time"):
        return Unmapped("no_start_time", "entry without start_time")
    if common.HasField("time_to_last_downstream_tx_byte"):
        latency = _seconds(common.time_to_last_downstream_tx_byte)
    elif common.HasField("duration"):
        latency = _seconds(common.duration)
    else:
        return Unmapped("no_timing", "entry without time_to_last_downstream_tx_byte or duration")
    response = entry.response
    details = response.response_code_details
    code = response.response_code.value if response.HasField("response_code") else 0
    flags = common.response_flags
    kind = error_kind(flags, details)
    if details:
        from_upstream = details == "via_upstream"
    elif kind is None:  # no flag at all: nothing failed upstream
        from_upstream = True
    else:  # an Envoy that does not log details: trust the code unless the upstream failed
        from_upstream = not any(on and f.name in _UPSTREAM_FAILURES for f, on in flags.ListFields())
    status = code if from_upstream else 0
    if kind is None and status >= 500:
        kind = "http_5xx"
    method = _METHODS.get(entry.request.request_method, "POST")  # unlogged: as before, it votes
    if not votes(method, status):
        return Unmapped(
            "not_inference",
            f"{method} answered {status}: not an inference call, so not evidence about the model",
        )
    ttfb = (
        _seconds(common.time_to_first_upstream_rx_byte) * 1000.0
        if common.HasField("time_to_first_upstream_rx_byte")
        else None
    )
    if common.HasField("time_to_last_rx_byte"):
        # Timed from the request's last byte, as the built-in router times it: a client that
        # trickles its body in is not the model's latency (review 13).
        uploaded = _seconds(common.time_to_last_rx_byte)
        latency = max(latency - uploaded, 0.0)
        ttfb = max(ttfb - uploaded * 1000.0, 0.0) if ttfb is not None else None
    start = common.start_time
    return (
        int(start.seconds),
        int(start.nanos),
        headers.get(DEPLOYMENT_HEADER, ""),
        model,
        version,
        role,
        latency * 1000.0,
        ttfb,
        status,
        kind,
        headers.get(PINNED_HEADER) == "true",
    )


def _timestamp(seconds: int, nanos: int) -> datetime:
    """Exact to the microsecond (no float rounding), as RecordEncoder writes it."""
    return datetime.fromtimestamp(seconds, UTC).replace(microsecond=nanos // 1000)


def _validated(fields: _Fields) -> RequestRecord | Unmapped:
    seconds, nanos, deployment_id, model, version, role, latency, ttfb, status, kind, pinned = (
        fields
    )
    try:
        return RequestRecord(
            ts=_timestamp(seconds, nanos),
            deployment_id=deployment_id,
            model=model,
            version=version,
            role=role,  # checked against _ROLES in read_entry
            latency_ms=latency,
            ttfb_ms=ttfb,
            status=status,
            error_kind=kind,
            pinned=pinned,
        )
    except (ValidationError, ValueError, OverflowError, OSError) as exc:
        if not isinstance(exc, ValidationError):  # a start_time no datetime can hold
            return Unmapped("invalid_record", f"record does not validate: ts: {exc}")
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"]))
        return Unmapped("invalid_record", f"record does not validate: {where}: {first['msg']}")


def to_record(entry: Any) -> RequestRecord | Unmapped:
    """The request record of one `HTTPAccessLogEntry`, or why there is none."""
    fields = read_entry(entry)
    return fields if isinstance(fields, Unmapped) else _validated(fields)


_MAX_SECONDS: Final = 253_402_300_799  # 9999-12-31T23:59:59Z, the last second datetime holds


@dataclass
class RecordEncoder:
    """Entries straight to the JSON of their request records, for the receiver's hot path.

    `RequestRecord` is validated once per identity (deployment id, model, version, role): those
    four strings repeat on every entry of a rollout, and their patterns are most of pydantic's
    cost. The numbers are checked here against the same bounds the model states; anything outside
    them goes through `to_record` for its exact reason. The JSON is `RequestRecord`'s (same
    fields, same order; tests/unit/test_envoy_access_log.py parses one against the other).
    """

    max_identities: int = 4096
    _identities: dict[tuple[str, str, str, str], bytes] = field(default_factory=dict)
    _second: int = -1
    _second_text: str = ""

    def encode(self, entry: Any) -> bytes | Unmapped:
        """One entry as the JSON of its `RequestRecord`, or why it is no record."""
        fields = read_entry(entry)
        if isinstance(fields, Unmapped):
            return fields
        seconds, nanos, deployment_id, model, version, role, latency, ttfb, status, kind, pinned = (
            fields
        )
        if not (
            0 <= seconds <= _MAX_SECONDS
            and 0 <= nanos < 1_000_000_000
            and latency >= 0
            and (ttfb is None or ttfb >= 0)
            and status <= 999
        ):
            checked = _validated(fields)  # the exact reason (or a record after all)
            if isinstance(checked, Unmapped):
                return checked
            return checked.model_dump_json().encode()
        key = (deployment_id, model, version, role)
        head = self._identities.get(key)
        if head is None:
            checked = _validated(fields)
            if isinstance(checked, Unmapped):
                return checked
            if len(self._identities) >= self.max_identities:
                self._identities.clear()
            head = self._identities[key] = _identity_json(key)
        if seconds != self._second:
            self._second = seconds
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        micros = nanos // 1000
        ts = f"{self._second_text}.{micros:06d}Z" if micros else f"{self._second_text}Z"
        return b"".join(
            (
                b'{"schema_version":1,"ts":"',
                ts.encode(),
                head,
                f'"latency_ms":{latency!r},"ttfb_ms":{_number(ttfb)},"ttft_ms":null,'
                f'"itl_ms":null,"output_tokens":null,"status":{status},'
                f'"error_kind":{_KIND_JSON[kind]},"pinned":{_BOOL_JSON[pinned]}}}'.encode(),
            )
        )


def _number(value: float | None) -> str:
    return "null" if value is None else repr(value)


def _identity_json(key: tuple[str, str, str, str]) -> bytes:
    deployment_id, model, version, role = key
    return (
        f'","deployment_id":{json.dumps(deployment_id)},"model":{json.dumps(model)},'
        f'"version":{json.dumps(version)},"role":{json.dumps(role)},'
    ).encode()


_BOOL_JSON: Final = {True: "true", False: "false"}
_KIND_JSON: Final[dict[str | None, str]] = {
    None: "null",
    "http_5xx": '"http_5xx"',
    "connect_timeout": '"connect_timeout"',
    **{kind: json.dumps(kind) for _, kind in FLAG_KINDS},
}
