"""VRAM fit: weights from headers + KV cache + stated overhead against the target GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.contracts.events import Status, TargetHardware
from services.stack.samples import write_sparse_sharded_model
from services.validator.checks.base import CheckContext
from services.validator.checks.inventory import build_inventory
from services.validator.checks.vram import GIB, attention_from_config, check_vram
from tests.unit.validator import formats


def vram(directory: Path, **target: object) -> tuple[Status, str, dict[str, object]]:
    result = check_vram(
        build_inventory(str(directory)), CheckContext(target=TargetHardware.model_validate(target))
    )
    return result.status, result.reason, result.details


def test_7b_fits_24_gib_at_4k_and_not_16_gib(tmp_path: Path) -> None:
    write_sparse_sharded_model(tmp_path)
    status, reason, terms = vram(tmp_path, gpu_memory_gb=24)
    assert status is Status.PASSED, reason
    # Llama-2-7B: 6.74e9 params in bf16; KV: 2 x 32 layers x 32 heads x 128 x 4096 ctx x 2 bytes.
    assert terms["weights_bytes"] == 2 * 6_738_415_616
    assert terms["kv_cache_bytes"] == 2 * 32 * 32 * 128 * 4096 * 2
    assert "headroom" in reason
    status, reason, _ = vram(tmp_path, gpu_memory_gb=16)
    assert status is Status.FAILED
    assert "does not fit" in reason and "short by" in reason


def test_gqa_shrinks_the_kv_cache_and_batch_and_context_grow_it(tmp_path: Path) -> None:
    write_sparse_sharded_model(
        tmp_path / "mha",
        layers=2,
        hidden=256,
        intermediate=512,
        vocab=100,
        heads=8,
        kv_heads=8,
        shards=1,
    )
    write_sparse_sharded_model(
        tmp_path / "gqa",
        layers=2,
        hidden=256,
        intermediate=512,
        vocab=100,
        heads=8,
        kv_heads=2,
        shards=1,
    )
    _, _, mha = vram(tmp_path / "mha", context_length=1024)
    _, _, gqa = vram(tmp_path / "gqa", context_length=1024)
    assert mha["kv_cache_bytes"] == 4 * gqa["kv_cache_bytes"]  # type: ignore[operator]
    _, _, bigger = vram(tmp_path / "gqa", context_length=2048, batch_size=4)
    assert bigger["kv_cache_bytes"] == 8 * gqa["kv_cache_bytes"]  # type: ignore[operator]


def test_serving_dtype_scales_float_weights(tmp_path: Path) -> None:
    write_sparse_sharded_model(
        tmp_path, layers=2, hidden=256, intermediate=512, vocab=100, heads=8, kv_heads=8, shards=1
    )
    _, _, bf16 = vram(tmp_path)
    _, _, fp32 = vram(tmp_path, dtype="float32")
    assert fp32["weights_bytes"] == 2 * bf16["weights_bytes"]  # type: ignore[operator]


def test_context_beyond_the_model_maximum_fails(tmp_path: Path) -> None:
    write_sparse_sharded_model(
        tmp_path, layers=2, hidden=256, intermediate=512, vocab=100, heads=8, kv_heads=8, shards=1
    )
    status, reason, _ = vram(tmp_path, context_length=8192)
    assert status is Status.FAILED
    assert "requested context 8192 exceeds the model's maximum 4096" in reason


def test_gguf_metadata_gives_the_attention_shape(tmp_path: Path) -> None:
    formats.write_gguf(tmp_path)
    status, reason, terms = vram(tmp_path, context_length=1024)
    assert status is Status.PASSED, reason
    assert terms["attention_source"] == "GGUF metadata"
    assert terms["kv_cache_bytes"] == 2 * 2 * 2 * 16 * 1024 * 2


def test_unknown_attention_shape_is_stated_not_hidden(tmp_path: Path) -> None:
    formats.write_onnx(tmp_path, external=False)
    status, reason, _ = vram(tmp_path)
    assert status is Status.PASSED
    assert "KV cache unknown" in reason


@pytest.mark.parametrize(
    ("config", "kv_heads", "head_dim"),
    [
        ({"num_hidden_layers": 2, "num_attention_heads": 8, "hidden_size": 512}, 8, 64),
        (
            {
                "num_hidden_layers": 2,
                "num_attention_heads": 8,
                "num_key_value_heads": 2,
                "hidden_size": 512,
            },
            2,
            64,
        ),
        (
            {"num_hidden_layers": 2, "num_attention_heads": 8, "hidden_size": 512, "head_dim": 128},
            8,
            128,
        ),
        ({"n_layer": 2, "n_head": 4, "n_embd": 256, "multi_query": True}, 1, 64),
        (
            {"text_config": {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64}},
            4,
            16,
        ),
    ],
)
def test_attention_defaults(config: dict[str, object], kv_heads: int, head_dim: int) -> None:
    attention = attention_from_config(json.loads(json.dumps(config)))
    assert attention is not None
    assert (attention.kv_heads, attention.head_dim) == (kv_heads, head_dim)


def test_report_shows_every_term(tmp_path: Path) -> None:
    write_sparse_sharded_model(
        tmp_path, layers=2, hidden=256, intermediate=512, vocab=100, heads=8, kv_heads=8, shards=1
    )
    _, reason, terms = vram(tmp_path, gpu_memory_gb=1)
    for key in (
        "weights_bytes",
        "kv_cache_bytes",
        "overhead_bytes",
        "overhead_rule",
        "total_bytes",
        "available_bytes",
        "headroom_bytes",
    ):
        assert key in terms
    assert terms["available_bytes"] == GIB
    assert "weights" in reason and "KV cache" in reason and "overhead" in reason
