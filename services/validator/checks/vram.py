"""Check: weights + KV cache + a stated overhead fit the target's GPU memory.

weights   bytes from headers (safetensors, GGUF), else weight file sizes; scaled to the
          serving dtype for float tensors when the target asks for another dtype
kv cache  2 x layers x kv_heads x head_dim x context x batch x bytes per element
overhead  policy fraction of (weights + kv cache) for activations and fragmentation,
          plus a fixed reserve for the CUDA context and allocator
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from services.contracts.events import CheckResult, Status
from services.validator.checks.base import CheckContext, result, timed
from services.validator.checks.headers import FLOAT_DTYPE_BYTES, HeaderError, parsed_headers
from services.validator.checks.inventory import Inventory, Kind

NAME = "vram_fit"
GIB = 1024**3
CUDA_RESERVE_BYTES = int(0.5 * GIB)

_SAFETENSORS_FLOAT_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}
_TORCH_DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "half": 2, "float": 4}


@dataclass(frozen=True)
class Attention:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    max_context: int | None
    source: str


def _int(config: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def attention_from_config(config: dict[str, Any]) -> Attention | None:
    """Transformer shape from a Hugging Face config.json (GQA and head_dim defaults handled)."""
    text = config.get("text_config")
    if isinstance(text, dict) and _int(config, "num_hidden_layers", "n_layer") is None:
        config = {**config, **text}
    layers = _int(config, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
    heads = _int(config, "num_attention_heads", "n_head", "num_heads", "n_heads")
    hidden = _int(config, "hidden_size", "n_embd", "d_model", "dim")
    if layers is None or heads is None:
        return None
    kv_heads = (
        _int(config, "num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num")
        or heads
    )
    if config.get("multi_query") is True:
        kv_heads = 1
    head_dim = _int(config, "head_dim", "kv_channels") or (hidden // heads if hidden else None)
    if head_dim is None:
        return None
    max_context = _int(
        config,
        "max_position_embeddings",
        "n_positions",
        "n_ctx",
        "seq_length",
        "max_sequence_length",
    )
    return Attention(layers, heads, kv_heads, head_dim, max_context, "config.json")


def attention_from_gguf(metadata: dict[str, Any], arch: str) -> Attention | None:
    def get(key: str) -> int | None:
        value = metadata.get(f"{arch}.{key}")
        return value if isinstance(value, int) and value > 0 else None

    layers, heads = get("block_count"), get("attention.head_count")
    if layers is None or heads is None:
        return None
    embedding = get("embedding_length")
    head_dim = get("attention.key_length") or (embedding // heads if embedding else None)
    if head_dim is None:
        return None
    kv_heads = get("attention.head_count_kv") or heads
    return Attention(layers, heads, kv_heads, head_dim, get("context_length"), "GGUF metadata")


def _fmt(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def check_vram(inv: Inventory, ctx: CheckContext) -> CheckResult:
    started = time.perf_counter()
    try:
        return _check_vram(inv, ctx, started)
    except OverflowError:
        # A config or header whose sizes run to hundreds of digits: no float holds them, and
        # no GPU either.
        return result(
            NAME,
            Status.FAILED,
            "does not fit: the model's sizes (config.json or weight headers) are too large to "
            "compute with, far past any GPU's memory",
            started=started,
            unit="bytes",
        )


def _check_vram(inv: Inventory, ctx: CheckContext, started: float) -> CheckResult:
    headers = parsed_headers(ctx.shared)
    target = ctx.target
    serve_bytes = FLOAT_DTYPE_BYTES.get(target.dtype or "", None)

    weights = 0.0
    attention: Attention | None = None
    stored_dtype_bytes: int | None = None
    unreadable: list[str] = []
    for f in inv.weights:
        if f.kind is Kind.SAFETENSORS:
            st = headers.safetensors(f.path)
            if isinstance(st, HeaderError):
                unreadable.append(f.rel)
                weights += f.size
                continue
            for t in timed(st.tensors.values()):
                stored = _SAFETENSORS_FLOAT_BYTES.get(t.dtype)
                if stored is not None:
                    stored_dtype_bytes = stored_dtype_bytes or stored
                if stored is not None and serve_bytes is not None:
                    weights += t.nbytes * serve_bytes / stored
                else:
                    weights += t.nbytes
        elif f.kind is Kind.GGUF:
            gg = headers.gguf(f.path)
            if isinstance(gg, HeaderError):
                unreadable.append(f.rel)
                weights += f.size
                continue
            weights += gg.weight_bytes
            attention = attention or attention_from_gguf(gg.metadata, gg.architecture)
        elif f.kind in (Kind.TF_VARIABLES_INDEX, Kind.TF_SAVED_MODEL):
            continue  # graph and index, not loaded into GPU memory as weights
        else:
            weights += f.size
    if inv.config is not None:
        attention = attention_from_config(inv.config) or attention

    kv_bytes_per = (
        serve_bytes
        or _TORCH_DTYPES.get(str((inv.config or {}).get("torch_dtype", "")))
        or stored_dtype_bytes
        or 2
    )
    terms: dict[str, Any] = {"weights_bytes": int(weights)}
    problems: list[str] = []
    kv = 0.0
    context = target.context_length
    if attention is not None:
        if context is None:
            context = attention.max_context
        elif attention.max_context is not None and context > attention.max_context:
            problems.append(
                f"requested context {context} exceeds the model's maximum {attention.max_context}"
            )
        if context is not None:
            kv = (
                2
                * attention.layers
                * attention.kv_heads
                * attention.head_dim
                * context
                * target.batch_size
                * kv_bytes_per
            )
        terms |= {
            "layers": attention.layers,
            "kv_heads": attention.kv_heads,
            "head_dim": attention.head_dim,
            "context": context,
            "batch": target.batch_size,
            "kv_bytes_per_element": kv_bytes_per,
            "kv_cache_bytes": int(kv),
            "attention_source": attention.source,
        }
    fraction = ctx.policy.vram_overhead_fraction
    overhead = fraction * (weights + kv) + CUDA_RESERVE_BYTES
    total = weights + kv + overhead
    available = target.gpu_memory_gb * GIB * target.gpu_count
    headroom = available - total
    terms |= {
        "overhead_bytes": int(overhead),
        "overhead_rule": (
            f"{fraction:.0%} of weights + KV cache, plus {_fmt(CUDA_RESERVE_BYTES)} CUDA reserve"
        ),
        "total_bytes": int(total),
        "available_bytes": int(available),
        "headroom_bytes": int(headroom),
    }
    breakdown = (
        f"weights {_fmt(weights)} + KV cache {_fmt(kv)} + overhead {_fmt(overhead)} "
        f"= {_fmt(total)} of {_fmt(available)}"
    )
    if attention is None:
        breakdown += " (KV cache unknown: no attention shape in config.json or GGUF metadata)"
    elif context is None:
        breakdown += " (KV cache unknown: no context length in the request or the model)"
    if unreadable:
        breakdown += f"; sizes of unreadable headers taken from files: {', '.join(unreadable)}"
    if headroom < 0:
        problems.append(f"does not fit: {breakdown}, short by {_fmt(-headroom)}")
    if problems:
        return result(
            NAME,
            Status.FAILED,
            "; ".join(problems),
            started=started,
            value=total / GIB,
            threshold=available / GIB,
            unit="GiB",
            details=terms,
        )
    return result(
        NAME,
        Status.PASSED,
        f"fits: {breakdown}, headroom {_fmt(headroom)}",
        started=started,
        value=total / GIB,
        threshold=available / GIB,
        unit="GiB",
        details=terms,
    )
