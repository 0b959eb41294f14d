"""Check: every file is a format we recognise by content, and there are weights to deploy."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path, PurePosixPath

from services.contracts.events import CheckResult, Status
from services.validator.checks.base import CheckContext, on_time, result, summarise_findings
from services.validator.checks.headers import HeaderError, parsed_headers
from services.validator.checks.inventory import MAX_JSON_BYTES, Inventory, Kind, ModelFile

NAME = "format"


RAW_LOOKALIKE = frozenset({Kind.UNKNOWN, Kind.PICKLE, Kind.JSON, Kind.ONNX_EXTERNAL_DATA})
"""What raw tensor bytes can be sniffed as by chance: a first byte that opens a pickle or a JSON
text. The unsafe-code check still scans external data for pickle imports."""


def _is_json(f: ModelFile) -> bool:
    """Whether a file sniffed as JSON (it opens with { or [) is JSON: raw tensor bytes that
    open so by chance are not, and a config that is (an auto_map) must keep its scans. Past
    MAX_JSON_BYTES no check reads a file as JSON, so it is not one here either."""
    if f.size > MAX_JSON_BYTES:
        return False
    try:
        json.loads(f.path.read_bytes())
    except (OSError, ValueError, RecursionError):  # a hostile nesting is no reason to stop
        return False
    return True


def _once(seen: dict[str, bool], f: ModelFile) -> bool:
    if f.rel not in seen:
        seen[f.rel] = _is_json(f)
    return seen[f.rel]


def resolve_external_data(inv: Inventory, ctx: CheckContext) -> list[str]:
    """Reclassify files that ONNX models reference as external data; report bad references."""
    problems: list[str] = []
    headers = parsed_headers(ctx.shared)
    by_rel = {f.rel: i for i, f in enumerate(inv.files)}
    is_json: dict[str, bool] = {}  # by file: `./a.json`, `././a.json` ... name one file
    for model in inv.of(Kind.ONNX):
        parsed = headers.onnx(model.path)
        if isinstance(parsed, HeaderError):
            continue  # the structure check reports it
        base = PurePosixPath(model.rel).parent
        # Each location once: a real model points thousands of initializers at one file, and
        # a hostile one pointed 100 at a 20 MB JSON file, parsed again for each (42 s).
        locations = dict.fromkeys(location for location, _, _ in parsed.external)
        for turn, location in enumerate(locations):
            if not turn & 255:
                on_time()
            ref = PurePosixPath(location)
            if ref.is_absolute() or ".." in ref.parts:
                problems.append(
                    f"{model.rel}: external data {location!r} escapes the model directory"
                )
                continue
            rel = (base / ref).as_posix()
            if rel not in by_rel:
                problems.append(f"{model.rel}: external data file {rel} is missing")
                continue
            i = by_rel[rel]
            data = inv.files[i]
            hdf5 = f", and HDF5 after a {data.hdf5_at:,}-byte user block" if data.hdf5_at else ""
            if (
                data.kind not in RAW_LOOKALIKE
                or hdf5
                or (data.kind is Kind.JSON and _once(is_json, data))
            ):
                # A file of a known format keeps its kind, so every check still reads it as
                # what it is: naming a pickle or a GGUF as external data must not hide it.
                problems.append(
                    f"{model.rel}: external data {rel} is not raw tensor bytes: it is "
                    f"{data.kind.value} content ({data.detail}){hdf5}"
                )
                continue
            looked = f"; its first bytes read as {data.detail}" if data.kind is Kind.PICKLE else ""
            inv.files[i] = replace(
                data, kind=Kind.ONNX_EXTERNAL_DATA, detail=f"external data of {model.rel}{looked}"
            )
    return problems


def check_format(inv: Inventory, ctx: CheckContext) -> CheckResult:
    started = time.perf_counter()
    findings = list(inv.problems)
    findings += resolve_external_data(inv, ctx)
    for f in inv.of(Kind.UNKNOWN):
        findings.append(f"{f.rel}: unsupported or unrecognisable ({f.detail})")
    for f in inv.of(Kind.ZIP):
        findings.append(
            f"{f.rel}: a zip that is neither a PyTorch nor a Keras archive ({f.detail})"
        )
    saved_models = inv.of(Kind.TF_SAVED_MODEL)
    for sm in saved_models:
        variables = Path(sm.rel).parent / "variables"
        if not any(Path(f.rel).parent == variables for f in inv.of(Kind.TF_VARIABLES_INDEX)):
            findings.append(f"{sm.rel}: SavedModel without variables/variables.index")
    weights = inv.weights
    if not weights:
        findings.append(
            "no model weights found (safetensors, PyTorch, numpy, ONNX, TensorFlow, Keras or GGUF)"
        )
    formats = sorted({f.kind.value for f in weights})
    details = {
        "files": {
            f.rel: {"kind": f.kind.value, "size": f.size, "found": f.detail} for f in inv.files
        },
        "formats": formats,
    }
    if findings:
        return result(
            NAME, Status.FAILED, summarise_findings(findings), started=started, details=details
        )
    reason = f"{len(inv.files)} files; weights: {', '.join(formats)}"
    if inv.config is not None:
        reason += "; Hugging Face layout (config.json)"
    return result(NAME, Status.PASSED, reason, started=started, details=details)
