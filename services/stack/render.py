"""How events read to a person: one line per event, a table per deployment (pure)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from rich.markup import escape
from rich.table import Table

from services.contracts.events import (
    BenchmarkCompleted,
    CanaryAnalysed,
    CanaryStepStarted,
    Command,
    DeploymentBlocked,
    DeploymentDegraded,
    DeploymentEvent,
    DeploymentFailed,
    DeploymentHeld,
    DeploymentPromoted,
    DeploymentRequested,
    DeploymentRolledBack,
    Outcome,
    RoleMeasurement,
    StageReport,
    Status,
    ValidationCompleted,
)

_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def shown(text: str) -> str:
    """Text from a request (who, why, where) as it may reach a terminal: control characters and
    bidirectional overrides written as escapes (a `requested_by` with ESC sequences rewrote the
    operator's screen, or hid the line), Rich markup escaped."""
    return escape(_UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode(), text))


_STYLE = {
    Status.PASSED: "green",
    Status.SKIPPED: "yellow",
    Status.DEGRADED: "dark_orange",
    Status.FAILED: "red",
    Status.ERROR: "red",
}


def stage_line(report: StageReport) -> str:
    style = _STYLE[report.status]
    text = f"{report.stage}: [{style}]{report.status.value}[/{style}]"
    if report.reason and not report.reason.startswith(report.status.value):
        text += f" - {shown(report.reason)}"
    elif report.reason:
        text += shown(report.reason[len(report.status.value) :])
    failed = [
        c for c in report.checks if c.status in (Status.FAILED, Status.ERROR, Status.DEGRADED)
    ]
    for check in failed:
        text += f"\n      {shown(check.name)}: {check.status.value} - {shown(check.reason)}"
    return text


def describe(event: DeploymentEvent) -> str:
    """One line (Rich markup) saying what happened."""
    when = event.occurred_at.strftime("%H:%M:%S")
    head = f"[dim]{when}[/dim] "
    match event:
        case DeploymentRequested():
            who = event.requested_by
            stable = f", replacing {event.stable.version}" if event.stable else ""
            return (
                f"{head}requested {event.model} {event.version} from {shown(event.location)}"
                f"{stable} (by {shown(who.user)} via {shown(who.system)})"
            )
        case ValidationCompleted() | BenchmarkCompleted():
            return head + stage_line(event.report)
        case CanaryStepStarted():
            if event.weight >= 100:
                return f"{head}canary at 100%, baking for {event.duration_s:g} s"
            step = event.step_index + 1
            return f"{head}canary step {step}: {event.weight:g}% for {event.duration_s:g} s"
        case CanaryAnalysed():
            numbers = compare(event.canary, event.stable)
            why = "" if event.verdict == "healthy" else f": {shown(event.reason)}"
            return f"{head}canary analysed: {event.verdict} ({numbers}){why}"
        case DeploymentPromoted():
            numbers = ""
            if event.canary is not None:
                numbers = f" after {event.steps_completed} canary steps: " + compare(
                    event.canary, event.stable
                )
            return (
                f"{head}[bold green]PROMOTED[/bold green] {event.model} {event.version}{numbers}"
                + _why(event)
            )
        case DeploymentHeld():
            return (
                f"{head}[bold yellow]HELD[/bold yellow] at {event.weight:g}%, needs a person "
                f"before {event.deadline:%H:%M:%S}: `preflight promote {event.deployment_id}` or "
                f"`preflight abort {event.deployment_id}`" + _why(event)
            )
        case DeploymentDegraded():
            return f"{head}[bold dark_orange]DEGRADED[/bold dark_orange]" + _why(event)
        case DeploymentBlocked():
            return f"{head}[bold red]BLOCKED[/bold red] by {event.stage}" + _why(event)
        case DeploymentRolledBack():
            numbers = f": {compare(event.canary, event.stable)}" if event.canary else ""
            return f"{head}[bold red]ROLLED BACK[/bold red] ({event.trigger}){numbers}" + _why(
                event
            )
        case DeploymentFailed():
            return f"{head}[bold red]FAILED[/bold red] in {event.stage}: {shown(event.error)}"
        case Command():
            by = event.requested_by
            sender = f" as NATS user {shown(by.nats_user)}" if by.nats_user else ""
            return f"{head}command {event.type} by {shown(by.user)}{sender}: {shown(event.reason)}"
    return f"{head}{event.type}"  # pragma: no cover - every type is matched above


def measured(m: RoleMeasurement | None) -> str:
    if m is None or not m.requests:
        return "no requests"
    rate = f"{(m.error_rate or 0) * 100:.1f}% errors"
    p95 = f"p95 {m.p95_ms:.0f} ms" if m.p95_ms is not None else "p95 -"
    return f"{m.requests} req, {rate}, {p95}"


def compare(canary: RoleMeasurement | None, stable: RoleMeasurement | None) -> str:
    """`canary 80 req, 12.5% errors, p95 41 ms vs stable 1500 req, 0.1% errors, p95 35 ms`."""
    return f"canary {measured(canary)} vs stable {measured(stable)}"


def _why(outcome: Outcome) -> str:
    text = "".join(f"\n      {shown(reason)}" for reason in outcome.reasons)
    if outcome.metrics_url:
        text += f"\n      metrics: {shown(outcome.metrics_url)}"
    return text


def report_table(report: StageReport, title: str) -> Table:
    """One row per check: status, time, and why."""
    table = Table(title=title)
    table.add_column("check", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("ms", justify="right", no_wrap=True)
    table.add_column("why", overflow="fold")
    for check in report.checks:
        style = _STYLE[check.status]
        table.add_row(
            check.name,
            f"[{style}]{check.status.value}[/{style}]",
            f"{check.duration_ms:.1f}",
            shown(check.reason),
        )
    return table


TERMINAL = (DeploymentBlocked, DeploymentPromoted, DeploymentRolledBack, DeploymentFailed)


@dataclass
class DeploymentSummary:
    """What the event stream says about one deployment."""

    deployment_id: str
    model: str = ""
    version: str = ""
    requested_at: str = ""
    stages: dict[str, str] = field(default_factory=dict)
    outcome: str = "in progress"
    degraded: bool = False
    reasons: list[str] = field(default_factory=list)
    numbers: str = ""

    @property
    def finished(self) -> bool:
        return self.outcome != "in progress"


def summarise(events: Iterable[DeploymentEvent]) -> dict[str, DeploymentSummary]:
    out: dict[str, DeploymentSummary] = {}
    for event in events:
        s = out.setdefault(event.deployment_id, DeploymentSummary(event.deployment_id))
        s.model, s.version = event.model, event.version
        if isinstance(event, DeploymentRequested):
            s.requested_at = event.occurred_at.strftime("%Y-%m-%d %H:%M:%S")
        if isinstance(event, ValidationCompleted | BenchmarkCompleted):
            s.stages[event.report.stage] = event.report.status.value
        if isinstance(event, DeploymentDegraded):
            s.degraded = True
        if isinstance(event, TERMINAL):
            s.outcome = {
                DeploymentBlocked: "blocked",
                DeploymentPromoted: "promoted",
                DeploymentRolledBack: "rolled back",
                DeploymentFailed: "failed",
            }[type(event)]
            s.reasons = list(event.reasons)
            if isinstance(event, DeploymentPromoted | DeploymentRolledBack) and event.canary:
                s.numbers = compare(event.canary, event.stable)
            for report in event.stages:
                s.stages[report.stage] = report.status.value
    return out


def summary_table(summaries: Sequence[DeploymentSummary], title: str = "deployments") -> Table:
    table = Table(title=title)
    table.add_column("deployment", no_wrap=True)
    for column in ("model", "version", "validation", "benchmark", "canary", "outcome"):
        table.add_column(column, overflow="fold")

    for s in summaries:
        outcome = s.outcome + (" (degraded)" if s.degraded else "")
        style = {"promoted": "green", "in progress": "yellow"}.get(s.outcome, "red")
        table.add_row(
            s.deployment_id,
            s.model,
            s.version,
            s.stages.get("validation", "-"),
            s.stages.get("benchmark", "-"),
            s.stages.get("canary", "-"),
            f"[{style}]{outcome}[/{style}]",
        )
    return table
