"""Envoy response flags -> the record's error kind (services/envoy/access_log.error_kind)."""

from __future__ import annotations

from envoy.data.accesslog.v3 import accesslog_pb2  # type: ignore[import-untyped]

from services.envoy.access_log import FLAG_KINDS, error_kind


def flags(*names: str) -> object:
    entry = accesslog_pb2.ResponseFlags()
    for name in names:
        setattr(entry, name, True)
    return entry


def test_no_flag_is_no_error_kind() -> None:
    assert error_kind(flags(), "via_upstream") is None


def test_every_flag_maps_to_its_kind() -> None:
    for flag, kind in FLAG_KINDS:
        assert error_kind(flags(flag), "") == kind, flag


def test_the_first_flag_in_table_order_wins_whatever_order_they_were_set() -> None:
    assert error_kind(flags("downstream_remote_reset", "upstream_request_timeout"), "") == "timeout"
    assert error_kind(flags("local_reset", "upstream_connection_failure"), "") == "connect"


def test_a_connect_failure_by_timeout_says_so() -> None:
    got = error_kind(
        flags("upstream_connection_failure"),
        "upstream_reset_before_response_started{connection_timeout}",
    )
    assert got == "connect_timeout"


def test_a_flag_preflight_does_not_know_is_not_an_error_kind() -> None:
    assert error_kind(flags("response_from_cache_filter"), "") is None
