"""`preflight deploy --id` on a real nats-server: an id another request already took is an
error, never that request's outcome shown as this one's."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.contracts.events import DeploymentPromoted, DeploymentRequested, Event
from services.contracts.routing import subject_for
from services.runtime import bus
from services.runtime.settings import Settings
from services.stack.cli import EXIT_USAGE, app

pytestmark = pytest.mark.integration


def on_bus(settings: Settings, *events: Event, msg_id: str | None = None) -> None:
    """Publish as a client would; `msg_id`: a Nats-Msg-Id of the publisher's own choosing."""

    async def run() -> None:
        nc = await bus.connect(settings, "test-deploy-ids")
        js = nc.jetstream()
        await bus.ensure_topology(js, settings)
        for event in events:
            if msg_id is None:
                await bus.publish_event(js, event)
            else:
                headers = {**bus.headers_for(event), bus.MSG_ID_HEADER: msg_id}
                await js.publish(subject_for(event), bus.encode(event), headers=headers)
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


def test_an_id_taken_under_another_message_id_is_an_error_too(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 13: with a message id of its own the attacker's request is no duplicate, so the
    first check never ran, and --wait showed the attacker's BLOCKED for the victim's model."""
    monkeypatch.setenv("PREFLIGHT_NATS_URL", settings.nats_url)
    monkeypatch.setenv("PREFLIGHT_DATA_DIR", str(tmp_path / "cli"))
    ours = tmp_path / "model"
    ours.mkdir()
    taken = DeploymentRequested(
        deployment_id="d-ci-77", model="org/chat", version="666", location="/nonexistent/evil"
    )
    on_bus(settings, taken, msg_id="mallory-1")
    argv = ["deploy", str(ours), "-m", "org/chat", "-v", "2", "--id", "d-ci-77", "--wait"]
    result = CliRunner().invoke(app, [*argv, "--timeout", "5"])
    assert result.exit_code == EXIT_USAGE, result.output
    assert "d-ci-77 is already taken by another request (org/chat 666 from /nonexistent/evil)" in (
        " ".join(result.stderr.split())
    )
