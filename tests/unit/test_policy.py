"""The policy file: defaults from the brief, overrides in order, errors that name file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.contracts.policy import PolicyError, PolicyFile, load_policy_file


def test_built_in_defaults_are_the_brief() -> None:
    policy = load_policy_file(None).resolve(model="any")
    assert policy.validation.enabled and policy.validation.budget_s == 2.0
    assert all(policy.validation.checks.model_dump().values())
    assert policy.benchmark.max_perplexity_increase == 0.05
    assert policy.benchmark.consistency_prompts == 50
    assert policy.benchmark.temperature == 0.0
    assert policy.benchmark.on_failure == "degrade"
    assert [(s.weight, s.duration_s) for s in policy.canary.steps] == [(5, 180), (50, 120)]
    assert policy.canary.thresholds.max_error_rate == 0.01
    assert policy.canary.thresholds.max_p95_increase == 0.20
    assert {"default", "small", "large"} <= set(policy.model_classes)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


def test_overrides_apply_defaults_then_team_then_model_then_deployment(tmp_path: Path) -> None:
    policy_file = load_policy_file(
        write(
            tmp_path,
            """
defaults: {benchmark: {max_perplexity_increase: 0.04}}
teams: {search: {benchmark: {max_perplexity_increase: 0.03, on_failure: block}}}
models: {ranker: {benchmark: {max_perplexity_increase: 0.02}}}
""",
        )
    )
    assert policy_file.resolve(model="x").benchmark.max_perplexity_increase == 0.04
    team = policy_file.resolve(model="x", team="search")
    assert (team.benchmark.max_perplexity_increase, team.benchmark.on_failure) == (0.03, "block")
    model = policy_file.resolve(model="ranker", team="search")
    assert model.benchmark.max_perplexity_increase == 0.02
    assert model.benchmark.on_failure == "block"  # the team's setting survives a partial override
    deployment = policy_file.resolve(
        model="ranker", team="search", overrides={"benchmark": {"on_failure": "degrade"}}
    )
    assert deployment.benchmark.on_failure == "degrade"


def test_every_check_and_stage_can_be_switched_off() -> None:
    off = {
        "validation": {"enabled": False, "checks": {"secrets": False, "vram_fit": False}},
        "benchmark": {"enabled": False},
        "canary": {"enabled": False},
    }
    policy = PolicyFile(models={"m": off}).resolve(model="m")  # the operator's file may
    assert not policy.validation.enabled and not policy.benchmark.enabled
    assert not policy.canary.enabled
    assert not policy.validation.checks.secrets and policy.validation.checks.format


def test_steps_are_replaced_whole_not_merged() -> None:
    policy = PolicyFile().resolve(
        model="m", overrides={"canary": {"steps": [{"weight": 10, "duration_s": 30}]}}
    )
    assert [(s.weight, s.duration_s) for s in policy.canary.steps] == [(10, 30)]


def test_a_typo_is_an_error_naming_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "defaults:\n  canary:\n    step: []\n")
    with pytest.raises(PolicyError) as info:
        load_policy_file(path)
    message = str(info.value)
    assert str(path) in message and "canary.step" in message and "Extra inputs" in message


def test_a_bad_team_override_names_the_team(tmp_path: Path) -> None:
    path = write(tmp_path, "teams:\n  search:\n    canary: {thresholds: {max_error_rate: 2}}\n")
    with pytest.raises(PolicyError, match=r"teams\.search: canary\.thresholds\.max_error_rate"):
        load_policy_file(path)


def test_a_bad_deployment_override_says_so() -> None:
    with pytest.raises(PolicyError, match=r"deployment policy_overrides: benchmark\.stride"):
        PolicyFile().resolve(model="m", overrides={"benchmark": {"stride": 0}})


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"line 2"):
        load_policy_file(write(tmp_path, "defaults:\n  - [unclosed\n"))


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read policy file"):
        load_policy_file(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("override", "why"),
    [
        ({"benchmark": {"stride": 512, "max_length": 256}}, "must not exceed max_length"),
        (
            {
                "canary": {
                    "steps": [{"weight": 50, "duration_s": 1}, {"weight": 5, "duration_s": 1}]
                }
            },
            "must not decrease",
        ),
        ({"canary": {"steps": [{"weight": 100, "duration_s": 1}]}}, "less than 100"),
    ],
)
def test_inconsistent_values_are_rejected(override: dict[str, object], why: str) -> None:
    with pytest.raises(PolicyError, match=why):
        PolicyFile().resolve(model="m", overrides=override)


def test_unknown_model_class_is_an_error() -> None:
    policy = PolicyFile().resolve(model="m")
    with pytest.raises(PolicyError, match="unknown model class 'huge'"):
        policy.model_class("huge")
    assert policy.canary_thresholds("default").max_error_rate == 0.01


def test_a_request_may_tighten_the_gates_it_may_not_open() -> None:
    strict = {
        "canary": {"thresholds": {"max_error_rate": 0.001, "max_p95_increase": 0.05}},
        "benchmark": {"on_failure": "block", "max_perplexity_increase": 0.01},
    }
    policy = PolicyFile().resolve(model="m", overrides=strict)
    assert policy.canary.thresholds.max_error_rate == 0.001
    assert policy.benchmark.on_failure == "block"
    opened = PolicyFile(
        request_overrides={"deny": [], "max": {"canary.thresholds.max_error_rate": None}}
    )
    loose = opened.resolve(
        model="m", overrides={"canary": {"enabled": False, "thresholds": {"max_error_rate": 1}}}
    )
    assert not loose.canary.enabled  # the operator's file may open what the defaults close
