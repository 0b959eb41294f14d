"""The chat-template scan: real templates pass, sandbox escapes are found, nothing is rendered."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import pytest
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from services.validator.checks.chat_template_syntax import MAX_TEMPLATE_CHARS, template_issues
from services.validator.checks.chat_templates import find_templates, scan_chat_templates
from services.validator.checks.headers import ParsedHeaders
from services.validator.checks.inventory import MAX_JSON_BYTES, Inventory, build_inventory
from tests.unit.validator.fixtures import write_gguf_with_templates
from tests.unit.validator.templates import (
    BENIGN_TEMPLATES,
    HOSTILE_TEMPLATES,
    MARKER_PLACEHOLDER,
)

CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello, how are you?"},
    {"role": "assistant", "content": "I'm doing great. How can I help you today?"},
    {"role": "user", "content": "What is the weather in Paris?"},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {"location": {"type": "string", "description": "The city"}},
                "required": ["location"],
            },
        },
    }
]
# Families that refuse a system turn (raise_exception) get the chat without it.
NO_SYSTEM_ROLE = ("gemma-2-it", "mistral-7b-instruct-v0.1", "mixtral-8x7b-instruct-v0.1",
                  "codellama-70b-instruct")  # fmt: skip

# Multimodal families whose messages carry a list of typed parts, not a string.
CONTENT_PARTS = ("gemma-3-it",)


class _TemplateError(Exception):
    pass


class _Generation(Extension):
    """transformers' {% generation %} tag, rendering its body unchanged."""

    tags = {"generation"}  # noqa: RUF012 (Jinja's Extension API declares tags this way)

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise _TemplateError(message)


def _render_like_transformers(template: str, **context: Any) -> str:
    """The environment transformers' apply_chat_template renders in (sandboxed, immutable)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_Generation, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys
    )
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template).render(
        bos_token="<s>", eos_token="</s>", add_generation_prompt=True, **context
    )


# ---- benign: real templates of real model families --------------------------------------------


def test_the_benign_corpus_covers_the_families_the_issue_names() -> None:
    families = ("llama-2", "llama-3", "mistral-7b-instruct-v0.1", "mistral-7b-instruct-v0.3",
                "qwen2", "qwen2.5", "gemma", "chatml", "phi-3", "zephyr", "deepseek")  # fmt: skip
    for family in families:
        assert any(name.startswith(family) for name in BENIGN_TEMPLATES), family


@pytest.mark.parametrize("name", sorted(BENIGN_TEMPLATES))
def test_real_templates_pass(name: str) -> None:
    assert template_issues(BENIGN_TEMPLATES[name]) == []


@pytest.mark.parametrize("name", sorted(BENIGN_TEMPLATES))
def test_real_templates_are_working_templates(name: str) -> None:
    """Each benign fixture renders a conversation in the sandbox: they are real templates."""
    template = BENIGN_TEMPLATES[name]
    chat: list[dict[str, Any]] = list(CHAT[1:] if name in NO_SYSTEM_ROLE else CHAT)
    if name in CONTENT_PARTS:
        chat = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in chat]
    rendered = _render_like_transformers(template, messages=chat)
    assert "Paris" in rendered
    if "tools" in template:
        with_tools = _render_like_transformers(template, messages=chat[-3:], tools=TOOLS)
        assert "Paris" in with_tools and "get_current_weather" in with_tools


# ---- hostile: sandbox escapes, as the advisories and Hub payloads write them ------------------

# What each hostile template must be reported for: a construct the message names.
EXPECTED = {
    "cve-2024-34359": "reads attributes __class__, __base__ and __subclasses__ of ()",
    "cve-2024-34359-catch-warnings": "reads attributes __class__, __base__ and __subclasses__ "
    "of []",
    "cycler-init-globals-os-popen": "reads attributes __init__ and __globals__ of cycler",
    "cycler-reverse-shell": "calls system through cycler",
    "joiner-init-globals": "reads attributes __init__ and __globals__ of joiner",
    "namespace-init-globals": "reads attributes __init__ and __globals__ of namespace",
    "set-namespace-alias": "of x (set to namespace)",
    "set-namespace-instance": "reads attributes __class__, __init__ and __globals__ of ns",
    "lipsum-globals": "reads attribute __globals__ of lipsum",
    "lipsum-globals-builtins-import": "__globals__, __builtins__ and __import__ of lipsum",
    "range-class-subclasses": "__subclasses__ of range",
    "self-init-globals": "reads attributes __init__, __globals__, __builtins__ and __import__ "
    "of self",
    "self-template-reference-context": "_TemplateReference__context",
    "config-class-init-globals": "reads attributes __class__, __init__ and __globals__ of config",
    "request-application-globals": "__globals__, __builtins__ and __import__ of request",
    "str-mro-subclasses": "reads attributes __class__, __mro__ and __subclasses__ of ''",
    "str-mro-method": "reads mro through ''",
    "dict-base-subclasses": "__subclasses__ of {}",
    "getitem-globals": "reads attributes __init__ and __globals__ of cycler",
    "attr-filter-globals": "reads attributes __init__ and __globals__ of cycler",
    "attr-filter-string-built": "builds the names __init__ and __globals__ from pieces with ~",
    "lipsum-concat-getitem": "builds the name __globals__ from pieces with ~",
    "plus-concat-getitem": "builds the name __globals__ from pieces with +",
    "attr-percent-c-format-filter": "builds the name __globals__ from pieces with |format",
    "attr-percent-operator": "builds the name __globals__ from pieces with % formatting",
    "attr-str-format-method": "builds the name __init__ from pieces with .format()",
    "attr-hex-escapes": "reads attribute __class__ of request",
    "attr-join-filter": "builds the name __globals__ from pieces with |join",
    "attr-reversed": "builds the name __globals__ from pieces with |reverse",
    "attr-computed-name": "reads an attribute whose name is computed when rendered (|attr(a))",
    "set-built-name": "reads attribute __globals__ of lipsum",
    "map-attribute": "reads attribute __class__ of messages",
    "import-tag": "{% import 'os' %} loads another template",
    "from-import-tag": "{% from 'os' import %} loads another template",
    "include-tag": "{% include '/etc/passwd' %} loads another template",
    "builtins-name-eval": "calls eval through __builtins__",
    "llama-3-with-payload": "line 4: reads attributes __init__ and __globals__ of cycler",
}


def test_every_hostile_fixture_has_an_expectation() -> None:
    assert set(EXPECTED) == set(HOSTILE_TEMPLATES)


@pytest.mark.parametrize("name", sorted(HOSTILE_TEMPLATES))
def test_hostile_templates_are_flagged(name: str) -> None:
    issues = template_issues(HOSTILE_TEMPLATES[name])
    assert any(EXPECTED[name] in issue for issue in issues), issues
    assert all(issue.startswith("line ") for issue in issues), issues


def test_the_cve_payload_reads_as_the_advisory_describes_it() -> None:
    assert template_issues(HOSTILE_TEMPLATES["cve-2024-34359"]) == [
        "line 1: reads attributes __class__, __base__ and __subclasses__ of () "
        "(a sandbox escape: CVE-2024-34359)",
        "line 1: reads attributes __name__, _module, __builtins__ and __import__ of x "
        "(a sandbox escape: CVE-2024-34359)",
        "line 1: calls popen through x (runs a program or Python code)",
    ]


def test_issues_give_the_line_the_construct_is_on() -> None:
    template = "{{ bos_token }}\n{% for m in messages %}\n{{ m.content }}\n{{ lipsum.__globals__ }}"
    assert template_issues(template + "\n{% endfor %}") == [
        "line 4: reads attribute __globals__ of lipsum (a sandbox escape: CVE-2024-34359)"
    ]


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        # a {% set %} variable holding a name built from pieces, read through a subscript
        ("{% set a = '__cla' %}{% set b = 'ss__' %}{{ ''[a ~ b] }}", "attribute __class__"),
        # reassignment does not hide an earlier value
        ("{% set g = 'x' %}{% set g = '__globals__' %}{{ lipsum[g] }}", "attribute __globals__"),
        ("{{ lipsum|attr('_' * 2 ~ 'globals' ~ '_' * 2) }}", "attribute __globals__"),
        ("{% set g %}__glo{{ 'bals__' }}{% endset %}{{ lipsum[g] }}", "attribute __globals__"),
        ("{% for k in ['role', '__class__'] %}{{ m[k] }}{% endfor %}", "attribute __class__"),
        ("{{ lipsum|attr('__GLOBALS__'|lower) }}", "attribute __globals__"),
        ("{{ lipsum|attr('XXglobalsXX'|replace('X', '_')) }}", "attribute __globals__"),
        ("{{ lipsum|attr('__globals__xyz'[:-3]) }}", "attribute __globals__"),
        ("{{ messages|selectattr('__class__') }}", "attribute __class__"),
        ("{{ messages|map(attribute='role.__class__') }}", "attribute __class__"),
        ("{{ messages|map('attr', '__class__') }}", "attribute __class__"),
        ("{{ '{0.__class__}'.format(messages) }}", "attribute __class__ of a format string"),
        ("{{ messages.__class__ }}", "attribute __class__ of messages"),
        ("{{ loop._private }}", "a private attribute"),
        ("{{ eval('1') }}", "calls the Python builtin eval"),
        ("{{ x.f_globals }}", "reads f_globals through x"),
        ("{% extends 'base.html' %}", "{% extends 'base.html' %}"),
    ],
)
def test_more_ways_to_spell_an_escape(template: str, expected: str) -> None:
    issues = template_issues(template)
    assert any(expected in issue for issue in issues), issues


def test_a_template_that_does_not_parse_is_flagged() -> None:
    issues = template_issues("{% for m in messages %}\n{{ m.content }\n")
    assert len(issues) == 1
    assert issues[0].startswith("line 2: does not parse:"), issues


def test_a_template_too_big_to_be_one_is_flagged_not_parsed() -> None:
    issues = template_issues("x" * (MAX_TEMPLATE_CHARS + 1))
    assert issues and "not scanned" in issues[0]


def test_deep_nesting_is_flagged_not_a_crash() -> None:
    issues = template_issues("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}")
    assert issues and "nested too deeply" in issues[0], issues


def test_folding_does_not_build_huge_strings() -> None:
    # Widths and repetition that would make gigabytes are left unfolded, and that is no finding.
    start = time.perf_counter()
    assert template_issues("{{ '%0999999999d'|format(1) }}{{ '_' * 999999999 }}") == []
    assert template_issues("{{ '{0:>999999999}'.format('_') }}") == []
    assert time.perf_counter() - start < 1


def test_folding_through_variables_stays_linear() -> None:
    # Each {% set %} doubles the last: folded naively that is 2**60 steps.
    sets = "".join(f"{{% set a{i} = a{i - 1} ~ a{i - 1} %}}" for i in range(1, 61))
    template = "{% set a0 = '_' %}" + sets + "{{ lipsum[a60] }}{{ lipsum[a3] }}"
    start = time.perf_counter()
    issues = template_issues(template)
    assert time.perf_counter() - start < 1
    assert issues[0] == (
        "line 1: reads attribute ________ of lipsum (a sandbox escape: CVE-2024-34359)"
    )
    assert issues[1].startswith("line 1: builds the names __, ____, ________, ")
    assert " more from pieces with ~" in issues[1]


def test_a_long_real_looking_template_scans_quickly() -> None:
    template = "\n".join(BENIGN_TEMPLATES.values()) * 4  # ~240 KB, under the 256 KiB limit
    start = time.perf_counter()
    assert template_issues(template) == []
    assert time.perf_counter() - start < 5


def test_plain_strings_that_mention_dunders_are_not_findings() -> None:
    # Text is not code: a system prompt may talk about __init__.py.
    template = "{{ 'Put it in __init__.py' }}{% set note = '__main__' %}{{ note }}"
    assert template_issues(template) == []


# ---- where templates live ---------------------------------------------------------------------


_write_gguf = write_gguf_with_templates


def _scan(directory: Path) -> list[tuple[str, str]]:
    return scan_chat_templates(build_inventory(str(directory)), ParsedHeaders()).findings


def _where(directory: Path) -> dict[str, str]:
    return dict(find_templates(build_inventory(str(directory)), ParsedHeaders()))


def test_templates_are_found_in_every_place_they_ship(tmp_path: Path) -> None:
    benign = BENIGN_TEMPLATES["chatml"]
    hostile = HOSTILE_TEMPLATES["lipsum-globals"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": hostile}))
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": hostile}))
    (tmp_path / "chat_template.jinja").write_text(hostile)
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "tool_use.jinja").write_text(benign)
    _write_gguf(tmp_path / "model.gguf", {"default": hostile, "rag": benign})
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": [
                    {"name": "default", "template": benign},
                    {"name": "tool_use", "template": hostile},
                ]
            }
        )
    )

    assert _where(tmp_path) == {
        "additional_chat_templates/tool_use.jinja: template": benign,
        "chat_template.jinja: template": hostile,
        "chat_template.json: chat_template": hostile,
        "model.gguf: GGUF tokenizer.chat_template": hostile,
        "model.gguf: GGUF tokenizer.chat_template.rag": benign,
        "sub/tokenizer_config.json: chat_template[default]": benign,
        "sub/tokenizer_config.json: chat_template[tool_use]": hostile,
        "tokenizer_config.json: chat_template": hostile,
    }
    message = "line 1: reads attribute __globals__ of lipsum (a sandbox escape: CVE-2024-34359)"
    findings = _scan(tmp_path)
    assert ("tokenizer_config.json", f"chat_template: {message}") in findings
    assert ("chat_template.json", f"chat_template: {message}") in findings
    assert ("chat_template.jinja", f"template: {message}") in findings
    assert ("model.gguf", f"GGUF tokenizer.chat_template: {message}") in findings
    assert ("sub/tokenizer_config.json", f"chat_template[tool_use]: {message}") in findings
    assert {rel for rel, _ in findings} == {
        "tokenizer_config.json", "chat_template.json", "chat_template.jinja", "model.gguf",
        "sub/tokenizer_config.json",
    }  # fmt: skip


def test_an_unparsable_template_in_a_file_is_a_finding(tmp_path: Path) -> None:
    broken = "{% for m in messages %}\n{{ m.content }}"  # no endfor
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": broken}))
    [(rel, message)] = _scan(tmp_path)
    assert rel == "tokenizer_config.json"
    assert message.startswith("chat_template: line 2: does not parse: Unexpected end of template")


def test_a_jinja_file_that_looks_like_json_is_still_read(tmp_path: Path) -> None:
    (tmp_path / "chat_template.jinja").write_text(
        "{%- if true %}{{ lipsum.__globals__ }}{% endif %}"
    )
    assert [rel for rel, _ in _scan(tmp_path)] == ["chat_template.jinja"]


def test_a_single_gguf_file_location_is_scanned(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "m.gguf", {"default": HOSTILE_TEMPLATES["cve-2024-34359"]})
    findings = scan_chat_templates(build_inventory(str(path)), ParsedHeaders()).findings
    assert findings and all(rel == "m.gguf" for rel, _ in findings)


def test_real_templates_in_real_files_pass(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": BENIGN_TEMPLATES["llama-3.1-instruct"], "bos_token": "<s>"})
    )
    (tmp_path / "chat_template.jinja").write_text(BENIGN_TEMPLATES["qwen2.5-instruct-tools"])
    _write_gguf(tmp_path / "model.gguf", {"default": BENIGN_TEMPLATES["gemma-2-it"]})
    assert len(_where(tmp_path)) == 3
    assert _scan(tmp_path) == []


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b'{"chat_template": 42}',
        b'{"chat_template": [1, {"name": "x"}, {"template": 3}]}',
        b"[1, 2, 3]",
        b"\xff\xfe\x00garbage",
        b"[" * 100_000,
        b"",
    ],
)
def test_garbage_json_does_not_raise(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "tokenizer_config.json").write_bytes(content)
    (tmp_path / "chat_template.json").write_bytes(content)
    assert _scan(tmp_path) == []


def test_a_broken_gguf_is_skipped(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "model.gguf", {"default": HOSTILE_TEMPLATES["lipsum-globals"]})
    path.write_bytes(path.read_bytes()[:40])  # truncated inside the metadata
    assert _scan(tmp_path) == []


def test_oversized_files_are_not_read_and_say_so(tmp_path: Path) -> None:
    hostile = HOSTILE_TEMPLATES["lipsum-globals"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": hostile}))
    (tmp_path / "chat_template.jinja").write_text(hostile)
    inv = build_inventory(str(tmp_path))
    found = {rel for rel, _ in scan_chat_templates(inv, ParsedHeaders()).findings}
    assert found == {"tokenizer_config.json", "chat_template.jinja"}
    # Entries over the JSON limit are not opened; transformers would still read them, so each
    # is a finding, never a silent pass.
    inv = Inventory(
        root=inv.root,
        is_dir=True,
        files=[replace(f, size=MAX_JSON_BYTES + 1) for f in inv.files],
    )
    findings = scan_chat_templates(inv, ParsedHeaders()).findings
    assert sorted(rel for rel, _ in findings) == ["chat_template.jinja", "tokenizer_config.json"]
    assert all(f"{MAX_JSON_BYTES + 1:,} bytes" in what and "not scanned" in what
               for _, what in findings)  # fmt: skip


# ---- nothing is ever rendered -----------------------------------------------------------------


def _armed(name: str, marker: Path) -> str:
    return HOSTILE_TEMPLATES[name].replace(MARKER_PLACEHOLDER, str(marker))


def _wait_for(path: Path, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.05)
    return False


def test_the_payloads_are_live(tmp_path: Path) -> None:
    """Control: an unsandboxed render (what llama-cpp-python < 0.2.72 did) runs the payload,
    in a child process, so that the marker staying absent below means something."""
    marker = tmp_path / "pwned"
    script = "import sys, jinja2; jinja2.Environment().from_string(sys.stdin.read()).render()"
    subprocess.run(
        [sys.executable, "-c", script],
        input=_armed("cve-2024-34359", marker),
        text=True,
        check=True,
        timeout=60,
    )
    assert _wait_for(marker)


def test_no_hostile_template_executes_during_a_scan(tmp_path: Path) -> None:
    model = tmp_path / "model"
    marker = tmp_path / "pwned"
    armed = [_armed(name, marker) for name in ("cve-2024-34359", "cve-2024-34359-catch-warnings",
                                              "llama-3-with-payload")]  # fmt: skip
    (model / "extra").mkdir(parents=True)
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": armed[0]}))
    (model / "chat_template.json").write_text(json.dumps({"chat_template": armed[1]}))
    (model / "chat_template.jinja").write_text(armed[2])
    _write_gguf(model / "model.gguf", {"default": armed[0], "tool_use": armed[2]})
    findings = _scan(model)
    assert {rel for rel, _ in findings} == {
        "tokenizer_config.json", "chat_template.json", "chat_template.jinja", "model.gguf"
    }  # fmt: skip
    for template in armed:
        assert template_issues(template)
    assert not _wait_for(marker, seconds=1)


def test_long_chains_of_additions_scan_in_linear_time() -> None:
    """Each `+` used to fold every `+` below it again: a 9 KB template took 3.4 s. Chains four
    times as long now cost about four times as long (a ratio, measured interleaved)."""
    from services.validator.checks.chat_template_syntax import template_issues

    def chains(n: int) -> str:
        return ("{{ " + "+".join(["a"] * n) + " }}\n") * 10

    small, large = chains(100), chains(400)
    times: dict[int, list[float]] = {len(small): [], len(large): []}
    for _ in range(3):
        for text in (small, large):
            started = time.perf_counter()
            assert template_issues(text) == []
            times[len(text)].append(time.perf_counter() - started)
    ratio = min(times[len(large)]) / max(min(times[len(small)]), 1e-3)
    assert ratio < 9, f"{ratio:.1f}x the time for 4x the template"
