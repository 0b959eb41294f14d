"""The validation stage as a whole: every check reported with status, reason and time."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from services.contracts.events import Status, TargetHardware
from services.contracts.policy import PolicyFile
from services.stack.samples import write_sample_model
from services.validator.checks.checksum import DigestCache
from services.validator.validate import CHECKS, validate


def test_a_sound_model_passes_every_check_within_budget(tmp_path: Path) -> None:
    model = write_sample_model(tmp_path / "m")
    report = validate(str(model), service="t")
    assert report.status is Status.PASSED, report.reason
    assert [c.name for c in report.checks] == [name for name, _ in CHECKS]
    assert all(c.status is Status.PASSED for c in report.checks), [c.reason for c in report.checks]
    assert all(c.duration_ms >= 0 for c in report.checks)
    assert report.duration_ms < 2000
    assert "7 checks passed" in report.reason


def test_a_failure_blocks_and_names_the_check(tmp_path: Path) -> None:
    model = write_sample_model(tmp_path / "m")
    (model / "README.md").write_text("token: hf_" + "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3z" + "\n")
    report = validate(str(model))
    assert report.status is Status.FAILED
    assert report.blocks
    assert report.reason.startswith("secrets: ")
    assert "hf_aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3z" not in report.model_dump_json()


def test_checks_switched_off_in_policy_are_skipped_and_say_so(tmp_path: Path) -> None:
    model = write_sample_model(tmp_path / "m")
    off = {"validation": {"checks": {"secrets": False, "vram_fit": False}}}
    policy = PolicyFile(defaults=off).resolve(model="m")  # the operator's file: a request may not
    report = validate(str(model), policy=policy.validation)
    by_name = {c.name: c for c in report.checks}
    assert by_name["secrets"].status is Status.SKIPPED
    assert by_name["secrets"].reason == "disabled by policy"
    assert report.status is Status.PASSED
    assert "skipped: secrets (disabled by policy), vram_fit (disabled by policy)" in report.reason


def test_whole_stage_switched_off_is_skipped() -> None:
    policy = PolicyFile(defaults={"validation": {"enabled": False}}).resolve(model="m")
    report = validate("/does/not/matter", policy=policy.validation)
    assert report.status is Status.SKIPPED
    assert report.reason == "skipped: disabled by policy"


def test_unsupported_location_scheme_fails_closed() -> None:
    report = validate("ftp://host/model")
    assert report.status is Status.FAILED
    assert "ftp:// is not supported" in report.reason and "s3://" in report.reason


def test_a_model_too_big_for_the_target_is_blocked(tmp_path: Path) -> None:
    model = write_sample_model(tmp_path / "m")
    report = validate(str(model), target=TargetHardware(gpu_memory_gb=0.25))
    assert report.status is Status.FAILED
    assert "vram_fit: does not fit" in report.reason


def test_over_budget_is_reported(tmp_path: Path) -> None:
    model = write_sample_model(tmp_path / "m")
    policy = PolicyFile().resolve(model="m", overrides={"validation": {"budget_s": 0.000001}})
    report = validate(str(model), policy=policy.validation)
    assert "over the 1e-06 s budget" in report.reason


def test_revalidating_an_unchanged_model_hashes_nothing(tmp_path: Path) -> None:
    model = write_sample_model(tmp_path / "m")
    cache = DigestCache(tmp_path / "digests.sqlite")
    validate(str(model), digest_cache=cache)
    report = validate(str(model), digest_cache=cache)
    checksum = next(c for c in report.checks if c.name == "checksum")
    assert checksum.details["hashed_bytes"] == 0
    assert checksum.details["cached_files"] == 1
    cache.close()


def test_secrets_in_safetensors_metadata_are_found(tmp_path: Path) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    leaked = "ghp_" + "Zx8Kq2Lm4Np6Rt8Vw0Yb2Dc4Ef6Gh8Jk0Mn2P"
    save_file(
        {"w": np.zeros(4, np.float32)},
        str(tmp_path / "model.safetensors"),
        metadata={"notes": f"push with {leaked}"},
    )
    report = validate(str(tmp_path))
    secrets = next(c for c in report.checks if c.name == "secrets")
    assert secrets.status is Status.FAILED
    assert "__metadata__ notes" in secrets.reason
    assert leaked not in report.model_dump_json()
    assert json.loads(report.model_dump_json())["status"] == "failed"


# --- Trees a walk must answer, not crash on (issue #13) --------------------------------------


def _nest(root: Path, levels: int) -> None:
    """`levels` directories one inside the other, built through directory fds: the full path is
    far past PATH_MAX, which is the point."""
    fds = [os.open(root, os.O_RDONLY)]
    for _ in range(levels):
        os.mkdir("d", dir_fd=fds[-1])
        fds.append(os.open("d", os.O_RDONLY, dir_fd=fds[-1]))
    for fd in fds:
        os.close(fd)


def _unnest(root: Path, levels: int) -> None:
    fds = [os.open(root, os.O_RDONLY)]
    for _ in range(levels):
        fds.append(os.open("d", os.O_RDONLY, dir_fd=fds[-1]))
    for parent, child in zip(reversed(fds[:-1]), reversed(fds[1:]), strict=True):
        os.close(child)
        os.rmdir("d", dir_fd=parent)
    os.close(fds[0])


def test_a_tree_10000_levels_deep_is_blocked_with_a_reason(tmp_path: Path) -> None:
    model = write_sample_model(tmp_path / "deep")
    _nest(model, 10_000)
    try:
        started = time.perf_counter()
        report = validate(str(model))
        assert time.perf_counter() - started < 5
    finally:
        _unnest(model, 10_000)
    assert report.status is Status.FAILED
    assert "directories nested more than 32 levels deep" in report.reason


def test_symlink_loops_are_blocked_with_a_reason(tmp_path: Path) -> None:
    model = write_sample_model(tmp_path / "loops")
    (model / "a.bin").symlink_to("b.bin")
    (model / "b.bin").symlink_to("a.bin")
    (model / "self").symlink_to(".")
    (model / "sub").mkdir()
    (model / "sub" / "up").symlink_to("..")
    (model / "outside").symlink_to(tmp_path)
    report = validate(str(model))
    assert report.status is Status.FAILED
    fmt = next(c for c in report.checks if c.name == "format")
    assert "a.bin: symlink loop (b.bin)" in fmt.reason
    assert "outside: symlink pointing outside the model" in fmt.reason
    # links to directories inside the model are not walked twice, and are no finding
    assert "self:" not in fmt.reason
    assert "sub/up" not in fmt.reason


def test_a_model_full_of_keys_gets_a_report_that_fits_one_bus_message(tmp_path: Path) -> None:
    """150,000 keys in a 4 MB card: counted to 1,000, listed within the details budget."""
    import random
    import string

    rng = random.Random(7)
    model = write_sample_model(tmp_path / "m")
    keys = ["hf_" + "".join(rng.choices(string.ascii_letters, k=34)) for _ in range(100_000)]
    (model / "README.md").write_text("\n".join(keys))
    report = validate(str(model), service="t")
    secrets = next(c for c in report.checks if c.name == "secrets")
    assert secrets.status is Status.FAILED
    assert secrets.reason.startswith("at least 1000 secrets")
    assert secrets.value == 1000
    assert len(json.dumps(secrets.details)) <= 64 * 1024
    assert secrets.details["findings_not_listed"] == 1000 - len(secrets.details["findings"])
    assert len(report.model_dump_json()) < 256 * 1024


def test_details_over_the_budget_are_cut_and_say_how_much() -> None:
    from services.validator.checks.base import bounded_details

    small = {"findings": [1, 2, 3], "note": "x"}
    assert bounded_details(small) is small
    big: dict[str, Any] = {
        "findings": [{"file": f"f{i}", "why": "w" * 40} for i in range(10_000)],
        "scanned": [f"file{i}" for i in range(100)],
        "nested": {"issues": ["i" * 30] * 5_000},
        "long": "z" * 5_000,
    }
    cut = bounded_details(big, max_bytes=16 * 1024)
    assert len(json.dumps(cut)) <= 16 * 1024
    assert len(cut["findings"]) + cut["findings_not_listed"] == 10_000
    assert cut["findings"] == big["findings"][: len(cut["findings"])]
    assert len(cut["nested"]["issues"]) + cut["nested"]["issues_not_listed"] == 5_000
    assert cut["long"].endswith("(cut, 5000 characters)")
    assert len(big["findings"]) == 10_000  # the check's own result is not changed
    # A dict keyed by file name (the format and checksum checks' `files`) is cut like a list,
    # not dropped with everything beside it.
    files = {"files": {f"model-{i:05d}.safetensors": {"kind": "safetensors"} for i in range(700)}}
    cut = bounded_details({**files, "hashed_bytes": 7}, max_bytes=16 * 1024)
    assert cut["hashed_bytes"] == 7
    assert len(cut["files"]) + cut["files_not_listed"] == 700
    assert list(cut["files"]) == list(files["files"])[: len(cut["files"])]


def _safetensors(path: Path, header: bytes, data: bytes = b"") -> None:
    import struct

    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def _deep_safetensors(model: Path) -> None:
    _safetensors(model / "model.safetensors", b"[" * 100_000 + b"]" * 100_000)


def _overflowing_shape(model: Path) -> None:
    header = {"w": {"dtype": "F32", "shape": [2**62] * 20, "data_offsets": [0, 4]}}
    _safetensors(model / "model.safetensors", json.dumps(header).encode(), b"\0" * 4)


def _huge_config_numbers(model: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    big = 10**4000
    config |= {"hidden_size": big, "num_hidden_layers": big, "max_position_embeddings": big}
    import sys

    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        (model / "config.json").write_text(json.dumps(config))
    finally:
        sys.set_int_max_str_digits(limit)


def _deep_manifest(model: Path) -> None:
    (model / "preflight-manifest.json").write_text("[" * 100_000 + "]" * 100_000)


def _deep_config(model: Path) -> None:
    (model / "config.json").write_text('{"a":' * 100_000 + "1" + "}" * 100_000)


def _template_with_a_huge_literal(model: Path) -> None:
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ " + "9" * 5000 + " }}"
    (model / "tokenizer_config.json").write_text(json.dumps(config))


def _name_not_utf8(model: Path) -> None:
    os.symlink("/etc/passwd", os.path.join(os.fsencode(model), b"\xff"))
    (Path(os.fsdecode(os.path.join(os.fsencode(model), b"notes-\xfe.txt")))).write_text("x")


def _tensor_name_of_a_megabyte(model: Path) -> None:
    name = "x" * (1 << 20)
    header = {name: {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}
    _safetensors(model / "extra.safetensors", json.dumps(header).encode(), b"\0" * 4)


HOSTILE_FOLDERS = {
    "safetensors header nested 100,000 deep": _deep_safetensors,
    "safetensors shape past any float": _overflowing_shape,
    "config numbers of 4,000 digits": _huge_config_numbers,
    "manifest nested 100,000 deep": _deep_manifest,
    "config.json nested 100,000 deep": _deep_config,
    "chat template with a 5,000-digit literal": _template_with_a_huge_literal,
    "file names that are not UTF-8": _name_not_utf8,
    "a tensor name of 1 MiB": _tensor_name_of_a_megabyte,
}


@pytest.mark.parametrize("case", sorted(HOSTILE_FOLDERS))
def test_a_hostile_folder_gets_an_answer_not_a_crash(tmp_path: Path, case: str) -> None:
    """Each of these made a check crash (RecursionError, OverflowError, ValueError,
    UnicodeEncodeError), made a report that could not be serialised, or one of megabytes."""
    model = write_sample_model(tmp_path / "m")
    HOSTILE_FOLDERS[case](model)
    report = validate(str(model), service="t")
    assert report.status is Status.FAILED, report.reason
    crashed = [c.reason for c in report.checks if c.status is Status.ERROR]
    assert not crashed, crashed
    dumped = report.model_dump_json()
    assert len(dumped) < 64 * 1024
    assert all(len(c.reason) <= 2100 for c in report.checks)


def test_a_validation_parses_a_bounded_number_of_hdf5_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each HDF5 file is parsed in a child process (~140 ms, up to 10 s): 10,000 files shaped
    like HDF5 would have taken 25 minutes. Past the budget a file is not read, and fails."""
    from services.validator.checks import hdf5

    monkeypatch.setattr(hdf5, "MAX_HDF5_FILES", 2)
    model = write_sample_model(tmp_path / "m")
    for i in range(5):
        (model / f"notes{i}.txt").write_bytes(
            b"hello" + b" " * 507 + b"\x89HDF\r\n\x1a\n" + b"\0" * 64
        )
    report = validate(str(model), service="t")
    unsafe = next(c for c in report.checks if c.name == "unsafe_code")
    assert unsafe.status is Status.FAILED
    refused = [f for f in unsafe.details["findings"] if "its limit (2 files" in f["what"]]
    assert len(refused) == 3, unsafe.details["findings"]


def test_a_safetensors_header_with_too_many_tensors_is_refused_before_it_is_parsed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1.4 million entries fit the format's 100 MB header limit and took 17 s and 1.4 GB."""
    from services.validator.checks import headers

    monkeypatch.setattr(headers, "SAFETENSORS_MAX_TENSORS", 3)
    model = write_sample_model(tmp_path / "m")
    table = {
        f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
        for i in range(4)
    }
    _safetensors(model / "extra.safetensors", json.dumps(table).encode(), b"\0" * 16)
    report = validate(str(model), service="t")
    structure = next(c for c in report.checks if c.name == "structure")
    assert structure.status is Status.FAILED
    assert "header lists 4 tensors, more than the 3" in structure.reason


def test_a_config_asking_for_remote_code_everywhere_is_listed_a_hundred_times_and_counted(
    tmp_path: Path,
) -> None:
    """3 million `auto_map` keys in a 64 MB config made 23 s of findings."""
    model = write_sample_model(tmp_path / "m")
    nodes = [{"auto_map": {"AutoModel": f"m{i}.M"}} for i in range(150)]
    (model / "tokenizer_config.json").write_text(json.dumps({"parts": nodes}))
    report = validate(str(model), service="t")
    unsafe = next(c for c in report.checks if c.name == "unsafe_code")
    whats = [f["what"] for f in unsafe.details["findings"]]
    assert len(whats) == 101
    assert whats[-1] == "asks for remote code in 150 places in all"


def test_a_model_s_chat_templates_are_scanned_within_one_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """200,000 small templates in one config took 9.4 s: past the budget they fail unread."""
    from services.validator.checks import chat_templates

    monkeypatch.setattr(chat_templates, "MAX_TEMPLATES", 3)
    model = write_sample_model(tmp_path / "m")
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": f"t{i}", "template": "{{ x }}"} for i in range(10)]
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    report = validate(str(model), service="t")
    unsafe = next(c for c in report.checks if c.name == "unsafe_code")
    assert unsafe.status is Status.FAILED
    whats = [f["what"] for f in unsafe.details["findings"]]
    assert len(whats) == 1 and whats[0].startswith("chat_template[t3]: not scanned"), whats


def test_a_validation_runs_a_bounded_number_of_pickle_opcodes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each pickle may run 2 million opcodes; 20 such files took 12 s and 10,000 would take
    hours. Past the validation's budget a pickle is not scanned to the end, and fails."""
    import pickle

    from services.validator.checks import base

    monkeypatch.setattr(base, "MAX_PICKLE_OPS_PER_VALIDATION", 15_000)
    model = write_sample_model(tmp_path / "m")
    for i in range(3):
        (model / f"state{i}.pkl").write_bytes(pickle.dumps(list(range(10_000)), protocol=2))
    report = validate(str(model), service="t")
    unsafe = next(c for c in report.checks if c.name == "unsafe_code")
    assert unsafe.status is Status.FAILED
    refused = sorted(
        f["file"] for f in unsafe.details["findings"] if "not scanned to the end" in f["what"]
    )
    assert len(refused) == 2, unsafe.details["findings"]
    monkeypatch.undo()  # the default budget: the same pickles scan whole and pass
    again = next(c for c in validate(str(model), service="t").checks if c.name == "unsafe_code")
    assert again.status is Status.PASSED, again.reason
