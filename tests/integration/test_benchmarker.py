"""The benchmarker on real (small, trained) models and as a work queue on a real nats-server."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.js import JetStreamContext

from services.benchmarker.run import ResultStore, run_benchmarks
from services.contracts import subjects
from services.contracts.events import (
    BenchmarkCompleted,
    DeploymentRequested,
    ModelRef,
    Status,
    ValidationCompleted,
)
from services.contracts.policy import Policy, PolicyFile
from services.runtime import bus, pipeline
from services.runtime.settings import Settings

pytest.importorskip("torch")
pytestmark = pytest.mark.integration

# Enough work to be real, little enough for 2 cores: the full defaults run in docs/benchmarks.md.
FAST = {
    "benchmark": {
        "consistency_prompts": 5,
        "latency_runs": 3,
        "latency_warmup_runs": 1,
        "max_length": 128,
        "stride": 128,
    }
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from services.benchmarker.samples import write_trained_model

    root = tmp_path_factory.mktemp("trained")
    return {
        "stable": write_trained_model(root / "stable", variant="good", seed=0),
        "good": write_trained_model(root / "good", variant="good", seed=0),
        "regressed": write_trained_model(root / "regressed", variant="regressed", seed=0),
    }


def policy(**extra: object) -> Policy:
    """The operator's file (a request may not switch checks off)."""
    return PolicyFile(defaults={"benchmark": {**FAST["benchmark"], **extra}}).resolve(model="m")


def test_a_good_model_passes_against_the_version_it_replaces(models: dict[str, Path]) -> None:
    report, device = run_benchmarks(str(models["good"]), str(models["stable"]), policy())
    assert report.status is Status.PASSED, report.reason
    assert device is not None and device.startswith("cpu")
    checks = {c.name: c for c in report.checks}
    assert checks["perplexity"].status is Status.PASSED
    assert checks["perplexity"].details["config"]["stride"] == 128
    assert checks["consistency"].value == 5
    assert checks["consistency"].details["settings"]["torch.use_deterministic_algorithms"] is True
    assert checks["latency"].details["runs"] == 3
    assert checks["latency"].details["warmup_runs"] == 1


def test_a_regressed_model_is_degraded_with_its_numbers(models: dict[str, Path]) -> None:
    report, _ = run_benchmarks(str(models["regressed"]), str(models["stable"]), policy())
    assert report.status is Status.DEGRADED
    check = next(c for c in report.checks if c.name == "perplexity")
    assert check.status is Status.FAILED
    assert check.value is not None and check.value > 0.05
    assert check.threshold == 0.05
    assert "vs" in check.reason and "limit +5%" in check.reason


def test_latency_over_the_class_threshold_degrades(models: dict[str, Path]) -> None:
    strict = PolicyFile(  # the operator's file: a request may not change model classes
        defaults={
            **FAST,
            "model_classes": {
                "tiny": {
                    "latency": {
                        "ttft_p95_ms": 0.001,
                        "per_token_p95_ms": 1000,
                        "generation_p95_ms": 100000,
                    }
                }
            },
        },
    ).resolve(model="m")
    report, _ = run_benchmarks(str(models["good"]), None, strict, model_class="tiny")
    latency = next(c for c in report.checks if c.name == "latency")
    assert latency.status is Status.FAILED
    assert "ttft_p95_ms" in latency.reason and "> 0.001" in latency.reason
    assert report.status is Status.DEGRADED


def test_a_model_that_does_not_load_is_a_result_not_a_crash(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in models["good"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00" * 16)
    report, device = run_benchmarks(str(broken), None, policy())
    assert report.status is Status.ERROR
    assert report.reason.startswith("could not run:")
    assert device is None


@pytest.mark.timeout(300)
def test_the_baseline_result_is_reused_only_when_the_config_matches(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    store = ResultStore(tmp_path / "perplexity.json")
    first, _ = run_benchmarks(
        str(models["good"]),
        str(models["stable"]),
        policy(latency=False, consistency=False),
        store=store,
    )
    again, _ = run_benchmarks(
        str(models["good"]),
        str(models["stable"]),
        policy(latency=False, consistency=False),
        store=store,
    )
    other, _ = run_benchmarks(
        str(models["good"]),
        str(models["stable"]),
        policy(latency=False, consistency=False, stride=64),
        store=store,
    )

    def reused(report: object) -> bool:
        check = next(c for c in report.checks if c.name == "perplexity")  # type: ignore[attr-defined]
        return bool(check.details["baseline_reused_from_store"])

    assert (reused(first), reused(again), reused(other)) == (False, True, False)


# ---- the work queue ---------------------------------------------------------------------------


def validated(deployment_id: str, models: dict[str, Path]) -> ValidationCompleted:
    request = DeploymentRequested(
        deployment_id=deployment_id,
        model="queue-model",
        version="2",
        location=str(models["good"]),
        stable=ModelRef(name="queue-model", version="1", location=str(models["stable"])),
        policy_overrides=FAST,
    )
    return ValidationCompleted(
        deployment_id=deployment_id,
        model="queue-model",
        version="2",
        report=pipeline.not_built("validation"),
        request=request,
    )


class Benchmarkers:
    """Benchmarker service processes, as `preflight service run benchmarker` runs them."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.settings, self.log_dir = settings, log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFLIGHT_")}
        env |= {
            "PREFLIGHT_NATS_URL": self.settings.nats_url,
            "PREFLIGHT_DATA_DIR": str(self.settings.data_dir),
            "PREFLIGHT_INSTANCE": name,
            "PREFLIGHT_ACK_WAIT_S": "4",
            "OMP_NUM_THREADS": "1",
        }
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "services.stack.cli", "service", "run", "benchmarker"],
            env=env,
            stdout=(self.log_dir / f"{name}.log").open("wb"),
            stderr=subprocess.STDOUT,
        )

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def benchmarkers(settings: Settings, tmp_path: Path) -> Iterator[Benchmarkers]:
    group = Benchmarkers(settings, tmp_path)
    try:
        yield group
    finally:
        group.stop()


async def completed(js: JetStreamContext, count: int, timeout: float) -> list[BenchmarkCompleted]:
    seen: list[BenchmarkCompleted] = []

    async def take() -> None:
        async for event in bus.follow(js, subjects.stage_filter("benchmarked")):
            assert isinstance(event, BenchmarkCompleted)
            seen.append(event)
            if len(seen) == count:
                return

    await asyncio.wait_for(take(), timeout)
    return seen


@pytest.mark.timeout(420)
async def test_three_benchmarkers_split_ten_deployments_exactly_once(
    js: JetStreamContext, benchmarkers: Benchmarkers, models: dict[str, Path]
) -> None:
    for name in ("b1", "b2", "b3"):
        benchmarkers.start(name)
    for i in range(10):
        await bus.publish_event(js, validated(f"d-wq{i}", models))
    done = await completed(js, 10, timeout=240)
    await asyncio.sleep(2)  # a duplicate would show up now
    info = await js.stream_info(
        subjects.EVENTS_STREAM, subjects_filter=subjects.stage_filter("benchmarked")
    )
    assert sum((info.state.subjects or {}).values()) == 10
    assert sorted(e.deployment_id for e in done) == sorted(f"d-wq{i}" for i in range(10))
    workers = {e.report.service for e in done}
    assert len(workers) >= 2, f"the work was not shared: {workers}"
    assert all(e.device and e.device.startswith("cpu") for e in done)


@pytest.mark.timeout(420)
async def test_a_benchmarker_killed_mid_run_leaves_its_deployment_to_another(
    js: JetStreamContext, benchmarkers: Benchmarkers, models: dict[str, Path]
) -> None:
    benchmarkers.start("doomed")
    heavy = validated("d-kill", models)
    request = heavy.request.model_copy(
        update={"policy_overrides": {"benchmark": {**FAST["benchmark"], "latency_runs": 20}}}
    )
    await bus.publish_event(js, heavy.model_copy(update={"request": request}))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until the doomed one holds the message
        info = await js.consumer_info(subjects.EVENTS_STREAM, subjects.BENCHMARKER_DURABLE)
        if info.num_ack_pending == 1:
            break
        await asyncio.sleep(0.2)
    else:
        pytest.fail("the benchmarker never took the message")
    await asyncio.sleep(3)  # well into the run, past one in-progress heartbeat
    doomed = benchmarkers.procs["doomed"]
    children = children_of(doomed.pid)  # the running benchmark's child
    assert children, "the benchmark runs in a child process"
    workdirs = [os.readlink(f"/proc/{pid}/cwd") for pid in children]
    assert all("preflight-benchmark-" in d for d in workdirs), workdirs
    doomed.send_signal(signal.SIGKILL)
    benchmarkers.start("survivor")
    [done] = await completed(js, 1, timeout=300)
    assert done.deployment_id == "d-kill"
    assert done.report.service == "survivor"
    # The killed benchmarker's children end with it: nothing of it goes on measuring.
    assert not still_running(children)
    assert not still_running(workdirs)  # nor their working directories


def still_running(found: list[int] | list[str]) -> list[object]:
    """The processes (pids) or directories (paths) of `found` that still exist."""
    return [x for x in found if os.path.exists(f"/proc/{x}" if isinstance(x, int) else x)]


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_cli_benchmark_exits_1_on_a_regression_with_the_numbers(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    import yaml
    from typer.testing import CliRunner

    from services.stack.cli import app

    monkeypatch.setenv("PREFLIGHT_DATA_DIR", str(tmp_path))
    overrides = tmp_path / "fast.yaml"
    overrides.write_text(yaml.safe_dump(FAST))
    result = CliRunner().invoke(
        app,
        ["benchmark", str(models["regressed"]), "--baseline", str(models["stable"]),
         "--policy", str(overrides), "--json"],
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    body = json.loads(result.stdout)
    assert body["device"].startswith("cpu")
    assert body["report"]["status"] == "degraded"
    perplexity = next(c for c in body["report"]["checks"] if c["name"] == "perplexity")
    assert (
        perplexity["details"]["candidate"]["perplexity"]
        > perplexity["details"]["baseline"]["perplexity"]
    )
