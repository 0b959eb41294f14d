"""CLI errors are one clear line with a meaningful exit status (no NATS needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.stack.cli import EXIT_NOT_BUILT, EXIT_USAGE, app

runner = CliRunner()


@pytest.fixture(autouse=True)
def no_stack(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PREFLIGHT_NATS_URL", "nats://127.0.0.1:1")
    monkeypatch.setenv("PREFLIGHT_DATA_DIR", str(tmp_path))


def test_no_nats_says_how_to_start_the_stack() -> None:
    result = runner.invoke(app, ["status"])
    assert result.exit_code == EXIT_USAGE
    assert "no NATS server answers at nats://127.0.0.1:1" in result.stderr
    assert "preflight up" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize(("command", "issue"), [("validate", "#3"), ("benchmark", "#4")])
def test_stages_not_built_say_so_and_exit_non_zero(
    command: str, issue: str, tmp_path: Path
) -> None:
    result = runner.invoke(app, [command, str(tmp_path)])
    assert result.exit_code == EXIT_NOT_BUILT
    assert f"not built yet (issue {issue}); nothing was checked" in result.stderr


def test_deploy_rejects_a_missing_path_before_touching_the_bus(tmp_path: Path) -> None:
    result = runner.invoke(app, ["deploy", str(tmp_path / "nope"), "-m", "m", "-v", "1"])
    assert result.exit_code == EXIT_USAGE
    assert "no such file or directory" in result.stderr


def test_deploy_rejects_a_bad_model_name(tmp_path: Path) -> None:
    result = runner.invoke(app, ["deploy", str(tmp_path), "-m", "bad name", "-v", "1"])
    assert result.exit_code == EXIT_USAGE
    assert "invalid request: model" in result.stderr


def test_deploy_rejects_bad_policy_overrides_naming_the_key(tmp_path: Path) -> None:
    overrides = tmp_path / "o.yaml"
    overrides.write_text("canary: {thresholds: {max_error_rate: 5}}\n")
    result = runner.invoke(
        app, ["deploy", str(tmp_path), "-m", "m", "-v", "1", "--policy", str(overrides)]
    )
    assert result.exit_code == EXIT_USAGE
    assert "canary.thresholds.max_error_rate" in result.stderr


def test_deploy_rejects_a_malformed_digest(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["deploy", str(tmp_path), "-m", "m", "-v", "1", "--sha256", "model.safetensors"]
    )
    assert result.exit_code == EXIT_USAGE
    assert "--sha256 takes FILE=HEX" in result.stderr


def test_unknown_service_is_named() -> None:
    result = runner.invoke(app, ["service", "run", "nope"])
    assert result.exit_code == EXIT_USAGE
    assert "unknown service 'nope'" in result.stderr


def test_router_is_not_built_yet() -> None:
    result = runner.invoke(app, ["service", "run", "router"])
    assert result.exit_code == EXIT_NOT_BUILT
    assert "not built yet (issue #5)" in result.stderr


def test_schemas_check_passes_on_the_committed_directory() -> None:
    schemas = Path(__file__).resolve().parents[2] / "schemas"
    result = runner.invoke(app, ["schemas", "--check", "--dir", str(schemas)])
    assert result.exit_code == 0, result.output
