"""The proxy handler: pick a role, forward the request, stream the answer back, record it."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import ValidationError

from services.contracts.events import RequestRecord, Route, votes
from services.router.metrics import MetricsPublisher
from services.router.routes import (
    MODEL_HEADER,
    NoModel,
    RouteTable,
    Selection,
    UnknownModel,
    resolve_model,
    select,
)
from services.router.tokens import NO_TOKENS, TokenMeter, TokenTiming, stream_format
from services.traffic.base import PIN_HEADER

log = logging.getLogger("preflight.router")

VERSION_HEADER: Final = "X-Preflight-Version"
ROLE_HEADER: Final = "X-Preflight-Role"
# RFC 9110 7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
BUFFERED_BODY_MAX: Final = 64 * 1024
_NOT_FORWARDED: Final = frozenset({"host"})
_LATENCY_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


def forwardable(
    headers: Mapping[str, str], extra: frozenset[str] = frozenset()
) -> CIMultiDict[str]:
    """Headers minus hop-by-hop ones (including those the Connection header names)."""
    named = {
        token.strip().lower()
        for key, value in headers.items()
        if key.lower() == "connection"
        for token in value.split(",")
    }
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in headers.items():
        low = key.lower()
        if low in HOP_BY_HOP or low in named or low in extra:
            continue
        out.add(key, value)
    return out


class RouterMetrics:
    """The router's Prometheus series, on its own registry (one per app, so tests can run many)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "preflight_router_requests",
            "Proxied requests by model, role and HTTP status (0: no response from upstream).",
            ["model", "role", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "preflight_router_request_duration_seconds",
            "Proxied request latency until the last byte.",
            ["model", "role"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "preflight_router_time_to_first_token_seconds",
            "Streamed completions: request start to the first token event (SSE / JSON lines).",
            ["model", "role"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.output_tokens = Counter(
            "preflight_router_output_tokens",
            "Output tokens of streamed completions (the server's count, else token events).",
            ["model", "role"],
            registry=registry,
        )
        self.upstream_errors = Counter(
            "preflight_router_upstream_errors",
            "Upstream failures by kind (connect, connect_timeout, timeout, reset, http_5xx).",
            ["model", "role", "kind"],
            registry=registry,
        )
        self.rejected = Counter(
            "preflight_router_rejected",
            "Requests answered by the router itself: no_model (400), unknown_model (404), "
            "no_upstream (503).",
            ["reason"],
            registry=registry,
        )
        self.not_recorded = Counter(
            "preflight_router_not_recorded",
            "Proxied requests left out of the request records: not an inference call (not POST, "
            "or an answer that is not one: 4xx, 501).",
            ["model", "role"],
            registry=registry,
        )
        self.route_updates = Counter(
            "preflight_router_route_updates",
            "Route KV entries seen, by effect (applied, removed, malformed).",
            ["change"],
            registry=registry,
        )
        self.routes = Gauge("preflight_router_routes", "Models with a route.", registry=registry)
        self.canary_weight = Gauge(
            "preflight_router_canary_weight_percent",
            "Current canary weight per model.",
            ["model"],
            registry=registry,
        )


def error_response(status: int, error: str, message: str, **extra: str) -> web.Response:
    return web.json_response({"error": error, "message": message, **extra}, status=status)


def _status_class(kind: str) -> int:
    return 504 if kind in ("timeout", "connect_timeout") else 502


def _upstream_error_kind(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "connect_timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect"
    if isinstance(exc, TimeoutError):  # ServerTimeoutError and asyncio's total timeout
        return "timeout"
    return "reset"


@dataclass
class Proxy:
    """Forwards every request not handled by the router's own endpoints."""

    table: RouteTable
    publisher: MetricsPublisher
    prom: RouterMetrics
    default_model: str | None
    sticky_header: str | None
    session: aiohttp.ClientSession | None = None
    draw: Callable[[], float] = field(default_factory=lambda: _uniform_percent)
    clock: Callable[[], float] = time.perf_counter
    now: Callable[[], datetime] = field(default_factory=lambda: _utc_now)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            route = resolve_model(
                request.headers.get(MODEL_HEADER), self.default_model, self.table.routes
            )
        except NoModel as exc:
            self.prom.rejected.labels("no_model").inc()
            return error_response(400, "no_model", str(exc), header=MODEL_HEADER)
        except UnknownModel as exc:
            self.prom.rejected.labels("unknown_model").inc()
            return error_response(404, "unknown_model", str(exc), header=MODEL_HEADER)
        client = request.headers.get(self.sticky_header) if self.sticky_header else None
        pin = request.headers.get(PIN_HEADER)
        selection = select(route, draw=self.draw(), client=client or None, pin=pin)
        if selection.upstream is None or selection.version is None:
            self.prom.rejected.labels("no_upstream").inc()
            return error_response(
                503,
                "no_upstream",
                f"model {route.model!r} has no upstream for its {selection.role} version",
                role=selection.role,
            )
        return await self._forward(request, route, selection)

    async def _forward(
        self, request: web.Request, route: Route, sel: Selection
    ) -> web.StreamResponse:
        assert self.session is not None, "Proxy.session is set at app start-up"
        assert sel.upstream is not None and sel.version is not None
        started = self.now()
        t0 = self.clock()
        ttfb: float | None = None
        tokens = NO_TOKENS
        status = 0
        kind: str | None = None
        url = sel.upstream.rstrip("/") + request.rel_url.raw_path_qs
        headers = forwardable(request.headers, _NOT_FORWARDED)
        if request.remote:
            prior = request.headers.get("X-Forwarded-For")
            headers["X-Forwarded-For"] = f"{prior}, {request.remote}" if prior else request.remote
        marks = {VERSION_HEADER: sel.version, ROLE_HEADER: sel.role}
        response: web.StreamResponse
        upload = _Upload(request.content, self.clock) if request.body_exists else None
        try:
            async with self.session.request(
                request.method,
                url,
                headers=headers,
                data=upload.chunks() if upload is not None else None,
                allow_redirects=False,
            ) as upstream:
                status = upstream.status
                if status >= 500:
                    kind = "http_5xx"
                out_headers = forwardable(upstream.headers)
                out_headers.update(marks)
                if _small_fixed_body(request.method, upstream):
                    # Known small length: one write of headers + body (half the syscalls of
                    # streaming). Chunked and event streams below are relayed as they come.
                    body = await upstream.read()
                    ttfb = self.clock() - t0
                    out_headers.popall("Content-Length", None)
                    response = web.Response(
                        status=upstream.status,
                        reason=upstream.reason,
                        headers=out_headers,
                        body=body,
                    )
                    if request.transport is None or request.transport.is_closing():
                        kind = kind or "client_closed"  # it left before its answer: not a 200
                else:
                    response, ttfb, tokens, cut = await self._stream(
                        request, upstream, out_headers, t0
                    )
                    if cut is not None and not (cut == "client_closed" and kind):
                        kind = cut
        except (aiohttp.ClientError, TimeoutError) as exc:
            kind = _upstream_error_kind(exc)
            code = _status_class(kind)
            response = error_response(
                code,
                f"upstream_{kind}",
                f"{sel.role} upstream of {route.model!r} failed: {type(exc).__name__}: {exc}",
                role=sel.role,
            )
            response.headers.update(marks)
        # Timed from the end of the upload: a client that trickles its body in (review 13 made
        # a healthy canary's p95 631 ms so) is not the model's latency.
        since = max(t0, upload.done_at) if upload is not None and upload.done_at else t0
        elapsed = self.clock() - since
        if ttfb is not None:
            ttfb = max(ttfb - (since - t0), 0.0)
        self._account(sel, started, elapsed, ttfb, status, kind, tokens, request.method)
        return response

    async def _stream(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        headers: CIMultiDict[str],
        t0: float,
    ) -> tuple[web.StreamResponse, float | None, TokenTiming, str | None]:
        """Relay the body chunk by chunk: the response, time to first byte, the token timings of
        a streamed completion (services/router/tokens.py), error kind if cut."""
        ttfb: float | None = None
        kind: str | None = None
        fmt = stream_format(upstream.headers.get("Content-Type"))
        meter = TokenMeter(fmt) if fmt is not None else None
        response = web.StreamResponse(
            status=upstream.status, reason=upstream.reason, headers=headers
        )
        try:
            # Inside the try: a client gone before the headers is the client's doing too.
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                if meter is not None:
                    # Read on arrival, before the write: a slow client does not delay a token.
                    now = self.clock()
                    meter.feed(chunk, now)
                    if ttfb is None:
                        ttfb = now - t0
                elif ttfb is None:
                    ttfb = self.clock() - t0
                await response.write(chunk)
            if ttfb is None:
                ttfb = self.clock() - t0
            await response.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            kind = "client_closed"  # the client left; nothing to tell it
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Headers already went out: all we can do is cut the connection so the client sees
            # a truncated body, not a complete-looking one.
            kind = _upstream_error_kind(exc)
            if request.transport is not None:
                request.transport.close()
        return response, ttfb, meter.result(t0) if meter is not None else NO_TOKENS, kind

    def _account(
        self,
        sel: Selection,
        started: datetime,
        elapsed: float,
        ttfb: float | None,
        status: int,
        kind: str | None,
        tokens: TokenTiming = NO_TOKENS,
        method: str = "POST",
    ) -> None:
        self.prom.requests.labels(sel.model, sel.role, str(status)).inc()
        self.prom.duration.labels(sel.model, sel.role).observe(elapsed)
        if tokens.ttft_s is not None:
            self.prom.ttft.labels(sel.model, sel.role).observe(tokens.ttft_s)
        if tokens.output_tokens:
            self.prom.output_tokens.labels(sel.model, sel.role).inc(tokens.output_tokens)
        if kind is not None:
            self.prom.upstream_errors.labels(sel.model, sel.role, kind).inc()
        if not votes(method, status):
            self.prom.not_recorded.labels(sel.model, sel.role).inc()
            return
        try:
            record = RequestRecord(
                ts=started,
                deployment_id=sel.deployment_id,
                model=sel.model,
                version=sel.version or "",
                role=sel.role,
                latency_ms=elapsed * 1000.0,
                ttfb_ms=ttfb * 1000.0 if ttfb is not None else None,
                ttft_ms=tokens.ttft_s * 1000.0 if tokens.ttft_s is not None else None,
                itl_ms=tokens.itl_s * 1000.0 if tokens.itl_s is not None else None,
                output_tokens=tokens.output_tokens,
                status=status,
                error_kind=kind,
                pinned=sel.pinned,
            )
        except ValidationError:
            log.exception("request record for %s does not validate; dropped", sel.model)
            self.publisher.drop(1)
            return
        self.publisher.record(record)


class _Upload:
    """The client's request body as the upstream reads it, noting when its last byte came."""

    def __init__(self, content: Any, clock: Callable[[], float]) -> None:
        self.content, self.clock = content, clock
        self.done_at: float | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self.content.iter_any():
            yield chunk
        self.done_at = self.clock()


def _small_fixed_body(method: str, upstream: aiohttp.ClientResponse) -> bool:
    length = upstream.content_length
    return (
        length is not None
        and length <= BUFFERED_BODY_MAX
        and method != "HEAD"
        and upstream.status not in (204, 304)
        # Event streams and JSON lines are relayed as they come, and their tokens counted.
        and stream_format(upstream.headers.get("Content-Type")) is None
    )


def _uniform_percent() -> float:
    return random.random() * 100.0  # noqa: S311 (traffic split, not security)


def _utc_now() -> datetime:
    return datetime.now(UTC)
