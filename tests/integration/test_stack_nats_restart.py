"""The embedded stack's supervisor brings a killed nats-server back on its port and store."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

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
