"""A content-addressed local cache of remote models, shared by the benchmarkers on a host.

One download per model version (across processes), resumable, size-bounded (issue #16):

    cache = ModelCache(Path("~/.cache/preflight/fetched-models").expanduser(), 100 * 2**30)
    with cache.use(open_store("s3://bucket/models/chat-7b/")) as path:   # held while in use
        loading.load_model(str(path))                                   # a plain directory

Layout under the root:

    blobs/sha256/<hex>          every distinct file once, verified, read-only
    snapshots/<key>/<rel>       one directory per model version, laid out like the location;
                                its files are hard links to blobs (symlinks where links fail)
    meta/<key>.json             what a snapshot holds; its mtime is when it was last used (LRU)
    index/<object key>          the sha256 of a remote object version already downloaded, so an
                                unchanged file of a new version is not fetched again even when the
                                provider states no sha256 (plain S3 objects)
    partial/<object key>.part   a download in progress or cut short: a prefix of the object,
                                continued from its size with ranged reads
    tmp/                        snapshots being built, evicted ones being removed
    locks/                      fcntl.flock files

A snapshot key is the sha256 of `store.display` and every object's rel, version, size (and
sha256 when given): a changed remote object makes a new snapshot. An object key is the same over
one object. Objects with neither a version nor a sha256 cannot be recognised again: a location
that has one is downloaded afresh each time (its blobs still deduplicate).

Before downloading, a fetch evicts until what it may download fits (a file it cannot know it
has, without a provider sha256, counts as new), so the bound holds during the download too;
after it, until the cache is under its bound again. A snapshot in use is never evicted: the
bound can be exceeded while every snapshot over it is in use.

Locks (flock: they exclude threads as well as processes and die with a crashed process):

    snapshot-<key>   EX while a snapshot is built: a second fetcher waits, then reuses it
    use-<key>        SH while a snapshot is in use (`use`); eviction never removes a held one
    object-<key>     EX while one object downloads into its .part
    gc               SH while anything is built; eviction takes it EX without waiting, so it
                     runs only when nothing is being built and never sees half of a build

Configuration (the benchmarker reads it through its Settings, `ModelCache.configured`):

    PREFLIGHT_MODEL_CACHE_DIR        root; default ~/.cache/preflight/fetched-models
    PREFLIGHT_MODEL_CACHE_MAX_BYTES  bound on blobs + partial downloads; default 100GiB
                                     (a number of bytes, or with a unit: 500MB, 100GiB)

Errors:

    StoreError (services/storage/base.py)   the location could not be listed or read: as is
     └── CacheError                          kind: too_large | checksum_mismatch | changed |
                                             unsafe_path | disk
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.storage.base import RemoteObject, Store, StoreError

__all__ = [
    "DEFAULT_DIR",
    "DEFAULT_MAX_BYTES",
    "DIR_ENV",
    "MAX_BYTES_ENV",
    "CacheError",
    "ModelCache",
    "Progress",
    "format_bytes",
    "parse_bytes",
]

log = logging.getLogger("preflight.storage.cache")

DIR_ENV = "PREFLIGHT_MODEL_CACHE_DIR"
MAX_BYTES_ENV = "PREFLIGHT_MODEL_CACHE_MAX_BYTES"
# Not ~/.cache/preflight/models: that is where services/benchmarker/samples.py keeps its
# trained sample models.
DEFAULT_DIR = Path("~/.cache/preflight/fetched-models")
DEFAULT_MAX_BYTES = 100 * 1024**3
FILES_AT_ONCE = 4
"""Objects downloaded side by side (small files overlap their latency; large ones share the
read pool)."""

Progress = Callable[[int, int], None]
"""progress(bytes done, bytes in the model): called from download threads, one at a time."""

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


class CacheError(StoreError):
    """The model cache refused or could not complete a fetch; one line a user can act on."""


def parse_bytes(text: str) -> int:
    """`100GiB`, `500 MB`, `1e9`, `1073741824` -> bytes."""
    found = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not found or found.group(2) not in _UNITS:
        raise ValueError(f"{text!r} is not a size (e.g. 100GiB, 500MB, 1073741824)")
    return int(float(found.group(1)) * _UNITS[found.group(2)])


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).hexdigest()


def snapshot_key(display: str, objects: list[RemoteObject]) -> str | None:
    """What identifies one version of a location; None when some object cannot be recognised
    again (no version, no sha256)."""
    if any(o.version is None and o.sha256 is None for o in objects):
        return None
    rows = sorted((o.rel, o.version, o.size, o.sha256 and o.sha256.lower()) for o in objects)
    return _digest("snapshot", display, rows)


def object_key(display: str, obj: RemoteObject) -> str | None:
    """What identifies one object version (keys its .part and its index entry)."""
    if obj.version is None and obj.sha256 is None:
        return None
    return _digest("object", display, obj.rel, obj.version, obj.size, obj.sha256)


def _check_rel(display: str, rel: str) -> None:
    """A listing decides where files land: never outside the snapshot."""
    if (
        rel.startswith("/")
        or "\\" in rel
        or "\0" in rel
        or any(part in ("", ".", "..") for part in rel.split("/"))
    ):
        raise CacheError(
            f"{display}: refusing the file name {rel!r}: not a relative path inside the model",
            kind="unsafe_path",
        )


@dataclass
class _Tally:
    """Bytes done of a fetch, reported through the progress callback."""

    total: int
    callback: Progress | None
    done: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            if self.callback is not None:
                self.callback(self.done, self.total)


class _Cancelled(Exception):
    """Another object of the same fetch failed: stop this one (its .part stays resumable)."""


@dataclass(frozen=True)
class _Snapshot:
    key: str
    last_used: float
    shas: frozenset[str]


class ModelCache:
    """Remote model locations fetched into local directories, one download per version.

    `workers` ranged reads run at once, each of `chunk_bytes`; at most `max_buffered_bytes` of
    read-but-unwritten data is held in memory per fetch. `clock` stamps last use (LRU)."""

    def __init__(
        self,
        root: Path,
        max_bytes: int,
        *,
        workers: int = 8,
        chunk_bytes: int = 8 * 1024 * 1024,
        max_buffered_bytes: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_bytes <= 0 or workers <= 0 or chunk_bytes <= 0:
            raise ValueError("max_bytes, workers and chunk_bytes must be positive")
        self.root = root
        self.max_bytes = max_bytes
        self.workers = workers
        self.chunk_bytes = chunk_bytes
        buffered = max_buffered_bytes or 2 * workers * chunk_bytes
        self._permits = max(1, buffered // chunk_bytes)
        self._clock = clock
        self._made = False

    def _make_dirs(self) -> None:
        """On first use, not at construction: a service that never sees a remote location
        leaves no cache behind."""
        if not self._made:
            for sub in ("blobs/sha256", "snapshots", "meta", "index", "partial", "tmp", "locks"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            self._made = True

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], **options: Any) -> ModelCache:
        """The cache the module docstring's variables describe (defaults when unset)."""
        return cls.configured(environ.get(DIR_ENV), environ.get(MAX_BYTES_ENV), **options)

    @classmethod
    def configured(
        cls, directory: str | Path | None, max_bytes: str | None, **options: Any
    ) -> ModelCache:
        """The cache at `directory` bounded by `max_bytes` (as the variables give them)."""
        root = Path(directory or DEFAULT_DIR).expanduser()
        try:
            bound = parse_bytes(max_bytes) if max_bytes else DEFAULT_MAX_BYTES
        except ValueError as exc:
            raise ValueError(f"{MAX_BYTES_ENV}: {exc}") from None
        return cls(root, bound, **options)

    # --- the API ------------------------------------------------------------------------------

    def fetch(self, store: Store, *, progress: Progress | None = None) -> Path:
        """The local directory of the store's current version, downloaded if not cached yet.

        Not held once it returns: a later fetch (any process) may evict it. Use `use` to keep
        it while it is read."""
        with self.use(store, progress=progress) as path:
            return path

    @contextmanager
    def use(self, store: Store, *, progress: Progress | None = None) -> Iterator[Path]:
        """Fetch like `fetch`, and keep the snapshot from eviction until the block exits."""
        try:
            self._make_dirs()
            held, path = self._open(store, progress)
        except OSError as exc:
            raise self._disk_error(exc) from exc
        try:
            try:
                self.evict()
            except OSError as exc:  # housekeeping: the next fetch tries again
                log.warning("model cache %s: eviction failed: %s", self.root, exc)
            yield path
        finally:
            os.close(held)

    def usage(self) -> int:
        """Bytes the cache holds on disk: blobs and partial downloads (snapshots are links)."""
        self._make_dirs()
        return sum(self._sizes(self.root / "blobs" / "sha256").values()) + sum(
            self._sizes(self.root / "partial").values()
        )

    def evict(self, *, reserve: int = 0, keep: frozenset[str] = frozenset()) -> list[str]:
        """Free space until usage + `reserve` <= max_bytes: blobs no snapshot references (oldest
        first), then stale partial downloads, then snapshots least recently used first, never
        one in use nor the blobs and partial downloads named (sha256, object key) in `keep`.
        The keys of evicted snapshots; [] without doing anything while a fetch is building (it
        evicts when it is done)."""
        self._make_dirs()
        gc = self._try_lock("gc", fcntl.LOCK_EX)
        if gc is None:
            return []
        try:
            return self._evict(reserve, keep)
        finally:
            os.close(gc)

    # --- fetching -----------------------------------------------------------------------------

    def _open(self, store: Store, progress: Progress | None) -> tuple[int, Path]:
        """(the held use lock's fd, the snapshot directory)."""
        objects = sorted(store.list(), key=lambda o: o.rel)
        for obj in objects:
            _check_rel(store.display, obj.rel)
        total = sum(o.size for o in objects)
        if total > self.max_bytes:
            raise CacheError(
                f"{store.display}: the model is {format_bytes(total)}, more than the model cache "
                f"at {self.root} may hold ({format_bytes(self.max_bytes)}): raise {MAX_BYTES_ENV}",
                kind="too_large",
            )
        key = snapshot_key(store.display, objects) or f"once-{uuid.uuid4().hex}"
        with self._locked(f"snapshot-{key}", fcntl.LOCK_EX):
            # Held before looking, so an eviction cannot remove it between the look and the use.
            held = self._lock_fd(f"use-{key}", fcntl.LOCK_SH)
            try:
                path = self.root / "snapshots" / key
                meta = self.root / "meta" / f"{key}.json"
                if path.is_dir() and meta.is_file():
                    _Tally(total, progress).add(total)
                else:
                    self._build(store, key, objects, _Tally(total, progress))
                now = self._clock()
                os.utime(meta, (now, now))
            except BaseException:
                os.close(held)
                raise
        return held, path

    def _build(self, store: Store, key: str, objects: list[RemoteObject], tally: _Tally) -> None:
        display = store.display
        keys = frozenset(k for o in objects if (k := object_key(display, o)) is not None)
        known = {o.rel: self._known(display, o) for o in objects}
        missing = sum(o.size for o in objects if known[o.rel] is None)
        resumable = sum(self._sizes(self.root / "partial", keys).values())
        # Room first, so the cache stays bounded while it downloads; never what this fetch uses.
        keep = keys | {sha for sha in known.values() if sha is not None}
        self.evict(reserve=max(0, missing - resumable), keep=keep)
        with self._locked("gc", fcntl.LOCK_SH):
            shas = self._download(store, objects, tally)
            building = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=self.root / "tmp"))
            for obj in objects:
                self._link(self._blob(shas[obj.rel]), building / obj.rel)
            files = [
                {"rel": o.rel, "size": o.size, "version": o.version, "sha256": shas[o.rel]}
                for o in objects
            ]
            record = {"display": display, "created": self._clock(), "files": files}
            self._write_atomic(self.root / "meta" / f"{key}.json", json.dumps(record, indent=1))
            target = self.root / "snapshots" / key
            if target.exists():  # a leftover without its record: never half of one in view
                self._remove_tree(target)
            os.rename(building, target)

    def _download(self, store: Store, objects: list[RemoteObject], tally: _Tally) -> dict[str, str]:
        """rel -> sha256 of every object, downloading those not in the cache."""
        shas: dict[str, str] = {}
        needed: list[RemoteObject] = []
        for obj in objects:
            if (sha := self._known(store.display, obj)) is not None:
                shas[obj.rel] = sha
                tally.add(obj.size)
            else:
                needed.append(obj)
        if not needed:
            return shas
        budget = threading.BoundedSemaphore(self._permits)
        cancel = threading.Event()
        with (
            ThreadPoolExecutor(self.workers, thread_name_prefix="model-cache-read") as reads,
            ThreadPoolExecutor(
                min(FILES_AT_ONCE, len(needed)), thread_name_prefix="model-cache-file"
            ) as files,
        ):
            futures = {
                files.submit(self._download_one, store, obj, reads, budget, tally, cancel): obj
                for obj in needed
            }
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            if any(f.exception() is not None for f in done):
                cancel.set()
                for future in futures:
                    future.cancel()
            wait(futures)
        errors = [
            exc
            for f in futures
            if not f.cancelled()
            and (exc := f.exception()) is not None
            and not isinstance(exc, _Cancelled)
        ]
        if errors:
            # A StoreError says what to do about the location; anything else is ours.
            raise next((e for e in errors if isinstance(e, StoreError)), errors[0])
        for future, obj in futures.items():
            shas[obj.rel] = future.result()
        return shas

    def _download_one(
        self,
        store: Store,
        obj: RemoteObject,
        reads: ThreadPoolExecutor,
        budget: threading.BoundedSemaphore,
        tally: _Tally,
        cancel: threading.Event,
    ) -> str:
        okey = object_key(store.display, obj)
        name = okey or f"once-{uuid.uuid4().hex}"
        with self._locked(f"object-{name}", fcntl.LOCK_EX):
            if (sha := self._known(store.display, obj)) is not None:
                tally.add(obj.size)  # another process brought it in while this one waited
                return sha
            part = self.root / "partial" / f"{name}.part"
            digest = hashlib.sha256()
            with open(part, "a+b") as fh:
                start = fh.seek(0, os.SEEK_END)
                if start > obj.size:
                    fh.truncate(0)
                    start = 0
                fh.seek(0)
                while block := fh.read(min(self.chunk_bytes, 1024 * 1024)):
                    digest.update(block)
                tally.add(start)
                try:
                    self._stream(store, obj, start, fh, digest, reads, budget, tally, cancel)
                except CacheError:
                    part.unlink(missing_ok=True)  # what it holds may not be this object's
                    raise
                fh.flush()
                os.fsync(fh.fileno())
            sha = digest.hexdigest()
            if obj.sha256 is not None and sha != obj.sha256.lower():
                part.unlink(missing_ok=True)
                raise CacheError(
                    f"{store.display}: {obj.rel}: downloaded sha256 {sha} is not the "
                    f"{obj.sha256.lower()} the provider states: not kept; the object changed "
                    "or was corrupted in transit, fetch again",
                    kind="checksum_mismatch",
                )
            blob = self._blob(sha)
            if blob.is_file() and blob.stat().st_size == obj.size:
                part.unlink()  # the same bytes under another name or version: stored once
            else:
                os.chmod(part, 0o444)  # snapshots hard-link it: a loader must not write
                os.replace(part, blob)
            if okey is not None:
                self._write_atomic(self.root / "index" / okey, sha)
            return sha

    def _stream(
        self,
        store: Store,
        obj: RemoteObject,
        start: int,
        fh: Any,
        digest: Any,
        reads: ThreadPoolExecutor,
        budget: threading.BoundedSemaphore,
        tally: _Tally,
        cancel: threading.Event,
    ) -> None:
        """Ranged reads [start, size) in parallel, appended in order: the .part is always a
        prefix of the object, so a crash loses at most what was in flight."""
        inflight: deque[tuple[Future[bytes], int, int]] = deque()
        offset = start
        try:
            while offset < obj.size or inflight:
                if cancel.is_set():
                    raise _Cancelled
                # Take another permit only without blocking while this file has reads in
                # flight: a file waits on its own oldest read instead, so permits always return.
                if offset < obj.size and budget.acquire(blocking=not inflight):
                    n = min(self.chunk_bytes, obj.size - offset)
                    future = reads.submit(store.read, obj.rel, offset, offset + n)
                    inflight.append((future, offset, n))
                    offset += n
                    continue
                future, at, n = inflight.popleft()
                try:
                    data = future.result()
                finally:
                    budget.release()
                if len(data) != n:
                    raise CacheError(
                        f"{store.display}: {obj.rel}: {len(data)} bytes at offset {at} where the "
                        f"listing promised {n} (of {obj.size}): the object changed while "
                        "downloading, fetch again",
                        kind="changed",
                    )
                fh.write(data)
                digest.update(data)
                tally.add(n)
        finally:
            for future, _, _ in inflight:
                future.cancel()
                budget.release()

    def _known(self, display: str, obj: RemoteObject) -> str | None:
        """The sha256 of a cached blob holding this object, if there is one."""
        candidates = [obj.sha256.lower()] if obj.sha256 else []
        okey = object_key(display, obj)
        if okey is not None:
            with suppress(FileNotFoundError):
                candidates.append((self.root / "index" / okey).read_text().strip())
        for sha in candidates:
            try:
                if self._blob(sha).stat().st_size == obj.size:
                    return sha
            except FileNotFoundError:
                continue
        return None

    # --- eviction -----------------------------------------------------------------------------

    def _evict(self, reserve: int, keep: frozenset[str]) -> list[str]:
        """With gc held EX: nothing is being built, so every tmp/ entry and .part is stale."""
        for leftover in (self.root / "tmp").iterdir():
            self._remove_tree(leftover)  # a crashed build's links would pin evicted blobs
        for sub in ("meta", "index"):
            for written in (self.root / sub).glob(".*"):
                written.unlink(missing_ok=True)  # _write_atomic's temp file, left by a crash
        for lock in (self.root / "locks").glob("object-*.lock"):
            lock.unlink(missing_ok=True)  # only ever taken under gc SH
        snapshots = self._snapshots()
        blobs = self._sizes(self.root / "blobs" / "sha256")
        partials = self._sizes(self.root / "partial")
        for entry in (self.root / "index").iterdir():
            try:
                if entry.read_text().strip() not in blobs:
                    entry.unlink()
            except OSError:
                continue
        referenced: dict[str, int] = {}
        for snap in snapshots:
            for sha in snap.shas:
                referenced[sha] = referenced.get(sha, 0) + 1
        usage = sum(blobs.values()) + sum(partials.values())

        def over() -> bool:
            return usage + reserve > self.max_bytes

        unreferenced = set(blobs) - set(referenced) - keep
        for sha in sorted(unreferenced, key=lambda sha: self._mtime(self._blob(sha))):
            if not over():
                return []
            self._blob(sha).unlink(missing_ok=True)
            usage -= blobs.pop(sha)
        for name, size in sorted(partials.items()):
            if not over():
                return []
            if name.removesuffix(".part") not in keep:
                (self.root / "partial" / name).unlink(missing_ok=True)
                usage -= size
        evicted: list[str] = []
        for snap in sorted(snapshots, key=lambda s: (s.last_used, s.key)):
            if not over():
                break
            held = self._try_lock(f"use-{snap.key}", fcntl.LOCK_EX)
            if held is None:
                continue  # in use
            try:
                self._remove_snapshot(snap.key)
            finally:
                os.close(held)
            evicted.append(snap.key)
            for sha in snap.shas:
                referenced[sha] -= 1
                if referenced[sha] == 0 and sha in blobs:
                    self._blob(sha).unlink(missing_ok=True)
                    usage -= blobs.pop(sha)
        return evicted

    def _snapshots(self) -> list[_Snapshot]:
        """Committed snapshots; records without a directory (a crash between the two steps of
        a commit or an eviction) are dropped, and so are unreadable ones."""
        found: list[_Snapshot] = []
        for meta in (self.root / "meta").glob("*.json"):
            key = meta.name.removesuffix(".json")
            if not (self.root / "snapshots" / key).is_dir():
                meta.unlink(missing_ok=True)
                continue
            try:
                record = json.loads(meta.read_text())
                shas = frozenset(str(f["sha256"]) for f in record["files"])
                last_used = meta.stat().st_mtime
            except (OSError, ValueError, KeyError, TypeError):
                held = self._try_lock(f"use-{key}", fcntl.LOCK_EX)
                if held is not None:
                    try:
                        self._remove_snapshot(key)
                    finally:
                        os.close(held)
                continue
            found.append(_Snapshot(key, last_used, shas))
        for directory in (self.root / "snapshots").iterdir():
            if not (self.root / "meta" / f"{directory.name}.json").exists():
                self._remove_tree(directory)  # a snapshot without its record is not one
        return found

    def _remove_snapshot(self, key: str) -> None:
        """Out of view in one rename, then its record, then its files."""
        path = self.root / "snapshots" / key
        trash = self.root / "tmp" / f"evicted-{key}-{uuid.uuid4().hex[:8]}"
        with suppress(FileNotFoundError):
            os.rename(path, trash)
        (self.root / "meta" / f"{key}.json").unlink(missing_ok=True)
        self._remove_tree(trash)

    # --- files and locks ----------------------------------------------------------------------

    def _blob(self, sha: str) -> Path:
        return self.root / "blobs" / "sha256" / sha

    @staticmethod
    def _mtime(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except FileNotFoundError:
            return 0.0

    @staticmethod
    def _sizes(directory: Path, names: frozenset[str] | None = None) -> dict[str, int]:
        """name -> size of the plain files in a directory (only `names`, with any suffix, when
        given)."""
        sizes: dict[str, int] = {}
        with os.scandir(directory) as entries:
            for entry in entries:
                if names is not None and entry.name.split(".")[0] not in names:
                    continue
                try:
                    if entry.is_file(follow_symlinks=False):
                        sizes[entry.name] = entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    continue
        return sizes

    @staticmethod
    def _link(blob: Path, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(blob, dest)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
            os.symlink(os.path.relpath(blob, dest.parent), dest)

    @staticmethod
    def _write_atomic(path: Path, text: str) -> None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)

    @staticmethod
    def _remove_tree(path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def _lock_fd(self, name: str, mode: int) -> int:
        fd = os.open(self.root / "locks" / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _try_lock(self, name: str, mode: int) -> int | None:
        fd = os.open(self.root / "locks" / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    @contextmanager
    def _locked(self, name: str, mode: int) -> Iterator[None]:
        fd = self._lock_fd(name, mode)
        try:
            yield
        finally:
            os.close(fd)  # closing the last descriptor releases a flock

    def _disk_error(self, exc: OSError) -> CacheError:
        where = f" ({exc.filename})" if exc.filename else ""
        return CacheError(
            f"model cache {self.root}: {exc.strerror or exc}{where}: check its disk space and "
            f"permissions, or set {DIR_ENV}",
            kind="disk",
        )
