"""Models on S3 (issue #16): validating from range reads, and the benchmarkers' fetch.

A Llama-7B-shaped sharded safetensors model (real headers, zero-filled data: sparse on local
disk) is uploaded to moto's S3 server (bench/moto_ranged.py: moto with ranged GETs that read
only their range) with ChecksumSHA256 on every object. Then:

    validate   `validate("s3://...")` with the digests given as --sha256 would give them, against
               the same model on local disk (digest cache warm, as a re-run on a CI box is):
               wall time per run and the bytes and requests it read.
               Goals: <= 2 s, and <= 0.1% of the model's bytes read.
    fetch      the benchmarkers' fetch (ModelCache.fetch: ranged reads in parallel into the
               content-addressed cache, sha256 checked, fsynced) beside the raw client (boto3's
               download_file, its TransferManager's threads, then fsync), the same objects,
               alternating which runs first; and a second fetch of the cached version.

Run `python bench/fetch_bench.py --help`; `--quick` uses a model a tenth the size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from machine import command_line, describe_machine  # bench/machine.py (scripts run from bench/)

from services.stack.samples import write_sparse_sharded_model
from services.storage.cache import ModelCache
from services.storage.s3 import S3Store, upload_directory
from services.validator.checks.checksum import DigestCache
from services.validator.validate import validate

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "AKIABENCHPREFLIGHT00",
    "AWS_SECRET_ACCESS_KEY": "bench-secret-key-000000000000000000000000",
    "AWS_DEFAULT_REGION": "us-east-1",
}
BUCKET = "models"
PREFIX = "org/chat-7b/v1/"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_moto(port: int, spool: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, **CREDENTIALS, "TMPDIR": str(spool)}
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("moto_ranged.py")), "-H", "127.0.0.1",
         "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("moto did not start")


@contextmanager
def moto_with_bucket(bucket: str, scratch: Path | None = None) -> Iterator[tuple[Path, Any]]:
    """A scratch dir (under `scratch`) and a client of moto_ranged on a free port, its spool in
    the scratch dir, with `bucket` made and this process's AWS environment pointed at it. The
    server is stopped and the scratch dir removed on the way out."""
    work = Path(tempfile.mkdtemp(prefix="s3-bench-", dir=scratch))
    spool = work / "moto"
    spool.mkdir()
    port = free_port()
    proc = start_moto(port, spool)
    try:
        os.environ.update(CREDENTIALS)
        os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
        import boto3

        client = boto3.session.Session().client("s3")
        client.create_bucket(Bucket=bucket)
        yield work, client
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb", buffering=0) as fh:
        while block := fh.read(16 * 1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


def upload(client: Any, model: Path) -> float:
    started = time.perf_counter()
    upload_directory(client, BUCKET, PREFIX, model)
    return time.perf_counter() - started


def bench_validate(location: str, model: Path, runs: int, cache_dir: Path) -> dict[str, Any]:
    weights = sorted(model.glob("*.safetensors"))
    expected = {p.name: sha256_of(p) for p in weights}
    cache = DigestCache(cache_dir / "digests.sqlite")
    validate(str(model), expected_sha256=expected, digest_cache=cache)  # warm the local cache
    local_s, remote_s, reports = [], [], []
    for _ in range(runs):  # interleaved, so both see the same machine
        started = time.perf_counter()
        local = validate(str(model), expected_sha256=expected, digest_cache=cache)
        local_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        report = validate(location, expected_sha256=expected)
        remote_s.append(time.perf_counter() - started)
        reports.append(report)
    fmt = next(c for c in reports[-1].checks if c.name == "format")
    remote = fmt.details["remote"]
    checksum = next(c for c in reports[-1].checks if c.name == "checksum")
    share = remote["bytes_read"] / remote["model_bytes"]
    return {
        "model_bytes": remote["model_bytes"],
        "files": remote["files"],
        "local": {
            "status": local.status.value,
            "median_s": round(statistics.median(local_s), 3),
            "runs_s": [round(s, 3) for s in local_s],
        },
        "s3": {
            "status": reports[-1].status.value,
            "median_s": round(statistics.median(remote_s), 3),
            "runs_s": [round(s, 3) for s in remote_s],
            "bytes_read": remote["bytes_read"],
            "requests": remote["requests"],
            "share_read": f"{share:.5%}",
            "checksum_sources": sorted(set(checksum.details["sources"].values())),
            "checks": {c.name: c.status.value for c in reports[-1].checks},
        },
        "goals": {
            "wall_le_2s": statistics.median(remote_s) <= 2.0,
            "bytes_le_0.1pct": share <= 0.001,
        },
    }


def durable(directory: Path) -> None:
    """fsync every file: the cache's downloads are durable (fsync before rename); the raw
    client's must be too, or it is timed into the page cache against a cache timed to disk."""
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def raw_download(client: Any, keys: list[str], into: Path) -> float:
    from boto3.s3.transfer import TransferConfig

    into.mkdir()
    started = time.perf_counter()
    for key in keys:
        target = str(into / key.replace("/", "_"))
        client.download_file(BUCKET, key, target, Config=TransferConfig())
    durable(into)
    return time.perf_counter() - started


def cache_fetch(location: str, into: Path, total: int) -> tuple[float, S3Store]:
    cache = ModelCache(into, max_bytes=4 * total)
    store = S3Store(location)
    started = time.perf_counter()
    cache.fetch(store)  # fsyncs each file before it is renamed into the cache
    return time.perf_counter() - started, store


def bench_fetch(client: Any, location: str, work: Path, rounds: int) -> dict[str, Any]:
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix=PREFIX)["Contents"]
    keys = [o["Key"] for o in listing]
    total = sum(o["Size"] for o in listing)
    raw_s: list[float] = []
    cache_s: list[float] = []
    requests = 0
    for n in range(rounds):  # alternate which goes first: the second inherits writeback
        order = ("raw", "cache") if n % 2 == 0 else ("cache", "raw")
        for which in order:
            os.sync()  # the previous run's dirty pages are not this one's cost
            if which == "raw":
                raw_s.append(raw_download(client, keys, work / "raw"))
                shutil.rmtree(work / "raw")
            else:
                seconds, store = cache_fetch(location, work / "cache", total)
                cache_s.append(seconds)
                requests = store.reads.requests
                if n < rounds - 1:
                    shutil.rmtree(work / "cache")
    cache = ModelCache(work / "cache", max_bytes=4 * total)
    again = S3Store(location)
    started = time.perf_counter()
    cache.fetch(again)
    warm_s = time.perf_counter() - started
    shutil.rmtree(work / "cache")
    raw_med, cache_med = statistics.median(raw_s), statistics.median(cache_s)
    return {
        "bytes": total,
        "rounds": rounds,
        "raw_client_s": [round(s, 2) for s in raw_s],
        "model_cache_s": [round(s, 2) for s in cache_s],
        "raw_client_mb_s": round(total / raw_med / 1e6, 1),
        "model_cache_mb_s": round(total / cache_med / 1e6, 1),
        "cache_over_raw_throughput": round(raw_med / cache_med, 2),
        "model_cache_requests": requests,
        "second_fetch_s": round(warm_s, 3),
        "second_fetch_bytes": again.reads.bytes_read,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a model a tenth the size")
    parser.add_argument("--runs", type=int, default=5, help="validation runs of each")
    parser.add_argument("--no-fetch", action="store_true", help="skip the download figures")
    parser.add_argument("--fetch-rounds", type=int, default=2, help="raw/cache pairs")
    parser.add_argument("--work", type=Path, default=None, help="scratch dir (needs ~3x model)")
    args = parser.parse_args()

    with moto_with_bucket(BUCKET, args.work) as (work, client):
        shape = {"layers": 3, "shards": 3} if args.quick else {}
        model = write_sparse_sharded_model(work / "model", **shape)
        upload_s = upload(client, model)
        location = f"s3://{BUCKET}/{PREFIX}"
        result: dict[str, Any] = {
            "command": command_line(),
            "machine": describe_machine(["boto3", "moto", "huggingface_hub"]),
            "upload_s": round(upload_s, 1),
            "validate": bench_validate(location, model, args.runs, work),
        }
        if not args.no_fetch:
            result["fetch"] = bench_fetch(client, location, work, args.fetch_rounds)
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
