"""Credentials shipped inside a model's card, configs and metadata, reported redacted."""

from __future__ import annotations

import math
import re
import string
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from itertools import pairwise
from typing import Any

from services.contracts.events import CheckResult, Status
from services.validator.checks.base import CheckContext, result, summarise_findings
from services.validator.checks.inventory import Inventory, Kind

NAME = "secrets"

SCANNED_KINDS = frozenset({Kind.CONFIG, Kind.JSON, Kind.TEXT})
# Model cards and configs are small; a bigger "text" file is data, not something a person wrote.
MAX_TEXT_BYTES = 4 * 1024 * 1024
# Vocabularies are big and full of random-looking strings: only the prefix rules run on them.
VOCABULARY_NAMES = frozenset(
    {"tokenizer.json", "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json"}
)
MAX_VOCABULARY_BYTES = 64 * 1024 * 1024
# How much of a file decides whether it is binary (sentencepiece models are named like text).
BINARY_SNIFF_BYTES = 8192
REDACT_KEEP = 4


@dataclass(frozen=True)
class SecretFinding:
    """One credential: where it is, which rule saw it, and a form that is safe to show anyone."""

    source: str
    line: int
    rule: str
    redacted: str


def redact(secret: str) -> str:
    """`hf_A…(37 chars)`: enough to recognise and rotate a key, never enough to use it. A short
    secret (an 8-character password in a URL) keeps at most a quarter of itself."""
    keep = min(REDACT_KEEP, len(secret) // 4)
    return f"{secret[:keep]}…({len(secret)} chars)"


def shannon_entropy(value: str) -> float:
    """Bits per character of `value` as its own sample (0 for a run of one character)."""
    n = len(value)
    if n == 0:
        return 0.0
    return -sum(c / n * math.log2(c / n) for c in Counter(value).values())


# --- placeholders -----------------------------------------------------------------------------

# Words that mark a value as documentation rather than a credential; real keys are random and
# carry none of them (the odds of "test" inside 34 random letters are about one in a million).
_PLACEHOLDER_WORDS = re.compile(
    r"your|example|placeholder|change[_-]?me|dummy|fake|test|sample|redacted|secret|passw"
    r"|xxxx|\*\*\*\*"
    r"|\.\.\.|<|>|\$\{|\{\{|\$\(|%\(|insert|replace|todo|fixme",
    re.IGNORECASE,
)


def is_placeholder(value: str) -> bool:
    """`${VAR}`, `$VAR`, `{{ var }}`, `<your-key>`, `your_api_key_here`, `xxxx…`, `****`,
    `changeme`, example/dummy/test/fake values, and runs of one character."""
    if not value or value.startswith("$"):
        return True
    if len(set(value.lower())) == 1:
        return True
    return _PLACEHOLDER_WORDS.search(value) is not None


def _is_mostly_filler(body: str) -> bool:
    # "AKIA" + "0" * 16, "hf_" + "x" * 34: filler characters where the random part should be.
    return body.strip("xX0*._-") == ""


# --- the rules --------------------------------------------------------------------------------


def _mixed(body: str) -> bool:
    """A random key of 32+ characters has digits and both cases; words joined by dashes do not."""
    return (
        any(c.isdigit() for c in body)
        and any(c.isupper() for c in body)
        and any(c.islower() for c in body)
    )


def _has_key_material(body: str) -> bool:
    run = _BASE64_RUN.search(body)
    return run is not None and len(set(run.group().lower())) > 1


_BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{40,}")


def _unescape(body: str) -> str:
    # A key inside a JSON string has `\n` for its line breaks; count it as the key it is.
    return body.replace("\\n", "\n").replace("\\r", "\r").replace("\\t", "\t")


@dataclass(frozen=True)
class Rule:
    """A credential with a recognisable shape. `secret` is the group that is redacted, `body`
    the random part judged for placeholders; `accept` rejects what only looks like a key.

    A rule runs only on text holding one of its `hints` (lower-cased), so the usual clean file
    costs a few substring searches. A `bounded` match must start a token: `hf_` in `xhf_abc` is
    not a Hugging Face token; right after an escaped newline in a JSON string (`\\nhf_`) it is.
    Patterns start with a literal, never a look-behind, so the regex engine can skip ahead."""

    name: str
    pattern: re.Pattern[str]
    hints: tuple[str, ...]
    bounded: bool = True
    accept: Callable[[str], bool] | None = None


PREFIX_RULES: tuple[Rule, ...] = (
    Rule(
        "aws-access-key-id",
        re.compile(r"(?P<secret>(?:AKIA|ASIA)(?P<body>[A-Z0-9]{16}))(?![A-Za-z0-9])"),
        hints=("akia", "asia"),
    ),
    Rule(
        "aws-secret-access-key",
        re.compile(
            r"(?i:secret[_-]?access[_-]?key)[\"'\]]{0,3}\s{0,5}(?::=|=>|[:=])\s{0,5}"
            r"[\"']?(?P<secret>(?P<body>[A-Za-z0-9/+=]{40}))(?![A-Za-z0-9/+=])"
        ),
        hints=("access",),
        bounded=False,
        accept=lambda body: shannon_entropy(body) >= 3.5,
    ),
    Rule(
        "huggingface-token",
        re.compile(r"(?P<secret>hf_(?P<body>[A-Za-z0-9]{34,}))(?![A-Za-z0-9])"),
        hints=("hf_",),
        accept=lambda body: not (body.islower() or body.isupper()),
    ),
    Rule(
        "anthropic-api-key",
        re.compile(r"(?P<secret>sk-ant-(?P<body>[A-Za-z0-9_-]{32,}))"),
        hints=("sk-ant-",),
        accept=_mixed,
    ),
    Rule(
        "openai-api-key",
        re.compile(
            r"(?P<secret>sk-(?!ant-)(?:(?:proj|svcacct|admin|None)-)?"
            r"(?P<body>[A-Za-z0-9_-]{32,}))"
        ),
        hints=("sk-",),
        accept=_mixed,
    ),
    Rule(
        "slack-token",
        re.compile(r"(?P<secret>xox[abpors]-(?P<body>[0-9A-Za-z][0-9A-Za-z-]{9,}))"),
        hints=("xox",),
    ),
    Rule(
        "slack-webhook-url",
        re.compile(
            r"hooks\.slack\.com/services/"
            r"(?P<secret>T[A-Z0-9]{6,}/B[A-Z0-9]{6,}/(?P<body>[A-Za-z0-9]{20,}))"
        ),
        hints=("hooks.slack.com",),
        bounded=False,
    ),
    Rule(
        "github-token",
        re.compile(
            r"(?P<secret>(?:gh[pousr]_(?P<body>[A-Za-z0-9]{36,255}))"
            r"|github_pat_(?P<pat>[A-Za-z0-9_]{70,255}))(?![A-Za-z0-9_])"
        ),
        hints=("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
    ),
    Rule(
        "google-api-key",
        re.compile(r"(?P<secret>AIza(?P<body>[0-9A-Za-z_-]{35}))(?![0-9A-Za-z_-])"),
        hints=("aiza",),
    ),
    Rule(
        "private-key",
        # The body runs to the END line; a header alone (a README showing the format) is not a
        # key, so `accept` wants real base64 material after it.
        re.compile(
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
            r"(?P<secret>(?P<body>(?:(?!-----)(?:[A-Za-z0-9+/=:,. \t\r\n-]|\\[nrt])){0,16384}))"
        ),
        hints=("private key",),
        bounded=False,
        accept=_has_key_material,
    ),
    Rule(
        "url-credentials",
        re.compile(
            r"://(?P<user>[^\s:/@\"'<>{}\\]{1,64}):"
            r"(?P<secret>(?P<body>[^\s:/@\"'<>{}\\]{8,128}))@[^\s/@\"'<>\\]"
        ),
        hints=("@",),
        bounded=False,
        accept=lambda body: shannon_entropy(body) >= 3.0,
    ),
)


# Generic: `key = value`, `key: value`, `"key": "value"`, `KEY=value` where the key names a
# credential. The search starts at the operator (a cheap character to find) and walks back to
# the key, so a long blob without operators costs one pass.
_ASSIGNED_VALUE = re.compile(
    r"(?::=|=>|[:=])\s{0,5}(?:[\"'`]|(?i:bearer|basic|token)\s{1,5})?"
    r"(?P<secret>[^\s\"'`,;<>{}\[\]()\\|]{16,})"
)
_GENERIC_HINTS = ("key", "secret", "token", "pass", "pwd", "auth", "credential", "bearer")
_WORD_CHARS = frozenset(string.ascii_letters + string.digits + "_")
_KEY_CHARS = _WORD_CHARS | {".", "-"}
MAX_KEY_CHARS = 80
_KEY_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
_SENSITIVE_WORDS = frozenset(
    {"secret", "token", "password", "passwd", "pwd", "passphrase", "auth", "authorization",
     "credential", "credentials", "apikey", "accesskey", "bearer"}
)  # fmt: skip
_SENSITIVE_PAIRS = frozenset(
    {("api", "key"), ("access", "key"), ("private", "key"), ("client", "secret")}
)
# A key with one of these words describes a credential (its type, file, length) or is a
# tokenizer's special token; its value is not a credential.
_BENIGN_WORDS = frozenset(
    {"type", "types", "id", "ids", "length", "len", "max", "min", "num", "count", "size",
     "class", "limit", "index", "idx", "position", "pad", "eos", "bos", "unk", "sep", "cls",
     "mask", "special", "added", "vocab", "file", "path", "dir", "url", "uri", "endpoint",
     "name", "env", "var", "header", "prefix", "suffix", "format", "hash", "sha", "sha1",
     "sha256", "digest", "checksum", "revision", "commit", "expiry", "expires", "ttl",
     "timeout", "template", "start", "end", "image", "audio", "video", "boi", "eoi", "chat",
     "decoder", "encoder", "strip", "lstrip", "rstrip", "normalized", "single", "word",
     "budget", "limits", "policy", "method", "scheme", "kind", "public"}
)  # fmt: skip
_HEX = re.compile(r"[0-9a-fA-F]+")
_NUMBERISH = re.compile(r"[0-9.:/_+-]+")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_SEPARATORS = re.compile(r"[._-]+")
_NAME_PART = re.compile(r"[A-Za-z]+(?:[0-9]+[A-Za-z]+)?[0-9]*")  # utf8, b64decode, auth0
_DIGITS = re.compile(r"[0-9]+")
# Camel-case names average 5-7 letters a word, most of them in lower-case runs; random
# mixed-case letters average 2.6 and pass for a name about 1 time in 40 at 16 letters, 1 in
# 200 at 34, 1 in 3000 at 64.
_LOWER_RUN = re.compile(r"[a-z]{3,}")
# Per-character entropy a random value clears: ~3.5 bits for mixed alphabets; hex tops out at
# 4 bits and 32 random hex digits average 3.6, so hex gets its own gate.
GENERIC_MIN_ENTROPY = 3.5
GENERIC_MIN_ENTROPY_HEX = 3.0


def key_is_sensitive(key: str) -> bool:
    """Whether an assignment's key names a credential (`api_key`, `HF_TOKEN`, `clientSecret`)
    rather than something about tokens (`pad_token`, `max_token_length`, `tokenizer_class`)."""
    words = [w.lower() for w in _KEY_WORD.findall(key)]
    if any(w in _BENIGN_WORDS for w in words):
        return False
    if any(w in _SENSITIVE_WORDS for w in words):
        return True
    return any(pair in _SENSITIVE_PAIRS for pair in pairwise(words))


def _looks_like_identifier(value: str) -> bool:
    """`process.env.OPENAI_API_KEY`, `self._build_auth_header`, `HTTPKerberosAuth`, `auth0`:
    names, not keys. Every part is letters (at most one group of digits inside) made of
    lower-case, upper-case or camel-case words; random letters switch case every other
    character, so their camel "words" are two or three letters long."""
    if not _IDENTIFIER.fullmatch(value):
        return False
    return all(
        _NAME_PART.fullmatch(part) and _is_name_word(_DIGITS.sub("", part))
        for part in _SEPARATORS.split(value)
        if part
    )


def _is_name_word(letters: str) -> bool:
    if letters.islower() or letters.isupper() or len(letters) <= 6:
        return True
    mean_word = len(letters) / len(_KEY_WORD.findall(letters))
    in_long_lower_runs = sum(map(len, _LOWER_RUN.findall(letters))) / len(letters)
    return mean_word >= 4.5 or (mean_word >= 3.5 and in_long_lower_runs >= 0.6)


def _looks_like_path(value: str) -> bool:
    """`/run/secrets/registry.pem`, not `/x8Kq+...` (a base64 key may start with a slash)."""
    return value.startswith(("/", "./", "../", "~/")) and all(
        part in ("", ".", "..", "~") or _looks_like_identifier(part.lstrip("."))
        for part in value.split("/")
    )


def value_is_random(value: str) -> bool:
    """Whether a value assigned to a credential key looks like a real credential."""
    if is_placeholder(value) or "://" in value or _looks_like_path(value):
        return False
    if _NUMBERISH.fullmatch(value) or _looks_like_identifier(value):
        return False
    gate = GENERIC_MIN_ENTROPY_HEX if _HEX.fullmatch(value) else GENERIC_MIN_ENTROPY
    # A 16-character value cannot reach 4 bits; ask for the same share of what is possible.
    gate = min(gate, 0.8 * math.log2(len(value)))
    return shannon_entropy(value) >= gate


# --- scanning ---------------------------------------------------------------------------------


def _body(match: re.Match[str]) -> str:
    groups = match.groupdict()
    return groups.get("body") or groups.get("pat") or match.group("secret")


def _starts_token(text: str, i: int) -> bool:
    if i == 0 or text[i - 1] not in _WORD_CHARS:
        return True
    return i >= 2 and text[i - 2] == "\\" and text[i - 1] in "nrt"


Hit = tuple[int, int, str, str]  # start, end, rule, secret


def _prefix_hits(text: str, lowered: str) -> list[Hit]:
    hits: list[Hit] = []
    for rule in PREFIX_RULES:
        if not any(hint in lowered for hint in rule.hints):
            continue
        for m in rule.pattern.finditer(text):
            if rule.bounded and not _starts_token(text, m.start()):
                continue
            body = _body(m)
            if rule.name == "private-key":
                secret = _unescape(m.group("secret")).strip()
            elif _PLACEHOLDER_WORDS.search(body) or _is_mostly_filler(body) or body[0] == "$":
                continue
            else:
                secret = m.group("secret")
            if rule.accept is not None and not rule.accept(body):
                continue
            if rule.name == "url-credentials" and body == m.group("user"):
                continue  # postgres://postgres:postgres@localhost is a local default
            start, end = m.span("secret")
            if not _overlaps(start, end, hits):  # rules are ordered most specific first
                hits.append((start, end, rule.name, secret))
    return hits


def _overlaps(start: int, end: int, hits: list[Hit]) -> bool:
    return any(start < h_end and h_start < end for h_start, h_end, _, _ in hits)


def _key_before(text: str, operator: int) -> str:
    """The name left of an assignment operator: `api_key` in `"api_key": ` or `KEY]=`."""
    j = operator
    while j > 0 and operator - j < 5 and text[j - 1] in " \t":
        j -= 1
    while j > 0 and operator - j < 8 and text[j - 1] in "\"']":
        j -= 1
    k = j
    while k > 0 and j - k < MAX_KEY_CHARS and text[k - 1] in _KEY_CHARS:
        k -= 1
    return text[k:j]


def _generic_hits(text: str, taken: list[Hit]) -> list[Hit]:
    hits: list[Hit] = []
    for m in _ASSIGNED_VALUE.finditer(text):
        start, end = m.span("secret")
        if _overlaps(start, end, taken):
            continue  # a specific rule already named this value
        secret = m.group("secret")
        if key_is_sensitive(_key_before(text, m.start())) and value_is_random(secret):
            hits.append((start, end, "generic-high-entropy", secret))
    return hits


def scan_text(source: str, text: str, *, generic: bool = True) -> list[SecretFinding]:
    """Every credential in `text`, in order of position; `generic=False` runs only the rules
    with a recognisable prefix (for vocabularies, where random-looking strings are normal)."""
    lowered = text.lower()
    hits = _prefix_hits(text, lowered)
    if generic and any(hint in lowered for hint in _GENERIC_HINTS):
        hits += _generic_hits(text, hits)
    if not hits:
        return []
    hits.sort()
    return [
        SecretFinding(source=source, line=text.count("\n", 0, s) + 1, rule=r, redacted=redact(v))
        for s, _, r, v in hits
    ]


def _looks_binary(data: bytes) -> bool:
    return b"\x00" in data[:BINARY_SNIFF_BYTES]


def check_secrets(
    inv: Inventory, ctx: CheckContext, extra_texts: Iterable[tuple[str, str]] = ()
) -> CheckResult:
    """Scan configs, model card and other small text files, plus texts the caller extracted
    from weight headers (GGUF string metadata, safetensors `__metadata__`)."""
    started = time.perf_counter()
    findings: list[SecretFinding] = []
    scanned: list[str] = []
    skipped: list[str] = []
    files = 0
    for f in inv.files:
        if f.kind not in SCANNED_KINDS:
            continue
        vocabulary = f.path.name.lower() in VOCABULARY_NAMES
        limit = MAX_VOCABULARY_BYTES if vocabulary else MAX_TEXT_BYTES
        if f.size > limit:
            skipped.append(f"{f.rel}: {f.size} bytes, over the {limit} byte limit")
            continue
        try:
            data = f.path.read_bytes()
        except OSError as exc:
            skipped.append(f"{f.rel}: unreadable: {exc.strerror}")
            continue
        if _looks_binary(data):
            skipped.append(f"{f.rel}: binary content")
            continue
        findings += scan_text(f.rel, data.decode("utf-8", errors="replace"), generic=not vocabulary)
        scanned.append(f.rel)
        files += 1
    texts = 0
    for source, text in extra_texts:
        findings += scan_text(source, text)
        scanned.append(source)
        texts += 1

    details: dict[str, Any] = {"findings": [asdict(f) for f in findings], "scanned": scanned}
    if skipped:
        details["skipped"] = skipped
    if findings:
        listed = [f"{f.source}:{f.line} {f.rule} {f.redacted}" for f in findings]
        return result(
            NAME,
            Status.FAILED,
            f"{len(findings)} secret(s): {summarise_findings(listed)}",
            started=started,
            value=len(findings),
            threshold=0,
            unit="findings",
            details=details,
        )
    reason = f"no secrets in {files} files / {texts} texts"
    if skipped:
        reason += f" ({len(skipped)} skipped: {summarise_findings(skipped, limit=2)})"
    return result(
        NAME,
        Status.PASSED,
        reason,
        started=started,
        value=0,
        threshold=0,
        unit="findings",
        details=details,
    )
