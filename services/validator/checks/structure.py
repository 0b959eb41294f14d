"""Check: files are structurally sound, from headers only (no tensor data is read)."""

from __future__ import annotations

import json
import math
import re
import time
import zipfile
from collections import Counter
from pathlib import PurePosixPath
from typing import Any

from services.contracts.events import CheckResult, Status
from services.validator.checks.base import (
    CheckContext,
    on_time,
    result,
    summarise_findings,
    timed,
)
from services.validator.checks.hdf5 import read_hdf5
from services.validator.checks.headers import (
    HeaderError,
    ParsedHeaders,
    SafetensorsHeader,
    check_protobuf,
    parsed_headers,
)
from services.validator.checks.inventory import MAX_JSON_BYTES, Inventory, Kind, ModelFile

NAME = "structure"
MAX_LAYERS = 1_000_000
"""Past this, a layer count is only compared through the parameters it implies."""
PARAMETER_SLACK = 32
"""How many times fewer elements than config.json's least parameter count the weights may hold
(packed quantized weights hold 2 to 16 parameters per element)."""

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|block)\.(\d+)\.")  # h.0. (BLOOM)
_EMBEDDING_NAMES = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "tok_embeddings.weight",
    "token_embd.weight",
)


def check_structure(inv: Inventory, ctx: CheckContext) -> CheckResult:
    started = time.perf_counter()
    headers = parsed_headers(ctx.shared)
    findings: list[str] = []
    tensors: dict[str, tuple[int, ...]] = {}
    checked = 0
    for f in inv.files:
        on_time()
        found: list[str] = []
        if f.kind is Kind.SAFETENSORS:
            found = _safetensors(f, headers, tensors)
        elif f.kind is Kind.SAFETENSORS_INDEX:
            found = _shard_index(f, inv, headers)
        elif f.kind is Kind.GGUF:
            found = _gguf(f, headers, tensors)
        elif f.kind is Kind.ONNX:
            found = _onnx(f, inv, headers)
        elif f.kind is Kind.TF_SAVED_MODEL:
            found = _saved_model(f, inv)
        elif f.kind in (Kind.PYTORCH_ZIP, Kind.KERAS_ZIP, Kind.NUMPY_ZIP):
            found = _zip(f)
        elif f.kind is Kind.KERAS_H5:
            found = _h5(f)
        else:
            continue
        checked += 1
        findings += [f"{f.rel}: {problem}" for problem in found]
    if inv.config is not None and tensors:
        findings += [f"config.json: {p}" for p in _config_consistency(inv.config, tensors)]
    details = {"files_checked": checked, "tensors": len(tensors)}
    if findings:
        return result(
            NAME,
            Status.FAILED,
            summarise_findings(findings),
            started=started,
            details=details | {"findings": findings},
        )
    if checked == 0:
        return result(
            NAME,
            Status.SKIPPED,
            "no weight files with a structure to check",
            started=started,
            details=details,
        )
    reason = f"{checked} files, {len(tensors)} tensors: headers consistent"
    return result(NAME, Status.PASSED, reason, started=started, details=details)


def _safetensors(
    f: ModelFile, headers: ParsedHeaders, tensors: dict[str, tuple[int, ...]]
) -> list[str]:
    parsed = headers.safetensors(f.path)
    if isinstance(parsed, HeaderError):
        return [str(parsed)]
    for name, tensor in parsed.tensors.items():
        tensors[name] = tensor.shape
    return list(parsed.problems)


def _shard_index(f: ModelFile, inv: Inventory, headers: ParsedHeaders) -> list[str]:
    try:
        index = json.loads(f.path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        return [f"not a usable shard index: {exc}"]
    problems: list[str] = []
    base = PurePosixPath(f.rel).parent
    shards: dict[str, SafetensorsHeader | None] = {}
    rels: dict[str, str] = {}  # shard name -> path: a few shards, named by every tensor
    missing_by_shard: dict[str, int] = {}
    for tensor, shard in timed(weight_map.items()):  # 2.2 million fit in 64 MiB
        name = str(shard)
        rel = rels.get(name)
        if rel is None:
            rel = rels[name] = (base / name).as_posix()
        if rel not in shards:
            entry = inv.named(rel)
            if entry is None:
                problems.append(f"shard {shard} is missing")
                shards[rel] = None
            elif entry.kind is not Kind.SAFETENSORS:
                # transformers picks a shard's reader by its name: an index pointing at a .bin
                # pickle made it torch.load a folder file, whatever use_safetensors says.
                problems.append(
                    f"shard {shard} is not a safetensors file ({entry.detail or entry.kind}): "
                    "the loader would read it with torch.load"
                )
                shards[rel] = None
            else:
                parsed = headers.safetensors(entry.path)
                shards[rel] = None if isinstance(parsed, HeaderError) else parsed
        header = shards[rel]
        if header is not None and tensor not in header.tensors:
            missing_by_shard[str(shard)] = missing_by_shard.get(str(shard), 0) + 1
            if missing_by_shard[str(shard)] <= 3:
                problems.append(f"{tensor} is not in its shard {shard}")
    for shard, count in missing_by_shard.items():
        if count > 3:
            problems.append(f"{count - 3} more tensors missing from {shard}")
    return problems


def _gguf(f: ModelFile, headers: ParsedHeaders, tensors: dict[str, tuple[int, ...]]) -> list[str]:
    parsed = headers.gguf(f.path)
    if isinstance(parsed, HeaderError):
        return [str(parsed)]
    seen: Counter[str] = Counter()
    for t in timed(parsed.tensors):
        tensors[t.name] = tuple(reversed(t.dims))  # GGUF lists dims fastest-first
        seen[t.name] += 1
    twice = [(name, n) for name, n in seen.items() if n > 1]
    problems = list(parsed.problems)
    for name, n in twice[:3]:  # ggml's gguf reader refuses the file on the first
        problems.append(f"tensor {name!r} is named {n} times (llama.cpp refuses the file)")
    if len(twice) > 3:
        problems.append(f"{len(twice) - 3} more tensor names repeat")
    return problems


def _onnx(f: ModelFile, inv: Inventory, headers: ParsedHeaders) -> list[str]:
    parsed = headers.onnx(f.path)
    if isinstance(parsed, HeaderError):
        return [str(parsed)]
    problems = []
    base = PurePosixPath(f.rel).parent
    for location, offset, length in parsed.external:
        entry = inv.named((base / location).as_posix())
        if entry is None:
            continue  # the format check names missing or escaping references
        end = offset + (length if length is not None else 0)
        if end > entry.size:
            problems.append(
                f"external data {location} [{offset}, {end}) runs past its {entry.size}-byte file"
            )
    return problems


def _saved_model(f: ModelFile, inv: Inventory) -> list[str]:
    if f.path.name.endswith(".pbtxt"):
        return []
    try:
        problems = check_protobuf(f.path, {2: "meta_graphs"})
    except HeaderError as exc:
        return [f"saved_model.pb is not valid protobuf: {exc}"]
    variables = PurePosixPath(f.rel).parent / "variables"
    shards = [
        g for g in inv.files if PurePosixPath(g.rel).parent == variables and ".data-" in g.rel
    ]
    expected: set[str] = set()
    for shard in shards:
        match = re.search(r"\.data-(\d+)-of-(\d+)$", shard.rel)
        if match:
            total = int(match.group(2))
            expected |= {f"{i:05d}-of-{total:05d}" for i in range(total)}
    present = {re.sub(r"^.*\.data-", "", s.rel) for s in shards}
    problems += [f"variables shard {name} is missing" for name in sorted(expected - present)]
    return problems


def _zip(f: ModelFile) -> list[str]:
    try:
        with zipfile.ZipFile(f.path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        return [f"archive does not open (truncated?): {exc}"]
    if f.kind is Kind.PYTORCH_ZIP:
        prefix = next(n for n in names if n.endswith("data.pkl")).rsplit("data.pkl", 1)[0]
        if not any(n in (f"{prefix}version", f"{prefix}.data/version") for n in names):
            return ["PyTorch archive without a version record"]
    elif f.kind is Kind.KERAS_ZIP:
        try:
            with zipfile.ZipFile(f.path) as zf:
                size = zf.getinfo("config.json").file_size
                if size > MAX_JSON_BYTES:  # read() inflates it all first: 1 GB took 8.4 s
                    return [
                        f"Keras archive config.json inflates to {size:,} bytes, more than the "
                        f"{MAX_JSON_BYTES:,} a config is read to"
                    ]
                json.loads(zf.read("config.json"))
        except (KeyError, ValueError, zipfile.BadZipFile, RecursionError) as exc:
            return [f"Keras archive config.json unreadable: {type(exc).__name__}: {exc}"]
    return []


def _h5(f: ModelFile) -> list[str]:
    read = read_hdf5(f.path)  # in a child process: libhdf5 is C
    return [] if read.problem is None else [f"HDF5 file does not open: {read.problem}"]


def _least_per_layer(config: dict[str, Any], hidden: int) -> int:
    """The fewest parameters one layer of this config can have: the attention's query and
    output projections (as wide as heads x head_dim where those are given), and the MLP's two
    projections per expert where an intermediate size is given (review 14 grew folders of
    300 KB to 2-4 GB with intermediate_size, num_local_experts or head_dim alone)."""
    heads = _first(config, "num_attention_heads", "n_head", "num_heads")
    head_dim = _first(config, "head_dim")
    width = heads * head_dim if heads and head_dim and heads > 0 and head_dim > 0 else hidden
    least = 2 * hidden * width
    inner = _first(config, "intermediate_size", "n_inner", "ffn_dim", "d_ff")
    experts = _first(config, "num_local_experts", "num_experts", "n_routed_experts")
    if experts is not None and experts > 1:
        # An expert's own width where the config gives one (DeepSeek, Qwen-MoE: narrower than
        # the dense layers' intermediate_size, which only a few layers use).
        inner = _first(config, "moe_intermediate_size", "expert_intermediate_size") or inner
    if inner is not None and inner > 0:
        least += 2 * hidden * inner * max(experts or 1, 1)
    return least


LEARNED_POSITIONS = frozenset(
    {
        # learned tables
        "opt", "gpt_neo", "bert", "roberta", "xlm-roberta", "distilbert", "electra", "biogpt",
        "camembert", "ernie", "mpnet", "layoutlm", "megatron-bert", "data2vec-text", "xmod",
        "bart", "mbart", "plbart", "mvp", "blenderbot", "blenderbot-small", "xlm", "flaubert",
        # sinusoidal tables: computed, but allocated all the same
        "marian", "pegasus", "m2m_100", "nllb-moe", "xglm", "speech_to_text", "trocr",
    }
)  # fmt: skip
"""Model types whose `max_position_embeddings` is a table the loader allocates (rotary and
ALiBi models have none: there it only bounds the context)."""
POSITION_KEYS = (
    "max_source_positions",  # Whisper, Speech2Text
    "max_target_positions",
    "max_encoder_position_embeddings",  # LED
    "max_decoder_position_embeddings",
)


def _learned_positions(config: dict[str, Any]) -> int:
    """Rows of position (and token type) tables: GPT-2's `n_positions`, `max_position_embeddings`
    of the types above, the encoder's and decoder's tables where a config names both, and BERT's
    `type_vocab_size` (review 14: `n_positions: 1e7` with no `wpe` tensor was built from random
    numbers, gigabytes from a folder of kilobytes; review 15 the same with BART's positions and
    BERT's token types)."""
    rows = _first(config, "n_positions")
    if rows is None and config.get("model_type") in LEARNED_POSITIONS:
        rows = _first(config, "max_position_embeddings")
    total = max(rows or 0, 0)
    for key in (*POSITION_KEYS, "type_vocab_size"):
        total += max(_first(config, key) or 0, 0)
    return total


def _towers(config: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The sub-models a config declares besides its text model (`vision_config`,
    `audio_config`, ...): transformers builds each, from random numbers when the weights lack
    it (review 14: a Gemma 3 vision tower of 2048 x 10 layers from a 300 KB folder)."""
    return [
        (key, value)
        for key, value in config.items()
        if key.endswith("_config") and key != "text_config" and isinstance(value, dict)
    ]


def _least_of_tower(tower: dict[str, Any]) -> int:
    """A sub-model's layers (however many: review 15's tower of 1,000,001 layers was not
    counted at all) and its patch position table (image_size / patch_size, squared)."""
    hidden = _first(tower, "hidden_size", "d_model", "embed_dim")
    layers = _first(tower, "num_hidden_layers", "num_layers", "depth")
    if not (hidden and hidden > 0):
        return 0
    least = layers * _least_per_layer(tower, hidden) if layers and layers > 0 else 0
    image, patch = _first(tower, "image_size"), _first(tower, "patch_size")
    if image and patch and image > 0 and patch > 0:
        least += (image // patch) ** 2 * hidden
    return least + _learned_positions(tower) * hidden


def _count(n: int, *, grouped: bool = True) -> str:
    """A count for a message; a config's 4,000-digit number cannot even be printed whole."""
    if n >= 10**18:
        return "over 10^18"
    return f"{n:,}" if grouped else str(n)


def _first(config: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    nested = config.get("text_config")
    if isinstance(nested, dict):
        return _first(nested, *keys)
    return None


def _config_consistency(config: dict[str, Any], tensors: dict[str, tuple[int, ...]]) -> list[str]:
    """config.json must describe the tensors that ship with it."""
    problems = []
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    vocab = _first(config, "vocab_size", "n_vocab")
    layers = _first(config, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
    embedding = next(
        (shape for name, shape in tensors.items() if name.endswith(_EMBEDDING_NAMES)), None
    )
    if embedding is not None and len(embedding) == 2:
        rows, cols = embedding
        # A factorised embedding is narrower than the model: ALBERT's embedding_size, OPT-350m's
        # word_embed_proj_dim (projected in and out).
        widths = {hidden, _first(config, "embedding_size"), _first(config, "word_embed_proj_dim")}
        if hidden is not None and cols not in widths:
            problems.append(f"hidden size {hidden} but the embedding is {rows} x {cols}")
        if vocab is not None and rows != vocab:
            problems.append(f"vocab_size {vocab} but the embedding has {rows} rows")
    stacks: dict[str, set[int]] = {}
    for name in tensors:
        if (m := _LAYER_INDEX.search(name)) is not None:
            stacks.setdefault(name[: m.start(1)], set()).add(int(m.group(1)))
    if layers is not None and 0 < layers <= MAX_LAYERS and stacks:
        # Layers the weights lack are built from random numbers; more than declared is common
        # and fine (a vision tower's blocks, a decoder deeper than the encoder, DeepSeek's
        # multi-token-prediction layer at index num_hidden_layers). So only missing ones fail,
        # in the stack that has the most; models that share layers (ALBERT) name none. (More
        # layers than MAX_LAYERS: the parameter count below says it.)
        def present(indices: set[int]) -> int:
            return sum(1 for i in indices if i < layers)

        prefix, indices = max(stacks.items(), key=lambda kv: present(kv[1]))
        have = present(indices)
        if have < layers:
            missing = [i for i in range(layers) if i not in indices][:5]
            shown = ", ".join(map(str, missing)) + (" ..." if layers - have > 5 else "")
            problems.append(
                f"{layers} layers in config, tensors under {prefix!r} for {have} of them "
                f"(missing {shown})"
            )
    if hidden and layers and hidden > 0 and layers > 0:
        # Names and counts can be made to match with one tiny tensor per layer, or no
        # embedding at all: what the weights hold against what the config makes the loader
        # build cannot. At least the attention's query and output projections per layer, and
        # the embedding once; 32x slack for packed quantized weights (4-bit packs 8 to an int32).
        parts = [
            f"{_count(layers, grouped=False)} layers of hidden size {_count(hidden, grouped=False)}"
        ]
        declared = layers * _least_per_layer(config, hidden) + max(vocab or 0, 0) * hidden
        if positions := _learned_positions(config):
            declared += positions * hidden
            parts.append(f"position and token-type tables of {_count(positions)} rows")
        for name, tower in _towers(config):
            if least := _least_of_tower(tower):
                declared += least
                parts.append(f"a {name} of at least {_count(least)}")
        held = sum(math.prod(shape) for shape in tensors.values())
        if held * PARAMETER_SLACK < declared:
            problems.append(
                f"declares at least {_count(declared)} parameters ({', '.join(parts)}), the "
                f"weights hold {_count(held)}: the loader would build the rest from random numbers"
            )
    return problems
