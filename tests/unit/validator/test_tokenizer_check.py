"""The tokenizer check: a language model without tokenizer files is named before anything loads."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from services.contracts.events import CheckResult, Status
from services.contracts.policy import PolicyFile
from services.stack.samples import write_sample_model, write_sparse_sharded_model
from services.validator.checks.base import CheckContext
from services.validator.checks.inventory import build_inventory
from services.validator.checks.tokenizer import BPE_PAIR, CONFIG_ONLY, LOOKED_FOR, check_tokenizer
from services.validator.validate import validate

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def check(path: Path) -> CheckResult:
    return check_tokenizer(build_inventory(str(path)), CheckContext())


def without_tokenizer(directory: Path) -> Path:
    model = write_sample_model(directory, layers=1, hidden=16, heads=2, vocab=32)
    for name in TOKENIZER_FILES:
        (model / name).unlink()
    return model


def weights_with_config(directory: Path, config: dict[str, object]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({"w": np.zeros((4, 4), np.float32)}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))
    return directory


# ---- the samples the demo and the tests deploy ship a tokenizer --------------------------------


@pytest.mark.parametrize("write", [write_sample_model, write_sparse_sharded_model])
def test_the_generated_samples_pass_with_their_tokenizer(
    write: Callable[[Path], Path], tmp_path: Path
) -> None:
    model = write(tmp_path / "m")
    res = check(model)
    assert res.status is Status.PASSED, res.reason
    assert "tokenizer.json" in res.reason


def test_the_sample_tokenizer_round_trips_text(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")  # the benchmark extra
    model = write_sample_model(tmp_path / "m", vocab=512)
    tokenizer = tokenizers.Tokenizer.from_file(str(model / "tokenizer.json"))
    ids = tokenizer.encode("Hello, world!").ids
    assert max(ids) < 512 and 1 not in ids  # inside the embedding; no unknown token
    assert tokenizer.decode(ids) == "Hello, world!"


# ---- a language model without one is blocked, saying what was looked for ---------------------


def test_a_causal_lm_without_tokenizer_files_fails_naming_what_was_looked_for(
    tmp_path: Path,
) -> None:
    res = check(without_tokenizer(tmp_path / "m"))
    assert res.status is Status.FAILED
    assert res.reason.startswith("GPT2LMHeadModel is a language model without tokenizer files")
    for name in ("tokenizer.json", "tokenizer.model", "vocab.json + merges.txt", "vocab.txt"):
        assert name in res.reason
    assert "found none" in res.reason
    assert "validation.checks.tokenizer: false" in res.reason
    assert res.details["looked_for"] == list(LOOKED_FOR)
    assert res.details["found"] == []


def test_the_stage_blocks_before_anything_is_loaded(tmp_path: Path) -> None:
    report = validate(str(without_tokenizer(tmp_path / "m")))
    assert report.status is Status.FAILED
    assert report.blocks
    failed = [c.name for c in report.checks if c.status is Status.FAILED]
    assert failed == ["tokenizer"]
    assert report.reason.startswith("tokenizer: GPT2LMHeadModel is a language model without")


def test_the_policy_switch_turns_it_off(tmp_path: Path) -> None:
    policy = PolicyFile(models={"m": {"validation": {"checks": {"tokenizer": False}}}}).resolve(
        model="m"
    )
    report = validate(str(without_tokenizer(tmp_path / "m")), policy=policy.validation)
    assert report.status is Status.PASSED, report.reason
    by_name = {c.name: c for c in report.checks}
    assert by_name["tokenizer"].status is Status.SKIPPED
    assert "tokenizer (disabled by policy)" in report.reason


NO_VOCABULARY = {
    "config-without-vocabulary": {"tokenizer_config.json": '{"tokenizer_class": "LlamaTokenizer"}'},
    "vocab-without-merges": {"vocab.json": "{}"},  # BPE needs its merges too
    "merges-without-vocab": {"special_tokens_map.json": "{}", "merges.txt": "#version: 0.2\n"},
}


@pytest.mark.parametrize("files", NO_VOCABULARY.values(), ids=list(NO_VOCABULARY))
def test_files_that_hold_no_vocabulary_are_named_and_fail(
    files: dict[str, str], tmp_path: Path
) -> None:
    model = without_tokenizer(tmp_path / "m")
    for name, text in files.items():
        (model / name).write_text(text)
    res = check(model)
    assert res.status is Status.FAILED
    named = ", ".join(n for n in (*CONFIG_ONLY, *BPE_PAIR) if n in files)  # in reporting order
    assert f"found none (present, but no vocabulary: {named});" in res.reason


def test_a_tokenizer_in_a_subdirectory_does_not_count(tmp_path: Path) -> None:
    # from_pretrained(path) reads the tokenizer beside config.json, not below it.
    model = without_tokenizer(tmp_path / "m")
    (model / "extra").mkdir()
    (model / "extra" / "tokenizer.json").write_text("{}")
    assert check(model).status is Status.FAILED


# ---- every layout a tokenizer comes in passes --------------------------------------------------


@pytest.mark.parametrize(
    "files",
    [
        {"tokenizer.json": "{}"},
        {"tokenizer.model": "sentencepiece"},
        {"tokenizer.model.v3": "sentencepiece"},
        {"spiece.model": "sentencepiece"},
        {"sentencepiece.bpe.model": "sentencepiece"},
        {"spm.model": "sentencepiece"},
        {"source.spm": "sentencepiece", "vocab.json": "{}"},
        {"vocab.json": "{}", "merges.txt": "#version: 0.2\n"},
        {"vocab.txt": "[PAD]\n[UNK]\n"},
        {"qwen.tiktoken": "IQ== 0\n"},
        {"tekken.json": "{}"},
        {"tokenizer_config.json": '{"tokenizer_class": "ByT5Tokenizer"}'},
    ],
    ids=lambda files: "+".join(files),
)
def test_every_tokenizer_layout_passes(files: dict[str, str], tmp_path: Path) -> None:
    model = without_tokenizer(tmp_path / "m")
    for name, text in files.items():
        (model / name).write_text(text)
    res = check(model)
    assert res.status is Status.PASSED, res.reason
    assert res.reason.startswith("GPT2LMHeadModel: ")


def test_a_gguf_tokenizer_beside_config_json_counts(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    model = without_tokenizer(tmp_path / "m")
    writer = gguf.GGUFWriter(str(model / "model.gguf"), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["<s>", "a", "b"])
    writer.add_tensor("token_embd.weight", np.zeros((3, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    res = check(model)
    assert res.status is Status.PASSED, res.reason
    assert "model.gguf (GGUF tokenizer metadata)" in res.reason


# ---- what is not a language model is not affected ----------------------------------------------

LANGUAGE_MODELS = {
    "llama": {"architectures": ["LlamaForCausalLM"], "model_type": "llama"},
    "t5": {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5"},
    "bert-mlm": {"architectures": ["BertForMaskedLM"], "model_type": "bert"},
    "llava": {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava"},
    "xlm": {"architectures": ["XLMWithLMHeadModel"], "model_type": "xlm"},
    "config-only-mistral": {"model_type": "mistral"},  # saved from a config: no architectures
}
NOT_LANGUAGE_MODELS = {
    "vit": {"architectures": ["ViTForImageClassification"], "model_type": "vit"},
    "resnet": {"architectures": ["ResNetForImageClassification"], "model_type": "resnet"},
    "wav2vec2": {"architectures": ["Wav2Vec2Model"], "model_type": "wav2vec2"},
    "detr": {"architectures": ["DetrForObjectDetection"], "model_type": "detr"},
    "no-architecture": {"model_type": "vit"},
    "not-transformers": {"hidden": 16, "layers": 2},
}


@pytest.mark.parametrize("config", LANGUAGE_MODELS.values(), ids=list(LANGUAGE_MODELS))
def test_language_models_are_recognised_by_architecture_or_model_type(
    config: dict[str, object], tmp_path: Path
) -> None:
    res = check(weights_with_config(tmp_path / "m", config))
    assert res.status is Status.FAILED, res.reason
    assert "is a language model without tokenizer files" in res.reason


@pytest.mark.parametrize("config", NOT_LANGUAGE_MODELS.values(), ids=list(NOT_LANGUAGE_MODELS))
def test_other_models_are_skipped_saying_why(config: dict[str, object], tmp_path: Path) -> None:
    model = weights_with_config(tmp_path / "m", config)
    res = check(model)
    assert res.status is Status.SKIPPED
    assert res.reason.startswith("not a language model (")
    assert validate(str(model)).status is Status.PASSED


def test_a_model_without_config_json_is_skipped(tmp_path: Path) -> None:
    model = weights_with_config(tmp_path / "m", {})
    (model / "config.json").unlink()
    assert check(model).reason == "no config.json: nothing says it is a language model"
    single = check(model / "model.safetensors")
    assert single.status is Status.SKIPPED
    assert single.reason == "a single file, no config.json: nothing says it is a language model"
