"""CLI errors are one clear line with a meaningful exit status (no NATS needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.stack.cli import EXIT_USAGE, app

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


def test_benchmark_of_something_that_is_not_a_model_cannot_run(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    result = runner.invoke(app, ["benchmark", str(tmp_path), "--json"])
    assert result.exit_code == EXIT_USAGE
    report = json.loads(result.stdout)["report"]
    assert report["status"] == "error"
    assert "no config.json (Hugging Face layout expected)" in report["reason"]


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


def test_every_service_is_built() -> None:
    result = runner.invoke(app, ["service", "list"])
    assert result.exit_code == 0, result.output
    for name in ("validator", "benchmarker", "canary-controller", "notifier", "router"):
        assert f"{name} " in result.stdout and "not built" not in result.stdout


def test_service_health_says_why_a_service_is_not_healthy(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["service", "health", "validator"], env={"PREFLIGHT_DATA_DIR": str(tmp_path)}
    )
    assert result.exit_code == 1
    assert "no heartbeat" in result.stdout


def test_schemas_check_passes_on_the_committed_directory() -> None:
    schemas = Path(__file__).resolve().parents[2] / "schemas"
    result = runner.invoke(app, ["schemas", "--check", "--dir", str(schemas)])
    assert result.exit_code == 0, result.output


def test_validate_passes_a_sound_model_and_prints_every_check(sample_model: Path) -> None:
    result = runner.invoke(app, ["validate", str(sample_model)])
    assert result.exit_code == 0, result.output
    for name in ("format", "checksum", "structure", "unsafe_code", "secrets", "vram_fit"):
        assert name in result.stdout
    assert "validation: passed" in result.stdout


def test_validate_exits_1_and_names_the_file_on_a_bad_digest(sample_model: Path) -> None:
    result = runner.invoke(
        app, ["validate", str(sample_model), "--sha256", f"model.safetensors={'0' * 64}", "--json"]
    )
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["status"] == "failed"
    assert "model.safetensors: request digest differs" in report["reason"]


def test_validate_takes_the_target_hardware(sample_model: Path) -> None:
    result = runner.invoke(app, ["validate", str(sample_model), "--gpu-memory-gb", "0.1", "--json"])
    assert result.exit_code == 1
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["vram_fit"]["status"] == "failed"
    assert "does not fit" in checks["vram_fit"]["reason"]


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_validate_inside_the_model_writes_nothing_there(
    sample_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `cd model && preflight validate .` used to create .preflight/ in the model and then fail
    # its own format check on the cache it had just written.
    monkeypatch.delenv("PREFLIGHT_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(sample_model)
    before = _tree(sample_model)
    for _ in range(2):  # the second run reads the digests the first one cached
        result = runner.invoke(app, ["validate", "."])
        assert result.exit_code == 0, result.output
    assert _tree(sample_model) == before
    assert (tmp_path / "xdg" / "preflight" / "cache" / "digests.sqlite").is_file()


def test_validate_with_a_data_dir_inside_the_model_caches_elsewhere_and_says_so(
    sample_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PREFLIGHT_DATA_DIR", str(sample_model / ".preflight"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    before = _tree(sample_model)
    result = runner.invoke(app, ["validate", str(sample_model)])
    assert result.exit_code == 0, result.output
    assert "is inside the model; digests cached in" in result.stderr
    assert _tree(sample_model) == before


@pytest.mark.parametrize("data_dir", [None, "/srv/preflight"])
@pytest.mark.parametrize("policy_file", [None, "/etc/preflight/policy.yaml"])
def test_local_paths_read_the_environment_as_settings_do(
    data_dir: str | None, policy_file: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.runtime.settings import Settings
    from services.stack.cli import local_paths

    for name, value in (("PREFLIGHT_DATA_DIR", data_dir), ("preflight_policy_file", policy_file)):
        if value is None:
            monkeypatch.delenv(name.upper(), raising=False)
        else:
            monkeypatch.setenv(name, value)
    settings = Settings()
    explicit = settings.data_dir if "data_dir" in settings.model_fields_set else None
    assert local_paths(None) == (explicit, settings.policy_file)
    assert local_paths(Path("/given"))[0] == Path("/given")
