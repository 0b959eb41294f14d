"""Pure parts of the benchmarker: divergence, quantiles and the verdict."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from services.benchmarker.consistency import compare_runs, first_divergence
from services.benchmarker.latency import Percentiles
from services.benchmarker.run import verdict as _verdict
from services.contracts.events import CheckResult, Status


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([1, 2, 3], [1, 2, 3], None),
        ([1, 2, 3], [1, 9, 3], 1),
        ([5, 2, 3], [1, 2, 3], 0),
        ([1, 2], [1, 2, 3], 2),  # one run stopped early (EOS): diverges where it ended
        ([], [], None),
    ],
)
def test_first_divergence(a: list[int], b: list[int], expected: int | None) -> None:
    assert first_divergence(a, b) == expected


def test_compare_runs_counts_identical_prompts_and_locates_divergence() -> None:
    first = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    second = [[1, 2, 3], [4, 0, 6], [7, 8, 9]]
    result = compare_runs(first, second, {"batch_size": 1})
    assert (result.prompts, result.identical) == (3, 2)
    assert [(d.prompt_index, d.first_diverging_token) for d in result.divergences] == [(1, 1)]
    assert result.settings == {"batch_size": 1}


def test_nearest_rank_percentiles_are_exact_at_small_samples() -> None:
    p = Percentiles.of([float(x) for x in range(1, 21)])
    assert (p.p50, p.p95) == (10.5, 19.0)
    assert Percentiles.of([7.0]).p95 == 7.0


def check(name: str, status: Status) -> CheckResult:
    return CheckResult(name=name, status=status, reason=f"{name} said {status.value}")


def test_a_failed_assertion_degrades_and_names_it() -> None:
    report = _verdict(
        [check("perplexity", Status.FAILED), check("latency", Status.PASSED)],
        time.perf_counter(),
        "b-1",
        "cpu (2 threads)",
    )
    assert report.status is Status.DEGRADED
    assert report.reason.startswith("perplexity: perplexity said failed")
    assert report.reason.endswith("on cpu (2 threads)")


def test_nothing_measured_is_could_not_run_not_passed() -> None:
    report = _verdict(
        [check("baseline", Status.ERROR), check("perplexity", Status.SKIPPED)],
        time.perf_counter(),
        "b-1",
        "cpu",
    )
    assert report.status is Status.ERROR
    assert report.reason.startswith("could not run")


def test_all_passed_is_passed() -> None:
    report = _verdict(
        [check("perplexity", Status.PASSED), check("consistency", Status.PASSED)],
        time.perf_counter(),
        "b-1",
        "cpu",
    )
    assert report.status is Status.PASSED


def test_a_check_that_could_not_run_never_lets_the_stage_pass() -> None:
    report = _verdict(
        [
            check("baseline", Status.ERROR),
            check("perplexity", Status.SKIPPED),
            check("latency", Status.PASSED),
            check("consistency", Status.PASSED),
        ],
        time.perf_counter(),
        "b-1",
        "cpu",
    )
    assert report.status is Status.ERROR
    assert "baseline: baseline said error" in report.reason


def test_nan_perplexity_fails_instead_of_passing(monkeypatch: pytest.MonkeyPatch) -> None:
    import math
    from types import SimpleNamespace

    from services.benchmarker import run
    from services.benchmarker.perplexity import PerplexityResult
    from services.contracts.policy import BenchmarkPolicy

    def fake(loaded: object, *args: object) -> tuple[PerplexityResult, dict[str, object], bool]:
        value = math.nan if loaded == "candidate" else 100.0
        return PerplexityResult(value, 1.0, 10, 10, 1, 8, 8), {"dtype": "float32"}, False

    monkeypatch.setattr(run, "_measure_perplexity", fake)
    monkeypatch.setattr(run, "_tokenizer_signature", lambda loaded: "same")
    baseline = SimpleNamespace(path=None)
    result = run.perplexity_check("candidate", baseline, BenchmarkPolicy(), None)
    assert result.status is Status.FAILED
    assert "not a finite number" in result.reason


def test_fingerprint_reuses_digests_the_validator_already_computed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.benchmarker.run import model_fingerprint
    from services.stack.samples import write_sample_model
    from services.validator.checks import checksum

    root = tmp_path
    model = write_sample_model(root / "m")
    cache = checksum.DigestCache(root / "digests.sqlite")
    first = model_fingerprint(model, cache)
    reads: list[Path] = []
    real = checksum.sha256_file

    def counting(path: Path, *args: Any, **kwargs: Any) -> str:
        reads.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(checksum, "sha256_file", counting)
    assert model_fingerprint(model, cache) == first
    assert reads == []  # every file came from the cache
    assert model_fingerprint(model) == first  # same digest without a cache
    cache.close()


def test_a_stage_where_no_check_ran_is_skipped_never_passed() -> None:
    # `preflight benchmark` with every check off used to print "passed" (issue #13).
    names = ("perplexity", "latency", "consistency")
    report = _verdict([check(n, Status.SKIPPED) for n in names], time.perf_counter(), "b", "cpu")
    assert report.status is Status.SKIPPED
    assert report.reason.startswith("skipped: no check ran (perplexity: perplexity said skipped")


def test_perplexity_over_zero_tokens_could_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    # exp(0/0) read "1.000 vs 1.000, passed" for a model whose tokenizer produced nothing.
    from services.benchmarker import run
    from services.benchmarker.perplexity import PerplexityResult
    from services.contracts.policy import BenchmarkPolicy

    nothing = PerplexityResult(
        perplexity=1.0, bits_per_byte=0.0, tokens=0, bytes=100, windows=0, max_length=256,
        stride=128,
    )  # fmt: skip
    monkeypatch.setattr(run, "_measure_perplexity", lambda *a, **k: (nothing, {}, False))
    result = run.perplexity_check(object(), None, BenchmarkPolicy(), None)
    assert result.status is Status.ERROR
    assert "scored 0 tokens" in result.reason
