"""Keras layers and TensorFlow graph ops that reach outside the model, found without loading it."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from services.validator.checks.base import TIME_CHECK_MASK, on_time
from services.validator.checks.headers import Field, HeaderError, protobuf_fields

__all__ = [
    "DANGEROUS_TF_OPS",
    "MAX_GRAPH_FIELDS",
    "TF_OPS_NOT_FLAGGED",
    "keras_layer_issue",
    "saved_model_op_issues",
]

# --- Keras ---------------------------------------------------------------------------------

# Keras resolves a class by class_name (registered_name only picks custom objects), so the name
# is what decides which from_config runs.
_TORCH_WRAPPER = "TorchModuleWrapper"
_TFSM_LAYER = "TFSMLayer"
# IndexLookup.set_vocabulary opens a str vocabulary with tf.io.gfile (paths, gs://, s3://...);
# Keras 3.12 refuses it in safe mode, older Keras and tf.keras do not (CVE-2025-12058).
_LOOKUP_CLASSES = frozenset({"StringLookup", "IntegerLookup", "TextVectorization", "IndexLookup"})
# Config keys that name a file when they hold a string: the lookup layers' vocabulary, and
# keras_hub's tokenizers (WordPiece and BytePair vocabulary, BytePair merges, SentencePiece
# proto), which open the path with open() the same way.
_FILE_KEYS = ("vocabulary", "merges", "proto")
# keras_hub's SentencePieceTokenizer takes a str proto over 2048 characters that decodes as
# base64 to be the serialized model itself, inline; anything else is a path.
_INLINE_PROTO_MIN_CHARS = 2048
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_SHOWN_CHARS = 200


def keras_layer_issue(node: dict[str, Any]) -> str | None:
    """Why this Keras object (class_name, config, module, registered_name) reaches outside the
    model when Keras builds it, or None. Lambda layers and non-Keras modules are the caller's."""
    class_name = node.get("class_name")
    if not isinstance(class_name, str):
        return None
    config = node.get("config")
    if not isinstance(config, dict):
        config = {}
    label = _label(class_name, config)
    if class_name == _TORCH_WRAPPER:
        # from_config base64-decodes config["module"] and gives it to torch.load, weights_only off.
        return (
            f"{label}: a pickled torch module that torch.load runs when the model is built "
            "(CVE-2025-49655)"
        )
    if class_name == _TFSM_LAYER:
        # __init__ calls tf.saved_model.load(filepath): a graph from outside the archive.
        path = config.get("filepath")
        shown = _shown(path) if isinstance(path, str) else "a path in its config"
        return (
            f"{label}: loads the SavedModel at {shown} and runs its graph when the model is "
            "built (CVE-2026-1462)"
        )
    for key in _FILE_KEYS:
        value = config.get(key)
        if not isinstance(value, str) or not value or _inline_proto(key, value):
            continue
        cve = " (CVE-2025-12058)" if class_name in _LOOKUP_CLASSES else ""
        if _URL.match(value):
            return (
                f"{label}: {key} {_shown(value)} is fetched from a URL when the model is built{cve}"
            )
        return (
            f"{label}: {key} {_shown(value)} is a file outside the model, read when the model "
            f"is built{cve}"
        )
    return None


def _label(class_name: str, config: dict[str, Any]) -> str:
    name = config.get("name")
    if isinstance(name, str):
        return f"Keras {class_name} layer {_shown(name)}"
    return f"Keras {class_name} layer"


def _inline_proto(key: str, value: str) -> bool:
    if key != "proto" or len(value) <= _INLINE_PROTO_MIN_CHARS:
        return False
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def _shown(text: str) -> str:
    """A name from the file, quoted and cut: it is attacker-controlled and may be huge."""
    if len(text) > _SHOWN_CHARS:
        return repr(text[:_SHOWN_CHARS]) + f"... ({len(text):,} chars)"
    return repr(text)


# --- TensorFlow graphs ---------------------------------------------------------------------

# Ops that touch the host's files or processes when the graph runs. Every name is a registered
# TensorFlow op (tensorflow/core/ops). TensorFlow's file ops take gs://, s3:// and hdfs:// paths
# as well, so "file" includes remote storage.
DANGEROUS_TF_OPS: Final[dict[str, str]] = {
    # Files, directly
    "ReadFile": "reads any file on the host when the graph runs",
    "WriteFile": "writes any file on the host, with contents from the graph, when it runs",
    "MatchingFiles": "lists the host's files matching a glob: how a graph finds what to read",
    "ImmutableConst": "memory-maps the file named in its memory_region_name attribute",
    # Python: the op calls a function registered in the serving process under its token
    "PyFunc": "calls back into Python code in the serving process (tf.py_function/numpy_function)",
    "PyFuncStateless": "calls back into Python code in the serving process (tf.numpy_function)",
    "EagerPyFunc": "calls back into Python code in the serving process (tf.py_function)",
    # The process
    "Abort": "ends the serving process when the graph runs",
    # TF1 readers: each reads the files whose names are queued for it
    "WholeFileReader": "reads whole files named by the graph (TF1 reader)",
    "WholeFileReaderV2": "reads whole files named by the graph (TF1 reader)",
    "TextLineReader": "reads the lines of files named by the graph (TF1 reader)",
    "TextLineReaderV2": "reads the lines of files named by the graph (TF1 reader)",
    "FixedLengthRecordReader": "reads records from files named by the graph (TF1 reader)",
    "FixedLengthRecordReaderV2": "reads records from files named by the graph (TF1 reader)",
    "TFRecordReader": "reads TFRecord files named by the graph (TF1 reader)",
    "TFRecordReaderV2": "reads TFRecord files named by the graph (TF1 reader)",
    "LMDBReader": "reads LMDB databases named by the graph (TF1 reader)",
    # tf.data sources and sinks: read or write the files their inputs name
    "TFRecordDataset": "reads TFRecord files named by the graph",
    "TextLineDataset": "reads text files named by the graph",
    "FixedLengthRecordDataset": "reads files named by the graph",
    "FixedLengthRecordDatasetV2": "reads files named by the graph",
    "CSVDataset": "reads CSV files named by the graph",
    "CSVDatasetV2": "reads CSV files named by the graph",
    "ExperimentalCSVDataset": "reads CSV files named by the graph",
    "LMDBDataset": "reads LMDB databases named by the graph",
    "ExperimentalLMDBDataset": "reads LMDB databases named by the graph",
    "SqlDataset": "runs SQL against a database file named by the graph",
    "ExperimentalSqlDataset": "runs SQL against a database file named by the graph",
    "MatchingFilesDataset": "lists the host's files matching globs from the graph",
    "ExperimentalMatchingFilesDataset": "lists the host's files matching globs from the graph",
    "LoadDataset": "reads a saved dataset from a path named by the graph",
    "SaveDataset": "writes a dataset to a path named by the graph",
    "SaveDatasetV2": "writes a dataset to a path named by the graph",
    "SnapshotDataset": "writes (and reads back) dataset snapshots at a path named by the graph",
    "SnapshotDatasetV2": "writes (and reads back) dataset snapshots at a path named by the graph",
    "DatasetToTFRecord": "writes a TFRecord file at a path named by the graph",
    "ExperimentalDatasetToTFRecord": "writes a TFRecord file at a path named by the graph",
    # Summaries and debugging: write files, or send tensors over the network
    "CreateSummaryFileWriter": "creates event files in a log directory named by the graph",
    "CreateSummaryDbWriter": "writes to an SQLite database named by the graph",
    "DebugIdentity": "sends tensors to its debug_urls (file:// writes, grpc:// sends out)",
    "DebugIdentityV2": "writes tensor dumps to its debug_urls (file://)",
    "DebugNanCount": "sends tensor statistics to its debug_urls (file:// writes, grpc:// sends)",
    "DebugNumericSummary": "sends tensor statistics to its debug_urls (file://, grpc://)",
    # Checkpoint and vocabulary readers used for warm starts, never for serving
    "LoadAndRemapMatrix": "reads a checkpoint at a path named by the graph",
    "GenerateVocabRemapping": "reads two vocabulary files named by the graph",
}

# Ops that do I/O yet are NOT flagged, and why: a check that fails every ordinary model is one
# that nobody can leave switched on.
TF_OPS_NOT_FLAGGED: Final[dict[str, str]] = {
    "SaveV2": "the checkpoint saver in every SavedModel: writes the prefix the caller passes",
    "RestoreV2": "the checkpoint restore in every SavedModel: how the loader reads variables/",
    "MergeV2Checkpoints": "every SavedModel's saver merges its shards with it",
    "ShardedFilename": "builds a shard name from strings; no I/O",
    "ShardedFilespec": "builds a shard glob from strings; no I/O",
    "StringJoin": "joins strings (the saver builds its temp path with it); no I/O",
    "StaticRegexFullMatch": "matches strings (the saver checks for s3:// with it); no I/O",
    "Save": "the TF1 (V1 checkpoint) saver of older SavedModels",
    "SaveSlices": "the TF1 (V1 checkpoint) saver of older SavedModels",
    "Restore": "the TF1 (V1 checkpoint) restore of older SavedModels",
    "RestoreSlice": "the TF1 (V1 checkpoint) restore of older SavedModels",
    "InitializeTableFromTextFile": "reads an asset vocabulary (assets/); every exported lookup",
    "InitializeTableFromTextFileV2": "reads an asset vocabulary (assets/); every exported lookup",
    "LookupTableImport": "fills a table from tensors in the graph; no file access",
    "LookupTableImportV2": "fills a table from tensors in the graph; no file access",
    "InitializeTable": "fills a table from tensors in the graph; no file access",
    "InitializeTableV2": "fills a table from tensors in the graph; no file access",
    "Print": "writes to stderr only",
    "PrintV2": "stdout, stderr or the log is fine; flagged when output_stream is file://",
    "Assert": "fails the call; nothing outside the graph",
    "DecodeJpeg": "decodes a tensor it is given (image models have it); no I/O",
    "DecodePng": "decodes a tensor it is given (image models have it); no I/O",
    "DecodeRaw": "reinterprets a tensor's bytes; no I/O",
    "QueueEnqueueV2": "an in-process queue; no I/O of its own",
    "QueueDequeueV2": "an in-process queue; no I/O of its own",
    "VarHandleOp": "an in-process variable",
    "ReadVariableOp": "reads an in-process variable",
}

_PRINT_TO_FILE = "appends to the file named in its output_stream attribute when the graph runs"
_OUTPUT_STREAM_FILE = b"file://"  # PrintV2's kernel writes to the path after this prefix
_OP_NAMES = {name.encode(): name for name in DANGEROUS_TF_OPS}
_LONGEST_OP = max(len(name) for name in _OP_NAMES)

MAX_GRAPH_FIELDS = 5_000_000
"""Protobuf fields walked in one saved_model.pb; past this it is not scanned (a 100k-node graph
is about 2M; a file of millions of empty fields must not hold the gate for minutes)."""
_MAX_ATTR_DEPTH = 8  # a func attribute's own attributes can hold further funcs; real graphs: 2


class _TooLarge(Exception):
    pass


@dataclass(frozen=True)
class _Place:
    """Where a node is, put into words only when something is found there."""

    walk: _Walk
    where: str
    name: Field | None

    def __str__(self) -> str:
        name = self.walk._text(self.name) if self.name is not None else ""
        return f"{self.where} (node {_shown(name)})"


@dataclass
class _Found:
    where: str  # the first place the op was seen
    reason: str
    more: int = 0  # further places, counted, not listed


@dataclass
class _Walk:
    buf: memoryview
    fields: int = 0
    found: dict[str, _Found] = field(default_factory=dict)

    def saved_model(self) -> None:
        for f in self._counted(0, len(self.buf)):
            if f.number == 2 and f.wire_type == 2:  # SavedModel.meta_graphs
                self._meta_graph(f)

    def _meta_graph(self, mg: Field) -> None:
        # MetaGraphDef.graph_def; a message field seen twice is merged, so every copy counts
        for f in self._fields(mg):
            if f.number == 2 and f.wire_type == 2:
                self._graph(f)

    def _graph(self, graph: Field) -> None:
        for f in self._fields(graph):
            if f.number == 1 and f.wire_type == 2:  # GraphDef.node
                self._node(f, "the graph")
            elif f.number == 2 and f.wire_type == 2:  # GraphDef.library
                for g in self._fields(f):
                    if g.number == 1 and g.wire_type == 2:  # FunctionDefLibrary.function
                        self._function(g)

    def _function(self, function: Field) -> None:
        name = ""
        for f in self._fields(function):
            if f.number == 1 and f.wire_type == 2:  # FunctionDef.signature (OpDef)
                for g in self._fields(f):
                    if g.number == 1 and g.wire_type == 2:  # OpDef.name; the last one wins
                        name = self._text(g)
        where = f"function {name}" if name else "an unnamed function"
        for f in self._fields(function):
            if f.number == 3 and f.wire_type == 2:  # FunctionDef.node_def
                self._node(f, where)

    def _node(self, node: Field, where: str) -> None:
        name: Field | None = None  # decoded only for a finding: most nodes never need it
        ops: list[Field] = []
        attrs: list[Field] = []
        for f in self._fields(node):
            if f.wire_type != 2:
                continue
            if f.number == 1:  # NodeDef.name; the last one wins
                name = f
            elif f.number == 2:  # NodeDef.op: every copy is checked, though the last one wins
                ops.append(f)
            elif f.number == 5:  # NodeDef.attr, map<string, AttrValue>
                attrs.append(f)
        place = _Place(self, where, name)
        for op_field in ops:
            op = self._op(op_field)
            if op is not None:
                self._record(op, f"op {op} in {place}")
            elif self._is(op_field, b"PrintV2") and self._prints_to_file(attrs):
                self._record("PrintV2", f"op PrintV2 in {place}", _PRINT_TO_FILE)
        for entry in attrs:
            self._attr_entry(entry, place, 0)

    def _attr_entry(self, entry: Field, place: _Place, depth: int) -> None:
        key: Field | None = None
        value: Field | None = None
        for f in self._fields(entry):
            if f.number == 1 and f.wire_type == 2:
                key = f
            elif f.number == 2 and f.wire_type == 2:
                value = f
        if value is not None:
            self._attr_value(value, key, place, depth)

    def _attr_value(self, value: Field, key: Field | None, place: _Place, depth: int) -> None:
        # A func attribute names a function to call, or a primitive op, which TensorFlow's
        # function runtime instantiates as a one-node function: a way to run ReadFile with no
        # ReadFile node anywhere.
        if depth > _MAX_ATTR_DEPTH:
            raise HeaderError(f"attributes nested more than {_MAX_ATTR_DEPTH} deep")
        for f in self._fields(value):
            if f.number == 10 and f.wire_type == 2:  # AttrValue.func (NameAttrList)
                self._func(f, key, place, depth)
            elif f.number == 1 and f.wire_type == 2:  # AttrValue.list
                for g in self._fields(f):
                    if g.number == 9 and g.wire_type == 2:  # ListValue.func
                        self._func(g, key, place, depth)

    def _func(self, func: Field, key: Field | None, place: _Place, depth: int) -> None:
        for f in self._fields(func):
            if f.number == 1 and f.wire_type == 2:  # NameAttrList.name
                op = self._op(f)
                if op is not None:
                    attr = _shown(self._text(key)) if key is not None else "''"
                    self._record(op, f"op {op} called through attribute {attr} of {place}")
            elif f.number == 2 and f.wire_type == 2:  # NameAttrList.attr
                self._attr_entry(f, place, depth + 1)

    def _prints_to_file(self, attrs: list[Field]) -> bool:
        for entry in attrs:
            key, value = None, None
            for f in self._fields(entry):
                if f.number == 1 and f.wire_type == 2:
                    key = f
                elif f.number == 2 and f.wire_type == 2:
                    value = f
            if key is None or value is None or not self._is(key, b"output_stream"):
                continue
            for f in self._fields(value):
                if f.number == 2 and f.wire_type == 2:  # AttrValue.s
                    head = bytes(
                        self.buf[f.start : f.start + min(f.length, len(_OUTPUT_STREAM_FILE))]
                    )
                    if head == _OUTPUT_STREAM_FILE:
                        return True
                elif f.number == 9 and f.wire_type == 2:  # a placeholder: set by the caller
                    return True
        return False

    def _record(self, op: str, where: str, reason: str | None = None) -> None:
        if op in self.found:
            self.found[op].more += 1
        else:
            self.found[op] = _Found(where, reason or DANGEROUS_TF_OPS[op])

    def _fields(self, parent: Field) -> Iterator[Field]:
        return self._counted(parent.start, parent.start + parent.length)

    def _counted(self, start: int, end: int) -> Iterator[Field]:
        for f in protobuf_fields(self.buf, start, end):
            self.fields += 1
            if self.fields > MAX_GRAPH_FIELDS:
                raise _TooLarge(f"more than {MAX_GRAPH_FIELDS:,} protobuf fields")
            if not self.fields & TIME_CHECK_MASK:  # across messages: a node holds a few
                on_time()
            yield f

    def _op(self, f: Field) -> str | None:
        if f.length > _LONGEST_OP:
            return None
        return _OP_NAMES.get(bytes(self.buf[f.start : f.start + f.length]))

    def _is(self, f: Field, text: bytes) -> bool:
        return f.length == len(text) and bytes(self.buf[f.start : f.start + f.length]) == text

    def _text(self, f: Field) -> str:
        raw = bytes(self.buf[f.start : f.start + min(f.length, _SHOWN_CHARS * 4)])
        return raw.decode("utf-8", "replace")

    def messages(self) -> list[str]:
        return [
            f"{f.where}{f', and {f.more} more' if f.more else ''}: {f.reason}"
            for f in self.found.values()
        ]


def saved_model_op_issues(data: bytes | memoryview) -> list[str]:
    """One message per file or process op kind in a saved_model.pb: every meta graph's nodes and
    every function in its library (function bodies, and ops named by func attributes). Malformed
    input gives "graph does not parse: ..." after whatever was found before the damage."""
    buf = memoryview(data)
    if buf.format != "B" or buf.ndim != 1:
        buf = buf.cast("B")
    walk = _Walk(buf)
    try:
        walk.saved_model()
    except HeaderError as exc:
        return [*walk.messages(), f"graph does not parse: {exc}"]
    except _TooLarge as exc:
        return [*walk.messages(), f"graph too large to scan: {exc}"]
    return walk.messages()
