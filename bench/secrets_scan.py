"""Hostile model cards against the secrets scan: seconds per MB, and whether it stays linear.

    cd bench && ../.venv/bin/python secrets_scan.py [--mb 4] [--runs 3]

Each card is one unit repeated to fill `--mb` MB (the scan reads a text file up to 4 MiB) and a
quarter of that: a rule's anchor with characters its pattern accepts (`AccountKey`, `://aaa…`,
`-----BEGIN PRIVATE KEY-----`), or real-looking keys, one per line. Prints, per card, how many
findings the scan counts with no limit and how long it takes (best of `--runs`), seconds per MB,
the large/small time ratio (4 for linear, 16 for quadratic), and the whole check as a
validation runs it (it stops counting at 1,000 findings).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from machine import command_line, describe_machine  # bench/machine.py (scripts run from bench/)

from services.validator.checks.base import CheckContext
from services.validator.checks.inventory import build_inventory
from services.validator.checks.secrets import check_secrets, scan_text

REPO = Path(__file__).resolve().parents[1]


def hostile_units() -> dict[str, Any]:
    """The unit tests' hostile cards (the repository root is not on sys.path from bench/)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.unit.validator.test_secrets import HOSTILE_UNITS

    return dict(HOSTILE_UNITS)


def card(unit: str, size: int) -> str:
    rng = random.Random(size)
    make = hostile_units()[unit]
    parts, n = [], 0
    while n < size:
        parts.append(make(rng))
        n += len(parts[-1])
    return "".join(parts)[:size]


def best(runs: int, fn: object) -> tuple[float, object]:
    times, out = [], None
    for _ in range(runs):
        started = time.perf_counter()
        out = fn()  # type: ignore[operator]
        times.append(time.perf_counter() - started)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=4.0, help="size of the large card, MB")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    large = int(args.mb * 1_000_000)
    rows = []
    for unit in sorted(hostile_units()):
        text_l, text_s = card(unit, large), card(unit, large // 4)
        t_l, found = best(args.runs, lambda t=text_l: scan_text("README.md", t, limit=10**9))
        t_s, _ = best(args.runs, lambda t=text_s: scan_text("README.md", t, limit=10**9))
        with tempfile.TemporaryDirectory() as folder:
            Path(folder, "README.md").write_text(text_l)
            inv = build_inventory(folder)
            t_check, res = best(args.runs, lambda i=inv: check_secrets(i, CheckContext()))
        rows.append(
            {
                "card": unit,
                "findings": len(found),  # type: ignore[arg-type]
                "scan_s": round(t_l, 3),
                "s_per_mb": round(t_l / (large / 1e6), 3),
                "ratio_4x": round(t_l / max(t_s, 1e-6), 1),
                "check_s": round(t_check, 3),
                "check": res.reason[:60],  # type: ignore[attr-defined]
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    print("| card | findings (no limit) | scan s | s/MB | 4x text | check s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['card']} | {r['findings']:,} | {r['scan_s']} | {r['s_per_mb']} | "
            f"{r['ratio_4x']}x | {r['check_s']} |"
        )
    print(json.dumps({"command": command_line(), "machine": describe_machine([])}))


if __name__ == "__main__":
    main()
