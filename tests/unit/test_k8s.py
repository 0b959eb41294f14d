"""deploy/k8s checked statically: Kubernetes schemas (offline), kustomize, KEDA, compose twin."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from services.contracts import subjects
from services.contracts.policy import load_policy_file
from services.runtime.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text("utf-8"))
NATS_CONF = ROOT / "deploy" / "nats" / "nats.conf"
PREFIX = "PREFLIGHT_"
# Untyped package: imported as Any rather than with a type: ignore the mypy config may outdate.
kubernetes_validate: Any = importlib.import_module("kubernetes_validate")
kubernetes_schemas: Any = importlib.import_module("kubernetes_validate.utils")

# The oldest Kubernetes we claim to support; kubernetes-validate ships schemas up to its latest.
KUBERNETES_VERSION = "1.31.0"
BUILT_IN_GROUPS = {"v1", "apps/v1", "batch/v1", "policy/v1", "networking.k8s.io/v1"}
SERVICES = (
    "validator",
    "benchmarker",
    "canary-controller",
    "notifier",
    "router",
    "metrics-ingest",
    "envoy-receiver",
)
HTTP_PORTS = {"canary-controller": 8471, "router": 8480, "envoy-receiver": 9903}
# The settings naming each web service's HTTP port and host.
HTTP_SETTINGS = {
    "canary-controller": ("CONTROLLER_HTTP_PORT", "CONTROLLER_HTTP_HOST"),
    "router": ("ROUTER_PORT", "ROUTER_HOST"),
    "envoy-receiver": ("ENVOY_RECEIVER_HTTP_PORT", "ENVOY_RECEIVER_HOST"),
}
# The Envoy access-log receiver is a data plane's record source: it is the router's NATS user.
NATS_USER_OF = {"envoy-receiver": "router"}
# Trigger metadata the KEDA nats-jetstream scaler documents (keda.sh/docs/scalers/nats-jetstream).
KEDA_NATS_REQUIRED = {
    "natsServerMonitoringEndpoint",
    "account",
    "stream",
    "consumer",
    "lagThreshold",
}
KEDA_NATS_OPTIONAL = {"activationLagThreshold", "useHttps"}

Doc = dict[str, Any]


# ---- reading ------------------------------------------------------------------------------------


def kustomization(directory: Path) -> Doc:
    data = yaml.safe_load((directory / "kustomization.yaml").read_text("utf-8"))
    assert isinstance(data, dict)
    return data


def manifest_files() -> list[Path]:
    return [BASE / name for name in kustomization(BASE)["resources"]]


def documents(path: Path) -> list[Doc]:
    docs = [d for d in yaml.safe_load_all(path.read_text("utf-8")) if d is not None]
    assert docs, f"{path} holds no document"
    return docs


@pytest.fixture(scope="module")
def resources() -> list[Doc]:
    return [doc for path in manifest_files() for doc in documents(path)]


def of_kind(resources: list[Doc], kind: str) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in resources if d["kind"] == kind}


def container(deployment: Doc) -> Doc:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    assert isinstance(only, dict)
    return only


def env_names(directory: Path, env_file: str) -> dict[str, str]:
    lines = (directory / env_file).read_text("utf-8").splitlines()
    pairs = (line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def generated(directory: Path, section: str) -> dict[str, Doc]:
    return {g["name"]: g for g in kustomization(directory).get(section, [])}


def strings_in(node: object) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from strings_in(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings_in(item)


def settings_env_names() -> set[str]:
    return {PREFIX + name.upper() for name in Settings.model_fields}


def nats_users() -> dict[str, str]:
    text = NATS_CONF.read_text("utf-8")
    return dict(re.findall(r"user:\s*([\w-]+)\s*\n\s*password:\s*\$(\w+)", text))


def kustomize(directory: Path) -> list[Doc]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with kustomize) is not installed")
    built = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=False
    )
    assert built.returncode == 0, built.stderr[-2000:]
    return [d for d in yaml.safe_load_all(built.stdout) if d is not None]


def validate_built_in(doc: Doc) -> None:
    if doc["apiVersion"] not in BUILT_IN_GROUPS:
        return
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")


# ---- files and kustomize wiring ---------------------------------------------------------------


def test_every_manifest_parses_and_names_itself() -> None:
    for path in sorted(K8S.rglob("*.yaml")):
        if "config" in path.relative_to(K8S).parts or path.name.startswith("policy"):
            continue  # policy documents (copies, or examples' snippets), not Kubernetes objects
        for doc in documents(path):
            assert isinstance(doc, dict), path
            if path.name == "kustomization.yaml":
                assert doc["kind"] == "Kustomization", path
                continue
            assert doc.get("apiVersion") and doc.get("kind"), path
            assert doc.get("metadata", {}).get("name"), f"{path}: {doc['kind']} has no name"


@pytest.mark.parametrize("directory", [BASE, *OVERLAYS], ids=lambda p: p.name)
def test_kustomization_files_exist(directory: Path) -> None:
    spec = kustomization(directory)
    for resource in spec.get("resources", []):
        assert (directory / resource).exists(), f"{directory.name}: no {resource}"
    for section in ("configMapGenerator", "secretGenerator"):
        for generator in spec.get(section, []):
            for entry in generator.get("files", []):
                source = entry.split("=", 1)[-1]
                assert (directory / source).is_file(), f"{directory.name}: no {source}"
            for env_file in generator.get("envs", []):
                assert (directory / env_file).is_file(), f"{directory.name}: no {env_file}"
    assert OVERLAYS, "no overlay example under deploy/k8s/overlays"


def test_every_manifest_in_base_is_a_resource() -> None:
    listed = {BASE / name for name in kustomization(BASE)["resources"]}
    on_disk = {p for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert on_disk == listed, sorted(str(p.name) for p in on_disk ^ listed)


def test_generated_policy_and_nats_config_are_the_deploy_originals() -> None:
    files = {
        entry.split("=", 1)[0]: BASE / entry.split("=", 1)[1]
        for generator in kustomization(BASE)["configMapGenerator"]
        for entry in generator.get("files", [])
    }
    assert files["policy.yaml"].read_bytes() == (ROOT / "deploy/policy.yaml").read_bytes()
    assert files["nats.conf"].read_bytes() == NATS_CONF.read_bytes()
    load_policy_file(files["policy.yaml"])


# ---- schemas ------------------------------------------------------------------------------------


def test_the_chosen_kubernetes_version_has_bundled_schemas() -> None:
    bundled = kubernetes_schemas.all_versions()
    assert any(v.startswith(KUBERNETES_VERSION.rsplit(".", 1)[0]) for v in bundled), bundled


def test_built_in_kinds_validate_against_the_kubernetes_schemas(resources: list[Doc]) -> None:
    checked = [doc for doc in resources if doc["apiVersion"] in BUILT_IN_GROUPS]
    assert {d["kind"] for d in checked} >= {"Deployment", "StatefulSet", "Service", "Namespace"}
    for doc in checked:
        validate_built_in(doc)


def test_the_validator_rejects_a_broken_deployment(resources: list[Doc]) -> None:
    broken = yaml.safe_load(yaml.safe_dump(of_kind(resources, "Deployment")["router"]))
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = "Sometimes"
    broken["spec"]["replicass"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("directory", [BASE, *OVERLAYS], ids=lambda p: p.name)
def test_kustomize_builds_and_the_output_validates(directory: Path) -> None:
    built = kustomize(directory)
    kinds = {d["kind"] for d in built}
    assert {"ConfigMap", "Secret", "Deployment", "ScaledObject"} <= kinds, kinds
    for doc in built:
        assert doc["metadata"].get("namespace", "preflight") == "preflight" or doc["kind"] in {
            "Namespace"
        }
        validate_built_in(doc)
    deployments = {d["metadata"]["name"]: d for d in built if d["kind"] == "Deployment"}
    for name, deployment in deployments.items():
        volumes = deployment["spec"]["template"]["spec"]["volumes"]
        names = {d["metadata"]["name"] for d in built if d["kind"] == "ConfigMap"}
        for volume in volumes:
            if "configMap" in volume:
                assert volume["configMap"]["name"] in names, (name, volume)


# ---- services -----------------------------------------------------------------------------------


def test_one_deployment_per_service(resources: list[Doc]) -> None:
    assert set(of_kind(resources, "Deployment")) == set(SERVICES)


@pytest.mark.parametrize("name", SERVICES)
def test_images_and_commands_match_compose(resources: list[Doc], name: str) -> None:
    deployment = of_kind(resources, "Deployment")[name]
    compose = COMPOSE["services"][name]
    spec = container(deployment)
    assert spec["args"] == compose["command"], name
    assert "command" not in spec, f"{name}: keep the image's ENTRYPOINT (preflight)"
    assert spec["image"] == str(compose["image"]).split(":")[0], name
    images = {i["name"] for i in kustomization(BASE)["images"]}
    assert spec["image"] in images, f"{name}: image {spec['image']} has no tag in kustomization"


@pytest.mark.parametrize("name", SERVICES)
def test_each_service_connects_as_its_own_nats_user(resources: list[Doc], name: str) -> None:
    env = {e["name"]: e for e in container(of_kind(resources, "Deployment")[name])["env"]}
    user = NATS_USER_OF.get(name, name)
    assert env[PREFIX + "NATS_USER"]["value"] == user
    ref = env[PREFIX + "NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == "preflight-nats-users"
    assert ref["key"] == nats_users()[user], name
    (generator,) = [g for g in kustomization(BASE)["secretGenerator"] if g["name"] == ref["name"]]
    assert set(env_names(BASE, generator["envs"][0])) == set(nats_users().values())


def test_preflight_variables_are_settings(resources: list[Doc]) -> None:
    known = settings_env_names()
    used: set[str] = set()
    for deployment in of_kind(resources, "Deployment").values():
        used |= {e["name"] for e in container(deployment).get("env", [])}
    for directory in (BASE, *OVERLAYS):
        spec = kustomization(directory)
        for generator in spec.get("configMapGenerator", []):
            used |= {lit.split("=", 1)[0] for lit in generator.get("literals", [])}
        for generator in spec.get("secretGenerator", []):
            for env_file in generator.get("envs", []):
                used |= set(env_names(directory, env_file))
    preflight = {n for n in used if n.startswith(PREFIX)}
    assert preflight, "no PREFLIGHT_* variable found: is the reading broken?"
    assert preflight <= known, sorted(preflight - known)
    assert used - preflight <= set(nats_users().values()), sorted(used - preflight)


def test_settings_point_at_the_cluster_services(resources: list[Doc]) -> None:
    (settings,) = [
        g for g in kustomization(BASE)["configMapGenerator"] if g["name"] == "preflight-settings"
    ]
    literals = dict(lit.split("=", 1) for lit in settings["literals"])
    nats_url = urlparse(literals[PREFIX + "NATS_URL"])
    service = of_kind(resources, "Service")[nats_url.hostname or ""]
    assert nats_url.port in {p["port"] for p in service["spec"]["ports"]}
    template = literals[PREFIX + "METRICS_URL_TEMPLATE"]
    assert "/d/preflight-rollout/" in template and "{deployment_id}" in template
    mounts = {
        m["mountPath"]: m["name"]
        for m in container(of_kind(resources, "Deployment")["validator"])["volumeMounts"]
    }
    policy = Path(literals[PREFIX + "POLICY_FILE"])
    assert mounts[str(policy.parent)] == "policy"


@pytest.mark.parametrize("name", SERVICES)
def test_probes_http_for_web_services_and_the_cli_for_the_others(
    resources: list[Doc], name: str
) -> None:
    spec = container(of_kind(resources, "Deployment")[name])
    for probe in ("livenessProbe", "readinessProbe"):
        if name in HTTP_PORTS:
            get = spec[probe]["httpGet"]
            ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
            assert get["path"] == "/healthz" and ports[get["port"]] == HTTP_PORTS[name]
            env = {e["name"]: e.get("value") for e in spec["env"]}
            port_setting, host_setting = HTTP_SETTINGS[name]
            assert env[f"{PREFIX}{port_setting}"] == str(HTTP_PORTS[name])
            assert env[f"{PREFIX}{host_setting}"] == "0.0.0.0"
        else:
            assert spec[probe]["exec"]["command"] == ["preflight", "service", "health", name]


@pytest.mark.parametrize("name", SERVICES)
def test_pods_run_non_root_on_a_read_only_root_with_resources(
    resources: list[Doc], name: str
) -> None:
    pod = of_kind(resources, "Deployment")[name]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the images' user (Dockerfile)
    assert pod["automountServiceAccountToken"] is False
    spec = container(of_kind(resources, "Deployment")[name])
    security = spec["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    writable = {m["mountPath"] for m in spec["volumeMounts"] if not m.get("readOnly")}
    assert {"/tmp", "/var/lib/preflight"} <= writable, writable
    assert spec["resources"]["requests"]["cpu"] and spec["resources"]["requests"]["memory"]
    assert spec["resources"]["limits"]["memory"]


def test_two_canary_controllers_one_active_by_lease(resources: list[Doc]) -> None:
    controller = of_kind(resources, "Deployment")["canary-controller"]
    assert controller["spec"]["replicas"] == 2
    # A rolling update never stops both: the standby holds on while the other restarts.
    assert controller["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 1


def test_bootstrap_runs_as_admin_and_nothing_else_does(resources: list[Doc]) -> None:
    (job,) = of_kind(resources, "Job").values()
    spec = job["spec"]["template"]["spec"]["containers"][0]
    assert spec["args"] == ["bootstrap"]
    env = {e["name"]: e for e in spec["env"]}
    assert env[PREFIX + "NATS_USER"]["value"] == "admin"
    ref = env[PREFIX + "NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref["key"] == "NATS_ADMIN_PASSWORD"
    for name, deployment in of_kind(resources, "Deployment").items():
        assert "NATS_ADMIN_PASSWORD" not in json.dumps(deployment), name


def test_services_route_to_their_deployments(resources: list[Doc]) -> None:
    deployments = of_kind(resources, "Deployment")
    workloads = {**deployments, **of_kind(resources, "StatefulSet")}
    for name, service in of_kind(resources, "Service").items():
        selector = service["spec"]["selector"]
        matches = [
            w
            for w in workloads.values()
            if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert matches, f"Service {name} selects no pods"
    assert {"router", "canary-controller", "nats"} <= set(of_kind(resources, "Service"))


def test_metrics_services_read_clickhouse_from_the_secret(resources: list[Doc]) -> None:
    (generator,) = [
        g for g in kustomization(BASE)["secretGenerator"] if g["name"] == "preflight-clickhouse"
    ]
    keys = set(env_names(BASE, generator["envs"][0]))
    for name in ("canary-controller", "metrics-ingest"):
        env = {e["name"]: e for e in container(of_kind(resources, "Deployment")[name])["env"]}
        ref = env[PREFIX + "CLICKHOUSE_URL"]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "preflight-clickhouse" and ref["key"] in keys, name


def test_base_secrets_are_obvious_placeholders() -> None:
    for generator in kustomization(BASE)["secretGenerator"]:
        for env_file in generator["envs"]:
            for name, value in env_names(BASE, env_file).items():
                assert "CHANGE-ME" in value, f"{env_file}: {name} looks like a real secret"


def test_nats_runs_the_shared_config_with_jetstream_on_a_volume(resources: list[Doc]) -> None:
    nats = of_kind(resources, "StatefulSet")["nats"]
    spec = container(nats)
    assert spec["image"] == COMPOSE["services"]["nats"]["image"]
    assert spec["args"] == COMPOSE["services"]["nats"]["command"]
    store = re.search(r"store_dir:\s*(\S+)", NATS_CONF.read_text("utf-8"))
    assert store
    mounts = {m["mountPath"]: m["name"] for m in spec["volumeMounts"]}
    claims = {c["metadata"]["name"] for c in nats["spec"]["volumeClaimTemplates"]}
    assert mounts[store.group(1)] in claims
    assert spec["envFrom"] == [{"secretRef": {"name": "preflight-nats-users"}}]
    assert "js-enabled-only=true" in spec["livenessProbe"]["httpGet"]["path"]


def test_only_keda_reaches_the_nats_monitoring_port(resources: list[Doc]) -> None:
    """/connz names every connection's inboxes (review 13 froze the router's watch with them):
    clients get the client port from anywhere, the monitoring port only KEDA's namespace."""
    policy = of_kind(resources, "NetworkPolicy")["nats"]["spec"]
    pod = of_kind(resources, "StatefulSet")["nats"]["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod.items()
    assert policy["policyTypes"] == ["Ingress"]
    ports = {
        p["name"]: p["containerPort"]
        for p in container(of_kind(resources, "StatefulSet")["nats"])["ports"]
    }
    opened = {}
    for rule in policy["ingress"]:
        for port in rule["ports"]:
            opened[port["port"]] = rule.get("from", "anywhere")
    assert set(opened) == {"client", "monitor"} <= set(ports)
    assert opened["client"] == "anywhere"
    keda = {"kubernetes.io/metadata.name": "keda"}
    assert opened["monitor"] == [{"namespaceSelector": {"matchLabels": keda}}]
    scaler = of_kind(resources, "ScaledObject")["benchmarker"]["spec"]["triggers"][0]
    assert scaler["metadata"]["natsServerMonitoringEndpoint"].endswith(f":{ports['monitor']}")


# ---- KEDA ---------------------------------------------------------------------------------------


def test_keda_scales_the_benchmarker_on_its_consumer_lag(resources: list[Doc]) -> None:
    (scaled,) = of_kind(resources, "ScaledObject").values()
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] in of_kind(resources, "Deployment")
    assert spec["scaleTargetRef"]["name"] == "benchmarker"
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "nats-jetstream"
    metadata = trigger["metadata"]
    assert KEDA_NATS_REQUIRED <= set(metadata) <= KEDA_NATS_REQUIRED | KEDA_NATS_OPTIONAL
    assert all(isinstance(v, str) for v in metadata.values()), "KEDA metadata values are strings"
    assert metadata["stream"] == subjects.EVENTS_STREAM
    assert metadata["consumer"] == subjects.BENCHMARKER_DURABLE
    assert metadata["account"] == "$G"  # nats.conf has users but no accounts
    assert int(metadata["lagThreshold"]) >= 1
    host, port = metadata["natsServerMonitoringEndpoint"].rsplit(":", 1)
    service, namespace = host.split(".")[:2]
    assert namespace == kustomization(BASE)["namespace"]
    ports = {p["port"] for p in of_kind(resources, "Service")[service]["spec"]["ports"]}
    assert int(port) in ports
    assert re.search(r"^http_port:\s*" + port, NATS_CONF.read_text("utf-8"), re.MULTILINE)


def test_no_manifest_mentions_a_variable_compose_would_interpolate() -> None:
    """`${VAR}` in a manifest is not substituted by kubectl; it would reach the pod literally."""
    for path in manifest_files():
        for text in strings_in(documents(path)):
            assert "${" not in text, f"{path.name}: {text}"


# ---- KEDA owns the benchmarker's scale, in whatever namespace kustomize renders -----------------


@pytest.mark.parametrize("directory", [BASE, *OVERLAYS], ids=lambda p: p.name)
def test_only_keda_sets_the_benchmarker_replica_count(directory: Path) -> None:
    """A `replicas` in the Deployment would reset the HPA's count at every `kubectl apply`."""
    built = kustomize(directory)
    (scaled,) = (d for d in built if d["kind"] == "ScaledObject")
    target = scaled["spec"]["scaleTargetRef"]["name"]
    (deployment,) = (
        d for d in built if d["kind"] == "Deployment" and d["metadata"]["name"] == target
    )
    assert "replicas" not in deployment["spec"], f"{directory.name}: KEDA's HPA sets {target}'s"
    assert scaled["spec"]["minReplicaCount"] >= 1  # what an absent count would start from: 1


def _monitoring_namespace(scaled: Doc) -> str:
    (trigger,) = scaled["spec"]["triggers"]
    host = trigger["metadata"]["natsServerMonitoringEndpoint"].rsplit(":", 1)[0]
    service, namespace, *rest = host.split(".")
    assert service == "nats" and rest == ["svc", "cluster", "local"], host
    return str(namespace)


@pytest.mark.parametrize("directory", [BASE, *OVERLAYS], ids=lambda p: p.name)
def test_keda_reaches_nats_in_the_namespace_kustomize_renders(directory: Path) -> None:
    """KEDA polls from its own namespace: the endpoint must name the one NATS runs in."""
    built = kustomize(directory)
    (scaled,) = (d for d in built if d["kind"] == "ScaledObject")
    (nats,) = (d for d in built if d["kind"] == "Service" and d["metadata"]["name"] == "nats")
    assert _monitoring_namespace(scaled) == nats["metadata"]["namespace"]
    assert scaled["metadata"]["namespace"] == nats["metadata"]["namespace"]


def _with_namespace(tmp_path: Path, where: str, namespace: str) -> Path:
    """A copy of deploy/k8s whose base, or example overlay, sets another namespace."""
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    path = copy / where / "kustomization.yaml"
    doc = yaml.safe_load(path.read_text("utf-8"))
    doc["namespace"] = namespace
    path.write_text(yaml.safe_dump(doc, sort_keys=False), "utf-8")
    return copy / "overlays" / "example"


@pytest.mark.parametrize("where", ["base", "overlays/example"])
def test_a_namespace_set_in_kustomize_reaches_the_scaledobject(where: str, tmp_path: Path) -> None:
    built = kustomize(_with_namespace(tmp_path, where, "ml-platform"))
    (scaled,) = (d for d in built if d["kind"] == "ScaledObject")
    assert scaled["metadata"]["namespace"] == "ml-platform"
    assert _monitoring_namespace(scaled) == "ml-platform"


def test_the_token_goes_only_to_the_configured_api_url() -> None:
    """A request that could name `api_url` received the controller's token at its own server
    (review 13, F4): the token belongs to PREFLIGHT_KUBE_API_URL."""
    from types import SimpleNamespace

    from services.traffic.k8s import KubeOptions, configure

    settings = SimpleNamespace(kube_api_url="https://kubernetes.internal:6443", kube_token="T0K")
    ref = {"namespace": "models", "name": "chat"}
    own, _ = configure(KubeOptions(**ref), settings)
    assert own.host == "https://kubernetes.internal:6443"
    assert own.api_key == {"BearerToken": "T0K"}
    same, _ = configure(KubeOptions(**ref, api_url="https://kubernetes.internal:6443/"), settings)
    assert same.api_key == {"BearerToken": "T0K"}
    other, where = configure(KubeOptions(**ref, api_url="http://127.0.0.1:9999"), settings)
    assert other.host == "http://127.0.0.1:9999" and not other.api_key
    assert "options" in where
