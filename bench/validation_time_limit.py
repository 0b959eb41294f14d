"""Hostile folders against the validation's time limit: how long each holds the validator.

    cd bench && ../.venv/bin/python validation_time_limit.py [--scale 4] [--limit 5] [--runs 1]

Each folder is the sample model plus one hostile part from the unit tests
(tests/unit/validator/test_time_limit.py), made `--scale` times larger: a protobuf of millions of
empty fields, a GGUF of millions of nested arrays, many pickles of 2 million opcodes, 4 MB
cards of one secret rule's anchor; and, for comparison, a real-sized tokenizer.json, which is
not hostile and is not scaled. Each is validated twice, alternately: with the time limit
off (`time_limit_s` 1e9: what the validator did before the limit) and with `--limit` seconds.
Prints the wall time of each, how far past the limit the limited run ended, and which check was
stopped. Best of `--runs`.
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

from services.contracts.events import StageReport
from services.contracts.policy import ValidationPolicy
from services.stack.samples import write_sample_model
from services.validator.validate import validate

REPO = Path(__file__).resolve().parents[1]
OFF = 1e9  # no limit in practice: the validator before validation.time_limit_s


def hostile_folders() -> dict[str, Any]:
    """The unit tests' hostile folders (the repository root is not on sys.path from bench/)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.unit.validator.test_time_limit import HOSTILE

    return dict(HOSTILE)


def large_tokenizer(model: Path, scale: int = 1) -> None:
    """Not hostile: a tokenizer.json the size of a 256k-vocabulary model's (Gemma's is larger
    still), BPE-shaped, for how far a real model stays from the limit. `scale` is ignored."""
    rng = random.Random(1)
    letters = "abcdefghijklmnopqrstuvwxyz\u0120"
    vocab: dict[str, int] = {}
    while len(vocab) < 256_000:
        word = "".join(rng.choice(letters) for _ in range(rng.randint(1, 12)))
        vocab.setdefault(word, len(vocab))
    words = list(vocab)
    merges = [f"{rng.choice(words)} {rng.choice(words)}" for _ in range(250_000)]
    body = {"version": "1.0", "model": {"type": "BPE", "vocab": vocab, "merges": merges}}
    (model / "tokenizer.json").write_text(json.dumps(body, ensure_ascii=False))


def timed(model: Path, limit: float, runs: int) -> tuple[float, StageReport]:
    best, report = float("inf"), None
    for _ in range(runs):
        started = time.perf_counter()
        report = validate(str(model), policy=ValidationPolicy(time_limit_s=limit))
        best = min(best, time.perf_counter() - started)
    assert report is not None
    return best, report


def stopped(report: StageReport) -> str:
    names = [c.name for c in report.checks if c.details.get("stopped") is True]
    return names[0] if names else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=4, help="times the unit tests' sizes (4)")
    parser.add_argument("--limit", type=float, default=5.0, help="time_limit_s of the run (5)")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    machine = describe_machine([])  # the load at the start
    rows = []
    with tempfile.TemporaryDirectory(prefix="preflight-limit-") as tmp:
        folders = sorted(hostile_folders().items())
        folders.append(("benign: tokenizer.json of 256k tokens, 250k merges", large_tokenizer))
        for i, (name, make) in enumerate(folders):
            model = write_sample_model(Path(tmp) / f"case-{i}")
            make(model, args.scale)
            size = sum(f.stat().st_size for f in model.iterdir())
            off, off_report = timed(model, OFF, args.runs)
            on, on_report = timed(model, args.limit, args.runs)
            rows.append(
                {
                    "case": name,
                    "mb": round(size / 1e6, 1),
                    "no_limit_s": round(off, 2),
                    "no_limit_status": off_report.status.value,
                    "limited_s": round(on, 2),
                    "past_limit_s": round(on - args.limit, 2),
                    "stopped": stopped(on_report),
                    "limited_status": on_report.status.value,
                }
            )
            print(f"  done: {name}", file=sys.stderr, flush=True)
    if args.json:
        out = {"command": command_line(), "machine": machine, "limit_s": args.limit}
        print(json.dumps({**out, "scale": args.scale, "rows": rows}, indent=2))
        return
    print("preflight bench: hostile folders against the validation's time limit")
    print(f"command : {command_line()}")
    print(f"machine : {json.dumps(machine)}")
    print(f"limit   : time_limit_s {args.limit:g} s (off: {OFF:g}); scale {args.scale}\n")
    print("| folder | MB | no limit: s (status) | limit: s | past the limit, s | stopped |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        scaled = "" if r["case"].startswith("benign") else f" x{args.scale}"
        print(
            f"| {r['case']}{scaled} | {r['mb']} | {r['no_limit_s']} ({r['no_limit_status']})"
            f" | {r['limited_s']} ({r['limited_status']}) | {r['past_limit_s']:+} "
            f"| {r['stopped']} |"
        )


if __name__ == "__main__":
    main()
