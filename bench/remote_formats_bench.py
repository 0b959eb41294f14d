"""Validating ONNX and pickle models on S3 from what their checks read (range reads), beside the
same models on local disk.

Three models, each on moto's S3 server (bench/moto_ranged.py: ranged GETs read only their
range), uploaded with ChecksumSHA256:

    onnx-external  model.onnx naming one 2 GiB model.onnx_data (sparse locally; its first
                   4 KiB random floats opening like a pickle's PROTO 2): the external data is
                   scanned as a pickle might be, which reads its head
    onnx-inline    a ModelProto holding 256 MiB of tensors in raw_data: the protobuf walk reads
                   the framing and passes over the payloads
    pickle         a protocol-4 pickle of four 64 MiB float32 arrays (256 MiB): the pickle scan
                   reads the opcodes and passes over the array bytes
    pickle-N       a pickle of N 256 KiB arrays (--many, default 10, 200 and 400): one ranged
                   read per array, until reads would cost more than streaming the file whole

For each: validation wall time (median of --runs, local and S3 alternating), the status, the
bytes and requests it read from S3, and the file's size (what reading it whole costs).

    cd bench && ../.venv/bin/python remote_formats_bench.py [--runs 3] [--gib 2]
"""

from __future__ import annotations

import argparse
import functools
import json
import pickle
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from fetch_bench import moto_with_bucket  # bench/ (scripts run from bench/)
from machine import command_line, describe_machine

from services.storage.s3 import upload_directory
from services.validator.validate import validate

BUCKET = "models"
REPO = Path(__file__).resolve().parent.parent


def write_onnx_external(directory: Path, size: int) -> None:
    if str(REPO) not in sys.path:  # the unit tests' writer of a model.onnx naming its data
        sys.path.insert(0, str(REPO))
    from tests.unit.validator.hostile import onnx_naming_external_data

    onnx_naming_external_data(directory, "model.onnx_data", length=size)
    head = np.random.default_rng(0).standard_normal(1024).astype(np.float32).tobytes()
    with (directory / "model.onnx_data").open("wb") as fh:
        fh.write(b"\x80\x02" + head[2:])
        fh.truncate(size)


def write_onnx_inline(directory: Path, size: int) -> None:
    from onnx import TensorProto, helper

    directory.mkdir(parents=True)
    per = size // 4
    rng = np.random.default_rng(1)
    weights = []
    for name in "ABCD":
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[per // 4])
        tensor.raw_data = rng.standard_normal(per // 4).astype(np.float32).tobytes()
        weights.append(tensor)
    nodes = [helper.make_node("Sum", list("ABCD"), ["Y"])]
    output = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [per // 4])
    graph = helper.make_graph(nodes, "g", [], [output], initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (directory / "model.onnx").write_bytes(model.SerializeToString())


def write_pickle(directory: Path, size: int) -> None:
    directory.mkdir(parents=True)
    rng = np.random.default_rng(2)
    arrays = {f"layer.{i}": rng.standard_normal(size // 16).astype(np.float32) for i in range(4)}
    (directory / "weights.pkl").write_bytes(pickle.dumps(arrays, protocol=4))


def write_many(directory: Path, count: int) -> None:
    directory.mkdir(parents=True)
    arrays = {f"layer.{i}": np.zeros(65536, np.float32) for i in range(count)}
    (directory / "weights.pkl").write_bytes(pickle.dumps(arrays, protocol=4))


def bench_one(client: Any, name: str, directory: Path, runs: int) -> dict[str, Any]:
    started = time.perf_counter()
    upload_directory(client, BUCKET, f"{name}/", directory)
    upload_s = time.perf_counter() - started
    location = f"s3://{BUCKET}/{name}/"
    local_s, remote_s = [], []
    local = remote = None
    for _ in range(runs):
        started = time.perf_counter()
        local = validate(str(directory))
        local_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        remote = validate(location)
        remote_s.append(time.perf_counter() - started)
    assert local is not None and remote is not None
    fmt = next(c for c in remote.checks if c.name == "format")
    read = fmt.details["remote"]
    same = [(c.name, c.status) for c in local.checks] == [(c.name, c.status) for c in remote.checks]
    return {
        "model_bytes": read["model_bytes"],
        "upload_s": round(upload_s, 1),
        "local": {"status": local.status.value, "median_s": round(statistics.median(local_s), 3)},
        "s3": {
            "status": remote.status.value,
            "median_s": round(statistics.median(remote_s), 3),
            "runs_s": [round(s, 3) for s in remote_s],
            "bytes_read": read["bytes_read"],
            "requests": read["requests"],
            "share_read": f"{read['bytes_read'] / read['model_bytes']:.5%}",
            "fetched": read["fetched"],
        },
        "same_checks_and_statuses_as_local": same,
        "reason_s3": remote.reason,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="validation runs of each")
    parser.add_argument("--gib", type=float, default=2.0, help="size of the ONNX external data")
    parser.add_argument("--many", default="10,200,400", help="array counts of pickle-N models")
    parser.add_argument("--work", type=Path, default=None, help="scratch dir")
    args = parser.parse_args()

    with moto_with_bucket(BUCKET, args.work) as (work, client):
        models: dict[str, Callable[[Path], None]] = {
            "onnx-external": lambda d: write_onnx_external(d, int(args.gib * 1024**3)),
            "onnx-inline": lambda d: write_onnx_inline(d, 256 * 1024**2),
            "pickle": lambda d: write_pickle(d, 256 * 1024**2),
        }
        for count in (int(c) for c in args.many.split(",") if c):
            models[f"pickle-{count}"] = functools.partial(write_many, count=count)
        results: dict[str, Any] = {}
        for name, write in models.items():
            directory = work / name
            write(directory)
            results[name] = bench_one(client, name, directory, args.runs)
            shutil.rmtree(directory)
        print(
            json.dumps(
                {
                    "command": command_line(),
                    "machine": describe_machine(["boto3", "moto", "onnx", "numpy"]),
                    "models": results,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
