"""moto's standalone S3 server, with ranged GETs that read only their range (for benchmarks).

moto answers a ranged GET by copying the whole object out of its buffer and slicing the copy:
a 64 KiB read of a 4.5 GB shard costs a 4.5 GB copy, which real S3 (and MinIO, R2, Ceph) do
not. This launcher makes the value of objects over 64 MiB a view that reads just the bytes
asked for, and changes nothing else: same API, same checksums, same errors. The benchmarks that
measure range reads (bench/fetch_bench.py) run it; the tests run plain moto_server.

    python bench/moto_ranged.py -H 127.0.0.1 -p 5000     # the arguments of moto_server
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

LAZY_ABOVE = 64 * 1024 * 1024
CHUNK = 8 * 1024 * 1024


class _Window:
    """An object's bytes as len() and slicing over its spooled file, read on demand."""

    def __init__(self, key: Any) -> None:
        self.key = key

    def __len__(self) -> int:
        return int(self.key.contentsize)

    def __getitem__(self, span: slice) -> bytes:
        start, stop, _ = span.indices(len(self))
        with self.key.lock:
            self.key._value_buffer.seek(start)
            data: bytes = self.key._value_buffer.read(max(0, stop - start))
        return data

    def __iter__(self) -> Iterator[bytes]:  # a whole-object GET streams in chunks
        for at in range(0, len(self), CHUNK):
            yield self[at : at + CHUNK]


def patch() -> None:
    from moto.s3.models import FakeKey

    whole: Any = FakeKey.__dict__["value"]  # the property itself, not a value

    def value(self: Any) -> Any:
        if self.contentsize > LAZY_ABOVE:
            return _Window(self)
        return whole.fget(self)

    setattr(FakeKey, "value", property(value, whole.fset))  # noqa: B010  (a property, typed as a method)


if __name__ == "__main__":
    patch()
    from moto.server import main

    main(sys.argv[1:])
