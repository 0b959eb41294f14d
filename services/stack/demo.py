"""`make demo`: the embedded stack and a real deployment of a generated model, end to end."""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from rich.console import Console

from services.contracts import subjects
from services.contracts.events import (
    CanaryAnalysed,
    DeploymentEvent,
    DeploymentPromoted,
    DeploymentRequested,
    ModelRef,
    Requester,
    new_deployment_id,
)
from services.runtime import bus, nats_users, processes
from services.runtime.settings import Settings
from services.stack import render
from services.stack.samples import MANIFEST
from services.stack.supervisor import LOCK_FILE, Stack, StackError, free_port, read_stack_file

MODEL = "sample-gpt"
# Where `preflight demo` keeps its state unless --data-dir says otherwise (relative to the
# working directory, as the CLI passes it).
DEFAULT_DATA_DIR = Path(".preflight") / "demo"
ENVOY_DATA_DIR = Path(".preflight") / "demo-envoy"  # `preflight demo --data-plane envoy`
# Written into a data directory the demo has made its own; the next run may clear it.
OWNER_FILE = ".preflight-demo"


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
                if isinstance(event, CanaryAnalysed) and not _worth_showing(event, seen):
                    continue
                console.print("  " + render.describe(event), highlight=False)
                if isinstance(event, render.TERMINAL):
                    return

        await asyncio.wait_for(follow(), timeout)
    finally:
        await nc.close()
    return seen


def _worth_showing(event: CanaryAnalysed, seen: list[DeploymentEvent]) -> bool:
    """Analyses come every second: show a verdict when it changes, and every fifth one."""
    earlier = [e for e in seen[:-1] if isinstance(e, CanaryAnalysed)]
    if not earlier or earlier[-1].verdict != event.verdict:
        return True
    return len(earlier) % 5 == 0


def claim_data_dir(data_dir: Path) -> None:
    """Make ``data_dir`` the demo's own and empty, so every run starts as the first did.

    State a run leaves (the routes of ``sample-gpt`` to that run's inference servers, rollouts,
    request metrics) would turn the next run's first version into a canary with no traffic.
    Cleared: the default demo directory, one this demo marked as its own, or an empty one. Any
    other directory is refused, never cleared, and so is one a running stack holds.
    """
    if data_dir.exists() and not data_dir.is_dir():
        raise StackError(f"{data_dir} is not a directory; pass a new or empty --data-dir")
    data_dir.mkdir(parents=True, exist_ok=True)
    entries = [e for e in os.scandir(data_dir) if e.name != LOCK_FILE]
    owned = (
        data_dir.resolve() in (DEFAULT_DATA_DIR.resolve(), ENVOY_DATA_DIR.resolve())
        or (data_dir / OWNER_FILE).is_file()
        or not entries
    )
    if not owned:
        raise StackError(
            f"{data_dir} holds files the demo did not write, and the demo clears its data "
            f"directory at every start; pass a new or empty --data-dir (default: "
            f"{DEFAULT_DATA_DIR})"
        )
    # The stack's own lock, held while clearing: a stack running here keeps it.
    with (data_dir / LOCK_FILE).open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = (read_stack_file(data_dir) or {}).get("pid", "?")
            raise StackError(
                f"a stack (pid {pid}) is running on {data_dir}; stop it first or pass another "
                "--data-dir"
            ) from None
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        (data_dir / OWNER_FILE).write_text(
            "Written by `preflight demo`: this directory is the demo's own, and every demo run\n"
            "clears it before it starts.\n"
        )


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
DEMO_RPS = 60.0
STREAMED_BODY: Final = {"prompt": "hello", "max_tokens": 8, "stream": True}


@dataclass(frozen=True)
class Scenario:
    version: str
    what: str
    expected: str
    error_rate: float = 0.0  # of its inference server, under real traffic
    serves: bool = True
    ttft_delay_ms: float = 0.0  # its first streamed token this much later, same total latency


# Each deployment the demo sends, in order; each replaces the version promoted before it.
SCENARIOS = (
    Scenario("v1", "the first version: nothing to compare a canary with", "promoted"),
    Scenario("v2", "retrained with another seed: healthy", "promoted"),
    Scenario("v3", "undertrained: perplexity regression", "promoted (degraded)"),
    Scenario(
        "v4",
        "one bit flipped after its manifest was written: a corrupted upload",
        "blocked",
        serves=False,
    ),
    Scenario("v5", "fine on the bench, fails under real traffic (20% errors)", "rolled back", 0.20),
    Scenario(
        "v6",
        "streams its first token 120 ms later, same total latency (a slower prefill)",
        "rolled back",
        ttft_delay_ms=120.0,
    ),
)
# Envoy's access logs carry no time to first token (docs/data-planes/envoy.md): the TTFT story
# is told through the built-in router only.
ENVOY_SKIPS: Final = frozenset({"v6"})
TOKEN_INTERVAL_MS: Final = 20.0  # between streamed tokens, every version


class InferenceServers:
    """One synthetic inference server per version, as a platform's serving layer would run."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, version: str, error_rate: float, ttft_delay_ms: float = 0.0) -> str:
        log = self.logs / f"inference-{version}.log"
        log.unlink(missing_ok=True)
        argv = [
            sys.executable, "-m", "services.inference_server.app", "--port", "0", "--synthetic",
            "--latency-ms", "25", "--latency-jitter", "0.3", "--error-rate", str(error_rate),
            "--token-interval-ms", str(TOKEN_INTERVAL_MS), "--ttft-delay-ms", str(ttft_delay_ms),
            "--version", version, "--model-name", MODEL,
        ]  # fmt: skip
        proc = processes.spawn(argv, log=log)
        self.procs.append(proc)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for line in log.read_text(errors="replace").splitlines() if log.exists() else ():
                if line.startswith("listening on "):
                    return line.removeprefix("listening on ").strip()
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        raise StackError(f"inference server {version} did not start; see {log}")

    def stop(self) -> None:
        for proc in self.procs:
            processes.terminate(proc, timeout=5)


class Traffic:
    """Users: a steady stream of completions through the router, in a thread of its own."""

    def __init__(self, router_url: str, rps: float) -> None:
        self.url = f"{router_url}/v1/completions"
        self.rps = rps
        self.stop_flag = threading.Event()
        self.sent = 0
        self.by_status: Counter[int] = Counter()
        self.thread = threading.Thread(target=self._run, name="demo-traffic", daemon=True)
        self.started = False

    def start(self) -> None:
        self.started = True
        self.thread.start()

    def _run(self) -> None:
        from services.inference_server.load import generate_load

        while not self.stop_flag.is_set():
            result = asyncio.run(
                generate_load(
                    self.url,
                    self.rps,
                    2.0,
                    headers={"X-Preflight-Model": MODEL},
                    body=STREAMED_BODY,  # users watch tokens arrive: TTFT is measured
                )
            )
            self.sent += result.sent
            self.by_status.update(result.by_status)

    def stop(self) -> None:
        self.stop_flag.set()
        if self.started:
            self.thread.join(timeout=10)


DEMO_BUCKET = "preflight-demo"
DEMO_S3_CREDENTIALS = {  # moto's: any key works, and none of these is a secret
    "AWS_ACCESS_KEY_ID": "AKIAPREFLIGHTDEMO000",
    "AWS_SECRET_ACCESS_KEY": "preflight-demo-not-a-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _listening(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class DemoS3:
    """A local S3 API (moto's standalone server, a dev dependency) holding v1, so the demo
    deploys one version from s3:// as teams keep them: validated by range reads, benchmarked
    from the model cache. The services reach it through the standard AWS variables."""

    def __init__(self, logs: Path) -> None:
        self.port = free_port("127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**DEMO_S3_CREDENTIALS, "AWS_ENDPOINT_URL": self.url}
        logs.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=(logs / "moto-s3.log").open("wb"),
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
        )
        deadline = time.monotonic() + 30
        while not _listening(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise StackError(f"the demo's S3 server did not start (see {logs}/moto-s3.log)")
            time.sleep(0.05)

    @staticmethod
    def available() -> bool:
        import importlib.util

        return importlib.util.find_spec("moto") is not None

    def upload(self, directory: Path, prefix: str) -> str:
        """Every file under `directory` as objects with a SHA256 checksum; the location."""
        import boto3

        from services.storage.s3 import upload_directory

        client = boto3.session.Session().client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name=self.env["AWS_DEFAULT_REGION"],
        )
        client.create_bucket(Bucket=DEMO_BUCKET)
        upload_directory(client, DEMO_BUCKET, prefix, directory)
        return f"s3://{DEMO_BUCKET}/{prefix}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def run_demo(settings: Settings, console: Console, timeout: float = 600.0) -> int:
    """Returns the exit status: 0 when every deployment reached its expected outcome."""
    from services.benchmarker.samples import write_trained_model

    started = time.monotonic()
    settings = settings.model_copy(update={"policy_file": settings.policy_file or DEMO_POLICY})
    through = "Envoy" if settings.data_plane == "envoy" else "the router"
    data_dir = settings.data_dir.resolve()
    models = data_dir / "models"
    console.rule(
        "[bold]preflight demo"
        + (
            " through a real Envoy (xDS files, access logs)"
            if settings.data_plane == "envoy"
            else ""
        )
    )
    try:
        claim_data_dir(data_dir)
    except (StackError, OSError) as exc:
        console.print(f"[red]demo failed:[/red] {exc}")
        return 1
    console.print(
        f"data: {data_dir} (the demo's own, cleared at every start: each run tells the same story)"
    )
    console.print(
        f"policy: {settings.policy_file} (TIME-COMPRESSED profile: canary 5% for 10 s, 50% for "
        "8 s, analysis every second; production runs 180 s and 120 s)"
    )
    console.print(f"1/4 generating sample models in {models} (trained on CPU once, then cached)")
    dirs = {
        "v1": write_trained_model(models / f"{MODEL}-v1", variant="good", seed=0),
        "v2": write_trained_model(models / f"{MODEL}-v2", variant="good", seed=1),
        "v3": write_trained_model(models / f"{MODEL}-v3", variant="regressed", seed=0),
        "v5": write_trained_model(models / f"{MODEL}-v5", variant="good", seed=1),
        "v6": write_trained_model(models / f"{MODEL}-v6", variant="good", seed=1),
    }
    dirs["v4"] = write_corrupted_upload(dirs["v2"], models / f"{MODEL}-v4")
    scenarios = [
        s for s in SCENARIOS if not (settings.data_plane == "envoy" and s.version in ENVOY_SKIPS)
    ]
    for scenario in scenarios:
        console.print(f"    {scenario.version}: {scenario.what}")
    if len(scenarios) < len(SCENARIOS):
        console.print(
            "    (v6's TTFT regression is not told through Envoy: its access logs carry no time to "
            "first token; the built-in router's story shows it)"
        )

    s3: DemoS3 | None = None
    locations = {version: str(path) for version, path in dirs.items()}
    if DemoS3.available():
        try:
            s3 = DemoS3(data_dir / "logs")
            locations["v1"] = s3.upload(dirs["v1"], f"{MODEL}/v1/")
        except Exception as exc:  # boto3's errors, or the server's start
            if s3 is not None:
                s3.stop()
            console.print(f"[red]demo failed:[/red] the demo's S3 server: {exc}")
            return 1
        # The services read S3 credentials and endpoint where every AWS tool does: the
        # supervisor hands its environment to them. The fetched models go in the data dir.
        os.environ.update(s3.env)
        os.environ.pop("AWS_PROFILE", None)
        settings = settings.model_copy(update={"model_cache_dir": data_dir / "model-cache"})
        console.print(
            f"    v1 is uploaded to a local S3 API (moto, {s3.url}) and deployed as "
            f"{locations['v1']}: validated by range reads (this small model is read whole), "
            "benchmarked from the model cache"
        )
    else:
        console.print("    (moto is not installed: every version is read from local disk)")

    console.print("2/4 starting the embedded stack")
    stack = Stack(settings, say=lambda line: console.print("  " + line, highlight=False))
    servers = InferenceServers(data_dir / "logs")
    traffic: Traffic | None = None
    events: list[DeploymentEvent] = []
    previous: ModelRef | None = None
    try:
        stack.start()
        stack.wait_ready()
        assert stack.nats is not None
        # The demo requests deployments and follows them as a person would: the `client` user,
        # with the password the stack generated for this data directory.
        client_settings = stack.settings_as(nats_users.CLIENT)
        traffic = Traffic(stack.router_url, DEMO_RPS)
        for scenario in scenarios:
            version = scenario.version
            endpoint = (
                servers.start(version, scenario.error_rate, scenario.ttft_delay_ms)
                if scenario.serves
                else None
            )
            request = DeploymentRequested(
                deployment_id=new_deployment_id(),
                model=MODEL,
                version=version,
                location=locations[version],
                endpoint=endpoint,
                expected_sha256=_expected_digests(dirs[version]),
                stable=previous,
                requested_by=Requester(user="demo", system="make demo"),
            )
            replacing = f" (replacing {previous.version})" if previous else ""
            console.print(
                f"3/4 deploying {MODEL} {version}{replacing} as {request.deployment_id}, "
                f"expected: {scenario.expected}"
            )
            seen = asyncio.run(_deploy_and_follow(client_settings, request, console, timeout))
            events += seen
            if any(isinstance(e, DeploymentPromoted) for e in seen):
                previous = ModelRef(
                    name=MODEL, version=version, location=locations[version], endpoint=endpoint
                )
            if previous is not None and not traffic.started:
                console.print(
                    f"    users: {DEMO_RPS:g} requests/s to {MODEL} through {through} at "
                    f"{stack.router_url} (rollout pages: {stack.page_url}/rollouts)"
                    + (
                        "; the canary's numbers come from Envoy's own access logs"
                        if settings.data_plane == "envoy"
                        else ""
                    )
                )
                traffic.start()
            stack.check_children()
    except (StackError, bus.BusUnavailable, TimeoutError) as exc:
        console.print(f"[red]demo failed:[/red] {exc or type(exc).__name__}")
        console.print(f"    logs: {data_dir / 'logs'}")
        return 1
    finally:
        if traffic is not None:
            traffic.stop()
        console.print("4/4 stopping the stack and the inference servers")
        servers.stop()
        stack.stop()
        if s3 is not None:
            s3.stop()

    summaries = list(render.summarise(events).values())
    console.print(render.summary_table(summaries, title="demo outcome"))
    for summary in summaries:
        if summary.numbers:
            console.print(
                f"  {summary.version} {summary.outcome}, last window: {summary.numbers}",
                highlight=False,
            )
    if traffic is not None:
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(traffic.by_status.items()))
        console.print(f"user traffic: {traffic.sent} requests through {through} ({statuses})")
    console.print(
        f"done in {time.monotonic() - started:.1f} s; stack stopped, nothing left running"
    )
    outcomes = [s.outcome + (" (degraded)" if s.degraded else "") for s in summaries]
    if outcomes != [s.expected for s in scenarios]:
        console.print(f"[red]unexpected outcomes:[/red] {outcomes}")
        return 1
    return 0
