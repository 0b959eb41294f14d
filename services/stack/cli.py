"""The `preflight` command line: for people at a terminal and for CI jobs (exit codes, --json)."""

# No `from __future__ import annotations` here: Typer evaluates every command signature at
# each start, and string annotations made that cost ~15 ms of `preflight validate`'s start.

import importlib.util
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console

from services.contracts import subjects
from services.contracts.events import (
    TERMINAL_TYPES,
    AbortDeployment,
    Command,
    DeploymentEvent,
    DeploymentHeld,
    DeploymentPromoted,
    DeploymentRequested,
    ModelRef,
    NotifyTarget,
    PauseDeployment,
    PromoteDeployment,
    Requester,
    ResumeDeployment,
    Status,
    TargetHardware,
    is_valid_deployment_id,
    new_deployment_id,
)
from services.contracts.policy import PolicyError, load_policy_file
from services.runtime import registry
from services.stack import render


def _lazy(name: str) -> ModuleType:
    """A module whose code runs on first use: `preflight validate` never touches the bus, and
    nats-py with aiohttp is most of what a cold start would otherwise import."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.loader is not None
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


if TYPE_CHECKING:
    from services.runtime import bus
    from services.runtime.settings import Settings
else:
    bus = _lazy("services.runtime.bus")

app = typer.Typer(
    name="preflight",
    help="Gate ML model deployments: validate, benchmark, canary, notify.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
service_app = typer.Typer(help="Run one service in this process.", no_args_is_help=True)
app.add_typer(service_app, name="service")

# Wide enough for tables in CI logs and pipes; a terminal keeps its own width.
out = Console(width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 120)

T = TypeVar("T")

EXIT_FAILED = 1  # the deployment or check did not pass
EXIT_USAGE = 2  # bad input, or the bus cannot be reached
EXIT_NOT_BUILT = 3  # the stage does not exist yet
EXIT_HELD = 4  # deploy --wait: the canary is held and needs a person


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def load_settings(
    data_dir: Path | None = None, *, uses_bus: bool = True, nats_user: str = "client"
) -> "Settings":
    """Settings from the environment; the NATS URL of a running embedded stack if none is set,
    with the credentials of `nats_user` that the stack generated for its data directory (a
    command that never uses the bus skips that, and the NATS client's import with it)."""
    from services.runtime.settings import Settings

    try:
        settings = Settings()
    except ValidationError as exc:
        fail(f"bad PREFLIGHT_* setting: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}")
    if data_dir is not None:
        settings = settings.model_copy(update={"data_dir": data_dir})
    if uses_bus and "PREFLIGHT_NATS_URL" not in os.environ:
        from services.stack.supervisor import read_stack_file

        running = read_stack_file(settings.data_dir)
        if running:
            update: dict[str, Any] = {"nats_url": running["nats_url"]}
            if "PREFLIGHT_NATS_USER" not in os.environ:
                from pydantic import SecretStr

                from services.runtime.nats_users import CredentialsError, load_credentials

                try:
                    password = load_credentials(settings.data_dir)[nats_user]
                except (CredentialsError, KeyError) as exc:
                    fail(f"cannot connect to the embedded stack as {nats_user!r}: {exc}")
                update |= {"nats_user": nats_user, "nats_password": SecretStr(password)}
            settings = settings.model_copy(update=update)
    return settings


def local_paths(data_dir: Path | None) -> tuple[Path | None, Path | None]:
    """(the data dir, if one is set; the policy file) for commands that run on a person's
    machine without the stack: read from --data-dir and PREFLIGHT_DATA_DIR /
    PREFLIGHT_POLICY_FILE as Settings reads them, without importing pydantic-settings (a
    scanner's CLI must start fast; tests keep the two readings equal)."""
    env = {k.upper(): v for k, v in os.environ.items() if k.upper().startswith("PREFLIGHT_")}
    if data_dir is None and env.get("PREFLIGHT_DATA_DIR"):
        data_dir = Path(env["PREFLIGHT_DATA_DIR"])
    policy_file = env.get("PREFLIGHT_POLICY_FILE")
    return data_dir, Path(policy_file) if policy_file else None


def run_async(factory: Callable[[], Awaitable[T]]) -> T:
    import asyncio

    try:
        return asyncio.run(factory())  # type: ignore[arg-type]
    except bus.BusUnavailable as exc:
        fail(str(exc))


async def _connected(settings: "Settings", fn: Callable[[Any], Awaitable[T]]) -> T:
    nc = await bus.connect(settings, "preflight-cli")
    try:
        return await fn(nc.jetstream())
    finally:
        await nc.close()


DataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Embedded stack directory [env PREFLIGHT_DATA_DIR]."),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


# ---- the stack ------------------------------------------------------------------------------


@app.command()
def up(
    data_dir: DataDir = None,
    nats_port: Annotated[int | None, typer.Option(help="NATS port; default: a free one.")] = None,
    policy: Annotated[Path | None, typer.Option(help="Policy YAML for every service.")] = None,
    data_plane: Annotated[
        str,
        typer.Option(
            help="What carries inference traffic: `builtin` (preflight's router) or `envoy` (a "
            "real Envoy fed by xDS files, its access logs received back; docs/data-planes/)."
        ),
    ] = "builtin",
) -> None:
    """Start the embedded stack (nats-server, ClickHouse engine, every service) until Ctrl-C."""
    from services.runtime.nats_server import NatsServerError
    from services.stack.supervisor import Stack, StackError

    settings = load_settings(data_dir)
    update: dict[str, Any] = {}
    if nats_port is not None:
        update["stack_nats_port"] = nats_port
    if policy is not None:
        update["policy_file"] = policy
    if data_plane not in ("builtin", "envoy"):
        fail(f"--data-plane {data_plane!r}: choose builtin or envoy")
    update["data_plane"] = data_plane
    settings = settings.model_copy(update=update)
    try:
        load_policy_file(settings.policy_file)
    except PolicyError as exc:
        fail(str(exc))
    # soft_wrap: a line (a log path, a URL) stays one line in a pipe or a CI log.
    stack = Stack(
        settings,
        say=lambda line: out.print(line, highlight=False, soft_wrap=True),
        default_ports=True,
    )
    stopping = False

    def on_signal(signum: int, _: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    out.print(
        f"[bold]preflight[/bold] embedded stack in {settings.data_dir.resolve()}", soft_wrap=True
    )
    try:
        stack.start()
        stack.wait_ready()
        out.print(
            f"[green]ready[/green]: PREFLIGHT_NATS_URL={stack.nats.url if stack.nats else '?'} "
            "— deploy with `preflight deploy PATH --model NAME --version V`; Ctrl-C stops.",
            soft_wrap=True,
        )
        while not stopping:
            stack.check_children()
            time.sleep(0.5)
    except (StackError, NatsServerError, bus.BusUnavailable) as exc:
        stack.stop()
        fail(str(exc), EXIT_FAILED)
    out.print("stopping...")
    stack.stop()
    out.print("stopped; nothing left running")


@app.command()
def demo(
    data_dir: DataDir = None,
    data_plane: Annotated[
        str, typer.Option(help="`builtin` (preflight's router) or `envoy` (a real Envoy).")
    ] = "builtin",
) -> None:
    """Start the stack, send a real sample deployment through the pipeline, show it, stop."""
    from services.stack.demo import run_demo

    if data_plane not in ("builtin", "envoy"):
        fail(f"--data-plane {data_plane!r}: choose builtin or envoy")
    default_dir = Path(".preflight/demo" if data_plane == "builtin" else ".preflight/demo-envoy")
    settings = load_settings(data_dir or default_dir).model_copy(update={"data_plane": data_plane})
    raise typer.Exit(run_demo(settings, out))


# ---- deployments ----------------------------------------------------------------------------


def _local_or_uri(location: str) -> str:
    """URIs pass as they are; a local path must exist and is sent absolute, because the
    services resolve it, not this shell's working directory."""
    if "://" in location:
        from services.storage.locations import REMOTE_SCHEMES, scheme_of

        if scheme_of(location) not in (*REMOTE_SCHEMES, "file"):
            fail(
                f"{location}: not a model location preflight reads (a local path, "
                "s3://BUCKET/PREFIX/, hf://ORG/NAME@REVISION or https://HOST/BASE/)"
            )
        return location
    path = Path(location)
    if not path.exists():
        fail(f"{location}: no such file or directory")
    return str(path.resolve())


def _parse_expected(values: list[str]) -> dict[str, str]:
    expected: dict[str, str] = {}
    for item in values:
        name, sep, digest = item.partition("=")
        if not sep:
            fail(f"--sha256 takes FILE=HEX, got {item!r}")
        if len(digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digest):
            fail(f"--sha256 {name}: {digest!r} is not a sha256 hex digest")
        expected[name] = digest.lower()
    return expected


async def _check_stable_matches_route(js: Any, model: str, version: str, force: bool) -> None:
    """--stable names the version this one replaces; the controller compares the canary with the
    route's stable. Where the two disagree the user's comparison would silently not be the one
    made: refuse, unless forced (then say which one the controller will use)."""
    from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NotFoundError

    from services.contracts import subjects as subj
    from services.contracts.events import Route

    try:
        kv = await js.key_value(subj.ROUTES_BUCKET)
        entry = await kv.get(model)
    except (KeyNotFoundError, BucketNotFoundError, NotFoundError):
        return  # no route yet: --stable is what there is
    try:
        route = Route.model_validate_json(entry.value or b"")
    except ValidationError:
        return
    if route.stable is None or route.stable.version == version:
        return
    message = (
        f"--stable {version} disagrees with the route of {model}, which serves stable "
        f"{route.stable.version}"
        + (f" (deployment {route.stable.deployment_id})" if route.stable.deployment_id else "")
        + ": the canary is compared with the route's stable"
    )
    if not force:
        fail(f"{message}. Pass --stable {route.stable.version} ..., drop --stable, or "
             "--force-stable to send it anyway")  # fmt: skip
    err.print(f"warning: {message}", highlight=False, soft_wrap=True)


@app.command()
def deploy(
    location: Annotated[str, typer.Argument(help="Model directory or URI.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model name.")],
    version: Annotated[str, typer.Option("--version", "-v", help="Version label.")],
    stable: Annotated[
        tuple[str, str] | None,
        typer.Option(help="Version and location this one replaces: --stable V0 PATH0."),
    ] = None,
    endpoint: Annotated[
        str | None,
        typer.Option(help="Inference server already serving this version (the canary's target)."),
    ] = None,
    force_stable: Annotated[
        bool,
        typer.Option(
            "--force-stable",
            help="Send --stable even where the model's route serves another stable version.",
        ),
    ] = False,
    stable_endpoint: Annotated[
        str | None, typer.Option(help="Inference server of the stable version, if not routed yet.")
    ] = None,
    model_class: Annotated[str, typer.Option("--class", help="Policy model class.")] = "default",
    policy: Annotated[
        Path | None, typer.Option(help="YAML with policy overrides for this deployment.")
    ] = None,
    sha256: Annotated[
        list[str] | None, typer.Option(help="Expected digest, FILE=HEX; repeatable.")
    ] = None,
    gpu_memory_gb: Annotated[float, typer.Option(help="Target GPU memory, GiB.")] = 24.0,
    context_length: Annotated[int | None, typer.Option(help="Context to serve.")] = None,
    batch_size: Annotated[int, typer.Option(help="Serving batch size.")] = 1,
    team: Annotated[str | None, typer.Option(help="Team (selects policy overrides).")] = None,
    user: Annotated[str | None, typer.Option(help="Who asks; default $USER.")] = None,
    system: Annotated[str, typer.Option(help="Which system asks.")] = "cli",
    slack_channel: Annotated[str | None, typer.Option(help="Also notify this channel.")] = None,
    deployment_id: Annotated[
        str | None, typer.Option("--id", help="Reuse an id (retries).")
    ] = None,
    wait: Annotated[
        bool,
        typer.Option(help="Follow it; exit 0 if promoted, 4 if held for a person, else 1."),
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds --wait waits.")] = 3600.0,
    data_dir: DataDir = None,
    as_json: JsonFlag = False,
) -> None:
    """Publish a deployment request and print its id (with --wait: follow it to its outcome)."""
    settings = load_settings(data_dir)
    overrides = _read_overrides(policy)
    if deployment_id is not None and not is_valid_deployment_id(deployment_id):
        fail(f"--id {deployment_id!r} must match [A-Za-z0-9][A-Za-z0-9_-]{{2,63}}")
    location = _local_or_uri(location)
    if stable is not None:
        stable = (stable[0], _local_or_uri(stable[1]))
    try:
        request = DeploymentRequested(
            deployment_id=deployment_id or new_deployment_id(),
            model=model,
            version=version,
            location=location,
            expected_sha256=_parse_expected(sha256 or []),
            model_class=model_class,
            stable=ModelRef(
                name=model, version=stable[0], location=stable[1], endpoint=stable_endpoint
            )
            if stable
            else None,
            endpoint=endpoint,
            target=TargetHardware(
                gpu_memory_gb=gpu_memory_gb, context_length=context_length, batch_size=batch_size
            ),
            policy_overrides=overrides,
            requested_by=Requester(
                user=user or os.environ.get("USER", "unknown"), system=system, team=team
            ),
            notify=NotifyTarget(slack_channel=slack_channel),
        )
        load_policy_file(settings.policy_file).resolve(model=model, team=team, overrides=overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        fail(f"invalid request: {'.'.join(map(str, first['loc']))}: {first['msg']}")
    except PolicyError as exc:
        fail(str(exc))

    async def send(js: Any) -> Any:
        if request.stable is not None:
            await _check_stable_matches_route(js, model, request.stable.version, force_stable)
        ack = await bus.publish_event(js, request)
        # Ids are anyone's to pick, and the first request stored under one is the deployment
        # (the validator drops later ones): unless it asks for what this one asks, this request
        # was dropped (a duplicate) or will be, and following the id would show that other
        # request's outcome as this one's.
        first = await bus.first_request(js, request.deployment_id)
        if first is None and ack.duplicate:
            fail(
                f"deployment id {request.deployment_id} is already taken by a message this "
                "request cannot be compared with; nothing was requested: choose another --id"
            )
        if first is not None and not _same_ask(first, request):
            fail(
                f"deployment id {request.deployment_id} is already taken by another request "
                f"({first.model} {first.version} from {render.shown(first.location)}); "
                "choose another --id, or leave --id out for a fresh one"
            )
        return ack

    ack = run_async(lambda: _connected(settings, send))
    if endpoint is None and stable is not None and not as_json:
        err.print(
            "note: no --endpoint: the preflight router cannot send this version its canary "
            "share; unless your own gateway routes by the route bucket, the canary gets no "
            "traffic and ends held for a person",
            highlight=False,
        )
    if as_json and not wait:
        print(
            json.dumps({"deployment_id": request.deployment_id, "duplicate": bool(ack.duplicate)})
        )
    elif not as_json:
        note = " (already requested: deduplicated)" if ack.duplicate else ""
        out.print(f"{request.deployment_id}{note}", highlight=False)
    if wait:
        code = _watch(
            settings, request.deployment_id, timeout, as_json, stop_at_held=True, model=model
        )
        raise typer.Exit(code)


def _same_ask(a: DeploymentRequested, b: DeploymentRequested) -> bool:
    """Whether two requests ask for the same thing, field by field but for when they were made:
    a retry of one's own request does. Model, version and location alone did not do: a request
    that copied them with its own endpoint and no notices passed as CI's (review 13, F9)."""
    return a.model_dump(exclude={"occurred_at"}) == b.model_dump(exclude={"occurred_at"})


def _watch(
    settings: "Settings",
    deployment_id: str,
    timeout: float,
    as_json: bool,
    *,
    stop_at_held: bool = False,
    model: str | None = None,
) -> int:
    wanted = (
        subjects.model_deployment_events(model, deployment_id)
        if model is not None
        else subjects.deployment_events(deployment_id)
    )

    async def follow(js: Any) -> DeploymentEvent | None:
        async for event in bus.follow(js, wanted):
            if as_json:
                print(event.model_dump_json(), flush=True)
            else:
                out.print(render.describe(event), highlight=False)
            if isinstance(event, render.TERMINAL):
                return event
            if stop_at_held and isinstance(event, DeploymentHeld):
                return event
        return None

    async def bounded() -> DeploymentEvent | None:
        import asyncio

        return await asyncio.wait_for(_connected(settings, follow), timeout)

    try:
        final = run_async(bounded)
    except TimeoutError:
        fail(f"{deployment_id}: no outcome within {timeout:g} s", EXIT_FAILED)
    if isinstance(final, DeploymentPromoted):
        return 0
    if isinstance(final, DeploymentHeld):
        if not as_json:
            err.print(
                f"{deployment_id}: held, needs a person before {final.deadline:%H:%M:%S} UTC: "
                f"`preflight promote {deployment_id}` or `preflight abort {deployment_id}`",
                highlight=False,
            )
        return EXIT_HELD
    if isinstance(final, render.TERMINAL) and not as_json:
        err.print(f"{deployment_id}: {final.type}: {'; '.join(final.reasons)}", highlight=False)
    return EXIT_FAILED


@app.command()
def watch(
    deployment_id: Annotated[str, typer.Argument(help="Deployment id.")],
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 3600.0,
    data_dir: DataDir = None,
    as_json: JsonFlag = False,
) -> None:
    """Follow one deployment live, stage by stage, until its outcome (exit 0 if promoted)."""
    _check_id(deployment_id)
    raise typer.Exit(_watch(load_settings(data_dir), deployment_id, timeout, as_json))


def _check_id(deployment_id: str) -> None:
    if not is_valid_deployment_id(deployment_id):
        fail(f"{deployment_id!r} is not a deployment id")


async def _history(settings: "Settings", filter_subject: str) -> list[DeploymentEvent]:
    return await _connected(settings, lambda js: bus.read_history(js, filter_subject))


@app.command()
def status(
    deployment_id: Annotated[
        str | None, typer.Argument(help="One deployment; default all.")
    ] = None,
    limit: Annotated[int, typer.Option(help="Most recent deployments to show.")] = 20,
    data_dir: DataDir = None,
    as_json: JsonFlag = False,
) -> None:
    """Where deployments stand, read from the event stream."""
    settings = load_settings(data_dir)
    if deployment_id:
        _check_id(deployment_id)
        events = run_async(lambda: _history(settings, subjects.deployment_events(deployment_id)))
        if not events:
            fail(f"no deployment {deployment_id} in the event stream", EXIT_FAILED)
        if as_json:
            print(json.dumps([json.loads(e.model_dump_json()) for e in events], indent=2))
            return
        for event in events:
            out.print(render.describe(event), highlight=False)
        return
    events = run_async(lambda: _history(settings, f"{subjects.PREFIX}.*.*.*.*"))
    _print_summaries(list(render.summarise(events).values())[-limit:], as_json, "deployments")


@app.command()
def history(
    model: Annotated[str | None, typer.Option("--model", "-m", help="Only this model.")] = None,
    limit: Annotated[int, typer.Option(help="Most recent deployments to show.")] = 50,
    data_dir: DataDir = None,
    as_json: JsonFlag = False,
) -> None:
    """Past deployments and their outcomes, oldest first."""
    settings = load_settings(data_dir)
    try:
        filt = subjects.model_events(model) if model else f"{subjects.PREFIX}.*.*.*.*"
    except ValueError as exc:
        fail(str(exc))
    events = run_async(lambda: _history(settings, filt))
    title = f"history of {model}" if model else "history"
    _print_summaries(list(render.summarise(events).values())[-limit:], as_json, title)


def _print_summaries(rows: list[render.DeploymentSummary], as_json: bool, title: str) -> None:
    if as_json:
        print(json.dumps([r.__dict__ for r in rows], indent=2))
    elif not rows:
        out.print("no deployments yet")
    else:
        out.print(render.summary_table(rows, title))


def _command(
    kind: type[Command], deployment_id: str, reason: str, user: str | None, data_dir: Path | None
) -> None:
    _check_id(deployment_id)
    settings = load_settings(data_dir)

    async def send(js: Any) -> str:
        events = await bus.read_history(js, subjects.deployment_events(deployment_id))
        requested = [e for e in events if isinstance(e, DeploymentRequested)]
        if not requested:
            return ""
        first = requested[0]
        ended = [e for e in events if isinstance(e, TERMINAL_TYPES)]
        if ended:
            # The controller would dead-letter it; say so here, before anything is sent.
            fail(
                f"{deployment_id} already ended: {ended[0].type} at "
                f"{ended[0].occurred_at:%Y-%m-%d %H:%M:%S} UTC; a {kind.__name__} changes "
                "nothing (`preflight status` shows why it ended)",
                EXIT_FAILED,
            )
        command = kind(
            deployment_id=deployment_id,
            model=first.model,
            version=first.version,
            requested_by=Requester(
                user=user or os.environ.get("USER", "unknown"),
                system="cli",
                nats_user=settings.nats_user,  # the subject's sender token; the server checks it
            ),
            reason=reason,
        )
        import secrets

        try:
            await bus.publish_event(js, command, nonce=secrets.token_hex(4))
        except TimeoutError:
            # A publish the server refuses (permissions) gets no acknowledgement.
            fail(
                f"the NATS server did not take the command from user {settings.nats_user!r}: "
                "only users allowed to send commands may (deploy/nats/nats.conf: `client`)",
                EXIT_FAILED,
            )
        return first.model

    model = run_async(lambda: _connected(settings, send))
    if not model:
        fail(f"no deployment {deployment_id} in the event stream", EXIT_FAILED)
    out.print(f"{kind.__name__} sent for {deployment_id} ({model}); recorded in the event stream")


Reason = Annotated[str, typer.Option(help="Why; recorded with the command.")]
User = Annotated[str | None, typer.Option(help="Who; default $USER.")]
IdArg = Annotated[str, typer.Argument(help="Deployment id.")]


@app.command()
def promote(
    deployment_id: IdArg, reason: Reason = "", user: User = None, data_dir: DataDir = None
) -> None:
    """Skip the remaining canary steps and promote now."""
    _command(PromoteDeployment, deployment_id, reason, user, data_dir)


@app.command()
def abort(
    deployment_id: IdArg, reason: Reason = "", user: User = None, data_dir: DataDir = None
) -> None:
    """Roll the canary back now."""
    _command(AbortDeployment, deployment_id, reason, user, data_dir)


@app.command()
def pause(
    deployment_id: IdArg, reason: Reason = "", user: User = None, data_dir: DataDir = None
) -> None:
    """Hold a rollout at its current weight."""
    _command(PauseDeployment, deployment_id, reason, user, data_dir)


@app.command()
def resume(
    deployment_id: IdArg, reason: Reason = "", user: User = None, data_dir: DataDir = None
) -> None:
    """Continue a paused rollout; a held one starts its step again."""
    _command(ResumeDeployment, deployment_id, reason, user, data_dir)


@app.command()
def analyse(
    deployment_id: IdArg,
    policy: Annotated[
        Path | None,
        typer.Option(
            help="Replay under this policy: a policy file (defaults/teams/models, as "
            "PREFLIGHT_POLICY_FILE) resolved for the deployment, or a partial policy laid over "
            "the rollout's own (as deploy --policy). Default: the rollout's own stored policy."
        ),
    ] = None,
    every: Annotated[
        int, typer.Option(help="Also show every Nth look (0: enough to keep about 30 lines).")
    ] = 0,
    data_dir: DataDir = None,
    as_json: JsonFlag = False,
) -> None:
    """Replay a rollout's decision over its stored request records: every look, the verdict it
    reaches, when it would roll back or promote and why, and whether that agrees with what
    happened. A running rollout is replayed up to now. Exit 0 when it ran."""
    import asyncio
    import shutil

    from services.canary_controller import replay as rp
    from services.metrics.queries import MetricsUnavailable

    _check_id(deployment_id)
    settings = load_settings(data_dir)
    rollout, events = run_async(lambda: _connected(settings, _rollout_of(deployment_id)))
    if rollout is None:
        requested = [e for e in events if isinstance(e, DeploymentRequested)]
        if not requested:
            fail(f"no deployment {deployment_id}: no rollout state, no events", EXIT_FAILED)
        ended = [e for e in events if isinstance(e, TERMINAL_TYPES)]
        how = ""
        if ended:
            how = f"; it ended {type(ended[-1]).__name__}: {'; '.join(ended[-1].reasons)}"
        fail(f"{deployment_id} never reached its canary (no rollout state){how}", EXIT_FAILED)
    try:
        original = rp.original_run(rollout, events)
    except ValueError as exc:
        fail(str(exc), EXIT_FAILED)
    canary_policy, thresholds = None, None
    if policy is not None:
        try:
            canary_policy, thresholds = rp.policy_from_file(rollout, policy)
        except PolicyError as exc:
            fail(str(exc))
    start, end = original.started_at, original.data_end
    if end <= start:
        fail(f"{deployment_id} ended as its first step began: no records to replay", EXIT_FAILED)
    client, copy = _metrics_for_analysis(settings, rp.days_between(start, end), as_json)
    try:
        try:
            metrics = rp.RecordedMetrics.load(
                client, settings.metrics_table, deployment_id, start, end
            )
        except MetricsUnavailable as exc:
            fail(str(exc))
        if metrics.records == 0:
            fail(
                f"no request records of {deployment_id} stored between {start:%Y-%m-%d %H:%M:%S} "
                f"and {end:%H:%M:%S} UTC in {settings.metrics_table} ({_store_name(settings)}): "
                f"past the metrics TTL ({settings.metrics_ttl_days} days), another metrics "
                "store, or a canary that never got traffic",
                EXIT_FAILED,
            )
        result = asyncio.run(
            rp.replay(metrics, rollout, canary_policy, thresholds, original=original)
        )
    finally:
        close = getattr(client, "close", None)
        if close is not None:
            close()
        if copy is not None:
            shutil.rmtree(copy, ignore_errors=True)
    if as_json:
        print(json.dumps(rp.as_dict(result), indent=2))
        return
    for line in rp.summary_lines(result, every):
        out.print(line, highlight=False, markup=False, soft_wrap=True)


def _rollout_of(deployment_id: str) -> Callable[[Any], Awaitable[tuple[Any, list[Any]]]]:
    async def read(js: Any) -> tuple[Any, list[Any]]:
        from nats.js.errors import BucketNotFoundError, NotFoundError

        from services.canary_controller.engine import RolloutStore

        events = await bus.read_history(js, subjects.deployment_events(deployment_id))
        try:
            kv = await js.key_value(subjects.ROLLOUTS_BUCKET)
        except (BucketNotFoundError, NotFoundError):
            fail(
                f"no {subjects.ROLLOUTS_BUCKET} bucket on this NATS server (`preflight bootstrap`)"
            )
        stored = await RolloutStore(kv).get(deployment_id)
        return (stored.state if stored else None), events

    return read


def _store_name(settings: "Settings") -> str:
    from services.runtime.settings import redact_url

    if settings.clickhouse_url == "chdb":
        return f"chDB at {settings.chdb_path()}"
    return redact_url(settings.clickhouse_url)


def _chdb_in_use(path: Path) -> bool:
    """Whether a process holds the chDB path (its `status` file's lock, as ClickHouse takes
    it): asked first so that chDB does not print its own lock error."""
    try:
        import fcntl

        with (path / "status").open("rb") as status:
            try:
                fcntl.flock(status, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(status, fcntl.LOCK_UN)
    except (ImportError, OSError):
        pass
    return False


def _metrics_for_analysis(
    settings: "Settings", days: list[str], quiet: bool
) -> tuple[Any, Path | None]:
    """A client on the request-metrics store, and the temporary copy it reads if any: the
    embedded stack's controller owns its chDB path (one process per path), so while the stack
    runs its data is copied (the rollout's days only) and the copy opened."""
    import tempfile

    from services.canary_controller.replay import snapshot_chdb
    from services.runtime import clickhouse

    if settings.clickhouse_url == "chdb" and not settings.chdb_path().exists():
        fail(
            f"no chDB data at {settings.chdb_path()}: pass the stack's --data-dir, or set "
            "PREFLIGHT_CLICKHOUSE_URL / PREFLIGHT_CLICKHOUSE_PATH"
        )
    if settings.clickhouse_url != "chdb" or not _chdb_in_use(settings.chdb_path()):
        try:
            return clickhouse.open_client(settings), None
        except clickhouse.MetricsStoreLocked:
            pass
        except Exception as exc:
            fail(f"cannot open the request-metrics store ({_store_name(settings)}): {exc}")
    copy = Path(tempfile.mkdtemp(prefix="preflight-analyse-"))
    try:
        size = snapshot_chdb(settings.chdb_path(), copy / "clickhouse", days)
        client = clickhouse.open_client(
            settings.model_copy(update={"clickhouse_path": copy / "clickhouse"})
        )
    except Exception as exc:
        import shutil

        shutil.rmtree(copy, ignore_errors=True)
        fail(f"cannot read a copy of the chDB data at {settings.chdb_path()}: {exc}")
    if not quiet:
        err.print(
            f"note: {settings.chdb_path()} is open in the running stack (one process per chDB "
            f"path): reading a copy of the rollout's days ({size / 2**20:.1f} MiB)",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    return client, copy


# ---- stages run locally -------------------------------------------------------------------


@app.command()
def validate(
    location: Annotated[
        str,
        typer.Argument(
            help="Model file or directory, or s3://BUCKET/PREFIX/, hf://ORG/NAME@REV, "
            "https://HOST/BASE/ (read by range requests, nothing downloaded whole)."
        ),
    ],
    sha256: Annotated[
        list[str] | None, typer.Option(help="Expected digest, FILE=HEX; repeatable.")
    ] = None,
    gpu_memory_gb: Annotated[float, typer.Option(help="Target GPU memory, GiB.")] = 24.0,
    gpu_count: Annotated[int, typer.Option(help="GPUs the model is sharded over.")] = 1,
    context_length: Annotated[int | None, typer.Option(help="Context to serve.")] = None,
    batch_size: Annotated[int, typer.Option(help="Serving batch size.")] = 1,
    dtype: Annotated[
        str | None, typer.Option(help="Serving dtype (float16, bfloat16, ...).")
    ] = None,
    model: Annotated[
        str, typer.Option("--model", "-m", help="Model name (policy overrides).")
    ] = "",
    team: Annotated[str | None, typer.Option(help="Team (policy overrides).")] = None,
    policy: Annotated[
        Path | None, typer.Option(help="YAML with policy overrides for this run.")
    ] = None,
    data_dir: DataDir = None,
    as_json: JsonFlag = False,
) -> None:
    """Run the validator's checks locally, without the bus (exit 1 on failure): for your own CI."""
    from services.validator.checks.checksum import (
        DigestCache,
        digest_cache_path,
        local_digest_cache_path,
        user_cache_dir,
    )
    from services.validator.validate import validate as run_validation

    explicit_dir, policy_file = local_paths(data_dir)
    try:
        target = TargetHardware(
            gpu_memory_gb=gpu_memory_gb,
            gpu_count=gpu_count,
            context_length=context_length,
            batch_size=batch_size,
            dtype=dtype,  # validated by pydantic just here
        )
        resolved = load_policy_file(policy_file).resolve(
            model=model, team=team, overrides=_read_overrides(policy)
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        fail(f"invalid target: {'.'.join(map(str, first['loc']))}: {first['msg']}")
    except PolicyError as exc:
        fail(str(exc))
    from services.storage.locations import is_remote

    if is_remote(location):  # digests of remote objects, keyed by their version
        cache_path: Path | None = digest_cache_path(explicit_dir or user_cache_dir())
    else:
        cache_path = local_digest_cache_path(Path(location), explicit_dir)
    if explicit_dir is not None and cache_path != digest_cache_path(explicit_dir) and not as_json:
        err.print(
            f"note: {explicit_dir} is inside the model; digests cached "
            + (f"in {cache_path.parent}" if cache_path else "nowhere (every file is hashed)"),
            highlight=False,
        )
    cache = DigestCache(cache_path) if cache_path is not None else None
    try:
        report = run_validation(
            location,
            policy=resolved.validation,
            expected_sha256=_parse_expected(sha256 or []),
            target=target,
            digest_cache=cache,
            service="cli",
        )
    finally:
        if cache is not None:
            cache.close()
    if as_json:
        print(report.model_dump_json(indent=2))
    else:
        out.print(render.report_table(report, title=f"validation of {location}"))
        out.print(render.stage_line(report), highlight=False)
    raise typer.Exit(EXIT_FAILED if report.blocks else 0)


def _read_overrides(policy: Path | None) -> dict[str, Any]:
    if policy is None:
        return {}
    try:
        overrides = yaml.safe_load(policy.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        fail(f"{policy}: cannot read policy overrides: {exc}")
    if not isinstance(overrides, dict):
        fail(f"{policy}: policy overrides must be a mapping")
    return overrides


@app.command()
def benchmark(
    path: Annotated[
        str,
        typer.Argument(
            help="Model directory (Hugging Face layout), or s3://, hf://, https:// (fetched "
            "into the model cache first)."
        ),
    ],
    baseline: Annotated[
        str | None, typer.Option(help="The version it replaces, measured under the same config.")
    ] = None,
    model_class: Annotated[str, typer.Option("--class", help="Policy model class.")] = "default",
    model: Annotated[
        str, typer.Option("--model", "-m", help="Model name (policy overrides).")
    ] = "",
    team: Annotated[str | None, typer.Option(help="Team (policy overrides).")] = None,
    policy: Annotated[
        Path | None, typer.Option(help="YAML with policy overrides for this run.")
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="cpu or cuda; default: cuda if present.")
    ] = None,
    data_dir: DataDir = None,
    as_json: JsonFlag = False,
) -> None:
    """Run the benchmarks locally against a baseline: exit 1 when degraded, 2 when it cannot run."""
    from services.benchmarker.isolated import Job, Runner, job_settings, limits
    from services.storage.cache import ModelCache

    settings = load_settings(data_dir)
    try:
        ModelCache.configured(settings.model_cache_dir, settings.model_cache_max_bytes)
        runner = Runner(limits(settings))  # in a child process, as the service runs it
    except ValueError as exc:
        fail(str(exc))
    try:
        resolved = load_policy_file(settings.policy_file).resolve(
            model=model, team=team, overrides=_read_overrides(policy)
        )
    except PolicyError as exc:
        fail(str(exc))
    if not as_json:
        err.print(f"benchmarking {path}" + (f" against {baseline}" if baseline else "") + " ...")
    with _fetch_progress_on_stderr(not as_json):
        report, device_name = runner.run(
            Job.of(
                path,
                baseline,
                resolved,
                model_class=model_class,
                service="cli",
                device=device,
                **job_settings(settings),
            )
        )
    if as_json:
        print(
            json.dumps(
                {"device": device_name, "report": json.loads(report.model_dump_json())}, indent=2
            )
        )
    else:
        out.print(render.report_table(report, title=f"benchmark of {path} on {device_name or '-'}"))
        out.print(render.stage_line(report), highlight=False)
    if report.status is Status.ERROR:
        raise typer.Exit(EXIT_USAGE)
    raise typer.Exit(EXIT_FAILED if report.status is Status.DEGRADED else 0)


@contextmanager
def _fetch_progress_on_stderr(show: bool) -> Iterator[None]:
    """A remote model's fetch progress (every 10 s, and the end) on stderr while the block runs:
    the lines the benchmarker service logs, so a long download is not a silent terminal."""
    from services.benchmarker.loading import fetch_log

    if not show:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)  # the stderr of now (a test runner swaps it)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level, propagate = fetch_log.level, fetch_log.propagate
    fetch_log.addHandler(handler)
    fetch_log.setLevel(logging.INFO)
    fetch_log.propagate = False  # once, even where the root logger has handlers of its own
    try:
        yield
    finally:
        fetch_log.removeHandler(handler)
        fetch_log.setLevel(level)
        fetch_log.propagate = propagate


# ---- services and contracts ---------------------------------------------------------------


@service_app.command("run")
def service_run(
    name: Annotated[str, typer.Argument(help=f"One of: {', '.join(registry.SERVICES)}.")],
) -> None:
    """Run one service until SIGTERM or Ctrl-C."""
    from services.stack.runner import run_service

    if name not in registry.SERVICES:
        fail(f"unknown service {name!r}; known: {', '.join(registry.SERVICES)}")
    if not registry.is_built(name):
        fail(registry.not_built_reason(name), EXIT_NOT_BUILT)
    try:
        run_service(name, load_settings())
    except (bus.BusUnavailable, bus.TopologyMissing, PolicyError) as exc:
        fail(str(exc))


@app.command()
def bootstrap(
    data_dir: DataDir = None,
    json_out: JsonFlag = False,
) -> None:
    """Create or update the streams, KV buckets and durable consumers (admin rights).

    Services only bind to these (least privilege: deploy/nats/nats.conf), so run this once per
    NATS server and after each upgrade: an init container in docker-compose and Kubernetes does.
    Connects as PREFLIGHT_NATS_USER (the admin user), or as the embedded stack's admin.
    """
    settings = load_settings(data_dir, nats_user="admin")
    done: list[str] = []

    def say(line: str) -> None:
        done.append(line)
        if not json_out:
            out.print(f"  {line}", highlight=False)

    async def run(js: Any) -> None:
        from nats.js.errors import APIError

        try:
            await bus.ensure_topology(js, settings, say)
        except APIError as exc:
            who = settings.nats_user or "no user"
            fail(f"bootstrap as {who!r} was refused ({exc}); it needs the admin NATS user")
        except TimeoutError:
            who = settings.nats_user or "no user"
            fail(
                f"bootstrap as {who!r}: the JetStream API did not answer (a user without "
                "the rights gets no answer); it needs the admin NATS user"
            )

    run_async(lambda: _connected(settings, run))
    if json_out:
        out.print_json(data={"ready": done})
    else:
        out.print("[green]bootstrap done[/green]: services can start", highlight=False)


@service_app.command("health")
def service_health(
    name: Annotated[str, typer.Argument(help=f"One of: {', '.join(registry.SERVICES)}.")],
) -> None:
    """Exit 0 when the service in this container/data dir is running and connected (probes)."""
    from services.runtime.service import check_health

    if name not in registry.SERVICES:
        fail(f"unknown service {name!r}; known: {', '.join(registry.SERVICES)}")
    settings = load_settings()
    if registry.server_of(name) is not None:  # an HTTP service: ask its /healthz
        healthy, why = _http_health(name, settings)
    else:
        healthy, why = check_health(settings, name)
    out.print(why, highlight=False)
    raise typer.Exit(0 if healthy else EXIT_FAILED)


def _http_health(name: str, settings: "Settings") -> tuple[bool, str]:
    import urllib.error
    import urllib.request

    url = f"http://{settings.router_host}:{settings.router_port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status == 200, f"{name}: healthy ({url})"
    except urllib.error.HTTPError as exc:
        return False, f"{name}: {url} answered {exc.code}: {exc.read(500).decode(errors='replace')}"
    except OSError as exc:
        return False, f"{name}: {url} did not answer: {exc}"


@service_app.command("list")
def service_list() -> None:
    """The services and whether each is built."""
    for name in registry.SERVICES:
        state = "built" if registry.is_built(name) else registry.not_built_reason(name)
        out.print(f"{name:<18} {state}", highlight=False)


@app.command()
def schemas(
    check: Annotated[bool, typer.Option(help="Fail if schemas/ is stale.")] = False,
    directory: Annotated[Path, typer.Option("--dir", help="Output directory.")] = Path("schemas"),
) -> None:
    """Write (or check) schemas/: JSON Schema per message and the AsyncAPI document."""
    from services.contracts import schema_export

    if check:
        problems = schema_export.stale(directory)
        if schema_export.reference_stale():
            problems.append(f"{schema_export.EVENT_REFERENCE}: differs from the contracts")
        if schema_export.policy_reference_stale():
            problems.append(f"{schema_export.POLICY_REFERENCE}: differs from the policy models")
        if problems:
            fail("schemas/ is stale, run `preflight schemas`: " + "; ".join(problems), EXIT_FAILED)
        out.print(f"{directory} is up to date")
        return
    written = schema_export.write(directory)
    out.print(f"wrote {len(written)} files to {directory}")
    out.print(f"wrote {schema_export.write_reference()}")
    out.print(f"wrote {schema_export.write_policy_reference()}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
