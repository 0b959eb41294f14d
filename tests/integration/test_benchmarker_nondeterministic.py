"""The nondeterministic sample model (BPE dropout left on) through the real benchmark path."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.benchmarker import consistency, loading
from services.benchmarker.corpus import load_prompts
from services.benchmarker.run import run_benchmarks
from services.contracts.events import Status
from services.contracts.policy import Policy, PolicyFile

pytest.importorskip("torch")
pytestmark = pytest.mark.integration

# All 50 pinned prompts (about a second for both runs): each one's greedy output differs between
# two runs with probability ~0.5 (measured: 0.2-1.0 per prompt), so all 50 agreeing by chance
# is below 1e-12. Fewer prompts would make the check itself flaky: 5 agree ~2% of the time.
CONSISTENCY_ONLY = {
    "benchmark": {"consistency_prompts": 50, "perplexity": False, "latency": False},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from services.benchmarker.samples import write_trained_model

    root = tmp_path_factory.mktemp("trained")
    return {
        "good": write_trained_model(root / "good", variant="good", seed=0),
        "nondeterministic": write_trained_model(
            root / "nondeterministic", variant="nondeterministic", seed=0
        ),
    }


def consistency_only() -> Policy:
    return PolicyFile(defaults=CONSISTENCY_ONLY).resolve(model="m")  # the operator's file


def test_the_nondeterministic_model_diverges_and_the_stage_names_where(
    models: dict[str, Path],
) -> None:
    report, _ = run_benchmarks(str(models["nondeterministic"]), None, consistency_only())
    assert report.status is Status.DEGRADED, report.reason
    check = next(c for c in report.checks if c.name == "consistency")
    assert check.status is Status.FAILED
    assert check.threshold == 50
    assert check.value is not None and check.value < 50
    divergences = check.details["divergences"]
    assert len(divergences) == 50 - check.value
    assert all(0 <= d["first_diverging_token"] <= 16 for d in divergences)
    first = divergences[0]
    assert f"prompt {first['prompt_index']} at token {first['first_diverging_token']}" in (
        check.reason
    )
    settings = check.details["settings"]
    assert settings["torch.use_deterministic_algorithms"] is True
    assert settings["tokenizer_bpe_dropout"] == 0.1


def test_the_same_weights_with_the_shipped_tokenizer_are_consistent(
    models: dict[str, Path],
) -> None:
    # The control: the nondeterministic variant's weights are the good model's, so the
    # tokenizer's dropout is the only cause of the divergences above.
    weights = {m: (models[m] / "model.safetensors").read_bytes() for m in models}
    assert weights["good"] == weights["nondeterministic"]
    report, _ = run_benchmarks(str(models["good"]), None, consistency_only())
    check = next(c for c in report.checks if c.name == "consistency")
    assert check.status is Status.PASSED, check.reason
    assert check.value == 50
    assert check.details["settings"]["tokenizer_bpe_dropout"] is None


def test_consistency_names_the_tokenizer_as_the_cause(models: dict[str, Path]) -> None:
    prompts = load_prompts()
    candidate = loading.load_model(str(models["nondeterministic"]), device="cpu")
    result, _ = consistency.check_consistency(candidate, prompts)
    [cause] = result.causes
    assert cause.startswith("tokenizer applies BPE dropout 0.1")
    assert "tokenization is random" in cause
    clean = loading.load_model(str(models["good"]), device="cpu")
    assert consistency.unstable_tokenizations(clean.tokenizer, prompts) == 0
    assert consistency.check_consistency(clean, prompts[:3])[0].causes == ()
