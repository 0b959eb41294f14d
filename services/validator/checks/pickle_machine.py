"""A model of CPython's unpickler that runs a pickle's opcodes on abstract values, never objects.

Why not `pickletools.genops` (and picklescan, which is built on it): genops reads opcodes one
after another and ignores FRAME boundaries, while the C unpickler reading from a file object
without `peek` (a `BytesIO`, which is what `torch.load` hands it for a zip's `data.pkl`) drops
the rest of a frame when an opcode's argument runs past the frame's end, and reads on from after
it. A frame that declares fewer bytes than its opcodes consume thus shows genops a harmless
BINBYTES value and the unpickler a payload (CPython issue 154848). The pure-Python unpickler
refuses such files ("pickle exhausted before end of frame"), and no pickler writes them, so this
machine refuses them too: an opcode that starts inside a frame must end inside it, a FRAME may
only start where the previous frame is consumed, and a STOP inside a frame must end it (the
unpickler's next load, as in torch's legacy format, reads on from after the frame).

genops also only checks that each opcode is well formed, not that the pickle can load. Here the
stack, the mark stack and the memo are simulated as the unpickler keeps them, so a TUPLE with no
MARK, a pop from an empty stack or a GET of an empty memo slot is "does not load", and a
STACK_GLOBAL's operands are whatever is really on the stack (a memo GET, a string built by a
call), not the two strings that happen to come before it in the file.
"""

from __future__ import annotations

import codecs
import mmap
import re
import struct
from dataclasses import dataclass, field
from typing import Final, Protocol, overload

from services.validator.checks.base import on_time

__all__ = [
    "LONG_NAME",
    "MAX_NAME_CHARS",
    "NOT_A_NAME",
    "UNRESOLVED",
    "Budget",
    "Buffer",
    "ByteReader",
    "LimitReached",
    "PickleRun",
    "run_pickle",
]

# A module or attribute name longer than this is never a real one; kept as "unresolved".
MAX_NAME_CHARS: Final = 512
# What an import whose operands are not string constants is reported as.
UNRESOLVED: Final = "<computed at load time>"
# What an import named by a string constant too long to keep is reported as: still a constant,
# which the unpickler resolves (a dotted name walks attributes: os.path.os.path...system).
LONG_NAME: Final = f"<a name over {MAX_NAME_CHARS} characters>"
# What a long operand that is no dotted name is reported as (raw bytes read as a GLOBAL line).
NOT_A_NAME: Final = "<not a name>"
_DOTTED_NAME: Final = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
_DOTTED_NAME_BYTES: Final = re.compile(rb"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
HIGHEST_PROTOCOL: Final = 5
TIME_CHECK_EVERY: Final = 16384  # opcodes between two looks at the validation's time limit


class ByteReader(Protocol):
    """A file read on demand (a remote model's range reader, services/validator/remote.py):
    the machine's reads of it are what the remote validator fetches, so that the check, run
    later over the fetched bytes, reads exactly those."""

    def __len__(self) -> int: ...

    @overload
    def __getitem__(self, key: int, /) -> int: ...

    @overload
    def __getitem__(self, key: slice, /) -> bytes: ...

    def find(self, sub: bytes, start: int, end: int, /) -> int: ...


# bytes, or an mmap of a file: indexable, sliceable and searchable without reading it all.
Buffer = bytes | mmap.mmap | ByteReader


class LimitReached(Exception):
    """The pickle is bigger than the machine is willing to run (opcodes)."""


@dataclass
class Budget:
    """Opcodes left to run, shared by every pickle of one stream. `capped`: fewer than a
    stream's own limit, because the validation's budget had no more left."""

    ops: int
    capped: bool = False
    # Where the run next asks whether the validation is past its time limit (base.on_time):
    # one comparison an opcode, as for the count itself.
    check_at: int | None = None


@dataclass
class PickleRun:
    """What running one pickle would import, and where and why it would stop loading."""

    end: int
    imports: list[tuple[str, str]] = field(default_factory=list)
    error: str | None = None
    frame_error: str | None = None
    extensions: list[int] = field(default_factory=list)

    @property
    def loads(self) -> bool:
        return self.error is None and self.frame_error is None


class _Value:
    """An abstract stack value: only what the checks need to know about it."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


# A value made by a call (REDUCE, NEWOBJ, INST, OBJ, BUILD target, persistent load): it can be
# anything, a string included, so a STACK_GLOBAL of it is an import nobody can name in advance.
_ANY: Final = _Value("object")
_GLOBAL: Final = _Value("imported callable")
_LONG_STR: Final = _Value("long str")
_NOT_A_NAME: Final = _Value("long text that names nothing")
# Values the unpickler builds itself; none of them is a str.
_BYTES: Final = _Value("bytes")
_NUMBER: Final = _Value("number")
_NONE: Final = _Value("None")
_CONTAINER: Final = _Value("container")
_MARK_ONLY: Final = frozenset({_BYTES, _NUMBER, _NONE, _CONTAINER})

_unpack_from = struct.unpack_from


class _Stop(Exception):
    def __init__(self, why: str, *, frame: bool = False) -> None:
        super().__init__(why)
        self.why = why
        self.frame = frame


# Opcodes by byte; names as pickletools spells them, for messages.
_NAMES: Final = {
    0x28: "MARK", 0x2E: "STOP", 0x30: "POP", 0x31: "POP_MARK", 0x32: "DUP", 0x46: "FLOAT",
    0x49: "INT", 0x4A: "BININT", 0x4B: "BININT1", 0x4C: "LONG", 0x4D: "BININT2", 0x4E: "NONE",
    0x50: "PERSID", 0x51: "BINPERSID", 0x52: "REDUCE", 0x53: "STRING", 0x54: "BINSTRING",
    0x55: "SHORT_BINSTRING", 0x56: "UNICODE", 0x58: "BINUNICODE", 0x61: "APPEND", 0x62: "BUILD",
    0x63: "GLOBAL", 0x64: "DICT", 0x7D: "EMPTY_DICT", 0x65: "APPENDS", 0x67: "GET",
    0x68: "BINGET", 0x69: "INST", 0x6A: "LONG_BINGET", 0x6C: "LIST", 0x5D: "EMPTY_LIST",
    0x6F: "OBJ", 0x70: "PUT", 0x71: "BINPUT", 0x72: "LONG_BINPUT", 0x73: "SETITEM",
    0x74: "TUPLE", 0x29: "EMPTY_TUPLE", 0x75: "SETITEMS", 0x47: "BINFLOAT", 0x80: "PROTO",
    0x81: "NEWOBJ", 0x82: "EXT1", 0x83: "EXT2", 0x84: "EXT4", 0x85: "TUPLE1", 0x86: "TUPLE2",
    0x87: "TUPLE3", 0x88: "NEWTRUE", 0x89: "NEWFALSE", 0x8A: "LONG1", 0x8B: "LONG4",
    0x42: "BINBYTES", 0x43: "SHORT_BINBYTES", 0x8C: "SHORT_BINUNICODE", 0x8D: "BINUNICODE8",
    0x8E: "BINBYTES8", 0x8F: "EMPTY_SET", 0x90: "ADDITEMS", 0x91: "FROZENSET", 0x92: "NEWOBJ_EX",
    0x93: "STACK_GLOBAL", 0x94: "MEMOIZE", 0x95: "FRAME", 0x96: "BYTEARRAY8", 0x97: "NEXT_BUFFER",
    0x98: "READONLY_BUFFER",
}  # fmt: skip

# Opcodes whose argument is a fixed number of bytes and that push one value of a known kind.
_FIXED_PUSH: Final = {
    0x4A: (4, _NUMBER), 0x4B: (1, _NUMBER), 0x4D: (2, _NUMBER), 0x47: (8, _NUMBER),
}  # fmt: skip
# Opcodes with no argument that push one value.
_PUSH: Final = {
    0x4E: _NONE, 0x88: _NUMBER, 0x89: _NUMBER, 0x7D: _CONTAINER, 0x5D: _CONTAINER,
    0x29: _CONTAINER, 0x8F: _CONTAINER,
}  # fmt: skip
# Length-prefixed values: (bytes of the length, signed, what it pushes; None = a str). BINSTRING
# and SHORT_BINSTRING are Python 2 strs: Python 3 loads them as str (encoding="ASCII" by
# default), so they can name a STACK_GLOBAL's module.
_SIZED: Final = {
    0x54: (4, True, None), 0x55: (1, False, None), 0x58: (4, False, None),
    0x42: (4, False, _BYTES), 0x43: (1, False, _BYTES), 0x8C: (1, False, None),
    0x8D: (8, False, None), 0x8E: (8, False, _BYTES), 0x96: (8, False, _BYTES),
    0x8A: (1, False, _NUMBER), 0x8B: (4, True, _NUMBER),
}  # fmt: skip
_INT_FORMATS: Final = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}
_SIGNED_FORMATS: Final = {1: "<b", 2: "<h", 4: "<i", 8: "<q"}


def run_pickle(
    buf: Buffer,
    start: int,
    end: int,
    budget: Budget,
    *,
    origin: int | None = None,
) -> PickleRun:
    """Run the pickle that starts at `start` (and must end by `end`) as the unpickler would.
    Positions in messages count from `origin` (default `start`): where the file or member
    begins. Never raises on bad input; raises LimitReached when the budget runs out."""
    machine = _Machine(buf, start, end, budget)
    try:
        machine.run()
    except _Stop as stop:
        where = f"at byte {machine.op_at - (start if origin is None else origin):,}"
        if stop.frame:
            machine.result.frame_error = f"{where}: {stop.why}"
        else:
            machine.result.error = f"{where}: {stop.why}"
        machine.result.end = machine.pos
    return machine.result


class _Machine:
    def __init__(self, buf: Buffer, start: int, end: int, budget: Budget) -> None:
        self.buf = buf
        # bytes and mmaps are read with struct; a ByteReader (a remote file) by slices
        self.unpack = isinstance(buf, (bytes, mmap.mmap))
        self.pos = start
        self.end = end
        self.op_at = start
        self.budget = budget
        self.result = PickleRun(end=start)
        self.seen: set[tuple[str, str]] = set()
        # The current frame's end, while inside one.
        self.frame_end: int | None = None

    # --- reading -------------------------------------------------------------------------

    def take(self, n: int, what: str) -> int:
        """Advance over an n-byte argument; return where it starts."""
        at = self.pos
        stop = at + n
        if stop > self.end:
            raise _Stop(f"{what} needs {n:,} bytes but only {self.end - at:,} remain (truncated)")
        frame_end = self.frame_end
        if frame_end is not None and stop > frame_end:
            raise _Stop(
                f"{what} runs {stop - frame_end:,} bytes past the end of its FRAME (the C "
                "unpickler drops the frame's rest there and runs other opcodes than "
                "pickletools shows)",
                frame=True,
            )
        self.pos = stop
        return at

    def line(self, what: str) -> bytes:
        nl = self.buf.find(b"\n", self.pos, self.end)
        if nl < 0:
            raise _Stop(f"{what} has no end of line (truncated)")
        at = self.take(nl + 1 - self.pos, what)
        return self.buf[at:nl]

    def uint(self, n: int, what: str, *, signed: bool = False) -> int:
        at = self.take(n, what)
        if not self.unpack:
            return int.from_bytes(self.buf[at : at + n], "little", signed=signed)
        formats = _SIGNED_FORMATS if signed else _INT_FORMATS
        value: int = _unpack_from(formats[n], self.buf, at)[0]  # type: ignore[arg-type]
        return value

    def text(self, n: int, what: str) -> str | _Value:
        at = self.take(n, what)
        if n > MAX_NAME_CHARS * 4:
            return _LONG_STR
        raw = self.buf[at : at + n]
        try:
            return raw.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError as exc:
            if what in ("BINSTRING", "SHORT_BINSTRING"):
                return raw.decode("latin-1")  # what encoding="latin1" loads; never a stop
            raise _Stop(f"{what} is not UTF-8: {exc.reason}") from None

    # --- the machine ---------------------------------------------------------------------

    def record_import(self, module: object, name: object) -> None:
        key = (_module_operand(module), _operand(name))
        if key not in self.seen:
            self.seen.add(key)
            self.result.imports.append(key)

    def import_named_in_lines(self, what: str) -> None:
        """GLOBAL and INST: a module line, then an attribute line."""
        module_line = self.line(what)
        name_line = self.line(what)
        nul = module_line.find(b"\0")
        if nul >= 0:  # the line decodes whole (or the load stops); the import reads up to NUL
            try:
                module_line.decode("utf-8")
            except UnicodeDecodeError:
                raise _Stop(f"{what} names a module that is not UTF-8") from None
            module_line = module_line[:nul]
        self.record_import(_decode_name(module_line, what), _decode_name(name_line, what))

    def run(self) -> None:  # one dispatch loop: the fast shape in CPython
        buf = self.buf
        stack: list[object] = []
        metastack: list[list[object]] = []
        memo: dict[int, object] = {}
        budget = self.budget
        push = stack.append

        def pop_mark(what: str) -> list[object]:
            nonlocal stack, push
            if not metastack:
                raise _Stop(f"{what} without a MARK before it")
            items = stack
            stack = metastack.pop()
            push = stack.append
            return items

        def pop(what: str) -> object:
            if not stack:
                raise _Stop(f"{what} on an empty stack (stack underflow)")
            return stack.pop()

        def top(what: str) -> object:
            if not stack:
                raise _Stop(f"{what} on an empty stack (stack underflow)")
            return stack[-1]

        if budget.check_at is None:
            budget.check_at = max(budget.ops - TIME_CHECK_EVERY, 0)
        check_at = budget.check_at
        while True:
            budget.ops -= 1
            if budget.ops < check_at:
                if budget.ops < 0:
                    raise LimitReached("opcodes")
                on_time()
                budget.check_at = check_at = max(budget.ops - TIME_CHECK_EVERY, 0)
            frame_end = self.frame_end
            at = self.pos
            if frame_end is not None and at >= frame_end:
                self.frame_end = frame_end = None  # consumed exactly: on to unframed bytes
            self.op_at = at
            if at >= self.end:
                raise _Stop("pickle ends before its STOP opcode (truncated)")
            op = buf[at]
            self.pos = at + 1
            name = _NAMES.get(op)
            if name is None:
                raise _Stop(f"unknown opcode 0x{op:02x}")

            if op == 0x71:  # BINPUT
                memo[self.uint(1, name)] = top(name)
            elif op == 0x94:  # MEMOIZE
                memo[len(memo)] = top(name)
            elif op == 0x72:  # LONG_BINPUT
                memo[self.uint(4, name)] = top(name)
            elif op in (0x68, 0x6A):  # BINGET, LONG_BINGET
                index = self.uint(1 if op == 0x68 else 4, name)
                if index not in memo:
                    raise _Stop(f"{name} {index}: nothing stored in the memo there")
                push(memo[index])
            elif op in _SIZED:
                size, signed, kind = _SIZED[op]
                length = self.uint(size, name, signed=signed)
                if length < 0:
                    raise _Stop(f"{name} with a negative length")
                if kind is None:
                    push(self.text(length, name))
                else:
                    self.take(length, name)
                    push(kind)
            elif op == 0x28:  # MARK
                metastack.append(stack)
                stack = []
                push = stack.append
            elif op in _FIXED_PUSH:
                size, kind = _FIXED_PUSH[op]
                self.take(size, name)
                push(kind)
            elif op in _PUSH:
                push(_PUSH[op])
            elif op in (0x85, 0x86, 0x87):  # TUPLE1..3
                count = op - 0x84
                if len(stack) < count:
                    raise _Stop(f"{name} needs {count} values on the stack (stack underflow)")
                del stack[-count:]
                push(_CONTAINER)
            elif op == 0x74:  # TUPLE
                pop_mark(name)
                push(_CONTAINER)
            elif op in (0x52, 0x81):  # REDUCE (callable, args); NEWOBJ (class, args)
                pop(name)
                pop(name)
                push(_ANY)
            elif op == 0x51:  # BINPERSID
                pop(name)
                push(_ANY)
            elif op in (0x75, 0x65, 0x90):  # SETITEMS, APPENDS, ADDITEMS
                items = pop_mark(name)
                top(name)  # the container they go into, below the MARK
                if op == 0x75 and len(items) % 2:
                    raise _Stop("SETITEMS with an odd number of keys and values")
            elif op == 0x73:  # SETITEM
                pop(name)
                pop(name)
                top(name)
            elif op in (0x61, 0x62):  # APPEND; BUILD (the state onto the object below it)
                pop(name)
                top(name)
            elif op == 0x93:  # STACK_GLOBAL
                global_name = pop(name)
                module = pop(name)
                if module in _MARK_ONLY or global_name in _MARK_ONLY:
                    raise _Stop("STACK_GLOBAL requires str operands")
                self.record_import(module, global_name)
                push(_GLOBAL)
            elif op == 0x63:  # GLOBAL
                self.import_named_in_lines(name)
                push(_GLOBAL)
            elif op == 0x69:  # INST: import, then call with the values above the MARK
                self.import_named_in_lines(name)
                pop_mark(name)
                push(_ANY)
            elif op == 0x6F:  # OBJ: the first value above the MARK is called with the rest
                if not pop_mark(name):
                    raise _Stop("OBJ with nothing above its MARK (stack underflow)")
                push(_ANY)
            elif op == 0x92:  # NEWOBJ_EX
                pop(name)
                pop(name)
                pop(name)
                push(_ANY)
            elif op in (0x64, 0x6C, 0x91):  # DICT, LIST, FROZENSET
                items = pop_mark(name)
                if op == 0x64 and len(items) % 2:
                    raise _Stop("DICT with an odd number of keys and values")
                push(_CONTAINER)
            elif op == 0x2E:  # STOP
                pop(name)
                if frame_end is not None and self.pos < frame_end:
                    # The unpickler's next load starts after the frame, not after this STOP.
                    raise _Stop(
                        f"STOP leaves {frame_end - self.pos:,} bytes of its FRAME unread (a "
                        "next pickle.load starts after the frame; pickletools after the STOP)",
                        frame=True,
                    )
                self.result.end = self.pos
                return
            elif op == 0x30:  # POP: a value, or the MARK itself when nothing is above it
                if stack:
                    stack.pop()
                else:
                    pop_mark(name)
            elif op == 0x31:  # POP_MARK
                pop_mark(name)
            elif op == 0x32:  # DUP
                push(top(name))
            elif op == 0x95:  # FRAME
                if frame_end is not None:
                    raise _Stop(
                        f"a FRAME starts {frame_end - at:,} bytes before the previous frame "
                        "is consumed",
                        frame=True,
                    )
                length = self.uint(8, name)
                if self.pos + length > self.end:
                    raise _Stop(f"FRAME of {length:,} bytes runs past the end of the pickle")
                self.frame_end = self.pos + length
            elif op == 0x80:  # PROTO
                version = self.uint(1, name)
                if version > HIGHEST_PROTOCOL:
                    raise _Stop(f"unsupported pickle protocol {version}")
            elif op in (0x82, 0x83, 0x84):  # EXT1/2/4: an import from copyreg's registry
                code = self.uint({0x82: 1, 0x83: 2, 0x84: 4}[op], name)
                self.result.extensions.append(code)
                push(_GLOBAL)
            elif op in (0x49, 0x4C, 0x46):  # INT, LONG, FLOAT as text
                _number(self.line(name), op, name)
                push(_NUMBER)
            elif op == 0x53:  # STRING: a quoted Python 2 str literal, a str in Python 3
                push(_quoted(self.line(name), name))
            elif op == 0x56:  # UNICODE: raw-unicode-escape text
                raw = self.line(name)
                try:
                    value = codecs.raw_unicode_escape_decode(raw)[0]
                except UnicodeDecodeError as exc:
                    raise _Stop(f"UNICODE argument does not decode: {exc.reason}") from None
                push(_kept(value))
            elif op == 0x67:  # GET
                index = _decimal(self.line(name), name)
                if index not in memo:
                    raise _Stop(f"GET {index}: nothing stored in the memo there")
                push(memo[index])
            elif op == 0x70:  # PUT
                index = _decimal(self.line(name), name)
                if index < 0:
                    raise _Stop("PUT with a negative index")
                memo[index] = top(name)
            elif op == 0x50:  # PERSID
                self.line(name)
                push(_ANY)
            elif op == 0x97:  # NEXT_BUFFER: an out-of-band buffer the caller passes in
                push(_BYTES)
            elif op == 0x98:  # READONLY_BUFFER
                top(name)
            else:  # pragma: no cover - every opcode in _NAMES is handled above
                raise _Stop(f"opcode {name} not modelled")


def _operand(value: object) -> str:
    """An import's module or name as reported: the constant; LONG_NAME for a constant too long
    to keep that may name something (a dotted name, or one too long to have been read);
    NOT_A_NAME for a long one that cannot (the unpickler's import of it fails); UNRESOLVED for
    anything else on the stack (a call's result, a number)."""
    if isinstance(value, str):
        if len(value) <= MAX_NAME_CHARS:
            return value
        return LONG_NAME if _DOTTED_NAME.fullmatch(value) else NOT_A_NAME
    if value is _NOT_A_NAME:
        return NOT_A_NAME
    return LONG_NAME if value is _LONG_STR else UNRESOLVED


def _module_operand(value: object) -> str:
    """An import's module as the import system reads it: up to its first NUL. CPython finds a
    frozen module (os, io, runpy ...) by its name as a C string, so `os\\0junk` imports os."""
    if isinstance(value, str) and "\0" in value:
        value = value[: value.index("\0")]
    return _operand(value)


def _kept(text: str) -> str | _Value:
    """A decoded string as the stack keeps it: itself if short, else what it could name (as a
    module, the text up to a NUL: _module_operand)."""
    if len(text) <= MAX_NAME_CHARS:
        return text
    nul = text.find("\0", 0, MAX_NAME_CHARS)
    if nul >= 0:
        return text[: nul + 1]
    return _LONG_STR if _DOTTED_NAME.fullmatch(text) else _NOT_A_NAME


def _decode_name(raw: bytes, what: str) -> str | _Value:
    if len(raw) > MAX_NAME_CHARS:
        return _LONG_STR if _DOTTED_NAME_BYTES.fullmatch(raw) else _NOT_A_NAME
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Stop(f"{what} names a module or attribute that is not UTF-8") from None


def _c_string(raw: bytes) -> bytes:
    """A line as C code that takes it for a C string reads it: up to its first NUL (strtol,
    PyLong_FromString and PyOS_string_to_double: `I5\\0zz` loads as 5)."""
    nul = raw.find(b"\0")
    return raw if nul < 0 else raw[:nul]


def _decimal(raw: bytes, what: str) -> int:
    raw = _c_string(raw)
    try:
        return int(raw)
    except ValueError:
        raise _Stop(f"{what} argument {raw[:40]!r} is not a number") from None


def _number(raw: bytes, op: int, what: str) -> None:
    """INT and LONG are read by C's strtol / PyLong_FromString with base 0 (hex, octal and
    binary prefixes; leading zeros), FLOAT by PyOS_string_to_double. Only text that none of
    them reads stops the machine."""
    text = _c_string(raw).strip()
    try:
        if op == 0x46:
            float(text)
            return
        digits = text[:-1] if op == 0x4C and text.endswith(b"L") else text
        if digits in (b"00", b"01"):
            return
        try:
            int(digits, 0)
        except ValueError:
            int(digits.lstrip(b"+-").lstrip(b"0") or b"0", 8)  # strtol's C octal: 017
    except ValueError:
        raise _Stop(f"{what} argument {raw[:40]!r} is not a number") from None


def _quoted(raw: bytes, what: str) -> str | _Value:
    if len(raw) < 2 or raw[0] != raw[-1] or raw[:1] not in (b"'", b'"'):
        raise _Stop(f"{what} argument is not a quoted string")
    try:
        value: bytes = codecs.escape_decode(raw[1:-1])[0]
    except ValueError as exc:
        raise _Stop(f"{what} argument does not decode: {exc}") from None
    return _kept(value.decode("latin-1"))
