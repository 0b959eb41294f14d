"""Load a Hugging Face-layout model with transformers, from safetensors only, offline."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class LoadError(RuntimeError):
    """The model could not be loaded; the message says why in one line."""


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


def load_model(location: str, *, dtype: str = "auto", device: str | None = None) -> Loaded:
    """The model and tokenizer, never unpickling: safetensors weights, no remote code."""
    if not torch_available():
        raise LoadError("torch is not installed here: install preflight[benchmark]")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if "://" in location:
        raise LoadError(f"{location}: only local paths can be benchmarked yet")
    path = Path(location)
    if not (path / "config.json").is_file():
        raise LoadError(f"{location}: no config.json (Hugging Face layout expected)")
    device = device or pick_device()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
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
        model: Any = AutoModelForCausalLM.from_pretrained(
            path,
            local_files_only=True,
            trust_remote_code=False,
            use_safetensors=True,
            dtype=torch_dtype,
        )
    except Exception as exc:  # transformers and safetensors raise many kinds on a bad model
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LoadError(f"{location}: does not load: {first}") from exc
    model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    name = str(torch_dtype).replace("torch.", "")
    torch.manual_seed(0)
    return Loaded(model=model, tokenizer=tokenizer, device=device, dtype=name, path=path)
