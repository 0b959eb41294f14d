"""The secrets check: a positive for every rule in every place a model carries text, letter-case
variants, placeholders and false-positive traps, a benign corpus, and redaction."""

from __future__ import annotations

import hashlib
import inspect
import json
import random
import re
import string
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from services.contracts.events import CheckResult, Status
from services.validator.checks import secrets
from services.validator.checks.base import CheckContext
from services.validator.checks.inventory import build_inventory
from services.validator.checks.secrets import (
    PREFIX_RULES,
    SecretFinding,
    check_secrets,
    has_placeholder_word,
    key_is_sensitive,
    reads_random,
    redact,
    scan_text,
    shannon_entropy,
)

# Fake keys in the vendors' published shapes, made at test time so no key-shaped literal sits in
# the repository (push-protection scanners would rightly flag one).
_RNG = random.Random(0)
ALNUM = string.ascii_letters + string.digits
UPPER_DIGITS = string.ascii_uppercase + string.digits
LOWER_DIGITS = string.ascii_lowercase + string.digits
BASE32 = string.ascii_uppercase + "234567"  # AWS access key ids never hold 0, 1, 8 or 9
BASE64 = ALNUM + "+/"
BASE64URL = ALNUM + "-_"
HEX = "0123456789abcdef"
MAX_KEY_FIXTURE = 256


def _rand(alphabet: str, n: int, rng: random.Random = _RNG) -> str:
    """Random characters. A key-sized run never spells a placeholder word in some letter case
    (`test`, `xxxx`): a key that does is let go by design, so it makes no fixture."""
    while True:
        chars = "".join(rng.choice(alphabet) for _ in range(n))
        if n > MAX_KEY_FIXTURE or not has_placeholder_word(chars.lower()):
            return chars


# One maker per vendor format: the documented prefix and the documented alphabet and length.
def aws_key_id(prefix: str = "AKIA", rng: random.Random = _RNG) -> str:
    return prefix + _rand(BASE32, 16, rng)


def aws_secret_key(rng: random.Random = _RNG) -> str:
    return _rand(BASE64, 40, rng)


def bedrock_key(rng: random.Random = _RNG) -> str:
    return "ABSK" + _rand(BASE64, 132, rng)


def hf_token(rng: random.Random = _RNG) -> str:
    return "hf_" + _rand(string.ascii_letters, 34, rng)


def hf_org_token(rng: random.Random = _RNG) -> str:
    return "api_org_" + _rand(string.ascii_letters, 34, rng)


def openai_key(kind: str = "proj", rng: random.Random = _RNG) -> str:
    if kind == "legacy":  # sk- 20 T3BlbkFJ 20
        return "sk-" + _rand(ALNUM, 20, rng) + "T3BlbkFJ" + _rand(ALNUM, 20, rng)
    if kind == "plain":  # the older 48 characters, no marker
        return "sk-" + _rand(ALNUM, 48, rng)
    return f"sk-{kind}-" + _rand(BASE64URL, 74, rng) + "T3BlbkFJ" + _rand(BASE64URL, 74, rng)


def anthropic_key(kind: str = "api03", rng: random.Random = _RNG) -> str:
    return f"sk-ant-{kind}-" + _rand(BASE64URL, 93, rng) + "AA"


def github_token(prefix: str = "ghp_", rng: random.Random = _RNG) -> str:
    if prefix == "github_pat_":
        return prefix + _rand(ALNUM, 22, rng) + "_" + _rand(ALNUM, 59, rng)
    return prefix + _rand(ALNUM, 36, rng)


def gitlab_token(prefix: str = "glpat-", rng: random.Random = _RNG) -> str:
    if prefix == "glptt-":
        return prefix + _rand(HEX, 40, rng)
    if prefix == "routable":
        return "glpat-" + _rand(BASE64URL, 36, rng) + "." + _rand(LOWER_DIGITS, 9, rng)
    n = {"glimt-": 25, "glagent-": 50, "gloas-": 64}.get(prefix, 20)
    return prefix + _rand(ALNUM, n, rng)


def slack_token(kind: str = "bot", rng: random.Random = _RNG) -> str:
    digits = string.digits
    if kind == "user":
        ids = "-".join(_rand(digits, 12, rng) for _ in range(3))
        return f"xoxp-{ids}-{_rand(HEX, 32, rng)}"
    if kind == "app":
        return (
            f"xapp-1-A{_rand(UPPER_DIGITS, 10, rng)}-{_rand(digits, 13, rng)}-{_rand(HEX, 64, rng)}"
        )
    if kind == "workspace":
        return f"xoxa-2-{_rand(ALNUM, 40, rng)}"
    return f"xoxb-{_rand(digits, 12, rng)}-{_rand(digits, 13, rng)}-{_rand(ALNUM, 24, rng)}"


def slack_webhook_path(rng: random.Random = _RNG) -> str:
    return f"T{_rand(UPPER_DIGITS, 8, rng)}/B{_rand(UPPER_DIGITS, 10, rng)}/{_rand(ALNUM, 24, rng)}"


def stripe_key(prefix: str = "sk_live_", rng: random.Random = _RNG) -> str:
    return prefix + "51" + _rand(ALNUM, 97, rng)


def gcp_api_key(rng: random.Random = _RNG) -> str:
    return "AIzaSy" + _rand(BASE64URL, 33, rng)


def azure_client_secret(rng: random.Random = _RNG) -> str:
    return (
        _rand(ALNUM + "_~.", 3, rng)
        + rng.choice(string.digits)
        + "Q~"
        + _rand(ALNUM + "_~.-", 34, rng)
    )


def azure_storage_key(rng: random.Random = _RNG) -> str:
    return _rand(BASE64, 86, rng) + "=="


def azure_sas_key(rng: random.Random = _RNG) -> str:
    return _rand(BASE64, 43, rng) + "="


def wandb_key(rng: random.Random = _RNG) -> str:
    return _rand(HEX, 40, rng)


def wandb_v1_key(rng: random.Random = _RNG) -> str:
    return "wandb_v1_" + _rand(ALNUM + "_", 77, rng)


def pem_body(lines: int = 8, rng: random.Random = _RNG) -> str:
    return (
        "\n".join(_rand(BASE64, 64, rng) for _ in range(lines))
        + "\n"
        + _rand(BASE64, 20, rng)
        + "=="
    )


def pem(kind: str, body: str, headers: str = "") -> str:
    label = f"{kind} PRIVATE KEY".strip()
    if kind == "PGP":
        label += " BLOCK"
    return f"-----BEGIN {label}-----\n{headers}{body}\n-----END {label}-----"


AWS_ID = aws_key_id("AKIA")
AWS_STS_ID = aws_key_id("ASIA")
AWS_SECRET = aws_secret_key()
HF_TOKEN = hf_token()
OPENAI_LEGACY = openai_key("plain")
OPENAI_PROJECT = openai_key("proj")
ANTHROPIC = anthropic_key()
SLACK_BOT = slack_token("bot")
SLACK_WEBHOOK_PATH = slack_webhook_path()
SLACK_WEBHOOK = "https://hooks.slack.com/services/" + SLACK_WEBHOOK_PATH
GITHUB_CLASSIC = github_token("ghp_")
GITHUB_APP = github_token("ghs_")
GITHUB_FINE = github_token("github_pat_")
GOOGLE = gcp_api_key()
PEM_BODY = pem_body()
PEM = pem("RSA", PEM_BODY)
URL_PASSWORD = _rand(ALNUM, 20)
GENERIC_PASSWORD = _rand(ALNUM + "!#%&*+-", 24)
GENERIC_HEX = _rand(HEX, 32)
JWT = f"eyJhbGciOiJIUzI1NiJ9.{_rand(BASE64URL, 40)}.{_rand(BASE64URL, 43)}"
SHA256 = _rand(HEX, 64)
GIT_SHA = _rand(HEX, 40)

ALL_SECRETS = [
    AWS_ID, AWS_STS_ID, AWS_SECRET, HF_TOKEN, OPENAI_LEGACY, OPENAI_PROJECT, ANTHROPIC,
    SLACK_BOT, SLACK_WEBHOOK_PATH, GITHUB_CLASSIC, GITHUB_APP, GITHUB_FINE, GOOGLE, PEM_BODY,
    URL_PASSWORD, GENERIC_PASSWORD, GENERIC_HEX, JWT,
]  # fmt: skip

# The source label the validator gives a GGUF string (services/validator/validate.py).
GGUF_SOURCE = "model.gguf (GGUF metadata general.description)"


def _rules(text: str) -> list[str]:
    return [f.rule for f in scan_text("t", text)]


# --- a positive for every rule ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "rule", "secret"),
    [
        pytest.param(f"aws_access_key_id = {AWS_ID}", "aws-access-key-id", AWS_ID, id="aws-id"),
        pytest.param(f'"key": "{AWS_STS_ID}"', "aws-access-key-id", AWS_STS_ID, id="aws-sts-id"),
        pytest.param(
            f"aws_secret_access_key = {AWS_SECRET}", "aws-secret-access-key", AWS_SECRET,
            id="aws-secret",
        ),
        pytest.param(
            f'{{"SecretAccessKey": "{AWS_SECRET}"}}', "aws-secret-access-key", AWS_SECRET,
            id="aws-secret-json",
        ),
        pytest.param(
            f"huggingface-cli login --token {HF_TOKEN}", "huggingface-token", HF_TOKEN, id="hf"
        ),
        pytest.param(f"OPENAI_API_KEY={OPENAI_LEGACY}", "openai-api-key", OPENAI_LEGACY,
                     id="openai-legacy"),
        pytest.param(f'client = OpenAI(api_key="{OPENAI_PROJECT}")', "openai-api-key",
                     OPENAI_PROJECT, id="openai-project"),
        pytest.param(f"ANTHROPIC_API_KEY={ANTHROPIC}", "anthropic-api-key", ANTHROPIC,
                     id="anthropic"),
        pytest.param(f"slack: {SLACK_BOT}", "slack-token", SLACK_BOT, id="slack-bot"),
        pytest.param(f"notify: {SLACK_WEBHOOK}", "slack-webhook-url", SLACK_WEBHOOK_PATH,
                     id="slack-webhook"),
        pytest.param(f"git clone https://x:{GITHUB_CLASSIC}@github.com/o/r", "github-token",
                     GITHUB_CLASSIC, id="github-classic"),
        pytest.param(f"GH={GITHUB_APP}", "github-token", GITHUB_APP, id="github-app"),
        pytest.param(f"GITHUB_TOKEN={GITHUB_FINE}", "github-token", GITHUB_FINE,
                     id="github-fine-grained"),
        pytest.param(f'"maps_key": "{GOOGLE}"', "google-api-key", GOOGLE, id="google"),
        pytest.param(PEM, "private-key", PEM_BODY, id="private-key"),
        pytest.param(json.dumps({"signing_key": PEM}), "private-key", PEM_BODY,
                     id="private-key-json-escaped"),
        pytest.param(
            PEM.replace("RSA PRIVATE", "OPENSSH PRIVATE"), "private-key", PEM_BODY,
            id="private-key-openssh",
        ),
        pytest.param(PEM[: PEM.index("\n-----END")], "private-key", PEM_BODY,
                     id="private-key-cut-off"),
        pytest.param(f"```\n{PEM[: PEM.index(chr(10) + '-----END')]}\n```\nThen run `make`.",
                     "private-key", PEM_BODY, id="private-key-cut-off-in-a-readme"),
        pytest.param(f"db: postgresql://svc:{URL_PASSWORD}@db.internal:5432/m",
                     "database-url-password", URL_PASSWORD, id="database-url"),
        pytest.param(f"index: https://svc:{URL_PASSWORD}@pypi.internal/simple",
                     "url-credentials", URL_PASSWORD, id="url-credentials"),
        pytest.param(f'password = "{GENERIC_PASSWORD}"', "generic-high-entropy",
                     GENERIC_PASSWORD, id="generic-python"),
        pytest.param(f'{{"client_secret": "{GENERIC_HEX}"}}', "generic-high-entropy",
                     GENERIC_HEX, id="generic-json-hex"),
        pytest.param(f"  DB_PASSWORD: {GENERIC_PASSWORD}", "generic-high-entropy",
                     GENERIC_PASSWORD, id="generic-yaml"),
        pytest.param(f"apiKey={GENERIC_HEX}", "generic-high-entropy", GENERIC_HEX,
                     id="generic-camel"),
        pytest.param(f"token: /{GENERIC_PASSWORD}", "generic-high-entropy",
                     "/" + GENERIC_PASSWORD, id="generic-leading-slash"),
        pytest.param(f'-H "Authorization: Bearer {JWT}"', "generic-high-entropy", JWT,
                     id="generic-bearer"),
        pytest.param(f'os.environ["SERVICE_TOKEN"] = "{GENERIC_PASSWORD}"',
                     "generic-high-entropy", GENERIC_PASSWORD, id="generic-environ"),
    ],
)  # fmt: skip
def test_every_rule_finds_its_secret_and_redacts_it(text: str, rule: str, secret: str) -> None:
    findings = scan_text("f", text)
    assert [f.rule for f in findings] == [rule]
    assert findings[0].redacted == f"{secret[:4]}…({len(secret)} chars)"
    assert secret not in repr(findings)


def test_anthropic_key_is_not_also_an_openai_key() -> None:
    assert _rules(ANTHROPIC) == ["anthropic-api-key"]


def test_a_known_prefix_inside_an_assignment_is_reported_once_by_its_specific_rule() -> None:
    assert _rules(f'{{"hf_token": "{HF_TOKEN}", "api_key": "{OPENAI_LEGACY}"}}') == [
        "huggingface-token",
        "openai-api-key",
    ]


def test_a_token_after_an_escaped_newline_in_json_is_found() -> None:
    text = json.dumps({"notes": f"login first:\n{HF_TOKEN}"})
    assert "\\n" + HF_TOKEN in text
    assert _rules(text) == ["huggingface-token"]


def test_several_secrets_come_back_in_order_with_their_lines() -> None:
    text = f"a\nAWS={AWS_ID}\n\nx {GOOGLE}\n{PEM}\n"
    assert [(f.line, f.rule) for f in scan_text("f", text)] == [
        (2, "aws-access-key-id"),
        (4, "google-api-key"),
        (5, "private-key"),
    ]


def test_text_that_lower_cases_to_a_different_length_still_finds_and_places_tokens() -> None:
    """`İ` lower-cases to two characters; anchors found in the folded text must still index
    the original."""
    text = f"İstanbul İzmir\nİ {HF_TOKEN} İ {GITHUB_CLASSIC}\n"
    assert len(text.lower()) != len(text)
    findings = scan_text("f", text)
    assert [(f.line, f.rule, f.redacted) for f in findings] == [
        (2, "huggingface-token", redact(HF_TOKEN)),
        (2, "github-token", redact(GITHUB_CLASSIC)),
    ]


def test_every_rule_names_its_gitleaks_counterpart() -> None:
    for rule in PREFIX_RULES:
        assert rule.gitleaks, rule.name
        assert rule.anchors and all(a == a.lower() for a in rule.anchors), rule.name


# --- the model files the tests put leaks into ----------------------------------------------

MODEL_CARD = f"""---
license: llama3.1
language:
- en
library_name: transformers
pipeline_tag: text-generation
base_model: meta-llama/Llama-3.1-8B
tags:
- facebook
- meta
- llama
datasets:
- HuggingFaceH4/ultrachat_200k
model-index:
- name: acme-chat-8b
  results:
  - task:
      type: text-generation
    metrics:
    - type: accuracy
      value: 68.4
---

# acme-chat-8b

A chat fine-tune of Llama 3.1 8B. Gated: accept the license on the Hub, then log in with
`huggingface-cli login` or set `HF_TOKEN` (see https://huggingface.co/docs/hub/security-tokens).

## Usage

```python
import os
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_id = "acme/acme-chat-8b"
tokenizer = AutoTokenizer.from_pretrained(model_id, token=os.environ["HF_TOKEN"])
model = AutoModelForCausalLM.from_pretrained(
    model_id, torch_dtype=torch.bfloat16, device_map="auto", use_auth_token=True
)
tokenizer.pad_token = tokenizer.eos_token
messages = [{{"role": "user", "content": "Who are you?"}}]
input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                          return_tensors="pt").to(model.device)
outputs = model.generate(input_ids, max_new_tokens=256, pad_token_id=tokenizer.eos_token_id,
                         do_sample=True, temperature=0.6, top_p=0.9)
print(tokenizer.decode(outputs[0][input_ids.shape[-1]:], skip_special_tokens=True))
```

Serving behind an OpenAI-compatible endpoint:

```bash
export HF_TOKEN=${{HF_TOKEN}}
export OPENAI_API_KEY=<your-key>
vllm serve acme/acme-chat-8b --api-key $VLLM_API_KEY --max-model-len 8192
curl http://localhost:8000/v1/chat/completions -H "Authorization: Bearer $VLLM_API_KEY" \\
  -H "Content-Type: application/json" -d '{{"model": "acme/acme-chat-8b"}}'
```

```python
from openai import OpenAI
client = OpenAI(base_url="http://localhost:8000/v1", api_key="your_api_key_here")
```

## Files

| file | size | sha256 |
|------|------|--------|
| model-00001-of-00004.safetensors | 4.98 GB | {SHA256} |
| model-00002-of-00004.safetensors | 5.00 GB | {_rand("0123456789abcdef", 64)} |

checksum: {SHA256}
revision: {GIT_SHA}

## Training

Trained on 8xH100 for 3 epochs, learning_rate=2e-5, warmup_ratio=0.03, bf16=True,
per_device_train_batch_size=4, gradient_accumulation_steps=8, max_seq_length=4096.
Tokens seen: 1.2B. The tokenizer adds `<|eot_id|>` as the end-of-turn token.

## Citation

```bibtex
@misc{{acme2024chat,
  title  = {{acme-chat-8b: a chat fine-tune}},
  author = {{Doe, Jane and Roe, Richard}},
  year   = {{2024}},
  url    = {{https://huggingface.co/acme/acme-chat-8b}}
}}
```
"""

CONFIG = {
    "_name_or_path": "meta-llama/Llama-3.1-8B",
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "hidden_act": "silu",
    "hidden_size": 4096,
    "max_position_embeddings": 131072,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "rope_scaling": {"factor": 8.0, "rope_type": "llama3"},
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0",
    "vocab_size": 128256,
    "_commit_hash": GIT_SHA,
}

CHAT_TEMPLATE = (
    "{{- bos_token }}\n{%- if messages[0]['role'] == 'system' %}\n"
    "{%- set system_message = messages[0]['content']|trim %}\n"
    "{%- set loop_messages = messages[1:] %}\n{%- endif %}\n"
    "{%- for message in loop_messages %}\n"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim + '<|eot_id|>' }}\n{%- endfor %}"
)

TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "added_tokens_decoder": {
        "128000": {
            "content": "<|begin_of_text|>",
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        },
    },
    "bos_token": "<|begin_of_text|>",
    "chat_template": CHAT_TEMPLATE,
    "clean_up_tokenization_spaces": True,
    "eos_token": "<|eot_id|>",
    "pad_token": "<|finetune_right_pad_id|>",
    "model_input_names": ["input_ids", "attention_mask"],
    "model_max_length": 131072,
    "padding_side": "right",
    "tokenizer_class": "PreTrainedTokenizerFast",
    "token_type_ids": None,
    "max_token_length": 512,
}

GENERATION_CONFIG = {
    "bos_token_id": 128000,
    "do_sample": True,
    "eos_token_id": [128001, 128008, 128009],
    "pad_token_id": 128004,
    "temperature": 0.6,
    "top_p": 0.9,
    "transformers_version": "4.43.0.dev0",
}

SPECIAL_TOKENS_MAP = {
    "bos_token": {"content": "<|begin_of_text|>", "lstrip": False, "normalized": False,
                  "rstrip": False, "single_word": False},
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "[PAD]",
    "mask_token": "[MASK]",
    "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
}  # fmt: skip

ADAPTER_CONFIG = {
    "base_model_name_or_path": "meta-llama/Llama-3.1-8B",
    "peft_type": "LORA",
    "r": 16,
    "lora_alpha": 32,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "task_type": "CAUSAL_LM",
}


# --- every vendor rule, in every place a model carries text -----------------------------------


@dataclass(frozen=True)
class Leak:
    """One credential as it turns up in a model repository.

    `token` is the text that carries it (letter-case variants change it), `secret` what the
    finding redacts, `line` how a README code block or a metadata string holds it, and
    `json_key`/`json_value` how a config holds it (`line` under "notes" unless given).
    `locate` finds the line the finding is reported on. `cases` are the letter-case variants
    that keep the vendor's format, `prefix` the part `upper-prefix`/`lower-prefix` change."""

    id: str
    rule: str
    token: str
    secret: str
    line: str
    json_key: str = "notes"
    json_value: Any = None
    prefix: str = ""
    cases: tuple[str, ...] = ("upper-prefix", "lower", "upper")
    lang: str = "bash"
    locate: str = ""

    @property
    def value(self) -> Any:
        return self.line if self.json_value is None else self.json_value

    @property
    def locator(self) -> str:
        return self.locate or self.secret[:12]


def _token_leak(leak_id: str, rule: str, token: str, line: str, prefix: str, **kw: Any) -> Leak:
    return Leak(leak_id, rule, token, token, line.format(token), prefix=prefix, **kw)


def _slack_leak(kind: str) -> Leak:
    token = slack_token(kind)
    return _token_leak(f"slack-{kind}", "slack-token", token, "SLACK_TOKEN={}", token[:5])


def _pem_leak(leak_id: str, kind: str, headers: str = "") -> Leak:
    body = pem_body(rng=_RNG)
    block = pem(kind, body, headers)
    return Leak(
        leak_id, "private-key", block, (headers + body).strip(), block, json_key="signing_key",
        json_value=block, prefix="-----BEGIN", cases=("lower", "upper"), lang="text",
        locate="PRIVATE KEY",
    )  # fmt: skip


def _service_account() -> Leak:
    body = pem_body(rng=_RNG)
    key = pem("", body) + "\n"
    account = {
        "type": "service_account",
        "project_id": "acme-ml-prod",
        "private_key_id": _rand(HEX, 40),
        "private_key": key,
        "client_email": "trainer@acme-ml-prod.iam.gserviceaccount.com",
        "client_id": _rand(string.digits, 21),
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    return Leak(
        "gcp-service-account", "gcp-service-account", key, body, json.dumps(account, indent=2),
        json_key="gcs_credentials", json_value=account, cases=(), lang="json",
        locate='"private_key"',
    )  # fmt: skip


def _url_leak(leak_id: str, scheme: str, user: str, rest: str, **kw: Any) -> Leak:
    password = _rand(ALNUM, 18)
    url = f"{scheme}://{user}:{password}@{rest}"
    return Leak(
        leak_id, "database-url-password", url, password, f'export DATABASE_URL="{url}"',
        json_key="database_url", json_value=url, prefix=scheme, cases=("upper-prefix", "upper"),
        locate=password, **kw,
    )  # fmt: skip


def _assigned(leak_id: str, rule: str, name: str, secret: str, line: str, **kw: Any) -> Leak:
    token = f"{name}={secret}"
    kw.setdefault("json_key", name.lower())
    kw.setdefault("json_value", secret)
    return Leak(leak_id, rule, token, secret, line.format(token), prefix=name, **kw)


_WB = wandb_key()
_NETRC_KEY = wandb_key()
_AZ_KEY = azure_storage_key()
_AZ_SAS = azure_sas_key()
_AZ_CONN = (
    "DefaultEndpointsProtocol=https;AccountName=acmemodels;"
    f"AccountKey={_AZ_KEY};EndpointSuffix=core.windows.net"
)
_SB_CONN = (
    "Endpoint=sb://acme-events.servicebus.windows.net/;"
    f"SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey={_AZ_SAS}"
)
_NETRC = f"machine api.wandb.ai\n  login user\n  password {_NETRC_KEY}"

LEAKS: tuple[Leak, ...] = (
    # AWS
    _token_leak("aws-akia", "aws-access-key-id", aws_key_id("AKIA"),
                "export AWS_ACCESS_KEY_ID={}", "AKIA", json_key="aws_access_key_id",
                cases=("lower-prefix", "lower")),
    _token_leak("aws-asia", "aws-access-key-id", aws_key_id("ASIA"),
                "aws configure set aws_access_key_id {}", "ASIA", cases=("lower",)),
    _token_leak("aws-abia", "aws-access-key-id", aws_key_id("ABIA"), "bearer: {}", "ABIA",
                cases=("lower",)),
    _token_leak("aws-acca", "aws-access-key-id", aws_key_id("ACCA"), "credential {}", "ACCA",
                cases=("lower",)),
    _assigned("aws-secret", "aws-secret-access-key", "AWS_SECRET_ACCESS_KEY", aws_secret_key(),
              "export {}", cases=("lower-prefix",)),
    _token_leak("aws-bedrock", "aws-bedrock-api-key", bedrock_key(),
                "export AWS_BEARER_TOKEN_BEDROCK={}", "ABSK", cases=("lower-prefix", "lower")),
    # Hugging Face
    _token_leak("hf-token", "huggingface-token", hf_token(),
                "huggingface-cli login --token {}", "hf_"),
    _token_leak("hf-org-token", "huggingface-org-token", hf_org_token(),
                "HF_API_TOKEN={} python push_to_hub.py", "api_org_"),
    # OpenAI
    _token_leak("openai-legacy", "openai-api-key", openai_key("legacy"),
                "export OPENAI_API_KEY={}", "sk-"),
    _token_leak("openai-plain", "openai-api-key", openai_key("plain"),
                'openai.api_key = "{}"', "sk-"),
    _token_leak("openai-project", "openai-api-key", openai_key("proj"),
                'client = OpenAI(api_key="{}")', "sk-proj-"),
    _token_leak("openai-service-account", "openai-api-key", openai_key("svcacct"),
                "OPENAI_API_KEY={} vllm bench serve", "sk-svcacct-"),
    _token_leak("openai-admin", "openai-api-key", openai_key("admin"),
                'curl -H "Authorization: Bearer {}" https://api.openai.com/v1/organization/users',
                "sk-admin-"),
    # Anthropic
    _token_leak("anthropic-api", "anthropic-api-key", anthropic_key("api03"),
                "export ANTHROPIC_API_KEY={}", "sk-ant-api03-"),
    _token_leak("anthropic-admin", "anthropic-api-key", anthropic_key("admin01"),
                "x-api-key: {}", "sk-ant-admin01-"),
    # Google Cloud
    _service_account(),
    _token_leak("gcp-api-key", "google-api-key", gcp_api_key(),
                'curl "https://generativelanguage.googleapis.com/v1beta/models?key={}"',
                "AIza"),
    # Azure
    _token_leak("azure-ad", "azure-ad-client-secret", azure_client_secret(),
                "export AZURE_CLIENT_SECRET={}", "", cases=("lower", "upper")),
    Leak("azure-storage-connection", "azure-storage-key", _AZ_CONN, _AZ_KEY,
         f'export AZURE_STORAGE_CONNECTION_STRING="{_AZ_CONN}"',
         json_key="azure_storage_connection_string", json_value=_AZ_CONN,
         prefix="DefaultEndpointsProtocol=https;AccountName=acmemodels;AccountKey",
         cases=("upper-prefix", "lower-prefix")),
    Leak("azure-service-bus", "azure-storage-key", _SB_CONN, _AZ_SAS,
         f"EVENTS={_SB_CONN}", json_key="events_connection", json_value=_SB_CONN,
         prefix=_SB_CONN.split(";SharedAccessKey=")[0] + ";SharedAccessKey",
         cases=("upper-prefix", "lower-prefix")),
    _assigned("azure-storage-named", "azure-storage-key", "AZURE_STORAGE_KEY",
              azure_storage_key(), "export {}", cases=("lower-prefix",)),
    # GitHub
    *(
        _token_leak(f"github-{p[:-1]}", "github-token", github_token(p),
                    "git clone https://{}@github.com/acme/train.git", p)
        for p in ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_")
    ),
    # GitLab
    *(
        _token_leak(f"gitlab-{p.rstrip('-')}", "gitlab-token", gitlab_token(p),
                    "git clone https://oauth2:{}@gitlab.com/acme/model.git",
                    "glpat-" if p == "routable" else p)
        for p in ("glpat-", "routable", "gldt-", "glrt-", "glptt-", "gloas-", "glagent-",
                  "glsoat-")
    ),
    _token_leak("gitlab-runner-registration", "gitlab-token",
                "GR1348941" + _rand(BASE64URL, 20), "gitlab-runner register --token {}",
                "GR1348941", cases=("lower-prefix", "upper")),
    # Slack
    *(_slack_leak(kind) for kind in ("bot", "user", "app", "workspace")),
    Leak("slack-webhook", "slack-webhook-url", SLACK_WEBHOOK, SLACK_WEBHOOK_PATH,
         f"curl -X POST -d '{{}}' {SLACK_WEBHOOK}", json_key="notify_url",
         json_value=SLACK_WEBHOOK, prefix="https://hooks.slack.com/services/"),
    # Weights & Biases
    _assigned("wandb-env", "wandb-api-key", "WANDB_API_KEY", _WB, "export {}",
              cases=("lower-prefix", "upper")),
    Leak("wandb-login-call", "wandb-api-key", f'wandb.login(key="{_WB}")', _WB,
         f'import wandb; wandb.login(key="{_WB}")', prefix="wandb.login", lang="python",
         cases=("upper-prefix", "upper")),
    Leak("wandb-cli", "wandb-api-key", f"wandb login --relogin {_WB}", _WB,
         f"wandb login --relogin {_WB}", prefix="wandb login", cases=("upper-prefix", "upper")),
    Leak("wandb-netrc", "wandb-api-key", _NETRC, _NETRC_KEY, _NETRC, json_key="netrc",
         prefix="machine api.wandb.ai", cases=("upper-prefix", "upper"), lang="text"),
    _token_leak("wandb-v1", "wandb-api-key", wandb_v1_key(), "WANDB_API_KEY={}", "wandb_v1_"),
    # Stripe
    *(
        _token_leak(f"stripe-{p.strip('_')}", "stripe-api-key", stripe_key(p),
                    "STRIPE_SECRET_KEY={}", p)
        for p in ("sk_live_", "rk_live_", "sk_test_")
    ),
    # private keys
    _pem_leak("pem-rsa", "RSA"),
    _pem_leak("pem-pkcs8", ""),
    _pem_leak("pem-encrypted", "ENCRYPTED"),
    _pem_leak("pem-ec", "EC"),
    _pem_leak("pem-openssh", "OPENSSH"),
    _pem_leak("pem-pgp", "PGP", headers="Version: GnuPG v2\nComment: Release <r@acme.dev>\n\n"),
    # database URLs with passwords
    _url_leak("db-postgres", "postgres", "svc", "db.internal:5432/features"),
    _url_leak("db-postgresql-driver", "postgresql+psycopg2", "trainer", "10.0.0.5/runs"),
    _url_leak("db-mysql", "mysql", "root", "mysql.internal:3306/eval"),
    _url_leak("db-mongodb-srv", "mongodb+srv", "ml", "cluster0.ab1cd.mongodb.net/?w=majority"),
    _url_leak("db-redis", "redis", "", "cache.internal:6379/0"),
    _url_leak("db-amqp", "amqp", "worker", "rabbit.internal:5672/%2F"),
    Leak("url-credentials", "url-credentials", f"https://ci:{URL_PASSWORD}@pypi.acme.dev/simple",
         URL_PASSWORD, f"pip install --index-url https://ci:{URL_PASSWORD}@pypi.acme.dev/simple",
         json_key="index_url", json_value=f"https://ci:{URL_PASSWORD}@pypi.acme.dev/simple",
         prefix="https", cases=("upper-prefix", "upper"), locate=URL_PASSWORD),
)  # fmt: skip

LEAK_IDS = [leak.id for leak in LEAKS]
PLACES = ("README.md", "config.json", "generation_config.json", "tokenizer_config.json", "gguf")


def test_the_leaks_exercise_every_rule() -> None:
    assert {leak.rule for leak in LEAKS} == {rule.name for rule in PREFIX_RULES}
    assert len(set(LEAK_IDS)) == len(LEAKS)


def _expected(source: str, text: str, leak: Leak) -> list[dict[str, Any]]:
    line = text[: text.index(leak.locator)].count("\n") + 1
    return [{"source": source, "line": line, "rule": leak.rule, "redacted": redact(leak.secret)}]


def _readme_with(block: str) -> str:
    marker = "## Files"
    assert marker in MODEL_CARD
    return MODEL_CARD.replace(marker, f"{block}\n\n{marker}", 1)


def _write_model(tmp_path: Path, place: str, leak: Leak) -> str:
    """A model directory with `leak` in `place`; the text of that place. A README or a GGUF
    text gets a clean config.json beside it."""
    docs = {
        "config.json": CONFIG,
        "generation_config.json": GENERATION_CONFIG,
        "tokenizer_config.json": TOKENIZER_CONFIG,
    }
    if place == "README.md":
        readme = _readme_with(f"```{leak.lang}\n{leak.line}\n```")
        (tmp_path / "README.md").write_text(readme)
        (tmp_path / "config.json").write_text(json.dumps(CONFIG, indent=2))
        return readme
    if place not in docs:
        (tmp_path / "config.json").write_text(json.dumps(CONFIG, indent=2))
        return ""
    text = json.dumps({**docs[place], leak.json_key: leak.value}, indent=2)
    (tmp_path / place).write_text(text)
    return text


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("leak", LEAKS, ids=LEAK_IDS)
def test_a_leak_is_found_in_every_place(tmp_path: Path, place: str, leak: Leak) -> None:
    if place == "gguf":
        text = f"Converted with llama.cpp by CI.\n{leak.line}\n"
        assert scan_text(GGUF_SOURCE, text) == [
            SecretFinding(**f) for f in _expected(GGUF_SOURCE, text, leak)
        ]
        _write_model(tmp_path, "", leak)
        res = _check(tmp_path, [(GGUF_SOURCE, text)])
        expected = _expected(GGUF_SOURCE, text, leak)
    else:
        text = _write_model(tmp_path, place, leak)
        res = _check(tmp_path)
        expected = _expected(place, text, leak)
    assert res.status == Status.FAILED
    assert res.details["findings"] == expected
    assert leak.secret not in res.model_dump_json()


# --- letter case ------------------------------------------------------------------------------


def _vary(case: str, text: str, prefix: str) -> str:
    if case == "lower":
        return text.lower()
    if case == "upper":
        return text.upper()
    assert text.startswith(prefix), (text, prefix)
    head = prefix.upper() if case == "upper-prefix" else prefix.lower()
    return head + text[len(prefix) :]


CASE_VARIANTS = [
    pytest.param(leak, case, id=f"{leak.id}-{case}")
    for leak in LEAKS
    for case in leak.cases
    if _vary(case, leak.token, leak.prefix) != leak.token
]


@pytest.mark.parametrize(("leak", "case"), CASE_VARIANTS)
def test_a_vendor_format_is_found_whatever_its_letter_case(leak: Leak, case: str) -> None:
    token = _vary(case, leak.token, leak.prefix)
    assert token != leak.token
    at = leak.token.index(leak.secret)
    secret = token[at : at + len(leak.secret)]
    findings = scan_text(GGUF_SOURCE, leak.line.replace(leak.token, token))
    assert [(f.rule, f.redacted) for f in findings] == [(leak.rule, redact(secret))]


# Random tokens of each format in each case: the documented case is always found, other cases
# nearly always (a lower-cased key that happens to read like English words is let go).
RECALL_MAKERS: dict[str, tuple[Callable[[random.Random], str], str]] = {
    "aws": (lambda r: aws_key_id("AKIA", r), "AKIA"),
    "hf": (hf_token, "hf_"),
    "hf-org": (hf_org_token, "api_org_"),
    "openai-plain": (lambda r: openai_key("plain", r), "sk-"),
    "anthropic": (lambda r: anthropic_key("api03", r), "sk-ant-api03-"),
    "github": (lambda r: github_token("ghp_", r), "ghp_"),
    "gitlab": (lambda r: gitlab_token("glpat-", r), "glpat-"),
    "stripe": (lambda r: stripe_key("sk_live_", r), "sk_live_"),
    "google": (gcp_api_key, "AIza"),
    "azure-ad": (azure_client_secret, ""),
    "wandb-v1": (wandb_v1_key, "wandb_v1_"),
}


@pytest.mark.parametrize("fmt", RECALL_MAKERS)
def test_recall_over_random_tokens_in_every_case(fmt: str) -> None:
    make, prefix = RECALL_MAKERS[fmt]
    rng = random.Random(fmt)
    tokens = [make(rng) for _ in range(200)]
    for case, floor in [("as-is", 1.0), ("upper-prefix", 0.97), ("lower-prefix", 0.97),
                        ("lower", 0.97), ("upper", 0.97)]:  # fmt: skip
        varied = [t if case == "as-is" else _vary(case, t, prefix) for t in tokens]
        found = sum(len(scan_text("f", f'token: "{t}"', generic=False)) == 1 for t in varied)
        assert found / len(varied) >= floor, (case, found)


# --- placeholders and false-positive traps ----------------------------------------------------

_X = "x" * 40


@pytest.mark.parametrize(
    "text",
    [
        # documented placeholders, one or more per vendor
        "hf_" + "x" * 34,
        "hf_" + "X" * 34,
        "HF_" + "x" * 34,
        "hf_xxx...",
        "export HF_TOKEN=hf_xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
        "huggingface-cli login --token <YOUR_TOKEN>",
        "export HF_TOKEN=<YOUR_HF_TOKEN>",
        "HF_TOKEN=YOUR_HF_TOKEN",
        "hf_" + "abcdefghijklmnopqrstuvwxyzabcdefgh",
        "api_org_" + "x" * 34,
        "login with hf_YOUR_HUGGING_FACE_TOKEN_HERE_PLEASE",
        "import hf_transformersintegrationutilitiesmodule",
        'openai.api_key = "sk-..."',
        "OPENAI_API_KEY=sk-proj-...",
        "OPENAI_API_KEY=sk-" + "x" * 48,
        "OPENAI_API_KEY=sk-proj-" + "X" * 74 + "T3BlbkFJ" + "X" * 74,
        "OPENAI_API_KEY=sk-your-openai-key-here-0000000000000",
        "OPENAI_API_KEY=YOUR_API_KEY",
        'api_key="YOUR_API_KEY"',
        "ANTHROPIC_API_KEY=sk-ant-api03-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
        "ANTHROPIC_API_KEY=sk-ant-...",
        "AWS_ACCESS_KEY_ID=AKIA" + "X" * 16,
        "AKIA" + "A" * 16,
        "AKIA" + "Q" * 16,
        "akia" + "x" * 16,
        "AWS_ACCESS_KEY_ID=<your-access-key-id>",
        "aws_access_key_id = AKIAIOSFODNN7EXAMPLE",
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "aws_secret_access_key = " + "x" * 40,
        "GITHUB_TOKEN=ghp_" + "x" * 36,
        "GITHUB_TOKEN=ghp_" + "0" * 36,
        "GITHUB_TOKEN=ghp_" + "ab" * 18,
        "GITHUB_TOKEN=ghp_xxx...",
        "github_pat_" + "X" * 82,
        "GITLAB_TOKEN=glpat-xxxxxxxxxxxxxxxxxxxx",
        "GITLAB_TOKEN=glpat-XXXXXXXXXXXXXXXXXXXX",
        "GITLAB_TOKEN=<your-gitlab-token>",
        "xoxb-your-bot-token-here",
        "SLACK_BOT_TOKEN=xoxb-0000000000-0000000000000-" + "x" * 24,
        "https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX",
        "https://hooks.slack.com/services/<your-webhook-path>",
        "STRIPE_SECRET_KEY=sk_live_" + "x" * 24,
        "STRIPE_SECRET_KEY=sk_test_1234567890abcdefghijklmn",
        "STRIPE_SECRET_KEY=sk_test_...",
        "key=AIza" + "X" * 35,
        "GOOGLE_API_KEY=AIzaSy...",
        "AZURE_CLIENT_SECRET=bP88Q~" + "x" * 34,
        "AZURE_CLIENT_SECRET=<client-secret>",
        "DefaultEndpointsProtocol=https;AccountName=<account>;AccountKey=<key>",
        "AccountKey=" + "A" * 86 + "==",
        "AccountKey=${AZURE_STORAGE_KEY}",
        "WANDB_API_KEY=" + "0" * 40,
        "WANDB_API_KEY=<your-wandb-api-key>",
        "WANDB_API_KEY=$WANDB_API_KEY",
        "wandb login $WANDB_API_KEY",
        "wandb.login(key=os.environ['WANDB_API_KEY'])",
        "machine api.wandb.ai login user password " + _X,
        "-----BEGIN RSA PRIVATE KEY-----\n...\n-----END RSA PRIVATE KEY-----",
        "-----BEGIN PRIVATE KEY-----\n<your key here>\n-----END PRIVATE KEY-----",
        "-----BEGIN PRIVATE KEY-----\n" + "X" * 64 + "\n-----END PRIVATE KEY-----",
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA...\n-----END OPENSSH",
        "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIB...\n",
        "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIB…\n",
        "`-----BEGIN EC PRIVATE KEY-----` starts the key file; paste yours below it.",
        '{"type": "service_account", "private_key": "-----BEGIN PRIVATE KEY-----\\n...\\n"}',
        "postgresql://user:password@localhost:5432/db",
        "postgresql://scott:tiger@localhost/test",
        "postgresql://<user>:<password>@<host>:5432/<db>",
        "mysql://root:${MYSQL_ROOT_PASSWORD}@db:3306/app",
        "mongodb+srv://<username>:<password>@cluster0.mongodb.net/",
        "redis://:{{ redis_password }}@cache:6379/0",
        "amqp://guest:guest@localhost:5672/",
        "DATABASE_URL=postgres://postgres:postgres@localhost:5432/postgres",
        # env references and shell expansions
        "export HF_TOKEN=${HF_TOKEN}",
        "HF_TOKEN=$HF_TOKEN_FROM_THE_ENVIRONMENT",
        'api_key: "{{ secrets.OPENAI_API_KEY }}"',
        'token=os.environ["HF_TOKEN"]',
        'api_key = os.getenv("OPENAI_API_KEY")',
        'key = os.environ.get("ANTHROPIC_API_KEY")',
        "OPENAI_API_KEY=<your-key>",
        "OPENAI_API_KEY=<your-openai-api-key-goes-here>",
        'api_key = "your_api_key_here"',
        'token = "xxxxxxxxxxxxxxxxxxxxxxxx"',
        'password: "****************"',
        'password = "changeme-Zx81Kq0pLmN3"',
        'api_key="example-9f8Kq2LmZx0Pw7Rt"',
        'secret = "dummy-secret-Zx81Kq0pLm"',
        'api_key = "test_9f8Kq2LmZx0Pw7Rt"',
        'token = "fake_Zx81Kq0pLmN3vB5c"',
        'secret = "aaaaaaaaaaaaaaaaaaaa"',
        'password = "correcthorsebatterystaple"',
        # vendor prefixes in ordinary words and names, in every case
        "an sk-learn-compatible-estimator-wrapper-for-text-classification",
        "SK-LEARN-COMPATIBLE-ESTIMATOR-WRAPPER-FOR-TEXT-CLASSIFICATION",
        "AsiaPacificNortheast",
        "asiapacificnortheast",
        "ASIAPACIFICNORTHEAST",
        "HF_TransformersIntegrationUtilsModule",
        "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",
        "HF_HUB_ENABLE_HF_TRANSFER=1 HF_HUB_DISABLE_TELEMETRY=1",
        "aizawa_shota_character_from_my_hero_academia",
        "ghs_" + "multilingualsentenceembeddingsmodels",
        "GLPAT-LEARNINGRATESCHEDULERS",
        "task-specific risk-aware desk-top sk-instruct",
        "the ~/.cache/huggingface/hub q~ Q~ directory",
        "https://hooks.slack.com/services/",
        # digests, hashes, revisions
        f"sha256: {SHA256}",
        f"| model.safetensors | sha256 | {SHA256} |",
        f"checksum = {SHA256}",
        f"digest: sha256:{SHA256}",
        f'"token_sha256": "{SHA256}"',
        f"revision: {GIT_SHA}",
        f'"_commit_hash": "{GIT_SHA}"',
        f"wandb_run_id: {GIT_SHA}",
        f"wandb-core commit sha: {GIT_SHA}",
        f"wandb version 0.17.0 ({GIT_SHA})",
        # URLs without credentials (and local defaults with them)
        '"auth": "https://auth.internal.corp/oauth2/v2.0/authorize"',
        "token_url: https://huggingface.co/settings/tokens",
        "secret = https://vault.internal.corp/v1/secret/data/models/llama",
        "postgres://postgres:postgres@localhost:5432/db",
        "https://user:password@host.example.org/",
        "https://${USER}:${PASSWORD}@registry.internal/",
        "ssh://git@github.com/org/repo.git",
        "redis://localhost:6379/0",
        "mongodb://mongo1:27017,mongo2:27017/?replicaSet=rs0",
        # tokenizer and generation configs
        '"tokenizer_class": "LlamaTokenizerFast"',
        '"tokenizer_class": "PreTrainedTokenizerFast"',
        '"eos_token": "</s>"',
        '"pad_token": "<|endoftext|>"',
        '"model_input_names": ["input_ids", "token_type_ids", "attention_mask"]',
        '"max_token_length": 512',
        '"use_auth_token": true',
        "tokenizer.pad_token = tokenizer.eos_token",
        "model.generate(**inputs, max_new_tokens=256, pad_token_id=tokenizer.eos_token_id)",
        # names and references, not values
        "password: process.env.MODEL_REGISTRY_PASSWORD",
        "password_env: MODEL_REGISTRY_PASSWORD",
        '"secret_name": "prod-registry-credentials-v2"',
        "auth_backend = huggingface_hub.utils.get_token",
        "Authorization: Bearer $TOKEN",
        "author = {Touvron, Hugo and Lavril, Thibaut and Izacard, Gautier}",
        "password: /run/secrets/registry_password_file",
        "secret: /etc/ml/keys/registry-v2.pem",
        "token: ~/.cache/huggingface/stored_tokens",
        "token: 2024-01-15T10:22:31.000Z",
    ],
)  # fmt: skip
def test_placeholders_and_traps_are_not_flagged(text: str) -> None:
    assert scan_text("f", text) == []
    assert scan_text("f", json.dumps({"notes": text})) == []


def test_published_example_keys_are_not_findings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys a vendor publishes in its docs (the Azure storage emulator's account key, Stripe's
    documentation test key, the Firebase SDK's sample keys gitleaks allowlists) are known by
    digest; here a made-up one stands in for them."""
    published = azure_storage_key()
    text = f"AccountName=devstoreaccount1;AccountKey={published}"
    assert _rules(text) == ["azure-storage-key"]
    digest = hashlib.sha256(published.encode()).hexdigest()
    monkeypatch.setattr(secrets, "PUBLISHED_EXAMPLE_SHA256", frozenset({digest}))
    assert _rules(text) == []


def test_the_generic_rule_needs_a_credential_key() -> None:
    assert _rules(f"value = {GENERIC_PASSWORD}") == []
    assert _rules(f"password = {GENERIC_PASSWORD}") == ["generic-high-entropy"]


@pytest.mark.parametrize(
    ("body", "random_"),
    [
        ("transformersintegrationutilsmodul", False),
        ("TRANSFORMERSINTEGRATIONUTILSMODUL", False),
        ("TransformersIntegrationUtilsModul", False),
        ("pacificnortheast", False),
        (_rand(string.ascii_lowercase, 34), True),
        (_rand(string.ascii_uppercase, 34), True),
        (_rand(LOWER_DIGITS, 16), True),
        (_rand(ALNUM, 34), True),
    ],
)
def test_reads_random(body: str, random_: bool) -> None:
    assert reads_random(body) is random_


@pytest.mark.parametrize(
    ("key", "sensitive"),
    [
        ("api_key", True), ("apiKey", True), ("APIKey", True), ("OPENAI_API_KEY", True),
        ("x-api-key", True), ("HF_TOKEN", True), ("auth_token", True), ("access_key", True),
        ("SecretAccessKey", True), ("client_secret", True), ("passwd", True), ("auth", True),
        ("Authorization", True), ("private_key", True),
        ("author", False), ("tokenizer_class", False), ("pad_token", False),
        ("eos_token", False), ("token_type_ids", False), ("max_token_length", False),
        ("model_max_length", False), ("secret_name", False), ("token_sha256", False),
        ("hub_token_path", False), ("keys", False), ("monkey", False),
    ],
)  # fmt: skip
def test_key_names(key: str, sensitive: bool) -> None:
    assert key_is_sensitive(key) is sensitive


def test_redaction_keeps_four_characters_and_the_length() -> None:
    assert redact("hf_" + "A" * 34) == "hf_A…(37 chars)"
    assert redact("p4ssw0rd") == "p4…(8 chars)"
    assert redact("abc") == "…(3 chars)"


def test_entropy() -> None:
    assert shannon_entropy("") == 0.0
    assert shannon_entropy("aaaa") == 0.0
    assert shannon_entropy("abcd") == pytest.approx(2.0)


# --- a benign corpus passes clean -------------------------------------------------------------

# A quantised-model card: llama.cpp commands, quant tables, many URLs and hashes.
GGUF_CARD = f"""---
base_model: acme/acme-chat-8b
quantized_by: acme-ci
tags: [gguf, llama.cpp, quantized]
---

# acme-chat-8b-GGUF

| file | quant | size | use case |
|---|---|---|---|
| acme-chat-8b.Q4_K_M.gguf | Q4_K_M | 4.92 GB | medium, balanced quality - recommended |
| acme-chat-8b.Q5_K_S.gguf | Q5_K_S | 5.60 GB | large, low quality loss |
| acme-chat-8b.IQ3_XXS.gguf | IQ3_XXS | 3.27 GB | small, i-quant |

```shell
huggingface-cli download acme/acme-chat-8b-GGUF acme-chat-8b.Q4_K_M.gguf --local-dir .
HF_HUB_ENABLE_HF_TRANSFER=1 huggingface-cli download acme/acme-chat-8b-GGUF --include "*Q5*"
./llama-cli -m acme-chat-8b.Q4_K_M.gguf -p "You are a helpful assistant" -cnv -ngl 99
./llama-server -m acme-chat-8b.Q4_K_M.gguf --port 8080 -c 8192 --api-key "$LLAMA_API_KEY"
ollama run hf.co/acme/acme-chat-8b-GGUF:Q4_K_M
```

```python
from llama_cpp import Llama
llm = Llama.from_pretrained(repo_id="acme/acme-chat-8b-GGUF", filename="*Q4_K_M.gguf")
print(llm.create_chat_completion(messages=[{{"role": "user", "content": "Hi"}}]))
```

imatrix computed on calibration_datav3.txt; sha256 of the Q4_K_M file: {_rand(HEX, 64)}.
Quantised with llama.cpp b3600 (commit {_rand(HEX, 40)}).
"""

# A training card: W&B, Azure, AWS and database wiring shown with placeholders only.
TRAINING_CARD = """---
license: apache-2.0
datasets: [acme/asia-pacific-news, acme/instructions-v2]
language: [en, ja, ko, zh, tr]
---

# acme-asia-7b

Trained for the Asia-Pacific (AsiaPacificNortheast) market; İstanbul and Zürich evaluation
sets included. A task-specific, risk-aware fine-tune; sk-learn style metrics are reported.

## Training

Logs: https://wandb.ai/acme/asia-7b/runs/3kq9x2ab (report_to: wandb, wandb_project: asia-7b,
wandb_watch: gradients, wandb_log_model: checkpoint).

```bash
export WANDB_API_KEY=<your-wandb-api-key>
export WANDB_PROJECT=asia-7b WANDB_ENTITY=acme
wandb login
export HF_TOKEN=hf_xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx
export AWS_ACCESS_KEY_ID=<your-access-key-id> AWS_SECRET_ACCESS_KEY=<your-secret-access-key>
export AZURE_STORAGE_CONNECTION_STRING="AccountName=<account>;AccountKey=<key>"
export DATABASE_URL=postgresql://user:password@localhost:5432/features
export REDIS_URL=redis://localhost:6379/0
export OPENAI_API_KEY=sk-...  # only for the GPT-4 judge
export ANTHROPIC_API_KEY=sk-ant-...
accelerate launch --config_file fsdp.yaml train.py --learning_rate 2e-5 --warmup_ratio 0.03 \\
    --per_device_train_batch_size 4 --gradient_accumulation_steps 8 --bf16 --report_to wandb
```

```python
import os, wandb
wandb.login(key=os.environ["WANDB_API_KEY"])
run = wandb.init(project="asia-7b", config={"lr": 2e-5, "epochs": 3})
s3 = boto3.client("s3", aws_access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
                  aws_secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"])
```

```yaml
hub_model_id: acme/asia-7b
hub_token: null
push_to_hub: true
output_dir: /mnt/checkpoints/asia-7b
run_name: asia-7b-lr2e-5-ep3
deepspeed: ds_zero3.json
```

| step | loss | eval_loss |
|---|---|---|
| 1000 | 1.412 | 1.388 |
| 2000 | 1.201 | 1.197 |

~~~
GITHUB_TOKEN=ghp_xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx  # CI pushes the model card
SLACK_WEBHOOK_URL=https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX
STRIPE_SECRET_KEY=sk_test_...
~~~
"""

TRAINING_ARGS = {
    "output_dir": "/mnt/checkpoints/asia-7b",
    "learning_rate": 2e-5,
    "lr_scheduler_type": "cosine",
    "report_to": ["wandb", "tensorboard"],
    "run_name": "asia-7b-lr2e-5-ep3",
    "hub_model_id": "acme/asia-7b",
    "hub_token": None,
    "hub_strategy": "every_save",
    "push_to_hub": True,
    "deepspeed": "ds_zero3.json",
    "optim": "adamw_torch_fused",
    "seed": 42,
    "wandb_run_id": "3kq9x2ab",
    "_commit_hash": _rand(HEX, 40),
}

QUANTIZATION_CONFIG = {
    "quant_method": "awq",
    "bits": 4,
    "group_size": 128,
    "zero_point": True,
    "version": "gemm",
    "modules_to_not_convert": ["lm_head"],
}


def _vocabulary_tokens(n_random: int) -> list[str]:
    """A BPE vocabulary's shapes: GPT-2 `Ġ` words, sentencepiece `▁` pieces, WordPiece `##`
    pieces, byte tokens, numbers, code, identifiers and random-looking merges, built from real
    English and Python text (the standard library's own source) and from the cards above."""
    import argparse
    import email.message
    import http.client
    import textwrap
    import urllib.parse

    corpus = "\n".join(
        [MODEL_CARD, GGUF_CARD, TRAINING_CARD]
        + [inspect.getsource(m) for m in (argparse, email.message, http.client, textwrap,
                                          urllib.parse)]
    )  # fmt: skip
    words = sorted(set(re.findall(r"[A-Za-z0-9_]+|[^\sA-Za-z0-9_]{1,3}", corpus)))
    tokens = [f"<0x{b:02X}>" for b in range(256)] + [str(i) for i in range(1000)]
    for w in words:
        tokens += [w, "Ġ" + w, "▁" + w, "##" + w.lower(), w.upper(), w.capitalize()]
    for a, b in pairwise(words):  # merges that cross word boundaries
        tokens.append(f"Ġ{a}{b}"[:24])
    tokens += [_rand(ALNUM, _RNG.randint(4, 16)) for _ in range(n_random)]
    tokens += ["hf", "_hf", "hf_", "HF_", "sk", "sk-", "-ant", "ghp", "xox", "AKIA", "ASIA",
               "Asia", "asia", "aiza", "glpat", "wandb", "Q~", "q~", "-----", "BEGIN", "://",
               "@", "Ġhf_hub", "ĠAsiaPacific", "Ġasiatic", "Ġtask-", "sk_live", "xoxb",
               "ghs_", "github_pat", "api_org", "ABSK", "AccountKey", "postgres://"]  # fmt: skip
    return tokens


def _tokenizer_json(n_random: int = 3000) -> dict[str, Any]:
    vocab = {t: i for i, t in enumerate(dict.fromkeys(_vocabulary_tokens(n_random)))}
    vocab[f"password={GENERIC_PASSWORD}"] = len(vocab)  # generic-shaped: vocabulary, not a key
    merges = [f"{a} {b}" for a, b in zip(list(vocab)[:5000], list(vocab)[1:5001], strict=True)]
    return {
        "version": "1.0",
        "added_tokens": [{"id": 0, "content": "<|begin_of_text|>", "special": True}],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Split",
            "pattern": {
                "Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"
            },
        },
        "model": {"type": "BPE", "vocab": vocab, "merges": merges},
    }


BENIGN_GGUF_METADATA = [
    ("general.name", "acme-chat-8b"),
    ("general.description", "A chat fine-tune of Llama 3.1 8B"),
    ("general.url", "https://huggingface.co/acme/acme-chat-8b"),
    ("general.source.url", "https://huggingface.co/meta-llama/Llama-3.1-8B"),
    ("general.license", "llama3.1"),
    ("general.quantized_by", "acme-ci"),
    ("general.tags", "text-generation"),
    ("general.languages", "en"),
    ("tokenizer.chat_template", CHAT_TEMPLATE),
    ("quantize.imatrix.file", "/models/acme-chat-8b/imatrix.dat"),
    ("quantize.imatrix.dataset", "calibration_datav3.txt"),
]


def _benign_dir(tmp_path: Path) -> Path:
    (tmp_path / "README.md").write_text(MODEL_CARD)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "GGUF.md").write_text(GGUF_CARD)
    (tmp_path / "docs" / "TRAINING.md").write_text(TRAINING_CARD)
    for name, doc in [
        ("config.json", {**CONFIG, "quantization_config": QUANTIZATION_CONFIG}),
        ("tokenizer_config.json", TOKENIZER_CONFIG),
        ("generation_config.json", GENERATION_CONFIG),
        ("special_tokens_map.json", SPECIAL_TOKENS_MAP),
        ("adapter_config.json", ADAPTER_CONFIG),
        ("training_args.json", TRAINING_ARGS),
        ("tokenizer.json", _tokenizer_json()),
    ]:
        (tmp_path / name).write_text(json.dumps(doc, indent=2, ensure_ascii=False))
    return tmp_path


def test_a_benign_corpus_has_no_findings(tmp_path: Path) -> None:
    extra = [(f"model.gguf (GGUF metadata {k})", v) for k, v in BENIGN_GGUF_METADATA]
    res = _check(_benign_dir(tmp_path), extra)
    assert res.details["findings"] == [], res.reason
    assert res.status == Status.PASSED
    assert len(res.details["scanned"]) == 10 + len(extra)


def test_the_benign_vocabulary_holds_what_a_vocabulary_holds() -> None:
    vocab = _tokenizer_json()["model"]["vocab"]
    assert len(vocab) > 20_000
    assert {"Ġhf_hub", "ĠAsiaPacific", "sk-", "<0x0A>", "▁the", "Ġreturn"} <= set(vocab)


def _model_dir(tmp_path: Path) -> Path:
    (tmp_path / "README.md").write_text(MODEL_CARD)
    for name, doc in [
        ("config.json", CONFIG),
        ("tokenizer_config.json", TOKENIZER_CONFIG),
        ("generation_config.json", GENERATION_CONFIG),
        ("special_tokens_map.json", SPECIAL_TOKENS_MAP),
        ("adapter_config.json", ADAPTER_CONFIG),
        ("tokenizer.json", _vocabulary(2000)),
    ]:
        (tmp_path / name).write_text(json.dumps(doc, indent=2))
    # sentencepiece models are named like text but are protobuf: skipped, not decoded.
    (tmp_path / "tokenizer.model").write_bytes(b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02")
    return tmp_path


def _vocabulary(n: int) -> dict[str, Any]:
    """A tokenizer.json whose vocabulary is random-looking, plus assignment-shaped entries."""
    vocab = {_rand(ALNUM, 12): i for i in range(n)}
    vocab[f"password={GENERIC_PASSWORD}"] = n  # a generic-shaped entry is vocabulary, not a key
    return {"version": "1.0", "model": {"type": "BPE", "vocab": vocab, "merges": ["a b"]}}


def _check(path: Path, extra: list[tuple[str, str]] | None = None) -> CheckResult:
    return check_secrets(build_inventory(str(path)), CheckContext(), extra or [])


def test_realistic_model_directory_passes_clean(tmp_path: Path) -> None:
    extra = [
        ("model.gguf (GGUF metadata general.description)", "A chat fine-tune of Llama 3.1 8B"),
        ("model.gguf (GGUF metadata tokenizer.chat_template)", CHAT_TEMPLATE),
        ("model.safetensors (__metadata__ format)", "pt"),
    ]
    res = _check(_model_dir(tmp_path), extra)
    assert res.status == Status.PASSED, res.reason
    assert res.name == "secrets"
    assert res.reason.startswith("no secrets in 7 files / 3 texts")
    assert res.details["findings"] == []
    assert set(res.details["scanned"]) >= {"README.md", "config.json", "tokenizer.json"}
    assert res.details["skipped"] == ["tokenizer.model: binary content"]


@pytest.mark.parametrize(
    "block",
    [
        "```bash\nexport HF_TOKEN={}\n```",
        "```python\nlogin(token='{}')\n```",
        "```\n{}\n```",
        "~~~sh\nHF_TOKEN={} python app.py\n~~~",
        "    huggingface-cli login --token {}",
        "Log in with `{}` first.",
        "<pre><code>HF_TOKEN={}</code></pre>",
    ],
    ids=["bash", "python", "bare", "tilde", "indented", "inline", "html"],
)
def test_readme_code_blocks_are_scanned(tmp_path: Path, block: str) -> None:
    readme = _readme_with(block.format(HF_TOKEN))
    (tmp_path / "README.md").write_text(readme)
    res = _check(tmp_path)
    line = readme[: readme.index(HF_TOKEN)].count("\n") + 1
    assert res.details["findings"] == [
        {"source": "README.md", "line": line, "rule": "huggingface-token",
         "redacted": redact(HF_TOKEN)}
    ]  # fmt: skip


def test_secret_on_readme_line_n_is_reported_at_line_n(tmp_path: Path) -> None:
    lines = MODEL_CARD.splitlines()
    lines.insert(11, f"Use token {HF_TOKEN} to download.")
    (_model_dir(tmp_path) / "README.md").write_text("\n".join(lines))
    res = _check(tmp_path)
    assert res.status == Status.FAILED
    assert res.details["findings"] == [
        {"source": "README.md", "line": 12, "rule": "huggingface-token",
         "redacted": f"{HF_TOKEN[:4]}…(37 chars)"}
    ]  # fmt: skip
    assert f"README.md:12 huggingface-token {HF_TOKEN[:4]}…(37 chars)" in res.reason


def test_secret_in_config_json(tmp_path: Path) -> None:
    config = {**CONFIG, "hub_api_key": GENERIC_PASSWORD}
    (_model_dir(tmp_path) / "config.json").write_text(json.dumps(config, indent=2))
    res = _check(tmp_path)
    assert res.status == Status.FAILED
    [finding] = res.details["findings"]
    assert finding["source"] == "config.json"
    assert finding["rule"] == "generic-high-entropy"
    lines = json.dumps(config, indent=2).splitlines()
    assert lines[finding["line"] - 1] == f'  "hub_api_key": "{GENERIC_PASSWORD}"'


def test_secret_in_gguf_metadata_text(tmp_path: Path) -> None:
    source = "model.gguf (GGUF metadata general.description)"
    res = _check(_model_dir(tmp_path), [(source, f"Built by CI.\nSLACK={SLACK_BOT}")])
    assert res.status == Status.FAILED
    assert res.details["findings"] == [
        {"source": source, "line": 2, "rule": "slack-token",
         "redacted": f"xoxb…({len(SLACK_BOT)} chars)"}
    ]  # fmt: skip


def test_secret_in_safetensors_metadata_text(tmp_path: Path) -> None:
    source = "model.safetensors (__metadata__ training_args)"
    metadata = json.dumps({"output_dir": "/tmp/out", "hub_token": HF_TOKEN, "push": True})
    res = _check(_model_dir(tmp_path), [(source, metadata)])
    assert [(f["source"], f["rule"]) for f in res.details["findings"]] == [
        (source, "huggingface-token")
    ]


def test_tokenizer_json_gets_only_the_prefix_rules(tmp_path: Path) -> None:
    vocab = _vocabulary(10)
    vocab["model"]["vocab"][GITHUB_CLASSIC] = 99
    (_model_dir(tmp_path) / "tokenizer.json").write_text(json.dumps(vocab))
    res = _check(tmp_path)
    assert [(f["source"], f["rule"]) for f in res.details["findings"]] == [
        ("tokenizer.json", "github-token")
    ]


def test_oversized_text_is_skipped_and_said_so(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text(f"password = {GENERIC_PASSWORD}\n" + "a" * (4 << 20))
    res = _check(tmp_path)
    assert res.status == Status.PASSED
    assert "1 skipped" in res.reason
    assert res.details["skipped"][0].startswith("notes.txt: ")


def test_no_secret_value_ever_leaves_the_check(tmp_path: Path) -> None:
    """Every secret, in files and extra texts: the serialised result holds none of them."""
    body = "\n".join(
        [
            f"aws_access_key_id = {AWS_ID}",
            f"sts = {AWS_STS_ID}",
            f"aws_secret_access_key = {AWS_SECRET}",
            f"HF_TOKEN={HF_TOKEN}",
            f"OPENAI_API_KEY={OPENAI_LEGACY}",
            f"OPENAI_PROJECT_KEY={OPENAI_PROJECT}",
            f"ANTHROPIC_API_KEY={ANTHROPIC}",
            f"slack: {SLACK_BOT} {SLACK_WEBHOOK}",
            f"{GITHUB_CLASSIC} {GITHUB_APP} {GITHUB_FINE}",
            f"maps: {GOOGLE}",
            PEM,
            f"db: postgresql://svc:{URL_PASSWORD}@db.internal:5432/m",
            f'password = "{GENERIC_PASSWORD}"',
            f"client_secret: {GENERIC_HEX}",
            f"Authorization: Bearer {JWT}",
            *(leak.line for leak in LEAKS),
        ]
    )
    (_model_dir(tmp_path) / "README.md").write_text(body)
    res = _check(tmp_path, [("model.gguf (GGUF metadata general.notes)", body)])
    assert res.status == Status.FAILED
    assert len(res.details["findings"]) == 2 * (18 + len(LEAKS))
    dumped = res.model_dump_json()
    for secret in ALL_SECRETS + [leak.secret for leak in LEAKS]:
        assert secret not in dumped
        assert secret[:8] not in dumped
    for finding in res.details["findings"]:
        assert len(finding["redacted"].split("…")[0]) <= 4
    assert f"(+{2 * (18 + len(LEAKS)) - 5} more)" in res.reason


def test_findings_are_the_public_dataclass() -> None:
    assert scan_text("README.md", f"x\n{AWS_ID}") == [
        SecretFinding("README.md", 2, "aws-access-key-id", "AKIA…(20 chars)")
    ]


# --- performance ------------------------------------------------------------------------------


def test_a_model_card_and_configs_scan_in_milliseconds() -> None:
    texts = [MODEL_CARD * 32, json.dumps(TOKENIZER_CONFIG, indent=2) * 4] + [
        json.dumps(doc, indent=2) for doc in (CONFIG, GENERATION_CONFIG, SPECIAL_TOKENS_MAP)
    ]
    assert 90_000 < sum(map(len, texts)) < 130_000
    best = min(_time_scan(texts) for _ in range(5))
    assert best < 0.03, f"{best * 1000:.1f} ms for ~100 KB"


def test_a_long_blob_without_spaces_scans_in_linear_time() -> None:
    blob = "data:image/png;base64," + _rand(BASE64, 1 << 20)
    started = time.perf_counter()
    scan_text("README.md", f"![logo]({blob})\npassword= {blob[:4000]}")
    assert time.perf_counter() - started < 0.5


def test_a_vocabulary_full_of_anchors_scans_in_linear_time() -> None:
    """Every anchor, thousands of times, none a key: a big vocabulary stays fast."""
    anchors = sorted({a.lstrip(".") for rule in PREFIX_RULES for a in rule.anchors})
    text = json.dumps({f"{a}{i}": i for i in range(1000) for a in anchors})
    assert len(text) > 300_000
    started = time.perf_counter()
    assert scan_text("tokenizer.json", text, generic=False) == []
    assert time.perf_counter() - started < 0.5


def _time_scan(texts: list[str]) -> float:
    started = time.perf_counter()
    for text in texts:
        assert scan_text("f", text) == []
    return time.perf_counter() - started


# Texts an attacker writes to make the scan slow: runs of each rule's anchor with characters its
# pattern accepts, and cards that are nothing but keys. Each used to cost time quadratic in the
# length (a 160 KB card of `AccountKey` took 52 s; 16,000 keys in a card 5 s).
HOSTILE_UNITS: dict[str, Callable[[random.Random], str]] = {
    "name runs ending in key": lambda rng: "AccountKey",
    "aws secret key names": lambda rng: "aws_secret_access_key",
    "storage key names": lambda rng: "storage_account_key",
    "database urls": lambda rng: "postgres://a:",
    "url users": lambda rng: "://" + "a" * 60,
    "pem headers": lambda rng: "-----BEGIN PRIVATE KEY-----\n",
    "assignments": lambda rng: "token=",
    "keys": lambda rng: hf_token(rng) + "\n",
    "names shaped like keys": lambda rng: "HF_" + "TransformersIntegrationUtilsModules"[:34] + "\n",
    "assigned keys": lambda rng: f"api_key = {_rand(ALNUM, 24, rng)}\n",
    "url passwords": lambda rng: f"https://u:{_rand(ALNUM, 12, rng)}@h/\n",
}


@pytest.mark.parametrize("unit", sorted(HOSTILE_UNITS))
def test_hostile_cards_scan_in_linear_time(unit: str) -> None:
    """Four times the text costs about four times as long (quadratic would be sixteen); a ratio
    measured side by side, so a slow machine does not fail it."""
    make = HOSTILE_UNITS[unit]

    def text(n: int) -> str:
        rng = random.Random(n)
        return "".join(make(rng) for _ in range(n))

    small, large = text(4000), text(16000)

    times: dict[int, list[float]] = {len(small): [], len(large): []}
    for _ in range(5):  # interleaved, so a burst of load hits both sizes alike
        for t in (small, large):
            started = time.perf_counter()
            scan_text("README.md", t, limit=10**6)
            times[len(t)].append(time.perf_counter() - started)

    def best(t: str) -> float:
        return min(times[len(t)])

    ratio = best(large) / max(best(small), 1e-3)
    assert ratio < 9, f"{unit}: {ratio:.1f}x the time for 4x the text"


def test_counting_stops_at_a_thousand_findings(tmp_path: Path) -> None:
    keys = [hf_token(random.Random(i)) for i in range(3000)]
    (_model_dir(tmp_path) / "README.md").write_text("\n".join(keys))
    (tmp_path / "notes.txt").write_text(f"HF_TOKEN={HF_TOKEN}\n")
    res = _check(tmp_path)
    assert res.status == Status.FAILED
    assert res.value == secrets.MAX_FINDINGS
    assert res.reason.startswith(f"at least {secrets.MAX_FINDINGS} secrets (stopped counting")
    assert "not scanned" in res.details["stopped"]


def test_a_validation_reads_a_bounded_amount_of_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(secrets, "MAX_TOTAL_TEXT_BYTES", 10_000)
    for i in range(4):
        (tmp_path / f"notes{i}.txt").write_text("plain words\n" * 400)  # 4,800 bytes each
    res = _check(tmp_path)
    assert res.status == Status.PASSED
    assert sorted(res.details["scanned"]) == ["notes0.txt", "notes1.txt"]
    assert [s.split(":")[0] for s in res.details["skipped"]] == ["notes2.txt", "notes3.txt"]
    assert "over the 10000 bytes read in all" in res.details["skipped"][0]


def test_a_long_text_scanned_in_windows_finds_what_one_pass_finds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Keys on every side of every window edge, found once each, on their own lines."""
    rng = random.Random(3)
    lines = []
    for i in range(400):
        lines.append(
            " ".join(_rand(string.ascii_lowercase, rng.randint(2, 9), rng) for _ in range(6))
        )
        if i % 3 == 0:
            lines.append(f"token: {hf_token(rng)} and {aws_key_id(rng=rng)}")
    text = "\n".join(lines)
    whole = scan_text("README.md", text, limit=10**6)
    assert len(whole) > 200
    monkeypatch.setattr(secrets, "SCAN_CHUNK_CHARS", 997)
    monkeypatch.setattr(secrets, "CHUNK_CONTEXT_CHARS", 200)
    assert scan_text("README.md", text, limit=10**6) == whole
    # Hits in a window's context count toward no window's limit: all of them, and no more.
    assert scan_text("README.md", text, limit=len(whole)) == whole
    assert scan_text("README.md", text, limit=len(whole) - 1) == whole[:-1]


def test_gguf_string_arrays_are_scanned_as_one_text_each(tmp_path: Path) -> None:
    (_model_dir(tmp_path) / "README.md").write_text("clean\n")
    strings = ["plain words"] * 50_000 + [f"key {HF_TOKEN}"]
    res = _check(tmp_path, [("model.gguf (GGUF metadata general.tags)", "\n".join(strings))])
    assert [(f["rule"], f["line"]) for f in res.details["findings"]] == [
        ("huggingface-token", 50_001)
    ]


def test_an_oversized_metadata_text_is_skipped_and_said_so(tmp_path: Path) -> None:
    (_model_dir(tmp_path) / "README.md").write_text("clean\n")
    res = _check(tmp_path, [("model.gguf (GGUF metadata general.notes)", "a" * (5 << 20))])
    assert res.status == Status.PASSED
    assert any(
        s.startswith("model.gguf (GGUF metadata general.notes): ") for s in res.details["skipped"]
    )
