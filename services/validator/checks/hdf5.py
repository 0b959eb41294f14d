"""HDF5 files (Keras .h5) read by h5py in a child process: libhdf5 is C, and a crafted file can
crash it, hang it or exhaust its memory. The child can; the validator cannot."""

from __future__ import annotations

import functools
import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from services.validator.checks.base import TimeLimitReached, on_time, spending

__all__ = ["H5_MEMORY_BYTES", "H5_TIMEOUT_S", "Hdf5Read", "read_hdf5"]

H5_TIMEOUT_S = 10.0
H5_MEMORY_BYTES = 2 * 1024**3
# The child sets its own limits before it imports h5py: a preexec_fn is unsafe in a process
# with threads (the validator hashes in a thread pool). It opens the file, lists the root's
# attributes and groups (what the structure check needs) and returns model_config, the Keras
# model description the unsafe-code check walks.
_H5_READER = """
import json, resource, sys
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
import h5py
with h5py.File(sys.argv[1], "r") as h5:
    list(h5.attrs.keys())
    list(h5.keys())
    raw = h5.attrs.get("model_config")
if raw is not None and not isinstance(raw, str):
    raw = bytes(raw).decode("utf-8")
sys.stdout.write(json.dumps({"model_config": raw}))
"""


@dataclass(frozen=True)
class Hdf5Read:
    """What the child read: the model_config attribute, or why the file could not be read."""

    model_config: str | None = None
    problem: str | None = None


# What one validation spends on HDF5 children (base.ValidationBudget). Each costs ~140 ms to
# start and may run to H5_TIMEOUT_S: 10,000 files shaped like HDF5 would take 25 minutes, or a
# day if each hangs. A real Keras model is one .h5 file or a few; past these, a file is not
# read, and says so (the checks then fail it as not scanned).
MAX_HDF5_FILES = 32
MAX_HDF5_SECONDS = 30.0


def read_hdf5(path: Path) -> Hdf5Read:
    """The file read once per content: the structure and unsafe-code checks both ask."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    budget = spending()
    if budget is not None and key in budget.hdf5_reads:
        read: Hdf5Read = budget.hdf5_reads[key]
        return read
    if budget is None or str(path) in budget.hdf5_files:
        return _read(*key)
    if len(budget.hdf5_files) >= MAX_HDF5_FILES or budget.hdf5_seconds >= MAX_HDF5_SECONDS:
        return Hdf5Read(
            problem=f"not read: this validation has read {len(budget.hdf5_files)} HDF5 files in "
            f"{budget.hdf5_seconds:.0f} s, its limit ({MAX_HDF5_FILES} files, "
            f"{MAX_HDF5_SECONDS:g} s; each is parsed in a child process)"
        )
    on_time()
    budget.hdf5_files.add(str(path))
    started = time.perf_counter()
    try:
        left = budget.left_s()
        if left is not None and left < H5_TIMEOUT_S:  # the child may not outlive the limit
            try:
                read = budget.hdf5_reads[key] = _spawn(key[0], max(left, 0.01))
            except subprocess.TimeoutExpired:
                raise TimeLimitReached(budget.time_limit_s or 0.0) from None
            return read
        return _read(*key)
    finally:
        budget.hdf5_seconds += time.perf_counter() - started


@functools.lru_cache(maxsize=64)
def _read(path: str, size: int, mtime_ns: int, inode: int) -> Hdf5Read:
    try:
        return _spawn(path, H5_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return Hdf5Read(problem=f"the HDF5 parser did not finish in {H5_TIMEOUT_S:g} s (killed)")


def _spawn(path: str, timeout: float) -> Hdf5Read:
    """Parse in a child process; raises subprocess.TimeoutExpired past `timeout` (killed)."""
    proc = subprocess.run(
        [sys.executable, "-I", "-c", _H5_READER, path, str(H5_MEMORY_BYTES)],
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        return Hdf5Read(problem=f"the HDF5 parser crashed ({sig}) on this file")
    if proc.returncode != 0:
        last = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        return Hdf5Read(problem=f"the HDF5 parser could not read it: {last[0][:300]}")
    try:
        raw = json.loads(proc.stdout)["model_config"]
    except (ValueError, KeyError, TypeError):
        return Hdf5Read(problem="the HDF5 parser gave no readable answer")
    return Hdf5Read(model_config=raw if isinstance(raw, str) else None)
