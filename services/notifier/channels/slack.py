"""Slack through slack-sdk: a bot token (`chat.postMessage`, `chat.update`) or an incoming webhook.

The token and the webhook URL (itself a secret) are never logged: both clients get a logger set
to WARNING, so slack-sdk's DEBUG request dumps (which print the webhook URL) are never written.
"""

from __future__ import annotations

import logging
from typing import Final

import aiohttp
from pydantic import SecretStr
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.webhook.async_client import AsyncWebhookClient

from services.notifier.channels.base import (
    DeliveryError,
    Notice,
    Receipt,
    channel_key,
    redact_url,
    url_key,
)
from services.notifier.retry import RetryPolicy, is_retryable_status, slack_retry_handlers

DEFAULT_BASE_URL: Final = "https://slack.com/api/"
TIMEOUT_S: Final = 15

# Slack error codes that asking again can fix; any other `ok: false` is permanent
# (channel_not_found, not_in_channel, invalid_auth, token_revoked, invalid_blocks, ...).
TRANSIENT_ERRORS: Final = frozenset(
    {"ratelimited", "internal_error", "fatal_error", "service_unavailable", "request_timeout"}
)
# chat.update cannot edit this message: post a fresh progress message instead.
GONE_ERRORS: Final = frozenset({"message_not_found", "cant_update_message", "edit_window_closed"})

_quiet = logging.getLogger("preflight.notifier.slack-sdk")
_quiet.setLevel(logging.WARNING)


def web_client(token: SecretStr, base_url: str | None, retry: RetryPolicy) -> AsyncWebClient:
    url = base_url or DEFAULT_BASE_URL
    return AsyncWebClient(
        token=token.get_secret_value(),
        base_url=url if url.endswith("/") else url + "/",
        timeout=TIMEOUT_S,
        retry_handlers=slack_retry_handlers(retry),
        logger=_quiet,
    )


def webhook_client(url: SecretStr, retry: RetryPolicy) -> AsyncWebhookClient:
    return AsyncWebhookClient(
        url.get_secret_value(),
        timeout=TIMEOUT_S,
        retry_handlers=slack_retry_handlers(retry),
        logger=_quiet,
    )


def _error_code(exc: SlackApiError) -> str:
    """Slack's `error` field (`channel_not_found`, ...), or "" when the body was not JSON."""
    try:
        return str(exc.response.get("error") or "")
    except (AttributeError, TypeError, ValueError):
        return ""


def _api_error(where: str, method: str, exc: SlackApiError) -> DeliveryError:
    status = getattr(exc.response, "status_code", None)
    code = _error_code(exc)
    transient = (isinstance(status, int) and is_retryable_status(status)) or (
        code in TRANSIENT_ERRORS
    )
    detail = f"HTTP {status}" + (f" {code}" if code else "")
    return DeliveryError(where, f"Slack {method}: {detail}", permanent=not transient)


class SlackBotChannel:
    """A channel (name or id) posted to with a bot token; progress is edited in place."""

    updatable = True

    def __init__(self, client: AsyncWebClient, channel: str) -> None:
        self.client = client
        self.channel = channel
        self.key = channel_key("slack", channel)

    async def post(self, notice: Notice, *, progress: bool = False) -> Receipt:
        message = notice.progress if progress else notice.message
        try:
            response = await self.client.chat_postMessage(
                channel=self.channel,
                text=message.text,
                blocks=message.blocks,
                unfurl_links=False,
                unfurl_media=False,
            )
        except SlackApiError as exc:
            raise _api_error(self.key, "chat.postMessage", exc) from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise DeliveryError(
                self.key, f"Slack chat.postMessage: {type(exc).__name__}: {exc}", permanent=False
            ) from None
        return Receipt(
            channel=str(response.get("channel") or self.channel), ts=str(response.get("ts") or "")
        )

    async def update(self, receipt: Receipt, notice: Notice) -> Receipt:
        try:
            await self.client.chat_update(
                channel=receipt.channel,
                ts=receipt.ts,
                text=notice.progress.text,
                blocks=notice.progress.blocks,
            )
        except SlackApiError as exc:
            if _error_code(exc) in GONE_ERRORS:
                return await self.post(notice, progress=True)
            raise _api_error(self.key, "chat.update", exc) from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise DeliveryError(
                self.key, f"Slack chat.update: {type(exc).__name__}: {exc}", permanent=False
            ) from None
        return receipt


class SlackWebhookChannel:
    """An incoming webhook: posts only (it cannot edit), into the channel it was made for."""

    updatable = False

    def __init__(self, client: AsyncWebhookClient) -> None:
        self.client = client
        self.key = url_key("slack-webhook", client.url)  # host and hash: the path is a secret

    async def post(self, notice: Notice, *, progress: bool = False) -> Receipt:
        if progress and notice.step:
            return Receipt()  # cannot edit: announce the rollout's first step only
        message = notice.progress if progress else notice.message
        try:
            response = await self.client.send(text=message.text, blocks=message.blocks)
        except aiohttp.InvalidURL as exc:
            raise DeliveryError(
                self.key, f"Slack webhook: invalid URL ({type(exc).__name__})", permanent=True
            ) from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            text = redact_url(str(exc), self.client.url, "<webhook URL>")
            raise DeliveryError(
                self.key, f"Slack webhook: {type(exc).__name__}: {text}", permanent=False
            ) from None
        if response.status_code != 200:
            body = (response.body or "")[:200]
            raise DeliveryError(
                self.key,
                f"Slack webhook: HTTP {response.status_code} {body}".rstrip(),
                permanent=not is_retryable_status(response.status_code),
            )
        return Receipt()

    async def update(self, receipt: Receipt, notice: Notice) -> Receipt:
        return receipt
