"""sha256 against request digests or a shipped manifest; a digest cache that is never fooled."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from services.contracts.events import Status
from services.validator.checks.base import CheckContext
from services.validator.checks.checksum import DigestCache, FileKey, check_checksum, sha256_file
from services.validator.checks.inventory import build_inventory
from tests.unit.validator import formats


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check(
    directory: Path, expected: dict[str, str] | None = None, cache: DigestCache | None = None
) -> tuple[Status, str, dict[str, object]]:
    inv = build_inventory(str(directory))
    result = check_checksum(inv, CheckContext(expected_sha256=expected or {}, digest_cache=cache))
    return result.status, result.reason, result.details


def test_sha256_matches_openssl(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    openssl = subprocess.run(
        ["openssl", "dgst", "-sha256", "-r", str(path)], capture_output=True, text=True, check=True
    )
    assert sha256_file(path, read_size=1024 * 1024) == openssl.stdout.split()[0]


def test_request_digests_pass_and_a_mismatch_names_the_file(tmp_path: Path) -> None:
    formats.write_hf_safetensors(tmp_path)
    (tmp_path / "preflight-manifest.json").unlink()
    good = {"model.safetensors": digest(tmp_path / "model.safetensors")}
    assert check(tmp_path, good)[0] is Status.PASSED
    status, reason, _ = check(tmp_path, {"model.safetensors": "0" * 64})
    assert status is Status.FAILED
    assert "model.safetensors: sha256 mismatch" in reason


def test_manifest_in_the_model_directory_is_used(tmp_path: Path) -> None:
    formats.write_hf_safetensors(tmp_path)  # ships preflight-manifest.json
    status, reason, details = check(tmp_path)
    assert status is Status.PASSED, reason
    assert details["source"] == "preflight-manifest.json"
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor: a corrupted upload
    weights.write_bytes(bytes(data))
    status, reason, _ = check(tmp_path)
    assert status is Status.FAILED
    assert "model.safetensors: sha256 mismatch" in reason


def test_sha256sums_file_is_understood(tmp_path: Path) -> None:
    formats.write_hf_safetensors(tmp_path)
    (tmp_path / "preflight-manifest.json").unlink()
    (tmp_path / "SHA256SUMS").write_text(
        f"{digest(tmp_path / 'model.safetensors')}  model.safetensors\n"
    )
    assert check(tmp_path)[0] is Status.PASSED


def test_no_digests_at_all_is_skipped_and_says_how_to_provide_them(tmp_path: Path) -> None:
    formats.write_hf_safetensors(tmp_path)
    (tmp_path / "preflight-manifest.json").unlink()
    status, reason, _ = check(tmp_path)
    assert status is Status.SKIPPED
    assert "--sha256" in reason


def test_weights_not_covered_and_listed_files_missing_fail(tmp_path: Path) -> None:
    formats.write_hf_safetensors(tmp_path)
    (tmp_path / "extra.safetensors").write_bytes((tmp_path / "model.safetensors").read_bytes())
    manifest = json.loads((tmp_path / "preflight-manifest.json").read_text())
    manifest["gone.safetensors"] = "1" * 64
    (tmp_path / "preflight-manifest.json").write_text(json.dumps(manifest))
    status, reason, _ = check(tmp_path)
    assert status is Status.FAILED
    assert "gone.safetensors: listed with a digest but missing" in reason
    assert "extra.safetensors: weight file without an expected digest" in reason


def test_request_and_manifest_disagreeing_fails(tmp_path: Path) -> None:
    formats.write_hf_safetensors(tmp_path)
    status, reason, _ = check(tmp_path, {"model.safetensors": "2" * 64})
    assert status is Status.FAILED
    assert "request digest differs from preflight-manifest.json" in reason


def test_cache_makes_revalidation_free_and_is_never_trusted_after_a_change(tmp_path: Path) -> None:
    formats.write_hf_safetensors(tmp_path / "m")
    cache = DigestCache(tmp_path / "cache.sqlite")
    _, _, first = check(tmp_path / "m", cache=cache)
    assert first["cached_files"] == 0
    _, _, second = check(tmp_path / "m", cache=cache)
    assert second["cached_files"] == 1
    assert second["hashed_bytes"] == 0
    # Same size, same mtime, different bytes: ctime and the cache key change, so it is re-hashed.
    weights = tmp_path / "m" / "model.safetensors"
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    status, reason, third = check(tmp_path / "m", cache=cache)
    assert third["cached_files"] == 0
    assert status is Status.FAILED, reason
    cache.close()


def test_cache_keys_include_inode_and_ctime(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    key = FileKey.of(path)
    assert key.inode == path.stat().st_ino
    assert key.ctime_ns == path.stat().st_ctime_ns


@pytest.mark.parametrize("files", [1, 4])
def test_parallel_hashing_gives_the_same_digests(tmp_path: Path, files: int) -> None:
    expected = {}
    for i in range(files):
        p = tmp_path / f"shard{i}.safetensors"
        formats.write_safetensors_raw(
            p, {"a": {"dtype": "U8", "shape": [4096], "data_offsets": [0, 4096]}}, os.urandom(4096)
        )
        expected[p.name] = digest(p)
    status, reason, _ = check(tmp_path, expected)
    assert status is Status.PASSED, reason


def test_the_local_digest_cache_is_never_inside_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.validator.checks.checksum import local_digest_cache_path

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    model = tmp_path / "model"
    model.mkdir()
    user = tmp_path / "xdg" / "preflight" / "cache" / "digests.sqlite"
    assert local_digest_cache_path(model, None) == user
    assert local_digest_cache_path(model, tmp_path / "data") == tmp_path / "data" / "cache" / (
        "digests.sqlite"
    )
    assert local_digest_cache_path(model, model / ".preflight") == user
    # a model that holds the user's cache dir too: no cache at all
    monkeypatch.setenv("XDG_CACHE_HOME", str(model / "xdg"))
    assert local_digest_cache_path(model, model / ".preflight") is None
