"""Output tokens of a streamed completion, counted as its bytes pass through the router.

The proxy relays a streamed body chunk by chunk and hands each chunk to a `TokenMeter` on the
way (`feed`), so nothing is held back from the client. The meter keeps only the line it has not
seen the end of. Formats, told by the response's Content-Type (`stream_format`):

- `text/event-stream` (server-sent events): an event is the `data:` lines before a blank line;
  `data: [DONE]`, comments (`: ping`), other fields (`event:`, `id:`, `retry:`) and events with
  empty data are not tokens;
- JSON lines (`application/x-ndjson`, `application/jsonl`, ...): one JSON object per line.

A JSON object counts as one output token when it carries text (`token_in`): OpenAI-style
`choices[i].delta.content` (also `reasoning_content`, `tool_calls`) or `choices[i].text`; and,
for the native APIs of TGI, Ollama and Anthropic, `token.text` (not `special`), `response` or
`message.content`, and `delta.text`. The count a server reports itself, on the last object that
has one (`usage.completion_tokens` / `usage.output_tokens`, TGI's `details.generated_tokens`,
Ollama's `eval_count`), wins over the number of events: a server may put several tokens in one
event.

    ttft   request start to the arrival of the first token event (the router's clock)
    itl    (last token event - first token event) / (output tokens - 1), with >= 2 token events
    output_tokens   the server's count, else the token events

Anything the meter cannot read (data that is not JSON, a JSON value that is not an object, a
line over `MAX_LINE_BYTES`, a count out of range) makes it give up: the record then carries no
token fields, and the relay goes on untouched. `feed` never raises.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final, Literal

Format = Literal["sse", "ndjson"]

MAX_LINE_BYTES: Final = 1 << 20
"""A line (or one event's data) longer than this is not a completion chunk: give up."""
MAX_COUNT: Final = (1 << 32) - 1  # the table's UInt32
_FORMATS: Final[dict[str, Format]] = {
    "text/event-stream": "sse",
    "application/x-ndjson": "ndjson",
    "application/ndjson": "ndjson",
    "application/jsonl": "ndjson",
    "application/x-jsonlines": "ndjson",
    "application/jsonlines": "ndjson",
    "application/json-lines": "ndjson",
}
_DONE: Final = b"[DONE]"


def stream_format(content_type: str | None) -> Format | None:
    """The streamed format of a Content-Type whose tokens can be counted, else None."""
    if not content_type:
        return None
    return _FORMATS.get(content_type.split(";", 1)[0].strip().lower())


@dataclass(frozen=True, slots=True)
class TokenTiming:
    """What a meter measured; every field None when it could not read the stream."""

    ttft_s: float | None = None
    itl_s: float | None = None
    output_tokens: int | None = None


NO_TOKENS: Final = TokenTiming()


class _Unreadable(ValueError):
    pass


class TokenMeter:
    """Counts token events in a stream fed chunk by chunk; `result` once the stream ended."""

    __slots__ = (
        "_data",
        "_data_len",
        "_pending",
        "_pending_len",
        "_sse",
        "broken",
        "events",
        "first",
        "last",
        "objects",
        "usage",
    )

    def __init__(self, fmt: Format) -> None:
        self._sse = fmt == "sse"
        self._pending: list[bytes] = []  # the start of a line whose end has not come yet
        self._pending_len = 0
        self._data: list[bytes] = []  # the data lines of the SSE event being read
        self._data_len = 0
        self.broken = False
        self.objects = 0
        """JSON objects read (token or not)."""
        self.events = 0
        """Objects that carried output text."""
        self.first: float | None = None
        self.last: float | None = None
        self.usage: int | None = None

    def feed(self, chunk: bytes, now: float) -> None:
        """One chunk of the body as it arrived at `now` (the clock `result`'s `t0` is on)."""
        if self.broken:
            return
        try:
            self._feed(chunk, now)
        except Exception:  # malformed, hostile or just unexpected: stop counting, never raise
            self._give_up()

    def result(self, t0: float) -> TokenTiming:
        """The timings relative to `t0` (the request's start on the same clock)."""
        if self.broken or self.objects == 0:
            return NO_TOKENS
        usage, events = self.usage, self.events
        tokens = usage if usage is not None and (usage > 0 or events == 0) else events
        if self.first is None or self.last is None:
            return TokenTiming(None, None, tokens)
        itl = (self.last - self.first) / (tokens - 1) if events >= 2 and tokens >= 2 else None
        return TokenTiming(max(0.0, self.first - t0), itl, tokens)

    # ---- lines --------------------------------------------------------------------------------

    def _feed(self, chunk: bytes, now: float) -> None:
        lines = chunk.split(b"\n")
        if len(lines) == 1:
            self._hold(chunk)
            return
        if self._pending:
            self._pending.append(lines[0])
            lines[0] = b"".join(self._pending)
            self._pending, self._pending_len = [], 0
        tail = lines.pop()
        handle = self._sse_line if self._sse else self._json_line
        for line in lines:
            handle(line, now)
        if tail:
            self._hold(tail)

    def _hold(self, part: bytes) -> None:
        if not part:
            return
        self._pending_len += len(part)
        if self._pending_len > MAX_LINE_BYTES:
            raise _Unreadable("line too long")
        self._pending.append(part)

    def _sse_line(self, line: bytes, now: float) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:  # the blank line that ends an event
            if self._data:
                data = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
                self._data, self._data_len = [], 0
                if data:
                    self._object(data, now)
            return
        if line.startswith(b"data"):
            rest = line[4:]
            if rest.startswith(b":"):
                value = rest[2:] if rest.startswith(b": ") else rest[1:]
            elif not rest:
                value = b""
            else:
                return  # another field whose name starts with "data"
            self._data_len += len(value)
            if self._data_len > MAX_LINE_BYTES:
                raise _Unreadable("event too long")
            self._data.append(value)
        # comments (":"), event:, id:, retry: and unknown fields say nothing about tokens

    def _json_line(self, line: bytes, now: float) -> None:
        line = line.strip()
        if line:
            self._object(line, now)

    def _object(self, data: bytes, now: float) -> None:
        if data == _DONE:
            return
        value = json.loads(data.decode())  # str parses faster than bytes; SSE is UTF-8
        if not isinstance(value, dict):
            raise _Unreadable("not a JSON object")
        self.objects += 1
        if token_in(value):
            if self.first is None:
                self.first = now
            self.last = now
            self.events += 1
        count = count_in(value)
        if count is not None:
            self.usage = count

    def _give_up(self) -> None:
        self.broken = True
        self._pending, self._data = [], []
        self._pending_len = self._data_len = 0


# ---- what an object says ----------------------------------------------------------------------


def _text(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def token_in(obj: dict[str, Any]) -> bool:
    """Whether one streamed JSON object carries output text (one token event)."""
    choices = obj.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict) and (
                _text(delta.get("content"))
                or _text(delta.get("reasoning_content"))
                or _text(delta.get("reasoning"))
                or (isinstance(delta.get("tool_calls"), list) and bool(delta["tool_calls"]))
            ):
                return True
            if _text(choice.get("text")):
                return True
        return False
    token = obj.get("token")  # TGI's native /generate_stream
    if isinstance(token, dict):
        return _text(token.get("text")) and token.get("special") is not True
    if _text(obj.get("response")):  # Ollama /api/generate
        return True
    message = obj.get("message")  # Ollama /api/chat
    if isinstance(message, dict) and _text(message.get("content")):
        return True
    delta = obj.get("delta")  # Anthropic content_block_delta
    return isinstance(delta, dict) and (_text(delta.get("text")) or _text(delta.get("thinking")))


def _count(value: Any) -> int | None:
    if value is None:
        return None
    if type(value) is not int or not 0 <= value <= MAX_COUNT:
        raise _Unreadable("token count out of range")
    return value


def count_in(obj: dict[str, Any]) -> int | None:
    """The output-token count a server reports in one object, if it does."""
    usage = obj.get("usage")
    if isinstance(usage, dict):
        found = usage.get("completion_tokens")
        if found is None:
            found = usage.get("output_tokens")
        return _count(found)
    details = obj.get("details")  # TGI: on the last event
    if isinstance(details, dict) and "generated_tokens" in details:
        return _count(details["generated_tokens"])
    if obj.get("done") is True and "eval_count" in obj:  # Ollama: on the last line
        return _count(obj["eval_count"])
    return None
