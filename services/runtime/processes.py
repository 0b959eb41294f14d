"""Child processes that never outlive the stack that started them."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when its parent dies, even by SIGKILL (Linux)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    log: Path | None = None,
    cwd: Path | None = None,
    stdout_to_terminal: bool = False,
) -> subprocess.Popen[bytes]:
    """Start a child in its own process group that is signalled if we die.

    Its stderr (logs) goes to `log`; its stdout too, unless `stdout_to_terminal`.
    """
    err: IO[bytes] | int = subprocess.DEVNULL
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        err = log.open("ab")
    out: IO[bytes] | int | None = None if stdout_to_terminal else err
    preexec: Callable[[], None] = _die_with_parent
    try:
        return subprocess.Popen(
            list(argv),
            env=dict(env) if env is not None else None,
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            preexec_fn=preexec,
            start_new_session=True,
        )
    finally:
        if not isinstance(err, int):
            err.close()


def terminate(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGTERM, wait, then SIGKILL the whole group; returns the exit status."""
    if proc.poll() is None:
        signal_group(proc, signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            signal_group(proc, signal.SIGKILL)
    return proc.wait()


def signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        proc.send_signal(sig)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return True
    return state != "Z"


@contextlib.contextmanager
def stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """SIGTERM and SIGINT set `stop` while inside, for a service's main coroutine.

    Installed before anything starts, so an early SIGTERM still shuts down cleanly. Only the
    main thread of a POSIX process receives signals; elsewhere (a test running the coroutine
    in a thread) cancellation is the way to stop, and nothing is installed.
    """
    signals = (signal.SIGTERM, signal.SIGINT)
    loop = asyncio.get_running_loop()
    install = os.name == "posix" and threading.current_thread() is threading.main_thread()
    if install:
        for sig in signals:
            loop.add_signal_handler(sig, stop.set)
    try:
        yield
    finally:
        if install:
            for sig in signals:
                loop.remove_signal_handler(sig)
