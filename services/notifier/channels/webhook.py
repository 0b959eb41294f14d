"""A generic JSON webhook for systems that are not Slack: the event's JSON, optionally signed.

Signature: `X-Preflight-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>` with
the Unix time in `X-Preflight-Timestamp`; a receiver recomputes it and rejects old timestamps
(docs/notifier.md has the code).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from datetime import datetime
from typing import Final
from urllib.parse import urlsplit

import aiohttp
from pydantic import SecretStr

from services.notifier.channels.base import (
    CannotTell,
    DeliveryError,
    Notice,
    Receipt,
    redact_url,
    url_key,
)
from services.notifier.retry import RetryPolicy, is_retryable_status

TIMESTAMP_HEADER: Final = "X-Preflight-Timestamp"
SIGNATURE_HEADER: Final = "X-Preflight-Signature"
EVENT_HEADER: Final = "X-Preflight-Event"
NOTICE_ID_HEADER: Final = "X-Preflight-Notice-Id"
TIMEOUT_S: Final = 15.0


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """`sha256=<hex>` of HMAC-SHA256 over `<timestamp>.<body>`."""
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def verify(
    secret: bytes, timestamp: str, body: bytes, signature: str, now: float, tolerance_s: float = 300
) -> bool:
    """What a receiver does: same HMAC, constant-time compare, timestamp not too old or new.

    Never raises on what a sender put in the headers: a timestamp of anything but ASCII digits
    (`int` would take " 12", "+12", "1_2" or Arabic-Indic digits) or a non-ASCII signature is
    simply not valid."""
    if not (timestamp.isascii() and timestamp.isdigit()) or not signature.isascii():
        return False
    if abs(now - int(timestamp)) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body).encode(), signature.encode())


def describe_url(url: str) -> str:
    """Scheme and host only: paths and queries of webhook URLs often hold tokens."""
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # not a URL, or a port that is not a number
        return "<unparseable URL>"
    return f"{parts.scheme}://{parts.hostname or '?'}{port}/…"


def url_problem(url: str) -> str | None:
    """Why `url` can never be posted to (asking again will not help), or None."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a port that is not a number)
    except ValueError:
        return "not a valid URL"
    if parts.scheme not in ("http", "https"):
        return "not an http(s) URL"
    if not parts.hostname:
        return "no host in the URL"
    return None


class WebhookChannel:
    """POSTs each notice's event JSON; 429 and 5xx are retried with the policy, 4xx are not."""

    updatable = False

    def __init__(
        self,
        url: str,
        session: Callable[[], aiohttp.ClientSession],
        retry: RetryPolicy,
        secret: SecretStr | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.url = url
        self.session = session
        self.retry = retry
        self.secret = secret
        self.clock = clock or retry.clock
        self.key = url_key("webhook", url)  # never the path: it often holds a secret
        self.where = describe_url(url)

    def headers(self, notice: Notice) -> dict[str, str]:
        headers = {
            "Content-Type": "application/json",
            EVENT_HEADER: notice.event.type,
            NOTICE_ID_HEADER: notice.notice_id,
        }
        if self.secret is not None:
            timestamp = str(int(self.clock().timestamp()))
            headers[TIMESTAMP_HEADER] = timestamp
            headers[SIGNATURE_HEADER] = sign(
                self.secret.get_secret_value().encode(), timestamp, notice.body
            )
        return headers

    async def post(self, notice: Notice, *, progress: bool = False, key: str = "") -> Receipt:
        if (problem := url_problem(self.url)) is not None:
            raise DeliveryError(self.key, f"webhook {self.where}: {problem}", permanent=True)
        last = ""
        for attempt in range(1, self.retry.max_attempts + 1):
            wait = self.retry.backoff(attempt)
            try:
                async with self.session().post(
                    self.url,
                    data=notice.body,
                    headers=self.headers(notice),  # signed afresh: the timestamp is current
                    timeout=aiohttp.ClientTimeout(total=TIMEOUT_S),
                    allow_redirects=False,
                ) as response:
                    if 200 <= response.status < 300:
                        return Receipt()
                    last = f"HTTP {response.status}"
                    if not is_retryable_status(response.status):
                        raise DeliveryError(
                            self.key, f"webhook {self.where}: {last}", permanent=True
                        )
                    if response.status == 429:
                        wait = self.retry.wait_after_429(
                            response.headers.get("Retry-After"), attempt
                        )
            except aiohttp.InvalidURL as exc:  # includes non-http(s) URLs: never transient
                raise DeliveryError(
                    self.key,
                    f"webhook {self.where}: invalid URL ({type(exc).__name__})",
                    permanent=True,
                ) from None
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                last = f"{type(exc).__name__}: {redact_url(str(exc), self.url, self.where)}"
            if attempt < self.retry.max_attempts:
                await self.retry.sleep(wait)
        raise DeliveryError(
            self.key,
            f"webhook {self.where}: {last} after {self.retry.max_attempts} attempts",
            permanent=False,
        )

    async def update(self, receipt: Receipt, notice: Notice, *, key: str = "") -> Receipt:
        return receipt

    async def find(self, key: str, *, since: datetime) -> Receipt | None:
        # A receiver drops a repeat by its X-Preflight-Notice-Id.
        raise CannotTell(f"webhook {self.where} cannot be asked what it received")
