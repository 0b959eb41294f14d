"""Generate schemas/: one JSON Schema per message and an AsyncAPI 3 document of the bus."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic.json_schema import models_json_schema

from services import __version__
from services.contracts import subjects
from services.contracts.events import ALL_MESSAGES, SCHEMA_VERSION, Message

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
ASYNCAPI_FILE = "asyncapi.yaml"

# channel id -> (address, message names, description)
_CHANNELS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    (
        "deploymentRequested",
        "preflight.stage.{model}.{deployment_id}.requested",
        ("DeploymentRequested",),
        "Ask for a model version to go through the pipeline. Publish here to deploy.",
    ),
    (
        "validationCompleted",
        "preflight.stage.{model}.{deployment_id}.validated",
        ("ValidationCompleted",),
        "The validator's report.",
    ),
    (
        "benchmarkCompleted",
        "preflight.stage.{model}.{deployment_id}.benchmarked",
        ("BenchmarkCompleted",),
        "The benchmarker's report.",
    ),
    (
        "canaryStepStarted",
        "preflight.stage.{model}.{deployment_id}.canary_step",
        ("CanaryStepStarted",),
        "Traffic moved to a new canary weight.",
    ),
    (
        "canaryAnalysed",
        "preflight.stage.{model}.{deployment_id}.canary_analysed",
        ("CanaryAnalysed",),
        "One analysis of canary against stable.",
    ),
    (
        "outcomes",
        "preflight.outcome.{model}.{deployment_id}.{outcome}",
        (
            "DeploymentBlocked",
            "DeploymentDegraded",
            "DeploymentPromoted",
            "DeploymentRolledBack",
            "DeploymentHeld",
            "DeploymentFailed",
        ),
        "Outcomes. Subscribe to `preflight.outcome.>` for all, `preflight.outcome.{model}.>` "
        "for one model. {outcome} is one of blocked, degraded, promoted, rolled_back, held "
        "(needs a person; not final), failed.",
    ),
    (
        "commands",
        "preflight.command.{model}.{deployment_id}.{command}",
        ("PromoteDeployment", "AbortDeployment", "PauseDeployment", "ResumeDeployment"),
        "Manual control of a running rollout. {command} is promote, abort, pause or resume.",
    ),
    (
        "requestMetrics",
        "preflight.metrics.{source}",
        ("RequestMetricsBatch",),
        "Request-metric batches from any inference gateway.",
    ),
    (
        "deadLetters",
        "preflight.deadletter.{service}",
        ("DeadLetter",),
        "Messages a service could not take, with the original payload and the reason.",
    ),
)

_PARAMETERS = {
    "model": "Model name with every `.` written `%2E`, e.g. `org/chat-7b%2Ev2`.",
    "deployment_id": "Deployment id, `[A-Za-z0-9][A-Za-z0-9_-]{2,63}`.",
    "outcome": "blocked | degraded | promoted | rolled_back | held | failed",
    "command": "promote | abort | pause | resume",
    "source": "Gateway instance name (dots replaced by `_`).",
    "service": "Name of the service that dead-lettered the message.",
}


def message_schema(model: type[Message]) -> dict[str, Any]:
    schema = model.model_json_schema(mode="validation")
    return {
        "$schema": SCHEMA_DIALECT,
        "$id": f"urn:preflight:schema:v{SCHEMA_VERSION}:{model.__name__}",
        **schema,
    }


def asyncapi_document() -> dict[str, Any]:
    _, combined = models_json_schema(
        [(m, "validation") for m in ALL_MESSAGES],
        ref_template="#/components/schemas/{model}",
    )
    component_schemas = combined.get("$defs", {})
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for channel_id, address, names, description in _CHANNELS:
        params = [p for p in _PARAMETERS if "{" + p + "}" in address]
        channels[channel_id] = {
            "address": address,
            "description": description,
            "parameters": {p: {"description": _PARAMETERS[p]} for p in params},
            "messages": {name: {"$ref": f"#/components/messages/{name}"} for name in names},
        }
        operations[f"publish_{channel_id}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{channel_id}"},
        }
        operations[f"receive_{channel_id}"] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{channel_id}"},
        }
    messages = {
        m.__name__: {
            "name": m.__name__,
            "title": m.__name__,
            "summary": (m.__doc__ or "").strip().splitlines()[0],
            "contentType": "application/json",
            "payload": {"$ref": f"#/components/schemas/{m.__name__}"},
            "headers": {
                "type": "object",
                "properties": {
                    "Nats-Msg-Id": {
                        "type": "string",
                        "description": (
                            "JetStream dedup id: `{deployment_id}:{event}` or "
                            "`{deployment_id}:{event}:{step}`; commands add a nonce."
                        ),
                    }
                },
            },
        }
        for m in ALL_MESSAGES
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "preflight deployment bus",
            "version": __version__,
            "description": (
                "Events, outcomes and commands of the preflight pipeline on NATS JetStream. "
                f"Stream `{subjects.EVENTS_STREAM}` holds stage, outcome and command subjects "
                f"(file storage, dedup window); `{subjects.METRICS_STREAM}` request metrics; "
                f"`{subjects.DEADLETTER_STREAM}` dead letters. KV buckets: "
                f"`{subjects.ROUTES_BUCKET}` (key: model name, value: Route), "
                f"`{subjects.ROLLOUTS_BUCKET}` (rollout state), "
                f"`{subjects.ROUTER_STATUS_BUCKET}` (key: router instance, value: RouterReport)."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "embedded": {
                "host": "127.0.0.1:4222",
                "protocol": "nats",
                "description": "`preflight up` prints the actual port.",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": component_schemas},
    }


def render() -> dict[str, str]:
    """File name -> content of everything in schemas/."""
    files = {
        f"{m.__name__}.json": json.dumps(message_schema(m), indent=2, sort_keys=True) + "\n"
        for m in ALL_MESSAGES
    }
    files[ASYNCAPI_FILE] = yaml.safe_dump(asyncapi_document(), sort_keys=False, width=100)
    return files


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in render().items():
        path = directory / name
        path.write_text(content, encoding="utf-8")
        written.append(path)
    return written


def stale(directory: Path) -> list[str]:
    """Names of files in `directory` that differ from what the contracts generate."""
    expected = render()
    problems = []
    for name, content in expected.items():
        path = directory / name
        if not path.exists():
            problems.append(f"{name}: missing")
        elif path.read_text(encoding="utf-8") != content:
            problems.append(f"{name}: differs from the contracts")
    known = set(expected)
    for path in sorted(directory.glob("*")):
        if path.is_file() and path.name not in known and path.name != "README.md":
            problems.append(f"{path.name}: not generated by the contracts (remove it)")
    return problems


# ---- the event reference (docs/events.md), generated from the same models ---------------------

EVENT_REFERENCE = Path("docs") / "events.md"


def _type_of(prop: dict[str, Any] | bool) -> str:
    if not isinstance(prop, dict):
        return "any"
    if "$ref" in prop:
        return str(prop["$ref"]).rsplit("/", 1)[1]
    if "const" in prop:
        return f"`{prop['const']}`"
    if "enum" in prop:
        return " \\| ".join(f"`{v}`" for v in prop["enum"])
    if "anyOf" in prop:
        return " or ".join(_type_of(p) for p in prop["anyOf"])
    kind = prop.get("type", "any")
    if kind == "array":
        items = prop.get("items") or (prop.get("prefixItems") or [{}])[0]
        return f"list of {_type_of(items)}"
    if kind == "object" and "additionalProperties" in prop:
        return f"map to {_type_of(prop['additionalProperties'])}"
    return str(kind) + (f" ({prop['format']})" if "format" in prop else "")


def _subject_of(name: str) -> str:
    for _, address, names, _description in _CHANNELS:
        if name in names:
            return address
    if name == "Route":
        return f"KV `{subjects.ROUTES_BUCKET}`, key: model name"
    if name == "RouterReport":
        return f"KV `{subjects.ROUTER_STATUS_BUCKET}`, key: router instance"
    return "-"


def event_reference() -> str:
    """docs/events.md: every message, where it travels, and its fields (generated)."""
    lines = [
        "# Event reference",
        "",
        "Generated from `services/contracts/events.py` by `preflight schemas`; do not edit.",
        "JSON Schema per message: `schemas/<Name>.json`; the AsyncAPI document:",
        "`schemas/asyncapi.yaml`. Every message is JSON with `schema_version` and, except",
        "records and routes, a `type` naming it. Unknown fields are rejected.",
        "",
    ]
    shared: dict[str, dict[str, Any]] = {}
    for model in ALL_MESSAGES:
        schema = model.model_json_schema(mode="validation")
        shared.update(schema.get("$defs", {}))
        doc = " ".join((model.__doc__ or "").split())
        lines += [f"## {model.__name__}", "", doc, "", f"Subject: `{_subject_of(model.__name__)}`"]
        lines += _field_table(schema)
    lines += ["# Shared types", ""]
    for name in sorted(set(shared) - {m.__name__ for m in ALL_MESSAGES}):
        schema = shared[name]
        doc = " ".join(str(schema.get("description", "")).split())
        lines += [f"## {name}", "", doc]
        lines += (
            _field_table(schema) if "properties" in schema else [f"Type: {_type_of(schema)}", ""]
        )
    return "\n".join(lines)


def _field_table(schema: dict[str, Any]) -> list[str]:
    lines = ["", "| field | type | required | description |", "|---|---|---|---|"]
    required = set(schema.get("required", []))
    for field_name, prop in schema.get("properties", {}).items():
        desc = " ".join(str(prop.get("description", "")).split()).replace("|", "\\|")
        if "default" in prop and field_name not in required:
            desc = (desc + f" Default `{json.dumps(prop['default'])}`.").strip()
        yes = "yes" if field_name in required else ""
        lines.append(f"| `{field_name}` | {_type_of(prop)} | {yes} | {desc} |")
    lines.append("")
    return lines


def write_reference(path: Path = EVENT_REFERENCE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(event_reference(), encoding="utf-8")
    return path


def reference_stale(path: Path = EVENT_REFERENCE) -> bool:
    return not path.exists() or path.read_text(encoding="utf-8") != event_reference()


# ---- the policy reference (docs/policy.md), generated from the policy models -------------------

POLICY_REFERENCE = Path("docs") / "policy.md"


def _policy_rows(schema: dict[str, Any], defs: dict[str, Any], prefix: str) -> list[str]:
    rows: list[str] = []
    for name, prop in schema.get("properties", {}).items():
        key = f"{prefix}{name}"
        target = prop
        if "$ref" in prop:
            target = defs[str(prop["$ref"]).rsplit("/", 1)[1]]
        if target.get("type") == "object" and "properties" in target:
            rows += _policy_rows(target, defs, key + ".")
            continue
        desc = " ".join(str(prop.get("description", "")).split()).replace("|", "\\|")
        default = json.dumps(prop["default"]) if "default" in prop else ""
        rows.append(f"| `{key}` | {_type_of(prop)} | `{default}` | {desc} |")
    return rows


def policy_reference() -> str:
    """docs/policy.md: every policy key, its type, default and meaning (generated)."""
    from services.contracts.policy import (
        REQUEST_DENIED,
        REQUEST_MAX,
        REQUEST_MIN,
        Policy,
        RequestLimits,
    )

    schema = Policy.model_json_schema(mode="serialization")
    defs = schema.get("$defs", {})
    lines = [
        "# Policy reference",
        "",
        "Generated from `services/contracts/policy.py` by `preflight schemas`; do not edit.",
        "",
        "A policy file (`PREFLIGHT_POLICY_FILE`) has three sections, each a partial policy:",
        "`defaults`, `teams.<team>` (the request's `requested_by.team`) and `models.<model>`.",
        "A deployment's `policy_overrides` is the last layer. Later layers win key by key;",
        "lists (canary steps) are replaced whole. Unknown keys are errors naming the file and",
        "the key, so a typo never switches a check off silently. The built-in file, with",
        "comments: `services/contracts/default_policy.yaml`.",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    lines += _policy_rows(schema, defs, "")
    lines += [
        "",
        "`model_classes` maps a class name (the request's `model_class`) to latency thresholds",
        "for the benchmarker and, optionally, canary thresholds that replace",
        "`canary.thresholds` for that class. Built in: `default`, `small`, `large`.",
        "",
        "## What a request may override",
        "",
        "A fourth section, `request_overrides`, says what a deployment's own `policy_overrides`",
        "may set; the file's layers are not held to it. A request that breaks it is blocked",
        "at validation, naming the key and the limit. It is checked even when the file has no",
        "such section: the built-in limits below apply.",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    limits = RequestLimits.model_json_schema(mode="serialization")
    lines += _policy_rows(limits, limits.get("$defs", {}), "request_overrides.")
    lines += ["", "Built-in denials: " + ", ".join(f"`{k}`" for k in REQUEST_DENIED) + "."]
    lines += ["", "| key | built-in ceiling | built-in floor |", "|---|---|---|"]
    for key in sorted({*REQUEST_MAX, *REQUEST_MIN}):
        high, low = REQUEST_MAX.get(key), REQUEST_MIN.get(key)
        lines.append(f"| `{key}` | {'' if high is None else f'{high:g}'} | "
                     f"{'' if low is None else f'{low:g}'} |")  # fmt: skip
    lines.append("")
    return "\n".join(lines)


def write_policy_reference(path: Path = POLICY_REFERENCE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(policy_reference(), encoding="utf-8")
    return path


def policy_reference_stale(path: Path = POLICY_REFERENCE) -> bool:
    return not path.exists() or path.read_text(encoding="utf-8") != policy_reference()
