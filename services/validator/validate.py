"""Run every enabled check over a model location and turn the results into a StageReport."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

from services.contracts.events import CheckResult, StageReport, Status, TargetHardware
from services.contracts.policy import ValidationPolicy
from services.storage.base import StoreError
from services.storage.locations import is_remote, open_store
from services.validator.checks.base import (
    Check,
    CheckContext,
    TimeLimitReached,
    bounded_details,
    on_time,
    short_reason,
    validation_budget,
)
from services.validator.checks.checksum import DigestCache, check_checksum
from services.validator.checks.formats import check_format
from services.validator.checks.headers import HeaderError, parsed_headers
from services.validator.checks.inventory import Inventory, Kind, LocationError, build_inventory
from services.validator.checks.secrets import check_secrets
from services.validator.checks.structure import check_structure
from services.validator.checks.tokenizer import check_tokenizer
from services.validator.checks.unsafe_code import check_unsafe_code
from services.validator.checks.vram import check_vram
from services.validator.remote import RemoteModel, mirror

log = logging.getLogger("preflight.validator")

# (policy switch, check): the order in which they run; the format check also resolves what
# later checks rely on (ONNX external data).
CHECKS: tuple[tuple[str, Check], ...] = (
    ("format", check_format),
    ("checksum", check_checksum),
    ("structure", check_structure),
    ("unsafe_code", check_unsafe_code),
    ("secrets", lambda inv, ctx: check_secrets(inv, ctx, extra_texts=metadata_texts(inv, ctx))),
    ("vram_fit", check_vram),
    ("tokenizer", check_tokenizer),
)


def metadata_texts(inv: Inventory, ctx: CheckContext) -> Iterator[tuple[str, str]]:
    """Free text inside weight headers (GGUF strings, safetensors __metadata__) for the
    secrets scan."""
    headers = parsed_headers(ctx.shared)
    for f in inv.of(Kind.GGUF):
        gg = headers.gguf(f.path)
        if not isinstance(gg, HeaderError):
            for key, text in gg.strings():
                yield f"{f.rel} (GGUF metadata {key})", text
    for f in inv.of(Kind.SAFETENSORS):
        st = headers.safetensors(f.path)
        if not isinstance(st, HeaderError):
            for key, text in st.metadata.items():
                yield f"{f.rel} (__metadata__ {key})", text


def _run(name: str, check: Check, inv: Inventory, ctx: CheckContext) -> CheckResult:
    started = time.perf_counter()
    try:
        on_time()  # past the limit already: this check is not run
    except TimeLimitReached as exc:
        return _late(name, exc, started, ran=False)
    try:
        checked = check(inv, ctx)
        details, reason = bounded_details(checked.details), short_reason(checked.reason)
        if details is checked.details and reason == checked.reason:
            return checked
        return checked.model_copy(update={"details": details, "reason": reason})
    except TimeLimitReached as exc:
        return _late(name, exc, started, ran=True)
    except Exception as exc:  # a check must never take the service down
        log.exception("check %s crashed", name)
        return CheckResult(
            name=name,
            status=Status.ERROR,
            reason=short_reason(f"check crashed: {type(exc).__name__}: {exc}"),
            duration_ms=(time.perf_counter() - started) * 1000,
        )


def _late(name: str, exc: TimeLimitReached, started: float, *, ran: bool) -> CheckResult:
    """A check the time limit stopped (`ran`) or never let start: failed, since what was not
    read to the end cannot be passed."""
    spent = time.perf_counter() - started
    if ran:
        reason = (
            f"not checked to the end: stopped after {spent:.2f} s, when {exc} "
            "(validation.time_limit_s); a model whose checks cannot finish in time is not passed"
        )
        log.warning("check %s stopped by the time limit after %.2f s", name, spent)
    else:
        reason = f"not run: {exc} (validation.time_limit_s) before this check began"
    return CheckResult(
        name=name,
        status=Status.FAILED,
        reason=reason,
        duration_ms=round(spent * 1000, 3),
        details={"time_limit_s": exc.limit_s, "stopped": ran},
    )


def validate(
    location: str,
    *,
    policy: ValidationPolicy | None = None,
    expected_sha256: dict[str, str] | None = None,
    target: TargetHardware | None = None,
    digest_cache: DigestCache | None = None,
    service: str = "",
    mirror_fill: bytes | None = None,
) -> StageReport:
    """Every enabled check, each with status, reason and duration; never raises on bad input.

    A remote location (s3://, hf://, https://) is read through range reads into a sparse
    mirror (services/validator/remote.py); `mirror_fill` is for tests that prove the checks
    read nothing outside what was fetched."""
    policy = policy or ValidationPolicy()
    started = time.perf_counter()
    if not policy.enabled:
        return StageReport(
            stage="validation",
            status=Status.SKIPPED,
            reason="skipped: disabled by policy",
            service=service,
        )
    with ExitStack() as stack:
        remote: RemoteModel | None = None
        where = location
        try:
            if is_remote(location):
                where = stack.enter_context(tempfile.TemporaryDirectory(prefix="preflight-"))
                store = open_store(location)
                remote = mirror(store, Path(where), fill=mirror_fill)
                if store.one_file is not None:  # s3://b/model.gguf: that file, as a local one
                    single = Path(where) / store.one_file
                    if single.parent != Path(where) or store.one_file in (".", ".."):
                        raise StoreError(f"{location}: {store.one_file!r} is not a file name")
                    where = str(single)
            inv = build_inventory(where)
        except (LocationError, StoreError, OSError) as exc:
            return _unreadable(str(exc), service)
        except Exception as exc:  # a store's or parser's bug must not take the service down
            log.exception("reading %s failed", location)
            return _unreadable(f"{location}: cannot be read: {type(exc).__name__}: {exc}", service)
        if remote is not None:
            inv.problems[:0] = remote.problems
        ctx = CheckContext(
            expected_sha256=dict(expected_sha256 or {}),
            target=target or TargetHardware(),
            policy=policy,
            digest_cache=digest_cache,
            deadline=started + policy.budget_s,
            remote=remote,
        )
        return _run_all(inv, ctx, policy, started, service)


def _unreadable(reason: str, service: str) -> StageReport:
    # One line, whatever a library put in its message, and one that prints.
    reason = short_reason(" ".join(reason.split()))
    check = CheckResult(name="format", status=Status.FAILED, reason=reason)
    return StageReport(
        stage="validation", status=Status.FAILED, reason=reason, checks=(check,), service=service
    )


def _run_all(
    inv: Inventory, ctx: CheckContext, policy: ValidationPolicy, started: float, service: str
) -> StageReport:
    switches = policy.checks.model_dump()
    results: list[CheckResult] = []
    # What per-file limits multiply by the files (pickle opcodes, HDF5 children) and the time
    # limit: one budget for the checks, from their start (the listing and remote reads are not
    # counted; they have their own limits).
    with validation_budget(policy.time_limit_s):
        for name, run_check in CHECKS:
            if not switches.get(name, True):
                results.append(
                    CheckResult(name=name, status=Status.SKIPPED, reason="disabled by policy")
                )
                continue
            results.append(_run(name, run_check, inv, ctx))
    elapsed = time.perf_counter() - started
    report = _report(results, elapsed, policy.budget_s, service, inv.root)
    remote: RemoteModel | None = ctx.remote
    if remote is None:
        return report
    # What reading the remote model cost, in the reason and beside the format check.
    checks = tuple(
        c.model_copy(update={"details": bounded_details({**c.details, "remote": remote.details()})})
        if c.name == "format"
        else c
        for c in report.checks
    )
    return report.model_copy(
        update={"reason": f"{report.reason}; {remote.summary()}", "checks": checks}
    )


def _report(
    results: list[CheckResult], elapsed: float, budget: float, service: str, root: Path
) -> StageReport:
    failed = [r for r in results if r.status in (Status.FAILED, Status.ERROR)]
    passed = [r for r in results if r.status is Status.PASSED]
    skipped = [r for r in results if r.status is Status.SKIPPED]
    if failed:
        status = Status.FAILED
        # The checks the time limit kept from starting are named once, not a sentence each.
        late = [
            r for r in failed if r.details.get("stopped") is False and "time_limit_s" in r.details
        ]
        reason = "; ".join(f"{r.name}: {r.reason}" for r in failed if r not in late)
        if late:
            names = ", ".join(r.name for r in late)
            reason += f"{'; ' if reason else ''}not run, the time limit having passed: {names}"
    elif not passed:
        status = Status.SKIPPED
        reason = "skipped: every check is disabled or had nothing to check"
    else:
        status = Status.PASSED
        reason = f"{len(passed)} checks passed"
        if skipped:
            reason += ", skipped: " + ", ".join(f"{r.name} ({r.reason})" for r in skipped)
    reason += f"; {elapsed:.2f} s"
    if elapsed > budget:
        slowest = max(results, key=lambda r: r.duration_ms)
        reason += (
            f", over the {budget:g} s budget (slowest: {slowest.name} "
            f"{slowest.duration_ms / 1000:.2f} s)"
        )
    return StageReport(
        stage="validation",
        status=status,
        reason=reason,
        checks=tuple(results),
        duration_ms=round(elapsed * 1000, 3),
        service=service,
    )
