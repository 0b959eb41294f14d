"""docker-compose.yml, the Dockerfiles and .env.example, checked statically (no Docker engine)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from services.contracts.policy import load_policy_file
from services.runtime import nats_server
from services.runtime.clickhouse import metrics_table_ddl
from services.runtime.registry import SERVICES
from services.runtime.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
GPU_OVERRIDE = ROOT / "docker-compose.gpu.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERIGNORE = ROOT / ".dockerignore"
NATS_CONF = ROOT / "deploy" / "nats" / "nats.conf"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "rollout.json"
PREFIX = "PREFLIGHT_"
BENCHMARK_EXTRA = ".[benchmark]"
CLICKHOUSE_PLUGIN = "grafana-clickhouse-datasource"

# Production shape: every service in its own container. metrics-ingest runs inside the
# controller in the embedded stack, and on its own here.
EXPECTED_SERVICES = {
    "validator",
    "benchmarker",
    "canary-controller",
    "notifier",
    "router",
    "metrics-ingest",
    "envoy-receiver",
}
HTTP_SERVICES = {
    "canary-controller": "PREFLIGHT_CONTROLLER_HTTP_PORT",
    "router": "PREFLIGHT_ROUTER_PORT",
    "envoy-receiver": "PREFLIGHT_ENVOY_RECEIVER_HTTP_PORT",  # beside its gRPC port
}
HOST_SETTING = {"envoy-receiver": "PREFLIGHT_ENVOY_RECEIVER_HOST"}  # one host for both ports

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
        if op in {":?", "?"}:
            missing = not value if op == ":?" else value is None
            if missing:
                raise KeyError(f"compose refuses to start: {arg or name}")
            return value or ""
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


def example_env() -> dict[str, str]:
    """What a filled-in .env holds: .env.example's values, each empty password set."""
    env: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text("utf-8").splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            env[name.strip()] = value.strip() or secrets.token_hex(12)
    return env


def required_variables(compose: object) -> set[str]:
    """Variables written `${NAME:?...}`: compose refuses to start without them."""
    return {
        match.group("braced")
        for text in strings_in(compose)
        for match in _SUBSTITUTION.finditer(text)
        if match.group("op") in {":?", "?"}
    }


def nats_users() -> dict[str, str]:
    """User -> the environment variable holding its password, from deploy/nats/nats.conf."""
    text = NATS_CONF.read_text("utf-8")
    return dict(re.findall(r"user:\s*([\w-]+)\s*\n\s*password:\s*\$(\w+)", text))


def load_render() -> ModuleType:
    """deploy/render.py (a script, not a package module)."""
    spec = importlib.util.spec_from_file_location("deploy_render", ROOT / "deploy" / "render.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    running = set(preflight_services(services))
    assert running == EXPECTED_SERVICES, sorted(running ^ EXPECTED_SERVICES)
    unknown = running - set(SERVICES)
    if unknown == {"metrics-ingest"}:
        pytest.xfail("services/runtime/registry.py does not register metrics-ingest yet")
    assert not unknown, f"`preflight service run` does not know {sorted(unknown)}"


def test_every_container_has_a_healthcheck(services: dict[str, Service]) -> None:
    for name, service in services.items():
        if name == "bootstrap":
            continue  # runs to completion; services wait for service_completed_successfully
        test = (service.get("healthcheck") or {}).get("test")
        assert test and test[0] in {"CMD", "CMD-SHELL"}, f"{name} has no healthcheck"


def test_bus_services_check_their_health_with_the_cli(services: dict[str, Service]) -> None:
    for name, service in preflight_services(services).items():
        test = service["healthcheck"]["test"]
        if name in HTTP_SERVICES:
            continue
        assert test == ["CMD", "preflight", "service", "health", name], (name, test)


def test_http_services_probe_the_port_they_serve(services: dict[str, Service]) -> None:
    for name, port_variable in HTTP_SERVICES.items():
        service = preflight_services(services)[name]
        port = interpolate(str(environment_of(service)[port_variable]), example_env())
        probe = " ".join(service["healthcheck"]["test"])
        assert f"http://127.0.0.1:{port}/healthz" in probe, (name, probe)
        published = [str(p).rsplit(":", 1)[-1] for p in service.get("ports", [])]
        assert port in published, f"{name} serves {port} but publishes {published}"
        host_variable = HOST_SETTING.get(name, port_variable.replace("_PORT", "_HOST"))
        host = environment_of(service).get(host_variable)
        assert host == "0.0.0.0", f"{name} listens on {host!r}: unreachable from outside"


def test_published_host_ports_are_unique(services: dict[str, Service]) -> None:
    seen: dict[str, str] = {}
    for name, service in services.items():
        for port in service.get("ports", []):
            parts = interpolate(str(port), example_env()).split(":")
            host_port = parts[-2] if len(parts) >= 2 else parts[-1]
            assert host_port not in seen, f"{name} and {seen[host_port]} both publish {host_port}"
            seen[host_port] = name


def test_every_preflight_service_has_its_own_nats_user(services: dict[str, Service]) -> None:
    users = nats_users()
    nats_env = environment_of(services["nats"])
    seen: set[str] = set()
    for name, service in preflight_services(services).items():
        env = environment_of(service)
        user = env.get(PREFIX + "NATS_USER")
        # The Envoy access-log receiver is a data plane's record source: the router's user.
        expected = "router" if name == "envoy-receiver" else name
        assert user == expected and user in users, f"{name} connects as {user!r}"
        variable = users[user]
        assert substituted_names(str(env.get(PREFIX + "NATS_PASSWORD"))) == {variable}, name
        assert substituted_names(str(nats_env.get(variable))) == {variable}, variable
        seen.add(user)
    assert len(seen) == len(set(preflight_services(services)) - {"envoy-receiver"})


def test_passwords_have_no_defaults(compose: dict[str, Any]) -> None:
    required = required_variables(compose)
    passwords = {n for n in set(nats_users().values()) | {"CLICKHOUSE_PASSWORD"}}
    assert passwords | {"GRAFANA_ADMIN_PASSWORD"} <= required
    example = {k: v for k, v in (line.split("=", 1) for line in _example_lines())}
    for name in required:
        assert example.get(name) == "", f".env.example gives {name} a value: an easy default"
    with pytest.raises(KeyError, match="NATS_ADMIN_PASSWORD"):
        interpolate("${NATS_ADMIN_PASSWORD:?set NATS_ADMIN_PASSWORD in .env}", {})


def _example_lines() -> list[str]:
    return [
        line.strip()
        for line in ENV_EXAMPLE.read_text("utf-8").splitlines()
        if "=" in line and not line.lstrip().startswith("#")
    ]


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


def test_the_router_serves_its_settings_port(services: dict[str, Service]) -> None:
    router = preflight_services(services)["router"]
    port = str(environment_of(router)[PREFIX + "ROUTER_PORT"])
    assert port == str(Settings.model_fields["router_port"].default) == "8480"
    published = [str(p) for p in router.get("ports", [])]
    assert any(p.endswith(f":{port}") for p in published), published


def test_no_service_needs_a_gpu_unless_in_a_profile(services: dict[str, Service]) -> None:
    for name, service in services.items():
        reservations = service.get("deploy", {}).get("resources", {}).get("reservations", {})
        if reservations.get("devices"):
            assert service.get("profiles"), f"{name} reserves a GPU outside a profile"


def test_the_gpu_override_gives_the_benchmarker_one_gpu(services: dict[str, Service]) -> None:
    override = yaml.safe_load(GPU_OVERRIDE.read_text("utf-8"))
    assert set(override) == {"services"}
    assert set(override["services"]) == {"benchmarker"}
    assert "benchmarker" in services
    devices = override["services"]["benchmarker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


# ---- NATS and ClickHouse -----------------------------------------------------------------------


def test_nats_runs_jetstream_on_a_volume_with_a_healthcheck(
    services: dict[str, Service],
) -> None:
    nats = services["nats"]
    command = argv_of(nats)
    config = command[command.index("-c") + 1]
    mounts = {target: (source, spec) for source, target, spec in volume_mounts(nats)}
    assert mounts[config][0] == "./deploy/nats/nats.conf"
    text = NATS_CONF.read_text("utf-8")
    store_dir = re.search(r"jetstream\s*\{[^}]*store_dir:\s*(\S+)", text)
    assert store_dir, "nats.conf does not enable JetStream with a store_dir"
    assert mounts[store_dir.group(1)][1]["type"] == "volume", "store dir not a volume"
    assert re.search(r"^http_port:\s*8222", text, re.MULTILINE)
    test = " ".join(nats["healthcheck"]["test"])
    assert "http://127.0.0.1:8222/healthz?js-enabled-only=true" in test
    assert any(str(port).endswith(":4222") for port in nats.get("ports", []))


def test_the_nats_image_is_the_version_the_tests_run(services: dict[str, Service]) -> None:
    version = subprocess.run(
        [str(nats_server.binary()), "--version"], capture_output=True, text=True, check=True
    ).stdout
    tested = re.search(r"v(\d+\.\d+)\.", version)
    assert tested, version
    assert str(services["nats"]["image"]) == f"nats:{tested.group(1)}-alpine"


def test_every_nats_password_reaches_the_server(services: dict[str, Service]) -> None:
    env = environment_of(services["nats"])
    for user, variable in nats_users().items():
        assert substituted_names(str(env.get(variable))) == {variable}, user


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


def test_clickhouse_creates_the_metrics_table_at_start(services: dict[str, Service]) -> None:
    clickhouse = services["clickhouse"]
    mounts = {target: source for source, target, _ in volume_mounts(clickhouse)}
    init = ROOT / mounts["/docker-entrypoint-initdb.d"]
    scripts = sorted(init.glob("*.sql"))
    assert scripts, f"no .sql in {init}"
    render = load_render()
    assert environment_of(clickhouse)["CLICKHOUSE_DB"] == render.CLICKHOUSE_DATABASE
    text = render.INIT_SQL.read_text("utf-8")
    assert render.init_sql() == text, "stale: run `.venv/bin/python deploy/render.py`"
    table = Settings.model_fields["metrics_table"].default
    assert f"CREATE TABLE IF NOT EXISTS {table} (" in text


def test_derived_deploy_files_are_fresh() -> None:
    stale = load_render().stale_files()
    assert not stale, f"stale {stale}: run `.venv/bin/python deploy/render.py`"


def test_metrics_services_use_the_clickhouse_server(services: dict[str, Service]) -> None:
    for name in ("canary-controller", "metrics-ingest"):
        service = preflight_services(services)[name]
        url = interpolate(str(environment_of(service)[PREFIX + "CLICKHOUSE_URL"]), example_env())
        parts = urlparse(url)
        assert parts.hostname == "clickhouse" and parts.path == "/preflight", url
        assert parts.username and parts.password, f"{name}: no credentials in {url}"
        assert depends_on(service).get("clickhouse") == "service_healthy", name


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
            monkeypatch.setenv(key, interpolate(value, example_env()))
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
    assert urlparse(interpolate(url, example_env())).scheme in {"http", "https"}, url


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


# ---- Grafana -----------------------------------------------------------------------------------

_MACRO = re.compile(r"\$__\w+|\$\{[^}]*\}|\$\w+")
_STRING = re.compile(r"'(?:[^'\\]|\\.)*'")
_IDENTIFIER = re.compile(r"\b([A-Za-z_]\w*)\b(\s*\()?")
_SQL_WORDS = {
    "select", "from", "where", "and", "or", "not", "as", "group", "by", "order", "limit",
    "desc", "asc", "final", "in", "is", "null", "interval", "second",
}  # fmt: skip


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text("utf-8"))
    assert isinstance(data, dict)
    return data


def provisioned_datasource() -> dict[str, Any]:
    config = yaml.safe_load((GRAFANA / "provisioning/datasources/clickhouse.yaml").read_text())
    (source,) = config["datasources"]
    assert isinstance(source, dict)
    return source


def table_columns() -> tuple[str, set[str]]:
    """The metrics table's name and columns, as the code creates it."""
    table = str(Settings.model_fields["metrics_table"].default)
    ddl = metrics_table_ddl(table, 30)
    body = ddl[ddl.index("(") + 1 : ddl.index("ENGINE")]
    columns = set(re.findall(r"^\s*(\w+)\s+\S", body, re.MULTILINE))
    assert {"ts", "deployment_id", "role", "latency_ms", "status"} <= columns, columns
    return table, columns


def queries(dashboard: dict[str, Any]) -> list[str]:
    return [t["rawSql"] for panel in dashboard["panels"] for t in panel.get("targets", [])]


def unknown_names(sql: str, table: str, columns: set[str]) -> set[str]:
    """Names in a query that are neither columns, the table, SQL words, functions nor aliases."""
    text = _STRING.sub("''", _MACRO.sub("0", sql))
    aliases = set(re.findall(r"\bAS\s+(\w+)", text, re.IGNORECASE))
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _SQL_WORDS or name in aliases:
            continue
        names.add(name)
    return names - columns - {table}


def test_the_datasource_is_the_clickhouse_plugin_on_the_compose_server(
    services: dict[str, Service],
) -> None:
    source = provisioned_datasource()
    assert source["type"] == CLICKHOUSE_PLUGIN
    grafana = environment_of(services["grafana"])
    assert CLICKHOUSE_PLUGIN in str(grafana.get("GF_PLUGINS_PREINSTALL_SYNC"))
    assert source["jsonData"]["host"] in services
    assert source["jsonData"]["defaultDatabase"] == load_render().CLICKHOUSE_DATABASE
    for value in (source["jsonData"]["username"], source["secureJsonData"]["password"]):
        variable = str(value).lstrip("$")
        assert variable in grafana, f"Grafana's environment lacks {variable}"


def test_dashboards_are_provisioned_from_the_mounted_folder(services: dict[str, Service]) -> None:
    config = yaml.safe_load((GRAFANA / "provisioning/dashboards/preflight.yaml").read_text())
    (provider,) = config["providers"]
    mounts = {target: source for source, target, _ in volume_mounts(services["grafana"])}
    assert mounts[provider["options"]["path"]] == "./deploy/grafana/dashboards"
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"


def test_the_link_template_opens_the_rollout_dashboard(
    services: dict[str, Service], dashboard: dict[str, Any]
) -> None:
    for name, service in preflight_services(services).items():
        template = interpolate(
            str(environment_of(service)[PREFIX + "METRICS_URL_TEMPLATE"]), example_env()
        )
        url = urlparse(template)
        assert url.path.startswith(f"/d/{dashboard['uid']}/"), (name, template)
        query = parse_qs(url.query)
        assert query == {
            "var-deployment_id": ["{deployment_id}"],
            "from": ["{from_ms}"],
            "to": ["{to_ms}"],
        }, query
        filled = template.format(deployment_id="d-1", model="m", from_ms=1, to_ms=2)
        assert "{" not in filled, filled
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert "deployment_id" in variables


def test_dashboard_panels_query_the_provisioned_datasource(dashboard: dict[str, Any]) -> None:
    uid = provisioned_datasource()["uid"]
    titles = []
    for panel in dashboard["panels"]:
        titles.append(panel["title"].lower())
        for target in panel["targets"]:
            assert target["datasource"] == {"type": CLICKHOUSE_PLUGIN, "uid": uid}, panel["title"]
            assert "${deployment_id:sqlstring}" in target["rawSql"], panel["title"]
            assert "$__timeFilter(ts)" in target["rawSql"], panel["title"]
    assert any("p95" in t for t in titles) and any("error rate" in t for t in titles), titles


def test_dashboard_queries_name_only_real_columns(dashboard: dict[str, Any]) -> None:
    table, columns = table_columns()
    for sql in queries(dashboard):
        assert re.search(rf"\bFROM\s+{table}\b", sql), sql
        assert not unknown_names(sql, table, columns), (unknown_names(sql, table, columns), sql)
    assert unknown_names("SELECT latency FROM request_metrics", table, columns) == {"latency"}


_RUN_QUERIES = """
import json, sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from services.runtime import clickhouse
from services.runtime.settings import Settings

settings = Settings(data_dir=Path(sys.argv[1]))
client = clickhouse.open_client(settings)
clickhouse.ensure_metrics_table(client, settings)
t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
rows = []
for i in range(100):  # stable: latency 1..100 ms, one timeout, streamed: TTFT 2 ms, 9 tokens
    rows.append((t0 + timedelta(seconds=i), "d-1", "m", "1", "stable", float(i + 1), 5.0,
                 2.0, 0.5, 9, 0 if i == 0 else 200, "timeout" if i == 0 else "", "b-stable", i))
for i in range(10):  # canary: latency 201..210 ms, two 5xx, not streamed
    rows.append((t0 + timedelta(seconds=i), "d-1", "m", "2", "canary", float(201 + i), None,
                 None, None, None, 500 if i < 2 else 200, "http_5xx" if i < 2 else "",
                 "b-canary", i))
rows.append((t0, "d-other", "m", "9", "canary", 1.0, None, None, None, None, 500, "x",
             "b-other", 0))
columns = ["ts", "deployment_id", "model", "version", "role", "latency_ms", "ttfb_ms",
           "ttft_ms", "itl_ms", "output_tokens", "status", "error_kind", "batch_id", "seq"]
client.insert(settings.metrics_table, rows, column_names=columns)
start, end = int(t0.timestamp()) - 60, int(t0.timestamp()) + 600
out = []
for sql in json.load(sys.stdin):
    # The plugin's macros and Grafana's variable, as the docs expand them.
    window = f"ts >= toDateTime({start}) AND ts <= toDateTime({end})"
    bucket = "toStartOfInterval(toDateTime(ts), INTERVAL 60 second)"
    sql = (sql.replace("$__timeFilter(ts)", window)
              .replace("$__timeInterval(ts)", bucket)
              .replace("$__interval_s", "60")
              .replace("${deployment_id:sqlstring}", "'d-1'"))
    result = client.query(sql)
    rows = [list(r) for r in result.result_rows]
    out.append({"columns": list(result.column_names), "rows": rows})
print(json.dumps(out, default=str))
"""


@pytest.mark.integration
def test_dashboard_queries_run_on_the_clickhouse_engine(
    dashboard: dict[str, Any], tmp_path: Path
) -> None:
    """Every panel's SQL, macros expanded, runs on chDB against the table the code creates."""
    sqls = queries(dashboard)
    proc = subprocess.run(
        [sys.executable, "-c", _RUN_QUERIES, str(tmp_path)],
        input=json.dumps(sqls),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)
    assert len(results) == len(sqls)
    for sql, result in zip(sqls, results, strict=True):
        assert result["rows"], f"no rows for known data: {sql}"
    summary = next(r for r in results if "error_rate" in r["columns"])
    by_role = {row[0]: dict(zip(summary["columns"], row, strict=True)) for row in summary["rows"]}
    assert by_role["canary"]["requests"] == 10 and by_role["stable"]["requests"] == 100
    assert by_role["canary"]["error_rate"] == pytest.approx(0.2)
    assert by_role["stable"]["error_rate"] == pytest.approx(0.01)
    assert by_role["canary"]["p95_ms"] > by_role["stable"]["p95_ms"]
    assert by_role["stable"]["ttft_p95_ms"] == 2.0 and by_role["canary"]["ttft_p95_ms"] is None
    assert by_role["stable"]["output_tokens"] == 900
    # Output tokens per second: 9 tokens, 8 gaps of 0.5 ms: 9 / 0.004 s = 2250 tokens/s.
    speed = next(r for sql, r in zip(sqls, results, strict=True) if "(output_tokens - 1)" in sql)
    stable_speeds = [row[1] for row in speed["rows"] if row[1] is not None]
    assert stable_speeds and all(v == pytest.approx(2250) for v in stable_speeds)


# NATS users and permissions on a real nats-server: tests/integration/test_nats_permissions.py.


def test_services_start_after_bootstrap_made_the_topology(services: dict[str, Service]) -> None:
    bootstrap = services["bootstrap"]
    assert argv_of(bootstrap)[-1:] == ["bootstrap"]  # the image's entrypoint is preflight
    env = environment_of(bootstrap)
    assert env["PREFLIGHT_NATS_USER"] == "admin"
    assert substituted_names(str(env["PREFLIGHT_NATS_PASSWORD"])) == {"NATS_ADMIN_PASSWORD"}
    assert bootstrap.get("restart") == "no"
    for name in EXPECTED_SERVICES:
        assert depends_on(services[name]).get("bootstrap") == "service_completed_successfully"
        assert "admin" not in str(environment_of(services[name]).get("PREFLIGHT_NATS_USER"))


def test_two_canary_controllers_each_with_a_page(services: dict[str, Service]) -> None:
    controller = services["canary-controller"]
    assert controller["deploy"]["replicas"] == 2
    (port,) = controller["ports"]
    assert re.search(r"\}-\$\{CONTROLLER_STANDBY_PORT:-8472\}:8471$", str(port)), port


def _gpus_of(service: Service) -> set[str] | None:
    """The GPUs Docker gives each container of a service: `count: N` is devices 0..N-1 in every
    replica, `device_ids` exactly those; None when it reserves none. `all` stands for every GPU."""
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {})
    gpus: set[str] = set()
    requests = [d for d in devices.get("devices", []) if d.get("driver") == "nvidia"]
    for request in requests:
        assert not ("count" in request and "device_ids" in request), "Docker refuses both"
        count = request.get("count")
        gpus |= {"all"} if count == "all" else {str(i) for i in range(int(count or 0))}
        gpus |= {str(i) for i in request.get("device_ids", [])}
    return gpus if requests else None


def test_the_gpu_override_says_which_gpu_each_benchmarker_gets() -> None:
    """Replicas of one service all get the same devices, so one GPU per benchmarker takes one
    service per GPU; the override and the recipe in its header say so, and pin distinct ids."""
    text = GPU_OVERRIDE.read_text("utf-8")
    override = yaml.safe_load(text)
    assert "each replica reserves its own GPU" not in text
    assert "device 0" in text
    recipe = text.split("# --- one service per extra GPU ---\n", 1)[1].split("# --- end ---")[0]
    extra = yaml.safe_load("\n".join(line.removeprefix("# ") for line in recipe.splitlines()))
    base = yaml.safe_load(COMPOSE_FILE.read_text("utf-8"))["services"]
    taken: dict[str, str] = {}
    for name, service in {**override["services"], **extra["services"]}.items():
        gpus = _gpus_of(service)
        assert gpus, f"{name} reserves no GPU"
        assert "all" not in gpus, f"{name} would see every GPU and use device 0"
        assert service.get("deploy", {}).get("replicas", 1) == 1, f"{name}: replicas share GPUs"
        for gpu in gpus:
            assert gpu not in taken, f"{name} and {taken[gpu]} both get GPU {gpu}"
            taken[gpu] = name
        if "extends" in service:
            assert service["extends"] == {"file": COMPOSE_FILE.name, "service": "benchmarker"}
            assert set(service["depends_on"]) == set(base["benchmarker"]["depends_on"])
    assert taken == {"0": "benchmarker", "1": "benchmarker-gpu1"}
