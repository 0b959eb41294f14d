"""Check: sha256 of every weight file against the request's digests or the model's manifest.

Files are hashed in parallel (hashlib releases the GIL on large updates) with large reads.
Verified digests are cached by (path, size, mtime, ctime, inode, device): re-validating an
unchanged model hashes nothing, and any change to a file's key makes its entry useless.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.contracts.events import CheckResult, Status
from services.storage.base import StoreError
from services.validator.checks.base import (
    CheckContext,
    not_timed,
    result,
    summarise_findings,
    timed,
)
from services.validator.checks.inventory import MAX_FILES, Inventory, ModelFile

NAME = "checksum"
READ_SIZE = 8 * 1024 * 1024
MANIFEST_NAMES = ("preflight-manifest.json", "SHA256SUMS", "sha256sums.txt")
# A line is a digest, two spaces and a path: 16 MiB lists 100,000 files of 100-character paths,
# ten times what the inventory lists.
MAX_MANIFEST_BYTES = 16 * 1024 * 1024


def digest_cache_path(data_dir: Path) -> Path:
    """The services' digest cache: in their data dir."""
    return data_dir / "cache" / "digests.sqlite"


def user_cache_dir() -> Path:
    """$XDG_CACHE_HOME/preflight, or ~/.cache/preflight."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "preflight"


def local_digest_cache_path(model: Path, data_dir: Path | None) -> Path | None:
    """Where `preflight validate` keeps digests: the data dir when one is set, else the user's
    cache dir, and never inside the model it validates (a cache there would change the model
    and fail its own format check). None when every choice is inside it: validate uncached."""
    model = model.resolve()
    for base in ([data_dir] if data_dir is not None else []) + [user_cache_dir()]:
        path = digest_cache_path(base)
        if not path.resolve().is_relative_to(model):
            return path
    return None


@dataclass(frozen=True)
class FileKey:
    """Identity of a file's content as the file system reports it."""

    path: str
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    device: int

    @classmethod
    def of(cls, path: Path) -> FileKey:
        st = path.stat()
        return cls(
            str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev
        )


class DigestCache:
    """sqlite-backed cache of digests we computed ourselves; safe across processes."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), timeout=10, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS digests (path TEXT, size INTEGER, mtime_ns INTEGER, "
            "ctime_ns INTEGER, inode INTEGER, device INTEGER, sha256 TEXT NOT NULL, "
            "hashed_at REAL NOT NULL, PRIMARY KEY (path, size, mtime_ns, ctime_ns, inode, device))"
        )
        self._db.commit()

    def get(self, key: FileKey) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT sha256 FROM digests WHERE path=? AND size=? AND mtime_ns=? AND ctime_ns=? "
                "AND inode=? AND device=?",
                (key.path, key.size, key.mtime_ns, key.ctime_ns, key.inode, key.device),
            ).fetchone()
        return None if row is None else str(row[0])

    def put(self, key: FileKey, digest: str) -> None:
        with self._lock:
            # One entry per path: an older key for the same path can never be valid again.
            self._db.execute("DELETE FROM digests WHERE path=?", (key.path,))
            self._db.execute(
                "INSERT INTO digests VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key.path,
                    key.size,
                    key.mtime_ns,
                    key.ctime_ns,
                    key.inode,
                    key.device,
                    digest,
                    time.time(),
                ),
            )
            self._db.commit()

    def close(self) -> None:
        with self._lock:
            self._db.close()


class HashingTooLong(Exception):
    """Hashing ran past its deadline (validation.hash_limit_s)."""


def sha256_file(path: Path, read_size: int = READ_SIZE, deadline: float | None = None) -> str:
    """The file's sha256; raises HashingTooLong once past `deadline` (perf_counter clock)."""
    digest = hashlib.sha256()
    buffer = bytearray(read_size)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as fh:
        while n := fh.readinto(buffer):
            digest.update(view[:n])
            if deadline is not None and time.perf_counter() > deadline:
                raise HashingTooLong(path.name)
    return digest.hexdigest()


@dataclass(frozen=True)
class Hashed:
    rel: str
    digest: str
    cached: bool
    size: int


def digest_of(
    path: Path, cache: DigestCache | None, deadline: float | None = None
) -> tuple[str, bool]:
    """(sha256, came from the cache): the cache when the file's key is unchanged, else read."""
    key = FileKey.of(path)
    if cache is not None and (known := cache.get(key)) is not None:
        return known, True
    digest = sha256_file(path, deadline=deadline)
    if cache is not None and FileKey.of(path) == key:  # unchanged while we read it
        cache.put(key, digest)
    return digest, False


def hash_files(
    files: list[ModelFile],
    cache: DigestCache | None,
    workers: int | None = None,
    deadline: float | None = None,
) -> list[Hashed]:
    """Digest every file, from the cache when its key is unchanged, else by reading it; raises
    HashingTooLong past `deadline`."""

    def one(f: ModelFile) -> Hashed:
        digest, cached = digest_of(f.path, cache, deadline)
        return Hashed(f.rel, digest, cached, f.size)

    if len(files) <= 1 or (
        cache is not None and all(cache.get(FileKey.of(f.path)) is not None for f in files)
    ):
        return [one(f) for f in files]  # nothing to hash in parallel: skip the pool
    from concurrent.futures import ThreadPoolExecutor  # only when there is hashing to share

    n = workers or min(len(files), os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="sha256") as pool:
        return list(pool.map(one, files))


def read_manifest(inv: Inventory) -> tuple[dict[str, str], str | None, list[str]]:
    """Expected digests shipped in the model directory: (digests, manifest name, problems)."""
    for name in MANIFEST_NAMES:
        entry = inv.named(name)
        if entry is None:
            continue
        if entry.size > MAX_MANIFEST_BYTES:  # 4 million lines took 6 s and grew with the file
            return (
                {},
                name,
                [
                    f"{name}: {entry.size:,} bytes, more than the {MAX_MANIFEST_BYTES:,} a "
                    f"manifest is read to (a model holds at most {MAX_FILES:,} files)"
                ],
            )
        try:
            text = entry.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            return {}, name, [f"{name}: unreadable: {exc}"]
        if name.endswith(".json"):
            try:
                raw = json.loads(text)
            except ValueError as exc:
                return {}, name, [f"{name}: not valid JSON: {exc}"]
            except RecursionError:
                return {}, name, [f"{name}: JSON nested too deeply to be a manifest"]
            digests = raw.get("files", raw) if isinstance(raw, dict) else None
            if not isinstance(digests, dict):
                return {}, name, [f"{name}: expected an object of file -> sha256"]
            return {str(k): str(v).lower() for k, v in digests.items()}, name, []
        digests = {}
        for line in timed(text.splitlines()):
            parts = line.strip().split(maxsplit=1)
            if len(parts) == 2:
                digests[parts[1].lstrip("*").removeprefix("./")] = parts[0].lower()
        return digests, name, []
    return {}, None, []


# Measured on the reference machines (FIELD-NOTES): OpenSSL sha256 runs ~1.5 GB/s per core.
SHA256_BYTES_PER_S_PER_CORE = 1.5e9


def _estimate_seconds(files: list[ModelFile], ctx: CheckContext) -> tuple[float, int, bool] | None:
    """(seconds, uncached bytes, over budget) before hashing, so a slow check says so."""
    cache = ctx.digest_cache
    uncached = [f for f in files if cache is None or cache.get(FileKey.of(f.path)) is None]
    if not uncached:
        return None
    total = sum(f.size for f in uncached)
    cores = min(len(uncached), ctx.hash_workers or os.cpu_count() or 1)
    # Parallel files help up to the core count; one big file is hashed by one core.
    seconds = max(
        total / (SHA256_BYTES_PER_S_PER_CORE * cores),
        max(f.size for f in uncached) / SHA256_BYTES_PER_S_PER_CORE,
    )
    over = ctx.deadline is not None and time.perf_counter() + seconds > ctx.deadline
    return seconds, total, over


def check_checksum(inv: Inventory, ctx: CheckContext) -> CheckResult:
    started = time.perf_counter()
    manifest, manifest_name, problems = read_manifest(inv)
    expected = dict(manifest)
    for rel, digest in ctx.expected_sha256.items():
        if rel in manifest and manifest[rel] != digest:
            problems.append(f"{rel}: request digest differs from {manifest_name}")
        expected[rel] = digest
    if not expected and not problems:
        return result(
            NAME,
            Status.SKIPPED,
            "no expected digests: pass them in the request (--sha256) or ship "
            "preflight-manifest.json or SHA256SUMS with the model",
            started=started,
        )
    weights = inv.weights
    by_rel = {f.rel: f for f in inv.files}
    to_hash = []
    for rel in sorted(expected):
        if rel not in by_rel:
            problems.append(f"{rel}: listed with a digest but missing")
        else:
            to_hash.append(by_rel[rel])
    uncovered = [f.rel for f in weights if f.rel not in expected]
    problems += [f"{rel}: weight file without an expected digest" for rel in uncovered]
    sources: dict[str, str] = {}
    limit = ctx.policy.hash_limit_s
    estimate = None if ctx.remote is not None else _estimate_seconds(to_hash, ctx)
    if estimate is not None and estimate[0] > limit:
        problems.append(
            f"not hashed: {estimate[1] / 1e9:,.1f} GB that the digest cache does not hold "
            f"would take about {estimate[0]:,.0f} s at {SHA256_BYTES_PER_S_PER_CORE / 1e9:g} "
            f"GB/s a core, more than validation.hash_limit_s ({limit:g} s)"
        )
        refused = {"estimated_s": round(estimate[0], 3), "uncached_bytes": estimate[1]}
        return result(
            NAME, Status.FAILED, summarise_findings(problems), started=started, details=refused
        )
    hash_started = time.perf_counter()
    deadline = hash_started + limit
    try:
        # Reading every byte once, or downloading it: the model's size decides, not its content.
        with not_timed():
            if ctx.remote is not None:  # provider checksums, else a streamed download
                hashed, sources = ctx.remote.hash(to_hash, ctx.digest_cache, deadline=deadline)
            else:
                hashed = hash_files(to_hash, ctx.digest_cache, ctx.hash_workers, deadline=deadline)
    except StoreError as exc:  # the object changed, or the store refused mid-way
        return result(NAME, Status.FAILED, str(exc), started=started)
    except HashingTooLong as exc:
        why = (
            "the store states no sha256 for it, so it is downloaded to hash"
            if ctx.remote is not None
            else f"the disk reads slower than the {SHA256_BYTES_PER_S_PER_CORE / 1e9:g} GB/s a "
            "core it was estimated at"
        )
        problems.append(
            f"hashing stopped in {exc} after {time.perf_counter() - hash_started:,.1f} s, at "
            f"validation.hash_limit_s ({limit:g} s): {why}"
        )
        return result(NAME, Status.FAILED, summarise_findings(problems), started=started)
    mismatched = [h.rel for h in hashed if h.digest != expected[h.rel]]
    problems += [f"{rel}: sha256 mismatch (corrupted or altered)" for rel in mismatched]
    hashed_bytes = sum(h.size for h in hashed if not h.cached)
    elapsed = time.perf_counter() - started
    details: dict[str, Any] = {
        "files": {
            h.rel: {"sha256": h.digest, "cached": h.cached, "matches": h.digest == expected[h.rel]}
            for h in hashed
        },
        "source": "request" if ctx.expected_sha256 else manifest_name,
        "hashed_bytes": hashed_bytes,
        "cached_files": sum(h.cached for h in hashed),
    }
    remote_note = ""
    if ctx.remote is not None:
        details["sources"] = sources
        downloaded = [h for h in hashed if sources.get(h.rel) == "download"]
        details["downloaded_bytes"] = sum(h.size for h in downloaded)
        notes = {rel: note for rel in sources if (note := ctx.remote.objects[rel].checksum_note)}
        if notes:
            details["provider_notes"] = notes
        from_provider = sum(1 for how in sources.values() if how == "provider")
        remote_note = f"; {from_provider} by the provider's sha256 without a download"
        if downloaded:
            remote_note += (
                f"; no provider sha256 for {len(downloaded)} files, so the check cost a "
                f"download of {details['downloaded_bytes'] / 1e9:.2f} GB "
                f"({summarise_findings([h.rel for h in downloaded], 3)})"
            )
        if notes:
            remote_note += "; " + next(iter(notes.values()))
    throughput = hashed_bytes / elapsed / 1e9 if elapsed > 0 and hashed_bytes else None
    if throughput is not None:
        details["gb_per_s"] = round(throughput, 3)
    over = ""
    if estimate is not None:
        details["estimated_s"] = round(estimate[0], 3)
        if estimate[2]:
            over = (
                f"; hashing {estimate[1] / 1e9:.2f} GB uncached was estimated at "
                f"{estimate[0]:.1f} s, over the validation budget (the digest cache makes "
                "the next run free)"
            )
    if problems:
        reason = summarise_findings(problems) + over + remote_note
        return result(NAME, Status.FAILED, reason, started=started, details=details)
    cached = details["cached_files"]
    reason = (
        f"{len(hashed)} files match ({cached} from the digest cache, "
        f"{hashed_bytes / 1e9:.2f} GB hashed){over}{remote_note}"
    )
    return result(
        NAME,
        Status.PASSED,
        reason,
        started=started,
        value=hashed_bytes,
        unit="bytes",
        details=details,
    )
