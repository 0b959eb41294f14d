"""Pinned English prose shipped with preflight: training text, evaluation text and prompts.

The files under ``data/`` were generated once by :func:`build_corpus_files` on CPython 3.11 and
committed; at run time they are only read (``load_*``), so every machine measures the same
bytes whatever its Python's docstrings say.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

__all__ = [
    "DEFAULT_EVAL_DATASET",
    "EVAL_DATASETS",
    "EVAL_MODULES",
    "PROMPTS_FILE",
    "TRAIN_FILE",
    "TRAIN_MODULES",
    "EvalText",
    "build_corpus_files",
    "load_eval_text",
    "load_prompts",
    "load_training_text",
    "training_text_sha256",
]

DEFAULT_EVAL_DATASET = "builtin:preflight-eval-v1"
EVAL_DATASETS: dict[str, str] = {DEFAULT_EVAL_DATASET: "eval-v1.txt"}
TRAIN_FILE = "train-v1.txt"
PROMPTS_FILE = "prompts-v1.json"

# Pure-Python (or always built-in) and cross-platform, so any CPython 3.11 can rebuild the files.
TRAIN_MODULES: tuple[str, ...] = (
    "abc", "asyncio.base_events", "asyncio.events", "asyncio.locks", "asyncio.queues",
    "asyncio.streams", "asyncio.tasks", "base64", "bdb", "builtins", "cmd", "code", "codecs",
    "collections", "collections.abc", "configparser", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "decimal", "dis", "email.message", "email.parser", "email.policy", "email.utils",
    "enum", "filecmp", "fileinput", "ftplib", "functools", "getopt", "gettext", "graphlib", "gzip",
    "hashlib", "hmac", "http.client", "http.cookiejar", "http.server", "imaplib", "importlib.abc",
    "importlib.metadata", "inspect", "io", "ipaddress", "itertools", "linecache", "locale",
    "logging", "logging.handlers", "mailbox", "math", "mimetypes", "numbers", "operator",
    "optparse", "os", "pathlib", "pickle", "pickletools", "pkgutil", "platform", "plistlib",
    "poplib", "profile", "pstats", "pydoc", "queue", "random", "re", "runpy", "sched", "selectors",
    "shelve", "shutil", "smtplib", "socket", "socketserver", "string", "struct", "subprocess",
    "symtable", "sysconfig", "tarfile", "tempfile", "threading", "timeit", "tokenize", "traceback",
    "types", "typing", "unittest.case", "unittest.loader", "unittest.mock", "unittest.result",
    "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "webbrowser",
    "wsgiref.handlers", "wsgiref.simple_server", "xml.dom.minidom", "xml.etree.ElementTree",
    "xml.sax.handler", "xml.sax.saxutils", "xmlrpc.client", "xmlrpc.server", "zipfile",
    "zipimport",
)  # fmt: skip
# Disjoint from TRAIN_MODULES: the model never saw these docstrings.
EVAL_MODULES: tuple[str, ...] = (
    "argparse", "calendar", "difflib", "fnmatch", "fractions", "glob", "heapq", "json",
    "json.decoder", "json.encoder", "shlex", "statistics", "textwrap",
)  # fmt: skip

# No shared substring this long between training and evaluation text (the builder enforces it).
OVERLAP_WINDOW = 200
MIN_PARAGRAPH_CHARS = 24

_PROMPTS: tuple[str, ...] = (
    "Return a new list containing",
    "The default value of",
    "If the argument is omitted,",
    "Raise ValueError if",
    "This function returns",
    "The optional argument",
    "Return True if the",
    "Return the number of",
    "This method is called when",
    "If no such item exists,",
    "The file is opened in",
    "An exception is raised if",
    "Return a string representing",
    "This class provides",
    "The result is",
    "If the timeout is",
    "Return the value of",
    "Create a new",
    "The return value is",
    "When the object is",
    "Set the value of",
    "Convert a string to",
    "The first argument is",
    "Read and return",
    "Write the data to",
    "If the key is not found,",
    "Return an iterator over",
    "This is equivalent to",
    "The caller is responsible for",
    "By default, the",
    "Return the name of the",
    "Remove and return",
    "The encoding of the",
    "If the file does not exist,",
    "Return a copy of the",
    "Close the connection and",
    "The size of the buffer",
    "Return the current",
    "This module provides",
    "Each element of the sequence",
    "The keyword arguments are",
    "Return the absolute value of",
    "Parse the header and",
    "Return a tuple of",
    "The length of the",
    "Wait until the",
    "Return the path to",
    "The message is",
    "If the string is empty,",
    "Return a dictionary mapping",
)


@dataclass(frozen=True)
class EvalText:
    """An evaluation text as shipped: its name, contents and the digest of its bytes."""

    name: str
    text: str
    sha256: str
    n_bytes: int


def _read_data(filename: str) -> bytes:
    return resources.files("services.benchmarker").joinpath("data", filename).read_bytes()


def load_eval_text(name: str = DEFAULT_EVAL_DATASET) -> EvalText:
    """The named evaluation text from package data; ValueError names the known datasets."""
    filename = EVAL_DATASETS.get(name)
    if filename is None:
        known = ", ".join(sorted(EVAL_DATASETS))
        raise ValueError(f"unknown evaluation dataset {name!r}; known: {known}")
    raw = _read_data(filename)
    return EvalText(
        name=name,
        text=raw.decode("utf-8"),
        sha256=hashlib.sha256(raw).hexdigest(),
        n_bytes=len(raw),
    )


def load_training_text() -> str:
    """The text sample models are trained on (disjoint from every evaluation text)."""
    return _read_data(TRAIN_FILE).decode("utf-8")


def training_text_sha256() -> str:
    """sha256 of the training file's bytes: a change retrains every cached sample model."""
    return hashlib.sha256(_read_data(TRAIN_FILE)).hexdigest()


def load_prompts() -> list[str]:
    """The pinned prompts for temperature-0 consistency checks."""
    prompts = json.loads(_read_data(PROMPTS_FILE).decode("utf-8"))
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{PROMPTS_FILE} must be a JSON list of strings")
    return prompts


# --- How the files were made (run once; the output is committed) ---------------------------


def _documented_objects(module_name: str) -> Iterator[object]:
    """The module, then its public classes (with their own methods) and functions, sorted."""
    module = importlib.import_module(module_name)
    yield module
    namespace = vars(module)
    for name in sorted(namespace):
        obj = namespace[name]
        if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
            continue  # re-exports are documented where they are defined
        if inspect.isclass(obj):
            yield obj
            members = vars(obj)
            for member_name in sorted(members):
                member = members[member_name]
                if isinstance(member, staticmethod | classmethod):
                    member = member.__func__
                elif isinstance(member, property):
                    member = member.fget
                if not member_name.startswith("_") and inspect.isroutine(member):
                    yield member
        elif inspect.isroutine(obj):
            yield obj


def _is_prose(paragraph: str) -> bool:
    """Long enough, and mostly words rather than code, signatures or tables."""
    words = paragraph.split()
    plain = sum(w.isalpha() or (w[:-1].isalpha() and w[-1] in ",.;:") for w in words)
    return len(paragraph) >= MIN_PARAGRAPH_CHARS and len(words) >= 4 and plain >= 0.6 * len(words)


def _paragraphs(doc: str) -> Iterator[str]:
    """Prose paragraphs of a docstring: doctests and indented blocks dropped, spaces collapsed."""
    in_example = False
    paragraph: list[str] = []
    for line in [*inspect.cleandoc(doc).splitlines(), ""]:
        stripped = line.strip()
        if stripped.startswith(">>>"):
            in_example = True  # the example and its expected output run to the next blank line
        if not stripped:
            in_example = False
            # A paragraph that starts indented is a literal block (code after "::"), not prose.
            if paragraph and not paragraph[0][:1].isspace():
                text = " ".join(" ".join(paragraph).split())
                if _is_prose(text):
                    yield text
            paragraph = []
        elif not in_example:
            paragraph.append(line)


def _module_text(module_names: Iterable[str], seen: set[str]) -> list[str]:
    """One paragraph per line, a blank line between docstrings; repeats anywhere dropped."""
    blocks: list[str] = []
    for module_name in module_names:
        for obj in _documented_objects(module_name):
            # An object's own __doc__ (not inspect.getdoc): inherited docstrings would repeat.
            doc = getattr(obj, "__doc__", None)
            if not isinstance(doc, str):
                continue
            kept = []
            for paragraph in _paragraphs(doc):
                if paragraph not in seen:
                    seen.add(paragraph)
                    kept.append(paragraph)
            if kept:
                blocks.append("\n".join(kept))
    return blocks


def _windows(text: str, size: int) -> set[int]:
    return {hash(text[i : i + size]) for i in range(len(text) - size + 1)}


def _without_overlap(blocks: list[str], reference: str, size: int) -> list[str]:
    """Blocks sharing no ``size``-character substring with ``reference``."""
    ref_windows = _windows(reference, size)
    return [b for b in blocks if not (_windows(b, size) & ref_windows)]


def build_corpus_files(directory: Path) -> dict[str, str]:
    """Write train-v1.txt, eval-v1.txt and prompts-v1.json into ``directory``; return sha256s.

    The text is the docstrings of TRAIN_MODULES and EVAL_MODULES (disjoint lists) in this
    order: module, then each public class and its own public methods, then public functions,
    by sorted name. Doctest examples are dropped, each paragraph's whitespace is collapsed to
    single spaces, paragraphs shorter than MIN_PARAGRAPH_CHARS or seen before are dropped, and
    evaluation docstrings sharing any OVERLAP_WINDOW-character substring with the training text
    are left out. This is how the committed files were made (CPython 3.11); it is not run at
    run time, since docstrings differ between Python releases.
    """
    if set(TRAIN_MODULES) & set(EVAL_MODULES):
        raise ValueError("training and evaluation module lists overlap")
    directory.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # reading typing.io's docstring warns
        train_blocks = _module_text(TRAIN_MODULES, seen)
        eval_blocks = _module_text(EVAL_MODULES, seen)
    train = "\n\n".join(train_blocks) + "\n"
    eval_blocks = _without_overlap(eval_blocks, train, OVERLAP_WINDOW)
    evaluation = "\n\n".join(eval_blocks) + "\n"
    prompts = json.dumps(list(_PROMPTS), indent=2, ensure_ascii=False) + "\n"
    outputs = {
        TRAIN_FILE: train.encode("utf-8"),
        EVAL_DATASETS[DEFAULT_EVAL_DATASET]: evaluation.encode("utf-8"),
        PROMPTS_FILE: prompts.encode("utf-8"),
    }
    for filename, raw in outputs.items():
        (directory / filename).write_bytes(raw)
    return {filename: hashlib.sha256(raw).hexdigest() for filename, raw in outputs.items()}
