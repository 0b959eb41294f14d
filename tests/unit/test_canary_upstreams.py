"""Saying why a rollout has no traffic: the route's upstreams, one TCP connect each."""

from __future__ import annotations

import asyncio
import socket
from datetime import UTC, datetime

import pytest

from services.canary_controller.upstreams import TcpProbe, address, unreachable
from services.contracts.events import RouteTarget
from services.metrics.queries import RoleWindow, WindowResult

T0 = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def window(canary: int, stable: int) -> WindowResult:
    def role(name: str, n: int) -> RoleWindow:
        return RoleWindow(
            role=name,  # type: ignore[arg-type]
            requests=n,
            errors=0,
            p50_ms=None,
            p95_ms=None,
            p99_ms=None,
            latencies_ms=(),
        )

    return WindowResult(
        deployment_id="d-1",
        start=T0,
        end=T0,
        canary=role("canary", canary),
        stable=role("stable", stable),
    )


class FakeProbe:
    def __init__(self, problems: dict[str, str]) -> None:
        self.problems = problems
        self.tried: list[str] = []

    async def problem(self, url: str) -> str | None:
        self.tried.append(url)
        return self.problems.get(url)


CANARY = RouteTarget(deployment_id="d-1", version="v2", upstream="http://127.0.0.1:9")
STABLE = RouteTarget(deployment_id="d-0", version="v1", upstream="http://user:pw@10.0.0.5:8000")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:9", ("127.0.0.1", 9)),
        ("http://models.internal/v1", ("models.internal", 80)),
        ("https://models.internal", ("models.internal", 443)),
        ("http://[::1]:8000", ("::1", 8000)),
        ("grpc://models:50051", None),
        ("http://", None),
        ("http://host:99999", None),
        ("not a url", None),
    ],
)
def test_address(url: str, expected: tuple[str, int] | None) -> None:
    assert address(url) == expected


async def test_only_a_role_without_requests_is_probed_and_credentials_are_not_repeated() -> None:
    probe = FakeProbe({CANARY.upstream or "": "refuses connections", STABLE.upstream or "": "x"})
    found = await unreachable(window(0, 500), CANARY, STABLE, probe)
    assert found == ["the canary upstream http://127.0.0.1:9 refuses connections"]
    assert probe.tried == [CANARY.upstream]
    found = await unreachable(window(0, 0), CANARY, STABLE, probe)
    assert found[1] == "the stable upstream http://***@10.0.0.5:8000 x"


async def test_reachable_upstreams_and_missing_windows_say_nothing() -> None:
    assert await unreachable(window(0, 0), CANARY, STABLE, FakeProbe({})) == []
    assert await unreachable(None, CANARY, STABLE, FakeProbe({"x": "y"})) == []


async def test_a_target_without_an_endpoint_is_named_without_a_probe() -> None:
    probe = FakeProbe({})
    no_endpoint = RouteTarget(deployment_id="d-1", version="v2")
    found = await unreachable(window(0, 10), no_endpoint, STABLE, probe)
    assert found == ["the canary (v2) has no endpoint: a router cannot send it traffic"]
    assert probe.tried == []


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # nothing listens on it now


async def test_the_tcp_probe_tells_refused_from_accepted() -> None:
    probe = TcpProbe(timeout_s=1.0)
    assert await probe.problem(f"http://127.0.0.1:{closed_port()}") == "refuses connections"
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        assert await probe.problem(f"http://127.0.0.1:{port}/v1") is None
    finally:
        server.close()
        await server.wait_closed()
    assert await probe.problem("ftp://x") == "is not an http(s) URL with a host"
