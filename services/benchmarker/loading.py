"""Load a Hugging Face-layout model with transformers, from safetensors only, offline; a remote
location (s3://, hf://, https://) is fetched into the host's model cache first."""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.runtime import faults

if TYPE_CHECKING:
    from services.storage.cache import ModelCache, Progress

log = logging.getLogger("preflight.benchmarker")
fetch_log = logging.getLogger("preflight.benchmarker.fetch")
"""Fetch progress of remote models, apart so that `preflight benchmark` can show it alone."""
PROGRESS_EVERY_S = 10.0


class LoadError(RuntimeError):
    """The model could not be loaded; the message says why in one line."""


class InflatedInput(RuntimeError):
    """The tokenizer made far more tokens of a text than it has bytes, or far fewer."""


TOKENS_OVER_BYTES = 32
"""Tokens a text may have beyond one per byte: a tokenizer's special tokens (BOS, EOS, a
chat prefix). Byte fallback, the worst real case, gives one token per byte."""
BYTES_PER_TOKEN_MAX = 64
"""Bytes of a long text one token may stand for, at most: real tokenizers give 3-8 on prose.
Review 15's normalizer replaced the whole 47 KB evaluation text with "A B", and the benchmark
passed on a perplexity of 1 token."""
DEFLATION_CHECKED_FROM = 1024  # bytes: a short prompt may fairly be one or two tokens


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    device: str
    dtype: str
    path: Path


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def describe_device(device: str) -> str:
    """The device a result names, e.g. `cuda:0 (NVIDIA H100 80GB HBM3)` or `cpu (2 threads)`."""
    import torch

    if device.startswith("cuda"):
        return f"cuda:0 ({torch.cuda.get_device_name(0)})"
    n = torch.get_num_threads()
    return f"cpu ({n} thread{'' if n == 1 else 's'})"


def _dtype(name: str, config_dtype: str | None, device: str) -> Any:
    import torch

    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name != "auto":
        return table[name]
    chosen = table.get(config_dtype or "", torch.float32)
    if device == "cpu" and chosen is torch.float16:
        return torch.float32  # fp16 matmuls on CPU are slow and imprecise; measure in fp32
    return chosen


def progress_logger(location: str, *, every_s: float = PROGRESS_EVERY_S) -> Progress:
    """A fetch progress callback that logs its first call, then at most every `every_s`
    seconds (and at the end). A first call that is already the end is a model found whole on
    this host (the cache's hit): it says so instead of a 100% progress line."""
    from services.storage.cache import format_bytes

    last: list[float | None] = [None]

    def report(done: int, total: int) -> None:
        now, then = time.monotonic(), last[0]
        if then is None and done == total:
            last[0] = now
            fetch_log.info(
                "fetching %s: all %s already in the model cache", location, format_bytes(total)
            )
        elif then is None or now - then >= every_s or (done == total and now - then >= 1.0):
            last[0] = now
            share = f" ({done / total:.0%})" if total else ""
            fetch_log.info(
                "fetching %s: %s of %s%s", location, format_bytes(done), format_bytes(total), share
            )

    return report


@contextmanager
def local_directory(location: str, cache: ModelCache | None) -> Iterator[Path]:
    """The model's local directory: a local path as it is; a remote location fetched through
    the model cache (one download per version on this host) and held from eviction until the
    block exits."""
    from services.storage.base import StoreError
    from services.storage.cache import format_bytes
    from services.storage.locations import is_remote, open_store

    if not is_remote(location):
        if "://" in location:
            raise LoadError(
                f"{location}: not a model location the benchmarker reads (a local path, s3://, "
                "hf:// or https://)"
            )
        yield Path(location)
        return
    if cache is None:
        raise LoadError(f"{location}: a remote location needs the model cache; none was given")
    with ExitStack() as stack:
        started = time.perf_counter()
        try:
            store = open_store(location)
            path = stack.enter_context(cache.use(store, progress=progress_logger(location)))
        except StoreError as exc:  # one line naming the location and what to do
            raise LoadError(str(exc)) from exc
        seconds = time.perf_counter() - started
        downloaded = store.reads.bytes_read
        speed = f", {downloaded / seconds / 1e6:.1f} MB/s" if downloaded and seconds > 0 else ""
        fetch_log.info(
            "fetched %s: %s downloaded in %.2f s%s (%d requests) -> %s",
            location,
            format_bytes(downloaded),
            seconds,
            speed,
            store.reads.requests,
            path,
        )
        yield path


def encode(loaded: Loaded, text: str, what: str) -> Any:
    """The tokenizer's tensors of `text` on the model's device, refused when the tokenizer
    inflates it: a normalizer or post-processor in tokenizer.json can turn a 36-byte prompt
    into 600,000 tokens, and one forward pass over them runs for minutes."""
    inputs = loaded.tokenizer(text, return_tensors="pt")
    tokens = int(inputs.input_ids.shape[1])
    size = len(text.encode("utf-8"))
    if tokens > size + TOKENS_OVER_BYTES:
        raise InflatedInput(
            f"the tokenizer turned the {what} ({size:,} bytes) into {tokens:,} tokens, more than "
            f"one per byte plus {TOKENS_OVER_BYTES} special tokens: its normalizer, pre-tokenizer "
            "or post-processor (tokenizer.json) inflates what it encodes"
        )
    if size >= DEFLATION_CHECKED_FROM and tokens * BYTES_PER_TOKEN_MAX < size:
        raise InflatedInput(
            f"the tokenizer turned the {what} ({size:,} bytes) into {tokens:,} tokens, fewer than "
            f"one per {BYTES_PER_TOKEN_MAX} bytes: its normalizer, pre-tokenizer or "
            "post-processor (tokenizer.json) discards what it encodes, and nothing of the text "
            "would be measured"
        )
    return inputs.to(loaded.device)


def load_model(
    location: str,
    *,
    dtype: str = "auto",
    device: str | None = None,
    cache: ModelCache | None = None,
    held: ExitStack | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> Loaded:
    """The model and tokenizer, never unpickling: safetensors weights, no remote code.

    A remote location is fetched through `cache` and its snapshot held while it loads, and
    after that until `held` closes when one is given (`Loaded.path` is read again later: the
    baseline's fingerprint). `on_phase` hears "fetching" (remote locations) and "loading"."""
    if not torch_available():
        raise LoadError("torch is not installed here: install preflight[benchmark]")
    with ExitStack() as stack:
        if on_phase is not None and "://" in location:
            on_phase("fetching")
        path = stack.enter_context(local_directory(location, cache))
        if on_phase is not None:
            on_phase("loading")
        loaded = _load(location, path, dtype=dtype, device=device)
        if held is not None:
            held.push(stack.pop_all())
    return loaded


BUILT_IN_ATTENTION = frozenset({"eager", "sdpa"})
"""Attention that is torch's own code. Anything else a config asks for is code from elsewhere:
a Hub kernel ("kernels-community/flash-attn2", fetched and run by the `kernels` package even
with local_files_only), or flash-attention, which transformers replaces with that Hub kernel
when the package is missing."""


GENERATION_KEPT = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
"""All that generation_config.json keeps for the benchmark: which tokens are which."""


def _plain_generation(model: Any, location: str) -> None:
    """Replace the model's generation settings with greedy, one beam, a dynamic cache.

    generation_config.json is the uploader's, and transformers applies it on every generate()
    the benchmark runs: `num_beams: 200000` or `cache_implementation: static` with a huge
    `max_cache_len` asked for hundreds of GB, and `custom_generate` names code to run. The
    benchmark measures the model at fixed greedy decoding, so only the token ids are kept."""
    generation_config: Any = importlib.import_module("transformers").GenerationConfig
    given = getattr(model, "generation_config", None)
    if given is None:
        return
    kept = {k: getattr(given, k, None) for k in GENERATION_KEPT}
    plain = generation_config(**{k: v for k, v in kept.items() if v is not None})
    dropped = sorted(
        set(given.to_diff_dict()) - set(plain.to_diff_dict()) - {"transformers_version"}
    )
    if dropped:
        log.info("%s: generation_config.json settings not used: %s", location, ", ".join(dropped))
    model.generation_config = plain


def _attention(config: Any, auto_class: Any) -> str | None:
    """The attention to load with: None (the config's own, or transformers' default) when it is
    built in; else sdpa where the model has it, eager where it does not."""
    requested = getattr(config, "_attn_implementation", None)
    if requested is None or (isinstance(requested, str) and requested in BUILT_IN_ATTENTION):
        return None
    try:
        model_class = auto_class._model_mapping[type(config)]
    except KeyError:  # no causal LM for this config: from_pretrained says so
        model_class = None
    attention = "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"
    log.warning(
        "config.json asks for attention %s: benchmarked with %s instead, which fetches and runs "
        "no code from outside torch",
        str(requested)[:200],
        attention,
    )
    return attention


def _load(location: str, path: Path, *, dtype: str, device: str | None) -> Loaded:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise LoadError(f"{location}: no config.json (Hugging Face layout expected)")
    device = device or pick_device()
    # Every from_pretrained below passes local_files_only: the loader never reaches a network.
    # HF_HUB_OFFLINE is not set for that: huggingface_hub reads it once, at import, and would
    # then refuse this process's hf:// fetches (services/storage/hub.py) too.
    hf_logging: Any = importlib.import_module("transformers.utils.logging")
    hf_logging.set_verbosity_error()  # per-call warnings and progress bars are noise in a service
    hf_logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        config_dtype = getattr(config, "torch_dtype", None) or getattr(config, "dtype", None)
        torch_dtype = _dtype(
            dtype, str(config_dtype).replace("torch.", "") if config_dtype else None, device
        )
        tokenizer = AutoTokenizer.from_pretrained(
            path, local_files_only=True, trust_remote_code=False
        )
        attention = _attention(config, AutoModelForCausalLM)
        model: Any = AutoModelForCausalLM.from_pretrained(
            path,
            local_files_only=True,
            trust_remote_code=False,
            use_safetensors=True,
            dtype=torch_dtype,
            **({"attn_implementation": attention} if attention else {}),
        )
    except BaseException as exc:  # transformers, tokenizers, safetensors: many kinds, panics too
        if not faults.is_contained(exc):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not isinstance(exc, Exception):  # a Rust panic says nothing of where it came from
            first = f"{faults.describe(exc)} (a Rust library panicked on this model's files)"
        raise LoadError(f"{location}: does not load: {first}") from exc
    model.to(device)
    model.eval()
    _plain_generation(model, location)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    name = str(torch_dtype).replace("torch.", "")
    torch.manual_seed(0)
    return Loaded(model=model, tokenizer=tokenizer, device=device, dtype=name, path=path)
