"""Files an ONNX model names as its external data, validated end to end as an attacker would use
them: a payload named as external data is still scanned as what it is (a torch checkpoint, a
pickle, a GGUF chat template, Python, a tar), and raw tensor bytes that only open like a pickle
are not taken for one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from services.contracts.events import Status
from services.validator.checks import unsafe_code
from services.validator.checks.inventory import Kind, ModelFile
from services.validator.validate import validate
from tests.unit.validator import fixtures, hostile
from tests.unit.validator.hostile import marker, onnx_naming_external_data


def _named(writer: Callable[[Path], Path], name: str) -> Callable[[Path], Path]:
    """The payload `writer` writes, as the one file it writes, named as external data."""

    def write(directory: Path) -> Path:
        written = writer(directory)
        [path] = [p for p in (written.rglob("*") if written.is_dir() else [written]) if p.is_file()]
        return onnx_naming_external_data(directory, path.relative_to(directory).as_posix())

    write.__name__ = name
    return write


# payload, what the format check says of the file, what the unsafe-code check finds in it
HIDDEN = {
    "torch_zip": (
        hostile.write_onnx_external_data_torch_payload,
        "external data pytorch_model.bin is not raw tensor bytes: it is pytorch-zip content",
        "pytorch_model.bin: archive/data.pkl: imports os.system",
    ),
    "pickle_protocol_2": (
        hostile.write_onnx_external_data_pickle_payload,
        None,  # raw bytes may open so: the scan decides
        "weights.bin: imports os.system",
    ),
    "gguf_chat_template": (
        _named(fixtures.write_gguf_cve_2024_34359, "gguf"),
        "external data model.gguf is not raw tensor bytes: it is gguf content",
        "model.gguf: GGUF tokenizer.chat_template",
    ),
    "legacy_tar": (
        _named(hostile.write_legacy_tar_checkpoint, "tar"),
        None,
        "model.pt: tar archive",
    ),
    "npy_object_array": (
        _named(hostile.write_object_npy_payload, "npy"),
        "is not raw tensor bytes: it is numpy content",
        "embedding.npy: imports os.system",
    ),
}


@pytest.mark.parametrize("name", sorted(HIDDEN))
def test_a_payload_named_as_external_data_is_still_found(name: str, tmp_path: Path) -> None:
    write, format_says, unsafe_says = HIDDEN[name]
    write(tmp_path)
    report = validate(str(tmp_path))
    checks = {c.name: c for c in report.checks}
    assert report.status is Status.FAILED
    assert checks["unsafe_code"].status is Status.FAILED
    assert unsafe_says in checks["unsafe_code"].reason, checks["unsafe_code"].reason
    if format_says is not None:
        assert checks["format"].status is Status.FAILED
        assert format_says in checks["format"].reason, checks["format"].reason
    assert not marker(tmp_path).exists()


def test_python_named_as_external_data_stays_python(tmp_path: Path) -> None:
    (tmp_path / "modeling_x.py").write_text("import os\n\nos.system('id')\n" + "#" * 64)
    onnx_naming_external_data(tmp_path, "modeling_x.py")
    checks = {c.name: c for c in validate(str(tmp_path)).checks}
    assert "modeling_x.py is not raw tensor bytes: it is python content" in checks["format"].reason
    assert "modeling_x.py: Python source" in checks["unsafe_code"].reason


def test_real_external_data_that_opens_like_a_pickle_passes(tmp_path: Path) -> None:
    hostile.write_onnx_external_data_opens_like_a_pickle(tmp_path)
    report = validate(str(tmp_path))
    assert report.status is Status.PASSED, report.reason
    unsafe = next(c for c in report.checks if c.name == "unsafe_code")
    assert unsafe.details["scanned"] == ["weights.bin"]  # scanned, not waved through


@pytest.mark.parametrize("first", [b"\x80\x02", b"\x80\x04", b"(", b"c", b"]", b"}", b"{"])
def test_raw_float_bytes_are_not_taken_for_a_pickle(first: bytes, tmp_path: Path) -> None:
    """Two hundred random tensors for each first byte a pickle or JSON may open with: none of
    them is a finding (a stream that imports nothing runs nothing)."""
    rng = np.random.default_rng(int.from_bytes(first, "little"))
    path = tmp_path / "weights.bin"
    for _ in range(200):
        data = first + rng.standard_normal(1024).astype(np.float32).tobytes()[len(first) :]
        path.write_bytes(data)
        mf = ModelFile(path=path, rel="weights.bin", size=len(data), kind=Kind.ONNX_EXTERNAL_DATA)
        assert unsafe_code._scan_external_data(mf) in (None, []), data[:32].hex()
