"""notifier service: outcomes and canary steps -> Slack, webhooks or the console, once each."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, TextIO

import aiohttp
from nats.js import JetStreamContext
from pydantic import Field, TypeAdapter

from services.contracts import subjects
from services.contracts.events import (
    CanaryStepStarted,
    DeploymentBlocked,
    DeploymentDegraded,
    DeploymentFailed,
    DeploymentHeld,
    DeploymentPromoted,
    DeploymentRolledBack,
    Outcome,
    utc_now,
)
from services.contracts.routing import subject_for
from services.notifier.channels.base import Channel, DeliveryError
from services.notifier.channels.console import ConsoleChannel
from services.notifier.channels.slack import (
    SlackBotChannel,
    SlackWebhookChannel,
    web_client,
    webhook_client,
)
from services.notifier.channels.webhook import WebhookChannel, describe_url
from services.notifier.dedup import KvLedger, NoticeLedger
from services.notifier.delivery import Deliverer, DeliveryReport, make_notice
from services.notifier.history import RequestFinder, StreamRequests
from services.notifier.messages import NoticeEvent
from services.notifier.messages import render_console as render_console
from services.notifier.retry import RetryPolicy
from services.notifier.targets import Targets, resolve_targets
from services.runtime import bus
from services.runtime.service import ServiceApp, build_service, make_dead_letter
from services.runtime.settings import Settings

NAME = "notifier"
log = logging.getLogger(f"preflight.{NAME}")

NoticeEventField = Annotated[
    DeploymentBlocked
    | DeploymentDegraded
    | DeploymentPromoted
    | DeploymentRolledBack
    | DeploymentHeld
    | DeploymentFailed
    | CanaryStepStarted,
    Field(discriminator="type"),
]
NOTICE_EVENT: TypeAdapter[NoticeEventField] = TypeAdapter(NoticeEventField)
"""What the notifier's durable consumer delivers: every outcome, and canary steps."""


def rollout_page(settings: Settings, deployment_id: str) -> str | None:
    """The controller's page of a rollout, where people can reach it (a public URL is set)."""
    if not settings.controller_public_url:
        return None
    return f"{settings.controller_public_url.rstrip('/')}/rollouts/{deployment_id}"


class NoticeNotDelivered(RuntimeError):
    """Some channel failed in a way a later redelivery may fix; the stream will try again."""


class Channels:
    """The channels of one notice, from its targets and what the settings configure."""

    def __init__(
        self,
        settings: Settings,
        retry: RetryPolicy,
        console: ConsoleChannel,
        session: Callable[[], aiohttp.ClientSession],
    ) -> None:
        self.settings = settings
        self.retry = retry
        self.console = console
        self.session = session
        self.bot = (
            web_client(settings.slack_token, settings.slack_base_url, retry)
            if settings.slack_token
            else None
        )
        self.slack_webhook = (
            SlackWebhookChannel(webhook_client(settings.slack_webhook_url, retry))
            if settings.slack_webhook_url and not settings.slack_token
            else None
        )
        self.slack_ids: dict[str, str] = {}  # channel name -> id, for looking messages up
        self._warned_no_channel = False

    def describe(self) -> str:
        if self.bot is not None:
            where = self.settings.slack_channel
            slack = (
                f"Slack (bot token, default channel {where})"
                if where
                else "Slack (bot token, channel from the request or policy only)"
            )
        elif self.slack_webhook is not None:
            slack = "Slack (incoming webhook)"
        else:
            slack = "the console (no Slack token or webhook URL configured)"
        extra = ""
        if self.settings.webhook_url:
            signed = "signed" if self.settings.webhook_secret else "unsigned"
            extra = f" and a webhook ({describe_url(self.settings.webhook_url)}, {signed})"
        return f"notices go to {slack}{extra}"

    def for_targets(self, targets: Targets) -> list[Channel]:
        channels: list[Channel] = []
        if self.bot is not None:
            if targets.slack_channel:
                channels.append(SlackBotChannel(self.bot, targets.slack_channel, self.slack_ids))
            else:
                if not self._warned_no_channel:
                    log.warning(
                        "a Slack token is set but neither the request, the policy nor "
                        "PREFLIGHT_SLACK_CHANNEL names a channel: such notices go to the console"
                    )
                    self._warned_no_channel = True
                channels.append(self.console)
        elif self.slack_webhook is not None:
            channels.append(self.slack_webhook)
        else:
            channels.append(self.console)
        for url in targets.webhook_urls:
            channels.append(
                WebhookChannel(url, self.session, self.retry, secret=self.settings.webhook_secret)
            )
        return channels


class Notifier:
    """The handler's logic: find the request, resolve targets, deliver, report failures."""

    def __init__(
        self,
        svc: ServiceApp,
        channels: Channels,
        deliverer: Deliverer,
        requests: RequestFinder,
    ) -> None:
        self.svc = svc
        self.channels = channels
        self.deliverer = deliverer
        self.requests = requests

    async def handle(self, event: NoticeEvent) -> DeliveryReport:
        request = await self.requests.find(event.deployment_id)
        targets = resolve_targets(
            event,
            request,
            self.svc.policy_file,
            default_channel=self.svc.settings.slack_channel,
            default_webhook=self.svc.settings.webhook_url,
            request_webhook_prefixes=self.svc.settings.request_webhook_prefixes,
        )
        notice = make_notice(
            event,
            request.requested_by if request else None,
            rollout_page(self.svc.settings, event.deployment_id),
        )
        report = await self.deliverer.deliver(
            notice,
            self.channels.for_targets(targets),
            post=targets.wants(notice.kind),
            progress=targets.wants("progress"),
        )
        retry_later: list[DeliveryError] = []
        for failure in report.failed:
            # A step is not worth a redelivery that could end in DeploymentFailed: dead-letter it.
            if failure.permanent or not isinstance(event, Outcome):
                await self.dead_letter(event, f"notice not delivered: {failure}")
                await self.deliverer.mark_dead_lettered(notice, failure)
            else:
                retry_later.append(failure)
        if retry_later:
            raise NoticeNotDelivered("; ".join(str(f) for f in retry_later))
        return report

    async def dead_letter(self, event: NoticeEvent, reason: str) -> None:
        """The event, as it travels on the bus, to `preflight.deadletter.notifier` with why."""
        letter = make_dead_letter(
            service=NAME,
            subject=subject_for(event),
            payload=bus.encode(event),
            headers=bus.headers_for(event),
            reason=reason,
            attempt=None,
            max_bytes=self.svc.max_payload(),
        )
        await self.svc.dead_letter(letter)
        log.error("notice dead-lettered: %s", reason)


def build(
    settings: Settings,
    *,
    ledger: NoticeLedger | None = None,
    requests: RequestFinder | None = None,
    retry: RetryPolicy | None = None,
    console: TextIO | None = None,
    clock: Callable[[], datetime] = utc_now,
) -> ServiceApp:
    """The notifier service. `ledger` and `requests` default to the bus (the notices KV bucket and
    the events stream); in-memory broker tests pass `MemoryLedger()` and `NoRequests()`."""
    svc = build_service(NAME, settings)
    policy = retry or RetryPolicy(max_attempts=settings.slack_max_attempts, clock=clock)
    state: dict[str, aiohttp.ClientSession] = {}

    def session() -> aiohttp.ClientSession:
        if "http" not in state or state["http"].closed:
            state["http"] = aiohttp.ClientSession()
        return state["http"]

    def jetstream() -> JetStreamContext:
        js: JetStreamContext = svc.broker.config.connection_state.stream
        return js

    channels = Channels(settings, policy, ConsoleChannel(console), session)

    ledgers: dict[str, NoticeLedger] = {}
    if ledger is not None:
        ledgers["ledger"] = ledger
    notifier = Notifier(
        svc,
        channels,
        Deliverer(_LazyLedger(svc, ledgers), clock),
        requests or StreamRequests(jetstream),
    )
    log.info("%s", channels.describe())

    # Redeliveries after a transient failure wait minutes, not seconds: a Slack outage longer
    # than a minute must not dead-letter a rollback notice (RetryPolicy.redelivery_delay).
    @svc.consume(subjects.NOTIFIER_DURABLE, NOTICE_EVENT, retry_delay=policy.redelivery_delay)
    async def on_event(event: NoticeEventField) -> None:
        if isinstance(event, Outcome):
            await notifier.handle(event)  # failures: redelivery, then the dead-letter stream
            return
        # A canary step that raised on its last delivery would end its deployment as
        # DeploymentFailed (ServiceApp does that for stage events): a notice is never worth it.
        try:
            await notifier.handle(event)
        except Exception as exc:
            log.exception("progress notice of %s failed", event.deployment_id)
            await notifier.dead_letter(
                event, f"progress notice failed: {type(exc).__name__}: {exc}"
            )

    async def close() -> None:
        if "http" in state:
            await state["http"].close()

    svc.app.after_shutdown(close)
    return svc


class _LazyLedger:
    """The notices KV bucket, opened on first use (the broker connects after `build`)."""

    def __init__(self, svc: ServiceApp, ledgers: dict[str, NoticeLedger]) -> None:
        self.svc = svc
        self.ledgers = ledgers

    async def _ledger(self) -> NoticeLedger:
        if "ledger" not in self.ledgers:
            kv = await self.svc.broker.key_value(subjects.NOTICES_BUCKET, declare=False)
            self.ledgers["ledger"] = KvLedger(kv)
        return self.ledgers["ledger"]

    async def get(self, key: str) -> dict[str, Any] | None:
        return await (await self._ledger()).get(key)

    async def create(self, key: str, value: dict[str, Any]) -> bool:
        return await (await self._ledger()).create(key, value)

    async def put(self, key: str, value: dict[str, Any]) -> None:
        await (await self._ledger()).put(key, value)

    async def read(self, key: str) -> tuple[dict[str, Any], int] | None:
        return await (await self._ledger()).read(key)

    async def update(self, key: str, value: dict[str, Any], revision: int) -> bool:
        return await (await self._ledger()).update(key, value, revision)
