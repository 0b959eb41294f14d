"""The notifier's pure parts: rendering (a snapshot per outcome kind), signing, retries, targets.

Snapshots live in tests/unit/snapshots/notifier/<case>.json (Block Kit, fallback text, progress
rendering and console text). After a deliberate change of wording, rewrite them with
`PREFLIGHT_UPDATE_SNAPSHOTS=1 .venv/bin/pytest tests/unit/test_notifier_messages.py` and review
the diff like code.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from services.contracts.events import (
    OUTCOME_TYPES,
    CanaryStepStarted,
    CheckResult,
    DeploymentBlocked,
    DeploymentDegraded,
    DeploymentFailed,
    DeploymentHeld,
    DeploymentPromoted,
    DeploymentRequested,
    DeploymentRolledBack,
    NotifyTarget,
    Requester,
    RoleMeasurement,
    StageReport,
    Status,
)
from services.contracts.policy import PolicyFile
from services.notifier import messages
from services.notifier.channels.base import channel_key
from services.notifier.channels.webhook import describe_url, sign, verify
from services.notifier.messages import NoticeEvent
from services.notifier.retry import RetryPolicy, parse_retry_after
from services.notifier.targets import resolve_targets

SNAPSHOTS = Path(__file__).parent / "snapshots" / "notifier"
AT = datetime(2026, 11, 25, 17, 45, 1, tzinfo=UTC)
ALICE = Requester(user="alice", system="github-actions", team="search")
URL = "https://grafana.example.com/d/preflight?var-deployment=d-20261125T174501-3f9a1c"
IDS = {
    "deployment_id": "d-20261125T174501-3f9a1c",
    "model": "org/chat-7b.v2",
    "version": "2024-06-02",
}

VALIDATION_FAILED = StageReport(
    stage="validation",
    status=Status.FAILED,
    reason="failed: 2 checks failed",
    checks=(
        CheckResult(
            name="checksum",
            status=Status.FAILED,
            reason="model.safetensors: sha256 differs from the expected digest",
        ),
        CheckResult(
            name="secrets",
            status=Status.FAILED,
            reason="2 findings: an AWS key in config.json <line 3> & a token",
            value=2,
            threshold=0,
            unit="findings",
        ),
        CheckResult(name="format", status=Status.PASSED, reason="safetensors"),
    ),
)
PERPLEXITY = CheckResult(
    name="perplexity",
    status=Status.FAILED,
    reason="token perplexity 12.301 vs 11.379 for the previous version (+8.1%, limit +5%)",
    value=0.081,
    threshold=0.05,
    unit="relative",
)
LATENCY = CheckResult(
    name="latency",
    status=Status.FAILED,
    reason="ttft_p95_ms 612.4 > 500",
    value=612.4,
    threshold=500,
    unit="ms",
)
CANARY_BAD = RoleMeasurement(requests=500, errors=21, error_rate=0.042, p50_ms=150, p95_ms=312)
STABLE = RoleMeasurement(requests=4812, errors=14, error_rate=0.0029, p50_ms=120, p95_ms=180)
CANARY_OK = RoleMeasurement(requests=2400, errors=3, error_rate=0.00125, p50_ms=118, p95_ms=183)
WINDOW = {"window_start": AT - timedelta(seconds=60), "window_end": AT}

CASES: dict[str, NoticeEvent] = {
    "blocked": DeploymentBlocked(
        **IDS,
        occurred_at=AT,
        stage="validation",
        stages=(VALIDATION_FAILED,),
        reasons=tuple(f"{c.name}: {c.reason}" for c in VALIDATION_FAILED.checks[:2]),
        requested_by=ALICE,
    ),
    "degraded": DeploymentDegraded(
        **IDS,
        occurred_at=AT,
        failed_checks=(PERPLEXITY, LATENCY),
        reasons=(f"perplexity: {PERPLEXITY.reason}", f"latency: {LATENCY.reason}"),
        requested_by=ALICE,
    ),
    "promoted": DeploymentPromoted(
        **IDS,
        occurred_at=AT,
        previous_version="2024-05-20",
        steps_completed=2,
        canary=CANARY_OK,
        stable=STABLE,
        reasons=("every canary step healthy",),
        requested_by=ALICE,
        metrics_url=URL,
    ),
    "rolled_back_error_rate": DeploymentRolledBack(
        **IDS,
        occurred_at=AT,
        trigger="error_rate",
        step_index=0,
        canary=CANARY_BAD,
        stable=STABLE,
        threshold=0.01,
        **WINDOW,
        reasons=("canary error rate 4.2% over the 1.0% limit",),
        requested_by=ALICE,
        metrics_url=URL,
    ),
    "rolled_back_latency": DeploymentRolledBack(
        **IDS,
        occurred_at=AT,
        trigger="latency",
        step_index=1,
        canary=RoleMeasurement(requests=900, errors=1, error_rate=0.0011, p95_ms=312),
        stable=STABLE,
        threshold=0.20,
        **WINDOW,
        requested_by=ALICE,
        metrics_url=URL,
    ),
    "rolled_back_inconclusive": DeploymentRolledBack(
        **IDS,
        occurred_at=AT,
        trigger="inconclusive",
        step_index=0,
        canary=RoleMeasurement(requests=12, errors=0, error_rate=0.0),
        stable=STABLE,
        reasons=("12 canary requests, 50 needed; nobody promoted it by the deadline",),
        requested_by=ALICE,
        metrics_url=URL,
    ),
    "held": DeploymentHeld(
        **IDS,
        occurred_at=AT,
        step_index=0,
        weight=5,
        deadline=AT + timedelta(minutes=30),
        canary=RoleMeasurement(requests=12, errors=0, error_rate=0.0),
        stable=STABLE,
        **WINDOW,
        reasons=("12 canary requests in the window, 50 needed to judge",),
        requested_by=ALICE,
        metrics_url=URL,
    ),
    "failed": DeploymentFailed(
        **IDS,
        occurred_at=AT,
        stage="benchmarker",
        error="handler failed on attempt 5: OSError: disk full",
        reasons=("benchmarker could not handle it: OSError: disk full",),
        requested_by=ALICE,
    ),
    "progress_step": CanaryStepStarted(
        **IDS, occurred_at=AT, step_index=1, weight=50, duration_s=120
    ),
}


def rendered(event: NoticeEvent) -> dict[str, Any]:
    who = ALICE if isinstance(event, CanaryStepStarted) else None
    return {
        "message": messages.render(event, requested_by=who).as_json(),
        "progress": messages.render_progress(event, requested_by=who).as_json(),
        "console": messages.render_console(event, requested_by=who).splitlines(),
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendering_matches_its_snapshot(case: str) -> None:
    got = rendered(CASES[case])
    path = SNAPSHOTS / f"{case}.json"
    if os.environ.get("PREFLIGHT_UPDATE_SNAPSHOTS") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(got, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    assert path.exists(), f"no snapshot {path}; create it with PREFLIGHT_UPDATE_SNAPSHOTS=1"
    assert got == json.loads(path.read_text(encoding="utf-8"))


def test_every_outcome_kind_has_a_snapshot() -> None:
    kinds = {type(e) for e in CASES.values()}
    assert set(OUTCOME_TYPES) <= kinds
    assert {messages.kind_of(e) for e in CASES.values()} == set(messages.KINDS)


# The snapshots pin the exact wording; these say what must be in it, whatever the wording.
@pytest.mark.parametrize(
    ("case", "numbers"),
    [
        ("rolled_back_error_rate", ["error rate 4.2% > 1%", "canary: 21/500 errors (4.2%)"]),
        ("rolled_back_error_rate", ["stable: 14/4,812 errors (0.3%)", "17:44:01–17:45:01 UTC"]),
        ("rolled_back_latency", ["p95 312 ms vs stable 180 ms (+73.3% > +20%)"]),
        ("degraded", ["perplexity +8.1% > +5%", "latency 612 ms > 500 ms"]),
        ("blocked", ["secrets 2 findings > 0 findings"]),
        ("promoted", ["error rate 0.1%", "canary: 3/2,400 errors"]),
    ],
)
def test_the_numbers_behind_a_notice_are_in_it(case: str, numbers: list[str]) -> None:
    message = messages.render(CASES[case])
    text = json.dumps(message.blocks, ensure_ascii=False)
    for figure in numbers:
        assert messages.escape(figure) in text


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_notice_says_what_to_whom_by_whom_with_the_link(case: str) -> None:
    event = CASES[case]
    message = messages.render(event, requested_by=ALICE)
    blocks = json.dumps(message.blocks, ensure_ascii=False)
    for needed in (event.model, event.version, event.deployment_id, "alice via github-actions"):
        assert needed in blocks and needed in message.text
    if getattr(event, "metrics_url", None):
        assert URL in blocks and URL in message.text
    assert len(message.blocks) <= 50
    header = message.blocks[0]["text"]["text"]
    assert len(header) <= messages.HEADER_MAX


@pytest.mark.parametrize("case", ["held", "progress_step"])
def test_a_rollout_waiting_on_people_shows_the_commands(case: str) -> None:
    event = CASES[case]
    for text in (
        json.dumps(messages.render(event).blocks),
        messages.render(event).text,
        messages.render_console(event),
    ):
        assert f"preflight promote {event.deployment_id}" in text
        assert f"preflight abort {event.deployment_id}" in text


def test_a_finished_rollout_offers_no_commands() -> None:
    progress = messages.render_progress(CASES["rolled_back_error_rate"])
    assert "preflight promote" not in json.dumps(progress.blocks)
    assert "rolled back (error_rate)" in progress.text


def test_slack_control_characters_are_escaped_and_long_text_is_clipped() -> None:
    noisy = DeploymentBlocked(
        **IDS,
        stage="validation",
        reasons=("<!channel> & <https://evil.example|click>", "x" * 10_000),
    )
    message = messages.render(noisy)
    text = json.dumps(message.blocks)
    assert "<!channel>" not in text and "&lt;!channel&gt; &amp;" in text
    for block in message.blocks:
        if block["type"] == "section" and "text" in block:
            assert len(block["text"]["text"]) <= messages.TEXT_MAX


def test_console_keeps_the_existing_shape() -> None:
    lines = messages.render_console(CASES["blocked"]).splitlines()
    assert lines[0] == "[preflight] BLOCKED: org/chat-7b.v2 2024-06-02 (d-20261125T174501-3f9a1c)"
    assert "  requested by alice via github-actions" in lines


def test_progress_rank_orders_steps_held_and_outcomes() -> None:
    ranks = [messages.progress_rank(CASES[c]) for c in ("held", "progress_step", "promoted")]
    assert ranks == sorted(ranks) and ranks[0] == 0.5


# ---- signatures, retry waits, channel keys -------------------------------------------------


def test_webhook_signature_verifies_and_rejects_tampering_and_old_timestamps() -> None:
    body, secret = b'{"type":"DeploymentRolledBack"}', b"s3cret"
    signature = sign(secret, "1764092701", body)
    assert signature.startswith("sha256=") and len(signature) == 7 + 64
    assert verify(secret, "1764092701", body, signature, now=1764092701 + 10)
    assert not verify(secret, "1764092701", body + b" ", signature, now=1764092701)
    assert not verify(b"other", "1764092701", body, signature, now=1764092701)
    assert not verify(secret, "1764092701", body, signature, now=1764092701 + 301)
    assert not verify(secret, "not-a-time", body, signature, now=1764092701)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("3", 3.0),
        ("0.5", 0.5),
        ("Wed, 25 Nov 2026 17:45:31 GMT", 30.0),
        ("Wed, 25 Nov 2026 17:40:00 GMT", 0.0),
        ("soon", None),
        ("", None),
        (None, None),
        ("-4", 0.0),
    ],
)
def test_retry_after_is_seconds_or_an_http_date(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, AT) == seconds


def test_retry_waits_back_off_and_cap_retry_after() -> None:
    policy = RetryPolicy(backoff_s=0.5, max_backoff_s=3, max_retry_after_s=10, clock=lambda: AT)
    assert [policy.backoff(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 3]
    assert policy.wait_after_429("7", 1) == 7
    assert policy.wait_after_429("3600", 1) == 10
    assert policy.wait_after_429(None, 2) == 1.0


def test_channel_keys_are_kv_safe_and_distinct() -> None:
    keys = {channel_key("slack", c) for c in ("#ml-deploys", "ml-deploys", "#ml deploys")}
    assert len(keys) == 3
    assert all(k.replace("-", "").replace("_", "").isalnum() for k in keys)
    assert describe_url("https://hooks.example.com:8443/T0/B0/secret?x=1") == (
        "https://hooks.example.com:8443/…"
    )


# ---- where a notice goes ---------------------------------------------------------------------

POLICY = PolicyFile(
    defaults={"notify": {"slack_channel": "#deploys", "on": ["blocked", "rolled_back"]}},
    teams={"search": {"notify": {"slack_channel": "#search-deploys"}}},
    models={"org/special": {"notify": {"webhook_url": "https://ops.example.com/hook"}}},
)


def request(**notify: str) -> DeploymentRequested:
    return DeploymentRequested(
        **IDS, location="/m", requested_by=ALICE, notify=NotifyTarget(**notify)
    )


@pytest.mark.parametrize(
    ("req", "policy", "channel"),
    [
        (request(slack_channel="#alice"), POLICY, "#alice"),
        (request(), POLICY, "#search-deploys"),
        (None, POLICY, "#search-deploys"),  # the outcome's own requester names the team
        (None, PolicyFile(), "#fallback"),
    ],
)
def test_the_slack_channel_is_the_request_s_then_the_policy_s_then_the_settings(
    req: DeploymentRequested | None, policy: PolicyFile, channel: str
) -> None:
    targets = resolve_targets(
        CASES["blocked"], req, policy, default_channel="#fallback", default_webhook=None
    )
    assert targets.slack_channel == channel


def test_webhooks_add_up_and_notify_on_filters_kinds() -> None:
    event = CASES["blocked"].model_copy(update={"model": "org/special"})
    targets = resolve_targets(
        event,
        request(webhook_url="https://mine.example.com/h"),
        POLICY,
        default_channel=None,
        default_webhook="https://ops.example.com/hook",
    )
    assert targets.webhook_urls == ("https://mine.example.com/h", "https://ops.example.com/hook")
    assert targets.wants("blocked") and not targets.wants("promoted")
    assert not targets.wants("progress")


def test_a_broken_policy_override_still_notifies() -> None:
    broken = request().model_copy(update={"policy_overrides": {"canary": {"steps": "nope"}}})
    targets = resolve_targets(
        CASES["blocked"], broken, POLICY, default_channel=None, default_webhook=None
    )
    assert targets.slack_channel == "#search-deploys"
