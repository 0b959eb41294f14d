"""Check: nothing in the model runs code when it is loaded, found without loading or unpickling."""

from __future__ import annotations

import builtins
import io
import itertools
import json
import mmap
import pickletools
import re
import stat
import struct
import time
import zipfile
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import IO, Any, Final

from services.contracts.events import CheckResult, Status
from services.validator.checks.base import (
    MAX_PICKLE_OPS_PER_VALIDATION,
    TIME_CHECK_MASK,
    CheckContext,
    on_time,
    result,
    spending,
    summarise_findings,
)
from services.validator.checks.hdf5 import read_hdf5
from services.validator.checks.headers import parsed_headers
from services.validator.checks.inventory import (
    MAX_JSON_BYTES,
    Inventory,
    Kind,
    ModelFile,
    is_tar,
)
from services.validator.checks.pickle_machine import (
    LONG_NAME,
    UNRESOLVED,
    Budget,
    Buffer,
    LimitReached,
    run_pickle,
)

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

# What Trainer itself pickles into training_args.bin beyond plain data: the arguments dataclass
# and the enums in its fields (pickled as class + value, or __new__ + __dict__; no code of
# theirs runs on load). Accepted only in training-state files, only with allow_training_state.
TRAINER_GLOBALS: Final[frozenset[tuple[str, str]]] = frozenset(
    {
        ("transformers.training_args", "TrainingArguments"),
        ("transformers.training_args_seq2seq", "Seq2SeqTrainingArguments"),
        ("transformers.training_args", "OptimizerNames"),
        ("transformers.trainer_utils", "IntervalStrategy"),
        ("transformers.trainer_utils", "SaveStrategy"),
        ("transformers.trainer_utils", "HubStrategy"),
        ("transformers.trainer_utils", "SchedulerType"),
        ("transformers.trainer_utils", "FSDPOption"),
        ("transformers.debug_utils", "DebugOption"),
        ("transformers.trainer_pt_utils", "AcceleratorConfig"),
    }
)
_ALLOW_TRAINING_STATE = "validation.allow_training_state"

# --- Limits --------------------------------------------------------------------------------
# Per pickle stream. A state dict's pickle is ~100 bytes and ~30 opcodes per tensor, so this
# allows ~60k tensors in one file; the simulated stack and memo grow with it, so it bounds memory.
MAX_PICKLE_OPS = 2_000_000
# A weights pickle imports a few dozen names; past this many, listing them is the attack.
MAX_DISTINCT_IMPORTS = 1000
# A compressed zip member is inflated into memory to scan, up to this size.
MAX_PICKLE_READ_BYTES = 256 * 1024 * 1024
# Pickles back to back in one file; the legacy torch format has 5, nothing we know has more.
MAX_PICKLES_PER_STREAM = 16
# The legacy (pre-1.6) torch format: the first pickle is this number, then 4 more pickles, then
# raw tensor bytes that are not pickles.
_TORCH_LEGACY_PICKLES = 5
_TORCH_MAGIC = (b"\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19", b"119547037146038801333356")
# A pickle file up to this size is read into memory to parse (fast); a bigger one is
# memory-mapped, so the array bytes between its opcodes are skipped, never read.
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

_PYTHON_SUFFIXES = (".py", ".pyc")
_PICKLE_SUFFIXES = (".pkl", ".pickle")


class FindingKind(StrEnum):
    """Why a file fails the check."""

    IMPORT = "import"
    """A pickle imports something outside SAFE_GLOBALS: that is what it calls on load."""
    UNPARSABLE = "unparsable-pickle"
    """A pickle does not load; an unpickler runs everything before the point it breaks."""
    PICKLE_FRAME = "pickle-frame"
    """An opcode crosses its FRAME's end, or a FRAME starts inside another: the C unpickler
    and pickletools-based scanners then read different programs from the same bytes."""
    OBJECT_ARRAY = "object-array"
    """A .npy of dtype object: numpy.load(allow_pickle=True) unpickles its data."""
    ARCHIVE = "archive"
    """An archive entry escapes its directory, is a link, or the archive is a bomb."""
    KERAS_LAMBDA = "keras-lambda"
    """A Keras Lambda layer: Python bytecode that runs when the model is built."""
    KERAS_LAYER = "keras-layer"
    """A Keras layer that loads a pickled module, a SavedModel or a file from outside the model."""
    TF_OP = "tensorflow-op"
    """A SavedModel graph op that reads or writes host files or calls into Python."""
    CHAT_TEMPLATE = "chat-template"
    """A Jinja chat template reaching outside its sandbox (renderers are not all sandboxed)."""
    KERAS_REFERENCE = "keras-reference"
    """A Keras config naming a module or function outside Keras: imported on load."""
    REMOTE_CODE = "remote-code"
    """A config that asks the loader to run the repository's own code."""
    OUTSIDE_FILE = "outside-file"
    """A config naming a file outside the model for the loader to read (a tokenizer's vocab)."""
    PYTHON = "python-source"
    """Python source shipped with the weights."""
    TRAINING_STATE = "training-state"
    """A Trainer checkpoint file serving never reads (optimizer.pt ...): a pickle for nothing."""
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
    allowed: list[str] = []
    for mf in inv.files:
        on_time()
        scanner = _scanner_for(mf)
        two = mf.hdf5_at is not None or mf.zip_kind is not None  # two formats in one file
        as_pickle = mf.kind in READ_AS_A_PICKLE_TOO
        if scanner is None and not two and not as_pickle:
            continue
        try:
            issues = scanner(mf) if scanner is not None else None
            if two:  # scanned as both
                issues = [*(issues or []), *_second_format(mf)]
            if as_pickle and (found := _as_a_pickle_from_byte_0(mf)):
                issues = [*(issues or []), *found]
        except Exception as exc:  # a hostile file must not take the check down
            issues = [(FindingKind.UNSCANNABLE, f"could not scan: {type(exc).__name__}: {exc}")]
        if issues is None:
            continue
        scanned.append(mf.rel)
        if mf.is_training_state:
            if ctx.policy.allow_training_state:
                issues = [i for i in issues if not _is_trainer_import(i)]
                allowed.append(mf.rel)
            else:
                issues = [(FindingKind.TRAINING_STATE, _TRAINING_STATE_FINDING), *issues]
        findings += [Finding(mf.rel, kind, what) for kind, what in issues]
    if _may_hold_chat_templates(inv):
        from services.validator.checks.chat_templates import scan_chat_templates

        try:
            templates = scan_chat_templates(inv, parsed_headers(ctx.shared))
        except Exception as exc:  # a hostile template must not take the check down
            what = f"chat templates could not be scanned: {type(exc).__name__}: {str(exc)[:200]}"
            findings.append(Finding("chat templates", FindingKind.UNSCANNABLE, what))
        else:
            scanned += [rel for rel in templates.files if rel not in scanned]
            findings += [
                Finding(rel, FindingKind.CHAT_TEMPLATE, w) for rel, w in templates.findings
            ]
    details: dict[str, Any] = {
        "findings": [f.as_dict() for f in findings],
        "scanned": scanned,
    }
    if allowed:
        details["allowed_training_state"] = allowed
    if findings:
        reason = summarise_findings([str(f) for f in findings])
        return result(NAME, Status.FAILED, reason, started=started, details=details)
    if not scanned:
        reason = f"no pickles, archives or code in {len(inv.files)} files"
    else:
        reason = f"nothing runs code on load ({len(scanned)} of {len(inv.files)} files scanned)"
    return result(NAME, Status.PASSED, reason, started=started, details=details)


_TRAINING_STATE_FINDING = (
    "training state that from_pretrained and serving never read (a Trainer checkpoint file), "
    "and a pickle: whoever loads it runs what it imports. Remove it from the upload, or set "
    f"{_ALLOW_TRAINING_STATE}: true to keep it (it is still scanned)"
)
_TRAINER_IMPORTS = tuple(f"imports {module}.{name}" for module, name in TRAINER_GLOBALS)


def _is_trainer_import(issue: _Issue) -> bool:
    kind, what = issue
    return kind is FindingKind.IMPORT and what.endswith(_TRAINER_IMPORTS)


def _may_hold_chat_templates(inv: Inventory) -> bool:
    """Whether any file can carry a chat template (Jinja's import is only paid then)."""
    from services.validator.checks.chat_templates import is_template_file

    return any(f.kind is Kind.GGUF or is_template_file(f) for f in inv.files)


def _scanner_for(mf: ModelFile) -> _Scanner | None:
    name = mf.path.name.lower()
    if mf.kind is Kind.PYTHON or name.endswith(_PYTHON_SUFFIXES):
        return _scan_python
    if mf.kind is Kind.JSON and (name.endswith("config.json") or name in TOKENIZER_ARGUMENTS):
        return _scan_config  # tokenizer_config.json, preprocessor_config.json ... carry auto_map
    return _SCANNERS.get(mf.kind)


# --- Pickles -------------------------------------------------------------------------------


@dataclass
class _PickleScan:
    """What the pickles of one stream import, and whether they load."""

    imports: list[tuple[str, str]] = field(default_factory=list)
    extensions: list[int] = field(default_factory=list)
    error: str | None = None
    frame_error: str | None = None
    limit: str | None = None


@contextmanager
def _stream_budget() -> Iterator[Budget]:
    """A stream's opcodes (an archive shares one among its members), taken from what the
    validation has left (base.ValidationBudget) and charged to it as they are run."""
    total = spending()
    left = MAX_PICKLE_OPS if total is None else max(0, total.pickle_ops)
    budget = Budget(ops=min(MAX_PICKLE_OPS, left), capped=left < MAX_PICKLE_OPS)
    granted = budget.ops
    try:
        yield budget
    finally:
        if total is not None:
            total.pickle_ops -= granted - max(budget.ops, 0)


def _limit_reached(budget: Budget) -> str:
    if budget.capped:
        return (
            f"not scanned to the end: this validation has run its "
            f"{MAX_PICKLE_OPS_PER_VALIDATION:,} pickle opcodes (each file may run "
            f"{MAX_PICKLE_OPS:,})"
        )
    return f"more than {MAX_PICKLE_OPS:,} opcodes"


def _scan_pickles(buf: Buffer, start: int, end: int, budget: Budget | None = None) -> _PickleScan:
    """Every pickle from `start` to `end` (or the legacy torch format's five), each run on its
    own as an unpickler would: its own memo, and a reason wherever one would stop loading.
    Whitespace after the last STOP is allowed: pickle.load never reads it (hand-edited files
    end in a newline); anything else after it is parsed as the next pickle."""
    if budget is None:
        with _stream_budget() as own:
            return _scan_pickles(buf, start, end, own)
    scan = _PickleScan()
    seen: set[tuple[str, str]] = set()
    pos, count, expected = start, 0, None
    while pos < end:
        if count and _only_whitespace(buf, pos, end):
            break
        if count == MAX_PICKLES_PER_STREAM:
            scan.limit = f"more than {MAX_PICKLES_PER_STREAM} pickles back to back"
            break
        try:
            run = run_pickle(buf, pos, end, budget, origin=start)
        except LimitReached:
            scan.limit = _limit_reached(budget)
            break
        for imported in run.imports:
            if imported not in seen:
                seen.add(imported)
                scan.imports.append(imported)
        if len(scan.imports) > MAX_DISTINCT_IMPORTS:
            del scan.imports[MAX_DISTINCT_IMPORTS:]
            scan.limit = f"more than {MAX_DISTINCT_IMPORTS:,} distinct imports"
            break
        scan.extensions += run.extensions
        if not run.loads:
            after = "" if count == 0 else f" (after {count} complete pickle{'s' * (count > 1)})"
            if run.frame_error is not None:
                scan.frame_error = run.frame_error + after
            else:
                scan.error = f"{run.error}{after}"
            break
        if count == 0 and _is_torch_legacy(buf, pos, run.end):
            expected = _TORCH_LEGACY_PICKLES
        count += 1
        pos = run.end
        if count == expected:
            break  # the rest is raw tensor data
    return scan


_WHITESPACE = b" \t\r\n\x0b\x0c"
_MAX_TRAILING_WHITESPACE = 64 * 1024


def _only_whitespace(buf: Buffer, start: int, end: int) -> bool:
    return end - start <= _MAX_TRAILING_WHITESPACE and not buf[start:end].strip(_WHITESPACE)


def _is_torch_legacy(buf: Buffer, start: int, end: int) -> bool:
    head = buf[start : min(end, start + 64)]
    return any(magic in head for magic in _TORCH_MAGIC)


@contextmanager
def _mapped(path: Path, size: int) -> Iterator[Buffer]:
    """A file's bytes: read when small (fastest to parse), memory-mapped when big, so that
    a multi-GB pickle's array data is skipped by position and never read."""
    with path.open("rb") as fh:
        if size <= IN_MEMORY_BYTES:
            yield fh.read(IN_MEMORY_BYTES)  # a file grown since it was listed reads truncated
            return
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            yield mm


def _pickle_issues(scan: _PickleScan, where: str = "") -> list[_Issue]:
    issues: list[_Issue] = []
    for module, name in scan.imports:
        if (module, name) in SAFE_GLOBALS:
            continue
        what = f"{where}imports {module}.{name}"
        if UNRESOLVED in (module, name):
            what += " (a STACK_GLOBAL operand built at load time, not a constant)"
        elif LONG_NAME in (module, name):
            what += " (a constant name too long to show, which the unpickler still resolves)"
        issues.append((FindingKind.IMPORT, what))
    for code in scan.extensions:
        issues.append(
            (
                FindingKind.IMPORT,
                f"{where}imports extension code {code} (EXT opcode: whatever the loading "
                "process registered in copyreg)",
            )
        )
    if scan.frame_error is not None:
        issues.append(
            (
                FindingKind.PICKLE_FRAME,
                f"{where}pickle does not load: {scan.frame_error} (FRAME-boundary evasion, "
                "CPython issue 154848)",
            )
        )
    if scan.error is not None:
        issues.append((FindingKind.UNPARSABLE, f"{where}pickle does not load: {scan.error}"))
    if scan.limit is not None:
        issues.append((FindingKind.UNSCANNABLE, f"{where}pickle too large to scan: {scan.limit}"))
    return issues


def _looks_like_pickle(head: bytes) -> bool:
    """Protocol 2+ pickles open with PROTO and their version; nothing else is that specific."""
    return len(head) >= 2 and head[0] == 0x80 and head[1] <= 5


def _scan_pickle_file(mf: ModelFile) -> list[_Issue]:
    with _mapped(mf.path, mf.size) as buf:
        if is_tar(bytes(buf[:512])):  # sniff takes tars first; this holds if it ever did not
            return [(FindingKind.ARCHIVE, _TAR_FINDING)]
        return _pickle_issues(_scan_pickles(buf, 0, len(buf)))


def _scan_if_pickle_like(mf: ModelFile) -> tuple[bytes, _PickleScan] | list[_Issue] | None:
    """A file of no known format, scanned if it may be a pickle: its head and the scan. None
    when its first byte is no opcode; a tar's finding for a tar (torch.load unpickles those)."""
    if mf.size == 0:
        return None
    with _mapped(mf.path, mf.size) as buf:
        head = bytes(buf[:512])
        if is_tar(head):
            return [(FindingKind.ARCHIVE, _TAR_FINDING)]
        if head[:1] not in _OPCODES and not _looks_like_pickle(head):
            return None
        return head, _scan_pickles(buf, 0, len(buf))


def read_as_the_pickle_scan_does(buf: Buffer) -> None:
    """Read `buf` as the scan of a pickle, or of a file of no known format (ONNX external data
    too), reads it: its first 512 bytes (a tar header) and what the pickle model reads, never
    the array bytes it passes over by length. A remote file's read plan
    (services/validator/remote.py) is what this reads of a range reader: the check then reads
    exactly the fetched bytes, in the same order, and decides the same."""
    if len(buf) == 0 or is_tar(bytes(buf[:512])):
        return
    _scan_pickles(buf, 0, len(buf))


def _scan_unknown(mf: ModelFile) -> list[_Issue] | None:
    """A file of no known format may still be a pickle: pickle.load takes any name. One that
    opens with PROTO is scanned like any pickle; otherwise it counts as a pickle only if it
    imports something a Python unpickler could import (text that happens to parse as a few
    protocol-0 opcodes imports nothing, and a pickle that imports nothing runs nothing)."""
    scanned = _scan_if_pickle_like(mf)
    if not isinstance(scanned, tuple):
        return scanned
    head, scan = scanned
    if not _looks_like_pickle(head):
        # Text that breaks at its first byte, or runs out before a STOP, is no pickle (a
        # README line can read as a GLOBAL); any other break, a frame evasion or an import is
        # what pickle.load would have run into.
        scan.imports = [g for g in scan.imports if all(map(_importable, g))]
        if scan.error is not None and (
            scan.error.startswith("at byte 0:") or scan.error.endswith("(truncated)")
        ):
            scan.error = None
        if not (scan.imports or scan.extensions or scan.error or scan.frame_error):
            return None
    return _pickle_issues(scan)


def _scan_external_data(mf: ModelFile) -> list[_Issue] | None:
    """ONNX external data is raw tensor bytes, which may open like a pickle by chance (a float
    whose low byte is 0x80). It is still a file, and whatever loads it by its name
    (pytorch_model.bin, weights.pkl) unpickles it: being named as external data must not hide
    a payload. It counts as a pickle only if it imports something a Python unpickler could
    import or calls an extension, or its frames are forged: a stream that imports nothing
    runs nothing, however it breaks, and raw bytes break at once."""
    scanned = _scan_if_pickle_like(mf)
    if not isinstance(scanned, tuple):
        return scanned
    return _lenient_issues(scanned[1])


def _lenient_issues(scan: _PickleScan, where: str = "") -> list[_Issue]:
    """The issues of bytes that may be a pickle by chance (raw tensor bytes, another format):
    imports of names a Python unpickler could import, extension calls and forged frames; a
    stream that imports nothing runs nothing, however it breaks, and raw bytes break at once."""
    scan.imports = [g for g in scan.imports if all(map(_importable, g))]
    if scan.error is not None:
        # Raw bytes hit EXT1-4 (3 byte values of 256) and STACK_GLOBAL on whatever is on the
        # stack all the time, just before they break. Neither names anything to import: an
        # extension code resolves only where the loading process registered it in copyreg,
        # and STACK_GLOBAL on operands that are no string constants raises unless they came
        # from a call, which needs an import of its own. Imports named by constants stay,
        # however long (LONG_NAME).
        scan.extensions = []
        scan.imports = [g for g in scan.imports if UNRESOLVED not in g]
    if not (scan.imports or scan.extensions or scan.frame_error or scan.limit):
        return []  # scanned: raw bytes that read as a few opcodes
    return _pickle_issues(scan, where)


# Binary formats whose own checks never read them as a pickle. pickle.load, and torch.load
# with weights_only=False, read any file as one whatever its name: a valid safetensors or GGUF
# file can open with opcodes that pass over its header (its length's bytes read as opcodes)
# and run a payload in its tensor data, and a name like `x.data-00000-of-00001.pt`
# makes a TensorFlow shard of a protocol-0 pickle. Text kinds are left out: `cat\ndog\n`
# reads as an import of at.dog, and no loader unpickles a model card.
READ_AS_A_PICKLE_TOO: Final = frozenset(
    {Kind.SAFETENSORS, Kind.GGUF, Kind.ONNX, Kind.TF_VARIABLES_INDEX, Kind.TF_VARIABLES_DATA,
     Kind.TF_SAVED_MODEL, Kind.KERAS_METADATA, Kind.KERAS_H5, Kind.NUMPY}
)  # fmt: skip


def _as_a_pickle_from_byte_0(mf: ModelFile) -> list[_Issue]:
    """What pickle.load would import from the file, read as raw bytes are (ONNX external data:
    only imports, extension calls and forged frames count; its own format breaks the stream
    within a few opcodes)."""
    also = "read as a pickle from byte 0 (pickle.load reads any file): "
    return [(kind, also + what) for kind, what in _scan_external_data(mf) or []]


def _importable(name: str) -> bool:
    return name in (UNRESOLVED, LONG_NAME) or _IMPORTABLE.fullmatch(name) is not None


_OPCODES = frozenset(op.code.encode("latin-1") for op in pickletools.opcodes)
_IMPORTABLE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


# torch's full (non weights-only) loader still reads the pre-2018 tar checkpoint format,
# whose members are pickles interleaved with raw data; we do not take tars apart.
_TAR_FINDING = (
    "tar archive: not scanned (torch.load unpickles legacy tar checkpoints); ship safetensors"
)


# --- numpy ---------------------------------------------------------------------------------


# A .npy header is at most this long (numpy refuses longer ones unless told otherwise).
_NPY_HEADER_BYTES = 64 * 1024


def _npy_issues(
    buf: Buffer, start: int, end: int, where: str = "", budget: Budget | None = None
) -> list[_Issue]:
    """A .npy is safe unless its dtype holds Python objects: then its data is a pickle."""
    import numpy as np  # only when there is a .npy: numpy's import is most of a fast CLI run

    head = io.BytesIO(buf[start : min(end, start + _NPY_HEADER_BYTES)])
    version = np.lib.format.read_magic(head)
    if version not in ((1, 0), (2, 0), (3, 0)):
        return [(FindingKind.UNSCANNABLE, f"{where}unknown .npy format version {version}")]
    if version == (1, 0):
        _, _, dtype = np.lib.format.read_array_header_1_0(head)
    else:
        _, _, dtype = np.lib.format.read_array_header_2_0(head)
    if not dtype.hasobject:
        return []
    issues: list[_Issue] = [
        (
            FindingKind.OBJECT_ARRAY,
            f"{where}array of dtype {dtype} holds pickled objects "
            "(numpy.load needs allow_pickle=True, which unpickles them)",
        )
    ]
    return issues + _pickle_issues(_scan_pickles(buf, start + head.tell(), end, budget), where)


def npy_holds_objects(head: bytes) -> bool:
    """Whether a .npy whose first _NPY_HEADER_BYTES are `head` holds pickled objects: then its
    scan reads the data; else only this header (remote validation fetches no more)."""
    try:
        return bool(_npy_issues(head, 0, len(head), budget=Budget(ops=0)))
    except Exception:  # a header numpy cannot read: the scan reads it all
        return True


def _scan_npy_file(mf: ModelFile) -> list[_Issue]:
    with _mapped(mf.path, mf.size) as buf:
        return _npy_issues(buf, 0, len(buf))


# --- Archives ------------------------------------------------------------------------------


def _scan_zip(mf: ModelFile) -> list[_Issue]:
    with zipfile.ZipFile(mf.path) as zf:
        infos = zf.infolist()
        if len(infos) > MAX_ZIP_ENTRIES:
            return [(FindingKind.ARCHIVE, f"more than {MAX_ZIP_ENTRIES:,} entries")]
        issues = _entry_issues(infos) + _layout_issues(zf, infos)
        bombs = _bomb_issues(infos, mf.size)
        if bombs:
            return issues + bombs  # nothing inside is worth inflating
        with _stream_budget() as budget:
            try:
                for info in infos:
                    on_time()  # 100,000 members took 4.4 s
                    if not info.is_dir():
                        issues += _member_issues(zf, info, mf.kind, budget, mf.path.name)
            except LimitReached:
                issues.append((FindingKind.UNSCANNABLE, _limit_reached(budget)))
    return issues


def _layout_issues(zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo]) -> list[_Issue]:
    """Readers must agree on what an archive holds. Python's zipfile finds the central
    directory just before the end record and shifts every offset by the difference; torch's
    reader (miniz) trusts the offset the end record declares. So a central directory that is
    not where the end record says it is lets two directories describe one file; and entries
    whose data overlap let one stored pickle be scanned, and counted, many times."""
    issues: list[_Issue] = []
    fp = zf.fp
    assert fp is not None
    end = zipfile._EndRecData(fp)  # type: ignore[attr-defined]  # stable since Python 2
    if end is not None:
        declared = end[zipfile._ECD_OFFSET]  # type: ignore[attr-defined]
        if zf.start_dir != declared and declared != 0xFFFFFFFF:
            issues.append(
                (
                    FindingKind.ARCHIVE,
                    f"central directory at byte {zf.start_dir:,}, but the end record says "
                    f"{declared:,}: zip readers disagree on its entries (data before the "
                    "archive, or a second directory)",
                )
            )
        issues += _zip64_locator_issues(fp, end[zipfile._ECD_LOCATION])  # type: ignore[attr-defined]
    spans = sorted(infos, key=lambda i: i.header_offset)
    for prev, info in itertools.pairwise(spans):
        if info.header_offset < prev.header_offset + 30 + prev.compress_size:
            issues.append(
                (
                    FindingKind.ARCHIVE,
                    f"entries {prev.orig_filename!r} and {info.orig_filename!r} overlap",
                )
            )
            break
    return issues


def _zip64_locator_issues(fp: IO[bytes], end_record_at: int) -> list[_Issue]:
    """A zip64 locator (20 bytes before the end record) says where the zip64 end record is.
    Python's zipfile ignores that and reads the 56 bytes before the locator; torch's reader
    (miniz) goes where it says. Two zip64 records are two central directories."""
    at = end_record_at - 20
    if at < 0:
        return []
    fp.seek(at)
    locator = fp.read(20)
    if len(locator) < 20 or locator[:4] != b"PK\x06\x07":
        return []
    (declared,) = struct.unpack_from("<Q", locator, 8)
    if declared == at - 56:
        return []
    return [
        (
            FindingKind.ARCHIVE,
            f"zip64 locator points at byte {declared:,}, but zipfile reads the zip64 end record "
            f"at {at - 56:,}: zip readers disagree on its entries (two central directories)",
        )
    ]


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


def _member_issues(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, kind: Kind, budget: Budget, archive: str
) -> list[_Issue]:
    name = info.orig_filename
    lower = name.lower()
    where = f"{name}: "
    if lower.endswith(_PYTHON_SUFFIXES):
        return [(FindingKind.PYTHON, f"{where}Python source inside the archive")]
    if name == "config.json":  # Keras 3 builds a model from the config.json of any zip
        if info.file_size > MAX_JSON_BYTES:
            return [(FindingKind.UNSCANNABLE, f"{where}{_size(info.file_size)}: too large")]
        try:
            config = json.loads(zf.read(info))
        except (ValueError, RecursionError):
            if kind is Kind.KERAS_ZIP:
                raise
            return []  # not JSON: Keras builds nothing from it
        return _keras_issues(config, where)
    named_pickle = lower.endswith(_PICKLE_SUFFIXES)
    if lower == "saved_model.pb" or lower.endswith("/saved_model.pb"):
        with _member_bytes(zf, info) as (buf, start, end):
            return _graph_issues(buf, start, end, where)
    if kind is Kind.PYTORCH_ZIP and not named_pickle and skips_tensor_record(archive, name):
        return []  # raw tensor bytes, read by the loader as bytes, never unpickled
    try:
        with _member_bytes(zf, info) as (buf, start, end):
            head = buf[start : start + 8]
            if head.startswith(b"\x93NUMPY"):
                return _npy_issues(buf, start, end, where, budget)
            if not (named_pickle or _looks_like_pickle(head)):
                # pandas.read_pickle opens a one-member zip by its name and unpickles the
                # member whatever it is called: read as raw bytes are (imports count).
                if buf[start : start + 1] not in _OPCODES:
                    return []
                return _lenient_issues(_scan_pickles(buf, start, end, budget), where)
            scan = _scan_pickles(buf, start, end, budget)
    except _TooBig as exc:
        return [(FindingKind.UNSCANNABLE, f"{where}{exc}")]
    except (zipfile.BadZipFile, RuntimeError, OSError, EOFError, ValueError) as exc:
        return [(FindingKind.UNSCANNABLE, f"{where}could not read: {exc}")]  # encrypted, damaged
    return _pickle_issues(scan, where)


class _TooBig(Exception):
    """A compressed member too big to inflate into memory for a scan."""


@contextmanager
def _member_bytes(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Iterator[tuple[Buffer, int, int]]:
    """A member's bytes as (buffer, start, end). A stored member (how torch.save writes every
    entry) is a range of the archive, memory-mapped so big values are skipped, not read; a
    compressed one is inflated into memory, up to MAX_PICKLE_READ_BYTES."""
    if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1 and zf.fp:
        start = _member_data_offset(zf, info)
        with mmap.mmap(zf.fp.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            end = start + info.file_size
            if end > len(mm):
                raise zipfile.BadZipFile(f"member runs past the end of the archive ({end:,})")
            yield mm, start, end
        return
    if info.file_size > MAX_PICKLE_READ_BYTES:
        raise _TooBig(
            f"compressed member of {_size(info.file_size)}: too large to scan "
            f"(over {_size(MAX_PICKLE_READ_BYTES)}); store it uncompressed"
        )
    data = zf.read(info)
    yield data, 0, len(data)


def _member_data_offset(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> int:
    """Where a member's data starts: after its local header, whose name and extra field
    lengths may differ from the central directory's."""
    fp = zf.fp
    assert fp is not None
    fp.seek(info.header_offset)
    local = fp.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for {info.orig_filename!r}")
    name_len: int
    extra_len: int
    name_len, extra_len = struct.unpack_from("<HH", local, 26)
    return int(info.header_offset) + 30 + name_len + extra_len


def skips_tensor_record(archive: str, name: str) -> bool:
    """`<archive>/data/<key>` of a torch zip: where torch.save puts each storage's bytes, which
    torch reads as bytes; not scanned (nor fetched remotely). Unless numpy would read it: a
    member named .npy, or any member of an archive named .npz (np.load takes the members
    that open with its magic, and unpickles object arrays)."""
    parts = name.split("/")
    if archive.lower().endswith(".npz") or name.lower().endswith(".npy"):
        return False
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
    turns = 0
    while queue:
        turns += 1
        if not turns & TIME_CHECK_MASK:
            on_time()
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
    from services.validator.checks.keras_tf import keras_layer_issue  # only for Keras files

    outside = keras_layer_issue(node)
    if outside is not None:
        return FindingKind.KERAS_LAYER, f"{where}{outside}"
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


def _second_format(mf: ModelFile) -> list[_Issue]:
    """What the file holds besides its kind. When libhdf5 finds a superblock after a user
    block: an HDF5 file's issues for a zip or numpy file; for the HDF5 file, its user block's,
    which pickle.load and torch.load read from byte 0 (a pickle, or a tar). When zipfile finds
    a zip from the file's end: that zip's."""
    issues: list[_Issue] = []
    if mf.hdf5_at is not None and mf.kind is Kind.KERAS_H5:
        issues += [(k, f"its user block: {w}") for k, w in (_scan_unknown(mf) or [])]
    elif mf.hdf5_at is not None:
        also = f"also an HDF5 file (superblock at byte {mf.hdf5_at:,}): "
        issues += [(k, also + w) for k, w in _scan_keras_h5(mf)]
    if mf.zip_kind is not None:
        also = f"also a {mf.zip_kind.value} found from its end record: "
        issues += [(k, also + w) for k, w in _scan_zip(replace(mf, kind=mf.zip_kind))]
    return issues


def _scan_keras_h5(mf: ModelFile) -> list[_Issue]:
    read = read_hdf5(mf.path)
    if read.problem is not None:
        return [(FindingKind.UNSCANNABLE, f"could not scan: {read.problem}")]
    text = read.model_config
    if text is None:
        return []  # weights only: nothing to build
    return _keras_issues(json.loads(text), "model_config: ")


# keras_metadata.pb holds each layer's JSON inside protobuf strings; the layers that load code
# or outside files are found by their class names there.
_KERAS_CLASS_IN_METADATA = re.compile(rb'"class_name":\s*"(Lambda|TorchModuleWrapper|TFSMLayer)"')
_METADATA_LAYERS: Final[dict[str, tuple[FindingKind, str]]] = {
    "Lambda": (FindingKind.KERAS_LAMBDA, "its Python bytecode runs on load"),
    "TorchModuleWrapper": (
        FindingKind.KERAS_LAYER,
        "a pickled torch module that torch.load runs when the model is built (CVE-2025-49655)",
    ),
    "TFSMLayer": (
        FindingKind.KERAS_LAYER,
        "loads the SavedModel at a path in its config and runs its graph (CVE-2026-1462)",
    ),
}


def _scan_saved_model(mf: ModelFile) -> list[_Issue]:
    """Every op of the graph and its function library; and the Keras layers that a Keras
    SavedModel describes in keras_metadata.pb, next to saved_model.pb."""
    if mf.path.name.lower() == "saved_model.pbtxt":
        return [(FindingKind.UNSCANNABLE, "a text-format SavedModel graph is not parsed")]
    with _mapped(mf.path, mf.size) as buf:
        issues = _graph_issues(buf, 0, len(buf))
    metadata = mf.path.parent / "keras_metadata.pb"
    if metadata.is_symlink() or not metadata.is_file():
        return issues
    for chunk in _chunks(metadata, overlap=64):
        for found in sorted(set(_KERAS_CLASS_IN_METADATA.findall(chunk))):
            layer = found.decode()
            how = _METADATA_LAYERS[layer]
            issues.append((how[0], f"keras_metadata.pb declares a Keras {layer} layer: {how[1]}"))
        if issues:
            break
    return issues


def _graph_issues(buf: Buffer, start: int, end: int, where: str = "") -> list[_Issue]:
    from services.validator.checks.keras_tf import saved_model_op_issues  # only for SavedModels

    data = memoryview(buf)[start:end] if isinstance(buf, mmap.mmap) else buf[start:end]
    try:
        return [(FindingKind.TF_OP, f"{where}{what}") for what in saved_model_op_issues(data)]
    finally:
        if isinstance(data, memoryview):
            data.release()  # an mmap cannot close while a view of it is alive


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
    issues: list[_Issue] = _outside_files(config, mf.path.parent, mf.path.name.lower())
    places = len(issues)
    queue: deque[Any] = deque([config])
    turns = 0
    while queue:
        turns += 1
        if not turns & TIME_CHECK_MASK:
            on_time()
        node = queue.popleft()
        if isinstance(node, list):
            queue.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        asks: list[tuple[str, str]] = [
            (key, "") for key in ("auto_map", "custom_pipelines") if key in node
        ]
        if node.get("trust_remote_code") is True:
            asks.insert(0, ("trust_remote_code", ""))
        asks += [
            (key, name)
            for key in ATTENTION_KEYS
            if key in node
            for name in _strings(node[key])
            if HUB_KERNEL.match(name)
        ]
        places += len(asks)
        for key, name in asks[: max(0, MAX_CONFIG_FINDINGS - len(issues))]:
            if key == "trust_remote_code":
                issues.append((FindingKind.REMOTE_CODE, "sets trust_remote_code: true"))
            elif key in ATTENTION_KEYS:
                issues.append(
                    (
                        FindingKind.REMOTE_CODE,
                        f"{key} {name[:200]!r} is a kernel on the Hugging Face Hub: transformers "
                        "downloads its compiled code and runs it when the model loads",
                    )
                )
            else:
                issues.append((FindingKind.REMOTE_CODE, f"{key} loads code: {_mapping(node[key])}"))
        queue.extend(node.values())
    if places > len(issues):  # a 64 MB config of 3 million such keys made 23 s of findings
        issues.append(
            (FindingKind.REMOTE_CODE, f"asks for remote code in {places:,} places in all")
        )
    return issues


MAX_CONFIG_FINDINGS = 100
PATH_KEYS = frozenset({"vocab", "merges"})
"""tokenizer_config.json's arguments that transformers 5 hands to the tokenizer as file names,
over the model folder's own files (GPT2Tokenizer opens `vocab` and `merges` when they are
strings). `tokenizer_file` and `vocab_file` there are not: the folder's files win (tried), and
real configs carry their authors' absolute paths in them, so they are not findings."""

TOKENIZER_ARGUMENTS = frozenset({"special_tokens_map.json"})
"""JSON files besides the *config.json ones whose keys become the tokenizer's arguments:
transformers copies every key of special_tokens_map.json into them (a `vocab` there is read
like one in tokenizer_config.json)."""

SAFE_WEIGHTS_NAME = re.compile(r"[^/\\]+\.safetensors(?:\.index\.json)?\Z")


def _outside_files(config: Any, folder: Path, name: str = "") -> list[_Issue]:
    """A config's top-level arguments that make the loader read a file that is not one of the
    model's: from_pretrained passes tokenizer_config.json's keys to the tokenizer, which opens a
    name from anywhere on the host (a `vocab` of /etc/passwd became the vocabulary), and a
    relative name against its working directory, not the folder (`credentials.json` there read
    a secrets file of the benchmarker's data directory). So a name must be a file of the folder.
    `fast_tokenizer_files` picks a tokenizer.json by transformers version (`../x/tokenizer.4.0.json`
    loaded a tokenizer from outside), and `transformers_weights` names the weights file, which
    transformers reads with torch.load unless it is safetensors."""
    if not isinstance(config, dict):
        return []
    issues: list[_Issue] = []
    for key, value in config.items():
        if (
            key in PATH_KEYS
            or key == "gguf_file"  # the tokenizer is read from any GGUF it names (review 14)
            or (name in TOKENIZER_ARGUMENTS and isinstance(key, str) and key.endswith("_file"))
        ) and isinstance(value, str):
            # special_tokens_map.json's tokenizer_file, vocab_file, merges_file replace the
            # folder's own; tokenizer_config.json's carry authors' paths and are not read for
            # most classes (vocab_file is, for GemmaTokenizer: not caught here).
            names = [value]
        elif key == "fast_tokenizer_files" and isinstance(value, list):
            names = [v for v in value if isinstance(v, str)]
        elif key == "transformers_weights" and isinstance(value, str):
            if not SAFE_WEIGHTS_NAME.match(value):
                issues.append(
                    (
                        FindingKind.OUTSIDE_FILE,
                        f"transformers_weights names {value[:200]!r}, not a safetensors file: "
                        "transformers would read it with torch.load",
                    )
                )
            continue
        else:
            continue
        for name in names:
            why = _not_in_folder(name, folder, plain=key == "fast_tokenizer_files")
            if why is not None:
                issues.append(
                    (
                        FindingKind.OUTSIDE_FILE,
                        f"{key} names {name[:200]!r}, {why}: the loader would read it from the "
                        "host",
                    )
                )
        if len(issues) >= MAX_CONFIG_FINDINGS:
            break
    return issues[:MAX_CONFIG_FINDINGS]


def _not_in_folder(name: str, folder: Path, *, plain: bool) -> str | None:
    """Why `name` is not a file of `folder`, or None. `plain`: only a bare file name will do."""
    path = PurePosixPath(name.replace("\\", "/"))
    if name.startswith(("/", "~")) or re.match(r"[A-Za-z]:", name) or ".." in path.parts:
        return "a file outside the model"
    if plain and len(path.parts) != 1:
        return "not a file name of the model folder"
    target = folder.joinpath(*path.parts)
    try:
        inside = target.resolve().is_relative_to(folder.resolve())
        regular = target.is_file()
    except (OSError, RuntimeError):  # a symlink loop, a name too long
        return "not a file of the model"
    if not (inside and regular):
        return "not a file of the model (a relative name is opened from the working directory)"
    return None


ATTENTION_KEYS = ("attn_implementation", "_attn_implementation")
HUB_KERNEL = re.compile(r"[^/:]+/[^/:]+(?:@[^/:]+)?(?::[^/:]+)?\Z")
"""transformers' own test for an attention implementation that names a Hub kernel
(integrations/hub_kernels.py `is_kernel`): `org/repo`, `@revision`, `:function`."""


def _strings(value: Any) -> list[str]:
    """The names an attention setting gives: one, or one per sub-model (a dict)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [v for v in value.values() if isinstance(v, str)]
    return []


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
    Kind.NUMPY_ZIP: _scan_zip,
    Kind.NUMPY: _scan_npy_file,
    Kind.KERAS_H5: _scan_keras_h5,
    Kind.TF_SAVED_MODEL: _scan_saved_model,
    Kind.CONFIG: _scan_config,
    Kind.UNKNOWN: _scan_unknown,
    Kind.ONNX_EXTERNAL_DATA: _scan_external_data,
}
