"""The benchmarker's fetch progress lines (services/benchmarker/loading.progress_logger), on a
clock the test moves: the first call, at most one line per interval, the end, and a cache hit."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from services.benchmarker import loading

MIB = 1024**2


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> list[float]:
    """The loading module's clock, at a time the test moves; its fetch lines captured."""
    now = [1000.0]
    monkeypatch.setattr(
        "services.benchmarker.loading.time", SimpleNamespace(monotonic=lambda: now[0])
    )
    caplog.set_level(logging.INFO, logger="preflight.benchmarker.fetch")
    return now


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "preflight.benchmarker.fetch"]


def test_the_first_call_then_one_line_per_interval_then_the_end(
    clock: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    report = loading.progress_logger("s3://b/m/", every_s=10.0)
    report(0, 100 * MIB)
    for step in range(1, 40):  # a call every 0.5 s for 19.5 s
        clock[0] += 0.5
        report(step * MIB, 100 * MIB)
    clock[0] += 3.0
    report(100 * MIB, 100 * MIB)
    assert lines(caplog) == [
        "fetching s3://b/m/: 0 B of 100.0 MiB (0%)",
        "fetching s3://b/m/: 20.0 MiB of 100.0 MiB (20%)",
        "fetching s3://b/m/: 100.0 MiB of 100.0 MiB (100%)",
    ]


def test_an_end_within_a_second_of_the_last_line_adds_none(
    clock: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    report = loading.progress_logger("s3://b/m/", every_s=10.0)
    report(0, 4 * MIB)
    clock[0] += 0.4
    report(4 * MIB, 4 * MIB)  # the "fetched" line that follows says the rest
    assert lines(caplog) == ["fetching s3://b/m/: 0 B of 4.0 MiB (0%)"]


def test_a_model_found_whole_in_the_cache_says_so(
    clock: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    report = loading.progress_logger("hf://acme/m@v1", every_s=10.0)
    report(7 * MIB, 7 * MIB)
    assert lines(caplog) == ["fetching hf://acme/m@v1: all 7.0 MiB already in the model cache"]
