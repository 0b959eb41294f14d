"""benchmarker service: ValidationCompleted -> BenchmarkCompleted (+ Degraded / Blocked)."""

from __future__ import annotations

import asyncio

from services.benchmarker import loading
from services.benchmarker.run import ResultStore, run_benchmarks
from services.contracts import subjects
from services.contracts.events import Event, ValidationCompleted
from services.contracts.policy import PolicyError, PolicyFile
from services.runtime import pipeline
from services.runtime.service import ServiceApp, build_service
from services.runtime.settings import Settings
from services.storage.cache import ModelCache

NAME = "benchmarker"


def result_store(settings: Settings) -> ResultStore:
    """Stored baseline results; fingerprints reuse the digests the validator already computed."""
    from services.validator.checks.checksum import DigestCache, digest_cache_path

    digests = DigestCache(digest_cache_path(settings.data_dir))
    return ResultStore(settings.data_dir / "cache" / "perplexity.json", digests)


def handle_validated(
    validated: ValidationCompleted,
    policy_file: PolicyFile,
    instance: str,
    store: ResultStore | None = None,
    models: ModelCache | None = None,
    time_limit_s: float | None = None,
) -> list[Event]:
    if not pipeline.should_benchmark(validated):
        return []  # the validator already published DeploymentBlocked
    request = validated.request
    try:
        policy = pipeline.resolve_policy(policy_file, request)
    except PolicyError as exc:
        return [pipeline.policy_failure(request, "benchmark", exc)]
    report, device = run_benchmarks(
        request.location,
        request.stable.location if request.stable else None,
        policy,
        model_class=request.model_class,
        store=store,
        service=instance,
        model_cache=models,
        time_limit_s=time_limit_s,
    )
    return pipeline.after_benchmark(validated, report, policy, device=device)


def build(settings: Settings) -> ServiceApp:
    svc = build_service(NAME, settings)
    store = result_store(settings)
    # The host's cache of remote models (PREFLIGHT_MODEL_CACHE_DIR, _MAX_BYTES).
    try:
        models = ModelCache.configured(settings.model_cache_dir, settings.model_cache_max_bytes)
    except ValueError as exc:
        raise SystemExit(f"benchmarker: {exc}") from None
    if settings.torch_threads is not None and loading.torch_available():
        import torch

        torch.set_num_threads(settings.torch_threads)

    @svc.consume(subjects.BENCHMARKER_DURABLE, ValidationCompleted, one_at_a_time=True)
    async def on_validated(validated: ValidationCompleted) -> None:
        # Minutes of model work: off the event loop; the consumer base keeps the message alive
        # with in-progress acks and acks only at the end, so a killed benchmarker's deployment
        # is redelivered to another one.
        events = await asyncio.to_thread(
            handle_validated,
            validated,
            svc.policy_file,
            settings.instance,
            store,
            models,
            settings.benchmark_time_limit_s,
        )
        for event in events:
            await svc.sink.publish_event(event)

    return svc
