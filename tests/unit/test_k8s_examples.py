"""deploy/k8s/examples/{gateway-api,istio,kserve} checked statically: kustomize renders each, the
CRD-typed objects fit the vendored CRDs (tests/schemas/k8s/), the built-in ones the Kubernetes
schemas, the RBAC grants exactly what the router calls, and the policy snippet builds the router
that patches the example object."""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from services.contracts.events import Route, RouteTarget
from services.contracts.policy import PolicyFile, load_policy_file
from services.traffic import build
from services.traffic.gateway_api import GatewayApiRouter
from services.traffic.istio import IstioRouter
from services.traffic.kserve import KServeRouter
from tests.k8s_api import KubeApiServer, crd_for, object_problems

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "deploy" / "k8s" / "examples"
BASE = ROOT / "deploy" / "k8s" / "base"
ROUTERS = ("gateway-api", "istio", "kserve")
INITIAL = {
    "gateway-api": "initial-rules.yaml",
    "istio": "initial-http.yaml",
    "kserve": "initial-model.yaml",
}
MODEL = "org/chat-7b"
STABLE = RouteTarget(version="2024-06-01", location="s3://models/org/chat-7b/2024-06-01")
NOT_VENDORED = {"DestinationRule"}
"""Kinds in the examples whose CRD is not vendored (SOURCES.md: only Istio's VirtualService)."""
BUILT_IN = {"v1", "rbac.authorization.k8s.io/v1"}
KUBERNETES_VERSION = "1.31.0"
# Untyped package: imported as Any rather than with a type: ignore the mypy config may outdate.
kubernetes_validate: Any = importlib.import_module("kubernetes_validate")

Doc = dict[str, Any]
AnyRouter = GatewayApiRouter | IstioRouter | KServeRouter


def kustomize(directory: Path) -> list[Doc]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with kustomize) is not installed: cannot render the examples")
    built = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=False
    )
    assert built.returncode == 0, built.stderr[-2000:]
    return [d for d in yaml.safe_load_all(built.stdout) if d is not None]


def router_for(name: str) -> AnyRouter:
    """The router the example's policy snippet configures, built as the controller builds it."""
    policy = load_policy_file(EXAMPLES / name / "policy.yaml").resolve(model=MODEL)
    assert policy.canary.traffic.router == name
    router = build(name, policy.canary.traffic.options, SimpleNamespace())
    assert isinstance(router, GatewayApiRouter | IstioRouter | KServeRouter)
    return router


def by_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


@pytest.mark.parametrize("name", ROUTERS)
def test_example_objects_fit_their_schemas(name: str) -> None:
    docs = kustomize(EXAMPLES / name)
    unchecked = set()
    for doc in docs:
        where = f"{name}: {doc['kind']}/{doc['metadata']['name']}"
        if doc["apiVersion"] in BUILT_IN:
            try:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{where}: {'.'.join(str(p) for p in exc.path)}: {exc.message}")
        elif doc["kind"] in NOT_VENDORED:
            unchecked.add(doc["kind"])
        else:
            assert object_problems(doc) == [], where
    assert unchecked <= NOT_VENDORED


@pytest.mark.parametrize("name", ROUTERS)
def test_initial_fields_merge_into_a_valid_object(name: str) -> None:
    """`kubectl apply --server-side -k` then the initial file as preflight: the object the
    router starts from fits its CRD, and preflight owns exactly the initial file's fields."""
    router = router_for(name)
    kube = KubeApiServer(controller="never")
    for doc in kustomize(EXAMPLES / name):
        if doc["kind"] == router.ref.resource.kind:
            kube.apply(doc, manager="kubectl")
    initial = yaml.safe_load((EXAMPLES / name / INITIAL[name]).read_text("utf-8"))
    obj = kube.apply(initial, manager="preflight")
    assert object_problems(obj) == []
    crd, _ = crd_for(initial["apiVersion"], initial["kind"])
    owners = kube.managers(crd.plural, router.ref.namespace, router.ref.name)
    assert not owners["preflight"] & owners["kubectl"], "the platform manifest holds preflight's"


@pytest.mark.parametrize("name", ROUTERS)
def test_initial_file_is_what_the_router_writes_for_the_stable_alone(name: str) -> None:
    router = router_for(name)
    initial = yaml.safe_load((EXAMPLES / name / INITIAL[name]).read_text("utf-8"))
    assert initial["metadata"] == {"name": router.ref.name, "namespace": router.ref.namespace}
    stable_only = Route(model=MODEL, stable=STABLE)
    if isinstance(router, KServeRouter):
        (isvc,) = by_kind(kustomize(EXAMPLES / name), "InferenceService")
        wanted = router.manifest(stable_only, isvc)
    else:
        wanted = router.manifest(stable_only)
    assert initial == wanted


@pytest.mark.parametrize("name", ROUTERS)
def test_rbac_grants_exactly_what_the_router_calls(name: str) -> None:
    router = router_for(name)
    res = router.ref.resource
    docs = kustomize(EXAMPLES / name)
    (role,) = by_kind(docs, "Role")
    (binding,) = by_kind(docs, "RoleBinding")
    # get: read back and the look before each write; patch: server-side apply. Nothing else.
    assert role["rules"] == [
        {
            "apiGroups": [res.group],
            "resources": [res.plural],
            "resourceNames": [router.ref.name],
            "verbs": ["get", "patch"],
        }
    ]
    assert role["metadata"]["namespace"] == router.ref.namespace
    assert binding["metadata"]["namespace"] == router.ref.namespace
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    base = yaml.safe_load((BASE / "kustomization.yaml").read_text("utf-8"))
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "canary-controller", "namespace": base["namespace"]}
    ]
    # ... and the object that Role names is the one in the example
    (obj,) = by_kind(docs, res.kind)
    assert obj["metadata"]["name"] == router.ref.name
    assert obj["metadata"]["namespace"] == router.ref.namespace
    assert obj["apiVersion"] == res.api_version


def test_the_controller_the_rbac_names_runs_in_the_base() -> None:
    names = {
        (d["kind"], d["metadata"]["name"])
        for d in yaml.safe_load_all((BASE / "canary-controller.yaml").read_text("utf-8"))
        if d
    }
    assert ("Deployment", "canary-controller") in names


# ---- the docs pages: their overlay and policy work as written ---------------------------------


def doc_files(name: str) -> dict[str, str]:
    """The files a docs page gives whole: a fenced block right after `<!-- file: NAME -->`."""
    lines = (ROOT / "docs" / "data-planes" / f"{name}.md").read_text("utf-8").splitlines()
    files: dict[str, str] = {}
    for i, line in enumerate(lines):
        match = re.fullmatch(r"\s*<!-- file: (\S+) -->", line)
        if match is None:
            continue
        start = next(j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("```"))
        end = next(j for j in range(start + 1, len(lines)) if lines[j].strip() == "```")
        files[match.group(1)] = textwrap.dedent("\n".join(lines[start + 1 : end])) + "\n"
    return files


def doc_yaml_blocks(name: str) -> list[Any]:
    text = (ROOT / "docs" / "data-planes" / f"{name}.md").read_text("utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL)
    return [yaml.safe_load(textwrap.dedent(b)) for b in blocks]


@pytest.mark.parametrize("name", ROUTERS)
def test_the_docs_overlay_renders_and_gives_the_controller_its_account(
    name: str, tmp_path: Path
) -> None:
    """The page's overlay, laid next to the real base, example overlay and examples (symlinks:
    kustomize takes relative roots only), renders: the canary-controller runs as the
    ServiceAccount the RoleBinding names, with its token mounted."""
    files = doc_files(name)
    assert set(files) == {"kustomization.yaml", "canary-controller-sa.yaml"}
    k8s = tmp_path / "deploy" / "k8s"
    (k8s / "overlays" / "production").mkdir(parents=True)
    (k8s / "base").symlink_to(BASE)
    (k8s / "examples").symlink_to(EXAMPLES)
    (k8s / "overlays" / "example").symlink_to(BASE.parent / "overlays" / "example")
    for file, text in files.items():
        (k8s / "overlays" / "production" / file).write_text(text, "utf-8")
    docs = kustomize(k8s / "overlays" / "production")
    (deployment,) = [
        d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "canary-controller"
    ]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "canary-controller"
    assert pod["automountServiceAccountToken"] is True
    namespace = deployment["metadata"]["namespace"]
    assert [
        (d["metadata"]["name"], d["metadata"]["namespace"]) for d in by_kind(docs, "ServiceAccount")
    ] == [("canary-controller", namespace)]
    (binding,) = by_kind(docs, "RoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "canary-controller", "namespace": namespace}
    ]
    router = router_for(name)
    assert [d["kind"] for d in docs if d["kind"] == router.ref.resource.kind] == [
        router.ref.resource.kind
    ]


@pytest.mark.parametrize("name", ROUTERS)
def test_the_docs_policy_is_the_examples(name: str) -> None:
    example = load_policy_file(EXAMPLES / name / "policy.yaml").resolve(model=MODEL)
    shown = [b for b in doc_yaml_blocks(name) if isinstance(b, dict) and "models" in b]
    assert len(shown) == 1, "one policy snippet per page"
    (layer,) = shown
    documented = PolicyFile.model_validate(layer).resolve(model=MODEL)
    assert documented.canary.traffic == example.canary.traffic
