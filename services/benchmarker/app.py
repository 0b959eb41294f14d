"""benchmarker service: ValidationCompleted -> BenchmarkCompleted (+ Degraded / Blocked)."""

from __future__ import annotations

import asyncio
import logging

from services.benchmarker.isolated import Job, Run, Runner, job_settings, limits, run_in_process
from services.contracts import subjects
from services.contracts.events import Event, ValidationCompleted
from services.contracts.policy import PolicyError, PolicyFile
from services.runtime import pipeline
from services.runtime.service import ServiceApp, build_service
from services.runtime.settings import Settings
from services.storage.cache import ModelCache, format_bytes

NAME = "benchmarker"
log = logging.getLogger("preflight.benchmarker")


def handle_validated(
    validated: ValidationCompleted,
    policy_file: PolicyFile,
    instance: str,
    run: Run = run_in_process,
    settings: Settings | None = None,
) -> list[Event]:
    """The benchmark of one validated deployment; `run` runs it (the service: a Runner's child
    process; tests of the flow: this process), with state and limits from `settings`."""
    if not pipeline.should_benchmark(validated):
        return []  # the validator already published DeploymentBlocked
    request = validated.request
    try:
        policy = pipeline.resolve_policy(policy_file, request)
    except PolicyError as exc:
        return [pipeline.policy_failure(request, "benchmark", exc)]
    job = Job.of(
        request.location,
        request.stable.location if request.stable else None,
        policy,
        model_class=request.model_class,
        service=instance,
        **(job_settings(settings) if settings is not None else {}),
    )
    report, device = run(job)
    return pipeline.after_benchmark(validated, report, policy, device=device)


def build(settings: Settings) -> ServiceApp:
    svc = build_service(NAME, settings)
    # The host's cache of remote models (PREFLIGHT_MODEL_CACHE_DIR, _MAX_BYTES), and the
    # limits of the child process each benchmark runs in: said at start, not at a deployment.
    try:
        ModelCache.configured(settings.model_cache_dir, settings.model_cache_max_bytes)
        runner = Runner(limits(settings), keep_spare=True)
    except ValueError as exc:
        raise SystemExit(f"benchmarker: {exc}") from None
    log.info(
        "benchmarks run in a child process: memory limit %s, load limit %g s, time limit %g s",
        format_bytes(runner.limits.memory_bytes) if runner.limits.memory_bytes else "none",
        settings.benchmark_load_time_limit_s,
        settings.benchmark_time_limit_s,
    )
    longest = 2 * settings.benchmark_load_time_limit_s + (
        runner.limits.measuring_s(settings.benchmark_time_limit_s) or 0.0
    )
    if longest > settings.max_handler_s:
        log.warning(
            "a benchmark may run %.0f s (two loads and the measurements, at their limits), "
            "longer than PREFLIGHT_MAX_HANDLER_S (%.0f s): past that JetStream redelivers the "
            "deployment to another benchmarker while this one still works on it",
            longest,
            settings.max_handler_s,
        )

    async def stop_children() -> None:
        await asyncio.to_thread(runner.close)

    # The spare is started after the first deployment, not at start: a benchmarker that
    # never benchmarks (most of an embedded stack's life) does not spend seconds of CPU on one.
    svc.app.on_shutdown(stop_children)

    @svc.consume(subjects.BENCHMARKER_DURABLE, ValidationCompleted, one_at_a_time=True)
    async def on_validated(validated: ValidationCompleted) -> None:
        # Minutes of model work, in a child process, waited for off the event loop; the
        # consumer base keeps the message alive with in-progress acks and acks only at the
        # end, so a killed benchmarker's deployment is redelivered to another one.
        events = await asyncio.to_thread(
            handle_validated, validated, svc.policy_file, settings.instance, runner.run, settings
        )
        for event in events:
            await svc.sink.publish_event(event)

    return svc
