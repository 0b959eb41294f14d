"""The validation's time limit (`validation.time_limit_s`): no file can hold the validator.

Each hostile folder below takes seconds to check in full on the 2-CPU reference machine (the
longest loop of some parser or scanner, which the file decides). With a limit of 0.2 s the
check that is running stops at its next look at the clock and fails, and the checks after it
fail as not run. If a loop had no look at the clock, its check would finish (and pass or fail
on its own terms) and no check would report being stopped.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from services.contracts.events import CheckResult, Status
from services.contracts.policy import ValidationPolicy
from services.stack.samples import write_sample_model
from services.validator.checks import checksum, hdf5
from services.validator.validate import CHECKS, validate
from tests.unit.validator import hostile

LIMIT_S = 0.2
# What may pass after the limit: the stopped check's last few thousand turns, the report.
SLACK_S = 1.3


def _varint(n: int) -> bytes:
    out = b""
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            return out + bytes([low])
        out += bytes([low | 0x80])


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _onnx_of_empty_initializers(model: Path, scale: int = 1) -> None:
    # ModelProto{ir_version: 7, graph: GraphProto{initializer: {} x 3 million}}: 6 MB, ~3 s.
    graph = b"\x2a\x00" * 3_000_000 * scale
    (model / "model.onnx").write_bytes(b"\x08\x07" + _field(7, graph))


def _saved_model_of_empty_nodes(model: Path, scale: int = 1) -> None:
    # SavedModel{meta_graphs: MetaGraphDef{graph_def: GraphDef{node: {} x 1.5 million}}}: ~3 s.
    graph = b"\x0a\x00" * 1_500_000 * scale
    (model / "saved_model.pb").write_bytes(b"\x08\x01" + _field(2, _field(2, graph)))


def _gguf_of_nested_empty_arrays(model: Path, scale: int = 1) -> None:
    # One metadata key: an array of 1.5 million empty arrays of u8 (12 bytes each), ~4 s.
    count = 1_500_000 * scale
    key = b"x.nested"
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
    header += struct.pack("<Q", len(key)) + key + struct.pack("<I", 9)  # GGUF_TYPE_ARRAY
    header += struct.pack("<IQ", 9, count) + struct.pack("<IQ", 0, 0) * count
    (model / "model.gguf").write_bytes(header)


def _pickles_of_two_million_opcodes(model: Path, scale: int = 1) -> None:
    # Six pickles of 2 million opcodes (NONE, POP, ...): within every opcode limit, ~4 s. Past
    # 10 of them, the validation's 20 million opcodes are spent and the rest are not scanned.
    body = b"\x80\x02" + b"N0" * 1_000_000 + b"N."
    for i in range(6 * scale):
        (model / f"extra-{i}.pkl").write_bytes(body)


def _cards_of_one_anchor(model: Path, scale: int = 1) -> None:
    # Two 4 MB notes made of one rule's anchor (`xox`, Slack's): ~2.4 s each.
    for i in range(2 * scale):
        (model / f"notes-{i}.md").write_text("xox" * 1_398_000)


def _shard_index_of_a_million_entries(model: Path, scale: int = 1) -> None:
    # Every tensor of a real index, named a million times over (28 MB): ~1 s, 4 s before.
    entries = ",".join(f'"t{i:x}":"model.safetensors"' for i in range(1_000_000 * scale))
    (model / "model.safetensors.index.json").write_text('{"weight_map":{' + entries + "}}")


HOSTILE: dict[str, Callable[..., None]] = {  # (model, scale=1); bench/validation_time_limit.py
    "ONNX of 3 million empty initializers": _onnx_of_empty_initializers,
    "SavedModel of 1.5 million empty nodes": _saved_model_of_empty_nodes,
    "GGUF of 1.5 million nested empty arrays": _gguf_of_nested_empty_arrays,
    "six pickles of 2 million opcodes": _pickles_of_two_million_opcodes,
    "two 4 MB cards of one secret rule's anchor": _cards_of_one_anchor,
    "a shard index of a million entries": _shard_index_of_a_million_entries,
}


def _stopped(checks: Sequence[CheckResult]) -> list[str]:
    return [c.name for c in checks if c.details.get("stopped") is True]


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_folder_is_stopped_at_the_time_limit(tmp_path: Path, case: str) -> None:
    model = write_sample_model(tmp_path / "m")
    HOSTILE[case](model)
    started = time.perf_counter()
    report = validate(str(model), policy=ValidationPolicy(time_limit_s=LIMIT_S))
    wall = time.perf_counter() - started
    assert report.status is Status.FAILED
    assert report.blocks
    stopped = _stopped(report.checks)
    assert len(stopped) == 1, [(c.name, c.status, c.reason) for c in report.checks]
    check = next(c for c in report.checks if c.name == stopped[0])
    assert check.status is Status.FAILED
    assert check.reason.startswith("not checked to the end: stopped after ")
    assert "the validation's 0.2 s time limit passed (validation.time_limit_s)" in check.reason
    after = [name for name, _ in CHECKS][[name for name, _ in CHECKS].index(check.name) + 1 :]
    not_run = [c for c in report.checks if c.name in after]
    assert all(c.status is Status.FAILED and c.reason.startswith("not run: ") for c in not_run)
    if after:  # named once in the stage's reason, not a sentence each
        assert report.reason.count("not run") == 1
        assert f"not run, the time limit having passed: {', '.join(after)}" in report.reason
    assert wall < LIMIT_S + SLACK_S, (wall, [(c.name, c.duration_ms) for c in report.checks])


def test_a_hanging_hdf5_parser_is_killed_at_the_time_limit_not_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hdf5, "_H5_READER", "import time; time.sleep(60)")
    hdf5._read.cache_clear()
    model = hostile.write_keras_h5(tmp_path)
    started = time.perf_counter()
    report = validate(str(model), policy=ValidationPolicy(time_limit_s=0.5))
    wall = time.perf_counter() - started
    hdf5._read.cache_clear()
    assert report.status is Status.FAILED
    assert _stopped(report.checks), report.reason
    assert wall < 0.5 + SLACK_S + 1.0, wall  # not the child's own 10 s
    assert hdf5.H5_TIMEOUT_S >= 10


def test_hashing_does_not_count_against_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading every byte for its digest is the model's size, which no file makes slower: a
    500 GB model hashed cold must not fail for the time it takes."""
    model = write_sample_model(tmp_path / "m")
    real: Callable[..., list[checksum.Hashed]] = checksum.hash_files

    def slow_hash(*args: object, **kwargs: object) -> list[checksum.Hashed]:
        time.sleep(0.6)  # three times the limit
        return real(*args, **kwargs)

    monkeypatch.setattr(checksum, "hash_files", slow_hash)
    report = validate(str(model), policy=ValidationPolicy(time_limit_s=LIMIT_S))
    assert report.status is Status.PASSED, report.reason
    assert report.duration_ms > 600


def test_the_default_limit_is_far_above_a_real_model_and_below_a_stuck_validator() -> None:
    assert ValidationPolicy().time_limit_s == 30.0
    assert ValidationPolicy().budget_s < ValidationPolicy().time_limit_s


# --- costs that a file multiplied, now paid once (found by attacking the limit) --------------


def test_external_data_references_to_one_json_file_parse_it_once(tmp_path: Path) -> None:
    # 100 initializers whose external data is one 5 MB JSON file: it was parsed for each.
    model = write_sample_model(tmp_path / "m")
    (model / "big.json").write_text("[" + ",".join(["1"] * 2_500_000) + "]")
    entry = _field(1, b"location") + _field(2, b"big.json")
    tensor = _field(13, entry) + b"\x70\x01"  # external_data {location: big.json}, EXTERNAL
    (model / "model.onnx").write_bytes(b"\x08\x07" + _field(7, _field(5, tensor) * 100))
    started = time.perf_counter()
    report = validate(str(model))
    wall = time.perf_counter() - started
    fmt = next(c for c in report.checks if c.name == "format")
    assert fmt.status is Status.FAILED
    assert fmt.reason.count("external data big.json is not raw tensor bytes") == 1, fmt.reason
    assert wall < 2.0, wall  # 100 parses took 42 s for 20 MB


def test_a_keras_config_that_inflates_past_the_json_limit_is_not_inflated(tmp_path: Path) -> None:
    import zipfile

    from services.validator.checks.inventory import MAX_JSON_BYTES

    path = tmp_path / "model.keras"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("metadata.json", '{"keras_version": "3.5.0"}')
        with zf.open("config.json", "w", force_zip64=True) as out:
            block = b" " * (1 << 20)
            for _ in range(MAX_JSON_BYTES // len(block) + 4):
                out.write(block)
        zf.writestr("model.weights.h5", b"")
    report = validate(str(path))
    structure = next(c for c in report.checks if c.name == "structure")
    assert structure.status is Status.FAILED
    assert "Keras archive config.json inflates to 71,303,168 bytes, more than the" in (
        structure.reason
    )


def test_a_manifest_past_its_limit_is_refused_unread(tmp_path: Path) -> None:
    from services.validator.checks.checksum import MAX_MANIFEST_BYTES

    model = write_sample_model(tmp_path / "m")
    (model / "preflight-manifest.json").unlink()
    line = b"0" * 64 + b"  weights/shard.bin\n"
    (model / "SHA256SUMS").write_bytes(line * (MAX_MANIFEST_BYTES // len(line) + 1))
    report = validate(str(model))
    check = next(c for c in report.checks if c.name == "checksum")
    assert check.status is Status.FAILED
    assert check.reason.startswith("SHA256SUMS: 16,777,"), check.reason
    assert "a manifest is read to (a model holds at most 10,000 files)" in check.reason


# --- hashing has its own limit ----------------------------------------------------------------


def _with_sparse_file(tmp_path: Path, size: int) -> tuple[Path, dict[str, str]]:
    model = write_sample_model(tmp_path / "m")
    with (model / "big.safetensors").open("wb") as fh:
        fh.truncate(size)  # takes no disk: a file can claim any size
    return model, {"big.safetensors": "0" * 64}


def test_hashing_estimated_past_its_limit_is_refused_before_a_byte_is_read(
    tmp_path: Path,
) -> None:
    model, digests = _with_sparse_file(tmp_path, 8 << 40)  # 8 TiB: 1.6 hours at 1.5 GB/s
    started = time.perf_counter()
    report = validate(str(model), expected_sha256=digests)
    wall = time.perf_counter() - started
    check = next(c for c in report.checks if c.name == "checksum")
    assert check.status is Status.FAILED
    assert "not hashed: 8,796.1 GB that the digest cache does not hold would take about" in (
        check.reason
    )
    assert "more than validation.hash_limit_s (3600 s)" in check.reason
    assert wall < 2.0, wall  # not the hour and more that hashing it takes


def test_hashing_that_runs_past_its_limit_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The estimate says it is quick (as it would on a disk slower than it assumes).
    monkeypatch.setattr(checksum, "SHA256_BYTES_PER_S_PER_CORE", 1e15)
    model, digests = _with_sparse_file(tmp_path, 64 << 30)  # 64 GiB: ~45 s of hashing
    started = time.perf_counter()
    policy = ValidationPolicy(hash_limit_s=0.3)
    report = validate(str(model), expected_sha256=digests, policy=policy)
    wall = time.perf_counter() - started
    check = next(c for c in report.checks if c.name == "checksum")
    assert check.status is Status.FAILED
    assert "hashing stopped in big.safetensors after 0." in check.reason, check.reason
    assert "at validation.hash_limit_s (0.3 s)" in check.reason
    assert wall < 0.3 + SLACK_S, wall


def test_an_hdf5_file_read_near_the_limit_is_still_read_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under 10 s from the limit, the child gets only what is left, and its answer is kept for
    the next check that asks (structure and unsafe_code both read the file)."""
    spawned: list[float] = []
    real = hdf5._spawn

    def counted(path: str, timeout: float) -> hdf5.Hdf5Read:
        spawned.append(timeout)
        return real(path, timeout)

    monkeypatch.setattr(hdf5, "_spawn", counted)
    hdf5._read.cache_clear()
    report = validate(
        str(hostile.write_keras_h5(tmp_path)), policy=ValidationPolicy(time_limit_s=8)
    )
    hdf5._read.cache_clear()
    assert len(spawned) == 1, spawned
    assert spawned[0] < 8
    assert not _stopped(report.checks), report.reason
