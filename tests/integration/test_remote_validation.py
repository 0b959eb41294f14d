"""Validating a model on S3 (moto's standalone server) gives the same answers as validating the
same files on local disk, from range reads only.

The mirror is filled with a pattern where nothing was fetched, and every file goes through the
read planner (no "small file, read whole" shortcut): a check that read a byte outside what the
planner fetched would see garbage and disagree with the local run.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import uuid
from pathlib import Path
from typing import Any

import pytest

from services.contracts.events import Status
from services.stack.samples import write_sample_model
from services.storage.s3 import upload_directory
from services.validator import remote
from services.validator.validate import validate
from tests.unit.validator import formats, hostile
from tests.unit.validator.fixtures import BENIGN, HOSTILE

pytestmark = pytest.mark.integration

POISON = b"\xa5\x5a"

WRITERS: dict[str, Any] = {
    **{f"benign/{k}": v for k, v in BENIGN.items()},
    **{f"hostile/{k}": v for k, v in HOSTILE.items()},
    "format/hf_safetensors": formats.write_hf_safetensors,
    "format/gguf": formats.write_gguf,
    "format/gguf_truncated": lambda d: formats.write_gguf(d, truncate_by=100),
    "format/onnx": lambda d: formats.write_onnx(d, external=False),
    "format/onnx_external": lambda d: formats.write_onnx(d, external=True),
    "format/saved_model": formats.write_saved_model,
    "format/saved_model_keras": lambda d: formats.write_saved_model(d, keras=True),
    "format/saved_model_missing_shard": lambda d: formats.write_saved_model(
        d, shards=2, drop_shard=1
    ),
    "format/keras_h5": formats.write_keras_h5,
    "format/sample_model": lambda d: write_sample_model(d / "m"),
}


@pytest.fixture
def s3env(moto_s3: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    for key, value in moto_s3.environ().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    return moto_s3


@pytest.fixture
def strict_planner(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file planned by its content, in small blocks: the hardest case for the plans."""
    monkeypatch.setattr(remote, "SMALL_FILE_BYTES", 0)
    monkeypatch.setattr(remote, "HEAD_BYTES", 512)
    monkeypatch.setattr(remote, "BLOCK", 4096)
    monkeypatch.setattr(remote, "STREAM_CHUNK", 4096)  # whole files reach disk in pieces


def new_bucket(s3env: Any) -> tuple[Any, str]:
    client = s3env.client()
    bucket = f"v-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    return client, bucket


def outcome(report: Any, root: str | None) -> list[tuple[str, str, str]]:
    """(check, status, reason) with the location's own path (or the mirror's) taken out."""
    rows = []
    for check in report.checks:
        if root is None:
            reason = re.sub(r"/[^ ]*/preflight-[^/ ]+", "<root>", check.reason)
        else:
            reason = check.reason.replace(root, "<root>")
        if check.name == "checksum":
            reason = ""  # the remote one states where digests came from
        rows.append((check.name, check.status.value, reason))
    return rows


def validated_alike(
    s3env: Any, directory: Path, *, whole_file_max: int | None = None
) -> tuple[Any, dict[str, Any]]:
    """`directory` uploaded and validated from S3 (unfetched bytes poisoned, and a whole-read
    limit when given), held to the same checks, statuses and reasons as on local disk: the
    report and what reading it cost."""
    client, bucket = new_bucket(s3env)
    upload_directory(client, bucket, "m/", directory)
    with pytest.MonkeyPatch.context() as mp:
        if whole_file_max is not None:
            mp.setattr(remote, "WHOLE_FILE_MAX", whole_file_max)
        report = validate(f"s3://{bucket}/m/", mirror_fill=POISON)
    assert outcome(report, None) == outcome(validate(str(directory)), str(directory))
    return report, next(c for c in report.checks if c.name == "format").details["remote"]


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_remote_validation_agrees_with_local(
    name: str, tmp_path: Path, s3env: Any, strict_planner: None
) -> None:
    directory = tmp_path / "model"
    directory.mkdir()
    WRITERS[name](directory)
    if any(p.is_symlink() or (p.exists() and not (p.is_file() or p.is_dir()))
           for p in directory.rglob("*")):  # fmt: skip
        pytest.skip("S3 has no symlinks or special files")
    if not any(p.is_file() for p in directory.rglob("*")):
        pytest.skip("nothing to upload")
    client, bucket = new_bucket(s3env)
    size = upload_directory(client, bucket, "m/", directory)

    local = validate(str(directory))
    mirrored = validate(f"s3://{bucket}/m/", mirror_fill=POISON)

    assert outcome(mirrored, None) == outcome(local, str(directory))
    assert mirrored.status == local.status
    details = next(c for c in mirrored.checks if c.name == "format").details["remote"]
    assert details["model_bytes"] == size
    assert f"from s3://{bucket}/m/" in mirrored.reason


# One file of each format and of each way a hostile file runs code (the whole set is held to
# local validation above, as a folder): named as one object, each is validated as that file.
ONE_FILE = [
    "format/gguf",
    "format/onnx",
    "format/keras_h5",
    "benign/torch_zip_state_dict",
    "benign/torch_legacy_state_dict",
    "benign/keras_zip",
    "hostile/reduce_os_system",
    "hostile/torch_zip_payload",
    "hostile/gguf_chat_template_cve_2024_34359",
    "hostile/keras_lambda_zip",
    "hostile/zip_path_traversal",
    "hostile/object_npy_payload",
]


@pytest.mark.parametrize("name", ONE_FILE)
def test_an_s3_location_naming_one_object_is_validated_as_that_file(
    name: str, tmp_path: Path, s3env: Any, strict_planner: None
) -> None:
    directory = tmp_path / "model"
    directory.mkdir()
    WRITERS[name](directory)
    [path] = [p for p in directory.rglob("*") if p.is_file()]
    client, bucket = new_bucket(s3env)
    upload_directory(client, bucket, "m/", directory)
    location = f"s3://{bucket}/m/{path.relative_to(directory).as_posix()}"

    local = validate(str(path))
    mirrored = validate(location, mirror_fill=POISON)

    assert outcome(mirrored, None) == outcome(local, str(directory))
    assert mirrored.status == local.status
    assert f"from {location} in" in mirrored.reason


def test_a_sharded_model_is_validated_from_its_headers_and_provider_checksums(
    tmp_path: Path, s3env: Any
) -> None:
    """Checksums from S3's ChecksumSHA256, structure from the headers: a sliver of the bytes."""
    import numpy as np
    from safetensors.numpy import save_file

    directory = tmp_path / "model"
    directory.mkdir()
    shards = {}
    for i in range(2):
        rel = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({f"layer.{i}.weight": np.ones((1024, 1024), dtype=np.float32)}, directory / rel)
        shards[rel] = hashlib.sha256((directory / rel).read_bytes()).hexdigest()
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (directory / "preflight-manifest.json").write_text(json.dumps({"files": shards}))
    client, bucket = new_bucket(s3env)
    size = upload_directory(client, bucket, "m/", directory)

    report = validate(f"s3://{bucket}/m/")
    checksum = next(c for c in report.checks if c.name == "checksum")
    assert checksum.status is Status.PASSED, checksum.reason
    assert set(checksum.details["sources"].values()) == {"provider"}
    assert checksum.details["downloaded_bytes"] == 0
    remote_read = next(c for c in report.checks if c.name == "format").details["remote"]
    small = sum(p.stat().st_size for p in directory.glob("*.json"))
    # per shard: its head, the last 64 KiB where a zip reader looks for an end record, and
    # 8-byte probes where libhdf5 looks for a superblock after a user block
    per_shard = remote.HEAD_BYTES + remote.ZIP_END_SEARCH + 8 * 16
    assert remote_read["bytes_read"] <= small + 2 * per_shard < size * 0.05
    assert remote_read["fetched"]["model-00001-of-00002.safetensors"] == "safetensors header"


def test_without_provider_checksums_the_digest_costs_a_download_and_is_cached(
    tmp_path: Path, s3env: Any
) -> None:
    from services.validator.checks.checksum import DigestCache

    directory = tmp_path / "model"
    write_sample_model(directory)
    client, bucket = new_bucket(s3env)
    upload_directory(client, bucket, "m/", directory, sha256=False)  # S3 states no sha256
    cache = DigestCache(tmp_path / "digests.sqlite")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(remote, "SMALL_FILE_BYTES", 0)
        first = validate(f"s3://{bucket}/m/", digest_cache=cache)
        second = validate(f"s3://{bucket}/m/", digest_cache=cache)
    one = next(c for c in first.checks if c.name == "checksum")
    two = next(c for c in second.checks if c.name == "checksum")
    assert one.status is Status.PASSED and two.status is Status.PASSED, one.reason
    assert "download" in set(one.details["sources"].values())
    assert one.details["downloaded_bytes"] > 0 and "cost a download" in one.reason
    assert set(two.details["sources"].values()) <= {"cache", "mirror"}
    assert two.details["downloaded_bytes"] == 0


def test_hashing_by_download_stops_at_the_hash_limit(tmp_path: Path, s3env: Any) -> None:
    """Without a provider sha256 a weight file is downloaded to hash, for as long as the store
    takes: validation.hash_limit_s bounds it as it bounds hashing from a local disk."""
    from services.contracts.policy import ValidationPolicy

    directory = tmp_path / "model"
    write_sample_model(directory)
    client, bucket = new_bucket(s3env)
    upload_directory(client, bucket, "m/", directory, sha256=False)  # S3 states no sha256
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(remote, "SMALL_FILE_BYTES", 0)
        mp.setattr(remote, "DIGEST_CHUNK", 256)  # many reads, so there is a "between"
        mp.setattr(remote, "DIGEST_INFLIGHT", 1)
        report = validate(f"s3://{bucket}/m/", policy=ValidationPolicy(hash_limit_s=0.001))
    check = next(c for c in report.checks if c.name == "checksum")
    assert check.status is Status.FAILED, check.reason
    assert "hashing stopped in model.safetensors after " in check.reason
    assert "at validation.hash_limit_s (0.001 s): the store states no sha256 for it" in (
        check.reason
    )


def test_a_wrong_sha256_on_the_command_line_blocks_without_a_download(
    tmp_path: Path, s3env: Any
) -> None:
    directory = tmp_path / "model"
    write_sample_model(directory)
    client, bucket = new_bucket(s3env)
    upload_directory(client, bucket, "m/", directory)
    weights = next(p for p in directory.rglob("*.safetensors"))
    rel = weights.relative_to(directory).as_posix()
    report = validate(f"s3://{bucket}/m/", expected_sha256={rel: "0" * 64})
    checksum = next(c for c in report.checks if c.name == "checksum")
    assert checksum.status is Status.FAILED and "mismatch" in checksum.reason
    assert checksum.details["sources"][rel] == "provider"
    assert report.status is Status.FAILED


def test_a_location_that_cannot_be_read_is_a_one_line_failure(s3env: Any) -> None:
    report = validate("s3://no-such-bucket-preflight-v/m/")
    assert report.status is Status.FAILED
    assert "\n" not in report.reason and "no such bucket" in report.reason


def test_a_big_pickle_is_validated_from_what_its_scan_reads(tmp_path: Path, s3env: Any) -> None:
    """A legacy torch checkpoint's array bytes, or a pickled 3 MB buffer, are passed over by
    their length: only the opcodes around them are fetched, and the answers are the local ones."""
    import pickle

    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps(b"\0" * 3_000_000, protocol=4))
    blob = pickle.BINBYTES + (2_000_000).to_bytes(4, "little") + b"\7" * 2_000_000 + pickle.POP
    payload = hostile.os_system_pickle(directory)[:-1] + blob + pickle.STOP
    (directory / "weights.dat").write_bytes(payload)  # no known format: may still be a pickle
    # either file, read whole, is over the limit
    report, remote_read = validated_alike(s3env, directory, whole_file_max=300_000)
    assert "weights.dat: imports os.system" in report.reason
    assert remote_read["bytes_read"] < 400_000  # of 5 MB: head and one 64 KiB block per file
    assert "pickle scan" in remote_read["fetched"]["pytorch_model.bin"]


def test_a_big_npy_is_validated_from_its_header_unless_it_holds_objects(
    tmp_path: Path, s3env: Any
) -> None:
    """A .npy of numbers is judged by its header: its data is never fetched, and its size may
    be over the whole-read limit. One of Python objects is a pickle, read whole."""
    import numpy as np

    directory = tmp_path / "model"
    directory.mkdir()
    np.save(directory / "weights.npy", np.zeros((1024, 1024), np.float32))  # 4 MiB
    np.save(directory / "objects.npy", np.array([b"\0" * 2_000_000], dtype=object))
    report, remote_read = validated_alike(s3env, directory, whole_file_max=3_000_000)
    assert "objects.npy: array of dtype object holds pickled objects" in report.reason
    assert remote_read["fetched"] == {"weights.npy": "numpy header", "objects.npy": "whole"}
    objects = (directory / "objects.npy").stat().st_size
    # of weights.npy's 4 MiB: its head, tail and HDF5 probes (the two-format rules)
    assert remote_read["bytes_read"] - objects < 3 * 65_600


def test_big_onnx_external_data_is_validated_without_a_download(tmp_path: Path, s3env: Any) -> None:
    """An ONNX model's external data is raw tensor bytes, scanned as a pickle might be: a few
    bytes of it are read, whether it opens like a pickle or not."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    directory = tmp_path / "model"
    directory.mkdir()
    values = np.random.default_rng(0).standard_normal(1_000_000).astype(np.float32)
    values[0] = np.frombuffer(b"\x80\x02\x00\x3f", "<f4")[0]  # opens like PROTO 2
    graph = helper.make_graph(
        [helper.make_node("Identity", ["W"], ["Y"])],
        "g",
        [],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1_000_000])],
        initializer=[numpy_helper.from_array(values, name="W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, str(directory / "model.onnx"), save_as_external_data=True,
                    location="model.onnx_data", size_threshold=0)  # fmt: skip
    # the data, read whole, is over the limit
    report, remote_read = validated_alike(s3env, directory, whole_file_max=1_000_000)
    assert report.status is Status.PASSED, report.reason
    assert remote_read["bytes_read"] < 200_000  # of 4 MB: its head and its last 64 KiB


def test_a_big_onnx_model_is_validated_from_its_protobuf_framing(
    tmp_path: Path, s3env: Any
) -> None:
    """Tensors stored inside the ModelProto (12 MB of raw_data here) are passed over by their
    length: the walk the structure check runs is the plan."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    directory = tmp_path / "model"
    directory.mkdir()
    rng = np.random.default_rng(1)
    weights = [
        numpy_helper.from_array(rng.standard_normal((1000, 1000)).astype(np.float32), name=n)
        for n in ("A", "B", "C")
    ]
    nodes = [helper.make_node("MatMul", ["X", "A"], ["H"]), helper.make_node("MatMul", ["H", "B"],
             ["I"]), helper.make_node("MatMul", ["I", "C"], ["Y"])]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 1000])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 1000])],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, str(directory / "model.onnx"))
    # the file, read whole, is over the limit
    report, remote_read = validated_alike(s3env, directory, whole_file_max=1_000_000)
    assert report.status is Status.PASSED, report.reason
    assert remote_read["fetched"]["model.onnx"] == "ONNX framing (tensor payloads skipped)"
    assert remote_read["bytes_read"] < 600_000  # of 12 MB: a few 64 KiB blocks


def test_a_zip_that_is_an_hdf5_file_too_is_read_as_both(
    tmp_path: Path, s3env: Any, strict_planner: None
) -> None:
    """The zip plan alone would leave out the HDF5 metadata between the zip's parts, and h5py
    would not find the Lambda in the mirror: such a file is read whole."""
    directory = tmp_path / "model"
    hostile.write_keras_zip_hdf5_polyglot(directory, pad=1_000_000)
    report, _ = validated_alike(s3env, directory)
    assert "also an HDF5 file (superblock at byte 4,096): model_config: Keras Lambda" in (
        report.reason
    )


def test_a_pickle_read_across_blocks_after_skipped_payloads_is_read_as_local(
    tmp_path: Path, s3env: Any, strict_planner: None
) -> None:
    """The plan is the scan's own reads: after each payload it passes over, it resumes in a
    block not fetched yet, and a GLOBAL's lines may run into the next block (4 KiB here)."""
    import pickle

    directory = tmp_path / "model"
    directory.mkdir()
    body = b""
    for size in (10_000, 20_000, 30_000):  # BINBYTES payloads, each passed over, then POP
        body += pickle.BINBYTES + size.to_bytes(4, "little") + b"\7" * size + pickle.POP
    start = 2 + len(body)
    cut = -(-start // 4096) * 4096 - 3  # the GLOBAL's "os\nsystem" crosses a block boundary
    body += pickle.BINBYTES + (cut - start - 5).to_bytes(4, "little") + b"\7" * (cut - start - 5)
    body += pickle.POP + hostile.os_system_pickle(directory)[2:]
    (directory / "weights.dat").write_bytes(pickle.PROTO + b"\x02" + body)
    report, remote_read = validated_alike(s3env, directory)
    assert "weights.dat: imports os.system" in report.reason
    assert remote_read["fetched"]["weights.dat"] == "pickle scan: what the pickle model reads"


def test_a_pickle_whose_scan_reads_too_much_is_reported_not_downloaded(
    tmp_path: Path, s3env: Any
) -> None:
    import pickle

    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps(list(range(100_000)), protocol=2))
    client, bucket = new_bucket(s3env)
    upload_directory(client, bucket, "m/", directory)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(remote, "SMALL_FILE_BYTES", 1024)
        mp.setattr(remote, "WHOLE_FILE_MAX", 100_000)
        report = validate(f"s3://{bucket}/m/")
    assert report.status is Status.FAILED
    assert "pytorch_model.bin: not read: its pickle scan reads over 100.00 kB" in report.reason
    remote_read = next(c for c in report.checks if c.name == "format").details["remote"]
    assert remote_read["bytes_read"] < 300_000


def test_preflight_validate_reads_an_s3_location(
    tmp_path: Path, s3env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from services.stack.cli import app

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    directory = tmp_path / "model"
    write_sample_model(directory)
    client, bucket = new_bucket(s3env)
    upload_directory(client, bucket, "chat/v1/", directory)
    runner = CliRunner()
    ok = runner.invoke(app, ["validate", f"s3://{bucket}/chat/v1/", "--json"])
    assert ok.exit_code == 0, ok.output
    report = json.loads(ok.output)
    assert report["status"] == "passed"
    assert f"from s3://{bucket}/chat/v1/" in report["reason"]
    missing = runner.invoke(app, ["validate", f"s3://{bucket}/chat/v9/"])
    assert missing.exit_code == 1
    assert "no objects under this prefix" in missing.output


def test_preflight_deploy_refuses_a_scheme_it_cannot_read() -> None:
    from typer.testing import CliRunner

    from services.stack.cli import app

    result = CliRunner().invoke(app, ["deploy", "ftp://host/m", "-m", "m", "-v", "1"])
    assert result.exit_code != 0 and "s3://BUCKET/PREFIX/" in result.output


def test_an_hf_location_is_validated_from_the_hub_api_and_range_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.hub_api import HubApi

    directory = tmp_path / "model"
    write_sample_model(directory)
    with HubApi() as hub:
        hub.add_repo("acme/chat", directory)
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", hub.token)
        report = validate("hf://acme/chat@main", mirror_fill=POISON)
        local = validate(str(directory))
        missing = validate("hf://acme/nothing")
    assert outcome(report, None) == outcome(local, str(directory))
    checksum = next(c for c in report.checks if c.name == "checksum")
    assert "provider" in set(checksum.details["sources"].values())  # the Hub's LFS sha256
    assert checksum.details["downloaded_bytes"] == 0
    assert "from hf://acme/chat@main" in report.reason
    assert missing.status is Status.FAILED and "\n" not in missing.reason
    assert "hf://acme/nothing" in missing.reason and hub.token not in missing.reason


def test_an_https_location_hashes_what_its_manifest_only_claims(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.https_files import HttpsFiles

    directory = tmp_path / "model"
    write_sample_model(directory)
    listing = {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }
    (directory / "manifest.json").write_text(json.dumps(listing))
    with HttpsFiles(directory, prefix="/models/chat/") as files:
        monkeypatch.setenv("PREFLIGHT_CA_BUNDLE", str(files.ca_file))
        report = validate(files.url, mirror_fill=POISON)
        weights = next(p for p in directory.rglob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:-4] + b"evil")  # the manifest is not updated
        altered = validate(files.url)
    assert report.status is Status.PASSED, report.reason
    checksum = next(c for c in report.checks if c.name == "checksum")
    assert "provider" not in set(checksum.details["sources"].values())
    bad = next(c for c in altered.checks if c.name == "checksum")
    assert bad.status is Status.FAILED and "mismatch" in bad.reason


def test_object_names_that_climb_out_of_the_model_are_reported_not_written(
    tmp_path: Path, s3env: Any
) -> None:
    client, bucket = new_bucket(s3env)
    client.put_object(Bucket=bucket, Key="m/config.json", Body=b'{"model_type": "gpt2"}')
    client.put_object(Bucket=bucket, Key="m/../evil.py", Body=b"import os")
    client.put_object(Bucket=bucket, Key="m//abs.py", Body=b"import os")
    report = validate(f"s3://{bucket}/m/")
    assert report.status is Status.FAILED
    assert "'../evil.py': a file name outside the model" in report.reason
    assert not (tmp_path.parent / "evil.py").exists()


def test_an_object_that_is_also_a_folder_is_reported_not_a_crash(s3env: Any) -> None:
    client, bucket = new_bucket(s3env)
    client.put_object(Bucket=bucket, Key="m/config.json", Body=b'{"model_type": "gpt2"}')
    client.put_object(Bucket=bucket, Key="m/model.safetensors", Body=b"\0" * 64)
    client.put_object(Bucket=bucket, Key="m/model.safetensors/x", Body=b"hello")
    report = validate(f"s3://{bucket}/m/")
    assert report.status is Status.FAILED
    assert (
        "model.safetensors: both an object and a folder of objects (model.safetensors/...)"
        in report.reason
    )
    assert "Errno" not in report.reason


class _ShortStore:
    """A store whose objects serve fewer bytes than their listing says (replaced mid-read)."""

    display = "s3://short/m/"
    one_file = None

    def __init__(self) -> None:
        from services.storage.base import ReadCounter

        self.reads = ReadCounter()

    def list(self) -> list[Any]:
        from services.storage.base import RemoteObject

        return [RemoteObject(rel="model.gguf", size=4_000_000, version="1")]

    def read(self, rel: str, start: int, end: int) -> bytes:
        # version 3, no tensors, one metadata key 1 MB long: its read runs past what is served
        header = b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 1_000_000)
        data = (header + b"k" * 200_000)[start:end]
        self.reads.add(len(data))
        return data


def test_an_object_shorter_than_its_listing_is_a_clear_answer_not_a_hang(tmp_path: Path) -> None:
    from services.storage.base import StoreError

    with pytest.raises(StoreError) as caught:
        remote.mirror(_ShortStore(), tmp_path)
    assert caught.value.kind == "changed" and "\n" not in str(caught.value)


def test_a_location_no_store_can_parse_is_a_failed_report_not_an_exception() -> None:
    report = validate("https://[::1/")
    assert report.status is Status.FAILED and "\n" not in report.reason


def test_preflight_benchmark_fetches_a_remote_location_and_says_why_it_cannot(
    tmp_path: Path, s3env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from services.stack.cli import app

    monkeypatch.setenv("PREFLIGHT_MODEL_CACHE_DIR", str(tmp_path / "cache"))
    result = CliRunner().invoke(
        app, ["benchmark", "s3://no-such-bucket-preflight-b/m/", "--data-dir", str(tmp_path)]
    )
    assert result.exit_code == 2, result.output
    assert "no such bucket" in result.output


def test_preflight_benchmark_shows_the_fetch_on_the_terminal(
    tmp_path: Path, s3env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The download is not a silent terminal: the fetch's start and end reach stderr, the report
    (here: no config.json) stays alone on stdout, and the handler goes afterwards."""

    from typer.testing import CliRunner

    from services.benchmarker.loading import fetch_log
    from services.stack.cli import app

    client, bucket = new_bucket(s3env)
    model = tmp_path / "not-hf"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"\0" * 300_000)
    upload_directory(client, bucket, "m/", model)
    monkeypatch.setenv("PREFLIGHT_MODEL_CACHE_DIR", str(tmp_path / "cache"))
    location = f"s3://{bucket}/m/"
    before = (list(fetch_log.handlers), fetch_log.level, fetch_log.propagate)

    def run() -> list[str]:
        result = CliRunner().invoke(app, ["benchmark", location, "--data-dir", str(tmp_path / "d")])
        assert result.exit_code == 2, result.output
        assert (list(fetch_log.handlers), fetch_log.level, fetch_log.propagate) == before
        lines = result.stderr.splitlines()
        assert "fetch" not in result.stdout and "no config.json" in result.stdout, result.stdout
        return lines

    lines = run()
    start = lines.index(f"fetching {location}: 0 B of 293.0 KiB (0%)")
    end = next(i for i, x in enumerate(lines) if x.startswith(f"fetched {location}: 293.0 KiB "))
    assert start < end, lines
    # Again: the model is in the cache now, and the terminal says so instead of a 100% line.
    lines = run()
    assert f"fetching {location}: all 293.0 KiB already in the model cache" in lines, lines
    assert any(x.startswith(f"fetched {location}: 0 B downloaded") for x in lines), lines


def test_one_object_takes_sha256_by_its_name_and_the_benchmarker_says_what_it_needs(
    tmp_path: Path, s3env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from services.stack.cli import app

    directory = tmp_path / "model"
    directory.mkdir()
    formats.write_gguf(directory)
    data = (directory / "model.gguf").read_bytes()
    client, bucket = new_bucket(s3env)
    upload_directory(client, bucket, "org/", directory)
    location = f"s3://{bucket}/org/model.gguf"

    right = validate(location, expected_sha256={"model.gguf": hashlib.sha256(data).hexdigest()})
    wrong = validate(location, expected_sha256={"model.gguf": "0" * 64})
    checksums = [next(c for c in r.checks if c.name == "checksum") for r in (right, wrong)]
    assert [c.status for c in checksums] == [Status.PASSED, Status.FAILED]
    assert all(c.details["sources"]["model.gguf"] == "provider" for c in checksums)
    assert "mismatch" in checksums[1].reason and wrong.status is Status.FAILED

    monkeypatch.setenv("PREFLIGHT_MODEL_CACHE_DIR", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, ["benchmark", location, "--data-dir", str(tmp_path / "d")])
    assert result.exit_code == 2, result.output
    assert f"{location}: no config.json" in result.stdout, result.stdout
