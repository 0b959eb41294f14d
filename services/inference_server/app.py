"""Sample inference server: OpenAI-style `/v1/completions`, synthetic or from a small model.

    python -m services.inference_server.app --port 8001 --synthetic --latency-ms 20 \
        --latency-jitter 0.2 --error-rate 0.0 --version 1
    python -m services.inference_server.app --port 8002 --model-dir DIR --version 2

Latency (log-normal: median `latency_ms`, log-sigma `latency_jitter`) and the error rate change
while it runs: `GET`/`PUT /admin/config` with JSON `{"latency_ms": .., "latency_jitter": ..,
"error_rate": .., "token_interval_ms": .., "ttft_delay_ms": ..}`. In model mode the delay comes
on top of generation.

With `"stream": true` the answer is server-sent events, one token per `data:` event, the last
with `usage`, then `data: [DONE]`. Its first token comes after the delay (plus `ttft_delay_ms`),
the others `token_interval_ms` apart, less `ttft_delay_ms / (tokens - 1)` each: a regression of
the time to first token that leaves the total as it was (`--ttft-delay-ms 150
--token-interval-ms 30`, 8 tokens: first token 150 ms later, the stream ends at the same time).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from aiohttp import web
from pydantic import ValidationError

from services.inference_server.generators import (
    Generator,
    ModelGenerator,
    ModelUnavailable,
    SyntheticGenerator,
)
from services.inference_server.knobs import Knobs, draw_delay_s, draw_error, token_gaps_s
from services.runtime.processes import stop_on_signals

MAX_TOKENS_LIMIT: Final = 1024
VERSION_HEADER: Final = "X-Model-Version"


@dataclass
class Server:
    """One inference server's state: what it serves and how it behaves right now."""

    generator: Generator
    knobs: Knobs = field(default_factory=Knobs)
    version: str = "1"
    model_name: str = "sample"
    rng: random.Random = field(default_factory=random.Random)
    served: int = 0
    failed: int = 0


SERVER: Final = web.AppKey("inference_server", Server)


def _error(status: int, message: str, kind: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind}}, status=status)


def _parse_completion(body: Any) -> tuple[str, int, bool]:
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    prompt = body.get("prompt", "")
    if isinstance(prompt, list):
        prompt = "".join(str(p) for p in prompt)
    if not isinstance(prompt, str):
        raise ValueError("`prompt` must be a string")
    max_tokens = body.get("max_tokens", 16)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise ValueError("`max_tokens` must be an integer")
    if not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise ValueError(f"`max_tokens` must be between 1 and {MAX_TOKENS_LIMIT}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ValueError("`stream` must be true or false")
    return prompt, max_tokens, stream


def completion_body(
    server: Server,
    cid: str,
    pieces: Sequence[str],
    prompt: str,
    *,
    final: bool = True,
    completion_tokens: int | None = None,
) -> dict[str, Any]:
    """An answer, or one streamed chunk of it (`final`: the last, with the whole answer's
    `usage`; `completion_tokens` is then the whole answer's count, not this chunk's)."""
    tokens = len(pieces) if completion_tokens is None else completion_tokens
    return {
        "id": cid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": server.model_name,
        "system_fingerprint": server.version,
        "choices": [
            {
                "text": "".join(pieces),
                "index": 0,
                "logprobs": None,
                "finish_reason": "length" if final else None,
            }
        ],
        **(
            {
                "usage": {
                    "prompt_tokens": len(prompt.split()),
                    "completion_tokens": tokens,
                    "total_tokens": len(prompt.split()) + tokens,
                }
            }
            if final
            else {}
        ),
    }


async def completions(request: web.Request) -> web.StreamResponse:
    server = request.app[SERVER]
    try:
        prompt, max_tokens, stream = _parse_completion(await request.json())
    except (ValueError, json.JSONDecodeError) as exc:
        return _error(400, str(exc), "invalid_request_error")
    knobs = server.knobs  # one request sees one configuration
    delay = draw_delay_s(knobs, server.rng)
    if draw_error(knobs, server.rng):
        if delay:
            await asyncio.sleep(delay)
        server.failed += 1
        return _error(500, "synthetic failure (error_rate)", "server_error")
    pieces = await server.generator.complete(prompt, max_tokens)
    if delay:
        await asyncio.sleep(delay)
    cid = f"cmpl-{uuid.uuid4().hex[:24]}"
    server.served += 1
    headers = {VERSION_HEADER: server.version}
    if not stream:
        return web.json_response(completion_body(server, cid, pieces, prompt), headers=headers)
    response = web.StreamResponse(
        headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    first, between = token_gaps_s(knobs, len(pieces))
    if first:
        await asyncio.sleep(first)
    for i, piece in enumerate(pieces):
        if i and between:
            await asyncio.sleep(between)
        last = i == len(pieces) - 1
        chunk = completion_body(
            server, cid, [piece], prompt, final=last, completion_tokens=len(pieces)
        )
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def healthz(request: web.Request) -> web.Response:
    server = request.app[SERVER]
    return web.json_response(
        {
            "status": "ok",
            "mode": server.generator.mode,
            "model": server.model_name,
            "version": server.version,
            "served": server.served,
            "failed": server.failed,
        }
    )


async def get_config(request: web.Request) -> web.Response:
    return web.json_response(request.app[SERVER].knobs.model_dump())


async def put_config(request: web.Request) -> web.Response:
    server = request.app[SERVER]
    try:
        changes = await request.json()
        if not isinstance(changes, dict):
            raise ValueError("the body must be a JSON object")
        server.knobs = server.knobs.merged(changes)
    except ValidationError as exc:
        return _error(400, exc.errors()[0]["msg"] + f" ({exc.errors()[0]['loc']})", "invalid")
    except (ValueError, json.JSONDecodeError) as exc:
        return _error(400, str(exc), "invalid")
    return web.json_response(server.knobs.model_dump())


def build_app(server: Server) -> web.Application:
    app = web.Application()
    app[SERVER] = server
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/admin/config", get_config)
    app.router.add_put("/admin/config", put_config)
    return app


async def serve(server: Server, host: str, port: int) -> None:
    """Run until SIGTERM/SIGINT; prints `listening on URL` once the port is open."""
    stop = asyncio.Event()
    with stop_on_signals(stop):  # before the port opens: no window for a kill
        runner = web.AppRunner(build_app(server), access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
            bound = runner.addresses[0][1] if runner.addresses else port
            print(f"listening on http://{host}:{bound}", flush=True)
            await stop.wait()
        finally:
            await runner.cleanup()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0: a free port (printed)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--model-dir", type=Path, help="serve this Hugging Face-layout model")
    mode.add_argument("--synthetic", action="store_true", help="filler text (the default)")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="median delay (20)")
    parser.add_argument("--latency-jitter", type=float, default=0.2, help="log-sigma (0.2)")
    parser.add_argument("--error-rate", type=float, default=0.0, help="share of 500s (0)")
    parser.add_argument("--token-interval-ms", type=float, default=0.0, help="between chunks")
    parser.add_argument(
        "--ttft-delay-ms",
        type=float,
        default=0.0,
        help="streamed answers: extra wait before the first token, taken out of the pauses",
    )
    parser.add_argument("--version", default="1", help="version label it reports")
    parser.add_argument("--model-name", default="sample", help="model name it reports")
    parser.add_argument("--seed", type=int, default=None, help="seed of latency/error draws")
    parser.add_argument("--torch-threads", type=int, default=None, help="model mode CPU threads")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        knobs = Knobs(
            latency_ms=args.latency_ms,
            latency_jitter=args.latency_jitter,
            error_rate=args.error_rate,
            token_interval_ms=args.token_interval_ms,
            ttft_delay_ms=args.ttft_delay_ms,
        )
    except ValidationError as exc:
        sys.exit(f"inference-server: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}")
    generator: Generator
    if args.model_dir is not None:
        try:
            generator = ModelGenerator(args.model_dir, threads=args.torch_threads)
        except ModelUnavailable as exc:
            sys.exit(f"inference-server: {exc}")
    else:
        generator = SyntheticGenerator()
    server = Server(
        generator=generator,
        knobs=knobs,
        version=args.version,
        model_name=args.model_name,
        rng=random.Random(args.seed),  # noqa: S311 (simulated latency, not security)
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(server, args.host, args.port))


if __name__ == "__main__":
    main()
