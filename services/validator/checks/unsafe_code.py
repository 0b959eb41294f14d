"""Check: nothing in the model runs code when it is loaded, found without loading or unpickling."""

from __future__ import annotations

import builtins
import io
import json
import pickletools
import re
import stat
import time
import zipfile
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO, Any, Final, cast

import numpy as np
from picklescan.scanner import GenOpsError, _list_globals

from services.contracts.events import CheckResult, Status
from services.validator.checks.base import CheckContext, result, summarise_findings
from services.validator.checks.inventory import MAX_JSON_BYTES, Inventory, Kind, ModelFile

__all__ = ["SAFE_GLOBALS", "Finding", "FindingKind", "check_unsafe_code"]

NAME = "unsafe_code"

# --- What a pickle may import --------------------------------------------------------------
# An allowlist, not a denylist: a pickle calls whatever it imports, so anything not named here
# fails. Each group is what a weights-only file needs, and every entry only assembles data from
# its arguments. torch's own `weights_only` unpickler is the reference
# (torch/_weights_only_unpickler.py, _get_allowed_globals); we allow less than it does.

_TORCH_STORAGES = (
    "BFloat16", "Bool", "Byte", "Char", "ComplexDouble", "ComplexFloat", "Double", "Float",
    "Half", "Int", "Long", "Short", "QInt32", "QInt8", "QUInt2x4", "QUInt4x2", "QUInt8",
)  # fmt: skip
_TORCH_DTYPES = (
    "bfloat16", "bool", "complex32", "complex64", "complex128", "float16", "float32", "float64",
    "float4_e2m1fn_x2", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
    "float8_e8m0fnu", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "bits1x8", "bits2x4", "bits4x2", "bits8", "bits16", "qint8", "qint32", "quint8", "quint4x2",
    "quint2x4",
)  # fmt: skip
_TORCH_QSCHEMES = (
    "per_tensor_affine", "per_tensor_symmetric", "per_channel_affine", "per_channel_symmetric",
    "per_channel_affine_float_qparams",
)  # fmt: skip

SAFE_GLOBALS: Final[frozenset[tuple[str, str]]] = frozenset(
    {
        # torch.save tensors: rebuild functions make a tensor (or Parameter, quantized or sparse
        # tensor) from a storage the loader reads itself plus shape/stride/flag arguments.
        # Not _rebuild_from_type_v2 (calls any function it is given) nor
        # torch.storage._load_from_bytes (a torch.load of nested bytes: a pickle in a pickle).
        ("torch._utils", "_rebuild_tensor"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor_v3"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_parameter_with_state"),
        ("torch._utils", "_rebuild_qtensor"),
        ("torch._utils", "_rebuild_sparse_tensor"),
        ("torch.serialization", "_get_layout"),  # sparse layouts, looked up by name
        # Storage classes and dtypes are type tags in persistent ids and rebuild arguments.
        *(("torch", f"{name}Storage") for name in _TORCH_STORAGES),
        ("torch.storage", "UntypedStorage"),
        *(("torch", dtype) for dtype in _TORCH_DTYPES),
        *(("torch", qscheme) for qscheme in _TORCH_QSCHEMES),
        # Small torch value types, built from plain numbers and strings.
        ("torch", "Size"),
        ("torch", "device"),
        # A state dict is an OrderedDict; torch also passes one as a tensor's backward hooks.
        ("collections", "OrderedDict"),
        # numpy arrays, dtypes and scalars (numpy 1.x spells the module numpy.core, 2.x
        # numpy._core); _frombuffer is how protocol 5 pickles an array.
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        # Plain values that protocols 0-3 have no opcode for: bytes (as _codecs.encode of a
        # latin-1 string), bytearray, set, frozenset, complex. `__builtin__` is how protocol 2
        # spells builtins; Python 3 maps it back on load.
        ("_codecs", "encode"),
        *((module, name) for module in ("builtins", "__builtin__")
          for name in ("bytearray", "set", "frozenset", "complex")),
    }
)  # fmt: skip

# picklescan names a STACK_GLOBAL operand it cannot resolve to a string "unknown".
_UNRESOLVED = "unknown"

# --- Limits --------------------------------------------------------------------------------
# A pickle value bigger than this (an array's bytes in a plain pickle) is skipped, not read:
# only the opcodes around it can import anything.
SKIP_VALUE_BYTES = 1024 * 1024
# Per pickle stream. A state dict's pickle is ~100 bytes and ~30 opcodes per tensor, so these
# allow ~60k tensors in one file; picklescan keeps every opcode in memory, so they bound memory.
MAX_PICKLE_OPS = 2_000_000
MAX_PICKLE_READ_BYTES = 256 * 1024 * 1024
# Pickles back to back in one file; the legacy torch format has 5, nothing we know has more.
MAX_PICKLES_PER_STREAM = 16
# The legacy (pre-1.6) torch format: the first pickle is this number, then 4 more pickles, then
# raw tensor bytes that are not pickles.
_TORCH_LEGACY_PICKLES = 5
_TORCH_MAGIC = (b"\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19", b"119547037146038801333356")
# A pickle file or zip member up to this size is read into memory to parse (fast); bigger ones
# are streamed through a window that skips big values.
IN_MEMORY_BYTES = 64 * 1024 * 1024

# Archives. Loaders trust the sizes an archive declares; so do we, since zipfile never
# inflates past them. A torch or Keras archive is stored or lightly deflated (ratio near 1).
MAX_ZIP_ENTRIES = 100_000
ZIP_BOMB_TOTAL_BYTES = 1024**3  # a bomb expands past 1 GiB in total ...
ZIP_BOMB_TOTAL_RATIO = 50  # ... to more than 50x the archive's size,
ZIP_BOMB_ENTRY_BYTES = 100 * 1024 * 1024  # or one entry past 100 MiB ...
ZIP_BOMB_ENTRY_RATIO = 200  # ... at more than 200x its compressed size.

# Keras: modules it may import classes from, and modules whose functions a config may name
# (activations, losses, metrics). Anything else is an import of code shipped elsewhere.
_KERAS_CLASS_MODULES = ("keras", "tf_keras", "keras_hub", "keras_nlp", "keras_cv")
_KERAS_FUNCTION_MODULES = (
    "keras.activations", "keras.losses", "keras.metrics",
    "keras.src.activations", "keras.src.losses", "keras.src.metrics",
)  # fmt: skip
# Keras resolves {"module": "builtins", "class_name": "function"} to a Python builtin when the
# name is not one of its own (eval, exec, getattr, open, __import__ ...).
_PYTHON_BUILTINS = frozenset(dir(builtins))
_KERAS_LAMBDA_IN_METADATA = re.compile(rb'"class_name":\s*"Lambda"')

_PYTHON_SUFFIXES = (".py", ".pyc")
_PICKLE_SUFFIXES = (".pkl", ".pickle")


class FindingKind(StrEnum):
    """Why a file fails the check."""

    IMPORT = "import"
    """A pickle imports something outside SAFE_GLOBALS: that is what it calls on load."""
    UNPARSABLE = "unparsable-pickle"
    """A pickle does not parse; an unpickler runs everything before the point it breaks."""
    OBJECT_ARRAY = "object-array"
    """A .npy of dtype object: numpy.load(allow_pickle=True) unpickles its data."""
    ARCHIVE = "archive"
    """An archive entry escapes its directory, is a link, or the archive is a bomb."""
    KERAS_LAMBDA = "keras-lambda"
    """A Keras Lambda layer: Python bytecode that runs when the model is built."""
    KERAS_REFERENCE = "keras-reference"
    """A Keras config naming a module or function outside Keras: imported on load."""
    REMOTE_CODE = "remote-code"
    """A config that asks the loader to run the repository's own code."""
    PYTHON = "python-source"
    """Python source shipped with the weights."""
    UNSCANNABLE = "unscannable"
    """A file that could not be scanned (damaged, too large); not scanned is not safe."""


@dataclass(frozen=True)
class Finding:
    """One reason the model may run code on load."""

    file: str
    kind: FindingKind
    what: str

    def __str__(self) -> str:
        return f"{self.file}: {self.what}"

    def as_dict(self) -> dict[str, str]:
        return {"file": self.file, "kind": self.kind.value, "what": self.what}


_Issue = tuple[FindingKind, str]
_Scanner = Callable[[ModelFile], list[_Issue] | None]


def check_unsafe_code(inv: Inventory, ctx: CheckContext) -> CheckResult:
    """Every file that can carry code, scanned; any import outside the allowlist fails."""
    started = time.perf_counter()
    findings: list[Finding] = []
    scanned: list[str] = []
    for mf in inv.files:
        scanner = _scanner_for(mf)
        if scanner is None:
            continue
        try:
            issues = scanner(mf)
        except Exception as exc:  # a hostile file must not take the check down
            issues = [(FindingKind.UNSCANNABLE, f"could not scan: {type(exc).__name__}: {exc}")]
        if issues is None:
            continue
        scanned.append(mf.rel)
        findings += [Finding(mf.rel, kind, what) for kind, what in issues]
    details: dict[str, Any] = {
        "findings": [f.as_dict() for f in findings],
        "scanned": scanned,
    }
    if findings:
        reason = summarise_findings([str(f) for f in findings])
        return result(NAME, Status.FAILED, reason, started=started, details=details)
    if not scanned:
        reason = f"no pickles, archives or code in {len(inv.files)} files"
    else:
        reason = f"nothing runs code on load ({len(scanned)} of {len(inv.files)} files scanned)"
    return result(NAME, Status.PASSED, reason, started=started, details=details)


def _scanner_for(mf: ModelFile) -> _Scanner | None:
    name = mf.path.name.lower()
    if mf.kind is Kind.PYTHON or name.endswith(_PYTHON_SUFFIXES):
        return _scan_python
    if mf.kind is Kind.JSON and name.endswith("config.json"):
        return _scan_config  # tokenizer_config.json, preprocessor_config.json ... carry auto_map
    return _SCANNERS.get(mf.kind)


# --- Pickles -------------------------------------------------------------------------------


class _ScanLimit(Exception):
    """A pickle stream larger than this check is willing to parse."""


class _Unread(bytes):
    """A value too big to read: its length is right, its content is not there. pickletools
    checks the length; the globals picklescan reports never come from such values."""

    length: int

    def __new__(cls, length: int) -> _Unread:
        value = super().__new__(cls, b"")
        value.length = length
        return value

    def __len__(self) -> int:
        return self.length


@dataclass
class _Budget:
    """What is left to spend on one pickle stream (read at scan time, so tests can lower it)."""

    ops: int
    read_bytes: int

    def spend(self, n: int) -> None:
        self.read_bytes -= n
        if self.read_bytes < 0:
            raise _ScanLimit(f"more than {MAX_PICKLE_READ_BYTES:,} bytes of opcodes")


class _Window:
    """The bytes [start, end) of a seekable stream, read as pickletools reads a pickle: values
    over SKIP_VALUE_BYTES are skipped rather than read, and reads are charged to a budget.
    It keeps its own position: a buffered file's tell() is a system call."""

    def __init__(self, raw: IO[bytes], start: int, end: int, budget: _Budget | None) -> None:
        self._raw = raw
        self._end = end
        self._budget = budget
        self._pos = raw.seek(start)

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = self._raw.seek(offset, whence)  # picklescan peeks a byte and steps back
        return self._pos

    def read(self, n: int = -1) -> bytes:
        left = self._end - self._pos
        if n < 0 or n > left:
            n = left if left > 0 else 0  # a short read is how pickletools sees the end
        if n > SKIP_VALUE_BYTES:
            self._pos = self._raw.seek(n, io.SEEK_CUR)
            return _Unread(n)
        if self._budget is not None:
            self._budget.spend(n)
        data = self._raw.read(n)
        self._pos += len(data)
        return data

    def readline(self) -> bytes:
        left = self._end - self._pos
        line = self._raw.readline(min(left, SKIP_VALUE_BYTES) if left > 0 else 0)
        if self._budget is not None:
            self._budget.spend(len(line))
        self._pos += len(line)
        return line


@dataclass
class _PickleScan:
    """What the pickles of one stream import, and whether they parse."""

    imports: list[tuple[str, str]] = field(default_factory=list)
    error: str | None = None
    limit: str | None = None


def _scan_pickles(source: bytes | IO[bytes], start: int, end: int) -> _PickleScan:
    """Every pickle from `start` to `end` (or the legacy torch format's five), each parsed on its
    own as an unpickler would: its own memo, and a parse error anywhere is reported.

    picklescan's `_list_globals` resolves the imports. Its own entry points do not fit: with
    `multiple_pickles=False` it swallows parse errors, and with True it shares one memo across
    back-to-back pickles, so a memo filled by one pickle can disguise the next one's imports.
    So each pickle is first delimited with pickletools (which finds where it stops, or where it
    breaks) and then handed to picklescan alone."""
    scan = _PickleScan()
    budget = _Budget(ops=MAX_PICKLE_OPS, read_bytes=MAX_PICKLE_READ_BYTES)
    if isinstance(source, bytes):
        end = len(source)
    pos, count, expected = start, 0, None
    while pos < end:
        if count == MAX_PICKLES_PER_STREAM:
            scan.limit = f"more than {MAX_PICKLES_PER_STREAM} pickles back to back"
            break
        try:
            stop, error = _delimit(_reader(source, pos, end, budget), budget)
        except _ScanLimit as exc:
            scan.limit = str(exc)
            break
        try:
            found = _list_globals(_reader(source, pos, stop, None), multiple_pickles=True)
        except GenOpsError as exc:  # only when the pickle is broken: globals before the break
            found = exc.globals or set()
            error = error or str(exc)
        except ValueError as exc:  # a STACK_GLOBAL without two operands
            found, error = set(), error or str(exc)
        for module, name in sorted(found, key=lambda g: (str(g[0]), str(g[1]))):
            if (module, name) not in scan.imports:
                scan.imports.append((module, name))
        if error is not None:
            scan.error = (
                error
                if count == 0
                else f"{error} (after {count} complete pickle{'s' * (count > 1)})"
            )
            break
        if count == 0 and _is_torch_legacy(_reader(source, pos, stop, None)):
            expected = _TORCH_LEGACY_PICKLES
        count += 1
        pos = stop
        if count == expected:
            break  # the rest is raw tensor data
    return scan


def _reader(source: bytes | IO[bytes], start: int, end: int, budget: _Budget | None) -> IO[bytes]:
    """The bytes [start, end) to parse: to delimit a pickle (with a budget), or to hand one
    pickle to picklescan (without). Bytes already in memory parse ~2x faster as a BytesIO than
    through a _Window, and need none of its limits."""
    if isinstance(source, bytes):
        if budget is None:
            return io.BytesIO(source[start:end])  # one pickle, alone
        reader = io.BytesIO(source)  # shares the bytes; `end` is their end
        reader.seek(start)
        return reader
    return cast(IO[bytes], _Window(source, start, end, budget))  # it only reads, tells and seeks


def _delimit(reader: IO[bytes], budget: _Budget) -> tuple[int, str | None]:
    """Where the pickle starting at the reader's position ends, or where and why it breaks."""
    try:
        for _ in pickletools.genops(reader):
            budget.ops -= 1
            if budget.ops < 0:
                raise _ScanLimit(f"more than {MAX_PICKLE_OPS:,} opcodes")
    except _ScanLimit:
        raise
    except Exception as exc:  # pickletools raises ValueError mostly, others on odd input
        return reader.tell(), str(exc) or type(exc).__name__
    return reader.tell(), None


def _is_torch_legacy(first_pickle: IO[bytes]) -> bool:
    head = first_pickle.read(64)
    return any(magic in head for magic in _TORCH_MAGIC)


def _pickle_issues(scan: _PickleScan, where: str = "") -> list[_Issue]:
    issues: list[_Issue] = []
    for module, name in scan.imports:
        if (module, name) in SAFE_GLOBALS:
            continue
        what = f"{where}imports {module}.{name}"
        if _UNRESOLVED in (module, name):
            what += " (an operand the parser could not resolve)"
        issues.append((FindingKind.IMPORT, what))
    if scan.error is not None:
        issues.append((FindingKind.UNPARSABLE, f"{where}pickle does not parse: {scan.error}"))
    if scan.limit is not None:
        issues.append((FindingKind.UNSCANNABLE, f"{where}pickle too large to scan: {scan.limit}"))
    return issues


def _looks_like_pickle(head: bytes) -> bool:
    """Protocol 2+ pickles open with PROTO and their version; nothing else is that specific."""
    return len(head) >= 2 and head[0] == 0x80 and head[1] <= 5


def _stream_size(raw: IO[bytes]) -> int:
    here = raw.tell()
    size = raw.seek(0, io.SEEK_END)
    raw.seek(here)
    return size


def _scan_pickle_file(mf: ModelFile) -> list[_Issue]:
    with mf.path.open("rb") as raw:
        if mf.size <= IN_MEMORY_BYTES:
            data = raw.read(IN_MEMORY_BYTES)  # a file grown since it was listed reads as truncated
            return _pickle_issues(_scan_pickles(data, 0, len(data)))
        return _pickle_issues(_scan_pickles(raw, 0, _stream_size(raw)))


def _scan_unknown(mf: ModelFile) -> list[_Issue] | None:
    """A file of no known format may still be a pickle: pickle.load takes any name. One that
    opens with PROTO is scanned like any pickle; otherwise it counts as a pickle only if it
    imports something a Python unpickler could import (text that happens to parse as a few
    protocol-0 opcodes imports nothing, and a pickle that imports nothing runs nothing)."""
    with mf.path.open("rb") as raw:
        head = raw.read(512)
        if _is_tar(head):
            return [(FindingKind.ARCHIVE, _TAR_FINDING)]
        if not head[:1] or (head[:1] not in _OPCODES and not _looks_like_pickle(head)):
            return None
        scan = _scan_pickles(raw, 0, _stream_size(raw))
    if not _looks_like_pickle(head):
        scan.imports = [g for g in scan.imports if all(map(_IMPORTABLE.fullmatch, g))]
        if not scan.imports:
            return None
    return _pickle_issues(scan)


_OPCODES = frozenset(op.code.encode("latin-1") for op in pickletools.opcodes)
_IMPORTABLE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


# torch's full (non weights-only) loader still reads the pre-2018 tar checkpoint format,
# whose members are pickles interleaved with raw data; we do not take tars apart.
_TAR_FINDING = (
    "tar archive: not scanned (torch.load unpickles legacy tar checkpoints); ship safetensors"
)


def _is_tar(head: bytes) -> bool:
    return head[257:262] == b"ustar"


# --- numpy ---------------------------------------------------------------------------------


def _npy_issues(raw: IO[bytes], where: str = "") -> list[_Issue]:
    """A .npy is safe unless its dtype holds Python objects: then its data is a pickle."""
    version = np.lib.format.read_magic(raw)
    if version not in ((1, 0), (2, 0), (3, 0)):
        return [(FindingKind.UNSCANNABLE, f"{where}unknown .npy format version {version}")]
    if version == (1, 0):
        _, _, dtype = np.lib.format.read_array_header_1_0(raw)
    else:
        _, _, dtype = np.lib.format.read_array_header_2_0(raw)
    if not dtype.hasobject:
        return []
    issues: list[_Issue] = [
        (
            FindingKind.OBJECT_ARRAY,
            f"{where}array of dtype {dtype} holds pickled objects "
            "(numpy.load needs allow_pickle=True, which unpickles them)",
        )
    ]
    return issues + _pickle_issues(_scan_pickles(raw, raw.tell(), _stream_size(raw)), where)


def _scan_npy_file(mf: ModelFile) -> list[_Issue]:
    with mf.path.open("rb") as raw:
        return _npy_issues(raw)


# --- Archives ------------------------------------------------------------------------------


def _scan_zip(mf: ModelFile) -> list[_Issue]:
    with zipfile.ZipFile(mf.path) as zf:
        infos = zf.infolist()
        if len(infos) > MAX_ZIP_ENTRIES:
            return [(FindingKind.ARCHIVE, f"more than {MAX_ZIP_ENTRIES:,} entries")]
        issues = _entry_issues(infos)
        bombs = _bomb_issues(infos, mf.size)
        if bombs:
            return issues + bombs  # nothing inside is worth inflating
        for info in infos:
            if not info.is_dir():
                issues += _member_issues(zf, info, mf.kind)
    return issues


def _entry_issues(infos: list[zipfile.ZipInfo]) -> list[_Issue]:
    issues: list[_Issue] = []
    for info in infos:
        name = info.orig_filename
        if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
            issues.append((FindingKind.ARCHIVE, f"entry {name!r} has an absolute path"))
        if ".." in re.split(r"[/\\]", name):
            issues.append((FindingKind.ARCHIVE, f"entry {name!r} climbs out of the archive"))
        if stat.S_ISLNK(info.external_attr >> 16):
            issues.append((FindingKind.ARCHIVE, f"entry {name!r} is a symbolic link"))
    for name, count in Counter(i.orig_filename for i in infos).items():
        if count > 1:  # loaders disagree on which copy they read; we scan each
            issues.append((FindingKind.ARCHIVE, f"entry {name!r} appears {count} times"))
    return issues


def _bomb_issues(infos: list[zipfile.ZipInfo], archive_size: int) -> list[_Issue]:
    issues: list[_Issue] = []
    total = sum(i.file_size for i in infos)
    if total > ZIP_BOMB_TOTAL_BYTES and total > ZIP_BOMB_TOTAL_RATIO * max(archive_size, 1):
        issues.append(
            (
                FindingKind.ARCHIVE,
                f"zip bomb: expands to {_size(total)} from {_size(archive_size)}",
            )
        )
    for info in infos:
        size, packed = info.file_size, max(info.compress_size, 1)
        if size > ZIP_BOMB_ENTRY_BYTES and size > ZIP_BOMB_ENTRY_RATIO * packed:
            issues.append(
                (
                    FindingKind.ARCHIVE,
                    f"zip bomb: entry {info.orig_filename!r} expands to {_size(size)} "
                    f"from {_size(packed)}",
                )
            )
    return issues


def _member_issues(zf: zipfile.ZipFile, info: zipfile.ZipInfo, kind: Kind) -> list[_Issue]:
    name = info.orig_filename
    lower = name.lower()
    where = f"{name}: "
    if lower.endswith(_PYTHON_SUFFIXES):
        return [(FindingKind.PYTHON, f"{where}Python source inside the archive")]
    if kind is Kind.KERAS_ZIP and name == "config.json":
        if info.file_size > MAX_JSON_BYTES:
            return [(FindingKind.UNSCANNABLE, f"{where}{_size(info.file_size)}: too large")]
        return _keras_issues(json.loads(zf.read(info)), where)
    named_pickle = lower.endswith(_PICKLE_SUFFIXES)
    if kind is Kind.PYTORCH_ZIP and not named_pickle and _is_tensor_record(name):
        return []  # raw tensor bytes, read by the loader as bytes, never unpickled
    try:
        with zf.open(info) as member:
            head = member.read(8)
            if head.startswith(b"\x93NUMPY"):
                member.seek(0)
                return _npy_issues(member, where)
            if not (named_pickle or _looks_like_pickle(head)):
                return []
            if info.file_size <= IN_MEMORY_BYTES:
                member.seek(0)
                data = member.read()
                scan = _scan_pickles(data, 0, len(data))
            else:
                scan = _scan_pickles(member, 0, info.file_size)
    except (zipfile.BadZipFile, RuntimeError, OSError, EOFError) as exc:  # encrypted, damaged
        return [(FindingKind.UNSCANNABLE, f"{where}could not read: {exc}")]
    return _pickle_issues(scan, where)


def _is_tensor_record(name: str) -> bool:
    """`<archive>/data/<key>`: where torch.save puts each storage's bytes."""
    parts = name.split("/")
    return len(parts) >= 2 and parts[-2] == "data"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


# --- Keras ---------------------------------------------------------------------------------


def _keras_issues(config: Any, where: str = "") -> list[_Issue]:
    """Lambda layers, and classes or functions from outside Keras, anywhere in a config."""
    issues: list[_Issue] = []
    queue: deque[Any] = deque([config])
    while queue:
        node = queue.popleft()
        if isinstance(node, list):
            queue.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        issue = _keras_object_issue(node, where)
        if issue is not None:
            issues.append(issue)
            if issue[0] is FindingKind.KERAS_LAMBDA:
                continue  # what is inside is the lambda itself
        queue.extend(node.values())
    return issues


def _keras_object_issue(node: dict[str, Any], where: str) -> _Issue | None:
    class_name = node.get("class_name")
    if class_name in ("Lambda", "__lambda__"):
        inner = node.get("config")
        label = inner.get("name") if isinstance(inner, dict) else None
        layer = f"Lambda layer {label!r}" if isinstance(label, str) else "lambda"
        return FindingKind.KERAS_LAMBDA, f"{where}Keras {layer}: its Python bytecode runs on load"
    module = node.get("module")
    if not isinstance(module, str) or not isinstance(class_name, str):
        return None  # not a Keras object reference (a layer option may be called "module")
    if class_name == "function":
        function = node.get("config")
        if module == "builtins":
            risky = function in _PYTHON_BUILTINS
        else:
            risky = not _in_namespace(module, _KERAS_FUNCTION_MODULES)
        if risky:
            return FindingKind.KERAS_REFERENCE, f"{where}config calls {module}.{function}"
        return None
    if not _in_namespace(module, _KERAS_CLASS_MODULES):
        what = node.get("spec_name", class_name)
        return FindingKind.KERAS_REFERENCE, f"{where}config imports {module}.{what}"
    return None


def _in_namespace(module: str, roots: tuple[str, ...]) -> bool:
    return any(module == root or module.startswith(root + ".") for root in roots)


def _scan_keras_h5(mf: ModelFile) -> list[_Issue]:
    import h5py  # heavy; only when there is an .h5 to read

    with h5py.File(mf.path, "r") as h5:
        raw = h5.attrs.get("model_config")
    if raw is None:
        return []  # weights only: nothing to build
    text = raw.decode("utf-8") if isinstance(raw, bytes | np.bytes_) else str(raw)
    return _keras_issues(json.loads(text), "model_config: ")


def _scan_saved_model(mf: ModelFile) -> list[_Issue]:
    """A Keras SavedModel describes its layers in keras_metadata.pb, next to saved_model.pb."""
    metadata = mf.path.parent / "keras_metadata.pb"
    if metadata.is_symlink() or not metadata.is_file():
        return []
    for chunk in _chunks(metadata, overlap=64):
        if _KERAS_LAMBDA_IN_METADATA.search(chunk):
            return [(FindingKind.KERAS_LAMBDA, "keras_metadata.pb declares a Keras Lambda layer")]
    return []


def _chunks(path: Path, *, overlap: int, size: int = 1024 * 1024) -> Iterator[bytes]:
    """A file in overlapping pieces, so that a pattern across a boundary is still seen."""
    with path.open("rb") as fh:
        tail = b""
        while block := fh.read(size):
            yield tail + block
            tail = block[-overlap:]


# --- Configs and source --------------------------------------------------------------------


def _scan_config(mf: ModelFile) -> list[_Issue]:
    """Hugging Face loaders run the repository's own code when a config asks for it."""
    config = json.loads(mf.path.read_bytes())
    issues: list[_Issue] = []
    queue: deque[Any] = deque([config])
    while queue:
        node = queue.popleft()
        if isinstance(node, list):
            queue.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        if node.get("trust_remote_code") is True:
            issues.append((FindingKind.REMOTE_CODE, "sets trust_remote_code: true"))
        for key in ("auto_map", "custom_pipelines"):
            if key in node:
                issues.append((FindingKind.REMOTE_CODE, f"{key} loads code: {_mapping(node[key])}"))
        queue.extend(node.values())
    return issues


def _mapping(value: Any) -> str:
    if isinstance(value, dict):
        pairs = (f"{k} -> {v if isinstance(v, str) else json.dumps(v)}" for k, v in value.items())
        return ", ".join(pairs)[:300] or "{}"
    return json.dumps(value)[:300]


def _scan_python(mf: ModelFile) -> list[_Issue]:
    return [
        (
            FindingKind.PYTHON,
            "Python source shipped with the model (trust_remote_code imports and runs it)",
        )
    ]


_SCANNERS: dict[Kind, _Scanner] = {
    Kind.PICKLE: _scan_pickle_file,
    Kind.PYTORCH_ZIP: _scan_zip,
    Kind.KERAS_ZIP: _scan_zip,
    Kind.ZIP: _scan_zip,
    Kind.NUMPY: _scan_npy_file,
    Kind.KERAS_H5: _scan_keras_h5,
    Kind.TF_SAVED_MODEL: _scan_saved_model,
    Kind.CONFIG: _scan_config,
    Kind.UNKNOWN: _scan_unknown,
}
