"""The whole embedded stack as a user runs it: `preflight up` in its own process.

The client here is plain nats-py plus the files in schemas/: what a system written in another
language would have.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import nats
import pytest
import yaml

from services.stack.cli import EXIT_HELD

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "schemas"
CLI = [sys.executable, "-m", "services.stack.cli"]


# A time-compressed benchmark so the suite stays fast on 2 cores; the defaults are measured in
# bench/ and docs/benchmarks.md.
FAST_BENCHMARK = {
    "benchmark": {
        "consistency_prompts": 5,
        "latency_runs": 3,
        "latency_warmup_runs": 1,
        "max_length": 128,
        "stride": 128,
    }
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from services.benchmarker.samples import write_trained_model

    return write_trained_model(tmp_path_factory.mktemp("trained") / "sample-gpt-v2")


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PREFLIGHT_")}


class RunningStack:
    def __init__(self, data_dir: Path, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.log = data_dir.parent / f"up-{time.monotonic_ns()}.log"
        self.proc = subprocess.Popen(
            [*CLI, "up", "--data-dir", str(data_dir)],
            env=clean_env() | (env or {}),  # the services read credentials from here
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.info = self._wait_ready()

    def _wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"preflight up exited: {self.log.read_text()}")
            if "ready" in self.log.read_text():
                info: dict[str, Any] = json.loads((self.data_dir / "stack.json").read_text())
                return info
            time.sleep(0.1)
        raise AssertionError(f"preflight up not ready: {self.log.read_text()}")

    @property
    def pids(self) -> list[int]:
        return [self.proc.pid, *self.info["services"].values(), nats_pid(self.data_dir)]

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)


def nats_pid(data_dir: Path) -> int:
    return int((data_dir / "nats" / "run" / "nats.pid").read_text())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def wait_gone(pids: list[int], timeout: float = 20.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[RunningStack]:
    running = RunningStack(tmp_path / "data")
    try:
        yield running
    finally:
        if running.proc.poll() is None:
            running.stop()


def subject_from(address: str, **params: str) -> str:
    for key, value in params.items():
        address = address.replace("{" + key + "}", value)
    assert "{" not in address, address
    return address


async def deploy_and_read_outcome(
    nats_url: str, deployment_id: str, location: Path, data_dir: Path
) -> dict[str, Any]:
    """As an outside system would: `client` requests, `subscriber` follows outcomes (the
    embedded stack's generated passwords, as docs/subscribing.md says)."""
    passwords = json.loads((data_dir / "nats" / "credentials.json").read_text())
    asyncapi = yaml.safe_load((SCHEMAS / "asyncapi.yaml").read_text())
    request = {
        "type": "DeploymentRequested",
        "deployment_id": deployment_id,
        "model": "sample-gpt",
        "version": "v2",
        "location": str(location),
        "occurred_at": datetime.now(UTC).isoformat(),
        "requested_by": {"user": "e2e", "system": "plain-nats-client"},
        "policy_overrides": FAST_BENCHMARK,
    }
    jsonschema.validate(request, json.loads((SCHEMAS / "DeploymentRequested.json").read_text()))
    subject = subject_from(
        asyncapi["channels"]["deploymentRequested"]["address"],
        model="sample-gpt",
        deployment_id=deployment_id,
    )
    nc = await nats.connect(
        nats_url, user="client", password=passwords["client"], inbox_prefix="_INBOX_client"
    )
    follower = await nats.connect(
        nats_url,
        user="subscriber",
        password=passwords["subscriber"],
        inbox_prefix="_INBOX_subscriber",
    )
    try:
        js = nc.jetstream()
        outcomes = await follower.subscribe("preflight.outcome.sample-gpt.>")  # one model's
        await follower.flush()
        await js.publish(
            subject,
            json.dumps(request).encode(),
            headers={"Nats-Msg-Id": f"{deployment_id}:requested"},
        )
        msg = await outcomes.next_msg(timeout=120)
        outcome: dict[str, Any] = json.loads(msg.data)
    finally:
        await nc.close()
        await follower.close()
    schema = json.loads((SCHEMAS / f"{outcome['type']}.json").read_text())
    jsonschema.validate(outcome, schema)
    return outcome


def cli(
    *args: str, data_dir: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args, "--data-dir", str(data_dir)],
        env=clean_env() | (env or {}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_plain_client_deploys_from_schemas_and_reads_the_outcome(
    stack: RunningStack, trained: Path
) -> None:
    outcome = asyncio.run(
        deploy_and_read_outcome(stack.info["nats_url"], "d-e2e-1", trained, stack.data_dir)
    )
    assert outcome["type"] == "DeploymentPromoted"
    assert outcome["deployment_id"] == "d-e2e-1"
    assert [s["status"] for s in outcome["stages"]] == ["passed", "passed", "skipped"]
    assert "first version of sample-gpt" in outcome["stages"][2]["reason"]

    status = cli("status", "d-e2e-1", data_dir=stack.data_dir)
    assert status.returncode == 0, status.stderr
    assert "PROMOTED" in status.stdout

    pids = stack.pids
    assert stack.stop() == 0
    assert wait_gone(pids) == [], "preflight up left processes behind"
    assert "stopped; nothing left running" in stack.log.read_text()

    again = RunningStack(stack.data_dir)  # same data directory: history is kept
    try:
        history = cli("history", "--model", "sample-gpt", "--json", data_dir=stack.data_dir)
        assert history.returncode == 0, history.stderr
        rows = json.loads(history.stdout)
        assert [(r["deployment_id"], r["outcome"]) for r in rows] == [("d-e2e-1", "promoted")]
    finally:
        pids = again.pids
        again.stop()
    assert wait_gone(pids) == []


def test_the_router_and_the_rollout_pages_answer_health_checks(stack: RunningStack) -> None:
    import urllib.request

    pages = stack.info["rollouts_url"].removesuffix("/rollouts")
    for url in (f"{stack.info['router_url']}/healthz", f"{pages}/healthz"):
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback
                    body = json.loads(resp.read())
                    assert resp.status == 200 and body["status"] == "ok", body
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    with urllib.request.urlopen(stack.info["rollouts_url"], timeout=5) as resp:  # noqa: S310
        assert "rollouts" in resp.read().decode().lower()


def test_a_killed_supervisor_leaves_nothing_behind(stack: RunningStack) -> None:
    pids = stack.pids
    stack.stop(signal.SIGKILL)
    assert wait_gone(pids) == [], "children outlived a SIGKILLed `preflight up`"


def test_a_second_stack_on_the_same_data_dir_is_refused(stack: RunningStack) -> None:
    second = subprocess.run(
        [*CLI, "up", "--data-dir", str(stack.data_dir)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert second.returncode != 0
    assert f"another `preflight up` (pid {stack.proc.pid})" in second.stderr
    assert (stack.data_dir / "stack.json").exists(), (
        "the refused stack removed the running one's file"
    )
    assert (stack.data_dir / "stack.json").stat().st_mode & 0o077 == 0


def test_cli_deploy_wait_promote_and_status(
    stack: RunningStack, tmp_path: Path, trained: Path
) -> None:
    """No traffic reaches this canary: it is held for a person, who promotes it from the CLI."""
    import yaml as pyyaml

    model_dir = trained
    overrides = tmp_path / "fast.yaml"
    no_traffic_canary = {
        "canary": {
            "steps": [{"weight": 5, "duration_s": 2}],
            "analysis_interval_s": 0.5,
            "max_step_extension_s": 1,
            "held_timeout_s": 600,
        }
    }
    overrides.write_text(pyyaml.safe_dump({**FAST_BENCHMARK, **no_traffic_canary}))
    deployed = cli(
        "deploy", str(model_dir), "--model", "org/chat.v2", "--version", "7",
        "--stable", "6", str(model_dir), "--id", "d-cli-1", "--wait",
        "--policy", str(overrides),
        data_dir=stack.data_dir,
    )  # fmt: skip
    assert deployed.returncode == EXIT_HELD, deployed.stdout + deployed.stderr
    assert "d-cli-1" in deployed.stdout
    assert "validation: passed" in deployed.stdout
    assert "benchmark: passed" in deployed.stdout
    assert "canary step 1: 5% for 2 s" in deployed.stdout
    assert "HELD at 5%" in deployed.stdout
    assert "preflight promote d-cli-1" in deployed.stderr

    again = cli(
        "deploy", str(model_dir), "--model", "org/chat.v2", "--version", "7",
        "--stable", "6", str(model_dir), "--id", "d-cli-1", "--policy", str(overrides),
        data_dir=stack.data_dir,
    )  # fmt: skip
    assert "deduplicated" in again.stdout, again.stdout + again.stderr  # a retry of the same ask
    other = cli(
        "deploy", str(model_dir), "--model", "org/chat.v2", "--version", "7", "--id", "d-cli-1",
        data_dir=stack.data_dir,
    )  # fmt: skip
    assert other.returncode == 2, other.stdout + other.stderr  # another ask: not this deployment
    assert "d-cli-1 is already taken by another request" in " ".join(other.stderr.split())

    # Another local user with a service's password cannot steer the rollout: refused by the
    # server, nothing recorded.
    passwords = json.loads((stack.data_dir / "nats" / "credentials.json").read_text())
    forged = cli(
        "abort", "d-cli-1", "--user", "alice",
        data_dir=stack.data_dir,
        env={"PREFLIGHT_NATS_USER": "router", "PREFLIGHT_NATS_PASSWORD": passwords["router"],
             "PREFLIGHT_NATS_URL": stack.info["nats_url"]},
    )  # fmt: skip
    assert forged.returncode != 0, forged.stdout + forged.stderr
    assert "did not answer a read of PREFLIGHT_EVENTS" in forged.stderr  # routers read no history
    assert "Traceback" not in forged.stderr

    promoted = cli("promote", "d-cli-1", "--reason", "looks good", data_dir=stack.data_dir)
    assert promoted.returncode == 0, promoted.stderr
    assert "PromoteDeployment sent" in promoted.stdout
    watched = cli("watch", "d-cli-1", "--timeout", "60", data_dir=stack.data_dir)
    assert watched.returncode == 0, watched.stdout + watched.stderr
    assert "PROMOTED org/chat.v2 7" in watched.stdout
    status = cli("status", "d-cli-1", data_dir=stack.data_dir)
    assert "command PromoteDeployment by" in status.stdout
    assert "AbortDeployment" not in status.stdout
    assert "as NATS user client" in status.stdout  # the authenticated sender, from the subject
    assert "looks good" in status.stdout
    assert "promoted by" in status.stdout
    late = cli("abort", "d-cli-1", data_dir=stack.data_dir)
    assert late.returncode == 1, late.stdout + late.stderr
    assert "d-cli-1 already ended: DeploymentPromoted at" in " ".join(late.stderr.split())

    # The route now serves 7 as stable: a request that says it replaces 6 is refused.
    mismatched = cli(
        "deploy", str(model_dir), "--model", "org/chat.v2", "--version", "8",
        "--stable", "6", str(model_dir), data_dir=stack.data_dir,
    )  # fmt: skip
    assert mismatched.returncode == 2, mismatched.stdout + mismatched.stderr
    assert "--stable 6 disagrees with the route of org/chat.v2, which serves stable 7" in (
        " ".join(mismatched.stderr.split())
    )

    listing = cli("status", "--json", data_dir=stack.data_dir)
    rows = json.loads(listing.stdout)
    assert [r["outcome"] for r in rows if r["deployment_id"] == "d-cli-1"] == ["promoted"]

    missing = cli("promote", "d-nope-1", data_dir=stack.data_dir)
    assert missing.returncode == 1
    assert "no deployment d-nope-1" in missing.stderr
