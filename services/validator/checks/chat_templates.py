"""Jinja chat templates read as code: found in every place a model keeps one, each parsed into
Jinja's own syntax tree (chat_template_syntax.py) and never rendered."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from services.validator.checks.base import on_time
from services.validator.checks.headers import GGUFHeader, ParsedHeaders
from services.validator.checks.inventory import MAX_JSON_BYTES, Inventory, Kind, ModelFile

__all__ = [
    "TEMPLATE_JSON_NAMES",
    "TemplateScan",
    "find_templates",
    "is_template_file",
    "located_templates",
    "scan_chat_templates",
]

# JSON files that carry a chat_template key (processors carry one for multimodal models).
TEMPLATE_JSON_NAMES = frozenset(
    {"tokenizer_config.json", "chat_template.json", "processor_config.json"}
)
GGUF_TEMPLATE_KEY = "tokenizer.chat_template"


def find_templates(inv: Inventory, headers: ParsedHeaders) -> Iterator[tuple[str, str]]:
    """(where, template text) for every chat template in the model: tokenizer and processor
    configs, chat_template.json, *.jinja files and GGUF tokenizer.chat_template metadata."""
    for rel, label, text in located_templates(inv, headers):
        yield f"{rel}: {label}", text


@dataclass
class TemplateScan:
    """The files that hold chat templates, and (file, message) for each issue in them."""

    files: list[str] = field(default_factory=list)
    findings: list[tuple[str, str]] = field(default_factory=list)


def scan_chat_templates(inv: Inventory, headers: ParsedHeaders) -> TemplateScan:
    """Every chat template of the model, parsed (never rendered) for what can run code."""
    from services.validator.checks.chat_template_syntax import template_issues  # Jinja

    scan = TemplateScan()
    for f in inv.files:
        if is_template_file(f) and f.size > MAX_JSON_BYTES:
            scan.files.append(f.rel)
            scan.findings.append(
                (f.rel, f"{f.size:,} bytes, more than the {MAX_JSON_BYTES:,} a template file is "
                 "read to; not scanned")
            )  # fmt: skip
    count = chars = 0
    refused: set[str] = set()
    for rel, label, text in located_templates(inv, headers):
        on_time()  # one template of 256 KiB may take a few seconds to parse, never more
        if rel not in scan.files:
            scan.files.append(rel)
        count, chars = count + 1, chars + len(text)
        if count > MAX_TEMPLATES or chars > MAX_TEMPLATE_TOTAL_CHARS:
            if rel not in refused:  # one finding a file, however many templates it holds
                refused.add(rel)
                scan.findings.append(
                    (rel, f"{label}: not scanned, nor any template after it in this file: the "
                     f"model's chat templates pass {MAX_TEMPLATES:,} or "
                     f"{MAX_TEMPLATE_TOTAL_CHARS:,} characters in all (real ones are a few KB)")
                )  # fmt: skip
            continue
        scan.findings.extend((rel, f"{label}: {issue}") for issue in template_issues(text))
    return scan


# What one model's templates may hold in all: 200,000 small templates in one config took 9.4 s,
# 2,000 .jinja files 3.4 s. Past either, the rest fail as not scanned.
MAX_TEMPLATES = 1000
MAX_TEMPLATE_TOTAL_CHARS = 4 * 1024 * 1024


# ---- where templates live ---------------------------------------------------------------------


def is_template_file(f: ModelFile) -> bool:
    """Whether a loader reads chat templates from the file by its name (transformers does,
    whatever its first bytes sniff as): tokenizer and processor configs, chat_template.json,
    *.jinja."""
    name = PurePosixPath(f.rel).name.lower()
    return name in TEMPLATE_JSON_NAMES or name.endswith(".jinja")


def located_templates(inv: Inventory, headers: ParsedHeaders) -> Iterator[tuple[str, str, str]]:
    """(file, label, template text) for every chat template of the model. Files are taken by
    their name, GGUF files by their kind: a .jinja that opens like a GGUF header is both."""
    for f in inv.files:
        if f.kind is Kind.GGUF:
            yield from _gguf_templates(f, headers)
        if not is_template_file(f):
            continue
        if not f.rel.lower().endswith(".jinja"):
            yield from _json_templates(f)
            continue
        text = _read_text(f)
        if text is not None:
            yield f.rel, "template", text


def _read_text(f: ModelFile) -> str | None:
    if f.size > MAX_JSON_BYTES:
        return None
    try:
        return f.path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return None


def _json_templates(f: ModelFile) -> Iterator[tuple[str, str, str]]:
    text = _read_text(f)
    if text is None:
        return
    try:
        loaded = json.loads(text)
    except (ValueError, RecursionError):
        return  # malformed JSON is the format and secrets checks' finding, not ours
    if not isinstance(loaded, dict):
        return
    value = loaded.get("chat_template")
    if isinstance(value, str):
        yield f.rel, "chat_template", value
    elif isinstance(value, list):
        # transformers saves several templates as [{"name": ..., "template": ...}, ...].
        for i, item in enumerate(value):
            if isinstance(item, dict) and isinstance(item.get("template"), str):
                name = item.get("name")
                label = f"chat_template[{name if isinstance(name, str) else i}]"
                yield f.rel, label, item["template"]
    elif isinstance(value, dict):
        for name, template in value.items():
            if isinstance(template, str):
                yield f.rel, f"chat_template[{name}]", template


def _gguf_templates(f: ModelFile, headers: ParsedHeaders) -> Iterator[tuple[str, str, str]]:
    header = headers.gguf(f.path)
    if not isinstance(header, GGUFHeader):
        return  # an unreadable header is the structure check's finding
    for key, value in header.metadata.items():
        is_template = key == GGUF_TEMPLATE_KEY or key.startswith(GGUF_TEMPLATE_KEY + ".")
        if is_template and isinstance(value, str):
            yield f.rel, f"GGUF {key}", value
