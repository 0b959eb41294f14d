"""The secrets check: a positive for every rule, the false-positive traps, and redaction."""

from __future__ import annotations

import json
import random
import string
import time
from pathlib import Path
from typing import Any

import pytest

from services.contracts.events import CheckResult, Status
from services.validator.checks.base import CheckContext
from services.validator.checks.inventory import build_inventory
from services.validator.checks.secrets import (
    SecretFinding,
    check_secrets,
    key_is_sensitive,
    redact,
    scan_text,
    shannon_entropy,
)

# Fake keys in the right shapes, made at test time so no key-shaped literal sits in the repo.
_RNG = random.Random(0)
ALNUM = string.ascii_letters + string.digits
UPPER_DIGITS = string.ascii_uppercase + string.digits
BASE64 = ALNUM + "+/"
BASE64URL = ALNUM + "-_"


def _rand(alphabet: str, n: int) -> str:
    return "".join(_RNG.choice(alphabet) for _ in range(n))


AWS_ID = "AKIA" + _rand(UPPER_DIGITS, 16)
AWS_STS_ID = "ASIA" + _rand(UPPER_DIGITS, 16)
AWS_SECRET = _rand(BASE64, 40)
HF_TOKEN = "hf_" + _rand(string.ascii_letters, 34)
OPENAI_LEGACY = "sk-" + _rand(ALNUM, 48)
OPENAI_PROJECT = "sk-proj-" + _rand(BASE64URL, 120)
ANTHROPIC = "sk-ant-api03-" + _rand(BASE64URL, 93) + "AA"
SLACK_BOT = f"xoxb-{_rand(string.digits, 12)}-{_rand(string.digits, 13)}-{_rand(ALNUM, 24)}"
SLACK_WEBHOOK_PATH = f"T{_rand(UPPER_DIGITS, 8)}/B{_rand(UPPER_DIGITS, 10)}/{_rand(ALNUM, 24)}"
SLACK_WEBHOOK = "https://hooks.slack.com/services/" + SLACK_WEBHOOK_PATH
GITHUB_CLASSIC = "ghp_" + _rand(ALNUM, 36)
GITHUB_APP = "ghs_" + _rand(ALNUM, 36)
GITHUB_FINE = "github_pat_" + _rand(ALNUM, 22) + "_" + _rand(ALNUM, 59)
GOOGLE = "AIza" + _rand(BASE64URL, 35)
PEM_BODY = "\n".join(_rand(BASE64, 64) for _ in range(8)) + "\n" + _rand(BASE64, 20) + "=="
PEM = f"-----BEGIN RSA PRIVATE KEY-----\n{PEM_BODY}\n-----END RSA PRIVATE KEY-----"
URL_PASSWORD = _rand(ALNUM, 20)
GENERIC_PASSWORD = _rand(ALNUM + "!#%&*+-", 24)
GENERIC_HEX = _rand("0123456789abcdef", 32)
JWT = f"eyJhbGciOiJIUzI1NiJ9.{_rand(BASE64URL, 40)}.{_rand(BASE64URL, 43)}"
SHA256 = _rand("0123456789abcdef", 64)
GIT_SHA = _rand("0123456789abcdef", 40)

ALL_SECRETS = [
    AWS_ID, AWS_STS_ID, AWS_SECRET, HF_TOKEN, OPENAI_LEGACY, OPENAI_PROJECT, ANTHROPIC,
    SLACK_BOT, SLACK_WEBHOOK_PATH, GITHUB_CLASSIC, GITHUB_APP, GITHUB_FINE, GOOGLE, PEM_BODY,
    URL_PASSWORD, GENERIC_PASSWORD, GENERIC_HEX, JWT,
]  # fmt: skip


def _rules(text: str) -> list[str]:
    return [f.rule for f in scan_text("t", text)]


# --- a positive for every rule ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "rule", "secret"),
    [
        pytest.param(f"aws_access_key_id = {AWS_ID}", "aws-access-key-id", AWS_ID, id="aws-id"),
        pytest.param(f'"key": "{AWS_STS_ID}"', "aws-access-key-id", AWS_STS_ID, id="aws-sts-id"),
        pytest.param("id: AKIA" + "Q" * 16, "aws-access-key-id", "AKIA" + "Q" * 16, id="aws-low"),
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
        pytest.param(f"db: postgresql://svc:{URL_PASSWORD}@db.internal:5432/m",
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


# --- false-positive traps ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        # placeholders
        "export HF_TOKEN=${HF_TOKEN}",
        "HF_TOKEN=$HF_TOKEN_FROM_THE_ENVIRONMENT",
        'api_key: "{{ secrets.OPENAI_API_KEY }}"',
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
        "hf_" + "x" * 34,
        "login with hf_YOUR_HUGGING_FACE_TOKEN_HERE_PLEASE",
        "import hf_transformersintegrationutilitiesmodule",
        'openai.api_key = "sk-..."',
        "OPENAI_API_KEY=sk-your-openai-key-here-0000000000000",
        "ANTHROPIC_API_KEY=sk-ant-api03-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
        "xoxb-your-bot-token-here",
        "https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX",
        "GITHUB_TOKEN=ghp_" + "x" * 36,
        "key=AIza" + "X" * 35,
        "AKIA" + "X" * 16,
        "aws_access_key_id = AKIAIOSFODNN7EXAMPLE",
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "-----BEGIN RSA PRIVATE KEY-----\n...\n-----END RSA PRIVATE KEY-----",
        "-----BEGIN PRIVATE KEY-----\n<your key here>\n-----END PRIVATE KEY-----",
        "-----BEGIN PRIVATE KEY-----\n" + "X" * 64 + "\n-----END PRIVATE KEY-----",
        # scikit-learn wording and kebab-case words after `sk-`
        "an sk-learn-compatible-estimator-wrapper-for-text-classification",
        # digests, hashes, revisions
        f"sha256: {SHA256}",
        f"| model.safetensors | sha256 | {SHA256} |",
        f"checksum = {SHA256}",
        f"digest: sha256:{SHA256}",
        f'"token_sha256": "{SHA256}"',
        f"revision: {GIT_SHA}",
        f'"_commit_hash": "{GIT_SHA}"',
        # URLs without credentials (and local defaults with them)
        '"auth": "https://auth.internal.corp/oauth2/v2.0/authorize"',
        "token_url: https://huggingface.co/settings/tokens",
        "secret = https://vault.internal.corp/v1/secret/data/models/llama",
        "postgres://postgres:postgres@localhost:5432/db",
        "https://user:password@host.example.org/",
        "https://${USER}:${PASSWORD}@registry.internal/",
        "ssh://git@github.com/org/repo.git",
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
        'token=os.environ["HF_TOKEN"]',
        'api_key = os.getenv("OPENAI_API_KEY")',
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
)
def test_false_positive_trap_is_not_flagged(text: str) -> None:
    assert scan_text("f", text) == []


def test_the_generic_rule_needs_a_credential_key() -> None:
    assert _rules(f"value = {GENERIC_PASSWORD}") == []
    assert _rules(f"password = {GENERIC_PASSWORD}") == ["generic-high-entropy"]


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


# --- a realistic model directory passes clean -------------------------------------------------

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


def _vocabulary(n: int) -> dict[str, Any]:
    """A tokenizer.json whose vocabulary is random-looking, plus assignment-shaped entries."""
    vocab = {_rand(ALNUM, 12): i for i in range(n)}
    vocab[f"password={GENERIC_PASSWORD}"] = n  # a generic-shaped entry is vocabulary, not a key
    return {"version": "1.0", "model": {"type": "BPE", "vocab": vocab, "merges": ["a b"]}}


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
        ]
    )
    (_model_dir(tmp_path) / "README.md").write_text(body)
    res = _check(tmp_path, [("model.gguf (GGUF metadata general.notes)", body)])
    assert res.status == Status.FAILED
    assert len(res.details["findings"]) == 2 * 18
    dumped = res.model_dump_json()
    for secret in ALL_SECRETS:
        assert secret not in dumped
        assert secret[:8] not in dumped
    for finding in res.details["findings"]:
        assert len(finding["redacted"].split("…")[0]) <= 4
    assert "(+31 more)" in res.reason


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


def _time_scan(texts: list[str]) -> float:
    started = time.perf_counter()
    for text in texts:
        assert scan_text("f", text) == []
    return time.perf_counter() - started
