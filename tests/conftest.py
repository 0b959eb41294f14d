"""Fixtures shared by every test layer: a real JetStream nats-server per test, settings."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

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


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A fresh nats-server with JetStream (random port, temp store): ~40 ms to start."""
    server = NatsServer(tmp_path / "nats").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def settings(tmp_path: Path, nats_server: NatsServer) -> Settings:
    return Settings(
        nats_url=nats_server.url,
        data_dir=tmp_path / "data",
        instance="test",
        ack_wait_s=5.0,
        max_deliver=3,
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
