"""The embedded stack's supervisor brings a killed nats-server back on its port and store."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from services.contracts import subjects
from services.runtime import bus, nats_users
from services.runtime.settings import Settings
from services.stack.supervisor import STACK_FILE, Stack


@pytest.mark.integration
def test_a_killed_nats_server_is_restarted_on_the_same_port_and_store(tmp_path: Path) -> None:
    said: list[str] = []
    stack = Stack(Settings(data_dir=tmp_path / "data"), say=said.append, services=())
    stack.start()
    try:
        assert stack.nats is not None and stack.nats.proc is not None
        url, first_pid = stack.nats.url, stack.nats.proc.pid
        admin = stack.settings_as(nats_users.ADMIN)

        async def publish() -> int:
            nc = await bus.connect(admin, "restart-test")
            try:
                js = nc.jetstream()
                ack = await js.publish(subjects.stage("m", "d-1", "requested"), b"{}")
                return ack.seq
            finally:
                await nc.close()

        assert asyncio.run(publish()) == 1
        os.kill(first_pid, signal.SIGKILL)
        stack.nats.proc.wait(timeout=10)
        stack.check_children()  # what `preflight up` runs every half second

        assert stack.nats.url == url, "restarted on another port: services would not find it"
        assert stack.nats.proc.pid != first_pid
        info = json.loads((tmp_path / "data" / STACK_FILE).read_text())
        assert info["nats_pid"] == stack.nats.proc.pid and info["nats_restarts"] == 1
        assert info["nats_url"] == url
        assert any("nats-server exited" in line for line in said)
        # The same store: the stream and its message survived, the next one follows.
        assert asyncio.run(publish()) == 2
    finally:
        stack.stop()


@pytest.mark.integration
def test_a_killed_envoy_is_restarted_on_the_same_ports_with_its_routes(tmp_path: Path) -> None:
    """`--data-plane envoy`: Envoy is the inference port; dead, it comes back there with the
    xDS files the controller wrote (they are on disk), so the weights in force survive."""
    import socket
    from urllib.parse import urlparse

    from services.contracts.events import Route, RouteTarget
    from services.traffic import build

    said: list[str] = []
    settings = Settings(data_dir=tmp_path / "data", data_plane="envoy")
    stack = Stack(settings, say=said.append, services=())
    stack.start()
    try:
        assert stack.envoy is not None
        first_pid, admin = stack.envoy.proc.pid, stack.envoy.admin_url
        upstream = "http://127.0.0.1:9"
        route = Route(
            model="org/m",
            stable=RouteTarget(deployment_id="d-1", version="1", upstream=upstream),
            canary=RouteTarget(deployment_id="d-2", version="2", upstream=upstream),
            canary_weight=5,
        )

        async def scenario() -> None:
            envoy = stack.envoy
            assert envoy is not None
            options = {"xds_dir": str(envoy.xds_dir), "admin_url": admin}
            router = build("envoy", options, settings)
            try:
                await router.apply(route)
                assert await confirmed(router, route)
                os.kill(first_pid, signal.SIGKILL)
                await asyncio.to_thread(envoy.proc.wait, 10)
                await asyncio.to_thread(stack.check_children)  # as `preflight up` does
                assert await confirmed(router, route)  # loaded again from the files on disk
            finally:
                await router.aclose()

        asyncio.run(scenario())
        assert stack.envoy.proc.pid != first_pid and stack.envoy.admin_url == admin
        assert any("envoy exited" in line for line in said)
        info = json.loads((tmp_path / "data" / STACK_FILE).read_text())
        assert info["envoy"]["pid"] == stack.envoy.proc.pid and info["envoy"]["restarts"] == 1
        listener = urlparse(stack.router_url)
        with socket.create_connection((listener.hostname, listener.port or 80), timeout=5):
            pass  # the inference port is Envoy's listener again
    finally:
        stack.stop()


async def confirmed(router: Any, route: Any) -> bool:
    for _ in range(100):
        if (await router.read(route)).confirmed:
            return True
        await asyncio.sleep(0.05)
    return False
