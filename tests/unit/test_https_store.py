"""The https:// store against a real local HTTPS server (tests/https_files.py): listing from a
manifest or a files list, counted ranged reads, retries, errors a user can act on, and
credentials that never show."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.storage.base import StoreError
from services.storage.cache import ModelCache
from services.storage.https import RETRIES, HttpsStore
from tests.https_files import ConnectProxy, HttpsFiles

PREFIX = "/models/tiny/"
WEIGHTS = "weights.bin"
SIZE = 300_000


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A small model directory: config, weights, a file in a subdirectory, an empty file."""
    root = tmp_path / "site"
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "gpt2"}\n')
    (root / WEIGHTS).write_bytes(bytes(range(256)) * (SIZE // 256) + bytes(SIZE % 256))
    (root / "sub" / "tokenizer.json").write_text('{"version": "1.0"}\n')
    (root / "empty.txt").write_bytes(b"")
    return root


@pytest.fixture
def files(model: Path) -> Iterator[HttpsFiles]:
    with HttpsFiles(model, prefix=PREFIX) as server:
        yield server


class Sleeps(list[float]):
    """The store's sleep: records the waits instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


def store_of(
    files: HttpsFiles,
    sleeps: Sleeps | None = None,
    *,
    url: str | None = None,
    environ: dict[str, str] | None = None,
    **options: Any,
) -> HttpsStore:
    env = {"PREFLIGHT_CA_BUNDLE": str(files.ca_file)} if environ is None else environ
    return HttpsStore(
        url or files.url,
        environ=env,
        retry_base_s=0.01,
        sleep=Sleeps() if sleeps is None else sleeps,
        **options,
    )


def manifest(root: Path, *, sizes: tuple[str, ...] = (), wrap: bool = True,
             digests: dict[str, Any] | None = None) -> bytes:  # fmt: skip
    """Write root/manifest.json: every file's sha256 (or `digests`), sizes for `sizes`."""
    if digests is None:
        digests = {
            p.relative_to(root).as_posix(): sha(p.read_bytes())
            for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "manifest.json"
        }
    doc: dict[str, Any] = dict(digests)
    if wrap:
        doc = {"files": digests, "sizes": {rel: (root / rel).stat().st_size for rel in sizes}}
    body = json.dumps(doc, indent=1).encode()
    (root / "manifest.json").write_bytes(body)
    return body


def failure(exc: pytest.ExceptionInfo[StoreError], display: str) -> str:
    """The message, checked to be one line naming the location."""
    message = str(exc.value)
    assert "\n" not in message and "\r" not in message, message
    assert message.startswith(display + ":"), message
    return message


# --- listing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("wrap", [True, False], ids=["files-and-sizes", "flat"])
def test_lists_from_the_manifest_with_its_digests_and_heads_only_for_missing_sizes(
    model: Path, files: HttpsFiles, wrap: bool
) -> None:
    sizes = (WEIGHTS, "config.json") if wrap else ()
    body = manifest(model, sizes=sizes, wrap=wrap)
    with store_of(files) as store:
        listed = {o.rel: o for o in store.list()}
    on_disk = {
        p.relative_to(model).as_posix(): p.read_bytes() for p in model.rglob("*") if p.is_file()
    }
    assert set(listed) == set(on_disk)  # the manifest itself is a file of the model
    for rel, data in on_disk.items():
        assert listed[rel].size == len(data), rel
        assert listed[rel].sha256 == sha(data), rel
    assert listed["manifest.json"].sha256 == sha(body)
    assert (listed["manifest.json"].version or "").startswith('"')  # its ETag
    heads = {r.rel for r in files.requests if r.method == "HEAD"}
    assert heads == set(on_disk) - {"manifest.json", *sizes}
    # A HEADed file is versioned by its ETag; one with size and sha256 needs no version.
    assert listed["sub/tokenizer.json"].version is not None
    assert listed["sub/tokenizer.json"].version.startswith('"')
    if wrap:
        assert listed[WEIGHTS].version is None
    assert all(r.headers.get("Accept-Encoding") == "identity" for r in files.requests)


def test_a_null_digest_lists_the_file_and_heads_it(model: Path, files: HttpsFiles) -> None:
    manifest(model, digests={"config.json": None, WEIGHTS: sha((model / WEIGHTS).read_bytes())})
    with store_of(files) as store:
        listed = {o.rel: o for o in store.list()}
    assert set(listed) == {"config.json", WEIGHTS, "manifest.json"}
    assert listed["config.json"].sha256 is None
    assert listed["config.json"].size == (model / "config.json").stat().st_size
    assert listed[WEIGHTS].sha256 is not None


def test_the_files_list_is_the_fallback(model: Path, files: HttpsFiles) -> None:
    listing = "# the model's files\n./config.json\n\nweights.bin\nsub/tokenizer.json\nempty.txt\n"
    (model / "files.txt").write_text(listing)
    files.head_allowed = False  # sizes then come from a one-byte ranged GET
    with store_of(files) as store:
        listed = {o.rel: o for o in store.list()}
    assert set(listed) == {"config.json", WEIGHTS, "sub/tokenizer.json", "empty.txt", "files.txt"}
    assert listed[WEIGHTS].size == SIZE
    assert listed["empty.txt"].size == 0  # 416 bytes */0
    assert listed[WEIGHTS].sha256 is None and listed[WEIGHTS].version is not None
    assert listed["files.txt"].sha256 == sha(listing.encode())
    assert [r.status for r in files.requests_for("manifest.json")] == [404]


def test_last_modified_versions_a_file_without_an_etag(model: Path, files: HttpsFiles) -> None:
    (model / "files.txt").write_text("config.json\n")
    files.send_etag = False
    with store_of(files) as store:
        listed = {o.rel: o for o in store.list()}
    assert listed["config.json"].version is not None
    assert listed["config.json"].version.endswith("GMT")


def test_no_manifest_and_no_files_list_is_not_found(files: HttpsFiles) -> None:
    with store_of(files) as store, pytest.raises(StoreError) as exc:
        store.list()
    assert exc.value.kind == "not_found"
    message = failure(exc, store.display)
    assert "manifest.json" in message and "files.txt" in message


def test_a_bad_manifest_is_one_line(model: Path, files: HttpsFiles) -> None:
    (model / "manifest.json").write_text('{"config.json": "not-a-digest"}')
    with store_of(files) as store, pytest.raises(StoreError) as exc:
        store.list()
    assert "not a sha256" in failure(exc, store.display)
    (model / "manifest.json").write_text("{\n  broken")
    with store_of(files) as store, pytest.raises(StoreError) as exc:
        store.list()
    assert "not valid JSON" in failure(exc, store.display)


def test_a_manifest_size_the_server_contradicts_is_changed(model: Path, files: HttpsFiles) -> None:
    (model / "manifest.json").write_text(json.dumps({"files": {WEIGHTS: None},
                                                     "sizes": {WEIGHTS: SIZE + 1}}))  # fmt: skip
    with store_of(files) as store, pytest.raises(StoreError) as exc:
        store.list()
    assert exc.value.kind == "changed"
    failure(exc, store.display)


@pytest.mark.parametrize(
    "name", ["../x", "/etc/passwd", "a/../../x", "sub/./x", "a\\..\\x", "nul\0x", "a//b"]
)
def test_a_manifest_naming_a_file_outside_the_base_is_refused(
    model: Path, files: HttpsFiles, name: str
) -> None:
    manifest(model, digests={"config.json": None, name: None})
    with store_of(files) as store:
        with pytest.raises(StoreError) as exc:
            store.list()
        assert exc.value.kind == "unsafe_path"
        failure(exc, store.display)
        with pytest.raises(StoreError) as exc:
            store.read(name, 0, 10)
        assert exc.value.kind == "unsafe_path"
        failure(exc, store.display)
    # Refused before any request for it: the only request was the manifest.
    assert [(r.method, r.rel) for r in files.requests] == [("GET", "manifest.json")]


def test_the_display_is_the_base_url_normalised(files: HttpsFiles) -> None:
    store = store_of(files, url=files.url.rstrip("/"))
    assert store.display == files.url
    with pytest.raises(StoreError) as exc:
        store_of(files, url=files.url + "?sig=abc")
    assert exc.value.kind == "unsupported"
    assert "sig=abc" not in failure(exc, files.url)
    with pytest.raises(StoreError) as exc:
        HttpsStore("ftp://user:pw@host/x/?sig=abc")
    assert exc.value.kind == "unsupported"
    assert "pw" not in failure(exc, "ftp://host/x/") and "sig" not in str(exc.value)


# --- reading ----------------------------------------------------------------------------------


def test_ranged_reads_are_counted_and_reuse_connections(model: Path, files: HttpsFiles) -> None:
    data = (model / WEIGHTS).read_bytes()
    with store_of(files) as store:
        assert store.read(WEIGHTS, 10, 20) == data[10:20]
        assert store.read(WEIGHTS, SIZE - 5, SIZE + 100) == data[-5:]  # fewer only at the end
        assert store.read(WEIGHTS, SIZE, SIZE + 10) == b""  # 416
        assert store.read(WEIGHTS, 0, SIZE) == data
        assert store.read(WEIGHTS, 5, 5) == b""  # nothing asked, nothing sent
        assert (store.reads.requests, store.reads.bytes_read) == (4, 10 + 5 + SIZE)
    gets = files.requests_for(WEIGHTS, "GET")
    assert [r.headers["Range"] for r in gets] == [
        "bytes=10-19",
        f"bytes={SIZE - 5}-{SIZE + 99}",
        f"bytes={SIZE}-{SIZE + 9}",
        f"bytes=0-{SIZE - 1}",
    ]
    assert [r.status for r in gets] == [206, 206, 416, 206]
    assert files.connections == 1  # kept alive between reads


def test_a_server_ignoring_range_costs_only_up_to_the_end_asked(
    model: Path, files: HttpsFiles
) -> None:
    data = (model / WEIGHTS).read_bytes()
    files.ignore_range = True
    with store_of(files) as store:
        assert store.read(WEIGHTS, 1000, 1100) == data[1000:1100]
        # What came off the connection: the skipped prefix too, and nothing past the end.
        assert (store.reads.requests, store.reads.bytes_read) == (1, 1100)
        assert store.read(WEIGHTS, 0, 50) == data[:50]
        assert store.reads.bytes_read == 1150
        assert store.read(WEIGHTS, SIZE - 10, SIZE + 10) == data[-10:]
        assert store.read(WEIGHTS, SIZE + 5, SIZE + 10) == b""
    assert [r.status for r in files.requests_for(WEIGHTS)] == [200] * 4


def test_a_server_answering_shorter_ranges_is_asked_again(model: Path, files: HttpsFiles) -> None:
    files.max_range = 4096
    with store_of(files) as store:
        assert store.read(WEIGHTS, 100, 10_100) == (model / WEIGHTS).read_bytes()[100:10_100]
        assert (store.reads.requests, store.reads.bytes_read) == (3, 10_000)
    ranges = [r.headers["Range"] for r in files.requests_for(WEIGHTS)]
    assert ranges == ["bytes=100-10099", "bytes=4196-10099", "bytes=8292-10099"]


def test_a_missing_file_is_not_found(model: Path, files: HttpsFiles) -> None:
    with store_of(files) as store, pytest.raises(StoreError) as exc:
        store.read("missing.bin", 0, 10)
    assert exc.value.kind == "not_found"
    assert "missing.bin" in failure(exc, store.display)
    manifest(model, digests={"config.json": None, "gone.bin": None})
    with store_of(files) as store, pytest.raises(StoreError) as exc:
        store.list()
    assert exc.value.kind == "not_found"
    assert "gone.bin" in failure(exc, store.display)


def test_a_file_replaced_after_listing_fails_as_changed(model: Path, files: HttpsFiles) -> None:
    (model / "files.txt").write_text(f"{WEIGHTS}\n")
    with store_of(files) as store:
        store.list()
        assert len(store.read(WEIGHTS, 0, 100)) == 100
        (model / WEIGHTS).write_bytes(b"\xff" * SIZE)  # same size, new content: a new ETag
        os.utime(model / WEIGHTS, ns=(1, 1))
        with pytest.raises(StoreError) as exc:
            store.read(WEIGHTS, 100, 200)
    assert exc.value.kind == "changed"
    failure(exc, store.display)
    assert files.requests_for(WEIGHTS, "GET")[0].headers["If-Match"].startswith('"')


# --- retries ----------------------------------------------------------------------------------


def test_429_is_retried_after_what_retry_after_says(
    model: Path, files: HttpsFiles, sleeps: Sleeps
) -> None:
    files.fail(WEIGHTS, 429, times=2, retry_after="3")
    with store_of(files, sleeps) as store:
        assert store.read(WEIGHTS, 0, 10) == (model / WEIGHTS).read_bytes()[:10]
        assert sleeps == [3.0, 3.0]
        assert store.reads.requests == 3  # every answered request counts
    assert [r.status for r in files.requests_for(WEIGHTS)] == [429, 429, 206]


def test_5xx_backs_off_exponentially_then_is_throttled(files: HttpsFiles, sleeps: Sleeps) -> None:
    files.fail(WEIGHTS, 503, times=RETRIES + 2)
    with store_of(files, sleeps) as store, pytest.raises(StoreError) as exc:
        store.read(WEIGHTS, 0, 10)
    assert exc.value.kind == "throttled"
    assert "503" in failure(exc, store.display)
    assert len(files.requests_for(WEIGHTS)) == RETRIES
    assert len(sleeps) == RETRIES - 1
    for n, slept in enumerate(sleeps):
        assert 0.01 * 2**n / 2 <= slept <= 0.01 * 2**n  # jittered, doubling


def test_a_retry_after_too_long_to_wait_is_throttled_at_once(
    files: HttpsFiles, sleeps: Sleeps
) -> None:
    files.fail("manifest.json", 503, retry_after="3600")
    with store_of(files, sleeps) as store, pytest.raises(StoreError) as exc:
        store.list()
    assert exc.value.kind == "throttled"
    assert "3600" in failure(exc, store.display)
    assert sleeps == []


def test_an_unreachable_server_is_retried_then_said_in_one_line(
    files: HttpsFiles, sleeps: Sleeps, tmp_path: Path
) -> None:
    url, ca = files.url, shutil.copy(files.ca_file, tmp_path / "ca.pem")
    files.stop()  # nothing listens on its port now
    env = {"PREFLIGHT_CA_BUNDLE": str(ca)}
    with store_of(files, sleeps, url=url, environ=env) as store, pytest.raises(StoreError) as exc:
        store.read(WEIGHTS, 0, 10)
    assert "cannot reach 127.0.0.1:" in failure(exc, store.display)
    assert len(sleeps) == RETRIES - 1


# --- TLS and credentials ----------------------------------------------------------------------


def test_an_untrusted_certificate_is_one_line_and_not_retried(
    files: HttpsFiles, sleeps: Sleeps
) -> None:
    with store_of(files, sleeps, environ={}) as store, pytest.raises(StoreError) as exc:
        store.list()
    message = failure(exc, store.display)
    assert "TLS certificate not trusted" in message
    assert "SSL_CERT_FILE or PREFLIGHT_CA_BUNDLE" in message
    assert sleeps == [] and files.requests == []
    # SSL_CERT_FILE is honoured from the store's environment, not only OpenSSL's.
    (files.root / "files.txt").write_text("config.json\n")
    with store_of(files, environ={"SSL_CERT_FILE": str(files.ca_file)}) as store:
        assert len(store.list()) == 2


def test_a_ca_bundle_that_cannot_be_read_is_one_line(files: HttpsFiles, tmp_path: Path) -> None:
    with pytest.raises(StoreError) as exc:
        store_of(files, environ={"PREFLIGHT_CA_BUNDLE": str(tmp_path / "nope.pem")})
    assert "PREFLIGHT_CA_BUNDLE" in failure(exc, files.url)


def test_401_is_access_denied_with_what_to_set(model: Path, files: HttpsFiles) -> None:
    manifest(model)
    files.token = "the-right-token-0000"
    with store_of(files) as store, pytest.raises(StoreError) as exc:
        store.list()
    assert exc.value.kind == "access_denied"
    assert "PREFLIGHT_HTTPS_TOKEN" in failure(exc, store.display)
    env = {"PREFLIGHT_CA_BUNDLE": str(files.ca_file), "PREFLIGHT_HTTPS_TOKEN": "wrong-token-1"}
    with store_of(files, environ=env) as store, pytest.raises(StoreError) as exc:
        store.read(WEIGHTS, 0, 10)
    assert exc.value.kind == "access_denied"
    assert "refused the credentials" in failure(exc, store.display)


def test_403_is_access_denied(model: Path, files: HttpsFiles) -> None:
    files.fail(WEIGHTS, 403)
    with store_of(files) as store, pytest.raises(StoreError) as exc:
        store.read(WEIGHTS, 0, 10)
    assert exc.value.kind == "access_denied"
    failure(exc, store.display)


def test_credentials_are_sent_and_never_shown(
    model: Path, files: HttpsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    manifest(model)
    token, user, password = "tok-SECRET-4242", "alice", "pw-SECRET-9191"
    secrets = (token, user, password)
    env = {"PREFLIGHT_CA_BUNDLE": str(files.ca_file), "PREFLIGHT_HTTPS_TOKEN": token}
    basic_url = files.url.replace("https://", f"https://{user}:{password}@")
    messages: list[str] = []
    for url, needed in ((files.url, "token"), (basic_url, "basic")):
        files.token, files.basic = (token, None) if needed == "token" else (None, (user, password))
        store = store_of(files, url=url, environ=env)
        with store:
            assert store.display == files.url
            assert len(store.list()) == 5
            files.fail(WEIGHTS, 503, times=RETRIES)
            files.fail("config.json", 401)
            for rel in ("missing.bin", WEIGHTS, "config.json", "../up"):
                with pytest.raises(StoreError) as exc:
                    store.read(rel, 0, 10)
                messages.append(failure(exc, store.display))
            messages += [store.display, repr(store)]
    assert files.requests[0].headers["Authorization"] == f"Bearer {token}"
    assert files.requests[-1].headers["Authorization"].startswith("Basic ")
    shown = "\n".join(messages + [r.getMessage() for r in caplog.records])
    assert not [s for s in secrets if s in shown]


def test_a_redirect_to_another_origin_drops_the_credentials(
    model: Path, files: HttpsFiles, tmp_path: Path
) -> None:
    manifest(model)
    other_root = tmp_path / "mirror"
    other_root.mkdir()
    (other_root / WEIGHTS).write_bytes((model / WEIGHTS).read_bytes())
    with HttpsFiles(other_root) as other:
        bundle = tmp_path / "both.pem"
        bundle.write_bytes(files.ca_file.read_bytes() + other.ca_file.read_bytes())
        env = {"PREFLIGHT_CA_BUNDLE": str(bundle), "PREFLIGHT_HTTPS_TOKEN": "tok-XYZ-1"}
        files.redirect(WEIGHTS, f"{other.url}{WEIGHTS}")
        files.redirect("config.json", f"{PREFIX}sub/tokenizer.json")  # same origin
        with store_of(files, environ=env) as store:
            assert store.read(WEIGHTS, 0, 10) == (model / WEIGHTS).read_bytes()[:10]
            assert (
                store.read("config.json", 0, 5) == (model / "sub/tokenizer.json").read_bytes()[:5]
            )
        assert "Authorization" not in other.requests[0].headers
        assert files.requests_for("sub/tokenizer.json")[0].headers["Authorization"] == (
            "Bearer tok-XYZ-1"
        )
    files.redirect(WEIGHTS, "http://127.0.0.1:1/weights.bin")
    with store_of(files) as store, pytest.raises(StoreError) as exc:
        store.read(WEIGHTS, 0, 10)
    assert exc.value.kind == "unsupported"
    assert "http://" not in failure(exc, store.display).removeprefix(store.display)


def test_https_proxy_tunnels_unless_no_proxy(model: Path, files: HttpsFiles) -> None:
    (model / "files.txt").write_text("config.json\n")
    with ConnectProxy() as proxy:
        env = {
            "PREFLIGHT_CA_BUNDLE": str(files.ca_file),
            "HTTPS_PROXY": proxy.url.replace("http://", "http://pu:pp@"),
        }
        with store_of(files, environ=env) as store:
            assert len(store.list()) == 2
            assert store.read("config.json", 0, 5) == b'{"mod'
        assert proxy.tunnels and set(proxy.tunnels) == {f"127.0.0.1:{files.port}"}
        assert all(auth and auth.startswith("Basic ") for auth in proxy.proxy_auth)
        tunnels = len(proxy.tunnels)
        with store_of(files, environ=env | {"NO_PROXY": "127.0.0.1"}) as store:
            store.list()
        assert len(proxy.tunnels) == tunnels


# --- through the model cache ------------------------------------------------------------------


def test_the_model_cache_fetches_an_https_model_whole(sample_model: Path, tmp_path: Path) -> None:
    source = tmp_path / "published"
    shutil.copytree(sample_model, source)
    (source / "big.bin").write_bytes(os.urandom(200_000))  # several chunks, read in parallel
    manifest(source, wrap=False)  # preflight-manifest.json's own format, every file
    with HttpsFiles(source, prefix="/m/sample/") as files:
        cache = ModelCache(tmp_path / "cache", 10**9, workers=4, chunk_bytes=32 * 1024)
        env = {"PREFLIGHT_CA_BUNDLE": str(files.ca_file)}
        with HttpsStore(files.url, environ=env) as store:
            path = cache.fetch(store)
            requests = store.reads.requests
            assert requests >= 200_000 // (32 * 1024)
            assert cache.fetch(store) == path  # the same version: nothing read again
            assert store.reads.requests == requests
    want = {p.relative_to(source).as_posix(): p.read_bytes() for p in source.rglob("*")
            if p.is_file()}  # fmt: skip
    got = {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*")
           if p.is_file()}  # fmt: skip
    assert set(got) == set(want) and "manifest.json" in got and "preflight-manifest.json" in got
    assert got == want
