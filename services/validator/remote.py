"""Validate a remote model (s3://, hf://, https://) from range reads: a sparse local mirror
holding only the bytes the checks read.

The checks read files through their paths (mmap, zipfile, json). For a remote model each file
becomes a sparse file of its real size in a temporary directory, and only what the checks look
at is fetched into it:

    small files (<= 1 MiB)    whole: config, tokenizer, card, manifest, templates, code
    safetensors               the 8-byte length and the JSON header
    GGUF                      header, metadata and tensor infos: found by running the same
                              parser over a range reader, so the check re-reads exactly those
    zip (PyTorch .bin/.pt)    end record, central directory, and every member's local header
                              and data except the tensor records (data/<n>) no check opens
    TensorFlow variables data the first 64 KiB (read for nothing but its kind)
    pickles, unknown content  what the unsafe-code scan reads (ONNX external data included):
                              the same scan runs over a range reader; the array bytes it passes
                              over by length are not read (whole when reads cost more)
    ONNX                      its protobuf framing, found by running the structure check's walk
                              over a range reader; tensor payloads are passed over by length
    anything else             whole (HDF5, large JSON), up to `whole_file_max` bytes; a
                              bigger one (or a scan that reads more) is reported, not guessed

Checksums never come from the mirror: the provider's sha256 (the Hub's LFS sha256, S3's
full-object ChecksumSHA256) is compared with no download; otherwise the object is streamed and
hashed with parallel ranged reads (the report says so), and the digest cache keys it by
location, version (ETag / version id / blob id) and size.

`fill` (tests only) writes a pattern instead of holes where nothing was fetched: a check that
read past its plan would then see garbage and disagree with the same model validated locally.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import io
import logging
import os
import struct
import threading
import time
import zipfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

from services.storage.base import ReadCounter, RemoteObject, Store, StoreError
from services.validator.checks.checksum import (
    MANIFEST_NAMES,
    DigestCache,
    FileKey,
    Hashed,
    HashingTooLong,
)
from services.validator.checks.headers import HeaderError, read_gguf_stream, read_onnx_from
from services.validator.checks.inventory import (
    HDF5_SIGNATURE,
    MAX_FILES,
    SAFETENSORS_MAX_HEADER,
    ZIP_MAGICS,
    Kind,
    ModelFile,
    hdf5_user_block_offsets,
    is_tar,
    sniff,
)

log = logging.getLogger("preflight.validator")

SMALL_FILE_BYTES = 1024 * 1024
HEAD_BYTES = 64 * 1024
WHOLE_FILE_MAX = 1024**3
"""Default cap on a file read whole (a pickle, unknown content): over it, the file is reported
as not validated remotely rather than downloaded inside a 2 s budget."""
BLOCK = 64 * 1024
MAX_READ_AHEAD = 8 * 1024 * 1024
READ_WORKERS = 16
DIGEST_CHUNK = 16 * 1024 * 1024
DIGEST_INFLIGHT = 8
STREAM_CHUNK = 8 * 1024 * 1024


MAX_PLAN_READS = 256
BYTES_PER_READ = 4 * 1024 * 1024
"""A pickle's plan makes one ranged read per array payload it resumes after. A round trip costs
about what streaming a few MiB does (30 ms at 100 MB/s), so a plan may make one read per
BYTES_PER_READ of the file (16 at least, MAX_PLAN_READS at most); past them, the file is
streamed whole."""


class _PlanTooBig(Exception):
    """A plan would hold more than its limit (bytes), or make more reads than it may."""

    def __init__(self, *, reads: bool) -> None:
        super().__init__("over the read plan's limit")
        self.reads = reads


class RangeFile(io.RawIOBase):
    """One remote object as a seekable read-only stream: reads become ranged GETs of whole
    64 KiB blocks, doubling the read-ahead while reads run forward (a GGUF vocabulary is
    megabytes of small sequential reads). Every fetched range is kept in `ranges`."""

    def __init__(
        self,
        store: Store,
        obj: RemoteObject,
        *,
        limit: int | None = None,
        max_reads: int | None = None,
    ) -> None:
        super().__init__()
        self.store, self.obj = store, obj
        self.limit = limit  # bytes it may hold: over it, a plan stops (_PlanTooBig)
        self.max_reads = max_reads
        self.reads_made = 0
        self.pos = 0
        self._starts: list[int] = []
        self._chunks: list[bytes] = []
        self._ahead = BLOCK
        self._last_end = -1

    @property
    def fetched(self) -> int:
        return sum(len(c) for c in self._chunks)

    @property
    def ranges(self) -> list[tuple[int, bytes]]:
        return list(zip(self._starts, self._chunks, strict=True))

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.obj.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        end = min(self.pos + len(view), self.obj.size)
        if end <= self.pos:
            return 0
        self._ensure(self.pos, end)
        n = 0
        while self.pos < end:
            i = bisect.bisect_right(self._starts, self.pos) - 1
            chunk_start, chunk = self._starts[i], self._chunks[i]
            take = chunk[self.pos - chunk_start : end - chunk_start]
            view[n : n + len(take)] = take
            n += len(take)
            self.pos += len(take)
        return n

    def _ensure(self, start: int, end: int) -> None:
        """Fetch what of [start, end) is not held yet, in block-aligned ranges."""
        at = start
        while at < end:
            i = bisect.bisect_right(self._starts, at) - 1
            if i >= 0 and at < self._starts[i] + len(self._chunks[i]):
                at = self._starts[i] + len(self._chunks[i])
                continue
            nxt = self._starts[i + 1] if i + 1 < len(self._starts) else self.obj.size
            self._ahead = min(self._ahead * 2, MAX_READ_AHEAD) if at == self._last_end else BLOCK
            fetch_start = max(at - at % BLOCK, self._held_end(i) if i >= 0 else 0)
            want = max(end, fetch_start + self._ahead)
            fetch_end = min(-(-want // BLOCK) * BLOCK, nxt, self.obj.size)
            if self.limit is not None and self.fetched + fetch_end - fetch_start > self.limit:
                raise _PlanTooBig(reads=False)
            if self.max_reads is not None and self.reads_made >= self.max_reads:
                raise _PlanTooBig(reads=True)
            self.reads_made += 1
            data = self.store.read(self.obj.rel, fetch_start, fetch_end)
            if len(data) != fetch_end - fetch_start:  # a short piece would leave a gap forever
                raise StoreError(
                    f"{self.store.display}: {self.obj.rel}: {len(data)} bytes at offset "
                    f"{fetch_start} where the listing promised {fetch_end - fetch_start}: the "
                    "object changed while validating, try again",
                    kind="changed",
                )
            self._put(fetch_start, data)
            self._last_end = fetch_end
            at = fetch_end

    def _held_end(self, i: int) -> int:
        return self._starts[i] + len(self._chunks[i])

    def _put(self, start: int, data: bytes) -> None:
        if not data:
            raise StoreError(
                f"{self.store.display}: {self.obj.rel}: no bytes at offset {start} of the "
                f"{self.obj.size} the listing promised: the object changed while validating",
                kind="changed",
            )
        i = bisect.bisect_left(self._starts, start)
        self._starts.insert(i, start)
        self._chunks.insert(i, data)


class _RangeView:
    """buf[i], buf[a:b], buf.find and len(buf) over a RangeFile, for the protobuf walk of an
    ONNX file (services/validator/checks/headers.py) and the pickle model: the walk or scan
    that plans the reads is the check's own. The block last read is kept: both read a byte at
    a time."""

    def __init__(self, reader: RangeFile) -> None:
        self.reader = reader
        self.size = reader.obj.size
        self._start = 0
        self._block = b""

    def __len__(self) -> int:
        return self.size

    @overload
    def __getitem__(self, key: int, /) -> int: ...

    @overload
    def __getitem__(self, key: slice, /) -> bytes: ...

    def __getitem__(self, key: int | slice, /) -> int | bytes:
        if isinstance(key, slice):
            start, stop, _ = key.indices(self.size)
            held = self._start + len(self._block)
            if self._start <= start and stop <= held:  # most slices are short: the block's
                return self._block[start - self._start : stop - self._start]
            self.reader.seek(start)
            return self.reader.read(max(0, stop - start))
        if not 0 <= key < self.size:
            raise IndexError(key)
        if not self._start <= key < self._start + len(self._block):
            self._start = key - key % BLOCK
            self.reader.seek(self._start)
            self._block = self.reader.read(BLOCK)
        return self._block[key - self._start]

    def find(self, sub: bytes, start: int, end: int, /) -> int:
        """bytes.find, reading a block at a time up to where `sub` is (or `end`)."""
        at, end = max(0, start), min(end, self.size)
        while at < end:
            stop = min(end, at - at % BLOCK + BLOCK)
            chunk = self[at : min(end, stop + len(sub) - 1)]
            found = chunk.find(sub)
            if found >= 0:
                return at + found
            at = stop
        return -1


@dataclass
class RemoteModel:
    """A remote model's listing, its sparse mirror, and what reading it cost."""

    store: Store
    root: Path
    objects: dict[str, RemoteObject]
    plans: dict[str, str] = field(default_factory=dict)
    """rel -> what was fetched of it (whole, header, central directory ...), for the report."""
    problems: list[str] = field(default_factory=list)
    whole: set[str] = field(default_factory=set)
    """Files fetched whole into the mirror: their sha256 can be taken from the mirror."""

    @property
    def reads(self) -> ReadCounter:
        return self.store.reads

    @property
    def total_bytes(self) -> int:
        return sum(o.size for o in self.objects.values())

    def summary(self) -> str:
        total = self.total_bytes
        share = f" ({self.reads.bytes_read / total:.4%})" if total else ""
        return (
            f"read {_human(self.reads.bytes_read)} of {_human(total)}{share} from "
            f"{self.store.display} in {self.reads.requests} requests"
        )

    def details(self) -> dict[str, Any]:
        return {
            "location": self.store.display,
            "bytes_read": self.reads.bytes_read,
            "requests": self.reads.requests,
            "model_bytes": self.total_bytes,
            "files": len(self.objects),
            "fetched": dict(sorted(self.plans.items())),
        }

    # --- checksums --------------------------------------------------------------------------

    def hash(
        self, files: list[ModelFile], cache: DigestCache | None, deadline: float | None = None
    ) -> tuple[list[Hashed], dict[str, str]]:
        """A sha256 for each file without downloading where the provider states one:
        (hashed, rel -> where the digest came from: provider | mirror | cache | download).
        A download still running at `deadline` (perf_counter clock) raises HashingTooLong."""
        out: dict[str, Hashed] = {}
        how: dict[str, str] = {}
        streamed: list[ModelFile] = []
        # S3 and the Hub compute the sha256 they state from the bytes they hold; an https
        # manifest's digests are only what the publisher wrote: those are hashed here.
        verified = getattr(self.store, "sha256_verified", True)
        for f in files:
            obj = self.objects[f.rel]
            key = _remote_key(self.store, obj)
            if obj.sha256 is not None and verified:
                out[f.rel], how[f.rel] = Hashed(f.rel, obj.sha256.lower(), True, f.size), "provider"
            elif f.rel in self.whole:
                digest = hashlib.sha256(f.path.read_bytes()).hexdigest()
                out[f.rel], how[f.rel] = Hashed(f.rel, digest, True, f.size), "mirror"
            elif cache is not None and key is not None and (known := cache.get(key)):
                out[f.rel], how[f.rel] = Hashed(f.rel, known, True, f.size), "cache"
            else:
                streamed.append(f)
        if streamed:
            log.info(
                "%s: no provider sha256 for %d files: hashing %s by download (%s)",
                self.store.display,
                len(streamed),
                _human(sum(f.size for f in streamed)),
                ", ".join(f.rel for f in streamed[:5]) + (" ..." if len(streamed) > 5 else ""),
            )
            with ThreadPoolExecutor(READ_WORKERS, thread_name_prefix="remote-sha256") as pool:
                digests = [
                    self._stream_digest(self.objects[f.rel], pool, deadline) for f in streamed
                ]
            for f, digest in zip(streamed, digests, strict=True):
                out[f.rel], how[f.rel] = Hashed(f.rel, digest, False, f.size), "download"
                key = _remote_key(self.store, self.objects[f.rel])
                if cache is not None and key is not None:
                    cache.put(key, digest)
        return [out[f.rel] for f in files], how

    def _stream_digest(
        self, obj: RemoteObject, pool: ThreadPoolExecutor, deadline: float | None = None
    ) -> str:
        """sha256 of one object from parallel ranged reads, hashed in order (nothing kept)."""
        digest = hashlib.sha256()
        inflight: deque[tuple[Future[bytes], int]] = deque()
        offset = 0
        try:
            while offset < obj.size or inflight:
                while offset < obj.size and len(inflight) < DIGEST_INFLIGHT:
                    n = min(DIGEST_CHUNK, obj.size - offset)
                    inflight.append((pool.submit(self.store.read, obj.rel, offset, offset + n), n))
                    offset += n
                future, n = inflight.popleft()
                data = future.result()
                if len(data) != n:
                    raise StoreError(
                        f"{self.store.display}: {obj.rel}: the object changed while hashing it",
                        kind="changed",
                    )
                digest.update(data)
                if deadline is not None and time.perf_counter() > deadline:
                    raise HashingTooLong(obj.rel)
        finally:
            for future, _ in inflight:
                future.cancel()
        return digest.hexdigest()


def _remote_key(store: Store, obj: RemoteObject) -> FileKey | None:
    """The digest cache's key for a remote object: location, name and version, and size."""
    if obj.version is None:
        return None
    # A location naming one object is that object's own address (s3://b/dir/model.gguf); a
    # folder's objects are the folder's address and their names.
    where = (
        store.display if store.one_file is not None else f"{store.display.rstrip('/')}/{obj.rel}"
    )
    return FileKey(f"{where}@{obj.version}", obj.size, 0, 0, 0, 0)


def _human(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


# --- the mirror ------------------------------------------------------------------------------


def mirror(
    store: Store,
    root: Path,
    *,
    whole_file_max: int | None = None,
    fill: bytes | None = None,
) -> RemoteModel:
    """List `store` and write the sparse mirror under `root`. Raises StoreError (one line)."""
    limit = WHOLE_FILE_MAX if whole_file_max is None else whole_file_max
    objects = store.list()
    model = RemoteModel(store=store, root=root, objects={})
    for obj in objects:
        if _unsafe(obj.rel):
            model.problems.append(f"{obj.rel!r}: a file name outside the model; not read")
            continue
        model.objects[obj.rel] = obj
    # S3 holds `a/model.bin` and `a/model.bin/x` side by side; no directory can.
    folders = {rel.rsplit("/", i)[0] for rel in model.objects for i in range(1, rel.count("/") + 1)}
    for rel in sorted(folders & model.objects.keys()):
        del model.objects[rel]
        model.problems.append(
            f"{_shown(rel)}: both an object and a folder of objects ({_shown(rel)}/...), which "
            "no directory can hold; not read"
        )
    lock = threading.Lock()

    def one(obj: RemoteObject) -> None:
        plan, ranges, whole = _plan(store, obj, limit)
        _write(root / obj.rel, obj.size, ranges, fill)
        if whole and obj.size > sum(len(d) for _, d in ranges):  # big: chunk by chunk to disk
            held = ranges[0][1]
            with (root / obj.rel).open("r+b") as fh:
                fh.seek(len(held))
                for at in range(len(held), obj.size, STREAM_CHUNK):
                    fh.write(_read_exact(store, obj, at, at + STREAM_CHUNK))
        with lock:
            model.plans[obj.rel] = plan
            if whole:
                model.whole.add(obj.rel)
            if plan.startswith("not read"):
                model.problems.append(f"{_shown(obj.rel)}: {plan}")

    if len(model.objects) > MAX_FILES:
        raise StoreError(
            f"{store.display}: {len(model.objects)} objects, more than the {MAX_FILES} a model "
            "may have: name the model's own prefix",
            kind="unsupported",
        )
    with ThreadPoolExecutor(READ_WORKERS, thread_name_prefix="remote-read") as pool:
        futures = [pool.submit(one, obj) for obj in model.objects.values()]
        try:
            for future in futures:
                future.result()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # one failed: start no more reads
            raise
    return model


def _shown(rel: str) -> str:
    """A name as a reason may show it: as it is if printable, else escaped (no line breaks)."""
    return rel if rel.isprintable() else repr(rel)


def _unsafe(rel: str) -> bool:
    parts = rel.split("/")
    return (
        rel.startswith("/")
        or "\\" in rel
        or "\0" in rel
        or any(p in ("", ".", "..") for p in parts)
    )


def _refused(head: bytes, why: str) -> tuple[str, list[tuple[int, bytes]], bool]:
    """The plan for a file not validated remotely: its head, and why (the report says so)."""
    reason = f"not read: {why} (the limit for remote whole-file reads); validate a local copy"
    return reason, [(0, head)], False


def _whole(
    obj: RemoteObject, head: bytes, whole_file_max: int, what: str
) -> tuple[str, list[tuple[int, bytes]], bool]:
    """The plan "read it whole" (streamed by mirror()), or, over the limit, why not."""
    if obj.size > whole_file_max:
        size, limit = _human(obj.size), _human(whole_file_max)
        return _refused(head, f"{size} {what} would need a full download, over {limit}")
    return "whole", [(0, head)], True


def _plan(
    store: Store, obj: RemoteObject, whole_file_max: int
) -> tuple[str, list[tuple[int, bytes]], bool]:
    """(what was fetched, the ranges, fetched whole) for one object."""
    if obj.size <= SMALL_FILE_BYTES:
        return "whole", [(0, _read_exact(store, obj, 0, obj.size))], True
    name = obj.rel.rsplit("/", 1)[-1]
    head = _read_exact(store, obj, 0, HEAD_BYTES)
    if _read_by_name(name):
        return _whole(obj, head, whole_file_max, "read by its name")
    tar = is_tar(head)  # sniff takes a tar first, whatever its head looks like
    # A file that is two formats: a zip found from its end (zipfile reads its central
    # directory wherever the end record says), or HDF5 after a user block (h5py reads it
    # anywhere). Whole, and the checks scan it as both.
    if (tar or not head.startswith(ZIP_MAGICS)) and _is_zip_from_end(store, obj, head):
        return _whole(obj, head, whole_file_max, "with a zip at its end")
    if (tar or not head.startswith(HDF5_SIGNATURE)) and _is_hdf5_too(store, obj, head):
        return _whole(obj, head, whole_file_max, "that libhdf5 opens after a user block")
    if not tar and head.startswith(b"GGUF"):
        reader = RangeFile(store, obj, limit=whole_file_max)
        reader._put(0, head)
        reader._last_end = len(head)  # reads run on from the head: read ahead from the start
        try:
            with contextlib.suppress(HeaderError):  # the check reports it, from the same bytes
                read_gguf_stream(reader, obj.size, Path(obj.rel))  # type: ignore[arg-type]
        except _PlanTooBig:
            return _refused(head, f"GGUF metadata of over {_human(whole_file_max)}")
        return _and_as_a_pickle(
            store, obj, whole_file_max, "GGUF header and metadata", reader.ranges
        )
    if not tar and len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= min(SAFETENSORS_MAX_HEADER, obj.size - 8) and head[8:9] == b"{":
            if 8 + n > len(head):
                head += _read_exact(store, obj, len(head), 8 + n)
            return _and_as_a_pickle(store, obj, whole_file_max, "safetensors header", [(0, head)])
    if not tar and head.startswith(ZIP_MAGICS):
        return _plan_zip(store, obj, head, whole_file_max)
    if not tar and head.startswith(b"\x93NUMPY"):
        from services.validator.checks.unsafe_code import npy_holds_objects

        # The scan reads a .npy's header; its data only when the dtype holds objects (a pickle).
        if npy_holds_objects(head):
            return _whole(obj, head, whole_file_max, "of numpy objects")
        return _and_as_a_pickle(store, obj, whole_file_max, "numpy header", [(0, head)])
    kind = _kind_of(store, head, obj, name)
    if kind is Kind.TF_VARIABLES_DATA:
        return _and_as_a_pickle(store, obj, whole_file_max, "first 64 KiB (its kind)", [(0, head)])
    if kind in (Kind.PICKLE, Kind.UNKNOWN):
        return _plan_pickle_scan(store, obj, head, whole_file_max, kind)
    if kind is Kind.ONNX:
        reader = RangeFile(store, obj, limit=whole_file_max)
        reader._put(0, head)
        try:
            with contextlib.suppress(HeaderError):  # the check reports it, from the same bytes
                read_onnx_from(Path(obj.rel), _RangeView(reader))
        except _PlanTooBig:
            return _refused(head, f"ONNX framing of over {_human(whole_file_max)}")
        return _and_as_a_pickle(
            store, obj, whole_file_max, "ONNX framing (tensor payloads skipped)", reader.ranges
        )
    if obj.size > whole_file_max:
        return (
            f"not read: {_human(obj.size)} of {kind.value} content would need a full download "
            f"(over the {_human(whole_file_max)} limit for remote whole-file reads); validate a "
            "local copy",
            [(0, head)],
            False,
        )
    return "whole", [(0, head)], True  # the rest is streamed to disk by mirror()


def _and_as_a_pickle(
    store: Store,
    obj: RemoteObject,
    whole_file_max: int,
    what: str,
    ranges: list[tuple[int, bytes]],
) -> tuple[str, list[tuple[int, bytes]], bool]:
    """The plan for a format the unsafe-code check also reads as a pickle from byte 0
    (READ_AS_A_PICKLE_TOO in checks/unsafe_code.py): its ranges, and what that scan reads of
    the file beyond them, found by running it over a range reader that holds them. Its own
    framing breaks the stream within a few opcodes, so this is mostly nothing."""
    from services.validator.checks.unsafe_code import read_as_the_pickle_scan_does

    head = ranges[0][1]
    reads = min(MAX_PLAN_READS, max(16, obj.size // BYTES_PER_READ))
    reader = RangeFile(store, obj, limit=whole_file_max, max_reads=reads)
    for start, data in ranges:
        reader._put(start, data)
    try:
        read_as_the_pickle_scan_does(_RangeView(reader))
    except _PlanTooBig:
        return _whole(obj, head, whole_file_max, f"that reads on as a pickle after its {what}")
    if len(reader.ranges) == len(ranges):
        return what, ranges, False
    return f"{what}, and what a pickle scan of it reads", reader.ranges, False


def _plan_pickle_scan(
    store: Store, obj: RemoteObject, head: bytes, whole_file_max: int, kind: Kind
) -> tuple[str, list[tuple[int, bytes]], bool]:
    """What the unsafe-code check reads of a pickle, or of a file of no known format (ONNX
    external data, a pickle under another name): its head and the bytes the pickle model
    examines, never the array payloads it passes over by their length. Found by running the
    same scan over a range reader: the check, run later over the fetched bytes, reads exactly
    those, in the same order, and decides the same. Raw tensor bytes break within a few
    opcodes: a 5 GB file costs its head. Each payload passed over costs one ranged read; when
    they would cost more than streaming the file (BYTES_PER_READ), it is read whole."""
    from services.validator.checks.unsafe_code import read_as_the_pickle_scan_does

    reads = min(MAX_PLAN_READS, max(16, obj.size // BYTES_PER_READ))
    reader = RangeFile(store, obj, limit=whole_file_max, max_reads=reads)
    reader._put(0, head)
    reader._last_end = len(head)  # a pickle runs on from its head: read ahead from there
    try:
        read_as_the_pickle_scan_does(_RangeView(reader))
    except _PlanTooBig as big:
        if big.reads and obj.size <= whole_file_max:
            return "whole", [(0, head)], True  # streamed to disk by mirror()
        return _refused(head, f"its {kind.value} scan reads over {_human(whole_file_max)}")
    return f"{kind.value} scan: what the pickle model reads", reader.ranges, False


# zipfile looks for the end record in a file's last 64 KiB and 22 bytes (an end record and the
# longest comment, plus one byte); a zip64 locator sits 20 bytes before the record.
ZIP_END_SEARCH = 22 + (1 << 16) + 20

# Files a check reads whole by their name, whatever their first bytes sniff as: chat templates
# and configs (a .jinja whose first bytes read as a safetensors header is still a template to
# transformers), Python source, checksum manifests and a SavedModel's keras_metadata.pb.
_BY_NAME_SUFFIXES = (".jinja", ".json", ".py", ".pyc")
_BY_NAME = frozenset({"keras_metadata.pb", *(n.lower() for n in MANIFEST_NAMES)})


def _read_by_name(name: str) -> bool:
    lower = name.lower()
    return lower in _BY_NAME or lower.endswith(_BY_NAME_SUFFIXES)


def _is_zip_from_end(store: Store, obj: RemoteObject, head: bytes) -> bool:
    """Whether zipfile.is_zipfile says yes of the file: it reads only the last ZIP_END_SEARCH
    bytes, so a copy holding them (and the head) answers as the file does."""
    import tempfile

    start = max(len(head), obj.size - ZIP_END_SEARCH)
    ranges = [(0, head)]
    if start < obj.size:
        ranges.append((start, _read_exact(store, obj, start, obj.size)))
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe"
        _write(probe, obj.size, ranges, None)
        return zipfile.is_zipfile(probe)


def _hdf5_probes(store: Store, obj: RemoteObject, head: bytes) -> list[tuple[int, bytes]]:
    """The 8 bytes at each offset past the head where libhdf5 looks for a superblock after a
    user block (128 KiB, 256 KiB ...), fetched in parallel."""
    probes = [at for at in hdf5_user_block_offsets(obj.size) if at >= len(head)]
    if not probes:
        return []
    width = len(HDF5_SIGNATURE)
    with ThreadPoolExecutor(min(len(probes), 8), thread_name_prefix="remote-probe") as pool:
        found = pool.map(lambda at: _read_exact(store, obj, at, at + width), probes)
        return list(zip(probes, found, strict=True))


def _is_hdf5_too(store: Store, obj: RemoteObject, head: bytes) -> bool:
    """Whether libhdf5 would open this file after a user block (it is HDF5 too)."""
    width = len(HDF5_SIGNATURE)
    inside = (head[at : at + width] for at in hdf5_user_block_offsets(min(obj.size, len(head))))
    return HDF5_SIGNATURE in inside or any(
        data == HDF5_SIGNATURE for _, data in _hdf5_probes(store, obj, head)
    )


def _kind_of(store: Store, head: bytes, obj: RemoteObject, name: str) -> Kind:
    """What sniff says of a file from its head (and, for a variables index, its footer)."""
    import tempfile

    ranges = [(0, head)]
    if name.lower().endswith("variables.index") and obj.size - 8 >= len(head):
        ranges.append((obj.size - 8, _read_exact(store, obj, obj.size - 8, obj.size)))
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / name
        _write(probe, obj.size, ranges, None)
        return sniff(probe, obj.size, name)[0]


def _plan_zip(
    store: Store, obj: RemoteObject, head: bytes, whole_file_max: int
) -> tuple[str, list[tuple[int, bytes]], bool]:
    """End record, central directory, and each member's local header and data, except the
    tensor records of a PyTorch archive (data/<n>), which no check opens: the unsafe-code
    check's own rule, so the two cannot drift apart."""
    from services.validator.checks.unsafe_code import (
        _PICKLE_SUFFIXES,
        MAX_ZIP_ENTRIES,
        skips_tensor_record,
    )

    reader = RangeFile(store, obj)
    reader._put(0, head)
    skipped = 0
    torch_zip = False
    try:
        with zipfile.ZipFile(reader) as zf:
            infos = zf.infolist()
            # as sniff decides the archive's kind: from its first MAX_FILES names
            torch_zip = any(n.endswith("data.pkl") for n in zf.namelist()[:MAX_FILES])
            for info in infos if len(infos) <= MAX_ZIP_ENTRIES else []:
                name = info.orig_filename
                lower = name.lower()
                graph = lower == "saved_model.pb" or lower.endswith("/saved_model.pb")
                if (
                    torch_zip
                    and not lower.endswith(_PICKLE_SUFFIXES)
                    and not graph
                    and skips_tensor_record(obj.rel, name)
                ):
                    skipped += 1
                    continue
                reader.seek(info.header_offset)
                local = reader.read(30)
                if len(local) < 30 or local[:4] != b"PK\x03\x04":
                    continue  # the check says the archive is damaged
                name_len, extra_len = struct.unpack_from("<HH", local, 26)
                data_start = info.header_offset + 30 + name_len + extra_len
                # the local name and extra too (zipfile compares the name), and as much as
                # either size says (a stored member is mapped by its file_size)
                end = min(data_start + max(info.compress_size, info.file_size), obj.size)
                if end > info.header_offset + 30:
                    reader.seek(info.header_offset + 30)
                    reader.read(end - info.header_offset - 30)
                if reader.fetched > whole_file_max:
                    return (
                        f"not read: zip members of over {_human(whole_file_max)} would need "
                        "downloading (the limit for remote whole-file reads); validate a local "
                        "copy",
                        [(0, head)],
                        False,
                    )
    except (zipfile.BadZipFile, ValueError, OSError, EOFError):
        pass  # the checks report a zip that does not open, from the same bytes
    plan = "zip directory and members" + (
        f" ({skipped} tensor records skipped)" if torch_zip else ""
    )
    return plan, reader.ranges, False


def _read_exact(store: Store, obj: RemoteObject, start: int, end: int) -> bytes:
    end = min(end, obj.size)
    data = store.read(obj.rel, start, end) if end > start else b""
    if len(data) != end - start:
        raise StoreError(
            f"{store.display}: {obj.rel}: {len(data)} bytes at offset {start} where the listing "
            f"promised {end - start}: the object changed while validating, try again",
            kind="changed",
        )
    return data


def _write(path: Path, size: int, ranges: list[tuple[int, bytes]], fill: bytes | None) -> None:
    """A file of `size` bytes holding `ranges`; holes elsewhere (or `fill`, for tests)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        if fill is not None:
            pattern = (fill * (BLOCK // len(fill) + 1))[:BLOCK]
            for at in range(0, size, BLOCK):
                fh.write(pattern[: min(BLOCK, size - at)])
        else:
            fh.truncate(size)
        for start, data in ranges:
            fh.seek(start)
            fh.write(data)
