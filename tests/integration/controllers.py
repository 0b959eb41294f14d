"""Real canary-controller processes beside a real nats-server running the shipped users and
permissions (deploy/nats/nats.conf), and a gateway played by the test: it reads the route the
controller writes and publishes the request records a router would, buffering them while the bus
is down as the router does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats.js.errors
import yaml
from nats.js import JetStreamContext
from pydantic import SecretStr

from services.canary_controller.lease import LEASE_KEY, LeaseValue
from services.contracts import subjects
from services.contracts.events import (
    BenchmarkCompleted,
    DeploymentRequested,
    RequestMetricsBatch,
    RequestRecord,
    Route,
    RouterReport,
    RouteTarget,
    StageReport,
    Status,
)
from services.router.report import applied
from services.runtime import bus, nats_users
from services.runtime.nats_server import NatsServer
from services.runtime.settings import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Bus:
    """A nats-server with the shipped configuration and passwords made for this test."""

    server: NatsServer
    credentials: dict[str, str]

    def settings(self, user: str = nats_users.ADMIN, **more: Any) -> Settings:
        return Settings(
            nats_url=self.server.url,
            nats_user=user,
            nats_password=SecretStr(self.credentials[user]),
            **more,
        )


def start_bus(root: Path, port: int = -1) -> Bus:
    credentials = nats_users.ensure_credentials(root)
    server = NatsServer(
        root / "nats",
        port=port,
        config=nats_users.conf_path(),
        env=nats_users.server_env(credentials),
    ).start()
    return Bus(server, credentials)


def write_policy(path: Path, canary: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"defaults": {"canary": canary}}))
    return path


@dataclass
class Controller:
    """`preflight service run canary-controller` as the supervisor starts it, killable."""

    name: str
    env: dict[str, str]
    log: Path
    http_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    kills: int = 0

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.stack.cli", "service", "run", "canary-controller"],
                env=self.env,
                stdout=out,
                stderr=out,
            )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.kills += 1

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        """(status, JSON body) of the controller's page at `path`; (0, {}) if it does not answer."""
        url = f"http://127.0.0.1:{self.http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return int(resp.status), json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return int(exc.code), json.loads(exc.read() or b"{}")
        except OSError:
            return 0, {}

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def controller(
    bus_: Bus, root: Path, name: str, policy: Path, *, data_dir: Path | None = None
) -> Controller:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFLIGHT_")}
    port = free_port()
    env |= {
        "PREFLIGHT_NATS_URL": bus_.server.url,
        "PREFLIGHT_NATS_USER": "canary-controller",
        "PREFLIGHT_NATS_PASSWORD": bus_.credentials["canary-controller"],
        "PREFLIGHT_DATA_DIR": str(data_dir or root / "data"),
        "PREFLIGHT_POLICY_FILE": str(policy),
        "PREFLIGHT_CONTROLLER_HTTP_HOST": "127.0.0.1",
        "PREFLIGHT_CONTROLLER_HTTP_PORT": str(port),
        "PREFLIGHT_INSTANCE": name,
        "PREFLIGHT_LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    }
    return Controller(name, env, root / f"{name}.log", port)


async def bootstrap(bus_: Bus) -> Any:
    """`preflight bootstrap` as the admin; returns the admin's connection."""
    settings = bus_.settings()
    nc = await bus.connect(settings, "test-admin", reconnect=True)
    await bus.ensure_topology(nc.jetstream(), settings)
    return nc


async def set_stable(js: JetStreamContext, model: str) -> None:
    routes = await js.key_value(subjects.ROUTES_BUCKET)
    route = Route(
        model=model, stable=RouteTarget(deployment_id=f"d-stable-{model[-3:]}", version="v1")
    )
    await routes.put(model, route.model_dump_json().encode())


async def lease_value(js: JetStreamContext) -> LeaseValue | None:
    kv = await js.key_value(subjects.LEASES_BUCKET)
    try:
        entry = await kv.get(LEASE_KEY)
    except nats.js.errors.KeyNotFoundError:
        return None
    return LeaseValue.parse(entry.value)


def benchmarked(deployment_id: str, model: str) -> BenchmarkCompleted:
    request = DeploymentRequested(
        deployment_id=deployment_id,
        model=model,
        version="v2",
        location="/models/v2",
        endpoint="http://127.0.0.1:9",
    )
    passed = StageReport(stage="benchmark", status=Status.PASSED, reason="passed")
    return BenchmarkCompleted(
        deployment_id=deployment_id, model=model, version="v2", report=passed, request=request
    )


async def wait_until(
    check: Callable[[], Awaitable[bool]], timeout: float, what: str, poll: float = 0.1
) -> float:
    """Seconds until `check()` is true; AssertionError naming `what` after `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with contextlib.suppress(Exception):
            if await check():
                return time.monotonic() - started
        await asyncio.sleep(poll)
    raise AssertionError(f"{what}: not within {timeout} s")


@dataclass
class Gateway:
    """200 requests a second to `model`, split by the route's weight, published as a router
    would: in batches, and while the bus is down kept and published once it is back (after
    `transit_delay_s`, as a router that reconnects a little later than the controller)."""

    js: JetStreamContext
    model: str
    transit_delay_s: float = 0.0
    rps: int = 200
    sent: int = 0
    kept_max: int = 0
    _pending: list[RequestMetricsBatch] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        nc = self.js._nc
        kv = await self.js.key_value(subjects.ROUTES_BUCKET)
        status = await self.js.key_value(subjects.ROUTER_STATUS_BUCKET)
        rng = random.Random(3)
        route: Route | None = None
        back_at: float | None = None
        while not stop.is_set():
            if nc.is_connected:
                with contextlib.suppress(Exception):
                    entry = await asyncio.wait_for(kv.get(self.model), 0.5)
                    route = Route.model_validate_json(entry.value or b"")
                    # Say what it serves, as a router does (services/router/report.py).
                    report = RouterReport(
                        instance="test-gateway", live=True, routes={self.model: applied(route)}
                    )
                    await asyncio.wait_for(
                        status.put("test-gateway", report.model_dump_json().encode()), 0.5
                    )
            if route is not None:
                self._pending.append(self._batch(route, rng))
            self.kept_max = max(self.kept_max, len(self._pending))
            if not nc.is_connected:
                back_at = None
            elif back_at is None:
                back_at = time.monotonic()
            if back_at is not None and time.monotonic() - back_at >= self.transit_delay_s:
                await self._flush()
            await asyncio.sleep(0.2)

    def _batch(self, route: Route, rng: random.Random) -> RequestMetricsBatch:
        live = route.canary is not None and route.canary_weight > 0
        target = route.canary if live and route.canary else route.stable
        now = datetime.now(UTC)
        records = []
        for _ in range(self.rps // 5):
            canary = live and rng.random() * 100 < route.canary_weight
            records.append(
                RequestRecord(
                    ts=now,
                    deployment_id=(target.deployment_id if target else None) or "",
                    model=self.model,
                    version="v2" if canary else "v1",
                    role="canary" if canary else "stable",
                    latency_ms=rng.lognormvariate(0, 0.3) * 40,
                    status=200,
                )
            )
        return RequestMetricsBatch(
            batch_id=secrets.token_hex(8), source="test-gateway", records=tuple(records)
        )

    async def _flush(self) -> None:
        while self._pending:
            batch = self._pending[0]
            try:
                await self.js.publish(
                    subjects.metrics("test-gateway"),
                    batch.model_dump_json().encode(),
                    stream=subjects.METRICS_STREAM,
                    headers={"Nats-Msg-Id": batch.batch_id},
                    timeout=1.0,
                )
            except Exception:
                return  # kept; the same batch id again later (deduplicated if it got through)
            self._pending.pop(0)
            self.sent += 1
