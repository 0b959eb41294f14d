"""`make demo`: the embedded stack and a real deployment of a generated model, end to end."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

from rich.console import Console

from services.contracts import subjects
from services.contracts.events import (
    DeploymentEvent,
    DeploymentPromoted,
    DeploymentRequested,
    ModelRef,
    Requester,
    new_deployment_id,
)
from services.runtime import bus
from services.runtime.settings import Settings
from services.stack import render
from services.stack.samples import MANIFEST
from services.stack.supervisor import Stack, StackError

MODEL = "sample-gpt"


def _expected_digests(model_dir: Path) -> dict[str, str]:
    import json

    digests: dict[str, str] = json.loads((model_dir / MANIFEST).read_text())
    return digests


async def _deploy_and_follow(
    settings: Settings, request: DeploymentRequested, console: Console, timeout: float
) -> list[DeploymentEvent]:
    nc = await bus.connect(settings, "preflight-demo")
    seen: list[DeploymentEvent] = []
    try:
        js = nc.jetstream()
        await bus.publish_event(js, request)

        async def follow() -> None:
            async for event in bus.follow(js, subjects.deployment_events(request.deployment_id)):
                seen.append(event)
                console.print("  " + render.describe(event), highlight=False)
                if isinstance(event, render.TERMINAL):
                    return

        await asyncio.wait_for(follow(), timeout)
    finally:
        await nc.close()
    return seen


def write_corrupted_upload(source: Path, directory: Path) -> Path:
    """A copy of a model whose weights changed after its manifest was written."""
    if directory.exists():
        shutil.rmtree(directory)
    shutil.copytree(source, directory)
    weights = directory / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-7] ^= 0x10
    weights.write_bytes(bytes(data))
    return directory


DEMO_POLICY = Path(__file__).with_name("demo_policy.yaml")

# (version, what it is, expected outcome) of each deployment the demo sends, in order.
SCENARIOS = (
    ("v2", "retrained with another seed: healthy", "promoted"),
    ("v3", "undertrained: perplexity regression", "promoted (degraded)"),
    ("v4", "one bit flipped after its manifest was written: a corrupted upload", "blocked"),
)


def run_demo(settings: Settings, console: Console, timeout: float = 600.0) -> int:
    """Returns the exit status: 0 when every deployment reached its expected outcome."""
    from services.benchmarker.samples import write_trained_model

    started = time.monotonic()
    settings = settings.model_copy(update={"policy_file": settings.policy_file or DEMO_POLICY})
    data_dir = settings.data_dir.resolve()
    models = data_dir / "models"
    console.rule("[bold]preflight demo")
    console.print(f"policy: {settings.policy_file} (time-compressed benchmark profile)")
    console.print(f"1/4 generating sample models in {models} (trained on CPU once, then cached)")
    stable_dir = write_trained_model(models / f"{MODEL}-v1", variant="good", seed=0)
    dirs = {
        "v2": write_trained_model(models / f"{MODEL}-v2", variant="good", seed=1),
        "v3": write_trained_model(models / f"{MODEL}-v3", variant="regressed", seed=0),
    }
    dirs["v4"] = write_corrupted_upload(dirs["v2"], models / f"{MODEL}-v4")
    for version, what, _ in SCENARIOS:
        console.print(f"    {version}: {what}")
    console.print(f"    v1: the stable version they replace ({stable_dir})")

    console.print("2/4 starting the embedded stack")
    stack = Stack(settings, say=lambda line: console.print("  " + line, highlight=False))
    events: list[DeploymentEvent] = []
    try:
        stack.start()
        stack.wait_ready()
        assert stack.nats is not None
        service_settings = settings.model_copy(update={"nats_url": stack.nats.url})
        for version, _, expected in SCENARIOS:
            request = DeploymentRequested(
                deployment_id=new_deployment_id(),
                model=MODEL,
                version=version,
                location=str(dirs[version]),
                expected_sha256=_expected_digests(dirs[version]),
                stable=ModelRef(name=MODEL, version="v1", location=str(stable_dir)),
                requested_by=Requester(user="demo", system="make demo"),
            )
            console.print(
                f"3/4 deploying {MODEL} {version} (replacing v1) as {request.deployment_id}, "
                f"expected: {expected}"
            )
            events += asyncio.run(_deploy_and_follow(service_settings, request, console, timeout))
            stack.check_children()
    except (StackError, bus.BusUnavailable, TimeoutError) as exc:
        console.print(f"[red]demo failed:[/red] {exc or type(exc).__name__}")
        console.print(f"    logs: {data_dir / 'logs'}")
        return 1
    finally:
        console.print("4/4 stopping the stack")
        stack.stop()

    summaries = list(render.summarise(events).values())
    console.print(render.summary_table(summaries, title="demo outcome"))
    not_built = sorted(
        {
            r.stage
            for e in events
            if isinstance(e, DeploymentPromoted)
            for r in e.stages
            if "not built" in r.reason
        }
    )
    if not_built:
        console.print(
            "[yellow]note:[/yellow] not built yet, so nothing was checked by: "
            + ", ".join(not_built)
        )
    console.print(
        f"done in {time.monotonic() - started:.1f} s; stack stopped, nothing left running"
    )
    outcomes = [s.outcome + (" (degraded)" if s.degraded else "") for s in summaries]
    if outcomes != [expected for _, _, expected in SCENARIOS]:
        console.print(f"[red]unexpected outcomes:[/red] {outcomes}")
        return 1
    return 0
