"""A real S3 API for tests: moto's standalone server in its own process, and a fault proxy in
front of it that answers the errors a real store gives (503 SlowDown, 429, ExpiredToken).

    with MotoS3() as s3:                       # moto_server on a free port, killed at exit
        client = s3.client()                   # boto3, pointed at it through endpoint_url
        with S3Faults(s3.url) as faults:       # http://127.0.0.1:<port>, forwarding to moto
            faults.fail("GET", "/bucket/key", status=503, code="SlowDown", times=2)
            ... point a client at faults.url ...
            faults.requests                    # (method, path, Range header) as they arrived

The proxy forwards requests byte for byte (moto does not check signatures), so a client sees
moto's own answers except for the failures planned, each taken once by the first request whose
method and path match.
"""

from __future__ import annotations

import fnmatch
import http.client
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "AKIATESTPREFLIGHT000",
    "AWS_SECRET_ACCESS_KEY": "test-secret-key-never-printed-0000000000",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class MotoS3:
    """moto_server (S3 only is used) on a free loopback port, as a separate process."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        binary = Path(sys.executable).parent / "moto_server"
        self._proc = subprocess.Popen(
            [str(binary), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **CREDENTIALS},
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self._proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.__exit__()
        raise RuntimeError("moto_server did not start listening within 30 s")

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()

    def environ(self, url: str | None = None) -> dict[str, str]:
        """What a user's environment holds to reach this endpoint (boto3's standard names)."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": url or self.url}

    def client(self, url: str | None = None, **config: Any) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=url or self.url,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
            config=Config(**config) if config else None,
        )

    def reset(self) -> None:
        """Forget every bucket (moto's reset API)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request("POST", "/moto-api/reset")
        conn.getresponse().read()
        conn.close()


@dataclass
class _Fault:
    method: str
    path: str  # fnmatch pattern
    status: int
    code: str
    times: int
    retry_after: str | None


class S3Faults:
    """A forwarding proxy to an S3 endpoint that injects planned error answers."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.removeprefix("http://").partition(":")
        self._upstream = (host, int(port))
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        self.requests: list[tuple[str, str, str | None]] = []
        self.failed = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                owner._serve(self)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> Self:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def fail(
        self,
        method: str,
        path: str,
        *,
        status: int = 503,
        code: str = "SlowDown",
        times: int = 1,
        retry_after: str | None = None,
    ) -> None:
        with self._lock:
            self._faults.append(_Fault(method, path, status, code, times, retry_after))

    def _take(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if (
                    fault.times > 0
                    and fault.method in (method, "*")
                    and fnmatch.fnmatchcase(path.partition("?")[0], fault.path)
                ):
                    fault.times -= 1
                    self.failed += 1
                    return fault
        return None

    def _serve(self, req: BaseHTTPRequestHandler) -> None:
        length = int(req.headers.get("Content-Length") or 0)
        body = req.rfile.read(length) if length else b""
        with self._lock:
            self.requests.append((req.command, req.path, req.headers.get("Range")))
        fault = self._take(req.command, req.path)
        if fault is not None:
            xml = (
                f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{fault.code}</Code>'
                f"<Message>injected {fault.code}</Message><RequestId>test</RequestId></Error>"
            ).encode()
            req.send_response(fault.status)
            req.send_header("Content-Type", "application/xml")
            if fault.retry_after is not None:
                req.send_header("Retry-After", fault.retry_after)
            req.send_header("Content-Length", str(0 if req.command == "HEAD" else len(xml)))
            req.end_headers()
            if req.command != "HEAD":
                req.wfile.write(xml)
            return
        conn = http.client.HTTPConnection(*self._upstream, timeout=60)
        try:
            headers = {k: v for k, v in req.headers.items() if k.lower() != "connection"}
            conn.request(req.command, req.path, body=body or None, headers=headers)
            answer = conn.getresponse()
            data = answer.read()
            req.send_response(answer.status)
            for key, value in answer.getheaders():
                if key.lower() not in ("connection", "transfer-encoding", "content-length"):
                    req.send_header(key, value)
            length_header = answer.getheader("Content-Length")
            req.send_header(
                "Content-Length",
                (length_header or "0") if req.command == "HEAD" else str(len(data)),
            )
            req.end_headers()
            if req.command != "HEAD":
                req.wfile.write(data)
        finally:
            conn.close()
