"""The pure rules that move a deployment between stages."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from services.benchmarker.app import handle_validated
from services.canary_controller.app import handle_benchmarked
from services.contracts.events import (
    BenchmarkCompleted,
    CheckResult,
    DeploymentBlocked,
    DeploymentDegraded,
    DeploymentPromoted,
    DeploymentRequested,
    ModelRef,
    StageReport,
    Status,
    ValidationCompleted,
)
from services.contracts.policy import PolicyFile
from services.runtime import pipeline
from services.runtime.settings import Settings
from services.validator.app import handle_requested

REQUEST = DeploymentRequested(deployment_id="d-1", model="m", version="2", location="/m")


def failed_validation() -> StageReport:
    return StageReport(
        stage="validation",
        status=Status.FAILED,
        checks=(
            CheckResult(name="checksum", status=Status.FAILED, reason="model.safetensors differs"),
        ),
    )


def degraded_benchmark() -> StageReport:
    check = CheckResult(
        name="perplexity", status=Status.FAILED, reason="up 12%", value=0.12, threshold=0.05
    )
    return StageReport(stage="benchmark", status=Status.DEGRADED, checks=(check,))


def test_a_stage_that_is_not_built_is_skipped_never_passed() -> None:
    for stage in pipeline.STAGE_ISSUES:
        report = pipeline.not_built(stage)
        assert report.status is Status.SKIPPED
        assert "not built yet" in report.reason
        assert not report.blocks


def test_validator_passes_a_sound_model(sample_model: Path) -> None:
    request = REQUEST.model_copy(update={"location": str(sample_model)})
    [event] = handle_requested(request, PolicyFile(), "v-1")
    assert isinstance(event, ValidationCompleted)
    assert event.report.status is Status.PASSED, event.report.reason
    assert event.report.service == "v-1"
    assert [c.name for c in event.report.checks] == [
        "format", "checksum", "structure", "unsafe_code", "secrets", "vram_fit", "tokenizer"
    ]  # fmt: skip


def test_validator_blocks_what_it_cannot_find() -> None:
    completed, blocked = handle_requested(REQUEST, PolicyFile(), "v-1")
    assert isinstance(completed, ValidationCompleted)
    assert isinstance(blocked, DeploymentBlocked)
    assert "/m: no such file or directory" in blocked.reasons[0]


def test_a_disabled_stage_says_disabled_by_policy() -> None:
    off = PolicyFile(defaults={"validation": {"enabled": False}})  # the operator's file
    [event] = handle_requested(REQUEST, off, "v-1")
    assert isinstance(event, ValidationCompleted)
    assert event.report.reason == "skipped: disabled by policy"


@pytest.mark.parametrize(
    ("overrides", "said"),
    [
        ({"canary": {"bogus": 1}}, "canary.bogus: Extra inputs are not permitted"),
        # What anyone who may publish a request would do: switch the gate off, hold a service.
        ({"validation": {"enabled": False}}, "a request may not change validation.enabled"),
        (
            {"validation": {"checks": {"unsafe_code": False}}},
            "a request may not change validation.checks",
        ),
        (
            {"benchmark": {"latency_runs": 1_000_000_000}},
            "benchmark.latency_runs: 1000000000 is above the ceiling of 100 for a request",
        ),
        (
            {"validation": {"time_limit_s": 86400}},
            "validation.time_limit_s: 86400 is above the ceiling of 120",
        ),
        ({"benchmark": {"stride": 1}}, "benchmark.stride: 1 is below the floor of 32"),
        # Open the gates: no benchmark, no canary, a canary failing every request promoted,
        # and nobody told.
        ({"benchmark": {"enabled": False}}, "a request may not change benchmark.enabled"),
        ({"canary": {"enabled": False}}, "a request may not change canary.enabled"),
        (
            {"canary": {"thresholds": {"max_error_rate": 1}}},
            "canary.thresholds.max_error_rate: 1 is above the ceiling of 0.05",
        ),
        (
            {"benchmark": {"max_perplexity_increase": 10}},
            "benchmark.max_perplexity_increase: 10 is above the ceiling of 0.25",
        ),
        ({"notify": {"on": []}}, "a request may not change notify.on"),
        # Review 15: the same gates by other keys.
        (
            {"model_classes": {"default": {"canary": {"max_error_rate": 1}}}},
            "a request may not change model_classes",
        ),
        ({"benchmark": {"perplexity": False}}, "a request may not change benchmark.perplexity"),
        (
            {"canary": {"thresholds": {"max_ttft_p95_increase": None}}},
            "max_ttft_p95_increase: null lifts the ceiling of 1 for a request",
        ),
        ({"canary": {"false_rollback_rate": 1e-300}}, "greater than or equal to 0.000000001"),
        (
            {"notify": {"webhook_url": "http://169.254.169.254/latest/"}},
            "a request may not change notify.webhook_url",
        ),
        # Numbers as strings: the policy reads "1e9" as 1e9, so the limits must too.
        (
            {"benchmark": {"latency_runs": "1000000000"}},
            "benchmark.latency_runs: 1000000000 is above the ceiling of 100",
        ),
        ({"validation": {"time_limit_s": "1e9"}}, "validation.time_limit_s: 1000000000 is above"),
        (
            {"canary": {"analysis_interval_s": "0.000001"}},
            "canary.analysis_interval_s: 1e-06 is below the floor of 0.5",
        ),
        (
            {"canary": {"e_process": {"change_every_s": 1e-9}}},
            "canary.e_process.change_every_s: 1e-09 is below the floor of 1",
        ),
        # The data plane and its options: a Kubernetes API URL that received the controller's
        # token, another team's object to patch with force, an xDS directory to write.
        (
            {"canary": {"traffic": {"router": "istio", "options": {"api_url": "http://x:1"}}}},
            "a request may not change canary.traffic",
        ),
    ],
)
def test_a_policy_override_that_cannot_be_used_blocks_at_validation_saying_why(
    overrides: dict[str, object], said: str
) -> None:
    request = REQUEST.model_copy(update={"policy_overrides": overrides})
    completed, blocked = handle_requested(request, PolicyFile(), "v-1")
    assert isinstance(completed, ValidationCompleted) and completed.report.blocks
    assert isinstance(blocked, DeploymentBlocked) and blocked.stage == "validation"
    assert said in blocked.reasons[0], blocked.reasons
    assert "deployment policy_overrides" in blocked.reasons[0]
    assert handle_validated(completed, PolicyFile(), "b-1") == []


def test_an_unknown_model_class_blocks_at_validation() -> None:
    """It used to pass validation and end `degraded` at the benchmarker ("could not run"),
    then be promoted: a typo in --class is bad input, answered at once."""
    request = REQUEST.model_copy(update={"model_class": "smal"})
    _, blocked = handle_requested(request, PolicyFile(), "v-1")
    assert isinstance(blocked, DeploymentBlocked)
    assert "unknown model class 'smal' (known: default, large, small)" in blocked.reasons[0]


def test_an_operator_sets_what_requests_may_override() -> None:
    lenient = PolicyFile.model_validate(
        {
            "request_overrides": {
                "deny": [],
                "max": {"benchmark.latency_runs": 1000, "validation.time_limit_s": None},
            }
        }
    )
    overrides = {
        "validation": {"enabled": False, "time_limit_s": 86400},
        "benchmark": {"latency_runs": 500},
    }
    policy = lenient.resolve(model="m", overrides=overrides)
    assert not policy.validation.enabled and policy.benchmark.latency_runs == 500
    # Restating what the file gives is no change; the file's own layers are never limited.
    PolicyFile().resolve(model="m", overrides={"validation": {"enabled": True}})
    PolicyFile(defaults={"benchmark": {"latency_runs": 10_000}}).resolve(model="m")
    with pytest.raises(ValidationError, match=r"'benchmark\.latency_run' is not a policy key"):
        PolicyFile.model_validate({"request_overrides": {"max": {"benchmark.latency_run": 5}}})


def test_failed_validation_blocks_and_names_the_check() -> None:
    completed, blocked = pipeline.after_validation(REQUEST, failed_validation())
    assert isinstance(blocked, DeploymentBlocked) and blocked.stage == "validation"
    assert blocked.reasons == ("checksum: model.safetensors differs",)
    assert handle_validated(completed, PolicyFile(), "b-1") == []  # type: ignore[arg-type]


def test_degraded_benchmark_notifies_and_proceeds_by_default() -> None:
    validated = ValidationCompleted(
        deployment_id="d-1",
        model="m",
        version="2",
        report=pipeline.not_built("validation"),
        request=REQUEST,
    )
    policy = PolicyFile().resolve(model="m")
    events = pipeline.after_benchmark(validated, degraded_benchmark(), policy)
    assert [type(e) for e in events] == [DeploymentDegraded, BenchmarkCompleted]
    degraded = events[0]
    assert isinstance(degraded, DeploymentDegraded)
    assert degraded.reasons == ("perplexity: up 12%",)
    assert pipeline.proceeds_to_canary(events[1], policy)  # type: ignore[arg-type]


def test_degraded_benchmark_blocks_when_policy_says_block() -> None:
    validated = ValidationCompleted(
        deployment_id="d-1",
        model="m",
        version="2",
        report=pipeline.not_built("validation"),
        request=REQUEST,
    )
    policy = PolicyFile().resolve(model="m", overrides={"benchmark": {"on_failure": "block"}})
    events = pipeline.after_benchmark(validated, degraded_benchmark(), policy)
    assert [type(e) for e in events] == [DeploymentDegraded, DeploymentBlocked, BenchmarkCompleted]
    benchmarked = events[2]
    assert isinstance(benchmarked, BenchmarkCompleted)
    assert not pipeline.proceeds_to_canary(benchmarked, policy)


def test_promotion_without_canary_lists_every_stage_that_did_not_run() -> None:
    validated = ValidationCompleted(
        deployment_id="d-1",
        model="m",
        version="2",
        report=pipeline.not_built("validation"),
        request=REQUEST,
    )
    degraded, benchmarked = handle_validated(validated, PolicyFile(), "b-1")
    assert isinstance(benchmarked, BenchmarkCompleted)
    # A benchmark that could not run has not shown the model fit: degraded, with the reason.
    assert isinstance(degraded, DeploymentDegraded)
    assert benchmarked.report.status is Status.ERROR
    assert degraded.reasons == (benchmarked.report.reason,)
    settings = Settings(
        instance="c-1", metrics_url_template="https://grafana/d/x?var-id={deployment_id}"
    )
    # With the canary on (the default) a rollout starts: no outcome yet.
    assert handle_benchmarked(benchmarked, PolicyFile(), settings) == []
    no_canary = PolicyFile(defaults={"canary": {"enabled": False}})
    [promoted] = handle_benchmarked(benchmarked, no_canary, settings)
    assert isinstance(promoted, DeploymentPromoted)
    assert [s.stage for s in promoted.stages] == ["validation", "benchmark", "canary"]
    statuses = [s.status for s in promoted.stages]
    assert statuses == [Status.SKIPPED, Status.ERROR, Status.SKIPPED]  # /m cannot be loaded
    assert "disabled by policy" in promoted.stages[2].reason
    assert "stages that did not run" in promoted.reasons[1]
    assert promoted.metrics_url == "https://grafana/d/x?var-id=d-1"
    # No template and no rollout: no page to link to.
    [unlinked] = handle_benchmarked(benchmarked, no_canary, Settings(instance="c-1"))
    assert isinstance(unlinked, DeploymentPromoted) and unlinked.metrics_url is None


def test_a_local_location_outside_the_model_roots_is_blocked_unread(tmp_path: Path) -> None:
    """What a `client` tried: file:///etc/shadow put the file's first bytes in the outcome, and
    /etc the host's file names. Under PREFLIGHT_MODEL_ROOTS nothing outside is opened."""
    from services.storage.locations import outside_roots

    root = tmp_path / "models"
    (root / "m").mkdir(parents=True)
    (root / "escape").symlink_to("/etc")
    roots = f"{root}:/nonexistent/other"
    assert outside_roots(str(root / "m"), roots) is None
    assert outside_roots(f"file://{root}/m", roots) is None
    assert outside_roots("s3://bucket/m/", roots) is None  # remote: not a local path
    assert outside_roots("/etc/shadow", None) is None  # unset: any local path
    for hostile in ("/etc/shadow", "file:///etc", f"{root}/../../etc", f"{root}/escape/passwd"):
        assert "local models must be under PREFLIGHT_MODEL_ROOTS" in (
            outside_roots(hostile, roots) or ""
        ), hostile
    request = REQUEST.model_copy(update={"location": "file:///etc/shadow"})
    _, blocked = handle_requested(request, PolicyFile(), "v-1", model_roots=roots)
    assert isinstance(blocked, DeploymentBlocked)
    assert blocked.reasons == (
        f"location: file:///etc/shadow: local models must be under PREFLIGHT_MODEL_ROOTS "
        f"({root}, /nonexistent/other)",
    )
    stable = ModelRef(name="org/m.v2", version="1", location="/etc")
    request = REQUEST.model_copy(update={"location": str(root / "m"), "stable": stable})
    _, blocked = handle_requested(request, PolicyFile(), "v-1", model_roots=roots)
    assert isinstance(blocked, DeploymentBlocked)
    assert "/etc: local models must be under" in blocked.reasons[0]


def test_a_remote_location_outside_the_allowed_prefixes_is_blocked_unfetched() -> None:
    """An https:// location is fetched by the validator: without prefixes, a request could make
    it probe any host and port it can reach."""
    from services.storage.locations import remote_not_allowed

    prefixes = "s3://models/, hf://acme/, https://models.example.com"
    for fine in (
        "s3://models/org/chat/",
        "hf://acme/chat-7b@v2",
        "HTTPS://Models.Example.com/org/chat/",
        "/local/path",  # PREFLIGHT_MODEL_ROOTS is for those
    ):
        assert remote_not_allowed(fine, prefixes) is None, fine
    assert remote_not_allowed("https://10.0.0.1:6379/", None) is None  # unset: any
    for hostile in (
        "https://10.0.0.1:6379/",
        "https://models.example.com.evil.test/m/",
        "s3://models-evil/x/",
        "hf://acme-evil/x",
    ):
        assert "remote models must be under PREFLIGHT_REMOTE_LOCATION_PREFIXES" in (
            remote_not_allowed(hostile, prefixes) or ""
        ), hostile
    request = REQUEST.model_copy(update={"location": "https://169.254.169.254/latest/"})
    _, blocked = handle_requested(request, PolicyFile(), "v-1", remote_prefixes=prefixes)
    assert isinstance(blocked, DeploymentBlocked)
    assert "https://169.254.169.254/latest/: remote models must be under" in blocked.reasons[0]
