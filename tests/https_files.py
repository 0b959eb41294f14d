"""A local HTTPS file server for the https:// store's tests: a directory over TLS, in a thread.

    with HttpsFiles(root, prefix="/models/tiny/") as files:  # https://127.0.0.1:PORT/models/tiny/
        files.url                        # the base URL `root` is served under (ends with /)
        files.ca_file                    # PEM of the throwaway CA that signed its certificate
        files.fail("weights.bin", 503, times=2, retry_after="1")
        files.token = "t0k3n"            # or files.basic = ("user", "pass"): else 401
        files.ignore_range = True        # answer every GET 200 with the whole file
        files.head_allowed = False       # HEAD answers 405
        files.max_range = 4096           # a 206 carries at most this many bytes (some CDNs)
        files.redirect("old.bin", "https://127.0.0.1:<port>/models/tiny/weights.bin")
        files.requests                   # what arrived, in order (method, path, rel, headers,
        files.requests_for("weights.bin")  #  status), recorded before each answer is sent
        files.connections                # TLS connections accepted (keep-alive shows here)

It answers GET and HEAD as a static file server does: one `Range: bytes=` range (206 with
Content-Range, 416 `bytes */size` past the end), a strong ETag of size and mtime and
Last-Modified, If-Match (412 when it does not match), keep-alive (HTTP/1.1), and 404 for
anything outside `prefix` or `root`. A failure planned with `fail` is taken by the next
`times` requests for that file (any method), before authentication is checked.

The certificate is made at start with `cryptography`: a CA, and a server certificate it signs
for 127.0.0.1 and localhost (CN and SAN). A client that does not trust `ca_file` fails the
handshake; the server counts it in `tls_failures`.

`ConnectProxy` is an HTTP CONNECT proxy for the proxy tests: it tunnels to any target and
records the targets and Proxy-Authorization headers it was sent.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import re
import shutil
import socket
import ssl
import sys
import tempfile
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import unquote

BLOCK = 64 * 1024
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_QUIET = (ConnectionError, ssl.SSLError, TimeoutError, OSError)
"""What a client hanging up or refusing the certificate raises in the server: not a bug."""


@dataclass(frozen=True)
class Request:
    """One request as it arrived."""

    method: str
    path: str
    """As sent: still %-escaped, with any query."""
    rel: str | None
    """The file under `prefix` it names (unescaped); None when it names none."""
    headers: dict[str, str]
    status: int


@dataclass
class _Failure:
    status: int
    retry_after: str | None


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key) PEM files for 127.0.0.1/localhost."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.now(UTC)

    def usage(*, ca: bool) -> x509.KeyUsage:
        return x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=ca,
            crl_sign=ca,
            encipher_only=False,
            decipher_only=False,
        )

    # EC keys: made in microseconds, where RSA keys would cost each test tens of milliseconds.
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "preflight test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName(
        [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "server.pem", directory / "server-key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() does not wait for kept-alive connections to go idle

    def __init__(self, files: HttpsFiles, context: ssl.SSLContext) -> None:
        self.files = files
        self.context = context
        super().__init__(("127.0.0.1", 0), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], _QUIET):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the store's connection pool is exercised
    timeout = 10  # an idle kept-alive connection's thread ends
    server: _Server

    def setup(self) -> None:
        # The handshake in this connection's thread, not the accepting one: a client that
        # refuses the certificate holds up no one else.
        try:
            self.request = self.server.context.wrap_socket(self.request, server_side=True)
        except _QUIET:
            self.server.files._count(tls_failure=True)
            raise
        self.server.files._count(tls_failure=False)
        super().setup()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.request.close()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _serve(self, *, head: bool) -> None:
        files = self.server.files
        rel = files._rel(self.path.split("?", 1)[0])
        asked = {name.title(): value for name, value in self.headers.items()}  # Range, If-Match
        status, headers, body = files._answer(self.command, rel, asked)
        files._record(Request(self.command, self.path, rel, asked, status))
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if head:
                return
            if isinstance(body, bytes):
                self.wfile.write(body)
                return
            path, start, length = body
            with path.open("rb") as fh:
                fh.seek(start)
                while length > 0:
                    block = fh.read(min(BLOCK, length))
                    if not block:
                        break
                    self.wfile.write(block)
                    length -= len(block)
        except _QUIET:
            self.close_connection = True  # the client hung up mid-answer (it may mean to)


class HttpsFiles:
    """Serves `root` under `prefix` at https://127.0.0.1:<port>, from start() to stop()."""

    def __init__(self, root: Path, *, prefix: str = "/") -> None:
        self.root = Path(root)
        inner = prefix.strip("/")
        self.prefix = f"/{inner}/" if inner else "/"
        self.ignore_range = False
        self.head_allowed = True
        self.send_etag = True
        self.max_range: int | None = None
        self.token: str | None = None
        self.basic: tuple[str, str] | None = None
        self.requests: list[Request] = []
        self.connections = 0
        self.tls_failures = 0
        self._failures: dict[str, list[_Failure]] = {}
        self._redirects: dict[str, str] = {}
        self._lock = threading.Lock()
        self._dir = Path(tempfile.mkdtemp(prefix="https-files-"))
        self.ca_file, cert, key = make_certificates(self._dir)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        self._server = _Server(self, context)
        self.port: int = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}{self.prefix}"

    def start(self) -> Self:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="https-files",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- what a test plans and reads ----------------------------------------------------------

    def fail(
        self, rel: str, status: int, *, times: int = 1, retry_after: str | None = None
    ) -> None:
        """The next `times` requests for `rel` answer `status` (with Retry-After when given)."""
        with self._lock:
            self._failures.setdefault(rel, []).extend(
                _Failure(status, retry_after) for _ in range(times)
            )

    def redirect(self, rel: str, location: str) -> None:
        """Requests for `rel` answer 302 to `location` (absolute or relative)."""
        self._redirects[rel] = location

    def requests_for(self, rel: str, method: str | None = None) -> list[Request]:
        with self._lock:
            return [
                r for r in self.requests if r.rel == rel and (method is None or r.method == method)
            ]

    # --- the server's side --------------------------------------------------------------------

    def _count(self, *, tls_failure: bool) -> None:
        with self._lock:
            if tls_failure:
                self.tls_failures += 1
            else:
                self.connections += 1

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def _rel(self, path: str) -> str | None:
        path = unquote(path)
        if not path.startswith(self.prefix):
            return None
        rel = path[len(self.prefix) :]
        if any(part in ("", ".", "..") for part in rel.split("/")) or "\\" in rel:
            return None
        return rel

    def _authorized(self, headers: dict[str, str]) -> bool:
        if self.token is None and self.basic is None:
            return True
        got = headers.get("Authorization", "")
        if self.token is not None and got == f"Bearer {self.token}":
            return True
        if self.basic is not None:
            pair = f"{self.basic[0]}:{self.basic[1]}".encode()
            return got == "Basic " + base64.b64encode(pair).decode()
        return False

    def _answer(
        self, method: str, rel: str | None, headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes | tuple[Path, int, int]]:
        """(status, headers, body: bytes or (file, offset, length))."""

        def plain(status: int, **extra: str) -> tuple[int, dict[str, str], bytes]:
            text = f"{status}\n".encode()
            return status, {"Content-Type": "text/plain", "Content-Length": str(len(text)),
                            **extra}, text  # fmt: skip

        with self._lock:
            planned = self._failures.get(rel or "")
            failure = planned.pop(0) if planned else None
        if failure is not None:
            extra = {"Retry-After": failure.retry_after} if failure.retry_after else {}
            return plain(failure.status, **extra)
        if not self._authorized(headers):
            scheme = "Bearer" if self.token is not None else 'Basic realm="files"'
            return plain(401, **{"WWW-Authenticate": scheme})
        if rel is not None and rel in self._redirects:
            return plain(302, Location=self._redirects[rel])
        path = self.root / rel if rel is not None else None
        if path is None or not path.is_file() or path.is_symlink():
            return plain(404)
        if method == "HEAD" and not self.head_allowed:
            return plain(405, Allow="GET")
        st = path.stat()
        size = st.st_size
        etag = f'"{size:x}-{st.st_mtime_ns:x}"'
        common = {
            "Content-Type": "application/octet-stream",
            "Last-Modified": formatdate(st.st_mtime, usegmt=True),
            "Accept-Ranges": "none" if self.ignore_range else "bytes",
        }
        if self.send_etag:
            common["ETag"] = etag
        if_match = headers.get("If-Match")
        matches = [t.strip() for t in (if_match or "").split(",")]
        if if_match is not None and "*" not in matches and etag not in matches:
            return plain(412)
        found = _RANGE.fullmatch(headers.get("Range", "").strip())
        if found and not self.ignore_range and (found.group(1) or found.group(2)):
            first, last = found.group(1), found.group(2)
            if first:
                start = int(first)
                end = min(int(last) + 1, size) if last else size
            else:  # bytes=-N: the last N bytes
                start, end = max(0, size - int(last)), size
            if start >= size or end <= start:
                return plain(416, **{"Content-Range": f"bytes */{size}"})
            if self.max_range is not None:
                end = min(end, start + self.max_range)
            return (
                206,
                common
                | {
                    "Content-Range": f"bytes {start}-{end - 1}/{size}",
                    "Content-Length": str(end - start),
                },
                (path, start, end - start),
            )
        return 200, common | {"Content-Length": str(size)}, (path, 0, size)


class ConnectProxy:
    """An HTTP CONNECT proxy on 127.0.0.1:<port>: `url`, and what it was asked (`tunnels`:
    "host:port" targets; `proxy_auth`: each Proxy-Authorization header, or None)."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.tunnels: list[str] = []
        self.proxy_auth: list[str | None] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._accept, name="connect-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping = True
        # Closing a socket does not wake a thread blocked in its accept(): a connection does.
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        self._thread.join(timeout=5)
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._stopping:
                client.close()
                return
            threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

    def _tunnel(self, client: socket.socket) -> None:
        with client:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(4096)
                if not chunk:
                    return
                head += chunk
            lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            fields = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
            self.tunnels.append(target)
            self.proxy_auth.append(fields.get("Proxy-Authorization"))
            if method != "CONNECT":
                client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                return
            host, _, port = target.rpartition(":")
            try:
                upstream = socket.create_connection((host, int(port)), timeout=10)
            except OSError:
                client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                return
            with upstream:
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                back = threading.Thread(target=_pipe, args=(upstream, client), daemon=True)
                back.start()
                _pipe(client, upstream)
                back.join(timeout=10)


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(BLOCK):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)
