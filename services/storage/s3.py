"""s3://bucket/prefix/ as a `Store`, through boto3 (any S3-compatible endpoint). A location
that names one object (s3://bucket/models/chat.gguf) and has nothing under it as a prefix is that
one file, as a local path may be a directory or one file.

Credentials and endpoint come from boto3's standard chain (AWS_* env, profiles, AWS_ENDPOINT_URL,
instance roles); nothing of them reaches a message. A listing is ListObjectsV2; the provider
checksum is HeadObject with ChecksumMode=ENABLED: a FULL_OBJECT ChecksumSHA256 is the file's
sha256, a COMPOSITE one (multipart, sha256 of part sha256s) is not, and the object says so.
"""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from services.storage.base import ReadCounter, RemoteObject, StoreError

MAX_OBJECTS = 10_000  # the validator's MAX_FILES: a prefix with more is not one model
RETRIES = 6  # after the first try: boto3 "standard" mode retries SlowDown, 429, 5xx with backoff

_KINDS = {
    "NoSuchBucket": ("not_found", "no such bucket"),
    "NoSuchKey": ("not_found", "no such object"),
    "404": ("not_found", "not found"),
    "AccessDenied": ("access_denied", "access denied: check the credentials' policy for this "
                     "bucket (s3:ListBucket on it, s3:GetObject on the prefix)"),
    "403": ("access_denied", "access denied"),
    "InvalidAccessKeyId": ("access_denied", "the access key is not known to this endpoint"),
    "SignatureDoesNotMatch": ("access_denied", "the secret key does not match the access key"),
    "ExpiredToken": ("expired_credentials", "the credentials have expired: refresh them "
                     "(aws sso login, or new session credentials)"),
    "TokenRefreshRequired": ("expired_credentials", "the credentials have expired"),
    "SlowDown": ("throttled", "throttled by the store (503 SlowDown) after retries: try later "
                 "or lower the parallelism"),
    "503": ("throttled", "the store answered 503 after retries"),
    "429": ("throttled", "the store answered 429 Too Many Requests after retries"),
    "TooManyRequests": ("throttled", "the store answered 429 Too Many Requests after retries"),
}  # fmt: skip


def parse(location: str) -> tuple[str, str]:
    """(bucket, prefix) of s3://bucket/prefix/; the prefix ends with '/' unless empty."""
    rest = location.split("://", 1)[1] if "://" in location else location  # S3:// too
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise StoreError(f"{location}: no bucket (s3://BUCKET/PREFIX/)", kind="unsupported")
    prefix = prefix.strip("/")
    return bucket, (prefix + "/") if prefix else ""


class S3Store:
    def __init__(
        self,
        location: str,
        *,
        client: Any = None,
        retries: int = RETRIES,
    ) -> None:
        self.bucket, self.prefix = parse(location)
        self.display = f"s3://{self.bucket}/{self.prefix}"
        self.reads = ReadCounter()
        self.one_file: str | None = None
        # s3://b/k (no trailing /) may name the object k when nothing is under k/
        rest = location.split("://", 1)[-1]
        self._key = self.prefix.rstrip("/") if self.prefix and not rest.endswith("/") else None
        self._etags: dict[str, str] = {}  # rel -> the listed ETag every read is pinned to
        if client is None:
            import boto3
            from botocore.config import Config

            # A session of its own: boto3's default one caches the credentials it first found,
            # and a store opened after they were rotated must see the new ones.
            client = boto3.session.Session().client(
                "s3",
                config=Config(
                    retries={"max_attempts": retries, "mode": "standard"},
                    max_pool_connections=32,  # the cache and the digest read in parallel
                ),
            )
        self.client = client

    def _error(self, exc: Exception, what: str) -> StoreError:
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        if isinstance(exc, NoCredentialsError):
            return StoreError(
                f"{self.display}: no AWS credentials found (AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role)",
                kind="access_denied",
            )
        if isinstance(exc, EndpointConnectionError):
            return StoreError(f"{self.display}: cannot reach the S3 endpoint ({exc})")
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            kind, words = _KINDS.get(code) or _KINDS.get(status) or ("error", code or status)
            return StoreError(f"{self.display}: {what}: {words}", kind=kind)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return StoreError(f"{self.display}: {what}: {type(exc).__name__}: {first}")

    def list(self) -> list[RemoteObject]:
        if self.one_file is not None and self._key is not None:  # listed before: one object
            return [self._one_object(self._key)]
        entries: list[dict[str, Any]] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix
            ):
                entries.extend(page.get("Contents", []))
        except Exception as exc:
            error = self._error(exc, "listing")
            if error.kind == "access_denied" and self._key is not None:
                # Credentials that may read the one object but not list its bucket (a policy
                # of s3:GetObject on one key): the location may still name that object.
                try:
                    return [self._one_object(self._key)]
                except StoreError:
                    pass
            raise error from exc
        files = [e for e in entries if not e["Key"].endswith("/")]
        if len(files) > MAX_OBJECTS:
            raise StoreError(
                f"{self.display}: more than {MAX_OBJECTS} objects under this prefix, more than "
                "a model has: name the model's own prefix",
                kind="unsupported",
            )
        if not files:
            if self._key is not None:
                return [self._one_object(self._key)]
            raise StoreError(f"{self.display}: no objects under this prefix", kind="not_found")
        with ThreadPoolExecutor(max_workers=16) as pool:
            heads = list(pool.map(self._head, files))
        return [self._object(e, h) for e, h in zip(files, heads, strict=True)]

    def _one_object(self, key: str) -> RemoteObject:
        """The location as one object, once its prefix turned out empty: the store's prefix
        becomes the object's folder and the object its one file."""
        shown = f"s3://{self.bucket}/{key}"
        folder, _, name = key.rpartition("/")
        if name in ("", ".", ".."):  # S3 allows such keys; no file may be named so
            raise StoreError(
                f"{shown}: {name!r} is not a file name: name the object or its prefix",
                kind="unsupported",
            )
        self.display = shown  # messages name the object as written from here on
        try:
            head = self._head({"Key": key})
        except StoreError as exc:
            if exc.kind != "not_found":  # e.g. no s3:GetObject on it: said as it is
                raise
            raise StoreError(
                f"{shown}: no such object, and no objects under {shown}/", kind="not_found"
            ) from exc
        self.prefix = folder + "/" if folder else ""
        self.one_file = name
        entry = {"Key": key, "Size": head.get("ContentLength", 0), "ETag": head.get("ETag")}
        return self._object(entry, head)

    def _head(self, entry: dict[str, Any]) -> dict[str, Any]:
        try:
            head: dict[str, Any] = self.client.head_object(
                Bucket=self.bucket, Key=entry["Key"], ChecksumMode="ENABLED"
            )
        except Exception as exc:
            raise self._error(exc, f"reading {entry['Key']}'s metadata") from exc
        return head

    def _object(self, entry: dict[str, Any], head: dict[str, Any] | None) -> RemoteObject:
        rel = entry["Key"][len(self.prefix) :]
        etag = str((head or {}).get("ETag") or entry.get("ETag") or "").strip('"')
        if etag:
            self._etags[rel] = etag
        vid = (head or {}).get("VersionId")
        # "null" is the version of every object in an unversioned or suspended bucket: not an
        # identity. The ETag changes with the content; the size is in the cache key too.
        version = (f"{vid}:{etag}" if vid and vid != "null" else etag) or None
        sha, note = None, None
        checksum = (head or {}).get("ChecksumSHA256")
        if checksum:
            if (head or {}).get("ChecksumType") == "COMPOSITE" or "-" in checksum:
                note = (
                    "S3's ChecksumSHA256 is a composite multipart checksum, not the file's sha256"
                )
            else:
                try:
                    raw = base64.b64decode(checksum, validate=True)
                except ValueError:
                    raw = b""
                if len(raw) == 32:
                    sha = raw.hex()
                else:
                    note = f"the store's ChecksumSHA256 {checksum[:60]!r} is not a sha256"
        # Size, ETag and checksum all from the HEAD, one response about one version: the
        # object may have been replaced since it was listed, and reads pinned to the HEAD's
        # ETag must not stop at the listed object's length.
        size = int((head or {}).get("ContentLength", entry["Size"]))
        return RemoteObject(rel=rel, size=size, version=version, sha256=sha, checksum_note=note)

    def read(self, rel: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        try:
            pinned = {"IfMatch": self._etags[rel]} if rel in self._etags else {}
            answer = self.client.get_object(
                Bucket=self.bucket,
                Key=self.prefix + rel,
                Range=f"bytes={start}-{end - 1}",
                **pinned,  # the version the listing saw, or 412: never a mix of two
            )
            data: bytes = answer["Body"].read()
        except Exception as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code")
            if code == "InvalidRange":
                self.reads.add(0)
                return b""
            if code in ("PreconditionFailed", "412"):
                raise StoreError(
                    f"{self.display}: {rel}: the object changed since it was listed (its ETag "
                    "no longer matches): try again",
                    kind="changed",
                ) from exc
            raise self._error(exc, f"reading {rel}") from exc
        self.reads.add(len(data))
        return data


def upload_directory(
    client: Any, bucket: str, prefix: str, directory: Path, *, sha256: bool = True
) -> int:
    """Put every file under `directory` at `prefix` (one PUT each, with a full-object
    ChecksumSHA256 unless `sha256` is False): how a model is published so that validation
    can compare digests without a download. Returns the bytes uploaded."""
    total = 0
    for path in sorted(directory.rglob("*")):
        if path.is_file() and not path.is_symlink():
            options = {"ChecksumAlgorithm": "SHA256"} if sha256 else {}
            with path.open("rb") as body:
                client.put_object(
                    Bucket=bucket,
                    Key=prefix + path.relative_to(directory).as_posix(),
                    Body=body,
                    **options,
                )
            total += path.stat().st_size
    return total
