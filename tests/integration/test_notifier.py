"""The notifier service on a real nats-server, delivering to a local Slack-shaped server.

slack-sdk is pointed at `tests/slack_api.py` with `base_url`; retry waits go through an injected
sleep that records them (no test waits out a Retry-After).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from faststream.nats import TestApp
from nats.js import JetStreamContext
from pydantic import SecretStr

from services.contracts import subjects
from services.contracts.events import (
    CanaryStepStarted,
    CheckResult,
    DeadLetter,
    DeploymentBlocked,
    DeploymentDegraded,
    DeploymentFailed,
    DeploymentHeld,
    DeploymentPromoted,
    DeploymentRequested,
    DeploymentRolledBack,
    Event,
    NotifyTarget,
    Requester,
    RoleMeasurement,
    Status,
)
from services.notifier.app import build
from services.notifier.channels.base import channel_key
from services.notifier.channels.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from services.notifier.dedup import progress_key, sent_key
from services.notifier.retry import RetryPolicy
from services.runtime import bus
from services.runtime.service import ServiceApp
from services.runtime.settings import Settings
from tests.dead_letters import dead_letters
from tests.slack_api import TOKEN, SlackApi

pytestmark = pytest.mark.integration

MODEL = "org/chat-7b.v2"
URL = "http://grafana.local/d/preflight?var-deployment={id}"
ALICE = Requester(user="alice", system="ci", team="search")
CANARY = RoleMeasurement(requests=500, errors=21, error_rate=0.042, p95_ms=312)
STABLE = RoleMeasurement(requests=4812, errors=14, error_rate=0.0029, p95_ms=180)


class Waits:
    """The retry policy's sleep: records what it was asked to wait, waits nothing."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.seconds.append(seconds)
        await asyncio.sleep(0)


def ids(n: int) -> dict[str, str]:
    return {"deployment_id": f"d-notify-{n}", "model": MODEL, "version": f"v{n}"}


def every_outcome() -> list[Event]:
    at = datetime(2026, 11, 25, 17, 45, tzinfo=UTC)
    perplexity = CheckResult(
        name="perplexity", status=Status.FAILED, value=0.081, threshold=0.05, unit="relative"
    )
    common: dict[str, Any] = {"requested_by": ALICE}
    return [
        DeploymentBlocked(**ids(1), stage="validation", reasons=("checksum: differs",), **common),
        DeploymentDegraded(**ids(2), failed_checks=(perplexity,), **common),
        DeploymentPromoted(
            **ids(3),
            steps_completed=2,
            canary=CANARY,
            stable=STABLE,
            metrics_url=URL.format(id="d-notify-3"),
            **common,
        ),
        DeploymentRolledBack(
            **ids(4),
            trigger="error_rate",
            step_index=0,
            canary=CANARY,
            stable=STABLE,
            threshold=0.01,
            window_start=at - timedelta(seconds=60),
            window_end=at,
            metrics_url=URL.format(id="d-notify-4"),
            **common,
        ),
        DeploymentHeld(
            **ids(5),
            step_index=0,
            weight=5,
            deadline=at + timedelta(minutes=30),
            metrics_url=URL.format(id="d-notify-5"),
            **common,
        ),
        DeploymentFailed(**ids(6), stage="benchmarker", error="disk full", **common),
    ]


def rolled_back(n: int = 7) -> DeploymentRolledBack:
    return DeploymentRolledBack(
        **ids(n),
        trigger="error_rate",
        canary=CANARY,
        stable=STABLE,
        threshold=0.01,
        metrics_url=URL.format(id=f"d-notify-{n}"),
        requested_by=ALICE,
    )


@pytest.fixture
async def slack() -> AsyncIterator[SlackApi]:
    async with SlackApi() as server:
        yield server


@pytest.fixture
def waits() -> Waits:
    return Waits()


@pytest.fixture
def slack_settings(settings: Settings, slack: SlackApi) -> Settings:
    return settings.model_copy(
        update={
            "slack_token": SecretStr(TOKEN),
            "slack_base_url": slack.base_url,
            "slack_channel": "#deploys",
            "slack_max_attempts": 3,
        }
    )


def notifier(
    settings: Settings, waits: Waits, *, redelivery_s: float = 0.05, **extra: Any
) -> ServiceApp:
    """The service with retry waits skipped and redeliveries after `redelivery_s` (the real
    schedule waits minutes: tests/unit/test_notifier_messages.py checks it)."""
    retry = RetryPolicy(
        max_attempts=settings.slack_max_attempts,
        backoff_s=0.01,
        sleep=waits,
        redelivery_s=redelivery_s,
        max_redelivery_s=redelivery_s,
    )
    return build(settings, retry=retry, **extra)


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for something the service does (polling the fake server's record)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out waiting for the notifier")
        await asyncio.sleep(0.02)


async def drained(js: JetStreamContext, last_seq: int, timeout: float = 10.0) -> None:
    """The notifier acked everything up to stream sequence `last_seq` (so nothing more comes)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        info = await js.consumer_info(subjects.EVENTS_STREAM, subjects.NOTIFIER_DURABLE)
        if (
            info.num_pending == 0
            and info.num_ack_pending == 0
            and info.ack_floor is not None
            and (info.ack_floor.stream_seq or 0) >= last_seq
        ):
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"notifier did not drain: {info}")
        await asyncio.sleep(0.02)


async def publish_all(js: JetStreamContext, *events: Event, nonce: str | None = None) -> int:
    seq = 0
    for event in events:
        seq = (await bus.publish_event(js, event, nonce)).seq
    return seq


async def test_every_outcome_reaches_slack_exactly_once_with_numbers_and_link(
    js: JetStreamContext, slack_settings: Settings, slack: SlackApi, waits: Waits
) -> None:
    outcomes = every_outcome()
    request = DeploymentRequested(
        **ids(4), location="/m", requested_by=ALICE, notify=NotifyTarget(slack_channel="#team-a")
    )
    await bus.publish_event(js, request)
    async with TestApp(notifier(slack_settings, waits).app):
        last = await publish_all(js, *outcomes)
        await drained(js, last)
    posts = slack.calls_to("chat.postMessage")
    assert len(posts) == len(outcomes) == len(slack.calls)
    by_version = {re.findall(r" (v\d) \(d-notify-", p.json["text"])[0]: p for p in posts}
    assert set(by_version) == {e.version for e in outcomes}
    for post in posts:
        assert post.headers["Authorization"] == f"Bearer {TOKEN}"
        assert "alice via ci" in post.json["text"]
        assert post.json["blocks"][0]["type"] == "header"
    assert by_version["v4"].json["channel"] == "#team-a"  # the request's channel wins
    assert {p.json["channel"] for v, p in by_version.items() if v != "v4"} == {"#deploys"}
    rolled = json.dumps(by_version["v4"].json["blocks"])
    assert "error rate 4.2% &gt; 1%" in rolled and "21/500" in rolled
    assert URL.format(id="d-notify-4") in rolled
    assert "perplexity +8.1% &gt; +5%" in json.dumps(by_version["v2"].json["blocks"])
    assert "preflight promote d-notify-5" in by_version["v5"].json["text"]
    assert waits.seconds == []


async def test_a_redelivered_outcome_is_not_posted_twice(
    js: JetStreamContext, slack_settings: Settings, slack: SlackApi, waits: Waits
) -> None:
    receiver = slack.receiver_url("ops")
    settings = slack_settings.model_copy(
        update={"webhook_url": receiver, "webhook_secret": SecretStr("hmac-key")}
    )
    # Slack takes the notice; the webhook fails every in-process attempt of the first delivery,
    # so the handler raises, JetStream redelivers, and only the webhook is tried again.
    slack.fail("webhook/ops", status=503, times=settings.slack_max_attempts)
    event = rolled_back()
    async with TestApp(notifier(settings, waits).app):
        last = await publish_all(js, event)
        await until(lambda: len(slack.calls_to("webhook/ops")) == 1)
        await drained(js, last)
        again = await publish_all(js, event, nonce="replayed")  # a second copy in the stream
        await drained(js, again)
    assert len(slack.calls_to("chat.postMessage")) == 1
    assert len(slack.calls_to("webhook/ops", ok=False)) == settings.slack_max_attempts + 1
    [delivered] = slack.calls_to("webhook/ops")
    assert json.loads(delivered.body)["deployment_id"] == event.deployment_id
    headers = delivered.headers
    assert headers["X-Preflight-Notice-Id"] == "d-notify-7:rolled_back"
    now = datetime.now(UTC).timestamp()
    assert verify(
        b"hmac-key", headers[TIMESTAMP_HEADER], delivered.body, headers[SIGNATURE_HEADER], now
    )
    kv = await js.key_value(subjects.NOTICES_BUCKET)
    keys = [k for k in await kv.keys() if ".sent.rolled_back." in k]
    assert len(keys) == 2  # one record per channel


async def test_429_with_retry_after_then_success(
    js: JetStreamContext, slack_settings: Settings, slack: SlackApi, waits: Waits
) -> None:
    slack.fail("chat.postMessage", status=429, retry_after="2")
    async with TestApp(notifier(slack_settings, waits).app):
        await drained(js, await publish_all(js, rolled_back()))
    assert [c.status for c in slack.calls] == [429, 200]
    assert waits.seconds == [2.0]  # Retry-After honoured, through the injected sleep


async def test_500s_then_success(
    js: JetStreamContext, slack_settings: Settings, slack: SlackApi, waits: Waits
) -> None:
    slack.fail("chat.postMessage", status=500, times=1)
    slack.fail("chat.postMessage", status=502, times=1)
    async with TestApp(notifier(slack_settings, waits).app):
        await drained(js, await publish_all(js, rolled_back()))
    assert [c.status for c in slack.calls] == [500, 502, 200]
    assert waits.seconds == [0.01, 0.02]  # exponential backoff


async def test_a_notice_that_keeps_failing_goes_to_the_dead_letters(
    js: JetStreamContext, slack_settings: Settings, slack: SlackApi, waits: Waits
) -> None:
    slack.fail("chat.postMessage", status=500, times=1000)
    async with TestApp(notifier(slack_settings, waits).app):
        await publish_all(js, rolled_back())
        every_attempt = 3 * slack_settings.max_deliver
        await until(
            lambda: len(slack.calls_to("chat.postMessage", ok=False)) == every_attempt, timeout=20
        )
        letters: list[DeadLetter] = []
        while not letters:
            letters = await dead_letters(js)
            await asyncio.sleep(0.05)
    [letter] = letters
    assert letter.service == "notifier"
    assert letter.subject == subjects.outcome(MODEL, "d-notify-7", "rolled_back")
    assert "HTTP 500" in letter.reason and f"attempt {slack_settings.max_deliver}" in letter.reason
    original = DeploymentRolledBack.model_validate_json(letter.payload_text or "")
    assert original.deployment_id == "d-notify-7" and original.metrics_url
    assert slack.calls_to("chat.postMessage") == []


async def test_a_channel_that_does_not_exist_is_dead_lettered_at_once(
    js: JetStreamContext, slack_settings: Settings, slack: SlackApi, waits: Waits
) -> None:
    settings = slack_settings.model_copy(update={"slack_channel": "#missing-channel"})
    async with TestApp(notifier(settings, waits).app):
        last = await publish_all(js, rolled_back())
        await drained(js, last)
        again = await publish_all(js, rolled_back(), nonce="replayed")
        await drained(js, again)
    assert len(slack.calls) == 1  # permanent: no retries, and not tried again on a replay
    [letter] = await dead_letters(js)
    assert "channel_not_found" in letter.reason


async def test_rollout_progress_is_one_message_updated_in_place(
    js: JetStreamContext, slack_settings: Settings, slack: SlackApi, waits: Waits
) -> None:
    step = {**ids(8), "duration_s": 60}
    events: list[Event] = [
        DeploymentRequested(**ids(8), location="/m", requested_by=ALICE),
        CanaryStepStarted(**step, step_index=0, weight=5),
        CanaryStepStarted(**step, step_index=1, weight=50),
        rolled_back(8),
    ]
    async with TestApp(notifier(slack_settings, waits).app):
        # One at a time, as a rollout's steps come minutes apart: a step that lands while the
        # first post is still in flight is left to the next state, by design (delivery.py), so
        # a burst would make the number of edits depend on the machine's load.
        for burst in (events[:2], events[2:3], events[3:]):  # the request is not its to ack
            last = await publish_all(js, *burst)
            await drained(js, last)
        # A late copy of step 1 must not roll the finished message back.
        stale = await publish_all(js, events[1], nonce="late")
        await drained(js, stale)
    posts = slack.calls_to("chat.postMessage")
    updates = slack.calls_to("chat.update")
    assert [p.json["text"].split(":")[0] for p in posts] == [
        "Canary org/chat-7b.v2 v8 (d-notify-8)",
        "Rolled back",
    ]
    assert "step 1 at 5%" in posts[0].json["text"] and "alice via ci" in json.dumps(posts[0].json)
    assert len(updates) == 2
    progress, rolled = slack.messages_in("#deploys")  # no third message
    assert {(u.json["channel"], u.json["ts"]) for u in updates} == {("C0DEPLOYS", progress["ts"])}
    assert progress["text"] == updates[1].json["text"] and rolled["text"].startswith("Rolled back")
    assert "step 2 at 50%" in updates[0].json["text"]
    assert "rolled back: error rate 4.2% above the 1% limit" in updates[1].json["text"]
    assert "preflight promote" not in json.dumps(updates[1].json["blocks"])


async def test_the_token_and_webhook_url_are_never_logged(
    js: JetStreamContext,
    slack_settings: Settings,
    slack: SlackApi,
    waits: Waits,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    slack.fail("chat.postMessage", status=429, retry_after="1")
    slack.fail("incoming-webhook", status=500, times=10)
    settings = slack_settings.model_copy(update={"webhook_url": slack.webhook_url})
    async with TestApp(notifier(settings, waits).app):
        await publish_all(js, rolled_back())
        await until(lambda: len(slack.calls) >= 3)
    assert "xoxb" not in caplog.text and TOKEN not in caplog.text
    assert "webhook-secret-path" not in caplog.text
    assert "notices go to Slack (bot token, default channel #deploys)" in caplog.text


async def test_an_incoming_webhook_posts_notices_and_announces_a_rollout_once(
    js: JetStreamContext, settings: Settings, slack: SlackApi, waits: Waits
) -> None:
    hooked = settings.model_copy(update={"slack_webhook_url": SecretStr(slack.webhook_url)})
    step = {**ids(9), "duration_s": 60}
    async with TestApp(notifier(hooked, waits).app):
        last = await publish_all(
            js,
            CanaryStepStarted(**step, step_index=0, weight=5),
            CanaryStepStarted(**step, step_index=1, weight=50),
            rolled_back(9),
        )
        await drained(js, last)
    texts = [c.json["text"] for c in slack.calls_to("incoming-webhook")]
    assert len(texts) == 2
    assert "step 1 at 5%" in texts[0] and texts[1].startswith("Rolled back")


async def test_without_slack_notices_go_to_the_console_once(
    js: JetStreamContext, settings: Settings, waits: Waits, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="preflight")
    out = io.StringIO()
    async with TestApp(notifier(settings, waits, console=out).app):
        last = await publish_all(js, rolled_back())
        await drained(js, last)
        again = await publish_all(js, rolled_back(), nonce="replayed")
        await drained(js, again)
    assert "notices go to the console (no Slack token or webhook URL configured)" in caplog.text
    printed = out.getvalue()
    assert printed.count("[preflight] ROLLED BACK: org/chat-7b.v2 v7 (d-notify-7)") == 1
    assert "error rate 4.2% > 1%" in printed
    assert "metrics: http://grafana.local/d/preflight?var-deployment=d-notify-7" in printed


async def test_a_failing_progress_notice_is_dead_lettered_and_never_fails_the_deployment(
    js: JetStreamContext, slack_settings: Settings, slack: SlackApi, waits: Waits
) -> None:
    slack.fail("chat.postMessage", status=503, times=1000)
    step = CanaryStepStarted(**ids(10), step_index=0, weight=5, duration_s=60)
    async with TestApp(notifier(slack_settings, waits).app):
        await drained(js, await publish_all(js, step))
    [letter] = await dead_letters(js)
    assert letter.subject == subjects.stage(MODEL, "d-notify-10", "canary_step")
    assert "HTTP 503" in letter.reason
    assert len(slack.calls) == slack_settings.slack_max_attempts  # no redelivery rounds
    failed = await js.stream_info(
        subjects.EVENTS_STREAM, subjects_filter=subjects.outcome(MODEL, "d-notify-10", "failed")
    )
    assert not failed.state.subjects


# ---- regressions from the review of issue #7 ---------------------------------------------------


def texts(calls: list[Any]) -> list[str]:
    return [str(c.json["text"]) for c in calls]


async def test_a_backlog_of_one_rollout_fetched_at_once_keeps_one_progress_message(
    js: JetStreamContext, slack_settings: Settings, slack: SlackApi, waits: Waits
) -> None:
    """The notifier was down: the whole rollout comes in one fetch, handled concurrently."""
    step = {**ids(20), "duration_s": 60}
    last = await publish_all(
        js,
        DeploymentRequested(**ids(20), location="/m", requested_by=ALICE),
        CanaryStepStarted(**step, step_index=0, weight=5),
        CanaryStepStarted(**step, step_index=1, weight=50),
        rolled_back(20),
    )
    async with TestApp(notifier(slack_settings, waits).app):
        await drained(js, last)
    posts = texts(slack.calls_to("chat.postMessage"))
    progress = [t for t in posts if t.startswith("Canary")]
    assert sum(t.startswith("Rolled back") for t in posts) == 1
    # One progress message (or none, had the outcome been handled first), and it is finished.
    assert len(progress) <= 1
    if progress:
        updates = texts(slack.calls_to("chat.update"))
        assert updates and "rolled back: error rate 4.2% above the 1% limit" in updates[-1]


async def test_a_second_hold_at_the_same_step_after_resume_is_announced(
    js: JetStreamContext, slack_settings: Settings, slack: SlackApi, waits: Waits
) -> None:
    at = datetime(2026, 11, 25, 17, 45, tzinfo=UTC)
    settings = slack_settings.model_copy(update={"webhook_url": slack.receiver_url("ops")})
    step = {**ids(21), "duration_s": 60}
    hold = {**ids(21), "step_index": 0, "weight": 5, "requested_by": ALICE}
    async with TestApp(notifier(settings, waits).app):
        for event in (
            CanaryStepStarted(**step, step_index=0, weight=5, occurred_at=at),
            DeploymentHeld(
                **hold, deadline=at + timedelta(minutes=30), occurred_at=at + timedelta(minutes=1)
            ),
            # `preflight resume`: the step starts again, and is held again
            CanaryStepStarted(
                **step, step_index=0, weight=5, occurred_at=at + timedelta(minutes=5)
            ),
            DeploymentHeld(
                **hold, deadline=at + timedelta(minutes=40), occurred_at=at + timedelta(minutes=10)
            ),
        ):
            await drained(js, await publish_all(js, event))
    posts = texts(slack.calls_to("chat.postMessage"))
    assert [t.split(":")[0] for t in posts] == [
        "Canary org/chat-7b.v2 v21 (d-notify-21)",
        "Needs a person",
        "Needs a person",
    ]
    updates = texts(slack.calls_to("chat.update"))
    assert len(updates) == 3
    assert "held" in updates[0] and "step 1 at 5%" in updates[1] and "held" in updates[2]
    notice_ids = [c.headers["X-Preflight-Notice-Id"] for c in slack.calls_to("webhook/ops")]
    assert notice_ids == [
        "d-notify-21:progress:0:20261125T174500.000000",
        "d-notify-21:held:0:20261125T181500.000000",
        "d-notify-21:progress:0:20261125T175000.000000",
        "d-notify-21:held:0:20261125T182500.000000",
    ]


async def test_a_redelivered_degraded_does_not_freeze_the_progress_message(
    js: JetStreamContext, slack_settings: Settings, slack: SlackApi, waits: Waits
) -> None:
    settings = slack_settings.model_copy(update={"webhook_url": slack.receiver_url("ops")})
    # The webhook fails the first delivery of DeploymentDegraded; its redelivery comes after
    # the rollout's first step posted the progress message.
    slack.fail("webhook/ops", status=503, times=settings.slack_max_attempts)
    perplexity = CheckResult(
        name="perplexity", status=Status.FAILED, value=0.081, threshold=0.05, unit="relative"
    )
    step = {**ids(22), "duration_s": 60}
    degraded = DeploymentDegraded(**ids(22), failed_checks=(perplexity,), requested_by=ALICE)
    async with TestApp(notifier(settings, waits, redelivery_s=0.5).app):
        first = await publish_all(js, degraded)
        await until(lambda: len(slack.calls_to("webhook/ops", ok=False)) >= 3)
        await drained(js, await publish_all(js, CanaryStepStarted(**step, step_index=0, weight=5)))
        await drained(js, first)  # the redelivered degraded is done
        await drained(js, await publish_all(js, CanaryStepStarted(**step, step_index=1, weight=50)))
    delivered = [json.loads(c.body)["type"] for c in slack.calls_to("webhook/ops")]
    assert delivered.count("DeploymentDegraded") == 1
    updates = texts(slack.calls_to("chat.update"))
    assert updates and "step 2 at 50%" in updates[-1]
    assert not any("degraded" in t.lower() for t in updates)


async def test_a_failed_edit_of_the_final_outcome_is_retried_by_redelivery(
    js: JetStreamContext, slack_settings: Settings, slack: SlackApi, waits: Waits
) -> None:
    step = {**ids(23), "duration_s": 60}
    async with TestApp(notifier(slack_settings, waits).app):
        await drained(js, await publish_all(js, CanaryStepStarted(**step, step_index=0, weight=5)))
        slack.fail("chat.update", status=503, times=slack_settings.slack_max_attempts)
        await drained(js, await publish_all(js, rolled_back(23)))
    posts = texts(slack.calls_to("chat.postMessage"))
    assert sum(t.startswith("Rolled back") for t in posts) == 1  # the redelivery only edits
    assert len(slack.calls_to("chat.update", ok=False)) == slack_settings.slack_max_attempts + 1
    [update] = texts(slack.calls_to("chat.update"))
    assert "rolled back: error rate 4.2% above the 1% limit" in update
    assert await dead_letters(js) == []


async def test_a_secret_in_a_webhook_path_never_reaches_letters_logs_or_keys(
    js: JetStreamContext,
    slack_settings: Settings,
    slack: SlackApi,
    waits: Waits,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "S3cr3tTok"
    settings = slack_settings.model_copy(update={"webhook_url": slack.receiver_url(secret)})
    slack.fail(f"webhook/{secret}", status=400)
    async with TestApp(notifier(settings, waits).app):
        await drained(js, await publish_all(js, rolled_back(24)))
    [letter] = await dead_letters(js)
    assert "HTTP 400" in letter.reason and "127.0.0.1" in letter.reason
    assert secret not in letter.model_dump_json()
    kv = await js.key_value(subjects.NOTICES_BUCKET)
    keys = await kv.keys()
    assert any(".webhook-127_0_0_1-" in k for k in keys)
    assert not any(secret.lower() in k.lower() for k in keys)
    assert caplog.text and secret not in caplog.text


async def test_a_webhook_url_that_is_not_http_is_dead_lettered_at_once(
    js: JetStreamContext, slack_settings: Settings, slack: SlackApi, waits: Waits
) -> None:
    settings = slack_settings.model_copy(update={"webhook_url": "ftp://ops.example.com/s3cr3t"})
    async with TestApp(notifier(settings, waits).app):
        await drained(js, await publish_all(js, rolled_back(25)))
    [letter] = await dead_letters(js)
    assert "not an http(s) URL" in letter.reason and "s3cr3t" not in letter.reason
    assert letter.delivery_attempt is None  # the handler's own letter, not the last delivery's
    assert len(slack.calls_to("chat.postMessage")) == 1 and waits.seconds == []


async def test_a_notice_that_failed_is_redelivered_after_the_notifier_s_own_delay(
    js: JetStreamContext, slack_settings: Settings, slack: SlackApi, waits: Waits
) -> None:
    loop = asyncio.get_running_loop()
    times: list[float] = []
    slack.listeners.append(lambda call: times.append(loop.time()))
    slack.fail("chat.postMessage", status=503, times=slack_settings.slack_max_attempts)
    async with TestApp(notifier(slack_settings, waits, redelivery_s=1.2).app):
        await drained(js, await publish_all(js, rolled_back(26)))
    attempts = slack_settings.slack_max_attempts
    posts = slack.calls_to("chat.postMessage", ok=False)
    assert [c.status for c in posts] == [503] * attempts + [200]
    # The redelivery looked for the notice first (a 503 may come after Slack took it).
    assert len(slack.calls_to("conversations.history")) == 1
    assert times[attempts] - times[attempts - 1] >= 1.0  # not ServiceApp's default 0.5 s


# ---- a kill between Slack's answer and the ledger write (issue #13) ----------------------------


class NotifierProcess:
    """`preflight service run notifier` as a child process, pointed at the fake Slack."""

    def __init__(self, settings: Settings, slack: SlackApi, log: Path) -> None:
        self.log = log
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PREFLIGHT_")}
        self.env |= {
            "PREFLIGHT_NATS_URL": settings.nats_url,
            "PREFLIGHT_DATA_DIR": str(settings.data_dir),
            "PREFLIGHT_INSTANCE": "notifier-under-test",
            "PREFLIGHT_ACK_WAIT_S": str(settings.ack_wait_s),  # as the consumer was made
            "PREFLIGHT_MAX_DELIVER": str(settings.max_deliver),
            "PREFLIGHT_SLACK_TOKEN": TOKEN,
            "PREFLIGHT_SLACK_BASE_URL": slack.base_url,
            "PREFLIGHT_SLACK_CHANNEL": "#deploys",
            "PYTHONUNBUFFERED": "1",
        }
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> int:
        with self.log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "services.stack.cli", "service", "run", "notifier"],
                env=self.env,
                stdout=out,
                stderr=out,
            )
        self.procs.append(proc)
        return proc.pid

    async def exited(self, timeout: float = 60.0) -> int:
        proc = self.procs[-1]
        deadline = asyncio.get_running_loop().time() + timeout
        while proc.poll() is None:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"the notifier did not die; log:\n{self.tail()}")
            await asyncio.sleep(0.05)
        return proc.returncode

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.fixture
def notifier_process(
    settings: Settings, slack: SlackApi, tmp_path: Path
) -> Iterator[NotifierProcess]:
    process = NotifierProcess(settings, slack, tmp_path / "notifier.log")
    try:
        yield process
    finally:
        process.stop()


async def ledger_record(js: JetStreamContext, key: str) -> dict[str, Any]:
    kv = await js.key_value(subjects.NOTICES_BUCKET)
    entry = await kv.get(key)
    record: dict[str, Any] = json.loads(entry.value or b"{}")
    return record


async def killed_after_slack_answered(
    js: JetStreamContext, slack: SlackApi, notifier_process: NotifierProcess, event: Event
) -> int:
    """Publish `event` to a notifier that Slack kills right after answering its post; then
    start a fresh one and wait until the redelivered event is done. The event's sequence."""
    pid = notifier_process.start()
    slack.kill_after("chat.postMessage", pid)
    last = await publish_all(js, event)
    assert await notifier_process.exited() == -signal.SIGKILL
    assert slack.killed == [pid]
    notifier_process.start()
    try:
        await drained(js, last, timeout=90)
    except AssertionError:
        raise AssertionError(f"not drained; log:\n{notifier_process.tail()}") from None
    return last


@pytest.mark.timeout(240)
async def test_a_notifier_killed_after_slack_answered_does_not_post_again(
    js: JetStreamContext, slack: SlackApi, notifier_process: NotifierProcess
) -> None:
    key = sent_key("d-notify-30", "rolled_back", None, channel_key("slack", "#deploys"))
    await killed_after_slack_answered(js, slack, notifier_process, rolled_back(30))
    [message] = slack.messages_in("#deploys")  # exactly one message in the channel
    assert message["text"].startswith("Rolled back: org/chat-7b.v2 v30 (d-notify-30)")
    assert message["metadata"]["event_payload"]["key"] == key
    assert len(slack.calls_to("chat.postMessage")) == 1
    # The restarted notifier asked Slack rather than posting: it found its message by the key.
    [history] = slack.calls_to("conversations.history")
    assert history.query["include_all_metadata"] == "1" and history.query["channel"] == "C0DEPLOYS"
    record = await ledger_record(js, key)
    assert record["status"] == "sent" and record["ts"] == message["ts"]
    assert await dead_letters(js) == []


@pytest.mark.timeout(240)
async def test_a_progress_message_posted_before_a_kill_is_kept_and_edited(
    js: JetStreamContext, slack: SlackApi, notifier_process: NotifierProcess
) -> None:
    step = {**ids(31), "duration_s": 60}
    await killed_after_slack_answered(
        js, slack, notifier_process, CanaryStepStarted(**step, step_index=0, weight=5)
    )
    last = await publish_all(
        js, CanaryStepStarted(**step, step_index=1, weight=50), rolled_back(31)
    )
    await drained(js, last, timeout=60)
    progress, rolled = slack.messages_in("#deploys")  # one progress message, one notice
    assert progress["text"].endswith("rolled back: error rate 4.2% above the 1% limit")
    assert rolled["text"].startswith("Rolled back")
    key = progress_key("d-notify-31", channel_key("slack", "#deploys"))
    assert progress["metadata"]["event_payload"]["key"] == key
    record = await ledger_record(js, key)
    assert record["ts"] == progress["ts"] and "status" not in record
    assert len(slack.calls_to("conversations.history")) == 1


async def test_slack_finds_a_notice_by_its_key_through_pages_of_history(slack: SlackApi) -> None:
    from services.notifier.channels.base import CannotTell, DeliveryError
    from services.notifier.channels.slack import SlackBotChannel, web_client
    from services.notifier.delivery import make_notice

    retry = RetryPolicy(max_attempts=1, sleep=Waits())
    channel = SlackBotChannel(web_client(SecretStr(TOKEN), slack.base_url, retry), "#busy")
    since = datetime.now(UTC) - timedelta(seconds=1)
    notice = make_notice(rolled_back(40))
    posted = await channel.post(notice, key="d-notify-40.sent.rolled_back.slack-busy")
    for i in range(450):  # the channel moves on: our message is on the third page
        slack._answer("chat.postMessage", {"channel": "#busy", "text": f"chatter {i}"})
    found = await channel.find("d-notify-40.sent.rolled_back.slack-busy", since=since)
    assert found == posted
    assert len(slack.calls_to("conversations.history")) == 3
    assert await channel.find("d-notify-40.sent.other", since=since) is None
    assert (
        await channel.find("d-notify-40.sent.rolled_back.slack-busy", since=datetime.now(UTC))
        is None
    )  # posted before `since`
    # A fresh channel object for the same name asks conversations.list for its id once.
    fresh = SlackBotChannel(channel.client, "#busy")
    assert await fresh.find("d-notify-40.sent.rolled_back.slack-busy", since=since) == posted
    assert len(slack.calls_to("conversations.list")) == 1
    slack.fail("conversations.history", status=200, error="missing_scope")
    with pytest.raises(CannotTell, match="missing_scope"):
        await channel.find("d-notify-40.sent.rolled_back.slack-busy", since=since)
    slack.fail("conversations.history", status=503)
    with pytest.raises(DeliveryError) as caught:
        await channel.find("d-notify-40.sent.rolled_back.slack-busy", since=since)
    assert not caught.value.permanent
