"""Slack through slack-sdk: a bot token (`chat.postMessage`, `chat.update`) or an incoming webhook.

A bot's messages carry the notice's ledger key in their metadata (`event_type`
`preflight_notice`), so a delivery that died between Slack's answer and its ledger write can be
told apart from one that never posted: `find` reads `conversations.history` (with
`include_all_metadata`) since the delivery began. That needs the `channels:history` and
`groups:history` scopes, and, for a channel given by name, `channels:read` and `groups:read`
(names are turned into ids with `conversations.list`; give an id to skip that).

The token and the webhook URL (itself a secret) are never logged: both clients get a logger set
to WARNING, so slack-sdk's DEBUG request dumps (which print the webhook URL) are never written.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Final

import aiohttp
from pydantic import SecretStr
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.webhook.async_client import AsyncWebhookClient

from services.notifier.channels.base import (
    CannotTell,
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

# The metadata of every message the bot posts: `{"event_type": ..., "event_payload": {"key": ...}}`.
METADATA_EVENT_TYPE: Final = "preflight_notice"
# A lookup reads at most this many pages of history (200 messages each) since the delivery
# began; a channel busier than that cannot be searched and the notice is sent again.
HISTORY_PAGE: Final = 200
HISTORY_PAGES: Final = 5
LIST_PAGES: Final = 50
# Channel, private channel, DM and group DM ids; anything else is a name.
CHANNEL_ID: Final = re.compile(r"[CGD][A-Z0-9]{6,}")

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


def notice_metadata(key: str, notice: Notice) -> dict[str, Any]:
    """What a bot's message carries for `SlackBotChannel.find`."""
    return {
        "event_type": METADATA_EVENT_TYPE,
        "event_payload": {"key": key, "notice_id": notice.notice_id},
    }


def _has_key(message: Any, key: str) -> bool:
    if not isinstance(message, dict):
        return False
    metadata = message.get("metadata")
    if not isinstance(metadata, dict) or metadata.get("event_type") != METADATA_EVENT_TYPE:
        return False
    payload = metadata.get("event_payload")
    return isinstance(payload, dict) and payload.get("key") == key


def _next_cursor(response: Any) -> str:
    meta = response.get("response_metadata") or {}
    return str(meta.get("next_cursor") or "") if isinstance(meta, dict) else ""


class SlackBotChannel:
    """A channel (name or id) posted to with a bot token; progress is edited in place.

    `ids` maps channel names to ids; the `Channels` of one process share it, so a name is looked
    up at most once (and not at all once a post to it has answered with its id)."""

    updatable = True

    def __init__(
        self, client: AsyncWebClient, channel: str, ids: dict[str, str] | None = None
    ) -> None:
        self.client = client
        self.channel = channel
        self.key = channel_key("slack", channel)
        self.ids = ids if ids is not None else {}

    async def post(self, notice: Notice, *, progress: bool = False, key: str = "") -> Receipt:
        message = notice.progress if progress else notice.message
        try:
            response = await self.client.chat_postMessage(
                channel=self.channel,
                text=message.text,
                blocks=message.blocks,
                metadata=notice_metadata(key, notice) if key else None,
                unfurl_links=False,
                unfurl_media=False,
            )
        except SlackApiError as exc:
            raise _api_error(self.key, "chat.postMessage", exc) from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise DeliveryError(
                self.key, f"Slack chat.postMessage: {type(exc).__name__}: {exc}", permanent=False
            ) from None
        if response.get("channel"):  # Slack answers with the channel's id
            self.ids[self.channel] = str(response["channel"])
        channel_id = str(response.get("channel") or self.channel)
        return Receipt(channel=channel_id, ts=str(response.get("ts") or ""))

    async def update(self, receipt: Receipt, notice: Notice, *, key: str = "") -> Receipt:
        try:
            await self.client.chat_update(
                channel=receipt.channel,
                ts=receipt.ts,
                text=notice.progress.text,
                blocks=notice.progress.blocks,
                metadata=notice_metadata(key, notice) if key else None,
            )
        except SlackApiError as exc:
            if _error_code(exc) in GONE_ERRORS:
                return await self.post(notice, progress=True, key=key)
            raise _api_error(self.key, "chat.update", exc) from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise DeliveryError(
                self.key, f"Slack chat.update: {type(exc).__name__}: {exc}", permanent=False
            ) from None
        return receipt

    async def find(self, key: str, *, since: datetime) -> Receipt | None:
        """Our message with `key` in its metadata, posted at `since` or later, newest first."""
        channel_id = await self._channel_id()
        cursor = ""
        for _ in range(HISTORY_PAGES):
            response = await self._read(
                "conversations.history",
                self.client.conversations_history,
                channel=channel_id,
                oldest=f"{since.timestamp():.6f}",
                inclusive=True,
                include_all_metadata=True,
                limit=HISTORY_PAGE,
                cursor=cursor or None,
            )
            for message in response.get("messages") or []:
                if _has_key(message, key):
                    return Receipt(channel=channel_id, ts=str(message.get("ts") or ""))
            cursor = _next_cursor(response)
            if not cursor:
                return None
        raise CannotTell(
            f"{self.key}: more than {HISTORY_PAGES * HISTORY_PAGE} messages since "
            f"{since.isoformat()}; not searched further"
        )

    async def _channel_id(self) -> str:
        name = self.channel
        if CHANNEL_ID.fullmatch(name):
            return name
        if name in self.ids:
            return self.ids[name]
        wanted = name.removeprefix("#")
        cursor = ""
        for _ in range(LIST_PAGES):
            response = await self._read(
                "conversations.list",
                self.client.conversations_list,
                types="public_channel,private_channel",
                exclude_archived=True,
                limit=HISTORY_PAGE,
                cursor=cursor or None,
            )
            for channel in response.get("channels") or []:
                if (
                    isinstance(channel, dict)
                    and channel.get("name") == wanted
                    and channel.get("id")
                ):
                    self.ids[name] = str(channel["id"])
                    return self.ids[name]
            cursor = _next_cursor(response)
            if not cursor:
                break
        raise CannotTell(f"{self.key}: no channel named {name} in conversations.list")

    async def _read(self, method: str, call: Callable[..., Awaitable[Any]], **params: Any) -> Any:
        """A read-only Web API call; transient failures raise `DeliveryError`, others (a missing
        scope, a channel the bot is not in) `CannotTell`."""
        try:
            return await call(**params)
        except SlackApiError as exc:
            error = _api_error(self.key, method, exc)
            if error.permanent:
                raise CannotTell(error.reason) from None
            raise error from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise DeliveryError(
                self.key, f"Slack {method}: {type(exc).__name__}: {exc}", permanent=False
            ) from None


class SlackWebhookChannel:
    """An incoming webhook: posts only (it cannot edit), into the channel it was made for."""

    updatable = False

    def __init__(self, client: AsyncWebhookClient) -> None:
        self.client = client
        self.key = url_key("slack-webhook", client.url)  # host and hash: the path is a secret

    async def post(self, notice: Notice, *, progress: bool = False, key: str = "") -> Receipt:
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

    async def update(self, receipt: Receipt, notice: Notice, *, key: str = "") -> Receipt:
        return receipt

    async def find(self, key: str, *, since: datetime) -> Receipt | None:
        raise CannotTell("an incoming webhook cannot read its channel")
