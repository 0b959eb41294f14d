"""Fixtures shared by every test layer: a real JetStream nats-server per test, settings."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.js import JetStreamContext

from services.runtime import bus
from services.runtime.nats_server import NatsServer
from services.runtime.settings import Settings


@pytest.fixture(scope="session")
def sample_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small, real Hugging Face-style model (config.json, safetensors, manifest)."""
    from services.stack.samples import write_sample_model

    return write_sample_model(tmp_path_factory.mktemp("models") / "sample-gpt")


@pytest.fixture(scope="session")
def chdb_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """THE chDB data path of this test process: chDB opens one path per process, ever.

    Every in-process user (the `chdb_client` fixture, a controller started by a test through
    the `settings` fixture) opens this one, and tests keep apart by table or deployment id.
    """
    return tmp_path_factory.mktemp("chdb") / "clickhouse"


@pytest.fixture(scope="session")
def chdb_client(chdb_path: Path) -> Any:
    """A client on the process's one chDB path, with the request-metrics table."""
    from services.runtime import clickhouse

    settings = Settings(data_dir=chdb_path.parent, clickhouse_path=chdb_path)
    client = clickhouse.open_client(settings)
    clickhouse.ensure_metrics_table(client, settings)
    return client


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A fresh nats-server with JetStream (random port, temp store): ~40 ms to start."""
    server = NatsServer(tmp_path / "nats").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def settings(tmp_path: Path, nats_server: NatsServer, chdb_path: Path) -> Settings:
    return Settings(
        nats_url=nats_server.url,
        data_dir=tmp_path / "data",
        clickhouse_path=chdb_path,
        instance="test",
        ack_wait_s=5.0,
        max_deliver=3,
        controller_http_port=0,  # tests that want the page or router pick their own free port
        router_port=0,
    )


@pytest.fixture
async def js(settings: Settings) -> AsyncIterator[JetStreamContext]:
    nc = await bus.connect(settings, "test-client")
    jetstream = nc.jetstream()
    await bus.ensure_topology(jetstream, settings)
    try:
        yield jetstream
    finally:
        await nc.close()


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[Any]:
    """A real S3 API: moto's standalone server in its own process, one per test session."""
    from tests.s3_server import MotoS3

    with MotoS3() as s3:
        yield s3
