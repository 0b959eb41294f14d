"""The rollout page: each canary's state, steps, verdict and canary-vs-stable charts (HTML + JSON).

This is what the metrics link points at in the embedded stack, where there is no Grafana. The
server renders every word (escaped); a small vanilla script (`static/rollout.js`, no CDN, no build)
draws the two charts as inline SVG from the JSON embedded in the page and, while the rollout runs,
re-fetches the page every few seconds. The metrics store failing never hides the state.
"""

from __future__ import annotations

import html
import json
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any, Final, Literal, Protocol
from urllib.parse import quote

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from services.canary_controller.state import Phase, RolloutState
from services.contracts.events import DEPLOYMENT_ID_PATTERN, RoleMeasurement, utc_now
from services.metrics.queries import MetricsUnavailable
from services.runtime.aio import bounded

__all__ = [
    "RolloutReader",
    "SeriesSource",
    "StepView",
    "bucket_for",
    "build_page_app",
    "chart_range",
    "normalise_series",
    "plan_steps",
    "rollout_view",
]

log = logging.getLogger("preflight.canary-controller.page")

REFRESH_S: Final = 5.0
SERIES_TIMEOUT_S: Final = 5.0
TARGET_BUCKETS: Final = 120
MAX_RANGE: Final = timedelta(days=90)
MAX_MS: Final = 253_402_300_799_000  # 9999-12-31T23:59:59Z, the last instant datetime holds
NICE_BUCKETS_S: Final = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600)
NICE_BUCKETS_S_MAX: Final = 86400
ROLES: Final = ("canary", "stable")
_DEPLOYMENT_ID = re.compile(DEPLOYMENT_ID_PATTERN)

SECURITY_HEADERS: Final = {
    # Everything is same-origin and no inline script runs: an unescaped string could not execute.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class RolloutReader(Protocol):
    """Where rollout states are read from (the rollouts KV bucket in the controller)."""

    async def get(self, deployment_id: str) -> RolloutState | None:
        """The rollout's state, or None when there is no such rollout."""
        ...

    async def list(self) -> list[RolloutState]:
        """Every rollout the store still holds, in any order."""
        ...


class SeriesSource(Protocol):
    """Request metrics per time bucket and role, as `services.metrics.queries.query_series`."""

    async def series(
        self, deployment_id: str, start: datetime, end: datetime, bucket_s: float
    ) -> list[dict[str, Any]]:
        """Rows `{"start", "role", "requests", "errors", "error_rate", "p95_ms"}` (and
        `ttft_p95_ms`, time to first token, where streamed responses were measured); raises
        MetricsUnavailable when the store fails (any exception reads as "metrics unavailable")."""
        ...


# ---- pure parts: steps, time range, series --------------------------------------------------


@dataclass(frozen=True)
class StepView:
    """One segment of the rollout's timeline: a canary step or the bake after promotion."""

    index: int
    kind: Literal["step", "bake"]
    weight: float
    duration_s: float
    start: datetime | None
    end: datetime | None
    status: Literal["done", "current", "planned", "skipped"]
    estimated: bool = False
    """The start was derived from the planned durations, not recorded (earlier steps)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "kind": self.kind,
            "weight": self.weight,
            "duration_s": self.duration_s,
            "start": _iso(self.start),
            "end": _iso(self.end),
            "start_ms": _ms(self.start),
            "end_ms": _ms(self.end),
            "status": self.status,
            "estimated": self.estimated,
        }


def _in_bake(state: RolloutState) -> bool:
    """Whether `step_started_at` is the bake's start rather than a step's."""
    if state.phase is Phase.BAKE:
        return True
    # Only a rollout that finished every step gets a bake; a manual promotion skips it.
    return (
        state.phase.terminal
        and state.policy.bake_s > 0
        and state.steps_completed >= len(state.policy.steps)
    )


def plan_steps(state: RolloutState, now: datetime) -> list[StepView]:
    """The steps (and bake) with their start times: recorded, estimated or planned.

    The state records the current segment's start. Earlier starts come from `state.step_starts`
    when the state carries that history, else they are estimated backwards from the planned
    durations (a step extended for traffic makes the estimate early; it is marked as such).
    """
    segments: list[tuple[Literal["step", "bake"], float, float]] = [
        ("step", s.weight, s.duration_s) for s in state.policy.steps
    ]
    if state.policy.bake_s > 0:
        segments.append(("bake", 100.0, state.policy.bake_s))
    started = state.step_started_at
    if state.phase is Phase.QUEUED or started is None:
        return [StepView(i, k, w, d, None, None, "planned") for i, (k, w, d) in enumerate(segments)]

    terminal = state.phase.terminal
    current = len(state.policy.steps) if _in_bake(state) else state.step_index
    current = min(current, len(segments) - 1)
    recorded: Sequence[datetime] = getattr(state, "step_starts", ()) or ()
    earlier: list[StepView] = []
    following_start = started
    for i in range(current - 1, -1, -1):
        kind, weight, duration = segments[i]
        if i < len(recorded):
            start, estimated = recorded[i], False
        else:
            start = max(state.created_at, following_start - timedelta(seconds=duration))
            estimated = True
        earlier.append(
            StepView(i, kind, weight, duration, start, following_start, "done", estimated)
        )
        following_start = start
    out = earlier[::-1]

    kind, weight, duration = segments[current]
    if terminal:
        out.append(StepView(current, kind, weight, duration, started, state.finished_at, "done"))
        end = None
    else:
        end = state.step_ends_at or started + timedelta(seconds=duration)
        if state.phase is Phase.PAUSED and state.paused_remaining_s is not None:
            end = max(now, started) + timedelta(seconds=state.paused_remaining_s)
        out.append(StepView(current, kind, weight, duration, started, end, "current"))
    for i in range(current + 1, len(segments)):
        kind, weight, duration = segments[i]
        if end is None:
            out.append(StepView(i, kind, weight, duration, None, None, "skipped"))
            continue
        planned_end = end + timedelta(seconds=duration)
        out.append(StepView(i, kind, weight, duration, end, planned_end, "planned"))
        end = planned_end
    return out


def chart_range(
    state: RolloutState,
    steps: Sequence[StepView],
    now: datetime,
    start: datetime | None = None,
    end: datetime | None = None,
) -> tuple[datetime, datetime]:
    """The time axis: the rollout so far plus the current step's plan, unless narrowed."""
    starts = [s.start for s in steps if s.start is not None and s.status != "planned"]
    default_start = min(starts) if starts else state.created_at
    if state.phase.terminal and state.finished_at is not None:
        default_end = state.finished_at
    else:
        current_ends = [s.end for s in steps if s.status == "current" and s.end is not None]
        default_end = max([now, *current_ends])
    lo = start if start is not None else default_start
    hi = end if end is not None else default_end
    if hi <= lo:
        hi = lo + timedelta(seconds=60)
    if start is None and end is None:
        pad = (hi - lo) * 0.02  # the outcome marker must not sit on the frame
        hi = hi + pad
    return lo, hi


def bucket_for(span_s: float, target: int = TARGET_BUCKETS) -> float:
    """The smallest round bucket that draws `span_s` in at most `target` points."""
    for bucket in NICE_BUCKETS_S:
        if span_s / bucket <= target:
            return float(bucket)
    return float(max(NICE_BUCKETS_S_MAX, math.ceil(span_s / target / 86400) * 86400))


def normalise_series(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """`query_series` rows as chart points (epoch ms, JSON-safe); rows that do not read are
    left out rather than failing the page."""
    points: list[dict[str, Any]] = []
    for row in rows:
        try:
            point = _point(row)
        except (TypeError, ValueError, OverflowError):
            point = None
        if point is not None:
            points.append(point)
    points.sort(key=lambda p: (p["role"], p["t_ms"]))
    return points


def _point(row: Mapping[str, Any]) -> dict[str, Any] | None:
    role = str(row.get("role", ""))
    if role not in ROLES:
        return None
    t_ms = _to_ms(row.get("start"))
    if t_ms is None:
        return None
    requests = int(_finite(row.get("requests")) or 0)
    errors = int(_finite(row.get("errors")) or 0)
    error_rate = _finite(row.get("error_rate"))
    if error_rate is None and requests > 0:
        error_rate = errors / requests
    if requests == 0:
        error_rate = None
    p95 = _finite(row.get("p95_ms"))
    ttft_p95 = _finite(row.get("ttft_p95_ms"))
    return {
        "t_ms": t_ms,
        "role": role,
        "requests": requests,
        "errors": errors,
        "error_rate": error_rate,
        "p95_ms": p95 if requests > 0 else None,
        "ttft_p95_ms": ttft_p95 if requests > 0 else None,
    }


def _to_ms(value: Any) -> int | None:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        return None
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return int(aware.timestamp() * 1000)


def _finite(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _ms(value: datetime | None) -> int | None:
    return int(value.timestamp() * 1000) if value is not None else None


def _measurement(m: RoleMeasurement | None) -> dict[str, Any] | None:
    return m.model_dump(mode="json", exclude={"schema_version"}) if m is not None else None


def outcome_of(state: RolloutState) -> dict[str, Any] | None:
    if not state.phase.terminal:
        return None
    return {
        "kind": state.phase.value,
        "at": _iso(state.finished_at),
        "at_ms": _ms(state.finished_at),
        "reason": state.last_reason,
    }


def rollout_summary(state: RolloutState) -> dict[str, Any]:
    """The row of the rollouts list."""
    return {
        "deployment_id": state.deployment_id,
        "model": state.model,
        "version": state.version,
        "phase": state.phase.value,
        "terminal": state.phase.terminal,
        "weight": state.weight,
        "step_index": state.step_index,
        "steps": len(state.policy.steps),
        "created_at": _iso(state.created_at),
        "step_started_at": _iso(state.step_started_at),
        "finished_at": _iso(state.finished_at),
        "last_verdict": state.last_verdict,
        "last_reason": state.last_reason,
        "url": f"/rollouts/{quote(state.deployment_id, safe='')}",
    }


def rollout_view(
    state: RolloutState,
    steps: Sequence[StepView],
    *,
    now: datetime,
    start: datetime,
    end: datetime,
    bucket_s: float,
    points: Sequence[dict[str, Any]],
    metrics_error: str | None,
) -> dict[str, Any]:
    """Everything the page shows, as JSON: the API's answer and the page's embedded data."""
    rollout = state.model_dump(mode="json", exclude={"pending", "request"})
    rollout["weight"] = state.weight
    rollout["terminal"] = state.phase.terminal
    rollout["requested_by"] = state.request.requested_by.model_dump(
        mode="json", exclude={"schema_version"}
    )
    return {
        **rollout_summary(state),
        "rollout": rollout,
        "thresholds": {
            "max_error_rate": state.thresholds.max_error_rate,
            "max_p95_increase": state.thresholds.max_p95_increase,
            "max_ttft_p95_increase": _ttft_increase(state),
        },
        "steps": [s.to_json() for s in steps],
        "outcome": outcome_of(state),
        "measurements": {
            "canary": _measurement(state.canary_measurement),
            "stable": _measurement(state.stable_measurement),
        },
        "range": {
            "from_ms": _ms(start),
            "to_ms": _ms(end),
            "now_ms": _ms(now),
            "bucket_s": bucket_s,
        },
        "metrics": {"available": metrics_error is None, "error": metrics_error},
        "series": list(points),
        "refresh_s": None if state.phase.terminal else REFRESH_S,
    }


# ---- HTML -----------------------------------------------------------------------------------


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if value else "—"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:g} s"
    if seconds < 7200:
        return f"{seconds / 60:g} min"
    return f"{seconds / 3600:.1f} h"


def _percent(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value * 100:.{digits}f}%"


def _ms_text(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f} ms"


def _script_json(data: Any) -> str:
    """JSON safe inside <script type=application/json>: no `</script>`, no HTML specials."""
    text = json.dumps(data, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _document(title: str, body: str, data: Any = None) -> str:
    embedded = (
        f'<script type="application/json" id="page-data">{_script_json(data)}</script>\n'
        if data is not None
        else ""
    )
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n"
        '<link rel="stylesheet" href="/static/rollout.css">\n'
        '<script src="/static/rollout.js" defer></script>\n'
        "</head><body>\n"
        '<header><a href="/rollouts">preflight · rollouts</a>'
        '<span id="refresh-status" class="muted"></span></header>\n'
        f'<main id="page">\n{body}\n{embedded}</main>\n'
        "</body></html>\n"
    )


def _phase_badge(phase: Phase) -> str:
    return f'<span class="phase phase-{_e(phase.value)}">{_e(phase.value.replace("_", " "))}</span>'


def _verdict_badge(verdict: str | None) -> str:
    if not verdict:
        return '<span class="muted">none yet</span>'
    return f'<span class="verdict verdict-{_e(verdict)}">{_e(verdict.replace("_", " "))}</span>'


def render_list(states: Sequence[RolloutState], now: datetime) -> str:
    ordered = sorted(states, key=lambda s: (s.phase.terminal, -s.created_at.timestamp()))
    rows = []
    for s in ordered:
        url = f"/rollouts/{quote(s.deployment_id, safe='')}"
        rows.append(
            "<tr>"
            f'<td class="model">{_e(s.model)}</td><td>{_e(s.version)}</td>'
            f"<td><code>{_e(s.deployment_id)}</code></td>"
            f"<td>{_phase_badge(s.phase)}</td><td>{s.weight:g}%</td>"
            f"<td>{_e(_when(s.created_at))}</td>"
            f"<td>{_verdict_badge(s.last_verdict)}</td>"
            f'<td><a href="{_e(url)}">details</a></td>'
            "</tr>"
        )
    table = (
        '<table class="rollouts"><thead><tr><th>model</th><th>version</th><th>deployment id</th>'
        "<th>phase</th><th>weight</th><th>started</th><th>last verdict</th><th></th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
        if rows
        else '<p class="empty">No rollouts yet.</p>'
    )
    running = any(not s.phase.terminal for s in states)
    body = (
        "<h1>Rollouts</h1>\n"
        f'<p class="muted">{len(states)} rollout(s), as of {_e(_when(now))}.</p>\n{table}'
    )
    return _document("preflight · rollouts", body, {"refresh_s": REFRESH_S if running else None})


def _ttft_increase(state: RolloutState) -> float | None:
    """The policy's TTFT limit (absent from policies older than streamed-response metrics)."""
    value = getattr(state.thresholds, "max_ttft_p95_increase", None)
    return float(value) if isinstance(value, int | float) else None


def _has_ttft(state: RolloutState, points: Sequence[Mapping[str, Any]] = ()) -> bool:
    """Whether this rollout measured time to first token (it served streamed responses)."""
    measured = (state.canary_measurement, state.stable_measurement)
    return any(m is not None and m.ttft_p95_ms is not None for m in measured) or any(
        p.get("ttft_p95_ms") is not None for p in points
    )


def _threshold_text(state: RolloutState) -> str:
    t = state.thresholds
    text = (
        f"canary error rate ≤ {_percent(t.max_error_rate, 1)}; "
        f"canary p95 ≤ stable p95 × {1 + t.max_p95_increase:g} (+{t.max_p95_increase * 100:g}%)"
    )
    ttft = _ttft_increase(state)
    if ttft is not None and _has_ttft(state):
        text += f"; canary TTFT p95 ≤ stable TTFT p95 × {1 + ttft:g} (+{ttft * 100:g}%)"
    return text


def _outcome_html(state: RolloutState) -> str:
    if state.phase is Phase.PROMOTED:
        return (
            f'<p class="outcome outcome-promoted">Promoted at {_e(_when(state.finished_at))}: '
            f"{_e(state.version)} is now the stable version.</p>"
        )
    if state.phase is Phase.ROLLED_BACK:
        return (
            f'<p class="outcome outcome-rolled_back">Rolled back at {_e(_when(state.finished_at))}'
            f": {_e(state.last_reason or 'no reason recorded')}</p>"
        )
    if state.phase is Phase.HELD:
        return (
            '<p class="outcome outcome-held">Inconclusive: held until '
            f"{_e(_when(state.held_deadline))}, then rolled back unless a person promotes it "
            f"(<code>preflight promote {_e(state.deployment_id)}</code>).</p>"
        )
    return ""


def _steps_html(steps: Sequence[StepView]) -> str:
    rows = []
    for s in steps:
        name = f"step {s.index + 1}" if s.kind == "step" else "bake"
        start = _when(s.start) if s.start else "—"
        if s.estimated:
            start = f"≈ {start}"
        rows.append(
            f'<tr class="step step-{_e(s.status)}"><td>{_e(name)}</td><td>{s.weight:g}%</td>'
            f"<td>{_e(start)}</td><td>{_e(_duration(s.duration_s))}</td>"
            f"<td>{_e(_when(s.end) if s.end else '—')}</td><td>{_e(s.status)}</td></tr>"
        )
    return (
        '<table class="steps"><thead><tr><th></th><th>weight</th><th>start</th>'
        "<th>planned duration</th><th>end</th><th>status</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _measurements_html(state: RolloutState) -> str:
    ttft = _has_ttft(state)
    rows = []
    for role, m in (("canary", state.canary_measurement), ("stable", state.stable_measurement)):
        if m is None:
            continue
        ttft_cell = f'<td class="ttft">{_e(_ms_text(m.ttft_p95_ms))}</td>' if ttft else ""
        rows.append(
            f'<tr class="role-{role}"><td>{role}</td><td>{m.requests}</td><td>{m.errors}</td>'
            f"<td>{_percent(m.error_rate)}</td><td>{_e(_ms_text(m.p95_ms))}</td>{ttft_cell}</tr>"
        )
    if not rows:
        return '<p class="muted">No analysis yet.</p>'
    ttft_head = '<th title="time to first token of streamed responses">TTFT p95</th>'
    return (
        '<table class="measurements"><thead><tr><th>role</th><th>requests</th><th>errors</th>'
        f"<th>error rate</th><th>p95</th>{ttft_head if ttft else ''}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def render_detail(state: RolloutState, steps: Sequence[StepView], view: dict[str, Any]) -> str:
    metrics = view["metrics"]
    if metrics["available"]:
        banner = ""
    else:
        banner = (
            '<p class="banner banner-error" id="metrics-unavailable">metrics unavailable: '
            f"{_e(metrics['error'])}. The rollout state below is current; the charts are not.</p>"
        )
    now_ms = view["range"]["now_ms"]
    lookup_url = f"/api/rollouts/{quote(state.deployment_id, safe='')}"
    step_of = (
        f"{min(state.step_index, len(state.policy.steps) - 1) + 1} of {len(state.policy.steps)}"
    )
    who = state.request.requested_by
    pairs = [
        ("phase", _phase_badge(state.phase)),
        ("canary weight", f"{state.weight:g}%"),
        ("step", _e(step_of)),
        ("last verdict", _verdict_badge(state.last_verdict)),
        ("stable", _e(state.stable.version if state.stable else "none (first version)")),
        ("requested by", _e(f"{who.user} via {who.system}")),
        ("created", _e(_when(state.created_at))),
        ("finished", _e(_when(state.finished_at))),
    ]
    wide = [
        ("last reason", f'<span id="last-reason">{_e(state.last_reason or "—")}</span>'),
        ("thresholds", _e(_threshold_text(state))),
    ]
    summary = "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in pairs) + "".join(
        f'<dt>{_e(k)}</dt><dd class="wide">{v}</dd>' for k, v in wide
    )
    as_of = _when(datetime.fromtimestamp(now_ms / 1000, UTC))
    body = "\n".join(
        [
            f'<h1><span class="model">{_e(state.model)}</span> '
            f'<span class="version">{_e(state.version)}</span></h1>',
            f'<p class="muted">deployment <code>{_e(state.deployment_id)}</code> · '
            f'<a href="{_e(lookup_url)}">JSON</a> · as of {_e(as_of)}</p>',
            _outcome_html(state),
            banner,
            f'<section class="summary"><dl>{summary}</dl></section>',
            '<section class="charts">',
            '<figure class="chart" id="chart-p95" data-metric="p95_ms">'
            "<figcaption>p95 latency, canary vs stable (ms)</figcaption>"
            "<noscript>The charts need JavaScript; the numbers are in the JSON link above."
            "</noscript></figure>",
            '<figure class="chart" id="chart-errors" data-metric="error_rate">'
            "<figcaption>error rate, canary vs stable (%)</figcaption></figure>",
            (
                '<figure class="chart" id="chart-ttft" data-metric="ttft_p95_ms">'
                "<figcaption>p95 time to first token of streamed responses, canary vs stable "
                "(ms)</figcaption></figure>"
                if _has_ttft(state, view["series"])
                else ""
            ),
            "</section>",
            f"<section><h2>Steps</h2>{_steps_html(steps)}</section>",
            f"<section><h2>Last analysed window</h2>{_measurements_html(state)}</section>",
        ]
    )
    return _document(f"{state.model} {state.version} · rollout", body, view)


def render_message(title: str, message: str) -> str:
    body = f'<h1>{_e(title)}</h1>\n<p class="message">{_e(message)}</p>'
    return _document(f"preflight · {title}", body)


# ---- aiohttp --------------------------------------------------------------------------------


class _BadRequest(ValueError):
    pass


def _parse_ms(query: Mapping[str, str], key: str) -> datetime | None:
    raw = query.get(key, "").strip()
    if not raw:
        return None  # the link template may carry `from_ms=&to_ms=` when the range is unknown
    try:
        value = int(raw)
    except ValueError:
        raise _BadRequest(f"{key} must be milliseconds since the epoch, got {raw[:40]!r}") from None
    if not 0 <= value <= MAX_MS:
        raise _BadRequest(f"{key} is out of range: {value}")
    return datetime.fromtimestamp(value / 1000, UTC)


def _parse_range(query: Mapping[str, str]) -> tuple[datetime | None, datetime | None]:
    start, end = _parse_ms(query, "from_ms"), _parse_ms(query, "to_ms")
    if start is not None and end is not None:
        if end <= start:
            raise _BadRequest("to_ms must be after from_ms")
        if end - start > MAX_RANGE:
            raise _BadRequest(f"the range may span {MAX_RANGE.days} days at most")
    return start, end


@dataclass(frozen=True)
class _Page:
    rollouts: RolloutReader
    series: SeriesSource
    health: Callable[[], dict[str, Any]] | None
    ready: Callable[[], dict[str, Any]] | None
    clock: Callable[[], datetime]
    series_timeout_s: float
    static: dict[str, tuple[bytes, str]]
    metrics: CollectorRegistry | None = None


PAGE: Final = web.AppKey("rollout_page", _Page)


def _html(text: str, status: int = 200) -> web.Response:
    return web.Response(
        text=text,
        status=status,
        content_type="text/html",
        charset="utf-8",
        headers=SECURITY_HEADERS,
    )


def _json(data: Any, status: int = 200) -> web.Response:
    body = json.dumps(data, allow_nan=False)
    return web.Response(
        text=body, status=status, content_type="application/json", headers=SECURITY_HEADERS
    )


def _wants_json(request: web.Request) -> bool:
    return request.path.startswith("/api/")


def _error(request: web.Request, status: int, title: str, message: str) -> web.Response:
    if _wants_json(request):
        return _json({"error": message, "status": status}, status=status)
    return _html(render_message(title, message), status=status)


def _status(check: Callable[[], dict[str, Any]] | None) -> web.Response:
    if check is None:
        return _json({"status": "ok"})
    try:
        body = dict(check())
    except Exception as exc:
        log.exception("health check failed")
        body = {"status": "unavailable", "problems": [f"health check failed: {exc}"]}
    return _json(body, status=200 if body.get("status") == "ok" else 503)


async def _healthz(request: web.Request) -> web.Response:
    return _status(request.app[PAGE].health)


async def _readyz(request: web.Request) -> web.Response:
    page = request.app[PAGE]
    return _status(page.ready or page.health)


async def _metrics(request: web.Request) -> web.Response:
    registry = request.app[PAGE].metrics
    if registry is None:
        return _error(request, 404, "Not found", "this controller exports no metrics")
    return web.Response(
        body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


async def _list_states(request: web.Request) -> list[RolloutState] | web.Response:
    try:
        return await request.app[PAGE].rollouts.list()
    except Exception as exc:
        log.exception("cannot list rollouts")
        return _error(request, 503, "Rollout store unavailable", f"cannot list rollouts: {exc}")


async def _list_page(request: web.Request) -> web.Response:
    states = await _list_states(request)
    if isinstance(states, web.Response):
        return states
    return _html(render_list(states, request.app[PAGE].clock()))


async def _list_api(request: web.Request) -> web.Response:
    states = await _list_states(request)
    if isinstance(states, web.Response):
        return states
    ordered = sorted(states, key=lambda s: (s.phase.terminal, -s.created_at.timestamp()))
    return _json({"rollouts": [rollout_summary(s) for s in ordered]})


async def _detail(
    request: web.Request,
) -> tuple[RolloutState, list[StepView], dict[str, Any]] | web.Response:
    page = request.app[PAGE]
    deployment_id = request.match_info["deployment_id"]
    if not _DEPLOYMENT_ID.fullmatch(deployment_id):
        return _error(request, 404, "Not found", f"no rollout {deployment_id!r}")
    try:
        start_q, end_q = _parse_range(request.query)
    except _BadRequest as exc:
        return _error(request, 400, "Bad request", str(exc))
    try:
        state = await page.rollouts.get(deployment_id)
    except Exception as exc:
        log.exception("cannot read rollout %s", deployment_id)
        return _error(request, 503, "Rollout store unavailable", f"cannot read rollout: {exc}")
    if state is None:
        return _error(request, 404, "Not found", f"no rollout {deployment_id!r}")
    now = page.clock()
    steps = plan_steps(state, now)
    start, end = chart_range(state, steps, now, start_q, end_q)
    bucket_s = bucket_for((end - start).total_seconds())
    query_end = min(end, now)
    points: list[dict[str, Any]] = []
    error: str | None = None
    if query_end > start:
        try:
            rows = await bounded(
                page.series.series(deployment_id, start, query_end, bucket_s),
                page.series_timeout_s,
            )
            points = normalise_series(rows)
        except TimeoutError:
            error = f"the metrics store did not answer within {page.series_timeout_s:g} s"
        except MetricsUnavailable as exc:
            log.warning("metrics series for %s unavailable: %s", deployment_id, exc)
            error = str(exc) or type(exc).__name__
        except Exception as exc:  # a bug, not an outage; the state must still show
            log.exception("metrics series for %s failed", deployment_id)
            error = f"{type(exc).__name__}: {exc}"
    view = rollout_view(
        state,
        steps,
        now=now,
        start=start,
        end=end,
        bucket_s=bucket_s,
        points=points,
        metrics_error=error,
    )
    return state, steps, view


async def _detail_page(request: web.Request) -> web.Response:
    found = await _detail(request)
    if isinstance(found, web.Response):
        return found
    state, steps, view = found
    return _html(render_detail(state, steps, view))


async def _detail_api(request: web.Request) -> web.Response:
    found = await _detail(request)
    if isinstance(found, web.Response):
        return found
    return _json(found[2])


async def _static(request: web.Request) -> web.Response:
    entry = request.app[PAGE].static.get(request.match_info["name"])
    if entry is None:
        return _error(request, 404, "Not found", "no such file")
    body, content_type = entry
    headers = {**SECURITY_HEADERS, "Cache-Control": "max-age=300"}
    return web.Response(body=body, content_type=content_type, headers=headers)


def _load_static() -> dict[str, tuple[bytes, str]]:
    folder = resources.files("services.canary_controller").joinpath("static")
    types = {"js": "text/javascript", "css": "text/css"}
    return {
        name: (folder.joinpath(name).read_bytes(), types[name.rsplit(".", 1)[1]])
        for name in ("rollout.js", "rollout.css")
    }


def build_page_app(
    rollouts: RolloutReader,
    series: SeriesSource,
    *,
    health: Callable[[], dict[str, Any]] | None = None,
    ready: Callable[[], dict[str, Any]] | None = None,
    clock: Callable[[], datetime] = utc_now,
    series_timeout_s: float = SERIES_TIMEOUT_S,
    metrics: CollectorRegistry | None = None,
) -> web.Application:
    """The rollout page and its JSON API.

    `health()` answers `/healthz` (alive: a standby replica is healthy too), `ready()` answers
    `/readyz` (only the active replica is ready, so a load balancer sends people to the page
    with charts): 200 when the dict says `"status": "ok"`, else 503.
    `clock` is injected so tests and the time axis agree on "now". `metrics`: the registry
    `/metrics` serves in the Prometheus text format (404 without one).
    """
    app = web.Application()
    app[PAGE] = _Page(
        rollouts, series, health, ready, clock, series_timeout_s, _load_static(), metrics
    )
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/", _list_page)
    app.router.add_get("/rollouts", _list_page)
    app.router.add_get("/rollouts/{deployment_id}", _detail_page)
    app.router.add_get("/api/rollouts", _list_api)
    app.router.add_get("/api/rollouts/{deployment_id}", _detail_api)
    app.router.add_get("/static/{name}", _static)
    return app
