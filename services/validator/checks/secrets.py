"""Credentials shipped inside a model's card, configs and metadata, reported redacted."""

from __future__ import annotations

import bisect
import hashlib
import math
import re
import string
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import pairwise
from typing import Any

from services.contracts.events import CheckResult, Status
from services.validator.checks.base import (
    TIME_CHECK_MASK,
    CheckContext,
    on_time,
    result,
    summarise_findings,
    timed,
)
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
# What one validation reads in all (10,000 files of 4 MiB would be 40 GB of text), and where it
# stops counting: a model with this many keys in it is answered, and judging each costs ~35 us.
MAX_TOTAL_TEXT_BYTES = 128 * 1024 * 1024
MAX_FINDINGS = 1000
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
    r"your|example|placeholder|change[_-]?me|dummy|fake|test|sample|redacted|secret|passw(?:or)?d?"
    r"|xxxx|\*\*\*\*"
    r"|\.\.\.|<|>|\$\{|\{\{|\$\(|%\(|insert|replace|todo|fixme",
    re.IGNORECASE,
)


_CAMEL_PIECE = re.compile(r"(?=[A-Z])")


def _written_as_word(word: str) -> bool:
    # `your`, `YOUR`, `Your`, `ChangeMe`, `...`; not `xXxx` or `tEsT`.
    if word.islower() or word.isupper() or not any(c.isalpha() for c in word):
        return True
    return all(len(piece) >= 2 for piece in _CAMEL_PIECE.split(word) if piece)


def has_placeholder_word(value: str) -> bool:
    """Whether `value` holds a placeholder word written as people write words (`your`, `YOUR`,
    `ChangeMe`, `xxxx`, `...`); `xXxx` inside a random mixed-case key is chance."""
    return any(_written_as_word(m.group()) for m in _PLACEHOLDER_WORDS.finditer(value))


def is_placeholder(value: str) -> bool:
    """`${VAR}`, `$VAR`, `{{ var }}`, `<your-key>`, `your_api_key_here`, `xxxx…`, `****`,
    `changeme`, example/dummy/test/fake values, and runs of one character."""
    if not value or value.startswith("$"):
        return True
    if len(set(value.lower())) == 1:
        return True
    return has_placeholder_word(value)


# --- the rules --------------------------------------------------------------------------------
#
# The shapes follow gitleaks' default config (config/gitleaks.toml in github.com/gitleaks/gitleaks);
# each rule names the gitleaks rule ids it corresponds to in `gitleaks`. A few credentials that
# model repositories carry have no rule there (gitleaks leaves them to its generic-api-key rule);
# those say where their shape comes from instead.
#
# Letter case: every prefix matches in any case (`HF_...`, `akia...`, `SK-PROJ-...`) and every
# body matches in both cases. A match in the vendor's documented case (`documented`, and a body
# that mixes upper and lower case where the vendor's does) is judged by the rule's own test; any
# other case must read as random material, not words: `HF_TransformersIntegrationUtilsModule`
# and `asiapacificnortheast` are names, a lower-cased key is not.


def _mixed(body: str) -> bool:
    """A random key of 32+ characters has digits and both cases; words joined by dashes do not."""
    return (
        any(c.isdigit() for c in body)
        and any(c.isupper() for c in body)
        and any(c.islower() for c in body)
    )


def _both_cases(body: str) -> bool:
    return any(c.isupper() for c in body) and any(c.islower() for c in body)


_BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{40,}")
# Entropy a run of real base64 key material clears easily (a 64-character line has about 5.5).
KEY_MATERIAL_MIN_ENTROPY = 4.0


def _has_key_material(body: str) -> bool:
    return any(
        shannon_entropy(run) >= KEY_MATERIAL_MIN_ENTROPY for run in _BASE64_RUN.findall(body)
    )


# Documentation stand-ins inside a key block; base64 never holds them (words like "test" can
# turn up in 1,600 random base64 characters, so they do not count here).
_PEM_PLACEHOLDER = re.compile(r"\.\.\.|…|\\u2026|<|>|\$\{|\{\{|\*\*\*")


def _unescape(body: str) -> str:
    # A key inside a JSON string has `\n` for its line breaks; count it as the key it is.
    return body.replace("\\n", "\n").replace("\\r", "\r").replace("\\t", "\t")


# English letter frequencies (per cent), a..z. The mean log-ratio against uniform letters is
# about +0.3 for names and words and -0.6 for random letters; below 0 reads as random (99.5% of
# random 34-letter strings; 3% of 34-letter identifiers in a large Python corpus, nearly all of
# them low-entropy filler that other tests reject).
_ENGLISH_PERCENT = (
    8.2, 1.5, 2.8, 4.3, 12.7, 2.2, 2.0, 6.1, 7.0, 0.15, 0.77, 4.0, 2.4,
    6.7, 7.5, 1.9, 0.095, 6.0, 6.3, 9.1, 2.8, 0.98, 2.4, 0.15, 2.0, 0.074,
)  # fmt: skip
_LETTER_SCORE = {
    letter: math.log(percent / sum(_ENGLISH_PERCENT) * 26)
    for letter, percent in zip(string.ascii_lowercase, _ENGLISH_PERCENT, strict=True)
}
MIN_RANDOM_LETTERS = 12


def reads_random(body: str, english_below: float = 0.0) -> bool:
    """Whether a token body seen in a case its vendor does not use is still random material:
    digits and letters interleaved, mixed case that is not a camel-case name, or letters whose
    frequencies are not English (mean log-ratio under `english_below`)."""
    chars = [c for c in body if c.isascii() and c.isalnum()]
    if sum(a.isdigit() != b.isdigit() for a, b in pairwise(chars)) >= 3:
        return True
    if _both_cases(body) and not _looks_like_identifier(body):
        return True
    letters = [c.lower() for c in chars if c.isalpha()]
    if len(letters) < MIN_RANDOM_LETTERS:
        return False
    return sum(_LETTER_SCORE[c] for c in letters) / len(letters) < english_below


# Keyboard and alphabet runs: `sk_live_abcdefgh1234...`, `AKIA1234567890ABCDEF`.
_SEQUENCES = re.compile(r"abcdefg|bcdefgh|0123456|1234567|2345678|qwertyu|asdfghj", re.IGNORECASE)
_FILLER_CHARS = frozenset("._-~+/=")


def _is_filler(body: str) -> bool:
    """`hf_xxxx…`, `AKIA0000…`, `ghp_abab…`, `sk_live_1234567…`: no random part at all."""
    if not body or body.strip("xX0*._-") == "" or body[0] in "$%":
        return True
    return len(set(body.lower()) - _FILLER_CHARS) <= 2 or _SEQUENCES.search(body) is not None


class _Pattern:
    """A rule's pattern, compiled on first use: the ~50 rules cost ~10 ms to compile, which a
    CLI start would pay even when no text holds a rule's anchor. ASCII: `(?i:...)` folds only
    ASCII letters (never the Kelvin sign into `k`), `\\s` and `\\d` are ASCII."""

    __slots__ = ("_compiled", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self._compiled: re.Pattern[str] | None = None

    @property
    def compiled(self) -> re.Pattern[str]:
        if self._compiled is None:
            self._compiled = re.compile(self.source, re.ASCII)
        return self._compiled

    def match(self, text: str, pos: int = 0) -> re.Match[str] | None:
        return self.compiled.match(text, pos)

    def fullmatch(self, text: str) -> re.Match[str] | None:
        return self.compiled.fullmatch(text)

    def search(self, text: str, pos: int = 0) -> re.Match[str] | None:
        return self.compiled.search(text, pos)


def _re(pattern: str) -> _Pattern:
    return _Pattern(pattern)


@dataclass(frozen=True)
class Rule:
    """A credential with a recognisable shape. `secret` is the group that is redacted, `body`
    the random part judged for placeholders and case.

    The rule is tried only where one of its `anchors` (lower-case literals) occurs, so a clean
    file costs a few substring searches however many rules there are; rules share anchors, and
    each distinct anchor is searched for once a text. Leading dots say how many characters
    before the literal the match starts (`....q~`); `walk_back` rules start where the name
    that ends at the anchor starts (`postgresql+psycopg2://`), at most MAX_WALK_BACK back.

    A `bounded` match must start a token: `hf_` in `xhf_abc` is not a Hugging Face token;
    right after an escaped newline in a JSON string (`\\nhf_`) it is. `entropy` is gitleaks'
    gate on the whole secret; `accept` is the rule's own test of a body in its documented
    case; `context` (lower case) must occur somewhere in the text; a `pem` rule's body is a
    key block; a body with the rule's `marker` in it is a key in any case; `english_below` is
    the `reads_random` gate for a body in another case. A `name` group, where there is one,
    is the assignment's key and must not name a digest or an id."""

    name: str
    gitleaks: str
    pattern: _Pattern
    anchors: tuple[str, ...]
    documented: _Pattern | None = None
    mixed_case: bool = False
    entropy: float = 0.0
    accept: Callable[[str], bool] | None = None
    bounded: bool = True
    walk_back: frozenset[str] = frozenset()
    context: str = ""
    pem: bool = False
    marker: str = ""
    english_below: float = 0.0

    def in_documented_case(self, secret: str, body: str) -> bool:
        if self.documented is None:
            return True
        if self.documented.fullmatch(secret) is None:
            return False
        return not self.mixed_case or _both_cases(body)


# Sixteen letters say less than 34: English words score about +0.4, random letters rarely 0.25.
AWS_ENGLISH_BELOW = 0.25


def _aws_key_id(body: str) -> bool:
    # 1 in 28 real ids has no digit; an upper-case word after AKIA/ASIA is what to reject.
    return any(c.isdigit() for c in body) or reads_random(body, AWS_ENGLISH_BELOW)


def _sk_key(body: str) -> bool:
    return _mixed(body) and not _looks_like_identifier(body)


def _openai(body: str) -> bool:
    return "T3BlbkFJ" in body or _sk_key(body)


_PEM_HEADER = r"(?i:-----BEGIN[ A-Z0-9_-]{0,100}PRIVATE KEY(?: BLOCK)?-----)"
_ASSIGN = r"[\"'\]]{0,3}\s{0,5}(?::=|=>|[:=])\s{0,5}[\"']?"
_GITLAB_PREFIXES = "glpat|gldt|glffct|glft|glimt|glagent|gloas|glrt|glsoat|glcbt"
_HEX40 = r"(?:(?i:local)-)?[0-9a-fA-F]{40}"
_WANDB_HEX = _re(r"(?:local-)?[0-9a-f]{40}")
_DB_SCHEMES = (
    "postgres", "postgresql", "mysql", "mariadb", "mongodb", "redis", "rediss", "amqp",
    "amqps", "mssql", "sqlserver", "cockroachdb", "clickhouse", "oracle", "snowflake", "neo4j",
    "couchbase", "couchbases",
)  # fmt: skip
# Rules found at the end of a name (`...key =`, `scheme://`) start where the name does: the
# search walks back over these characters from the anchor.
_SCHEME_CHARS = frozenset(string.ascii_lowercase + string.digits + "+.-")
MAX_WALK_BACK = 64
_URL_USER = r"[^\s:/@\"'`<>{}\\]"

PREFIX_RULES: tuple[Rule, ...] = (
    # Ordered most specific first: where two rules match the same characters, the first names it.
    Rule(
        # gitleaks defines gcp-service-account (cmd/generate/config/rules/gcp.go: `"type":
        # "service_account"`) but leaves it out of the default config; we report the key itself.
        "gcp-service-account",
        "gcp-service-account",
        _re(
            r"(?i:private_key)\\?\"\s*:\s*\\?\"" + _PEM_HEADER + r"(?P<secret>(?P<body>"
            r"[^\"]{0,16384}?))(?=-----END|\\?\")"
        ),
        anchors=("private_key",),
        context="service_account",
        bounded=False,
        pem=True,
    ),
    Rule(
        # The body runs to the END line; a header alone (a README showing the format) is not a
        # key, so it needs real base64 material after it. gitleaks also wants the END line; a
        # key cut off in a metadata string still leaks, so we do not: a cut-off body ends at
        # the first character no key block (or stand-in for one) holds, a quote or a backtick.
        "private-key",
        "private-key",
        _re(
            _PEM_HEADER + r"(?P<secret>(?P<body>(?:(?!-----)"
            r"(?:[A-Za-z0-9+/=:,.()@ \t\r\n_<>{}$*…-]|\\[nrt]|\\u[0-9a-fA-F]{4})){0,16384}))"
        ),
        anchors=("-----begin",),
        bounded=False,
        pem=True,
    ),
    Rule(
        "aws-bedrock-api-key",
        "aws-amazon-bedrock-api-key-long-lived",
        _re(r"(?P<secret>(?i:ABSK)(?P<body>[A-Za-z0-9+/]{109,269}={0,2}))(?![A-Za-z0-9+/=])"),
        anchors=("absk",),
        documented=_re(r"ABSK[A-Za-z0-9+/]{109,269}={0,2}"),
        mixed_case=True,
        entropy=3.0,
    ),
    Rule(
        "aws-bedrock-api-key",
        "aws-amazon-bedrock-api-key-short-lived",
        _re(
            r"(?P<secret>(?i:bedrock-api-key-)"
            r"(?P<body>YmVkcm9jay5hbWF6b25hd3MuY29t[A-Za-z0-9+/=%_-]{0,4096}))"
        ),
        anchors=("bedrock-api-key-",),
        entropy=3.0,
    ),
    Rule(
        # Access key ids are base32 ([A-Z2-7]): never 0, 1, 8 or 9.
        "aws-access-key-id",
        "aws-access-token",
        _re(
            r"(?P<secret>(?i:A3T[A-Z0-9]|AKIA|ASIA|ABIA|ACCA)(?P<body>[A-Za-z2-7]{16}))"
            r"(?![A-Za-z0-9])"
        ),
        anchors=("..ia", "acca", "a3t"),  # AKIA, ASIA, ABIA: `ia` 2 characters in
        documented=_re(r"(?:A3T[A-Z0-9]|AKIA|ASIA|ABIA|ACCA)[A-Z2-7]{16}"),
        entropy=3.0,
        accept=_aws_key_id,  # `ASIAPACIFICNORTHEAST` is a word
        english_below=AWS_ENGLISH_BELOW,
    ),
    Rule(
        # gitleaks has no dedicated rule (its generic-api-key covers it); the key names are AWS's.
        "aws-secret-access-key",
        "generic-api-key",
        # Matched from the credential's own words, inside whatever name holds them
        # (`MY_AWS_SECRET_ACCESS_KEY`). A match walked back to where the name starts, found
        # from every `key`, tried each later `key` in a long run of name characters: a 160 KB
        # card of `AccountKeyAccountKey...` took 52 s.
        _re(
            r"(?i:secret[_-]?access[_-]?key|aws[_-]?secret[_-]?key)"
            + _ASSIGN
            + r"(?P<secret>(?P<body>[A-Za-z0-9/+=]{40}))(?![A-Za-z0-9/+=])"
        ),
        anchors=("secret", "aws"),
        bounded=False,
        accept=lambda body: shannon_entropy(body) >= 3.5,
    ),
    Rule(
        # gitleaks: hf_ and 34 letters; the Hub's own CI tokens have digits too.
        "huggingface-token",
        "huggingface-access-token",
        _re(r"(?P<secret>(?i:hf_)(?P<body>[A-Za-z0-9]{34}))(?![A-Za-z0-9_])"),
        anchors=("hf_",),
        documented=_re(r"hf_[A-Za-z0-9]{34}"),
        mixed_case=True,
        entropy=2.0,
    ),
    Rule(
        "huggingface-org-token",
        "huggingface-organization-api-token",
        _re(r"(?P<secret>(?i:api_org_)(?P<body>[A-Za-z0-9]{34}))(?![A-Za-z0-9_])"),
        anchors=("api_org_",),
        documented=_re(r"api_org_[A-Za-z0-9]{34}"),
        mixed_case=True,
        entropy=2.0,
    ),
    Rule(
        # gitleaks: sk-ant-(api03|admin01)-[\w-]{93}AA; any version and length here.
        "anthropic-api-key",
        "anthropic-api-key, anthropic-admin-api-key",
        _re(r"(?P<secret>(?i:sk-ant-)(?P<body>[A-Za-z0-9_-]{32,}))"),
        anchors=("sk-",),
        documented=_re(r"sk-ant-[a-z]+[0-9]{2}-[A-Za-z0-9_-]{32,}"),
        mixed_case=True,
        entropy=3.0,
        accept=_sk_key,
    ),
    Rule(
        # gitleaks wants the T3BlbkFJ marker ("OpenAI" in base64); legacy and newer keys
        # without it are found too, when they look random.
        "openai-api-key",
        "openai-api-key",
        _re(
            r"(?P<secret>(?i:sk-)(?!(?i:ant-))(?:(?i:proj|svcacct|admin|none)-)?"
            r"(?P<body>[A-Za-z0-9_-]{32,}))"
        ),
        anchors=("sk-",),
        documented=_re(r"sk-(?:(?:proj|svcacct|admin|None)-)?[A-Za-z0-9_-]{32,}"),
        mixed_case=True,
        entropy=3.0,
        accept=_openai,
        marker="t3blbkfj",
    ),
    Rule(
        "github-token",
        "github-fine-grained-pat",
        _re(r"(?P<secret>(?i:github_pat_)(?P<body>[A-Za-z0-9_]{82,255}))(?![A-Za-z0-9_])"),
        anchors=("......_pat_",),
        documented=_re(r"github_pat_[A-Za-z0-9_]{82,255}"),
        mixed_case=True,
        entropy=3.0,
    ),
    Rule(
        "github-token",
        "github-pat, github-oauth, github-app-token, github-refresh-token",
        _re(r"(?P<secret>(?i:gh[pousr]_)(?P<body>[A-Za-z0-9]{36,255}))(?![A-Za-z0-9_])"),
        anchors=("gh",),
        documented=_re(r"gh[pousr]_[A-Za-z0-9]{36,255}"),
        mixed_case=True,
        entropy=3.0,
    ),
    Rule(
        "gitlab-token",
        "gitlab-pat, gitlab-pat-routable, gitlab-deploy-token, gitlab-feature-flag-client-token, "
        "gitlab-feed-token, gitlab-incoming-mail-token, gitlab-kubernetes-agent-token, "
        "gitlab-oauth-app-secret, gitlab-runner-authentication-token(-routable), "
        "gitlab-scim-token, gitlab-cicd-job-token, gitlab-rrt",
        _re(
            r"(?P<secret>(?:(?i:" + _GITLAB_PREFIXES + r")-|(?i:GR1348941))"
            r"(?P<body>[A-Za-z0-9_-]{20,300}(?:\.[0-9A-Za-z]{9})?))(?![A-Za-z0-9_-])"
        ),
        anchors=("gl", "gr1348941"),
        documented=_re(r"(?:(?:" + _GITLAB_PREFIXES + r")-|GR1348941)[A-Za-z0-9_.-]+"),
        mixed_case=True,
        entropy=3.0,
    ),
    Rule(
        "gitlab-token",
        "gitlab-ptt",
        _re(r"(?P<secret>(?i:glptt-)(?P<body>[0-9a-fA-F]{40}))(?![0-9A-Za-z])"),
        anchors=("gl",),
        documented=_re(r"glptt-[0-9a-f]{40}"),
        entropy=3.0,
    ),
    Rule(
        "gitlab-token",
        "gitlab-session-cookie",
        _re(r"(?i:_gitlab_session=)(?P<secret>(?P<body>[0-9A-Za-z]{32}))(?![0-9A-Za-z])"),
        anchors=("_gitlab_session=",),
        bounded=False,
        documented=_re(r"[0-9a-z]{32}"),
        entropy=3.0,
    ),
    Rule(
        "slack-webhook-url",
        "slack-webhook-url",
        _re(
            r"(?i:hooks\.slack\.com/(?:services|workflows|triggers)/)"
            r"(?P<secret>(?P<body>[A-Za-z0-9+/]{43,56}))"
        ),
        anchors=("hooks.slack.com/",),
        bounded=False,
    ),
    Rule(
        "slack-token",
        "slack-bot-token",
        _re(r"(?P<secret>(?i:xoxb)-(?P<body>[0-9]{10,13}-[0-9]{10,13}[A-Za-z0-9-]*))"),
        anchors=("xox",),
        entropy=3.0,
    ),
    Rule(
        "slack-token",
        "slack-legacy-bot-token",
        _re(r"(?P<secret>(?i:xoxb)-(?P<body>[0-9]{8,14}-[A-Za-z0-9]{18,26}))"),
        anchors=("xox",),
        entropy=2.0,
    ),
    Rule(
        "slack-token",
        "slack-user-token",
        _re(r"(?P<secret>(?i:xox[pe])(?P<body>(?:-[0-9]{10,13}){3}-[A-Za-z0-9-]{28,34}))"),
        anchors=("xox",),
        entropy=2.0,
    ),
    Rule(
        "slack-token",
        "slack-app-token",
        _re(r"(?P<secret>(?i:xapp)-(?P<body>[0-9]-[A-Za-z0-9]+-[0-9]+-[A-Za-z0-9]+))"),
        anchors=("xapp-",),
        entropy=2.0,
    ),
    Rule(
        "slack-token",
        "slack-config-access-token",
        _re(r"(?P<secret>(?i:xoxe).(?i:xox[bp])-(?P<body>[0-9]-[A-Za-z0-9]{163,166}))"),
        anchors=("xox",),
        entropy=2.0,
    ),
    Rule(
        "slack-token",
        "slack-config-refresh-token",
        _re(r"(?P<secret>(?i:xoxe)-(?P<body>[0-9]-[A-Za-z0-9]{146}))"),
        anchors=("xox",),
        entropy=2.0,
    ),
    Rule(
        "slack-token",
        "slack-legacy-token",
        _re(r"(?P<secret>(?i:xox[os])-(?P<body>[0-9]+-[0-9]+-[0-9]+-[a-fA-F0-9]+))"),
        anchors=("xox",),
        entropy=2.0,
    ),
    Rule(
        "slack-token",
        "slack-legacy-workspace-token",
        _re(r"(?P<secret>(?i:xox[ar])-(?P<body>(?:[0-9]-)?[0-9A-Za-z]{8,48}))"),
        anchors=("xox",),
        entropy=2.0,
    ),
    Rule(
        # Test-mode keys are credentials too (they reach the account's test data).
        "stripe-api-key",
        "stripe-access-token",
        _re(
            r"(?P<secret>(?i:sk|rk)_(?i:test|live|prod)_(?P<body>[A-Za-z0-9]{10,255}))"
            r"(?![A-Za-z0-9])"
        ),
        anchors=(".k_",),
        documented=_re(r"(?:sk|rk)_(?:test|live|prod)_[A-Za-z0-9]{10,255}"),
        mixed_case=True,
        entropy=2.0,
        accept=_mixed,
    ),
    Rule(
        "google-api-key",
        "gcp-api-key",
        _re(r"(?P<secret>(?i:AIza)(?P<body>[A-Za-z0-9_-]{35}))(?![A-Za-z0-9_-])"),
        anchors=("aiza",),
        documented=_re(r"AIza[A-Za-z0-9_-]{35}"),
        mixed_case=True,
        entropy=4.0,
    ),
    Rule(
        # Microsoft Entra (Azure AD) client secrets: three characters, a digit, `Q~`, 31-34 more.
        # No literal starts them, so the anchor is `q~` and the match starts 4 characters before.
        "azure-ad-client-secret",
        "azure-ad-client-secret",
        _re(
            r"(?<![^\\'\"`\s>=:(,)])(?P<secret>(?P<body>[A-Za-z0-9_~.]{3}[0-9](?i:Q)~"
            r"[A-Za-z0-9_~.-]{31,34}))(?![^\\'\"`\s<),])"
        ),
        anchors=("....q~",),
        bounded=False,
        documented=_re(r"[A-Za-z0-9_~.]{3}[0-9]Q~[A-Za-z0-9_~.-]{31,34}"),
        mixed_case=True,
        entropy=3.0,
    ),
    Rule(
        # No gitleaks rule (generic-api-key catches `AccountKey=`). Storage account keys are 64
        # bytes of base64 (88 characters); Service Bus / Event Hubs SharedAccessKeys 32 bytes.
        "azure-storage-key",
        "generic-api-key",
        _re(
            r"(?i:AccountKey|SharedAccessKey)\s{0,5}=\s{0,5}"
            r"(?P<secret>(?P<body>[A-Za-z0-9+/]{40,128}={0,2}))(?![A-Za-z0-9+/=])"
        ),
        anchors=("accountkey", "sharedaccesskey"),
        bounded=False,
        entropy=4.0,
    ),
    Rule(
        "azure-storage-key",
        "generic-api-key",
        _re(
            r"(?i:storage[_-]?(?:account[_-]?)?(?:access[_-]?)?key)"
            + _ASSIGN
            + r"(?P<secret>(?P<body>[A-Za-z0-9+/]{86}==))(?![A-Za-z0-9+/=])"
        ),
        anchors=("storage",),
        bounded=False,
        entropy=4.0,
    ),
    Rule(
        # Not in gitleaks; betterleaks (a gitleaks fork) has weights-and-biases-api-key-v1.
        "wandb-api-key",
        "none (betterleaks weights-and-biases-api-key-v1)",
        _re(r"(?P<secret>(?i:wandb_v1_)(?P<body>[A-Za-z0-9_]{77}))(?![A-Za-z0-9_])"),
        anchors=("wandb",),
        documented=_re(r"wandb_v1_[A-Za-z0-9_]{77}"),
        mixed_case=True,
        entropy=3.5,
    ),
    Rule(
        # The classic key is 40 hex digits (`local-` in front on W&B Server), recognisable only
        # by where it is: assigned to a W&B name (betterleaks weights-and-biases-api-key, a
        # gitleaks semi-generic rule), passed to wandb.login(key=...) or `wandb login`, or in
        # ~/.netrc.
        "wandb-api-key",
        "none (betterleaks weights-and-biases-api-key)",
        _re(
            r"(?P<name>(?i:wandb|weightsandbiases)[ \t\w.(-]{0,20}?)[\"'\]]{0,3}\s{0,3}"
            r"(?::{1,3}=|=>|\?=|\|\||[=:>,])[\s`'\"=]{0,5}"
            r"(?P<secret>(?P<body>" + _HEX40 + r"))(?![0-9A-Za-z])"
        ),
        anchors=("wandb", "weightsandbiases"),
        documented=_WANDB_HEX,
        entropy=3.0,
    ),
    Rule(
        "wandb-api-key",
        "none",
        _re(
            r"(?i:wandb\.login)\([^)]{0,120}?\b(?i:key)\s{0,3}=\s{0,3}\\?[\"']"
            r"(?P<secret>(?P<body>" + _HEX40 + r"))\\?[\"']"
        ),
        anchors=("wandb",),
        documented=_WANDB_HEX,
        entropy=3.0,
    ),
    Rule(
        "wandb-api-key",
        "none",
        _re(
            r"(?i:wandb)[ \t]+(?i:login)(?:[ \t]+--?[A-Za-z-]+(?:[= ](?!-)\S+)?){0,4}[ \t]+"
            r"[\"']?(?P<secret>(?P<body>" + _HEX40 + r"))(?![0-9A-Za-z])"
        ),
        anchors=("wandb",),
        documented=_WANDB_HEX,
        entropy=3.0,
    ),
    Rule(
        "wandb-api-key",
        "none",
        _re(
            r"(?i:api\.wandb\.ai)(?:\s|\\[nrt])+(?i:login)(?:\s|\\[nrt])+[^\s\\]+"
            r"(?:\s|\\[nrt])+(?i:password)(?:\s|\\[nrt])+"
            r"(?P<secret>(?P<body>" + _HEX40 + r"))(?![0-9A-Za-z])"
        ),
        anchors=("....wandb",),
        bounded=False,
        documented=_WANDB_HEX,
        entropy=3.0,
    ),
    Rule(
        # No gitleaks rule: a database URL with a password in it. People choose these
        # passwords, so the gate is lower than for keys; `user:user@` is a local default.
        "database-url-password",
        "none",
        _re(
            r"(?i:" + "|".join(sorted(_DB_SCHEMES, key=len, reverse=True)) + r")"
            r"(?:\+[A-Za-z0-9]+)?://(?P<user>" + _URL_USER + r"{0,64}):"
            r"(?P<secret>(?P<body>[^\s/@\"'`<>{}\\]{6,128}))@[^\s/@\"'`<>\\]"
        ),
        anchors=("://",),
        walk_back=_SCHEME_CHARS,
        accept=lambda body: shannon_entropy(body) >= 2.5,
    ),
    Rule(
        "url-credentials",
        "none",
        _re(
            r"://(?P<user>" + _URL_USER + r"{1,64}):"
            r"(?P<secret>(?P<body>" + _URL_USER + r"{8,128}))@[^\s/@\"'<>\\]"
        ),
        anchors=("://",),
        bounded=False,
        accept=lambda body: shannon_entropy(body) >= 3.0,
    ),
)

# Keys their vendors publish in documentation and SDKs, known by sha256 so that none of them is
# spelled out here: shown in a README they are examples, not leaks.
PUBLISHED_EXAMPLE_SHA256 = frozenset(
    {
        # the Azure storage emulator's (Azurite's) documented account key
        "0011cc25eb4320717494d2703e8cba85743e71b500283c21c8b88147992f9059",
        # Stripe's documentation test keys
        "2cafc0970149a84f3b9e62eaf169f36f59907a3b3e31f7b82e68c69cd27f7326",
        "f2d6ca16515033e5dce14eba840b979d27b5cbae24bb3e5bf484339667f86397",
        # the Firebase SDK sample keys in gitleaks' gcp-api-key allowlist
        "f56e323494a6ffc2064e7a955908957d84f0755e5f975dabd64328d0359a8f7c",
        "2037abcaffb2b77785da716cf7ccff4ff4d00c4ea930db0167b7d71f50af7eb4",
        "3f370c9dd8225c63b5c77de1f785edc9712958f18bb612d5fa2e0ae33aeca682",
        "e4a5542bb7fd7b67e943c71ad29c34b5972c9840597e7eda53e666f44d5da0b9",
        "a19f89ab3555eac10c40741f6df79ecf0935998f15569f8db9d67bce0181fff6",
        "0b476bdf9acf2123d547b5ae76f1e59884d8ec9553ee0c47e9f31fd4768f3f3c",
        "eb540d2b6ee2a0a47c5779bc8a0141784c6b753840d4c6f4e2428a6e86e9e0b1",
        "37f8f09bdf12c2f2eae4ead7273a62ddb0c23459cbf902892f282b57f7ed6619",
        "8731261cb72d86267a32a532ebd3df429e2144e5e4ced7e13568bc9e6c8fb1b1",
        "49f777db995e8260da7ca9ffdf0c08d66f0453e97ec967018baf2cdfe3b582d0",
        "27a9a42931dff7eb2f8434e20a9bce976ea364e7bee49187f19d5cfeca9c7045",
        "dc0fcf046c61640cbd1e8b999ada3262d722c2ca4bf42dceac999020ffdbb614",
        "4c98242dcadc8b29005c6b4aad526552d5ea1842149154c0694adeec75847583",
        "ea9bb1082cf95663f5faca23b8b15ef2aa0fce0a5c6df9c32dcb85b2e0a4513d",
        "3a8b61d0f636b007840c0d40ba12bcf48465dc054cdc1a68704a33521d84b665",
        "a6c814bc555ae62c7bd8b58ec07bf559c7ed3a009976a1e0acc9cef0d4473b41",
    }
)

# A W&B name that labels a digest or an id (`wandb_run_id`, `wandb-core commit sha`).
_DIGEST_WORDS = frozenset(
    {"sha", "sha1", "sha256", "commit", "hash", "digest", "revision", "rev", "id", "run",
     "version", "checksum", "md5", "etag", "artifact", "entity", "project", "group", "sweep"}
)  # fmt: skip


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
    return groups.get("body") or match.group("secret")


def _starts_token(text: str, i: int) -> bool:
    if i == 0 or text[i - 1] not in _WORD_CHARS:
        return True
    return i >= 2 and text[i - 2] == "\\" and text[i - 1] in "nrt"


Hit = tuple[int, int, str, str]  # start, end, rule, secret

_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def _folded(text: str) -> str:
    """`text` in lower case, position for position (anchors found in it index `text`)."""
    lowered = text.lower()
    # A few characters lower-case to two (`İ`); none to zero, so equal length means aligned.
    return lowered if len(lowered) == len(text) else text.translate(_ASCII_LOWER)


class _Anchors:
    """Where each literal occurs in a folded text, searched for once however many rules use it."""

    def __init__(self, lowered: str) -> None:
        self.lowered = lowered
        self.found: dict[str, list[int]] = {}

    def __call__(self, literal: str) -> list[int]:
        positions = self.found.get(literal)
        if positions is None:
            positions = []
            i = self.lowered.find(literal)
            while i >= 0:
                positions.append(i)
                i = self.lowered.find(literal, i + 1)
            self.found[literal] = positions
        return positions

    def starts(self, rule: Rule) -> list[int]:
        """Where `rule` may match, in order."""
        lowered, starts = self.lowered, set()
        for anchor in rule.anchors:
            literal = anchor.lstrip(".")
            back = len(anchor) - len(literal)
            for i in self(literal):
                start = i - back
                while (
                    rule.walk_back
                    and start > 0
                    and i - start < MAX_WALK_BACK
                    and lowered[start - 1] in rule.walk_back
                ):
                    start -= 1
                if start >= 0:
                    starts.add(start)
        return sorted(starts)


def _rule_matches(rule: Rule, text: str, anchors: _Anchors) -> Iterator[re.Match[str]]:
    if rule.context and not anchors(rule.context):
        return
    taken = 0
    starts = anchors.starts(rule)
    for batch in range(0, len(starts), TIME_CHECK_MASK + 1):  # a look at the clock a batch
        on_time()
        for start in starts[batch : batch + TIME_CHECK_MASK + 1]:
            if start < taken or (rule.bounded and not _starts_token(text, start)):
                continue
            m = rule.pattern.match(text, start)
            if m is not None:
                taken = m.end()
                yield m


def _judge(rule: Rule, m: re.Match[str]) -> str | None:
    """The secret `m` holds, or None where it is a placeholder or only looks like a key."""
    body = _body(m)
    if rule.pem:
        block = _unescape(body)
        # Armor headers (`Proc-Type: 4,ENCRYPTED`, `Comment: Alice <a@b.c>`) are not material.
        material = "\n".join(line for line in block.splitlines() if ": " not in line)
        if _PEM_PLACEHOLDER.search(material) or not _has_key_material(material):
            return None
        return block.strip()
    if has_placeholder_word(body) or _is_filler(body):
        return None
    secret = m.group("secret")
    if rule.entropy and shannon_entropy(secret) < rule.entropy:
        return None
    if rule.in_documented_case(secret, body):
        if rule.accept is not None and not rule.accept(body):
            return None
    elif not (rule.marker and rule.marker in body.lower()) and not reads_random(
        body, rule.english_below
    ):
        return None
    groups = m.groupdict()
    if groups.get("user") is not None and body == groups["user"]:
        return None  # postgres://postgres:postgres@localhost is a local default
    name = groups.get("name")
    if name and any(w.lower() in _DIGEST_WORDS for w in _KEY_WORD.findall(name)):
        return None
    if hashlib.sha256(secret.encode()).hexdigest() in PUBLISHED_EXAMPLE_SHA256:
        return None
    return secret


class _Taken:
    """Spans already named, kept sorted: whether a new span overlaps one costs a bisection, so
    a card with 100,000 keys in it is not 100,000 squared comparisons."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def overlaps(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self.starts, start)
        if i > 0 and self.ends[i - 1] > start:
            return True
        return i < len(self.starts) and self.starts[i] < end

    def add(self, start: int, end: int) -> None:
        i = bisect.bisect_right(self.starts, start)
        self.starts.insert(i, start)
        self.ends.insert(i, end)


def _prefix_hits(
    text: str, lowered: str, taken: _Taken, limit: int, keep: tuple[int, int]
) -> list[Hit]:
    """Hits of the prefix rules, until `limit` of them start inside `keep`."""
    hits: list[Hit] = []
    kept = 0
    anchors = _Anchors(lowered)
    for rule in PREFIX_RULES:
        on_time()
        for m in _rule_matches(rule, text, anchors):
            secret = _judge(rule, m)
            if secret is None:
                continue
            start, end = m.span("secret")
            if not taken.overlaps(start, end):  # rules are ordered most specific first
                taken.add(start, end)
                hits.append((start, end, rule.name, secret))
                kept += keep[0] <= start < keep[1]
                if kept >= limit:
                    return hits
    return hits


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


def _generic_hits(text: str, taken: _Taken, limit: int, keep: tuple[int, int]) -> list[Hit]:
    hits: list[Hit] = []
    kept = 0
    for m in timed(_ASSIGNED_VALUE.finditer(text)):
        start, end = m.span("secret")
        if taken.overlaps(start, end):
            continue  # a specific rule already named this value
        secret = m.group("secret")
        if key_is_sensitive(_key_before(text, m.start())) and value_is_random(secret):
            hits.append((start, end, "generic-high-entropy", secret))
            kept += keep[0] <= start < keep[1]
            if kept >= limit:
                break
    return hits


# A long text (a 60 MB vocabulary) is scanned in windows: where every other character starts an
# anchor, the anchors' positions took 3 GB for 60 MB. Each window sees this much of the text on
# either side, more than any rule's match (16 KiB key blocks) or walk back, and keeps the hits
# that start in its own part.
SCAN_CHUNK_CHARS = 4 * 1024 * 1024
CHUNK_CONTEXT_CHARS = 64 * 1024


def _hits(text: str, generic: bool, limit: int, keep: tuple[int, int] | None = None) -> list[Hit]:
    """Hits that start inside `keep` (all of `text` by default), at most `limit` of them.
    Hits outside it are still found, so that rules overlap there as in one pass."""
    keep = keep or (0, len(text))
    lowered = _folded(text)
    taken = _Taken()
    hits = _prefix_hits(text, lowered, taken, limit, keep)
    inside = sum(keep[0] <= h[0] < keep[1] for h in hits)
    if generic and inside < limit and any(hint in lowered for hint in _GENERIC_HINTS):
        hits += _generic_hits(text, taken, limit - inside, keep)
    return sorted(h for h in hits if keep[0] <= h[0] < keep[1])[:limit]


def scan_text(
    source: str, text: str, *, generic: bool = True, limit: int = MAX_FINDINGS
) -> list[SecretFinding]:
    """Every credential in `text`, in order of position, or the first `limit` found;
    `generic=False` runs only the rules with a recognisable prefix (for vocabularies, where
    random-looking strings are normal)."""
    if len(text) <= SCAN_CHUNK_CHARS + 2 * CHUNK_CONTEXT_CHARS:
        hits = _hits(text, generic, limit)
    else:
        hits = []
        for start in range(0, len(text), SCAN_CHUNK_CHARS):
            low = max(0, start - CHUNK_CONTEXT_CHARS)
            window = text[low : start + SCAN_CHUNK_CHARS + CHUNK_CONTEXT_CHARS]
            own = (start - low, start - low + SCAN_CHUNK_CHARS)  # each hit from one window
            for s, e, rule, value in _hits(window, generic, limit - len(hits), own):
                hits.append((low + s, low + e, rule, value))
            if len(hits) >= limit:
                break
    if not hits:
        return []
    hits.sort()
    findings, line, counted = [], 1, 0
    for s, _, r, v in hits:  # lines counted once through the text, not from its start each time
        line += text.count("\n", counted, s)
        counted = s
        findings.append(SecretFinding(source=source, line=line, rule=r, redacted=redact(v)))
    return findings


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
    files = texts = read = 0
    for f in inv.files:
        on_time()
        if f.kind not in SCANNED_KINDS or len(findings) >= MAX_FINDINGS:
            continue
        vocabulary = f.path.name.lower() in VOCABULARY_NAMES
        limit = MAX_VOCABULARY_BYTES if vocabulary else MAX_TEXT_BYTES
        if f.size > limit:
            skipped.append(f"{f.rel}: {f.size} bytes, over the {limit} byte limit")
            continue
        if read + f.size > MAX_TOTAL_TEXT_BYTES:
            skipped.append(f"{f.rel}: not read, over the {MAX_TOTAL_TEXT_BYTES} bytes read in all")
            continue
        try:
            data = f.path.read_bytes()
        except OSError as exc:
            skipped.append(f"{f.rel}: unreadable: {exc.strerror}")
            continue
        read += len(data)
        if _looks_binary(data):
            skipped.append(f"{f.rel}: binary content")
            continue
        findings += scan_text(
            f.rel,
            data.decode("utf-8", errors="replace"),
            generic=not vocabulary,
            limit=MAX_FINDINGS - len(findings),
        )
        scanned.append(f.rel)
        files += 1
    for source, text in extra_texts:
        on_time()
        if len(findings) >= MAX_FINDINGS:
            break
        if len(text) > MAX_TEXT_BYTES:
            skipped.append(f"{source}: {len(text)} characters, over the {MAX_TEXT_BYTES} limit")
            continue
        if read + len(text) > MAX_TOTAL_TEXT_BYTES:
            skipped.append(f"{source}: not read, over the {MAX_TOTAL_TEXT_BYTES} bytes read in all")
            continue
        read += len(text)
        findings += scan_text(source, text, limit=MAX_FINDINGS - len(findings))
        scanned.append(source)
        texts += 1

    details: dict[str, Any] = {"findings": [asdict(f) for f in findings], "scanned": scanned}
    if skipped:
        details["skipped"] = skipped
    if findings:
        listed = [f"{f.source}:{f.line} {f.rule} {f.redacted}" for f in findings]
        counted = f"{len(findings)} secret(s)"
        if len(findings) >= MAX_FINDINGS:
            counted = f"at least {MAX_FINDINGS} secrets (stopped counting there)"
            details["stopped"] = (
                f"at {MAX_FINDINGS} findings: the rest of that text and later ones were not scanned"
            )
        return result(
            NAME,
            Status.FAILED,
            f"{counted}: {summarise_findings(listed)}",
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
