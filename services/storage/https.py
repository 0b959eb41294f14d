"""https://host/base/ as a `Store`: a model directory on any web server that answers ranged GETs
(nginx, Caddy, an object store's static website, a CDN, an artifact server).

    store = HttpsStore("https://models.example.com/chat-7b/")
    store.list()                            # from <base>/manifest.json, else <base>/files.txt
    store.read("model.safetensors", 0, 8)   # one GET with Range: bytes=0-7, counted in .reads

HTTP has no listing, so a model publishes its file list beside its files, under the base URL:

    manifest.json   what preflight-manifest.json holds (services/stack/samples.py writes it, the
                    checksum check reads it): {"<rel>": "<sha256 hex>", ...}, or that object
                    under "files"; a null digest lists a file without one. Optionally
                    "sizes": {"<rel>": bytes}, which saves a HEAD per file.
    files.txt       one relative path per line; blank lines and #-comments are skipped.

The list file is a file of the model too, listed with the size and sha256 of what was fetched.
The other sha256s are the manifest's word only (see `HttpsStore.sha256_verified`).
A file the manifest gives no size or no sha256 gets a HEAD (in parallel): its size from
Content-Length, its version from ETag (else Last-Modified). Reads of a file listed with a strong
ETag send If-Match, so a file replaced mid-download fails (kind="changed") instead of mixing two
versions. A name that is not a plain relative path is refused (kind="unsafe_path"): a manifest
never makes the store request anything outside the base URL.

`reads` counts every ranged GET the server answered (retries included) and every file byte
taken off the connection: where a server ignores Range (200, the whole file), a read takes the
file up to `end`, skipped prefix included, and drops the connection rather than the rest.

Environment (the constructor's `environ`; default os.environ):

    PREFLIGHT_HTTPS_TOKEN   sent as `Authorization: Bearer`; user:password@ in the URL (basic
                            auth) wins. Either is dropped on a redirect to another origin
    PREFLIGHT_CA_BUNDLE     PEM file of the CAs to trust instead of the system's; else
                            SSL_CERT_FILE / SSL_CERT_DIR when set
    HTTPS_PROXY, NO_PROXY   an http:// proxy (CONNECT tunnel) for the hosts NO_PROXY leaves

429, 5xx and dropped connections are retried (RETRIES attempts, exponential backoff from
`retry_base_s`, Retry-After honoured), then kind="throttled" ("cannot reach ..." for the
network). Credentials never reach `display`, a message or a log line. Plain http:// is not
offered: locations.py refuses it, and a redirect to it is refused.

Built on http.client, not httpx: httpx is not a dependency of the project (huggingface_hub
brings httpx or httpx2 depending on its version), and ranged reads need exact control over
how much of a body is taken off the connection anyway.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import logging
import os
import random
import re
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus
from types import TracebackType
from typing import TypeVar
from urllib.parse import quote, unquote, urljoin, urlsplit

from services.storage.base import ReadCounter, RemoteObject, StoreError, retry_after_s

log = logging.getLogger("preflight.storage.https")

TOKEN_ENV = "PREFLIGHT_HTTPS_TOKEN"  # noqa: S105 - the variable's name, not a token
CA_BUNDLE_ENV = "PREFLIGHT_CA_BUNDLE"
MANIFEST = "manifest.json"
FILES_LIST = "files.txt"
RETRIES = 6
"""Attempts per request, the first included (as boto3's standard mode counts them)."""
MAX_BACKOFF_S = 30.0
MAX_RETRY_AFTER_S = 60.0
"""A longer Retry-After is not waited out: the store says throttled, and how long was asked."""
MAX_REDIRECTS = 5
MAX_LIST_BYTES = 16 * 1024 * 1024
"""A manifest larger than this is not a manifest (a misnamed weight file, or an error page)."""
HEADS_AT_ONCE = 16
MAX_IDLE = 32
"""Kept-alive connections per origin: enough for the cache's read pool and the HEAD pool."""
SKIP_BLOCK = 1024 * 1024
TIMEOUT_S = 60.0
USER_AGENT = "preflight-https-store"

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_REDIRECTS = (301, 302, 303, 307, 308)

T = TypeVar("T")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _name(rel: str) -> str:
    """A file name for a message: as is when printable, else quoted (messages are one line)."""
    return rel if rel.isprintable() else repr(rel)


def unsafe(rel: str) -> bool:
    """Not a plain '/'-separated relative path inside the model (the cache's rule too)."""
    return (
        not rel
        or rel.startswith("/")
        or "\\" in rel
        or "\0" in rel
        or any(part in ("", ".", "..") for part in rel.split("/"))
    )


@dataclass(frozen=True)
class _Origin:
    host: str
    port: int

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == 443 else f"{host}:{self.port}"


class _Retry(Exception):
    """An answer worth another attempt (429, 5xx)."""

    def __init__(self, status: int, retry_after: float | None) -> None:
        super().__init__(status)
        self.status = status
        self.retry_after = retry_after


@dataclass
class _Reply:
    """A response whose body is not read yet, and the connection it came on."""

    response: http.client.HTTPResponse
    conn: http.client.HTTPSConnection
    origin: _Origin

    @property
    def status(self) -> int:
        return self.response.status

    def header(self, name: str) -> str | None:
        return self.response.getheader(name)


class _Proxy:
    """An http:// proxy reached with CONNECT (HTTPS_PROXY), and the hosts it is not for."""

    def __init__(self, url: str, no_proxy: str) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError("HTTPS_PROXY must be http://HOST:PORT (a CONNECT proxy)")
        self.host = parts.hostname
        self.port = parts.port or 8080
        self.headers: dict[str, str] = {}
        if parts.username is not None:
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self.headers["Proxy-Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode(
                "ascii"
            )
        self.no_proxy = no_proxy

    def applies(self, host: str) -> bool:
        # urllib's NO_PROXY matching (suffixes, "*", host:port), on this store's environment;
        # typeshed does not declare the function.
        bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
        return not bypass(host, {"no": self.no_proxy})


class _Pool:
    """Kept-alive connections per origin; one request at a time on each, any thread."""

    def __init__(self, context: ssl.SSLContext, timeout: float, proxy: _Proxy | None) -> None:
        self.context = context
        self.timeout = timeout
        self.proxy = proxy
        self._idle: dict[_Origin, list[http.client.HTTPSConnection]] = {}
        self._lock = threading.Lock()

    def get(
        self, origin: _Origin, *, fresh: bool = False
    ) -> tuple[http.client.HTTPSConnection, bool]:
        """(a connection, whether it was used before)."""
        if not fresh:
            with self._lock:
                idle = self._idle.get(origin)
                if idle:
                    return idle.pop(), True
        if self.proxy is not None and self.proxy.applies(origin.host):
            conn = http.client.HTTPSConnection(
                self.proxy.host, self.proxy.port, timeout=self.timeout, context=self.context
            )
            conn.set_tunnel(origin.host, origin.port, headers=self.proxy.headers)
        else:
            conn = http.client.HTTPSConnection(
                origin.host, origin.port, timeout=self.timeout, context=self.context
            )
        return conn, False

    def put(self, origin: _Origin, conn: http.client.HTTPSConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(origin, [])
            if len(idle) < MAX_IDLE:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for conn in conns:
            conn.close()


def _ssl_context(environ: Mapping[str, str]) -> tuple[ssl.SSLContext, str | None]:
    """(the context, the variable naming the CAs it trusts; None: the system's)."""
    bundle = environ.get(CA_BUNDLE_ENV)
    if bundle:
        return ssl.create_default_context(cafile=bundle), CA_BUNDLE_ENV
    cafile, capath = environ.get("SSL_CERT_FILE"), environ.get("SSL_CERT_DIR")
    if cafile or capath:
        # Explicit, not left to OpenSSL's reading of the process environment: `environ` may
        # not be the process's.
        which = "SSL_CERT_FILE" if cafile else "SSL_CERT_DIR"
        return ssl.create_default_context(cafile=cafile or None, capath=capath or None), which
    return ssl.create_default_context(), None


class HttpsStore:
    """A model directory under an https:// base URL, listed by its manifest.json or files.txt."""

    sha256_verified = False
    """The sha256s this store lists are the publisher's claims (manifest.json), which no server
    checked against the bytes, as S3 and the Hub check theirs on upload: a consumer that takes
    a provider sha256 instead of hashing (services/validator/remote.py) must hash these. The
    model cache may trust them: it verifies every download against them."""

    def __init__(
        self,
        location: str,
        *,
        environ: Mapping[str, str] | None = None,
        retry_base_s: float = 0.5,
        retries: int = RETRIES,
        timeout_s: float = TIMEOUT_S,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        env = environ if environ is not None else os.environ
        parts = urlsplit(location)
        if parts.scheme.lower() != "https" or not parts.hostname:
            raise StoreError(
                f"{self._safe(location)}: not an https:// base URL (https://HOST/BASE/)",
                kind="unsupported",
            )
        try:
            port = parts.port or 443
        except ValueError:
            raise StoreError(
                f"{self._safe(location)}: not a valid port in the URL", kind="unsupported"
            ) from None
        self.origin = _Origin(parts.hostname, port)
        # The path as a URL path: what is already %-escaped stays, a space becomes %20.
        path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
        self.base_path = path if path.endswith("/") else path + "/"
        explicit_port = f":{port}" if parts.port is not None and port != 443 else ""
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        self.display = f"https://{host}{explicit_port}{self.base_path}"
        if parts.query or parts.fragment:
            raise StoreError(
                f"{self.display}: a base URL with a query or fragment is not a model directory",
                kind="unsupported",
            )
        self.reads = ReadCounter()
        self.one_file: str | None = None  # always a folder (a manifest's files)
        self.retries = max(1, retries)
        self.retry_base_s = retry_base_s
        self._sleep = sleep
        self._auth: str | None = None
        if parts.username is not None:
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self._auth = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        elif token := env.get(TOKEN_ENV, "").strip():
            self._auth = f"Bearer {token}"
        try:
            context, self._trust = _ssl_context(env)
        except (OSError, ssl.SSLError) as exc:
            which = CA_BUNDLE_ENV if env.get(CA_BUNDLE_ENV) else "SSL_CERT_FILE/SSL_CERT_DIR"
            raise StoreError(
                f"{self.display}: cannot load the CAs {which} names: "
                f"{_one_line(exc.strerror or exc)}",
                kind="error",
            ) from exc
        proxy_url = env.get("HTTPS_PROXY") or env.get("https_proxy")
        try:
            proxy = (
                _Proxy(proxy_url, env.get("NO_PROXY") or env.get("no_proxy") or "")
                if proxy_url
                else None
            )
        except ValueError as exc:
            raise StoreError(f"{self.display}: {exc}", kind="unsupported") from None
        self._pool = _Pool(context, timeout_s, proxy)
        self._versions: dict[str, str] = {}
        """rel -> strong ETag from the last listing: reads send it as If-Match."""
        self._warned_range = False

    @staticmethod
    def _safe(location: str) -> str:
        """A location for a message before it is parsed: without any user:password@."""
        scheme, sep, rest = location.partition("://")
        netloc, slash, path = rest.partition("/")
        path = path.partition("?")[0].partition("#")[0]  # a query may hold a signature
        return f"{scheme}{sep}{netloc.rpartition('@')[2]}{slash}{path}"

    def __repr__(self) -> str:
        return f"HttpsStore({self.display!r})"

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> HttpsStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- listing ------------------------------------------------------------------------------

    def list(self) -> list[RemoteObject]:
        source, body, etag, entries = self._list_file()
        for rel in entries:
            if unsafe(rel):
                raise StoreError(
                    f"{self.display}: {source} names {rel!r}: not a relative path inside the "
                    "model, refused (nothing outside the base URL is requested)",
                    kind="unsafe_path",
                )
        entries.pop(source, None)  # a list file cannot state its own digest: what was fetched
        if not entries:
            raise StoreError(f"{self.display}: {source} lists no files", kind="not_found")
        need_head = [rel for rel, (sha, size) in entries.items() if sha is None or size is None]
        heads: dict[str, tuple[int, str | None]] = {}
        if need_head:
            with ThreadPoolExecutor(
                min(HEADS_AT_ONCE, len(need_head)), thread_name_prefix="https-head"
            ) as pool:
                heads = dict(zip(need_head, pool.map(self._head, need_head), strict=True))
        objects = [
            RemoteObject(
                rel=source,
                size=len(body),
                version=etag,
                sha256=hashlib.sha256(body).hexdigest(),
            )
        ]
        for rel, (sha, size) in entries.items():
            version = None
            if rel in heads:
                head_size, version = heads[rel]
                if size is not None and size != head_size:
                    raise StoreError(
                        f"{self.display}: {source} says {_name(rel)} is {size} bytes, the server "
                        f"has {head_size}: the file changed since the manifest was written, "
                        "publish it again",
                        kind="changed",
                    )
                size = head_size
            assert size is not None  # every entry without a size was HEADed
            objects.append(RemoteObject(rel=rel, size=size, version=version, sha256=sha))
        self._versions = {
            o.rel: o.version
            for o in objects
            if o.version and o.version.startswith('"')  # a strong ETag: If-Match compares it
        }
        return objects

    def _list_file(self) -> tuple[str, bytes, str | None, dict[str, tuple[str | None, int | None]]]:
        """(list file name, its bytes, its ETag, rel -> (sha256, size)) of the first list file
        the server has."""
        denied: list[str] = []
        for name in (MANIFEST, FILES_LIST):
            status, body, etag = self._with_retries(
                f"fetching {name}", partial(self._get_small, name)
            )
            if status in (404, 410):
                continue
            if status == 403:
                # Some static hosts (S3 websites) answer 403 for a file that is not there.
                denied.append(name)
                continue
            if status != 200:
                raise self._status_error(status, f"fetching {name}")
            if name == MANIFEST:
                return name, body, etag, self._parse_manifest(body)
            return name, body, etag, self._parse_files_list(body)
        if denied:
            raise StoreError(
                f"{self.display}: access denied (403) to {' and '.join(denied)}, and no other "
                "file list: check the credentials, or publish a manifest beside the model",
                kind="access_denied",
            )
        raise StoreError(
            f"{self.display}: no {MANIFEST} or {FILES_LIST} here: publish a {MANIFEST} (file "
            f"-> sha256, like preflight-manifest.json) or a {FILES_LIST} (one path a line) beside "
            "the model's files",
            kind="not_found",
        )

    def _get_small(self, name: str) -> tuple[int, bytes, str | None]:
        """(status, body, ETag or Last-Modified) of a whole small file; 401 raises."""
        reply = self._open("GET", name, {}, what=f"fetching {name}")
        reusable = False
        try:
            status = reply.status
            self._raise_for_retry(reply)
            if status == 401:
                raise self._status_error(status, f"fetching {name}")
            if status != 200:
                return status, b"", None
            length = reply.header("Content-Length")
            if length is not None and length.isdigit() and int(length) > MAX_LIST_BYTES:
                raise StoreError(
                    f"{self.display}: {name} is {length} bytes: too large for a file list",
                    kind="error",
                )
            body = self._take(reply, MAX_LIST_BYTES + 1)
            if len(body) > MAX_LIST_BYTES:
                raise StoreError(
                    f"{self.display}: {name} is over {MAX_LIST_BYTES} bytes: too large for a "
                    "file list",
                    kind="error",
                )
            reusable = True
            return status, body, self._version(reply)
        finally:
            self._release(reply, reusable)

    def _parse_manifest(self, body: bytes) -> dict[str, tuple[str | None, int | None]]:
        """The checksum check's reading of preflight-manifest.json, plus "sizes" and null."""
        try:
            raw = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise self._bad_manifest(f"not valid JSON ({_one_line(exc)})") from None
        if not isinstance(raw, dict):
            raise self._bad_manifest("expected an object of file -> sha256")
        sizes = raw.get("sizes", {}) if isinstance(raw.get("sizes"), dict) else {}
        if "files" in raw:
            digests = raw["files"]
            if not isinstance(digests, dict):
                raise self._bad_manifest('"files" is not an object of file -> sha256')
        else:
            digests = {k: v for k, v in raw.items() if not (k == "sizes" and isinstance(v, dict))}
        entries: dict[str, tuple[str | None, int | None]] = {}
        for rel, digest in digests.items():
            if digest is None or digest == "":
                sha = None
            elif isinstance(digest, str) and _SHA256.fullmatch(digest):
                sha = digest.lower()
            else:
                raise self._bad_manifest(
                    f"{rel!r}: {str(digest)[:80]!r} is not a sha256 (64 hex digits) or null"
                )
            size = sizes.get(rel)
            if size is not None and (not isinstance(size, int) or isinstance(size, bool)
                                     or size < 0):  # fmt: skip
                raise self._bad_manifest(f'"sizes": {rel!r}: {str(size)[:40]!r} is not a size')
            entries[rel] = (sha, size)
        return entries

    def _parse_files_list(self, body: bytes) -> dict[str, tuple[str | None, int | None]]:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise StoreError(f"{self.display}: {FILES_LIST} is not UTF-8 text") from None
        entries: dict[str, tuple[str | None, int | None]] = {}
        for line in text.splitlines():
            rel = line.strip()
            if not rel or rel.startswith("#"):
                continue
            # `find . -type f` writes ./config.json: the same file
            entries[rel.removeprefix("./")] = (None, None)
        return entries

    def _bad_manifest(self, what: str) -> StoreError:
        return StoreError(f"{self.display}: {MANIFEST}: {what}", kind="error")

    def _head(self, rel: str) -> tuple[int, str | None]:
        """(size, version) of one file: HEAD, or a one-byte ranged GET where HEAD says nothing."""
        what = f"the size of {_name(rel)}"
        return self._with_retries(what, lambda: self._head_once(rel, what))

    def _head_once(self, rel: str, what: str) -> tuple[int, str | None]:
        reply = self._open("HEAD", rel, {}, what=what)
        reusable = False
        try:
            self._raise_for_retry(reply)
            length = reply.header("Content-Length")
            if reply.status == 200 and length is not None and length.strip().isdigit():
                reply.response.read()  # a HEAD has no body: this only finishes the response
                reusable = True
                return int(length), self._version(reply)
            if reply.status not in (200, 405, 501):
                raise self._status_error(reply.status, what)
        finally:
            self._release(reply, reusable)
        # No HEAD (405/501) or no Content-Length in it: the first byte tells the size.
        reply = self._open("GET", rel, {"Range": "bytes=0-0"}, what=what)
        reusable = False
        try:
            self._raise_for_retry(reply)
            if reply.status == 416:
                # An empty file has no byte 0: "bytes */0".
                if re.fullmatch(r"bytes\s+\*/0", (reply.header("Content-Range") or "").strip()):
                    reply.response.read()
                    reusable = True
                    return 0, self._version(reply)
            elif reply.status == 206:
                found = _CONTENT_RANGE.fullmatch((reply.header("Content-Range") or "").strip())
                if found and found.group(3) != "*":
                    self._take(reply, 1)
                    reusable = reply.response.isclosed()
                    return int(found.group(3)), self._version(reply)
            elif reply.status == 200:
                length = reply.header("Content-Length")
                if length is not None and length.strip().isdigit():
                    return int(length), self._version(reply)  # body left unread: dropped
            else:
                raise self._status_error(reply.status, what)
        finally:
            self._release(reply, reusable)
        raise StoreError(
            f"{self.display}: the server states no size for {_name(rel)}: add it to "
            f'{MANIFEST}\'s "sizes"',
            kind="error",
        )

    @staticmethod
    def _version(reply: _Reply) -> str | None:
        return reply.header("ETag") or reply.header("Last-Modified") or None

    # --- reading ------------------------------------------------------------------------------

    def read(self, rel: str, start: int, end: int) -> bytes:
        if unsafe(rel):
            raise StoreError(
                f"{self.display}: refusing to read {rel!r}: not a relative path inside the model",
                kind="unsafe_path",
            )
        parts: list[bytes] = []
        at = start
        while at < end:
            # One request usually; more where a server answers a shorter range than asked.
            data, eof = self._with_retries(
                f"reading {_name(rel)}", partial(self._read_once, rel, at, end)
            )
            parts.append(data)
            at += len(data)
            if eof or not data:
                break
        return b"".join(parts)

    def _read_once(self, rel: str, start: int, end: int) -> tuple[bytes, bool]:
        """(bytes from `start`, whether they reach the end of the file)."""
        headers = {"Range": f"bytes={start}-{end - 1}"}
        if (etag := self._versions.get(rel)) is not None:
            headers["If-Match"] = etag
        what = f"reading {_name(rel)}"
        reply = self._open("GET", rel, headers, what=what)
        taken = 0
        reusable = False
        try:
            self._raise_for_retry(reply)
            encoding = (reply.header("Content-Encoding") or "identity").strip().lower()
            if reply.status in (200, 206) and encoding != "identity":
                raise StoreError(
                    f"{self.display}: {what}: the server sent it compressed ({encoding}) though "
                    "asked for identity: a range must be of the stored bytes",
                    kind="unsupported",
                )
            if reply.status == 206:
                found = _CONTENT_RANGE.fullmatch((reply.header("Content-Range") or "").strip())
                if not found or int(found.group(1)) != start:
                    raise StoreError(
                        f"{self.display}: {what}: the server answered a range other than bytes "
                        f"{start}-{end - 1} ({_one_line(reply.header('Content-Range'))[:60]})",
                        kind="error",
                    )
                last, total = int(found.group(2)), found.group(3)
                data = self._take(reply, end - start)
                taken = len(data)
                reusable = reply.response.isclosed()
                at_end = total != "*" and last + 1 >= int(total)
                return data, at_end or len(data) < min(end, last + 1) - start
            if reply.status == 200:
                # The server ignored Range: the file from its first byte. Take what is needed
                # and drop the connection, rather than download the whole file for each read.
                if not self._warned_range:
                    self._warned_range = True
                    log.warning(
                        "%s: the server ignores Range requests: every read downloads the file "
                        "from its start",
                        self.display,
                    )
                skip = start
                while skip > 0:
                    block = self._take(reply, min(skip, SKIP_BLOCK))
                    taken += len(block)
                    if not block:
                        return b"", True  # the file ends before `start`
                    skip -= len(block)
                data = self._take(reply, end - start)
                taken += len(data)
                reusable = reply.response.isclosed()
                return data, reusable or len(data) < end - start
            if reply.status == 416:  # start is at or past the end of the file
                reply.response.read(64 * 1024)  # its short note: the connection stays usable
                reusable = reply.response.isclosed()
                return b"", True
            raise self._status_error(reply.status, what)
        finally:
            self.reads.add(taken)
            self._release(reply, reusable)

    # --- requests -----------------------------------------------------------------------------

    def _url_path(self, rel: str) -> str:
        return self.base_path + "/".join(quote(part, safe="") for part in rel.split("/"))

    def _open(self, method: str, rel: str, extra: dict[str, str], *, what: str) -> _Reply:
        """Send one request for a file under the base, following redirects (https only)."""
        origin, path = self.origin, self._url_path(rel)
        same_origin = True
        for _ in range(MAX_REDIRECTS + 1):
            headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **extra}
            if self._auth is not None and same_origin:
                headers["Authorization"] = self._auth
            reply = self._exchange(method, origin, path, headers)
            location = reply.header("Location")
            if reply.status not in _REDIRECTS or not location:
                return reply
            self._release(reply, False)
            target = urlsplit(urljoin(f"https://{origin.netloc}{path}", location.strip()))
            if target.scheme.lower() != "https" or not target.hostname:
                # Never the Location itself in a message: a presigned URL carries a signature.
                raise StoreError(
                    f"{self.display}: {what}: redirected to a non-https URL: refused",
                    kind="unsupported",
                )
            try:
                new = _Origin(target.hostname, target.port or 443)
            except ValueError:
                raise StoreError(
                    f"{self.display}: {what}: redirected to a URL with a bad port"
                ) from None
            # Credentials are for the origin the user named, not wherever it redirects.
            same_origin = same_origin and new == self.origin
            origin = new
            path = (target.path or "/") + (f"?{target.query}" if target.query else "")
        raise StoreError(f"{self.display}: {what}: more than {MAX_REDIRECTS} redirects")

    def _exchange(self, method: str, origin: _Origin, path: str, headers: dict[str, str]) -> _Reply:
        conn, reused = self._pool.get(origin)
        try:
            conn.request(method, path, headers=headers)
            response = conn.getresponse()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError,
                ssl.SSLEOFError):  # fmt: skip
            conn.close()
            if not reused:
                raise
            # A kept-alive connection the server had closed meanwhile: once more on a new one
            # (not a retry: the request never reached a live server).
            conn, _ = self._pool.get(origin, fresh=True)
            try:
                conn.request(method, path, headers=headers)
                response = conn.getresponse()
            except BaseException:
                conn.close()
                raise
        except BaseException:
            conn.close()
            raise
        return _Reply(response, conn, origin)

    def _release(self, reply: _Reply, reusable: bool) -> None:
        """Back to the pool when its response was read to the end, else closed."""
        if reusable and reply.response.isclosed() and not reply.response.will_close:
            self._pool.put(reply.origin, reply.conn)
        else:
            reply.conn.close()

    def _take(self, reply: _Reply, n: int) -> bytes:
        """Up to `n` bytes of the body; IncompleteRead when it ends short of its Content-Length
        (http.client returns a cut-off body short, without raising)."""
        response = reply.response
        expected = n if response.length is None else min(n, response.length)
        data = response.read(n)
        if len(data) < expected:
            raise http.client.IncompleteRead(data, expected - len(data))
        return data

    def _raise_for_retry(self, reply: _Reply) -> None:
        status = reply.status
        if status == 429 or 500 <= status <= 599:
            raise _Retry(status, retry_after_s(reply.header("Retry-After")))

    def _with_retries(self, what: str, attempt: Callable[[], T]) -> T:
        last: BaseException | None = None
        for n in range(1, self.retries + 1):
            try:
                return attempt()
            except _Retry as exc:
                last = exc
                if exc.retry_after is not None and exc.retry_after > MAX_RETRY_AFTER_S:
                    raise StoreError(
                        f"{self.display}: {what}: the server answered {exc.status} and asks to "
                        f"wait {exc.retry_after:.0f} s: try later",
                        kind="throttled",
                    ) from None
            except ssl.SSLCertVerificationError as exc:
                raise self._tls_error(exc) from None
            except socket.gaierror as exc:
                last = exc
                if exc.errno != socket.EAI_AGAIN:  # a name that does not resolve stays so
                    break
            except (OSError, http.client.HTTPException) as exc:
                last = exc
            if n == self.retries:
                break
            if isinstance(last, _Retry) and last.retry_after is not None:
                delay = last.retry_after
            else:
                # Full jitter: readers throttled together do not come back together.
                delay = min(MAX_BACKOFF_S, self.retry_base_s * 2 ** (n - 1))
                delay *= 0.5 + random.random() / 2  # noqa: S311 - jitter, not a secret
            log.info("%s: %s: %s; retrying in %.2f s", self.display, what, self._why(last),
                     delay)  # fmt: skip
            self._sleep(delay)
        if isinstance(last, _Retry):
            raise StoreError(
                f"{self.display}: {what}: the server answered {self._why(last)} "
                f"{self.retries} times: throttled or overloaded, try later or lower the "
                "parallelism",
                kind="throttled",
            )
        raise StoreError(
            f"{self.display}: {what}: cannot reach {self._target()}: {self._why(last)}",
            kind="error",
        )

    def _target(self) -> str:
        proxy = self._pool.proxy
        if proxy is not None and proxy.applies(self.origin.host):
            return f"{self.origin.netloc} through the proxy {proxy.host}:{proxy.port}"
        return self.origin.netloc

    @staticmethod
    def _why(exc: BaseException | None) -> str:
        if isinstance(exc, _Retry):
            return f"{exc.status} {HttpsStore._phrase(exc.status)}"
        if isinstance(exc, http.client.IncompleteRead):
            return "the connection closed in the middle of the answer"
        if isinstance(exc, http.client.RemoteDisconnected):
            return "the server closed the connection without answering"
        if isinstance(exc, TimeoutError):
            return "timed out"
        if isinstance(exc, OSError) and exc.strerror:
            return _one_line(exc.strerror)
        return _one_line(exc) or type(exc).__name__

    def _tls_error(self, exc: ssl.SSLCertVerificationError) -> StoreError:
        reason = _one_line(exc.verify_message or exc.reason or "verification failed")
        if "hostname" in reason.lower():
            return StoreError(
                f"{self.display}: the TLS certificate of {self.origin.netloc} is for another "
                f"host ({reason})",
                kind="error",
            )
        trusted = f" (trusting only what {self._trust} names)" if self._trust else ""
        return StoreError(
            f"{self.display}: TLS certificate not trusted ({reason}){trusted}: set "
            f"SSL_CERT_FILE or {CA_BUNDLE_ENV} to a PEM file with the server's CA",
            kind="error",
        )

    @staticmethod
    def _phrase(status: int) -> str:
        try:
            return HTTPStatus(status).phrase
        except ValueError:
            return ""

    def _status_error(self, status: int, what: str) -> StoreError:
        if status == 401:
            hint = (
                "the server refused the credentials"
                if self._auth is not None
                else f"the server wants credentials: set {TOKEN_ENV} (a bearer token) or put "
                "user:password@ in the URL"
            )
            return StoreError(f"{self.display}: {what}: {hint} (401)", kind="access_denied")
        if status == 403:
            return StoreError(
                f"{self.display}: {what}: access denied (403): check that these credentials "
                "may read it",
                kind="access_denied",
            )
        if status in (404, 410):
            return StoreError(f"{self.display}: {what}: not found ({status})", kind="not_found")
        if status == 412:
            return StoreError(
                f"{self.display}: {what}: the file changed on the server since it was listed "
                "(its ETag no longer matches): fetch again",
                kind="changed",
            )
        phrase = self._phrase(status)
        return StoreError(
            f"{self.display}: {what}: the server answered {status}{' ' + phrase if phrase else ''}",
            kind="error",
        )
