"""A local HTTP server shaped like the Hugging Face Hub's model API and file downloads.

    with HubApi() as hub:                                      # hub.endpoint: http://127.0.0.1:<port>
        commit = hub.add_repo("acme/chat-7b", Path("model/"))  # main -> a commit of those files
        hub.fail("resolve", status=503, times=2, retry_after="0")
        store = HubStore("hf://acme/chat-7b", endpoint=hub.endpoint, token=hub.token)
        hub.requests_to("resolve")                             # what arrived, in order
        hub.bytes_served                                       # file bytes sent in GET bodies

What huggingface_hub 2.4 calls, answered as the Hub answers it:

    GET  /api/models/{org}/{name}[/revision/{rev}]?blobs=True    model_info(files_metadata=True):
         `sha` (the commit) and `siblings` [{rfilename, size, blobId, lfs: {size, sha256,
         pointerSize}}]; without `blobs`, siblings are names only. The revision arrives quoted
         (`refs%2Fpr%2F1`).
    GET|HEAD /{org}/{name}/resolve/{rev}/{path}                  a file at a branch, tag or commit:
         Range (206 + Content-Range, 416 past the end), X-Repo-Commit, ETag; an LFS file
         answers 302 to the CDN instead (X-Linked-Size, X-Linked-Etag), as the Hub does.
    GET|HEAD {cdn_endpoint}/cdn/{sha256}                         the CDN: another port, so
         another origin; like a presigned S3 URL it refuses (400) a request that carries an
         Authorization header, so a client that leaks the token there fails, and (403) any
         method but GET, the one its URLs are signed for.

Errors carry the headers huggingface_hub's `hf_raise_for_status` keys on: X-Error-Code
`RepoNotFound` (401 without a token, 404 with one: a private repo looks missing),
`RevisionNotFound`, `EntryNotFound`, `GatedRepo` (file downloads only: a gated repo's listing is
public, its files need an account that accepted the conditions, `hub.accept(repo, token)`), and
X-Error-Message "Invalid credentials in Authorization header" (401) for an unknown token.

`hub.token` reads every private repo; `hub.outsider` is a valid token that reads none.
`add_repo` again on the same repo and revision makes a new commit and moves the branch: the old
commit stays readable by its sha. Failures are queued per target (`api`, `resolve`, `cdn`, or a
glob on the path): each matching request takes one until none are left. `hub.honor_range =
False` makes file answers ignore Range (200, the whole file), as some servers do.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote, unquote

from aiohttp import web

TOKEN = "hf_testOwnerToken0000000000000000000"
OUTSIDER = "hf_testOutsiderToken00000000000000"
LFS_THRESHOLD = 1024
"""Files larger than this (or with a weights suffix) are stored in LFS, as the Hub's default
.gitattributes and its 10 MB rule do at a smaller scale."""
LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".onnx", ".h5", ".msgpack")


@dataclass(frozen=True)
class Seen:
    """One request as it arrived."""

    site: str
    """hub | cdn"""
    method: str
    path: str
    """Decoded path, without the query."""
    raw_path: str
    """As sent, query included."""
    headers: dict[str, str]
    status: int

    @property
    def target(self) -> str:
        """api | resolve | cdn"""
        if self.site == "cdn":
            return "cdn"
        return "api" if self.path.startswith("/api/") else "resolve"


@dataclass
class Failure:
    match: str
    status: int
    retry_after: str | None


@dataclass
class _File:
    data: bytes
    blob_id: str
    sha256: str
    lfs: bool
    pointer_size: int


@dataclass
class _Repo:
    private: bool
    gated: bool
    refs: dict[str, str] = field(default_factory=dict)
    """Branch or tag -> commit sha."""
    commits: dict[str, dict[str, _File]] = field(default_factory=dict)
    accepted: set[str] = field(default_factory=set)
    """Tokens whose accounts accepted a gated repo's conditions."""


def git_blob_id(data: bytes) -> str:
    """The git object id of a blob: sha1 of `blob <size>\\0<data>`."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    """The git-lfs pointer file that git stores in place of an LFS file."""
    sha = hashlib.sha256(data).hexdigest()
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n"
    ).encode()


def _file(rel: str, data: bytes) -> _File:
    lfs = len(data) > LFS_THRESHOLD or rel.endswith(LFS_SUFFIXES)
    pointer = lfs_pointer(data)
    return _File(
        data=data,
        # git stores the pointer, not the content, for an LFS file: its blob id is the pointer's
        blob_id=git_blob_id(pointer if lfs else data),
        sha256=hashlib.sha256(data).hexdigest(),
        lfs=lfs,
        pointer_size=len(pointer),
    )


class HubApi:
    """The fake Hub, serving from a background thread so synchronous tests can call it."""

    def __init__(self, *, token: str = TOKEN, outsider: str = OUTSIDER) -> None:
        self.token = token
        self.outsider = outsider
        self.repos: dict[str, _Repo] = {}
        self.requests: list[Seen] = []
        self.failures: list[Failure] = []
        self.bytes_served = 0
        self.honor_range = True
        self.lfs_redirect = True
        """LFS files answer 302 to the CDN (the Hub's way); False: served in place."""
        self.port = 0
        self.cdn_port = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runners: list[web.AppRunner] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def cdn_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.cdn_port}"

    # --- what a test sets up ------------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        directory: Path,
        *,
        revision: str = "main",
        private: bool = False,
        gated: bool = False,
    ) -> str:
        """Commit every file under `directory` and point `revision` at it; the commit sha."""
        files = {
            path.relative_to(directory).as_posix(): _file(
                path.relative_to(directory).as_posix(), path.read_bytes()
            )
            for path in sorted(directory.rglob("*"))
            if path.is_file()
        }
        tree = "\n".join(f"{rel} {f.blob_id}" for rel, f in sorted(files.items()))
        commit = hashlib.sha1(f"{repo_id}\n{tree}".encode(), usedforsecurity=False).hexdigest()
        with self._lock:
            repo = self.repos.setdefault(repo_id, _Repo(private=private, gated=gated))
            repo.private, repo.gated = private, gated
            repo.commits[commit] = files
            repo.refs[revision] = commit
        return commit

    def accept(self, repo_id: str, token: str) -> None:
        """The token's account accepts a gated repo's conditions."""
        with self._lock:
            self.repos[repo_id].accepted.add(token)

    def fail(
        self, match: str, *, status: int = 503, times: int = 1, retry_after: str | None = None
    ) -> None:
        """The next `times` requests to `match` (api | resolve | cdn, or a glob on the decoded
        path such as `*/config.json`) answer `status` (with Retry-After when given)."""
        with self._lock:
            self.failures.extend(Failure(match, status, retry_after) for _ in range(times))

    def requests_to(self, target: str) -> list[Seen]:
        """Requests to api | resolve | cdn (or matching a glob on the path), in order."""
        with self._lock:
            return [s for s in self.requests if _matches(target, s)]

    # --- running ------------------------------------------------------------------------------

    def start(self) -> Self:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="hub-api", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), loop).result(timeout=10)
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def _serve(self) -> None:
        hub = web.Application()
        # One catch-all route: the Hub's paths hold quoted revisions (refs%2Fpr%2F1) that a
        # router would split or decode before we see them, so the raw path is parsed here.
        hub.router.add_route("*", "/{tail:.*}", self._hub)
        cdn = web.Application()
        cdn.router.add_route("*", "/{tail:.*}", self._cdn)
        self.port = await self._listen(hub)
        self.cdn_port = await self._listen(cdn)

    async def _listen(self, app: web.Application) -> int:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._runners.append(runner)
        server = site._server
        assert server is not None
        port: int = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        return port

    async def _shutdown(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()

    # --- answering ----------------------------------------------------------------------------

    def _record(self, site: str, request: web.Request, response: web.StreamResponse) -> None:
        seen = Seen(
            site=site,
            method=request.method,
            path=request.path,
            raw_path=request.raw_path,
            headers=dict(request.headers),
            status=response.status,
        )
        with self._lock:
            self.requests.append(seen)

    def _planned(self, site: str, request: web.Request) -> web.Response | None:
        probe = Seen(site, request.method, request.path, request.raw_path, {}, 0)
        with self._lock:
            for i, failure in enumerate(self.failures):
                if _matches(failure.match, probe):
                    del self.failures[i]
                    break
            else:
                return None
        headers = {"Retry-After": failure.retry_after} if failure.retry_after else {}
        if failure.status == 429:
            return _error(429, "Too Many Requests", headers=headers)
        return web.Response(status=failure.status, text="upstream trouble", headers=headers)

    async def _hub(self, request: web.Request) -> web.StreamResponse:
        response = self._planned("hub", request) or self._answer(request)
        self._record("hub", request, response)
        return response

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        response = self._planned("cdn", request) or self._cdn_answer(request)
        self._record("cdn", request, response)
        return response

    def _answer(self, request: web.Request) -> web.Response:
        parts = [unquote(p) for p in request.raw_path.partition("?")[0].split("/")[1:]]
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405)
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            # /api/models/{org}/{name} or /api/models/{org}/{name}/revision/{rev}
            repo_id = f"{parts[2]}/{parts[3]}"
            if len(parts) == 4:
                return self._model_info(request, repo_id, "main")
            if len(parts) == 6 and parts[4] == "revision" and parts[5]:
                return self._model_info(request, repo_id, parts[5])
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(request, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        return _error(404, "Not Found")

    def _caller(self, request: web.Request) -> tuple[str | None, web.Response | None]:
        """(the token sent, or None; the 401 for one the Hub does not know)."""
        auth = request.headers.get("Authorization")
        if auth is None:
            return None, None
        token = auth.removeprefix("Bearer ").strip()
        if token not in (self.token, self.outsider):
            text = "Invalid credentials in Authorization header"
            return token, _error(401, text, message=text)
        return token, None

    def _visible(
        self, request: web.Request, repo_id: str, rev: str
    ) -> tuple[str | None, _Repo, str] | web.Response:
        """(token, repo, commit) when the caller may see the repo at `rev`, else the answer."""
        token, refused = self._caller(request)
        if refused is not None:
            return refused
        with self._lock:
            repo = self.repos.get(repo_id)
            commit = None
            if repo is not None:
                commit = repo.refs.get(rev) or (rev if rev in repo.commits else None)
        if repo is None or (repo.private and token != self.token):
            # The Hub does not tell a private repo from a missing one; without a token it
            # answers 401, with one 404.
            return _error(
                401 if token is None else 404,
                "Repository not found",
                code="RepoNotFound",
                message="Repository not found",
            )
        if commit is None:
            return _error(
                404, f"Invalid rev id: {rev}", code="RevisionNotFound", message="Invalid rev id"
            )
        return token, repo, commit

    def _model_info(self, request: web.Request, repo_id: str, rev: str) -> web.Response:
        seen = self._visible(request, repo_id, rev)
        if isinstance(seen, web.Response):
            return seen
        _, repo, commit = seen
        blobs = request.query.get("blobs", "").lower() == "true"
        siblings: list[dict[str, object]] = []
        for rel, f in sorted(repo.commits[commit].items()):
            sibling: dict[str, object] = {"rfilename": rel}
            if blobs:
                sibling.update(size=len(f.data), blobId=f.blob_id)
                if f.lfs:
                    sibling["lfs"] = {
                        "size": len(f.data),
                        "sha256": f.sha256,
                        "pointerSize": f.pointer_size,
                    }
            siblings.append(sibling)
        return web.json_response(
            {
                "_id": hashlib.md5(repo_id.encode(), usedforsecurity=False).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": repo_id.split("/")[0],
                "sha": commit,
                "lastModified": "2025-01-01T00:00:00.000Z",
                "private": repo.private,
                "gated": "manual" if repo.gated else False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
            }
        )

    def _resolve(self, request: web.Request, repo_id: str, rev: str, rel: str) -> web.Response:
        seen = self._visible(request, repo_id, rev)
        if isinstance(seen, web.Response):
            return seen
        token, repo, commit = seen
        if repo.gated and (token is None or token not in repo.accepted):
            message = (
                f"Access to model {repo_id} is restricted. You must have access to it and be "
                "authenticated to access it. Please log in."
                if token is None
                else f"Access to model {repo_id} is restricted and you are not in the authorized "
                f"list. Visit https://huggingface.co/{repo_id} to ask for access."
            )
            return _error(401 if token is None else 403, message, code="GatedRepo", message=message)
        f = repo.commits[commit].get(rel)
        if f is None:
            return _error(404, "Entry not found", code="EntryNotFound", message="Entry not found")
        headers = {"X-Repo-Commit": commit}
        if f.lfs and self.lfs_redirect:
            headers.update(
                {
                    "Location": f"{self.cdn_endpoint}/cdn/{f.sha256}?name={quote(rel, safe='')}",
                    "X-Linked-Size": str(len(f.data)),
                    "X-Linked-Etag": f'"{f.sha256}"',
                    "ETag": f'"{f.blob_id}"',
                }
            )
            return web.Response(status=302, headers=headers)
        headers["ETag"] = f'"{f.sha256 if f.lfs else f.blob_id}"'
        return self._content(request, f.data, headers)

    def _cdn_answer(self, request: web.Request) -> web.Response:
        if "Authorization" in request.headers:
            # What S3 says to a presigned URL that also carries a bearer token.
            return web.Response(
                status=400,
                text="<Error><Code>InvalidArgument</Code><Message>Only one auth mechanism "
                "allowed</Message></Error>",
                content_type="application/xml",
            )
        if request.method != "GET":
            # A presigned URL is signed for one method: a HEAD of a GET URL fails, as on S3.
            return web.Response(status=403, text="<Error><Code>SignatureDoesNotMatch</Code>")
        sha = request.path.removeprefix("/cdn/")
        with self._lock:
            found = [
                f
                for repo in self.repos.values()
                for files in repo.commits.values()
                for f in files.values()
                if f.sha256 == sha
            ]
        if not found:
            return web.Response(status=403, text="<Error><Code>AccessDenied</Code></Error>")
        return self._content(request, found[0].data, {"ETag": f'"{sha}"'})

    def _content(self, request: web.Request, data: bytes, headers: dict[str, str]) -> web.Response:
        """The file, or the part a Range names (206; 416 past the end)."""
        headers = {**headers, "Accept-Ranges": "bytes"}
        status, body = 200, data
        asked = request.headers.get("Range")
        if asked and self.honor_range:
            span = _range(asked, len(data))
            if span is None:
                headers["Content-Range"] = f"bytes */{len(data)}"
                return web.Response(status=416, headers=headers)
            first, last = span
            status, body = 206, data[first : last + 1]
            headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
        if request.method == "GET":
            with self._lock:
                self.bytes_served += len(body)
        return web.Response(status=status, body=body, headers=headers)


def _matches(match: str, seen: Seen) -> bool:
    if match in ("api", "resolve", "cdn"):
        return seen.target == match
    return fnmatch.fnmatchcase(seen.path, match)


def _range(header: str, size: int) -> tuple[int, int] | None:
    """(first, last) inclusive of one `bytes=` range, clipped to the file; None: unsatisfiable."""
    spec = header.strip().removeprefix("bytes=")
    first_s, _, last_s = spec.partition("-")
    if not first_s:  # bytes=-N: the last N bytes
        n = int(last_s)
        return (max(0, size - n), size - 1) if n > 0 and size > 0 else None
    first = int(first_s)
    last = min(int(last_s), size - 1) if last_s else size - 1
    return (first, last) if first < size and first <= last else None


def _error(
    status: int,
    error: str,
    *,
    code: str | None = None,
    message: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An error as the Hub sends it: JSON `{"error": ...}` and X-Error-* headers."""
    headers = dict(headers or {})
    if code is not None:
        headers["X-Error-Code"] = code
    if message is not None:
        headers["X-Error-Message"] = message
    return web.json_response({"error": error}, status=status, headers=headers)
