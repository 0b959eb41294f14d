"""A local directory as a `Store`: the same listing and counted range reads as a remote one.

The validator reads local models through their own paths (mmap); this store is for code that
takes any `Store` (the model cache, tests of it, and a local mirror treated like a remote)."""

from __future__ import annotations

import os
from pathlib import Path

from services.storage.base import ReadCounter, RemoteObject, StoreError


class DirStore:
    """Files under `root`, symlinks not followed (a link is not listed)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.display = str(self.root)
        self.reads = ReadCounter()
        self.one_file: str | None = None  # always a folder

    def list(self) -> list[RemoteObject]:
        if not self.root.is_dir():
            raise StoreError(f"{self.display}: no such directory", kind="not_found")
        found: list[RemoteObject] = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if path.is_symlink():
                    continue
                st = path.stat()
                rel = path.relative_to(self.root).as_posix()
                # size, mtime and inode: a rewritten file is a new version (the cache's key)
                version = f"{st.st_size}-{st.st_mtime_ns}-{st.st_ino}"
                found.append(RemoteObject(rel=rel, size=st.st_size, version=version))
        return found

    def read(self, rel: str, start: int, end: int) -> bytes:
        path = self._path(rel)
        try:
            with path.open("rb") as f:
                f.seek(start)
                data = f.read(max(0, end - start))
        except FileNotFoundError as exc:
            raise StoreError(f"{self.display}: no file {rel!r}", kind="not_found") from exc
        except PermissionError as exc:
            raise StoreError(
                f"{self.display}: {rel!r} is not readable", kind="access_denied"
            ) from exc
        self.reads.add(len(data))
        return data

    def _path(self, rel: str) -> Path:
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise StoreError(f"{self.display}: {rel!r} is outside the location", kind="error")
        return path
