"""Retries of one delivery: backoff on 5xx and connection errors, Retry-After honoured on 429.

Slack's own clients take these as slack-sdk retry handlers; the generic webhook uses the same
policy in its own loop. The built-in slack-sdk handlers are not used as they are: their server
error handler retries 500 and 503 only, their rate-limit handler reads Retry-After as whole
seconds only and adds up to a second of jitter, and both sleep with `asyncio.sleep` itself, so a
test cannot skip the wait. These subclasses fix those four things and keep slack-sdk's loop.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from aiohttp import ClientError
from slack_sdk.http_retry.async_handler import AsyncRetryHandler
from slack_sdk.http_retry.request import HttpRequest
from slack_sdk.http_retry.response import HttpResponse
from slack_sdk.http_retry.state import RetryState

Sleep = Callable[[float], Awaitable[None]]
Clock = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


def is_retryable_status(status: int) -> bool:
    """429 (rate limited) and every 5xx; other statuses will not change by asking again."""
    return status == 429 or 500 <= status <= 599


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a Retry-After value: delta-seconds or an HTTP date (RFC 9110)."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - now).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


@dataclass(frozen=True)
class RetryPolicy:
    """How hard one delivery tries before it is reported as failed.

    `max_attempts` counts every attempt, the first included. The wait after attempt n is
    `backoff_s * 2**(n-1)`, at most `max_backoff_s`; after a 429 it is the server's Retry-After,
    at most `max_retry_after_s` (a longer wait would hold the message past reason; the stream
    redelivers it later instead).

    When the attempts of one delivery run out on a transient failure, the stream redelivers the
    event after `redelivery_delay(n)`: `redelivery_s * 4**(n-1)`, at most `max_redelivery_s`
    (30 s, 2 min, 8 min, 10 min, 10 min, ...). With `PREFLIGHT_MAX_DELIVER=5` a notice rides out
    a Slack or webhook outage of about 20 minutes before it is dead-lettered.
    """

    max_attempts: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    max_retry_after_s: float = 60.0
    redelivery_s: float = 30.0
    max_redelivery_s: float = 600.0
    sleep: Sleep = field(default=asyncio.sleep, compare=False)
    clock: Clock = field(default=_utc_now, compare=False)

    def backoff(self, attempt: int) -> float:
        """The wait after failed attempt `attempt` (1-based)."""
        wait: float = self.backoff_s * 2.0 ** max(0, attempt - 1)
        return min(self.max_backoff_s, wait)

    def redelivery_delay(self, attempt: int) -> float:
        """The wait before the stream delivers an event again after failed delivery `attempt`."""
        wait: float = self.redelivery_s * 4.0 ** max(0, attempt - 1)
        return min(self.max_redelivery_s, wait)

    def wait_after_429(self, retry_after: str | None, attempt: int) -> float:
        seconds = parse_retry_after(retry_after, self.clock())
        if seconds is None:
            return self.backoff(attempt)
        return min(seconds, self.max_retry_after_s)


def _header(response: HttpResponse | None, name: str) -> str | None:
    if response is None:
        return None
    for key, values in response.headers.items():
        if key.lower() == name:
            return values[0] if isinstance(values, list) and values else str(values)
    return None


class _PolicyHandler(AsyncRetryHandler):
    """A slack-sdk retry handler whose waits come from a `RetryPolicy` (and its sleep)."""

    def __init__(self, policy: RetryPolicy) -> None:
        # slack-sdk shares one attempt counter between handlers: retries = attempts - 1.
        super().__init__(max_retry_count=policy.max_attempts - 1)
        self.policy = policy

    def wait(self, state: RetryState, response: HttpResponse | None) -> float:
        return self.policy.backoff(state.current_attempt + 1)

    async def prepare_for_next_attempt_async(
        self,
        *,
        state: RetryState,
        request: HttpRequest,
        response: HttpResponse | None = None,
        error: Exception | None = None,
    ) -> None:
        state.next_attempt_requested = True
        await self.policy.sleep(self.wait(state, response))
        state.increment_current_attempt()


class RateLimitRetry(_PolicyHandler):
    """429: wait what Retry-After says (seconds or a date), then try again."""

    async def _can_retry_async(
        self,
        *,
        state: RetryState,
        request: HttpRequest,
        response: HttpResponse | None = None,
        error: Exception | None = None,
    ) -> bool:
        return response is not None and response.status_code == 429

    def wait(self, state: RetryState, response: HttpResponse | None) -> float:
        return self.policy.wait_after_429(
            _header(response, "retry-after"), state.current_attempt + 1
        )


class ServerErrorRetry(_PolicyHandler):
    """Any 5xx: back off exponentially, then try again."""

    async def _can_retry_async(
        self,
        *,
        state: RetryState,
        request: HttpRequest,
        response: HttpResponse | None = None,
        error: Exception | None = None,
    ) -> bool:
        return response is not None and 500 <= response.status_code <= 599


class ConnectionErrorRetry(_PolicyHandler):
    """The connection failed or timed out before any response: back off, then try again."""

    async def _can_retry_async(
        self,
        *,
        state: RetryState,
        request: HttpRequest,
        response: HttpResponse | None = None,
        error: Exception | None = None,
    ) -> bool:
        return response is None and isinstance(error, ClientError | TimeoutError | OSError)


def slack_retry_handlers(policy: RetryPolicy) -> list[AsyncRetryHandler]:
    """The handlers given to `AsyncWebClient` and `AsyncWebhookClient`."""
    return [RateLimitRetry(policy), ServerErrorRetry(policy), ConnectionErrorRetry(policy)]
