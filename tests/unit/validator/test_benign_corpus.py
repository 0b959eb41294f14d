"""The benign corpus passes every check: no false alarm on real-shaped files (issue #12)."""

from __future__ import annotations

import json
import pickle
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from services.contracts.events import Status
from services.validator.validate import validate
from tests.unit.validator.benign_corpus import CORPUS, family, write_benign_corpus
from tests.unit.validator.hostile import MARKER, marker

FAMILIES = ("torch", "npy", "npz", "pickle", "safetensors", "hf", "keras", "onnx", "gguf",
            "chat_template")  # fmt: skip
# Families whose files can carry code: the unsafe-code check must have scanned something in
# each of their models, or a pass would mean nothing.
SCANNED_FAMILIES = ("torch", "npz", "pickle", "keras")

# Known false alarms of the pickle parser (frames, bytes after STOP), each with its reason:
# marked xfail(strict=True), so the fix flips them to a failure that says "remove me".
KNOWN_FALSE_ALARMS: dict[str, str] = {}


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("benign-corpus")


@pytest.fixture(scope="module")
def corpus(corpus_root: Path) -> dict[str, Path]:
    return dict(write_benign_corpus(corpus_root))


def test_the_corpus_holds_at_least_200_models_of_every_family(corpus: dict[str, Path]) -> None:
    assert list(corpus) == list(CORPUS)
    assert len(corpus) >= 200
    counts = Counter(family(name) for name in corpus)
    assert set(counts) == set(FAMILIES), counts
    for protocol in (2, 3, 4, 5):
        for layout in ("zip", "legacy"):
            assert any(name.startswith(f"torch/{layout}-p{protocol}/") for name in corpus)
    assert all(path.exists() for path in corpus.values())


# torch.save's pre-1.6 format starts with this number, pickled (LONG1, 10 bytes).
_TORCH_LEGACY_MAGIC = b"\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8"


def _load(path: Path) -> str:
    """Read one file with the library that wrote it; the kind of file it was."""
    head = path.read_bytes()[:32]
    if head.startswith(b"GGUF"):
        import gguf

        gguf.GGUFReader(path)
        return "gguf"
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        load_file(path)
        return "safetensors"
    if path.suffix == ".onnx":
        import onnx

        onnx.checker.check_model(str(path))  # loads external data beside it too
        return "onnx"
    if head.startswith(b"\x93NUMPY"):
        np.load(path, allow_pickle=False)
        return "npy"
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as arrays:
            [arrays[key] for key in arrays.files]
        return "npz"
    if path.suffix == ".keras":
        with zipfile.ZipFile(path) as zf:
            assert zf.testzip() is None
            json.loads(zf.read("config.json"))
        return "keras"
    if head.startswith(b"\x89HDF"):
        import h5py

        h5py.File(path, "r").close()
        return "hdf5"
    if head.startswith(b"PK") or _TORCH_LEGACY_MAGIC in head:
        import torch

        # torch's weights-only unpickler reads torch.save's default protocol 2; it has no
        # opcode for bytes at 3 or frames at 4-5, which need the full unpickler.
        protocol = head[1] if _TORCH_LEGACY_MAGIC in head else _zip_pickle_protocol(path)
        torch.load(path, weights_only=protocol == 2)
        return "torch"
    if path.suffix in (".pkl", ".pickle", ".bin"):
        pickle.loads(path.read_bytes())  # noqa: S301 - our own benign files
        return "pickle"
    if path.suffix == ".json":
        json.loads(path.read_text(encoding="utf-8"))
        return "json"
    return "other"


def _zip_pickle_protocol(path: Path) -> int:
    if not zipfile.is_zipfile(path):
        return 0
    with zipfile.ZipFile(path) as zf:
        data_pkl = next(n for n in zf.namelist() if n.endswith("data.pkl"))
        return zf.read(data_pkl)[1]


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch on old protocols and TypedStorage
def test_every_file_loads_with_the_library_that_wrote_it(corpus: dict[str, Path]) -> None:
    kinds: Counter[str] = Counter()
    broken = []
    for name, path in corpus.items():
        for f in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            try:
                kinds[_load(f)] += 1
            except Exception as exc:
                broken.append(f"{name}: {f.name}: {type(exc).__name__}: {str(exc)[:200]}")
    assert broken == []
    assert {"gguf", "safetensors", "onnx", "npy", "npz", "keras", "hdf5", "torch", "pickle"} <= set(
        kinds
    ), kinds


def _params() -> list[object]:
    return [
        pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=KNOWN_FALSE_ALARMS[name]))
        if name in KNOWN_FALSE_ALARMS
        else name
        for name in CORPUS
    ]


@pytest.mark.parametrize("name", _params())
def test_benign_model_raises_no_alarm(name: str, corpus: dict[str, Path]) -> None:
    path = corpus[name]
    report = validate(str(path))
    alarms = [
        f"{c.name} {c.status.value}: {c.reason}"
        for c in report.checks
        if c.status in (Status.FAILED, Status.ERROR)
    ]
    assert alarms == []
    if family(name) in SCANNED_FAMILIES:
        unsafe = next(c for c in report.checks if c.name == "unsafe_code")
        assert unsafe.details.get("scanned"), unsafe.reason
    assert not marker(path if path.is_dir() else path.parent).exists()


def test_no_payload_ran_anywhere_in_the_corpus(corpus: dict[str, Path], corpus_root: Path) -> None:
    # Runs after every validation above (pytest keeps a module's order).
    assert all(path.is_relative_to(corpus_root) for path in corpus.values())
    assert list(corpus_root.rglob(MARKER)) == []
