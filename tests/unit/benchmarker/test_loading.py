"""The loader runs no code from outside torch: an attention a config names is replaced by sdpa
when it is a Hub kernel (which transformers would download and run) or anything not built in."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any, ClassVar

import pytest

from services.stack.samples import write_sample_model

pytest.importorskip("transformers")


def model_asking_for(directory: Path, attention: object) -> Path:
    model = write_sample_model(directory, layers=1, hidden=16, heads=2, vocab=32)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"attn_implementation": attention}))
    return model


@pytest.mark.parametrize(
    "attention",
    [
        "kernels-community/flash-attn2",
        "evil/kernel@v1:attention",
        "flash_attention_2",
        {"": "kernels-community/flash-attn2"},  # one per sub-model: not hashable
    ],
)
def test_an_attention_that_is_not_torch_s_own_loads_as_sdpa_and_nothing_is_fetched(
    attention: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.benchmarker.loading import load_model

    lookups: list[Any] = []

    def no_network(*args: Any, **kwargs: Any) -> Any:
        lookups.append(args[:2])
        raise OSError("the loader reached for the network")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    loaded = load_model(str(model_asking_for(tmp_path / "m", attention)), device="cpu")
    assert loaded.model.config._attn_implementation == "sdpa"
    assert lookups == []  # before the fix: huggingface.co, 443 (and the Hub token read)


def test_a_built_in_attention_is_kept(tmp_path: Path) -> None:
    from services.benchmarker.loading import load_model

    loaded = load_model(str(model_asking_for(tmp_path / "m", "eager")), device="cpu")
    assert loaded.model.config._attn_implementation == "eager"


def test_a_model_without_sdpa_gets_eager_not_a_failed_load() -> None:
    """transformers refuses sdpa for such a model with a message that never says "sdpa", so
    the choice is made from the model class, before loading."""
    from services.benchmarker.loading import _attention

    class Config:
        _attn_implementation = "kernels-community/flash-attn2"

    class WithoutSdpa:
        _supports_sdpa = False

    class WithSdpa:
        _supports_sdpa = True

    class Auto:
        _model_mapping: ClassVar[dict[type, type]] = {Config: WithoutSdpa}

    assert _attention(Config(), Auto) == "eager"
    Auto._model_mapping = {Config: WithSdpa}
    assert _attention(Config(), Auto) == "sdpa"
    Auto._model_mapping = {}
    assert _attention(Config(), Auto) == "eager"
    Config._attn_implementation = "sdpa"
    assert _attention(Config(), Auto) is None


def test_the_uploader_s_generation_settings_are_not_used(tmp_path: Path) -> None:
    """generation_config.json applies to every generate() the benchmark runs: these asked for
    hundreds of GB (200,000 beams; a static cache of 1e9 positions for a 32-token output)."""
    from services.benchmarker.loading import load_model

    model = write_sample_model(tmp_path / "m", layers=1, hidden=16, heads=2, vocab=32)
    hostile = {
        "num_beams": 200_000,
        "cache_implementation": "static",
        "cache_config": {"max_cache_len": 1_000_000_000},
        "repetition_penalty": 3.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    (model / "generation_config.json").write_text(json.dumps(hostile))
    generation = load_model(str(model), device="cpu").model.generation_config
    assert generation.num_beams in (None, 1)  # None: generate()'s default, one beam
    assert generation.cache_implementation is None
    assert generation.repetition_penalty in (None, 1.0)
    assert (generation.bos_token_id, generation.eos_token_id) == (1, 2)
