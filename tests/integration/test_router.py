"""The router on a real nats-server: KV-driven weights, split, streaming, errors, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from services.contracts import subjects
from services.contracts.events import RequestMetricsBatch, Route, RouteTarget
from services.inference_server.app import Server
from services.inference_server.app import build_app as build_upstream
from services.inference_server.generators import SyntheticGenerator
from services.inference_server.knobs import Knobs
from services.inference_server.load import generate_load
from services.router.app import ROUTER, Router, build_app
from services.router.metrics import PublisherConfig
from services.runtime import bus
from services.runtime.nats_server import NatsServer
from services.runtime.settings import Settings
from services.traffic.base import PIN_HEADER
from services.traffic.builtin import BuiltinOptions, BuiltinRouter

pytestmark = pytest.mark.integration

MODEL = "org/chat-7b.v2"
STABLE_ID = "d-stable-0001"
CANARY_ID = "d-canary-0002"


@dataclass
class Running:
    url: str
    app: web.Application
    runner: web.AppRunner

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_app(app: web.Application) -> Running:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return Running(f"http://127.0.0.1:{runner.addresses[0][1]}", app, runner)


async def start_upstream(version: str, **knobs: Any) -> tuple[Running, Server]:
    server = Server(
        generator=SyntheticGenerator(),
        knobs=Knobs(**{"latency_ms": 0, "latency_jitter": 0, **knobs}),
        version=version,
    )
    return await start_app(build_upstream(server)), server


@pytest.fixture
async def upstreams() -> AsyncIterator[dict[str, tuple[Running, Server]]]:
    pair = {"stable": await start_upstream("1"), "canary": await start_upstream("2")}
    try:
        yield pair
    finally:
        for running, _ in pair.values():
            await running.stop()


def router_settings(settings: Settings, **overrides: Any) -> Settings:
    return settings.model_copy(
        update={"metrics_batch_interval_s": 0.05, "router_upstream_timeout_s": 5.0, **overrides}
    )


@contextlib.asynccontextmanager
async def router(settings: Settings, **kwargs: Any) -> AsyncIterator[tuple[Running, Router]]:
    nc = await bus.connect(settings, "test-router", reconnect=True)
    running = await start_app(build_app(settings, nc, **kwargs))
    try:
        yield running, running.app[ROUTER]
    finally:
        await running.stop()
        with contextlib.suppress(ConnectionError):  # a test may have stopped the server
            await nc.close()


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> float:
    """Seconds until `check()` holds (polled every 5 ms); fails after `timeout`."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.005)
    return time.monotonic() - start


def route(
    upstreams: dict[str, tuple[Running, Server]] | None,
    weight: float,
    *,
    model: str = MODEL,
    canary: bool = True,
) -> Route:
    def target(role: str, version: str, did: str) -> RouteTarget:
        url = upstreams[role][0].url if upstreams else None
        return RouteTarget(deployment_id=did, version=version, upstream=url)

    return Route(
        model=model,
        stable=target("stable", "1", STABLE_ID),
        canary=target("canary", "2", CANARY_ID) if canary else None,
        canary_weight=weight,
    )


async def put_route(js: JetStreamContext, value: Route | bytes, key: str = MODEL) -> KeyValue:
    kv = await js.key_value(subjects.ROUTES_BUCKET)
    await kv.put(key, value if isinstance(value, bytes) else value.model_dump_json().encode())
    return kv


def weight_of(r: Router, model: str = MODEL) -> float | None:
    current = r.table.get(model)
    return current.canary_weight if current is not None else None


async def completion(
    session: aiohttp.ClientSession, url: str, **headers: str
) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with session.post(
        f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 3}, headers=headers
    ) as resp:
        body = await resp.json(content_type=None)
        return resp.status, body, dict(resp.headers)


def binomial_bounds(n: int, p: float, sigmas: float = 4.5) -> tuple[float, float]:
    sd = math.sqrt(n * p * (1 - p))
    return n * p - sigmas * sd, n * p + sigmas * sd


# ---- split -------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight", [5.0, 50.0])
async def test_split_follows_the_weight_within_binomial_bounds(
    settings: Settings, js: JetStreamContext, upstreams: dict[str, Any], weight: float
) -> None:
    await put_route(js, route(upstreams, weight))
    async with router(router_settings(settings)) as (running, r):
        await eventually(lambda: r.watcher.live and weight_of(r) == weight)
        result = await generate_load(f"{running.url}/v1/completions", rps=800, duration_s=1.5)
    n = result.sent
    assert result.by_status[200] == n, result.by_status
    low, high = binomial_bounds(n, weight / 100)
    assert low <= result.by_header["canary"] <= high, (result.by_header, low, high)
    assert result.by_header["stable"] + result.by_header["canary"] == n
    # The upstreams agree: each answered exactly the share the router sent it.
    assert upstreams["canary"][1].served == result.by_header["canary"]


async def test_sticky_clients_keep_their_version_and_only_move_to_canary(
    settings: Settings, js: JetStreamContext, upstreams: dict[str, Any]
) -> None:
    clients = [f"user-{i}" for i in range(40)]
    async with router(router_settings(settings)) as (running, r), aiohttp.ClientSession() as s:
        seen: dict[float, dict[str, str]] = {}
        for weight in (20.0, 60.0):
            await put_route(js, route(upstreams, weight))
            await eventually(lambda w=weight: weight_of(r) == w)  # type: ignore[misc]
            seen[weight] = {}
            for client in clients:
                roles = set()
                for _ in range(3):
                    _, _, headers = await completion(
                        s, running.url, **{"X-Preflight-Client": client}
                    )
                    roles.add(headers["X-Preflight-Role"])
                assert len(roles) == 1, f"{client} saw {roles}"
                seen[weight][client] = roles.pop()
    early = {c for c, role in seen[20.0].items() if role == "canary"}
    late = {c for c, role in seen[60.0].items() if role == "canary"}
    assert early <= late  # raising the weight moved clients stable -> canary, never back
    assert 0 < len(early) < len(late) < len(clients)


async def test_the_pin_header_sends_a_tester_to_either_role_whatever_the_weight(
    settings: Settings, js: JetStreamContext, upstreams: dict[str, Any]
) -> None:
    await put_route(js, route(upstreams, 0.0))
    async with router(router_settings(settings)) as (running, r), aiohttp.ClientSession() as s:
        await eventually(lambda: r.watcher.live and weight_of(r) == 0.0)
        pinned = {
            (await completion(s, running.url, **{PIN_HEADER: "canary"}))[2]["X-Preflight-Role"]
            for _ in range(10)
        }
        assert pinned == {"canary"}
        await put_route(js, route(upstreams, 100.0))
        await eventually(lambda: weight_of(r) == 100.0)
        pinned = {
            (await completion(s, running.url, **{PIN_HEADER: "stable"}))[2]["X-Preflight-Role"]
            for _ in range(10)
        }
        assert pinned == {"stable"}
        odd = {
            (await completion(s, running.url, **{PIN_HEADER: "both"}))[2]["X-Preflight-Role"]
            for _ in range(5)
        }
        assert odd == {"canary"}  # not a role: the weighted choice


async def test_a_weight_counts_as_applied_only_when_every_live_router_reports_it(
    settings: Settings, js: JetStreamContext, upstreams: dict[str, Any]
) -> None:
    """Two real router instances report what they serve; the controller's view
    (services/traffic/builtin.py) confirms a route write only when both serve it, and a stopped
    instance withdraws its report so it is not waited for."""
    check = BuiltinRouter(BuiltinOptions(max_report_age_s=5), js)
    nobody = await check.read(route(upstreams, 5.0))
    assert not nobody.confirmed and "no built-in router instance reports" in nobody.detail
    first = router_settings(settings).model_copy(update={"instance": "router-a"})
    second = router_settings(settings).model_copy(update={"instance": "router-b"})
    written = route(upstreams, 5.0)
    await put_route(js, written)
    async with router(first) as (_, a):
        await eventually(lambda: a.watcher.live and weight_of(a) == 5.0)
        async with router(second) as (_, b):
            await eventually(lambda: b.watcher.live and weight_of(b) == 5.0)
            t0 = time.monotonic()
            while not (applied := await check.read(written)).confirmed:
                assert time.monotonic() - t0 < 5, applied.detail
                await asyncio.sleep(0.02)
            assert applied.weight == 5.0 and "2 router instance(s)" in applied.detail
            newer = route(upstreams, 50.0)
            behind = await check.read(newer)  # written nowhere yet: nobody serves it
            assert not behind.confirmed
            assert "0 of 2 router instances serve canary weight 50%" in behind.detail
            await put_route(js, newer)
            t0 = time.monotonic()
            while not (await check.read(newer)).confirmed:
                assert time.monotonic() - t0 < 5
                await asyncio.sleep(0.02)
            propagation = time.monotonic() - t0
            assert propagation < 2.0
        # router-b stopped cleanly: only router-a counts now.
        t0 = time.monotonic()
        while "1 router instance(s)" not in (await check.read(newer)).detail:
            assert time.monotonic() - t0 < 5
            await asyncio.sleep(0.05)


# ---- weights from the KV bucket ---------------------------------------------------------------


async def test_weights_change_live_without_polling(
    settings: Settings, js: JetStreamContext, upstreams: dict[str, Any]
) -> None:
    await put_route(js, route(upstreams, 0.0))
    async with router(router_settings(settings)) as (running, r), aiohttp.ClientSession() as s:
        await eventually(lambda: r.watcher.live and weight_of(r) == 0.0)
        roles = {(await completion(s, running.url))[2]["X-Preflight-Role"] for _ in range(20)}
        assert roles == {"stable"}
        await put_route(js, route(upstreams, 100.0))
        applied_in = await eventually(lambda: weight_of(r) == 100.0, timeout=2.0)
        assert applied_in < 1.0
        status, body, headers = await completion(s, running.url)
        assert (status, headers["X-Preflight-Role"], headers["X-Preflight-Version"]) == (
            200,
            "canary",
            "2",
        )
        assert body["system_fingerprint"] == "2"


async def test_a_router_started_after_the_write_gets_current_weights(
    settings: Settings, js: JetStreamContext, upstreams: dict[str, Any]
) -> None:
    await put_route(js, route(upstreams, 10.0))
    await put_route(js, route(upstreams, 100.0))  # history: only the current value counts
    async with router(router_settings(settings)) as (running, r), aiohttp.ClientSession() as s:
        await eventually(lambda: r.watcher.live)
        assert weight_of(r) == 100.0
        assert (await completion(s, running.url))[2]["X-Preflight-Role"] == "canary"
        async with s.get(f"{running.url}/healthz") as resp:
            assert resp.status == 200
            assert (await resp.json())["routes"] == 1


async def test_a_restarted_router_picks_up_weights_written_while_it_was_down(
    settings: Settings, js: JetStreamContext, upstreams: dict[str, Any]
) -> None:
    await put_route(js, route(upstreams, 5.0))
    async with router(router_settings(settings)) as (_, r):
        await eventually(lambda: r.watcher.live and weight_of(r) == 5.0)
    await put_route(js, route(upstreams, 42.5))
    other = await put_route(js, route(upstreams, 0.0, model="other/model"), key="other/model")
    await other.delete("other/model")
    async with router(router_settings(settings)) as (running, r):
        await eventually(lambda: r.watcher.live)
        assert weight_of(r) == 42.5
        assert r.table.get("other/model") is None
        async with aiohttp.ClientSession() as s, s.get(f"{running.url}/routes") as resp:
            routes = await resp.json()
        assert routes[MODEL]["canary_weight"] == 42.5
        assert routes[MODEL]["records_deployment_id"] == CANARY_ID


async def test_malformed_values_keep_the_previous_route_and_deletes_remove_it(
    settings: Settings, js: JetStreamContext, upstreams: dict[str, Any]
) -> None:
    async with router(router_settings(settings)) as (running, r), aiohttp.ClientSession() as s:
        kv = await put_route(js, route(upstreams, 30.0))
        await eventually(lambda: weight_of(r) == 30.0)
        await put_route(js, b"{not json")
        await put_route(js, route(upstreams, 50.0, model="someone/else"))  # key and model differ
        await put_route(js, route(upstreams, 60.0))
        await eventually(lambda: weight_of(r) == 60.0)
        async with s.get(f"{running.url}/metrics") as resp:
            text = await resp.text()
        assert 'preflight_router_route_updates_total{change="malformed"} 2.0' in text
        assert f'preflight_router_canary_weight_percent{{model="{MODEL}"}} 60.0' in text
        await kv.delete(MODEL)
        await eventually(lambda: r.table.get(MODEL) is None)
        status, body, _ = await completion(s, running.url, **{"X-Preflight-Model": MODEL})
        assert (status, body["error"]) == (404, "unknown_model")


async def test_model_choice_header_default_single_route_and_missing_upstream(
    settings: Settings, js: JetStreamContext, upstreams: dict[str, Any]
) -> None:
    async with router(router_settings(settings)) as (running, r), aiohttp.ClientSession() as s:
        await put_route(js, route(upstreams, 0.0))
        await eventually(lambda: weight_of(r) == 0.0)
        assert (await completion(s, running.url))[0] == 200  # the only route
        no_upstream = route(None, 100.0, model="org/dark")
        await put_route(js, no_upstream, key="org/dark")
        await eventually(lambda: r.table.get("org/dark") is not None)
        status, body, _ = await completion(s, running.url)
        assert (status, body["error"], body["header"]) == (400, "no_model", "X-Preflight-Model")
        status, body, _ = await completion(s, running.url, **{"X-Preflight-Model": "org/dark"})
        # A canary without an upstream takes no traffic here; the stable has none either: 503.
        assert (status, body["error"], body["role"]) == (503, "no_upstream", "stable")
        status, body, _ = await completion(s, running.url, **{"X-Preflight-Model": "nope"})
        assert (status, body["error"]) == (404, "unknown_model")
    async with (
        router(router_settings(settings, router_default_model=MODEL)) as (running, r),
        aiohttp.ClientSession() as s,
    ):
        await eventually(lambda: r.watcher.live)
        assert (await completion(s, running.url))[0] == 200  # the default model


# ---- proxying ----------------------------------------------------------------------------------


async def test_streaming_responses_pass_through_as_they_come(
    settings: Settings, js: JetStreamContext, upstreams: dict[str, Any]
) -> None:
    upstreams["stable"][1].knobs = Knobs(latency_ms=0, latency_jitter=0, token_interval_ms=150)
    await put_route(js, route(upstreams, 0.0))
    async with router(router_settings(settings)) as (running, r), aiohttp.ClientSession() as s:
        await eventually(lambda: weight_of(r) == 0.0)
        t0 = time.perf_counter()
        arrivals: list[float] = []
        raw = b""
        async with s.post(
            f"{running.url}/v1/completions?trace=1",
            json={"prompt": "hi", "max_tokens": 4, "stream": True},
        ) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            assert resp.headers["X-Preflight-Role"] == "stable"
            async for chunk in resp.content.iter_any():
                arrivals.append(time.perf_counter() - t0)
                raw += chunk
    events = [line[6:] for line in raw.decode().split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == (
        " answers with a steady"
    )
    # 4 chunks 150 ms apart: the first reached the client long before the last was written.
    assert arrivals[0] < 0.25 and arrivals[-1] - arrivals[0] > 0.35, arrivals


async def stream_completion(
    session: aiohttp.ClientSession, url: str, max_tokens: int, **headers: str
) -> tuple[bytes, float]:
    """A streamed completion's whole body and its time to the last byte (seconds)."""
    t0 = time.perf_counter()
    async with session.post(
        f"{url}/v1/completions",
        json={"prompt": "hi", "max_tokens": max_tokens, "stream": True},
        headers=headers,
    ) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        body = await resp.read()
    return body, time.perf_counter() - t0


async def test_streamed_completions_are_recorded_with_ttft_itl_and_output_tokens(
    settings: Settings, js: JetStreamContext, upstreams: dict[str, Any]
) -> None:
    # Both stream 8 tokens over about 7 x 40 ms; the canary's first token comes 150 ms later
    # and its later ones sooner (the sample server's ttft_delay_ms): same total, worse TTFT.
    upstreams["stable"][1].knobs = Knobs(latency_ms=0, latency_jitter=0, token_interval_ms=40)
    upstreams["canary"][1].knobs = Knobs(
        latency_ms=0, latency_jitter=0, token_interval_ms=40, ttft_delay_ms=150
    )
    await put_route(js, route(upstreams, 50.0))
    batches: list[RequestMetricsBatch] = []
    async with (
        router(router_settings(settings), sink=ListSink(batches)) as (running, r),
        aiohttp.ClientSession() as s,
    ):
        await eventually(lambda: weight_of(r) == 50.0)
        stable_body, stable_s = await stream_completion(s, running.url, 8, **{PIN_HEADER: "stable"})
        canary_body, canary_s = await stream_completion(s, running.url, 8, **{PIN_HEADER: "canary"})
        assert (await completion(s, running.url, **{PIN_HEADER: "stable"}))[0] == 200
        await eventually(lambda: sum(len(b.records) for b in batches) == 3)
    stable, canary, plain = (rec for b in batches for rec in b.records)
    events = [e for e in stable_body.decode().split("\n\n") if e]
    assert len(events) == 9 and events[-1] == "data: [DONE]"  # passed through whole
    assert canary_body.count(b"data: ") == 9
    for rec in (stable, canary):
        assert rec.output_tokens == 8  # the last event's usage.completion_tokens
        assert rec.ttft_ms is not None and rec.itl_ms is not None and rec.ttfb_ms is not None
        assert rec.ttfb_ms <= rec.ttft_ms + 1e-6 and rec.ttft_ms <= rec.latency_ms
    assert stable.role == "stable" and canary.role == "canary"
    assert stable.ttft_ms is not None and canary.ttft_ms is not None
    assert stable.itl_ms is not None and canary.itl_ms is not None
    assert stable.ttft_ms < 100 and canary.ttft_ms >= 150, (stable.ttft_ms, canary.ttft_ms)
    assert 35 <= stable.itl_ms < 80, stable.itl_ms
    assert canary.itl_ms < stable.itl_ms  # 40 - 150 / 7 = 18.6 ms planned
    # Total latency about the same (7 x 40 = 280 ms either way); a loaded machine adds noise.
    assert abs(canary.latency_ms - stable.latency_ms) < 120, (canary.latency_ms, stable.latency_ms)
    assert abs(canary_s - stable_s) < 0.12
    assert (plain.ttft_ms, plain.itl_ms, plain.output_tokens) == (None, None, None)


async def test_a_malformed_event_stream_passes_through_untouched_without_token_fields(
    settings: Settings, js: JetStreamContext
) -> None:
    sent = [
        b"data: " + json.dumps({"choices": [{"text": "fine"}]}).encode() + b"\n\n",
        b"data: {not json at all\n\n",
        b"\xff\xfe" * 1000 + b"\n\n",
        b"data: " + b"[" * 50_000 + b"\n\n",
        b"data: [DONE]\n\n",
    ]

    async def hostile(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for part in sent:
            for i in range(0, len(part), 7):  # events split across many reads
                await response.write(part[i : i + 7])
            await asyncio.sleep(0.005)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/completions", hostile)
    upstream = await start_app(app)
    batches: list[RequestMetricsBatch] = []
    try:
        await put_route(
            js,
            Route(
                model=MODEL,
                stable=RouteTarget(deployment_id=STABLE_ID, version="1", upstream=upstream.url),
            ),
        )
        async with (
            router(router_settings(settings), sink=ListSink(batches)) as (running, r),
            aiohttp.ClientSession() as s,
        ):
            await eventually(lambda: r.table.get(MODEL) is not None)
            async with s.post(f"{running.url}/v1/completions", json={"stream": True}) as resp:
                assert resp.status == 200
                got = await resp.read()
            await eventually(lambda: sum(len(b.records) for b in batches) == 1)
    finally:
        await upstream.stop()
    assert got == b"".join(sent)
    (rec,) = (rec for b in batches for rec in b.records)
    assert rec.status == 200 and rec.error_kind is None and rec.ttfb_ms is not None
    assert (rec.ttft_ms, rec.itl_ms, rec.output_tokens) == (None, None, None)


async def test_upstream_failures_answer_502_504_and_are_recorded(
    settings: Settings, js: JetStreamContext, upstreams: dict[str, Any]
) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    stable_running, stable = upstreams["stable"]
    routes = {
        "m/err": Route(
            model="m/err",
            stable=RouteTarget(deployment_id=STABLE_ID, version="1", upstream=stable_running.url),
        ),
        "m/dead": Route(
            model="m/dead", stable=RouteTarget(deployment_id=STABLE_ID, version="1", upstream=dead)
        ),
        "m/slow": Route(
            model="m/slow",
            stable=RouteTarget(
                deployment_id=STABLE_ID, version="1", upstream=upstreams["canary"][0].url
            ),
        ),
    }
    for key, value in routes.items():
        await put_route(js, value, key=key)
    stable.knobs = Knobs(latency_ms=0, error_rate=1.0)
    upstreams["canary"][1].knobs = Knobs(latency_ms=1000, latency_jitter=0)
    batches: list[RequestMetricsBatch] = []
    sink = ListSink(batches)
    fast = router_settings(settings, router_upstream_timeout_s=0.3)
    async with router(fast, sink=sink) as (running, r), aiohttp.ClientSession() as s:
        await eventually(lambda: len(r.table.routes) == 3)
        got = {}
        for model in routes:
            status, body, headers = await completion(s, running.url, **{"X-Preflight-Model": model})
            got[model] = (status, body.get("error"), headers.get("X-Preflight-Version"))
    assert got["m/err"][0] == 500  # passed through as it came
    assert got["m/dead"] == (502, "upstream_connect", "1")
    assert got["m/slow"] == (504, "upstream_timeout", "1")
    records = {rec.model: rec for b in batches for rec in b.records}
    assert (records["m/err"].status, records["m/err"].error_kind) == (500, "http_5xx")
    assert (records["m/dead"].status, records["m/dead"].error_kind) == (0, "connect")
    assert (records["m/slow"].status, records["m/slow"].error_kind) == (0, "timeout")
    assert 250 <= records["m/slow"].latency_ms < 1500


@dataclass
class ListSink:
    batches: list[RequestMetricsBatch]

    async def publish(self, subject: str, payload: bytes, batch_id: str) -> None:
        self.batches.append(RequestMetricsBatch.model_validate_json(payload))


# ---- request metrics on the bus ---------------------------------------------------------------


async def read_batches(js: JetStreamContext, want_records: int) -> list[tuple[Any, Any]]:
    sub = await js.subscribe(
        subjects.METRICS_SUBJECTS, stream=subjects.METRICS_STREAM, ordered_consumer=True
    )
    out: list[tuple[Any, Any]] = []
    try:
        while sum(len(b.records) for b, _ in out) < want_records:
            msg = await sub.next_msg(timeout=5.0)
            out.append((RequestMetricsBatch.model_validate_json(msg.data), msg))
    finally:
        await sub.unsubscribe()
    return out


async def test_records_reach_the_metrics_stream_with_the_deployment_id_contract(
    settings: Settings, js: JetStreamContext, upstreams: dict[str, Any]
) -> None:
    await put_route(js, route(upstreams, 50.0))
    async with router(router_settings(settings)) as (running, r), aiohttp.ClientSession() as s:
        await eventually(lambda: weight_of(r) == 50.0)
        for _ in range(30):
            await completion(s, running.url)
        await put_route(js, route(upstreams, 0.0))
        await eventually(lambda: weight_of(r) == 0.0)
        for _ in range(10):
            await completion(s, running.url)
        for _ in range(5):  # a tester on the canary: stored, marked, left out of the analysis
            await completion(s, running.url, **{PIN_HEADER: "canary"})
    batches = await read_batches(js, 45)
    records = [rec for b, _ in batches for rec in b.records]
    assert len(records) == 45
    records, pinned = records[:40], records[40:]
    assert {(rec.role, rec.version, rec.pinned) for rec in pinned} == {("canary", "2", True)}
    assert not any(rec.pinned for rec in records)
    for batch, msg in batches:
        assert msg.subject == subjects.metrics("test")
        assert msg.headers[bus.MSG_ID_HEADER] == batch.batch_id
        assert batch.source == "test"
    live, after = records[:30], records[30:]
    assert {rec.role for rec in live} == {"stable", "canary"}
    assert {rec.deployment_id for rec in live} == {CANARY_ID}  # both roles: the canary's id
    assert {(rec.role, rec.deployment_id) for rec in after} == {("stable", STABLE_ID)}
    for rec in records:
        assert rec.model == MODEL and rec.status == 200 and rec.error_kind is None
        assert rec.version == ("2" if rec.role == "canary" else "1")
        assert rec.ttfb_ms is not None and 0 <= rec.ttfb_ms <= rec.latency_ms


async def test_an_absent_bus_never_slows_requests_and_drops_are_counted(
    settings: Settings,
    js: JetStreamContext,
    upstreams: dict[str, Any],
    nats_server: NatsServer,
) -> None:
    await put_route(js, route(upstreams, 50.0))
    small = router_settings(settings, metrics_buffer_max_records=20, metrics_batch_max_records=5)
    config = replace(PublisherConfig.from_settings(small), close_timeout_s=0.2)
    async with (
        router(small, publisher_config=config) as (running, r),
        aiohttp.ClientSession() as s,
    ):
        await eventually(lambda: r.watcher.live and weight_of(r) == 50.0)
        baseline = [await timed(completion(s, running.url)) for _ in range(20)]
        nats_server.stop()
        await eventually(lambda: not r.nc.is_connected)
        during = [await timed(completion(s, running.url)) for _ in range(60)]
        async with s.get(f"{running.url}/healthz") as resp:
            health = (resp.status, await resp.json())
        async with s.get(f"{running.url}/metrics") as resp:
            text = await resp.text()
    assert all(status == 200 for status, _ in baseline + during)
    assert health[0] == 503 and "not connected to NATS" in health[1]["problems"]
    assert health[1]["metrics"]["dropped"] >= 40
    assert "preflight_router_metrics_dropped_total" in text
    slowest = max(t for _, t in during)
    typical = sorted(t for _, t in baseline)[len(baseline) // 2]
    assert slowest < max(0.1, 20 * typical), (slowest, typical)


async def timed(call: Any) -> tuple[int, float]:
    t0 = time.perf_counter()
    status, _, _ = await call
    return status, time.perf_counter() - t0


async def test_the_service_entry_point_serves_and_flushes_on_sigterm(
    settings: Settings, js: JetStreamContext, upstreams: dict[str, Any]
) -> None:
    await put_route(js, route(upstreams, 0.0))
    env = {
        **os.environ,
        "PREFLIGHT_NATS_URL": settings.nats_url,
        "PREFLIGHT_ROUTER_PORT": "0",
        "PREFLIGHT_INSTANCE": "entry",
        "PREFLIGHT_METRICS_BATCH_INTERVAL_S": "3600",  # only the shutdown flush publishes
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.router.app", env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stderr is not None
        line = (await proc.stderr.readline()).decode()
        while "router listening on" not in line:
            assert line, "the router exited before listening"
            line = (await proc.stderr.readline()).decode()
        url = line.split("router listening on ")[1].split()[0]
        async with aiohttp.ClientSession() as s:
            for _ in range(200):
                async with s.get(f"{url}/healthz") as resp:
                    if resp.status == 200:
                        break
                await asyncio.sleep(0.01)
            statuses = [(await completion(s, url))[0] for _ in range(3)]
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert statuses == [200, 200, 200]
    batches = await read_batches(js, 3)
    assert [b.source for b, _ in batches] == ["entry"]


# ---- what votes (review 13 F3) ----------------------------------------------------------------


async def test_only_inference_calls_vote_and_the_upload_is_not_the_models_latency(
    settings: Settings, js: JetStreamContext
) -> None:
    """Review 13 diluted a failing canary with cheap GET/HEAD/OPTIONS requests to a path the
    model does not serve, and poisoned a healthy one's p95 by trickling request bodies in."""
    slow = {"stable": await start_upstream("1"), "canary": await start_upstream("2")}
    sink = ListSink([])
    try:
        await put_route(js, route(slow, 100.0))
        async with (
            router(router_settings(settings), sink=sink) as (running, r),
            aiohttp.ClientSession() as s,
        ):
            await eventually(lambda: weight_of(r) == 100.0)
            for _ in range(4):
                assert (await completion(s, running.url))[0] == 200
            for method in ("GET", "HEAD", "OPTIONS"):  # not inference calls
                for _ in range(3):
                    async with s.request(method, f"{running.url}/favicon.ico") as resp:
                        await resp.read()
            for _ in range(3):  # a POST to a path the model does not serve: 404
                async with s.post(f"{running.url}/favicon.ico", data=b"x") as resp:
                    assert resp.status == 404
            for _ in range(3):  # review 15: malformed bodies the model refuses at once
                async with s.post(f"{running.url}/v1/completions", data=b"{") as resp:
                    assert 400 <= resp.status < 500

            async def trickle() -> AsyncIterator[bytes]:
                body = json.dumps({"prompt": "hi", "max_tokens": 3}).encode()
                for i in range(0, len(body), 4):
                    yield body[i : i + 4]
                    await asyncio.sleep(0.05)

            trickled = time.perf_counter()
            async with s.post(f"{running.url}/v1/completions", data=trickle()) as resp:
                assert resp.status == 200
                await resp.read()
            trickled = time.perf_counter() - trickled
        await eventually(lambda: sum(len(b.records) for b in sink.batches) >= 5)
    finally:
        for running_upstream, _ in slow.values():
            await running_upstream.stop()
    records = [rec for b in sink.batches for rec in b.records]
    assert len(records) == 5, [(rec.status, rec.latency_ms) for rec in records]
    assert {rec.status for rec in records} == {200}
    assert trickled > 0.3  # the client took that long to send its body
    assert records[-1].latency_ms < 150, records[-1]  # the model answered at once


async def test_a_request_the_client_abandoned_is_not_recorded_as_answered(
    settings: Settings, js: JetStreamContext
) -> None:
    pair = {
        "stable": await start_upstream("1"),
        "canary": await start_upstream("2", latency_ms=300),
    }
    sink = ListSink([])
    try:
        await put_route(js, route(pair, 100.0))
        async with router(router_settings(settings), sink=sink) as (running, r):
            await eventually(lambda: weight_of(r) == 100.0)
            host, port = running.url.removeprefix("http://").split(":")
            body = json.dumps({"prompt": "hi", "max_tokens": 3}).encode()
            _, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.close()  # gone long before the model answers
            await eventually(lambda: sum(len(b.records) for b in sink.batches) >= 1, 5)
    finally:
        for running_upstream, _ in pair.values():
            await running_upstream.stop()
    [record] = [rec for b in sink.batches for rec in b.records]
    assert record.error_kind == "client_closed", record
