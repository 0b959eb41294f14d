"""hf://org/name[@revision] as a `Store`: a Hugging Face Hub model repo, pinned to one commit.

    store = HubStore("hf://acme/chat-7b@main")     # HF_ENDPOINT; HF_TOKEN or `hf auth login`
    objects = store.list()                          # main -> its commit, once, for this store
    head = store.read("model.safetensors", 0, 8)    # one ranged GET at that commit, counted

The listing is one model_info call with the files' metadata (size, blob id, LFS sha256). The
revision resolves to its commit sha on the first listing and every read names that commit, not
the branch: a branch pushed to mid-validation cannot mix two versions' files. A store is one
version; open a new one to see a newer commit.

Reads are ranged GETs of the file's resolve URL through huggingface_hub's HTTP session (its
proxies, certificates and offline switch apply). An LFS file redirects to a CDN: the Range goes
along, the token does not (httpx2 drops Authorization on a redirect to another origin). 429 and
5xx, and failed connections, are retried with exponential backoff honouring Retry-After; then a
one-line StoreError. No message names the token.
"""

from __future__ import annotations

import builtins
import os
import random
import re
import threading
import time
from collections.abc import Callable
from typing import Literal, TypeVar

import httpx2
from huggingface_hub import (
    HfApi,
    __version__,
    get_session,
    get_token,
    hf_hub_url,
    hf_raise_for_status,
)
from huggingface_hub.errors import (
    DisabledRepoError,
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from services.storage.base import ReadCounter, RemoteObject, StoreError, retry_after_s

T = TypeVar("T")

RETRIES = 6
BACKOFF_S = 0.2
"""First wait; doubled each retry (0.2 s ... 6.4 s: about 13 s in all without Retry-After)."""
MAX_SLEEP_S = 30.0
"""Cap on one wait, whatever Retry-After says: past it, failing with "throttled" tells the user
more than a validator that hangs."""
TIMEOUT_S = 60.0
"""Per request (connect, and between bytes): huggingface_hub's session has no timeout."""

_RATELIMIT_RESET = re.compile(r";\s*t\s*=\s*(\d+)")
"""The Hub's `RateLimit: "api";r=0;t=55` header: seconds until the window resets."""
_NAME = re.compile(r"(?!.*(--|\.\.))[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?", re.ASCII)
"""One half of a repo id, as huggingface_hub's validate_repo_id has it."""
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def parse(location: str) -> tuple[str, str | None]:
    """(repo_id, revision or None) of hf://org/name[@revision]."""
    rest = location.removeprefix("hf://")
    if not location.isprintable():  # a message stays one line, whatever was typed
        location = location.encode("unicode_escape").decode()
    repo_id, at, revision = rest.partition("@")
    repo_id = repo_id.rstrip("/")
    usage = "expected hf://ORG/NAME or hf://ORG/NAME@REVISION"
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts):
        raise StoreError(f"{location}: not a model repo ({usage})", kind="unsupported")
    if not all(_NAME.fullmatch(p) for p in parts) or repo_id.endswith(".git"):
        raise StoreError(
            f"{location}: {repo_id!r} is not a Hub repo id (letters, digits, '-', '_', '.'; "
            f"{usage})",
            kind="unsupported",
        )
    if at and not revision:
        raise StoreError(
            f"{location}: no revision after '@' (a branch, tag or commit sha; {usage})",
            kind="unsupported",
        )
    if at and (not revision.isprintable() or any(c.isspace() for c in revision)):
        raise StoreError(
            f"{location}: a revision has no spaces or control characters ({usage})",
            kind="unsupported",
        )
    return repo_id, revision if at else None


def _retryable(status: int) -> bool:
    return status == 429 or 500 <= status < 600


class _Retry(Exception):
    """An answer worth asking again (429, 5xx, a dropped connection)."""

    def __init__(self, status: int | None, retry_after: float | None) -> None:
        super().__init__(status)
        self.status = status
        self.retry_after = retry_after


def _retry_after_s(headers: httpx2.Headers) -> float | None:
    """Seconds the server asks us to wait: Retry-After (seconds or an HTTP date), else the
    reset of the Hub's RateLimit header; None when it says nothing."""
    if (seconds := retry_after_s(headers.get("Retry-After"))) is not None:
        return seconds
    if (found := _RATELIMIT_RESET.search(headers.get("RateLimit", ""))) is not None:
        return float(found.group(1))
    return None


class HubStore:
    """A Hub model repo at one commit. `token`: None resolves it as huggingface_hub does
    (HF_TOKEN, then the stored login); False sends none."""

    def __init__(
        self,
        location: str,
        *,
        endpoint: str | None = None,
        token: str | Literal[False] | None = None,
        retries: int = RETRIES,
        backoff_s: float = BACKOFF_S,
        max_sleep_s: float = MAX_SLEEP_S,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        self.repo_id, revision = parse(location)
        self.revision = revision or "main"
        self.display = f"hf://{self.repo_id}" + (f"@{revision}" if revision else "")
        self.reads = ReadCounter()
        self.one_file: str | None = None  # always a folder (a repo)
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_sleep_s = max_sleep_s
        self.timeout_s = timeout_s
        try:
            self._token = get_token() if token is None else (token or None)
        except Exception as exc:  # an OIDC exchange (HF_OIDC_RESOURCE) can fail here
            raise StoreError(
                f"{self.display}: cannot obtain a Hugging Face token ({type(exc).__name__}): "
                "check HF_TOKEN or `hf auth login`",
                kind="access_denied",
            ) from exc
        # HF_ENDPOINT read now, not only at huggingface_hub's import: a self-hosted hub set
        # after the library was first imported (a long-lived service, a test) is still used.
        endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
        self.api = HfApi(endpoint=endpoint, token=self._token or False, library_name="preflight")
        self.endpoint = self.api.endpoint
        # identity: a Range must count bytes of the file, not of a compressed rendering of it
        self._headers = {
            "User-Agent": f"preflight; hf_hub/{__version__}",
            "Accept-Encoding": "identity",
        }
        if self._token:
            self._headers["Authorization"] = f"Bearer {self._token}"
        self._lock = threading.Lock()
        self._objects: builtins.list[RemoteObject] | None = None
        self.commit: str | None = None
        """The commit sha the revision resolved to, after the first listing."""

    # --- the Store API ------------------------------------------------------------------------

    def list(self) -> list[RemoteObject]:
        with self._lock:
            if self._objects is None:
                self._objects = self._list()
            return list(self._objects)

    def read(self, rel: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        commit = self._pinned()
        url = hf_hub_url(self.repo_id, rel, revision=commit, endpoint=self.endpoint)
        headers = {**self._headers, "Range": f"bytes={start}-{end - 1}"}
        received = 0

        def attempt() -> bytes:
            nonlocal received
            with get_session().stream(
                "GET", url, headers=headers, timeout=self.timeout_s
            ) as answer:
                if answer.status_code == 416:  # starts at or past the end
                    return b""
                if answer.status_code not in (200, 206):
                    self._refuse(answer)
                kept = bytearray()
                # 206: the body starts at `start`. 200: the server ignored Range and sends the
                # file from 0: skip to `start`, and hang up once `end` is in (a 200 of a 10 GB
                # file must not be read whole for 8 bytes of it).
                at = start if answer.status_code == 206 else 0
                if answer.status_code == 206:
                    self._check_range(answer, rel, start)
                for chunk in answer.iter_bytes():
                    received += len(chunk)
                    lo, hi = max(start - at, 0), min(end - at, len(chunk))
                    if lo < hi:
                        kept += chunk[lo:hi]
                    at += len(chunk)
                    if at >= end:
                        break
                return bytes(kept)

        data = self._retrying(f"reading {rel}", attempt)
        # What came over the wire, not what was kept: a 200 that ignored Range costs its
        # prefix, and that is what the counter is for.
        self.reads.add(received)
        return data

    # --- listing ------------------------------------------------------------------------------

    def _list(self) -> builtins.list[RemoteObject]:
        info = self._retrying(
            "listing",
            lambda: self.api.model_info(
                self.repo_id,
                revision=self.revision,
                files_metadata=True,
                timeout=self.timeout_s,
            ),
        )
        if not info.sha:
            raise StoreError(f"{self.display}: the Hub named no commit for {self.revision!r}")
        commit = info.sha
        objects: list[RemoteObject] = []
        for sibling in info.siblings or []:
            size = sibling.lfs.size if sibling.lfs is not None else sibling.size
            if size is None:
                raise StoreError(
                    f"{self.display}: the Hub gave no size for {sibling.rfilename} (a mirror "
                    "without files metadata?)"
                )
            objects.append(
                RemoteObject(
                    rel=sibling.rfilename,
                    size=size,
                    # the git oid names this content at this commit (an LFS file's is its
                    # pointer's, which names the content too); else the commit does
                    version=sibling.blob_id or f"{commit}:{sibling.rfilename}",
                    sha256=sibling.lfs.sha256 if sibling.lfs is not None else None,
                )
            )
        if not objects:
            raise StoreError(f"{self.display}: no files at commit {commit[:12]}", kind="not_found")
        self.commit = commit
        if info.gated:
            # A gated repo's listing is public; its files need an account that accepted the
            # conditions. Ask once now, so that is said here rather than mid-download.
            self._probe(min(objects, key=lambda o: o.size).rel)
        return objects

    def _probe(self, rel: str) -> None:
        """A HEAD of one file at the commit: no body, not counted as a read. Redirects are not
        followed: the Hub decides access before it redirects, and a CDN's URL is signed for GET
        (huggingface_hub's own HEADs stop there too)."""
        assert self.commit is not None
        url = hf_hub_url(self.repo_id, rel, revision=self.commit, endpoint=self.endpoint)

        def attempt() -> None:
            answer = get_session().head(
                url, headers=self._headers, timeout=self.timeout_s, follow_redirects=False
            )
            if answer.status_code >= 400:
                self._refuse(answer)

        self._retrying("listing", attempt)

    def _check_range(self, answer: httpx2.Response, rel: str, start: int) -> None:
        """A 206 must start where asked: anything else is not the bytes the caller counts on."""
        found = _CONTENT_RANGE.match(answer.headers.get("Content-Range", ""))
        if found is not None and int(found.group(1)) != start:
            raise StoreError(
                f"{self.display}: reading {rel}: the Hub answered bytes from {found.group(1)} "
                f"to a read from {start}"
            )

    def _pinned(self) -> str:
        """The resolved commit, listing first if no listing has run yet."""
        if self.commit is None:
            self.list()
        assert self.commit is not None
        return self.commit

    # --- retries and errors -------------------------------------------------------------------

    def _refuse(self, answer: httpx2.Response) -> None:
        """Raise for an answer that is not the file: _Retry when worth asking again, else the
        HfHubHTTPError huggingface_hub makes of it (its X-Error-Code reading)."""
        answer.read()
        if _retryable(answer.status_code):
            raise _Retry(answer.status_code, _retry_after_s(answer.headers))
        hf_raise_for_status(answer)
        raise StoreError(  # a 1xx/3xx left over after redirects
            f"{self.display}: the Hub answered {answer.status_code} where a file was expected"
        )

    def _retrying(self, what: str, attempt: Callable[[], T]) -> T:
        for n in range(self.retries + 1):
            try:
                return attempt()
            except _Retry as retry:
                if n == self.retries:
                    raise self._throttled(what, retry.status) from None
                self._wait(n, retry.retry_after)
            except HfHubHTTPError as exc:  # from model_info: retryable ones come this way
                status = exc.response.status_code
                if not _retryable(status):
                    raise self._error(exc, what) from exc
                if n == self.retries:
                    raise self._throttled(what, status) from exc
                self._wait(n, _retry_after_s(exc.response.headers))
            except OfflineModeIsEnabled as exc:
                raise StoreError(
                    f"{self.display}: {what}: HF_HUB_OFFLINE is set in this process: unset it "
                    "to read hf:// locations"
                ) from exc
            except httpx2.TransportError as exc:
                if n == self.retries:
                    raise StoreError(
                        f"{self.display}: {what}: cannot reach the Hub at {self.endpoint} "
                        f"({type(exc).__name__}, {self.retries} retries): check "
                        "HF_ENDPOINT and the network"
                    ) from exc
                self._wait(n, None)
            except httpx2.HTTPError as exc:  # too many redirects, an undecodable body
                raise StoreError(
                    f"{self.display}: {what}: {type(exc).__name__} from the Hub at {self.endpoint}"
                ) from exc
        raise AssertionError("unreachable")

    def _wait(self, attempt: int, retry_after: float | None) -> None:
        if retry_after is None:
            # Jitter: the cache's reader threads, throttled together, should not return together.
            delay = self.backoff_s * 2**attempt * random.uniform(0.5, 1.0)  # noqa: S311
        else:
            delay = retry_after
        time.sleep(min(delay, self.max_sleep_s))

    def _throttled(self, what: str, status: int | None) -> StoreError:
        if status == 429:
            words = (
                "the Hub answered 429 Too Many Requests after retries: try later, lower the "
                "parallelism" + ("" if self._token else ", or set HF_TOKEN (higher limits)")
            )
        else:
            words = f"the Hub answered {status} after {self.retries} retries: try later"
        return StoreError(f"{self.display}: {what}: {words}", kind="throttled")

    def _error(self, exc: HfHubHTTPError, what: str) -> StoreError:
        page = f"{self.endpoint}/{self.repo_id}"
        status = exc.response.status_code
        kind, words = "error", ""
        if isinstance(exc, GatedRepoError):  # before RepositoryNotFoundError: a subclass of it
            kind = "gated"
            words = (
                f"gated: accept the conditions on {page} with the token's account"
                if self._token
                else f"gated: set HF_TOKEN to a token of an account that accepted the "
                f"conditions on {page}"
            )
        elif isinstance(exc, RepositoryNotFoundError):
            kind = "not_found"
            words = (
                "no such repo, or it is private and the token cannot see it: check the name "
                "and the token's access"
                if self._token
                else "no such repo, or it is private and the token cannot see it: set HF_TOKEN"
            )
        elif isinstance(exc, RevisionNotFoundError):
            kind = "bad_revision"
            words = (
                f"no revision {self.revision!r} in the repo: use a branch, tag or commit sha "
                "that exists"
            )
        elif isinstance(exc, RemoteEntryNotFoundError):
            kind = "not_found"
            words = f"no such file at commit {(self.commit or self.revision)[:12]}"
        elif isinstance(exc, DisabledRepoError):
            kind, words = "access_denied", "the repo is disabled on the Hub"
        elif status == 401:
            kind = "access_denied"
            words = (
                "the Hub refused the token (401): it is invalid, expired or revoked: check HF_TOKEN"
                if self._token
                else "the Hub asks for a token (401): set HF_TOKEN"
            )
        elif status == 403:
            kind = "access_denied"
            words = (
                "forbidden (403): the token may not read this repo (a fine-grained token needs "
                "read access to it)"
            )
        elif status == 404:
            kind, words = "not_found", "not found (404)"
        else:
            words = f"the Hub answered {status}"
            if exc.server_message:
                words += f": {self._clean(exc.server_message)}"
        return StoreError(f"{self.display}: {what}: {words}", kind=kind)

    def _clean(self, text: str) -> str:
        """A server's words, on one line, without the token, not too long."""
        if self._token:
            text = text.replace(self._token, "<token>")
        text = " ".join(text.split())
        return text if len(text) <= 200 else text[:197] + "..."
