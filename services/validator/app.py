"""validator service: DeploymentRequested -> ValidationCompleted (+ DeploymentBlocked)."""

from __future__ import annotations

import asyncio

from services.contracts import subjects
from services.contracts.events import DeploymentRequested, Event, StageReport
from services.contracts.policy import Policy, PolicyError, PolicyFile
from services.runtime import bus, pipeline
from services.runtime.service import Rejected, ServiceApp, build_service
from services.runtime.settings import Settings
from services.storage.locations import outside_roots, remote_not_allowed
from services.validator.checks.checksum import DigestCache, digest_cache_path
from services.validator.validate import validate

NAME = "validator"


def run_checks(
    request: DeploymentRequested,
    policy: Policy,
    instance: str,
    cache: DigestCache | None = None,
) -> StageReport:
    """The validation stage: every enabled check over the request's files."""
    return validate(
        request.location,
        policy=policy.validation,
        expected_sha256=request.expected_sha256,
        target=request.target,
        digest_cache=cache,
        service=instance,
    )


def handle_requested(
    request: DeploymentRequested,
    policy_file: PolicyFile,
    instance: str,
    cache: DigestCache | None = None,
    model_roots: str | None = None,
    remote_prefixes: str | None = None,
) -> list[Event]:
    try:
        policy = pipeline.resolve_policy(policy_file, request)
        policy.model_class(request.model_class)  # an unknown class: said now, not as degraded
    except PolicyError as exc:
        return pipeline.after_validation(request, pipeline.policy_refusal(exc, instance))
    locations = [request.location, *([request.stable.location] if request.stable else [])]
    for location in locations:
        outside = outside_roots(location, model_roots) or remote_not_allowed(
            location, remote_prefixes
        )
        if outside is not None:
            refused = pipeline.refusal("location", outside, instance)
            return pipeline.after_validation(request, refused)
    return pipeline.after_validation(request, run_checks(request, policy, instance, cache))


async def refuse_a_taken_id(svc: ServiceApp, request: DeploymentRequested) -> None:
    """Only the first request under a deployment id is validated: another one (any model, any
    message id) is dead-lettered, so a request that took the id CI was about to use cannot make
    CI's request wait behind it and `deploy --wait` show the other one's outcome."""
    connection = getattr(svc.broker, "_connection", None)
    if connection is None:  # FastStream's in-memory broker: no stream to read
        return
    first = await bus.first_request(connection.jetstream(), request.deployment_id)
    if first is not None and first != request:
        raise Rejected(
            f"deployment id {request.deployment_id} was first requested for {first.model} "
            f"{first.version} from {first.location[:200]}: a later request under it is not "
            "validated (choose a fresh id)"
        )


def build(settings: Settings) -> ServiceApp:
    svc = build_service(NAME, settings)
    cache = DigestCache(digest_cache_path(settings.data_dir))

    @svc.consume(subjects.VALIDATOR_DURABLE, DeploymentRequested)
    async def on_requested(request: DeploymentRequested) -> None:
        await refuse_a_taken_id(svc, request)
        # Checks read files and hash: off the event loop, so acks and heartbeats keep flowing.
        events = await asyncio.to_thread(
            handle_requested,
            request,
            svc.policy_file,
            settings.instance,
            cache,
            settings.model_roots,
            settings.remote_location_prefixes,
        )
        for event in events:
            await svc.sink.publish_event(event)

    svc.app.after_shutdown(cache.close)
    return svc
