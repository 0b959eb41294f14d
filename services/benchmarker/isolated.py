"""The benchmark in a child process, stopped when it runs too long or takes too much memory.

A model's files drive native code that no exception handler can stop: a tokenizer.json can make
the Rust tokenizers library abort the process (a failed allocation), hold one encode call for
hours, or inflate a prompt until one forward pass takes minutes and gigabytes. The benchmarker
therefore measures every deployment in a child process (`python -m
services.benchmarker.child`) that it can kill, and turns the child's death, or its stopping,
into the stage's answer: `could not run` while loading, the running check `error` while
measuring, with the checks already done kept.

The parent watches the child's resident memory (PREFLIGHT_BENCHMARK_MEMORY_LIMIT) and a hard
deadline per phase: fetching a remote model (PREFLIGHT_BENCHMARK_FETCH_TIME_LIMIT_S), loading
one (PREFLIGHT_BENCHMARK_LOAD_TIME_LIMIT_S) and measuring (PREFLIGHT_BENCHMARK_TIME_LIMIT_S plus
a grace: the child stops itself between steps at the limit, and is stopped only when one step
never returns). The child runs from an empty working directory of its own, so a relative file name
in a model's configuration resolves to nothing of the service's.

A service keeps one spare child started after its first deployment (imports and a warm-up on a
tiny model: about 3.4 s here), so a deployment does not wait for them (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from services.benchmarker.run import Step, could_not_run, verdict
from services.contracts.events import CheckResult, StageReport, Status
from services.contracts.policy import Policy
from services.runtime.settings import Settings

log = logging.getLogger("preflight.benchmarker")
child_log = logging.getLogger("preflight.benchmarker.child")

POLL_S = 0.1
"""How often the child's memory is read: an allocation bomb grows by at most a few GB in it."""
START_LIMIT_S = 300.0
"""Starting the child (interpreter, torch, transformers) and reading the job."""
DEFAULT_MEMORY_SHARE = 0.8
STDERR_KEPT = 200  # a Rust backtrace runs to a hundred lines after the reason
LOG_CHARS = 4000


@dataclass(frozen=True)
class Job:
    """One benchmark, as the child receives it (JSON): what to measure and where its state is."""

    location: str
    baseline_location: str | None
    policy: dict[str, Any]
    model_class: str = "default"
    service: str = ""
    device: str | None = None
    data_dir: str | None = None
    """Stored perplexities and the validator's digests (ResultStore); None: none kept."""
    model_cache_dir: str | None = None
    model_cache_max_bytes: str | None = None
    torch_threads: int | None = None
    time_limit_s: float | None = None

    @classmethod
    def of(cls, location: str, baseline: str | None, policy: Policy, **rest: Any) -> Job:
        """A job; a relative local path is made absolute here: the child runs elsewhere."""
        return cls(
            _absolute(location),
            _absolute(baseline) if baseline is not None else None,
            policy.model_dump(mode="json"),
            **rest,
        )


def _absolute(location: str) -> str:
    if "://" in location or Path(location).is_absolute():
        return location
    return str(Path(location).absolute())


@dataclass(frozen=True)
class Limits:
    load_s: float | None = None
    fetch_s: float | None = None
    memory_bytes: int | None = None
    grace_s: float | None = None
    """Past the job's time limit before the child is stopped; None: max(60 s, 10%)."""

    def measuring_s(self, time_limit_s: float | None) -> float | None:
        """The hard limit on measuring: the child's own limit plus a grace for the step that
        was running at it (one window or generation may legitimately take a while)."""
        if time_limit_s is None:
            return None
        grace = self.grace_s if self.grace_s is not None else max(60.0, time_limit_s / 10)
        return time_limit_s + grace


def host_memory() -> int | None:
    """This host's memory, or its container's (cgroup v2 or v1) when that is less."""
    sizes: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                sizes.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # v1 says "no limit" with a huge number
            sizes.append(int(text))
    return min(sizes) if sizes else None


def memory_limit(configured: str | None) -> int | None:
    """PREFLIGHT_BENCHMARK_MEMORY_LIMIT in bytes; unset: 80% of host_memory()."""
    from services.storage.cache import parse_bytes

    if configured:
        limit = parse_bytes(configured)
        if limit <= 0:
            raise ValueError(f"PREFLIGHT_BENCHMARK_MEMORY_LIMIT must be more than 0: {configured}")
        return limit
    host = host_memory()
    return int(host * DEFAULT_MEMORY_SHARE) if host else None


def resident_bytes(pid: int) -> int | None:
    """The process's resident memory (Linux /proc); None where it cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/statm").read_text().split()
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


_NOT_THE_REASON = ("Traceback", "note:", "stack backtrace:", "thread '")
"""stderr lines around the reason: Python's traceback header, Rust's backtrace and its notes."""


class _Child:
    """One started child: its process, what it says (a queue) and the tail of its stderr."""

    def __init__(self, python: str) -> None:
        self.workdir = tempfile.mkdtemp(prefix="preflight-benchmark-")  # child.WORKDIR_PREFIX
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # importable from the empty workdir
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        try:
            self.process = subprocess.Popen(
                [python, "-m", "services.benchmarker.child"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=self.workdir,
                env=env,
                start_new_session=True,  # its own process group: stopped whole, never by a ^C
            )
        except OSError:
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise
        self.messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.stderr: deque[str] = deque(maxlen=STDERR_KEPT)
        self._readers = [
            threading.Thread(target=self._read_messages, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_messages(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue  # not the protocol: the child writes its own stdout to stderr
            if isinstance(message, dict):
                self.messages.put(message)
        self.messages.put(None)  # the child closed its end: it exited or is exiting

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for raw in self.process.stderr:
            line = raw.decode("utf-8", "replace").rstrip()[:LOG_CHARS]
            if line:
                self.stderr.append(line)
                child_log.info("%s", line)

    def alive(self) -> bool:
        return self.process.poll() is None

    def send(self, job: Job) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(asdict(job)).encode() + b"\n")
        self.process.stdin.close()

    def stop(self) -> int | None:
        """Kill the child's process group, whatever of it is left (anything the child started
        too); the child's exit status (negative: the signal)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except OSError:  # the group is gone: the child exited and left nothing behind
            if self.alive():
                self.process.kill()
        try:
            code = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # pragma: no cover: SIGKILL is not refused
            code = None
        for reader in self._readers:
            reader.join(timeout=5)
        for pipe in (self.process.stdin, self.process.stdout, self.process.stderr):
            if pipe is not None and not pipe.closed:
                pipe.close()
        shutil.rmtree(self.workdir, ignore_errors=True)
        return code

    def last_words(self) -> str:
        """The child's last stderr line worth quoting (a Rust abort says why there)."""
        for line in reversed(self.stderr):
            if not line.startswith(_NOT_THE_REASON) and not line[:1].isspace():
                return line[:300]
        return ""


@dataclass
class _Watch:
    """What the parent knows of the running job, from the child's steps."""

    job: Job
    limits: Limits
    started: float = field(default_factory=time.perf_counter)
    phase: str = "starting"
    name: str = ""
    device: str | None = None
    checks: list[CheckResult] = field(default_factory=list)
    deadline: float | None = field(default_factory=lambda: time.monotonic() + START_LIMIT_S)
    limit_s: float = START_LIMIT_S
    limit_name: str = "the start of the benchmark process"

    def step(self, step: Step) -> None:
        now = time.monotonic()
        if step.phase == "checked":
            if step.check is not None:
                self.checks.append(step.check)
            return
        if step.phase == "loaded":
            self.device = step.name
            return
        first_measurement = step.phase == "measuring" and self.phase != "measuring"
        self.phase, self.name = step.phase, step.name
        if step.phase == "fetching":
            self._limit(now, self.limits.fetch_s, "PREFLIGHT_BENCHMARK_FETCH_TIME_LIMIT_S")
        elif step.phase == "loading":
            self._limit(now, self.limits.load_s, "PREFLIGHT_BENCHMARK_LOAD_TIME_LIMIT_S")
        elif first_measurement:  # one limit for all the measurements
            self._limit(
                now,
                self.limits.measuring_s(self.job.time_limit_s),
                "PREFLIGHT_BENCHMARK_TIME_LIMIT_S",
            )

    def _limit(self, now: float, seconds: float | None, name: str) -> None:
        self.deadline = now + seconds if seconds is not None else None
        self.limit_s, self.limit_name = seconds or 0.0, name

    def during(self) -> str:
        return {
            "starting": "while the benchmark process started",
            "fetching": f"while fetching {self.name}",
            "loading": f"while loading {self.name}",
            "measuring": f"during {self.name}",
        }.get(self.phase, f"during {self.phase}")

    def stopped(self, reason: str) -> StageReport:
        """The report of a child that did not finish: its checks so far, then why it stopped."""
        service = self.job.service
        if self.phase != "measuring":
            return could_not_run(reason, service, self.started)
        checks = [*self.checks, CheckResult(name=self.name, status=Status.ERROR, reason=reason)]
        done = {c.name for c in checks}
        bench = self.job.policy.get("benchmark", {})
        for name in ("perplexity", "latency", "consistency"):
            if name not in done and bench.get(name, True):
                why = f"not run: the benchmark process was stopped during {self.name}"
                checks.append(CheckResult(name=name, status=Status.ERROR, reason=why))
        return verdict(checks, self.started, service, self.device or "-")


class Runner:
    """Runs benchmarks in child processes, one at a time; keeps a started spare when asked."""

    def __init__(
        self, limits: Limits, *, keep_spare: bool = False, python: str = sys.executable
    ) -> None:
        self.limits = limits
        self.keep_spare = keep_spare
        self.python = python
        self._spare: _Child | None = None
        self._running: _Child | None = None
        self.current: _Watch | None = None
        """What the running job's child last said it does (its phase), for status and tests."""
        self._closed = False
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the spare now (a service at start), not at its first deployment."""
        with self._lock:
            if self.keep_spare and self._spare is None and not self._closed:
                self._spare = _Child(self.python)

    def close(self) -> None:
        """Stop the running benchmark's child, if any (its job ends as `could not run`), and
        the spare; a service shutting down does not wait for a benchmark of half an hour."""
        self._closed = True
        running = self._running
        if running is not None:
            running.stop()
        with self._lock:
            if self._spare is not None:
                self._spare.stop()
                self._spare = None

    def run(self, job: Job) -> tuple[StageReport, str | None]:
        """(report, device description), as run_benchmarks gives, whatever the child does."""
        with self._lock:
            child = self._spare if self._spare is not None and self._spare.alive() else None
            if child is None and self._spare is not None:
                self._spare.stop()  # a spare that died while waiting: a fresh one
            self._spare = None
            watch = _Watch(job, self.limits)
            try:
                child = child or _Child(self.python)
            except OSError as exc:  # no process, or no temporary directory, to be had
                reason = f"could not start the benchmark process: {exc}"
                return watch.stopped(reason), None
            self._running, self.current = child, watch
            try:
                return self._watch(child, watch)
            finally:
                self._running, self.current = None, None
                child.stop()
                if self.keep_spare and not self._closed:
                    try:
                        self._spare = _Child(self.python)
                    except OSError as exc:  # the next job tries again, and says so
                        log.warning("could not start a spare benchmark process: %s", exc)

    def _watch(self, child: _Child, watch: _Watch) -> tuple[StageReport, str | None]:
        with contextlib.suppress(OSError):  # it died starting: its exit status says how
            child.send(watch.job)
        limit = self.limits.memory_bytes
        while True:
            try:
                message = child.messages.get(timeout=POLL_S)
            except queue.Empty:
                message = {}
            if message is None:
                return self._ended(child, watch), watch.device
            if answer := self._handle(message, watch):
                return answer
            used = resident_bytes(child.process.pid) if limit is not None else None
            if limit is not None and used is not None and used > limit:
                return self._stop(child, watch, self._over_memory(used, limit)), watch.device
            if watch.deadline is not None and time.monotonic() > watch.deadline:
                reason = (
                    f"the benchmark process ran past its hard limit of {watch.limit_s:g} s "
                    f"({watch.limit_name}) {watch.during()} and was stopped"
                )
                return self._stop(child, watch, reason), watch.device

    def _handle(self, message: dict[str, Any], watch: _Watch) -> tuple[StageReport, Any] | None:
        if "log" in message:
            name, level, text = message["log"]
            logging.getLogger(str(name)).log(int(level), "%s", str(text)[:LOG_CHARS])
        elif "step" in message:
            step = message["step"]
            check = step.get("check")
            watch.step(
                Step(
                    step["phase"],
                    str(step["name"]),
                    CheckResult.model_validate(check) if check else None,
                )
            )
        elif "result" in message:
            result = message["result"]
            return StageReport.model_validate(result["report"]), result.get("device")
        elif "crash" in message:
            reason = f"the benchmark process failed {watch.during()}: {message['crash']}"
            return watch.stopped(reason), watch.device
        return None

    @staticmethod
    def _over_memory(used: int, limit: int) -> str:
        from services.storage.cache import format_bytes

        return (
            f"the benchmark process used {format_bytes(used)} of memory, over its limit of "
            f"{format_bytes(limit)} (PREFLIGHT_BENCHMARK_MEMORY_LIMIT), and was stopped"
        )

    def _stop(self, child: _Child, watch: _Watch, reason: str) -> StageReport:
        where = watch.during()
        child.stop()
        log.warning("%s (%s)", reason, watch.job.location)
        return watch.stopped(reason if where in reason else f"{reason} {where}")

    def _ended(self, child: _Child, watch: _Watch) -> StageReport:
        """The child closed its output with no result: it died, or exited on its own."""
        code: int | None
        try:
            code = child.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            code = child.stop()
        if code is not None and code < 0:
            try:
                how = f"died ({signal.Signals(-code).name})"
            except ValueError:
                how = f"died (signal {-code})"
            if -code == signal.SIGKILL:  # not by the benchmarker: that goes through _stop
                how += ", killed from outside (the kernel's out-of-memory killer?)"
        else:
            how = f"exited with status {code} and no result"
        said = child.last_words()
        if self._closed:  # close() stopped it
            how, said = "was stopped: the benchmarker is shutting down", ""
        reason = f"the benchmark process {how} {watch.during()}" + (f": {said}" if said else "")
        log.warning("%s (%s)", reason, watch.job.location)
        return watch.stopped(reason)


def limits(settings: Settings) -> Limits:
    """The service's limits; raises ValueError for a memory limit that does not parse."""
    return Limits(
        load_s=settings.benchmark_load_time_limit_s,
        fetch_s=settings.benchmark_fetch_time_limit_s,
        memory_bytes=memory_limit(settings.benchmark_memory_limit),
    )


def job_settings(settings: Settings) -> dict[str, Any]:
    """What a Job takes from the settings: where state is, threads, the time limit."""
    cache_dir = settings.model_cache_dir
    return {
        "data_dir": str(settings.data_dir),
        "model_cache_dir": str(cache_dir) if cache_dir is not None else None,
        "model_cache_max_bytes": settings.model_cache_max_bytes,
        "torch_threads": settings.torch_threads,
        "time_limit_s": settings.benchmark_time_limit_s,
    }


def run_in_process(job: Job) -> tuple[StageReport, str | None]:
    """The same job in this process, for callers that give no Runner (tests of pure flow)."""
    from services.benchmarker.child import run_job

    return run_job(job, lambda step: None)


Run = Callable[[Job], tuple[StageReport, str | None]]
