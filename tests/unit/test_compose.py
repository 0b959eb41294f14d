"""docker-compose.yml, the Dockerfiles and .env.example, checked statically (no Docker engine)."""

from __future__ import annotations

import json
import os
import re
import shlex
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from services.contracts.policy import load_policy_file
from services.runtime.registry import SERVICES
from services.runtime.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERIGNORE = ROOT / ".dockerignore"
PREFIX = "PREFLIGHT_"
BENCHMARK_EXTRA = ".[benchmark]"

# Compose interpolation: `$$` is a literal dollar; `${NAME}`, `${NAME:-default}`, `$NAME`.
_SUBSTITUTION = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_]\w*)(?:(?P<op>:?[-+?])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_]\w*))"
)
_ENV_DECLARATION = re.compile(r"^\s*#?\s*(?:export\s+)?(?P<name>[A-Za-z_]\w*)=", re.MULTILINE)

Service = dict[str, Any]
Instruction = tuple[str, str]


# ---- reading the files -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Service]:
    found = compose.get("services")
    assert isinstance(found, dict), "docker-compose.yml has no services mapping"
    assert found, "docker-compose.yml defines no services"
    return found


def strings_in(node: object) -> Iterator[str]:
    """Every string (keys included) in a parsed YAML tree: where compose interpolates."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, Mapping):
        for key, value in node.items():
            yield from strings_in(key)
            yield from strings_in(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings_in(item)


def substituted_names(text: str) -> set[str]:
    names = set()
    for match in _SUBSTITUTION.finditer(text):
        name = match.group("braced") or match.group("named")
        if name:
            names.add(name)
    return names


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's interpolation for the forms we use, with `env` standing in for the shell/.env."""

    def replace(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        name = match.group("braced") or match.group("named")
        op, arg = match.group("op"), match.group("arg") or ""
        value = env.get(name)
        if op == ":-":
            return value if value else arg
        if op == "-":
            return arg if value is None else value
        assert op is None, f"substitution operator {op!r} in {text!r} is not checked here"
        return value or ""

    return _SUBSTITUTION.sub(replace, text)


def environment_of(service: Service) -> dict[str, str | None]:
    """A service's environment as a mapping; `None` means passed through from the host."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (entry.split("=", 1) if "=" in entry else [entry, None] for entry in env)
        return {str(key): value for key, value in pairs}
    assert isinstance(env, dict)
    return {str(k): None if v is None else str(v) for k, v in env.items()}


def dockerfile_of(service: Service) -> Path:
    build = service["build"]
    if isinstance(build, str):
        return ROOT / build / "Dockerfile"
    context, dockerfile = str(build.get("context", ".")), str(build.get("dockerfile", "Dockerfile"))
    return ROOT / context / dockerfile


def instructions(dockerfile: Path) -> list[Instruction]:
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    result: list[Instruction] = []
    pending = ""
    for raw in dockerfile.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        result.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, f"{dockerfile}: ends inside a line continuation"
    return result


def final_stage(dockerfile: Path) -> list[Instruction]:
    steps = instructions(dockerfile)
    starts = [i for i, (keyword, _) in enumerate(steps) if keyword == "FROM"]
    assert starts, f"{dockerfile}: no FROM"
    return steps[starts[-1] :]


def exec_form(args: str) -> list[str]:
    parsed = json.loads(args) if args.startswith("[") else shlex.split(args)
    assert isinstance(parsed, list)
    return [str(word) for word in parsed]


def argv_of(service: Service) -> list[str]:
    """What the container runs: entrypoint (compose's, else the image's) plus command."""
    entrypoint: list[str] = []
    if "entrypoint" in service:
        raw = service["entrypoint"]
        entrypoint = shlex.split(raw) if isinstance(raw, str) else list(raw)
    elif "build" in service:
        for keyword, args in final_stage(dockerfile_of(service)):
            if keyword == "ENTRYPOINT":
                entrypoint = exec_form(args)
    raw_command = service.get("command", [])
    command = shlex.split(raw_command) if isinstance(raw_command, str) else list(raw_command)
    return [str(word) for word in entrypoint + command]


def preflight_services(services: dict[str, Service]) -> dict[str, Service]:
    """Containers that run a preflight service, keyed by the service name they run."""
    found: dict[str, Service] = {}
    for service in services.values():
        argv = argv_of(service)
        if argv[:3] == ["preflight", "service", "run"] and len(argv) == 4:
            found[argv[3]] = service
    return found


def settings_env_names() -> set[str]:
    return {PREFIX + name.upper() for name in Settings.model_fields}


def declared_in_env_example() -> set[str]:
    return {m.group("name") for m in _ENV_DECLARATION.finditer(ENV_EXAMPLE.read_text("utf-8"))}


def depends_on(service: Service) -> dict[str, str]:
    """Dependency -> condition (`service_started` for the short list form)."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def volume_mounts(service: Service) -> list[tuple[str, str, dict[str, Any]]]:
    """(source, target, long-form spec) of each volume; short form `src:dst[:mode]` split."""
    mounts = []
    for entry in service.get("volumes", []):
        if isinstance(entry, str):
            source, _, rest = entry.partition(":")
            target = rest.split(":")[0]
            kind = "bind" if source.startswith((".", "/", "~", "$")) else "volume"
            mounts.append((source, target, {"type": kind}))
        else:
            mounts.append((entry.get("source", ""), entry["target"], entry))
    return mounts


# ---- services and commands ---------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_registered_service_has_a_container(services: dict[str, Service], name: str) -> None:
    running = preflight_services(services)
    assert name in running, f"no container runs `preflight service run {name}`"


def test_no_container_runs_an_unknown_service(services: dict[str, Service]) -> None:
    assert set(preflight_services(services)) <= set(SERVICES)


def test_preflight_services_wait_for_a_healthy_nats(services: dict[str, Service]) -> None:
    for name, service in preflight_services(services).items():
        assert depends_on(service).get("nats") == "service_healthy", name


def test_the_canary_controller_waits_for_a_healthy_clickhouse(
    services: dict[str, Service],
) -> None:
    controller = preflight_services(services)["canary-controller"]
    assert depends_on(controller).get("clickhouse") == "service_healthy"


def test_dependencies_exist_and_health_conditions_have_healthchecks(
    services: dict[str, Service],
) -> None:
    for name, service in services.items():
        for target, condition in depends_on(service).items():
            assert target in services, f"{name} depends on unknown service {target!r}"
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{target} has no healthcheck"


def test_the_router_publishes_8080(services: dict[str, Service]) -> None:
    router = preflight_services(services)["router"]
    published = [
        str(port if isinstance(port, str | int) else port["target"])
        for port in router.get("ports", [])
    ]
    assert any(p == "8080" or p.endswith(":8080") for p in published), published


def test_no_service_needs_a_gpu_unless_in_a_profile(services: dict[str, Service]) -> None:
    for name, service in services.items():
        reservations = service.get("deploy", {}).get("resources", {}).get("reservations", {})
        if reservations.get("devices"):
            assert service.get("profiles"), f"{name} reserves a GPU outside a profile"


# ---- NATS and ClickHouse -----------------------------------------------------------------------


def test_nats_runs_jetstream_on_a_volume_with_a_healthcheck(
    services: dict[str, Service],
) -> None:
    nats = services["nats"]
    assert str(nats["image"]).startswith("nats:2.1")
    command = argv_of(nats)
    assert "-js" in command or "--jetstream" in command
    store_flag = next(flag for flag in ("-sd", "--store_dir") if flag in command)
    store_dir = command[command.index(store_flag) + 1]
    assert store_dir in {target for _, target, _ in volume_mounts(nats)}, "store dir not a volume"
    test = " ".join(nats["healthcheck"]["test"])
    assert "/healthz?js-enabled-only=true" in test
    assert any(str(port).endswith("4222") for port in nats.get("ports", []))


def test_clickhouse_has_credentials_a_volume_and_a_healthcheck(
    services: dict[str, Service],
) -> None:
    clickhouse = services["clickhouse"]
    assert str(clickhouse["image"]).startswith("clickhouse/clickhouse-server:")
    env = environment_of(clickhouse)
    assert env.get("CLICKHOUSE_USER")
    assert env.get("CLICKHOUSE_PASSWORD")
    assert "/var/lib/clickhouse" in {target for _, target, _ in volume_mounts(clickhouse)}
    assert "healthcheck" in clickhouse


def test_named_volumes_are_declared(compose: dict[str, Any], services: dict[str, Service]) -> None:
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for source, _, spec in volume_mounts(service):
            if spec.get("type", "volume") == "volume" and source:
                assert source in declared, f"{name} mounts undeclared volume {source!r}"


def test_bind_mounted_files_exist(services: dict[str, Service]) -> None:
    for name, service in services.items():
        for source, _, spec in volume_mounts(service):
            if spec.get("type") != "bind" or (spec.get("bind") or {}).get("create_host_path"):
                continue
            assert not substituted_names(source), f"{name}: {source} may not exist on the host"
            assert (ROOT / source).exists(), f"{name} mounts missing {source}"


# ---- settings and variables --------------------------------------------------------------------


def test_preflight_variables_are_settings(services: dict[str, Service]) -> None:
    known = settings_env_names()
    for name, service in services.items():
        unknown = {k for k in environment_of(service) if k.startswith(PREFIX)} - known
        assert not unknown, f"{name} sets {sorted(unknown)}, which Settings does not read"
    for dockerfile in {dockerfile_of(s) for s in services.values() if "build" in s}:
        for keyword, args in instructions(dockerfile):
            if keyword in {"ENV", "ARG"}:
                names = set(re.findall(rf"\b({PREFIX}\w+)=", args))
                assert names <= known, f"{dockerfile.name}: {sorted(names - known)}"


def test_substituted_variables_are_settings_or_documented(compose: dict[str, Any]) -> None:
    documented = declared_in_env_example() | settings_env_names()
    used = set().union(*(substituted_names(text) for text in strings_in(compose)))
    assert used, "no ${VAR} in docker-compose.yml: is the substitution regex broken?"
    assert used <= documented, f"not in .env.example: {sorted(used - documented)}"


def test_env_example_names_only_real_settings() -> None:
    names = {n for n in declared_in_env_example() if n.startswith(PREFIX)}
    assert names <= settings_env_names(), sorted(names - settings_env_names())


def test_passed_through_variables_are_documented(services: dict[str, Service]) -> None:
    documented = declared_in_env_example()
    for name, service in services.items():
        passed = {k for k, v in environment_of(service).items() if v is None}
        assert passed <= documented, f"{name}: {sorted(passed - documented)} not in .env.example"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_environment_builds_settings(
    services: dict[str, Service], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no .env, each container's environment is valid Settings that point at compose hosts."""
    service = preflight_services(services)[name]
    for key in list(os.environ):
        if key.startswith(PREFIX):
            monkeypatch.delenv(key)
    for key, value in environment_of(service).items():
        if value is not None:
            monkeypatch.setenv(key, interpolate(value, {}))
    settings = Settings()
    hosts = [urlparse(url.strip()).hostname for url in settings.nats_url.split(",")]
    assert hosts, settings.nats_url
    assert all(host in services for host in hosts), settings.nats_url
    if settings.clickhouse_url != "chdb":
        assert urlparse(settings.clickhouse_url).hostname in services
    mounts = {target: source for source, target, _ in volume_mounts(service)}
    if settings.policy_file is not None:
        source = mounts.get(str(settings.policy_file))
        assert source, f"{name}: policy file {settings.policy_file} is not mounted"
        load_policy_file(ROOT / source)


def test_the_canary_controller_uses_the_clickhouse_server(
    services: dict[str, Service],
) -> None:
    controller = preflight_services(services)["canary-controller"]
    url = environment_of(controller).get(PREFIX + "CLICKHOUSE_URL") or "chdb"
    assert urlparse(interpolate(url, {})).scheme in {"http", "https"}, url


# ---- images ------------------------------------------------------------------------------------


def test_build_contexts_and_dockerfiles_exist(services: dict[str, Service]) -> None:
    for name, service in services.items():
        if "build" not in service:
            continue
        build = service["build"]
        context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
        assert context.is_dir(), f"{name}: no build context {context}"
        assert dockerfile_of(service).is_file(), f"{name}: no {dockerfile_of(service)}"
    for name in SERVICES:
        assert "build" in preflight_services(services)[name], f"{name} has no build"


def test_copied_sources_exist_and_are_not_dockerignored(services: dict[str, Service]) -> None:
    ignored = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".git", ".preflight"} <= ignored
    for dockerfile in {dockerfile_of(s) for s in services.values() if "build" in s}:
        for keyword, args in instructions(dockerfile):
            if keyword not in {"COPY", "ADD"} or "--from=" in args:
                continue
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), f"{dockerfile.name} copies missing {source}"
                assert source.rstrip("/") not in ignored, f"{source} is in .dockerignore"


def test_images_run_preflight_as_a_non_root_user(services: dict[str, Service]) -> None:
    for dockerfile in {dockerfile_of(s) for s in services.values() if "build" in s}:
        stage = final_stage(dockerfile)
        users = [args for keyword, args in stage if keyword == "USER"]
        assert users, f"{dockerfile.name}: runs as root"
        assert users[-1].split(":")[0] not in {"root", "0"}, dockerfile.name
        entrypoints = [exec_form(args) for keyword, args in stage if keyword == "ENTRYPOINT"]
        assert entrypoints, f"{dockerfile.name}: no ENTRYPOINT"
        assert entrypoints[-1] == ["preflight"], dockerfile.name


def test_torch_is_only_in_the_benchmarker_image(services: dict[str, Service]) -> None:
    running = preflight_services(services)
    for name, service in running.items():
        runs = " ".join(args for keyword, args in instructions(dockerfile_of(service)))
        if name == "benchmarker":
            assert BENCHMARK_EXTRA in runs, "the benchmarker image lacks the benchmark extra"
        else:
            assert BENCHMARK_EXTRA not in runs, name
            assert "torch" not in runs.lower(), name
    assert dockerfile_of(running["benchmarker"]) not in {
        dockerfile_of(s) for n, s in running.items() if n != "benchmarker"
    }


def test_torch_is_an_extra_not_a_dependency() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert not any(dep.lower().startswith("torch") for dep in project["dependencies"])
    assert any(dep.startswith("torch") for dep in project["optional-dependencies"]["benchmark"])
