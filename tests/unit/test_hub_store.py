"""hf:// locations through the real huggingface_hub against a local Hub (tests/hub_api.py):
listing, pinning to a commit, ranged and redirected reads, retries, and one-line errors that
never name the token."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

from services.storage.base import StoreError
from services.storage.cache import ModelCache
from services.storage.hub import HubStore
from services.storage.locations import open_store
from tests.hub_api import HubApi

REPO = "acme/chat-tiny"
LOCATION = f"hf://{REPO}"
WRONG_TOKEN = "hf_notARealTokenButSecretAnyway0000"


@pytest.fixture
def hub() -> Iterator[HubApi]:
    with HubApi() as server:
        yield server


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A small model: two plain git files, two LFS ones (one by suffix, one by size), nested."""
    root = tmp_path / "model"
    (root / "tokenizer").mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "gpt2", "n_layer": 2}\n')
    (root / "tokenizer" / "special_tokens_map.json").write_text('{"eos_token": "</s>"}\n')
    (root / "tokenizer" / "vocab.json").write_bytes(b'{"a": 1}' * 400)  # 3.2 KB: LFS by size
    (root / "model.safetensors").write_bytes(os.urandom(300_000))
    return root


def _store(
    hub: HubApi,
    location: str = LOCATION,
    *,
    token: str | Literal[False] | None = False,
    **options: Any,
) -> HubStore:
    options.setdefault("backoff_s", 0.001)
    return HubStore(location, endpoint=hub.endpoint, token=token, **options)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _refused(call: Callable[[], object], kind: str, *secrets: str) -> StoreError:
    """The StoreError `call` raises: of `kind`, one line, naming the location, no secret in it
    nor in anything chained to it."""
    with pytest.raises(StoreError) as caught:
        call()
    error = caught.value
    message = str(error)
    assert error.kind == kind, message
    assert "\n" not in message
    assert message.startswith("hf://"), message
    everything = "".join(traceback.format_exception(error))
    for secret in secrets:
        assert secret not in everything
    return error


def test_listing_has_sizes_blob_ids_and_lfs_sha256(hub: HubApi, model_dir: Path) -> None:
    commit = hub.add_repo(REPO, model_dir)
    store = _store(hub)

    objects = {o.rel: o for o in store.list()}

    files = _files(model_dir)
    assert set(objects) == set(files)
    assert store.commit == commit
    for rel, data in files.items():
        obj = objects[rel]
        assert obj.size == len(data)
        lfs = rel.endswith(".safetensors") or len(data) > 1024
        if lfs:
            assert obj.sha256 == hashlib.sha256(data).hexdigest()
            # git keeps the LFS pointer, so the blob id is the pointer's
            pointer = (
                "version https://git-lfs.github.com/spec/v1\n"
                f"oid sha256:{obj.sha256}\nsize {len(data)}\n"
            ).encode()
            blob = pointer
        else:
            assert obj.sha256 is None
            blob = data
        git_oid = hashlib.sha1(b"blob %d\0" % len(blob) + blob, usedforsecurity=False)
        assert obj.version == git_oid.hexdigest()
    # One model_info call, as huggingface_hub 2.4 makes it, and nothing read yet.
    [call] = hub.requests
    assert call.raw_path == f"/api/models/{REPO}/revision/main?blobs=true"
    assert store.reads.requests == 0
    store.list()
    assert len(hub.requests) == 1  # a store resolves once: it is one version


def test_a_revision_with_slashes_is_sent_quoted(hub: HubApi, model_dir: Path) -> None:
    commit = hub.add_repo(REPO, model_dir, revision="refs/pr/1")
    store = _store(hub, f"{LOCATION}@refs/pr/1")

    assert store.display == f"{LOCATION}@refs/pr/1"
    assert {o.rel for o in store.list()} == set(_files(model_dir))
    assert store.commit == commit
    assert hub.requests[0].raw_path.startswith(f"/api/models/{REPO}/revision/refs%2Fpr%2F1?")


def test_reads_stay_on_the_listed_commit_when_the_branch_moves(
    hub: HubApi, model_dir: Path, tmp_path: Path
) -> None:
    old = hub.add_repo(REPO, model_dir)
    store = _store(hub)
    store.list()
    (model_dir / "config.json").write_text('{"model_type": "llama"}\n')
    new = hub.add_repo(REPO, model_dir)
    assert new != old

    assert store.read("config.json", 0, 100) == b'{"model_type": "gpt2", "n_layer": 2}\n'
    [read] = hub.requests_to("resolve")
    assert read.path == f"/{REPO}/resolve/{old}/config.json"  # the commit, never "main"
    fresh = _store(hub)
    assert fresh.read("config.json", 0, 100) == b'{"model_type": "llama"}\n'  # lists first
    assert fresh.commit == new


def test_ranged_reads_count_bytes_and_requests(hub: HubApi, model_dir: Path) -> None:
    hub.add_repo(REPO, model_dir)
    store = _store(hub)
    store.list()
    config = (model_dir / "config.json").read_bytes()

    assert store.read("config.json", 2, 7) == config[2:7]
    assert store.read("config.json", 30, 10_000) == config[30:]  # fewer only at the end
    assert store.read("config.json", len(config), len(config) + 10) == b""  # 416
    assert store.read("config.json", 5, 5) == b""  # nothing asked: no request

    assert store.reads.bytes_read == 5 + len(config) - 30
    assert store.reads.requests == 3
    assert [r.headers["Range"] for r in hub.requests_to("resolve")] == [
        "bytes=2-6",
        "bytes=30-9999",
        f"bytes={len(config)}-{len(config) + 9}",
    ]
    assert [r.status for r in hub.requests_to("resolve")] == [206, 206, 416]


def test_an_lfs_redirect_keeps_the_range_and_not_the_token(hub: HubApi, model_dir: Path) -> None:
    hub.add_repo(REPO, model_dir, private=True)
    store = _store(hub, token=hub.token)
    weights = (model_dir / "model.safetensors").read_bytes()

    assert store.read("model.safetensors", 1000, 1100) == weights[1000:1100]

    [resolve] = hub.requests_to("resolve")
    [cdn] = hub.requests_to("cdn")
    assert resolve.status == 302 and cdn.status == 206
    assert resolve.headers["Range"] == cdn.headers["Range"] == "bytes=1000-1099"
    assert resolve.headers["Authorization"] == f"Bearer {hub.token}"
    assert "Authorization" not in cdn.headers  # another origin: the token stays with the Hub
    assert store.reads.bytes_read == hub.bytes_served == 100


def test_a_server_that_ignores_range_is_sliced_and_counted(hub: HubApi, model_dir: Path) -> None:
    hub.add_repo(REPO, model_dir)
    hub.honor_range = False
    store = _store(hub)
    config = (model_dir / "config.json").read_bytes()
    weights = (model_dir / "model.safetensors").read_bytes()

    assert store.read("config.json", 3, 9) == config[3:9]
    assert store.reads.bytes_read == len(config)  # all of it came, all of it counts
    assert store.read("model.safetensors", 10, 20) == weights[10:20]
    # It hangs up once the range is in: what came is at least the prefix, at most the file.
    assert 20 <= store.reads.bytes_read - len(config) <= len(weights)
    assert store.reads.requests == 2


def test_throttling_is_retried_until_it_passes(hub: HubApi, model_dir: Path) -> None:
    hub.add_repo(REPO, model_dir)
    hub.fail("api", status=503, times=1)
    hub.fail("resolve", status=429, times=2, retry_after="0")
    store = _store(hub)

    assert len(store.list()) == 4
    assert store.read("config.json", 0, 5) == b'{"mod'
    assert [r.status for r in hub.requests_to("api")] == [503, 200]
    assert [r.status for r in hub.requests_to("resolve")] == [429, 429, 206]
    assert store.reads.requests == 1 and store.reads.bytes_read == 5


def test_retry_after_is_honoured_up_to_the_cap(hub: HubApi, model_dir: Path) -> None:
    hub.add_repo(REPO, model_dir)
    store = _store(hub, max_sleep_s=0.3)
    store.list()

    hub.fail("resolve", status=429, times=1, retry_after="0.2")
    began = time.monotonic()
    store.read("config.json", 0, 5)
    assert time.monotonic() - began >= 0.2

    hub.fail("resolve", status=503, times=1, retry_after="3600")  # capped at max_sleep_s
    began = time.monotonic()
    store.read("config.json", 0, 5)
    assert 0.3 <= time.monotonic() - began < 5


def test_throttling_past_the_retries_is_one_line(hub: HubApi, model_dir: Path) -> None:
    hub.add_repo(REPO, model_dir)
    store = _store(hub, retries=3)
    store.list()
    hub.fail("cdn", status=503, times=10, retry_after="0")

    error = _refused(lambda: store.read("model.safetensors", 0, 8), "throttled")
    assert "503" in str(error) and "model.safetensors" in str(error)
    assert len(hub.requests_to("cdn")) == 4  # the first try and 3 retries
    assert store.reads.requests == 0

    hub.fail("api", status=429, times=10, retry_after="0")
    _refused(_store(hub, retries=2).list, "throttled")


def test_a_private_repo_without_a_token_looks_missing(hub: HubApi, model_dir: Path) -> None:
    hub.add_repo(REPO, model_dir, private=True)

    error = _refused(_store(hub).list, "not_found")
    assert "private" in str(error) and "HF_TOKEN" in str(error)
    assert hub.requests[0].status == 401
    assert "Authorization" not in hub.requests[0].headers

    # A valid token of an account that cannot see it: the same, and the token is not said.
    error = _refused(_store(hub, token=hub.outsider).list, "not_found", hub.outsider)
    assert hub.requests[-1].status == 404
    # The owner's token sees it.
    assert len(_store(hub, token=hub.token).list()) == 4


def test_a_wrong_token_is_refused_and_never_repeated(
    hub: HubApi, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hub.add_repo(REPO, model_dir)
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")  # its requests, logged at debug
    store = _store(hub, token=WRONG_TOKEN)

    error = _refused(store.list, "access_denied", WRONG_TOKEN)
    assert "HF_TOKEN" in str(error)
    assert hub.requests[0].headers["Authorization"] == f"Bearer {WRONG_TOKEN}"  # it was sent
    assert "Request " in caplog.text  # huggingface_hub did log the request
    assert WRONG_TOKEN not in caplog.text


def test_the_token_comes_from_hf_token_by_default(
    hub: HubApi, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.add_repo(REPO, model_dir, private=True)
    monkeypatch.setenv("HF_TOKEN", hub.token)

    store = _store(hub, token=None)  # huggingface_hub's own resolution

    assert len(store.list()) == 4
    assert store.read("config.json", 0, 1) == b"{"


def test_a_gated_repo_says_so_at_listing(hub: HubApi, model_dir: Path) -> None:
    hub.add_repo(REPO, model_dir, gated=True)

    error = _refused(_store(hub, token=hub.token).list, "gated", hub.token)
    assert "accept the conditions" in str(error) and f"{hub.endpoint}/{REPO}" in str(error)
    assert hub.requests_to("resolve")[0].status == 403
    error = _refused(_store(hub).list, "gated")
    assert "HF_TOKEN" in str(error)

    hub.accept(REPO, hub.token)
    store = _store(hub, token=hub.token)
    assert len(store.list()) == 4
    assert store.reads.requests == 0  # the access probe is a HEAD, not a counted read
    assert store.read("config.json", 0, 1) == b"{"


def test_the_gate_probe_stops_at_the_cdn_redirect(hub: HubApi, tmp_path: Path) -> None:
    weights_only = tmp_path / "weights"
    weights_only.mkdir()
    (weights_only / "model.safetensors").write_bytes(b"\0" * 64)
    hub.add_repo(REPO, weights_only, gated=True)
    hub.accept(REPO, hub.token)

    assert [o.rel for o in _store(hub, token=hub.token).list()] == ["model.safetensors"]
    [probe] = hub.requests_to("resolve")
    assert (probe.method, probe.status) == ("HEAD", 302)
    assert hub.requests_to("cdn") == []  # a HEAD of a URL signed for GET would fail there


def test_an_unknown_revision(hub: HubApi, model_dir: Path) -> None:
    hub.add_repo(REPO, model_dir)

    error = _refused(_store(hub, f"{LOCATION}@v9").list, "bad_revision")
    assert f"{LOCATION}@v9" in str(error) and "'v9'" in str(error)


def test_a_missing_repo_or_file(hub: HubApi, model_dir: Path) -> None:
    hub.add_repo(REPO, model_dir)

    _refused(_store(hub, "hf://acme/nothing-here").list, "not_found")
    _refused(_store(hub, "hf://acme/nothing-here", token=hub.token).list, "not_found", hub.token)
    error = _refused(lambda: _store(hub).read("missing.bin", 0, 10), "not_found")
    assert "missing.bin" in str(error)


def test_an_unreachable_hub(hub: HubApi) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    store = HubStore(LOCATION, endpoint=f"http://127.0.0.1:{port}", token=False, retries=1,
                     backoff_s=0.001)  # fmt: skip

    error = _refused(store.list, "error")
    assert f"cannot reach the Hub at http://127.0.0.1:{port}" in str(error)


@pytest.mark.parametrize(
    "location",
    ["hf://", "hf://acme", "hf://acme/", "hf://a/b/c", "hf://datasets/acme/x", "hf://acme/x@",
     "hf://acme/-x", "hf://acme/x--y", "hf://acme/x y", "hf://acme/x@main branch",
     "hf://acme/x.git", "hf://acme/x@v1\n"],
)  # fmt: skip
def test_malformed_locations_are_unsupported(location: str) -> None:
    with pytest.raises(StoreError) as caught:
        open_store(location)
    assert caught.value.kind == "unsupported"
    shown = location.encode("unicode_escape").decode()
    assert "\n" not in str(caught.value) and shown in str(caught.value)


def test_open_store_makes_a_hub_store() -> None:
    store = open_store("hf://acme/chat-7b@v1.0")
    assert isinstance(store, HubStore)
    assert (store.display, store.repo_id, store.revision) == ("hf://acme/chat-7b@v1.0",
                                                               "acme/chat-7b", "v1.0")  # fmt: skip
    assert open_store("hf://acme/chat-7b/").display == "hf://acme/chat-7b"


def test_the_model_cache_fetches_a_hub_repo_once(
    hub: HubApi, model_dir: Path, tmp_path: Path
) -> None:
    hub.add_repo(REPO, model_dir, private=True)
    cache = ModelCache(tmp_path / "cache", 10 * 2**20, workers=4, chunk_bytes=64 * 1024)
    store = _store(hub, token=hub.token)

    path = cache.fetch(store)

    assert _files(path) == _files(model_dir)
    assert store.reads.bytes_read == sum(len(d) for d in _files(model_dir).values())
    assert store.reads.requests >= 5  # the 300 KB file came in 64 KiB ranges
    assert all("Authorization" not in r.headers for r in hub.requests_to("cdn"))
    served = hub.bytes_served

    again = _store(hub, token=hub.token)
    assert cache.fetch(again) == path
    assert again.reads.bytes_read == 0 and again.reads.requests == 0
    assert hub.bytes_served == served
