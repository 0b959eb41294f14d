"""What every check receives and returns."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar

from services.contracts.events import CheckResult, Status, TargetHardware
from services.contracts.policy import ValidationPolicy
from services.validator.checks.inventory import Inventory

T = TypeVar("T")


@dataclass
class CheckContext:
    """Inputs of a validation beyond the files: what the request and policy say."""

    expected_sha256: dict[str, str] = field(default_factory=dict)
    target: TargetHardware = field(default_factory=TargetHardware)
    policy: ValidationPolicy = field(default_factory=ValidationPolicy)
    digest_cache: Any = None  # services.validator.checks.checksum.DigestCache | None
    hash_workers: int | None = None
    # A remote model's listing and reads (services.validator.remote.RemoteModel | None): its
    # files in the inventory are a sparse mirror, so digests come from here, never the mirror.
    remote: Any = None
    # When the whole validation must finish (perf_counter clock), so a slow check can say so.
    deadline: float | None = None
    # Filled by earlier checks for later ones (parsed headers, so nothing is read twice).
    shared: dict[str, Any] = field(default_factory=dict)


Check = Callable[[Inventory, CheckContext], CheckResult]


def result(
    name: str,
    status: Status,
    reason: str,
    *,
    started: float,
    value: float | None = None,
    threshold: float | None = None,
    unit: str | None = None,
    details: dict[str, Any] | None = None,
) -> CheckResult:
    return CheckResult(
        name=name,
        status=status,
        reason=reason,
        value=value,
        threshold=threshold,
        unit=unit,
        duration_ms=round((time.perf_counter() - started) * 1000, 3),
        details=details or {},
    )


def summarise_findings(findings: list[str], limit: int = 5) -> str:
    """`a; b; c (+4 more)`: a reason that stays readable in Slack and a terminal."""
    shown = "; ".join(findings[:limit])
    return shown + (f" (+{len(findings) - limit} more)" if len(findings) > limit else "")


# A check's details travel in the stage report, one NATS message (1 MiB by default) with every
# other check's: a hostile model must not be able to make them too big to publish (a card with
# 150,000 keys in it, 10,000 files each with a finding). The reason already sums them up.
MAX_DETAILS_BYTES = 64 * 1024
MAX_DETAIL_LIST_ITEMS = 1000
MAX_DETAIL_STRING_CHARS = 1024
MAX_REASON_CHARS = 2000


def printable(text: str) -> str:
    """`text` as UTF-8 can carry it. A file name that is not UTF-8 reaches Python as lone
    surrogates (`\udcfe`), which no JSON encoder writes: shown as the bytes they stand for."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        try:
            raw = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            return text.encode("utf-8", "backslashreplace").decode("utf-8")
        return raw.decode("utf-8", "backslashreplace")


def short_reason(reason: str, most: int = MAX_REASON_CHARS) -> str:
    """A reason that prints: UTF-8, and cut past `most` characters (a tensor name can be 50 MB
    long, and a reason quotes names)."""
    reason = printable(reason)
    if len(reason) <= most:
        return reason
    return f"{reason[:most]}… (cut, {len(reason):,} characters)"


def _json_size(value: Any) -> int:
    return len(json.dumps(value, default=str))


def bounded_details(details: dict[str, Any], max_bytes: int = MAX_DETAILS_BYTES) -> dict[str, Any]:
    """`details` that print as JSON in `max_bytes`: strings made UTF-8 (`printable`) and cut
    past MAX_DETAIL_STRING_CHARS, and the longest lists and dicts (at any depth of dicts; a
    dict keyed by file name is cut like a list) cut to a prefix, each with `<key>_not_listed`
    counting what was left out. Details that are already so come back as they are (the same
    object)."""
    trimmed: dict[str, Any] = _tidy(details)
    if trimmed == details and _json_size(details) <= max_bytes:
        return details
    while _json_size(trimmed) > max_bytes:
        found = _largest_collection(trimmed)
        if found is None:
            return {"cut": f"details over {max_bytes} bytes of JSON with nothing left to cut"}
        holder, key, items = found
        _cut(holder, key, items, len(items) // 2)
    return trimmed


def _cut(holder: dict[str, Any], key: str, items: list[Any] | dict[str, Any], keep: int) -> None:
    """`holder[key]` cut to its first `keep` items (a dict: its first `keep` keys)."""
    if isinstance(items, dict):
        holder[key] = dict(list(items.items())[:keep])
    else:
        holder[key] = items[:keep]
    counted = f"{key}_not_listed"
    holder[counted] = int(holder.get(counted, 0)) + len(items) - keep


def _tidy(value: Any) -> Any:
    """A copy with long lists cut first (cheap, before anything walks them), then strings."""
    if isinstance(value, str):
        value = printable(value)
        if len(value) > MAX_DETAIL_STRING_CHARS:
            return f"{value[:MAX_DETAIL_STRING_CHARS]}… (cut, {len(value)} characters)"
        return value
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            key = printable(k) if isinstance(k, str) else k
            if key in out:
                continue  # a `<name>_not_listed` already counted with its list's cut
            if isinstance(v, list | tuple | dict) and len(v) > MAX_DETAIL_LIST_ITEMS:
                # A list, or a dict keyed by file name (`files` of 10,000 shards): cut before
                # it is walked, its count carried on from the original's.
                out[f"{key}_not_listed"] = value.get(f"{key}_not_listed", 0)
                _cut(out, key, v if isinstance(v, dict) else list(v), MAX_DETAIL_LIST_ITEMS)
                out[key] = _tidy(out[key])
            else:
                out[key] = _tidy(v)
        return out
    if isinstance(value, list | tuple):
        return [_tidy(v) for v in value]
    return value


def _largest_collection(
    value: dict[str, Any],
) -> tuple[dict[str, Any], str, list[Any] | dict[str, Any]] | None:
    """The holder, key and value of the non-empty list or dict (below the top) with the most
    items: a dict keyed by file name is cut like a list."""
    best: tuple[dict[str, Any], str, list[Any] | dict[str, Any]] | None = None
    stack = [value]
    while stack:
        holder = stack.pop()
        for key, item in holder.items():
            if isinstance(item, dict):
                stack.append(item)
            if (
                isinstance(item, list | dict)
                and item
                and (best is None or len(item) > len(best[2]))
            ):
                best = (holder, key, item)
    return best


# --- what one validation may spend ------------------------------------------------------------
#
# Most limits are per file: a pickle's opcodes, an HDF5 child's seconds. A model of many such
# files multiplies them (10,000 files shaped like HDF5 took 25 minutes; 20 pickles of 2 million
# opcodes 12 s), so these costs also come out of one budget a validation. Past it, a file is
# not read and fails as not scanned.
MAX_PICKLE_OPS_PER_VALIDATION = 20_000_000


@dataclass
class ValidationBudget:
    pickle_ops: int = field(default_factory=lambda: MAX_PICKLE_OPS_PER_VALIDATION)
    hdf5_files: set[str] = field(default_factory=set)
    hdf5_seconds: float = 0.0
    # HDF5 reads cut short to the time limit: kept here for the next check that asks, since
    # the parser's own cache (hdf5._read) holds only reads given their whole timeout.
    hdf5_reads: dict[Any, Any] = field(default_factory=dict)
    # The validation's time limit (validation.time_limit_s): when the checks must stop, on the
    # perf_counter clock, moved on by the time spent hashing (not_timed). None: no limit.
    time_limit_s: float | None = None
    deadline: float | None = None

    def left_s(self) -> float | None:
        """Seconds before the time limit, None where there is none."""
        return None if self.deadline is None else self.deadline - time.perf_counter()


class TimeLimitReached(BaseException):
    """The validation ran past its time limit. Raised at a check's next `on_time()`, it unwinds
    the check to validate.py, which fails that check and every later one. A BaseException, so
    that no `except Exception` of a parser can take it for that file's own fault."""

    def __init__(self, limit_s: float) -> None:
        super().__init__(f"the validation's {limit_s:g} s time limit passed")
        self.limit_s = limit_s


_SPENDING: ContextVar[ValidationBudget | None] = ContextVar("preflight_validation", default=None)


@contextmanager
def validation_budget(time_limit_s: float | None = None) -> Iterator[ValidationBudget]:
    """One validation's budget (validate.py runs every check inside one; outside one, only the
    per-file limits apply). The time limit runs from here."""
    budget = ValidationBudget(time_limit_s=time_limit_s)
    if time_limit_s is not None:
        budget.deadline = time.perf_counter() + time_limit_s
    token = _SPENDING.set(budget)
    try:
        yield budget
    finally:
        _SPENDING.reset(token)


def spending() -> ValidationBudget | None:
    """The running validation's budget, if any."""
    return _SPENDING.get()


TIME_CHECK_MASK = 4095
"""Loops whose length a file decides call on_time() when `not i & TIME_CHECK_MASK`."""


def on_time() -> None:
    """Raise TimeLimitReached if the running validation is past its time limit. Loops whose
    length a file decides call it every few thousand turns (it costs ~0.1 us)."""
    budget = _SPENDING.get()
    if budget is not None and budget.deadline is not None and time.perf_counter() > budget.deadline:
        raise TimeLimitReached(budget.time_limit_s or 0.0)


def timed(items: Iterable[T]) -> Iterator[T]:
    """`items`, with a look at the time limit every TIME_CHECK_MASK + 1 of them (for loops
    that are not the hottest; those test the mask inline)."""
    for turn, item in enumerate(items):
        if not turn & TIME_CHECK_MASK:
            on_time()
        yield item


@contextmanager
def not_timed() -> Iterator[None]:
    """Time that does not count against the time limit: hashing, whose cost is the model's size
    and which a file cannot make slower than reading it."""
    budget = _SPENDING.get()
    started = time.perf_counter()
    try:
        yield
    finally:
        if budget is not None and budget.deadline is not None:
            budget.deadline += time.perf_counter() - started
