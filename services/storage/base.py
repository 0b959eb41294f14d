"""What every model store offers the validator and the benchmarker: a listing with sizes and
provider checksums, and range reads that are counted.

    store = open_store("s3://bucket/models/chat-7b/")       # services/storage/locations.py
    for obj in store.list(): obj.rel, obj.size, obj.sha256   # one listing call (or a few pages)
    head = store.read(obj.rel, 0, 512)                      # one ranged GET, counted in .reads

Errors a user can act on (no bucket, access denied, expired credentials, throttled past the
retries, gated or private Hub repo, unknown revision) are `StoreError`s whose message is one line
that names the location and what to do; credentials never appear in them.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Protocol


class StoreError(Exception):
    """A location that cannot be listed or read, said in one line a user can act on."""

    def __init__(self, message: str, *, kind: str = "error") -> None:
        super().__init__(message)
        self.kind = kind
        """not_found | access_denied | expired_credentials | throttled | gated | bad_revision |
        unsupported | error: for tests and metrics; the message is for people."""


@dataclass(frozen=True)
class RemoteObject:
    """One file of a remote model, as the provider's listing describes it."""

    rel: str
    """Path inside the model location, '/'-separated (e.g. `model-00001-of-00002.safetensors`)."""
    size: int
    version: str | None = None
    """What identifies this content at the provider: S3 version id or ETag, the Hub's blob id
    (git oid) at the resolved revision, an HTTP ETag. Keys the digest cache; None: uncacheable."""
    sha256: str | None = None
    """The file's sha256 (hex) as the provider states it: the Hub's LFS sha256, S3's full-object
    ChecksumSHA256. None when the provider has none for this file."""
    checksum_note: str | None = None
    """Why a provider checksum is not a file sha256 when it is not (e.g. an S3 composite
    multipart checksum), for the report."""


@dataclass
class ReadCounter:
    """Bytes and requests a store has read; thread-safe (reads run in a pool)."""

    bytes_read: int = 0
    requests: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, n: int) -> None:
        with self._lock:
            self.bytes_read += n
            self.requests += 1


def retry_after_s(value: str | None) -> float | None:
    """Seconds an HTTP Retry-After asks to wait (seconds or an HTTP date); None if none."""
    from email.utils import parsedate_to_datetime

    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class Store(Protocol):
    """A model location that can be listed and range-read."""

    display: str
    """The location as a user wrote it, without credentials: for reports and logs."""
    reads: ReadCounter

    @property
    def one_file(self) -> str | None:
        """The file's rel when the location names one file, not a folder (an S3 object key),
        once `list` has run; None for a folder."""
        ...

    def list(self) -> list[RemoteObject]:
        """Every file under the location. Raises StoreError."""
        ...

    def read(self, rel: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of one file (fewer only at its end). Raises StoreError."""
        ...
