"""Keras layers and TensorFlow ops that reach outside the model: found, named, and never run."""

from __future__ import annotations

import base64
import json
import mmap
import random
import subprocess
import sys
import zipfile
from collections import deque
from pathlib import Path
from typing import Any

import pytest

from services.validator.checks import keras_tf
from services.validator.checks.keras_tf import (
    DANGEROUS_TF_OPS,
    TF_OPS_NOT_FLAGGED,
    keras_layer_issue,
    saved_model_op_issues,
)
from tests.unit.validator import keras_tf_fixtures as fx
from tests.unit.validator.hostile import marker
from tests.unit.validator.keras_tf_fixtures import BENIGN, EXPECTED, HOSTILE


def config_issues(config: Any, where: str = "") -> list[str]:
    """keras_layer_issue on every Keras object of a config, as the unsafe-code walker calls it."""
    issues: list[str] = []
    queue: deque[Any] = deque([config])
    while queue:
        node = queue.popleft()
        if isinstance(node, list):
            queue.extend(node)
        elif isinstance(node, dict):
            issue = keras_layer_issue(node)
            if issue is not None:
                issues.append(where + issue)
            queue.extend(node.values())
    return issues


def findings(path: Path) -> list[str]:
    """What the scans find in a fixture: a SavedModel directory or a .keras archive."""
    if path.is_dir():
        return saved_model_op_issues((path / "saved_model.pb").read_bytes())
    found: list[str] = []
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            if name == "config.json":
                found += config_issues(json.loads(zf.read(name)), f"{name}: ")
            elif name.endswith("saved_model.pb"):
                found += [f"{name}: {m}" for m in saved_model_op_issues(zf.read(name))]
    return found


# --- Fixtures ------------------------------------------------------------------------------


def test_every_hostile_fixture_has_an_expectation() -> None:
    assert set(EXPECTED) == set(HOSTILE)
    assert not set(HOSTILE) & set(BENIGN)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_fixture_is_found_named_and_nothing_runs(name: str, tmp_path: Path) -> None:
    found = findings(HOSTILE[name](tmp_path))
    assert found
    for expected in EXPECTED[name]:
        assert any(expected in f for f in found), (expected, found)
    assert not any("does not parse" in f for f in found), found  # the encoder writes valid pb
    assert not marker(tmp_path).exists()


@pytest.mark.parametrize("name", sorted(BENIGN))
def test_benign_fixture_has_no_findings(name: str, tmp_path: Path) -> None:
    assert findings(BENIGN[name](tmp_path)) == []


def test_hostile_saved_models_hold_the_whole_benign_graph_and_only_their_op_is_found(
    tmp_path: Path,
) -> None:
    # Every hostile SavedModel is the benign serving graph plus one op: exactly one finding.
    for name in sorted(n for n in HOSTILE if n.startswith("saved_model_")):
        found = findings(HOSTILE[name](tmp_path / name))
        assert len(found) == 1, (name, found)


# TorchModuleWrapper.from_config: base64-decode config["module"], then torch.load(..., False).
_TORCH_WRAPPER_LOADER = """
import base64, io, json, sys, zipfile, pickle
with zipfile.ZipFile(sys.argv[1]) as zf:
    config = json.loads(zf.read("config.json"))
layer = next(l for l in config["config"]["layers"] if l["class_name"] == "TorchModuleWrapper")
blob = io.BytesIO(base64.b64decode(layer["config"]["module"]))
{load}
"""


@pytest.mark.parametrize(
    "load",
    [
        "pickle.load(zipfile.ZipFile(blob).open('archive/data.pkl'))",
        "import torch; torch.load(blob, weights_only=False)",
    ],
    ids=["pickle", "torch.load"],
)
def test_torch_module_wrapper_payload_is_live_when_really_loaded(load: str, tmp_path: Path) -> None:
    # So that "no marker" above means the scan never ran it, not that the payload is broken.
    if "torch" in load:
        pytest.importorskip("torch")
    path = HOSTILE["keras_torch_module_wrapper_zip"](tmp_path)
    code = _TORCH_WRAPPER_LOADER.format(load=load)
    subprocess.run([sys.executable, "-c", code, str(path)], cwd=tmp_path, timeout=120, check=False)
    assert marker(tmp_path).exists()


# --- keras_layer_issue ---------------------------------------------------------------------


def test_torch_module_wrapper_is_named_with_its_cve() -> None:
    node = fx.keras_layer("TorchModuleWrapper", {"name": "x", "module": "UEsDBA=="})
    assert keras_layer_issue(node) == (
        "Keras TorchModuleWrapper layer 'x': a pickled torch module that torch.load runs when "
        "the model is built (CVE-2025-49655)"
    )


def test_tfsm_layer_names_the_path_it_loads() -> None:
    node = fx.keras_layer("TFSMLayer", {"name": "sm", "filepath": "gs://bucket/model"})
    assert keras_layer_issue(node) == (
        "Keras TFSMLayer layer 'sm': loads the SavedModel at 'gs://bucket/model' and runs its "
        "graph when the model is built (CVE-2026-1462)"
    )
    assert "a path in its config" in str(keras_layer_issue({"class_name": "TFSMLayer"}))


@pytest.mark.parametrize(
    ("class_name", "key", "value", "what"),
    [
        ("IntegerLookup", "vocabulary", "/data/ids.txt", "is a file outside the model"),
        ("StringLookup", "vocabulary", "gs://bucket/vocab.txt", "is fetched from a URL"),
        ("StringLookup", "vocabulary", "s3://bucket/vocab.txt", "is fetched from a URL"),
        ("WordPieceTokenizer", "vocabulary", "/etc/hosts", "is a file outside the model"),
        ("BytePairTokenizer", "merges", "https://x.test/merges.txt", "is fetched from a URL"),
        ("SentencePieceTokenizer", "proto", "/root/.netrc", "is a file outside the model"),
    ],
)
def test_a_string_vocabulary_is_a_file_or_url(
    class_name: str, key: str, value: str, what: str
) -> None:
    issue = keras_layer_issue(fx.keras_layer(class_name, {"name": "t", key: value}))
    assert issue is not None
    assert f"{key} {value!r} {what}" in issue
    assert issue.endswith("(CVE-2025-12058)") == (class_name.endswith("Lookup"))


@pytest.mark.parametrize(
    "config",
    [
        {"vocabulary": ["a", "b"]},
        {"vocabulary": None},
        {"vocabulary": ""},
        {"vocabulary": {"a": 0, "b": 1}},  # BytePairTokenizer's inline dict
        {"merges": ["a b"]},
        {"proto": base64.b64encode(b"\x0a\x04" * 2000).decode()},  # inline SentencePiece model
        {"name": "dense", "units": 4},
    ],
)
def test_inline_vocabularies_and_ordinary_layers_are_fine(config: dict[str, Any]) -> None:
    assert keras_layer_issue(fx.keras_layer("StringLookup", config)) is None
    assert keras_layer_issue(fx.keras_layer("SentencePieceTokenizer", config)) is None


@pytest.mark.parametrize(
    "node",
    [
        {},
        {"class_name": None},
        {"class_name": 3, "config": {"vocabulary": "/etc/passwd"}},
        {"class_name": "StringLookup", "config": "not a dict"},
        {"class_name": "Dense", "config": {"name": "d"}},
        {"class_name": "Lambda", "config": {"name": "l"}},  # the unsafe-code walker's job
    ],
)
def test_anything_else_is_not_this_checks_business(node: dict[str, Any]) -> None:
    assert keras_layer_issue(node) is None


def test_attacker_controlled_names_are_quoted_and_cut() -> None:
    issue = keras_layer_issue(fx.keras_layer("TFSMLayer", {"name": "n\n" * 500, "filepath": "x"}))
    assert issue is not None and "\n" not in issue and len(issue) < 600


# --- The op lists --------------------------------------------------------------------------


def test_every_listed_op_has_a_reason_and_no_op_is_on_both_lists() -> None:
    assert all(reason.strip() for reason in (DANGEROUS_TF_OPS | TF_OPS_NOT_FLAGGED).values())
    assert not set(DANGEROUS_TF_OPS) & set(TF_OPS_NOT_FLAGGED)
    for op in ("ReadFile", "WriteFile", "MatchingFiles", "PyFunc", "PyFuncStateless"):
        assert op in DANGEROUS_TF_OPS
    for op in ("SaveV2", "RestoreV2", "MergeV2Checkpoints", "ShardedFilename", "StringJoin"):
        assert op in TF_OPS_NOT_FLAGGED


@pytest.mark.parametrize("op", sorted(DANGEROUS_TF_OPS))
def test_each_dangerous_op_is_found_in_graph_and_in_a_function(op: str) -> None:
    pb = fx.saved_model_pb(fx.meta_graph(fx.serving_graph([fx.node_def("n", op)])))
    assert saved_model_op_issues(pb) == [
        f"op {op} in function __inference_call_41 (node 'n'): {DANGEROUS_TF_OPS[op]}"
    ]
    pb = fx.saved_model_pb(fx.meta_graph(fx.graph_def([fx.node_def("n", op)])))
    assert saved_model_op_issues(pb) == [f"op {op} in the graph (node 'n'): {DANGEROUS_TF_OPS[op]}"]


@pytest.mark.parametrize("op", sorted(TF_OPS_NOT_FLAGGED))
def test_ops_every_model_has_are_not_flagged(op: str) -> None:
    pb = fx.saved_model_pb(fx.meta_graph(fx.serving_graph([fx.node_def("n", op)])))
    assert saved_model_op_issues(pb) == []


def test_op_names_match_exactly() -> None:
    nodes = [fx.node_def(str(i), op) for i, op in enumerate(("ReadFileX", "readfile", "Read"))]
    nodes.append(fx.node_def("long", "ReadFile" * 100))
    assert saved_model_op_issues(fx.saved_model_pb(fx.meta_graph(fx.graph_def(nodes)))) == []


# --- saved_model_op_issues -----------------------------------------------------------------


def test_one_message_per_op_kind_with_a_count_of_the_rest() -> None:
    body = [fx.node_def(f"read_{i}", "ReadFile") for i in range(3)]
    graph = fx.graph_def([fx.node_def("write", "WriteFile")], [fx.function_def("f", body)])
    assert saved_model_op_issues(fx.saved_model_pb(fx.meta_graph(graph))) == [
        "op WriteFile in the graph (node 'write'): " + DANGEROUS_TF_OPS["WriteFile"],
        "op ReadFile in function f (node 'read_0'), and 2 more: " + DANGEROUS_TF_OPS["ReadFile"],
    ]


def test_every_meta_graph_is_walked() -> None:
    first = fx.meta_graph(fx.serving_graph(), tags=["serve"])
    second = fx.meta_graph(fx.graph_def([fx.node_def("p", "PyFunc")]), tags=["train"])
    assert saved_model_op_issues(fx.saved_model_pb(first, second)) == [
        "op PyFunc in the graph (node 'p'): " + DANGEROUS_TF_OPS["PyFunc"]
    ]


def test_an_op_named_in_a_list_or_nested_func_attribute_is_found() -> None:
    nested = fx.attr_func("MapDataset", {"f": fx.attr_func("WriteFile")})
    listed = fx.field_bytes(1, fx.field_bytes(9, fx.field_bytes(1, "ReadFile")))  # list.func
    node = fx.node_def("n", "Case", (), {"branches": listed, "g": nested})
    found = saved_model_op_issues(fx.saved_model_pb(fx.meta_graph(fx.graph_def([node]))))
    assert found == [
        "op ReadFile called through attribute 'branches' of the graph (node 'n'): "
        + DANGEROUS_TF_OPS["ReadFile"],
        "op WriteFile called through attribute 'f' of the graph (node 'n'): "
        + DANGEROUS_TF_OPS["WriteFile"],
    ]


@pytest.mark.parametrize(
    ("attr", "flagged"),
    [
        (fx.attr_s("file:///tmp/log"), True),
        (fx.field_bytes(9, "stream"), True),  # a placeholder: whoever calls the function picks
        (fx.attr_s("stderr"), False),
        (fx.attr_s("log(info)"), False),
        (fx.attr_s("file:"), False),
    ],
)
def test_printv2_is_flagged_only_when_it_writes_a_file(attr: bytes, flagged: bool) -> None:
    node = fx.node_def("print", "PrintV2", ["s"], {"output_stream": attr})
    found = saved_model_op_issues(fx.saved_model_pb(fx.meta_graph(fx.graph_def([node]))))
    assert bool(found) is flagged


def test_a_memory_mapped_file_is_read_in_place(tmp_path: Path) -> None:
    model = HOSTILE["saved_model_readfile"](tmp_path)
    with (
        (model / "saved_model.pb").open("rb") as fh,
        mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm,
    ):
        view = memoryview(mm)
        try:
            assert saved_model_op_issues(view) == findings(model)
        finally:
            view.release()


def test_a_graph_past_the_field_limit_is_not_passed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keras_tf, "MAX_GRAPH_FIELDS", 50)
    nodes = [fx.node_def("read", "ReadFile"), *(fx.node_def(str(i), "Identity") for i in range(50))]
    found = saved_model_op_issues(fx.saved_model_pb(fx.meta_graph(fx.graph_def(nodes))))
    assert found == [
        "op ReadFile in the graph (node 'read'): " + DANGEROUS_TF_OPS["ReadFile"],
        "graph too large to scan: more than 50 protobuf fields",
    ]


# --- Malformed input never raises ----------------------------------------------------------


def _hostile_pb(tmp_path: Path) -> bytes:
    return (
        HOSTILE["saved_model_pyfunc_in_function_library"](tmp_path) / "saved_model.pb"
    ).read_bytes()


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"\x12\xff\xff\xff\xff\x0f", "claims"),  # meta_graphs longer than the file
        (b"\x12", "truncated varint"),
        (b"\x00", "field number 0"),
        (b"\x13", "wire type 3"),
        (b"\x12\x02\x12\x05", "claims"),  # graph_def runs past its meta graph
        (b"\x08" + b"\xff" * 11, "varint longer than 10 bytes"),
    ],
)
def test_broken_framing_is_a_finding_not_an_exception(data: bytes, says: str) -> None:
    found = saved_model_op_issues(data)
    assert len(found) == 1 and found[0].startswith("graph does not parse: ") and says in found[0]


def test_every_truncation_of_a_graph_is_handled(tmp_path: Path) -> None:
    pb = _hostile_pb(tmp_path)
    for end in range(len(pb)):
        found = saved_model_op_issues(pb[:end])
        assert all(isinstance(f, str) for f in found)
        # the framing is nested: a cut anywhere past the first field is a broken length
        if end > 2:
            assert found[-1].startswith("graph does not parse: "), (end, found)


def test_random_corruption_never_raises(tmp_path: Path) -> None:
    pb = bytearray(_hostile_pb(tmp_path))
    rng = random.Random(12)
    for _ in range(2000):
        damaged = bytearray(pb)
        for _ in range(rng.randint(1, 8)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        found = saved_model_op_issues(bytes(damaged))
        assert isinstance(found, list) and all(isinstance(f, str) for f in found)
    for size in (0, 1, 7, 64, 4096):
        assert isinstance(saved_model_op_issues(rng.randbytes(size)), list)


def test_deeply_nested_attributes_are_bounded() -> None:
    attr = fx.attr_func("ReadFile")
    for _ in range(200):
        attr = fx.attr_func("Identity", {"f": attr})
    node = fx.node_def("n", "PartitionedCall", (), {"f": attr})
    found = saved_model_op_issues(fx.saved_model_pb(fx.meta_graph(fx.graph_def([node]))))
    assert found == ["graph does not parse: attributes nested more than 8 deep"]


def test_an_empty_saved_model_has_nothing_to_say() -> None:
    assert saved_model_op_issues(b"") == []
    assert saved_model_op_issues(b"\x08\x01") == []
