"""Pinned corpus and really trained sample models: offline loading, good beats regressed, cache,
and a nondeterministic copy of good whose tokenizer ships BPE dropout."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.benchmarker import consistency, samples
from services.benchmarker.corpus import (
    DEFAULT_EVAL_DATASET,
    EVAL_MODULES,
    TRAIN_MODULES,
    build_corpus_files,
    load_eval_text,
    load_prompts,
    load_training_text,
)

# The committed files; a change here means every benchmark baseline measured before is void.
TRAIN_SHA256 = "8eef1d9533a2054007dc3d88c9c3b9f5c14dc01c7abea36c874cc6ecd9eda650"
EVAL_SHA256 = "2c87fcb6045bf00d3d3cb86657faf736cec10197b18dc05f59e37a3d31780fd8"
OVERLAP = 200
EVAL_SLICE_CHARS = 20_000


def shared_substring(a: str, b: str, size: int) -> str | None:
    """Some ``size``-character substring of ``b`` that also occurs in ``a``, if there is one."""
    windows = {hash(a[i : i + size]) for i in range(len(a) - size + 1)}
    for i in range(len(b) - size + 1):
        window = b[i : i + size]
        if hash(window) in windows and window in a:
            return window
    return None


def load(directory: Path) -> tuple[Any, Any]:
    """Tokenizer and model exactly as a deployment would load them: offline, safetensors only."""
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        directory, local_files_only=True, use_safetensors=True
    )
    return tokenizer, model


def perplexity(directory: Path, text: str, block: int = 128) -> float:
    """exp(mean next-token NLL) over plain, non-overlapping ``block``-token chunks."""
    tokenizer, model = load(directory)
    ids = tokenizer.backend_tokenizer.encode(text).ids
    usable = len(ids) // block * block
    chunks = torch.tensor(ids[:usable], dtype=torch.long).view(-1, block)
    with torch.no_grad():
        logits = model(input_ids=chunks).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), chunks[:, 1:].reshape(-1))
    return math.exp(nll.item())


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A cache shared by this session's tests, so none of them reads or fills ~/.cache."""
    cache = tmp_path_factory.mktemp("model-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(samples.CACHE_DIR_ENV, str(cache))
        yield cache


@pytest.fixture(scope="session")
def good_model(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return samples.write_trained_model(tmp_path_factory.mktemp("good") / "model", variant="good")


@pytest.fixture(scope="session")
def nondeterministic_model(
    good_model: Path, model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    directory = tmp_path_factory.mktemp("nondeterministic") / "model"
    return samples.write_trained_model(directory, variant="nondeterministic")


@pytest.fixture(scope="session")
def regressed_model(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("regressed") / "model"
    return samples.write_trained_model(directory, variant="regressed")


# --- corpus ---------------------------------------------------------------------------------


def test_eval_text_is_pinned() -> None:
    evaluation = load_eval_text()
    assert evaluation.name == DEFAULT_EVAL_DATASET
    assert evaluation.sha256 == EVAL_SHA256
    assert evaluation.n_bytes == len(evaluation.text.encode("utf-8"))
    assert 40_000 <= evaluation.n_bytes <= 80_000


def test_training_text_is_pinned() -> None:
    raw = load_training_text().encode("utf-8")
    assert hashlib.sha256(raw).hexdigest() == TRAIN_SHA256
    assert 300_000 <= len(raw) <= 600_000


def test_unknown_eval_dataset_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="builtin:preflight-eval-v1"):
        load_eval_text("builtin:nope")


def test_training_and_evaluation_text_share_no_long_substring() -> None:
    assert not set(TRAIN_MODULES) & set(EVAL_MODULES)
    assert shared_substring(load_training_text(), load_eval_text().text, OVERLAP) is None


def test_prompts_are_fifty_unique_short_strings() -> None:
    prompts = load_prompts()
    assert len(prompts) == 50
    assert len(set(prompts)) == 50
    assert all(0 < len(p) <= 40 and p == p.strip() for p in prompts)


def test_corpus_builder_keeps_its_promises(tmp_path: Path) -> None:
    # Docstrings differ between Python releases, so the bytes are not compared; the invariants are.
    digests = build_corpus_files(tmp_path)
    assert set(digests) == {"train-v1.txt", "eval-v1.txt", "prompts-v1.json"}
    train = (tmp_path / "train-v1.txt").read_text("utf-8")
    evaluation = (tmp_path / "eval-v1.txt").read_text("utf-8")
    assert ">>>" not in train and ">>>" not in evaluation
    assert shared_substring(train, evaluation, OVERLAP) is None
    assert json.loads((tmp_path / "prompts-v1.json").read_text("utf-8")) == load_prompts()


# --- sample models: pure parts --------------------------------------------------------------


def test_cache_key_covers_variant_seed_and_training_text() -> None:
    keys = {
        samples.cache_key("good", 0, "a" * 64),
        samples.cache_key("regressed", 0, "a" * 64),
        samples.cache_key("good", 1, "a" * 64),
        samples.cache_key("good", 0, "b" * 64),
    }
    assert len(keys) == 4
    assert samples.cache_key("good", 0, "a" * 64) == samples.cache_key("good", 0, "a" * 64)


def test_regressed_trains_for_far_fewer_steps() -> None:
    assert samples.training_steps("regressed") * 5 <= samples.training_steps("good")


def test_nondeterministic_ships_the_good_weights() -> None:
    assert samples.VARIANTS == ("good", "regressed", "nondeterministic")
    assert samples.trained_as("nondeterministic") == "good"
    assert samples.trained_as("regressed") == "regressed"
    assert samples.training_steps("nondeterministic") == samples.training_steps("good")


def test_cache_dir_comes_from_the_environment_or_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(samples.CACHE_DIR_ENV, "/somewhere/else")
    assert samples.default_cache_dir() == Path("/somewhere/else")
    monkeypatch.delenv(samples.CACHE_DIR_ENV)
    assert samples.default_cache_dir() == Path.home() / ".cache" / "preflight" / "models"


def test_a_crash_while_training_leaves_no_cache_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(directory: Path, variant: samples.Variant, seed: int) -> None:
        (directory / "model.safetensors").write_bytes(b"half a model")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(samples, "_write_model_files", crash)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        samples.write_trained_model(tmp_path / "out", cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
    assert not (tmp_path / "out").exists()


def test_unknown_variant_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown variant.*nondeterministic"):
        samples.write_trained_model(tmp_path, variant="best", cache_dir=tmp_path)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("model", "dropout", "message"),
    [
        ({"type": "BPE", "dropout": None}, 0.0, "must be in"),
        ({"type": "BPE", "dropout": None}, 1.5, "must be in"),
        ({"type": "Unigram", "vocab": []}, 0.1, "needs a BPE tokenizer model, not 'Unigram'"),
        (None, 0.1, "needs a BPE tokenizer model, not None"),
    ],
)
def test_tokenizer_dropout_is_refused_where_it_makes_no_sense(
    tmp_path: Path, model: dict[str, Any] | None, dropout: float, message: str
) -> None:
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": model}))
    with pytest.raises(ValueError, match=message):
        samples.set_tokenizer_dropout(tmp_path, dropout)


def test_tokenizer_dropout_is_set_and_cleared_in_place(tmp_path: Path) -> None:
    spec = {"version": "1.0", "model": {"type": "BPE", "dropout": None, "merges": [["a", "b"]]}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    samples.set_tokenizer_dropout(tmp_path, 0.25)
    assert json.loads((tmp_path / "tokenizer.json").read_text())["model"] == {
        **spec["model"],  # type: ignore[dict-item]
        "dropout": 0.25,
    }
    samples.set_tokenizer_dropout(tmp_path, None)
    assert json.loads((tmp_path / "tokenizer.json").read_text()) == spec


@pytest.mark.parametrize(
    ("dropout", "unstable", "expected"),
    [
        (None, 0, ()),
        (0.1, 30, ("tokenizer applies BPE dropout 0.1", "30/50 prompts tokenized differently")),
        (0.1, 0, ("tokenizer applies BPE dropout 0.1", "0/50 prompts")),
        (None, 2, ("tokenization is random: 2/50 prompts",)),
    ],
)
def test_tokenizer_causes_name_the_dropout_and_the_evidence(
    dropout: float | None, unstable: int, expected: tuple[str, ...]
) -> None:
    causes = consistency.tokenizer_causes(dropout, unstable, 50)
    if not expected:
        assert causes == ()
    else:
        [cause] = causes
        assert all(part in cause for part in expected), cause


# --- sample models: trained (the first test to ask trains, seconds; the rest copy) ----------


def test_good_model_loads_offline_and_generates_the_same_at_temperature_zero(
    good_model: Path,
) -> None:
    tokenizer, model = load(good_model)
    text = load_prompts()[0]
    prompt = tokenizer(text, return_tensors="pt")
    runs = [model.generate(**prompt, max_new_tokens=8, do_sample=False) for _ in range(2)]
    assert runs[0].shape[1] > prompt["input_ids"].shape[1]
    assert torch.equal(runs[0], runs[1])
    assert tokenizer.decode(runs[0][0]).startswith(text)


def test_regressed_model_has_clearly_worse_perplexity(
    good_model: Path, regressed_model: Path
) -> None:
    text = load_eval_text().text[:EVAL_SLICE_CHARS]
    good, regressed = perplexity(good_model, text), perplexity(regressed_model, text)
    vocab = json.loads((good_model / "config.json").read_text())["vocab_size"]
    assert good < vocab / 4, "the good model should have learnt far more than a uniform guess"
    assert regressed >= 1.3 * good, (good, regressed)


def test_second_call_is_a_fast_cache_hit_with_identical_weights(
    good_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_train(directory: Path, variant: samples.Variant, seed: int) -> None:
        raise AssertionError("trained again instead of using the cache")

    monkeypatch.setattr(samples, "_write_model_files", must_not_train)
    started = time.perf_counter()
    again = samples.write_trained_model(tmp_path / "again", variant="good")
    elapsed = time.perf_counter() - started
    assert elapsed < 2.0  # typically a few milliseconds; generous for a loaded machine
    weights = (again / "model.safetensors").read_bytes()
    assert weights == (good_model / "model.safetensors").read_bytes()
    manifest = json.loads((again / samples.MANIFEST).read_text())
    assert manifest == {"model.safetensors": hashlib.sha256(weights).hexdigest()}


def test_nondeterministic_is_the_good_model_with_bpe_dropout_and_a_card_that_says_so(
    good_model: Path, nondeterministic_model: Path
) -> None:
    for name in ("model.safetensors", "config.json", samples.MANIFEST, "tokenizer_config.json"):
        assert (nondeterministic_model / name).read_bytes() == (good_model / name).read_bytes()
    shipped = json.loads((good_model / "tokenizer.json").read_text())
    broken = json.loads((nondeterministic_model / "tokenizer.json").read_text())
    assert shipped["model"]["dropout"] is None
    assert broken["model"]["dropout"] == samples.TOKENIZER_DROPOUT
    broken["model"]["dropout"] = None
    assert broken == shipped, "only the dropout may differ"
    card = (nondeterministic_model / "README.md").read_text()
    assert card.startswith("# preflight sample model (nondeterministic, seed 0)\n")
    assert "BPE dropout 0.1" in card and "greedy" in card
    assert "## Recipe" in card and "Final training loss" in card


def test_nondeterministic_reuses_the_good_cache_entry(
    good_model: Path, model_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_train(directory: Path, variant: samples.Variant, seed: int) -> None:
        raise AssertionError("trained instead of copying the good model")

    monkeypatch.setattr(samples, "_write_model_files", must_not_train)
    entries = sorted(p.name for p in model_cache.iterdir())
    samples.write_trained_model(tmp_path / "nd", variant="nondeterministic")
    assert sorted(p.name for p in model_cache.iterdir()) == entries
    [good_entry] = [e for e in model_cache.iterdir() if e.name.startswith("good-seed0-")]
    cached = json.loads((good_entry / "tokenizer.json").read_text())
    assert cached["model"]["dropout"] is None, "the cached good model must stay untouched"


def test_nondeterministic_tokenizer_splits_the_same_text_differently(
    good_model: Path, nondeterministic_model: Path
) -> None:
    text = " ".join(load_prompts()[:10])
    shipped = AutoTokenizer.from_pretrained(good_model, local_files_only=True)
    broken = AutoTokenizer.from_pretrained(nondeterministic_model, local_files_only=True)
    assert len({tuple(shipped(text).input_ids) for _ in range(5)}) == 1
    # 232 bytes in 56 tokens: ~176 merges, each dropped with p=0.1. Two encodes agreed 0 times
    # in 2000 tries (measured), so five identical splits are out of reach.
    assert len({tuple(broken(text).input_ids) for _ in range(5)}) > 1
    assert broken.decode(broken(text).input_ids) == text, "dropout changes the split, not text"
    assert consistency.bpe_dropout(broken) == samples.TOKENIZER_DROPOUT
    assert consistency.bpe_dropout(shipped) is None


@pytest.mark.parametrize("variant", ["good", "regressed", "nondeterministic"])
def test_model_directory_holds_no_code_and_no_pickles(
    variant: str, request: pytest.FixtureRequest
) -> None:
    directory: Path = request.getfixturevalue(f"{variant}_model")
    names = {p.name for p in directory.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", samples.MANIFEST} <= names
    assert "README.md" in names
    for path in directory.rglob("*"):
        assert path.suffix not in {".py", ".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
        head = path.read_bytes()[:2]
        assert head[:1] != b"\x80", f"{path.name} looks like a pickle"
        assert head != b"PK", f"{path.name} looks like a zip (torch.save) archive"
