"""A benign corpus: real-shaped model files of every supported format, written with the formats'
own libraries, that the validator must pass without a single false alarm (issue #12).

`write_benign_corpus(directory)` writes every entry of `CORPUS` as its own model location (a file
or a directory) under `directory/<name>` and returns (name, path) pairs. Names read
`family/variant`. Tensors are tiny, so the whole corpus is written in a few seconds.

What is here, and what is not:
- torch.save state dicts and checkpoints at pickle protocols 2-5, zip and legacy formats
  (torch.load(weights_only=True) reads protocol 2, torch.save's default; 3-5 need the full
  unpickler, for bytes and frames, and hold nothing more);
- numpy: .npy of many dtypes and layouts, .npz (plain and compressed), pickled arrays at
  protocols 0-5 (including C-pickler files whose frame boundary falls between the strings naming
  a global, and pickles followed by whitespace, as hand-edited files are);
- safetensors files and sharded directories; Hugging Face Trainer output as the serving loader
  reads it (weights, configs, tokenizer files, model card); PEFT, sentence-transformers and
  diffusers layouts;
- Keras: .keras v3 archives and .h5 files laid out as Keras 3.15 and tf.keras 2.15 write them
  (built by hand: Keras is not a dependency; the layout was checked against files Keras wrote);
- ONNX models built with onnx.helper at several opsets, with external data;
- GGUF with the real chat templates of tests/unit/validator/templates.py, and Hugging Face
  directories carrying the same templates in tokenizer_config.json, chat_template.jinja or
  chat_template.json.
Not here: training_args.bin, optimizer.pt, scheduler.pt, rng_state.pth. They are pickles the
serving loader never opens, blocked by policy by default, and tested on their own.
"""

from __future__ import annotations

import json
import pickle
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from functools import lru_cache, partial
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tests.unit.validator.templates import BENIGN_TEMPLATES

__all__ = ["CORPUS", "family", "write_benign_corpus"]

Writer = Callable[[Path], Path]
Array = npt.NDArray[Any]

CORPUS: dict[str, Writer] = {}
"""Every entry: name -> writer of that model into the directory it is given."""


def family(name: str) -> str:
    return name.split("/", 1)[0]


def write_benign_corpus(directory: Path) -> list[tuple[str, Path]]:
    """Write every entry under `directory` (each a separate model location)."""
    entries = []
    with warnings.catch_warnings():
        # torch: quantized and sparse-CSR tensors are deprecated or beta; they still save.
        warnings.simplefilter("ignore", UserWarning)
        for name, writer in CORPUS.items():
            model_dir = directory / name
            model_dir.mkdir(parents=True, exist_ok=True)
            entries.append((name, writer(model_dir)))
    return entries


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _write_json(path: Path, doc: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return path


# --- torch.save ------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _torch_objects() -> dict[str, Callable[[], Any]]:
    """What people torch.save: state dicts of common modules, whole training checkpoints (minus
    the optimizer), and the odd tensor kinds torch.load(weights_only=True) accepts."""
    import torch
    from torch import nn

    def seeded(make: Callable[[], Any]) -> Callable[[], Any]:
        def made() -> Any:
            torch.manual_seed(0)
            return make()

        return made

    def dtypes() -> Any:
        kinds = (
            torch.float32,
            torch.float16,
            torch.bfloat16,
            torch.float64,
            torch.int8,
            torch.uint8,
            torch.int16,
            torch.int32,
            torch.int64,
            torch.bool,
            torch.complex64,
            torch.complex128,
        )
        return {str(dtype).removeprefix("torch."): torch.ones(2, 3, dtype=dtype) for dtype in kinds}

    def conv_bn() -> Any:
        net = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)
        )
        return net.state_dict()

    def checkpoint() -> Any:
        model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
        return {
            "model": model.state_dict(),
            "epoch": 3,
            "global_step": 120,
            "best_metric": 0.913,
            "config": {"lr": 1e-3, "betas": (0.9, 0.999), "name": "tiny-mlp", "tags": ["a", "b"]},
            "args": [1, 2.5, None, True, "x", b"raw", bytearray(b"ab"), 1 + 2j, {1, 2}],
        }

    def shared_views() -> Any:
        base = torch.arange(12.0).reshape(3, 4)
        grad = torch.ones(3, requires_grad=True)
        return {"base": base, "row": base[1], "col": base[:, 2], "t": base.t(), "grad": grad}

    def odd_values() -> Any:
        return {
            "shape": torch.Size([2, 3]),
            "dtype": torch.float16,
            "device": torch.device("cpu"),
            "scalar": torch.tensor(3.5),
            "int_scalar": torch.tensor(7),
            "empty": torch.empty(0, 4),
        }

    def parameters() -> Any:
        return {
            "weight": nn.Parameter(torch.randn(2, 2)),
            "frozen": nn.Parameter(torch.ones(2), requires_grad=False),
        }

    def sparse() -> Any:
        indices = torch.tensor([[0, 1, 2], [2, 0, 1]])
        coo = torch.sparse_coo_tensor(indices, torch.tensor([1.0, 2.0, 3.0]), (3, 3))
        return {"coo": coo, "csr": torch.eye(3).to_sparse_csr()}

    def quantized() -> Any:
        scales, zero_points = torch.tensor([0.1, 0.2]), torch.tensor([0, 1])
        return {
            "per_tensor": torch.quantize_per_tensor(torch.randn(4), 0.1, 10, torch.quint8),
            "per_channel": torch.quantize_per_channel(
                torch.randn(2, 3), scales, zero_points, 0, torch.qint8
            ),
        }

    return {
        "linear": seeded(lambda: nn.Linear(4, 3).state_dict()),
        "dtypes": dtypes,
        "conv_batchnorm": seeded(conv_bn),
        "embedding_layernorm": seeded(
            lambda: nn.Sequential(nn.Embedding(16, 8), nn.LayerNorm(8)).state_dict()
        ),
        "lstm": seeded(lambda: nn.LSTM(4, 8, num_layers=2).state_dict()),
        "transformer_layer": seeded(
            lambda: nn.TransformerEncoderLayer(8, 2, dim_feedforward=16).state_dict()
        ),
        "checkpoint": seeded(checkpoint),
        "ordered_dict": seeded(lambda: OrderedDict(w=torch.randn(2, 2), b=torch.zeros(2))),
        "tensor_list": seeded(lambda: [torch.randn(2, 2), torch.arange(3), (torch.ones(1),)]),
        "shared_views": shared_views,
        "odd_values": odd_values,
        "parameters": seeded(parameters),
        "sparse": sparse,
        "quantized": seeded(quantized),
    }


_TORCH_FILE_NAMES = ("model.pt", "pytorch_model.bin", "checkpoint.pth", "weights.ckpt")


_TORCH_OBJECTS = (
    "linear",
    "dtypes",
    "conv_batchnorm",
    "embedding_layernorm",
    "lstm",
    "transformer_layer",
    "checkpoint",
    "ordered_dict",
    "tensor_list",
    "shared_views",
    "odd_values",
    "parameters",
    "sparse",
    "quantized",
)


def _write_torch(directory: Path, *, obj: str, protocol: int, zip_: bool, file_name: str) -> Path:
    import torch

    path = directory / file_name
    state = _torch_objects()[obj]()
    torch.save(state, path, pickle_protocol=protocol, _use_new_zipfile_serialization=zip_)
    return path


def _register_torch() -> None:
    for protocol in (2, 3, 4, 5):
        for zip_ in (True, False):
            layout = "zip" if zip_ else "legacy"
            for i, name in enumerate(_TORCH_OBJECTS):
                file_name = _TORCH_FILE_NAMES[(i + protocol) % len(_TORCH_FILE_NAMES)]
                CORPUS[f"torch/{layout}-p{protocol}/{name}"] = partial(
                    _write_torch, obj=name, protocol=protocol, zip_=zip_, file_name=file_name
                )


# --- numpy: .npy and .npz --------------------------------------------------------------------


def _npy_arrays() -> dict[str, Array]:
    rng = _rng(1)
    arrays: dict[str, Array] = {
        name: (rng.standard_normal((3, 4)) * 10).astype(dtype)
        for name, dtype in (
            ("float16", "<f2"),
            ("float32", "<f4"),
            ("float64", "<f8"),
            ("int8", "|i1"),
            ("int16", "<i2"),
            ("int32", "<i4"),
            ("int64", "<i8"),
            ("uint8", "|u1"),
            ("uint16", "<u2"),
            ("uint32", "<u4"),
            ("uint64", "<u8"),
            ("complex64", "<c8"),
            ("complex128", "<c16"),
            ("big_endian_float32", ">f4"),
            ("big_endian_int64", ">i8"),
            ("big_endian_complex64", ">c8"),
        )
    }
    arrays["bool"] = rng.standard_normal((3, 4)) > 0
    arrays["bytes"] = np.array([b"alpha", b"beta", b"gamma"], dtype="S8")
    arrays["unicode"] = np.array(["un", "deux", "trois"], dtype="<U6")
    arrays["datetime64"] = np.array(["2024-01-01", "2024-06-30"], dtype="datetime64[s]")
    arrays["timedelta64"] = np.array([1500, 20], dtype="timedelta64[ms]")
    arrays["structured"] = np.array(
        [(1.5, 2, b"cat"), (0.5, 7, b"dog")], dtype=[("x", "<f4"), ("y", "<i2"), ("label", "S4")]
    )
    arrays["structured_subarray"] = np.zeros(4, dtype=[("pos", "<f4", (3,)), ("id", "<u4")])
    arrays["fortran_order_2d"] = np.asfortranarray(rng.standard_normal((4, 5)).astype(np.float32))
    arrays["fortran_order_3d"] = np.asfortranarray(np.arange(24, dtype=np.int16).reshape(2, 3, 4))
    arrays["zero_dim"] = np.array(3.25, dtype=np.float64)
    arrays["empty"] = np.zeros((0, 4), dtype=np.float32)
    arrays["embedding_table"] = rng.standard_normal((64, 16)).astype(np.float16)
    return arrays


def _write_npy(directory: Path, *, array: Array, file_name: str) -> Path:
    path = directory / file_name
    with path.open("wb") as fh:  # np.save(path) would append .npy to any other name
        np.save(fh, array, allow_pickle=False)
    return path


def _write_npy_version(directory: Path, *, version: tuple[int, int]) -> Path:
    """Header versions 2.0 (4-byte header length) and 3.0 (UTF-8 field names)."""
    path = directory / "features.npy"
    if version == (3, 0):
        array = np.zeros(3, dtype=[("température", "<f4"), ("größe", "<i4")])
    else:
        array = np.arange(10, dtype=np.float32)
    with path.open("wb") as fh:
        np.lib.format.write_array(fh, array, version=version, allow_pickle=False)
    return path


def _write_npz(directory: Path, *, compressed: bool, variant: str) -> Path:
    rng = _rng(2)
    path = directory / f"{variant}.npz"
    save = np.savez_compressed if compressed else np.savez
    if variant == "weights":
        save(
            path,
            w1=rng.standard_normal((4, 8)).astype(np.float32),
            b1=np.zeros(8),
            w2=rng.standard_normal((8, 2)).astype(np.float32),
            b2=np.zeros(2),
        )
    elif variant == "positional":  # np.savez(*arrays): arr_0, arr_1, ... as old Keras used
        save(path, *[rng.standard_normal((2, i + 1)) for i in range(5)])
    elif variant == "mixed_dtypes":
        save(
            path,
            ids=np.arange(6, dtype=np.int64),
            mask=np.ones(6, bool),
            names=np.array(["a", "bb"]),
            be=np.arange(3, dtype=">f8"),
            fortran=np.asfortranarray(np.ones((2, 3))),
        )
    else:  # structured
        save(path, table=np.zeros(3, dtype=[("id", "<u4"), ("score", "<f4")]))
    return path


def _register_numpy() -> None:
    extensions = ("npy", "npy", "npy", "bin")  # an .npy is found by its magic, not its name
    for i, (name, array) in enumerate(_npy_arrays().items()):
        file_name = f"{name}.{extensions[i % len(extensions)]}"
        CORPUS[f"npy/{name}"] = partial(_write_npy, array=array, file_name=file_name)
    for version in ((2, 0), (3, 0)):
        CORPUS[f"npy/header_v{version[0]}"] = partial(_write_npy_version, version=version)
    for compressed in (False, True):
        for variant in ("weights", "positional", "mixed_dtypes", "structured"):
            kind = "savez_compressed" if compressed else "savez"
            CORPUS[f"npz/{kind}/{variant}"] = partial(
                _write_npz, compressed=compressed, variant=variant
            )


# --- pickled numpy and plain data ------------------------------------------------------------


def _pickled_objects() -> dict[str, Callable[[], Any]]:
    def weights() -> Any:
        rng = _rng(3)
        return {
            "W1": rng.standard_normal((4, 8)).astype(np.float32),
            "b1": np.zeros(8),
            "W2": rng.standard_normal((8, 2)).astype(np.float32),
            "b2": np.zeros(2),
        }

    def layouts() -> Any:
        return [
            np.asfortranarray(np.arange(6.0).reshape(2, 3)),
            np.arange(4, dtype=">i4"),
            np.zeros(2, dtype=[("id", "<u4"), ("score", "<f4")]),
            np.array([True, False]),
            np.array([1 + 2j], dtype=np.complex64),
            np.array(["2024-01-01"], dtype="datetime64[D]"),
        ]

    def scalars() -> Any:
        return {
            "lr": np.float32(0.001),
            "step": np.int64(42),
            "flag": np.bool_(True),
            "dtype": np.dtype("float16"),
            "big": np.dtype(">i8"),
        }

    def plain() -> Any:
        return {
            "vocab": {"a": 0, "b": 1},
            "sizes": (1, 2, 3),
            "name": "tiny",
            "ratio": 0.5,
            "none": None,
            "blob": b"\x00\x01",
            "mutable": bytearray(b"ab"),
            "set": {1, 2},
            "frozen": frozenset({"x"}),
            "complex": 3 - 1j,
        }

    return {
        "array": lambda: np.arange(12, dtype=np.float32).reshape(3, 4),
        "weights_dict": weights,
        "layouts": layouts,
        "scalars_and_dtypes": scalars,
        "plain_python": plain,
        "nested": lambda: {"encoder": [weights(), {"norm": np.ones(4)}], "meta": plain()},
    }


def _write_pickle(
    directory: Path, *, make: Callable[[], Any], protocol: int, file_name: str, tail: bytes = b""
) -> Path:
    path = directory / file_name
    path.write_bytes(pickle.dumps(make(), protocol=protocol) + tail)
    return path


def _write_frame_boundary_pickle(directory: Path, *, pad: int, protocol: int) -> Path:
    """What the C pickler writes for a string just under its 64 KiB frame size followed by an
    array: the frame ends between the strings that name numpy's reconstruct function, so the
    module name closes one frame and the function name opens the next."""
    path = directory / "arrays.pkl"
    path.write_bytes(pickle.dumps(["x" * pad, np.arange(4)], protocol=protocol))
    return path


def _register_pickles() -> None:
    names = ("arrays.pkl", "model.pickle", "features.pkl", "data.bin")
    for protocol in (2, 3, 4, 5):
        for i, (name, make) in enumerate(_pickled_objects().items()):
            CORPUS[f"pickle/p{protocol}/{name}"] = partial(
                _write_pickle, make=make, protocol=protocol, file_name=names[i % len(names)]
            )
    for protocol in (0, 1):  # no header: found by the file name's extension
        for name in ("array", "weights_dict", "plain_python"):
            make = _pickled_objects()[name]
            CORPUS[f"pickle/p{protocol}/{name}"] = partial(
                _write_pickle, make=make, protocol=protocol, file_name="arrays.pkl"
            )
    # Pads at which the frame ends between the module and the name strings of the first
    # STACK_GLOBAL (numpy._core.multiarray / _reconstruct at protocol 4, numpy._core.numeric /
    # _frombuffer at 5), and one where it does not.
    frame_pads = {4: (65490, 65502, 65506, 65510, 65516), 5: (65490, 65506, 65510, 65514, 65518)}
    for protocol, pads in frame_pads.items():
        for pad in pads:
            CORPUS[f"pickle/frame_boundary/p{protocol}-{pad}"] = partial(
                _write_frame_boundary_pickle, pad=pad, protocol=protocol
            )
    # pickle.load stops at STOP: a newline or spaces an editor or `echo >>` left are never read.
    for label, tail in (("newline", b"\n"), ("crlf", b"\r\n"), ("spaces_tab", b"  \t\n")):
        CORPUS[f"pickle/whitespace_after_stop/{label}"] = partial(
            _write_pickle,
            make=_pickled_objects()["weights_dict"],
            protocol=4,
            file_name="arrays.pkl",
            tail=tail,
        )


# --- safetensors -----------------------------------------------------------------------------


def _write_safetensors_torch(directory: Path, *, variant: str) -> Path:
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = directory / "model.safetensors"
    if variant == "float8":
        tensors = {
            "w_e4m3": torch.zeros(4, 4).to(torch.float8_e4m3fn),
            "w_e5m2": torch.zeros(4, 4).to(torch.float8_e5m2),
            "scale": torch.ones(1),
        }
    elif variant == "unsigned":
        tensors = {
            f"u{bits}": torch.zeros(3, dtype=getattr(torch, f"uint{bits}"))
            for bits in (8, 16, 32, 64)
        }
    else:  # bfloat16
        tensors = {
            "embed.weight": torch.randn(16, 8, dtype=torch.bfloat16),
            "norm.weight": torch.ones(8, dtype=torch.bfloat16),
        }
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def _write_safetensors_numpy(directory: Path, *, variant: str) -> Path:
    from safetensors.numpy import save_file

    rng = _rng(4)
    path = directory / "model.safetensors"
    metadata: dict[str, str] | None = {"format": "np"}
    if variant == "dtypes":
        tensors = {
            str(dtype): np.ones((2, 3), dtype=dtype)
            for dtype in (
                np.float16,
                np.float32,
                np.float64,
                np.int8,
                np.int16,
                np.int32,
                np.int64,
                np.uint8,
                np.bool_,
            )
        }
    elif variant == "scalar_and_empty":
        tensors = {"scalar": np.array(1.5, np.float32), "empty": np.zeros((0, 8), np.float32)}
    elif variant == "no_metadata":
        tensors, metadata = {"w": rng.standard_normal((4, 4)).astype(np.float32)}, None
    elif variant == "many_tensors":
        tensors = {
            f"blocks.{i}.{p}": rng.standard_normal((4,)).astype(np.float32)
            for i in range(40)
            for p in ("weight", "bias")
        }
    else:  # rich metadata, as mergekit or a trainer writes
        tensors = {"w": rng.standard_normal((4, 4)).astype(np.float32)}
        metadata = {
            "format": "pt",
            "merge_method": "slerp",
            "total_size": "64",
            "description": "A tiny model, see https://example.org/card",
        }
    save_file(tensors, str(path), metadata=metadata)
    return path


def _write_safetensors_sharded(directory: Path, *, shards: int, renamed: bool = False) -> Path:
    from safetensors.numpy import save_file

    rng = _rng(5)
    names = [f"encoder.layers.{i}.{p}" for i in range(4) for p in ("weight", "bias")]
    weight_map: dict[str, str] = {}
    total = 0
    for shard in range(shards):
        file_name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {n: rng.standard_normal((4, 4)).astype(np.float32) for n in names[shard::shards]}
        save_file(tensors, str(directory / file_name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, file_name)
        total += sum(t.nbytes for t in tensors.values())
    index_name = (
        "diffusion_pytorch_model.safetensors.index.json"
        if renamed
        else ("model.safetensors.index.json")
    )
    _write_json(
        directory / index_name, {"metadata": {"total_size": total}, "weight_map": weight_map}
    )
    return directory


def _register_safetensors() -> None:
    for variant in ("bfloat16", "float8", "unsigned"):
        CORPUS[f"safetensors/torch_{variant}"] = partial(_write_safetensors_torch, variant=variant)
    for variant in ("dtypes", "scalar_and_empty", "no_metadata", "many_tensors", "metadata"):
        CORPUS[f"safetensors/numpy_{variant}"] = partial(_write_safetensors_numpy, variant=variant)
    for shards in (2, 3):
        CORPUS[f"safetensors/sharded_{shards}"] = partial(_write_safetensors_sharded, shards=shards)


# --- Hugging Face: Trainer output as the serving loader reads it -----------------------------

_HIDDEN, _LAYERS, _VOCAB, _HEADS, _KV_HEADS, _FFN, _POSITIONS = 16, 2, 64, 4, 2, 32, 128


def _llama_like(arch: str) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    head_dim = _HIDDEN // _HEADS
    config: dict[str, Any] = {
        "architectures": [
            {
                "llama": "LlamaForCausalLM",
                "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM",
                "gemma": "GemmaForCausalLM",
            }[arch]
        ],
        "model_type": arch,
        "hidden_size": _HIDDEN,
        "intermediate_size": _FFN,
        "num_hidden_layers": _LAYERS,
        "num_attention_heads": _HEADS,
        "num_key_value_heads": _KV_HEADS,
        "vocab_size": _VOCAB,
        "max_position_embeddings": _POSITIONS,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": arch in ("gemma", "qwen2"),
        "use_cache": True,
        "transformers_version": "4.57.1",
        "attention_bias": arch == "qwen2",
    }
    if arch == "mistral":
        config["sliding_window"] = 4096
    if arch == "gemma":
        config |= {"head_dim": head_dim, "hidden_activation": "gelu_pytorch_tanh"}
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (_VOCAB, _HIDDEN)}
    kv = _KV_HEADS * head_dim
    for i in range(_LAYERS):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (_HIDDEN,),
            f"{p}.self_attn.q_proj.weight": (_HIDDEN, _HIDDEN),
            f"{p}.self_attn.k_proj.weight": (kv, _HIDDEN),
            f"{p}.self_attn.v_proj.weight": (kv, _HIDDEN),
            f"{p}.self_attn.o_proj.weight": (_HIDDEN, _HIDDEN),
            f"{p}.post_attention_layernorm.weight": (_HIDDEN,),
            f"{p}.mlp.gate_proj.weight": (_FFN, _HIDDEN),
            f"{p}.mlp.up_proj.weight": (_FFN, _HIDDEN),
            f"{p}.mlp.down_proj.weight": (_HIDDEN, _FFN),
        }
        if arch == "qwen2":
            shapes |= {
                f"{p}.self_attn.q_proj.bias": (_HIDDEN,),
                f"{p}.self_attn.k_proj.bias": (kv,),
                f"{p}.self_attn.v_proj.bias": (kv,),
            }
    shapes["model.norm.weight"] = (_HIDDEN,)
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (_VOCAB, _HIDDEN)
    return config, shapes


def _gpt2() -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_layer": _LAYERS,
        "n_embd": _HIDDEN,
        "n_head": _HEADS,
        "vocab_size": _VOCAB,
        "n_positions": _POSITIONS,
        "n_ctx": _POSITIONS,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "torch_dtype": "float32",
        "transformers_version": "4.57.1",
    }
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (_VOCAB, _HIDDEN),
        "transformer.wpe.weight": (_POSITIONS, _HIDDEN),
    }
    for i in range(_LAYERS):
        p = f"transformer.h.{i}"
        shapes |= {
            f"{p}.ln_1.weight": (_HIDDEN,),
            f"{p}.ln_1.bias": (_HIDDEN,),
            f"{p}.attn.c_attn.weight": (_HIDDEN, 3 * _HIDDEN),
            f"{p}.attn.c_attn.bias": (3 * _HIDDEN,),
            f"{p}.attn.c_proj.weight": (_HIDDEN, _HIDDEN),
            f"{p}.attn.c_proj.bias": (_HIDDEN,),
            f"{p}.ln_2.weight": (_HIDDEN,),
            f"{p}.ln_2.bias": (_HIDDEN,),
            f"{p}.mlp.c_fc.weight": (_HIDDEN, 4 * _HIDDEN),
            f"{p}.mlp.c_fc.bias": (4 * _HIDDEN,),
            f"{p}.mlp.c_proj.weight": (4 * _HIDDEN, _HIDDEN),
            f"{p}.mlp.c_proj.bias": (_HIDDEN,),
        }
    shapes |= {"transformer.ln_f.weight": (_HIDDEN,), "transformer.ln_f.bias": (_HIDDEN,)}
    return config, shapes


def _bert() -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    config = {
        "architectures": ["BertForSequenceClassification"],
        "model_type": "bert",
        "hidden_size": _HIDDEN,
        "num_hidden_layers": _LAYERS,
        "num_attention_heads": _HEADS,
        "intermediate_size": _FFN,
        "vocab_size": _VOCAB,
        "max_position_embeddings": _POSITIONS,
        "type_vocab_size": 2,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "id2label": {"0": "NEGATIVE", "1": "POSITIVE"},
        "label2id": {"NEGATIVE": 0, "POSITIVE": 1},
        "problem_type": "single_label_classification",
        "torch_dtype": "float32",
        "transformers_version": "4.57.1",
    }
    e = "bert.embeddings"
    shapes: dict[str, tuple[int, ...]] = {
        f"{e}.word_embeddings.weight": (_VOCAB, _HIDDEN),
        f"{e}.position_embeddings.weight": (_POSITIONS, _HIDDEN),
        f"{e}.token_type_embeddings.weight": (2, _HIDDEN),
        f"{e}.LayerNorm.weight": (_HIDDEN,),
        f"{e}.LayerNorm.bias": (_HIDDEN,),
    }
    for i in range(_LAYERS):
        p = f"bert.encoder.layer.{i}"
        for proj in ("query", "key", "value"):
            shapes |= {
                f"{p}.attention.self.{proj}.weight": (_HIDDEN, _HIDDEN),
                f"{p}.attention.self.{proj}.bias": (_HIDDEN,),
            }
        shapes |= {
            f"{p}.attention.output.dense.weight": (_HIDDEN, _HIDDEN),
            f"{p}.attention.output.dense.bias": (_HIDDEN,),
            f"{p}.attention.output.LayerNorm.weight": (_HIDDEN,),
            f"{p}.attention.output.LayerNorm.bias": (_HIDDEN,),
            f"{p}.intermediate.dense.weight": (_FFN, _HIDDEN),
            f"{p}.intermediate.dense.bias": (_FFN,),
            f"{p}.output.dense.weight": (_HIDDEN, _FFN),
            f"{p}.output.dense.bias": (_HIDDEN,),
            f"{p}.output.LayerNorm.weight": (_HIDDEN,),
            f"{p}.output.LayerNorm.bias": (_HIDDEN,),
        }
    shapes |= {
        "bert.pooler.dense.weight": (_HIDDEN, _HIDDEN),
        "bert.pooler.dense.bias": (_HIDDEN,),
        "classifier.weight": (2, _HIDDEN),
        "classifier.bias": (2,),
    }
    return config, shapes


def _t5() -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    d_kv = _HIDDEN // _HEADS
    config = {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "d_model": _HIDDEN,
        "d_kv": d_kv,
        "d_ff": _FFN,
        "num_layers": _LAYERS,
        "num_decoder_layers": _LAYERS,
        "num_heads": _HEADS,
        "vocab_size": _VOCAB,
        "relative_attention_num_buckets": 32,
        "feed_forward_proj": "relu",
        "decoder_start_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 0,
        "is_encoder_decoder": True,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.57.1",
    }
    shapes: dict[str, tuple[int, ...]] = {"shared.weight": (_VOCAB, _HIDDEN)}
    for stack in ("encoder", "decoder"):
        for i in range(_LAYERS):
            p = f"{stack}.block.{i}.layer"
            for proj in "qkvo":
                shapes[f"{p}.0.SelfAttention.{proj}.weight"] = (_HIDDEN, _HIDDEN)
            shapes[f"{p}.0.layer_norm.weight"] = (_HIDDEN,)
            if i == 0:
                shapes[f"{p}.0.SelfAttention.relative_attention_bias.weight"] = (32, _HEADS)
            ffn = 1
            if stack == "decoder":
                for proj in "qkvo":
                    shapes[f"{p}.1.EncDecAttention.{proj}.weight"] = (_HIDDEN, _HIDDEN)
                shapes[f"{p}.1.layer_norm.weight"] = (_HIDDEN,)
                ffn = 2
            shapes |= {
                f"{p}.{ffn}.DenseReluDense.wi.weight": (_FFN, _HIDDEN),
                f"{p}.{ffn}.DenseReluDense.wo.weight": (_HIDDEN, _FFN),
                f"{p}.{ffn}.layer_norm.weight": (_HIDDEN,),
            }
        shapes[f"{stack}.final_layer_norm.weight"] = (_HIDDEN,)
    shapes["lm_head.weight"] = (_VOCAB, _HIDDEN)
    return config, shapes


_ARCHITECTURES: dict[str, Callable[[], tuple[dict[str, Any], dict[str, tuple[int, ...]]]]] = {
    "llama": partial(_llama_like, "llama"),
    "mistral": partial(_llama_like, "mistral"),
    "qwen2": partial(_llama_like, "qwen2"),
    "gemma": partial(_llama_like, "gemma"),
    "gpt2": _gpt2,
    "bert": _bert,
    "t5": _t5,
}


def _tensors(shapes: dict[str, tuple[int, ...]], seed: int = 6) -> dict[str, Array]:
    rng = _rng(seed)
    return {n: (rng.standard_normal(s) * 0.02).astype(np.float32) for n, s in shapes.items()}


def _save_weights(
    directory: Path, tensors: dict[str, Array], layout: str, *, bf16: bool = False
) -> None:
    """model.safetensors, pytorch_model.bin, or either sharded with its index, as
    save_pretrained writes them."""
    import torch

    def torch_state(part: dict[str, Array]) -> dict[str, Any]:
        out = {n: torch.from_numpy(a.copy()) for n, a in part.items()}
        return {n: t.to(torch.bfloat16) for n, t in out.items()} if bf16 else out

    names = list(tensors)
    safetensors = layout.startswith("safetensors")
    sharded = layout.endswith("sharded")
    parts = [names[: len(names) // 2], names[len(names) // 2 :]] if sharded else [names]
    stem, ext = ("model", "safetensors") if safetensors else ("pytorch_model", "bin")
    weight_map: dict[str, str] = {}
    for i, part in enumerate(parts):
        file_name = f"{stem}-{i + 1:05d}-of-{len(parts):05d}.{ext}" if sharded else f"{stem}.{ext}"
        state = torch_state({n: tensors[n] for n in part})
        if safetensors:
            from safetensors.torch import save_file

            save_file(state, str(directory / file_name), metadata={"format": "pt"})
        else:
            torch.save(state, directory / file_name)
        weight_map |= dict.fromkeys(part, file_name)
    if sharded:
        total = sum(a.nbytes // (2 if bf16 else 1) for a in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _write_json(directory / f"{stem}.{ext}.index.json", index)


def _bpe_tokenizer_json(vocab_size: int = _VOCAB) -> Any:
    """A tokenizers BPE tokenizer.json of `vocab_size` byte-level tokens."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ", "Ċ"]
    vocab: dict[str, int] = {"<s>": 0, "</s>": 1, "<unk>": 2}
    merges: list[str] = []
    for letter in letters:
        vocab.setdefault(letter, len(vocab))
    for a, b in pairwise(letters):
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(a + b, len(vocab))
        merges.append(f"{a} {b}")
    special = [
        {
            "id": i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for t, i in list(vocab.items())[:3]
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": special,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": True,
            "use_regex": True,
        },
        "post_processor": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": False,
            "use_regex": True,
        },
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": True,
            "use_regex": True,
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


_MODEL_CARD = """---
license: apache-2.0
base_model: {base}
tags:
- generated_from_trainer
datasets:
- imdb
metrics:
- accuracy
model-index:
- name: {name}
  results:
  - task:
      type: text-classification
    metrics:
    - type: accuracy
      value: 0.912
---

# {name}

This model is a fine-tuned version of [{base}](https://huggingface.co/{base}) on the imdb
dataset. It achieves the following results on the evaluation set:
- Loss: 0.2311
- Accuracy: 0.912

## How to use

```bash
pip install -U transformers accelerate
huggingface-cli login   # or: export HF_TOKEN=<your token>
```

```python
import os

from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("acme/{name}", token=os.environ["HF_TOKEN"])
model = AutoModelForCausalLM.from_pretrained("acme/{name}", torch_dtype="auto")
inputs = tokenizer("Hello, my dog is", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))
```

## Training hyperparameters

| hyperparameter | value |
|---|---|
| learning_rate | 2e-05 |
| train_batch_size | 16 |
| seed | 42 |
| optimizer | adamw_torch with betas=(0.9,0.999) and epsilon=1e-08 |
| lr_scheduler_type | linear |
| num_epochs | 3 |

### Framework versions

- Transformers 4.57.1
- Pytorch 2.13.0+cpu
- Datasets 3.2.0
- Tokenizers 0.22.1
"""


def _trainer_state(steps: int = 30) -> Any:
    log = [
        {
            "epoch": round(s / 10, 2),
            "grad_norm": 1.5 - s / 40,
            "learning_rate": 2e-5 * (1 - s / steps),
            "loss": round(2.3 - s / 20, 4),
            "step": s,
        }
        for s in range(10, steps + 1, 10)
    ]
    log.append(
        {
            "epoch": 3.0,
            "eval_accuracy": 0.912,
            "eval_loss": 0.2311,
            "eval_runtime": 4.2,
            "eval_samples_per_second": 119.0,
            "eval_steps_per_second": 7.5,
            "step": steps,
        }
    )
    return {
        "best_global_step": steps,
        "best_metric": 0.912,
        "best_model_checkpoint": f"outputs/checkpoint-{steps}",
        "epoch": 3.0,
        "eval_steps": 10,
        "global_step": steps,
        "is_hyper_param_search": False,
        "is_local_process_zero": True,
        "is_world_process_zero": True,
        "log_history": log,
        "logging_steps": 10,
        "max_steps": steps,
        "num_input_tokens_seen": 0,
        "num_train_epochs": 3,
        "save_steps": 10,
        "total_flos": 1234.0,
        "train_batch_size": 16,
        "trial_name": None,
        "trial_params": None,
        "stateful_callbacks": {
            "TrainerControl": {
                "args": {"should_save": True, "should_training_stop": True},
                "attributes": {},
            }
        },
    }


def _tokenizer_config(arch: str, chat_template: str | None = None) -> Any:
    classes = {
        "bert": "BertTokenizer",
        "t5": "T5Tokenizer",
        "gpt2": "GPT2Tokenizer",
        "gemma": "GemmaTokenizer",
        "qwen2": "Qwen2Tokenizer",
    }
    doc: dict[str, Any] = {
        "add_bos_token": arch not in ("bert", "t5", "gpt2"),
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, t in enumerate(("<s>", "</s>", "<unk>"))
        },
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "extra_special_tokens": {},
        "legacy": False,
        "model_max_length": _POSITIONS,
        "pad_token": "</s>",
        "padding_side": "left",
        "sp_model_kwargs": {},
        "tokenizer_class": classes.get(arch, "LlamaTokenizer"),
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    if chat_template is not None:
        doc["chat_template"] = chat_template
    return doc


def _write_hf_files(directory: Path, arch: str, config: dict[str, Any]) -> None:
    """Everything next to the weights that save_pretrained and Trainer write for serving."""
    _write_json(directory / "config.json", config)
    if config.get("is_encoder_decoder") or "LM" in config["architectures"][0]:
        generation = {
            "_from_model_config": True,
            "bos_token_id": config.get("bos_token_id", 0),
            "eos_token_id": config.get("eos_token_id", 1),
            "do_sample": True,
            "temperature": 0.6,
            "top_p": 0.9,
            "max_length": _POSITIONS,
            "transformers_version": "4.57.1",
        }
        _write_json(directory / "generation_config.json", generation)
    _write_json(directory / "tokenizer.json", _bpe_tokenizer_json())
    _write_json(directory / "tokenizer_config.json", _tokenizer_config(arch))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}
    _write_json(directory / "special_tokens_map.json", special)
    if arch == "gpt2":  # the slow tokenizer's files, as GPT-2 repos ship them
        vocab = _bpe_tokenizer_json()["model"]
        _write_json(directory / "vocab.json", vocab["vocab"])
        (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(vocab["merges"]))
    if arch == "bert":
        tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"tok{i}" for i in range(59)]
        (directory / "vocab.txt").write_text("\n".join(tokens) + "\n")
    _write_json(directory / "trainer_state.json", _trainer_state())
    results = {
        "epoch": 3.0,
        "eval_accuracy": 0.912,
        "eval_loss": 0.2311,
        "train_loss": 1.21,
        "train_runtime": 61.3,
        "train_samples_per_second": 24.5,
    }
    _write_json(directory / "all_results.json", results)
    _write_json(
        directory / "train_results.json", {k: v for k, v in results.items() if "eval" not in k}
    )
    base = {
        "bert": "google-bert/bert-base-uncased",
        "t5": "google-t5/t5-small",
        "gpt2": "openai-community/gpt2",
    }.get(arch, f"acme/{arch}-base")
    (directory / "README.md").write_text(_MODEL_CARD.format(base=base, name=f"tiny-{arch}-imdb"))
    (directory / ".gitattributes").write_text(
        "*.bin filter=lfs diff=lfs merge=lfs -text\n"
        "*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    )


def _write_trainer_output(directory: Path, *, arch: str, layout: str) -> Path:
    config, shapes = _ARCHITECTURES[arch]()
    bf16 = config.get("torch_dtype") == "bfloat16"
    _save_weights(directory, _tensors(shapes), layout, bf16=bf16)
    _write_hf_files(directory, arch, config)
    return directory


def _write_peft_adapter(directory: Path, *, bin_: bool) -> Path:
    """A LoRA adapter as PEFT's save_pretrained writes it."""
    rank, targets = 4, ("q_proj", "v_proj")
    tensors: dict[str, Array] = {}
    rng = _rng(7)
    for i in range(_LAYERS):
        for t in targets:
            p = f"base_model.model.model.layers.{i}.self_attn.{t}"
            tensors[f"{p}.lora_A.weight"] = rng.standard_normal((rank, _HIDDEN)).astype(np.float32)
            tensors[f"{p}.lora_B.weight"] = np.zeros((_HIDDEN, rank), np.float32)
    if bin_:
        import torch

        torch.save(
            {n: torch.from_numpy(a) for n, a in tensors.items()}, directory / "adapter_model.bin"
        )
    else:
        from safetensors.numpy import save_file

        save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter: dict[str, Any] = {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": "acme/llama-base",
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": {},
        "revision": None,
        "target_modules": list(targets),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }
    _write_json(directory / "adapter_config.json", adapter)
    (directory / "README.md").write_text(
        "---\nbase_model: acme/llama-base\nlibrary_name: peft\n---\n\n# LoRA adapter\n\n"
        "```python\nfrom peft import PeftModel\n\nmodel = PeftModel.from_pretrained(base, "
        '"acme/lora")\n```\n'
    )
    return directory


def _write_sentence_transformers(directory: Path) -> Path:
    config, shapes = _bert()
    config["architectures"] = ["BertModel"]
    shapes = {
        k.removeprefix("bert."): v for k, v in shapes.items() if not k.startswith("classifier")
    }
    _save_weights(directory, _tensors(shapes), "safetensors")
    _write_json(directory / "config.json", config)
    _write_json(
        directory / "modules.json",
        [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {
                "idx": 1,
                "name": "1",
                "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling",
            },
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            },
        ],
    )
    _write_json(
        directory / "sentence_bert_config.json", {"max_seq_length": 128, "do_lower_case": False}
    )
    _write_json(
        directory / "config_sentence_transformers.json",
        {
            "__version__": {
                "sentence_transformers": "5.1.0",
                "transformers": "4.57.1",
                "pytorch": "2.13.0+cpu",
            },
            "prompts": {},
            "similarity_fn_name": "cosine",
        },
    )
    _write_json(
        directory / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": _HIDDEN,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False,
        },
    )
    (directory / "2_Normalize").mkdir()
    _write_json(directory / "tokenizer.json", _bpe_tokenizer_json())
    _write_json(directory / "tokenizer_config.json", _tokenizer_config("bert"))
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"tok{i}" for i in range(59)]
    (directory / "vocab.txt").write_text("\n".join(tokens) + "\n")
    (directory / "README.md").write_text(
        "---\npipeline_tag: sentence-similarity\nlibrary_name: sentence-transformers\n---\n\n"
        "```python\nfrom sentence_transformers import SentenceTransformer\n\n"
        'model = SentenceTransformer("acme/tiny-embed")\nembeddings = model.encode(["hi"])\n```\n'
    )
    return directory


def _write_diffusers(directory: Path) -> Path:
    """A diffusers pipeline: model_index.json and one folder per component."""
    from safetensors.numpy import save_file

    rng = _rng(8)
    _write_json(
        directory / "model_index.json",
        {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.35.1",
            "scheduler": ["diffusers", "PNDMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        },
    )
    _write_json(
        directory / "scheduler" / "scheduler_config.json",
        {
            "_class_name": "PNDMScheduler",
            "_diffusers_version": "0.35.1",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "num_train_timesteps": 1000,
        },
    )
    for component, cls in (("unet", "UNet2DConditionModel"), ("vae", "AutoencoderKL")):
        _write_json(
            directory / component / "config.json",
            {
                "_class_name": cls,
                "_diffusers_version": "0.35.1",
                "in_channels": 4,
                "out_channels": 4,
                "block_out_channels": [8, 16],
                "sample_size": 8,
            },
        )
        tensors = {
            f"{component}.conv_in.weight": rng.standard_normal((8, 4, 3, 3)).astype(np.float16),
            f"{component}.conv_in.bias": np.zeros(8, np.float16),
        }
        save_file(tensors, str(directory / component / "diffusion_pytorch_model.safetensors"))
    text = directory / "text_encoder"
    text.mkdir()
    _write_json(
        text / "config.json",
        {
            "architectures": ["CLIPTextModel"],
            "model_type": "clip_text_model",
            "hidden_size": _HIDDEN,
            "num_hidden_layers": 1,
            "num_attention_heads": _HEADS,
            "vocab_size": _VOCAB,
            "max_position_embeddings": 77,
        },
    )
    save_file(
        {
            "text_model.embeddings.token_embedding.weight": rng.standard_normal(
                (_VOCAB, _HIDDEN)
            ).astype(np.float16)
        },
        str(text / "model.safetensors"),
    )
    tokenizer = directory / "tokenizer"
    vocab = _bpe_tokenizer_json()["model"]
    _write_json(tokenizer / "vocab.json", vocab["vocab"])
    (tokenizer / "merges.txt").write_text("#version: 0.2\n" + "\n".join(vocab["merges"]) + "\n")
    _write_json(tokenizer / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>"})
    (directory / "README.md").write_text("---\nlibrary_name: diffusers\n---\n\n# tiny-sd\n")
    return directory


def _register_hugging_face() -> None:
    layouts = ("safetensors", "bin", "safetensors_sharded", "bin_sharded")
    for arch in _ARCHITECTURES:
        for layout in layouts:
            CORPUS[f"hf/{arch}/{layout}"] = partial(_write_trainer_output, arch=arch, layout=layout)
    CORPUS["hf/peft_lora/safetensors"] = partial(_write_peft_adapter, bin_=False)
    CORPUS["hf/peft_lora/bin"] = partial(_write_peft_adapter, bin_=True)
    CORPUS["hf/sentence_transformers"] = _write_sentence_transformers
    CORPUS["hf/diffusers"] = _write_diffusers


# --- Keras -----------------------------------------------------------------------------------
# Keras 3's .keras: a zip of metadata.json, config.json (every object as {module, class_name,
# config, registered_name}) and model.weights.h5 (layers/<name>/vars/<i>; optimizer/vars).
# Layer configs below are what Keras 3.15's get_config() returns. Each model here but the
# lookup and TextVectorization ones (which need TensorFlow) was loaded back with
# keras.saving.load_model in Keras 3.15.1 (torch backend), weights and all; so were the .h5
# files further down.

_KERAS_VERSION = "3.15.1"


def _obj(class_name: str, config: Any, module: str = "keras.layers", **extra: Any) -> Any:
    return {
        "module": module,
        "class_name": class_name,
        "config": config,
        "registered_name": None,
        **extra,
    }


def _policy() -> Any:
    return _obj("DTypePolicy", {"name": "float32"}, module="keras")


def _init(class_name: str, **config: Any) -> Any:
    return _obj(class_name, config, module="keras.initializers")


def _base(name: str) -> dict[str, Any]:
    return {"name": name, "trainable": True, "dtype": _policy()}


def _k_input(shape: list[int | None], name: str = "input_layer", dtype: str = "float32") -> Any:
    return _obj(
        "InputLayer",
        {
            "batch_shape": shape,
            "dtype": dtype,
            "sparse": False,
            "ragged": False,
            "name": name,
            "optional": False,
        },
    )


def _k_dense(name: str, units: int, activation: str = "linear") -> Any:
    return _obj(
        "Dense",
        _base(name)
        | {
            "units": units,
            "activation": activation,
            "use_bias": True,
            "kernel_initializer": _init("GlorotUniform", seed=None),
            "bias_initializer": _init("Zeros"),
            "kernel_regularizer": None,
            "bias_regularizer": None,
            "kernel_constraint": None,
            "bias_constraint": None,
            "quantization_config": None,
        },
    )


def _k_conv2d(name: str, filters: int) -> Any:
    return _obj(
        "Conv2D",
        _base(name)
        | {
            "filters": filters,
            "kernel_size": [3, 3],
            "strides": [1, 1],
            "padding": "valid",
            "data_format": "channels_last",
            "dilation_rate": [1, 1],
            "groups": 1,
            "activation": "relu",
            "use_bias": True,
            "kernel_initializer": _init("GlorotUniform", seed=None),
            "bias_initializer": _init("Zeros"),
            "kernel_regularizer": None,
            "bias_regularizer": None,
            "activity_regularizer": None,
            "kernel_constraint": None,
            "bias_constraint": None,
        },
    )


def _k_batchnorm(name: str) -> Any:
    return _obj(
        "BatchNormalization",
        _base(name)
        | {
            "axis": -1,
            "momentum": 0.99,
            "epsilon": 0.001,
            "center": True,
            "scale": True,
            "beta_initializer": _init("Zeros"),
            "gamma_initializer": _init("Ones"),
            "moving_mean_initializer": _init("Zeros"),
            "moving_variance_initializer": _init("Ones"),
            "beta_regularizer": None,
            "gamma_regularizer": None,
            "beta_constraint": None,
            "gamma_constraint": None,
            "synchronized": False,
        },
    )


def _k_simple(class_name: str, name: str, **config: Any) -> Any:
    return _obj(class_name, _base(name) | config)


def _k_embedding(name: str, input_dim: int, output_dim: int) -> Any:
    return _obj(
        "Embedding",
        _base(name)
        | {
            "input_dim": input_dim,
            "output_dim": output_dim,
            "embeddings_initializer": _init("RandomUniform", seed=None, minval=-0.05, maxval=0.05),
            "embeddings_regularizer": None,
            "activity_regularizer": None,
            "embeddings_constraint": None,
            "mask_zero": False,
            "quantization_config": None,
        },
    )


def _k_rnn(class_name: str, name: str, units: int) -> Any:
    return _obj(
        class_name,
        _base(name)
        | {
            "return_sequences": False,
            "return_state": False,
            "go_backwards": False,
            "stateful": False,
            "unroll": False,
            "zero_output_for_mask": False,
            "units": units,
            "activation": "tanh",
            "recurrent_activation": "sigmoid",
            "use_bias": True,
            "kernel_initializer": _init("GlorotUniform", seed=None),
            "recurrent_initializer": _init("Orthogonal", seed=None, gain=1.0),
            "bias_initializer": _init("Zeros"),
            "kernel_regularizer": None,
            "recurrent_regularizer": None,
            "bias_regularizer": None,
            "activity_regularizer": None,
            "kernel_constraint": None,
            "recurrent_constraint": None,
            "bias_constraint": None,
            "dropout": 0.0,
            "recurrent_dropout": 0.0,
            "seed": None,
        }
        | ({"unit_forget_bias": True} if class_name == "LSTM" else {"reset_after": True}),
    )


def _backwards(rnn: Any) -> Any:
    return rnn | {"config": rnn["config"] | {"go_backwards": True}}


def _k_lookup(class_name: str, name: str, vocabulary: list[Any] | None) -> Any:
    """StringLookup / IntegerLookup; an inline vocabulary is stored in the config itself."""
    config = _base(name) | {
        "invert": False,
        "max_tokens": None,
        "num_oov_indices": 1,
        "oov_token": "[UNK]" if class_name == "StringLookup" else -1,
        "mask_token": None,
        "output_mode": "int",
        "sparse": False,
        "pad_to_max_tokens": False,
        "idf_weights": None,
        "vocabulary": vocabulary,
        "vocabulary_size": None if vocabulary is None else len(vocabulary) + 1,
        "oov_method": "hash" if class_name == "StringLookup" else None,
        "salt": None,
    }
    config["dtype"] = "string" if class_name == "StringLookup" else "int64"
    if class_name == "StringLookup":
        config["encoding"] = "utf-8"
    else:
        config["vocabulary_dtype"] = "int64"
    return _obj(class_name, config)


def _sequential(
    name: str,
    input_shape: list[int | None],
    layers: list[Any],
    *,
    compiled: bool = True,
    input_dtype: str = "float32",
) -> Any:
    model: dict[str, Any] = _obj(
        "Sequential",
        {
            "name": name,
            "trainable": True,
            "dtype": _policy(),
            "layers": [_k_input(input_shape, dtype=input_dtype), *layers],
            "build_input_shape": input_shape,
        },
        module="keras",
        build_config={"input_shape": input_shape},
    )
    if compiled:
        adam = {
            "name": "adam",
            "learning_rate": 0.001,
            "weight_decay": None,
            "clipnorm": None,
            "global_clipnorm": None,
            "clipvalue": None,
            "use_ema": False,
            "ema_momentum": 0.99,
            "ema_overwrite_frequency": None,
            "loss_scale_factor": None,
            "gradient_accumulation_steps": None,
            "beta_1": 0.9,
            "beta_2": 0.999,
            "epsilon": 1e-07,
            "amsgrad": False,
        }
        model["compile_config"] = {
            "optimizer": _obj("Adam", adam, module="keras.optimizers") | {"registered_name": None},
            "loss": "sparse_categorical_crossentropy",
            "loss_weights": None,
            "metrics": ["accuracy"],
            "weighted_metrics": None,
            "run_eagerly": False,
            "steps_per_execution": 1,
            "jit_compile": False,
        }
    return model


def _node(*sources: str, shape: list[int | None]) -> list[Any]:
    """inbound_nodes of a Functional layer called on the outputs of `sources`."""
    tensors = [
        {
            "class_name": "__keras_tensor__",
            "config": {"shape": shape, "dtype": "float32", "keras_history": [s, 0, 0]},
        }
        for s in sources
    ]
    return [{"args": [tensors] if len(tensors) > 1 else tensors, "kwargs": {}}]


def _functional(
    name: str, layers: list[tuple[Any, list[Any]]], inputs: list[str], outputs: list[str]
) -> Any:
    entries = []
    for layer, inbound in layers:
        entries.append(layer | {"name": layer["config"]["name"], "inbound_nodes": inbound})
    return _obj(
        "Functional",
        {
            "name": name,
            "trainable": True,
            "layers": entries,
            "input_layers": [[n, 0, 0] for n in inputs],
            "output_layers": [[n, 0, 0] for n in outputs],
        },
        module="keras.src.models.functional",
        build_config={"input_shape": None},
    )


def _keras_models() -> dict[str, tuple[Any, dict[str, list[tuple[int, ...]]]]]:
    """Model configs and the variables Keras stores for each layer (name -> var shapes)."""
    mlp = _sequential(
        "sequential",
        [None, 4],
        [
            _k_dense("dense", 8, "relu"),
            _k_simple("Dropout", "dropout", rate=0.1, seed=None, noise_shape=None),
            _k_dense("dense_1", 2, "softmax"),
        ],
    )
    cnn = _sequential(
        "sequential_1",
        [None, 8, 8, 3],
        [
            _k_conv2d("conv2d", 4),
            _k_batchnorm("batch_normalization"),
            _k_simple(
                "MaxPooling2D",
                "max_pooling2d",
                pool_size=[2, 2],
                padding="valid",
                strides=[2, 2],
                data_format="channels_last",
            ),
            _k_simple("Flatten", "flatten", data_format="channels_last"),
            _k_dense("dense", 2, "softmax"),
        ],
    )
    text = _sequential(
        "sequential_2",
        [None, 5],
        [
            _k_embedding("embedding", 32, 4),
            _k_rnn("LSTM", "lstm", 4),
            _k_simple(
                "LayerNormalization",
                "layer_normalization",
                axis=[-1],
                epsilon=0.001,
                center=True,
                scale=True,
                rms_scaling=False,
                beta_initializer=_init("Zeros"),
                gamma_initializer=_init("Ones"),
            ),
            _k_dense("dense", 1, "sigmoid"),
        ],
        input_dtype="int32",
    )
    gru = _sequential(
        "sequential_3",
        [None, 6, 3],
        [
            _obj(
                "Bidirectional",
                _base("bidirectional")
                | {
                    "merge_mode": "concat",
                    "layer": _k_rnn("GRU", "forward_gru", 4),
                    "backward_layer": _backwards(_k_rnn("GRU", "backward_gru", 4)),
                },
            ),
            _k_dense("dense", 3, "softmax"),
        ],
        compiled=False,
    )
    lookup = _sequential(
        "sequential_4",
        [None, 1],
        [
            _k_lookup("StringLookup", "string_lookup", ["cat", "dog", "fish", "bird"]),
            _k_embedding("embedding", 5, 4),
            _k_simple(
                "GlobalAveragePooling1D",
                "global_average_pooling1d",
                data_format="channels_last",
                keepdims=False,
            ),
            _k_dense("dense", 2),
        ],
        compiled=False,
        input_dtype="string",
    )
    int_lookup = _sequential(
        "sequential_5",
        [None, 1],
        [
            _k_lookup("IntegerLookup", "integer_lookup", [12, 36, 1138, 42]),
            _k_simple(
                "CategoryEncoding",
                "category_encoding",
                num_tokens=5,
                output_mode="one_hot",
                sparse=False,
            ),
            _k_dense("dense", 2),
        ],
        compiled=False,
        input_dtype="int64",
    )
    text_vec = _sequential(
        "sequential_6",
        [None],
        [
            _obj(
                "TextVectorization",
                _base("text_vectorization")
                | {
                    "max_tokens": None,
                    "standardize": "lower_and_strip_punctuation",
                    "split": "whitespace",
                    "ngrams": None,
                    "output_mode": "int",
                    "output_sequence_length": 8,
                    "pad_to_max_tokens": False,
                    "sparse": False,
                    "ragged": False,
                    "idf_weights": None,
                    "encoding": "utf-8",
                    "vocabulary": ["the", "cat", "sat", "on", "mat"],
                    "vocabulary_size": 7,
                },
            ),
            _k_embedding("embedding", 7, 4),
            _k_simple(
                "GlobalAveragePooling1D",
                "global_average_pooling1d",
                data_format="channels_last",
                keepdims=False,
            ),
        ],
        compiled=False,
        input_dtype="string",
    )
    normalization = _sequential(
        "sequential_7",
        [None, 3],
        [
            _k_simple(
                "Normalization",
                "normalization",
                axis=[-1],
                invert=False,
                mean=[0.5, 1.0, -2.0],
                variance=[1.0, 4.0, 0.25],
            ),
            _k_simple("Rescaling", "rescaling", scale=0.5, offset=0.0),
            _k_dense("dense", 1),
        ],
        compiled=False,
    )
    a, b = _k_input([None, 4], "input_a"), _k_input([None, 3], "input_b")
    functional = _functional(
        "functional",
        [
            (a, []),
            (b, []),
            (_k_dense("dense", 4, "relu"), _node("input_a", shape=[None, 4])),
            (_k_dense("dense_1", 4, "relu"), _node("input_b", shape=[None, 3])),
            (_k_simple("Add", "add"), _node("dense", "dense_1", shape=[None, 4])),
            (
                _k_simple("Concatenate", "concatenate", axis=-1),
                _node("add", "input_a", shape=[None, 4]),
            ),
            (_k_dense("head", 1), _node("concatenate", shape=[None, 8])),
        ],
        ["input_a", "input_b"],
        ["head"],
    )
    x = _k_input([None, 6, 8], "tokens")
    attention = _functional(
        "encoder_block",
        [
            (x, []),
            (
                _k_simple(
                    "MultiHeadAttention",
                    "multi_head_attention",
                    num_heads=2,
                    key_dim=4,
                    value_dim=4,
                    dropout=0.0,
                    use_bias=True,
                    output_shape=None,
                    attention_axes=[1],
                    kernel_initializer=_init("GlorotUniform", seed=None),
                    bias_initializer=_init("Zeros"),
                    kernel_regularizer=None,
                    bias_regularizer=None,
                    activity_regularizer=None,
                    kernel_constraint=None,
                    bias_constraint=None,
                    seed=None,
                ),
                [
                    {
                        "args": [
                            {
                                "class_name": "__keras_tensor__",
                                "config": {
                                    "shape": [None, 6, 8],
                                    "dtype": "float32",
                                    "keras_history": ["tokens", 0, 0],
                                },
                            }
                        ],
                        "kwargs": {
                            "value": {
                                "class_name": "__keras_tensor__",
                                "config": {
                                    "shape": [None, 6, 8],
                                    "dtype": "float32",
                                    "keras_history": ["tokens", 0, 0],
                                },
                            }
                        },
                    }
                ],
            ),
            (_k_simple("Add", "add"), _node("multi_head_attention", "tokens", shape=[None, 6, 8])),
            (
                _k_simple(
                    "LayerNormalization",
                    "layer_normalization",
                    axis=[-1],
                    epsilon=1e-6,
                    center=True,
                    scale=True,
                    rms_scaling=False,
                    beta_initializer=_init("Zeros"),
                    gamma_initializer=_init("Ones"),
                ),
                _node("add", shape=[None, 6, 8]),
            ),
            (
                _k_simple(
                    "Conv1D",
                    "conv1d",
                    filters=8,
                    kernel_size=[1],
                    strides=[1],
                    padding="same",
                    data_format="channels_last",
                    dilation_rate=[1],
                    groups=1,
                    activation="gelu",
                    use_bias=True,
                    kernel_initializer=_init("GlorotUniform", seed=None),
                    bias_initializer=_init("Zeros"),
                ),
                _node("layer_normalization", shape=[None, 6, 8]),
            ),
        ],
        ["tokens"],
        ["conv1d"],
    )
    return {
        "mlp": (mlp, {"dense": [(4, 8), (8,)], "dense_1": [(8, 2), (2,)], "dropout": []}),
        "cnn": (
            cnn,
            {
                "conv2d": [(3, 3, 3, 4), (4,)],
                "batch_normalization": [(4,)] * 4,
                "max_pooling2d": [],
                "flatten": [],
                "dense": [(36, 2), (2,)],
            },
        ),
        "embedding_lstm": (
            text,
            {
                "embedding": [(32, 4)],
                "lstm/cell": [(4, 16), (4, 16), (16,)],
                "layer_normalization": [(4,), (4,)],
                "dense": [(4, 1), (1,)],
            },
        ),
        "bidirectional_gru": (
            gru,
            {
                "bidirectional/forward_layer/cell": [(3, 12), (4, 12), (2, 12)],
                "bidirectional/backward_layer/cell": [(3, 12), (4, 12), (2, 12)],
                "dense": [(8, 3), (3,)],
            },
        ),
        "string_lookup_inline": (
            lookup,
            {
                "string_lookup": [],
                "embedding": [(5, 4)],
                "global_average_pooling1d": [],
                "dense": [(4, 2), (2,)],
            },
        ),
        "integer_lookup_inline": (
            int_lookup,
            {"integer_lookup": [], "category_encoding": [], "dense": [(5, 2), (2,)]},
        ),
        "text_vectorization_inline": (
            text_vec,
            {"text_vectorization": [], "embedding": [(7, 4)], "global_average_pooling1d": []},
        ),
        "normalization_rescaling": (
            normalization,
            # an inline mean and variance are config, not variables
            {"normalization": [], "rescaling": [], "dense": [(3, 1), (1,)]},
        ),
        "functional_two_inputs": (
            functional,
            {
                "dense": [(4, 4), (4,)],
                "dense_1": [(3, 4), (4,)],
                "add": [],
                "concatenate": [],
                "dense_2": [(8, 1), (1,)],  # keys are class names in order, not layer names
            },
        ),
        "functional_attention": (
            attention,
            {
                "multi_head_attention/query_dense": [(8, 2, 4), (2, 4)],
                "multi_head_attention/key_dense": [(8, 2, 4), (2, 4)],
                "multi_head_attention/value_dense": [(8, 2, 4), (2, 4)],
                "multi_head_attention/output_dense": [(2, 4, 8), (8,)],
                "add": [],
                "layer_normalization": [(8,), (8,)],
                "conv1d": [(1, 8, 8), (8,)],
            },
        ),
    }


def _keras3_weights(
    variables: dict[str, list[tuple[int, ...]]], model_name: str, optimizer: bool
) -> bytes:
    import io

    import h5py

    rng = _rng(9)
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as h5:
        layers = h5.create_group("layers")
        for layer, shapes in variables.items():
            group = layers.require_group(layer).create_group("vars")
            group.attrs["name"] = layer.rsplit("/", 1)[-1]
            for i, shape in enumerate(shapes):
                group.create_dataset(str(i), data=rng.standard_normal(shape).astype(np.float32))
        if optimizer:
            opt = h5.create_group("optimizer").create_group("vars")
            opt.attrs["name"] = "adam"
            opt.create_dataset("0", data=np.int64(10))
            opt.create_dataset("1", data=np.float32(0.001))
        h5.create_group("vars").attrs["name"] = model_name
    return buffer.getvalue()


def _write_keras3(directory: Path, *, model: str, assets: bool = False) -> Path:
    config, variables = _keras_models()[model]
    path = directory / "model.keras"
    metadata = {"keras_version": _KERAS_VERSION, "date_saved": "2026-12-02@06:50:41"}
    with zipfile.ZipFile(path, "w") as zf:  # Keras writes its archive stored, not deflated
        zf.writestr("metadata.json", json.dumps(metadata))
        zf.writestr("config.json", json.dumps(config))
        compiled = "compile_config" in config
        zf.writestr(
            "model.weights.h5", _keras3_weights(variables, config["config"]["name"], compiled)
        )
        if assets:  # an adapted (not inline) vocabulary is saved as an asset file
            zf.writestr("assets/layers/string_lookup/vocabulary.txt", "[UNK]\ncat\ndog\nfish\n")
    return path


def _write_keras3_weights_only(directory: Path) -> Path:
    """model.save_weights('x.weights.h5'): the same HDF5 layout, outside any archive."""
    _, variables = _keras_models()["cnn"]
    path = directory / "model.weights.h5"
    path.write_bytes(_keras3_weights(variables, "sequential_1", False))
    return path


def _write_keras3_adapted_lookup(directory: Path) -> Path:
    config, variables = _keras_models()["string_lookup_inline"]
    config = json.loads(json.dumps(config))
    lookup = config["config"]["layers"][1]["config"]
    lookup["vocabulary"], lookup["vocabulary_size"] = None, 4
    path = directory / "model.keras"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(
            "metadata.json",
            json.dumps({"keras_version": _KERAS_VERSION, "date_saved": "2026-12-02@06:50:41"}),
        )
        zf.writestr("config.json", json.dumps(config))
        zf.writestr("model.weights.h5", _keras3_weights(variables, "sequential_4", False))
        zf.writestr("assets/layers/string_lookup/vocabulary.txt", "[UNK]\ncat\ndog\nfish")
    return path


# tf.keras 2.x (and Keras 3's legacy .h5 save): the model config and training config as root
# attributes, weights under model_weights/<layer>/<layer>/<var>:0 with layer_names and
# weight_names attributes.


def _legacy_layer(class_name: str, config: dict[str, Any]) -> Any:
    return {"class_name": class_name, "config": config}


def _legacy_models() -> dict[str, tuple[Any, dict[str, list[tuple[str, tuple[int, ...]]]]]]:
    dense = {
        "name": "dense",
        "trainable": True,
        "dtype": "float32",
        "units": 8,
        "activation": "relu",
        "use_bias": True,
        "kernel_initializer": {"class_name": "GlorotUniform", "config": {"seed": None}},
        "bias_initializer": {"class_name": "Zeros", "config": {}},
        "kernel_regularizer": None,
        "bias_regularizer": None,
        "activity_regularizer": None,
        "kernel_constraint": None,
        "bias_constraint": None,
    }
    head = dense | {"name": "dense_1", "units": 3, "activation": "softmax"}
    mlp = {
        "class_name": "Sequential",
        "config": {
            "name": "sequential",
            "layers": [
                _legacy_layer(
                    "InputLayer",
                    {
                        "batch_input_shape": [None, 4],
                        "dtype": "float32",
                        "sparse": False,
                        "ragged": False,
                        "name": "dense_input",
                    },
                ),
                _legacy_layer("Dense", dense),
                _legacy_layer(
                    "Dropout",
                    {
                        "name": "dropout",
                        "trainable": True,
                        "dtype": "float32",
                        "rate": 0.2,
                        "noise_shape": None,
                        "seed": None,
                    },
                ),
                _legacy_layer("Dense", head),
            ],
        },
    }
    conv = {
        "name": "conv2d",
        "trainable": True,
        "dtype": "float32",
        "filters": 4,
        "kernel_size": [3, 3],
        "strides": [1, 1],
        "padding": "valid",
        "data_format": "channels_last",
        "dilation_rate": [1, 1],
        "groups": 1,
        "activation": "relu",
        "use_bias": True,
    }
    cnn = {
        "class_name": "Sequential",
        "config": {
            "name": "sequential_1",
            "layers": [
                _legacy_layer(
                    "InputLayer",
                    {
                        "batch_input_shape": [None, 8, 8, 1],
                        "dtype": "float32",
                        "sparse": False,
                        "ragged": False,
                        "name": "conv2d_input",
                    },
                ),
                _legacy_layer("Conv2D", conv),
                _legacy_layer(
                    "BatchNormalization",
                    {
                        "name": "batch_normalization",
                        "trainable": True,
                        "dtype": "float32",
                        "axis": [3],
                        "momentum": 0.99,
                        "epsilon": 0.001,
                        "center": True,
                        "scale": True,
                    },
                ),
                _legacy_layer(
                    "MaxPooling2D",
                    {
                        "name": "max_pooling2d",
                        "trainable": True,
                        "dtype": "float32",
                        "pool_size": [2, 2],
                        "padding": "valid",
                        "strides": [2, 2],
                        "data_format": "channels_last",
                    },
                ),
                _legacy_layer(
                    "Flatten",
                    {
                        "name": "flatten",
                        "trainable": True,
                        "dtype": "float32",
                        "data_format": "channels_last",
                    },
                ),
                _legacy_layer("Dense", head | {"name": "dense", "units": 2}),
            ],
        },
    }
    text = {
        "class_name": "Functional",
        "config": {
            "name": "model",
            "layers": [
                {
                    "class_name": "InputLayer",
                    "config": {
                        "batch_input_shape": [None, 5],
                        "dtype": "int32",
                        "sparse": False,
                        "ragged": False,
                        "name": "tokens",
                    },
                    "name": "tokens",
                    "inbound_nodes": [],
                },
                {
                    "class_name": "Embedding",
                    "config": {
                        "name": "embedding",
                        "trainable": True,
                        "dtype": "float32",
                        "batch_input_shape": [None, None],
                        "input_dim": 32,
                        "output_dim": 4,
                        "mask_zero": False,
                        "input_length": None,
                    },
                    "name": "embedding",
                    "inbound_nodes": [[["tokens", 0, 0, {}]]],
                },
                {
                    "class_name": "LSTM",
                    "config": {
                        "name": "lstm",
                        "trainable": True,
                        "dtype": "float32",
                        "return_sequences": False,
                        "units": 4,
                        "activation": "tanh",
                        "recurrent_activation": "sigmoid",
                        "use_bias": True,
                        "unit_forget_bias": True,
                        "dropout": 0.0,
                        "recurrent_dropout": 0.0,
                        "implementation": 2,
                    },
                    "name": "lstm",
                    "inbound_nodes": [[["embedding", 0, 0, {}]]],
                },
                {
                    "class_name": "Dense",
                    "config": dense | {"units": 1, "activation": "sigmoid"},
                    "name": "dense",
                    "inbound_nodes": [[["lstm", 0, 0, {}]]],
                },
            ],
            "input_layers": [["tokens", 0, 0]],
            "output_layers": [["dense", 0, 0]],
        },
    }
    return {
        "mlp": (
            mlp,
            {
                "dense": [("kernel", (4, 8)), ("bias", (8,))],
                "dropout": [],
                "dense_1": [("kernel", (8, 3)), ("bias", (3,))],
            },
        ),
        "cnn": (
            cnn,
            {
                "conv2d": [("kernel", (3, 3, 1, 4)), ("bias", (4,))],
                "batch_normalization": [
                    ("gamma", (4,)),
                    ("beta", (4,)),
                    ("moving_mean", (4,)),
                    ("moving_variance", (4,)),
                ],
                "max_pooling2d": [],
                "flatten": [],
                "dense": [("kernel", (36, 2)), ("bias", (2,))],
            },
        ),
        "functional_lstm": (
            text,
            {
                "tokens": [],
                "embedding": [("embeddings", (32, 4))],
                "lstm": [
                    ("lstm_cell/kernel", (4, 16)),
                    ("lstm_cell/recurrent_kernel", (4, 16)),
                    ("lstm_cell/bias", (16,)),
                ],
                "dense": [("kernel", (4, 1)), ("bias", (1,))],
            },
        ),
    }


def _names_attr(names: list[str], *, fixed: bool) -> Array:
    """tf.keras 2 stores name lists as fixed-length bytes; Keras 3 as variable-length strings
    (and an empty list as an empty float array)."""
    import h5py

    if fixed:
        return np.array([n.encode() for n in names], dtype=f"S{max(map(len, names), default=1)}")
    if not names:
        return np.array([], dtype=np.float64)
    return np.array(names, dtype=h5py.string_dtype())


def _write_keras_h5(
    directory: Path,
    *,
    model: str,
    tf_keras: bool,
    weights_only: bool = False,
    training_config: bool = True,
) -> Path:
    import h5py

    config, variables = _legacy_models()[model]
    version, backend = ("2.15.0", "tensorflow") if tf_keras else (_KERAS_VERSION, "torch")
    path = directory / ("weights.h5" if weights_only else "model.h5")
    rng = _rng(10)
    string_dtype = h5py.string_dtype() if not tf_keras else None
    with h5py.File(path, "w") as h5:
        if weights_only:  # model.save_weights('weights.h5'): the weights group is the root
            weights = h5["/"]
        else:
            h5.attrs.create("model_config", json.dumps(config), dtype=string_dtype)
            h5.attrs["keras_version"] = version
            h5.attrs["backend"] = backend
            if training_config:
                training = {
                    "loss": "categorical_crossentropy",
                    "metrics": ["accuracy"],
                    "weighted_metrics": None,
                    "loss_weights": None,
                    "optimizer_config": {
                        "class_name": "Adam",
                        "config": {
                            "name": "Adam",
                            "learning_rate": 0.001,
                            "beta_1": 0.9,
                            "beta_2": 0.999,
                            "epsilon": 1e-07,
                            "amsgrad": False,
                        },
                    },
                }
                h5.attrs["training_config"] = json.dumps(training)
            weights = h5.create_group("model_weights")
        layer_names = list(variables)
        weights.attrs["layer_names"] = _names_attr(layer_names, fixed=tf_keras)
        weights.attrs["backend"] = backend
        weights.attrs["keras_version"] = version
        for layer, vars_ in variables.items():
            group = weights.create_group(layer)
            names = [
                f"{layer}/{v}:0" if tf_keras else f"{config['config']['name']}/{layer}/{v}"
                for v, _ in vars_
            ]
            group.attrs["weight_names"] = _names_attr(names, fixed=tf_keras)
            for name, (_, shape) in zip(names, vars_, strict=True):
                group.create_dataset(name, data=rng.standard_normal(shape).astype(np.float32))
        if tf_keras and not weights_only and training_config:
            opt = h5.create_group("optimizer_weights")
            opt.attrs["weight_names"] = _names_attr(["Adam/iter:0"], fixed=True)
            opt.create_dataset("Adam/iter:0", data=np.int64(25))
    return path


def _register_keras() -> None:
    for model in _keras_models():
        CORPUS[f"keras/v3/{model}"] = partial(_write_keras3, model=model)
    CORPUS["keras/v3/string_lookup_adapted_assets"] = _write_keras3_adapted_lookup
    CORPUS["keras/v3/weights_only"] = _write_keras3_weights_only
    for model in _legacy_models():
        CORPUS[f"keras/h5_tf_keras/{model}"] = partial(_write_keras_h5, model=model, tf_keras=True)
        CORPUS[f"keras/h5_keras3/{model}"] = partial(_write_keras_h5, model=model, tf_keras=False)
    CORPUS["keras/h5_tf_keras/weights_only"] = partial(
        _write_keras_h5, model="mlp", tf_keras=True, weights_only=True
    )
    CORPUS["keras/h5_tf_keras/uncompiled"] = partial(
        _write_keras_h5, model="cnn", tf_keras=True, training_config=False
    )


# --- ONNX ------------------------------------------------------------------------------------


def _onnx_model(kind: str, opset: int) -> Any:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = _rng(11)

    def init(name: str, array: Array) -> Any:
        return numpy_helper.from_array(array, name=name)

    def f32(*shape: int) -> Array:
        return rng.standard_normal(shape).astype(np.float32)

    def value(name: str, shape: list[Any], elem: int = TensorProto.FLOAT) -> Any:
        return helper.make_tensor_value_info(name, elem, shape)

    if kind == "mlp":
        nodes = [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1),
            helper.make_node("Relu", ["h"], ["a"]),
            helper.make_node("Gemm", ["a", "w2", "b2"], ["logits"], transB=1),
            helper.make_node("Softmax", ["logits"], ["y"], axis=1),
        ]
        inits = [
            init("w1", f32(8, 4)),
            init("b1", f32(8)),
            init("w2", f32(3, 8)),
            init("b2", f32(3)),
        ]
        inputs, outputs = [value("x", ["batch", 4])], [value("y", ["batch", 3])]
    elif kind == "cnn":
        nodes = [
            helper.make_node(
                "Conv", ["x", "conv_w", "conv_b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]
            ),
            helper.make_node(
                "BatchNormalization", ["c", "bn_s", "bn_b", "bn_m", "bn_v"], ["n"], epsilon=1e-5
            ),
            helper.make_node("Relu", ["n"], ["r"]),
            helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node("Flatten", ["p"], ["f"], axis=1),
            helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], transB=1),
        ]
        inits = [
            init("conv_w", f32(4, 1, 3, 3)),
            init("conv_b", f32(4)),
            init("bn_s", f32(4)),
            init("bn_b", f32(4)),
            init("bn_m", f32(4)),
            init("bn_v", np.abs(f32(4)) + 0.1),
            init("fc_w", f32(10, 64)),
            init("fc_b", f32(10)),
        ]
        inputs, outputs = [value("x", ["N", 1, 8, 8])], [value("y", ["N", 10])]
    elif kind == "attention":
        nodes = [
            helper.make_node("MatMul", ["x", "wq"], ["q"]),
            helper.make_node("MatMul", ["x", "wk"], ["k"]),
            helper.make_node("MatMul", ["x", "wv"], ["v"]),
            helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
            helper.make_node("MatMul", ["q", "kt"], ["s"]),
            helper.make_node("Mul", ["s", "scale"], ["ss"]),
            helper.make_node("Softmax", ["ss"], ["attn"], axis=-1),
            helper.make_node("MatMul", ["attn", "v"], ["o"]),
            helper.make_node("Reshape", ["o", "shape"], ["y"]),
        ]
        inits = [
            init("wq", f32(8, 8)),
            init("wk", f32(8, 8)),
            init("wv", f32(8, 8)),
            init("scale", np.array(8**-0.5, np.float32)),
            init("shape", np.array([0, -1], np.int64)),
        ]
        inputs, outputs = [value("x", ["B", 6, 8])], [value("y", ["B", 48])]
    elif kind == "embedding_layernorm":
        nodes = [
            helper.make_node("Gather", ["table", "ids"], ["e"], axis=0),
            helper.make_node(
                "LayerNormalization", ["e", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-5
            ),
        ]
        inits = [
            init("table", f32(32, 8)),
            init("gamma", np.ones(8, np.float32)),
            init("beta", np.zeros(8, np.float32)),
        ]
        inputs = [value("ids", ["B", "T"], TensorProto.INT64)]
        outputs = [value("y", ["B", "T", 8])]
    elif kind == "float16":
        nodes = [
            helper.make_node("MatMul", ["x", "w"], ["m"]),
            helper.make_node("Add", ["m", "b"], ["a"]),
            helper.make_node("Sigmoid", ["a"], ["y"]),
        ]
        inits = [init("w", f32(4, 4).astype(np.float16)), init("b", np.zeros(4, np.float16))]
        inputs = [value("x", [1, 4], TensorProto.FLOAT16)]
        outputs = [value("y", [1, 4], TensorProto.FLOAT16)]
    else:  # int8: dynamic quantisation as onnxruntime's quantizer writes it
        nodes = [
            helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
            helper.make_node("MatMulInteger", ["xq", "wq", "xz", "wz"], ["mi"]),
            helper.make_node("Cast", ["mi"], ["mf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["xs", "ws"], ["scale"]),
            helper.make_node("Mul", ["mf", "scale"], ["y"]),
        ]
        inits = [
            init("wq", rng.integers(0, 255, (4, 4)).astype(np.uint8)),
            init("wz", np.array(128, np.uint8)),
            init("ws", np.array(0.02, np.float32)),
        ]
        inputs, outputs = [value("x", [1, 4])], [value("y", [1, 4])]
    graph = helper.make_graph(
        nodes, f"tiny_{kind}", inputs, outputs, initializer=inits, doc_string=f"A tiny {kind} model"
    )
    ir = {9: 4, 11: 6, 13: 7, 15: 8, 17: 8, 18: 8, 21: 10}[opset]
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name="pytorch",
        producer_version="2.13.0",
        ir_version=ir,
    )
    helper.set_model_props(model, {"author": "acme", "license": "apache-2.0"})
    onnx.checker.check_model(model)
    return model


_ONNX_MODELS: dict[str, tuple[int, ...]] = {
    "mlp": (9, 11, 13, 17, 21),
    "cnn": (11, 13, 18),
    "attention": (13, 17),
    "embedding_layernorm": (17, 21),
    "float16": (13,),
    "int8": (13, 17),
}


def _write_onnx(directory: Path, *, kind: str, opset: int, external: str = "") -> Path:
    import onnx

    model = _onnx_model(kind, opset)
    path = directory / "model.onnx"
    if external == "one_file":
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            location="model.onnx.data",
            size_threshold=0,
        )
        return directory
    if external == "per_tensor":
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=False,
            size_threshold=0,
        )
        return directory
    if external == "hf_layout":  # optimum's export: onnx/model.onnx beside config.json
        (directory / "onnx").mkdir()
        onnx.save_model(model, str(directory / "onnx" / "model.onnx"))
        _write_json(
            directory / "config.json",
            {"architectures": ["MLP"], "model_type": "mlp", "num_labels": 3},
        )
        _write_json(directory / "ort_config.json", {"one_external_file": True, "opset": opset})
        return directory
    onnx.save_model(model, str(path))
    return path


def _register_onnx() -> None:
    for kind, opsets in _ONNX_MODELS.items():
        for opset in opsets:
            CORPUS[f"onnx/{kind}/opset{opset}"] = partial(_write_onnx, kind=kind, opset=opset)
    for external in ("one_file", "per_tensor", "hf_layout"):
        CORPUS[f"onnx/external/{external}"] = partial(
            _write_onnx, kind="cnn", opset=17, external=external
        )


# --- GGUF, and chat templates in Hugging Face directories ------------------------------------


def _gguf_tokens(count: int) -> tuple[list[str], list[int]]:
    special = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "[INST]", "[/INST]"]
    tokens = special + [f"▁t{i}" for i in range(count - len(special))]
    types = [3] * len(special) + [1] * (count - len(special))  # CONTROL, NORMAL
    return tokens, types


def _write_gguf(
    directory: Path,
    *,
    arch: str = "llama",
    template: str | None = None,
    quantized: bool = False,
    name: str = "tiny",
) -> Path:
    import gguf

    path = directory / f"{name}.gguf"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_license("apache-2.0")
    writer.add_file_type(7 if quantized else 1)  # MOSTLY_Q8_0 / MOSTLY_F16
    writer.add_quantization_version(2)
    writer.add_block_count(_LAYERS)
    writer.add_context_length(_POSITIONS)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(_HEADS)
    writer.add_head_count_kv(_KV_HEADS)
    writer.add_rope_dimension_count(32 // _HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    tokens, types = _gguf_tokens(_VOCAB)
    writer.add_tokenizer_model("llama" if arch != "gpt2" else "gpt2")
    writer.add_token_list(tokens)
    writer.add_token_scores([-float(i) for i in range(len(tokens))])
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    if template is not None:
        writer.add_chat_template(template)
    rng = _rng(12)
    writer.add_tensor("token_embd.weight", rng.standard_normal((_VOCAB, 32)).astype(np.float16))
    for i in range(_LAYERS):
        for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up"):
            rows = {"attn_k": 16, "attn_v": 16, "ffn_gate": 64, "ffn_up": 64}.get(t, 32)
            data = rng.standard_normal((rows, 32)).astype(np.float32)
            if quantized:
                q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
                writer.add_tensor(
                    f"blk.{i}.{t}.weight",
                    q,
                    raw_dtype=gguf.GGMLQuantizationType.Q8_0,
                )
            else:
                writer.add_tensor(f"blk.{i}.{t}.weight", data.astype(np.float16))
        writer.add_tensor(
            f"blk.{i}.ffn_down.weight", rng.standard_normal((32, 64)).astype(np.float16)
        )
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(32, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(32, np.float32))
    writer.add_tensor("output_norm.weight", np.ones(32, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _write_chat_model(directory: Path, *, template: str, placement: str) -> Path:
    """A chat model's Hugging Face directory carrying its template where transformers puts it:
    tokenizer_config.json (until 4.47), chat_template.jinja (since), chat_template.json
    (processors of vision models)."""
    config, shapes = _llama_like("llama")
    _save_weights(directory, _tensors(shapes), "safetensors", bf16=True)
    _write_hf_files(directory, "llama", config)
    in_config = template if placement == "tokenizer_config" else None
    _write_json(directory / "tokenizer_config.json", _tokenizer_config("llama", in_config))
    if placement == "jinja":
        (directory / "chat_template.jinja").write_text(template, encoding="utf-8")
    elif placement == "processor":
        _write_json(directory / "chat_template.json", {"chat_template": template})
    return directory


def _register_gguf() -> None:
    for i, (name, template) in enumerate(BENIGN_TEMPLATES.items()):
        CORPUS[f"gguf/template/{name}"] = partial(_write_gguf, template=template, name=name)
        CORPUS[f"chat_template/tokenizer_config/{name}"] = partial(
            _write_chat_model, template=template, placement="tokenizer_config"
        )
        placement = "processor" if "vision" in name or "-vl-" in name else "jinja"
        if placement == "processor" or i % 3 == 0:
            CORPUS[f"chat_template/{placement}/{name}"] = partial(
                _write_chat_model, template=template, placement=placement
            )
    for arch in ("llama", "qwen2", "gemma", "phi3"):
        CORPUS[f"gguf/arch/{arch}"] = partial(_write_gguf, arch=arch, name=f"tiny-{arch}")
    CORPUS["gguf/quantized_q8_0"] = partial(_write_gguf, quantized=True, name="tiny-q8_0")


_register_torch()
_register_numpy()
_register_pickles()
_register_safetensors()
_register_hugging_face()
_register_keras()
_register_onnx()
_register_gguf()
