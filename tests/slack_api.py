"""A local HTTP server shaped like Slack's Web API and incoming webhooks, for delivery tests.

    async with SlackApi() as slack:            # http://127.0.0.1:<port>/api/ and /hooks/...
        slack.fail("chat.postMessage", status=429, times=1, retry_after="1")
        ... point slack-sdk at slack.base_url / slack.webhook_url ...
        slack.calls_to("chat.postMessage")     # what arrived, in order

It also serves as a generic webhook receiver (`/webhook/<name>`), recording raw bodies and
headers so a test can check HMAC signatures. Failures are queued per method: each matching
request takes one planned failure until none are left, then the method answers normally.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self

from aiohttp import web

TOKEN = "xoxb-test-0000-secret-token"


@dataclass
class Call:
    """One request as it arrived."""

    method: str
    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body or b"{}")
        return data


@dataclass
class Failure:
    status: int
    retry_after: str | None = None
    error: str | None = None


@dataclass
class SlackApi:
    """The fake server; `token` is the only bot token it accepts."""

    token: str = TOKEN
    calls: list[Call] = field(default_factory=list)
    failures: dict[str, list[Failure]] = field(default_factory=dict)
    port: int = 0
    listeners: list[Callable[[Call], None]] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    _ts: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    @property
    def webhook_url(self) -> str:
        """An incoming-webhook URL (Slack's hold a secret path, like this one)."""
        return f"http://127.0.0.1:{self.port}/hooks/T000/B000/webhook-secret-path"

    def receiver_url(self, name: str = "ops") -> str:
        return f"http://127.0.0.1:{self.port}/webhook/{name}"

    def fail(
        self,
        method: str,
        *,
        status: int,
        times: int = 1,
        retry_after: str | None = None,
        error: str | None = None,
    ) -> None:
        """The next `times` requests to `method` (e.g. `chat.postMessage`, `incoming-webhook`,
        `webhook/ops`) answer `status` (with Retry-After, or Slack's `ok: false` `error`)."""
        self.failures.setdefault(method, []).extend(
            Failure(status, retry_after, error) for _ in range(times)
        )

    def calls_to(self, method: str, *, ok: bool = True) -> list[Call]:
        """Calls to `method`; `ok=True`: only those that were answered with success."""
        return [c for c in self.calls if c.method == method and (not ok or c.status == 200)]

    async def __aenter__(self) -> Self:
        app = web.Application()
        app.router.add_post("/api/{method}", self._api)
        app.router.add_post("/hooks/{path:.*}", self._incoming_webhook)
        app.router.add_post("/webhook/{name}", self._receiver)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _planned(self, method: str) -> Failure | None:
        queue = self.failures.get(method)
        return queue.pop(0) if queue else None

    def _record(self, method: str, request: web.Request, body: bytes, status: int) -> None:
        call = Call(method, dict(request.headers), body, status)
        self.calls.append(call)
        for listener in self.listeners:
            listener(call)

    def _failure_response(self, failure: Failure) -> web.Response:
        headers = {"Retry-After": failure.retry_after} if failure.retry_after else {}
        if failure.error:
            body = {"ok": False, "error": failure.error}
            return web.json_response(body, status=failure.status, headers=headers)
        if failure.status == 429:
            body = {"ok": False, "error": "ratelimited"}
            return web.json_response(body, status=429, headers=headers)
        return web.Response(status=failure.status, text="upstream trouble", headers=headers)

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        body = await request.read()
        if (failure := self._planned(method)) is not None:
            self._record(method, request, body, failure.status)
            return self._failure_response(failure)
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            self._record(method, request, body, 200)
            return web.json_response({"ok": False, "error": "invalid_auth"})
        self._record(method, request, body, 200)
        payload: dict[str, Any] = json.loads(body) if body else {}
        if method == "auth.test":
            return web.json_response({"ok": True, "team": "T", "user": "preflight-bot"})
        if method == "chat.postMessage":
            channel = str(payload.get("channel", ""))
            if channel.startswith("#missing"):
                return web.json_response({"ok": False, "error": "channel_not_found"})
            channel_id = "C" + channel.lstrip("#").upper().replace("-", "")[:10]
            ts = f"1700000000.{next(self._ts):06d}"
            return web.json_response({"ok": True, "channel": channel_id, "ts": ts})
        if method == "chat.update":
            return web.json_response(
                {"ok": True, "channel": payload.get("channel"), "ts": payload.get("ts")}
            )
        return web.json_response({"ok": False, "error": "unknown_method"}, status=404)

    async def _incoming_webhook(self, request: web.Request) -> web.Response:
        body = await request.read()
        if (failure := self._planned("incoming-webhook")) is not None:
            self._record("incoming-webhook", request, body, failure.status)
            return self._failure_response(failure)
        self._record("incoming-webhook", request, body, 200)
        return web.Response(text="ok")

    async def _receiver(self, request: web.Request) -> web.Response:
        method = f"webhook/{request.match_info['name']}"
        body = await request.read()
        if (failure := self._planned(method)) is not None:
            self._record(method, request, body, failure.status)
            return self._failure_response(failure)
        self._record(method, request, body, 200)
        return web.Response(status=204)
