"""`preflight deploy s3://...` through the whole embedded stack: the validator reads the model on
a real S3 API (moto's standalone server) by range requests, the benchmarker fetches it into the
host's model cache and benchmarks it, and the services get their credentials from their own
environment, never from the event."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.storage.s3 import upload_directory
from tests.e2e.test_stack import FAST_BENCHMARK, RunningStack, cli, wait_gone
from tests.s3_server import CREDENTIALS

pytestmark = pytest.mark.e2e


def test_deploy_from_s3_validates_by_range_reads_and_benchmarks_from_the_cache(
    moto_s3: Any, tmp_path: Path
) -> None:
    from services.benchmarker.samples import write_trained_model

    model = write_trained_model(tmp_path / "models" / "sample-gpt-v2")
    client = moto_s3.client()
    bucket = f"models-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)
    upload_directory(client, bucket, "org/chat/v1/", model)
    cache_dir = tmp_path / "model-cache"
    services_env = {
        **moto_s3.environ(),
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        "PREFLIGHT_MODEL_CACHE_DIR": str(cache_dir),
    }
    policy = tmp_path / "fast.yaml"
    policy.write_text(yaml.safe_dump(FAST_BENCHMARK))
    stack = RunningStack(tmp_path / "data", env=services_env)
    try:
        deployed = cli(
            "deploy", f"s3://{bucket}/org/chat/v1/", "--model", "org/chat", "--version", "1",
            "--id", "d-s3-1", "--wait", "--policy", str(policy),
            data_dir=stack.data_dir,
        )  # fmt: skip
        output = deployed.stdout + deployed.stderr
        assert deployed.returncode == 0, output + stack.log.read_text()
        assert "validation: passed" in output and "benchmark: passed" in output
        assert f"from s3://{bucket}/org/chat/v1/" in output  # what reading it cost
        assert any(cache_dir.rglob("config.json")), "the benchmarker did not use the cache"
        logs = stack.data_dir / "logs"
        log = stack.log.read_text() + "".join(p.read_text() for p in logs.glob("*.log"))
        assert f"fetched s3://{bucket}/org/chat/v1/" in (logs / "benchmarker.log").read_text()
        assert CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in log + output

        missing = cli(
            "deploy", f"s3://{bucket}/org/chat/v9/", "--model", "org/chat", "--version", "9",
            "--id", "d-s3-2", "--wait", "--timeout", "120",
            data_dir=stack.data_dir,
        )  # fmt: skip
        assert missing.returncode == 1, missing.stdout + missing.stderr
        assert "no objects under this prefix" in missing.stdout + missing.stderr
    finally:
        pids = stack.pids
        stack.stop()
    assert wait_gone(pids) == []
