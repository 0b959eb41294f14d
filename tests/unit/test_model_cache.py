"""The model cache over real local stores: layout, dedupe, verification, resume, eviction and one
download per version across processes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from services.storage.base import ReadCounter, RemoteObject, Store, StoreError
from services.storage.cache import (
    DEFAULT_MAX_BYTES,
    CacheError,
    ModelCache,
    format_bytes,
    object_key,
    parse_bytes,
)
from services.storage.local import DirStore

CHUNK = 64 * 1024


class FailingStore:
    """A store whose reads fail once `fail_after` bytes have been read: a network cut mid-file."""

    def __init__(self, inner: Store, fail_after: int) -> None:
        self.inner = inner
        self.display = inner.display
        self.one_file = inner.one_file
        self.reads = ReadCounter()
        self.fail_after = fail_after

    def list(self) -> list[RemoteObject]:
        return self.inner.list()

    def read(self, rel: str, start: int, end: int) -> bytes:
        if self.reads.bytes_read >= self.fail_after:
            raise StoreError(f"{self.display}: connection reset by peer (after the retries)")
        data = self.inner.read(rel, start, end)
        self.reads.add(len(data))
        return data


class SlowStore:
    """A store that takes `delay` seconds per read, so a download is still running when another
    process or a kill arrives."""

    def __init__(self, inner: Store, delay: float) -> None:
        self.inner = inner
        self.display = inner.display
        self.one_file = inner.one_file
        self.reads = inner.reads
        self.delay = delay

    def list(self) -> list[RemoteObject]:
        return self.inner.list()

    def read(self, rel: str, start: int, end: int) -> bytes:
        time.sleep(self.delay)
        return self.inner.read(rel, start, end)


class RelistedStore:
    """A store whose listing is rewritten (a provider's sha256, a hostile name, no versions)."""

    def __init__(self, inner: Store, **changes: dict[str, Any]) -> None:
        self.inner = inner
        self.display = inner.display
        self.one_file = inner.one_file
        self.reads = inner.reads
        self.changes = changes  # rel -> fields to replace

    def list(self) -> list[RemoteObject]:
        out = []
        for obj in self.inner.list():
            fields = self.changes.get(obj.rel) or self.changes.get("*") or {}
            out.append(dataclasses.replace(obj, **fields))
        return out

    def read(self, rel: str, start: int, end: int) -> bytes:
        for original, fields in self.changes.items():
            if fields.get("rel") == rel:
                rel = original
        return self.inner.read(rel, start, end)


def write_model(directory: Path, *, seed: int, weights: int = 600_000) -> Path:
    """A Hugging Face-shaped directory: config, tokenizer, two weight shards in a subfolder."""
    rng = random.Random(seed)
    (directory / "weights").mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "gpt2", "seed": seed}))
    (directory / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))  # same in all
    (directory / "weights" / "model-00001-of-00002.safetensors").write_bytes(rng.randbytes(weights))
    (directory / "weights" / "model-00002-of-00002.safetensors").write_bytes(
        rng.randbytes(weights // 3)
    )
    return directory


def tree(directory: Path) -> dict[str, bytes]:
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def size_of(directory: Path) -> int:
    return sum(len(b) for b in tree(directory).values())


def cache_at(root: Path, max_bytes: int = 10**9, **options: Any) -> ModelCache:
    return ModelCache(root, max_bytes, chunk_bytes=CHUNK, workers=4, **options)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        self.now += 10
        return self.now


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_model(tmp_path / "remote" / "m", seed=1)


# --- layout and content addressing ----------------------------------------------------------


def test_a_fetch_is_a_directory_laid_out_like_the_location_of_links_to_verified_blobs(
    tmp_path: Path, model: Path
) -> None:
    cache = cache_at(tmp_path / "cache")
    store = DirStore(model)
    seen: list[tuple[int, int]] = []
    path = cache.fetch(store, progress=lambda done, total: seen.append((done, total)))

    assert path.parent == tmp_path / "cache" / "snapshots"
    assert tree(path) == tree(model)
    for file in path.rglob("*"):
        if file.is_file():
            sha = hashlib.sha256(file.read_bytes()).hexdigest()
            blob = tmp_path / "cache" / "blobs" / "sha256" / sha
            assert os.path.samefile(file, blob)
            assert not os.access(blob, os.W_OK) or os.geteuid() == 0  # read-only blobs
    assert store.reads.bytes_read == size_of(model)
    assert seen[-1] == (size_of(model), size_of(model))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert list((tmp_path / "cache" / "partial").iterdir()) == []
    assert cache.usage() == size_of(model)


def test_the_same_version_again_is_not_downloaded_again(tmp_path: Path, model: Path) -> None:
    cache = cache_at(tmp_path / "cache")
    first = cache.fetch(DirStore(model))
    again = DirStore(model)
    assert cache.fetch(again) == first
    assert again.reads.bytes_read == 0


def test_a_new_version_is_a_new_snapshot_sharing_the_files_that_did_not_change(
    tmp_path: Path, model: Path
) -> None:
    cache = cache_at(tmp_path / "cache")
    v1 = cache.fetch(DirStore(model))
    before = tree(v1)
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2", "seed": 2}))
    store = DirStore(model)
    v2 = cache.fetch(store)

    assert v2 != v1
    assert tree(v1) == before  # the old version is intact
    assert tree(v2) == tree(model)
    assert store.reads.bytes_read == (model / "config.json").stat().st_size
    shard = "weights/model-00001-of-00002.safetensors"
    assert os.path.samefile(v1 / shard, v2 / shard)
    blobs = list((tmp_path / "cache" / "blobs" / "sha256").iterdir())
    assert len(blobs) == len(tree(model)) + 1  # two configs, everything else once


def test_identical_files_in_different_locations_are_stored_once(tmp_path: Path) -> None:
    a = write_model(tmp_path / "a", seed=5)
    b = write_model(tmp_path / "b", seed=5)
    cache = cache_at(tmp_path / "cache")
    pa, pb = cache.fetch(DirStore(a)), cache.fetch(DirStore(b))
    assert pa != pb
    for rel in tree(a):
        assert os.path.samefile(pa / rel, pb / rel)
    assert cache.usage() == size_of(a)


def test_objects_without_version_or_sha256_are_downloaded_each_time_but_stored_once(
    tmp_path: Path, model: Path
) -> None:
    cache = cache_at(tmp_path / "cache")
    first = RelistedStore(DirStore(model), **{"*": {"version": None, "sha256": None}})
    second = RelistedStore(DirStore(model), **{"*": {"version": None, "sha256": None}})
    assert tree(cache.fetch(first)) == tree(cache.fetch(second)) == tree(model)
    assert first.reads.bytes_read == second.reads.bytes_read == size_of(model)
    assert cache.usage() == size_of(model)


# --- refusals ---------------------------------------------------------------------------------


def test_a_file_whose_sha256_is_not_the_providers_is_refused_and_not_kept(
    tmp_path: Path, model: Path
) -> None:
    shard = "weights/model-00002-of-00002.safetensors"
    wrong = hashlib.sha256(b"something else").hexdigest()
    cache = cache_at(tmp_path / "cache")
    store = RelistedStore(DirStore(model), **{shard: {"sha256": wrong}})
    with pytest.raises(CacheError) as caught:
        cache.fetch(store)

    assert caught.value.kind == "checksum_mismatch"
    message = str(caught.value)
    assert "\n" not in message and shard in message and wrong in message
    actual = hashlib.sha256((model / shard).read_bytes()).hexdigest()
    assert not (tmp_path / "cache" / "blobs" / "sha256" / actual).exists()
    assert list((tmp_path / "cache" / "snapshots").iterdir()) == []
    # The refused object's download is gone. A sibling that was cut short when the fetch
    # stopped keeps its .part (by design: resumable), and that is a prefix of its own bytes.
    listed = {obj.rel: obj for obj in store.list()}
    refused = object_key(store.display, listed[shard])
    assert not (tmp_path / "cache" / "partial" / f"{refused}.part").exists()
    keys = {object_key(store.display, obj): rel for rel, obj in listed.items()}
    for part in (tmp_path / "cache" / "partial").iterdir():
        rel = keys[part.name.removesuffix(".part")]
        assert (model / rel).read_bytes().startswith(part.read_bytes())


def test_a_provider_sha256_that_matches_is_accepted_and_dedupes_without_a_read(
    tmp_path: Path, model: Path
) -> None:
    shas = {rel: hashlib.sha256(data).hexdigest() for rel, data in tree(model).items()}
    cache = cache_at(tmp_path / "cache")
    stated = RelistedStore(DirStore(model), **{r: {"sha256": s} for r, s in shas.items()})
    cache.fetch(stated)
    # Another location stating the same sha256s: every blob is known before any read.
    copy = write_model(tmp_path / "copy", seed=1)
    again = RelistedStore(DirStore(copy), **{r: {"sha256": s} for r, s in shas.items()})
    assert tree(cache.fetch(again)) == tree(model)
    assert again.reads.bytes_read == 0


def test_a_model_larger_than_the_cache_is_refused_before_any_download(
    tmp_path: Path, model: Path
) -> None:
    cache = cache_at(tmp_path / "cache", max_bytes=size_of(model) - 1)
    store = DirStore(model)
    with pytest.raises(CacheError, match="more than the model cache") as caught:
        cache.fetch(store)
    assert caught.value.kind == "too_large"
    assert store.reads.requests == 0


def test_a_listing_cannot_place_files_outside_the_snapshot(tmp_path: Path, model: Path) -> None:
    cache = cache_at(tmp_path / "cache")
    store = RelistedStore(DirStore(model), **{"config.json": {"rel": "../../escaped.json"}})
    with pytest.raises(CacheError, match=r"escaped\.json") as caught:
        cache.fetch(store)
    assert caught.value.kind == "unsafe_path"
    assert store.reads.requests == 0
    assert not list(tmp_path.rglob("escaped.json"))


# --- resume -----------------------------------------------------------------------------------


def test_a_download_cut_short_leaves_no_snapshot_and_resumes_from_its_partial_file(
    tmp_path: Path, model: Path
) -> None:
    cache = cache_at(tmp_path / "cache")
    failing = FailingStore(DirStore(model), fail_after=300_000)
    with pytest.raises(StoreError) as caught:
        cache.fetch(failing)
    assert str(caught.value) == f"{failing.display}: connection reset by peer (after the retries)"
    assert type(caught.value) is StoreError  # passed through as the store said it
    assert list((tmp_path / "cache" / "snapshots").iterdir()) == []
    kept = sum(p.stat().st_size for p in (tmp_path / "cache" / "partial").iterdir())
    assert kept > 0
    complete = cache.usage() - kept  # the small files that finished before the cut

    store = DirStore(model)
    path = cache.fetch(store)
    assert tree(path) == tree(model)
    assert store.reads.bytes_read == size_of(model) - kept - complete
    assert list((tmp_path / "cache" / "partial").iterdir()) == []


def _fetch_slowly(root: str, model: str, delay: float) -> None:
    cache = ModelCache(Path(root), 10**9, chunk_bytes=CHUNK, workers=1)
    cache.fetch(SlowStore(DirStore(Path(model)), delay))


def test_a_killed_download_resumes_in_the_next_process(tmp_path: Path, model: Path) -> None:
    root = tmp_path / "cache"
    shard = model / "weights" / "model-00001-of-00002.safetensors"
    context = multiprocessing.get_context("spawn")
    child = context.Process(target=_fetch_slowly, args=(str(root), str(model), 0.05))
    child.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            parts = list((root / "partial").glob("*.part")) if (root / "partial").exists() else []
            if sum(p.stat().st_size for p in parts) >= 3 * CHUNK:
                break
            time.sleep(0.02)
        else:
            pytest.fail("the child never started downloading")
    finally:
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join()
    assert list((root / "snapshots").iterdir()) == []
    kept = sum(p.stat().st_size for p in (root / "partial").glob("*.part"))
    assert 0 < kept < shard.stat().st_size

    store = DirStore(model)
    path = cache_at(root).fetch(store)
    assert tree(path) == tree(model)
    assert store.reads.bytes_read <= size_of(model) - kept


# --- eviction ---------------------------------------------------------------------------------


def test_eviction_removes_the_least_recently_used_snapshot_first(tmp_path: Path) -> None:
    models = [write_model(tmp_path / name, seed=i) for i, name in enumerate("abc", start=10)]
    tokenizer = len((models[0] / "tokenizer.json").read_bytes())  # one blob shared by all
    per_model = size_of(models[0]) - tokenizer
    # Room for two whole models: before a download the cache frees what the new one may need,
    # and a file it cannot know it has (no provider sha256) counts as new.
    cache = cache_at(tmp_path / "cache", max_bytes=2 * size_of(models[0]), clock=Clock())
    a = cache.fetch(DirStore(models[0]))
    b = cache.fetch(DirStore(models[1]))
    assert cache.fetch(DirStore(models[0])) == a  # a is now the more recently used
    c = cache.fetch(DirStore(models[2]))

    assert a.is_dir() and c.is_dir() and not b.exists()
    assert cache.usage() <= cache.max_bytes
    for rel in tree(models[1]):
        data = (models[1] / rel).read_bytes()
        blob = tmp_path / "cache" / "blobs" / "sha256" / hashlib.sha256(data).hexdigest()
        assert blob.exists() == (rel == "tokenizer.json")  # still used by a and c
    # Evicted means gone: fetching b again downloads it.
    store = DirStore(models[1])
    assert tree(cache.fetch(store)) == tree(models[1])
    assert store.reads.bytes_read == per_model


def test_a_snapshot_in_use_is_never_evicted(tmp_path: Path) -> None:
    models = [write_model(tmp_path / name, seed=i) for i, name in enumerate("abc", start=20)]
    one = size_of(models[0])
    cache = cache_at(tmp_path / "cache", max_bytes=one + one // 2, clock=Clock())
    with cache.use(DirStore(models[0])) as a:
        # Over the bound with a and b, but a is in use and b is the fetch's own: both stay.
        b = cache.fetch(DirStore(models[1]))
        assert b.is_dir()
        # Room for c: b goes, not a, though a was used less recently.
        c = cache.fetch(DirStore(models[2]))
        assert tree(a) == tree(models[0])
        assert not b.exists() and c.is_dir()
    assert cache.evict() == [a.name]  # released: now the least recently used goes
    assert not a.exists() and c.is_dir()
    assert cache.usage() <= cache.max_bytes


def test_an_interrupted_builds_leftovers_are_cleared_by_eviction(
    tmp_path: Path, model: Path
) -> None:
    cache = cache_at(tmp_path / "cache", max_bytes=size_of(model))
    with pytest.raises(StoreError):
        cache.fetch(FailingStore(DirStore(model), fail_after=300_000))
    stale = tmp_path / "cache" / "tmp" / "crashed-build"
    stale.mkdir()
    cache.evict(reserve=size_of(model))  # room for a whole model: the .part files go too
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []
    assert cache.usage() == 0


# --- one download per version across processes ------------------------------------------------


def _fetch_counting(root: str, model: str, start: Any, results: Any) -> None:
    cache = ModelCache(Path(root), 10**9, chunk_bytes=CHUNK, workers=2)
    store = DirStore(Path(model))
    start.wait(timeout=60)
    path = cache.fetch(SlowStore(store, 0.05))
    results.put((str(path), store.reads.bytes_read))


def test_two_processes_fetching_one_version_download_it_once(tmp_path: Path, model: Path) -> None:
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    results = context.Queue()
    args = (str(tmp_path / "cache"), str(model), start, results)
    children = [context.Process(target=_fetch_counting, args=args) for _ in range(2)]
    for child in children:
        child.start()
    got = [results.get(timeout=120) for _ in children]
    for child in children:
        child.join(timeout=30)
        assert child.exitcode == 0
    paths = {path for path, _ in got}
    assert len(paths) == 1
    assert sorted(n for _, n in got) == [0, size_of(model)]
    assert tree(Path(paths.pop())) == tree(model)


# --- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1073741824", 2**30),
        ("100GiB", 100 * 2**30),
        ("500 MB", 500 * 10**6),
        ("1.5gib", 3 * 2**29),
        ("1e9", 10**9),
    ],
)
def test_sizes_are_read_with_or_without_a_unit(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "10 parsecs", "-5GB"])
def test_a_size_that_is_not_one_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes(text)


def test_the_cache_is_configured_from_the_environment(tmp_path: Path) -> None:
    configured = ModelCache.from_environ(
        {"PREFLIGHT_MODEL_CACHE_DIR": str(tmp_path / "c"), "PREFLIGHT_MODEL_CACHE_MAX_BYTES": "2GB"}
    )
    assert (configured.root, configured.max_bytes) == (tmp_path / "c", 2 * 10**9)
    default = ModelCache.from_environ({})
    assert default.root == Path.home() / ".cache" / "preflight" / "fetched-models"
    assert default.max_bytes == DEFAULT_MAX_BYTES
    assert not (tmp_path / "c").exists()  # nothing on disk until a fetch
    assert format_bytes(DEFAULT_MAX_BYTES) == "100.0 GiB"
