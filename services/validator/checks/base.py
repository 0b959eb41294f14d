"""What every check receives and returns."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.contracts.events import CheckResult, Status, TargetHardware
from services.contracts.policy import ValidationPolicy
from services.validator.checks.inventory import Inventory


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
