"""A tokenizer.json that makes the tokenizers library panic is a result, not a dead benchmarker:
pyo3 raises `PanicException`, a BaseException that `except Exception` lets through."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.contracts.events import Status
from services.contracts.policy import Policy
from services.runtime import faults
from services.stack.samples import write_sample_model

pytest.importorskip("transformers")


def model_with_tokenizer(directory: Path, **changes: object) -> Path:
    model = write_sample_model(directory, layers=1, hidden=16, heads=2, vocab=32)
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    (model / "tokenizer.json").write_text(json.dumps(tokenizer | changes))
    return model


def test_a_charsmap_that_does_not_parse_is_a_load_error(tmp_path: Path) -> None:
    from services.benchmarker.loading import LoadError, load_model

    bad = {"type": "Precompiled", "precompiled_charsmap": "AQ=="}  # one byte: no charsmap
    model = model_with_tokenizer(tmp_path / "m", normalizer=bad)
    with pytest.raises(LoadError, match=r"PanicException: Precompiled.*Rust library panicked"):
        load_model(str(model), device="cpu")


def test_a_regex_that_runs_out_of_backtracking_is_an_error_check_not_a_crash(
    tmp_path: Path,
) -> None:
    from services.benchmarker.run import run_benchmarks

    # Oniguruma gives up on the corpus text and tokenizers panics, at the first long input.
    split = {
        "type": "Split",
        "pattern": {"Regex": r"(?:\w+\s?)+$"},
        "behavior": "Isolated",
        "invert": False,
    }
    model = model_with_tokenizer(tmp_path / "m", pre_tokenizer=split)
    policy = Policy.model_validate({"benchmark": {"latency": False, "consistency": False}})
    report, _ = run_benchmarks(str(model), None, policy, device="cpu")
    [perplexity] = [c for c in report.checks if c.name == "perplexity"]
    assert report.status == Status.ERROR
    assert perplexity.status == Status.ERROR
    assert "PanicException: Onig" in perplexity.reason


@pytest.mark.parametrize("stop", [KeyboardInterrupt(), SystemExit(1), GeneratorExit()])
def test_what_a_process_stops_with_is_never_contained(stop: BaseException) -> None:
    assert not faults.is_contained(stop)


def test_a_panic_and_ordinary_errors_are_contained() -> None:
    from tokenizers import Tokenizer

    tokenizer = {
        "version": "1.0",
        "normalizer": {"type": "Precompiled", "precompiled_charsmap": "AQ=="},
        "model": {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"},
    }
    with pytest.raises(BaseException, match="Precompiled") as caught:
        Tokenizer.from_str(json.dumps(tokenizer))
    assert not isinstance(caught.value, Exception)  # why `except Exception` was not enough
    assert faults.is_contained(caught.value)
    assert faults.is_contained(MemoryError())
    assert faults.describe(ValueError("first\nsecond")) == "ValueError: first"
    assert faults.describe(ValueError()) == "ValueError"
