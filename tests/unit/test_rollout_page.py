"""The rollout page: step timeline, series, escaping, 404s and the JSON shape, on fake sources."""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from services.canary_controller.page import (
    StepView,
    bucket_for,
    build_page_app,
    chart_range,
    normalise_series,
    plan_steps,
)
from services.canary_controller.state import Phase, RolloutState
from services.contracts.events import (
    DeploymentRequested,
    Requester,
    RoleMeasurement,
    RouteTarget,
)
from services.contracts.policy import CanaryPolicy, CanaryStep, CanaryThresholds
from services.metrics.queries import MetricsUnavailable

T0 = datetime(2026, 11, 25, 10, 0, 0, tzinfo=UTC)
LATER = T0 + timedelta(seconds=900)
MODEL = "org/chat-7b.v2"
HOSTILE = '<script>alert("x")</script>&"\'</b>'


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def rollout(
    deployment_id: str = "dep-7f3a9c",
    *,
    phase: Phase = Phase.STEP,
    step_index: int = 0,
    step_started_s: float | None = 0.0,
    finished_s: float | None = None,
    bake_s: float = 0.0,
    steps_completed: int = 0,
    model: str = MODEL,
    last_verdict: str | None = None,
    last_reason: str = "",
    user: str = "ana",
    measured: bool = False,
    cls: type[RolloutState] = RolloutState,
    **extra: Any,
) -> RolloutState:
    """A rollout of the default shape (5% for 180 s, 50% for 120 s) started at T0."""
    policy = CanaryPolicy(
        steps=(CanaryStep(weight=5, duration_s=180), CanaryStep(weight=50, duration_s=120)),
        bake_s=bake_s,
    )
    started = at(step_started_s) if step_started_s is not None else None
    duration = bake_s if phase is Phase.BAKE else policy.steps[step_index].duration_s
    return cls(
        deployment_id=deployment_id,
        model=model,
        version="2026-11-25",
        request=DeploymentRequested(
            deployment_id=deployment_id,
            model=MODEL,
            version="2026-11-25",
            location="/models/chat-7b",
            requested_by=Requester(user=user, system="github-actions"),
        ),
        policy=policy,
        thresholds=CanaryThresholds(),
        stable=RouteTarget(deployment_id="dep-old", version="2026-11-01"),
        canary=RouteTarget(deployment_id=deployment_id, version="2026-11-25"),
        phase=phase,
        step_index=step_index,
        created_at=T0,
        step_started_at=started,
        step_ends_at=started + timedelta(seconds=duration) if started else None,
        finished_at=at(finished_s) if finished_s is not None else None,
        steps_completed=steps_completed,
        last_verdict=last_verdict,
        last_reason=last_reason,
        canary_measurement=(
            RoleMeasurement(requests=1210, errors=61, error_rate=0.0504, p95_ms=181.5)
            if measured
            else None
        ),
        stable_measurement=(
            RoleMeasurement(requests=1190, errors=2, error_rate=0.0017, p95_ms=120.2)
            if measured
            else None
        ),
        **extra,
    )


def rolled_back() -> RolloutState:
    """A canary that went bad 20 s into the 50% step and was rolled back 12 s later."""
    return rollout(
        phase=Phase.ROLLED_BACK,
        step_index=1,
        step_started_s=180,
        finished_s=212,
        steps_completed=1,
        last_verdict="unhealthy",
        last_reason="canary error rate 5.04% > 1.00% (1210 requests, p = 1e-9)",
        measured=True,
    )


def bad_canary_series(
    end_s: float = 212, bucket_s: float = 5, goes_bad_s: float = 200, seed: int = 7
) -> list[dict[str, Any]]:
    """100 rps split by weight; the canary turns to 10% errors and p95 +50% at `goes_bad_s`."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    t = 0.0
    while t < end_s:
        weight = 0.05 if t < 180 else 0.5
        for role, share in (("canary", weight), ("stable", 1 - weight)):
            requests = max(1, round(100 * bucket_s * share * rng.uniform(0.9, 1.1)))
            bad = role == "canary" and t >= goes_bad_s
            rate = 0.10 if bad else 0.002
            errors = sum(rng.random() < rate for _ in range(requests))
            p95 = rng.gauss(120, 4) * (1.5 if bad else 1.0)
            rows.append(
                {
                    "start": at(t),
                    "role": role,
                    "requests": requests,
                    "errors": errors,
                    "error_rate": errors / requests,
                    "p95_ms": p95,
                }
            )
        t += bucket_s
    return rows


@dataclass
class FakeRollouts:
    states: dict[str, RolloutState] = field(default_factory=dict)
    broken: bool = False

    async def get(self, deployment_id: str) -> RolloutState | None:
        if self.broken:
            raise ConnectionError("nats: no servers available for connection")
        return self.states.get(deployment_id)

    async def list(self) -> list[RolloutState]:
        if self.broken:
            raise ConnectionError("nats: no servers available for connection")
        return list(self.states.values())


@dataclass
class FakeSeries:
    rows: list[dict[str, Any]] = field(default_factory=list)
    failure: Exception | None = None
    hang: bool = False
    calls: list[tuple[str, datetime, datetime, float]] = field(default_factory=list)

    async def series(
        self, deployment_id: str, start: datetime, end: datetime, bucket_s: float
    ) -> list[dict[str, Any]]:
        self.calls.append((deployment_id, start, end, bucket_s))
        if self.failure is not None:
            raise self.failure
        if self.hang:
            await asyncio.Event().wait()
        return [r for r in self.rows if start <= r["start"] < end]


# ---- the step timeline ----------------------------------------------------------------------


def _shape(steps: list[StepView]) -> list[tuple[str, str, float | None, float | None, bool]]:
    def sec(value: datetime | None) -> float | None:
        return (value - T0).total_seconds() if value is not None else None

    return [(s.kind, s.status, sec(s.start), sec(s.end), s.estimated) for s in steps]


class WithHistory(RolloutState):
    step_starts: tuple[datetime, ...] = ()


TIMELINES = {
    "first step running, the next planned after it": (
        rollout(),
        [("step", "current", 0, 180, False), ("step", "planned", 180, 300, False)],
    ),
    "second step running, the first estimated back from it": (
        rollout(step_index=1, step_started_s=190, steps_completed=1),
        [("step", "done", 10, 190, True), ("step", "current", 190, 310, False)],
    ),
    "estimate never starts before the rollout was created": (
        rollout(step_index=1, step_started_s=100, steps_completed=1),
        [("step", "done", 0, 100, True), ("step", "current", 100, 220, False)],
    ),
    "recorded starts beat the estimate": (
        rollout(
            step_index=1,
            step_started_s=250,
            steps_completed=1,
            cls=WithHistory,
            step_starts=(T0, at(250)),
        ),
        [("step", "done", 0, 250, False), ("step", "current", 250, 370, False)],
    ),
    "rolled back in the second step": (
        rolled_back(),
        [("step", "done", 0, 180, True), ("step", "done", 180, 212, False)],
    ),
    "rolled back in the first step: the rest is skipped": (
        rollout(phase=Phase.ROLLED_BACK, finished_s=42, bake_s=60),
        [
            ("step", "done", 0, 42, False),
            ("step", "skipped", None, None, False),
            ("bake", "skipped", None, None, False),
        ],
    ),
    "baking after the last step": (
        rollout(phase=Phase.BAKE, step_index=1, step_started_s=300, bake_s=60, steps_completed=2),
        [
            ("step", "done", 0, 180, True),
            ("step", "done", 180, 300, True),
            ("bake", "current", 300, 360, False),
        ],
    ),
    "promoted after the bake": (
        rollout(
            phase=Phase.PROMOTED,
            step_index=1,
            step_started_s=300,
            finished_s=360,
            bake_s=60,
            steps_completed=2,
        ),
        [
            ("step", "done", 0, 180, True),
            ("step", "done", 180, 300, True),
            ("bake", "done", 300, 360, False),
        ],
    ),
    "promoted by hand in the first step: no bake": (
        rollout(phase=Phase.PROMOTED, finished_s=30, bake_s=60),
        [
            ("step", "done", 0, 30, False),
            ("step", "skipped", None, None, False),
            ("bake", "skipped", None, None, False),
        ],
    ),
    "queued: nothing started": (
        rollout(phase=Phase.QUEUED, step_started_s=None),
        [("step", "planned", None, None, False), ("step", "planned", None, None, False)],
    ),
    "paused: the step ends the remaining time after now": (
        rollout(phase=Phase.PAUSED, paused_from=Phase.STEP, paused_remaining_s=100),
        [("step", "current", 0, 200, False), ("step", "planned", 200, 320, False)],
    ),
}


@pytest.mark.parametrize("name", list(TIMELINES))
def test_plan_steps(name: str) -> None:
    state, expected = TIMELINES[name]
    assert _shape(plan_steps(state, now=at(100))) == expected


def test_chart_range_covers_the_rollout_and_the_current_step_plan() -> None:
    state = rollout()
    lo, hi = chart_range(state, plan_steps(state, at(60)), at(60))
    assert lo == T0
    assert hi >= at(180)  # the running step's planned end is on the axis, "now" inside it


def test_chart_range_of_a_finished_rollout_ends_just_after_the_outcome() -> None:
    state = rolled_back()
    lo, hi = chart_range(state, plan_steps(state, at(900)), at(900))
    assert lo == T0
    assert at(212) < hi < at(220)


def test_chart_range_query_narrows_it() -> None:
    state = rolled_back()
    steps = plan_steps(state, at(900))
    assert chart_range(state, steps, at(900), at(150), at(200)) == (at(150), at(200))
    assert chart_range(state, steps, at(900), at(150), None)[0] == at(150)


@pytest.mark.parametrize(
    ("span_s", "bucket"),
    [(0, 1.0), (120, 1.0), (121, 2.0), (300, 5.0), (3600, 30.0), (86400 * 3, 3600.0)],
)
def test_bucket_for_keeps_about_120_points(span_s: float, bucket: float) -> None:
    assert bucket_for(span_s) == bucket


def test_bucket_for_a_huge_span_stays_bounded() -> None:
    assert (86400 * 365) / bucket_for(86400 * 365) <= 120


def test_normalise_series_reads_the_stores_rows_and_skips_what_it_cannot() -> None:
    def row(start: Any, role: str = "canary", requests: int = 10, **kw: Any) -> dict[str, Any]:
        return {"start": start, "role": role, "requests": requests, "errors": 1, **kw}

    t0 = int(T0.timestamp() * 1000)
    rows = [
        row(at(5), error_rate=0.1, p95_ms=9, ttft_p95_ms=4),
        row(T0.replace(tzinfo=None), "stable", 4, error_rate=0.25, p95_ms=3.5),  # naive: UTC
        row(T0, requests=2, p95_ms=None),  # no error_rate: computed
        row("2026-11-25T10:00:10+00:00", "stable", 0, error_rate=None, p95_ms=float("nan")),
        row(at(1), "shadow"),  # unknown role
        row(None),  # no time
        row("not a time"),
        row(at(2), requests="many"),  # type: ignore[arg-type]
    ]
    assert normalise_series(rows) == [
        {"t_ms": t0, "role": "canary", "requests": 2, "errors": 1, "error_rate": 0.5,
         "p95_ms": None, "ttft_p95_ms": None},
        {"t_ms": t0 + 5000, "role": "canary", "requests": 10, "errors": 1, "error_rate": 0.1,
         "p95_ms": 9.0, "ttft_p95_ms": 4.0},
        {"t_ms": t0, "role": "stable", "requests": 4, "errors": 1, "error_rate": 0.25,
         "p95_ms": 3.5, "ttft_p95_ms": None},
        {"t_ms": t0 + 10000, "role": "stable", "requests": 0, "errors": 1, "error_rate": None,
         "p95_ms": None, "ttft_p95_ms": None},
    ]  # fmt: skip


async def test_series_points_are_json_even_when_the_store_says_nan(
    make_client: ClientFactory,
) -> None:
    rows = [{"start": at(5), "role": "canary", "requests": 0, "errors": 0,
             "error_rate": float("nan"), "p95_ms": float("inf")}]  # fmt: skip
    client = await make_client(FakeRollouts({"dep-7f3a9c": rolled_back()}), FakeSeries(rows))
    resp = await client.get("/api/rollouts/dep-7f3a9c")
    assert resp.status == 200
    assert (await resp.json())["series"][0]["p95_ms"] is None


# ---- the handlers -----------------------------------------------------------------------------

ClientFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
async def make_client() -> AsyncIterator[ClientFactory]:
    clients: list[TestClient[web.Request, web.Application]] = []

    async def make(
        rollouts: FakeRollouts, series: FakeSeries, now: datetime = LATER, **kw: Any
    ) -> TestClient[web.Request, web.Application]:
        app = build_page_app(rollouts, series, clock=lambda: now, **kw)
        client = TestClient(TestServer(app))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


def embedded_data(page: str) -> dict[str, Any]:
    found = re.search(r'<script type="application/json" id="page-data">(.*?)</script>', page)
    assert found, "the page embeds its data"
    data: dict[str, Any] = json.loads(found.group(1))
    return data


async def test_detail_api_answers_state_series_steps_and_thresholds(
    make_client: ClientFactory,
) -> None:
    series = FakeSeries(bad_canary_series())
    client = await make_client(FakeRollouts({"dep-7f3a9c": rolled_back()}), series)
    resp = await client.get("/api/rollouts/dep-7f3a9c")
    assert resp.status == 200
    data = await resp.json()
    assert data["phase"] == "rolled_back" and data["terminal"] is True
    assert data["rollout"]["model"] == MODEL and "pending" not in data["rollout"]
    assert data["rollout"]["requested_by"]["user"] == "ana"
    assert data["outcome"]["kind"] == "rolled_back"
    assert data["outcome"]["reason"].startswith("canary error rate 5.04%")
    assert data["thresholds"] == {
        "max_error_rate": 0.01,
        "max_p95_increase": 0.2,
        "max_ttft_p95_increase": CanaryThresholds().max_ttft_p95_increase,
    }
    assert [(s["weight"], s["start"], s["status"]) for s in data["steps"]] == [
        (5.0, T0.isoformat(), "done"),
        (50.0, at(180).isoformat(), "done"),
    ]
    assert data["metrics"] == {"available": True, "error": None}
    assert data["refresh_s"] is None
    assert {p["role"] for p in data["series"]} == {"canary", "stable"}
    assert len(data["series"]) == len(bad_canary_series())
    assert data["measurements"]["canary"]["p95_ms"] == 181.5
    # queried over the rollout, from the first step to just after the rollback, in 2 s buckets
    (dep, start, end, bucket_s) = series.calls[0]
    assert (dep, start, bucket_s) == ("dep-7f3a9c", T0, 2.0)
    assert at(212) < end < at(220)


async def test_detail_page_renders_state_steps_verdict_and_embeds_the_series(
    make_client: ClientFactory,
) -> None:
    client = await make_client(
        FakeRollouts({"dep-7f3a9c": rolled_back()}), FakeSeries(bad_canary_series())
    )
    resp = await client.get("/rollouts/dep-7f3a9c")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    page = await resp.text()
    assert "Rolled back at 2026-11-25 10:03:32 UTC: canary error rate 5.04%" in page
    assert 'class="verdict verdict-unhealthy"' in page
    assert "org/chat-7b.v2" in page and "dep-7f3a9c" in page
    assert "≈ 2026-11-25 10:00:00 UTC" in page  # the first step's start is estimated
    assert "canary p95 ≤ stable p95 × 1.2 (+20%)" in page
    assert 'id="chart-p95"' in page and 'id="chart-errors"' in page
    assert 'id="chart-ttft"' not in page and "TTFT" not in page  # no streamed responses
    assert '<script src="/static/rollout.js" defer>' in page
    data = embedded_data(page)
    assert data["series"] and data["outcome"]["kind"] == "rolled_back"


async def test_a_streaming_rollout_shows_ttft_p95_canary_vs_stable(
    make_client: ClientFactory,
) -> None:
    state = rolled_back()
    state = state.model_copy(
        update={
            "canary_measurement": RoleMeasurement(
                requests=1210, errors=61, error_rate=0.0504, p95_ms=181.5, ttft_p95_ms=412.25
            ),
            "stable_measurement": RoleMeasurement(
                requests=1190, errors=2, error_rate=0.0017, p95_ms=120.2, ttft_p95_ms=88.0
            ),
        }
    )
    rows = [{**r, "ttft_p95_ms": 90.0 if r["role"] == "stable" else 400.0}
            for r in bad_canary_series()]  # fmt: skip
    client = await make_client(FakeRollouts({"dep-7f3a9c": state}), FakeSeries(rows))
    page = await (await client.get("/rollouts/dep-7f3a9c")).text()
    assert '<th title="time to first token of streamed responses">TTFT p95</th>' in page
    assert '<td class="ttft">412.2 ms</td>' in page and '<td class="ttft">88.0 ms</td>' in page
    assert 'id="chart-ttft" data-metric="ttft_p95_ms"' in page
    assert "canary TTFT p95 ≤ stable TTFT p95 × 1.2 (+20%)" in page
    data = embedded_data(page)
    assert data["measurements"]["canary"]["ttft_p95_ms"] == 412.25
    assert {p["ttft_p95_ms"] for p in data["series"]} == {90.0, 400.0}


async def test_every_user_string_is_escaped_in_the_page_and_the_embedded_json(
    make_client: ClientFactory,
) -> None:
    state = rollout(model=f"org/{HOSTILE}", last_reason=f"aborted by {HOSTILE}", user=HOSTILE)
    client = await make_client(FakeRollouts({"dep-7f3a9c": state}), FakeSeries())
    for url in ("/rollouts/dep-7f3a9c", "/rollouts", "/"):
        page = await (await client.get(url)).text()
        assert "<script>alert" not in page
        assert "</b>" not in page
        assert page.count("</script>") == page.count("<script")  # nothing closes ours early
        assert (
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&quot;&#x27;&lt;/b&gt;" in page
        )
    data = embedded_data(await (await client.get("/rollouts/dep-7f3a9c")).text())
    assert data["rollout"]["requested_by"]["user"] == HOSTILE  # escaped, not altered
    assert data["last_reason"] == f"aborted by {HOSTILE}"


async def test_unknown_or_malformed_deployment_is_a_404_page(make_client: ClientFactory) -> None:
    client = await make_client(FakeRollouts({"dep-7f3a9c": rolled_back()}), FakeSeries())
    missing = await client.get("/rollouts/dep-nope")
    assert missing.status == 404
    assert "no rollout &#x27;dep-nope&#x27;" in await missing.text()
    odd = await client.get("/rollouts/%3Cscript%3E")
    assert odd.status == 404
    assert "<script>" not in (await odd.text()).replace('<script src="/static/rollout.js"', "")
    api = await client.get("/api/rollouts/dep-nope")
    assert api.status == 404
    assert await api.json() == {"error": "no rollout 'dep-nope'", "status": 404}


async def test_metrics_store_failing_still_renders_the_state(make_client: ClientFactory) -> None:
    series = FakeSeries(failure=MetricsUnavailable("chDB: Cannot lock file status"))
    client = await make_client(FakeRollouts({"dep-7f3a9c": rolled_back()}), series)
    resp = await client.get("/rollouts/dep-7f3a9c")
    assert resp.status == 200
    page = await resp.text()
    assert "metrics unavailable: chDB: Cannot lock file status" in page
    assert "Rolled back at" in page and "verdict-unhealthy" in page
    data = await (await client.get("/api/rollouts/dep-7f3a9c")).json()
    assert data["metrics"] == {"available": False, "error": "chDB: Cannot lock file status"}
    assert data["series"] == [] and data["phase"] == "rolled_back"


async def test_metrics_store_that_does_not_answer_is_unavailable(
    make_client: ClientFactory,
) -> None:
    client = await make_client(
        FakeRollouts({"dep-7f3a9c": rolled_back()}), FakeSeries(hang=True), series_timeout_s=0.05
    )
    data = await (await client.get("/api/rollouts/dep-7f3a9c")).json()
    assert data["metrics"]["available"] is False
    assert "did not answer within 0.05 s" in data["metrics"]["error"]


async def test_from_and_to_narrow_the_query(make_client: ClientFactory) -> None:
    series = FakeSeries(bad_canary_series())
    client = await make_client(FakeRollouts({"dep-7f3a9c": rolled_back()}), series)
    lo, hi = int(at(170).timestamp() * 1000), int(at(210).timestamp() * 1000)
    data = await (await client.get(f"/api/rollouts/dep-7f3a9c?from_ms={lo}&to_ms={hi}")).json()
    assert series.calls[-1][1:] == (at(170), at(210), 1.0)
    assert data["range"]["from_ms"] == lo and data["range"]["to_ms"] == hi
    assert all(lo <= p["t_ms"] < hi for p in data["series"])
    # the link template leaves them empty when it does not know the range
    resp = await client.get("/rollouts/dep-7f3a9c?from_ms=&to_ms=")
    assert resp.status == 200 and series.calls[-1][1] == T0


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("from_ms=yesterday", "from_ms must be milliseconds since the epoch, got 'yesterday'"),
        ("to_ms=-5", "to_ms is out of range: -5"),
        ("from_ms=2000&to_ms=1000", "to_ms must be after from_ms"),
        ("from_ms=0&to_ms=99999999999", "the range may span 90 days at most"),
    ],
)
async def test_bad_range_is_a_clear_400(
    make_client: ClientFactory, query: str, message: str
) -> None:
    client = await make_client(FakeRollouts({"dep-7f3a9c": rolled_back()}), FakeSeries())
    api = await client.get(f"/api/rollouts/dep-7f3a9c?{query}")
    assert api.status == 400
    assert (await api.json())["error"] == message
    page = await client.get(f"/rollouts/dep-7f3a9c?{query}")
    assert page.status == 400 and "Bad request" in await page.text()


async def test_running_rollout_refreshes_and_a_finished_one_does_not(
    make_client: ClientFactory,
) -> None:
    running = rollout("dep-running", measured=True, last_verdict="healthy")
    client = await make_client(
        FakeRollouts({"dep-running": running, "dep-7f3a9c": rolled_back()}),
        FakeSeries(bad_canary_series()),
        now=at(60),
    )
    data = await (await client.get("/api/rollouts/dep-running")).json()
    assert data["refresh_s"] == 5.0 and data["outcome"] is None
    assert data["range"]["now_ms"] == int(at(60).timestamp() * 1000)
    assert data["range"]["to_ms"] > int(at(180).timestamp() * 1000)
    assert all(p["t_ms"] < data["range"]["now_ms"] for p in data["series"])
    listing = await (await client.get("/rollouts")).text()
    assert embedded_data(listing)["refresh_s"] == 5.0


async def test_rollouts_list_page_and_api(make_client: ClientFactory) -> None:
    running = rollout("dep-running", step_index=1, step_started_s=180, last_verdict="healthy")
    rollouts = FakeRollouts({"dep-7f3a9c": rolled_back(), "dep-running": running})
    client = await make_client(rollouts, FakeSeries())
    page = await (await client.get("/rollouts")).text()
    assert page.index("dep-running") < page.index("dep-7f3a9c")  # running ones first
    assert '<a href="/rollouts/dep-running">details</a>' in page
    assert "<td>50%</td>" in page and "<td>2026-11-25 10:00:00 UTC</td>" in page
    assert 'class="phase phase-rolled_back">rolled back<' in page
    assert await (await client.get("/")).text() == page
    listed = (await (await client.get("/api/rollouts")).json())["rollouts"]
    assert [(r["deployment_id"], r["phase"], r["weight"], r["url"]) for r in listed] == [
        ("dep-running", "step", 50.0, "/rollouts/dep-running"),
        ("dep-7f3a9c", "rolled_back", 0.0, "/rollouts/dep-7f3a9c"),
    ]
    empty = await make_client(FakeRollouts(), FakeSeries())
    assert "No rollouts yet." in await (await empty.get("/rollouts")).text()


async def test_rollout_store_failing_is_a_503_with_the_reason(make_client: ClientFactory) -> None:
    client = await make_client(FakeRollouts(broken=True), FakeSeries())
    for url in ("/rollouts", "/rollouts/dep-7f3a9c", "/api/rollouts"):
        resp = await client.get(url)
        assert resp.status == 503
        assert "no servers available" in await resp.text()


@pytest.mark.parametrize(
    ("health", "status"),
    [
        (None, 200),
        (lambda: {"status": "ok", "rollouts": 2}, 200),
        (lambda: {"status": "unavailable", "problems": ["not connected to NATS"]}, 503),
        (lambda: 1 / 0, 503),
    ],
)
async def test_healthz(
    make_client: ClientFactory, health: Callable[[], dict[str, Any]] | None, status: int
) -> None:
    client = await make_client(FakeRollouts(), FakeSeries(), health=health)
    resp = await client.get("/healthz")
    assert resp.status == status
    body = await resp.json()
    assert body["status"] == ("ok" if status == 200 else "unavailable")


async def test_static_files_are_served_and_nothing_else(make_client: ClientFactory) -> None:
    client = await make_client(FakeRollouts(), FakeSeries())
    js = await client.get("/static/rollout.js")
    assert js.status == 200 and js.content_type == "text/javascript"
    assert "createElementNS" in await js.text()
    assert (await client.get("/static/rollout.css")).content_type == "text/css"
    assert (await client.get("/static/..%2Fpage.py")).status == 404
