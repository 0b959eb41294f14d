"""Check: a language model ships the tokenizer it needs to turn text into tokens and back."""

from __future__ import annotations

import json
import time
from typing import Any

from services.contracts.events import CheckResult, Status
from services.validator.checks.base import CheckContext, result
from services.validator.checks.headers import GGUFHeader, parsed_headers
from services.validator.checks.inventory import MAX_JSON_BYTES, Inventory, Kind, ModelFile

NAME = "tokenizer"

# Architecture names (config.json `architectures`) of heads that read or write text tokens:
# transformers' causal, masked and sequence-to-sequence language models, and the vision- and
# speech-to-text models that decode tokens (`...ForConditionalGeneration`).
LANGUAGE_MODEL_HEADS = (
    "ForCausalLM",
    "LMHeadModel",
    "WithLMHead",
    "ForMaskedLM",
    "ForConditionalGeneration",
)
# Text model types, for a config.json that names no architecture (saved from a config alone).
LANGUAGE_MODEL_TYPES = frozenset(
    {"bart", "bloom", "codegen", "cohere", "cohere2", "dbrx", "deepseek_v2", "deepseek_v3",
     "falcon", "gemma", "gemma2", "gemma3_text", "glm", "gpt2", "gpt_bigcode", "gpt_neo",
     "gpt_neox", "gptj", "granite", "llama", "mistral", "mixtral", "mpt", "mt5", "olmo",
     "olmo2", "opt", "phi", "phi3", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "stablelm",
     "starcoder2", "t5"}
)  # fmt: skip

# What `AutoTokenizer.from_pretrained` (and vLLM, TGI, llama.cpp's converters) read a vocabulary
# from, beside config.json. Any one is enough; vocab.json needs its merges.txt.
SINGLE_FILES = (
    "tokenizer.json",  # a fast (tokenizers) tokenizer: vocabulary, merges, normalisation
    "tokenizer.model",  # SentencePiece: Llama, Mistral, Gemma (tokenizer.model.v3: Mistral's)
    "spiece.model",  # SentencePiece: T5, ALBERT, Pegasus
    "sentencepiece.bpe.model",  # SentencePiece: XLM-R, mBART
    "sentencepiece.model",
    "spm.model",  # SentencePiece: DeBERTa-v2/v3
    "source.spm",  # SentencePiece: Marian
    "tekken.json",  # mistral-common's tokenizer
    "vocab.txt",  # WordPiece: BERT and its kin
)
BPE_PAIR = ("vocab.json", "merges.txt")  # the slow GPT-2-style BPE tokenizer
TIKTOKEN_SUFFIX = ".tiktoken"
LOOKED_FOR = (*SINGLE_FILES, "vocab.json + merges.txt", f"*{TIKTOKEN_SUFFIX}")
# Files that configure a tokenizer but hold no vocabulary of their own.
CONFIG_ONLY = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
)
# Tokenizer classes that need no vocabulary file: bytes (ByT5) or code points are the tokens.
VOCABULARY_FREE = frozenset({"ByT5Tokenizer", "CanineTokenizer", "PerceiverTokenizer"})


def check_tokenizer(inv: Inventory, ctx: CheckContext) -> CheckResult:
    started = time.perf_counter()
    if inv.config is None:
        why = "no config.json" if inv.is_dir else "a single file, no config.json"
        return result(
            NAME, Status.SKIPPED, f"{why}: nothing says it is a language model", started=started
        )
    model = language_model(inv.config)
    if model is None:
        return result(
            NAME,
            Status.SKIPPED,
            f"not a language model ({describe_config(inv.config)})",
            started=started,
        )
    beside = {f.rel: f for f in inv.files if "/" not in f.rel}  # from_pretrained reads the root
    found = vocabulary_files(beside, inv, ctx)
    details: dict[str, Any] = {"language_model": model, "looked_for": list(LOOKED_FOR)}
    if found:
        details["found"] = found
        reason = f"{model}: {', '.join(found)}"
        return result(NAME, Status.PASSED, reason, started=started, details=details)
    partial = [name for name in (*CONFIG_ONLY, *BPE_PAIR) if name in beside]
    details["found"] = partial
    reason = (
        f"{model} is a language model without tokenizer files: looked for "
        f"{', '.join(LOOKED_FOR)} or a GGUF tokenizer beside config.json, found none"
    )
    if partial:
        reason += f" (present, but no vocabulary: {', '.join(partial)})"
    reason += (
        "; it cannot tokenize, so it can neither be benchmarked nor serve. Upload the files "
        "`tokenizer.save_pretrained` writes, or set validation.checks.tokenizer: false"
    )
    return result(NAME, Status.FAILED, reason, started=started, details=details)


def language_model(config: dict[str, Any]) -> str | None:
    """The architecture (or model type) that makes this config a language model, else None."""
    architectures = config.get("architectures")
    if isinstance(architectures, list) and architectures:
        names = [a for a in architectures if isinstance(a, str)]
        return next((a for a in names if a.endswith(LANGUAGE_MODEL_HEADS)), None)
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type in LANGUAGE_MODEL_TYPES:
        return f"model_type {model_type}"
    return None


def describe_config(config: dict[str, Any]) -> str:
    architectures = config.get("architectures")
    if isinstance(architectures, list) and architectures:
        return "architectures: " + ", ".join(str(a) for a in architectures)
    model_type = config.get("model_type")
    return f"model_type {model_type}" if isinstance(model_type, str) else "config.json names none"


def vocabulary_files(beside: dict[str, ModelFile], inv: Inventory, ctx: CheckContext) -> list[str]:
    """The files (or GGUF metadata) a tokenizer can be built from; empty when there is none."""
    found = [name for name in SINGLE_FILES if name in beside]
    found += sorted(
        n for n in beside if n.startswith("tokenizer.model.") or n.endswith(TIKTOKEN_SUFFIX)
    )
    if all(name in beside for name in BPE_PAIR):
        found.append(" + ".join(BPE_PAIR))
    if not found and _vocabulary_free(beside.get("tokenizer_config.json")):
        found.append("tokenizer_config.json (a tokenizer with no vocabulary file)")
    headers = parsed_headers(ctx.shared)
    for f in inv.of(Kind.GGUF):
        header = headers.gguf(f.path)
        if isinstance(header, GGUFHeader) and "tokenizer.ggml.model" in header.metadata:
            found.append(f"{f.rel} (GGUF tokenizer metadata)")
    return found


def _vocabulary_free(config: ModelFile | None) -> bool:
    if config is None or config.size > MAX_JSON_BYTES:
        return False
    try:
        loaded = json.loads(config.path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False  # malformed JSON is the format check's finding
    return isinstance(loaded, dict) and loaded.get("tokenizer_class") in VOCABULARY_FREE
