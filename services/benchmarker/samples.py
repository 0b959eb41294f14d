"""Small, really trained GPT-2-shaped sample models (good, regressed, nondeterministic), cached.

The trained variants follow one recipe on the pinned training text: a byte-level BPE tokenizer,
then a 2-layer GPT-2 trained with AdamW on CPU for a few seconds. "regressed" stops after a tenth
of the steps, so its perplexity on the evaluation text is clearly worse. "nondeterministic" is
the good model (its cache entry, its weights) shipped with BPE dropout left on in tokenizer.json:
a data-only mistake that makes tokenization, and so greedy outputs, vary from run to run. A model
is trained once per (variant, seed, recipe, training text) and copied from the cache after that.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final, Literal, get_args

import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from services.benchmarker.corpus import load_training_text, training_text_sha256

__all__ = [
    "CACHE_DIR_ENV",
    "END_OF_TEXT",
    "MANIFEST",
    "RECIPES",
    "RECIPE_VERSION",
    "TOKENIZER_DROPOUT",
    "VARIANTS",
    "Recipe",
    "TrainedVariant",
    "Variant",
    "cache_key",
    "default_cache_dir",
    "set_tokenizer_dropout",
    "train_model",
    "train_tokenizer",
    "trained_as",
    "training_steps",
    "write_trained_model",
]

TrainedVariant = Literal["good", "regressed"]
Variant = Literal["good", "regressed", "nondeterministic"]
VARIANTS: Final[tuple[Variant, ...]] = get_args(Variant)
# The BPE dropout the nondeterministic variant ships with: the value the BPE-dropout paper trains
# with. Per prompt, about half of the 50 pinned prompts' greedy outputs differ between two runs.
TOKENIZER_DROPOUT: Final = 0.1

# Bump when the training code changes in a way the Recipe fields do not show.
RECIPE_VERSION: Final = 1
CACHE_DIR_ENV: Final = "PREFLIGHT_CACHE_DIR"
END_OF_TEXT: Final = "<|endoftext|>"
MANIFEST: Final = "preflight-manifest.json"
WEIGHTS: Final = "model.safetensors"
# Files a sample model must never contain: code, or weights in a pickle-based format.
FORBIDDEN_SUFFIXES: Final = (".py", ".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained weights, apart from the seed and the text."""

    steps: int
    vocab_size: int = 1024
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_positions: int = 256
    block_size: int = 64  # generalises to 256-token windows about as well as 128 (measured)
    batch_size: int = 16
    learning_rate: float = 3e-3  # 4e-3 is as good; 5e-3 and above stall at a worse loss
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0


RECIPES: Final[dict[TrainedVariant, Recipe]] = {
    "good": Recipe(steps=500),
    # Same recipe, a tenth of the steps: an undertrained release, the regression to catch.
    "regressed": Recipe(steps=50),
}


def trained_as(variant: Variant) -> TrainedVariant:
    """The trained variant whose weights (and cache entry) ``variant`` ships."""
    return "good" if variant == "nondeterministic" else variant


def training_steps(variant: Variant) -> int:
    """Optimizer steps the variant's weights were trained for."""
    return RECIPES[trained_as(variant)].steps


def cache_key(variant: TrainedVariant, seed: int, train_sha256: str) -> str:
    """sha256 over everything that decides the output: variant, seed, recipe, training text.

    Also transformers' major version: 4.x cannot load the tokenizer class name 5.x saves.
    """
    key = {
        "transformers_major": transformers.__version__.split(".")[0],
        "variant": variant,
        "seed": seed,
        "recipe_version": RECIPE_VERSION,
        "recipe": asdict(RECIPES[variant]),
        "train_sha256": train_sha256,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def default_cache_dir() -> Path:
    """``$PREFLIGHT_CACHE_DIR``, else ``~/.cache/preflight/models``."""
    configured = os.environ.get(CACHE_DIR_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "preflight" / "models"


def write_trained_model(
    directory: Path,
    *,
    variant: Variant = "good",
    seed: int = 0,
    cache_dir: Path | None = None,
) -> Path:
    """Write a trained model, its tokenizer, a sha256 manifest and a model card to ``directory``.

    The first call for a (variant, seed) trains (seconds on CPU) into the cache; later calls
    copy the cached files. "nondeterministic" copies the good model's entry (training it first
    if needed), then turns on BPE dropout in the copy's tokenizer. ``cache_dir`` defaults to
    :func:`default_cache_dir`.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    trained = trained_as(variant)
    cache_root = cache_dir if cache_dir is not None else default_cache_dir()
    entry = cache_root / f"{trained}-seed{seed}-{cache_key(trained, seed, training_text_sha256())}"
    if not (entry / MANIFEST).is_file():
        _train_into_cache(entry, trained, seed)
    # Copies, not hard links: a caller that edits its copy (say, to tamper with the weights in
    # a test, or to set the tokenizer's dropout below) must not change the cached model.
    shutil.copytree(entry, directory, dirs_exist_ok=True)
    if variant == "nondeterministic":
        set_tokenizer_dropout(directory, TOKENIZER_DROPOUT)
        card = directory / "README.md"
        card.write_text(_nondeterministic_card(card.read_text(), seed))
    return directory


def set_tokenizer_dropout(directory: Path, dropout: float | None) -> None:
    """Set the BPE dropout of the tokenizer in ``directory`` (``None`` turns it off).

    Edits ``tokenizer.json`` in place, which is all a deployment ships: transformers' fast
    tokenizer then drops each merge with this probability on every encode.
    """
    if dropout is not None and not 0.0 < dropout <= 1.0:
        raise ValueError(f"BPE dropout must be in (0, 1] or None, not {dropout}")
    path = directory / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else None
        raise ValueError(f"{path}: dropout needs a BPE tokenizer model, not {kind!r}")
    model["dropout"] = dropout
    path.write_text(json.dumps(spec, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _train_into_cache(entry: Path, variant: TrainedVariant, seed: int) -> None:
    """Train in a temporary directory beside ``entry`` and rename it into place."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        _write_model_files(staging, variant, seed)
        staging.chmod(0o755)  # mkdtemp's 0700 would follow every copy
        for path in staging.iterdir():
            path.chmod(0o644)
        try:
            staging.rename(entry)
        except OSError:
            if not (entry / MANIFEST).is_file():  # not a concurrent writer that got there first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_model_files(directory: Path, variant: TrainedVariant, seed: int) -> None:
    recipe = RECIPES[variant]
    text = load_training_text()
    tokenizer = train_tokenizer(text, recipe.vocab_size)
    model, final_loss = train_model(tokenizer, text, recipe, seed)
    model.save_pretrained(directory)  # safetensors is the only format transformers 5 writes
    _wrap_tokenizer(tokenizer, recipe).save_pretrained(directory)
    forbidden = sorted(p.name for p in directory.rglob("*") if p.suffix in FORBIDDEN_SUFFIXES)
    if forbidden or not (directory / WEIGHTS).is_file():
        raise RuntimeError(f"unexpected sample model files: {forbidden or 'no ' + WEIGHTS}")
    digest = hashlib.sha256((directory / WEIGHTS).read_bytes()).hexdigest()
    (directory / MANIFEST).write_text(json.dumps({WEIGHTS: digest}, indent=2) + "\n")
    (directory / "README.md").write_text(_model_card(variant, seed, recipe, final_loss))


def train_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer (GPT-2 style) trained on ``text``; deterministic."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_documents(text), trainer)
    return tokenizer


def _documents(text: str) -> list[str]:
    """The training text's docstrings (separated by blank lines)."""
    return [doc for doc in text.split("\n\n") if doc.strip()]


def _wrap_tokenizer(tokenizer: Tokenizer, recipe: Recipe) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        model_max_length=recipe.n_positions,
    )


def train_model(
    tokenizer: Tokenizer, text: str, recipe: Recipe, seed: int
) -> tuple[GPT2LMHeadModel, float]:
    """Train a GPT-2-shaped model from scratch; returns it and its mean loss over the last steps."""
    eos_id = tokenizer.token_to_id(END_OF_TEXT)
    if eos_id is None:
        raise ValueError(f"the tokenizer lacks {END_OF_TEXT}")
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(_documents(text)):
        ids += [*encoding.ids, eos_id]
    data = torch.tensor(ids, dtype=torch.long)
    config = GPT2Config(
        vocab_size=tokenizer.get_vocab_size(),
        n_positions=recipe.n_positions,
        n_embd=recipe.n_embd,
        n_layer=recipe.n_layer,
        n_head=recipe.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    losses: list[float] = []
    with _deterministic(seed):
        model = GPT2LMHeadModel(config)
        batches = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: _lr_factor(step, recipe)
        )
        model.train()
        for _ in range(recipe.steps):
            starts = torch.randint(0, len(data) - recipe.block_size - 1, (recipe.batch_size,),
                                   generator=batches)  # fmt: skip
            window = torch.stack([data[s : s + recipe.block_size + 1] for s in starts.tolist()])
            logits = model(input_ids=window[:, :-1]).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), window[:, 1:].reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
    tail = losses[-max(1, len(losses) // 10) :]
    return model, sum(tail) / len(tail)


def _lr_factor(step: int, recipe: Recipe) -> float:
    """Linear warmup, then cosine decay to zero at the last step."""
    warmup = max(1, round(recipe.steps * recipe.warmup_fraction))
    progress = min(step, recipe.steps) / recipe.steps
    return min(1.0, (step + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * progress))


@contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    """Seeded, deterministic, single-threaded; the caller's RNG state and settings are restored.

    One thread: the matrices are tiny, the result no longer depends on the core count, and a
    busy machine does not leave OpenMP threads spinning while they wait for each other (which
    made training 3-20x slower on a loaded 2-core machine).
    """
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(deterministic)


def _model_card(variant: TrainedVariant, seed: int, recipe: Recipe, final_loss: float) -> str:
    settings = "\n".join(f"- {name}: {value}" for name, value in asdict(recipe).items())
    return (
        f"# preflight sample model ({variant}, seed {seed})\n\n"
        "A small GPT-2-shaped causal language model trained locally by preflight "
        "(`services.benchmarker.samples`) on the docstrings in `train-v1.txt`. It exists to "
        "exercise the validator and benchmarker; it is not useful for anything else.\n\n"
        + (
            "This is the *regressed* variant: the same recipe stopped early, so its perplexity "
            "is clearly worse than the good variant's.\n\n"
            if variant == "regressed"
            else ""
        )
        + f"## Recipe (version {RECIPE_VERSION})\n\n{settings}\n\n"
        f"Final training loss (mean of the last tenth of steps): {final_loss:.3f}\n\n"
        "Weights: `model.safetensors` (sha256 in `preflight-manifest.json`). License: Apache-2.0.\n"
    )


def _nondeterministic_card(good_card: str, seed: int) -> str:
    """The good model's card, retitled, saying what is wrong with this copy."""
    _, _, rest = good_card.partition("\n\n")  # drop the good model's title
    problem = (
        "This is the *nondeterministic* variant: the good variant's weights, unchanged, with a "
        f"tokenizer that ships BPE dropout {TOKENIZER_DROPOUT} (`tokenizer.json`: "
        f'`"model": {{"type": "BPE", "dropout": {TOKENIZER_DROPOUT}}}`). Dropout is a '
        "training-time regulariser that was left on: each merge is skipped at random on every "
        "encode, so the same prompt is split into different tokens from run to run and greedy "
        '(temperature 0) outputs differ. No code is involved; the fix is `"dropout": null`.\n\n'
    )
    title = f"# preflight sample model (nondeterministic, seed {seed})\n\n"
    body, marker, recipe = rest.partition("## Recipe")
    if not marker:  # a card in some other shape: keep all of it, say what is wrong first
        return title + problem + rest
    return title + body + problem + marker + recipe
