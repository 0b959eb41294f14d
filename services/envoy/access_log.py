"""One Envoy HTTP access-log entry (`envoy.data.accesslog.v3.HTTPAccessLogEntry`) as the request
record the built-in router publishes; pure, no I/O.

Who the request was for comes from the request headers the routes set and the access log sends
(config.LOGGED_REQUEST_HEADERS): model, role, version, deployment id. Any Envoy (Envoy Gateway,
Istio, a hand-written one) that sets those four on its canary routes feeds preflight the same way.

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

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from pydantic import ValidationError

from services.contracts.events import RequestRecord
from services.envoy.config import DEPLOYMENT_HEADER, ROLE_HEADER, VERSION_HEADER
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


def to_record(entry: Any) -> RequestRecord | Unmapped:
    """The request record of one `HTTPAccessLogEntry`, or why there is none."""
    common = entry.common_properties
    headers = entry.request.request_headers
    if not common.upstream_cluster:
        # Answered by Envoy itself (no_model, unknown_model): not a request to either version.
        return Unmapped("local_reply", "entry without an upstream cluster (a local reply)")
    missing = [
        name
        for name in (MODEL_HEADER.lower(), ROLE_HEADER, VERSION_HEADER)
        if not headers.get(name)
    ]
    if missing:
        return Unmapped(
            "missing_header",
            f"entry for cluster {common.upstream_cluster!r} lacks request header(s) "
            f"{', '.join(missing)}: the route must set them (docs/data-planes/envoy.md)",
        )
    role = headers[ROLE_HEADER]
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
    else:  # an Envoy that does not log details: trust the code unless the upstream failed
        from_upstream = not any(getattr(flags, f, False) for f in _UPSTREAM_FAILURES)
    status = code if from_upstream else 0
    if kind is None and status >= 500:
        kind = "http_5xx"
    ttfb = (
        _seconds(common.time_to_first_upstream_rx_byte) * 1000.0
        if common.HasField("time_to_first_upstream_rx_byte")
        else None
    )
    try:
        return RequestRecord(
            ts=datetime.fromtimestamp(
                common.start_time.seconds + common.start_time.nanos / 1e9, UTC
            ),
            deployment_id=headers.get(DEPLOYMENT_HEADER, ""),
            model=headers[MODEL_HEADER.lower()],
            version=headers[VERSION_HEADER],
            role=role,
            latency_ms=latency * 1000.0,
            ttfb_ms=ttfb,
            status=status,
            error_kind=kind,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"]))
        return Unmapped("invalid_record", f"record does not validate: {where}: {first['msg']}")
