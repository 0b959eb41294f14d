"""The benchmark's hard time limit: past it, measurements stop and the checks not run say so."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from services.benchmarker import deadline
from services.contracts.events import Status
from services.contracts.policy import Policy
from services.stack.samples import write_sample_model


def test_check_raises_only_past_the_limit_and_only_inside_it() -> None:
    deadline.check("anything")  # no limit set: nothing to stop
    with deadline.limited(60.0):
        deadline.check("a window")
        assert not deadline.passed()
    with deadline.limited(0.001):
        time.sleep(0.01)
        assert deadline.passed()
        with pytest.raises(deadline.OverTime, match=r"limit of 0\.001 s .* during a window"):
            deadline.check("a window")
    deadline.check("after")  # the limit ends with its block


def test_a_benchmark_past_its_limit_stops_and_says_which_checks_did_not_run(
    tmp_path: Path,
) -> None:
    pytest.importorskip("transformers")
    from services.benchmarker.run import run_benchmarks

    model = write_sample_model(tmp_path / "m", layers=1, hidden=16, heads=2, vocab=32)
    report, _ = run_benchmarks(str(model), None, Policy(), device="cpu", time_limit_s=1e-6)
    assert report.status == Status.ERROR  # never passed: nothing was shown
    for check in report.checks:  # loading is not counted; every measurement is
        assert check.status == Status.ERROR
        assert "not run: the benchmark is past its time limit" in check.reason


@pytest.mark.parametrize("measurement", ["perplexity", "latency", "consistency"])
def test_a_measurement_stops_between_steps_once_past_the_limit(
    measurement: str, tmp_path: Path
) -> None:
    pytest.importorskip("transformers")
    from services.benchmarker import consistency, latency, loading, perplexity

    model = write_sample_model(tmp_path / "m", layers=1, hidden=16, heads=2, vocab=32)
    loaded = loading.load_model(str(model), device="cpu")
    run: Callable[[], object] = {
        "perplexity": lambda: perplexity.sliding_window_perplexity(
            loaded, "a b c " * 200, max_length=64, stride=32
        ),
        "latency": lambda: latency.measure_latency(loaded, runs=10, warmup_runs=0),
        "consistency": lambda: consistency.greedy_outputs(loaded, ["a", "b"]),
    }[measurement]
    with deadline.limited(1e-6):
        time.sleep(0.01)
        with pytest.raises(deadline.OverTime) as stopped:
            run()
    assert f"during {measurement} (" in str(stopped.value)
