"""Pure rendering of notices: an event in, Slack Block Kit + fallback text (or console text) out.

Nothing here does I/O or reads a clock; every number shown comes from the event itself.
Slack limits respected: header 150 chars, section and context text 3000, 10 fields of 2000,
50 blocks, a button's url 3000. A link is never cut: one that does not fit is replaced (`Link`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal
from urllib.parse import quote, urlsplit

from services.contracts.events import (
    CanaryStepStarted,
    CheckResult,
    DeploymentBlocked,
    DeploymentDegraded,
    DeploymentFailed,
    DeploymentHeld,
    DeploymentPromoted,
    DeploymentRolledBack,
    Outcome,
    Requester,
    RoleMeasurement,
    Status,
)

__all__ = [
    "KINDS",
    "Link",
    "NoticeEvent",
    "NoticeKind",
    "ProgressRank",
    "SlackMessage",
    "check_numbers",
    "kind_of",
    "metrics_link",
    "occurrence_of",
    "progress_rank",
    "render",
    "render_console",
    "render_progress",
    "rollback_reason",
]

NoticeKind = Literal["blocked", "degraded", "promoted", "rolled_back", "held", "failed", "progress"]
KINDS: Final[tuple[NoticeKind, ...]] = (
    "blocked",
    "degraded",
    "promoted",
    "rolled_back",
    "held",
    "failed",
    "progress",
)
NoticeEvent = (
    DeploymentBlocked
    | DeploymentDegraded
    | DeploymentPromoted
    | DeploymentRolledBack
    | DeploymentHeld
    | DeploymentFailed
    | CanaryStepStarted
)

_KIND: Final[dict[type[Any], NoticeKind]] = {
    DeploymentBlocked: "blocked",
    DeploymentDegraded: "degraded",
    DeploymentPromoted: "promoted",
    DeploymentRolledBack: "rolled_back",
    DeploymentHeld: "held",
    DeploymentFailed: "failed",
    CanaryStepStarted: "progress",
}
_TITLE: Final[dict[NoticeKind, str]] = {
    "blocked": "Blocked",
    "degraded": "Degraded",
    "promoted": "Promoted",
    "rolled_back": "Rolled back",
    "held": "Needs a person",
    "failed": "Failed",
    "progress": "Canary",
}
_EMOJI: Final[dict[NoticeKind, str]] = {
    "blocked": ":no_entry:",
    "degraded": ":warning:",
    "promoted": ":white_check_mark:",
    "rolled_back": ":rewind:",
    "held": ":raised_hand:",
    "failed": ":x:",
    "progress": ":hourglass_flowing_sand:",
}
_CONSOLE: Final[dict[NoticeKind, str]] = {
    "blocked": "BLOCKED",
    "degraded": "DEGRADED",
    "promoted": "PROMOTED",
    "rolled_back": "ROLLED BACK",
    "held": "HELD (needs a person)",
    "failed": "FAILED",
    "progress": "CANARY",
}
_TRIGGER: Final[dict[str, str]] = {
    "error_rate": "the canary's error rate went over the limit",
    "latency": "the canary's p95 latency rose more than allowed over the stable version's",
    "ttft": (
        "the canary's p95 time to first token rose more than allowed over the stable version's"
    ),
    "inconclusive": "the canary could not be judged and nobody promoted it by the deadline",
    "manual": "a person aborted it",
    "superseded": "a newer version replaced it",
}

_ROLLBACK_WORDS: Final[dict[str, str]] = {
    "inconclusive": "could not be judged, and nobody promoted it by the deadline",
    "manual": "aborted by a person",
    "superseded": "replaced by a newer version",
}

HEADER_MAX: Final = 150
TEXT_MAX: Final = 3000
FIELD_MAX: Final = 2000
FALLBACK_MAX: Final = 3000
REASONS_SHOWN: Final = 8
URL_MAX: Final = 3000  # a button's `url`; a link in mrkdwn must also fit its text's 3000
LABEL_MAX: Final = 200  # a longer URL is labelled by its host
# Characters a URL keeps as they are inside `<url|label>`; the rest (`|`, `<`, `>`, spaces,
# quotes, control characters, non-ASCII) are percent-encoded, so the markup cannot break.
_URL_SAFE: Final = "!#$%&'()*+,/:;=?@[]~"


@dataclass(frozen=True)
class SlackMessage:
    """What `chat.postMessage`/`chat.update` and incoming webhooks take: fallback text + blocks."""

    text: str
    blocks: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"text": self.text, "blocks": self.blocks}


def kind_of(event: NoticeEvent) -> NoticeKind:
    return _KIND[type(event)]


ProgressRank = tuple[float, str]
"""Where a state sits on the progress message: (step index, or FINAL_RANK; when, UTC stamp)."""
FINAL_RANK: Final = 1e9


def _stamp(when: datetime) -> str:
    """Fixed-width and sortable, as in the bus's message ids (`services.contracts.routing`)."""
    return when.strftime("%Y%m%dT%H%M%S.%f")


def occurrence_of(event: NoticeEvent) -> str | None:
    """Which occurrence of a step or hold this is: a step starts again when a held rollout is
    resumed, and the same step can be held again. The bus tells them apart by the step's start
    time and the hold's deadline (`message_id_for`); so does the notifier's dedup."""
    if isinstance(event, CanaryStepStarted):
        return _stamp(event.occurred_at)
    if isinstance(event, DeploymentHeld):
        return _stamp(event.deadline)
    return None


def progress_rank(event: NoticeEvent) -> ProgressRank | None:
    """Order of states on the one progress message: a late, stale update never overwrites a
    newer state. Steps and holds by (step index, when it happened), so a step that starts again
    after a hold, or a second hold, is newer; any final outcome last. None: the event never
    touches the progress message (degraded: the benchmarks failed, the rollout goes on)."""
    if isinstance(event, DeploymentDegraded):
        return None
    when = _stamp(event.occurred_at.astimezone(UTC))
    if isinstance(event, CanaryStepStarted | DeploymentHeld):
        return (float(event.step_index), when)
    return (FINAL_RANK, when)


# ---- formatting helpers ------------------------------------------------------------------------


def escape(text: str) -> str:
    """Slack mrkdwn control characters (`&`, `<`, `>`) as entities."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _num(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if value == int(value) and abs(value) < 1e15:
        return f"{int(value):,}"
    return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"


def _pct(fraction: float, *, signed: bool = False) -> str:
    """0.042 -> `4.2%`; signed: 0.05 -> `+5%` (no trailing `.0`)."""
    if not math.isfinite(fraction):
        return str(fraction)
    text = f"{fraction * 100:{'+' if signed else ''}.1f}".removesuffix(".0")
    return f"{text}%"


def _cmp(value: float, threshold: float) -> str:
    if value > threshold:
        return ">"
    if value < threshold:
        return "<"
    return "="


def _quantity(value: float, unit: str | None) -> str:
    if unit == "relative":
        return _pct(value, signed=True)
    if unit in ("fraction", "ratio"):
        return _pct(value)
    return f"{_num(value)} {unit}" if unit else _num(value)


def check_numbers(check: CheckResult) -> str:
    """`perplexity +8.1% > +5%`, `latency 612 ms > 500 ms`, or the check's name alone."""
    if check.value is None:
        return check.name
    value = _quantity(check.value, check.unit)
    if check.threshold is None:
        return f"{check.name} {value}"
    limit = _quantity(check.threshold, check.unit)
    return f"{check.name} {value} {_cmp(check.value, check.threshold)} {limit}"


def _rate(m: RoleMeasurement) -> str:
    if m.error_rate is not None:
        return _pct(m.error_rate)
    return _pct(m.errors / m.requests) if m.requests else "n/a"


def _samples(role: str, m: RoleMeasurement) -> str:
    p95 = f", p95 {_num(m.p95_ms)} ms" if m.p95_ms is not None else ""
    return f"{role}: {m.errors:,}/{m.requests:,} errors ({_rate(m)}){p95}"


def _window(start: datetime | None, end: datetime | None) -> str | None:
    if start is None or end is None:
        return None
    seconds = (end - start).total_seconds()
    return f"window {start:%H:%M:%S}–{end:%H:%M:%S} UTC ({_num(seconds)} s)"


def _p95_line(canary: RoleMeasurement, stable: RoleMeasurement, limit: float | None) -> str | None:
    if canary.p95_ms is None or stable.p95_ms is None or stable.p95_ms <= 0:
        return None
    increase = canary.p95_ms / stable.p95_ms - 1
    change = _pct(increase, signed=True)
    line = f"p95 {_num(canary.p95_ms)} ms vs stable {_num(stable.p95_ms)} ms ({change}"
    if limit is not None:
        line += f" {_cmp(increase, limit)} {_pct(limit, signed=True)}"
    return line + ")"


def _ttft_line(canary: RoleMeasurement, stable: RoleMeasurement, limit: float | None) -> str | None:
    """Time to first token, where the roles served streamed responses."""
    ours, theirs = canary.ttft_p95_ms, stable.ttft_p95_ms
    if ours is None:
        return None
    if theirs is None or theirs <= 0:
        return f"TTFT p95 {_num(ours)} ms (stable: none measured)"
    increase = ours / theirs - 1
    line = f"TTFT p95 {_num(ours)} ms vs stable {_num(theirs)} ms ({_pct(increase, signed=True)}"
    if limit is not None:
        line += f" {_cmp(increase, limit)} {_pct(limit, signed=True)}"
    return line + ")"


def canary_numbers(
    canary: RoleMeasurement | None,
    stable: RoleMeasurement | None,
    *,
    trigger: str | None = None,
    threshold: float | None = None,
    window_start: datetime | None = None,
    window_end: datetime | None = None,
) -> list[str]:
    """The numbers behind a canary decision, the deciding one first."""
    lines: list[str] = []
    if canary is not None:
        rate = canary.error_rate if canary.error_rate is not None else None
        if trigger == "error_rate" and rate is not None and threshold is not None:
            lines.append(f"error rate {_pct(rate)} {_cmp(rate, threshold)} {_pct(threshold)}")
        elif rate is not None:
            lines.append(f"error rate {_pct(rate)}")
        if stable is not None:
            limit = threshold if trigger == "latency" else None
            p95 = _p95_line(canary, stable, limit)
            ttft = _ttft_line(canary, stable, threshold if trigger == "ttft" else None)
            ordered = (ttft, p95) if trigger == "ttft" else (p95, ttft)
            lines.extend(line for line in ordered if line is not None)
        lines.append(_samples("canary", canary))
    if stable is not None:
        lines.append(_samples("stable", stable))
    if (window := _window(window_start, window_end)) is not None:
        lines.append(window)
    return lines


def _failed_checks(outcome: Outcome) -> list[CheckResult]:
    if isinstance(outcome, DeploymentDegraded) and outcome.failed_checks:
        return list(outcome.failed_checks)
    stages = outcome.stages
    if isinstance(outcome, DeploymentBlocked):
        stages = tuple(s for s in stages if s.stage == outcome.stage) or stages
    bad = (Status.FAILED, Status.ERROR, Status.DEGRADED)
    return [c for s in stages for c in s.checks if c.status in bad]


def numbers(event: NoticeEvent) -> list[str]:
    """One line per number that explains the notice (value against threshold, with units)."""
    match event:
        case DeploymentRolledBack():
            return canary_numbers(
                event.canary,
                event.stable,
                trigger=event.trigger,
                threshold=event.threshold,
                window_start=event.window_start,
                window_end=event.window_end,
            )
        case DeploymentHeld():
            return canary_numbers(
                event.canary,
                event.stable,
                window_start=event.window_start,
                window_end=event.window_end,
            )
        case DeploymentPromoted():
            return canary_numbers(event.canary, event.stable)
        case DeploymentBlocked() | DeploymentDegraded():
            return [check_numbers(c) for c in _failed_checks(event) if c.value is not None]
        case _:
            return []


def _who(requester: Requester) -> str:
    team = f", team {requester.team}" if requester.team else ""
    return f"{requester.user} via {requester.system}{team}"


def _slack_time(moment: datetime) -> str:
    """A time each reader sees in their own zone, with the UTC text as fallback."""
    fallback = f"{moment:%Y-%m-%d %H:%M:%S} UTC"
    return f"<!date^{int(moment.timestamp())}^{{date_short_pretty}} {{time_secs}}|{fallback}>"


def summary(event: NoticeEvent) -> str:
    """One sentence: what happened and what happens next."""
    match event:
        case DeploymentBlocked():
            return f"The {event.stage} stage failed: this version will not receive traffic."
        case DeploymentDegraded():
            return (
                "Benchmarks found a regression against the previous version. The deployment "
                "goes on to the canary unless the policy blocks on it (a notice then says so)."
            )
        case DeploymentPromoted():
            steps = f" after {event.steps_completed} canary steps" if event.steps_completed else ""
            prev = f", replacing {event.previous_version}" if event.previous_version else ""
            by = " A person promoted it." if event.promoted_by == "manual" else ""
            return f"Now the stable version, taking all traffic{steps}{prev}.{by}"
        case DeploymentRolledBack():
            at = f" at step {event.step_index + 1}" if event.step_index is not None else ""
            why = _TRIGGER.get(event.trigger, event.trigger)
            return f"Taken out of traffic{at}: {why}."
        case DeploymentHeld():
            return (
                f"The canary could not be judged. It stays at {_num(event.weight)}% of traffic "
                f"until {event.deadline:%Y-%m-%d %H:%M:%S} UTC, then is rolled back unless "
                "someone promotes it."
            )
        case DeploymentFailed():
            return f"The pipeline could not finish ({event.stage}): {event.error}"
        case CanaryStepStarted():
            return (
                f"Step {event.step_index + 1}: {_num(event.weight)}% of traffic for "
                f"{_num(event.duration_s)} s."
            )
    return ""  # pragma: no cover - every kind is matched above


def rollback_reason(event: DeploymentRolledBack) -> str:
    """Why, in words, with the deciding numbers when the event has them:
    `error rate 4.2% above the 1% limit`, `p95 latency 73.3% above stable's, over the 20% limit`.
    """
    canary, stable, limit = event.canary, event.stable, event.threshold
    if event.trigger == "error_rate":
        rate = canary.error_rate if canary is not None else None
        if rate is not None and limit is not None:
            return f"error rate {_pct(rate)} above the {_pct(limit)} limit"
        return "error rate above the limit"
    if event.trigger == "latency":
        if (
            canary is not None
            and stable is not None
            and canary.p95_ms is not None
            and stable.p95_ms is not None
            and stable.p95_ms > 0
        ):
            rise = canary.p95_ms / stable.p95_ms - 1
            limit_text = f", over the {_pct(limit)} limit" if limit is not None else ""
            return (
                f"p95 latency {_num(canary.p95_ms)} ms, {_pct(rise)} above stable's "
                f"{_num(stable.p95_ms)} ms{limit_text}"
            )
        return "p95 latency rose more than allowed over stable's"
    if event.trigger == "ttft":
        ours = canary.ttft_p95_ms if canary is not None else None
        theirs = stable.ttft_p95_ms if stable is not None else None
        if ours is not None and theirs is not None and theirs > 0:
            rise = ours / theirs - 1
            limit_text = f", over the {_pct(limit)} limit" if limit is not None else ""
            return (
                f"p95 time to first token {_num(ours)} ms, {_pct(rise)} above stable's "
                f"{_num(theirs)} ms{limit_text}"
            )
        return "p95 time to first token rose more than allowed over stable's"
    return _ROLLBACK_WORDS.get(event.trigger, event.trigger.replace("_", " "))


def _commands(deployment_id: str) -> str:
    return f"`preflight promote {deployment_id}`  ·  `preflight abort {deployment_id}`"


def _section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": clip(text, TEXT_MAX)}}


def _context(text: str) -> dict[str, Any]:
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": clip(text, TEXT_MAX)}]}


def _header(text: str) -> dict[str, Any]:
    return {
        "type": "header",
        "text": {"type": "plain_text", "text": clip(text, HEADER_MAX), "emoji": True},
    }


def _fields(event: NoticeEvent, requested_by: Requester) -> dict[str, Any]:
    def field_(label: str, value: str) -> dict[str, str]:
        return {"type": "mrkdwn", "text": clip(f"*{label}*\n{value}", FIELD_MAX)}

    items = [
        field_("Model", f"`{escape(event.model)}`"),
        field_("Version", f"`{escape(event.version)}`"),
        field_("Deployment", f"`{event.deployment_id}`"),
        field_("Requested by", escape(_who(requested_by))),
    ]
    return {"type": "section", "fields": items}


def _bullets(lines: list[str]) -> str:
    return "\n".join(f"• {escape(line)}" for line in lines)


def _requester(event: NoticeEvent, requested_by: Requester | None) -> Requester:
    if isinstance(event, Outcome):
        return event.requested_by
    return requested_by or Requester()


@dataclass(frozen=True)
class Link:
    """The metrics link of a message: `url` for a button (None: no button) and the context
    line's mrkdwn `text`, both within Slack's limits."""

    url: str | None
    text: str


def link_target(url: str) -> str:
    """`url` as it may stand in `<url|label>` and in a button."""
    return quote(url, safe=_URL_SAFE)


def _label(url: str) -> str:
    if len(url) <= LABEL_MAX:
        return escape(url)
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        host = ""
    return escape(clip(host, 80)) if host else "open"


def metrics_link(event: NoticeEvent, rollout_url: str | None = None) -> Link | None:
    """The outcome's metrics link, or what stands for it when Slack cannot take it: the
    controller's rollout page (`rollout_url`, when it has a public address), else a note that
    says where the link is."""
    url = event.metrics_url if isinstance(event, Outcome) else None
    if not url:
        return None
    too_long = f"the metrics link is {len(url):,} characters, more than Slack takes"
    candidates = [(url, _label(url), "")]
    if rollout_url:
        candidates.append((rollout_url, "rollout page", f" ({too_long})"))
    for raw, label, note in candidates:
        target = link_target(raw)
        text = f"metrics: <{target}|{label}>{note}"
        if len(target) <= URL_MAX and len(text) <= TEXT_MAX:
            return Link(url=target, text=text)
    return Link(
        url=None, text=f"metrics: {too_long}; `preflight status {event.deployment_id}` shows it"
    )


def _metrics_button(url: str) -> dict[str, Any]:
    return {
        "type": "actions",
        "elements": [
            {
                "type": "button",
                "text": {"type": "plain_text", "text": "Metrics"},
                "url": url,
                "action_id": "metrics",
            }
        ],
    }


def render(
    event: NoticeEvent, *, requested_by: Requester | None = None, rollout_url: str | None = None
) -> SlackMessage:
    """The notice of one event: what happened, to what, the numbers, who, the link, the commands.

    `requested_by` is used for events that do not carry it (canary steps); outcomes carry their
    own. `rollout_url`: linked instead of a metrics URL too long for Slack.
    """
    kind = kind_of(event)
    who = _requester(event, requested_by)
    title = f"{_EMOJI[kind]} {_TITLE[kind]}: {event.model} {event.version}"
    blocks: list[dict[str, Any]] = [
        _header(title),
        _section(f"*{escape(summary(event))}*"),
        _fields(event, who),
    ]
    figures = numbers(event)
    if figures:
        blocks.append(_section("*Numbers*\n" + _bullets(figures)))
    if isinstance(event, Outcome):
        reasons = list(event.reasons[:REASONS_SHOWN])
        more = len(event.reasons) - len(reasons)
        if reasons:
            text = "*Why*\n" + _bullets(reasons)
            if more > 0:
                text += f"\n_…and {more} more_"
            blocks.append(_section(text))
        if event.stages:
            stages = "  ·  ".join(f"{s.stage} *{s.status.value}*" for s in event.stages)
            blocks.append(_context(stages))
    if isinstance(event, DeploymentHeld | CanaryStepStarted):
        blocks.append(_section("*Decide*\n" + _commands(event.deployment_id)))
    if (link := metrics_link(event, rollout_url)) is not None:
        if link.url is not None:
            blocks.append(_metrics_button(link.url))
        blocks.append(_context(link.text))
    blocks.append(_context(f"{_slack_time(event.occurred_at)}  ·  preflight"))
    return SlackMessage(text=fallback_text(event, figures, who), blocks=blocks[:50])


def fallback_text(event: NoticeEvent, figures: list[str], who: Requester) -> str:
    """The notification and screen-reader text: everything essential on a few lines."""
    kind = kind_of(event)
    lines = [f"{_TITLE[kind]}: {event.model} {event.version} ({event.deployment_id})"]
    lines.append(summary(event))
    lines += figures[:3]
    lines.append(f"requested by {_who(who)}")
    if isinstance(event, Outcome) and event.metrics_url:
        # A long URL would push the rest out of the notification, and be cut itself.
        fits = len(event.metrics_url) <= LABEL_MAX
        lines.append(f"metrics: {event.metrics_url if fits else 'linked in the message'}")
    if isinstance(event, DeploymentHeld | CanaryStepStarted):
        lines.append(
            f"preflight promote {event.deployment_id} | preflight abort {event.deployment_id}"
        )
    return clip(escape("\n".join(lines)), FALLBACK_MAX)


def render_progress(
    event: NoticeEvent, *, requested_by: Requester | None = None, rollout_url: str | None = None
) -> SlackMessage:
    """The one message per rollout that `chat.update` keeps current: step, then the final word."""
    who = _requester(event, requested_by)
    kind = kind_of(event)
    if isinstance(event, CanaryStepStarted):
        state = (
            f"step {event.step_index + 1} at {_num(event.weight)}% of traffic "
            f"(for {_num(event.duration_s)} s)"
        )
        live = True
    elif isinstance(event, DeploymentHeld):
        state = f"held at {_num(event.weight)}% of traffic: needs a person"
        live = True
    else:
        state = _TITLE[kind].lower()
        if isinstance(event, DeploymentRolledBack):
            state += f": {rollback_reason(event)}"
        live = False
    title = f"{_EMOJI['progress'] if live else _EMOJI[kind]} Canary {event.model} {event.version}: "
    blocks: list[dict[str, Any]] = [
        _header(title + state),
        _section(escape(summary(event))),
        _fields(event, who),
    ]
    figures = numbers(event)
    if figures:
        blocks.append(_section("*Numbers*\n" + _bullets(figures)))
    if live:
        blocks.append(_section("*Decide*\n" + _commands(event.deployment_id)))
    if (link := metrics_link(event, rollout_url)) is not None:
        blocks.append(_context(link.text))
    blocks.append(_context(f"updated {_slack_time(event.occurred_at)}  ·  preflight"))
    text = clip(
        escape(f"Canary {event.model} {event.version} ({event.deployment_id}): {state}"),
        FALLBACK_MAX,
    )
    return SlackMessage(text=text, blocks=blocks)


def render_console(event: NoticeEvent, *, requested_by: Requester | None = None) -> str:
    """One notice as plain text: what happened, to what, why, who asked, where to look."""
    kind = kind_of(event)
    lines = [f"[preflight] {_CONSOLE[kind]}: {event.model} {event.version} ({event.deployment_id})"]
    if isinstance(event, CanaryStepStarted | DeploymentRolledBack | DeploymentHeld):
        lines.append(f"  {summary(event)}")
    if isinstance(event, DeploymentFailed):
        lines.append(f"  {event.stage}: {event.error}")
    lines += [f"  = {line}" for line in numbers(event)]
    if isinstance(event, Outcome):
        lines += [f"  - {reason}" for reason in event.reasons]
        for stage in event.stages:
            why = stage.reason.removeprefix(f"{stage.status.value}: ")
            lines.append(f"  {stage.stage}: {stage.status.value}{' - ' + why if why else ''}")
    who = _requester(event, requested_by)
    lines.append(f"  requested by {who.user} via {who.system}")
    if isinstance(event, Outcome) and event.metrics_url:
        lines.append(f"  metrics: {event.metrics_url}")
    if isinstance(event, DeploymentHeld | CanaryStepStarted):
        lines.append(
            f"  decide: preflight promote {event.deployment_id} | "
            f"preflight abort {event.deployment_id}"
        )
    return "\n".join(lines)
