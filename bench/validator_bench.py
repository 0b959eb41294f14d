"""Validator speed and coverage against reference tools, side by side in one run (issue #3).

Four parts, each measured against its reference in the same run, so that ratios survive a noisy
shared machine:

    headers  header-only checks (inventory + format + structure + vram_fit) on a Llama-7B-shaped
             sharded safetensors directory whose data is sparse (real headers, no data)
    hash     cold sha256 of N random files (page-cached): `openssl dgst -sha256` against our
             sha256_file on one core and hash_files' thread pool on all cores; rounds interleave
    cache    validate() of the same files shipped as safetensors with a preflight manifest:
             cold (empty digest cache) and warm (every digest from the cache)
    scan     every fixture of tests/unit/validator/fixtures.py (HOSTILE and BENIGN): our
             unsafe-code check in-process and through `preflight validate --json`, against the
             picklescan, modelscan, ModelAudit and fickling CLIs; timings and which fixtures
             each one flags; and every CLI's process wall on one small model, with
             `preflight validate DIR` running all default checks

Each reference scanner but picklescan (a dependency of ours) runs from its own venv, where it
installs: `bash bench/scanner_venvs.sh` creates them under .cache/scanners/ with pinned
versions, and this script finds them there (or pass --modelscan, --modelaudit, --fickling).

Everything is written under one temp dir that is removed at the end. Run
`python bench/validator_bench.py --help`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Final

from machine import command_line  # bench/machine.py (scripts run from bench/)

from services.contracts.events import StageReport, Status
from services.contracts.policy import ValidationChecks, ValidationPolicy
from services.stack.samples import MANIFEST, write_sample_model, write_sparse_sharded_model
from services.validator.checks.base import CheckContext
from services.validator.checks.checksum import DigestCache, hash_files, sha256_file
from services.validator.checks.inventory import build_inventory
from services.validator.checks.unsafe_code import check_unsafe_code
from services.validator.validate import validate

REPO: Final = Path(__file__).resolve().parents[1]
BIN: Final = Path(sys.executable).parent
MIB: Final = 1024 * 1024
WRITE_CHUNK: Final = 8 * MIB
CLI_TIMEOUT_S: Final = 120.0
PARTS: Final = ("headers", "hash", "cache", "scan")
# Where bench/scanner_venvs.sh puts each reference scanner's own venv.
SCANNER_VENVS: Final = REPO / ".cache" / "scanners"
EXTERNAL_SCANNERS: Final = ("modelscan", "modelaudit", "fickling")

# Goals from issue #3.
GOAL_HEADERS_S: Final = 0.1
GOAL_ONE_CORE_X_OPENSSL: Final = 0.9
GOAL_WARM_VALIDATE_S: Final = 0.05
# Goal from issue #12: `preflight validate DIR` on a small model, process wall.
GOAL_CLI_SMALL_MODEL_S: Final = 0.25

# Header-only checks: what a request without digests costs before any tensor byte is read.
HEADER_POLICY: Final = ValidationPolicy(
    checks=ValidationChecks(checksum=False, unsafe_code=False, secrets=False, tokenizer=False)
)
# Only the unsafe-code check, for `preflight validate --policy` (same work as in-process).
ONLY_UNSAFE_YAML: Final = (
    "validation:\n  checks: {format: false, checksum: false, structure: false, "
    "secrets: false, vram_fit: false, tokenizer: false}\n"
)

Writer = Callable[[Path], Path]


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


# ---- part 1: header checks on a 7B-shaped sparse directory ----------------------------------


@dataclass(frozen=True)
class Timing:
    label: str
    runs: int
    median_ms: float
    p95_ms: float
    min_ms: float
    max_ms: float
    checks_median_ms: dict[str, float]
    status: str

    @classmethod
    def of(cls, label: str, samples: list[float], reports: list[StageReport]) -> Timing:
        per_check: dict[str, list[float]] = {}
        for report in reports:
            for check in report.checks:
                if check.status is not Status.SKIPPED or check.duration_ms:
                    per_check.setdefault(check.name, []).append(check.duration_ms)
        return cls(
            label=label,
            runs=len(samples),
            median_ms=ms(statistics.median(samples)),
            p95_ms=ms(percentile(samples, 95)),
            min_ms=ms(min(samples)),
            max_ms=ms(max(samples)),
            checks_median_ms={k: round(statistics.median(v), 2) for k, v in per_check.items()},
            status=", ".join(sorted({r.status.value for r in reports})),
        )


@dataclass(frozen=True)
class HeadersPart:
    files: int
    tensors: int
    apparent_bytes: int
    header_only: Timing
    all_default_checks: Timing
    goal_s: float
    goal_met: bool


def bench_headers(root: Path, runs: int, warmup: int) -> HeadersPart:
    model = write_sparse_sharded_model(root / "llama-7b-sparse")
    inv = build_inventory(str(model))
    apparent = sum(f.size for f in inv.files)
    paths: tuple[tuple[str, ValidationPolicy], ...] = (
        ("inventory + format + structure + vram_fit", HEADER_POLICY),
        ("all default checks (checksum skips: no digests)", ValidationPolicy()),
    )
    samples: dict[str, list[float]] = {label: [] for label, _ in paths}
    reports: dict[str, list[StageReport]] = {label: [] for label, _ in paths}
    for i in range(warmup + runs):
        # Alternate which path goes first, so neither always runs right after the other.
        order = paths if i % 2 == 0 else tuple(reversed(paths))
        for label, policy in order:
            t0 = time.perf_counter()
            report = validate(str(model), policy=policy)
            elapsed = time.perf_counter() - t0
            if i >= warmup:
                samples[label].append(elapsed)
                reports[label].append(report)
    header = Timing.of(paths[0][0], samples[paths[0][0]], reports[paths[0][0]])
    full = Timing.of(paths[1][0], samples[paths[1][0]], reports[paths[1][0]])
    structure = next(c for c in reports[paths[0][0]][0].checks if c.name == "structure")
    return HeadersPart(
        files=len(inv.files),
        tensors=int(structure.details.get("tensors", 0)),
        apparent_bytes=apparent,
        header_only=header,
        all_default_checks=full,
        goal_s=GOAL_HEADERS_S,
        goal_met=header.median_ms / 1000 <= GOAL_HEADERS_S,
    )


# ---- part 2: cold sha256 throughput against openssl -----------------------------------------


def write_random_safetensors(path: Path, data_bytes: int) -> None:
    """A real safetensors file: one U8 tensor of random bytes (random, so nothing compresses or
    dedupes underneath; U8, so the header states exactly the bytes that follow)."""
    doc = {
        "__metadata__": {"format": "pt", "generated_by": "bench/validator_bench.py"},
        "weight": {"dtype": "U8", "shape": [data_bytes], "data_offsets": [0, data_bytes]},
    }
    raw = json.dumps(doc, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        left = data_bytes
        while left > 0:
            n = min(WRITE_CHUNK, left)
            fh.write(os.urandom(n))
            left -= n


def read_through(paths: Sequence[Path]) -> None:
    """Read every byte once, so that every method below hashes from the page cache."""
    buffer = bytearray(WRITE_CHUNK)
    for path in paths:
        with path.open("rb", buffering=0) as fh:
            while fh.readinto(buffer):
                pass


def openssl_digests(paths: Sequence[Path]) -> dict[str, str]:
    """`openssl dgst -sha256 F...` in one process; {path: hex}."""
    out = subprocess.run(
        ["openssl", "dgst", "-sha256", *map(str, paths)],
        capture_output=True,
        text=True,
        check=True,
        timeout=CLI_TIMEOUT_S,
    ).stdout
    digests = {}
    for line in out.splitlines():
        # SHA2-256(/path)= hex   (OpenSSL 3)   or   SHA256(/path)= hex
        name, _, hexdigest = line.rpartition("= ")
        digests[name[name.index("(") + 1 : -1]] = hexdigest.strip()
    return digests


@dataclass(frozen=True)
class HashMethod:
    key: str
    label: str
    gb_per_s: list[float]
    median_gb_per_s: float


@dataclass(frozen=True)
class HashPart:
    files: int
    file_bytes: int
    total_bytes: int
    rounds: int
    workers: int
    methods: list[HashMethod]
    # Ratios taken round by round (methods side by side), then the median over rounds.
    ratios: dict[str, float]
    ratio_ranges: dict[str, list[float]]
    digests_agree: bool
    goal_one_core_x: float
    goal_met: bool


def bench_hash(paths: list[Path], rounds: int) -> HashPart:
    total = sum(p.stat().st_size for p in paths)
    workers = min(len(paths), len(os.sched_getaffinity(0)))
    inv = build_inventory(str(paths[0].parent))
    names = {p.name for p in paths}
    files = [f for f in inv.files if f.rel in names]

    def openssl_sequential() -> None:
        for p in paths:
            openssl_digests([p])

    def openssl_parallel() -> None:
        # The same split as our pool: `workers` processes, files dealt out round-robin.
        groups = [paths[i::workers] for i in range(workers)]
        procs = [
            subprocess.Popen(
                ["openssl", "dgst", "-sha256", *map(str, g)],
                stdout=subprocess.DEVNULL,
            )
            for g in groups
        ]
        for proc in procs:
            if proc.wait(timeout=CLI_TIMEOUT_S) != 0:
                raise RuntimeError("openssl dgst failed")

    def ours_one_core() -> None:
        for p in paths:
            sha256_file(p)

    def ours_pool() -> None:
        hash_files(files, None)

    methods: tuple[tuple[str, str, Callable[[], None]], ...] = (
        ("openssl_seq", "openssl dgst -sha256, one file at a time (1 core)", openssl_sequential),
        ("ours_seq", "sha256_file, one file at a time (1 core)", ours_one_core),
        ("ours_pool", f"hash_files thread pool, no cache ({workers} workers)", ours_pool),
        ("openssl_par", f"openssl dgst -sha256, {workers} processes at once", openssl_parallel),
    )
    speeds: dict[str, list[float]] = {key: [] for key, _, _ in methods}
    for r in range(rounds):
        shift = r % len(methods)  # rotate the order each round
        for key, _, run in methods[shift:] + methods[:shift]:
            t0 = time.perf_counter()
            run()
            speeds[key].append(total / (time.perf_counter() - t0) / 1e9)

    ref = openssl_digests(paths)
    ours = {h.rel: h.digest for h in hash_files(files, None)}
    agree = all(ref[str(p)] == ours[p.name] for p in paths)

    def per_round(num: str, den: str) -> list[float]:
        return [a / b for a, b in zip(speeds[num], speeds[den], strict=True)]

    pairs = {
        "ours_seq / openssl_seq": per_round("ours_seq", "openssl_seq"),
        "ours_pool / openssl_seq": per_round("ours_pool", "openssl_seq"),
        "ours_pool / openssl_par": per_round("ours_pool", "openssl_par"),
        "ours_pool / ours_seq": per_round("ours_pool", "ours_seq"),
    }
    ratios = {k: round(statistics.median(v), 3) for k, v in pairs.items()}
    return HashPart(
        files=len(paths),
        file_bytes=paths[0].stat().st_size,
        total_bytes=total,
        rounds=rounds,
        workers=workers,
        methods=[
            HashMethod(
                key=key,
                label=label,
                gb_per_s=[round(s, 3) for s in speeds[key]],
                median_gb_per_s=round(statistics.median(speeds[key]), 3),
            )
            for key, label, _ in methods
        ],
        ratios=ratios,
        ratio_ranges={k: [round(min(v), 3), round(max(v), 3)] for k, v in pairs.items()},
        digests_agree=agree,
        goal_one_core_x=GOAL_ONE_CORE_X_OPENSSL,
        goal_met=ratios["ours_seq / openssl_seq"] >= GOAL_ONE_CORE_X_OPENSSL,
    )


# ---- part 3: re-validation through the digest cache -----------------------------------------


@dataclass(frozen=True)
class CachePart:
    total_bytes: int
    rounds: int
    cold: Timing
    warm: Timing
    cold_checksum_gb_per_s: float | None
    warm_cached_files: int
    goal_warm_s: float
    goal_met: bool


def bench_cache(model: Path, root: Path, rounds: int, warm_runs: int) -> CachePart:
    cold_s: list[float] = []
    warm_s: list[float] = []
    cold_reports: list[StageReport] = []
    warm_reports: list[StageReport] = []
    for r in range(rounds):
        cache = DigestCache(root / f"digests-{r}.sqlite")  # a fresh, empty cache each round
        try:
            t0 = time.perf_counter()
            cold_reports.append(validate(str(model), digest_cache=cache))
            cold_s.append(time.perf_counter() - t0)
            for _ in range(warm_runs):
                t0 = time.perf_counter()
                warm_reports.append(validate(str(model), digest_cache=cache))
                warm_s.append(time.perf_counter() - t0)
        finally:
            cache.close()
    cold = Timing.of("cold: empty digest cache (every byte hashed)", cold_s, cold_reports)
    warm = Timing.of("warm: every digest from the cache", warm_s, warm_reports)
    speeds = [
        c.details["gb_per_s"]
        for rep in cold_reports
        for c in rep.checks
        if c.name == "checksum" and "gb_per_s" in c.details
    ]
    cached = min(
        int(c.details.get("cached_files", 0))
        for rep in warm_reports
        for c in rep.checks
        if c.name == "checksum"
    )
    return CachePart(
        total_bytes=sum(f.stat().st_size for f in model.glob("*.safetensors")),
        rounds=rounds,
        cold=cold,
        warm=warm,
        cold_checksum_gb_per_s=round(statistics.median(speeds), 3) if speeds else None,
        warm_cached_files=cached,
        goal_warm_s=GOAL_WARM_VALIDATE_S,
        goal_met=warm.median_ms / 1000 <= GOAL_WARM_VALIDATE_S,
    )


# ---- part 4: unsafe-code scan against picklescan and modelscan ------------------------------


def load_fixtures() -> tuple[dict[str, Writer], dict[str, Writer]]:
    """HOSTILE and BENIGN from the unit tests (the repository root is not on sys.path when this
    runs as a script)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.unit.validator.fixtures import BENIGN, HOSTILE

    return dict(HOSTILE), dict(BENIGN)


@dataclass
class Verdict:
    """What one tool said about one fixture."""

    verdict: str  # FLAG (says dangerous), clean, error, skip (nothing scanned), timeout
    rc: int | None = None
    note: str = ""

    @property
    def flagged(self) -> bool:
        return self.verdict == "FLAG"

    @property
    def blocks(self) -> bool:
        """A gate that trusts the exit code would stop this model."""
        return self.rc not in (0, None) or self.flagged


@dataclass
class FixtureResult:
    name: str
    group: str  # hostile | benign
    path: str
    error: str | None = None
    times_ms: dict[str, list[float]] = field(default_factory=dict)
    verdicts: dict[str, Verdict] = field(default_factory=dict)

    def median_ms(self, tool: str) -> float | None:
        samples = self.times_ms.get(tool)
        return round(statistics.median(samples), 2) if samples else None


@dataclass(frozen=True)
class ToolSummary:
    tool: str
    label: str
    median_ms: float | None
    total_ms: float | None
    hostile_flagged: int
    hostile_blocked: int
    hostile_total: int
    benign_flagged: int
    benign_blocked: int
    benign_total: int
    missed: list[str]
    false_positives: list[str]
    blocked_benign: list[str]


@dataclass(frozen=True)
class SmallModelPart:
    """Each CLI's process wall on one small model, as a user runs it."""

    model: str
    files: int
    total_bytes: int
    runs: int
    median_ms: dict[str, float | None]
    min_ms: dict[str, float | None]
    verdicts: dict[str, str]
    goal_ms: float
    goal_met: bool


@dataclass(frozen=True)
class ScanPart:
    rounds: int
    in_process_reps: int
    scanners: dict[str, str | None]  # external scanner -> executable (None: not found)
    scanner_versions: dict[str, str | None]
    picklescan_version: str
    floor_ms: dict[str, float | None]
    tools: list[ToolSummary]
    fixtures: list[FixtureResult]
    small_model: SmallModelPart | None
    notes: list[str]


TOOLS: Final = {
    "ours_inproc": "preflight check_unsafe_code, in-process (inventory + check)",
    "ours_cli": "preflight validate --json (unsafe_code only), CLI",
    "picklescan": "picklescan --path, CLI",
    "modelscan": "modelscan scan -p, CLI (own venv)",
    "modelaudit": "modelaudit scan --format json --no-cache, CLI (own venv)",
    "fickling": "fickling --check-safety per pickle file, CLI (own venv)",
}
SHORT: Final = {"ours_inproc": "ours", "ours_cli": "ours CLI", "ours_validate": "ours CLI",
                "picklescan": "pickles.", "modelscan": "models.", "modelaudit": "modelaud.",
                "fickling": "fickling"}  # fmt: skip

# ModelAudit (promptfoo) sends telemetry unless told not to; there is no network here anyway.
MODELAUDIT_ENV: Final = {"PROMPTFOO_DISABLE_TELEMETRY": "1", "NO_ANALYTICS": "1"}
# The files fickling's own Hub scanner treats as pickles (fickling/cli.py,
# HF_PICKLE_EXTENSIONS); its CLI takes one file, so a gate runs it on each. Files that start
# like a pickle (PROTO 2-5) are given to it too, whatever their name.
FICKLING_PICKLE_SUFFIXES: Final = (".bin", ".pkl", ".pickle", ".pt", ".pth")
# fickling --check-safety's exit codes (fickling/constants.py); a Python traceback also exits 1.
FICKLING_EXIT_UNSAFE: Final = 1


def _run_cli(
    argv: list[str], cwd: Path, env: dict[str, str] | None = None
) -> tuple[float, subprocess.CompletedProcess[str] | None]:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            argv,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
            check=False,
            env={**os.environ, **env} if env else None,
        )
    except subprocess.TimeoutExpired:
        return time.perf_counter() - t0, None
    return time.perf_counter() - t0, proc


def _summary_count(text: str, label: str) -> int:
    for line in text.splitlines():
        if line.startswith(label + ":"):
            try:
                return int(line.split(":", 1)[1])
            except ValueError:
                return 0
    return 0


def run_ours_cli(path: Path, work: Path) -> tuple[float, Verdict]:
    argv = [str(BIN / "preflight"), "validate", str(path), "--json"]
    argv += ["--data-dir", str(work / "preflight-data"), "--policy", str(work / "only-unsafe.yaml")]
    elapsed, proc = _run_cli(argv, work)
    if proc is None:
        return elapsed, Verdict("timeout")
    try:
        report = json.loads(proc.stdout)
        check = next(c for c in report["checks"] if c["name"] == "unsafe_code")
    except (ValueError, StopIteration, KeyError, TypeError):
        return elapsed, Verdict("error", proc.returncode, (proc.stderr or proc.stdout)[-200:])
    status = check["status"]
    verdict = {"failed": "FLAG", "passed": "clean"}.get(status, status)
    return elapsed, Verdict(verdict, proc.returncode, str(check.get("reason", ""))[:200])


def run_picklescan(path: Path, work: Path) -> tuple[float, Verdict]:
    elapsed, proc = _run_cli([str(BIN / "picklescan"), "--path", str(path)], work)
    if proc is None:
        return elapsed, Verdict("timeout")
    out = proc.stdout + proc.stderr
    infected = _summary_count(out, "Infected files")
    suspicious = _summary_count(out, "Suspicious globals")
    scanned = _summary_count(out, "Scanned files")
    # rc 2 (scan error) takes precedence over rc 1 in picklescan, so read the summary too.
    if proc.returncode == 1 or infected:
        verdict = "FLAG"
    elif proc.returncode != 0:
        verdict = "error"
    elif scanned == 0:
        verdict = "skip"
    else:
        verdict = "clean"
    notes = [f"{suspicious} suspicious globals"] if suspicious else []
    notes += [
        line.replace(str(path), "FILE")
        for line in out.splitlines()
        if line.startswith(("ERROR", "WARNING"))
    ][:1]
    return elapsed, Verdict(verdict, proc.returncode, "; ".join(notes))


def run_modelscan(exe: str, path: Path, work: Path) -> tuple[float, Verdict]:
    out_file = work / "modelscan-report.json"
    out_file.unlink(missing_ok=True)
    argv = [exe, "scan", "-p", str(path), "-r", "json", "-o", str(out_file)]
    elapsed, proc = _run_cli(argv, work)
    if proc is None:
        return elapsed, Verdict("timeout")
    try:
        report = json.loads(out_file.read_text())
    except (OSError, ValueError):
        return elapsed, Verdict("error", proc.returncode, (proc.stderr or proc.stdout)[-200:])
    issues = report.get("issues") or []
    errors = report.get("errors") or []
    skipped = (report.get("summary") or {}).get("skipped", {}).get("total_skipped", 0)
    if issues:
        severities = sorted({str(i.get("severity", "?")) for i in issues})
        return elapsed, Verdict("FLAG", proc.returncode, "/".join(severities))
    if errors:
        first = errors[0]
        what = first.get("description", first) if isinstance(first, dict) else first
        return elapsed, Verdict("error", proc.returncode, str(what)[:200])
    if proc.returncode == 3:
        return elapsed, Verdict("skip", proc.returncode, f"nothing scanned ({skipped} skipped)")
    verdict = "clean" if proc.returncode == 0 else "error"
    return elapsed, Verdict(verdict, proc.returncode)


def run_modelaudit(exe: str, path: Path, work: Path) -> tuple[float, Verdict]:
    """`modelaudit scan PATH --format json`: exit 0 clean, 1 WARNING/CRITICAL findings, 2 an
    operational error, an inconclusive scan or nothing scanned (modelaudit/core_results.py,
    determine_exit_code). INFO findings do not count."""
    out_file = work / "modelaudit-report.json"
    out_file.unlink(missing_ok=True)
    argv = [exe, "scan", str(path), "--format", "json", "--output", str(out_file), "--no-cache"]
    elapsed, proc = _run_cli(argv, work, MODELAUDIT_ENV)
    if proc is None:
        return elapsed, Verdict("timeout")
    try:
        report = json.loads(out_file.read_text())
    except (OSError, ValueError):
        return elapsed, Verdict("error", proc.returncode, (proc.stderr or proc.stdout)[-200:])
    issues = [i for i in report.get("issues") or [] if isinstance(i, dict)]
    serious = [i for i in issues if str(i.get("severity", "")).lower() in ("warning", "critical")]
    if serious or proc.returncode == 1:
        severities = "/".join(sorted({str(i.get("severity")) for i in serious})) or "exit 1"
        first = str(serious[0].get("message", "")) if serious else ""
        return elapsed, Verdict("FLAG", proc.returncode, f"{severities}: {first}"[:200])
    if not report.get("files_scanned"):
        return elapsed, Verdict("skip", proc.returncode, "nothing scanned (0 files)")
    if proc.returncode != 0 or report.get("has_errors"):
        what = next((str(i.get("message")) for i in issues), "") or "inconclusive (exit 2)"
        return elapsed, Verdict("error", proc.returncode, what[:200])
    return elapsed, Verdict("clean", proc.returncode)


def fickling_candidates(path: Path) -> list[Path]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    picked = []
    for f in files:
        with f.open("rb") as fh:
            head = fh.read(2)
        pickle_header = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
        if f.suffix.lower() in FICKLING_PICKLE_SUFFIXES or pickle_header:
            picked.append(f)
    return picked


def _json_documents(path: Path) -> list[Any]:
    """fickling appends one JSON document per pickle to its --json-output file."""
    try:
        text = path.read_text()
    except OSError:
        return []
    decoder, docs, pos = json.JSONDecoder(), [], 0
    while pos < len(text):
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            break
        try:
            doc, pos = decoder.raw_decode(text, pos)
        except ValueError:
            break
        docs.append(doc)
    return docs


def run_fickling(exe: str, path: Path, work: Path) -> tuple[float | None, Verdict]:
    """`fickling --check-safety FILE` on each file a gate would hand it (see
    FICKLING_PICKLE_SUFFIXES); the time is their sum. Exit 0: likely safe; 1: unsafe; 2: does
    not parse. fickling reads a file as one raw pickle stream: a zip (torch .pt) is parsed as
    protocol-0 opcodes and fails, which is what its CLI does with one."""
    files = fickling_candidates(path)
    if not files:
        return None, Verdict("skip", None, "nothing scanned (no pickle-named or -headed file)")
    total, flagged, errors, worst_rc = 0.0, [], [], 0
    for i, f in enumerate(files):
        out_file = work / f"fickling-{i}.json"
        out_file.unlink(missing_ok=True)
        elapsed, proc = _run_cli(
            [exe, "--check-safety", "--json-output", str(out_file), str(f)], work
        )
        total += elapsed
        if proc is None:
            return total, Verdict("timeout")
        rel = f.name if path.is_file() else f.relative_to(path).as_posix()
        worst_rc = max(worst_rc, proc.returncode)
        stderr = proc.stderr.strip()
        if "Traceback (most recent call last)" in stderr:
            errors.append(f"{rel}: crashed: {stderr.splitlines()[-1][:120]}")
        elif proc.returncode == FICKLING_EXIT_UNSAFE:
            levels = [
                str(d.get("severity")) for d in _json_documents(out_file) if isinstance(d, dict)
            ]
            unsafe = [lvl for lvl in levels if lvl != "LIKELY_SAFE"]
            flagged.append(f"{rel}: {unsafe[0] if unsafe else 'unsafe'}")
        elif proc.returncode != 0:
            first = stderr.splitlines()[0][:120] if stderr else f"exit {proc.returncode}"
            errors.append(f"{rel}: {first}")
    if flagged:
        return total, Verdict("FLAG", worst_rc, "; ".join(flagged + errors)[:200])
    if errors:
        return total, Verdict("error", worst_rc, "; ".join(errors)[:200])
    return total, Verdict("clean", 0)


def run_ours_validate(
    path: Path, work: Path, env: dict[str, str] | None = None
) -> tuple[float, Verdict]:
    """`preflight validate DIR` as a user types it: every default check, the table output."""
    argv = [str(BIN / "preflight"), "validate", str(path), "--data-dir", str(work / "pf-data")]
    elapsed, proc = _run_cli(argv, work, env)
    if proc is None:
        return elapsed, Verdict("timeout")
    verdict = {0: "clean", 1: "FLAG"}.get(proc.returncode, "error")
    last = (proc.stdout.strip().splitlines() or [""])[-1]  # "validation: failed - ..."
    return elapsed, Verdict(verdict, proc.returncode, (proc.stderr.strip() or last)[-200:])


def ours_in_process(path: Path) -> tuple[float, Verdict]:
    t0 = time.perf_counter()
    result = check_unsafe_code(build_inventory(str(path)), CheckContext())
    elapsed = time.perf_counter() - t0
    verdict = {Status.FAILED: "FLAG", Status.PASSED: "clean"}.get(
        result.status, result.status.value
    )
    return elapsed, Verdict(verdict, None, result.reason[:200])


def find_scanner(name: str, explicit: str | None) -> str | None:
    """--NAME, else bench/scanner_venvs.sh's venv, else the project venv's bin/, else PATH."""
    if explicit:
        return explicit if Path(explicit).exists() else None
    for local in (SCANNER_VENVS / name / "bin" / name, BIN / name):
        if local.exists():
            return str(local)
    return shutil.which(name)


def scanner_version(name: str, exe: str) -> str | None:
    argv = {"modelscan": [exe, "scan", "--version"]}.get(name, [exe, "--version"])
    text = tool_version(argv) or ""
    return text.removeprefix(f"{name}, ").removeprefix("version ") or None


def tool_version(argv: list[str]) -> str | None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (proc.stdout + proc.stderr).strip().splitlines()
    return text[-1].strip() if text else None


Runner = Callable[[Path], tuple[float | None, Verdict]]


def external_runners(scanners: dict[str, str | None], work: Path) -> dict[str, Runner]:
    """The reference CLIs that were found, by tool name."""
    runs: dict[str, Callable[[str, Path, Path], tuple[float | None, Verdict]]] = {
        "modelscan": run_modelscan,
        "modelaudit": run_modelaudit,
        "fickling": run_fickling,
    }

    def bind(name: str, exe: str) -> Runner:
        return lambda path: runs[name](exe, path, work)

    return {name: bind(name, exe) for name, exe in scanners.items() if exe is not None}


def bench_small_model(root: Path, work: Path, scanners: dict[str, str | None],
                      runs: int) -> SmallModelPart:  # fmt: skip
    """Process wall of each CLI on one small Hugging Face model (safetensors + config + card):
    what a user waits for in CI. Ours runs every default check, not only the unsafe-code one."""
    model = write_sample_model(root / "small-model")
    # The worst case beside the usual one: no bytecode cache at all (a read-only install
    # without .pyc files, or PYTHONDONTWRITEBYTECODE with a fresh tree), so every module of
    # ours is compiled from source on each start.
    no_pyc = {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONPYCACHEPREFIX": str(work / "no-pyc")}
    runners: dict[str, Runner] = {
        "ours_validate": lambda p: run_ours_validate(p, work),
        "ours_validate_no_pyc": lambda p: run_ours_validate(p, work, no_pyc),
        "picklescan": lambda p: run_picklescan(p, work),
        **external_runners(scanners, work),
    }
    samples: dict[str, list[float]] = {tool: [] for tool in runners}
    verdicts: dict[str, str] = {}
    order = list(runners)
    for r in range(runs + 1):  # the first round warms the page cache and .pyc files, untimed
        shift = r % len(order)
        for tool in order[shift:] + order[:shift]:
            elapsed, verdict = runners[tool](model)
            said = verdict.verdict + (f" ({verdict.note})" if verdict.verdict == "FLAG" else "")
            if said not in verdicts.get(tool, "").split("; "):
                verdicts[tool] = "; ".join(filter(None, (verdicts.get(tool), said)))
            if r and elapsed is not None:
                samples[tool].append(ms(elapsed))
    medians = {t: round(statistics.median(v), 1) if v else None for t, v in samples.items()}
    ours = medians["ours_validate"]
    files = [f for f in model.rglob("*") if f.is_file()]
    return SmallModelPart(
        model=f"{model.name}: {', '.join(sorted(f.name for f in files))}",
        files=len(files),
        total_bytes=sum(f.stat().st_size for f in files),
        runs=runs,
        median_ms=medians,
        min_ms={t: round(min(v), 1) if v else None for t, v in samples.items()},
        verdicts=verdicts,
        goal_ms=GOAL_CLI_SMALL_MODEL_S * 1000,
        goal_met=ours is not None and ours <= GOAL_CLI_SMALL_MODEL_S * 1000,
    )


def bench_scan(root: Path, rounds: int, reps: int, scanners: dict[str, str | None],
               small_model_runs: int) -> ScanPart:  # fmt: skip
    hostile, benign = load_fixtures()
    work = root / "scan-work"
    work.mkdir()
    (work / "only-unsafe.yaml").write_text(ONLY_UNSAFE_YAML)
    fixtures: list[FixtureResult] = []
    for group, registry in (("hostile", hostile), ("benign", benign)):
        for name, writer in registry.items():
            try:
                path = writer(root / "fixtures" / group / name)
                fixtures.append(FixtureResult(name, group, str(path)))
            except Exception as exc:  # a fixture still being edited must not stop the bench
                fixtures.append(FixtureResult(name, group, "", f"{type(exc).__name__}: {exc}"))
    # The floor: each CLI on a directory holding nothing but a model card.
    floor = root / "fixtures" / "floor"
    floor.mkdir(parents=True)
    (floor / "README.md").write_text("# nothing to scan\n")

    runners: dict[str, Runner] = {
        "ours_cli": lambda p: run_ours_cli(p, work),
        "picklescan": lambda p: run_picklescan(p, work),
        **external_runners(scanners, work),
    }
    floor_samples: dict[str, list[float]] = {tool: [] for tool in runners}
    usable = [f for f in fixtures if f.error is None]

    for f in usable:  # in-process: one warm-up, then `reps` timed runs
        path = Path(f.path)
        _, f.verdicts["ours_inproc"] = ours_in_process(path)
        f.times_ms["ours_inproc"] = [ms(ours_in_process(path)[0]) for _ in range(reps)]
    order = list(runners)
    for r in range(rounds):
        for i, fx in enumerate([*usable, None]):
            shift = (r + i) % len(order)  # rotate which CLI goes first, fixture by fixture
            for tool in order[shift:] + order[:shift]:
                elapsed, verdict = runners[tool](Path(fx.path) if fx else floor)
                if fx is None:
                    if elapsed is not None:
                        floor_samples[tool].append(ms(elapsed))
                    continue
                if elapsed is not None:  # None: the tool had no file to run on
                    fx.times_ms.setdefault(tool, []).append(ms(elapsed))
                previous = fx.verdicts.setdefault(tool, verdict)
                if previous.verdict != verdict.verdict:
                    previous.note += f"; round {r + 1} said {verdict.verdict}"

    summaries = []
    for tool, label in TOOLS.items():
        if tool != "ours_inproc" and tool not in runners:
            continue
        medians = [m for f in usable if (m := f.median_ms(tool)) is not None]
        hostile_results = [f for f in usable if f.group == "hostile"]
        benign_results = [f for f in usable if f.group == "benign"]
        summaries.append(
            ToolSummary(
                tool=tool,
                label=label,
                median_ms=round(statistics.median(medians), 1) if medians else None,
                total_ms=round(sum(medians), 1) if medians else None,
                hostile_flagged=sum(f.verdicts[tool].flagged for f in hostile_results),
                hostile_blocked=sum(f.verdicts[tool].blocks for f in hostile_results),
                hostile_total=len(hostile_results),
                benign_flagged=sum(f.verdicts[tool].flagged for f in benign_results),
                benign_blocked=sum(f.verdicts[tool].blocks for f in benign_results),
                benign_total=len(benign_results),
                missed=[f.name for f in hostile_results if not f.verdicts[tool].flagged],
                false_positives=[f.name for f in benign_results if f.verdicts[tool].flagged],
                blocked_benign=[f.name for f in benign_results if f.verdicts[tool].blocks],
            )
        )
    notes = [
        f"{name} not found (looked for --{name}, {SCANNER_VENVS.relative_to(REPO)}/{name}/, "
        f"the venv's bin/ and PATH): run `bash bench/scanner_venvs.sh`; its column is left out"
        for name, exe in scanners.items()
        if exe is None
    ]
    if "fickling" in runners:
        notes.append(
            "fickling: its CLI reads one file as one raw pickle stream; the bench runs it on "
            f"each file named {'/'.join(FICKLING_PICKLE_SUFFIXES)} or starting with PROTO 2-5 "
            "(its time is the sum); skip = no such file"
        )
    broken = [f"{f.group}/{f.name}: {f.error}" for f in fixtures if f.error]
    notes += [f"fixture not written, left out: {b}" for b in broken]
    return ScanPart(
        rounds=rounds,
        in_process_reps=reps,
        scanners=scanners,
        scanner_versions={
            name: scanner_version(name, exe) if exe else None for name, exe in scanners.items()
        },
        picklescan_version=metadata.version("picklescan"),
        floor_ms={
            tool: round(statistics.median(v), 1) if v else None for tool, v in floor_samples.items()
        },
        tools=summaries,
        fixtures=fixtures,
        small_model=(
            bench_small_model(root, work, scanners, small_model_runs) if small_model_runs else None
        ),
        notes=notes,
    )


# ---- report ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    command: str
    when_utc: str
    machine: dict[str, Any]
    params: dict[str, Any]
    wall_s: float
    loadavg_1m_at_end: float
    headers: HeadersPart | None = None
    hash: HashPart | None = None
    cache: CachePart | None = None
    scan: ScanPart | None = None


def machine_info() -> dict[str, Any]:
    model, flags = "unknown", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    openssl = tool_version(["openssl", "version"]) or "absent"
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "sha_ni": " sha_ni" in flags,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "python_openssl": ssl.OPENSSL_VERSION,
        "openssl_cli": openssl,
        "picklescan": metadata.version("picklescan"),
        "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
    }


def _goal(met: bool) -> str:
    return "met" if met else "NOT met"


def _t(value: float | None, width: int, digits: int = 0) -> str:
    return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def render(report: Report) -> str:
    m = report.machine
    lines = [
        "preflight bench: validator (issue #3)",
        f"command : {report.command}",
        f"when    : {report.when_utc}, {report.wall_s:.0f} s wall",
        f"machine : {m['nproc']} CPUs, {m['cpu_model']} (sha_ni: {m['sha_ni']}), {m['os']}, "
        f"1-min load {m['loadavg_1m_at_start']} at start, {report.loadavg_1m_at_end} at end",
        f"software: Python {m['python']} ({m['python_openssl']}), CLI {m['openssl_cli']}, "
        f"picklescan {m['picklescan']}",
    ]
    if (h := report.headers) is not None:
        lines += [
            "",
            f"1. Header checks: Llama-7B-shaped sparse dir, {h.files} files, {h.tensors} tensors, "
            f"{h.apparent_bytes / 1e9:.1f} GB apparent; {h.header_only.runs} runs after warm-up",
            f"  {'validate() with':<52}{'median ms':>10}{'p95 ms':>8}{'max ms':>8}  status",
        ]
        for t in (h.header_only, h.all_default_checks):
            lines.append(
                f"  {t.label:<52}{t.median_ms:>10.1f}{t.p95_ms:>8.1f}{t.max_ms:>8.1f}  {t.status}"
            )
            checks = ", ".join(f"{k} {v:.1f}" for k, v in t.checks_median_ms.items())
            lines.append(f"    per check, median ms: {checks}")
        lines.append(
            f"  goal <= {h.goal_s * 1000:.0f} ms for the header checks: {_goal(h.goal_met)}"
        )
    if (s := report.hash) is not None:
        lines += [
            "",
            f"2. Cold sha256: {s.files} files x {s.file_bytes / MIB:.0f} MiB random, page-cached, "
            f"{s.rounds} rounds interleaved (GB = 1e9 bytes)",
            f"  {'method':<56}{'GB/s median':>12}  per round",
        ]
        for meth in s.methods:
            rounds = " ".join(f"{v:.2f}" for v in meth.gb_per_s)
            lines.append(f"  {meth.label:<56}{meth.median_gb_per_s:>12.2f}  {rounds}")
        for k, v in s.ratios.items():
            lo, hi = s.ratio_ranges[k]
            lines.append(f"  {k:<56}{v:>11.2f}x  ({lo:.2f}-{hi:.2f})")
        lines.append(
            f"  digests agree with openssl: {s.digests_agree}; goal >= {s.goal_one_core_x}x "
            f"openssl on one core: {_goal(s.goal_met)}"
        )
    if (c := report.cache) is not None:
        lines += [
            "",
            f"3. validate() through the digest cache: the same {c.total_bytes / 1e9:.2f} GB as "
            f"safetensors + {MANIFEST}, all default checks; {c.rounds} rounds",
            f"  {'validate()':<52}{'median ms':>10}{'p95 ms':>8}{'max ms':>8}  status",
        ]
        for t in (c.cold, c.warm):
            lines.append(
                f"  {t.label:<52}{t.median_ms:>10.1f}{t.p95_ms:>8.1f}{t.max_ms:>8.1f}  {t.status}"
            )
            checks = ", ".join(f"{k} {v:.1f}" for k, v in t.checks_median_ms.items())
            lines.append(f"    per check, median ms: {checks}")
        gbps = f"{c.cold_checksum_gb_per_s:.2f}" if c.cold_checksum_gb_per_s else "-"
        lines.append(
            f"  cold checksum check: {gbps} GB/s; warm runs took every digest from the cache: "
            f"{c.warm_cached_files} files"
        )
        lines.append(
            f"  goal <= {c.goal_warm_s * 1000:.0f} ms for a warm validate(): {_goal(c.goal_met)}"
        )
    if (sc := report.scan) is not None:
        lines += _render_scan(sc)
    return "\n".join(lines)


def _render_scan(sc: ScanPart) -> list[str]:
    tools = [t.tool for t in sc.tools]
    short = SHORT
    versions = "; ".join(
        f"{name} {sc.scanner_versions.get(name) or 'not installed'}" for name in sc.scanners
    )
    lines = [
        "",
        f"4. Unsafe-code scan: {len(sc.fixtures)} fixtures (tests/unit/validator/fixtures.py); "
        f"CLIs {sc.rounds} rounds interleaved, in-process median of {sc.in_process_reps}",
        f"   picklescan {sc.picklescan_version}; {versions}",
        "  verdict: FLAG = says dangerous, clean, error (scan failed; exit code != 0), "
        "skip (nothing scanned)",
        f"  {'fixture':<32}"
        + "".join(f"{short[t] + ' ms':>13}" for t in tools)
        + "   "
        + "".join(f"{short[t]:<10}" for t in tools if t != "ours_cli"),
    ]
    for group in ("hostile", "benign"):
        lines.append(f"  -- {group}")
        for f in sc.fixtures:
            if f.group != group:
                continue
            if f.error:
                lines.append(f"  {f.name:<32}fixture not written: {f.error[:60]}")
                continue
            times = "".join(_t(f.median_ms(t), 13, 2 if t == "ours_inproc" else 0) for t in tools)
            verdicts = "".join(f"{f.verdicts[t].verdict:<10}" for t in tools if t != "ours_cli")
            lines.append(f"  {f.name:<32}{times}   {verdicts}")
    floor = "".join(_t(sc.floor_ms.get(t), 13) for t in tools)
    lines.append(f"  {'(floor: dir with a README only)':<32}{floor}")
    lines += [
        "",
        "  per tool: median and sum over fixtures of each fixture's median; flagged = says "
        "dangerous, exit!=0 = a gate on the exit code would stop it",
        f"  {'tool':<62}{'median ms':>10}{'total ms':>10}  hostile flagged/exit!=0"
        "  benign flagged/exit!=0",
    ]
    for t in sc.tools:
        lines.append(
            f"  {t.label:<62}{_t(t.median_ms, 10, 1)}{_t(t.total_ms, 10)}"
            f"  {t.hostile_flagged:>9}/{t.hostile_blocked:<2} of {t.hostile_total:<8}"
            f"{t.benign_flagged:>10}/{t.benign_blocked:<2} of {t.benign_total}"
        )
    for t in sc.tools:
        if t.tool == "ours_cli":
            continue
        lines.append(f"  {short[t.tool]} misses: {', '.join(t.missed) or 'none'}")
        if t.false_positives:
            lines.append(f"  {short[t.tool]} false positives: {', '.join(t.false_positives)}")
        if t.blocked_benign:
            lines.append(
                f"  {short[t.tool]} exits non-zero on benign: {', '.join(t.blocked_benign)}"
            )
    for t in sc.tools:
        why: dict[str, list[str]] = {}
        for f in sc.fixtures:
            v = f.verdicts.get(t.tool)
            if v is None or t.tool.startswith("ours"):
                continue
            if v.verdict in ("error", "timeout"):
                why.setdefault(f"{v.verdict} (exit {v.rc}): {v.note[:110]}", []).append(f.name)
            elif (
                f.group == "hostile"
                and not v.flagged
                and v.note
                and not v.note.startswith("nothing scanned")
            ):
                why.setdefault(f"{v.verdict}, but: {v.note[:110]}", []).append(f.name)
        for what, names in why.items():
            lines.append(f"  {short[t.tool]} {what}: {', '.join(names)}")
    disagree = [
        f.name
        for f in sc.fixtures
        if not f.error and f.verdicts["ours_cli"].verdict != f.verdicts["ours_inproc"].verdict
    ]
    lines.append(f"  ours CLI and in-process disagree on: {', '.join(disagree) or 'none'}")
    if (sm := sc.small_model) is not None:
        lines += [
            "",
            f"  CLI process wall on one small model ({sm.files} files, "
            f"{sm.total_bytes / 1e6:.1f} MB: {sm.model}); {sm.runs} runs after a warm-up",
            f"  {'tool':<62}{'median ms':>10}{'min ms':>8}  verdict",
        ]
        labels = {
            "ours_validate": "preflight validate DIR (all default checks), CLI",
            "ours_validate_no_pyc": "  the same, no .pyc cache (compiled at every start)",
        } | TOOLS
        for tool, median in sm.median_ms.items():
            lines.append(
                f"  {labels[tool]:<62}{_t(median, 10, 1)}{_t(sm.min_ms[tool], 8, 1)}"
                f"  {sm.verdicts.get(tool, '-')}"
            )
        lines.append(
            f"  goal <= {sm.goal_ms:.0f} ms for `preflight validate DIR`: {_goal(sm.goal_met)}"
        )
    lines += [f"  note: {n}" for n in sc.notes]
    return lines


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--only", action="append", choices=PARTS, help="run only this part (repeatable)"
    )
    parser.add_argument("--header-runs", type=int, default=20, help="timed runs, part 1 (20)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up runs, part 1 (3)")
    parser.add_argument("--hash-files", type=int, default=4, help="random files (4)")
    parser.add_argument("--hash-mib", type=int, default=256, help="MiB per file (256)")
    parser.add_argument("--hash-rounds", type=int, default=3, help="interleaved rounds (3)")
    parser.add_argument("--cache-rounds", type=int, default=3, help="cold validates (3)")
    parser.add_argument("--warm-runs", type=int, default=10, help="warm validates per round (10)")
    parser.add_argument("--scan-rounds", type=int, default=2, help="CLI runs per fixture (2)")
    parser.add_argument("--scan-reps", type=int, default=5, help="in-process runs per fixture (5)")
    parser.add_argument(
        "--small-model-runs",
        type=int,
        default=5,
        help="CLI runs per tool on one small model, part 4 (5; 0 leaves it out)",
    )
    for name in EXTERNAL_SCANNERS:
        parser.add_argument(
            f"--{name}",
            metavar="PATH",
            help=f"{name} executable (default: {SCANNER_VENVS.relative_to(REPO)}/{name}/bin/, "
            "made by bench/scanner_venvs.sh; then the venv's bin/, then PATH)",
        )
    parser.add_argument("--tmp", type=Path, help="where to put the temp dir (default: $TMPDIR)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    positive = ("header_runs", "hash_files", "hash_mib", "hash_rounds", "cache_rounds",
                "warm_runs", "scan_rounds", "scan_reps")  # fmt: skip
    if (
        any(getattr(args, name) < 1 for name in positive)
        or min(args.warmup, args.small_model_runs) < 0
    ):
        parser.error("counts must be positive (--warmup and --small-model-runs may be 0)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # CLIs run as on a user's machine, where pip compiled every tool's bytecode at install (or
    # the first run wrote it). A shell that sets PYTHONDONTWRITEBYTECODE (these sessions do)
    # would make only an editable checkout like ours compile from source at every start; the
    # small-model part times that case separately.
    if os.environ.pop("PYTHONDONTWRITEBYTECODE", None) is not None:
        print("note: PYTHONDONTWRITEBYTECODE was set; CLIs run without it (see --help)")
    parts = set(args.only or PARTS)
    started = time.perf_counter()
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    machine = machine_info()
    scanners = (
        {name: find_scanner(name, getattr(args, name)) for name in EXTERNAL_SCANNERS}
        if "scan" in parts
        else {}
    )
    params = {k: v for k, v in vars(args).items() if k not in ("json", "tmp")}
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="preflight-bench-validator-", dir=args.tmp) as tmp:
        root = Path(tmp)
        if "headers" in parts:
            results["headers"] = bench_headers(root, args.header_runs, args.warmup)
        if parts & {"hash", "cache"}:
            model = root / "random-safetensors"
            model.mkdir()
            paths = [
                model / f"model-{i + 1:05d}-of-{args.hash_files:05d}.safetensors"
                for i in range(args.hash_files)
            ]
            for p in paths:
                write_random_safetensors(p, args.hash_mib * MIB)
            read_through(paths)
            if "hash" in parts:
                results["hash"] = bench_hash(paths, args.hash_rounds)
            if "cache" in parts:
                manifest = {p.name: sha256_file(p) for p in paths}
                (model / MANIFEST).write_text(json.dumps({"files": manifest}, indent=2) + "\n")
                results["cache"] = bench_cache(model, root, args.cache_rounds, args.warm_runs)
        if "scan" in parts:
            results["scan"] = bench_scan(
                root, args.scan_rounds, args.scan_reps, scanners, args.small_model_runs
            )
    report = Report(
        command=command_line(),
        when_utc=when,
        machine=machine,
        params=params,
        wall_s=round(time.perf_counter() - started, 1),
        loadavg_1m_at_end=round(os.getloadavg()[0], 2),
        **results,
    )
    print(json.dumps(asdict(report), indent=2, default=str) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
