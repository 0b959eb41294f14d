"""The router's route watch against review 13's freeze, on a real nats-server with the shipped
configuration: `subscriber` (read-only dashboards) aims deliveries of its own consumers at the
watch's inbox, read from the monitoring port, and the ordered consumer resumes the routes
stream at the events stream's sequence. The router must still follow an abort to weight 0."""

from __future__ import annotations

import asyncio
import json
import secrets
import urllib.request
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS

from services.contracts import subjects
from services.contracts.events import Route, RouteTarget
from services.router.routes import RouteTable
from services.router.watch import RouteWatcher
from services.runtime import aio, bus, nats_server, nats_users
from services.runtime.settings import Settings

pytestmark = pytest.mark.integration

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "nats" / "nats.conf"


def route(weight: float) -> bytes:
    return (
        Route(
            model="chat",
            stable=RouteTarget(deployment_id="d-stable", version="1", upstream="http://stable"),
            canary=RouteTarget(deployment_id="d-canary", version="2", upstream="http://canary"),
            canary_weight=weight,
            updated_at=datetime.now(UTC),
        )
        .model_dump_json()
        .encode()
    )


async def live(watcher: RouteWatcher) -> None:
    for _ in range(200):
        if watcher.live:
            return
        await aio.sleep(0.05)
    raise AssertionError(f"the route watch is not live: {watcher.problem}")


def weight(table: RouteTable) -> float | None:
    found = table.get("chat")
    return None if found is None else found.canary_weight


@pytest.fixture
def passwords() -> dict[str, str]:
    return {user: secrets.token_hex(16) for user in nats_users.users(CONFIG)}


@pytest.fixture
def server(tmp_path: Path, passwords: dict[str, str]) -> Iterator[nats_server.NatsServer]:
    variables = nats_users.users(CONFIG)
    env = {variables[user]: password for user, password in passwords.items()}
    running = nats_server.NatsServer(tmp_path / "nats", config=CONFIG, env=env).start()
    try:
        yield running
    finally:
        running.stop()


class Users:
    def __init__(self, url: str, passwords: dict[str, str]) -> None:
        self.url, self.passwords, self.open = url, passwords, list[NATS]()

    async def connect(self, user: str, name: str | None = None) -> NATS:
        nc = await nats.connect(
            self.url,
            user=user,
            password=self.passwords[user],
            inbox_prefix=bus.inbox_prefix(user),
            name=name or user,
            allow_reconnect=False,
        )
        self.open.append(nc)
        return nc


@pytest.fixture
async def users(server: nats_server.NatsServer, passwords: dict[str, str]) -> AsyncIterator[Users]:
    group = Users(server.url, passwords)
    admin = await group.connect("admin")
    settings = Settings(nats_url=server.url, nats_user="admin", nats_password=passwords["admin"])
    await bus.ensure_topology(admin.jetstream(), settings)
    try:
        yield group
    finally:
        for nc in group.open:
            await nc.close()


def watch_inboxes(monitor_url: str, connection: str) -> list[str]:
    """What anyone who reaches the monitoring port reads: each connection's subscriptions."""
    url = f"{monitor_url}/connz?subs=detail&limit=1024"
    with urllib.request.urlopen(url, timeout=5) as answer:  # noqa: S310 (a local server)
        found = json.loads(answer.read())
    return [
        sub["subject"]
        for conn in found.get("connections", [])
        if conn.get("name") == connection
        for sub in conn.get("subscriptions_list_detail", [])
        if sub["subject"].count(".") == 1  # the watch's deliver inbox, not the request mux
    ]


async def new_inbox(monitor_url: str, connection: str, known: set[str]) -> str:
    for _ in range(100):
        fresh = [s for s in watch_inboxes(monitor_url, connection) if s not in known]
        if fresh:
            return fresh[0]
        await aio.sleep(0.05)
    raise AssertionError("the watch's inbox is not listed")


@pytest.mark.timeout(120)
async def test_a_frozen_route_watch_still_follows_an_abort(
    users: Users, server: nats_server.NatsServer
) -> None:
    controller = await users.connect("canary-controller")
    kv = await controller.jetstream().key_value(subjects.ROUTES_BUCKET)
    await kv.put("chat", route(50))
    client = await users.connect("client")
    for i in range(300):  # traffic on the events stream: its sequence runs far ahead
        await client.jetstream().publish(f"preflight.stage.other.d-{i:04d}.requested", b"{}")
    router = await users.connect("router", name="router-under-attack")
    table = RouteTable()
    watcher = RouteWatcher(router.jetstream(), table, check_s=1.0)
    task = asyncio.create_task(watcher.run())
    try:
        await live(watcher)
        await kv.put("chat", route(40))
        await aio.sleep(0.5)
        assert weight(table) == 40

        # The attack, as the subscriber user can make it.
        subscriber = await users.connect("subscriber", name="dashboard")
        first = await new_inbox(server.monitor_url, "router-under-attack", set())
        for name in ("dash1", "dash2"):
            created = await subscriber.request(
                f"$JS.API.CONSUMER.CREATE.{subjects.EVENTS_STREAM}.{name}",
                json.dumps(
                    {
                        "stream_name": subjects.EVENTS_STREAM,
                        "config": {
                            "name": name,
                            "durable_name": name,
                            "deliver_policy": "last",
                            "ack_policy": "none",
                            "filter_subject": "preflight.stage.>",
                        },
                    }
                ).encode(),
                timeout=5,
            )
            assert "error" not in json.loads(created.data), created.data
        pull = f"$JS.API.CONSUMER.MSG.NEXT.{subjects.EVENTS_STREAM}"
        await subscriber.publish(f"{pull}.dash1", b'{"batch":1,"no_wait":true}', reply=first)
        await subscriber.flush()
        second = await new_inbox(server.monitor_url, "router-under-attack", {first})
        await subscriber.publish(f"{pull}.dash2", b'{"batch":1,"no_wait":true}', reply=second)
        await subscriber.flush()
        await aio.sleep(12)  # two idle heartbeats: the ordered consumer resumes far ahead

        for _ in range(3):  # the controller aborts the canary
            await kv.put("chat", route(0))
            await aio.sleep(0.3)
        for _ in range(100):  # within the watch check's interval and its second of grace
            if weight(table) == 0:
                break
            await aio.sleep(0.1)
        assert weight(table) == 0
        assert watcher.restarts >= 1 and watcher.live  # live throughout: the table was current
        await kv.put("chat", route(10))  # followed by the watch again, not only the check
        await aio.sleep(0.5)
        assert weight(table) == 10
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.timeout(60)
async def test_a_stream_whose_last_message_is_gone_is_not_a_missed_change(
    users: Users,
) -> None:
    controller = await users.connect("canary-controller")
    kv = await controller.jetstream().key_value(subjects.ROUTES_BUCKET)
    await kv.put("chat", route(50))
    await kv.put("other", route(5))
    admin = await users.connect("admin")
    routes = await admin.jetstream().key_value(subjects.ROUTES_BUCKET)
    await routes.delete("other")
    await routes.purge_deletes(olderthan=-1)  # the marker goes: no message for "other" is left
    last = (await admin.jetstream().stream_info(f"KV_{subjects.ROUTES_BUCKET}")).state.last_seq
    router = await users.connect("router")
    table = RouteTable()
    watcher = RouteWatcher(router.jetstream(), table, catch_up_s=0.1)
    task = asyncio.create_task(watcher.run())
    try:
        await live(watcher)
        assert watcher.seen < last  # the watch never delivers a message that is gone
        await watcher.check()  # no WatchBehind: nothing was missed, and it says so no more
        assert watcher.seen == last and watcher.live
        assert set(table.routes) == {"chat"}
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
