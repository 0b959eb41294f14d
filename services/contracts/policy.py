"""The deployment policy: defaults, per-team and per-model overrides, per-deployment overrides.

Resolution order, later wins: built-in defaults < the file's `defaults` < `teams.<team>` <
`models.<model>` < the request's `policy_overrides`. Overrides are partial documents merged key by
key; lists (canary steps) are replaced whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Final, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class PolicyError(ValueError):
    """A policy file or override that cannot be used; the message names file, key and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)


class ValidationChecks(_Strict):
    format: bool = Field(default=True, description="Format found by content is supported.")
    checksum: bool = Field(default=True, description="Files match `expected_sha256`.")
    structure: bool = Field(default=True, description="Headers and shards are sound.")
    unsafe_code: bool = Field(default=True, description="Nothing runs code on load.")
    secrets: bool = Field(default=True, description="No keys in the card or config.")
    vram_fit: bool = Field(default=True, description="Weights + KV cache fit the GPU.")
    tokenizer: bool = Field(
        default=True, description="A language model ships the tokenizer it needs to serve."
    )


class ValidationPolicy(_Strict):
    enabled: bool = Field(default=True, description="Run the validator; off: skipped.")
    budget_s: float = Field(default=2.0, gt=0, description="Time budget for all checks.")
    time_limit_s: float = Field(
        default=30.0,
        gt=0,
        description="Hard limit for all checks, hashing not counted: a check still running then "
        "stops and fails, and the checks after it fail as not run, so no file can hold the "
        "validator. The budget is the goal; this is where a hostile file is cut off.",
    )
    hash_limit_s: float = Field(
        default=3600.0,
        gt=0,
        description="Longest the checksum check hashes files the digest cache does not hold "
        "(the time limit does not count hashing): a model whose hashing is estimated past it "
        "is refused before a byte is read, and hashing that runs past it stops. A file can "
        "claim any size: a sparse file of 16 TB takes no disk.",
    )
    checks: ValidationChecks = ValidationChecks()
    vram_overhead_fraction: float = Field(
        default=0.10, ge=0, le=1, description="Share of GPU memory kept free for the runtime."
    )
    allow_training_state: bool = Field(
        default=False,
        description=(
            "Let Trainer files that serving never reads (training_args.bin, optimizer.pt, "
            "scheduler.pt, scaler.pt, rng_state*.pth) stay in the upload. Still scanned: "
            "imports beyond the allowlist and Trainer's own classes block."
        ),
    )


class LatencyThresholds(_Strict):
    ttft_p95_ms: float = Field(default=500.0, gt=0, description="Time to first token, p95.")
    per_token_p95_ms: float = Field(default=100.0, gt=0)
    generation_p95_ms: float = Field(default=5000.0, gt=0, description="Fixed generation, p95.")


class BenchmarkPolicy(_Strict):
    enabled: bool = Field(default=True, description="Run the benchmarker; off: skipped.")
    on_failure: Literal["degrade", "block"] = Field(
        default="degrade", description="A failed benchmark marks degraded and goes on, or blocks."
    )
    max_perplexity_increase: float = Field(default=0.05, ge=0, description="0.05 = +5%.")
    eval_dataset: str = Field(
        default="builtin:preflight-eval-v1", description="Pinned evaluation text (ships inside)."
    )
    max_length: int = Field(default=256, ge=8, description="Perplexity window, tokens.")
    stride: int = Field(default=128, ge=1, description="Window step; moves perplexity ~15%.")
    dtype: Literal["float32", "float16", "bfloat16", "auto"] = Field(
        default="auto", description="Weights dtype; auto: the config's."
    )
    consistency_prompts: int = Field(
        default=50, ge=1, le=1000, description="Pinned prompts run twice, greedy."
    )
    temperature: float = Field(default=0.0, ge=0, description="0: greedy decoding.")
    compare_outputs_with_stable: bool = Field(
        default=False, description="Also compare outputs with the previous version's."
    )
    latency_runs: int = Field(default=10, ge=1, description="Measured generations.")
    latency_warmup_runs: int = Field(default=2, ge=0, description="Not counted.")
    perplexity: bool = Field(default=True, description="Run the perplexity check.")
    latency: bool = Field(default=True, description="Run the latency check.")
    consistency: bool = Field(default=True, description="Run the consistency check.")

    @model_validator(mode="after")
    def _stride_fits(self) -> BenchmarkPolicy:
        if self.stride > self.max_length:
            raise ValueError(
                f"stride ({self.stride}) must not exceed max_length ({self.max_length})"
            )
        return self


class CanaryStep(_Strict):
    weight: float = Field(gt=0, lt=100, description="Percent of requests to the canary.")
    duration_s: float = Field(gt=0)


class CanaryThresholds(_Strict):
    max_error_rate: float = Field(default=0.01, ge=0, le=1, description="0.01 = 1%.")
    max_p95_increase: float = Field(default=0.20, ge=0, description="0.20 = +20% vs stable.")
    max_error_ratio: float = Field(
        default=2.0,
        ge=1.0,
        description="e-process method only: the canary's error rate may be at most this many "
        "times the stable's in the same window (2.0: double).",
    )
    max_ttft_p95_increase: float | None = Field(
        default=0.20,
        ge=0,
        description="Time to first token of streamed responses: canary p95 at most this much "
        "above stable (0.20 = +20%); null: not gated, and with the e-process method its share "
        "of the false-rollback budget goes to the other tests. Judged only where records carry "
        "TTFT.",
    )


class EProcessPolicy(_Strict):
    """The e-process method's knobs (docs/canary-statistics.md); the budget is the policy's
    `false_rollback_rate`, whatever the number of looks."""

    look_interval_s: float = Field(
        default=1.0,
        gt=0,
        description="Seconds between looks: an e-process may be looked at as often as wanted.",
    )
    change_every_s: float = Field(
        default=5.0,
        gt=0,
        description="Candidate change points: the test restarts (in a mixture) at every bucket "
        "of this many seconds from the step start, so a canary that turns bad mid-step is caught.",
    )


class TrafficPolicy(_Strict):
    """Which data plane carries the canary's traffic (services/traffic/): one router per model."""

    router: Literal["builtin", "envoy", "gateway-api", "istio", "kserve"] = Field(
        default="builtin",
        description="builtin: preflight's own proxy; envoy: Envoy through xDS; gateway-api: an "
        "HTTPRoute; istio: a VirtualService; kserve: an InferenceService (docs/data-planes/).",
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="The router's own settings (object names, namespace, backends); each router "
        "checks its keys and refuses unknown ones when the rollout starts.",
    )
    confirm_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="A weight the data plane has not confirmed this long after it was written "
        "holds the rollout, with the router's reason; a step never ends on an unconfirmed weight.",
    )


class CanaryPolicy(_Strict):
    enabled: bool = Field(default=True, description="Canary on real traffic; off: promoted.")
    steps: tuple[CanaryStep, ...] = Field(
        default=(CanaryStep(weight=5, duration_s=180), CanaryStep(weight=50, duration_s=120)),
        min_length=1,
        description="Weights (percent) and durations; 100% follows the last step.",
    )
    thresholds: CanaryThresholds = CanaryThresholds()
    analysis_interval_s: float = Field(default=5.0, gt=0, description="Seconds between looks.")
    min_canary_requests: int = Field(
        default=50, ge=1, description="Canary requests a step needs before it may end healthy."
    )
    false_rollback_rate: float = Field(
        default=0.01,
        ge=1e-9,
        lt=0.5,
        description="Chance a healthy canary is rolled back over a whole rollout (all looks); "
        "at least 1e-9: 1e-300 left the tests no level they could compute, and a failing canary "
        "was never rolled back.",
    )
    max_step_extension_s: float = Field(
        default=300.0, ge=0, description="A step short of traffic runs this much longer, at most."
    )
    lookback_s: float = Field(
        default=30.0,
        gt=0,
        description="Recent window checked beside the whole step, so a canary that turns bad late "
        "in a long step is not diluted by its good start.",
    )
    held_timeout_s: float = Field(
        default=3600.0,
        gt=0,
        description="An inconclusive canary waits this long for a person, then is rolled back.",
    )
    bake_s: float = Field(default=0.0, ge=0, description="Watch time after promotion.")
    on_new_version: Literal["queue", "supersede"] = Field(
        default="queue",
        description="A newer version of a model in rollout waits, or rolls the older back.",
    )
    traffic: TrafficPolicy = TrafficPolicy()
    method: Literal["bonferroni", "e-process"] = Field(
        default="bonferroni",
        description="bonferroni: exact tests at each look with the false-rollback budget spent "
        "look by look; e-process: anytime-valid sequential tests with change detection "
        "(docs/canary-statistics.md).",
    )
    e_process: EProcessPolicy = EProcessPolicy()

    @model_validator(mode="after")
    def _increasing(self) -> CanaryPolicy:
        weights = [s.weight for s in self.steps]
        if weights != sorted(weights):
            raise ValueError(f"canary step weights must not decrease, got {weights}")
        return self


class ModelClassPolicy(_Strict):
    """Thresholds that depend on the kind of model (a small classifier is not a 70B chat model)."""

    latency: LatencyThresholds = LatencyThresholds()
    canary: CanaryThresholds | None = None


class NotifyPolicy(_Strict):
    slack_channel: str | None = Field(default=None, description="e.g. `#ml-deploys`.")
    webhook_url: str | None = Field(default=None, description="Generic JSON webhook.")
    on: tuple[
        Literal["blocked", "degraded", "rolled_back", "promoted", "held", "failed", "progress"], ...
    ] = Field(
        default=("blocked", "degraded", "rolled_back", "promoted", "held", "failed", "progress"),
        description="Which notices to send; `progress`: one message per rollout, updated.",
    )


def _default_classes() -> dict[str, ModelClassPolicy]:
    return {
        "default": ModelClassPolicy(),
        "small": ModelClassPolicy(
            latency=LatencyThresholds(ttft_p95_ms=100, per_token_p95_ms=20, generation_p95_ms=1000)
        ),
        "large": ModelClassPolicy(
            latency=LatencyThresholds(
                ttft_p95_ms=2000, per_token_p95_ms=200, generation_p95_ms=20000
            )
        ),
    }


class Policy(_Strict):
    """The effective policy of one deployment."""

    validation: ValidationPolicy = ValidationPolicy()
    benchmark: BenchmarkPolicy = BenchmarkPolicy()
    canary: CanaryPolicy = CanaryPolicy()
    model_classes: dict[str, ModelClassPolicy] = Field(default_factory=_default_classes)
    notify: NotifyPolicy = NotifyPolicy()

    def model_class(self, name: str) -> ModelClassPolicy:
        """The class's thresholds; an unknown class is an error, not a silent default."""
        try:
            return self.model_classes[name]
        except KeyError:
            known = ", ".join(sorted(self.model_classes))
            raise PolicyError(f"unknown model class {name!r} (known: {known})") from None

    def canary_thresholds(self, model_class: str) -> CanaryThresholds:
        return self.model_class(model_class).canary or self.canary.thresholds


REQUEST_DENIED: Final = (
    "validation.enabled",
    "validation.checks",
    "benchmark.enabled",
    "benchmark.perplexity",
    "benchmark.latency",
    "benchmark.consistency",
    "canary.enabled",
    "model_classes",
    "notify.webhook_url",
    "notify.on",
    "canary.traffic",
)
"""What a request may not change by default: the validator is the gate against hostile files (code
that runs on load, leaked keys), and anyone who may publish a request would switch it off; so
are the benchmark (or each of its checks) and the canary: a request that turns off the gates
deploys anything to all users at once. The model classes' thresholds are the operator's too: the
canary judges by them, not by `canary.thresholds`, where a class gives its own (review 15 passed
a canary failing every request through `model_classes.default.canary.max_error_rate: 1`). Which
outcomes are announced (`notify.on`) is the operator's, or a deployment could go out silently.
The notifier signs what it posts to a webhook, and would post it anywhere (a request's own
`notify.webhook_url` is held to PREFLIGHT_REQUEST_WEBHOOK_PREFIXES instead); the data plane and
its options (a Kubernetes API URL the controller sends its token to, another team's object to
patch with force, an xDS directory to write) are the operator's."""

REQUEST_MAX: Final[dict[str, float]] = {
    # Each of these holds a shared service for as long as it asks: one request with
    # `latency_runs: 1e9` held the only benchmarker, and every other team's deployment waited.
    "validation.budget_s": 10.0,
    "validation.time_limit_s": 120.0,
    "validation.hash_limit_s": 3600.0,
    "benchmark.latency_runs": 100,
    "benchmark.latency_warmup_runs": 20,
    "benchmark.max_length": 2048,
    # Gates a request may tighten but not open: at `max_error_rate: 1` a canary failing every
    # request is promoted.
    "benchmark.max_perplexity_increase": 0.25,
    "canary.thresholds.max_error_rate": 0.05,
    "canary.thresholds.max_p95_increase": 1.0,
    "canary.thresholds.max_error_ratio": 10.0,
    "canary.thresholds.max_ttft_p95_increase": 1.0,
}
"""Ceilings on what a request's `policy_overrides` may set (the file's own layers are not held
to them)."""

REQUEST_MIN: Final[dict[str, float]] = {
    "benchmark.stride": 32,  # the number of perplexity windows grows as 1/stride
    "canary.analysis_interval_s": 0.5,  # every look queries the store
    "canary.e_process.look_interval_s": 0.25,
    "canary.e_process.change_every_s": 1.0,
}
"""Floors on what a request's `policy_overrides` may set."""


class RequestLimits(_Strict):
    """What a deployment's own `policy_overrides` may set. The file's layers are the operator's;
    a request comes from anyone who may publish one, so it is checked against these first."""

    deny: tuple[str, ...] = Field(
        default=REQUEST_DENIED,
        description="Keys, or whole sections, a request may not change (it may restate the "
        "value the file gives). Replaces the built-in list; `[]` lets a request change anything.",
    )
    max: dict[str, float | None] = Field(
        default_factory=dict,
        description="Ceilings by key, merged over the built-in ones (`benchmark.latency_runs: "
        "100`, `validation.time_limit_s: 120`, ...); null removes one.",
    )
    min: dict[str, float | None] = Field(
        default_factory=dict,
        description="Floors by key, merged over the built-in ones (`benchmark.stride: 32`, "
        "`canary.analysis_interval_s: 0.5`, ...); null removes one.",
    )

    @model_validator(mode="after")
    def _known_keys(self) -> RequestLimits:
        known = _paths(Policy().model_dump(mode="json"))
        for section, keys in (("deny", self.deny), ("max", self.max), ("min", self.min)):
            for key in keys:
                if key not in known and not any(k.startswith(f"{key}.") for k in known):
                    raise ValueError(f"{section}: {key!r} is not a policy key")
        return self

    def ceilings(self) -> dict[str, float]:
        merged = {**REQUEST_MAX, **self.max}
        return {k: v for k, v in merged.items() if v is not None}

    def floors(self) -> dict[str, float]:
        merged = {**REQUEST_MIN, **self.min}
        return {k: v for k, v in merged.items() if v is not None}

    def problems(
        self, overrides: Mapping[str, Any], given: Mapping[str, Any], result: Mapping[str, Any]
    ) -> list[str]:
        """What in `overrides` a request may not set. `given`: the policy the file's layers
        resolve to, `result`: with the overrides (both as JSON). Values are compared as the
        policy will use them, after validation: `"1e9"` is the number 1e9 to the policy."""
        found: list[str] = []
        ceilings, floors = self.ceilings(), self.floors()
        for key, _ in _leaves(overrides):
            value = _get(result, key)
            denied = next((d for d in self.deny if key == d or key.startswith(f"{d}.")), None)
            if denied is not None and value != _get(given, key):
                found.append(f"{key}: a request may not change {denied} (request_overrides.deny)")
                continue
            if value is None and key in ceilings and _get(given, key) is not None:
                # null switches a gate off (max_ttft_p95_increase: not gated): above any ceiling.
                found.append(
                    f"{key}: null lifts the ceiling of {_number(ceilings[key])} for a request "
                    "(request_overrides.max)"
                )
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if key in ceilings and value > ceilings[key]:
                found.append(
                    f"{key}: {_number(value)} is above the ceiling of {_number(ceilings[key])} "
                    "for a request (request_overrides.max)"
                )
            if key in floors and value < floors[key]:
                found.append(
                    f"{key}: {_number(value)} is below the floor of {_number(floors[key])} "
                    "for a request (request_overrides.min)"
                )
        return found


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _leaves(document: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in document.items():
        if isinstance(value, Mapping) and value:
            out += _leaves(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _paths(document: Mapping[str, Any]) -> set[str]:
    return {key for key, _ in _leaves(document)}


def _get(document: Mapping[str, Any], key: str) -> Any:
    value: Any = document
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


class PolicyFile(_Strict):
    """The YAML file: defaults plus overrides per team and per model (partial documents), and
    what a request's own overrides may set."""

    defaults: dict[str, Any] = Field(default_factory=dict)
    teams: dict[str, dict[str, Any]] = Field(default_factory=dict)
    models: dict[str, dict[str, Any]] = Field(default_factory=dict)
    request_overrides: RequestLimits = RequestLimits()
    source: str = Field(default="<built-in>", exclude=True)

    def resolve(
        self,
        *,
        model: str,
        team: str | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> Policy:
        layers: list[tuple[str, Mapping[str, Any]]] = [(f"{self.source}: defaults", self.defaults)]
        if team and team in self.teams:
            layers.append((f"{self.source}: teams.{team}", self.teams[team]))
        if model in self.models:
            layers.append((f"{self.source}: models.{model}", self.models[model]))
        if overrides:
            layers.append(("deployment policy_overrides", overrides))
        merged: dict[str, Any] = {}
        given: dict[str, Any] = {}
        for where, layer in layers:
            if layer is overrides:
                given = _validate(merged, where).model_dump(mode="json")
            merged = _merge(merged, dict(layer))
            checked = _validate(merged, where)  # fail at the layer that broke it: it is named
            if layer is overrides:
                result = checked.model_dump(mode="json")
                refused = self.request_overrides.problems(overrides, given, result)
                if refused:
                    raise PolicyError(
                        "; ".join(f"{where}: {problem} in {self.source}" for problem in refused)
                    )
        return _validate(merged, layers[-1][0])


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _validate(document: Mapping[str, Any], where: str) -> Policy:
    try:
        return Policy.model_validate(document)
    except ValidationError as exc:
        raise PolicyError(_describe(exc, where)) from None


def _describe(exc: ValidationError, where: str) -> str:
    problems = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        problems.append(f"{where}: {key}: {err['msg']}")
    return "; ".join(problems)


DEFAULT_POLICY_RESOURCE = "default_policy.yaml"
# libyaml's safe loader where PyYAML was built with it (the same YAML, ~10x faster: every CLI
# start reads the default policy).
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_policy_file(path: Path | None) -> PolicyFile:
    """Read and check a policy file (`None`: the built-in default file)."""
    if path is None:
        text = resources.files("services.contracts").joinpath(DEFAULT_POLICY_RESOURCE).read_text()
        source = f"<built-in {DEFAULT_POLICY_RESOURCE}>"
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise PolicyError(f"{path}: cannot read policy file: {exc.strerror}") from None
        source = str(path)
    try:
        raw = yaml.load(text, Loader=_SAFE_LOADER)  # noqa: S506 - CSafeLoader or SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        raise PolicyError(f"{source}:{at} not valid YAML: {exc}") from None
    raw = raw or {}
    if not isinstance(raw, dict):
        raise PolicyError(f"{source}: top level must be a mapping, got {type(raw).__name__}")
    try:
        policy_file = PolicyFile.model_validate({**raw, "source": source})
    except ValidationError as exc:
        raise PolicyError(_describe(exc, source)) from None
    policy_file.resolve(model="")  # check the defaults layer now, not at the first deployment
    for team in policy_file.teams:
        policy_file.resolve(model="", team=team)
    for model in policy_file.models:
        policy_file.resolve(model=model)
    return policy_file


def with_default_router(policy: PolicyFile, router: str) -> dict[str, Any]:
    """The policy file as a document whose defaults send canary traffic through `router`,
    unless its defaults already choose one (teams, models and requests still override)."""
    doc = policy.model_dump(mode="json")
    canary = doc["defaults"].setdefault("canary", {})
    traffic = canary.setdefault("traffic", {})
    traffic.setdefault("router", router)
    return doc
