"""Benign files of every supported format, written with the format's own tools where installable,
and structurally broken variants of them."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import numpy as np

from services.stack.samples import write_sample_model


def write_hf_safetensors(directory: Path) -> Path:
    return write_sample_model(directory, layers=2, hidden=32, heads=4, vocab=64, positions=32)


def write_gguf(directory: Path, *, truncate_by: int = 0) -> Path:
    import gguf

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_context_length(2048)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_description("A tiny llama-shaped GGUF for tests")
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.standard_normal((128, 64)).astype(np.float32))
    for i in range(2):
        writer.add_tensor(
            f"blk.{i}.attn_q.weight", rng.standard_normal((64, 64)).astype(np.float16)
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if truncate_by:
        with path.open("r+b") as fh:
            fh.truncate(path.stat().st_size - truncate_by)
    return path


def write_onnx(directory: Path, *, external: bool) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    directory.mkdir(parents=True, exist_ok=True)
    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), name="W")
    node = helper.make_node("MatMul", ["X", "W"], ["Y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 64])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = directory / "model.onnx"
    if external:
        onnx.save_model(
            model, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0
        )
    else:
        onnx.save_model(model, str(path))
    return path


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def write_saved_model(
    directory: Path, *, shards: int = 1, drop_shard: int | None = None, keras: bool = False
) -> Path:
    """TensorFlow is not installable here: a SavedModel laid out as TF writes it, with a
    protobuf SavedModel (schema version + one MetaGraphDef) and a checkpoint index that ends
    in the table footer magic. `keras`: with the keras_metadata.pb tf.keras writes beside it
    (a SavedModelMetadata of one Dense layer)."""
    directory.mkdir(parents=True, exist_ok=True)
    meta_graph = b"\x0a\x04\x0a\x02tf"  # MetaGraphDef { meta_info_def { tags... } } framing
    pb = b"\x08" + _varint(1) + b"\x12" + _varint(len(meta_graph)) + meta_graph
    (directory / "saved_model.pb").write_bytes(pb)
    variables = directory / "variables"
    variables.mkdir(exist_ok=True)
    (variables / "variables.index").write_bytes(b"\x00" * 40 + bytes.fromhex("57fb808b247547db"))
    for i in range(shards):
        if i != drop_shard:
            (variables / f"variables.data-{i:05d}-of-{shards:05d}").write_bytes(b"\x00" * 256)
    if keras:
        layer = json.dumps({"class_name": "Dense", "config": {"name": "dense", "units": 4}})
        node = b"\x0a" + _varint(len(layer)) + layer.encode()  # nodes { metadata: "..." }
        (directory / "keras_metadata.pb").write_bytes(b"\x0a" + _varint(len(node)) + node)
    return directory


def write_keras_h5(directory: Path, *, lambda_layer: bool = False) -> Path:
    import h5py

    directory.mkdir(parents=True, exist_ok=True)
    layers = [{"class_name": "Dense", "config": {"units": 4}}]
    if lambda_layer:
        layers.append({"class_name": "Lambda", "config": {"function": "gASV..."}})
    path = directory / "model.h5"
    with h5py.File(path, "w") as h5:
        h5.attrs["model_config"] = json.dumps(
            {"class_name": "Sequential", "config": {"layers": layers}}
        )
        h5.create_dataset("model_weights/dense/kernel", data=np.ones((4, 4), np.float32))
    return path


def write_keras_zip(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.keras"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("metadata.json", json.dumps({"keras_version": "3.6.0"}))
        zf.writestr(
            "config.json", json.dumps({"class_name": "Sequential", "config": {"layers": []}})
        )
        zf.writestr("model.weights.h5", b"\x89HDF\r\n\x1a\n" + b"\x00" * 64)
    return path


def write_safetensors_raw(
    path: Path, header: object, data: bytes, *, declared_len: int | None = None
) -> Path:
    """A safetensors file with an arbitrary (possibly lying) header."""
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        struct.pack("<Q", declared_len if declared_len is not None else len(raw)) + raw + data
    )
    return path
