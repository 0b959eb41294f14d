"""What every benchmark prints about how it was run: the exact command line."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any


def command_line() -> str:
    """The command as typed from the repository root, for docs/benchmarks.md."""
    exe = Path(sys.executable)
    try:
        shown = str(exe.relative_to(Path.cwd()))
    except ValueError:
        shown = str(exe)
    return shlex.join([shown, *sys.argv])


def describe_machine(dists: Sequence[str], *, nats_server: bool = False) -> dict[str, Any]:
    """CPU, OS, Python, the given distributions' versions and the load when the run started."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for dist in dists:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "absent"
    info: dict[str, Any] = {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }
    if nats_server:
        from services.runtime.nats_server import binary

        server = subprocess.run(
            [str(binary()), "--version"], capture_output=True, text=True, check=False, timeout=10
        ).stdout.strip()
        info["nats_server"] = server.removeprefix("nats-server: ")
    return {**info, **versions, "loadavg_1m_at_start": round(os.getloadavg()[0], 2)}
