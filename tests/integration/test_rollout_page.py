"""The rollout page in headless Chromium: charts, step markers, verdict, refresh, screenshot."""

from __future__ import annotations

import asyncio
import re
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web

from services.canary_controller.page import build_page_app
from services.canary_controller.state import RolloutState
from services.metrics.queries import MetricsUnavailable
from tests.unit.test_rollout_page import (
    FakeRollouts,
    FakeSeries,
    at,
    bad_canary_series,
    rolled_back,
    rollout,
)

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="needs Debian's chromium at /usr/bin/chromium: `apt-get install -y chromium` "
        "(`make browser` does it)",
    ),
]
BROWSER_TIMEOUT_S = 60.0


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


async def chromium(profile: Path, url: str, *args: str, budget_ms: int = 5000) -> str:
    """Run headless Chromium against the page; its stdout (the DOM with --dump-dom)."""
    proc = await asyncio.create_subprocess_exec(
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        f"--virtual-time-budget={budget_ms}",
        *args,
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), BROWSER_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


def chart(dom: str, figure_id: str) -> str:
    found = re.search(rf'<figure[^>]*id="{figure_id}".*?</figure>', dom, re.S)
    assert found, f"no figure {figure_id} in the DOM"
    return found.group(0)


def titles(svg: str, role: str) -> list[str]:
    return re.findall(rf'class="pt pt-{role}"><title>([^<]*)</title>', svg)


async def test_bad_canary_page_draws_both_roles_steps_thresholds_and_the_rollback(
    tmp_path: Path,
) -> None:
    rows = bad_canary_series()
    app = build_page_app(
        FakeRollouts({"dep-7f3a9c": rolled_back()}), FakeSeries(rows), clock=lambda: at(900)
    )
    async with serving(app) as base:
        url = f"{base}/rollouts/dep-7f3a9c"
        dom = await chromium(tmp_path / "profile", url, "--dump-dom")
        shot = tmp_path / "page.png"
        await chromium(tmp_path / "profile", url, f"--screenshot={shot}", "--window-size=1200,900")

    per_role = len(rows) // 2
    for figure_id in ("chart-p95", "chart-errors"):
        svg = chart(dom, figure_id)
        assert "<svg" in svg
        for role in ("canary", "stable"):
            assert re.search(rf'<path d="M[\d.]+ [\d.]+ L[^"]+" class="line line-{role}"', svg)
            assert len(titles(svg, role)) == per_role
        assert svg.count('class="step-marker"') == 2
        assert ">step 1 · 5%<" in svg and ">step 2 · 50%<" in svg
        assert 'class="threshold"' in svg
        assert 'class="outcome-marker outcome-rolled_back"' in svg and ">rolled back<" in svg

    # The values drawn are the store's: the canary ends at +50% p95 and about 10% errors.
    last_p95 = titles(chart(dom, "chart-p95"), "canary")[-1]
    assert re.fullmatch(r"canary 10:03:30 UTC: 1[6-9]\d ms \(\d+ requests, \d+ errors\)", last_p95)
    stable_errors = titles(chart(dom, "chart-errors"), "stable")
    assert all(float(t.split(": ")[1].split("%")[0]) < 2 for t in stable_errors)
    assert ">max 1.00%<" in chart(dom, "chart-errors")
    assert ">stable p95 × 1.2<" in chart(dom, "chart-p95")

    assert "Rolled back at 2026-11-25 10:03:32 UTC: canary error rate 5.04%" in dom
    assert 'class="verdict verdict-unhealthy">unhealthy<' in dom
    assert 'class="step step-done"' in dom

    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == (1200, 900)
    assert len(png) > 40_000, "a page with two drawn charts is not a near-blank image"


class FlipsAfterFirstLook(FakeRollouts):
    """Running at the first request, rolled back at every later one: what a refresh must show."""

    def __init__(self, first: RolloutState, then: RolloutState) -> None:
        super().__init__({first.deployment_id: first})
        self.then = then
        self.reads = 0

    async def get(self, deployment_id: str) -> RolloutState | None:
        self.reads += 1
        return await super().get(deployment_id) if self.reads == 1 else self.then


async def test_running_page_refreshes_itself_and_says_when_metrics_are_unavailable(
    tmp_path: Path,
) -> None:
    running = rollout(step_index=1, step_started_s=180, steps_completed=1, last_verdict="healthy")
    rollouts = FlipsAfterFirstLook(running, rolled_back())
    series = FakeSeries(failure=MetricsUnavailable("the metrics store did not answer"))
    app = build_page_app(rollouts, series, clock=lambda: at(200))
    async with serving(app) as base:
        dom = await chromium(
            tmp_path / "profile", f"{base}/rollouts/dep-7f3a9c", "--dump-dom", budget_ms=8000
        )

    assert rollouts.reads >= 2, "the page fetched itself again while the rollout ran"
    assert 'class="phase phase-rolled_back"' in dom and "Rolled back at" in dom
    assert "metrics unavailable: the metrics store did not answer" in dom
    svg = chart(dom, "chart-p95")
    assert ">metrics unavailable<" in svg  # the chart says why it is empty
    assert svg.count('class="step-marker"') == 2  # the steps still show where the rollout is
    assert "refresh failed" not in dom
