"""A local HTTP server shaped like Slack's Web API and incoming webhooks, for delivery tests.

    async with SlackApi() as slack:            # http://127.0.0.1:<port>/api/ and /hooks/...
        slack.fail("chat.postMessage", status=429, times=1, retry_after="1")
        ... point slack-sdk at slack.base_url / slack.webhook_url ...
        slack.calls_to("chat.postMessage")     # what arrived, in order
        slack.messages_in("#deploys")          # what the channel shows now, oldest first

It keeps the messages it was sent, per channel, as Slack does: `chat.postMessage` stores text,
blocks and `metadata` (`{"event_type", "event_payload"}`), `chat.update` edits them (and answers
`message_not_found` for a ts it never gave), `conversations.history` reads them newest first by
channel *id* (`oldest`/`latest`/`inclusive`, `limit`/`cursor`; `metadata` only with
`include_all_metadata`), and `conversations.list` turns names into ids.

`slack.kill_after("chat.postMessage", pid)`: the next such call is stored and answered, and the
process `pid` is killed with SIGKILL right after the answer is sent, before it can act on it (it
is stopped before the answer is written, so the kill always lands in that window).

It also serves as a generic webhook receiver (`/webhook/<name>`), recording raw bodies and
headers so a test can check HMAC signatures. Failures are queued per method: each matching
request takes one planned failure until none are left, then the method answers normally.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qsl

from aiohttp import web

TOKEN = "xoxb-test-0000-secret-token"


@dataclass
class Call:
    """One request as it arrived."""

    method: str
    headers: dict[str, str]
    body: bytes
    status: int
    query: dict[str, str] = field(default_factory=dict)

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
    channels: dict[str, str] = field(default_factory=dict)
    """Channel name (without `#`) -> id: every channel ever posted to."""
    messages: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Channel id -> its messages, oldest first, as `conversations.history` returns each."""
    kills: dict[str, list[int]] = field(default_factory=dict)
    killed: list[int] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    _last_ts: float = 0.0

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

    def kill_after(self, method: str, pid: int, *, times: int = 1) -> None:
        """SIGKILL `pid` right after answering the next `times` successful calls to `method`."""
        self.kills.setdefault(method, []).extend([pid] * times)

    def channel_id(self, channel: str) -> str:
        """The id Slack gives the channel named `channel` (`#deploys` -> `C0DEPLOYS`)."""
        if _is_id(channel):
            return channel
        name = channel.removeprefix("#")
        if name not in self.channels:
            self.channels[name] = "C0" + re.sub(r"[^A-Z0-9]", "", name.upper())[:10]
        return self.channels[name]

    def messages_in(self, channel: str) -> list[dict[str, Any]]:
        """What the channel (name or id) shows now, oldest first."""
        return list(self.messages.get(self.channel_id(channel), []))

    async def __aenter__(self) -> Self:
        app = web.Application()
        app.router.add_post("/api/{method}", self._api)
        app.router.add_get("/api/{method}", self._api)
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
        call = Call(method, dict(request.headers), body, status, dict(request.query))
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

    async def _api(self, request: web.Request) -> web.StreamResponse:
        method = request.match_info["method"]
        body = await request.read()
        args = _arguments(request, body)
        channel = str(args.get("channel", ""))
        if method == "chat.postMessage" and channel and not channel.startswith("#missing"):
            self.channel_id(channel)  # the channel exists, whatever the call's fate
        if (failure := self._planned(method)) is not None:
            self._record(method, request, body, failure.status)
            return self._failure_response(failure)
        self._record(method, request, body, 200)
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"ok": False, "error": "invalid_auth"})
        answer = self._answer(method, args)
        if answer.get("ok") and self.kills.get(method):
            return await self._answer_then_kill(request, answer, self.kills[method].pop(0))
        return web.json_response(
            answer, status=404 if answer.get("error") == "unknown_method" else 200
        )

    def _answer(self, method: str, args: dict[str, Any]) -> dict[str, Any]:
        if method == "auth.test":
            return {"ok": True, "team": "T", "user": "preflight-bot"}
        if method == "chat.postMessage":
            return self._post(args)
        if method == "chat.update":
            return self._update(args)
        if method == "conversations.history":
            return self._history(args)
        if method == "conversations.list":
            return self._list(args)
        return {"ok": False, "error": "unknown_method"}

    def _post(self, args: dict[str, Any]) -> dict[str, Any]:
        channel = str(args.get("channel", ""))
        if channel.startswith("#missing"):
            return {"ok": False, "error": "channel_not_found"}
        channel_id = self.channel_id(channel)
        self._last_ts = max(time.time(), self._last_ts + 1e-6)
        message: dict[str, Any] = {
            "type": "message",
            "subtype": "bot_message",
            "bot_id": "B0PREFLIGHT",
            "ts": f"{self._last_ts:.6f}",
            "text": args.get("text", ""),
            "blocks": _json_arg(args.get("blocks")) or [],
        }
        if (metadata := _json_arg(args.get("metadata"))) is not None:
            message["metadata"] = metadata
        self.messages.setdefault(channel_id, []).append(message)
        return {"ok": True, "channel": channel_id, "ts": message["ts"], "message": message}

    def _update(self, args: dict[str, Any]) -> dict[str, Any]:
        channel_id = self.channel_id(str(args.get("channel", "")))
        ts = str(args.get("ts", ""))
        found = [m for m in self.messages.get(channel_id, []) if m["ts"] == ts]
        if not found:
            return {"ok": False, "error": "message_not_found"}
        message = found[0]
        for name in ("text", "blocks", "metadata"):
            if name in args:
                message[name] = _json_arg(args[name]) if name != "text" else args[name]
        return {"ok": True, "channel": channel_id, "ts": ts, "text": message["text"]}

    def _history(self, args: dict[str, Any]) -> dict[str, Any]:
        channel_id = str(args.get("channel", ""))
        if channel_id not in self.channels.values():
            return {"ok": False, "error": "channel_not_found"}  # by id only, as Slack
        inclusive = _flag(args.get("inclusive"))
        oldest = float(args.get("oldest") or 0)
        latest = float(args.get("latest") or time.time() + 1)
        newest_first = [
            m
            for m in reversed(self.messages.get(channel_id, []))
            if (oldest <= float(m["ts"]) if inclusive else oldest < float(m["ts"]))
            and (float(m["ts"]) <= latest if inclusive else float(m["ts"]) < latest)
        ]
        page, more, cursor = _page(newest_first, args)
        metadata = _flag(args.get("include_all_metadata"))
        shown = [m if metadata else {k: v for k, v in m.items() if k != "metadata"} for m in page]
        return {
            "ok": True,
            "messages": shown,
            "has_more": more,
            "response_metadata": {"next_cursor": cursor},
        }

    def _list(self, args: dict[str, Any]) -> dict[str, Any]:
        every = [
            {"id": cid, "name": name, "is_channel": True, "is_archived": False}
            for name, cid in sorted(self.channels.items())
        ]
        page, _, cursor = _page(every, args)
        return {"ok": True, "channels": page, "response_metadata": {"next_cursor": cursor}}

    async def _answer_then_kill(
        self, request: web.Request, answer: dict[str, Any], pid: int
    ) -> web.StreamResponse:
        """Stop `pid`, write the answer, then SIGKILL it: it dies with the answer unread (or read
        and not acted on), which is what a crash right after Slack answered leaves behind."""
        os.kill(pid, signal.SIGSTOP)
        await _until_stopped(pid)
        response = web.json_response(answer)
        await response.prepare(request)
        await response.write_eof()
        os.kill(pid, signal.SIGKILL)
        self.killed.append(pid)
        return response

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


def _is_id(channel: str) -> bool:
    return re.fullmatch(r"[CGD][A-Z0-9]{6,}", channel) is not None


def _arguments(request: web.Request, body: bytes) -> dict[str, Any]:
    """A Web API call's arguments: query string, form or JSON body, as Slack takes them."""
    args: dict[str, Any] = dict(request.query)
    if not body:
        return args
    if request.content_type == "application/json":
        data = json.loads(body)
        if isinstance(data, dict):
            args.update(data)
    else:
        args.update(parse_qsl(body.decode(), keep_blank_values=True))
    return args


def _json_arg(value: Any) -> Any:
    """Blocks and metadata come as JSON values in a JSON body, as JSON strings in a form."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return None
    return value


def _flag(value: Any) -> bool:
    return value is True or str(value).lower() in ("1", "true")


def _page(
    items: list[dict[str, Any]], args: dict[str, Any]
) -> tuple[list[dict[str, Any]], bool, str]:
    """One page of `items` from `cursor` (an offset, opaque to the client), `limit` long."""
    start = int(str(args.get("cursor") or "offset:0").removeprefix("offset:") or 0)
    limit = min(max(int(args.get("limit") or 100), 1), 999)
    page = items[start : start + limit]
    more = start + limit < len(items)
    return page, more, f"offset:{start + limit}" if more else ""


def _process_state(pid: int) -> str:
    """The state letter in /proc/<pid>/stat (a procfs read: it never blocks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    return fields[0] if fields else ""


async def _until_stopped(pid: int, timeout: float = 5.0) -> None:
    """Until the kernel shows `pid` stopped (state T), so it can act on nothing we send."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _process_state(pid) in ("T", "t"):
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"process {pid} did not stop")
