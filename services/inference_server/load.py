"""Open-loop HTTP load at a fixed rate: the demo's traffic and the router bench's client.

Open loop: request i is sent at start + i / rps whether or not earlier ones have answered, so a
slow server cannot slow the offered load down (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

DEFAULT_BODY: dict[str, Any] = {"prompt": "hello", "max_tokens": 8}
Headers = Mapping[str, str] | Callable[[int], Mapping[str, str]]


@dataclass
class LoadResult:
    """What one run sent and got back."""

    sent: int = 0
    duration_s: float = 0.0
    by_status: Counter[int] = field(default_factory=Counter)
    """HTTP status per response; 0 for requests that got no response (see `errors`)."""
    errors: Counter[str] = field(default_factory=Counter)
    """Exceptions by type name, for requests without a response."""
    by_header: Counter[str] = field(default_factory=Counter)
    """Values of the counted response header (default `X-Preflight-Role`)."""
    latencies_ms: list[float] = field(default_factory=list)
    """Send to last byte, per answered request, in completion order."""
    max_send_lag_ms: float = 0.0
    """How far behind schedule the sender fell at worst (high: the client was the bottleneck)."""
    sending_s: float = 0.0
    """From the first send to the last."""

    @property
    def achieved_rps(self) -> float:
        """Requests sent per second while sending (the offered load actually reached)."""
        if self.sent < 2 or self.sending_s <= 0:
            return 0.0
        return (self.sent - 1) / self.sending_s

    def ok(self) -> int:
        return sum(n for status, n in self.by_status.items() if 200 <= status < 400)

    def percentile_ms(self, q: float) -> float | None:
        """Nearest-rank percentile of `latencies_ms` (q in 0..100)."""
        if not self.latencies_ms:
            return None
        ordered = sorted(self.latencies_ms)
        return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


async def generate_load(
    url: str,
    rps: float,
    duration_s: float,
    headers: Headers | None = None,
    *,
    method: str = "POST",
    body: Mapping[str, Any] | bytes | None = None,
    count_header: str | None = "X-Preflight-Role",
    timeout_s: float = 30.0,
    session: aiohttp.ClientSession | None = None,
) -> LoadResult:
    """Send `rps` requests a second for `duration_s` seconds and wait for every answer.

    `headers` may be a function of the request index (say, a sticky client id per request).
    `body` defaults to a small completion request; pass bytes to send them as they are.
    """
    if rps <= 0 or duration_s <= 0:
        raise ValueError("rps and duration_s must be positive")
    payload = (
        body
        if isinstance(body, bytes)
        else json.dumps(dict(body) if body is not None else DEFAULT_BODY).encode()
    )
    total = max(1, round(rps * duration_s))
    result = LoadResult()
    own = session is None
    client = session or aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=timeout_s),
    )

    async def one(i: int) -> None:
        extra = headers(i) if callable(headers) else headers or {}
        sent = time.perf_counter()
        try:
            async with client.request(
                method,
                url,
                data=payload if method not in ("GET", "HEAD") else None,
                headers={"Content-Type": "application/json", **extra},
            ) as response:
                await response.read()
                status = response.status
                if count_header is not None:
                    result.by_header[response.headers.get(count_header, "")] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            result.by_status[0] += 1
            result.errors[type(exc).__name__] += 1
            return
        result.latencies_ms.append((time.perf_counter() - sent) * 1000.0)
        result.by_status[status] += 1

    tasks: list[asyncio.Task[None]] = []
    start = time.perf_counter()
    try:
        for i in range(total):
            due = start + i / rps
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            else:
                result.max_send_lag_ms = max(result.max_send_lag_ms, -wait * 1000.0)
            tasks.append(asyncio.create_task(one(i)))
            result.sent += 1
        result.sending_s = time.perf_counter() - start
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        if own:
            await client.close()
    result.duration_s = time.perf_counter() - start
    return result
