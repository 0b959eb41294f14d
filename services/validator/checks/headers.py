"""Bounded parsers for weight-file headers: safetensors, GGUF, and the protobuf framing of ONNX
and TensorFlow. They read headers only, never tensor data, and every size they trust is checked
against the file first, so a lying header is an error here, not an allocation."""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol, overload

from services.validator.checks.base import TIME_CHECK_MASK, on_time
from services.validator.checks.inventory import SAFETENSORS_MAX_HEADER


class HeaderError(ValueError):
    """A header that is malformed, lies about sizes, or points outside its file."""


# ---- safetensors ----------------------------------------------------------------------------

# bits per element; sub-byte float formats pack elements.
SAFETENSORS_DTYPE_BITS: dict[str, int] = {
    "F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8,
    "U64": 64, "U32": 32, "U16": 16, "U8": 8, "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8,
    "F8_E8M0": 8, "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4, "C64": 64,
}  # fmt: skip

FLOAT_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "int4": 0.5}


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class SafetensorsHeader:
    path: Path
    header_len: int
    file_size: int
    tensors: dict[str, Tensor]
    metadata: dict[str, str]
    problems: list[str] = field(default_factory=list)

    @property
    def data_size(self) -> int:
        return self.file_size - 8 - self.header_len

    @property
    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


SAFETENSORS_MAX_TENSORS = 250_000


def read_safetensors(path: Path) -> SafetensorsHeader:
    """Parse and cross-check a safetensors header. Raises HeaderError when it cannot be read at
    all; structural problems that still leave a readable header are listed in `.problems`."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise HeaderError(f"{size} bytes: too short for a safetensors header")
        (n,) = struct.unpack("<Q", prefix)
        if n > SAFETENSORS_MAX_HEADER:
            raise HeaderError(f"header length {n} exceeds the format's 100 MB limit")
        if n > size - 8:
            raise HeaderError(f"header length {n} runs past the end of the {size}-byte file")
        raw = fh.read(n)
    # Counted before parsing: 1.4 million entries fit the 100 MB header limit and took 17 s
    # and 1.4 GB to read. The biggest real shards hold a few thousand tensors.
    entries = raw.count(b'"data_offsets"')
    if entries > SAFETENSORS_MAX_TENSORS:
        raise HeaderError(
            f"header lists {entries:,} tensors, more than the {SAFETENSORS_MAX_TENSORS:,} a "
            "safetensors file is read with (real shards hold a few thousand)"
        )
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HeaderError(f"header is not valid JSON: {exc}") from None
    except RecursionError:
        raise HeaderError("header is JSON nested too deeply to be a tensor table") from None
    if not isinstance(doc, dict):
        raise HeaderError("header is not a JSON object")
    meta = doc.pop("__metadata__", {})
    problems: list[str] = []
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        problems.append("__metadata__ must map strings to strings")
        meta = {}
    tensors: dict[str, Tensor] = {}
    for name, info in doc.items():
        tensor = _tensor(name, info, problems)
        if tensor is not None:
            tensors[name] = tensor
    header = SafetensorsHeader(path, n, size, tensors, meta, problems)
    _check_layout(header)
    return header


def _tensor(name: str, info: Any, problems: list[str]) -> Tensor | None:
    if not isinstance(info, dict):
        problems.append(f"{name}: entry is not an object")
        return None
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPE_BITS:
        problems.append(f"{name}: unknown dtype {dtype!r}")
        return None
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        problems.append(f"{name}: shape {shape!r} is not a list of non-negative integers")
        return None
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        problems.append(f"{name}: data_offsets {offsets!r} are not [begin, end] with begin <= end")
        return None
    tensor = Tensor(name, dtype, tuple(shape), offsets[0], offsets[1])
    bits = tensor.numel * SAFETENSORS_DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != tensor.nbytes:
        problems.append(
            f"{name}: {dtype} x {_short(list(shape))} is {_bytes(bits)} bytes but its offsets "
            f"span {tensor.nbytes}"
        )
    return tensor


def _bytes(bits: int) -> str:
    """`bits / 8` as text, exact for any integer (a float overflows past 10**308)."""
    whole, eighths = divmod(bits, 8)
    return _short(whole) + (f".{eighths * 125:03d}".rstrip("0") if eighths else "")


def _short(value: object, most: int = 120) -> str:
    """A value as text, cut to `most` characters: a hostile header's numbers run to thousands
    of digits (and Python refuses to print an int over 4,300)."""
    try:
        text = str(value)
    except ValueError:
        return f"{type(value).__name__} too long to print"
    return text if len(text) <= most else f"{text[:most]}… ({len(text)} characters)"


def _check_layout(header: SafetensorsHeader) -> None:
    """Tensors must tile the data section exactly: no holes, no overlaps, nothing past the end."""
    position = 0
    for tensor in sorted(header.tensors.values(), key=lambda t: (t.begin, t.end)):
        if tensor.begin > position:
            header.problems.append(f"hole of {tensor.begin - position} bytes before {tensor.name}")
        elif tensor.begin < position:
            header.problems.append(f"{tensor.name} overlaps the tensor before it")
        position = max(position, tensor.end)
    if position > header.data_size:
        header.problems.append(
            f"truncated: tensors need {position} data bytes, the file holds {header.data_size}"
        )
    elif position < header.data_size:
        header.problems.append(
            f"{header.data_size - position} unexplained bytes after the last tensor"
        )


# ---- GGUF -------------------------------------------------------------------------------------

# ggml type -> (block size in elements, bytes per block); mirrors gguf-py's GGML_QUANT_SIZES.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}  # fmt: skip

_GGUF_SCALARS: dict[int, str] = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
    12: "<d",
}  # fmt: skip
_GGUF_STRING, _GGUF_ARRAY = 8, 9
MAX_GGUF_STRING = 64 * 1024 * 1024
MAX_GGUF_ITEMS = 50_000_000
MAX_GGUF_TENSORS = 1_000_000
MAX_GGUF_KV = 1_000_000


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    dims: tuple[int, ...]
    ggml_type: int
    offset: int
    nbytes: int


@dataclass
class GGUFHeader:
    path: Path
    version: int
    file_size: int
    metadata: dict[str, Any]
    tensors: list[GGUFTensor]
    data_start: int
    alignment: int
    problems: list[str] = field(default_factory=list)

    @property
    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def arch_value(self, key: str) -> Any:
        return self.metadata.get(f"{self.architecture}.{key}")

    def strings(self) -> Iterator[tuple[str, str]]:
        """String metadata (not token vocabularies) for the secrets scan."""
        for key, value in self.metadata.items():
            if key.startswith("tokenizer.ggml."):
                continue
            if isinstance(value, str):
                yield key, value
            elif isinstance(value, list):
                # One text per array, an element a line: a million strings scanned one by
                # one took 28 s.
                texts = [item for item in value if isinstance(item, str)]
                if texts:
                    yield key, "\n".join(texts)


class _Reader:
    def __init__(self, fh: BinaryIO, size: int) -> None:
        self.fh, self.size = fh, size

    def take(self, n: int, what: str) -> bytes:
        pos = self.fh.tell()
        if n < 0 or pos + n > self.size:
            raise HeaderError(f"truncated: {what} at byte {pos} needs {n} bytes past the end")
        return self.fh.read(n)

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        if n > MAX_GGUF_STRING:
            raise HeaderError(f"{what}: string of {n} bytes is implausible")
        return self.take(n, what).decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _GGUF_SCALARS:
            return self.unpack(_GGUF_SCALARS[vtype], what)
        if vtype == _GGUF_STRING:
            return self.string(what)
        if vtype == _GGUF_ARRAY:
            if depth > 2:
                raise HeaderError(f"{what}: arrays nested too deep")
            item_type = self.unpack("<I", what)
            count = self.unpack("<Q", what)
            if count > MAX_GGUF_ITEMS:
                raise HeaderError(f"{what}: array of {count} items is implausible")
            if item_type in _GGUF_SCALARS:
                fmt = _GGUF_SCALARS[item_type]
                width = struct.calcsize(fmt)
                raw = self.take(width * count, what)
                if count > 4096:  # long numeric arrays (token scores) are not worth decoding
                    return f"<{count} x {fmt}>"
                return list(struct.unpack(f"<{count}{fmt[1]}", raw))
            items = []
            for i in range(count):  # 5 million empty arrays fit in 60 MB
                if not i & TIME_CHECK_MASK:
                    on_time()
                items.append(self.value(item_type, what, depth + 1))
            return items
        raise HeaderError(f"{what}: unknown value type {vtype}")


def read_gguf(path: Path) -> GGUFHeader:
    with path.open("rb") as fh:
        return read_gguf_stream(fh, path.stat().st_size, path)


def read_gguf_stream(fh: BinaryIO, size: int, path: Path) -> GGUFHeader:
    """read_gguf over any seekable binary stream (a remote model's range reader plans its
    fetches by running this same parser)."""
    r = _Reader(fh, size)
    if r.take(4, "magic") != b"GGUF":
        raise HeaderError("no GGUF magic")
    version = r.unpack("<I", "version")
    if version not in (2, 3):
        raise HeaderError(f"GGUF version {version} is not supported (2 or 3)")
    n_tensors = r.unpack("<Q", "tensor count")
    n_kv = r.unpack("<Q", "metadata count")
    if n_tensors > MAX_GGUF_TENSORS or n_kv > MAX_GGUF_KV:
        raise HeaderError(f"implausible counts: {n_tensors} tensors, {n_kv} metadata keys")
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        if not i & TIME_CHECK_MASK:
            on_time()
        key = r.string(f"metadata key {i}")
        vtype = r.unpack("<I", f"type of {key}")
        metadata[key] = r.value(vtype, key)
    infos: list[tuple[str, tuple[int, ...], int, int]] = []
    for i in range(n_tensors):
        if not i & TIME_CHECK_MASK:
            on_time()
        name = r.string(f"tensor {i} name")
        n_dims = r.unpack("<I", f"{name} dims")
        if n_dims > 8:
            raise HeaderError(f"{name}: {n_dims} dimensions is implausible")
        dims = tuple(r.unpack("<Q", f"{name} dim") for _ in range(n_dims))
        ggml_type = r.unpack("<I", f"{name} type")
        offset = r.unpack("<Q", f"{name} offset")
        infos.append((name, dims, ggml_type, offset))
    end_of_infos = fh.tell()
    alignment = metadata.get("general.alignment", 32)
    problems: list[str] = []
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        problems.append(f"general.alignment {alignment!r} is not a power of two")
        alignment = 32
    data_start = -(-end_of_infos // alignment) * alignment
    tensors: list[GGUFTensor] = []
    for name, dims, ggml_type, offset in infos:
        if ggml_type not in GGML_TYPES:
            problems.append(f"{name}: unknown ggml type {ggml_type}")
            continue
        _, block, block_bytes = GGML_TYPES[ggml_type]
        numel = math.prod(dims)
        if numel % block:
            problems.append(f"{name}: {numel} elements is not a multiple of block size {block}")
        nbytes = numel // block * block_bytes
        if offset % alignment:
            problems.append(f"{name}: offset {offset} is not aligned to {alignment}")
        tensors.append(GGUFTensor(name, dims, ggml_type, offset, nbytes))
    header = GGUFHeader(path, version, size, metadata, tensors, data_start, alignment, problems)
    _check_gguf_layout(header)
    return header


def _check_gguf_layout(header: GGUFHeader) -> None:
    data_size = header.file_size - header.data_start
    end = 0
    for tensor in sorted(header.tensors, key=lambda t: t.offset):
        if tensor.offset < end:
            header.problems.append(f"{tensor.name} overlaps the tensor before it")
        end = max(end, tensor.offset + tensor.nbytes)
        if tensor.offset + tensor.nbytes > data_size:
            header.problems.append(
                f"truncated: {tensor.name} ends at data byte {tensor.offset + tensor.nbytes}, "
                f"the file holds {max(data_size, 0)}"
            )
            break


# ---- protobuf framing (ONNX ModelProto, TensorFlow SavedModel) ------------------------------


@dataclass(frozen=True)
class Field:
    number: int
    wire_type: int
    start: int  # payload start (for length-delimited) or value position
    length: int  # payload length (length-delimited), else 0
    value: int  # varint / fixed value, else 0


class ByteSource(Protocol):
    """What the protobuf walk reads from: a memoryview of a mapped file, or a remote file's
    range reader (services/validator/remote.py), which runs the same walk to plan its reads."""

    def __len__(self) -> int: ...

    @overload
    def __getitem__(self, key: int, /) -> int: ...

    @overload
    def __getitem__(self, key: slice, /) -> bytes | memoryview: ...


def _varint(buf: ByteSource, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise HeaderError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise HeaderError("varint longer than 10 bytes")


def protobuf_fields(buf: ByteSource, start: int, end: int) -> Iterator[Field]:
    """Top-level fields of a serialized message in buf[start:end], skipping payloads."""
    pos = start
    turns = 0
    while pos < end:
        turns += 1
        if not turns & TIME_CHECK_MASK:  # a field can take 2 bytes: 15 million in 30 MB
            on_time()
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise HeaderError(f"field number 0 at byte {pos}")
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield Field(number, wire, pos, 0, value)
        elif wire == 1:
            if pos + 8 > end:
                raise HeaderError("truncated fixed64")
            yield Field(number, wire, pos, 0, int.from_bytes(buf[pos : pos + 8], "little"))
            pos += 8
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise HeaderError(
                    f"field {number} claims {length} bytes at byte {pos}, past the end ({end})"
                )
            yield Field(number, wire, pos, length, 0)
            pos += length
        elif wire == 5:
            if pos + 4 > end:
                raise HeaderError("truncated fixed32")
            yield Field(number, wire, pos, 0, int.from_bytes(buf[pos : pos + 4], "little"))
            pos += 4
        else:
            raise HeaderError(f"wire type {wire} (field {number}) is not valid protobuf")


@dataclass
class OnnxModel:
    path: Path
    ir_version: int
    external: list[tuple[str, int, int | None]]  # (location, offset, length)
    initializer_bytes: int


@contextlib.contextmanager
def _mapped(path: Path) -> Iterator[memoryview]:
    """The file as a memoryview without reading it: pages we skip over are never loaded."""
    with path.open("rb") as fh:
        if path.stat().st_size == 0:
            yield memoryview(b"")
            return
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                yield view
            finally:
                view.release()


MAX_EXTERNAL_DATA_ENTRY = 64 * 1024
"""Bytes one external_data key/value entry of an ONNX tensor may take: its strings are read."""


def read_onnx(path: Path) -> OnnxModel:
    """Walk ModelProto: ir_version, the graph, and initializers' external-data references."""
    with _mapped(path) as data:
        return read_onnx_from(path, data)


def read_onnx_from(path: Path, data: ByteSource) -> OnnxModel:
    ir_version = 0
    graph: Field | None = None
    for f in protobuf_fields(data, 0, len(data)):
        if f.number == 1 and f.wire_type == 0:
            ir_version = f.value
        elif f.number == 7 and f.wire_type == 2:
            graph = f
    if not ir_version:
        raise HeaderError("no ir_version: not an ONNX ModelProto")
    if graph is None:
        raise HeaderError("no graph in the ModelProto")
    external: list[tuple[str, int, int | None]] = []
    inline = 0
    for g in protobuf_fields(data, graph.start, graph.start + graph.length):
        if g.number != 5 or g.wire_type != 2:  # GraphProto.initializer
            continue
        location, offset, length, is_external = "", 0, None, False
        for t in protobuf_fields(data, g.start, g.start + g.length):
            if t.number == 9 and t.wire_type == 2:  # raw_data
                inline += t.length
            elif t.number == 14 and t.wire_type == 0:  # data_location
                is_external = t.value == 1
            elif t.number == 13 and t.wire_type == 2:  # external_data entry
                if t.length > MAX_EXTERNAL_DATA_ENTRY:
                    raise HeaderError(
                        f"an external_data entry of {t.length:,} bytes (a location, an offset "
                        f"and a length take a few; the limit is {MAX_EXTERNAL_DATA_ENTRY:,})"
                    )
                key = value = ""
                for kv in protobuf_fields(data, t.start, t.start + t.length):
                    text = bytes(data[kv.start : kv.start + kv.length]).decode("utf-8", "replace")
                    if kv.number == 1:
                        key = text
                    elif kv.number == 2:
                        value = text
                if key == "location":
                    location = value
                elif key == "offset" and value.isdigit():
                    offset = int(value)
                elif key == "length" and value.isdigit():
                    length = int(value)
        if is_external:
            external.append((location, offset, length))
    return OnnxModel(path, ir_version, external, inline)


def check_protobuf(path: Path, required: dict[int, str]) -> list[str]:
    """Problems with a protobuf file's top-level framing and its required fields."""
    with _mapped(path) as data:
        seen = {f.number for f in protobuf_fields(data, 0, len(data))}
    return [f"missing {name} (field {n})" for n, name in required.items() if n not in seen]


class ParsedHeaders:
    """Each header parsed once per validation and shared between checks (format, structure,
    secrets, VRAM); a parse failure is remembered as the HeaderError it raised."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, Path], Any] = {}

    def _get(self, kind: str, path: Path, parse: Any) -> Any:
        key = (kind, path)
        if key not in self._cache:
            try:
                self._cache[key] = parse(path)
            except HeaderError as exc:
                self._cache[key] = exc
            except OSError as exc:
                self._cache[key] = HeaderError(f"cannot read: {exc.strerror}")
        return self._cache[key]

    def safetensors(self, path: Path) -> SafetensorsHeader | HeaderError:
        parsed: SafetensorsHeader | HeaderError = self._get("safetensors", path, read_safetensors)
        return parsed

    def gguf(self, path: Path) -> GGUFHeader | HeaderError:
        parsed: GGUFHeader | HeaderError = self._get("gguf", path, read_gguf)
        return parsed

    def onnx(self, path: Path) -> OnnxModel | HeaderError:
        parsed: OnnxModel | HeaderError = self._get("onnx", path, read_onnx)
        return parsed


def parsed_headers(shared: dict[str, Any]) -> ParsedHeaders:
    cache = shared.get("headers")
    if not isinstance(cache, ParsedHeaders):
        cache = shared["headers"] = ParsedHeaders()
    return cache
