"""s3:// locations through boto3 against a real S3 API (moto's standalone server): listing,
provider checksums, counted range reads, the errors a user can act on, and the model cache."""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.storage.base import StoreError
from services.storage.cache import ModelCache
from services.storage.locations import open_store
from services.storage.s3 import S3Store, parse, upload_directory
from tests.s3_server import CREDENTIALS, S3Faults

pytestmark = pytest.mark.integration

FILES = {
    "config.json": b'{"model_type": "gpt2"}',
    "model-00001-of-00002.safetensors": bytes(range(256)) * 4096,
    "model-00002-of-00002.safetensors": b"\x07" * 300_000,
    "tokenizer/vocab.json": b'{"a": 1}',
}


@pytest.fixture
def s3env(moto_s3: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The process environment a user would have: keys and AWS_ENDPOINT_URL, no profile."""
    for key, value in moto_s3.environ().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    return moto_s3


@pytest.fixture
def faults(s3env: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Faults]:
    """The fault proxy in front of moto, and AWS_ENDPOINT_URL pointed at it."""
    with S3Faults(s3env.url) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        yield proxy


@pytest.fixture
def bucket(s3env: Any) -> str:
    name = f"models-{uuid.uuid4().hex[:12]}"
    client = s3env.client()
    client.create_bucket(Bucket=name)
    for rel, data in FILES.items():
        client.put_object(Bucket=name, Key=f"chat/v1/{rel}", Body=data, ChecksumAlgorithm="SHA256")
    return name


def one_line(exc: StoreError, location: str) -> str:
    message = str(exc)
    assert "\n" not in message and location in message
    assert CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in message
    assert CREDENTIALS["AWS_ACCESS_KEY_ID"] not in message
    return message


def test_locations_parse_to_bucket_and_prefix() -> None:
    assert parse("s3://b/models/chat/") == ("b", "models/chat/")
    assert parse("s3://b/models/chat") == ("b", "models/chat/")
    assert parse("s3://b") == ("b", "")
    with pytest.raises(StoreError) as caught:
        parse("s3:///models")
    assert caught.value.kind == "unsupported"


def test_a_listing_gives_names_sizes_and_the_full_object_sha256(bucket: str) -> None:
    store = open_store(f"s3://{bucket}/chat/v1")
    assert isinstance(store, S3Store)
    listed = {obj.rel: obj for obj in store.list()}
    assert set(listed) == set(FILES)
    for rel, data in FILES.items():
        assert listed[rel].size == len(data)
        assert listed[rel].sha256 == hashlib.sha256(data).hexdigest()
        assert listed[rel].version  # ETag: the digest cache's key
    assert store.reads.bytes_read == 0  # a listing reads no object bytes


def test_range_reads_fetch_and_count_only_what_was_asked(bucket: str) -> None:
    store = open_store(f"s3://{bucket}/chat/v1/")
    rel = "model-00001-of-00002.safetensors"
    assert store.read(rel, 10, 20) == FILES[rel][10:20]
    assert store.read(rel, len(FILES[rel]) - 5, len(FILES[rel]) + 100) == FILES[rel][-5:]
    assert store.reads.bytes_read == 15 and store.reads.requests == 2


def test_a_multipart_upload_checksum_is_not_taken_for_the_files_sha256(s3env: Any) -> None:
    client = s3env.client()
    name = f"models-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    parts = [b"a" * (5 * 1024 * 1024), b"b" * 1024]
    upload = client.create_multipart_upload(Bucket=name, Key="m/w.bin", ChecksumAlgorithm="SHA256")
    done = []
    for number, data in enumerate(parts, start=1):
        answer = client.upload_part(
            Bucket=name,
            Key="m/w.bin",
            PartNumber=number,
            UploadId=upload["UploadId"],
            Body=data,
            ChecksumAlgorithm="SHA256",
        )
        done.append(
            {
                "PartNumber": number,
                "ETag": answer["ETag"],
                "ChecksumSHA256": answer.get("ChecksumSHA256")
                or base64.b64encode(hashlib.sha256(data).digest()).decode(),
            }
        )
    client.complete_multipart_upload(
        Bucket=name, Key="m/w.bin", UploadId=upload["UploadId"], MultipartUpload={"Parts": done}
    )
    (obj,) = open_store(f"s3://{name}/m/").list()
    whole = hashlib.sha256(b"".join(parts)).hexdigest()
    assert obj.sha256 != whole
    if obj.sha256 is None:
        head = client.head_object(Bucket=name, Key="m/w.bin", ChecksumMode="ENABLED")
        if head.get("ChecksumSHA256"):  # moto states one: it must be called composite
            assert obj.checksum_note and "composite" in obj.checksum_note


def test_an_object_put_without_a_checksum_has_no_provider_sha256(s3env: Any) -> None:
    client = s3env.client()
    name = f"models-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    client.put_object(Bucket=name, Key="m/config.json", Body=b"{}")
    (obj,) = open_store(f"s3://{name}/m").list()
    # Newer clients add a CRC by default, never a SHA256 unless asked: nothing to compare.
    assert obj.sha256 is None or obj.sha256 == hashlib.sha256(b"{}").hexdigest()


def test_a_missing_bucket_is_one_line_naming_it(s3env: Any) -> None:
    location = "s3://no-such-bucket-preflight/models/"
    with pytest.raises(StoreError) as caught:
        open_store(location).list()
    assert caught.value.kind == "not_found"
    assert "no such bucket" in one_line(caught.value, location)


def test_an_empty_prefix_is_not_found(bucket: str) -> None:
    location = f"s3://{bucket}/chat/v9/"
    with pytest.raises(StoreError) as caught:
        open_store(location).list()
    assert caught.value.kind == "not_found"
    one_line(caught.value, location)


def test_a_location_naming_one_object_is_that_one_file(bucket: str, s3env: Any) -> None:
    rel = "model-00002-of-00002.safetensors"
    location = f"s3://{bucket}/chat/v1/{rel}"
    store = open_store(location)
    [obj] = store.list()
    assert (obj.rel, obj.size, store.one_file) == (rel, len(FILES[rel]), rel)
    assert obj.sha256 == hashlib.sha256(FILES[rel]).hexdigest()
    assert store.display == location  # in every message, as the user wrote it
    assert store.read(rel, 5, 9) == FILES[rel][5:9]
    assert [o.rel for o in store.list()] == [rel]  # a second listing is still the one file
    # at the bucket's root too
    s3env.client().put_object(Bucket=bucket, Key="top.gguf", Body=b"GGUF....")
    root = open_store(f"s3://{bucket}/top.gguf")
    assert [o.rel for o in root.list()] == ["top.gguf"]
    assert root.read("top.gguf", 0, 4) == b"GGUF"


def test_a_prefix_wins_over_an_object_of_the_same_name(bucket: str, s3env: Any) -> None:
    s3env.client().put_object(Bucket=bucket, Key="chat/v1", Body=b"not the model")
    store = open_store(f"s3://{bucket}/chat/v1")
    assert {o.rel for o in store.list()} == set(FILES) and store.one_file is None


def test_a_trailing_slash_names_a_prefix_never_an_object(bucket: str) -> None:
    location = f"s3://{bucket}/chat/v1/config.json/"
    with pytest.raises(StoreError) as caught:
        open_store(location).list()
    assert caught.value.kind == "not_found"
    assert "no objects under this prefix" in one_line(caught.value, location)


def test_a_location_that_is_neither_object_nor_prefix_says_both(bucket: str) -> None:
    location = f"s3://{bucket}/chat/v1/nothing.gguf"
    with pytest.raises(StoreError) as caught:
        open_store(location).list()
    assert caught.value.kind == "not_found"
    message = one_line(caught.value, location)
    assert f"no such object, and no objects under {location}/" in message


def test_one_object_is_read_with_rights_to_it_alone(bucket: str, faults: S3Faults) -> None:
    """A policy of s3:GetObject on one key, no s3:ListBucket: the listing is refused, the
    object is still read; a prefix, or an object the policy does not cover, says so."""
    faults.fail("GET", f"/{bucket}", status=403, code="AccessDenied", times=100)
    rel = "config.json"
    store = open_store(f"s3://{bucket}/chat/v1/{rel}")
    assert [o.rel for o in store.list()] == [rel] and store.read(rel, 0, 5) == FILES[rel][:5]
    faults.fail("HEAD", f"/{bucket}/chat/v1/secret.gguf", status=403, code="AccessDenied")
    for location in (f"s3://{bucket}/chat/v1/", f"s3://{bucket}/chat/v1/secret.gguf"):
        with pytest.raises(StoreError) as caught:
            open_store(location).list()
        assert caught.value.kind == "access_denied"
        assert "listing: access denied" in one_line(caught.value, location.rstrip("/"))


def test_a_key_that_names_no_file_is_refused_not_resolved(bucket: str, s3env: Any) -> None:
    """S3 takes "dir/.." as a key; as a file name in the mirror it would be the folder above."""
    s3env.client().put_object(Bucket=bucket, Key="chat/..", Body=b"x")
    location = f"s3://{bucket}/chat/.."
    with pytest.raises(StoreError) as caught:
        open_store(location).list()
    assert caught.value.kind == "unsupported"
    assert "'..' is not a file name" in one_line(caught.value, location)


def test_one_object_has_its_own_digest_cache_key(bucket: str, s3env: Any) -> None:
    """Not the key of dir/model.gguf/model.gguf read through the prefix dir/model.gguf/."""
    from services.validator.remote import _remote_key

    client = s3env.client()
    client.put_object(Bucket=bucket, Key="d/model.gguf", Body=b"GGUF one")
    client.put_object(Bucket=bucket, Key="e/model.gguf/model.gguf", Body=b"GGUF two")
    one = open_store(f"s3://{bucket}/d/model.gguf")
    [obj] = one.list()
    key = _remote_key(one, obj)
    assert key is not None and key.path.startswith(f"s3://{bucket}/d/model.gguf@")
    folder = open_store(f"s3://{bucket}/e/model.gguf/")
    [other] = folder.list()
    other_key = _remote_key(folder, other)
    assert other_key is not None
    assert other_key.path.startswith(f"s3://{bucket}/e/model.gguf/model.gguf@")


def test_a_missing_object_is_not_found(bucket: str) -> None:
    location = f"s3://{bucket}/chat/v1/"
    with pytest.raises(StoreError) as caught:
        open_store(location).read("nothing.safetensors", 0, 10)
    assert caught.value.kind == "not_found"
    assert "nothing.safetensors" in one_line(caught.value, location)


def test_no_credentials_at_all_says_where_they_are_looked_for(
    bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    location = f"s3://{bucket}/chat/v1/"
    with pytest.raises(StoreError) as caught:
        open_store(location).list()
    assert caught.value.kind == "access_denied"
    assert "AWS_ACCESS_KEY_ID" in one_line(caught.value, location)


@pytest.mark.parametrize(
    ("code", "status", "kind", "words"),
    [
        ("AccessDenied", 403, "access_denied", "access denied"),
        ("ExpiredToken", 400, "expired_credentials", "expired"),
        ("InvalidAccessKeyId", 403, "access_denied", "access key"),
    ],
)
def test_refusals_of_the_store_are_one_line_a_user_can_act_on(
    bucket: str, faults: S3Faults, code: str, status: int, kind: str, words: str
) -> None:
    faults.fail("GET", f"/{bucket}*", status=status, code=code, times=100)
    location = f"s3://{bucket}/chat/v1/"
    with pytest.raises(StoreError) as caught:
        open_store(location).list()
    assert caught.value.kind == kind
    assert words in one_line(caught.value, location)


def test_slowdown_is_retried_with_backoff_and_then_succeeds(bucket: str, faults: S3Faults) -> None:
    rel = "model-00002-of-00002.safetensors"
    faults.fail("GET", f"/{bucket}/chat/v1/{rel}", status=503, code="SlowDown", times=2)
    store = open_store(f"s3://{bucket}/chat/v1/")
    assert store.read(rel, 0, 100) == FILES[rel][:100]
    assert faults.failed == 2


def test_throttling_past_the_retries_is_a_clear_failure(bucket: str, faults: S3Faults) -> None:
    rel = "model-00002-of-00002.safetensors"
    faults.fail("GET", f"/{bucket}/chat/v1/{rel}", status=503, code="SlowDown", times=100)
    location = f"s3://{bucket}/chat/v1/"
    store = S3Store(location, retries=2)
    with pytest.raises(StoreError) as caught:
        store.read(rel, 0, 100)
    assert faults.failed == 3  # the first try and two retries
    assert caught.value.kind == "throttled"
    assert "SlowDown" in one_line(caught.value, location)


def test_429_is_retried_too(bucket: str, faults: S3Faults) -> None:
    rel = "config.json"
    faults.fail("GET", f"/{bucket}/chat/v1/{rel}", status=429, code="TooManyRequests")
    store = open_store(f"s3://{bucket}/chat/v1/")
    assert store.read(rel, 0, 100) == FILES[rel]
    assert faults.failed == 1


def test_the_model_cache_fetches_an_s3_model_once(bucket: str, tmp_path: Path) -> None:
    cache = ModelCache(tmp_path / "cache", max_bytes=1 << 30)
    first = open_store(f"s3://{bucket}/chat/v1/")
    path = cache.fetch(first)
    for rel, data in FILES.items():
        assert (path / rel).read_bytes() == data
    assert first.reads.bytes_read == sum(len(d) for d in FILES.values())
    again = open_store(f"s3://{bucket}/chat/v1/")
    assert cache.fetch(again) == path
    assert again.reads.bytes_read == 0  # same ETags and sha256s: nothing downloaded


def test_the_benchmarker_loads_a_model_from_s3_through_the_cache(
    s3env: Any, sample_model: Path, tmp_path: Path
) -> None:
    from services.benchmarker import loading

    client = s3env.client()
    name = f"models-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    upload_directory(client, name, "sample/", sample_model)
    cache = ModelCache(tmp_path / "cache", max_bytes=1 << 30)
    loaded = loading.load_model(f"s3://{name}/sample/", device="cpu", cache=cache)
    assert loaded.path.is_relative_to(tmp_path / "cache")
    assert (loaded.path / "config.json").read_bytes() == (sample_model / "config.json").read_bytes()
    with pytest.raises(loading.LoadError) as caught:
        loading.load_model(f"s3://{name}/nothing/", device="cpu", cache=cache)
    assert "\n" not in str(caught.value) and "no objects" in str(caught.value)


def test_an_object_replaced_after_the_listing_is_never_read_as_a_mix(bucket: str) -> None:
    location = f"s3://{bucket}/chat/v1/"
    store = open_store(location)
    store.list()
    rel = "model-00002-of-00002.safetensors"
    s3 = S3Store(location).client
    s3.put_object(Bucket=bucket, Key=f"chat/v1/{rel}", Body=b"\x08" * 300_000)  # same size
    with pytest.raises(StoreError) as caught:
        store.read(rel, 0, 100)
    assert caught.value.kind == "changed"
    assert "changed since it was listed" in one_line(caught.value, location)


def test_an_object_replaced_between_listing_and_head_is_read_as_the_head_says(
    bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The size, the ETag every read is pinned to and the checksum come from one HEAD. A
    longer object put between the listing and the HEAD is read to its own end, never judged
    by a prefix of the listed length."""
    location = f"s3://{bucket}/chat/v1/"
    rel = "model-00002-of-00002.safetensors"
    longer = FILES[rel] + b"\x01" * 4096
    real_head = S3Store._head

    def racing_head(self: S3Store, entry: dict[str, Any]) -> dict[str, Any]:
        if entry["Key"].endswith(rel):
            self.client.put_object(Bucket=bucket, Key=entry["Key"], Body=longer,
                                   ChecksumAlgorithm="SHA256")  # fmt: skip
        return real_head(self, entry)

    monkeypatch.setattr(S3Store, "_head", racing_head)
    store = open_store(location)
    listed = {o.rel: o for o in store.list()}[rel]
    assert listed.size == len(longer)
    assert listed.sha256 == hashlib.sha256(longer).hexdigest()
    assert store.read(rel, 0, listed.size) == longer


def test_the_scheme_is_read_in_any_case(bucket: str) -> None:
    assert {o.rel for o in S3Store(f"S3://{bucket}/chat/v1/").list()} == set(FILES)
