"""What is in a model location, found by content (magic bytes and structure), never by extension."""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

# Enough bytes to recognise every supported format from its start.
SNIFF_BYTES = 512  # a tar header's magic is at byte 257
# The safetensors format refuses headers over 100 MB; we do too.
SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024
# Small text files we parse as JSON (config, tokenizer config, index); bigger ones are not config.
MAX_JSON_BYTES = 64 * 1024 * 1024
# A directory walk stops here: a model directory is not a file system.
MAX_FILES = 10_000
# Real layouts (diffusers, checkpoints of adapters) nest a few levels; a walk stops deeper.
MAX_DEPTH = 32

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")


class Kind(StrEnum):
    """What a file is, by content."""

    SAFETENSORS = "safetensors"
    SAFETENSORS_INDEX = "safetensors-index"
    PYTORCH_ZIP = "pytorch-zip"
    PICKLE = "pickle"
    NUMPY = "numpy"
    ONNX = "onnx"
    ONNX_EXTERNAL_DATA = "onnx-external-data"
    TF_SAVED_MODEL = "tf-saved-model"
    TF_VARIABLES_INDEX = "tf-variables-index"
    TF_VARIABLES_DATA = "tf-variables-data"
    KERAS_METADATA = "keras-metadata"
    KERAS_H5 = "keras-h5"
    KERAS_ZIP = "keras-zip"
    NUMPY_ZIP = "numpy-npz"
    ZIP = "zip"
    GGUF = "gguf"
    CONFIG = "config-json"
    JSON = "json"
    TEXT = "text"
    PYTHON = "python"
    UNKNOWN = "unknown"


WEIGHT_KINDS = frozenset(
    {
        Kind.SAFETENSORS,
        Kind.PYTORCH_ZIP,
        Kind.PICKLE,
        Kind.NUMPY,
        Kind.ONNX,
        Kind.ONNX_EXTERNAL_DATA,
        Kind.TF_SAVED_MODEL,
        Kind.TF_VARIABLES_INDEX,
        Kind.TF_VARIABLES_DATA,
        Kind.KERAS_H5,
        Kind.KERAS_ZIP,
        Kind.NUMPY_ZIP,
        Kind.GGUF,
    }
)
"""Files whose bytes are the model: they need checksums and count toward VRAM."""

# Files a model directory commonly carries that are not weights; recognised by name because
# their content is free text or JSON (their content is still scanned for secrets).
TEXT_NAMES = frozenset(
    {"readme.md", "license", "license.md", "license.txt", "notice", "tokenizer.model", "merges.txt",
     "vocab.txt", "sentencepiece.bpe.model", "spiece.model", ".gitattributes",
     # the other tokenizer vocabularies the tokenizer check counts (checks/tokenizer.py)
     "tokenizer.model.v3", "sentencepiece.model", "spm.model", "source.spm", "target.spm"}
)  # fmt: skip


# Files a Hugging Face Trainer checkpoint carries that `from_pretrained` and serving never read:
# training state, kept for resuming (torch.save pickles). Not weights: they need no digest, and
# the unsafe-code check blocks them unless the policy allows them.
TRAINING_STATE_FILE = re.compile(
    r"(training_args\.bin|optimizer\.(pt|bin)|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth)"
)


@dataclass(frozen=True)
class ModelFile:
    """One file of a model, with what its content says it is."""

    path: Path
    rel: str
    size: int
    kind: Kind
    detail: str = ""
    zip_kind: Kind | None = None
    """The zip's kind when a zip reader finds one from the file's end (its end record) while
    its first bytes say another format (a safetensors or HDF5 file with a Keras archive after
    it: Keras 3 opens a .keras with zipfile). It is scanned as that zip as well."""
    hdf5_at: int | None = None
    """Where libhdf5 finds a superblock after a user block (512, 1024 ... bytes in): the file
    is HDF5 to h5py, and to tf.keras's load_model by content, whatever else it is (a zip, a
    pickle in the user block), so it is scanned as both. None for most files."""

    @property
    def is_training_state(self) -> bool:
        return TRAINING_STATE_FILE.fullmatch(self.path.name) is not None

    @property
    def is_weights(self) -> bool:
        return self.kind in WEIGHT_KINDS and not self.is_training_state


@dataclass
class Inventory:
    """Every file under a model location, classified; plus what could not be read and why."""

    root: Path
    is_dir: bool
    files: list[ModelFile] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    config: dict[str, Any] | None = None
    _index_of: dict[str, int] | None = field(default=None, repr=False, compare=False)
    _indexed: tuple[int, int] = field(default=(0, -1), repr=False, compare=False)

    def of(self, *kinds: Kind) -> list[ModelFile]:
        return [f for f in self.files if f.kind in kinds]

    def named(self, rel: str) -> ModelFile | None:
        """The file at `rel`. An index over the files, made on first use and again when the
        list changes length: a shard index naming 200,000 files looked each up in turn."""
        files = self.files
        if self._index_of is None or self._indexed != (id(files), len(files)):
            self._index_of = {}
            for position, f in enumerate(files):
                self._index_of.setdefault(f.rel, position)
            self._indexed = (id(files), len(files))
        at = self._index_of.get(rel)
        if at is None:
            return None
        if files[at].rel != rel:  # the list was rearranged in place: look it up afresh
            self._index_of = None
            return self.named(rel)
        return files[at]  # a file replaced in place (formats.py) is the one returned

    @property
    def weights(self) -> list[ModelFile]:
        return [f for f in self.files if f.is_weights]


class LocationError(ValueError):
    """The location cannot be inspected at all (missing, unsupported scheme)."""


def local_path(location: str) -> Path:
    """A local path from a request's location; other schemes are reported, not guessed."""
    if "://" in location:
        scheme = location.split("://", 1)[0]
        if scheme != "file":
            raise LocationError(
                f"location scheme {scheme}:// is not supported: use a local path, "
                "s3://BUCKET/PREFIX/, hf://ORG/NAME@REVISION or https://HOST/BASE/"
            )
        location = location.split("://", 1)[1]
    path = Path(location)
    try:
        exists = path.exists()
    except OSError as exc:  # e.g. a parent directory we may not traverse
        raise LocationError(f"{location}: cannot be read: {exc.strerror}") from None
    if not exists:
        raise LocationError(f"{location}: no such file or directory")
    if not (path.is_file() or path.is_dir()):
        raise LocationError(f"{location}: not a regular file or directory")
    return path


def sniff(path: Path, size: int, name: str) -> tuple[Kind, str]:
    """Classify one file by its first bytes (and, where a format has no magic, its structure)."""
    try:
        with path.open("rb") as fh:
            head = fh.read(SNIFF_BYTES)
    except OSError as exc:
        return Kind.UNKNOWN, f"unreadable: {exc.strerror}"
    lower = name.lower()
    if is_tar(head):
        # First: a tar's first member may be named anything ("(L...", "{...", "\x80\x02"), so
        # it may open like a pickle or JSON, and torch.load still unpickles legacy tar
        # checkpoints (tarfile checks nothing but the header's checksum).
        return Kind.UNKNOWN, "tar archive"
    if head.startswith(b"GGUF"):
        return Kind.GGUF, "GGUF magic"
    if head.startswith(HDF5_SIGNATURE):
        return Kind.KERAS_H5, "HDF5 signature"
    if head.startswith(b"\x93NUMPY"):
        return Kind.NUMPY, "numpy .npy magic"
    if head.startswith(ZIP_MAGICS):
        return _sniff_zip(path)
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 2 <= header_len <= min(SAFETENSORS_MAX_HEADER, size - 8) and head[8:9] == b"{":
            return Kind.SAFETENSORS, f"safetensors header of {header_len} bytes"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return Kind.PICKLE, f"pickle protocol {head[1]}"
    if head[:1] in (b"(", b"]", b"}", b"c") and lower.endswith(
        (".pkl", ".pickle", ".bin", ".pt", ".pth", ".ckpt")
    ):
        return Kind.PICKLE, "pickle protocol 0/1"  # old protocols have no header; name is the hint
    if lower == "saved_model.pb" or lower == "saved_model.pbtxt":
        return Kind.TF_SAVED_MODEL, "TensorFlow SavedModel graph"
    if lower == "keras_metadata.pb":  # tf.keras writes it beside saved_model.pb
        return Kind.KERAS_METADATA, "Keras layer metadata of a SavedModel (scanned with it)"
    if lower.endswith("variables.index") and _leveldb_footer(path, size):
        return Kind.TF_VARIABLES_INDEX, "TensorFlow checkpoint index (table footer magic)"
    if ".data-" in lower and "-of-" in lower:
        return Kind.TF_VARIABLES_DATA, "TensorFlow checkpoint shard"
    if _looks_like_onnx(head):
        return Kind.ONNX, "ONNX ModelProto (ir_version field)"
    stripped = head.lstrip()
    if stripped[:1] in (b"{", b"[") and size <= MAX_JSON_BYTES:
        if lower.endswith("safetensors.index.json"):
            return Kind.SAFETENSORS_INDEX, "safetensors shard index"
        if lower == "config.json":
            return Kind.CONFIG, "model config"
        return Kind.JSON, "JSON"
    if stripped[:1] in (b"{", b"[") and lower.endswith(".json"):
        # Named and opened as JSON, but no check parses this much: say so, not "unrecognised".
        return Kind.UNKNOWN, (
            f"too large to read as JSON: {size:,} bytes, more than the {MAX_JSON_BYTES:,} "
            "a JSON file may have"
        )
    if lower.endswith(".py"):
        return Kind.PYTHON, "Python source"
    if lower in TEXT_NAMES or lower.endswith(
        (".md", ".txt", ".yaml", ".yml", ".jinja", ".tiktoken")
    ):
        return Kind.TEXT, "text"
    return Kind.UNKNOWN, f"unrecognised content, first bytes {head[:16].hex(' ')}"


NOT_PROBED_FOR_HDF5 = frozenset({Kind.KERAS_H5})
"""Only HDF5 found at byte 0 is not looked at again for a superblock after a user block. Any
other file that libhdf5 would open (h5py, and tf.keras's load_model, which asks h5py.is_hdf5
first, whatever the file's name) is scanned as HDF5 as well as what it opens as: a pickle or
tar in the user block, a zip around the HDF5 data, a safetensors or GGUF file holding it as
tensor bytes."""


ZIP_KINDS = frozenset({Kind.ZIP, Kind.PYTORCH_ZIP, Kind.KERAS_ZIP, Kind.NUMPY_ZIP})


def _zip_from_end(path: Path) -> bool:
    """Whether zipfile finds an end record in the file's last 64 KiB (as is_zipfile does)."""
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def hdf5_user_block_offsets(size: int) -> Iterator[int]:
    """Where libhdf5 looks for a superblock after a user block: 512, 1024, 2048 ... bytes in
    (h5py opens such a file whatever its first bytes are)."""
    at = 512
    while at + len(HDF5_SIGNATURE) <= size:
        yield at
        at *= 2


def _hdf5_after_user_block(path: Path, size: int) -> int | None:
    offsets = list(hdf5_user_block_offsets(size))
    if not offsets:
        return None
    try:
        with path.open("rb") as fh:
            for at in offsets:
                fh.seek(at)
                if fh.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
                    return at
    except OSError:
        return None
    return None


def is_tar(head: bytes) -> bool:
    """A tar's first header as Python's tarfile (torch's legacy loader) accepts it: the POSIX
    magic, or a pre-POSIX (v7) header with no magic whose checksum matches. tarfile checks
    nothing else, so neither may we."""
    if head[257:262] == b"ustar":
        return True
    block = head[:512]
    if len(block) < 512 or not block.strip(b"\0"):
        return False  # short, or the all-zero block that ends an archive
    stored = _tar_number(block[148:156])
    if stored is None:
        return False
    unsigned = 256 + sum(block[:148]) + sum(block[156:])
    signed = (
        256 + sum(struct.unpack_from("148b", block)) + sum(struct.unpack_from("356b", block, 156))
    )
    return stored in (unsigned, signed)


def _tar_number(field: bytes) -> int | None:
    """tarfile's nti(): base-256 when the first byte says so, else octal up to the first NUL."""
    if field[0] in (0o200, 0o377):
        n = int.from_bytes(field[1:], "big")
        return n - 256 ** (len(field) - 1) if field[0] == 0o377 else n
    text = field.split(b"\0", 1)[0]
    try:
        return int(text.decode("ascii").strip() or "0", 8)
    except (UnicodeDecodeError, ValueError):
        return None


def _sniff_zip(path: Path) -> tuple[Kind, str]:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()[:MAX_FILES]
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        return Kind.ZIP, f"zip that does not open: {exc}"
    if any(n.endswith("data.pkl") for n in names):
        return Kind.PYTORCH_ZIP, "PyTorch zip (data.pkl)"
    if "config.json" in names and any(
        n.endswith(".weights.h5") or n == "model.weights.h5" for n in names
    ):
        return Kind.KERAS_ZIP, "Keras v3 archive"
    if "config.json" in names and "metadata.json" in names:
        return Kind.KERAS_ZIP, "Keras v3 archive"
    if names and all(n.endswith(".npy") for n in names):
        return Kind.NUMPY_ZIP, f"numpy .npz ({len(names)} arrays)"  # np.savez's layout
    return Kind.ZIP, f"zip with {len(names)} entries"


def _leveldb_footer(path: Path, size: int) -> bool:
    if size < 48:
        return False
    with path.open("rb") as fh:
        fh.seek(size - 8)
        return fh.read(8) == bytes.fromhex("57fb808b247547db")


def _looks_like_onnx(head: bytes) -> bool:
    """ModelProto starts with ir_version (field 1, varint, tag 0x08), a small positive number,
    followed by another known top-level field tag."""
    if len(head) < 4 or head[0] != 0x08 or not (1 <= head[1] <= 20):
        return False
    return head[2] in (0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72)


def build_inventory(location: str) -> Inventory:
    """Walk a file or directory (no symlink following) and classify every file."""
    root = local_path(location)
    if root.is_file():
        inv = Inventory(root=root.parent, is_dir=False)
        _add(inv, root, root.name)
        return inv
    inv = Inventory(root=root, is_dir=True)
    if not _walk(inv, root):
        return inv
    config = inv.named("config.json")
    if config is not None:
        try:
            loaded = json.loads(config.path.read_text(encoding="utf-8"))
            inv.config = loaded if isinstance(loaded, dict) else None
        except (OSError, ValueError) as exc:
            inv.problems.append(f"config.json: not valid JSON: {exc}")
        except RecursionError:
            inv.problems.append("config.json: JSON nested too deeply to be a model config")
    return inv


def _walk(inv: Inventory, root: Path) -> bool:
    """Every file under root, depth first in name order, without recursion (a tree 10,000
    levels deep is an answer, not a RecursionError) and without following symlinks (a loop
    is a finding, not a hang). False when it stopped at a limit."""
    real_root = root.resolve()
    count = 0
    stack: list[tuple[Path, int]] = [(root, 0)]
    while stack:
        directory, depth = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            inv.problems.append(f"{exc.filename}: unreadable: {exc.strerror}")
            continue
        subdirs: list[Path] = []
        for entry in entries:
            full = Path(entry.path)
            rel = full.relative_to(root).as_posix()
            if entry.is_symlink():
                problem = _symlink_problem(full, real_root)
                if problem is not None:
                    inv.problems.append(f"{rel}: {problem}")
                    continue
                if entry.is_dir():
                    continue  # inside the model: its files are listed where they really are
            elif entry.is_dir(follow_symlinks=False):
                if not entry.name.startswith(".git"):
                    subdirs.append(full)
                continue
            count += 1
            if count > MAX_FILES:
                inv.problems.append(f"more than {MAX_FILES} files; stopped listing")
                return False
            _add(inv, full, rel)
        if subdirs and depth + 1 > MAX_DEPTH:
            inv.problems.append(
                f"{directory.relative_to(root).as_posix() or '.'}: directories nested more than "
                f"{MAX_DEPTH} levels deep; stopped listing"
            )
            return False
        stack.extend((d, depth + 1) for d in reversed(subdirs))
    return True


def _symlink_problem(link: Path, real_root: Path) -> str | None:
    target = os.readlink(link)
    try:
        resolved = link.resolve(strict=True)
    except RuntimeError:  # Python 3.11: a symlink loop
        return f"symlink loop ({target})"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"symlink loop ({target})"
        return f"symlink to nothing ({target})"
    if not resolved.is_relative_to(real_root):
        return f"symlink pointing outside the model ({target})"
    return None


def _add(inv: Inventory, path: Path, rel: str) -> None:
    try:
        st = path.stat()
    except OSError as exc:
        inv.problems.append(f"{rel}: cannot stat: {exc.strerror}")
        return
    if not stat.S_ISREG(st.st_mode):
        # A FIFO or device would block or never end when read: report it, never open it.
        inv.problems.append(f"{rel}: not a regular file")
        return
    size = st.st_size
    kind, detail = sniff(path, size, path.name)
    hdf5_at = None if kind in NOT_PROBED_FOR_HDF5 else _hdf5_after_user_block(path, size)
    if hdf5_at is not None and kind is Kind.UNKNOWN and detail != "tar archive":
        kind, detail = Kind.KERAS_H5, f"HDF5 signature at byte {hdf5_at:,}, after a user block"
    zip_kind = None
    if kind not in ZIP_KINDS and size >= 22 and _zip_from_end(path):
        found, how = _sniff_zip(path)
        if not how.startswith("zip that does not open"):  # what no zip reader opens loads none
            zip_kind = found
    inv.files.append(
        ModelFile(
            path=path,
            rel=rel,
            size=size,
            kind=kind,
            detail=detail,
            hdf5_at=hdf5_at,
            zip_kind=zip_kind,
        )
    )
