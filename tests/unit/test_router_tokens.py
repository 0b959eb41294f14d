"""The router's token meter: output tokens and their timing, read from a stream as it passes."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from services.router.tokens import (
    MAX_LINE_BYTES,
    NO_TOKENS,
    TokenMeter,
    TokenTiming,
    count_in,
    stream_format,
    token_in,
)


def sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def completion(text: str, usage: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"object": "text_completion", "choices": [{"index": 0, "text": text}]}
    if usage is not None:
        body["usage"] = {"prompt_tokens": 1, "completion_tokens": usage, "total_tokens": usage + 1}
    return body


def chat(content: str | None, **delta: Any) -> dict[str, Any]:
    d = dict(delta)
    if content is not None:
        d["content"] = content
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": d}]}


def meter_of(chunks: list[tuple[bytes, float]], fmt: str = "sse") -> TokenMeter:
    meter = TokenMeter("sse" if fmt == "sse" else "ndjson")
    for chunk, at in chunks:
        meter.feed(chunk, at)
    return meter


def test_one_event_per_token_gives_ttft_itl_and_the_count() -> None:
    # Request started at t=10.0; tokens arrive at 10.2, 10.3, 10.4, 10.5; then [DONE].
    chunks = [(sse(completion(f" w{i}")), 10.2 + i / 10) for i in range(4)]
    meter = meter_of([*chunks, (b"data: [DONE]\n\n", 10.6)])
    got = meter.result(10.0)
    assert got.output_tokens == 4
    assert got.ttft_s == pytest.approx(0.2)
    assert got.itl_s == pytest.approx(0.1)  # (10.5 - 10.2) / 3


def test_the_servers_usage_count_wins_over_the_events() -> None:
    # Two events, the second carries usage: 9 tokens (several per event).
    meter = meter_of([(sse(chat("Hello")), 1.0), (sse(completion(" world", usage=9)), 1.8)])
    got = meter.result(0.5)
    assert got.output_tokens == 9
    assert got.ttft_s == pytest.approx(0.5)
    assert got.itl_s == pytest.approx(0.8 / 8)


def test_a_usage_only_final_chunk_is_not_a_token() -> None:
    # OpenAI with stream_options.include_usage: a last chunk with no choices and the usage.
    final = {"object": "chat.completion.chunk", "choices": [], "usage": {"completion_tokens": 3}}
    meter = meter_of(
        [
            (sse(chat("", role="assistant")), 0.1),  # the role chunk: no text, no token
            (sse(chat("a")), 0.2),
            (sse(chat("b")), 0.3),
            (sse(chat("c")), 0.4),
            (sse(final), 0.9),
            (b"data: [DONE]\n\n", 0.9),
        ]
    )
    got = meter.result(0.0)
    assert got.output_tokens == 3 and got.ttft_s == pytest.approx(0.2)
    assert got.itl_s == pytest.approx(0.1)  # the last token event, not the usage chunk


def test_events_split_anywhere_across_reads_count_the_same() -> None:
    body = b"".join(sse(completion(f" t{i}")) for i in range(20)) + b"data: [DONE]\n\n"
    whole = meter_of([(body, 1.0)]).result(0.0)
    rng = random.Random(5)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(body)), rng.randint(1, 40)))
        parts = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        got = meter_of([(p, 1.0) for p in parts]).result(0.0)
        assert got.output_tokens == whole.output_tokens == 20
    one_byte = meter_of([(body[i : i + 1], 1.0) for i in range(len(body))]).result(0.0)
    assert one_byte.output_tokens == 20


def test_a_token_is_timed_when_its_event_ends() -> None:
    event = sse(completion(" x"))
    meter = meter_of([(event[:10], 1.0), (event[10:], 1.5), (sse(completion(" y")), 2.0)])
    got = meter.result(0.0)
    assert got.ttft_s == pytest.approx(1.5) and got.itl_s == pytest.approx(0.5)


def test_sse_details_crlf_comments_fields_and_multiline_data() -> None:
    body = (
        b": keep-alive\r\n\r\n"
        b"event: message\r\nid: 1\r\ndata:" + json.dumps(completion("a")).encode() + b"\r\n\r\n"
        b"retry: 100\n\n"
        b'data: {"choices": [{"text":\n'
        b'data: "b"}]}\n\n'  # one event over two data lines (joined by a newline)
        b"data\n\n"  # a data field with no value: nothing to dispatch
        b"data: [DONE]\n\n"
    )
    got = meter_of([(body, 3.0)]).result(1.0)
    assert got == TokenTiming(2.0, 0.0, 2)


def test_one_token_has_no_inter_token_latency() -> None:
    got = meter_of([(sse(completion("only")), 0.25), (b"data: [DONE]\n\n", 0.3)]).result(0.0)
    assert got == TokenTiming(0.25, None, 1)


def test_a_stream_without_text_has_no_ttft_but_counts_zero_tokens() -> None:
    got = meter_of([(sse(chat("", role="assistant")), 0.1), (b"data: [DONE]\n\n", 0.2)])
    assert got.result(0.0) == TokenTiming(None, None, 0)


@pytest.mark.parametrize(
    "body",
    [
        b"data: not json\n\n",
        b"data: [1, 2, 3]\n\n",  # JSON, but not an object
        b'data: {"choices": [{"text": "a"}]\n\n',  # cut JSON
        b'data: {"usage": {"completion_tokens": -4}}\n\n',
        b'data: {"usage": {"completion_tokens": 1e3}}\n\n',
        b'data: {"usage": {"completion_tokens": true}}\n\n',
        b"data: \xff\xfe\n\n",  # not UTF-8
        b"data: " + b"[" * 100_000 + b"\n\n",  # nesting deep enough to break a recursive parser
    ],
)
def test_malformed_data_leaves_every_field_none(body: bytes) -> None:
    meter = meter_of([(sse(completion("a")), 0.1), (body, 0.2), (sse(completion("b")), 0.3)])
    assert meter.broken and meter.result(0.0) is NO_TOKENS


def test_an_endless_line_is_given_up_without_holding_it() -> None:
    meter = TokenMeter("sse")
    piece = b"x" * 65536
    for _ in range(MAX_LINE_BYTES // len(piece) + 2):
        meter.feed(piece, 1.0)
    assert meter.broken and meter.result(0.0) is NO_TOKENS
    meter.feed(sse(completion("a")), 2.0)  # stays given up, never raises
    assert meter.result(0.0) is NO_TOKENS


def test_a_stream_that_is_no_completion_gives_nothing() -> None:
    assert meter_of([(b"", 1.0)]).result(0.0) is NO_TOKENS
    assert meter_of([(b": only comments\n\n", 1.0)]).result(0.0) is NO_TOKENS
    half = sse(completion("a"))[:-1]  # the stream ended before the event did
    assert meter_of([(half, 1.0)]).result(0.0) is NO_TOKENS


def test_json_lines_ollama_style() -> None:
    lines = [
        {"model": "m", "response": "Hel", "done": False},
        {"model": "m", "response": "lo", "done": False},
        {"model": "m", "response": "", "done": True, "eval_count": 5},
    ]
    body = [(json.dumps(obj).encode() + b"\n", 1.0 + i) for i, obj in enumerate(lines)]
    got = meter_of(body, "ndjson").result(0.5)
    assert got.output_tokens == 5 and got.ttft_s == pytest.approx(0.5)
    assert got.itl_s == pytest.approx(1.0 / 4)
    crlf = b"\r\n".join(json.dumps(o).encode() for o in lines[:2]) + b"\r\n"
    assert meter_of([(crlf, 1.0)], "ndjson").result(0.0).output_tokens == 2


@pytest.mark.parametrize(
    ("obj", "token"),
    [
        (completion("a"), True),
        (completion(""), False),
        (chat("hi"), True),
        (chat(None, reasoning_content="thinking"), True),
        (chat(None, tool_calls=[{"index": 0, "function": {"arguments": "{"}}]), True),
        (chat(None, role="assistant"), False),
        ({"choices": [None, {"text": "b"}]}, True),
        ({"choices": "nope"}, False),
        ({"token": {"text": "t", "special": False}}, True),  # TGI
        ({"token": {"text": "</s>", "special": True}}, False),
        ({"message": {"role": "assistant", "content": "c"}}, True),  # Ollama chat
        ({"type": "content_block_delta", "delta": {"type": "text_delta", "text": "d"}}, True),
        ({"type": "message_delta", "delta": {"stop_reason": "end_turn"}}, False),
        ({}, False),
    ],
)
def test_what_counts_as_a_token_event(obj: dict[str, Any], token: bool) -> None:
    assert token_in(obj) is token


def test_token_counts_servers_report() -> None:
    assert count_in({"usage": {"completion_tokens": 7}}) == 7
    assert count_in({"usage": {"output_tokens": 8}}) == 8  # Anthropic message_delta
    assert count_in({"usage": None}) is None
    assert count_in({"details": {"generated_tokens": 9}}) == 9  # TGI
    assert count_in({"done": True, "eval_count": 10}) == 10  # Ollama
    assert count_in({"done": False, "eval_count": 10}) is None


def test_stream_formats_by_content_type() -> None:
    assert stream_format("text/event-stream; charset=utf-8") == "sse"
    assert stream_format("Text/Event-Stream") == "sse"
    assert stream_format("application/x-ndjson") == "ndjson"
    assert stream_format("application/jsonl") == "ndjson"
    assert stream_format("application/json") is None
    assert stream_format("") is None and stream_format(None) is None
