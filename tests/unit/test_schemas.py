"""schemas/ is generated from the contracts, committed, and usable without Python."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import yaml

from services.contracts import schema_export
from services.contracts.events import ALL_MESSAGES, DeploymentPromoted, DeploymentRequested

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


def test_schemas_directory_is_fresh() -> None:
    problems = schema_export.stale(SCHEMAS)
    assert problems == [], "run `preflight schemas` and commit schemas/: " + "; ".join(problems)


def test_every_message_has_a_schema_that_accepts_what_python_writes() -> None:
    samples = {
        "DeploymentRequested": DeploymentRequested(
            deployment_id="d-1", model="org/m.v2", version="1", location="s3://b/k"
        ),
        "DeploymentPromoted": DeploymentPromoted(deployment_id="d-1", model="m", version="1"),
    }
    for model in ALL_MESSAGES:
        schema = json.loads((SCHEMAS / f"{model.__name__}.json").read_text())
        jsonschema.Draft202012Validator.check_schema(schema)
        if model.__name__ in samples:
            instance = json.loads(samples[model.__name__].model_dump_json())
            jsonschema.validate(instance, schema)


def test_schemas_reject_what_the_contracts_reject() -> None:
    schema = json.loads((SCHEMAS / "DeploymentRequested.json").read_text())
    bad = {
        "deployment_id": "d-1",
        "model": "m",
        "version": "1",
        "location": "/x",
        "surprise": True,
    }
    validator = jsonschema.Draft202012Validator(schema)
    assert any("surprise" in e.message for e in validator.iter_errors(bad))


def test_asyncapi_names_every_message_and_the_outcome_wildcards() -> None:
    doc = yaml.safe_load((SCHEMAS / "asyncapi.yaml").read_text())
    assert doc["asyncapi"].startswith("3.")
    listed = {
        ref["$ref"].rsplit("/", 1)[1]
        for channel in doc["channels"].values()
        for ref in channel["messages"].values()
    }
    assert {m.__name__ for m in ALL_MESSAGES} - {"Route", "RouterReport"} <= listed  # KV values
    outcomes = doc["channels"]["outcomes"]
    assert outcomes["address"].startswith("preflight.outcome.")
    assert "preflight.outcome.>" in outcomes["description"]
    for name in listed:
        assert name in doc["components"]["schemas"]
