"""Where one notice goes and whether it goes at all: request, then policy, then settings."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from services.contracts.events import DeploymentRequested, Outcome
from services.contracts.policy import NotifyPolicy, PolicyError, PolicyFile
from services.notifier.messages import NoticeEvent, NoticeKind
from services.storage.locations import starts_under

log = logging.getLogger("preflight.notifier")


@dataclass(frozen=True)
class Targets:
    """The Slack channel (first of request, policy, settings), every distinct webhook URL
    (request's, policy's and the settings' one: they are additions, not alternatives) and the
    kinds of notice the policy wants (`notify.on`)."""

    slack_channel: str | None
    webhook_urls: tuple[str, ...]
    kinds: frozenset[NoticeKind]

    def wants(self, kind: NoticeKind) -> bool:
        return kind in self.kinds


def notify_policy(
    policy_file: PolicyFile, event: NoticeEvent, request: DeploymentRequested | None
) -> NotifyPolicy:
    """The deployment's `notify` policy; a broken override falls back to the file's layers (the
    notice still goes out; the pipeline already reported the broken policy)."""
    if request is not None:
        team = request.requested_by.team
    else:
        team = event.requested_by.team if isinstance(event, Outcome) else None
    overrides = request.policy_overrides if request else None
    try:
        return policy_file.resolve(model=event.model, team=team, overrides=overrides).notify
    except PolicyError as exc:
        log.warning("notify policy of %s: %s; using the file's", event.deployment_id, exc)
    try:
        return policy_file.resolve(model=event.model, team=team).notify
    except PolicyError:
        return NotifyPolicy()


def webhook_allowed(url: str, prefixes: str | None) -> bool:
    """Whether a request may have notices posted to `url`: only under an operator's prefix. The
    notifier signs what it posts, so anyone who may publish a request could otherwise make it
    post, signed, to loopback services or a cloud metadata address."""
    allowed = [p.strip() for p in (prefixes or "").split(",") if p.strip()]
    return any(starts_under(url, prefix) for prefix in allowed)


def resolve_targets(
    event: NoticeEvent,
    request: DeploymentRequested | None,
    policy_file: PolicyFile,
    *,
    default_channel: str | None,
    default_webhook: str | None,
    request_webhook_prefixes: str | None = None,
) -> Targets:
    policy = notify_policy(policy_file, event, request)
    asked = request.notify if request else None
    channel = (asked.slack_channel if asked else None) or policy.slack_channel or default_channel
    urls: list[str] = []
    wanted = asked.webhook_url if asked else None
    if wanted and not webhook_allowed(wanted, request_webhook_prefixes):
        log.warning(
            "%s: the request's notify.webhook_url is not under PREFLIGHT_REQUEST_WEBHOOK_PREFIXES;"
            " not sent there",
            event.deployment_id,
        )
        wanted = None
    for url in (wanted, policy.webhook_url, default_webhook):
        if url and url not in urls:
            urls.append(url)
    return Targets(slack_channel=channel, webhook_urls=tuple(urls), kinds=frozenset(policy.on))
