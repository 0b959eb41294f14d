"""notifier service: outcome events -> notices. Console now; Slack and webhooks in issue #7."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from services.contracts import subjects
from services.contracts.events import ANY_OUTCOME, AnyOutcome, Outcome
from services.runtime.service import ServiceApp, build_service
from services.runtime.settings import Settings

NAME = "notifier"
log = logging.getLogger(f"preflight.{NAME}")

_KIND = {
    "DeploymentBlocked": "BLOCKED",
    "DeploymentDegraded": "DEGRADED",
    "DeploymentPromoted": "PROMOTED",
    "DeploymentRolledBack": "ROLLED BACK",
    "DeploymentFailed": "FAILED",
}


def render_console(outcome: Outcome) -> str:
    """One notice as plain text: what happened, to what, why, who asked, where to look."""
    kind = _KIND.get(type(outcome).__name__, type(outcome).__name__)
    lines = [f"[preflight] {kind}: {outcome.model} {outcome.version} ({outcome.deployment_id})"]
    lines += [f"  - {reason}" for reason in outcome.reasons]
    for stage in outcome.stages:
        why = stage.reason.removeprefix(f"{stage.status.value}: ")
        lines.append(f"  {stage.stage}: {stage.status.value}{' - ' + why if why else ''}")
    who = outcome.requested_by
    lines.append(f"  requested by {who.user} via {who.system}")
    if outcome.metrics_url:
        lines.append(f"  metrics: {outcome.metrics_url}")
    return "\n".join(lines)


class ConsoleChannel:
    """The embedded default: notices on standard output."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout

    async def send(self, outcome: Outcome) -> None:
        print(render_console(outcome), file=self.stream, flush=True)


def build(settings: Settings) -> ServiceApp:
    svc = build_service(NAME, settings)
    channel = ConsoleChannel()
    if settings.slack_token or settings.slack_webhook_url:
        log.warning("Slack delivery is not built yet (issue #7): notices go to the console")
    else:
        log.info("no Slack token configured: notices go to the console")

    @svc.consume(subjects.NOTIFIER_DURABLE, ANY_OUTCOME)
    async def on_outcome(outcome: AnyOutcome) -> None:
        await channel.send(outcome)

    return svc
