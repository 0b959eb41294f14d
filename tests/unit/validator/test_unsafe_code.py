"""The unsafe-code check: hostile files fail, named, and never run; benign models pass."""

from __future__ import annotations

import io
import json
import pickle
import random
import struct
import subprocess
import sys
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from picklescan.scanner import SafetyLevel, _list_globals, scan_file_path
from safetensors.numpy import save_file

from services.contracts.events import CheckResult, Status
from services.validator.checks import hdf5, unsafe_code
from services.validator.checks.base import CheckContext
from services.validator.checks.formats import resolve_external_data
from services.validator.checks.inventory import build_inventory
from services.validator.checks.unsafe_code import SAFE_GLOBALS, FindingKind, check_unsafe_code
from tests.unit.validator import fixtures, hostile
from tests.unit.validator.fixtures import BENIGN, HOSTILE
from tests.unit.validator.hostile import marker


def scan(path: Path) -> CheckResult:
    """As validate runs it: after the format check has tied ONNX external data to its model."""
    inv, ctx = build_inventory(str(path)), CheckContext()
    resolve_external_data(inv, ctx)
    return check_unsafe_code(inv, ctx)


def findings(res: CheckResult) -> list[str]:
    return [f"{f['file']}: {f['what']}" for f in res.details["findings"]]


# Every hostile fixture, and what its findings must say (each substring in some finding).
EXPECTED: dict[str, tuple[str, ...]] = {
    "reduce_os_system": ("model.pkl: imports os.system",),
    "reduce_os_system_pickled": ("imports posix.system",),
    "torch_zip_payload": ("pytorch_model.bin: archive/data.pkl: imports os.system",),
    "zip_duplicate_data_pkl": ("'archive/data.pkl' appears 2 times", "imports os.system"),
    "memo_stack_global": ("imports os.system",),
    "memo_across_pickles": ("imports os.system",),
    "importlib_getattr_chain": ("imports importlib.import_module", "imports builtins.getattr"),
    "importlib_getattr_static_chain": (
        "imports importlib.import_module",
        "imports inspect.getattr_static",
    ),
    "payload_then_broken_tail": (
        "imports os.system",
        "unknown opcode 0xff (after 1 complete pickle)",
    ),
    "benign_then_garbage": ("pickle does not load: at byte",),
    "truncated_payload": ("imports os.system", "(truncated)"),
    "pickle_zip_polyglot": ("imports os.system", "pickle does not load"),
    "protocol0_unknown_extension": ("weights.dat: imports os.system",),
    "object_npy": ("objects.npy: array of dtype object holds pickled objects",),
    "object_npy_payload": ("holds pickled objects", "embedding.npy: imports os.system"),
    "npz_object_array": ("arrays.npz: objs.npy: array of dtype object",),
    "zip_path_traversal": ("entry '../evil.py' climbs out of the archive",),
    "zip_absolute_path": ("entry '/etc/cron.d/evil' has an absolute path",),
    "zip_symlink": ("entry 'weights.bin' is a symbolic link",),
    "zip_bomb": ("zip bomb: entry 'weights.bin' expands to 1.0 GiB",),
    "zip_bomb_many_entries": ("zip bomb: expands to 1.2 GiB",),
    "legacy_tar_checkpoint": ("model.pt: tar archive",),
    "keras_lambda_zip": ("config.json: Keras Lambda layer 'lambda'",),
    "keras_module_reference_zip": ("config calls os.system",),
    "keras_lambda_h5": ("model.h5: model_config: Keras Lambda layer 'lambda'",),
    "saved_model_keras_lambda": ("keras_metadata.pb declares a Keras Lambda layer",),
    "saved_model_keras_lambda_past_64k": ("keras_metadata.pb declares a Keras Lambda layer",),
    "safetensors_that_is_a_pickle": (
        "model.pt: read as a pickle from byte 0 (pickle.load reads any file): imports os.system",
    ),
    "zip64_locator_to_a_second_directory": ("zip64 locator points at byte",),
    "npz_object_array_in_a_tensor_record": ("x/data/0.npy: array of dtype object",),
    "zip_member_pickle_for_pandas": ("weights.zip: weights.npy: imports os.system",),
    "keras_zip_with_a_data_pkl": ("model.keras: config.json: Keras Lambda layer",),
    "tensorflow_shard_that_is_a_pickle": (
        "model.data-00000-of-00001.pt: read as a pickle from byte 0 (pickle.load reads any "
        "file): imports os.system",
    ),
    "config_trust_remote_code": ("config.json: sets trust_remote_code: true",),
    "config_auto_map": ("config.json: auto_map loads code: AutoModel -> modeling_x.XModel",),
    "config_hub_kernel_attention": (
        "config.json: attn_implementation 'kernels-community/flash-attn2' is a kernel on the "
        "Hugging Face Hub",
    ),
    "config_hub_kernel_per_submodel": ("config.json: _attn_implementation 'evil/kern@v1' is a",),
    "tokenizer_config_vocab_outside": (
        "tokenizer_config.json: vocab names '/etc/preflight/credentials.json', a file outside",
        "tokenizer_config.json: merges names '../../merges.txt', a file outside the model",
    ),
    "tokenizer_config_vocab_relative": (
        "tokenizer_config.json: vocab names 'credentials.json', not a file of the model (a "
        "relative name is opened from the working directory)",
    ),
    "special_tokens_map_vocab_outside": (
        "special_tokens_map.json: vocab names '/etc/preflight/vocab.json', a file outside",
    ),
    "fast_tokenizer_files_outside": (
        "fast_tokenizer_files names 'tokenizer.1.json/../../../etc/hostname', a file outside",
        "fast_tokenizer_files names 'tokenizer.4.0.0.json', not a file of the model",
    ),
    "special_tokens_map_tokenizer_file_outside": (
        "special_tokens_map.json: tokenizer_file names '/etc/preflight/tokenizer.json', a file "
        "outside the model",
    ),
    "tokenizer_config_gguf_file_outside": (
        "tokenizer_config.json: gguf_file names '../../host.gguf', a file outside the model",
    ),
    "config_transformers_weights_bin": (
        "config.json: transformers_weights names 'adapter_model.bin', not a safetensors file: "
        "transformers would read it with torch.load",
    ),
    "tokenizer_config_auto_map": (
        'tokenizer_config.json: auto_map loads code: AutoTokenizer -> ["tokenization_x',
    ),
    "python_file": ("modeling_x.py: Python source shipped with the model",),
    "frame_evasion_pkl": (
        "model.pkl: pickle does not load: at byte 11: BINBYTES runs 2 bytes past the end of "
        "its FRAME",
        "FRAME-boundary evasion",
    ),
    "frame_evasion_torch_zip": (
        "pytorch_model.bin: archive/data.pkl: pickle does not load: at byte 11: BINBYTES runs",
    ),
    "frame_evasion_torch_legacy": ("model.pt: pickle does not load", "FRAME-boundary evasion"),
    "frame_inside_frame": ("a FRAME starts 14 bytes before the previous frame is consumed",),
    "frame_tail_after_stop": (
        "model.pt: pickle does not load: at byte",
        "STOP leaves 6 bytes of its FRAME unread",
        "(after 3 complete pickles)",
    ),
    "tuple_without_mark": ("pickle does not load: at byte 6: TUPLE without a MARK before it",),
    "stack_underflow": ("at byte 9: SETITEM on an empty stack (stack underflow)",),
    "memo_get_unset": ("BINGET 7: nothing stored in the memo there",),
    "int_base0_unknown_file": ("model.pkl: imports os.system",),
    "short_binstring_stack_global": ("model.pkl: imports os.system",),
    "frame_evasion_without_proto": ("runs 2 bytes past the end of its FRAME",),
    "tar_named_like_json": ("pytorch_model.bin: tar archive: not scanned",),
    "zip_two_central_directories": ("but the end record says", "readers disagree"),
    "zip_overlapping_members": ("entries 'm0.pkl' and 'm1.pkl' overlap",),
    "onnx_external_data_torch_payload": ("pytorch_model.bin: archive/data.pkl: imports os.system",),
    "onnx_external_data_pickle_payload": ("weights.bin: imports os.system",),
    "nul_in_module_name": ("weights.bin: imports os.system",),
    "nul_in_long_stack_global_module": ("weights.bin: imports os.system",),
    "nul_after_int": ("weights.bin: imports os.system",),
    "template_opening_like_gguf": (
        "chat_template.jinja: template: line 1: reads attributes __init__ and __globals__",
    ),
    "template_opening_like_safetensors": (
        "chat_template.jinja: template: line 1: reads attributes __init__ and __globals__",
    ),
    "zip_end_record_at_the_window_edge": (
        "model.safetensors: also a zip found from its end record: payload.pkl: imports os.system",
    ),
    "onnx_external_data_long_name_payload": (
        "weights.bin: imports os.<a name over 512 characters> (a constant name too long",
    ),
    "legacy_tar_without_magic": ("model.pt: tar archive",),
    "onnx_external_data_v7_tar": ("model.pt: tar archive",),
    "onnx_external_data_tokenizer_config": ("tokenizer_config.json: auto_map loads code",),
    "keras_lambda_h5_user_block": (
        "model.h5: also an HDF5 file (superblock at byte 512): model_config: Keras Lambda layer",
    ),
    "onnx_external_data_h5_user_block": (
        "model.h5: also an HDF5 file (superblock at byte 512): model_config: Keras Lambda layer",
    ),
    "pickle_in_hdf5_user_block": ("pytorch_model.bin: imports os.system",),
    "safetensors_holding_hdf5": (
        "model.h5: also an HDF5 file (superblock at byte 512): model_config: Keras Lambda layer",
    ),
    "json_user_block_hdf5": (
        "model.h5: also an HDF5 file (superblock at byte 512): model_config: Keras Lambda layer",
    ),
    "keras_zip_after_safetensors": (
        "model.keras: also a keras-zip found from its end record: config.json: Keras Lambda layer",
    ),
    "legacy_tar_named_like_a_pickle": ("pytorch_model.bin: tar archive",),
    "keras_zip_hdf5_polyglot": (
        "model.keras: also an HDF5 file (superblock at byte 4,096): model_config: Keras Lambda",
    ),
} | fixtures.EXPECTED


def test_every_hostile_fixture_has_an_expectation() -> None:
    assert set(EXPECTED) == set(HOSTILE)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_file_fails_naming_what_would_run_and_nothing_runs(
    name: str, tmp_path: Path
) -> None:
    res = scan(HOSTILE[name](tmp_path))
    found = findings(res)
    assert res.status is Status.FAILED
    for expected in EXPECTED[name]:
        assert any(expected in f for f in found), (expected, found)
    assert res.reason.startswith(found[0])
    assert not marker(tmp_path).exists()


@pytest.mark.parametrize("name", sorted(BENIGN))
def test_benign_model_passes(name: str, tmp_path: Path) -> None:
    res = scan(BENIGN[name](tmp_path))
    assert res.status is Status.PASSED, res.reason
    assert res.details["findings"] == []
    assert res.details["scanned"]


def test_a_tokenizer_config_naming_its_own_files_or_an_author_s_paths_passes(
    tmp_path: Path,
) -> None:
    """Real tokenizer configs carry `name_or_path` and `tokenizer_file` with their authors'
    absolute paths; the loader does not read those over the folder's files."""
    model = hostile.write_safetensors_dir(tmp_path / "m")
    for own in ("vocab.json", "merges.txt", "tokenizer.json"):
        (model / own).write_text("{}")
    (model / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "name_or_path": "/home/author/llama",
                "tokenizer_file": "/home/author/.cache/tokenizer.json",
                "vocab": "vocab.json",
                "merges": "merges.txt",
                "fast_tokenizer_files": ["tokenizer.json"],
            }
        )
    )
    (model / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>"}))
    res = scan(model)
    assert res.status is Status.PASSED, res.reason
    weights = hostile._model_with_config(tmp_path / "w", transformers_weights="model.safetensors")
    assert scan(weights).status is Status.PASSED


@pytest.mark.parametrize(
    "attention",
    ["sdpa", "eager", "flash_attention_2", {"text_config": "sdpa", "vision_config": None}],
)
def test_a_built_in_attention_is_no_hub_kernel(attention: object, tmp_path: Path) -> None:
    res = scan(hostile._model_with_config(tmp_path / "m", attn_implementation=attention))
    assert res.status is Status.PASSED, res.reason


# How the real loader would read each payload, so that "the marker is absent" above means the
# check never ran it, not that the payload is broken. Run in a child process, in tmp_path.
LOADERS: dict[str, str] = {
    "reduce_os_system": "pickle.load(open(path, 'rb'))",
    "reduce_os_system_pickled": "pickle.load(open(path, 'rb'))",
    "memo_stack_global": "pickle.load(open(path, 'rb'))",
    "importlib_getattr_chain": "pickle.load(open(path, 'rb'))",
    "importlib_getattr_static_chain": "pickle.load(open(path, 'rb'))",
    "payload_then_broken_tail": "pickle.load(open(path, 'rb'))",
    "truncated_payload": "pickle.load(open(path, 'rb'))",
    "pickle_zip_polyglot": "pickle.load(open(path, 'rb'))",
    "protocol0_unknown_extension": "pickle.load(open(path, 'rb'))",
    # torch's legacy loader: four pickle loads in a row, each with its own memo
    "memo_across_pickles": "f = open(path, 'rb'); [pickle.load(f) for _ in range(4)]",
    # torch.load(weights_only=False) on a zip: data.pkl through the pickle module
    "torch_zip_payload": "pickle.load(zipfile.ZipFile(path).open('archive/data.pkl'))",
    "onnx_external_data_torch_payload": (
        "import torch; torch.load(path + '/pytorch_model.bin', weights_only=False)"
    ),
    "onnx_external_data_pickle_payload": "pickle.load(open(path + '/weights.bin', 'rb'))",
    "nul_in_module_name": "pickle.load(open(path + '/weights.bin', 'rb'))",
    "safetensors_that_is_a_pickle": "pickle.load(open(path, 'rb'))",
    "tensorflow_shard_that_is_a_pickle": "pickle.load(open(path, 'rb'))",
    "zip64_locator_to_a_second_directory": "import torch; torch.load(path, weights_only=False)",
    "npz_object_array_in_a_tensor_record": (
        "z = numpy.load(path, allow_pickle=True); [z[k] for k in z.files]"
    ),
    "zip_member_pickle_for_pandas": "import pandas; pandas.read_pickle(path)",
    "nul_in_long_stack_global_module": "pickle.load(open(path + '/weights.bin', 'rb'))",
    "nul_after_int": "pickle.load(open(path + '/weights.bin', 'rb'))",
    "onnx_external_data_long_name_payload": "pickle.load(open(path + '/weights.bin', 'rb'))",
    "legacy_tar_without_magic": "import torch; torch.load(path, weights_only=False)",
    "pickle_in_hdf5_user_block": "pickle.load(open(path, 'rb'))",
    "legacy_tar_named_like_a_pickle": "import torch; torch.load(path, weights_only=False)",
    "onnx_external_data_v7_tar": (
        "import torch; torch.load(path + '/model.pt', weights_only=False)"
    ),
    "object_npy_payload": "numpy.load(path, allow_pickle=True)",
    # the C unpickler on a file object without peek(): downloaded bytes, torch.load's zip path
    "frame_evasion_pkl": "pickle.load(io.BytesIO(open(path, 'rb').read()))",
    "frame_inside_frame": "pickle.load(io.BytesIO(open(path, 'rb').read()))",
    "frame_evasion_torch_zip": "import torch; torch.load(path, weights_only=False)",
    "frame_tail_after_stop": (
        "import torch; torch.load(io.BytesIO(open(path, 'rb').read()), weights_only=False)"
    ),
    "int_base0_unknown_file": "pickle.load(open(path, 'rb'))",
    "short_binstring_stack_global": "pickle.load(open(path, 'rb'))",
    "frame_evasion_without_proto": "pickle.load(io.BytesIO(open(path, 'rb').read()))",
    "tar_named_like_json": "import torch; torch.load(path, weights_only=False)",
    "zip_two_central_directories": "import torch; torch.load(path, weights_only=False)",
    "frame_evasion_torch_legacy": (
        "import torch; torch.load(io.BytesIO(open(path, 'rb').read()), weights_only=False)"
    ),
}


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_payload_is_live_when_really_loaded(name: str, tmp_path: Path) -> None:
    path = HOSTILE[name](tmp_path)
    code = f"import io, pickle, zipfile, numpy, sys\npath = sys.argv[1]\n{LOADERS[name]}"
    subprocess.run([sys.executable, "-c", code, str(path)], cwd=tmp_path, timeout=60, check=False)
    assert marker(tmp_path).exists()


@pytest.mark.parametrize(
    "name",
    [
        "keras_lambda_h5_user_block",
        "keras_zip_hdf5_polyglot",
        "safetensors_holding_hdf5",
        "json_user_block_hdf5",
    ],
)
def test_hdf5_files_behind_a_user_block_are_what_h5py_opens(name: str, tmp_path: Path) -> None:
    """No Keras here to load them: what tf.keras's load_model does first is ask h5py whether the
    file is HDF5, then read model_config from it. Both files answer yes and carry the Lambda."""
    import h5py

    path = HOSTILE[name](tmp_path)
    assert h5py.is_hdf5(str(path))
    with h5py.File(path, "r") as h5:
        assert '"Lambda"' in h5.attrs["model_config"]


@pytest.mark.parametrize("name", sorted(HOSTILE) + sorted(BENIGN))
def test_streamed_files_get_the_same_findings_as_files_read_into_memory(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = (HOSTILE | BENIGN)[name](tmp_path)
    in_memory = scan(path).details
    monkeypatch.setattr(unsafe_code, "IN_MEMORY_BYTES", 0)
    assert scan(path).details == in_memory


def test_a_pure_safetensors_model_has_nothing_to_scan(tmp_path: Path) -> None:
    save_file({"w": np.zeros((2, 2), np.float32)}, str(tmp_path / "model.safetensors"))
    res = scan(tmp_path)
    assert res.status is Status.PASSED
    assert res.reason == "no pickles, archives or code in 1 files"
    assert res.details == {"findings": [], "scanned": []}


def test_details_list_each_finding_and_every_scanned_file(tmp_path: Path) -> None:
    hostile.write_reduce_os_system(tmp_path / "model")
    hostile.write_numpy_pickle_protocol2(tmp_path / "model")
    res = scan(tmp_path / "model")
    assert res.details["scanned"] == ["arrays.pkl", "model.pkl"]
    assert res.details["findings"] == [
        {"file": "model.pkl", "kind": FindingKind.IMPORT.value, "what": "imports os.system"}
    ]
    assert res.name == "unsafe_code" and res.duration_ms >= 0


# --- Formats that are pickles too ------------------------------------------------------------


def test_a_safetensors_file_that_is_a_pickle_is_both(tmp_path: Path) -> None:
    """safetensors opens it as a model, and the check reads it as the pickle it also is."""
    from safetensors import safe_open

    path = hostile.write_safetensors_that_is_a_pickle(tmp_path)
    with safe_open(str(path), "np") as f:
        assert len(list(f.keys())) == 1
    assert build_inventory(str(tmp_path)).files[0].kind.value == "safetensors"


def test_a_gguf_file_that_is_a_pickle_is_both(tmp_path: Path) -> None:
    """A sound GGUF file of 363,008 tensors (gguf's own GGUFReader opens it too, in 21 s);
    pickle.load runs its first key."""
    from services.validator.checks.headers import read_gguf

    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(hostile.gguf_pickle_polyglot(tmp_path))
    header = read_gguf(path)
    assert len(header.tensors) == 363_008 and header.problems == []
    res = scan(tmp_path)
    assert res.status is Status.FAILED
    assert findings(res)[0] == (
        "pytorch_model.bin: read as a pickle from byte 0 (pickle.load reads any file): imports "
        "os.system"
    )
    code = "import pickle, sys\npickle.load(open(sys.argv[1], 'rb'))"
    subprocess.run([sys.executable, "-c", code, str(path)], cwd=tmp_path, timeout=60, check=False)
    assert marker(tmp_path).exists()


def test_safetensors_files_whose_header_length_reads_as_opcodes_pass(tmp_path: Path) -> None:
    """Every low byte of the header length, each an opcode or not, over random float data: the
    stream breaks within a few opcodes and imports nothing."""
    rng = np.random.default_rng(7)
    for length in range(256, 512):
        directory = tmp_path / str(length)
        directory.mkdir()
        data = rng.standard_normal(64).astype(np.float32).tobytes()
        entry = {"w": {"dtype": "F32", "shape": [64], "data_offsets": [0, len(data)]}}
        header = json.dumps(entry).encode().ljust(length)
        (directory / "model.pt").write_bytes(struct.pack("<Q", length) + header + data)
        res = scan(directory)
        assert res.status is Status.PASSED, (length, res.reason)


# --- The allowlist -------------------------------------------------------------------------


def test_allowlist_keeps_out_what_calls_arbitrary_code() -> None:
    calls_anything = {
        ("torch.storage", "_load_from_bytes"),  # torch.load of nested bytes
        ("torch.serialization", "load"),
        ("torch._tensor", "_rebuild_from_type_v2"),  # calls the function it is given
        ("builtins", "getattr"),
        ("builtins", "eval"),
        ("__builtin__", "getattr"),
        ("numpy", "load"),
    }
    assert not calls_anything & SAFE_GLOBALS


def test_allowlisted_names_mean_the_same_after_python2_name_mapping() -> None:
    # Python 3 renames protocol 0-2 imports (__builtin__ -> builtins ...) on load: an allowed
    # name must not be renamed into one that is not.
    for module, name in SAFE_GLOBALS:
        mapped = NAME_MAPPING.get((module, name), (IMPORT_MAPPING.get(module, module), name))
        assert mapped in SAFE_GLOBALS, (module, name, mapped)


# --- Pickles: parsing ----------------------------------------------------------------------


def test_each_pickle_of_a_stream_gets_its_own_memo(tmp_path: Path) -> None:
    # Memo index 0 in the second pickle is its own 'system', as an unpickler sees it, not the
    # first pickle's 'os'.
    first = hostile.whole_pickle(hostile.op_short_str("os") + pickle.MEMOIZE)
    second = hostile.op_short_str("system") + pickle.MEMOIZE + pickle.BINGET + b"\x00"
    second += pickle.BINGET + b"\x00" + pickle.STACK_GLOBAL
    (tmp_path / "model.pkl").write_bytes(first + hostile.whole_pickle(second, protocol=4))
    found = findings(scan(tmp_path))
    assert found == ["model.pkl: imports system.system"]


def test_stack_global_operands_are_what_is_really_on_the_stack(tmp_path: Path) -> None:
    # picklescan looks at the two strings before STACK_GLOBAL ('system', 'system' after the
    # DUP); the unpickler pops 'system' and 'os'.
    body = hostile.op_short_str("os") + hostile.op_short_str("system") + pickle.DUP + pickle.POP
    body += pickle.STACK_GLOBAL
    (tmp_path / "model.pkl").write_bytes(hostile.whole_pickle(body, protocol=4))
    assert findings(scan(tmp_path)) == ["model.pkl: imports os.system"]


def test_stack_global_operands_built_at_load_time_fail(tmp_path: Path) -> None:
    # _codecs.encode is allowed (protocol 2 spells bytes with it), but rot13 makes it return
    # the str 'os': a module name nobody can read in the file.
    rot13 = hostile.op_call(
        hostile.op_global("_codecs", "encode"), hostile.op_str("bf"), hostile.op_str("rot13")
    )
    body = rot13 + hostile.op_short_str("system") + pickle.STACK_GLOBAL
    body += hostile.op_call(b"", hostile.op_str("true"))
    (tmp_path / "model.pkl").write_bytes(hostile.whole_pickle(body, protocol=4))
    found = findings(scan(tmp_path))
    assert found == [
        "model.pkl: imports <computed at load time>.system (a STACK_GLOBAL operand built at "
        "load time, not a constant)"
    ], found


def test_legacy_torch_raw_tensor_bytes_after_five_pickles_are_not_parsed(tmp_path: Path) -> None:
    path = hostile.write_handmade_torch_legacy(tmp_path)
    with path.open("ab") as fh:
        fh.write(b"\xff" * 64)  # more raw bytes, never a pickle
    assert scan(path).status is Status.PASSED


def test_torch_zip_tensor_records_are_not_read(tmp_path: Path) -> None:
    data_pkl = hostile.whole_pickle(hostile.state_dict_body(hostile.SHAPES, legacy=False))
    records = [("archive/data/0", b"\x80\x02 looks like a pickle, is float bytes")]
    path = hostile.torch_zip(tmp_path / "model.pt", data_pkl, *records)
    res = scan(path)
    assert res.status is Status.PASSED, res.reason


def test_memory_mapped_files_get_the_same_verdicts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(unsafe_code, "IN_MEMORY_BYTES", 0)  # map every file
    big_value = hostile.write_numpy_pickle_large(tmp_path / "one")  # a 1.6 MB array
    assert scan(big_value).status is Status.PASSED
    payload = hostile.write_reduce_os_system(tmp_path / "two")
    assert findings(scan(payload)) == ["model.pkl: imports os.system"]


def test_a_compressed_member_too_big_to_inflate_is_not_passed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(unsafe_code, "MAX_PICKLE_READ_BYTES", 1024)
    path = tmp_path / "model.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", pickle.dumps(list(range(2000)), protocol=2))
    res = scan(path)
    assert res.status is Status.FAILED
    assert "compressed member of 5.6 KiB: too large to scan" in res.reason, res.reason


def test_a_pickle_over_the_opcode_budget_is_not_passed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(unsafe_code, "MAX_PICKLE_OPS", 10)
    res = scan(hostile.write_handmade_torch_zip(tmp_path))
    assert res.status is Status.FAILED
    assert "pickle too large to scan: more than 10 opcodes" in res.reason


def test_too_many_pickles_back_to_back_are_not_passed(tmp_path: Path) -> None:
    (tmp_path / "model.pkl").write_bytes(pickle.dumps(None, protocol=2) * 17)
    assert "more than 16 pickles back to back" in scan(tmp_path).reason


def test_text_of_no_known_format_is_not_mistaken_for_a_pickle(tmp_path: Path) -> None:
    # 'c' is protocol 0's GLOBAL opcode; this reads as an import of "ff-version: 1.2.0".
    (tmp_path / "CITATION.cff").write_text("cff-version: 1.2.0\nmessage: cite us\n")
    (tmp_path / "vocab.bin.dat").write_bytes(bytes(range(256)))
    res = scan(tmp_path)
    assert res.status is Status.PASSED
    assert res.details["scanned"] == []


def test_state_dict_pickle_scans_in_milliseconds(tmp_path: Path) -> None:
    shapes = {f"model.layers.{i}.mlp.weight": (4, 4) for i in range(1000)}
    data_pkl = hostile.whole_pickle(hostile.state_dict_body(shapes, legacy=False))
    res = scan(hostile.torch_zip(tmp_path / "model.pt", data_pkl))
    assert res.status is Status.PASSED
    assert res.duration_ms < 1000, res.duration_ms  # ~30 ms for this 160 KB pickle


# --- Archives, Keras -----------------------------------------------------------------------


def test_zip_with_too_many_entries_is_not_opened_further(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(unsafe_code, "MAX_ZIP_ENTRIES", 3)
    path = hostile.write_handmade_torch_zip(tmp_path)
    assert scan(path).reason == "model.pt: more than 3 entries"


def test_a_pickle_member_outside_torch_layout_is_scanned(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "bundle.zip", "w") as zf:
        zf.writestr("extra/state.bin", hostile.os_system_pickle(tmp_path))
    assert "bundle.zip: extra/state.bin: imports os.system" in scan(tmp_path).reason


@pytest.mark.parametrize(
    ("reference", "flagged"),
    [
        ({"module": "builtins", "class_name": "function", "config": "eval"}, True),
        ({"module": "builtins", "class_name": "function", "config": "relu"}, False),
        ({"module": "keras.utils", "class_name": "function", "config": "get_file"}, True),
        ({"module": "keras.activations", "class_name": "function", "config": "gelu"}, False),
        ({"module": "my_layers", "class_name": "Swish", "config": {}}, True),
        ({"module": "keras_hub.layers", "class_name": "RotaryEmbedding", "config": {}}, False),
        ({"module": "keras_evil", "class_name": "Dense", "config": {}}, True),
        ({"module": "my_layers", "note": "an option, not an object reference"}, False),
    ],
)
def test_keras_references_outside_keras_are_named(
    reference: dict[str, object], flagged: bool, tmp_path: Path
) -> None:
    res = scan(
        hostile.keras_zip(tmp_path / "m.keras", hostile.keras_model(hostile.dense(reference)))
    )
    assert (res.status is Status.FAILED) is flagged, res.reason
    if flagged:
        assert f"{reference['module']}." in res.reason


# --- Never raises --------------------------------------------------------------------------


def test_a_file_that_breaks_its_parser_is_reported_not_raised(tmp_path: Path) -> None:
    (tmp_path / "model.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)
    (tmp_path / "model.pt").write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    res = scan(tmp_path)
    assert res.status is Status.FAILED
    assert {f["file"] for f in res.details["findings"]} == {"model.h5", "model.pt"}
    assert all("could not scan" in f["what"] for f in res.details["findings"])


def _garbage() -> Iterator[tuple[str, bytes]]:
    rng = random.Random(7)
    heads = {
        "pickle.pkl": b"\x80\x04",
        "weights.bin": b"c",
        "zipped.zip": b"PK\x03\x04",
        "array.npy": b"\x93NUMPY\x01\x00",
        "model.h5": b"\x89HDF\r\n\x1a\n",
        "blob.dat": b"(",
    }
    for name, head in heads.items():
        for i in range(5):
            yield f"{i}-{name}", head + rng.randbytes(rng.randrange(0, 300))


def test_garbage_never_raises(tmp_path: Path) -> None:
    for name, data in _garbage():
        (tmp_path / name).write_bytes(data)
    res = scan(tmp_path)
    assert res.status in (Status.PASSED, Status.FAILED)
    assert len(res.details["scanned"]) >= 25


# --- picklescan alone ----------------------------------------------------------------------


class TestPicklescanAlone:
    """What picklescan 1.0.5 does with the same files: the reasons the check adds to it.
    A failure here after an upgrade means picklescan changed: revisit the workaround."""

    @staticmethod
    def dangerous(path: Path) -> set[tuple[str, str]]:
        found = scan_file_path(str(path)).globals
        return {(g.module, g.name) for g in found if g.safety is SafetyLevel.Dangerous}

    def test_it_resolves_memoised_stack_global_operands(self, tmp_path: Path) -> None:
        assert self.dangerous(hostile.write_memo_stack_global(tmp_path)) == {("os", "system")}

    def test_it_counts_import_module_and_getattr_static_as_merely_suspicious(
        self, tmp_path: Path
    ) -> None:
        path = hostile.write_importlib_getattr_static_chain(tmp_path)
        assert scan_file_path(str(path)).infected_files == 0

    def test_it_shares_one_memo_across_back_to_back_pickles(self, tmp_path: Path) -> None:
        path = hostile.write_memo_across_pickles(tmp_path)
        result = scan_file_path(str(path))
        assert result.infected_files == 0
        assert ("torch._utils", "_rebuild_tensor_v2") in {
            (g.module, g.name) for g in result.globals
        }

    def test_it_calls_a_harmless_pickle_followed_by_garbage_clean(self, tmp_path: Path) -> None:
        result = scan_file_path(str(hostile.write_benign_then_garbage(tmp_path)))
        assert (result.infected_files, result.scan_err) == (0, False)

    def test_it_scans_only_the_zip_of_a_pickle_zip_polyglot(self, tmp_path: Path) -> None:
        assert self.dangerous(hostile.write_pickle_zip_polyglot(tmp_path)) == set()

    def test_one_pickle_at_a_time_it_swallows_parse_errors(self) -> None:
        broken = io.BytesIO(hostile.os_system_pickle(Path("/nonexistent"))[:-1])
        assert _list_globals(broken, multiple_pickles=False) == {("os", "system")}  # no error


def test_torch_loads_the_handmade_fixtures(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    for write in (hostile.write_handmade_torch_zip, hostile.write_handmade_torch_legacy):
        state = torch.load(write(tmp_path / write.__name__), weights_only=True)
        assert {k: tuple(v.shape) for k, v in state.items()} == hostile.SHAPES


# --- HDF5 in a child process ---------------------------------------------------------------
# libhdf5 is C: a crafted file can crash or hang it. Each way the child can end is simulated
# with a stand-in reader, since no public HDF5 crash reproduces on every libhdf5 build.

_KILL_CHILD = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
_HANG_CHILD = "import time; time.sleep(60)"
_EAT_MEMORY = """
import resource, sys
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
blob = bytearray(2 * limit)
"""


@pytest.mark.parametrize(
    ("reader", "expected"),
    [
        (_KILL_CHILD, "could not scan: the HDF5 parser crashed (SIGSEGV) on this file"),
        (_HANG_CHILD, "could not scan: the HDF5 parser did not finish in 0.5 s (killed)"),
        (_EAT_MEMORY, "could not scan: the HDF5 parser could not read it: MemoryError"),
    ],
    ids=["crash", "hang", "memory"],
)
def test_an_hdf5_file_that_breaks_its_parser_cannot_take_the_validator_down(
    reader: str, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hdf5, "_H5_READER", reader)
    monkeypatch.setattr(hdf5, "H5_TIMEOUT_S", 0.5)
    monkeypatch.setattr(hdf5, "H5_MEMORY_BYTES", 256 * 1024 * 1024)
    hdf5._read.cache_clear()
    res = scan(hostile.write_keras_h5(tmp_path))
    assert res.status is Status.FAILED
    assert findings(res) == [f"model.h5: {expected}"], findings(res)


def test_the_hdf5_child_really_holds_the_memory_limit(tmp_path: Path) -> None:
    code = hdf5._H5_READER.replace("import h5py", "blob = bytearray(limit)\nimport h5py")
    proc = subprocess.run(
        [sys.executable, "-I", "-c", code, str(hostile.write_keras_h5(tmp_path)), str(2**28)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    assert b"MemoryError" in proc.stderr


def test_a_crashing_hdf5_parser_is_a_clear_answer_from_the_whole_validator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.validator.validate import validate

    monkeypatch.setattr(hdf5, "_H5_READER", _KILL_CHILD)
    hdf5._read.cache_clear()
    report = validate(str(hostile.write_keras_h5(tmp_path)))
    failed = {c.name: c.reason for c in report.checks if c.status is Status.FAILED}
    assert set(failed) == {"structure", "unsafe_code"}, report.reason
    assert "HDF5 file does not open: the HDF5 parser crashed (SIGSEGV)" in failed["structure"]
    hdf5._read.cache_clear()


def test_a_pickle_of_many_distinct_imports_fails_fast(tmp_path: Path) -> None:
    # Merging each import into a list was quadratic: 60k imports took 25 s.
    body = b"".join(b"cm%d\nn\n0" % i for i in range(60_000)) + pickle.NONE
    (tmp_path / "model.pkl").write_bytes(hostile.whole_pickle(body))
    res = scan(tmp_path)
    assert res.status is Status.FAILED
    assert "model.pkl: pickle too large to scan: more than 1,000 distinct imports" in findings(res)
    assert res.duration_ms < 2000, res.duration_ms
