"""The notifier's pure parts: rendering (a snapshot per outcome kind), signing, retries, targets;
and delivery with an in-memory ledger and fake channels (locks, ranks, ledger failures).

Snapshots live in tests/unit/snapshots/notifier/<case>.json (Block Kit, fallback text, progress
rendering and console text). After a deliberate change of wording, rewrite them with
`PREFLIGHT_UPDATE_SNAPSHOTS=1 .venv/bin/pytest tests/unit/test_notifier_messages.py` and review
the diff like code.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, cast

import aiohttp
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
from services.notifier.channels.base import (
    CannotTell,
    DeliveryError,
    Notice,
    Receipt,
    channel_key,
    redact_url,
    url_key,
)
from services.notifier.channels.webhook import WebhookChannel, describe_url, sign, verify
from services.notifier.dedup import MemoryLedger, progress_key, sent_key
from services.notifier.delivery import Deliverer, make_notice
from services.notifier.messages import NoticeEvent
from services.notifier.retry import RetryPolicy, parse_retry_after
from services.notifier.targets import resolve_targets
from services.runtime.service import default_retry_delay

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
    "rolled_back_ttft": DeploymentRolledBack(
        **IDS,
        occurred_at=AT,
        trigger="ttft",
        step_index=0,
        canary=RoleMeasurement(
            requests=900, errors=1, error_rate=0.0011, p95_ms=190, ttft_p95_ms=420
        ),
        stable=RoleMeasurement(
            requests=4812, errors=14, error_rate=0.0029, p95_ms=180, ttft_p95_ms=120
        ),
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
        ("rolled_back_ttft", ["TTFT p95 420 ms vs stable 120 ms (+250% > +20%)"]),
        ("rolled_back_ttft", ["p95 190 ms vs stable 180 ms (+5.6%)", "time to first token"]),
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


def test_ttft_shows_beside_latency_when_the_roles_streamed() -> None:
    canary = RoleMeasurement(requests=900, errors=1, p95_ms=190, ttft_p95_ms=420)
    stable = RoleMeasurement(requests=4812, errors=14, p95_ms=180, ttft_p95_ms=120)
    lines = messages.canary_numbers(canary, stable)
    assert lines[:2] == [
        "p95 190 ms vs stable 180 ms (+5.6%)",
        "TTFT p95 420 ms vs stable 120 ms (+250%)",
    ]
    plain = RoleMeasurement(requests=900, errors=1, p95_ms=190)
    assert not any("TTFT" in line for line in messages.canary_numbers(plain, stable))
    alone = messages.canary_numbers(canary, RoleMeasurement(requests=10, errors=0))
    assert "TTFT p95 420 ms (stable: none measured)" in alone
    event = CASES["rolled_back_ttft"]
    assert isinstance(event, DeploymentRolledBack)
    reason = messages.rollback_reason(event)
    assert (
        reason == "p95 time to first token 420 ms, 250% above stable's 120 ms, over the 20% limit"
    )


def test_a_finished_rollout_offers_no_commands() -> None:
    progress = messages.render_progress(CASES["rolled_back_error_rate"])
    assert "preflight promote" not in json.dumps(progress.blocks)
    assert "rolled back: error rate 4.2% above the 1% limit" in progress.text


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
    cases = ("held", "progress_step", "promoted")
    ranks = [r for c in cases if (r := messages.progress_rank(CASES[c])) is not None]
    assert len(ranks) == len(set(ranks)) == 3
    assert ranks == sorted(ranks) and ranks[0] == (0.0, "20261125T174501.000000")


def test_a_step_started_again_after_a_hold_ranks_above_the_hold() -> None:
    """`preflight resume` starts the held step again: that start and a second hold are newer."""
    first = CanaryStepStarted(**IDS, occurred_at=AT, step_index=0, weight=5, duration_s=60)
    held = CASES["held"].model_copy(update={"occurred_at": AT + timedelta(minutes=1)})
    again = first.model_copy(update={"occurred_at": AT + timedelta(minutes=5)})
    held_again = held.model_copy(update={"occurred_at": AT + timedelta(minutes=10)})
    later_step = first.model_copy(update={"step_index": 1, "occurred_at": AT + timedelta(hours=1)})
    ordered = [first, held, again, held_again, later_step, CASES["rolled_back_error_rate"]]
    ranks = [r for e in ordered if (r := messages.progress_rank(e)) is not None]
    assert len(ranks) == len(set(ranks)) == len(ordered)
    assert ranks == sorted(ranks)
    # a time in another zone is the same instant
    eastern = again.occurred_at.astimezone(timezone(timedelta(hours=-5)))
    shifted = again.model_copy(update={"occurred_at": eastern})
    assert messages.progress_rank(shifted) == messages.progress_rank(again)


def test_degraded_never_touches_the_progress_message() -> None:
    assert messages.progress_rank(CASES["degraded"]) is None


def test_each_occurrence_of_a_step_or_hold_is_its_own_notice() -> None:
    step = make_notice(CASES["progress_step"])
    assert step.notice_id == "d-20261125T174501-3f9a1c:progress:1:20261125T174501.000000"
    held = make_notice(CASES["held"])
    assert held.notice_id == "d-20261125T174501-3f9a1c:held:0:20261125T181501.000000"  # deadline
    assert (
        make_notice(CASES["rolled_back_error_rate"]).notice_id
        == "d-20261125T174501-3f9a1c:rolled_back"
    )
    restarted = make_notice(
        CASES["progress_step"].model_copy(update={"occurred_at": AT + timedelta(minutes=5)})
    )
    assert restarted.notice_id != step.notice_id
    key = sent_key(IDS["deployment_id"], "progress", 1, "slack-x", step.occurrence)
    assert key == "d-20261125T174501-3f9a1c.sent.progress.1.20261125T174501_000000.slack-x"
    assert key != sent_key(IDS["deployment_id"], "progress", 1, "slack-x", restarted.occurrence)


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
    ("timestamp", "signature"),
    [
        ("1764092701", "sha256=é" + "0" * 63),  # non-ASCII signature: False, not a TypeError
        ("1764092701", "sha256=\u0661" * 3),
        ("\u0661\u0667\u0666\u0664\u0660\u0669\u0662\u0667\u0660\u0661", None),
        (" 1764092701", None),
        ("+1764092701", None),
        ("1_764_092_701", None),
        ("\u00b2", None),  # isdigit() but not int()
        ("", None),
    ],
)
def test_webhook_verify_refuses_odd_headers_without_raising(
    timestamp: str, signature: str | None
) -> None:
    body, secret = b"{}", b"s3cret"
    good = sign(secret, "1764092701", body)
    assert not verify(secret, timestamp, body, signature or good, now=1764092701)


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


def test_notices_are_redelivered_over_minutes_not_seconds() -> None:
    """A Slack outage of a few minutes must not dead-letter a rollback notice."""
    policy = RetryPolicy()
    delays = [policy.redelivery_delay(n) for n in (1, 2, 3, 4, 5)]
    assert delays == [30.0, 120.0, 480.0, 600.0, 600.0]
    assert sum(delays[:4]) > 20 * 60  # PREFLIGHT_MAX_DELIVER=5: four waits before the last
    # the other services keep the short schedule
    assert [default_retry_delay(n) for n in (1, 2, 3, 7, 8)] == [0.5, 1.0, 2.0, 30.0, 30.0]


def test_channel_keys_are_kv_safe_and_distinct() -> None:
    keys = {channel_key("slack", c) for c in ("#ml-deploys", "ml-deploys", "#ml deploys")}
    assert len(keys) == 3
    assert all(k.replace("-", "").replace("_", "").isalnum() for k in keys)
    assert describe_url("https://hooks.example.com:8443/T0/B0/secret?x=1") == (
        "https://hooks.example.com:8443/…"
    )
    assert describe_url("http://host:port/secret") == "<unparseable URL>"


SECRET_URL = "https://hooks.example.com/services/T0ABC/B0DEF/s3cr3tPath?token=t0k3n"


def test_url_keys_hold_the_host_and_a_hash_never_the_path() -> None:
    key = url_key("webhook", SECRET_URL)
    assert key.startswith("webhook-hooks_example_com-")
    for secret in ("s3cr3t", "T0ABC", "B0DEF", "t0k3n", "services"):
        assert secret not in key
    other = url_key("webhook", SECRET_URL.replace("s3cr3tPath", "another"))
    assert other != key and other.startswith("webhook-hooks_example_com-")
    assert key.replace("-", "").replace("_", "").isalnum()
    assert url_key("webhook", "not a url at all/secret").startswith("webhook-")
    assert "secret" not in url_key("webhook", "not a url at all/secret")
    channel = WebhookChannel(SECRET_URL, session=_no_session, retry=RetryPolicy())
    assert channel.key == key


def test_redact_url_removes_the_url_in_any_form() -> None:
    text = f"Cannot connect to {SECRET_URL} (path /services/T0ABC/B0DEF/s3cr3tPath, token=t0k3n)"
    redacted = redact_url(text, SECRET_URL, "<hook>")
    assert "s3cr3t" not in redacted and "t0k3n" not in redacted and "<hook>" in redacted


def _no_session() -> aiohttp.ClientSession:
    raise AssertionError("no request may be made")


class _RaisingSession:
    """Stands for `aiohttp.ClientSession`: `post` raises what aiohttp raises for a bad URL."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc
        self.posts = 0

    def post(self, *args: Any, **kwargs: Any) -> Any:
        self.posts += 1
        raise self.exc


@pytest.mark.parametrize(
    "url",
    [
        "ftp://files.example.com/s3cr3tPath",
        "file:///etc/s3cr3tPath",
        "https:///s3cr3tPath",
        "http://hooks.example.com:notaport/s3cr3tPath",
    ],
)
async def test_a_webhook_url_that_is_not_http_is_a_permanent_failure(url: str) -> None:
    channel = WebhookChannel(url, session=_no_session, retry=RetryPolicy())
    with pytest.raises(DeliveryError) as caught:
        await channel.post(make_notice(CASES["rolled_back_error_rate"]))
    assert caught.value.permanent
    assert "s3cr3t" not in str(caught.value) and "s3cr3t" not in caught.value.channel


async def test_aiohttp_invalid_url_is_a_permanent_failure_not_retried() -> None:
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    session = _RaisingSession(aiohttp.InvalidURL(SECRET_URL))
    channel = WebhookChannel(
        SECRET_URL,
        session=lambda: cast(aiohttp.ClientSession, session),
        retry=RetryPolicy(sleep=sleep),
    )
    with pytest.raises(DeliveryError) as caught:
        await channel.post(make_notice(CASES["rolled_back_error_rate"]))
    assert caught.value.permanent and session.posts == 1 and waits == []
    assert "s3cr3t" not in str(caught.value) and "t0k3n" not in str(caught.value)


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
        request_webhook_prefixes="https://hooks.example.com/, https://mine.example.com/",
    )
    assert targets.webhook_urls == ("https://mine.example.com/h", "https://ops.example.com/hook")
    assert targets.wants("blocked") and not targets.wants("promoted")
    assert not targets.wants("progress")


@pytest.mark.parametrize(
    ("url", "prefixes"),
    [
        ("http://127.0.0.1:8471/api/anything", None),  # no prefixes: no request webhooks
        ("http://169.254.169.254/latest/meta-data/", "https://hooks.example.com/"),
        ("https://hooks.example.com.evil.test/x", "https://hooks.example.com/"),
        ("https://hooks.example.com.evil.test/x", "https://hooks.example.com"),
    ],
)
def test_a_request_s_own_webhook_goes_only_under_an_operator_s_prefix(
    url: str, prefixes: str | None
) -> None:
    """The notifier signs what it posts: a request could make it post anywhere (F4)."""
    targets = resolve_targets(
        CASES["blocked"],
        request(webhook_url=url),
        POLICY,
        default_channel=None,
        default_webhook="https://ops.example.com/hook",
        request_webhook_prefixes=prefixes,
    )
    assert targets.webhook_urls == ("https://ops.example.com/hook",)


def test_a_broken_policy_override_still_notifies() -> None:
    broken = request().model_copy(update={"policy_overrides": {"canary": {"steps": "nope"}}})
    targets = resolve_targets(
        CASES["blocked"], broken, POLICY, default_channel=None, default_webhook=None
    )
    assert targets.slack_channel == "#search-deploys"


# ---- delivery: locks, ranks and the ledger, with fakes -----------------------------------------


@dataclass
class FakeChannel:
    """A channel that records what it was asked; `fail_posts`/`fail_updates` raise that many."""

    key: str = "fake-a"
    updatable: bool = True
    posts: list[str] = field(default_factory=list)
    updates: list[str] = field(default_factory=list)
    fail_updates: int = 0
    fail_posts: int = 0
    crash_after_post: int = 0
    findable: bool = True
    ts: int = 0
    keys: dict[str, Receipt] = field(default_factory=dict)
    lookups: list[datetime] = field(default_factory=list)

    async def post(self, notice: Notice, *, progress: bool = False, key: str = "") -> Receipt:
        await asyncio.sleep(0)  # let concurrent deliveries interleave, as real I/O does
        if self.fail_posts:
            self.fail_posts -= 1
            raise DeliveryError(self.key, "Slack chat.postMessage: HTTP 503", permanent=False)
        self.posts.append((notice.progress if progress else notice.message).text)
        self.ts += 1
        receipt = Receipt(channel="C1", ts=f"1700000000.{self.ts:06d}")
        self.keys[key] = receipt
        if self.crash_after_post:
            self.crash_after_post -= 1
            raise Crash  # the process dies with Slack's answer in hand, before the ledger write
        return receipt

    async def update(self, receipt: Receipt, notice: Notice, *, key: str = "") -> Receipt:
        await asyncio.sleep(0)
        if self.fail_updates:
            self.fail_updates -= 1
            raise DeliveryError(self.key, "Slack chat.update: HTTP 503", permanent=False)
        self.updates.append(notice.progress.text)
        return receipt

    async def find(self, key: str, *, since: datetime) -> Receipt | None:
        self.lookups.append(since)
        if not self.findable:
            raise CannotTell("not searchable")
        return self.keys.get(key)


class Crash(BaseException):
    """Stands for SIGKILL: nothing after it runs (not an `Exception`, so nothing catches it)."""


class BrokenWrites(MemoryLedger):
    """A ledger whose writes after the send fail (the KV store became unreachable)."""

    async def put(self, key: str, value: dict[str, Any]) -> None:
        if value.get("status") == "sent":
            raise TimeoutError("nats: timeout")
        await super().put(key, value)


class OneConflict(MemoryLedger):
    """Another instance writes the progress record once, between our read and our write."""

    conflicted: bool = False

    async def update(self, key: str, value: dict[str, Any], revision: int) -> bool:
        if not self.conflicted and self.entries[key].get("status") != "posting":
            self.conflicted = True
            await self.put(key, {**self.entries[key], "at": "another instance"})
        return await super().update(key, value, revision)


def step(index: int, minutes: float = 0) -> CanaryStepStarted:
    return CanaryStepStarted(
        **IDS,
        occurred_at=AT + timedelta(minutes=minutes),
        step_index=index,
        weight=5,
        duration_s=60,
    )


def deliverer(ledger: MemoryLedger | None = None) -> Deliverer:
    return Deliverer(ledger if ledger is not None else MemoryLedger(), clock=lambda: AT)


async def test_one_rollout_s_events_delivered_at_once_keep_one_progress_message() -> None:
    """A fetched backlog is handled concurrently: the lock per deployment serialises it."""
    channel, target = FakeChannel(), deliverer()
    events: list[NoticeEvent] = [step(0), step(1, 2), CASES["rolled_back_error_rate"]]
    await asyncio.gather(*(target.deliver(make_notice(e), [channel]) for e in events))
    progress_posts = [p for p in channel.posts if p.startswith("Canary")]
    assert len(progress_posts) == 1
    assert len(target.locks) == 0  # nothing kept once nothing is in flight
    record = await target.ledger.get(progress_key(IDS["deployment_id"], channel.key))
    assert record is not None and record["rank"][0] == messages.FINAL_RANK


async def test_a_step_handled_after_the_outcome_posts_no_live_looking_message() -> None:
    channel, target = FakeChannel(), deliverer()
    await target.deliver(make_notice(CASES["rolled_back_error_rate"]), [channel])
    await target.deliver(make_notice(step(0)), [channel])
    assert [p.split(":")[0] for p in channel.posts] == ["Rolled back"]
    assert channel.updates == []


async def test_a_progress_record_written_meanwhile_is_read_again() -> None:
    ledger = OneConflict()
    channel, target = FakeChannel(), deliverer(ledger)
    await target.deliver(make_notice(step(0)), [channel])
    await target.deliver(make_notice(step(1, 2)), [channel])
    assert len(channel.updates) == 2  # edited, lost the write, read again, edited again
    record = ledger.entries[progress_key(IDS["deployment_id"], channel.key)]
    assert record["rank"][0] == 1.0 and record["at"] != "another instance"


async def test_an_older_progress_record_s_numeric_rank_still_orders() -> None:
    ledger = MemoryLedger()
    key = progress_key(IDS["deployment_id"], "fake-a")
    await ledger.put(key, {"channel": "C1", "ts": "1.1", "rank": 1.5})  # held at step 1, before
    channel, target = FakeChannel(), deliverer(ledger)
    await target.deliver(make_notice(step(0, 9)), [channel])
    assert channel.updates == []  # step 1 is behind step 2's hold
    await target.deliver(make_notice(step(1, 9)), [channel])  # step 2 started again
    assert len(channel.updates) == 1


async def test_a_failed_edit_of_the_final_outcome_fails_the_delivery_after_the_post() -> None:
    channel, target = FakeChannel(), deliverer()
    await target.deliver(make_notice(step(0)), [channel])
    channel.fail_updates = 1
    outcome = make_notice(CASES["rolled_back_error_rate"])
    report = await target.deliver(outcome, [channel])
    assert [f.permanent for f in report.failed] == [False]
    assert channel.posts[-1].startswith("Rolled back")  # the notice went out first
    again = await target.deliver(outcome, [channel])  # the redelivery: only the edit
    assert again.failed == [] and again.skipped == [channel.key]
    assert sum(p.startswith("Rolled back") for p in channel.posts) == 1
    assert channel.updates[-1].endswith("rolled back: error rate 4.2% above the 1% limit")


async def test_degraded_leaves_the_progress_message_alone() -> None:
    channel, target = FakeChannel(), deliverer()
    await target.deliver(make_notice(step(0)), [channel])
    await target.deliver(make_notice(CASES["degraded"]), [channel])
    await target.deliver(make_notice(step(1, 2)), [channel])
    assert channel.posts[1].startswith("Degraded")
    assert len(channel.updates) == 1 and "step 2" in channel.updates[0]


async def test_a_ledger_that_fails_after_a_send_does_not_stop_the_other_channels() -> None:
    first, second = FakeChannel(key="fake-a"), FakeChannel(key="fake-b")
    report = await deliverer(BrokenWrites()).deliver(
        make_notice(CASES["blocked"]), [first, second], progress=False
    )
    assert report.sent == ["fake-a", "fake-b"] and report.failed == []
    assert len(first.posts) == len(second.posts) == 1


# ---- the progress edit says why in words (issue #13) -------------------------------------------


@pytest.mark.parametrize(
    ("update", "words"),
    [
        ({}, "error rate 4.2% above the 1% limit"),
        ({"threshold": None}, "error rate above the limit"),
        ({"canary": None}, "error rate above the limit"),
        (
            {"trigger": "latency", "threshold": 0.2},
            "p95 latency 312 ms, 73.3% above stable's 180 ms",
        ),
        ({"trigger": "latency", "stable": None}, "p95 latency rose more than allowed"),
        ({"trigger": "manual"}, "aborted by a person"),
        ({"trigger": "superseded"}, "replaced by a newer version"),
        ({"trigger": "inconclusive"}, "could not be judged, and nobody promoted it"),
    ],
)
def test_the_progress_edit_of_a_rollback_says_why_in_words(
    update: dict[str, Any], words: str
) -> None:
    event = CASES["rolled_back_error_rate"].model_copy(update=update)
    assert isinstance(event, DeploymentRolledBack)
    progress = messages.render_progress(event)
    assert words in progress.text and words in progress.blocks[0]["text"]["text"]
    assert "_" not in messages.rollback_reason(event)  # no codes such as error_rate


# ---- metrics links Slack cannot take (issue #13) ------------------------------------------------


def _link_texts(message: messages.SlackMessage) -> list[str]:
    return [
        e["text"]
        for b in message.blocks
        if b["type"] == "context"
        for e in b["elements"]
        if "metrics" in e["text"]
    ]


def _buttons(message: messages.SlackMessage) -> list[str]:
    return [e["url"] for b in message.blocks if b["type"] == "actions" for e in b["elements"]]


def _valid_for_slack(message: messages.SlackMessage) -> None:
    for block in message.blocks:
        texts = [block["text"]["text"]] if "text" in block else []
        texts += [e["text"] for e in block.get("elements", []) if isinstance(e.get("text"), str)]
        for text in texts:
            assert len(text) <= messages.TEXT_MAX
            assert text.count("<") == text.count(">")  # every link's markup is whole
    assert all(len(url) <= messages.URL_MAX for url in _buttons(message))
    assert len(message.text) <= messages.FALLBACK_MAX


@pytest.mark.parametrize("length", [500, 2_900, 2_990, 3_000, 3_001, 20_000])
def test_a_metrics_url_of_any_length_leaves_a_valid_message(length: int) -> None:
    base = "https://grafana.example.com/d/preflight?var-deployment=d-1&from=0&panel="
    url = base + "x" * (length - len(base))
    event = CASES["rolled_back_error_rate"].model_copy(update={"metrics_url": url})
    for message in (messages.render(event), messages.render_progress(event)):
        _valid_for_slack(message)
        [text] = _link_texts(message)
        if f"<{url}|" in text:
            assert not _buttons(message) or _buttons(message) == [url]
        else:  # not linked: said so, and where to find it
            assert f"the metrics link is {length:,} characters" in text
            assert f"preflight status {IDS['deployment_id']}" in text
            assert _buttons(message) == []
    # The notification text names a long link without it (it would be cut, and push out the rest).
    assert url not in messages.render(event).text


def test_a_metrics_url_too_long_for_slack_links_the_rollout_page_instead() -> None:
    url = "https://grafana.example.com/d/x?" + "var-x=1&" * 1000
    page = "https://preflight.example.com/rollouts/d-20261125T174501-3f9a1c"
    event = CASES["rolled_back_error_rate"].model_copy(update={"metrics_url": url})
    message = messages.render(event, rollout_url=page)
    _valid_for_slack(message)
    assert _buttons(message) == [page]
    [text] = _link_texts(message)
    assert text.startswith(f"metrics: <{page}|rollout page> (the metrics link is 8,032 characters")
    assert url not in message.text and "linked in the message" in message.text


def test_a_short_metrics_url_is_linked_as_before_and_its_markup_cannot_break() -> None:
    url = "https://grafana.example.com/d/a|b>c?q=<x> y"
    event = CASES["rolled_back_error_rate"].model_copy(update={"metrics_url": url})
    message = messages.render(event)
    _valid_for_slack(message)
    [button] = _buttons(message)
    assert button == "https://grafana.example.com/d/a%7Cb%3Ec?q=%3Cx%3E%20y"
    [text] = _link_texts(message)
    assert text == f"metrics: <{button}|{messages.escape(url)}>"


# ---- a notice is posted once, even across a crash after Slack's answer (issue #13) ------------


async def crash_then_redeliver(target: Deliverer, channel: FakeChannel, notice: Notice) -> None:
    channel.crash_after_post = 1
    with pytest.raises(Crash):
        await target.deliver(notice, [channel])
    # A restarted notifier: a fresh Deliverer on the same ledger (in-process state is gone).
    await Deliverer(target.ledger, clock=target.clock).deliver(notice, [channel])


async def test_a_notice_posted_right_before_a_crash_is_found_not_posted_again() -> None:
    channel, target = FakeChannel(), deliverer()
    notice = make_notice(CASES["rolled_back_error_rate"])
    await crash_then_redeliver(target, channel, notice)
    assert [p.split(":")[0] for p in channel.posts] == ["Rolled back"]
    assert channel.lookups == [AT - timedelta(minutes=5)]  # from the intent, with a margin
    key = sent_key(IDS["deployment_id"], "rolled_back", None, channel.key)
    record = await target.ledger.get(key)
    assert record is not None and record["status"] == "sent" and record["ts"]
    await target.deliver(notice, [channel])  # later copies: the ledger answers, no lookup
    assert len(channel.posts) == 1 and len(channel.lookups) == 1


async def test_a_notice_whose_post_failed_is_looked_for_then_posted_once() -> None:
    channel, target = FakeChannel(fail_posts=1), deliverer()
    notice = make_notice(CASES["blocked"])
    first = await target.deliver(notice, [channel], progress=False)
    assert [f.permanent for f in first.failed] == [False] and channel.posts == []
    again = await target.deliver(notice, [channel], progress=False)
    assert again.sent == [channel.key] and len(channel.posts) == 1
    assert len(channel.lookups) == 1


async def test_a_channel_that_cannot_be_searched_gets_the_notice_again() -> None:
    """At-least-once where nobody can tell: a webhook drops the repeat by its notice id."""
    channel, target = FakeChannel(findable=False), deliverer()
    await crash_then_redeliver(target, channel, make_notice(CASES["rolled_back_error_rate"]))
    assert sum(p.startswith("Rolled back") for p in channel.posts) == 2


async def test_a_progress_message_posted_right_before_a_crash_is_found_and_edited() -> None:
    channel, target = FakeChannel(), deliverer()
    await crash_then_redeliver(target, channel, make_notice(step(0)))
    assert len(channel.posts) == 1
    key = progress_key(IDS["deployment_id"], channel.key)
    record = await target.ledger.get(key)
    assert record is not None and record.get("status") is None and record["ts"]
    assert record["rank"][0] == 0.0
    await target.deliver(make_notice(step(1, 2)), [channel])
    await target.deliver(make_notice(CASES["rolled_back_error_rate"]), [channel])
    assert [p.split(":")[0] for p in channel.posts] == [
        "Canary org/chat-7b.v2 2024-06-02 (d-20261125T174501-3f9a1c)",
        "Rolled back",
    ]
    assert len(channel.updates) == 3  # the redelivered step 1 (same text), step 2, the outcome


async def test_the_outcome_finds_the_progress_message_of_a_step_that_crashed() -> None:
    """The step's redelivery has not come yet when the outcome is handled."""
    channel, target = FakeChannel(crash_after_post=1), deliverer()
    with pytest.raises(Crash):
        await target.deliver(make_notice(step(0)), [channel])
    restarted = Deliverer(target.ledger, clock=target.clock)
    await restarted.deliver(make_notice(CASES["rolled_back_error_rate"]), [channel])
    await restarted.deliver(make_notice(step(0)), [channel])  # the redelivery, late
    assert sum(p.startswith("Canary") for p in channel.posts) == 1
    assert channel.updates[-1].endswith("rolled back: error rate 4.2% above the 1% limit")


async def test_another_step_waits_for_a_fresh_progress_intent_and_the_outcome_retries() -> None:
    """Another instance wrote the intent and is posting now: nobody posts a second message."""
    ledger = MemoryLedger()
    key = progress_key(IDS["deployment_id"], "fake-a")
    intent = {"status": "posting", "notice": "elsewhere", "at": AT.isoformat(), "rank": [0, ""]}
    await ledger.put(key, intent)
    channel, target = FakeChannel(), deliverer(ledger)
    assert (await target.deliver(make_notice(step(1, 2)), [channel])).failed == []
    report = await target.deliver(make_notice(CASES["rolled_back_error_rate"]), [channel])
    assert [f.permanent for f in report.failed] == [False]  # redelivered: the edit comes later
    assert not any(p.startswith("Canary") for p in channel.posts)


async def test_a_stale_or_abandoned_progress_intent_is_taken_over_after_a_lookup() -> None:
    ledger = MemoryLedger()
    key = progress_key(IDS["deployment_id"], "fake-a")
    old = (AT - timedelta(minutes=11)).isoformat()
    await ledger.put(key, {"status": "posting", "notice": "gone", "at": old, "rank": [0, ""]})
    channel, target = FakeChannel(), deliverer(ledger)
    await target.deliver(make_notice(step(1, 2)), [channel])
    assert len(channel.posts) == 1 and len(channel.lookups) == 1
    record = ledger.entries[key]
    assert record["rank"][0] == 1.0 and record["ts"] and "status" not in record


async def test_a_step_whose_progress_post_failed_lets_the_next_step_post() -> None:
    """A failed step is dead-lettered, not redelivered: its intent must not block the rollout."""
    channel, target = FakeChannel(fail_posts=1), deliverer()
    first = await target.deliver(make_notice(step(0)), [channel])
    assert [f.permanent for f in first.failed] == [False]
    await target.deliver(make_notice(step(1, 2)), [channel])
    assert [p.split(": ")[1] for p in channel.posts] == ["step 2 at 5% of traffic (for 60 s)"]
    assert len(channel.lookups) == 1  # looked first: a timed-out post may have been taken
