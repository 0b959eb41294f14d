"""Least privilege on a real nats-server running the shipped configuration, as an attacker tries it.

Both copies run: deploy/nats/nats.conf (docker-compose, `preflight up`) and the Kubernetes one,
deploy/k8s/base/config/nats.conf. The admin bootstraps the topology (`bus.ensure_topology`, what
`preflight bootstrap` runs); then every user tries every call in `CALLS` and the table of
user x call x (expected, got) must match. A call is "allowed" when the JetStream API answered it
(even with an error of its own) or a publish was not refused; "refused" when the server sent a
permissions violation. After the attacks the admin checks that nothing changed: every durable's
filter and pause state, every stream's limits and sources, the events stream's messages, the
routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from services.contracts import subjects
from services.runtime import bus, nats_server, nats_users
from services.runtime.registry import SERVICES
from services.runtime.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {
    "compose": ROOT / "deploy" / "nats" / "nats.conf",
    "kubernetes": ROOT / "deploy" / "k8s" / "base" / "config" / "nats.conf",
}
MODEL, DEPLOYMENT = "org/chat-7b.v2", "d-perm-1"
EVENTS, METRICS = subjects.EVENTS_STREAM, subjects.METRICS_STREAM
ROUTES_KV, ROLLOUTS_KV = f"KV_{subjects.ROUTES_BUCKET}", f"KV_{subjects.ROLLOUTS_BUCKET}"
OUTSIDE_DURABLE = "audit-log"  # an outside subscriber's own durable (docs/subscribing.md)

# Durable -> the users that may take work from it (INFO, MSG.NEXT, ACK).
OWNERS = {
    subjects.VALIDATOR_DURABLE: {"validator"},
    subjects.BENCHMARKER_DURABLE: {"benchmarker"},
    subjects.CONTROLLER_DURABLE: {"canary-controller"},
    subjects.CONTROLLER_COMMANDS_DURABLE: {"canary-controller"},
    subjects.NOTIFIER_DURABLE: {"notifier"},
    # With chDB the ingest runs inside the controller (nats.conf says so).
    subjects.INGEST_DURABLE: {"metrics-ingest", "canary-controller"},
}
# Every user but admin; services by their names (the Envoy access-log receiver is a data
# plane's record source and connects as `router`).
USERS = ("client", "subscriber", *(s for s in SERVICES if s != "envoy-receiver"))


@dataclass(frozen=True)
class Call:
    """One request (or publish, `reply=False`) a user might try, and who may make it."""

    name: str
    subject: str
    body: dict[str, object] | bytes
    allowed: frozenset[str]
    reply: bool = True

    def payload(self) -> bytes:
        return self.body if isinstance(self.body, bytes) else json.dumps(self.body).encode()


def durable_config(durable: str, **change: object) -> dict[str, object]:
    stream, filters = bus.consumer_filters(durable)
    config: dict[str, object] = {
        "durable_name": durable,
        "ack_policy": "explicit",
        "filter_subjects": list(filters),
    }
    return {"stream_name": stream, "config": config | change}


def calls() -> list[Call]:
    nobody: frozenset[str] = frozenset()
    year = (datetime.now(UTC) + timedelta(days=365)).isoformat()
    found: list[Call] = []
    for durable, owners in OWNERS.items():
        stream, _ = bus.consumer_filters(durable)
        own = frozenset(owners)
        found += [
            Call(f"info {durable}", f"$JS.API.CONSUMER.INFO.{stream}.{durable}", b"", own),
            Call(
                f"pull from {durable}",
                f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",
                {"batch": 1, "no_wait": True},
                own,
            ),
            Call(
                f"pause {durable} for a year",
                f"$JS.API.CONSUMER.PAUSE.{stream}.{durable}",
                {"pause_until": year},
                nobody,
            ),
            Call(
                f"change {durable}'s filter",
                f"$JS.API.CONSUMER.CREATE.{stream}.{durable}",
                durable_config(durable, filter_subjects=["preflight.nothing"]),
                nobody,
            ),
            Call(
                f"change {durable}'s filter (filtered create)",
                f"$JS.API.CONSUMER.CREATE.{stream}.{durable}.preflight.nothing",
                durable_config(durable, filter_subjects=None, filter_subject="preflight.nothing"),
                nobody,
            ),
            Call(
                f"change {durable}'s filter (legacy durable create)",
                f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{durable}",
                durable_config(durable, filter_subjects=["preflight.nothing"]),
                nobody,
            ),
            Call(
                # The bare create subject takes the consumer's name from the body, where no
                # deny can see it; the server refuses a `durable_name` there, but an update
                # by `name` rewrote the durable while the subscriber could use this subject.
                f"change {durable}'s filter (unnamed create, update by name)",
                f"$JS.API.CONSUMER.CREATE.{stream}",
                {
                    "stream_name": stream,
                    "action": "update",
                    "config": {
                        "name": durable,
                        "ack_policy": "explicit",
                        "filter_subject": "preflight.nothing",
                    },
                },
                nobody,
            ),
            Call(f"delete {durable}", f"$JS.API.CONSUMER.DELETE.{stream}.{durable}", b"", nobody),
        ]
    # Every publisher of events reads back a duplicate's stored message (bus.publish_checked).
    readers_of_events = frozenset(
        {"client", "notifier", "subscriber", "validator", "benchmarker", "canary-controller"}
    )
    found += [
        Call(
            "create a consumer of one's own (named in the subject)",
            f"$JS.API.CONSUMER.CREATE.{EVENTS}.outcomes-1.{subjects.OUTCOME_SUBJECTS}",
            {
                "stream_name": EVENTS,
                "config": {
                    "name": "outcomes-1",
                    "ack_policy": "none",
                    "filter_subject": subjects.OUTCOME_SUBJECTS,
                    "inactive_threshold": 60_000_000_000,
                },
            },
            frozenset({"subscriber"}),
        ),
        Call(
            "create an unnamed ephemeral consumer",
            f"$JS.API.CONSUMER.CREATE.{EVENTS}",
            {"stream_name": EVENTS, "config": {"ack_policy": "none"}},
            nobody,
        ),
        Call(
            "delete an outside subscriber's durable",
            f"$JS.API.CONSUMER.DELETE.{EVENTS}.{OUTSIDE_DURABLE}-victim",
            b"",
            frozenset({"subscriber"}),  # outside systems share that user: see docs
        ),
        Call(
            "route KV: add the metrics stream as a source",
            f"$JS.API.STREAM.UPDATE.{ROUTES_KV}",
            {
                "name": ROUTES_KV,
                "subjects": [f"$KV.{subjects.ROUTES_BUCKET}.>"],
                "sources": [
                    {
                        "name": METRICS,
                        "subject_transforms": [
                            {
                                "src": "preflight.metrics.>",
                                "dest": f"$KV.{subjects.ROUTES_BUCKET}.x",
                            }
                        ],
                    }
                ],
            },
            nobody,
        ),
        Call(
            "shrink the events stream to one message",
            f"$JS.API.STREAM.UPDATE.{EVENTS}",
            {"name": EVENTS, "subjects": [subjects.STAGE_SUBJECTS], "max_msgs": 1},
            nobody,
        ),
        Call("create a stream", "$JS.API.STREAM.CREATE.EVIL", {"name": "EVIL"}, nobody),
        Call("delete the events stream", f"$JS.API.STREAM.DELETE.{EVENTS}", b"", nobody),
        Call("purge the events stream", f"$JS.API.STREAM.PURGE.{EVENTS}", b"", nobody),
        Call(
            "delete a routes KV entry's message",
            f"$JS.API.STREAM.MSG.DELETE.{ROUTES_KV}",
            {"seq": 1},
            nobody,
        ),
        Call(
            "snapshot the events stream",
            f"$JS.API.STREAM.SNAPSHOT.{EVENTS}",
            {"deliver_subject": "_INBOX.snap"},
            nobody,
        ),
        Call("purge the account", "$JS.API.ACCOUNT.PURGE", b"", nobody),
        Call("list streams", "$JS.API.STREAM.LIST", {}, nobody),
        Call(
            "create a consumer on the metrics stream",
            f"$JS.API.CONSUMER.CREATE.{METRICS}",
            {"stream_name": METRICS, "config": {"ack_policy": "none"}},
            nobody,
        ),
        Call(
            "read the events stream (direct get)",
            f"$JS.API.DIRECT.GET.{EVENTS}",
            {"seq": 1, "next_by_subj": "preflight.>", "batch": 1},
            readers_of_events,
        ),
        Call(
            "read routes (direct get)",
            f"$JS.API.DIRECT.GET.{ROUTES_KV}.$KV.{subjects.ROUTES_BUCKET}.{MODEL}",
            b"",
            frozenset({"client", "router", "canary-controller"}),
        ),
        Call(
            "read router reports (direct get)",
            f"$JS.API.DIRECT.GET.KV_{subjects.ROUTER_STATUS_BUCKET}",
            {"seq": 1, "next_by_subj": f"$KV.{subjects.ROUTER_STATUS_BUCKET}.>", "batch": 1},
            frozenset({"canary-controller"}),
        ),
        Call(
            "read rollouts (direct get)",
            f"$JS.API.DIRECT.GET.{ROLLOUTS_KV}.$KV.{subjects.ROLLOUTS_BUCKET}.{DEPLOYMENT}",
            b"",
            frozenset({"client", "canary-controller"}),
        ),
    ]
    # Plain publishes: events, commands under another user's name, KV writes.
    publishes = {
        "request a deployment": (subjects.stage(MODEL, DEPLOYMENT, "requested"), {"client"}),
        "command as client": (
            subjects.command(MODEL, DEPLOYMENT, "promote", "client"),
            {"client"},
        ),
        "command as admin (forged)": (
            subjects.command(MODEL, DEPLOYMENT, "promote", "admin"),
            set(),
        ),
        "command as router": (subjects.command(MODEL, DEPLOYMENT, "abort", "router"), set()),
        "command without a sender": (f"preflight.command.{MODEL}.{DEPLOYMENT}.abort", set()),
        "validated": (subjects.stage(MODEL, DEPLOYMENT, "validated"), {"validator"}),
        "benchmarked": (subjects.stage(MODEL, DEPLOYMENT, "benchmarked"), {"benchmarker"}),
        "promoted": (subjects.outcome(MODEL, DEPLOYMENT, "promoted"), {"canary-controller"}),
        "failed": (
            subjects.outcome(MODEL, DEPLOYMENT, "failed"),
            {"validator", "benchmarker", "canary-controller", "notifier"},
        ),
        "metrics": (subjects.metrics("router-1"), {"router"}),
        "write a route": (f"$KV.{subjects.ROUTES_BUCKET}.{MODEL}", {"canary-controller"}),
        "write a rollout": (f"$KV.{subjects.ROLLOUTS_BUCKET}.{DEPLOYMENT}", {"canary-controller"}),
        "write the lease": (
            f"$KV.{subjects.LEASES_BUCKET}.canary-controller",
            {"canary-controller"},
        ),
        "write a notice": (f"$KV.{subjects.NOTICES_BUCKET}.{DEPLOYMENT}", {"notifier"}),
        # Only routers say what they serve: a forged report would let a weight count as applied.
        "report what a router serves": (
            f"$KV.{subjects.ROUTER_STATUS_BUCKET}.router-1",
            {"router"},
        ),
    }
    for name, (subject, allowed) in publishes.items():
        found.append(Call(name, subject, b"{}", frozenset(allowed), reply=False))
    return found


class Attacker:
    """One user's connection: fires every call, then tells which ones the server refused."""

    def __init__(self, user: str) -> None:
        self.user = user
        self.errors: list[str] = []
        self.changed = asyncio.Event()
        self.nc: NATS | None = None

    async def open(self, url: str, password: str) -> NATS:
        async def record(exc: Exception) -> None:
            self.errors.append(str(exc))
            self.changed.set()

        self.nc = await nats.connect(
            url,
            user=self.user,
            password=password,
            inbox_prefix=bus.inbox_prefix(self.user),
            error_cb=record,
            allow_reconnect=False,
        )
        return self.nc

    def refused(self) -> set[str]:
        pattern = r'permissions violation for (?:publish|subscription) to "(.+)"'
        found = (re.search(pattern, e) for e in self.errors)
        return {m.group(1) for m in found if m}

    async def attempt(self, attempts: list[Call]) -> dict[str, bool]:
        """Call name -> allowed? A refused request gets no answer; an allowed one does."""
        assert self.nc is not None
        answered: set[str] = set()
        prefix = f"{bus.inbox_prefix(self.user)}.calls"
        by_index = {str(i): call for i, call in enumerate(attempts)}

        async def on_reply(msg: Msg) -> None:
            answered.add(by_index[msg.subject.rsplit(".", 1)[1]].name)
            self.changed.set()

        sub = await self.nc.subscribe(f"{prefix}.*", cb=on_reply)
        for index, call in by_index.items():
            reply = f"{prefix}.{index}" if call.reply else ""
            await self.nc.publish(call.subject, call.payload(), reply=reply)
        await self.nc.flush(timeout=5)

        def settled() -> bool:
            """Every request answered or refused (a plain publish is only ever refused: the
            wait below gives late refusals their time)."""
            refused = self.refused()
            return all(c.name in answered or c.subject.lower() in refused for c in requests)

        requests = [c for c in attempts if c.reply]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(3):
                while not settled():
                    await self.changed.wait()
                    self.changed.clear()
        await asyncio.sleep(0.3)  # late refusals of plain publishes
        await sub.unsubscribe()
        refused = self.refused()
        return {c.name: c.subject.lower() not in refused for c in attempts}


@pytest.fixture(params=sorted(CONFIGS))
def config(request: pytest.FixtureRequest) -> Path:
    return CONFIGS[str(request.param)]


@pytest.fixture
def passwords(config: Path) -> dict[str, str]:
    return {user: secrets.token_hex(16) for user in nats_users.users(config)}


@pytest.fixture
def server(tmp_path: Path, config: Path, passwords: dict[str, str]) -> Iterator[str]:
    variables = nats_users.users(config)
    env = {variables[user]: password for user, password in passwords.items()}
    nats = nats_server.NatsServer(tmp_path / "nats", config=config, env=env).start()
    try:
        yield nats.url
    finally:
        nats.stop()


def settings_as(url: str, user: str, passwords: dict[str, str]) -> Settings:
    return Settings(nats_url=url, nats_user=user, nats_password=passwords[user])


def test_both_copies_are_the_same_and_valid(passwords: dict[str, str], config: Path) -> None:
    assert CONFIGS["kubernetes"].read_text() == CONFIGS["compose"].read_text(), (
        "run `.venv/bin/python deploy/render.py`"
    )
    variables = nats_users.users(config)
    env = {"PATH": os.environ.get("PATH", "")} | {variables[u]: p for u, p in passwords.items()}
    checked = subprocess.run(
        [str(nats_server.binary()), "-t", "-c", str(config)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr + checked.stdout
    assert set(variables) == {"admin", *USERS}


@contextlib.asynccontextmanager
async def as_user(url: str, user: str, passwords: dict[str, str]) -> AsyncIterator[Attacker]:
    attacker = Attacker(user)
    nc = await attacker.open(url, passwords[user])
    try:
        yield attacker
    finally:
        await nc.close()


async def snapshot(js: nats.js.JetStreamContext) -> dict[str, object]:
    """What an attack would change: durable filters and pauses, stream limits and sources,
    message counts, routes."""
    found: dict[str, object] = {}
    for durable in OWNERS:
        stream, _ = bus.consumer_filters(durable)
        info = await js.consumer_info(stream, durable)
        raw = info.config.as_dict()
        found[f"consumer {durable}"] = (
            raw.get("filter_subjects") or raw.get("filter_subject"),
            raw.get("pause_until"),
        )
    for stream in (EVENTS, METRICS, ROUTES_KV, ROLLOUTS_KV):
        info = await js.stream_info(stream)
        found[f"stream {stream}"] = (
            info.config.max_msgs,
            info.config.subjects,
            info.config.sources,
            info.state.first_seq,  # a purge, a deletion or a shrink moves it (publishes do not)
        )
    return found


@pytest.mark.integration
async def test_every_user_may_make_its_calls_and_no_other(
    server: str, passwords: dict[str, str], tmp_path: Path
) -> None:
    admin_settings = settings_as(server, "admin", passwords)
    admin = await bus.connect(admin_settings, "bootstrap")
    js = admin.jetstream()
    await bus.ensure_topology(js, admin_settings)
    # One message in each stream, so a purge, deletion or shrink shows in its first sequence.
    await js.publish(subjects.stage(MODEL, "d-seed", "requested"), b"{}")
    await js.publish(subjects.metrics("seed"), b"{}")
    await (await js.key_value(subjects.ROUTES_BUCKET)).put("seed", b"{}")
    await (await js.key_value(subjects.ROLLOUTS_BUCKET)).put("seed", b"{}")
    await js.add_consumer(
        EVENTS,
        durable_name=f"{OUTSIDE_DURABLE}-victim",
        filter_subject=subjects.OUTCOME_SUBJECTS,
        ack_policy="explicit",
    )
    before = await snapshot(js)

    table: list[tuple[str, str, bool, bool]] = []
    attempts = calls()
    for user in USERS:
        async with as_user(server, user, passwords) as attacker:
            got = await attacker.attempt(attempts)
        # The durable an allowed `delete` removed comes back for the next user.
        with contextlib.suppress(Exception):
            await js.add_consumer(
                EVENTS,
                durable_name=f"{OUTSIDE_DURABLE}-victim",
                filter_subject=subjects.OUTCOME_SUBJECTS,
                ack_policy="explicit",
            )
        table += [(user, c.name, user in c.allowed, got[c.name]) for c in attempts]

    wrong = [
        (u, name, "allowed" if exp else "refused") for u, name, exp, got in table if exp != got
    ]
    report = "\n".join(f"{u:<18} {name:<55} expected {e}" for u, name, e in wrong)
    assert not wrong, f"{len(wrong)} of {len(table)} calls not as expected:\n{report}"
    assert len(table) == len(USERS) * len(attempts)

    # Nothing an attacker tried changed anything (allowed publishes only add messages).
    after = await snapshot(js)
    assert after == before
    await admin.close()


@pytest.mark.integration
async def test_no_user_reads_anothers_replies_or_the_bus(
    server: str, passwords: dict[str, str]
) -> None:
    for user in USERS:
        async with as_user(server, user, passwords) as attacker:
            assert attacker.nc is not None
            for subject in ("_INBOX.>", "_INBOX_validator.>", "preflight.>", ">"):
                if subject == "_INBOX_validator.>" and user == "validator":
                    continue
                await attacker.nc.subscribe(subject)
            await attacker.nc.flush(timeout=2)
            await asyncio.sleep(0.3)
            refused = attacker.refused()
            expected = {"_inbox.>", "preflight.>", ">"}
            if user != "validator":
                expected.add("_inbox_validator.>")
            assert expected <= refused, (user, expected - refused)


@pytest.mark.integration
async def test_services_bind_to_what_bootstrap_made_and_do_their_jobs(
    server: str, passwords: dict[str, str]
) -> None:
    """The allowed side, through the same nats-py paths the services use."""
    admin_settings = settings_as(server, "admin", passwords)
    admin = await bus.connect(admin_settings, "bootstrap")
    await bus.ensure_topology(admin.jetstream(), admin_settings)
    work = {
        subjects.VALIDATOR_DURABLE: subjects.stage(MODEL, DEPLOYMENT, "requested"),
        subjects.BENCHMARKER_DURABLE: subjects.stage(MODEL, DEPLOYMENT, "validated"),
        subjects.CONTROLLER_DURABLE: subjects.stage(MODEL, DEPLOYMENT, "benchmarked"),
        subjects.NOTIFIER_DURABLE: subjects.outcome(MODEL, DEPLOYMENT, "promoted"),
        subjects.INGEST_DURABLE: subjects.metrics("router-1"),
    }
    for subject in work.values():
        await admin.jetstream().publish(subject, b"{}")
    for durable, subject in work.items():
        user = sorted(OWNERS[durable])[-1]  # metrics-ingest for the ingest
        nc = await bus.connect(settings_as(server, user, passwords), f"job-{user}")
        js = nc.jetstream()
        await bus.require_consumers(js, [durable])
        stream, _ = bus.consumer_filters(durable)
        sub = await js.pull_subscribe_bind(durable, stream)
        (msg,) = await sub.fetch(1, timeout=2)
        assert msg.subject == subject
        await msg.in_progress()
        await msg.ack_sync(timeout=2)
        await nc.close()

    # Readers read history by direct get; a router watches routes the controller writes.
    for user in ("client", "notifier", "subscriber"):
        nc = await bus.connect(settings_as(server, user, passwords), f"reader-{user}")
        seen = await bus.read_history(nc.jetstream(), "preflight.>")
        assert seen == []  # the bodies above are not events; nothing is lost, nothing parsed
        await nc.close()
    router = await bus.connect(settings_as(server, "router", passwords), "router")
    ctl = await bus.connect(settings_as(server, "canary-controller", passwords), "ctl")
    routes = await router.jetstream().key_value(subjects.ROUTES_BUCKET)
    watcher = await routes.watch(MODEL)
    assert await watcher.updates(timeout=2) is None  # type: ignore[no-untyped-call]
    await (await ctl.jetstream().key_value(subjects.ROUTES_BUCKET)).put(MODEL, b"{}")
    update = await watcher.updates(timeout=2)  # type: ignore[no-untyped-call]
    assert update is not None and update.value == b"{}"
    await watcher.stop()  # type: ignore[no-untyped-call]
    for nc in (router, ctl, admin):
        await nc.close()


@pytest.mark.integration
async def test_a_push_consumer_cannot_write_routes_without_interest(
    server: str, passwords: dict[str, str]
) -> None:
    """nats-server does not check a consumer's deliver subject against its creator's publish
    rights (nats-io/nats-server#8274). The subscriber user may create consumers on the events
    stream; aimed at the routes KV, the server delivers only where there is interest, and no
    preflight component subscribes to `$KV` subjects, so the route stays unwritten. (An
    operator's `nats sub '>'` would be such interest: docs/operating.md.)"""
    admin_settings = settings_as(server, "admin", passwords)
    admin = await bus.connect(admin_settings, "bootstrap")
    js = admin.jetstream()
    await bus.ensure_topology(js, admin_settings)
    await js.publish(subjects.stage(MODEL, DEPLOYMENT, "requested"), b'{"weight": 100}')
    async with as_user(server, "subscriber", passwords) as attacker:
        assert attacker.nc is not None
        body = {
            "stream_name": EVENTS,
            "config": {"name": "evil", "ack_policy": "none",
                       "deliver_subject": f"$KV.{subjects.ROUTES_BUCKET}.{MODEL}"},
        }  # fmt: skip
        await attacker.nc.request(
            f"$JS.API.CONSUMER.CREATE.{EVENTS}.evil", json.dumps(body).encode(), timeout=2
        )
        await asyncio.sleep(1.5)
    info = await js.stream_info(ROUTES_KV)
    assert info.state.messages == 0
    await admin.close()


@pytest.mark.integration
async def test_the_subscriber_example_works_as_the_subscriber_user(
    server: str, passwords: dict[str, str]
) -> None:
    """docs/subscribing.md's example under the shipped permissions: both kinds of consumer are
    created on subjects that name them, and the ephemeral one is gone when it stops."""
    from services.contracts.events import DeploymentPromoted
    from tests.integration.test_subscriber_example import run_example

    admin_settings = settings_as(server, "admin", passwords)
    admin = await bus.connect(admin_settings, "bootstrap")
    js = admin.jetstream()
    await bus.ensure_topology(js, admin_settings)
    promoted = DeploymentPromoted(deployment_id=DEPLOYMENT, model=MODEL, version="2")
    await bus.publish_event(js, promoted)
    as_subscriber = ("--user", "subscriber", "--from-start", "--count", "1")
    for extra in ((), ("--durable", OUTSIDE_DURABLE)):
        out, err = await run_example(
            server, *as_subscriber, *extra, password=passwords["subscriber"]
        )
        assert f"promoted   {MODEL} 2 {DEPLOYMENT}" in out, err
    names = {info.name for info in await js.consumers_info(EVENTS)}
    assert OUTSIDE_DURABLE in names
    assert not [n for n in names if n.startswith("outcomes-")]  # deleted on the way out
    await admin.close()


@pytest.mark.integration
async def test_a_service_without_bootstrap_names_the_fix(tmp_path: Path) -> None:
    nats = nats_server.NatsServer(tmp_path / "bare").start()
    try:
        nc = await bus.connect(Settings(nats_url=nats.url), "bare")
        with pytest.raises(bus.TopologyMissing, match="preflight bootstrap"):
            await bus.require_consumers(nc.jetstream(), [subjects.VALIDATOR_DURABLE])
        await nc.close()
    finally:
        nats.stop()


def test_the_embedded_stacks_credentials_are_private(tmp_path: Path) -> None:
    made = nats_users.ensure_credentials(tmp_path)
    path = nats_users.credentials_path(tmp_path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert set(made) == {"admin", *USERS} and len(set(made.values())) == len(made)
    assert nats_users.ensure_credentials(tmp_path) == made  # kept across restarts
    path.chmod(0o644)
    with pytest.raises(nats_users.CredentialsError, match="readable by others"):
        nats_users.load_credentials(tmp_path)
