"""Faults the pipeline must survive, measured on the real embedded stack (issue #13, item 2).

Everything real, as `preflight up` runs it: nats-server with the shipped users and permissions,
validator, benchmarker, the canary-controller with chDB and its ingest, the notifier, the router,
synthetic inference servers and users sending requests through the router. The notifier posts to
the Slack-shaped server of the tests (tests/slack_api.py), so notices are counted where people
would read them. Each fault gets a fresh stack (and data directory); this script plays the
supervisor's check loop (`Stack.check_children`, as `preflight up` does).

    malformed     10,000 malformed messages over every consumed subject (stage requested /
                  validated / benchmarked, commands, outcomes and canary steps for the notifier,
                  metric batches), published with JetStream acks as `admin` (commands as
                  `client`) while a deployment runs, a quarter with `content-type:
                  application/json`; every consumer drained; each must be dead-lettered once,
                  with a reason, and no service may restart. Well-formed commands for unknown
                  deployments, first versions and finished rollouts change nothing: dead-
                  lettered with the reason too, and counted apart by kind
    nats-kill     SIGKILL nats-server mid-canary (the supervisor restarts it at its next check;
                  `--outages` holds the restart back that many seconds): promoted, once
    service-kill  healthy canaries, failing canaries (20% errors from the canary's server) and
                  corrupted uploads while a random service is SIGKILLed at random points, and the
                  notifier between Slack's answer and its ledger write: exactly one right outcome
                  each (promoted / rolled back / blocked), no event twice, no notice twice
    metrics-down  the ingest stopped mid-canary (its durable consumer paused by admin), until the
                  outcome: never promoted, held, then rolled back at the held deadline; and a
                  shorter stop that the step's extension covers: promoted (docs/canary.md)

Time-compressed like `make demo`: a fast benchmark profile, the canary policy below as
`policy_overrides`, and JetStream's `ack_wait` at 10 s (60 s in production) so a message held by
a killed worker comes back sooner. Run from the repository root:
`.venv/bin/python bench/faults.py [--fault NAME ...] [--quick]`.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import random
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import nats
import yaml
from canary_real import FAST_BENCHMARK as FAST_BENCHMARK  # bench/canary_real.py: one fast profile
from machine import command_line, describe_machine  # bench/machine.py (scripts run from bench/)
from pydantic import BaseModel, SecretStr, ValidationError
from rich.console import Console

from services.contracts import subjects
from services.contracts.events import (
    ANY_COMMAND,
    TERMINAL_TYPES,
    AbortDeployment,
    BenchmarkCompleted,
    CanaryAnalysed,
    CanaryStepStarted,
    Command,
    DeadLetter,
    DeploymentBlocked,
    DeploymentDegraded,
    DeploymentEvent,
    DeploymentFailed,
    DeploymentHeld,
    DeploymentPromoted,
    DeploymentRequested,
    DeploymentRolledBack,
    Event,
    ModelRef,
    PauseDeployment,
    PromoteDeployment,
    RequestMetricsBatch,
    RequestRecord,
    ResumeDeployment,
    StageReport,
    Status,
    ValidationCompleted,
    new_deployment_id,
)
from services.contracts.routing import subject_for
from services.contracts.subjects import CommandName
from services.metrics.ingest import Unusable, parse_batch
from services.runtime import bus, nats_users, processes
from services.runtime.settings import Settings
from services.stack.demo import (
    MODEL,
    InferenceServers,
    Traffic,
    _expected_digests,
    write_corrupted_upload,
)
from services.stack.supervisor import Stack

ROOT = Path(__file__).resolve().parents[1]
FAULTS = ("malformed", "nats-kill", "service-kill", "metrics-down")
CHANNEL = "#deploys"
FAULT_MODEL = "fault-model"  # the model of every malformed message: no real deployment's

CANARY: dict[str, Any] = {
    "canary": {
        "steps": [{"weight": 20, "duration_s": 8}, {"weight": 50, "duration_s": 6}],
        "analysis_interval_s": 1,
        "lookback_s": 5,
        "min_canary_requests": 20,
        "max_step_extension_s": 20,
        "held_timeout_s": 20,
    }
}
ACK_WAIT_S = 10.0
KILLS_PER_MINUTE = 3
FAILING_ERROR_RATE = 0.2

Kind = Literal["healthy", "failing", "corrupted"]
EXPECTED: dict[Kind, str] = {
    "healthy": "promoted",
    "failing": "rolled_back:error_rate",
    "corrupted": "blocked",
}
OUTCOME_NAMES: dict[type[Event], str] = {
    DeploymentBlocked: "blocked",
    DeploymentPromoted: "promoted",
    DeploymentRolledBack: "rolled_back",
    DeploymentFailed: "failed",
}
T = TypeVar("T")


# ---- the fake Slack, on an event loop of its own ---------------------------------------------


class FakeSlack:
    """tests/slack_api.py's server in a thread, so the synchronous supervisor loop can run here."""

    def __init__(self) -> None:
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        from tests.slack_api import TOKEN, SlackApi

        self.token = TOKEN
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="slack", daemon=True)
        self.thread.start()
        self.api = SlackApi()
        self._call(self.api.__aenter__())

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def run(self, fn: Callable[[], T]) -> T:
        async def inside() -> T:
            return fn()

        return self._call(inside())

    @property
    def base_url(self) -> str:
        return self.api.base_url

    def messages(self) -> list[dict[str, Any]]:
        return self.run(lambda: [dict(m) for m in self.api.messages_in(CHANNEL)])

    def kill_after_next_post(self, pid: int) -> None:
        self.run(lambda: self.api.kill_after("chat.postMessage", pid))

    def disarm(self) -> list[int]:
        """Drop kills not yet done; return (and forget) the pids killed so far."""

        def take() -> list[int]:
            self.api.kills.clear()
            killed = list(self.api.killed)
            self.api.killed.clear()
            return killed

        return self.run(take)

    def stop(self) -> None:
        with suppress(Exception):
            self._call(self.api.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


def notice_keys(messages: Sequence[dict[str, Any]]) -> Counter[str]:
    """How many Slack messages carry each notice's ledger key (the notifier's own metadata)."""
    keys: Counter[str] = Counter()
    for message in messages:
        payload = (message.get("metadata") or {}).get("event_payload") or {}
        if isinstance(payload, dict) and payload.get("key"):
            keys[str(payload["key"])] += 1
    return keys


# ---- one stack with its servers, users and models ----------------------------------------------


@dataclass
class Deployment:
    kind: Kind
    request: DeploymentRequested
    expect: str = ""
    """`promoted`, `blocked`, or `rolled_back:<trigger>`; by default the kind's."""
    events: list[DeploymentEvent] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """What else was not as documented (a fault's own checks)."""

    def __post_init__(self) -> None:
        self.expect = self.expect or EXPECTED[self.kind]

    @property
    def id(self) -> str:
        return self.request.deployment_id

    def terminal(self) -> list[DeploymentEvent]:
        return [e for e in self.events if isinstance(e, TERMINAL_TYPES)]

    def right(self) -> bool:
        return self.outcome() == self.expect and not self.problems

    def outcome(self) -> str:
        ends = self.terminal()
        names = [OUTCOME_NAMES[type(e)] for e in ends]
        if ends and isinstance(ends[0], DeploymentRolledBack):
            names[0] += f":{ends[0].trigger}"
        return " + ".join(names) or "none"


def duplicated_events(events: Sequence[DeploymentEvent]) -> Counter[str]:
    """Events published more than once: by type, and step for steps and holds (a step starts
    again, and may be held again, only after a person resumed it), window for analyses.
    Commands are a person's to repeat and are not counted."""
    seen: Counter[tuple[Any, ...]] = Counter()
    for event in events:
        if isinstance(event, Command):
            continue
        key: tuple[Any, ...] = (type(event).__name__,)
        if isinstance(event, CanaryAnalysed):
            key += (event.step_index, event.window_end)
        elif isinstance(event, CanaryStepStarted | DeploymentHeld):
            key += (event.step_index,)
        seen[key] += 1
    resumes = sum(1 for e in events if isinstance(e, ResumeDeployment))
    extra: Counter[str] = Counter()
    for key, count in seen.items():
        again = key[0] in ("CanaryStepStarted", "DeploymentHeld")
        if count > 1 + (resumes if again else 0):
            extra[":".join(str(k) for k in key)] = count - 1 - (resumes if again else 0)
    return extra


class World:
    """A fresh embedded stack, the fake Slack, inference servers, users' traffic and models."""

    def __init__(self, root: Path, rps: float, console: Console, name: str) -> None:
        from services.benchmarker.samples import write_trained_model

        self.root = root
        self.console = console
        self.rps = rps
        self.name = name
        policy = root / "policy.yaml"
        policy.write_text(yaml.safe_dump(FAST_BENCHMARK))
        models = root / "models"
        self.dirs = {
            "stable": write_trained_model(models / "v1", variant="good", seed=0),
            "canary": write_trained_model(models / "v2", variant="good", seed=1),
        }
        self.dirs["corrupted"] = write_corrupted_upload(self.dirs["canary"], models / "corrupt")
        self.slack = FakeSlack()
        settings = Settings(
            data_dir=root / "data",
            policy_file=policy,
            ack_wait_s=ACK_WAIT_S,
            slack_token=SecretStr(self.slack.token),
            slack_base_url=self.slack.base_url,
            slack_channel=CHANNEL,
        )
        self.stack = Stack(
            settings,
            say=lambda line: console.print(f"[dim]{line}[/dim]", highlight=False),
            notices_to_terminal=False,
        )
        self.servers = InferenceServers(root / "data" / "logs")
        self.traffic: Traffic | None = None
        self.stable: ModelRef | None = None
        self.pids: dict[str, int] = {}
        self.restarts: Counter[str] = Counter()
        self.kills: Counter[str] = Counter()
        self.outage_until = 0.0
        self.deployments: list[Deployment] = []
        self.first: Deployment | None = None
        self.kill_times: dict[str, list[float]] = {}
        self.bus_error = ""

    # ---- lifecycle

    def start(self) -> None:
        self.stack.start()
        self.stack.wait_ready(60)
        self.pids = {name: c.proc.pid for name, c in self.stack.children.items()}
        first = self.deploy("healthy", "v1", first=True)
        self.follow([first], timeout=240)
        if not first.right():
            raise RuntimeError(f"the first version was not promoted: {first.outcome()}")
        self.deployments.remove(first)  # the setting, not a deployment of the fault
        self.first = first
        self.traffic = Traffic(self.stack.router_url, self.rps)
        self.traffic.start()
        time.sleep(2)

    def stop(self) -> None:
        if self.traffic is not None:
            self.traffic.stop()
        self.servers.stop()
        self.stack.stop()
        self.slack.stop()

    @property
    def admin(self) -> Settings:
        return self.stack.settings_as(nats_users.ADMIN)

    @property
    def client(self) -> Settings:
        return self.stack.settings_as(nats_users.CLIENT)

    def bus_call(self, fn: Callable[[Any], Awaitable[T]], *, user: str = "admin") -> T | None:
        """`fn(jetstream)` on a fresh connection; None while the bus does not answer."""
        settings = self.stack.settings_as(user)

        async def call() -> T:
            nc = await bus.connect(settings, f"bench-faults-{user}", timeout=1.0)
            try:
                return await fn(nc.jetstream())
            finally:
                await nc.close()

        try:
            return asyncio.run(call())
        except (bus.BusUnavailable, nats.errors.Error, TimeoutError, OSError) as exc:
            self.bus_error = f"{type(exc).__name__}: {exc}"
            return None

    # ---- supervision and faults

    def supervise(self) -> None:
        """The supervisor's check loop (what `preflight up` runs), counting restarts by pid."""
        if time.monotonic() < self.outage_until:
            return
        self.stack.check_children()
        for name, child in self.stack.children.items():
            if child.proc.pid != self.pids.get(name):
                self.restarts[name] += 1
                self.pids[name] = child.proc.pid

    def may_kill(self, name: str) -> bool:
        """At most KILLS_PER_MINUTE per service: the supervisor gives up on a service that exits
        more than 5 times in a minute (a crash loop is reported, not hidden)."""
        now = time.monotonic()
        self.kill_times[name] = [t for t in self.kill_times.get(name, []) if now - t < 60]
        return len(self.kill_times[name]) < KILLS_PER_MINUTE

    def kill_service(self, name: str) -> bool:
        """SIGKILL a service's process group; False if it is dead already (not yet restarted)
        or was killed too often this minute."""
        child = self.stack.children[name]
        if child.proc.poll() is not None or not self.may_kill(name):
            return False
        processes.signal_group(child.proc, signal.SIGKILL)
        child.proc.wait(timeout=10)  # reaped: the supervisor's next check sees it dead
        self.kill_times[name].append(time.monotonic())
        self.kills[name] += 1
        self.console.print(f"    SIGKILL {name} (pid {child.proc.pid})", highlight=False)
        return True

    def kill_nats(self, outage_s: float = 0.0) -> None:
        assert self.stack.nats is not None and self.stack.nats.proc is not None
        pid = self.stack.nats.proc.pid
        os.kill(pid, signal.SIGKILL)
        self.stack.nats.proc.wait(timeout=10)
        self.outage_until = time.monotonic() + outage_s
        self.console.print(
            f"    SIGKILL nats-server (pid {pid}); supervisor restarts it "
            + (f"after {outage_s:g} s" if outage_s else "at its next check"),
            highlight=False,
        )

    # ---- deployments

    def deploy(
        self,
        kind: Kind,
        version: str,
        *,
        first: bool = False,
        overrides: dict[str, Any] | None = None,
    ) -> Deployment:
        if kind == "corrupted":
            location, endpoint = self.dirs["corrupted"], None
        else:
            location = self.dirs["stable" if first else "canary"]
            rate = FAILING_ERROR_RATE if kind == "failing" else 0.0
            endpoint = self.servers.start(version, rate)
        request = DeploymentRequested(
            deployment_id=new_deployment_id(),
            model=MODEL,
            version=version,
            location=str(location),
            endpoint=endpoint,
            expected_sha256=_expected_digests(location),
            stable=self.stable,
            policy_overrides=CANARY if overrides is None else overrides,
        )

        async def send(js: Any) -> bool:
            await bus.publish_event(js, request)
            return True

        deadline = time.monotonic() + 60
        while self.bus_call(send, user=nats_users.CLIENT) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"could not publish a deployment for 60 s: {self.bus_error}")
            self.supervise()
            time.sleep(0.5)
        deployment = Deployment(kind, request)
        self.deployments.append(deployment)
        self.console.print(
            f"  deploy {version} ({kind}) as {request.deployment_id}", highlight=False
        )
        return deployment

    def read(self, deployments: Sequence[Deployment]) -> bool:
        """Refresh each deployment's events from the stream; False while the bus is down."""

        async def read_all(js: Any) -> dict[str, list[DeploymentEvent]]:
            return {
                d.id: await bus.read_history(js, subjects.deployment_events(d.id))
                for d in deployments
            }

        found = self.bus_call(read_all)
        if found is None:
            return False
        for d in deployments:
            d.events = found[d.id]
        return True

    def follow(
        self,
        deployments: Sequence[Deployment],
        *,
        timeout: float,
        on_tick: Callable[[], None] | None = None,
        settle_s: float = 3.0,
    ) -> None:
        """Supervise until every deployment has an outcome (or `timeout`), then `settle_s` more:
        a duplicate, if any, would arrive then."""
        deadline = time.monotonic() + timeout
        settled_at: float | None = None
        while time.monotonic() < deadline:
            self.supervise()
            self.read(deployments)
            if on_tick is not None:
                on_tick()
            if all(d.terminal() for d in deployments):
                settled_at = settled_at or time.monotonic() + settle_s
                if time.monotonic() >= settled_at:
                    break
            time.sleep(0.5)
        for d in deployments:
            if d.kind == "healthy" and d.right():
                self.stable = ModelRef(
                    name=MODEL,
                    version=d.request.version,
                    location=d.request.location,
                    endpoint=d.request.endpoint,
                )
            ends = d.terminal()
            took = (ends[0].occurred_at - d.request.occurred_at).total_seconds() if ends else None
            self.console.print(
                f"  {d.request.version} ({d.kind}): {d.outcome()}"
                + (f" {took:.0f} s after its request" if took is not None else ""),
                highlight=False,
            )

    # ---- measurements

    def notices(self) -> tuple[int, list[str]]:
        """(duplicate notices, deployments whose outcome notice is missing) on Slack."""
        keys = notice_keys(self.slack.messages())
        duplicates = sum(n - 1 for n in keys.values() if n > 1)
        missing = []
        for d in self.deployments:
            ends = d.terminal()
            if not ends:
                continue
            kind = {
                DeploymentBlocked: "blocked",
                DeploymentPromoted: "promoted",
                DeploymentRolledBack: "rolled_back",
                DeploymentFailed: "failed",
            }[type(ends[0])]
            if not any(k.startswith(f"{d.id}.sent.{kind}.") for k in keys):
                missing.append(d.id)
        return duplicates, missing

    def dead_letter_count(self) -> int:
        async def count(js: Any) -> int:
            info = await js.stream_info(subjects.DEADLETTER_STREAM)
            return int(info.state.messages)

        return self.bus_call(count) or 0

    def error_lines(self) -> Counter[str]:
        """ERROR log lines per service log (a healthy run has none, issue #13)."""
        found: Counter[str] = Counter()
        for log in sorted((self.stack.data_dir / "logs").glob("*.log")):
            if log.name.startswith("inference-"):
                continue
            for line in log.read_text(errors="replace").splitlines():
                if " ERROR " in line or line.startswith("Traceback"):
                    found[log.stem] += 1
        return found


@contextmanager
def world_for(name: str, rps: float, console: Console, keep: bool) -> Iterator[World]:
    root = Path(tempfile.mkdtemp(prefix=f"faults-{name}-"))
    world = World(root, rps, console, name)
    try:
        world.start()
        yield world
    finally:
        world.stop()
        if keep:
            console.print(f"  kept {root}", highlight=False)
        else:
            shutil.rmtree(root, ignore_errors=True)


# ---- results ------------------------------------------------------------------------------------


@dataclass
class Row:
    fault: str
    deployments: int = 0
    right: int = 0
    lost: int = 0
    duplicated_events: int = 0
    duplicate_notices: int | None = 0
    dead_letters_expected: int = 0
    dead_letters_received: int = 0
    service_restarts: int = 0
    killed: int = 0
    nats_restarts: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def finish_row(row: Row, world: World, started: float) -> Row:
    """The deployments' figures, restarts and notices of one fault's stack."""
    world.supervise()
    world.read(world.deployments)
    row.deployments += len(world.deployments)
    row.right += sum(1 for d in world.deployments if d.right())
    row.lost += sum(1 for d in world.deployments if not d.terminal())
    for d in world.deployments:
        dups = duplicated_events(d.events)
        row.duplicated_events += sum(dups.values())
        if dups:
            row.notes.append(f"{d.request.version}: duplicated events {dict(dups)}")
        if not d.right():
            row.notes.append(
                f"{d.request.version} ({d.kind}) ended {d.outcome()}, expected {d.expect}"
                + "".join(f"; {p}" for p in d.problems)
            )
    duplicates, missing = world.notices()
    row.duplicate_notices = duplicates
    posted = world.slack.messages()
    row.notes.append(
        f"Slack: {len(posted)} messages in {CHANNEL}, {len(notice_keys(posted))} notice keys"
    )
    if missing:
        row.notes.append(f"outcome notice missing on Slack for {', '.join(missing)}")
    row.service_restarts = sum(world.restarts.values())
    row.killed = sum(world.kills.values())
    row.nats_restarts = world.stack.nats_restart_count
    unprompted = {n: world.restarts[n] - world.kills[n] for n in world.restarts}
    if any(v > 0 for v in unprompted.values()):
        row.notes.append(
            f"services restarted without being killed: {dict(unprompted)} (they crashed)"
        )
    errors = world.error_lines()
    if errors:
        row.notes.append(f"ERROR/Traceback log lines: {dict(errors)}")
    if world.stack.nats is not None:
        info = json.loads((world.stack.data_dir / "stack.json").read_text())
        live = world.stack.nats.proc.pid if world.stack.nats.proc else None
        if info.get("nats_pid") != live or info.get("nats_restarts") != row.nats_restarts:
            row.notes.append(
                f"stack.json names nats pid {info.get('nats_pid')} "
                f"({info.get('nats_restarts')} restarts), the live one is {live}"
            )
    row.seconds = time.monotonic() - started
    return row


# ---- fault 1: malformed messages ----------------------------------------------------------------

Family = Literal[
    "requested", "validated", "benchmarked", "command", "outcome", "canary_step", "metrics"
]
FAMILIES: tuple[Family, ...] = (
    "requested",
    "validated",
    "benchmarked",
    "command",
    "outcome",
    "canary_step",
    "metrics",
)
CONSUMER_OF: dict[Family, tuple[str, str, str]] = {  # family -> stream, durable, service
    "requested": (subjects.EVENTS_STREAM, subjects.VALIDATOR_DURABLE, "validator"),
    "validated": (subjects.EVENTS_STREAM, subjects.BENCHMARKER_DURABLE, "benchmarker"),
    "benchmarked": (subjects.EVENTS_STREAM, subjects.CONTROLLER_DURABLE, "canary-controller"),
    "command": (
        subjects.EVENTS_STREAM,
        subjects.CONTROLLER_COMMANDS_DURABLE,
        "canary-controller",
    ),
    "outcome": (subjects.EVENTS_STREAM, subjects.NOTIFIER_DURABLE, "notifier"),
    "canary_step": (subjects.EVENTS_STREAM, subjects.NOTIFIER_DURABLE, "notifier"),
    "metrics": (subjects.METRICS_STREAM, subjects.INGEST_DURABLE, "metrics-ingest"),
}
# Malformed kinds and their weights; `near_max` payloads are ~1 MiB each, so fewer of them.
CATEGORIES: dict[str, float] = {
    "random_bytes": 1.0,
    "truncated_json": 1.0,
    "wrong_types": 1.0,
    "control_chars": 1.0,
    "invalid_utf8": 0.5,
    "near_max_payload": 0.12,
    "extra_fields": 1.0,
    "wrong_schema_version": 1.0,
    "foreign_type": 0.5,
    "not_an_object": 0.5,
    "deep_nesting": 0.25,
    "naive_or_bad_time": 0.5,
}
FAMILY_CATEGORIES: dict[Family, dict[str, float]] = {
    "outcome": {"held_integer_deadline": 1.0},
    "command": {
        "command_unknown_deployment": 0.5,
        "command_finished_rollout": 0.5,
        "command_first_version": 0.25,
        "command_sender_not_allowed": 0.5,
    },
    "metrics": {"record_out_of_range": 1.0},
}
TYPE_NAMES = ("DeploymentSomething", "deploymentrequested", "", "DeadLetter", "Route")
JSON_HEADER_SHARE = 0.25
# Well-formed commands a person may send too late or with a typo: not malformed, but they change
# nothing, so they are dead-lettered with the reason too; counted apart as well, by kind.
WELL_FORMED = frozenset(
    {"command_unknown_deployment", "command_finished_rollout", "command_first_version"}
)


@dataclass
class Malformed:
    family: Family
    category: str
    subject: str
    payload: bytes
    user: str = "admin"
    headers: dict[str, str] | None = None
    """Some carry `content-type: application/json`, as the services' own messages do."""

    @property
    def stream(self) -> str:
        return CONSUMER_OF[self.family][0]

    @property
    def durable(self) -> str:
        return CONSUMER_OF[self.family][1]

    @property
    def service(self) -> str:
        return CONSUMER_OF[self.family][2]


def _template(family: Family, dep: str, rng: random.Random) -> BaseModel:
    """A valid message of the family, for a deployment nobody runs."""
    now = datetime.now(UTC)
    request = DeploymentRequested(
        deployment_id=dep, model=FAULT_MODEL, version="1", location="/nonexistent/fault-model"
    )
    common: dict[str, Any] = {"deployment_id": dep, "model": FAULT_MODEL, "version": "1"}
    if family == "requested":
        return request
    if family == "validated":
        report = StageReport(stage="validation", status=Status.PASSED)
        return ValidationCompleted(**common, report=report, request=request)
    if family == "benchmarked":
        report = StageReport(stage="benchmark", status=Status.PASSED)
        return BenchmarkCompleted(**common, report=report, request=request)
    if family == "command":
        kind = rng.choice([PromoteDeployment, AbortDeployment, PauseDeployment, ResumeDeployment])
        return kind(**common)
    if family == "outcome":
        outcomes: list[BaseModel] = [
            DeploymentBlocked(**common, stage="validation"),
            DeploymentDegraded(**common),
            DeploymentPromoted(**common),
            DeploymentRolledBack(**common, trigger="error_rate"),
            DeploymentHeld(**common, step_index=0, weight=5, deadline=now + timedelta(hours=1)),
            DeploymentFailed(**common, stage="validator", error="fault"),
        ]
        return rng.choice(outcomes)
    if family == "canary_step":
        return CanaryStepStarted(**common, step_index=0, weight=5, duration_s=10)
    record = RequestRecord(
        ts=now,
        deployment_id=dep,
        model=FAULT_MODEL,
        version="1",
        role="canary",
        latency_ms=12.5,
        status=200,
    )
    return RequestMetricsBatch(batch_id=secrets.token_hex(8), source="fault", records=(record,) * 3)


def _subject(family: Family, message: BaseModel, user: str = nats_users.CLIENT) -> str:
    if family == "metrics":
        return "preflight.metrics.x"
    assert isinstance(message, Event)
    if family == "command":
        verb = cast(CommandName, type(message).__name__.removesuffix("Deployment").lower())
        return subjects.command(message.model, message.deployment_id, verb, user)
    return subject_for(message)


def _set_model(data: dict[str, Any], value: Any) -> None:
    if "records" in data:
        data["records"][0]["model"] = value
    else:
        data["model"] = value


def _mutate(
    category: str, data: dict[str, Any], rng: random.Random, max_payload: int
) -> bytes | dict[str, Any]:
    """A malformed body from a valid message's JSON (returned as bytes, or a dict to encode)."""
    text = json.dumps(data)
    if category == "random_bytes":
        return os.urandom(rng.randint(1, 4096))
    if category == "truncated_json":
        return text[: rng.randint(1, len(text) - 1)].encode()
    if category == "wrong_types":
        field_name, value = rng.choice(
            [("deployment_id", 12345), ("model", ["a"]), ("version", 7), ("occurred_at", 1e9)]
            if "records" not in data
            else [("batch_id", 12345678901), ("records", "none"), ("source", {"a": 1})]
        )
        return {**data, field_name: value}
    if category == "control_chars":
        if rng.random() < 0.5:  # escaped: valid JSON, a name no pattern admits
            bad = copy.deepcopy(data)
            _set_model(bad, f"fault{chr(rng.choice([0, 7, 8, 27, 127]))}model")
            return bad
        raw = text.replace(f'"{FAULT_MODEL}"', f'"fault{chr(rng.randint(0, 31))}model"', 1)
        return raw.encode()
    if category == "invalid_utf8":
        return text.replace(FAULT_MODEL, "fault\udcff", 1).encode("utf-8", "surrogateescape")
    if category == "near_max_payload":
        size = rng.randint(max_payload - 4096, max_payload - 256)
        if rng.random() < 0.3:
            return os.urandom(size)
        padding = size - len(text) - len(', "padding": ""')
        return {**data, "padding": "x" * max(0, padding)}
    if category == "extra_fields":
        return {**data, rng.choice(["extra", "admin", "__proto__", "Type"]): True}
    if category == "wrong_schema_version":
        return {**data, "schema_version": rng.choice([0, 2, "1", 1.5, None])}
    if category == "not_an_object":
        return rng.choice([b"", b"null", b"[]", b"42", b'"text"', b"true", b"{}"])
    if category == "deep_nesting":
        depth = rng.randint(500, 20_000)
        return b"[" * depth + b"]" * depth
    if category == "naive_or_bad_time":
        if "records" in data:
            bad = copy.deepcopy(data)
            bad["records"][0]["ts"] = rng.choice(["yesterday", "2026-13-45T00:00:00Z", ""])
            return bad
        return {**data, "occurred_at": rng.choice(["2026-11-25T17:45:00", "soon", ""])}
    if category == "held_integer_deadline":
        held = DeploymentHeld(
            deployment_id=data["deployment_id"],
            model=FAULT_MODEL,
            version="1",
            step_index=0,
            weight=5,
            deadline=datetime.now(UTC),
        )
        return {**held.model_dump(mode="json"), "deadline": rng.choice([12345, 1767225600])}
    if category == "record_out_of_range":
        bad = copy.deepcopy(data)
        bad["records"][-1]["ts"] = rng.choice(["1900-01-01T00:00:00Z", "2300-01-01T00:00:00Z"])
        if rng.random() < 0.2:  # a big batch, near max_payload, with one bad record at its end
            record = bad["records"][0]
            count = (max_payload - 2048) // (len(json.dumps(record)) + 2)
            bad["records"] = [record] * (count - 1) + [bad["records"][-1]]
        return bad
    raise ValueError(category)


def _is_rejected(family: Family, payload: bytes) -> bool:
    """Whether the consuming service's own strict parse refuses `payload` (what it dead-letters;
    a command from a user not allowed is rejected after parsing, by the controller)."""
    from services.notifier.app import NOTICE_EVENT

    adapters: dict[Family, Callable[[bytes], object]] = {
        "requested": lambda b: DeploymentRequested.model_validate_json(b, strict=True),
        "validated": lambda b: ValidationCompleted.model_validate_json(b, strict=True),
        "benchmarked": lambda b: BenchmarkCompleted.model_validate_json(b, strict=True),
        "command": lambda b: ANY_COMMAND.validate_json(b, strict=True),
        "outcome": lambda b: NOTICE_EVENT.validate_json(b, strict=True),
        "canary_step": lambda b: NOTICE_EVENT.validate_json(b, strict=True),
    }
    if family == "metrics":
        return isinstance(parse_batch(payload), Unusable)
    try:
        adapters[family](payload)
    except (ValidationError, ValueError):
        return True
    return False


def malformed_messages(
    count: int,
    rng: random.Random,
    max_payload: int,
    ended: Mapping[str, tuple[str, str]],
    *,
    cycle: bool = False,
) -> list[Malformed]:
    """`count` messages spread evenly over the families, each kind drawn by weight (`cycle`:
    every kind in turn); each one checked against the consumer's own parser, so "malformed" is
    never a guess. `ended`: (model, deployment id) of a `command_finished_rollout` and of a
    `command_first_version` (a first version is promoted without a rollout), where known."""
    out: list[Malformed] = []
    for i in range(count):
        family = FAMILIES[i % len(FAMILIES)]
        weights = {**CATEGORIES, **FAMILY_CATEGORIES.get(family, {})}
        for missing in WELL_FORMED - {"command_unknown_deployment"} - set(ended):
            weights.pop(missing, None)
        if cycle:
            category = list(weights)[(i // len(FAMILIES)) % len(weights)]
        else:
            category = rng.choices(list(weights), weights=list(weights.values()))[0]
        dep = f"d-fault-{i:06d}"
        template = _template(family, dep, rng)
        user = "admin"
        if family == "command":
            user = nats_users.CLIENT
            assert isinstance(template, Event)
            if category in WELL_FORMED:
                model, dep = ended.get(category, (FAULT_MODEL, dep))
                command = template.model_copy(update={"deployment_id": dep, "model": model})
                subject = _subject(family, command)
                out.append(Malformed(family, category, subject, bus.encode(command), user))
                continue
            if category == "command_sender_not_allowed":  # admin may publish under any name
                sender = rng.choice(["router", "notifier", "validator", "subscriber"])
                subject = _subject(family, template, sender)
                out.append(Malformed(family, category, subject, bus.encode(template), "admin"))
                continue
        if category == "foreign_type":  # another message, valid but not this consumer's
            notices = {"outcome", "canary_step"}
            others = [f for f in FAMILIES if f != family and not {f, family} <= notices]
            body: bytes | dict[str, Any] = _template(rng.choice(others), dep, rng).model_dump(
                mode="json"
            )
            if rng.random() < 0.5:
                body = {**template.model_dump(mode="json"), "type": rng.choice(TYPE_NAMES)}
        else:
            body = _mutate(category, template.model_dump(mode="json"), rng, max_payload)
        payload = json.dumps(body).encode() if isinstance(body, dict) else body
        if not _is_rejected(family, payload):
            raise AssertionError(f"{family}/{category} produced a valid message: {payload[:200]!r}")
        subject = _subject(family, template, user)
        headers = dict(bus.CONTENT_TYPE) if rng.random() < JSON_HEADER_SHARE else None
        out.append(Malformed(family, category, subject, payload, user, headers))
    return out


@dataclass
class Published:
    message: Malformed
    seq: int


async def publish_malformed(
    admin: Any, client: Any, messages: Sequence[Malformed]
) -> tuple[list[Published], list[tuple[Malformed, str]]]:
    """Publish each with a JetStream ack; what the server refuses is returned apart."""
    sent: list[Published] = []
    refused: list[tuple[Malformed, str]] = []
    for message in messages:
        js = client if message.user == nats_users.CLIENT else admin
        try:
            ack = await js.publish(
                message.subject,
                message.payload,
                stream=message.stream,
                headers=dict(message.headers) if message.headers else None,
                timeout=10,
            )
        except (nats.errors.Error, TimeoutError) as exc:
            refused.append((message, f"{type(exc).__name__}: {exc}"))
            continue
        sent.append(Published(message, int(ack.seq)))
    return sent, refused


async def consumers_caught_up(js: Any, targets: dict[str, int]) -> dict[str, tuple[int, int]]:
    """durable -> (pending, ack pending) of each that has not yet delivered its target stream
    sequence, or has messages not yet acked (a nak'ed message waiting for redelivery counts)."""
    behind = {}
    for durable, target in targets.items():
        stream, _ = bus.consumer_filters(durable)
        info = await js.consumer_info(stream, durable)
        pending, acking = int(info.num_pending or 0), int(info.num_ack_pending or 0)
        delivered = int(info.delivered.stream_seq or 0)
        # The ingest also takes the router's live batches: only its ack-pending must touch 0.
        live = durable == subjects.INGEST_DURABLE
        if delivered < target or acking or (pending and not live):
            behind[durable] = (pending, acking)
    return behind


async def read_dead_letters(js: Any) -> list[DeadLetter]:
    """Every letter in the dead-letter stream, through an ephemeral consumer (admin)."""
    info = await js.stream_info(subjects.DEADLETTER_STREAM)
    total = int(info.state.messages)
    if not total:
        return []
    sub = await js.pull_subscribe(
        subjects.DEADLETTER_SUBJECTS, stream=subjects.DEADLETTER_STREAM, durable=None
    )
    letters: list[DeadLetter] = []
    try:
        while len(letters) < total:
            try:
                msgs = await sub.fetch(256, timeout=5)
            except TimeoutError:
                break
            for msg in msgs:
                letters.append(DeadLetter.model_validate_json(msg.data))
                await msg.ack()
    finally:
        await sub.unsubscribe()
    return letters


@dataclass
class Tally:
    """Dead letters matched to the messages they stand for, by (stream, stream sequence)."""

    expected: int = 0
    received: int = 0
    """Expected messages that have a dead letter."""
    lost: list[Published] = field(default_factory=list)
    duplicated: int = 0
    wrong_service: int = 0
    without_reason: int = 0
    truncated: int = 0
    well_formed: int = 0
    well_formed_lettered: int = 0
    unmatched: int = 0
    """Letters for no message in `sent` (another source of dead letters)."""
    expected_by_service: Counter[str] = field(default_factory=Counter)
    received_by_service: Counter[str] = field(default_factory=Counter)
    well_formed_by: Counter[str] = field(default_factory=Counter)
    well_formed_lettered_by: Counter[str] = field(default_factory=Counter)


def tally(sent: Sequence[Published], letters: Sequence[DeadLetter]) -> Tally:
    by_position: dict[tuple[str | None, int | None], list[DeadLetter]] = {}
    for letter in letters:
        by_position.setdefault((letter.stream, letter.stream_sequence), []).append(letter)
    out = Tally()
    matched: set[tuple[str | None, int | None]] = set()
    for p in sent:
        position = (p.message.stream, p.seq)
        found = by_position.get(position, [])
        matched.add(position)
        if p.message.category in WELL_FORMED:  # also counted apart, by kind
            out.well_formed += 1
            out.well_formed_lettered += bool(found)
            out.well_formed_by[p.message.category] += 1
            out.well_formed_lettered_by[p.message.category] += bool(found)
        out.expected += 1
        out.expected_by_service[p.message.service] += 1
        if not found:
            out.lost.append(p)
            continue
        out.received += 1
        out.received_by_service[p.message.service] += 1
        out.duplicated += len(found) - 1
        out.wrong_service += sum(1 for letter in found if letter.service != p.message.service)
        out.without_reason += sum(1 for letter in found if not letter.reason.strip())
        out.truncated += sum(1 for letter in found if letter.truncated)
    out.unmatched = sum(len(v) for k, v in by_position.items() if k not in matched)
    return out


def decoder_refuses(message: Malformed) -> bool:
    """Whether FastStream 0.7.8's default decoder (`faststream.message.utils.decode_message`,
    run before a subscriber's handler) raises on this body: with `content-type: application/json`
    on anything `json.loads` refuses; without, only on what it raises other than
    JSONDecodeError/UnicodeDecodeError (RecursionError on deep nesting). The metrics ingest
    reads with nats-py directly, so it is not affected."""
    if message.family == "metrics":
        return False
    try:
        json.loads(message.payload)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return message.headers is not None
    except RecursionError:
        return True
    return False


def run_malformed(args: argparse.Namespace, console: Console, rng: random.Random) -> Row:
    started = time.monotonic()
    row = Row("malformed")
    with world_for("malformed", args.rps, console, args.keep) as world:
        finished = world.deploy("healthy", "v2")  # a finished rollout, for late commands
        world.follow([finished], timeout=240)
        world.deployments.remove(finished)  # the setting: only v3 runs through the flood
        pids = dict(world.pids)
        during = world.deploy("healthy", "v3")  # rolls out through the flood

        async def max_payload(js: Any) -> int:
            return int(js._nc.max_payload)

        limit = world.bus_call(max_payload) or 1024 * 1024
        assert world.first is not None
        done = {
            "command_finished_rollout": (MODEL, finished.id),
            "command_first_version": (MODEL, world.first.id),
        }
        messages = malformed_messages(args.malformed, rng, limit, done)
        console.print(f"  publishing {len(messages)} malformed messages (max_payload {limit})")

        async def publish() -> tuple[list[Published], list[tuple[Malformed, str]]]:
            admin = await bus.connect(world.admin, "bench-faults-malformed")
            client = await bus.connect(world.client, "bench-faults-malformed-client")
            try:
                return await publish_malformed(admin.jetstream(), client.jetstream(), messages)
            finally:
                await admin.close()
                await client.close()

        t0 = time.monotonic()
        sent, refused = asyncio.run(publish())
        publish_s = time.monotonic() - t0
        console.print(f"  published {len(sent)} in {publish_s:.1f} s; refused {len(refused)}")
        floors: dict[str, int] = {}
        for p in sent:
            floors[p.message.durable] = max(floors.get(p.message.durable, 0), p.seq)

        drain_deadline = time.monotonic() + args.drain_timeout
        behind: dict[str, tuple[int, int]] | None = {"?": (0, 0)}
        last_print = 0.0
        while time.monotonic() < drain_deadline:
            world.supervise()

            async def check(js: Any) -> dict[str, tuple[int, int]]:
                return await consumers_caught_up(js, floors)

            behind = world.bus_call(check)
            if behind == {}:
                break
            if time.monotonic() - last_print > 10:
                console.print(f"    behind: {behind}", highlight=False)
                last_print = time.monotonic()
            time.sleep(1)
        drain_s = time.monotonic() - t0
        world.follow([during], timeout=240)
        letters = world.bus_call(read_dead_letters) or []
        row = finish_row(row, world, started)

    found = tally(sent, letters)
    row.lost += len(found.lost)
    row.dead_letters_expected = found.expected
    row.dead_letters_received = found.received
    lost_by = Counter(
        p.message.category + (" (content-type json)" if p.message.headers else "")
        for p in found.lost
    )
    lost_where = Counter(p.message.service for p in found.lost)
    undecodable = sum(1 for p in found.lost if decoder_refuses(p.message))
    row.notes += [
        f"{len(sent)} malformed messages published ({len(refused)} refused by the server) in "
        f"{publish_s:.1f} s; every consumer past them {drain_s:.1f} s after the first"
        + ("" if behind == {} else f" - NOT drained within {args.drain_timeout:g} s: {behind}"),
        "dead letters expected / received per service: "
        + ", ".join(
            f"{name} {n}/{found.received_by_service[name]}"
            for name, n in sorted(found.expected_by_service.items())
        ),
        f"{found.truncated} letters of near-max payloads kept a truncated copy and the "
        f"original's stream sequence; {found.duplicated} duplicated, {found.wrong_service} "
        f"from another service, {found.without_reason} without a reason, {found.unmatched} "
        "for no message published here",
        "well-formed commands (dead-lettered / sent): "
        + ", ".join(
            f"{kind.removeprefix('command_')} {found.well_formed_lettered_by[kind]}/{n}"
            for kind, n in sorted(found.well_formed_by.items())
        )
        + (
            "; the rest got no dead letter (DEFECT: a command that changes nothing must be "
            "answered with its reason)"
            if found.well_formed_lettered < found.well_formed
            else ""
        ),
        f"service pids unchanged through the flood: {pids == world.pids}",
    ]
    if lost_by:
        row.notes.append(
            f"lost (no dead letter): {dict(sorted(lost_where.items()))}, by kind "
            f"{dict(sorted(lost_by.items()))}; {undecodable} of them "
            "are bodies FastStream's JSON decoder raises on before the service's handler runs "
            "(DEFECT: redelivered to max_deliver, then dropped)"
        )
    if refused:
        kinds = Counter(f"{m.family}/{m.category}: {why[:60]}" for m, why in refused)
        row.notes.append(f"refused at publish: {dict(kinds)}")
    return row


# ---- fault 2: nats-server killed mid-canary ----------------------------------------------------


@dataclass
class NatsKill:
    """SIGKILL nats-server `delay` seconds into the deployment's first step; the supervisor
    brings it back after `outage` seconds (0: at its next check)."""

    world: World
    deployment: Deployment
    delay: float
    outage: float
    killed_at: float | None = None
    back_at: float | None = None

    def tick(self) -> None:
        into = seconds_into_step(self.deployment, 0)
        if self.killed_at is None and into is not None and into >= self.delay:
            self.world.kill_nats(self.outage)
            self.killed_at = time.monotonic()
        server = self.world.stack.nats
        alive = server is not None and server.proc is not None and server.proc.poll() is None
        if self.killed_at is not None and self.back_at is None and alive:
            self.back_at = time.monotonic()


def run_nats_kill(args: argparse.Namespace, console: Console, rng: random.Random) -> Row:
    started = time.monotonic()
    row = Row("nats-kill")
    outages = [0.0] if args.quick else args.outages
    with world_for("nats-kill", args.rps, console, args.keep) as world:
        for trial, outage in enumerate(outages):
            deployment = world.deploy("healthy", f"n{trial}")
            fault = NatsKill(world, deployment, rng.uniform(1.0, 4.0), outage)
            world.follow([deployment], timeout=300, on_tick=fault.tick)
            if fault.killed_at is None:
                deployment.problems.append("nats-server never killed (no canary step seen)")
                continue
            down = (fault.back_at or time.monotonic()) - fault.killed_at
            row.notes.append(
                f"n{trial}: nats-server SIGKILLed {fault.delay:.1f} s into step 1, serving again "
                f"{down:.1f} s later; {deployment.outcome()}"
            )
        return finish_row(row, world, started)


def seconds_into_step(d: Deployment, index: int) -> float | None:
    """How long ago the deployment's step `index` started (its event's time), if it has."""
    for event in d.events:
        if isinstance(event, CanaryStepStarted) and event.step_index == index:
            return (datetime.now(UTC) - event.occurred_at).total_seconds()
    return None


# ---- fault 3: services killed at random points -------------------------------------------------

POINTS: dict[Kind, tuple[str, ...]] = {
    "healthy": ("requested", "validated", "benchmarked", "step0", "analysed", "step1", "outcome"),
    "failing": ("requested", "validated", "benchmarked", "step0", "analysed", "outcome"),
    "corrupted": ("requested", "outcome"),
}
LIKELY: dict[str, str] = {  # which service is busy at each point
    "requested": "validator",
    "validated": "benchmarker",
    "benchmarked": "canary-controller",
    "step0": "router",
    "analysed": "canary-controller",
    "step1": "router",
    "outcome": "notifier",
}


def reached(d: Deployment, point: str) -> bool:
    if point == "requested":
        return True
    if point == "validated":
        return any(isinstance(e, ValidationCompleted) for e in d.events)
    if point == "benchmarked":
        return any(isinstance(e, BenchmarkCompleted) for e in d.events)
    if point.startswith("step"):
        index = int(point.removeprefix("step"))
        return any(isinstance(e, CanaryStepStarted) and e.step_index == index for e in d.events)
    if point == "analysed":
        return any(isinstance(e, CanaryAnalysed) for e in d.events)
    if point == "outcome":
        return bool(d.terminal())
    raise ValueError(point)


@dataclass
class KillPlan:
    """Where one deployment's SIGKILLs land: (point, service, seconds after the point), and
    whether the notifier dies right after Slack answers the post that follows `slack_at`."""

    world: World
    deployment: Deployment
    kills: list[tuple[str, str, float]]
    slack_at: str | None
    reached_at: dict[str, float] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)
    armed: bool = False

    def describe(self) -> str:
        parts = [f"{v} at {p}+{d:.1f}s" for p, v, d in self.kills]
        if self.slack_at:
            parts.append(f"notifier after Slack's answer to the next post from {self.slack_at}")
        return ", ".join(parts)

    def tick(self) -> None:
        now = time.monotonic()
        for point in POINTS[self.deployment.kind]:
            if point not in self.reached_at and reached(self.deployment, point):
                self.reached_at[point] = now
        for n, (point, victim, delay) in enumerate(self.kills):
            if n in self.done or now < self.reached_at.get(point, now + 1) + delay:
                continue
            self.done.add(n)
            if victim == "notifier" and self.armed:
                continue  # its pid is armed on the Slack side
            if not self.world.kill_service(victim):
                self.world.console.print(
                    f"    ({victim} not killed: dead already, or killed "
                    f"{KILLS_PER_MINUTE} times this minute)"
                )
        if self.slack_at and not self.armed and self.slack_at in self.reached_at:
            wait = 1.0 if self.slack_at == "step0" else 0.0  # after the progress post
            if now >= self.reached_at[self.slack_at] + wait and self.world.may_kill("notifier"):
                self.armed = True
                self.world.kill_times["notifier"].append(now)
                self.world.slack.kill_after_next_post(self.world.pids["notifier"])


def run_service_kill(args: argparse.Namespace, console: Console, rng: random.Random) -> Row:
    started = time.monotonic()
    row = Row("service-kill")
    kinds: list[Kind] = ["healthy", "failing", "corrupted"]
    plan = [kinds[i % 3] for i in range(3 if args.quick else args.deployments)]
    armed = fired = 0
    with world_for("service-kill", args.rps, console, args.keep) as world:
        services = sorted(world.stack.children)
        for i, kind in enumerate(plan):
            points = list(POINTS[kind])
            kills = [
                (point, LIKELY[point] if rng.random() < 0.7 else rng.choice(services), 0.0)
                for point in sorted(rng.sample(points, min(2, len(points))), key=points.index)
            ]
            kills = [(p, v, rng.uniform(0.0, 1.5)) for p, v, _ in kills]
            # Every third deployment (each kind in turn), and all in --quick: the notifier dies
            # between Slack's answer and its ledger write.
            slack_at = {"healthy": "step1", "failing": "step0", "corrupted": "requested"}[kind]
            deployment = world.deploy(kind, f"{kind[0]}{i}")
            killer = KillPlan(
                world, deployment, kills, slack_at if args.quick or i % 4 == 0 else None
            )
            console.print(f"    plan: {killer.describe()}", highlight=False)
            world.follow([deployment], timeout=300, on_tick=killer.tick, settle_s=4.0)
            killed = world.slack.disarm()
            armed += int(killer.armed)
            fired += len(killed)
            world.kills["notifier"] += len(killed)
        world.follow(world.deployments, timeout=30, settle_s=5.0)  # late notices, duplicates
        row.notes.append(
            f"notifier SIGKILLed between Slack's answer and its ledger write: {fired} times "
            f"({armed} armed)"
        )
        row.notes.append(f"SIGKILLs by service: {dict(sorted(world.kills.items()))}")
        row.dead_letters_received = world.dead_letter_count()
        return finish_row(row, world, started)


# ---- fault 4: the metrics path down mid-canary -------------------------------------------------


@dataclass
class IngestStop:
    """Pause the ingest's durable consumer (admin) `delay` seconds into the first step; resume
    it after `gap` seconds, or once the deployment has its outcome (`gap` None)."""

    world: World
    deployment: Deployment
    delay: float
    gap: float | None
    paused_at: float | None = None
    resumed_at: float | None = None

    def tick(self) -> None:
        now = time.monotonic()
        into = seconds_into_step(self.deployment, 0)
        if self.paused_at is None and into is not None and into >= self.delay:
            self.world.bus_call(pause_ingest)
            self.paused_at = now
            self.world.console.print(f"    ingest paused {into:.1f} s into step 1")
        if self.paused_at is None or self.resumed_at is not None:
            return
        if (self.gap is None and self.deployment.terminal()) or (
            self.gap is not None and now >= self.paused_at + self.gap
        ):
            self.world.bus_call(resume_ingest)
            self.resumed_at = now
            self.world.console.print(f"    ingest resumed after {now - self.paused_at:.1f} s")


async def pause_ingest(js: Any) -> None:
    until = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    await js.pause_consumer(subjects.METRICS_STREAM, subjects.INGEST_DURABLE, until)


async def resume_ingest(js: Any) -> None:
    await js.resume_consumer(subjects.METRICS_STREAM, subjects.INGEST_DURABLE)


def run_metrics_down(args: argparse.Namespace, console: Console, rng: random.Random) -> Row:
    """The ingest stopped mid-canary until the outcome (expected: held, then rolled back,
    inconclusive, at the held deadline), and for `--metrics-gap` seconds (the records wait in
    the stream and the step's extension covers the gap: expected promoted)."""
    started = time.monotonic()
    row = Row("metrics-down")
    gaps: list[float | None] = [None] if args.quick else [None, args.metrics_gap]

    with world_for("metrics-down", args.rps, console, args.keep) as world:
        for trial, gap in enumerate(gaps):
            deployment = world.deploy("healthy", f"m{trial}")
            if gap is None:
                deployment.expect = "rolled_back:inconclusive"
            fault = IngestStop(world, deployment, rng.uniform(1.0, 3.0), gap)
            world.follow([deployment], timeout=300, on_tick=fault.tick)
            held = [e for e in deployment.events if isinstance(e, DeploymentHeld)]
            ends = deployment.terminal()
            stopped = f"{gap:g} s" if gap is not None else "until the outcome"
            note = f"m{trial} (ingest stopped {stopped}): {deployment.outcome()}"
            if held:
                note += f"; held at step {held[0].step_index + 1}"
                if ends:
                    late = (ends[0].occurred_at - held[0].deadline).total_seconds()
                    note += f", ended {late:+.1f} s from the held deadline"
            if gap is None:
                if not held:
                    deployment.problems.append("never held")
                elif ends and ends[0].occurred_at < held[0].deadline:
                    deployment.problems.append("rolled back before the held deadline")
            row.notes.append(note)
        return finish_row(row, world, started)


# ---- main ---------------------------------------------------------------------------------------

RUNNERS: dict[str, Callable[[argparse.Namespace, Console, random.Random], Row]] = {
    "malformed": run_malformed,
    "nats-kill": run_nats_kill,
    "service-kill": run_service_kill,
    "metrics-down": run_metrics_down,
}


def render(rows: Sequence[Row]) -> str:
    lines = [
        "| fault | deployments | right outcomes | lost | duplicated events | duplicate notices "
        "| dead letters expected / received | service restarts (SIGKILLs) | nats restarts | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        notices = "-" if r.duplicate_notices is None else str(r.duplicate_notices)
        lines.append(
            f"| {r.fault} | {r.deployments} | {r.right} | {r.lost} | {r.duplicated_events} | "
            f"{notices} | {r.dead_letters_expected:,} / {r.dead_letters_received:,} | "
            f"{r.service_restarts} ({r.killed}) | {r.nats_restarts} | {r.seconds:.0f} |"
        )
    for r in rows:
        lines.append("")
        lines.append(f"{r.fault}:")
        lines += [f"- {note}" for note in r.notes]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--fault", nargs="+", choices=FAULTS, default=list(FAULTS))
    parser.add_argument("--quick", action="store_true", help="a small version of each fault")
    parser.add_argument("--malformed", type=int, default=None, help="messages (10,000; quick 700)")
    parser.add_argument("--deployments", type=int, default=18, help="service-kill series (18)")
    parser.add_argument(
        "--outages",
        type=float,
        nargs="+",
        default=[0.0, 20.0, 40.0],
        help="nats-kill: seconds the restart is held back, one trial each (0 20 40)",
    )
    parser.add_argument(
        "--metrics-gap", type=float, default=6.0, help="metrics-down: a short stop (6 s)"
    )
    parser.add_argument("--rps", type=float, default=50.0, help="users' requests/s (50)")
    parser.add_argument("--drain-timeout", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--keep", action="store_true", help="keep each fault's data directory")
    args = parser.parse_args()
    if args.malformed is None:
        args.malformed = 700 if args.quick else 10_000
    console = Console(stderr=True)
    machine = describe_machine(
        ("nats-py", "faststream", "chdb-core", "slack-sdk", "pydantic"), nats_server=True
    )
    started = datetime.now(UTC)
    rows = []
    for name in args.fault:
        console.rule(name)
        t0 = time.monotonic()
        try:
            row = RUNNERS[name](args, console, random.Random(f"{args.seed}-{name}"))
        except Exception as exc:  # one fault's failure must not lose the others' figures
            console.print_exception()
            row = Row(name, seconds=time.monotonic() - t0, notes=[f"DID NOT FINISH: {exc!r}"])
        rows.append(row)
        console.print(render([row]), highlight=False, markup=False)
    print(f"command: {command_line()}")
    print(f"machine: {json.dumps(machine)}")
    print(f"date: {started:%Y-%m-%d %H:%M} UTC")
    print(
        f"users: {args.rps:g} requests/s through the router; ack_wait {ACK_WAIT_S:g} s; canary "
        f"policy_overrides {json.dumps(CANARY['canary'])}"
    )
    print()
    print(render(rows))


if __name__ == "__main__":
    main()
