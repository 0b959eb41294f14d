"""Format detection by content and header-only structural checks, on real and broken files."""

from __future__ import annotations

import json
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest

from services.contracts.events import Status
from services.stack.samples import write_sparse_sharded_model
from services.validator.checks.base import CheckContext
from services.validator.checks.formats import check_format
from services.validator.checks.headers import GGML_TYPES, read_gguf
from services.validator.checks.inventory import MAX_JSON_BYTES, Kind, build_inventory
from services.validator.checks.structure import check_structure
from tests.unit.validator import formats


def run(directory: Path) -> tuple[Status, str, Status, str]:
    inv = build_inventory(str(directory))
    ctx = CheckContext()
    fmt = check_format(inv, ctx)
    st = check_structure(inv, ctx)
    return fmt.status, fmt.reason, st.status, st.reason


def kinds(directory: Path) -> dict[str, Kind]:
    return {f.rel: f.kind for f in build_inventory(str(directory)).files}


@pytest.mark.parametrize(
    ("writer", "expected"),
    [
        (
            formats.write_hf_safetensors,
            {"model.safetensors": Kind.SAFETENSORS, "config.json": Kind.CONFIG},
        ),
        (formats.write_gguf, {"model.gguf": Kind.GGUF}),
        (lambda d: formats.write_onnx(d, external=False), {"model.onnx": Kind.ONNX}),
        (lambda d: formats.write_onnx(d, external=True), {"model.onnx": Kind.ONNX}),
        (
            formats.write_saved_model,
            {
                "saved_model.pb": Kind.TF_SAVED_MODEL,
                "variables/variables.index": Kind.TF_VARIABLES_INDEX,
            },
        ),
        (
            lambda d: formats.write_saved_model(d, keras=True),
            {"saved_model.pb": Kind.TF_SAVED_MODEL, "keras_metadata.pb": Kind.KERAS_METADATA},
        ),
        (formats.write_keras_h5, {"model.h5": Kind.KERAS_H5}),
        (formats.write_keras_zip, {"model.keras": Kind.KERAS_ZIP}),
    ],
)
def test_every_supported_format_is_recognised_and_sound(
    tmp_path: Path, writer: object, expected: dict[str, Kind]
) -> None:
    writer(tmp_path)  # type: ignore[operator]
    found = kinds(tmp_path)
    for rel, kind in expected.items():
        assert found[rel] is kind
    fmt, fmt_reason, st, st_reason = run(tmp_path)
    assert fmt is Status.PASSED, fmt_reason
    assert st in (Status.PASSED, Status.SKIPPED), st_reason


def test_format_is_found_by_content_not_extension(tmp_path: Path) -> None:
    formats.write_hf_safetensors(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").rename(tmp_path / "m" / "weights.bin")
    formats.write_gguf(tmp_path / "g")
    (tmp_path / "g" / "model.gguf").rename(tmp_path / "g" / "model.safetensors")
    assert kinds(tmp_path / "m")["weights.bin"] is Kind.SAFETENSORS
    assert kinds(tmp_path / "g")["model.safetensors"] is Kind.GGUF


def test_onnx_external_data_is_tied_to_its_model(tmp_path: Path) -> None:
    formats.write_onnx(tmp_path, external=True)
    inv = build_inventory(str(tmp_path))
    assert check_format(inv, CheckContext()).status is Status.PASSED
    assert inv.named("weights.bin") is not None
    assert inv.named("weights.bin").kind is Kind.ONNX_EXTERNAL_DATA  # type: ignore[union-attr]


def test_missing_onnx_external_data_fails(tmp_path: Path) -> None:
    formats.write_onnx(tmp_path, external=True)
    (tmp_path / "weights.bin").unlink()
    fmt, reason, _, _ = run(tmp_path)
    assert fmt is Status.FAILED
    assert "external data file weights.bin is missing" in reason


def test_truncated_onnx_external_data_fails(tmp_path: Path) -> None:
    formats.write_onnx(tmp_path, external=True)
    (tmp_path / "weights.bin").write_bytes(b"\x00" * 100)
    _, _, st, reason = run(tmp_path)
    assert st is Status.FAILED
    assert "runs past its 100-byte file" in reason


def test_an_unrecognisable_file_fails_with_what_was_found(tmp_path: Path) -> None:
    formats.write_hf_safetensors(tmp_path)
    (tmp_path / "blob.dat").write_bytes(b"\xde\xad\xbe\xef" * 8)
    fmt, reason, _, _ = run(tmp_path)
    assert fmt is Status.FAILED
    assert "blob.dat: unsupported or unrecognisable" in reason
    assert "de ad be ef" in reason


def test_a_json_file_too_large_to_read_says_so(tmp_path: Path) -> None:
    """A tokenizer.json past the size any check parses is named as too large, not as bytes
    the validator does not recognise."""
    formats.write_hf_safetensors(tmp_path)
    big = tmp_path / "tokenizer.json"
    big.write_bytes(b'{"model": ')
    with big.open("r+b") as f:
        f.truncate(MAX_JSON_BYTES + 1)  # sparse: no 64 MiB written
    fmt, reason, _, _ = run(tmp_path)
    assert fmt is Status.FAILED
    assert "tokenizer.json: unsupported or unrecognisable (too large to read as JSON: " in reason
    assert f"{MAX_JSON_BYTES + 1:,} bytes" in reason
    assert "first bytes" not in reason


@pytest.mark.parametrize(
    "name",
    ["tokenizer.model.v3", "sentencepiece.model", "spm.model", "source.spm", "target.spm",
     "cl100k_base.tiktoken"],
)  # fmt: skip
def test_every_tokenizer_vocabulary_the_tokenizer_check_counts_is_recognised(
    tmp_path: Path, name: str
) -> None:
    """Each is a vocabulary a model ships beside its weights (a SentencePiece protobuf, or
    tiktoken's base64 ranks): never "unrecognisable"."""
    formats.write_hf_safetensors(tmp_path)
    (tmp_path / name).write_bytes(b"\x0a\x0b\x0a\x05<unk>\x15\x00\x00\x00\x00\x18\x02")
    fmt, reason, _, _ = run(tmp_path)
    assert fmt is Status.PASSED, reason


def test_a_directory_without_weights_fails(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    fmt, reason, _, _ = run(tmp_path)
    assert fmt is Status.FAILED
    assert "no model weights found" in reason


def test_sparse_7b_sharded_directory_passes_header_checks(tmp_path: Path) -> None:
    write_sparse_sharded_model(tmp_path)
    fmt, _, st, reason = run(tmp_path)
    assert (fmt, st) == (Status.PASSED, Status.PASSED), reason
    assert "291 tensors" in reason
    assert sum(p.stat().st_blocks for p in tmp_path.iterdir()) * 512 < 10 * 1024 * 1024


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("truncate", "truncated: tensors need"),
        ("lie", "bytes but its offsets span"),
        ("oversized", "exceeds the format's 100 MB limit"),
        ("past_end", "runs past the end"),
        ("hole", "hole of 16 bytes before b"),
        ("overlap", "b overlaps the tensor before it"),
        ("not_json", "header is not valid JSON"),
        ("bad_dtype", "unknown dtype 'F7'"),
    ],
)
def test_broken_safetensors_are_caught(tmp_path: Path, damage: str, expected: str) -> None:
    path = tmp_path / "model.safetensors"
    a = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    b = {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}
    if damage == "truncate":
        formats.write_safetensors_raw(path, {"a": a, "b": b}, b"\x00" * 20)
    elif damage == "lie":
        formats.write_safetensors_raw(path, {"a": {**a, "shape": [8]}, "b": b}, b"\x00" * 32)
    elif damage == "oversized":
        formats.write_safetensors_raw(path, {"a": a}, b"\x00" * 16, declared_len=200 * 1024 * 1024)
    elif damage == "past_end":
        formats.write_safetensors_raw(path, {"a": a}, b"\x00" * 16, declared_len=10_000)
    elif damage == "hole":
        formats.write_safetensors_raw(
            path, {"a": a, "b": {**b, "data_offsets": [32, 48]}}, b"\x00" * 48
        )
    elif damage == "overlap":
        formats.write_safetensors_raw(
            path, {"a": a, "b": {**b, "data_offsets": [8, 24]}}, b"\x00" * 24
        )
    elif damage == "not_json":
        path.write_bytes((12).to_bytes(8, "little") + b"{not json!!}" + b"\x00" * 8)
    elif damage == "bad_dtype":
        formats.write_safetensors_raw(path, {"a": {**a, "dtype": "F7"}}, b"\x00" * 16)
    inv = build_inventory(str(tmp_path))
    if inv.files[0].kind is not Kind.SAFETENSORS:  # too broken to be recognised at all
        result = check_format(inv, CheckContext())
        assert result.status is Status.FAILED
        return
    result = check_structure(inv, CheckContext())
    assert result.status is Status.FAILED
    assert expected in result.reason


def test_shard_index_naming_a_tensor_its_shard_lacks_fails(tmp_path: Path) -> None:
    write_sparse_sharded_model(
        tmp_path, layers=2, hidden=64, intermediate=128, vocab=100, heads=4, kv_heads=4, shards=2
    )
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00001-of-00002.safetensors"
    index["weight_map"]["lm_head.weight"] = "model-00003-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    _, _, st, reason = run(tmp_path)
    assert st is Status.FAILED
    assert (
        "model.layers.9.mlp.up_proj.weight is not in its shard model-00001-of-00002.safetensors"
        in reason
    )
    assert "shard model-00003-of-00002.safetensors is missing" in reason


def test_shard_index_naming_a_pickle_shard_fails(tmp_path: Path) -> None:
    """transformers picks a shard's reader by its name: an index mapping tensors to a .bin made
    it torch.load a folder file, use_safetensors or not."""
    write_sparse_sharded_model(
        tmp_path, layers=2, hidden=64, intermediate=128, vocab=100, heads=4, kv_heads=4, shards=1
    )
    pickled = tmp_path / "model-00001-of-00001.bin"
    with zipfile.ZipFile(pickled, "w") as archive:  # a torch.save zip: data.pkl inside
        archive.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = dict.fromkeys(index["weight_map"], pickled.name)
    index_path.write_text(json.dumps(index))
    _, _, st, reason = run(tmp_path)
    assert st is Status.FAILED
    assert (
        "shard model-00001-of-00001.bin is not a safetensors file (PyTorch zip (data.pkl)): "
        "the loader would read it with torch.load"
    ) in reason


def test_config_that_disagrees_with_the_tensors_fails(tmp_path: Path) -> None:
    write_sparse_sharded_model(
        tmp_path, layers=2, hidden=64, intermediate=128, vocab=100, heads=4, kv_heads=4, shards=1
    )
    config = json.loads((tmp_path / "config.json").read_text())
    config |= {"hidden_size": 128, "vocab_size": 50, "num_hidden_layers": 3}
    (tmp_path / "config.json").write_text(json.dumps(config))
    _, _, st, reason = run(tmp_path)
    assert st is Status.FAILED
    assert "hidden size 128 but the embedding is 100 x 64" in reason
    assert "vocab_size 50 but the embedding has 100 rows" in reason
    assert "3 layers in config, tensors under 'model.layers.' for 2 of them (missing 2)" in reason


def test_truncated_gguf_is_caught(tmp_path: Path) -> None:
    formats.write_gguf(tmp_path, truncate_by=1000)
    _, _, st, reason = run(tmp_path)
    assert st is Status.FAILED
    assert "truncated" in reason


def test_gguf_header_is_read_like_gguf_py_writes_it(tmp_path: Path) -> None:
    import gguf

    path = formats.write_gguf(tmp_path)
    header = read_gguf(path)
    assert header.architecture == "llama"
    assert header.arch_value("block_count") == 2
    assert [t.name for t in header.tensors][:1] == ["token_embd.weight"]
    assert header.tensors[0].nbytes == 128 * 64 * 4
    assert header.problems == []
    for ggml_type, (name, block, size) in GGML_TYPES.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)] == (block, size), name


def test_gguf_with_a_tensor_name_twice_is_refused(tmp_path: Path) -> None:
    """gguf's writer refuses to write one; ggml's reader refuses to load one. A dict of
    tensors would count it once and say nothing."""
    path = formats.write_gguf(tmp_path)
    data = path.read_bytes()
    assert data.count(b"blk.1.attn_q") == 1
    path.write_bytes(data.replace(b"blk.1.attn_q", b"blk.0.attn_q"))
    _, _, st, reason = run(tmp_path)
    assert st is Status.FAILED
    assert "tensor 'blk.0.attn_q.weight' is named 2 times (llama.cpp refuses the file)" in reason


def test_gguf_with_a_lying_tensor_count_is_refused(tmp_path: Path) -> None:
    path = formats.write_gguf(tmp_path)
    data = bytearray(path.read_bytes())
    data[8:16] = (2**40).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    _, _, st, reason = run(tmp_path)
    assert st is Status.FAILED
    assert "implausible counts" in reason


def test_saved_model_with_a_missing_variables_shard_fails(tmp_path: Path) -> None:
    formats.write_saved_model(tmp_path, shards=2, drop_shard=1)
    _, _, st, reason = run(tmp_path)
    assert st is Status.FAILED
    assert "variables shard 00001-of-00002 is missing" in reason


def test_truncated_pytorch_style_zip_fails(tmp_path: Path) -> None:
    formats.write_keras_zip(tmp_path)
    path = tmp_path / "model.keras"
    path.write_bytes(path.read_bytes()[:-40])
    fmt, freason, st, sreason = run(tmp_path)
    assert Status.FAILED in (fmt, st), (freason, sreason)


def test_symlink_out_of_the_model_is_reported(tmp_path: Path) -> None:
    formats.write_hf_safetensors(tmp_path / "m")
    (tmp_path / "secret.txt").write_text("x")
    (tmp_path / "m" / "notes.txt").symlink_to(tmp_path / "secret.txt")
    fmt, reason, _, _ = run(tmp_path / "m")
    assert fmt is Status.FAILED
    assert "symlink pointing outside the model" in reason
    shutil.rmtree(tmp_path / "m")


@pytest.mark.timeout(10)
def test_a_fifo_is_reported_and_never_opened(tmp_path: Path) -> None:
    import os

    formats.write_hf_safetensors(tmp_path)
    os.mkfifo(tmp_path / "extra.bin")  # opening it for reading would block forever
    fmt, reason, _, _ = run(tmp_path)
    assert fmt is Status.FAILED
    assert "extra.bin: not a regular file" in reason


def test_layer_tensors_named_from_the_root_count(tmp_path: Path) -> None:
    """BLOOM's and GPT-2's own checkpoints name layers h.0. with no prefix."""
    from safetensors.numpy import save_file

    np = pytest.importorskip("numpy")
    tmp_path.mkdir(exist_ok=True)
    tensors = {"word_embeddings.weight": np.zeros((32, 8), np.float32)}
    tensors |= {f"h.{i}.mlp.weight": np.zeros((8, 8), np.float32) for i in range(2)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"n_layer": 2, "hidden_size": 8}))
    _, _, st, reason = run(tmp_path)
    assert st is Status.PASSED, reason
    (tmp_path / "config.json").write_text(json.dumps({"n_layer": 3, "hidden_size": 8}))
    _, _, st, reason = run(tmp_path)
    assert "3 layers in config, tensors under 'h.' for 2 of them (missing 2)" in reason


@pytest.mark.parametrize("embedding", [True, False])
def test_a_config_far_bigger_than_its_weights_fails(tmp_path: Path, embedding: bool) -> None:
    """The review's bypass of the layer check: one 8-element tensor per layer makes the names
    and counts match (or no embedding skips that test), and 40 layers of 8192 made the loader
    allocate about 120 GiB from a 1 MB folder. What the weights hold cannot be faked."""
    from safetensors.numpy import save_file

    np = pytest.importorskip("numpy")
    tensors = {f"h.{i}.ln_1.weight": np.zeros((8,), np.float32) for i in range(40)}
    if embedding:
        tensors["wte.weight"] = np.zeros((32, 8192), np.float16)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    config = {"model_type": "gpt2", "n_layer": 40, "n_embd": 8192, "vocab_size": 32}
    (tmp_path / "config.json").write_text(json.dumps(config))
    _, _, st, reason = run(tmp_path)
    assert st is Status.FAILED
    assert "declares at least 5,368,971,264 parameters (40 layers of hidden size 8192)" in reason
    assert "the loader would build the rest from random numbers" in reason


@pytest.mark.parametrize("case", ["albert", "opt350m", "mtp", "qwen2vl", "t5_deeper_decoder"])
def test_real_layouts_that_differ_from_the_simple_one_pass(tmp_path: Path, case: str) -> None:
    """Review 14: shared layers (ALBERT), a factorised embedding (ALBERT, OPT-350m), an extra
    multi-token-prediction layer (DeepSeek-V3), a vision tower's blocks (Qwen2-VL) and a decoder
    deeper than the encoder (t5-efficient-*-dl*) all failed structure. Only missing layers do."""
    from safetensors.numpy import save_file

    np = pytest.importorskip("numpy")
    hidden, vocab = 32, 32

    def layers(prefix: str, count: int, width: int = hidden) -> dict[str, tuple[int, ...]]:
        return {f"{prefix}{i}.attn.weight": (width, width) for i in range(count)}

    config: dict[str, object] = {"hidden_size": hidden, "vocab_size": vocab}
    shapes: dict[str, tuple[int, ...]] = {}
    if case == "albert":
        config |= {"num_hidden_layers": 12, "num_hidden_groups": 1, "embedding_size": 8}
        shapes = {"albert.embeddings.word_embeddings.weight": (vocab, 8)}
        shapes |= layers("albert.encoder.albert_layer_groups.0.albert_layers.", 1)
    elif case == "opt350m":
        config |= {"num_hidden_layers": 2, "word_embed_proj_dim": 16}
        shapes = {"model.decoder.embed_tokens.weight": (vocab, 16)}
        shapes |= layers("model.decoder.layers.", 2)
    elif case == "mtp":
        config |= {"num_hidden_layers": 3, "num_nextn_predict_layers": 1}
        shapes = {"model.embed_tokens.weight": (vocab, hidden)} | layers("model.layers.", 4)
    elif case == "qwen2vl":
        config |= {"num_hidden_layers": 2, "vision_config": {"depth": 4}}
        shapes = {"model.embed_tokens.weight": (vocab, hidden)} | layers("model.layers.", 2)
        shapes |= layers("visual.blocks.", 4)
    else:
        config |= {"num_layers": 2, "num_decoder_layers": 4, "d_model": hidden}
        shapes = {"shared.weight": (vocab, hidden)} | layers("encoder.block.", 2)
        shapes |= layers("decoder.block.", 4)
    save_file({k: np.zeros(s, np.float32) for k, s in shapes.items()}, str(tmp_path / "m.st"))
    (tmp_path / "m.st").rename(tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config))
    _, _, st, reason = run(tmp_path)
    assert st is Status.PASSED, reason


@pytest.mark.parametrize(
    "extra",
    [
        {"intermediate_size": 4_000_000},
        {"intermediate_size": 4096, "num_local_experts": 2000},
        {"num_attention_heads": 2, "head_dim": 4_000_000},
        {"n_layers": 40, "num_hidden_layers": None},  # MPT names its layer count n_layers
        # GPT-2's learned position table, not in the weights: 10^7 rows of hidden size.
        {"model_type": "gpt2", "n_positions": 10_000_000},
        # A vision tower the weights lack (Gemma 3's SigLIP, 2048 x 10 layers).
        {"vision_config": {"hidden_size": 2048, "num_hidden_layers": 10}},
        # Review 15: more layers than the layer check counts, a patch position table, BART's
        # positions, BERT's token types.
        {"vision_config": {"hidden_size": 64, "num_hidden_layers": 1_000_001}},
        {"vision_config": {"hidden_size": 2048, "image_size": 2000 * 14, "patch_size": 14}},
        {"model_type": "bart", "max_position_embeddings": 4_000_000},
        {"model_type": "bert", "type_vocab_size": 4_000_000},
    ],
)
def test_a_config_whose_other_sizes_outgrow_the_weights_fails(
    tmp_path: Path, extra: dict[str, object]
) -> None:
    """Review 14: 300 KB folders grew to 2-4 GB through keys the bound did not read."""
    from safetensors.numpy import save_file

    np = pytest.importorskip("numpy")
    tensors = {"model.embed_tokens.weight": np.zeros((32, 64), np.float32)}
    tensors |= {f"model.layers.{i}.attn.weight": np.zeros((64, 64), np.float32) for i in range(1)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    config = {"hidden_size": 64, "num_hidden_layers": 1, "vocab_size": 32} | extra
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v}))
    _, _, st, reason = run(tmp_path)
    assert st is Status.FAILED
    assert "the loader would build the rest from random numbers" in reason


@pytest.mark.parametrize(
    ("config", "params"),
    [
        (
            {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
             "num_local_experts": 8, "vocab_size": 32000},
            46.7e9,
        ),
        (
            {"hidden_size": 7168, "num_hidden_layers": 61, "num_attention_heads": 128,
             "intermediate_size": 18432, "moe_intermediate_size": 2048,
             "n_routed_experts": 256, "vocab_size": 129280},
            671e9,
        ),
        (
            {"hidden_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 8,
             "head_dim": 256, "intermediate_size": 16384, "vocab_size": 256000},
            2.5e9,
        ),
    ],
)  # fmt: skip
def test_real_models_even_packed_to_2_bits_are_within_the_bound(
    config: dict[str, int], params: float
) -> None:
    """Mixtral-8x7B, DeepSeek-V3, Gemma-2B: 2-bit weights packed 16 to an int32 element."""
    from services.validator.checks.structure import PARAMETER_SLACK, _least_per_layer

    hidden = config["hidden_size"]
    declared = config["num_hidden_layers"] * _least_per_layer(config, hidden)
    declared += config["vocab_size"] * hidden
    assert params / 16 * PARAMETER_SLACK >= declared
