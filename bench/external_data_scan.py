"""False alarms of the unsafe-code scan on ONNX external data: random float tensors that open
with each byte a pickle may start with, scanned as the validator scans external data.

    cd bench && ../.venv/bin/python external_data_scan.py [--per-byte 3000] [--floats 2048]

Prints, per dtype and first bytes, how many tensors were scanned as possible pickles (their
first byte is an opcode) and how many gave a finding, and the scan time per tensor. Every
finding is printed with the tensor's first bytes, so a false alarm can be reproduced.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import command_line, describe_machine  # bench/machine.py (scripts run from bench/)

from services.validator.checks import unsafe_code
from services.validator.checks.inventory import Kind, ModelFile

FIRST_BYTES = [b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"(", b"c", b"]", b"}",
               b"\x95", b"K", b"J", b"X"]  # fmt: skip
"""PROTO 2-5, MARK, GLOBAL, EMPTY_LIST, EMPTY_DICT, FRAME, BININT1, BININT, BINUNICODE."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-byte", type=int, default=3000, help="tensors per first bytes")
    parser.add_argument("--floats", type=int, default=2048, help="elements per tensor")
    args = parser.parse_args()
    path = Path(tempfile.mkdtemp(prefix="preflight-bench-")) / "weights.bin"
    rows, findings = [], []
    started = time.perf_counter()
    for dtype in (np.float32, np.float16):
        for first in FIRST_BYTES:
            rng = np.random.default_rng([first[0], len(first), np.dtype(dtype).itemsize])
            scanned = flagged = 0
            t0 = time.perf_counter()
            for _ in range(args.per_byte):
                raw = rng.standard_normal(args.floats).astype(dtype).tobytes()
                data = first + raw[len(first) :]
                path.write_bytes(data)
                mf = ModelFile(path=path, rel=path.name, size=len(data),
                               kind=Kind.ONNX_EXTERNAL_DATA)  # fmt: skip
                issues = unsafe_code._scan_external_data(mf)
                scanned += issues is not None
                if issues:
                    flagged += 1
                    findings.append({"first": data[:32].hex(), "issues": [w for _, w in issues]})
            rows.append({"dtype": np.dtype(dtype).name, "first_bytes": first.hex(" "),
                         "tensors": args.per_byte, "scanned": scanned, "findings": flagged,
                         "us_per_tensor": round((time.perf_counter() - t0) / args.per_byte * 1e6,
                                                1)})  # fmt: skip
    total = sum(r["tensors"] for r in rows)
    print(json.dumps({
        "command": command_line(),
        "machine": describe_machine(["numpy"]),
        "rows": rows,
        "tensors": total,
        "findings": len(findings),
        "examples": findings[:20],
        "seconds": round(time.perf_counter() - started, 1),
    }, indent=1))  # fmt: skip
    print(f"{total} tensors, {len(findings)} findings", file=sys.stderr)


if __name__ == "__main__":
    main()
