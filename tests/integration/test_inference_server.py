"""The sample inference server over real HTTP: completions, streaming, live knobs, model mode."""

from __future__ import annotations

import json
import math
import random
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from services.inference_server.app import Server, build_app
from services.inference_server.generators import SyntheticGenerator
from services.inference_server.knobs import Knobs, draw_delay_s, token_gaps_s
from services.inference_server.load import generate_load

pytestmark = pytest.mark.integration


async def start(server: Server) -> tuple[str, web.AppRunner]:
    runner = web.AppRunner(build_app(server), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return f"http://127.0.0.1:{runner.addresses[0][1]}", runner


@pytest.fixture
async def synthetic() -> AsyncIterator[tuple[str, Server]]:
    server = Server(
        generator=SyntheticGenerator(),
        knobs=Knobs(latency_ms=0, latency_jitter=0),
        version="7",
        rng=random.Random(3),
    )
    url, runner = await start(server)
    try:
        yield url, server
    finally:
        await runner.cleanup()


async def post(url: str, body: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/completions", json=body) as r:
        return r.status, await r.json(content_type=None)


async def test_completion_is_openai_shaped(synthetic: tuple[str, Server]) -> None:
    url, _ = synthetic
    status, body = await post(url, {"prompt": "hello", "max_tokens": 4})
    assert status == 200
    assert body["object"] == "text_completion" and body["system_fingerprint"] == "7"
    assert body["choices"][0]["finish_reason"] == "length"
    assert len(body["choices"][0]["text"].split()) == 4
    assert body["usage"]["completion_tokens"] == 4


async def test_streaming_sends_one_sse_event_per_token_then_done(
    synthetic: tuple[str, Server],
) -> None:
    url, _ = synthetic
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 3, "stream": True}) as r,
    ):
        assert r.headers["Content-Type"].startswith("text/event-stream")
        text = (await r.read()).decode()
    events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
    assert events[-1] == "[DONE]" and len(events) == 4
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "length"]
    assert ["usage" in c for c in chunks] == [False, False, True]
    assert chunks[-1]["usage"]["completion_tokens"] == 3  # the whole answer's, not the chunk's


async def arrivals(url: str, max_tokens: int) -> list[float]:
    """Seconds from the request to each SSE event with a token."""
    t0 = time.perf_counter()
    seen: list[float] = []
    buffer = b""
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"{url}/v1/completions", json={"prompt": "x", "max_tokens": max_tokens, "stream": True}
        ) as r,
    ):
        async for chunk in r.content.iter_any():
            buffer += chunk
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                if event != b"data: [DONE]":
                    seen.append(time.perf_counter() - t0)
    return seen


async def test_ttft_delay_moves_the_first_token_and_keeps_the_total(
    synthetic: tuple[str, Server],
) -> None:
    url, server = synthetic
    server.knobs = Knobs(latency_ms=0, latency_jitter=0, token_interval_ms=50)
    before = await arrivals(url, 6)
    server.knobs = server.knobs.merged({"ttft_delay_ms": 200})
    after = await arrivals(url, 6)
    assert len(before) == len(after) == 6
    assert before[0] < 0.1 and after[0] >= 0.2, (before, after)
    assert abs(after[-1] - before[-1]) < 0.1, (before, after)  # 5 x 50 ms either way
    # Longer than the pauses it can be taken from: the total grows by the rest.
    server.knobs = server.knobs.merged({"ttft_delay_ms": 400})
    longer = await arrivals(url, 6)
    assert longer[0] >= 0.4 and longer[-1] - longer[0] < 0.05, longer


def test_token_gaps_take_the_ttft_delay_out_of_the_pauses() -> None:
    knobs = Knobs(token_interval_ms=30, ttft_delay_ms=140)
    first, between = token_gaps_s(knobs, 8)
    assert first == pytest.approx(0.14) and between == pytest.approx(0.01)
    assert token_gaps_s(knobs, 1) == pytest.approx((0.14, 0.03))  # one token: no pauses
    assert token_gaps_s(Knobs(token_interval_ms=10, ttft_delay_ms=500), 4) == (0.5, 0.0)
    assert token_gaps_s(Knobs(token_interval_ms=20), 4) == pytest.approx((0.0, 0.02))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"prompt": 3}, "prompt"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stream": "yes"}, "stream"),
        ([1, 2], "JSON object"),
    ],
)
async def test_bad_requests_get_400_with_the_reason(
    synthetic: tuple[str, Server], body: Any, message: str
) -> None:
    status, answer = await post(synthetic[0], body)
    assert status == 400 and message in answer["error"]["message"]


async def test_knobs_change_while_it_runs(synthetic: tuple[str, Server]) -> None:
    url, _ = synthetic
    async with aiohttp.ClientSession() as s:
        async with s.put(f"{url}/admin/config", json={"error_rate": 1.0}) as r:
            assert r.status == 200 and (await r.json())["error_rate"] == 1.0
        assert (await post(url, {"prompt": "a"}))[0] == 500
        async with s.put(f"{url}/admin/config", json={"error_rate": 2}) as r:
            assert r.status == 400  # refused, the previous value stays
        async with s.put(f"{url}/admin/config", json={"latency": 2}) as r:
            assert r.status == 400  # unknown knob
        async with s.put(f"{url}/admin/config", json={"error_rate": 0, "latency_ms": 30}) as r:
            assert r.status == 200
        async with s.get(f"{url}/admin/config") as r:
            knobs = await r.json()
        assert (knobs["error_rate"], knobs["latency_ms"]) == (0, 30)
        result = await generate_load(f"{url}/v1/completions", rps=100, duration_s=0.3)
        async with s.get(f"{url}/healthz") as r:
            health = await r.json()
    assert result.by_status[200] == result.sent == 30
    median = statistics.median(result.latencies_ms)
    assert 25 <= median < 150, median
    assert (health["served"], health["failed"]) == (30, 1)


def test_latency_draws_have_the_configured_median_and_spread() -> None:
    rng = random.Random(0)
    knobs = Knobs(latency_ms=20, latency_jitter=0.5)
    draws = [draw_delay_s(knobs, rng) * 1000 for _ in range(20_000)]
    assert 19 <= statistics.median(draws) <= 21
    assert 0.45 <= statistics.stdev([math.log(d) for d in draws]) <= 0.55
    assert draw_delay_s(Knobs(latency_ms=20, latency_jitter=0), rng) == 0.02
    assert draw_delay_s(Knobs(latency_ms=0), rng) == 0.0


def test_command_line_serves_on_a_free_port_and_stops_on_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.inference_server.app", "--port", "0", "--synthetic"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:")
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


def test_command_line_refuses_bad_knobs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "services.inference_server.app", "--error-rate", "3"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode != 0 and "error_rate" in done.stderr


async def test_model_mode_serves_a_generated_model(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from services.benchmarker.samples import write_trained_model
    from services.inference_server.generators import ModelGenerator

    model_dir = write_trained_model(tmp_path / "good", variant="good")
    server = Server(generator=ModelGenerator(model_dir, threads=1), knobs=Knobs(latency_ms=0))
    url, runner = await start(server)
    try:
        status, body = await post(url, {"prompt": "The model", "max_tokens": 5})
        again = await post(url, {"prompt": "The model", "max_tokens": 5})
    finally:
        await runner.cleanup()
    assert status == 200 and body["usage"]["completion_tokens"] == 5
    assert body["choices"][0]["text"] == again[1]["choices"][0]["text"]  # greedy: deterministic
