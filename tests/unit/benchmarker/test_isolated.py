"""Pure parts of the benchmark's child-process runner: its deadlines and its memory limit."""

from __future__ import annotations

import pytest

from services.benchmarker.isolated import Job, Limits, _Watch, host_memory, memory_limit
from services.benchmarker.run import Step
from services.contracts.policy import Policy


def test_the_hard_deadline_follows_the_childs_phases() -> None:
    watch = _Watch(Job.of("/m", None, Policy()), Limits(load_s=100, grace_s=5))
    assert watch.limit_name == "the start of the benchmark process"
    watch.step(Step("fetching", "s3://b/m"))
    assert watch.deadline is None and watch.during() == "while fetching s3://b/m"  # no limit set
    fetching = _Watch(Job.of("/m", None, Policy()), Limits(fetch_s=50))
    fetching.step(Step("fetching", "s3://b/m"))
    assert fetching.limit_s == 50
    assert fetching.limit_name == "PREFLIGHT_BENCHMARK_FETCH_TIME_LIMIT_S"
    watch.step(Step("loading", "s3://b/m"))
    assert watch.limit_s == 100 and watch.limit_name == "PREFLIGHT_BENCHMARK_LOAD_TIME_LIMIT_S"
    assert watch.stopped("stopped").reason.startswith("could not run: stopped")
    watch.step(Step("loaded", "cpu (2 threads)"))
    timed = _Watch(Job.of("/m", None, Policy(), time_limit_s=30), Limits(grace_s=5))
    timed.step(Step("measuring", "perplexity"))
    first = timed.deadline
    timed.step(Step("measuring", "latency"))  # one limit for all the measurements
    assert timed.deadline == first and timed.limit_s == 35
    assert Limits().measuring_s(1800) == 1980 and Limits().measuring_s(100) == 160


def test_the_memory_limit_is_read_with_units_and_defaults_to_most_of_the_host() -> None:
    assert memory_limit("16GiB") == 16 * 1024**3
    host = host_memory()
    assert host is not None and host > 0  # Linux: /proc/meminfo, or the container's limit
    assert memory_limit(None) == int(host * 0.8)
    with pytest.raises(ValueError, match="is not a size"):
        memory_limit("lots")


def test_a_relative_location_is_made_absolute_for_the_child() -> None:
    import os

    job = Job.of("models/m", "s3://b/m", Policy())
    assert job.location == os.path.join(os.getcwd(), "models/m")
    assert job.baseline_location == "s3://b/m"


def test_a_benchmark_process_that_cannot_start_is_the_stages_answer() -> None:
    from services.benchmarker.isolated import Runner
    from services.contracts.events import Status

    runner = Runner(Limits(), python="/nonexistent/python")
    report, device = runner.run(Job.of("/m", None, Policy()))
    assert report.status is Status.ERROR and device is None
    assert report.reason.startswith("could not run: could not start the benchmark process:")
