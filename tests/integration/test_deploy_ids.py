"""`preflight deploy --id` on a real nats-server: an id another request already took is an
error, never that request's outcome shown as this one's."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.contracts.events import DeploymentPromoted, DeploymentRequested
from services.runtime import bus
from services.runtime.settings import Settings
from services.stack.cli import EXIT_USAGE, app

pytestmark = pytest.mark.integration


def on_bus(settings: Settings, *events: object) -> None:
    async def run() -> None:
        nc = await bus.connect(settings, "test-deploy-ids")
        js = nc.jetstream()
        await bus.ensure_topology(js, settings)
        for event in events:
            await bus.publish_event(js, event)  # type: ignore[arg-type]
        await nc.close()

    asyncio.run(run())


def test_an_id_taken_by_another_model_is_an_error_not_its_outcome(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PREFLIGHT_NATS_URL", settings.nats_url)
    monkeypatch.setenv("PREFLIGHT_DATA_DIR", str(tmp_path / "cli"))
    ours = tmp_path / "model"
    ours.mkdir()
    # The attacker guessed the id CI would use, requested something else under it, and its
    # outcome is there before the victim asks.
    taken = DeploymentRequested(
        deployment_id="d-ci-1234", model="evil", version="1", location="/tmp/evil"
    )
    on_bus(
        settings,
        taken,
        DeploymentPromoted(deployment_id="d-ci-1234", model="evil", version="1"),
    )
    argv = ["deploy", str(ours), "-m", "org/chat", "-v", "2", "--id", "d-ci-1234"]
    result = CliRunner().invoke(app, [*argv, "--wait", "--timeout", "5"])
    assert result.exit_code == EXIT_USAGE, result.output  # before: 0, "PROMOTED evil 1"
    assert "d-ci-1234 is already taken by another request (evil 1 from /tmp/evil)" in (
        " ".join(result.stderr.split())
    )
    assert "PROMOTED" not in result.output

    again = ["deploy", str(ours), "-m", "org/chat", "-v", "2", "--id", "d-mine-1"]
    assert CliRunner().invoke(app, again).exit_code == 0
    retried = CliRunner().invoke(app, again)  # a retry of the same request is deduplicated
    assert retried.exit_code == 0 and "already requested: deduplicated" in retried.stdout
