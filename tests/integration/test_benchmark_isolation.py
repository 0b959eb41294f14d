"""The benchmark runs in a child process the benchmarker stops: hostile tokenizers, built as a
reviewer built them, end as a report, never as a dead, hung or memory-starved benchmarker."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.benchmarker.isolated import Job, Limits, Runner
from services.benchmarker.latency import LATENCY_PROMPT
from services.benchmarker.run import run_benchmarks
from services.contracts.events import StageReport, Status
from services.contracts.policy import Policy, PolicyFile
from services.stack.samples import write_sample_model

pytest.importorskip("transformers")
pytestmark = pytest.mark.integration

FAST = {
    "consistency_prompts": 3,
    "latency_runs": 2,
    "latency_warmup_runs": 0,
    "max_length": 64,
    "stride": 64,
}


@pytest.fixture(scope="module")
def runner() -> Iterator[Runner]:
    """One runner with a spare, as the service has: each job after the first finds a warm
    child (the cold start is what the other tests' own runners pay)."""
    shared = Runner(Limits(), keep_spare=True)
    shared.start()
    try:
        yield shared
    finally:
        shared.close()


def fast_policy() -> Policy:
    return PolicyFile().resolve(model="m", overrides={"benchmark": FAST})


def model_with_tokenizer(directory: Path, **changes: object) -> Path:
    model = write_sample_model(directory, layers=1, hidden=16, heads=2, vocab=32)
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    (model / "tokenizer.json").write_text(json.dumps(tokenizer | changes))
    return model


def by_name(report: StageReport) -> dict[str, tuple[Status, str]]:
    return {c.name: (c.status, c.reason) for c in report.checks}


def test_in_a_child_a_benchmark_reports_what_it_reports_in_process(
    tmp_path: Path, runner: Runner
) -> None:
    model = write_sample_model(tmp_path / "m", layers=1, hidden=16, heads=2, vocab=32)
    here, device = run_benchmarks(str(model), str(model), fast_policy(), device="cpu")
    there, child_device = runner.run(
        Job.of(str(model), str(model), fast_policy(), device="cpu", service="b-1")
    )
    assert there.status == here.status == Status.PASSED, there.reason
    assert child_device == device
    assert there.service == "b-1"
    assert {k: v[0] for k, v in by_name(there).items()} == {
        k: v[0] for k, v in by_name(here).items()
    }
    [p_here] = [c for c in here.checks if c.name == "perplexity"]
    [p_there] = [c for c in there.checks if c.name == "perplexity"]
    assert p_there.value == p_here.value  # the same measurement, not another one


def test_a_spare_child_serves_one_job_and_another_is_started(tmp_path: Path) -> None:
    model = write_sample_model(tmp_path / "m", layers=1, hidden=16, heads=2, vocab=32)
    runner = Runner(Limits(), keep_spare=True)
    runner.start()
    try:
        first = runner._spare
        assert first is not None
        report, _ = runner.run(Job.of(str(model), None, fast_policy(), device="cpu"))
        assert report.status is Status.PASSED, report.reason
        assert not first.alive()  # used once, then gone
        assert runner._spare is not None and runner._spare is not first
    finally:
        runner.close()
    assert runner._spare is None


def allocation_bomb(directory: Path) -> Path:
    # Review 14 b06: a 200 KB tokenizer.json. Normalizing the 47 KB evaluation text asks
    # tokenizers for gigabytes; under an address-space cap Rust aborts the process.
    replace = {"type": "Replace", "pattern": {"String": "e"}, "content": "x" * 200_000}
    return model_with_tokenizer(directory, normalizer=replace)


def test_a_tokenizer_that_takes_all_memory_stops_the_child_not_the_benchmarker(
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    report, _ = Runner(Limits(memory_bytes=1_500_000_000)).run(
        Job.of(str(allocation_bomb(tmp_path / "m")), None, Policy(), device="cpu")
    )
    checks = by_name(report)
    assert report.status is Status.ERROR
    status, reason = checks["perplexity"]
    assert status is Status.ERROR
    assert "over its limit of 1.4 GiB (PREFLIGHT_BENCHMARK_MEMORY_LIMIT)" in reason
    assert "during perplexity" in reason
    for later in ("latency", "consistency"):  # not measured, and it says so
        assert checks[later] == (
            Status.ERROR,
            "not run: the benchmark process was stopped during perplexity",
        )
    assert time.monotonic() - started < 120


def test_a_rust_abort_is_the_stage_answer_with_what_rust_said(tmp_path: Path) -> None:
    capped = tmp_path / "python-capped"  # the reviewer's cap, so that the allocation fails
    capped.write_text(f'#!/bin/sh\nexec prlimit --as=4000000000 -- {sys.executable} "$@"\n')
    capped.chmod(0o755)
    report, _ = Runner(Limits(), python=str(capped)).run(
        Job.of(str(allocation_bomb(tmp_path / "m")), None, Policy(), device="cpu")
    )
    status, reason = by_name(report)["perplexity"]
    assert report.status is Status.ERROR and status is Status.ERROR
    assert "the benchmark process died (SIGABRT) during perplexity" in reason
    assert "memory allocation of" in reason  # the line Rust printed as it aborted


def test_one_tokenizer_call_that_never_returns_is_stopped_at_the_hard_limit(
    tmp_path: Path,
) -> None:
    # Review 14 b02: WordPiece with no pre-tokenizer and an unbounded word length makes the
    # whole evaluation text one word, cubic to encode: one call of an hour and more.
    from services.benchmarker.corpus import load_eval_text

    text = load_eval_text("builtin:preflight-eval-v1").text
    vocab: dict[str, int] = {"<|endoftext|>": 0, "[UNK]": 1}
    for char in sorted(set(text)):
        vocab.setdefault(char, len(vocab))
        vocab.setdefault("##" + char, len(vocab))
    wordpiece = {
        "type": "WordPiece",
        "unk_token": "[UNK]",
        "continuing_subword_prefix": "##",
        "max_input_chars_per_word": 10**9,
        "vocab": vocab,
    }
    model = model_with_tokenizer(
        tmp_path / "m", model=wordpiece, pre_tokenizer=None, post_processor=None, decoder=None
    )
    started = time.monotonic()
    report, _ = Runner(Limits(grace_s=1)).run(
        Job.of(str(model), None, Policy(), device="cpu", time_limit_s=2)
    )
    took = time.monotonic() - started
    status, reason = by_name(report)["perplexity"]
    assert report.status is Status.ERROR and status is Status.ERROR
    assert reason == (
        "the benchmark process ran past its hard limit of 3 s "
        "(PREFLIGHT_BENCHMARK_TIME_LIMIT_S) during perplexity and was stopped"
    )
    assert took < 60, took


def test_a_tokenizer_that_inflates_the_prompt_is_refused_before_a_forward_pass(
    tmp_path: Path, runner: Runner
) -> None:
    # Review 14 b04: only the latency prompt grows (to 40,000 tokens here; 600,000 held one
    # prefill for minutes); perplexity and consistency are measured as usual.
    replace = {"type": "Replace", "pattern": {"String": LATENCY_PROMPT}, "content": "x" * 40_000}
    model = model_with_tokenizer(tmp_path / "m", normalizer=replace)
    report, _ = runner.run(Job.of(str(model), None, fast_policy(), device="cpu"))
    checks = by_name(report)
    status, reason = checks["latency"]
    assert status is Status.ERROR
    assert "InflatedInput: the tokenizer turned the latency prompt (36 bytes) into 40,000" in reason
    assert checks["consistency"][0] is Status.PASSED
    assert checks["perplexity"][0] is Status.SKIPPED  # measured; no previous version


def test_a_relative_vocabulary_name_reads_nothing_from_the_benchmarkers_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runner: Runner
) -> None:
    # Review 14 F3: tokenizer_config.json names vocab.json/merges.txt, files the folder has,
    # and the tokenizer opened them against the working directory: a host file's content
    # came back in the load error.
    model = write_sample_model(tmp_path / "m", layers=1, hidden=16, heads=2, vocab=32)
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    (model / "tokenizer.json").unlink()
    (model / "vocab.json").write_text(json.dumps(tokenizer["model"]["vocab"]))
    (model / "merges.txt").write_text("#version: 0.2\n")
    config = json.loads((model / "tokenizer_config.json").read_text())
    config |= {"tokenizer_class": "GPT2Tokenizer", "vocab": "vocab.json", "merges": "merges.txt"}
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    host = tmp_path / "service-dir"
    host.mkdir()
    (host / "vocab.json").write_text('{"db_password=hunter2": 0}')
    (host / "merges.txt").write_text("#version: 0.2\nhunter2 secret\n")
    monkeypatch.chdir(host)
    policy = fast_policy()
    here, _ = run_benchmarks(str(model), None, policy, device="cpu")
    assert "hunter2" in here.reason  # the exploit, in this process
    there, _ = runner.run(Job.of(str(model), None, policy, device="cpu"))
    assert "hunter2" not in there.model_dump_json()


def test_a_tokenizer_that_throws_its_input_away_is_not_a_passed_benchmark(
    tmp_path: Path, runner: Runner
) -> None:
    # Review 15: the whole 47 KB evaluation text became "a b", one token scored; the
    # benchmark passed, perplexity compared as "-99.8%".
    replace = {"type": "Replace", "pattern": {"Regex": "[\\s\\S]+"}, "content": "a b"}
    model = model_with_tokenizer(tmp_path / "m", normalizer=replace)
    report, _ = runner.run(Job.of(str(model), None, fast_policy(), device="cpu"))
    status, reason = by_name(report)["perplexity"]
    assert report.status is Status.ERROR and status is Status.ERROR
    assert "the tokenizer turned the evaluation text (47,627 bytes) into" in reason
    assert "fewer than one per 64 bytes" in reason


def test_closing_the_runner_stops_the_running_benchmark_at_once(tmp_path: Path) -> None:
    """Review 15: a service shutting down waited for the running benchmark to end."""
    import threading

    model = write_sample_model(tmp_path / "m", layers=1, hidden=16, heads=2, vocab=32)
    heavy = PolicyFile().resolve(model="m", overrides={"benchmark": {"latency_runs": 100}})
    runner = Runner(Limits(), keep_spare=True)
    answers: list[StageReport] = []
    job = Job.of(str(model), None, heavy, device="cpu")
    worker = threading.Thread(target=lambda: answers.append(runner.run(job)[0]))
    worker.start()
    for _ in range(600):  # until it measures
        if runner.current is not None and runner.current.phase == "measuring":
            break
        time.sleep(0.1)
    started = time.monotonic()
    runner.close()
    worker.join(timeout=30)
    assert not worker.is_alive() and time.monotonic() - started < 10
    [report] = answers
    assert report.status is Status.ERROR
    assert "the benchmark process was stopped: the benchmarker is shutting down during" in (
        report.reason
    )
    assert runner._spare is None  # and no new spare after the close
