"""`preflight analyse` on the real ClickHouse engine (chDB): the records read once answer as the
controller's queries do, and a replay agrees with the run whose records it reads."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import secrets
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from services.canary_controller import decision as rules
from services.canary_controller import replay as rp
from services.canary_controller.app import ClickHouseMetrics
from services.canary_controller.effects import effects
from services.canary_controller.observe import observe
from services.canary_controller.state import Phase, RolloutState
from services.contracts import subjects
from services.contracts.events import (
    DEPLOYMENT_EVENT,
    DeploymentEvent,
    DeploymentRequested,
    Requester,
    RouteTarget,
)
from services.contracts.policy import CanaryPolicy, CanaryStep, CanaryThresholds
from services.metrics import queries
from services.metrics.queries import MetricsUnavailable
from services.runtime import bus

pytestmark = pytest.mark.integration

TABLE = "request_metrics"
COLUMNS = [
    "ts", "deployment_id", "model", "version", "role", "latency_ms", "ttfb_ms", "ttft_ms",
    "status", "error_kind", "batch_id", "seq",
]  # fmt: skip
TICK = timedelta(seconds=rp.TICK_S)
POLICY = CanaryPolicy(
    steps=(CanaryStep(weight=5, duration_s=30), CanaryStep(weight=50, duration_s=20)),
    analysis_interval_s=5,
    min_canary_requests=50,
    max_step_extension_s=20,
    bake_s=10,
)


def start_time() -> datetime:
    return datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)


# ---- the records, read once, answer as the queries do ------------------------------------------


async def test_recorded_metrics_answer_exactly_as_the_clickhouse_queries(chdb_client: Any) -> None:
    rng = random.Random(11)
    dep, other = f"d-{secrets.token_hex(4)}", f"d-{secrets.token_hex(4)}"
    t0 = start_time()
    rows = []
    for i in range(6000):
        at = t0 + timedelta(microseconds=rng.randrange(40_000_000))
        canary = rng.random() < 0.3
        if canary and 20 <= (at - t0).total_seconds() < 22:
            canary = False  # two seconds without a canary request
        rows.append(
            (
                at,
                other if i % 7 == 0 else dep,
                "m",
                "v2" if canary else "v1",
                "canary" if canary else "stable",
                round(rng.lognormvariate(4, 0.5), 1),  # ties, as real latencies have
                None,
                round(rng.lognormvariate(3, 0.5), 1) if rng.random() < 0.5 else None,
                rng.choice((200, 200, 200, 200, 404, 500, 503, 0)),
                rng.choice(("", "", "", "timeout", "client_closed")),
                f"b{i // 500}",
                i % 500,
            )
        )
    # The window's edges: a record at the start counts, one at the end does not.
    rows.append((t0, dep, "m", "v1", "stable", 7.0, None, None, 200, "", "edge", 0))
    end = t0 + timedelta(seconds=40)
    rows.append((end, dep, "m", "v2", "canary", 9.0, None, None, 500, "", "edge", 1))
    chdb_client.insert(TABLE, rows, column_names=COLUMNS)
    chdb_client.insert(TABLE, rows[:500], column_names=COLUMNS)  # a redelivered batch

    loaded = rp.RecordedMetrics.load(chdb_client, TABLE, dep, t0, end)
    whole = queries.query_window(chdb_client, TABLE, dep, t0, end)
    assert loaded.records == whole.canary.requests + whole.stable.requests  # FINAL: once each
    windows = [
        (t0, end),
        (t0, t0 + timedelta(milliseconds=500)),
        (t0 + timedelta(seconds=12, microseconds=345_678), t0 + timedelta(seconds=30)),
        (t0 + timedelta(seconds=20), t0 + timedelta(seconds=22)),  # no canary
        (t0 + timedelta(seconds=39.999), end),
    ]
    for limit in (rp.RAW_LIMIT, 150):  # 150: the raw latencies and TTFTs are samples
        mem = rp.RecordedMetrics(dep, t0, end, _columns(loaded), raw_limit=limit)
        for (start, stop), raw in itertools.product(windows, (True, False)):
            expected = queries.query_window(
                chdb_client, TABLE, dep, start, stop, raw=raw, raw_limit=limit
            )
            assert await mem.window(dep, start, stop, raw=raw) == expected
    assert whole.canary.requests > 150 and whole.canary.requests < 2 * 1000
    for bucket_s, limit_ms, ttft_ms in itertools.product(
        (5.0, 1.5, 0.7), (None, 60.0), (None, 25.0)
    ):
        expected_b = queries.query_buckets(
            chdb_client, TABLE, dep, t0, end, bucket_s, limit_ms, ttft_limit_ms=ttft_ms
        )
        got = await loaded.buckets(dep, t0, end, bucket_s, limit_ms, ttft_limit_ms=ttft_ms)
        assert got == expected_b
    with pytest.raises(MetricsUnavailable, match="outside the records read"):
        await loaded.window(dep, t0 - timedelta(seconds=1), end, raw=False)


def _columns(metrics: rp.RecordedMetrics) -> dict[str, list[Any]]:
    """The loaded records back as columns (to build a source with another raw_limit)."""
    out: dict[str, list[Any]] = {name: [] for name in rp._DTYPES}
    for role, records in metrics.roles.items():
        n = len(records.ts_ms)
        out["canary"] += [role == "canary"] * n
        out["ts_ms"] += records.ts_ms.tolist()
        out["latency_ms"] += records.latency_ms.tolist()
        out["error"] += [bool(x) for x in (records.errors_cum[1:] - records.errors_cum[:-1])]
        out["sample_key"] += records.sample_key.tolist()
        out["has_ttft"] += records.has_ttft.tolist()
        out["ttft_value"] += records.ttft_ms.tolist()
    return out


# ---- a run, and its replay ----------------------------------------------------------------------


@dataclass
class Gateway:
    """Writes what a gateway would have measured, at the weight the rollout is at."""

    client: Any
    deployment_id: str
    rps: float = 100.0
    canary_error_rate: float = 0.0
    canary_slowdown: float = 1.0
    rng: random.Random = field(default_factory=lambda: random.Random(5))
    seq: int = 0

    def run(self, start: datetime, seconds: float, weight: float) -> None:
        rows = []
        batch = secrets.token_hex(6)
        for i in range(round(seconds * self.rps)):
            canary = self.rng.random() * 100 < weight
            slow = self.canary_slowdown if canary else 1.0
            failed = canary and self.rng.random() < self.canary_error_rate
            rows.append(
                (
                    start + timedelta(seconds=i / self.rps),
                    self.deployment_id,
                    "org/m",
                    "v2" if canary else "v1",
                    "canary" if canary else "stable",
                    self.rng.lognormvariate(0, 0.35) * 80 * slow,
                    None,
                    None,
                    500 if failed else 200,
                    "http_5xx" if failed else "",
                    batch,
                    i,
                )
            )
        if rows:
            self.client.insert(TABLE, rows, column_names=COLUMNS)


def new_request() -> DeploymentRequested:
    return DeploymentRequested(
        deployment_id=f"d-{secrets.token_hex(4)}",
        model="org/m",
        version="v2",
        location="/models/v2",
        endpoint="http://127.0.0.1:9002",
        requested_by=Requester(user="ana", system="cli"),
    )


@dataclass
class Run:
    state: RolloutState
    events: list[DeploymentEvent]
    looks: list[tuple[datetime, str, str | None]]  # (at, action, verdict)
    trigger: str | None


async def run_live(
    client: Any, gateway: Gateway, policy: CanaryPolicy, seconds: float = 120.0
) -> Run:
    """The engine's loop (engine.Engine.step) over real queries, with the records written as
    time goes, at the rollout's weight: what a live rollout leaves in the stores."""
    metrics = ClickHouseMetrics(client, TABLE)
    request = new_request()
    gateway.deployment_id = request.deployment_id
    created = start_time()
    state = rules.start_rollout(
        request,
        earlier=(),
        policy=policy,
        thresholds=CanaryThresholds(),
        stable=RouteTarget(deployment_id="d-stable", version="v1", upstream="http://s"),
        canary=RouteTarget(deployment_id=request.deployment_id, version="v2", upstream="http://c"),
        now=created,
        queued=True,
    )
    events: list[DeploymentEvent] = []
    looks: list[tuple[datetime, str, str | None]] = []

    def act(decision: rules.Decision, now: datetime) -> RolloutState:
        after = rules.apply(state, decision, now)
        pending = effects(state, after, decision, now, None)
        if pending is not None:
            events.extend(DEPLOYMENT_EVENT.validate_json(raw) for raw in pending.events_json)
        return after

    started = created + timedelta(seconds=2)  # queued, then started
    state = act(rules.Decision("start", "canary starts"), started)
    now = started
    trigger = None
    while (now - started).total_seconds() < seconds:
        gateway.run(now, rp.TICK_S, state.weight)
        now += TICK
        last = state.last_analysis_at
        passed = any(
            t is not None and now >= t and (last is None or last < t)
            for t in (state.step_ends_at, state.step_deadline, state.held_deadline)
        )
        if not rules.analysis_due(state, now) and not passed:
            continue
        observation = await observe(metrics, state, now)
        decision = rules.decide(state, observation, state.policy, state.thresholds, now)
        if decision.action == "wait" and not decision.analysed and decision.verdict is None:
            continue
        looks.append((now, decision.action, decision.verdict))
        state = act(decision, now)
        if state.phase.terminal or state.phase is Phase.HELD:
            trigger = decision.trigger
            break
    return Run(state, events, looks, trigger)


async def replay_of(client: Any, run: Run, policy: CanaryPolicy | None = None) -> rp.Replay:
    original = rp.original_run(run.state, run.events)
    metrics = rp.RecordedMetrics.load(
        client, TABLE, run.state.deployment_id, original.started_at, original.data_end
    )
    return await rp.replay(metrics, run.state, policy, original=original)


@pytest.mark.parametrize(
    ("method", "behaviour", "outcome", "trigger"),
    [
        ("bonferroni", {}, "promoted", None),
        ("bonferroni", {"canary_error_rate": 0.08}, "rolled_back", "error_rate"),
        ("bonferroni", {"canary_slowdown": 1.8}, "rolled_back", "latency"),
        ("e-process", {"canary_error_rate": 0.08}, "rolled_back", "error_ratio"),
        ("e-process", {}, "promoted", None),
    ],
)
async def test_a_replay_under_the_same_policy_agrees_with_the_run(
    chdb_client: Any, method: str, behaviour: dict[str, Any], outcome: str, trigger: str | None
) -> None:
    policy = POLICY.model_copy(update={"method": method})
    run = await run_live(chdb_client, Gateway(chdb_client, "", **behaviour), policy)
    assert run.state.phase.value == outcome and run.trigger == trigger, run.state.last_reason
    result = await replay_of(chdb_client, run)
    assert result.same_policy
    assert result.ending.outcome == outcome
    assert result.ending.trigger == trigger
    assert result.agrees is True, result.comparison
    assert result.comparison.startswith("agrees with what happened")
    # Every look at the same moment, with the same action and verdict: exact, not just alike.
    assert [(look.at, look.action, look.verdict) for look in result.looks] == run.looks
    assert result.ending.at == run.state.finished_at
    assert result.divergence is None
    assert all(look.exact for look in result.looks)
    assert result.original.looks == len([e for e in run.events if e.type == "CanaryAnalysed"])
    assert any(t.p_value is not None or t.e_value is not None for t in result.looks[-1].tests)
    lines = rp.summary_lines(result)
    assert result.verdict_line in lines and result.comparison in lines
    assert rp.as_dict(result)["agrees"] is True


async def test_a_slower_policy_is_exact_only_until_the_weights_part(chdb_client: Any) -> None:
    run = await run_live(chdb_client, Gateway(chdb_client, ""), POLICY)
    assert run.state.phase is Phase.PROMOTED
    advanced = run.state.step_starts[1]
    slower = POLICY.model_copy(
        update={
            "steps": (CanaryStep(weight=5, duration_s=45), CanaryStep(weight=50, duration_s=20))
        }
    )
    result = await replay_of(chdb_client, run, slower)
    assert not result.same_policy
    assert result.divergence is not None
    assert result.divergence.at == advanced
    assert (result.divergence.replay_weight, result.divergence.original_weight) == (5, 50)
    assert all(look.exact == (look.at <= advanced) for look in result.looks)
    assert any(
        n.startswith(f"exact only up to {result.divergence.at_s:.1f} s") for n in result.notes
    )
    assert any(line.startswith("~") for line in map(rp.look_line, result.looks))


async def test_a_looser_threshold_runs_out_of_recorded_traffic(chdb_client: Any) -> None:
    run = await run_live(chdb_client, Gateway(chdb_client, "", canary_error_rate=0.08), POLICY)
    assert run.state.phase is Phase.ROLLED_BACK
    metrics_run = rp.original_run(run.state, run.events)
    metrics = rp.RecordedMetrics.load(
        chdb_client, TABLE, run.state.deployment_id, metrics_run.started_at, metrics_run.data_end
    )
    result = await rp.replay(
        metrics, run.state, POLICY, CanaryThresholds(max_error_rate=0.5), original=metrics_run
    )
    assert result.ending.outcome == "ran_out"
    assert result.ending.at == run.state.finished_at
    assert result.verdict_line.startswith(
        f"ran out of recorded traffic at {result.ending.at_s:.1f} s while in step 0, 5%"
    )
    assert result.agrees is False
    assert result.comparison.startswith("differs: the original rolled_back")
    assert result.divergence is None  # the replay never left the weight the records were made at


# ---- the command ------------------------------------------------------------------------------


def analyse(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`preflight analyse` in a process of its own: this one holds the chDB path, as the
    running stack's controller would, so the command reads a copy of it."""
    return subprocess.run(
        [sys.executable, "-m", "services.stack.cli", "analyse", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **env},
    )


async def test_preflight_analyse_reads_kv_events_and_chdb(
    chdb_client: Any, chdb_path: Path, js: Any, nats_server: Any, tmp_path: Path
) -> None:
    run = await run_live(chdb_client, Gateway(chdb_client, "", canary_error_rate=0.08), POLICY)
    kv = await js.key_value(subjects.ROLLOUTS_BUCKET)
    await kv.put(run.state.deployment_id, run.state.to_bytes())
    await bus.publish_event(js, run.state.request)
    for event in run.events:
        await bus.publish_event(js, event)
    env = {
        "PREFLIGHT_NATS_URL": nats_server.url,
        "PREFLIGHT_DATA_DIR": str(tmp_path),
        "PREFLIGHT_CLICKHOUSE_PATH": str(chdb_path),
    }
    loose = tmp_path / "loose.yaml"
    loose.write_text("canary:\n  thresholds:\n    max_error_rate: 0.5\n")
    dep = run.state.deployment_id
    human, as_json, other, unknown = await asyncio.gather(
        asyncio.to_thread(analyse, dep, env=env),
        asyncio.to_thread(analyse, dep, "--json", env=env),
        asyncio.to_thread(analyse, dep, "--policy", str(loose), env=env),
        asyncio.to_thread(analyse, "d-nope1234", env=env),
    )
    assert human.returncode == 0, human.stderr
    assert "would have rolled back at" in human.stdout
    assert "agrees with what happened: rolled_back at" in human.stdout
    assert "(step 0, 5%, trigger error_rate)" in human.stdout
    assert "reading a copy of the rollout's days" in human.stderr
    assert as_json.returncode == 0, as_json.stderr
    doc = json.loads(as_json.stdout)
    assert doc["agrees"] is True and doc["outcome"]["trigger"] == "error_rate"
    assert doc["looks"] and doc["looks"][-1]["action"] == "rollback"
    assert other.returncode == 0, other.stderr
    assert "ran out of recorded traffic" in other.stdout and "differs:" in other.stdout
    assert unknown.returncode == 1
    assert "no deployment d-nope1234" in unknown.stderr


# ---- a chDB path another process holds -------------------------------------------------------

_WRITE_AND_HOLD = """
import sys, time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from services.runtime import clickhouse
from services.runtime.settings import Settings

settings = Settings(data_dir=Path(sys.argv[1]))
client = clickhouse.open_client(settings)
clickhouse.ensure_metrics_table(client, settings)
t0 = datetime.now(UTC) - timedelta(hours=1)
rows = [(t0 + timedelta(milliseconds=i), "d-held", "m", "2", "canary", 1.0, 200, "",
         f"b{i // 100}", i % 100) for i in range(1000)]
columns = ["ts", "deployment_id", "model", "version", "role", "latency_ms", "status",
           "error_kind", "batch_id", "seq"]
client.insert(settings.metrics_table, rows, column_names=columns)
print("ready", flush=True)
time.sleep(60)
"""


def test_a_snapshot_of_a_chdb_path_in_use_opens_with_its_records(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", _WRITE_AND_HOLD, str(tmp_path / "stack")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        day = (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y%m%d")
        copied = rp.snapshot_chdb(tmp_path / "stack" / "clickhouse", tmp_path / "copy", [day])
        assert copied > 0
        assert not (tmp_path / "copy" / "status").exists()
        read = subprocess.run(
            [sys.executable, "-c", _READ_COPY, str(tmp_path / "copy")],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert read.returncode == 0, read.stderr[-2000:]
        assert read.stdout.strip() == "1000"
    finally:
        holder.kill()
        holder.wait()


_READ_COPY = """
import sys
from pathlib import Path
from services.runtime import clickhouse
from services.runtime.settings import Settings

client = clickhouse.open_client(Settings(clickhouse_path=Path(sys.argv[1])))
print(client.query("SELECT count() FROM request_metrics FINAL").result_rows[0][0])
"""
