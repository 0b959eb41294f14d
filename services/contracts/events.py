"""Every event and command that travels on the bus: the single source of truth for schemas/."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

SCHEMA_VERSION = 1

# Names travel as subject tokens (see subjects.py) and are NATS KV keys (routes, rollouts), so
# one rule serves both: what a token may hold once `.` is mapped, and what a key may be (no
# leading or trailing `.`, no `..`). Every `.` or `/` is followed by a letter, digit, `_` or `-`:
# Hugging Face style names such as `org/model-7b.v2` are accepted; `a.`, `a..b`, `org/..` and
# `org/` are refused at the request, never passed on to fail in the controller.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9](?:[A-Za-z0-9_-]|[./][A-Za-z0-9_-])*$"
MODEL_NAME_MAX = 128
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$"
DEPLOYMENT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{2,63}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
# Any URI scheme is admitted by the contract (s3://, gs://, hf://, file://) or a plain path; which
# schemes a stage can read is the stage's business and it reports the ones it cannot.
LOCATION_PATTERN = r"^(?:[A-Za-z][A-Za-z0-9+.-]*://.+|/.*|\./.*|[^:]+)$"
ENDPOINT_PATTERN = r"^https?://[^\s/]+(?:/\S*)?$"
LOCATION_DESCRIPTION = (
    "A local path, or `s3://BUCKET/PREFIX/`, `hf://ORG/NAME@REVISION`, `https://HOST/BASE/` "
    "(docs/locations.md). Never credentials: a location travels in every event."
)


def check_location(value: str) -> str:
    """A location with credentials in it (user:password@, a signed query) would be copied into
    every event, log line and Slack notice: refuse it and say where credentials go."""
    scheme, sep, rest = value.partition("://")
    if sep and "/" not in scheme:
        authority = rest.split("/", 1)[0]
        if "@" in authority:
            raise ValueError(
                "credentials in a location would be copied into every event: remove user@ "
                "and give them to the services (AWS_*, HF_TOKEN, PREFLIGHT_HTTPS_TOKEN)"
            )
        if "?" in rest or "#" in rest:
            raise ValueError(
                "a location takes no query or fragment (a signed URL's signature would be "
                "copied into every event): name the model's base, give credentials to the services"
            )
    return value


def utc_now() -> datetime:
    return datetime.now(UTC)


class Message(BaseModel):
    """Base of every message: frozen, strict about unknown fields, versioned. Validators are
    built on first use (defer_build): a CLI run touches three of the ~30 message types."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    schema_version: Literal[1] = Field(
        default=1,
        description="Version of this message's schema; bumped on any breaking change.",
    )


class ModelRef(Message):
    """One version of one model and where its files are."""

    name: str = Field(
        pattern=MODEL_NAME_PATTERN,
        max_length=MODEL_NAME_MAX,
        description="Model name, e.g. `org/chat-7b`.",
    )
    version: str = Field(pattern=VERSION_PATTERN, description="Version label, e.g. `2024-06-01`.")
    location: str = Field(
        min_length=1,
        max_length=4096,
        pattern=LOCATION_PATTERN,
        description=LOCATION_DESCRIPTION,
    )
    endpoint: str | None = Field(
        default=None,
        max_length=2000,
        pattern=ENDPOINT_PATTERN,
        description="Inference server serving this version, e.g. `http://10.0.0.5:8080`.",
    )

    _no_credentials = field_validator("location")(check_location)


class TargetHardware(Message):
    """What the model must fit and run on."""

    gpu_memory_gb: float = Field(default=24.0, gt=0, le=4096, description="GPU memory in GiB.")
    context_length: int | None = Field(
        default=None, ge=1, le=10_000_000, description="Context to serve; default: the model's."
    )
    batch_size: int = Field(default=1, ge=1, le=65_536)
    dtype: Literal["float32", "float16", "bfloat16", "int8", "int4"] | None = Field(
        default=None, description="Serving dtype; default: the model config's."
    )
    gpu_count: int = Field(default=1, ge=1, le=1024)


class Requester(Message):
    """Who asked for a deployment, and from which system."""

    user: str = Field(default="unknown", max_length=200)
    system: str = Field(default="cli", max_length=200, description="e.g. `cli`, `github-actions`.")
    team: str | None = Field(default=None, max_length=200)
    nats_user: str | None = Field(
        default=None,
        max_length=200,
        description=(
            "The authenticated NATS user that sent a command. The receiving service takes it "
            "from the command's subject, which the server lets each user publish only under "
            "its own name; whatever the body says is replaced."
        ),
    )


class NotifyTarget(Message):
    """Where outcomes of one deployment are announced, in addition to the policy's channels."""

    slack_channel: str | None = Field(default=None, max_length=200)
    webhook_url: str | None = Field(default=None, max_length=2000)


DeploymentId = Annotated[str, Field(pattern=DEPLOYMENT_ID_PATTERN)]


class Event(Message):
    """Fields common to every deployment event."""

    deployment_id: DeploymentId
    model: str = Field(pattern=MODEL_NAME_PATTERN, max_length=MODEL_NAME_MAX)
    version: str = Field(pattern=VERSION_PATTERN)
    occurred_at: datetime = Field(default_factory=utc_now)

    @field_validator("occurred_at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("occurred_at must carry a time zone (UTC)")
        return value


class DeploymentRequested(Event):
    """A system asks for a model version to go through the pipeline."""

    type: Literal["DeploymentRequested"] = "DeploymentRequested"
    location: str = Field(
        min_length=1, max_length=4096, pattern=LOCATION_PATTERN, description=LOCATION_DESCRIPTION
    )
    _no_credentials = field_validator("location")(check_location)
    expected_sha256: dict[str, Annotated[str, Field(pattern=SHA256_PATTERN)]] = Field(
        default_factory=dict, description="Expected digest per file, relative to `location`."
    )
    model_class: str = Field(
        default="default", pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$", description="Policy class."
    )
    stable: ModelRef | None = Field(default=None, description="The version this one replaces.")
    endpoint: str | None = Field(
        default=None,
        max_length=2000,
        pattern=ENDPOINT_PATTERN,
        description=(
            "Inference server already serving this version (e.g. `http://10.0.0.7:8080`); the "
            "router sends the canary share of traffic there. Without it, a gateway of your own "
            "reads the route KV bucket and sends traffic by version."
        ),
    )
    target: TargetHardware = Field(default_factory=TargetHardware)
    policy_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Partial policy (same keys as the policy file's `defaults`) for this one.",
    )
    requested_by: Requester = Field(default_factory=Requester)
    notify: NotifyTarget = Field(default_factory=NotifyTarget)


class Status(StrEnum):
    """Result of one check or one stage."""

    PASSED = "passed"
    FAILED = "failed"
    DEGRADED = "degraded"
    SKIPPED = "skipped"
    ERROR = "error"


class CheckResult(Message):
    """One check: its status, why, the number behind it and how long it took."""

    name: str
    status: Status
    reason: str = ""
    value: float | None = None
    threshold: float | None = None
    unit: str | None = None
    duration_ms: float = Field(default=0.0, ge=0)
    details: dict[str, Any] = Field(default_factory=dict)


class StageReport(Message):
    """What one stage concluded."""

    stage: Literal["validation", "benchmark", "canary"]
    status: Status
    reason: str = ""
    checks: tuple[CheckResult, ...] = ()
    duration_ms: float = Field(default=0.0, ge=0)
    service: str = Field(default="", description="Instance that produced the report.")

    @property
    def blocks(self) -> bool:
        return self.status in (Status.FAILED, Status.ERROR)


class ValidationCompleted(Event):
    """The validator finished (or skipped) its checks."""

    type: Literal["ValidationCompleted"] = "ValidationCompleted"
    report: StageReport
    request: DeploymentRequested

    @property
    def stages(self) -> tuple[StageReport, ...]:
        return (self.report,)


class BenchmarkCompleted(Event):
    """The benchmarker finished (or skipped) its measurements."""

    type: Literal["BenchmarkCompleted"] = "BenchmarkCompleted"
    report: StageReport
    request: DeploymentRequested
    earlier: tuple[StageReport, ...] = Field(default=(), description="Reports of earlier stages.")
    device: str | None = Field(default=None, description="Device the benchmark ran on.")

    @property
    def stages(self) -> tuple[StageReport, ...]:
        return (*self.earlier, self.report)


class CanaryStepStarted(Event):
    """Traffic moved to a new canary weight."""

    type: Literal["CanaryStepStarted"] = "CanaryStepStarted"
    step_index: int = Field(ge=0)
    weight: float = Field(ge=0, le=100)
    duration_s: float = Field(ge=0)


class RoleMeasurement(Message):
    """Request metrics of one role (stable or canary) in one window."""

    requests: int = Field(ge=0)
    errors: int = Field(ge=0)
    error_rate: float | None = Field(default=None, ge=0, le=1)
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    ttft_p95_ms: float | None = Field(
        default=None,
        description="p95 time to first token of the role's streamed responses; null if none.",
    )


class CanaryAnalysed(Event):
    """One analysis of the canary against the stable version."""

    type: Literal["CanaryAnalysed"] = "CanaryAnalysed"
    step_index: int = Field(ge=0)
    window_start: datetime
    window_end: datetime
    canary: RoleMeasurement
    stable: RoleMeasurement
    verdict: Literal["healthy", "unhealthy", "insufficient_data", "no_data"]
    reason: str = ""


# ---- outcomes: the events any system may subscribe to ---------------------------------------


class Outcome(Event):
    """Fields common to outcome events."""

    stages: tuple[StageReport, ...] = Field(
        default=(), description="Every stage's report so far, skipped ones included."
    )
    reasons: tuple[str, ...] = Field(default=(), description="Human-readable reasons.")
    requested_by: Requester = Field(default_factory=Requester)
    metrics_url: str | None = None


class DeploymentBlocked(Outcome):
    """A stage failed and policy blocks: the version never receives traffic."""

    type: Literal["DeploymentBlocked"] = "DeploymentBlocked"
    stage: Literal["validation", "benchmark"]


class DeploymentDegraded(Outcome):
    """Benchmarks failed; the deployment proceeds (policy `on_failure: degrade`)."""

    type: Literal["DeploymentDegraded"] = "DeploymentDegraded"
    failed_checks: tuple[CheckResult, ...] = ()


class DeploymentPromoted(Outcome):
    """The version is now the stable one, taking all traffic."""

    type: Literal["DeploymentPromoted"] = "DeploymentPromoted"
    previous_version: str | None = None
    promoted_by: Literal["pipeline", "manual"] = "pipeline"
    steps_completed: int = Field(default=0, ge=0, description="Canary steps the version passed.")
    canary: RoleMeasurement | None = Field(default=None, description="Last analysed window.")
    stable: RoleMeasurement | None = None


class DeploymentRolledBack(Outcome):
    """The canary was taken out of traffic."""

    type: Literal["DeploymentRolledBack"] = "DeploymentRolledBack"
    trigger: Literal[
        "error_rate", "error_ratio", "latency", "ttft", "inconclusive", "manual", "superseded"
    ]
    step_index: int | None = None
    canary: RoleMeasurement | None = None
    stable: RoleMeasurement | None = None
    threshold: float | None = None
    window_start: datetime | None = None
    window_end: datetime | None = None


class DeploymentHeld(Outcome):
    """The canary could not be judged (too little traffic, or no metrics): it needs a person.

    The canary keeps its current weight until `deadline`; then it is rolled back unless someone
    promotes it (`preflight promote ID`) or aborts it sooner. Never terminal.
    """

    type: Literal["DeploymentHeld"] = "DeploymentHeld"
    step_index: int = Field(ge=0)
    weight: float = Field(ge=0, le=100)
    deadline: datetime
    canary: RoleMeasurement | None = None
    stable: RoleMeasurement | None = None
    window_start: datetime | None = None
    window_end: datetime | None = None


class DeploymentFailed(Outcome):
    """The pipeline could not finish for a reason that is not the model's fault."""

    type: Literal["DeploymentFailed"] = "DeploymentFailed"
    stage: str
    error: str


# ---- commands --------------------------------------------------------------------------------


class Command(Event):
    """A person or system asks the controller to act on a running deployment."""

    requested_by: Requester = Field(default_factory=Requester)
    reason: str = Field(default="", max_length=2000)


class PromoteDeployment(Command):
    """Skip the remaining canary steps and promote now."""

    type: Literal["PromoteDeployment"] = "PromoteDeployment"


class AbortDeployment(Command):
    """Roll back now."""

    type: Literal["AbortDeployment"] = "AbortDeployment"


class PauseDeployment(Command):
    """Hold the rollout at its current weight."""

    type: Literal["PauseDeployment"] = "PauseDeployment"


class ResumeDeployment(Command):
    """Continue a paused rollout."""

    type: Literal["ResumeDeployment"] = "ResumeDeployment"


# ---- data plane and failures -------------------------------------------------------------------


VOTING_METHODS: Final = frozenset({"POST"})
NOT_SERVED: Final = frozenset({501})


def votes(method: str, status: int) -> bool:
    """Whether a request is evidence about the model: an inference call (POST) that the model
    answered as one (2xx, 3xx, 5xx; 0: no answer), not a request it refused as the client's
    fault (4xx: a malformed body, a path or method it does not serve) nor 501. Review 13
    diluted a canary failing 20% of completions to 0.5% with 1,500 `GET|HEAD|OPTIONS
    /favicon.ico`, review 15 to 1.7% with 2,000 malformed POSTs answered 400, each sent with
    a sticky value that lands on the canary. A 4xx was never an error, so leaving them out
    hides no failure. Routers leave other requests out of the records (their Prometheus
    counters still count them)."""
    return method.upper() in VOTING_METHODS and not 400 <= status < 500 and status not in NOT_SERVED


class RequestRecord(Message):
    """One proxied inference request, as any gateway reports it."""

    ts: datetime
    deployment_id: str = Field(
        max_length=64,
        description=(
            "The rollout the request counts for: while a canary is live, the canary's deployment "
            "id on both roles' records, so one window query compares them; otherwise the stable's."
        ),
    )
    model: str = Field(pattern=MODEL_NAME_PATTERN, max_length=MODEL_NAME_MAX)
    version: str = Field(pattern=VERSION_PATTERN)
    role: Literal["stable", "canary"]
    latency_ms: float = Field(ge=0)
    ttfb_ms: float | None = Field(default=None, ge=0)
    ttft_ms: float | None = Field(
        default=None,
        ge=0,
        description=(
            "Streamed completions (SSE, JSON lines): request start to the first event that "
            "carries output text. Null when the response was not a readable token stream (and "
            "on gateways that cannot see tokens, such as Envoy)."
        ),
    )
    itl_ms: float | None = Field(
        default=None,
        ge=0,
        description=(
            "Inter-token latency: (last token event - first token event) / (output_tokens - 1); "
            "null with fewer than two token events."
        ),
    )
    output_tokens: int | None = Field(
        default=None,
        ge=0,
        le=4_294_967_295,
        description=(
            "Output tokens of a streamed completion: the server's own count "
            "(`usage.completion_tokens`) when it sends one, else the token events."
        ),
    )
    status: int = Field(ge=0, le=999, description="HTTP status; 0 when no response came back.")
    error_kind: str | None = Field(
        default=None, max_length=64, description="e.g. `timeout`, `connect`, `http_5xx`."
    )
    pinned: bool = Field(
        default=False,
        description=(
            "The request chose its role with the X-Preflight-Pin header, not by the weight: a "
            "tester's request. Stored, but never part of the canary analysis, or anyone could "
            "dilute a failing canary's error rate with pinned requests."
        ),
    )


class RequestMetricsBatch(Message):
    """A batch of request records; `batch_id` makes a redelivered batch harmless."""

    type: Literal["RequestMetricsBatch"] = "RequestMetricsBatch"
    batch_id: str = Field(min_length=8, max_length=128)
    source: str = Field(max_length=200, description="Gateway instance that measured them.")
    records: tuple[RequestRecord, ...] = Field(max_length=100_000)


class RouteTarget(Message):
    """One upstream version behind a route."""

    deployment_id: str | None = None
    version: str = Field(pattern=VERSION_PATTERN)
    location: str | None = None
    upstream: str | None = Field(default=None, description="Inference server URL, if known.")


class Route(Message):
    """Value of a model's key in the route-weights KV bucket; routers apply it on change."""

    type: Literal["Route"] = "Route"
    model: str = Field(pattern=MODEL_NAME_PATTERN, max_length=MODEL_NAME_MAX)
    stable: RouteTarget | None = None
    canary: RouteTarget | None = None
    canary_weight: float = Field(default=0.0, ge=0, le=100, description="Percent, fractional ok.")
    updated_at: datetime = Field(default_factory=utc_now)


class AppliedRoute(Message):
    """One model's route as a built-in router instance serves it (see RouterReport)."""

    updated_at: datetime = Field(description="The served Route's `updated_at`: which write.")
    canary_weight: float = Field(ge=0, le=100)
    stable_deployment_id: str | None = None
    canary_deployment_id: str | None = None


class RouterReport(Message):
    """Value of a built-in router instance's key in the router-status KV bucket: what it serves.

    Written on every route change and every few seconds (a heartbeat), so the controller can tell
    a weight that is in force from one that was only written (services/traffic/builtin.py)."""

    type: Literal["RouterReport"] = "RouterReport"
    instance: str = Field(min_length=1, max_length=200)
    reported_at: datetime = Field(default_factory=utc_now)
    live: bool = Field(description="The route watch is live: the table follows the bucket.")
    routes: dict[str, AppliedRoute] = Field(default_factory=dict, description="By model name.")


class DeadLetter(Message):
    """A message a service could not take, with the original payload and why."""

    type: Literal["DeadLetter"] = "DeadLetter"
    service: str
    subject: str
    reason: str
    payload_text: str | None = Field(default=None, description="Original payload, if UTF-8.")
    payload_b64: str | None = Field(default=None, description="Original payload, if not UTF-8.")
    headers: dict[str, str] = Field(default_factory=dict)
    delivery_attempt: int | None = None
    stream: str | None = Field(default=None, description="Stream the original was read from.")
    stream_sequence: int | None = Field(
        default=None, description="Its sequence there: the original, whole, while it is kept."
    )
    truncated: bool = Field(
        default=False, description="The payload here is a prefix; see `reason` for its sha256."
    )
    received_at: datetime = Field(default_factory=utc_now)


def _deferred(tp: Any) -> Any:
    """A TypeAdapter whose validator is built on first use, so importing the contracts builds
    none (the CLI's start)."""
    return TypeAdapter(tp, config=ConfigDict(defer_build=True))


DeploymentEvent = Annotated[
    DeploymentRequested
    | ValidationCompleted
    | BenchmarkCompleted
    | CanaryStepStarted
    | CanaryAnalysed
    | DeploymentBlocked
    | DeploymentDegraded
    | DeploymentPromoted
    | DeploymentRolledBack
    | DeploymentHeld
    | DeploymentFailed
    | PromoteDeployment
    | AbortDeployment
    | PauseDeployment
    | ResumeDeployment,
    Field(discriminator="type"),
]
"""Any message of the events stream, told apart by its `type`."""

DEPLOYMENT_EVENT: TypeAdapter[DeploymentEvent] = _deferred(DeploymentEvent)

AnyOutcome = Annotated[
    DeploymentBlocked
    | DeploymentDegraded
    | DeploymentPromoted
    | DeploymentRolledBack
    | DeploymentHeld
    | DeploymentFailed,
    Field(discriminator="type"),
]
ANY_OUTCOME: TypeAdapter[AnyOutcome] = _deferred(AnyOutcome)

AnyCommand = Annotated[
    PromoteDeployment | AbortDeployment | PauseDeployment | ResumeDeployment,
    Field(discriminator="type"),
]
ANY_COMMAND: TypeAdapter[AnyCommand] = _deferred(AnyCommand)

OUTCOME_TYPES: tuple[type[Outcome], ...] = (
    DeploymentBlocked,
    DeploymentDegraded,
    DeploymentPromoted,
    DeploymentRolledBack,
    DeploymentHeld,
    DeploymentFailed,
)
TERMINAL_TYPES: tuple[type[Outcome], ...] = (
    DeploymentBlocked,
    DeploymentPromoted,
    DeploymentRolledBack,
    DeploymentFailed,
)

ALL_MESSAGES: tuple[type[Message], ...] = (
    DeploymentRequested,
    ValidationCompleted,
    BenchmarkCompleted,
    CanaryStepStarted,
    CanaryAnalysed,
    *OUTCOME_TYPES,
    PromoteDeployment,
    AbortDeployment,
    PauseDeployment,
    ResumeDeployment,
    RequestMetricsBatch,
    Route,
    RouterReport,
    DeadLetter,
)


def new_deployment_id(now: datetime | None = None) -> str:
    """A sortable, subject-safe id: `d-20261125T174501-3f9a1c`."""
    import secrets

    stamp = (now or utc_now()).strftime("%Y%m%dT%H%M%S")
    return f"d-{stamp}-{secrets.token_hex(3)}"


def is_valid_deployment_id(value: str) -> bool:
    return re.fullmatch(DEPLOYMENT_ID_PATTERN, value) is not None
