"""Subject, stream, consumer and KV bucket names: the one place the bus topology is spelled.

Deployment subjects start with the same four tokens, so one wildcard selects any slice of them:

    preflight.<kind>.<model>.<deployment_id>.<name>            kind: stage | outcome
    preflight.command.<model>.<deployment_id>.<name>.<user>

    model  the model name with every `.` written `%2E` (subject tokens cannot hold dots)
    user   the NATS user that sent the command, written the same way. The server lets each user
           publish commands only under its own name (deploy/nats/nats.conf), so the token is the
           authenticated sender, not a name the sender chose.

    preflight.outcome.>                      every outcome of every model
    preflight.outcome.<model>.>              every outcome of one model
    preflight.*.*.<deployment_id>.>          everything about one deployment
"""

from __future__ import annotations

from typing import Final, Literal

PREFIX: Final = "preflight"

EVENTS_STREAM: Final = "PREFLIGHT_EVENTS"
METRICS_STREAM: Final = "PREFLIGHT_METRICS"
DEADLETTER_STREAM: Final = "PREFLIGHT_DEADLETTER"

ROUTES_BUCKET: Final = "preflight_routes"
ROLLOUTS_BUCKET: Final = "preflight_rollouts"
NOTICES_BUCKET: Final = "preflight_notices"
LEASES_BUCKET: Final = "preflight_leases"  # which controller replica is active
ROUTER_STATUS_BUCKET: Final = "preflight_router_status"  # what each built-in router serves

# The user token of commands sent over a bus without authentication.
ANONYMOUS_USER: Final = "anonymous"

StageName = Literal["requested", "validated", "benchmarked", "canary_step", "canary_analysed"]
OutcomeName = Literal["blocked", "degraded", "promoted", "rolled_back", "held", "failed"]
CommandName = Literal["promote", "abort", "pause", "resume"]

STAGE_SUBJECTS: Final = f"{PREFIX}.stage.>"
OUTCOME_SUBJECTS: Final = f"{PREFIX}.outcome.>"
COMMAND_SUBJECTS: Final = f"{PREFIX}.command.>"
METRICS_SUBJECTS: Final = f"{PREFIX}.metrics.>"
DEADLETTER_SUBJECTS: Final = f"{PREFIX}.deadletter.>"

# Durable consumer per service; every instance of one service shares it (a work queue).
VALIDATOR_DURABLE: Final = "validator"
BENCHMARKER_DURABLE: Final = "benchmarker"
CONTROLLER_DURABLE: Final = "canary-controller"
CONTROLLER_COMMANDS_DURABLE: Final = "canary-controller-commands"
NOTIFIER_DURABLE: Final = "notifier"
INGEST_DURABLE: Final = "metrics-ingest"


def model_token(model: str) -> str:
    """The subject token of a model name (lossless: names never contain `%`)."""
    if not model or any(c in model for c in " \t\r\n*>%"):
        raise ValueError(f"model name {model!r} cannot be used in a subject")
    return model.replace(".", "%2E")


def model_from_token(token: str) -> str:
    return token.replace("%2E", ".")


def stage(model: str, deployment_id: str, name: StageName) -> str:
    return f"{PREFIX}.stage.{model_token(model)}.{deployment_id}.{name}"


def outcome(model: str, deployment_id: str, name: OutcomeName) -> str:
    return f"{PREFIX}.outcome.{model_token(model)}.{deployment_id}.{name}"


def user_token(user: str | None) -> str:
    """The subject token of a NATS user name (`.` as `%2E`, as for models)."""
    if not user:
        return ANONYMOUS_USER
    if any(c in user for c in " \t\r\n*>%"):
        raise ValueError(f"NATS user {user!r} cannot be used in a subject")
    return user.replace(".", "%2E")


def command(model: str, deployment_id: str, name: CommandName, user: str | None) -> str:
    return f"{PREFIX}.command.{model_token(model)}.{deployment_id}.{name}.{user_token(user)}"


def command_sender(subject: str) -> str | None:
    """The NATS user a command subject names (its sixth token), or None if it is not one."""
    tokens = subject.split(".")
    if len(tokens) != 6 or tokens[:2] != [PREFIX, "command"]:
        return None
    return tokens[5].replace("%2E", ".")


def model_outcomes(model: str) -> str:
    """Wildcard for every outcome of one model."""
    return f"{PREFIX}.outcome.{model_token(model)}.>"


def deployment_events(deployment_id: str) -> str:
    """Wildcard for every event and command of one deployment."""
    return f"{PREFIX}.*.*.{deployment_id}.>"


def model_deployment_events(model: str, deployment_id: str) -> str:
    """Every event and command of one deployment of one model: another model's events under
    the same id (anyone may pick any id) are not this deployment's."""
    return f"{PREFIX}.*.{model_token(model)}.{deployment_id}.>"


def request_of(deployment_id: str) -> str:
    """The one `requested` event of a deployment, whatever its model."""
    return f"{PREFIX}.stage.*.{deployment_id}.requested"


def model_events(model: str) -> str:
    return f"{PREFIX}.*.{model_token(model)}.*.>"


def stage_filter(name: StageName) -> str:
    """Wildcard a stage's consumer filters on, e.g. every `requested` event."""
    return f"{PREFIX}.stage.*.*.{name}"


def metrics(source: str) -> str:
    return f"{PREFIX}.metrics.{source.replace('.', '_')}"


def deadletter(service: str) -> str:
    return f"{PREFIX}.deadletter.{service}"


def message_id(deployment_id: str, event: str, step: int | str | None = None) -> str:
    """JetStream `Nats-Msg-Id`: a republish or redelivered handler publishes the same id."""
    return f"{deployment_id}:{event}" if step is None else f"{deployment_id}:{event}:{step}"
