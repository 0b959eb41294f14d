"""The Kubernetes routers (gateway-api, istio, kserve) through the real `kubernetes` client.

No cluster: the client talks HTTP to tests/k8s_api.py, a local server shaped like the
Kubernetes API that checks every applied object against the official CRD schemas vendored in
tests/schemas/k8s/ (SOURCES.md), keeps server-side apply's field ownership and plays the
controllers that write status. The objects the routers start from are the examples in
deploy/k8s/examples/, created as `kubectl apply --server-side` would, with their `initial-*`
file applied as preflight. Nothing here mocks the client.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from services.contracts.events import Route, RouteTarget
from services.traffic import Applied, RouterConfigError, RouterError, TrafficRouter, build
from services.traffic.base import PIN_HEADER
from services.traffic.k8s import FIELD_MANAGER
from tests.k8s_api import TOKEN, KubeApiServer, crd_for, object_problems, unknown_fields

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "deploy" / "k8s" / "examples"
MODEL = "org/chat-7b"
V1, V2, V3 = "2024-06-01", "2024-07-01", "2024-08-01"
FAST = {"retry_backoff_s": 0.001, "timeout_s": 5.0}
FILES = {
    "gateway-api": ("httproute.yaml", "initial-rules.yaml"),
    "istio": ("virtualservice.yaml", "initial-http.yaml"),
    "kserve": ("inferenceservice.yaml", "initial-model.yaml"),
}
PLURALS = {"gateway-api": "httproutes", "istio": "virtualservices", "kserve": "inferenceservices"}
Obj = dict[str, Any]


def target(version: str) -> RouteTarget:
    return RouteTarget(
        version=version, location=f"s3://models/org/chat-7b/{version}", deployment_id=f"d-{version}"
    )


def route(stable: str | None = V1, canary: str | None = V2, weight: float = 5.0) -> Route:
    return Route(
        model=MODEL,
        stable=target(stable) if stable else None,
        canary=target(canary) if canary else None,
        canary_weight=weight if canary else 0.0,
    )


def first_route() -> Route:
    """The stable alone, before preflight knows its deployment id: what initial-*.yaml hold."""
    return Route(model=MODEL, stable=RouteTarget(version=V1, location=target(V1).location))


def header_filter(role: str, version: str, deployment: str, pinned: bool = False) -> list[Obj]:
    """The RequestHeaderModifier the gateway-api router puts on each backendRef."""
    pairs = marks(role, version, deployment, pinned)
    return [
        {
            "type": "RequestHeaderModifier",
            "requestHeaderModifier": {"set": [{"name": k, "value": v} for k, v in pairs.items()]},
        }
    ]


def marks(role: str, version: str, deployment: str, pinned: bool = False) -> dict[str, str]:
    """The record headers (services/envoy/config.py) for one role of the route: `true` in the
    pin rules, whose records stay out of the canary analysis."""
    return {
        "x-preflight-model": MODEL,
        "x-preflight-role": role,
        "x-preflight-version": version,
        "x-preflight-deployment": deployment,
        "x-preflight-pinned": "true" if pinned else "false",
    }


def example(router: str, name: str) -> Obj:
    doc = yaml.safe_load((EXAMPLES / router / name).read_text("utf-8"))
    assert isinstance(doc, dict)
    return doc


def example_options(router: str) -> Obj:
    policy = example(router, "policy.yaml")
    options = policy["models"][MODEL]["canary"]["traffic"]["options"]
    assert isinstance(options, dict)
    return options


def make(router: str, kube: KubeApiServer, token: str = TOKEN, **options: Any) -> TrafficRouter:
    settings = SimpleNamespace(kube_api_url=kube.url, kube_token=token)
    return build(router, {**example_options(router), **FAST, **options}, settings)


def seed(kube: KubeApiServer, router: str, main: str, initial: str) -> None:
    """The example object as the platform creates it (`kubectl apply --server-side -k`), then
    its initial file applied as preflight, as the docs say to."""
    kube.apply(example(router, main), manager="kubectl")
    kube.apply(example(router, initial), manager=FIELD_MANAGER)


def assert_valid(obj: Obj) -> None:
    """The object checked directly against its vendored CRD (not only by the server)."""
    problems = object_problems(obj)
    assert not problems, problems


@pytest.fixture
async def kube() -> AsyncIterator[KubeApiServer]:
    async with KubeApiServer() as server:
        yield server


@pytest.fixture
async def routers() -> AsyncIterator[list[TrafficRouter]]:
    """Routers a test builds, closed after it."""
    made: list[TrafficRouter] = []
    yield made
    for router in made:
        await router.aclose()


async def applied(router: TrafficRouter, r: Route) -> Applied:
    await router.apply(r)
    return await router.read(r)


# ---- Gateway API: HTTPRoute -------------------------------------------------------------------


@pytest.fixture
def gateway(kube: KubeApiServer, routers: list[TrafficRouter]) -> TrafficRouter:
    seed(kube, "gateway-api", "httproute.yaml", "initial-rules.yaml")
    router = make("gateway-api", kube)
    routers.append(router)
    return router


def httproute(kube: KubeApiServer, name: str = "chat-7b") -> Obj:
    return kube.get("httproutes", "models", name)


async def test_gateway_apply_then_read_confirms_weights_and_status(
    kube: KubeApiServer, gateway: TrafficRouter
) -> None:
    result = await applied(gateway, route(weight=5))

    assert result.confirmed, result.detail
    assert result.weight == 5.0
    obj = httproute(kube)
    assert_valid(obj)
    *pins, weighted = obj["spec"]["rules"]
    assert [(b["name"], b["weight"]) for b in weighted["backendRefs"]] == [
        ("org-chat-7b-2024-06-01", 950),
        ("org-chat-7b-2024-07-01", 50),
    ]
    assert weighted["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
    # the pin header rules: one per role, Exact match, a single backend each
    pinned = {
        (m["headers"][-1]["name"], m["headers"][-1]["value"]): rule["backendRefs"][0]["name"]
        for rule in pins
        for m in rule["matches"]
    }
    assert pinned == {
        (PIN_HEADER, "stable"): "org-chat-7b-2024-06-01",
        (PIN_HEADER, "canary"): "org-chat-7b-2024-07-01",
    }
    # server-side apply under the field manager preflight, strict, never forced by default
    (patch,) = kube.calls("PATCH")
    assert patch.content_type == "application/apply-patch+yaml"
    assert patch.query == {"fieldManager": "preflight", "fieldValidation": "Strict"}
    assert patch.body is not None
    assert set(patch.body) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(patch.body["spec"]) == {"rules"}
    owners = kube.managers("httproutes", "models", "chat-7b")
    assert owners["preflight"] == {("spec", "rules")}
    assert owners["kubectl"] >= {("spec", "parentRefs"), ("spec", "hostnames")}
    assert result.detail.endswith(
        "accepted with refs resolved by Gateway gateway-system/inference-gateway at generation 3"
    )


async def test_gateway_unconfirmed_until_the_gateway_reconciles(
    kube: KubeApiServer, gateway: TrafficRouter
) -> None:
    kube.controller = "manual"
    r = route(weight=20)
    await gateway.apply(r)

    stale = await gateway.read(r)
    assert not stale.confirmed
    assert stale.weight == 20.0  # the spec has it; the gateway has not said so
    assert stale.detail == (
        "HTTPRoute models/chat-7b: parent Gateway gateway-system/inference-gateway "
        "(example.net/gateway-controller): Accepted is for generation 2, the route is at "
        "generation 3 (not reconciled yet)"
    )
    kube.reconcile()
    assert (await gateway.read(r)).confirmed


async def test_gateway_without_any_parent_status(
    kube: KubeApiServer, routers: list[TrafficRouter]
) -> None:
    kube.controller = "never"
    seed(kube, "gateway-api", "httproute.yaml", "initial-rules.yaml")
    router = make("gateway-api", kube)
    routers.append(router)
    result = await applied(router, route())
    assert not result.confirmed
    assert "no status for parent Gateway gateway-system/inference-gateway yet" in result.detail


async def test_gateway_reports_unresolved_backends_and_other_controllers(
    kube: KubeApiServer, gateway: TrafficRouter, routers: list[TrafficRouter]
) -> None:
    kube.gateway.missing_backends = {"org-chat-7b-2024-07-01"}
    result = await applied(gateway, route())
    assert not result.confirmed
    assert result.detail.endswith(
        ': ResolvedRefs=False (BackendNotFound: Service "org-chat-7b-2024-07-01" not found)'
    )
    kube.gateway.missing_backends = set()
    kube.reconcile()
    assert (await gateway.read(route())).confirmed
    # only the named controller's status counts
    picky = make(
        "gateway-api", kube, controller_name="gateway.envoyproxy.io/gatewayclass-controller"
    )
    routers.append(picky)
    result = await picky.read(route())
    assert not result.confirmed
    assert "no status from gateway.envoyproxy.io/gatewayclass-controller" in result.detail


async def test_gateway_spec_changed_behind_preflights_back_is_unconfirmed(
    kube: KubeApiServer, gateway: TrafficRouter
) -> None:
    r = route(weight=10)
    await gateway.apply(r)

    def halve(obj: Obj) -> None:
        obj["spec"]["rules"][-1]["backendRefs"][1]["weight"] = 50

    kube.update(kube.key("httproutes", "models", "chat-7b"), halve, manager="kubectl-edit")
    result = await gateway.read(r)
    assert not result.confirmed
    assert result.detail == (
        "HTTPRoute models/chat-7b: spec.rules backendRefs are org-chat-7b-2024-06-01=900, "
        "org-chat-7b-2024-07-01=50, wanted org-chat-7b-2024-06-01=900, "
        "org-chat-7b-2024-07-01=100 (out of 1000)"
    )


@pytest.mark.parametrize(
    ("weight", "stable", "canary", "read"),
    [
        (2.5, 975, 25, 2.5),
        (0.25, 997, 3, 0.3),  # per-mille, half up: 2.5 -> 3
        (33.333, 667, 333, 33.3),
        (0.0, 1000, 0, 0.0),  # the canary backend stays, at 0, for the pin route
        (100.0, 0, 1000, 100.0),
    ],
)
async def test_gateway_fractional_weights(
    kube: KubeApiServer,
    gateway: TrafficRouter,
    weight: float,
    stable: int,
    canary: int,
    read: float,
) -> None:
    result = await applied(gateway, route(weight=weight))
    assert result.confirmed, result.detail
    assert result.weight == read
    weighted = httproute(kube)["spec"]["rules"][-1]
    assert [b["weight"] for b in weighted["backendRefs"]] == [stable, canary]


async def test_gateway_stable_only_and_promotion(
    kube: KubeApiServer, gateway: TrafficRouter
) -> None:
    await gateway.apply(route(weight=50))
    promoted = route(stable=V2, canary=None)
    result = await applied(gateway, promoted)
    assert result.confirmed and result.weight == 0.0
    rules = httproute(kube)["spec"]["rules"]
    assert len(rules) == 2  # the stable pin rule and the weighted rule
    assert rules[-1]["backendRefs"] == [
        {
            "group": "",
            "kind": "Service",
            "name": "org-chat-7b-2024-07-01",
            "port": 8000,
            "weight": 1000,
            "filters": header_filter("stable", V2, "d-2024-07-01"),
        }
    ]
    # the stable-only route is exactly what initial-rules.yaml holds (same version)
    assert_valid(httproute(kube))
    await gateway.apply(first_route())
    assert (
        httproute(kube)["spec"]["rules"]
        == example("gateway-api", "initial-rules.yaml")["spec"]["rules"]
    )


async def test_gateway_inference_pool_backends(
    kube: KubeApiServer, routers: list[TrafficRouter]
) -> None:
    seed(kube, "gateway-api", "httproute.yaml", "initial-rules.yaml")
    router = make(
        "gateway-api",
        kube,
        backend_kind="InferencePool",
        port=None,
        backend_template="{model_token}-{version_token}-pool",
    )
    routers.append(router)
    result = await applied(router, route(weight=10))
    assert result.confirmed, result.detail
    weighted = httproute(kube)["spec"]["rules"][-1]["backendRefs"]
    assert weighted == [
        {
            "group": "inference.networking.k8s.io",
            "kind": "InferencePool",
            "name": "org-chat-7b-2024-06-01-pool",
            "weight": 900,
            "filters": header_filter("stable", V1, "d-2024-07-01"),
        },
        {
            "group": "inference.networking.k8s.io",
            "kind": "InferencePool",
            "name": "org-chat-7b-2024-07-01-pool",
            "weight": 100,
            "filters": header_filter("canary", V2, "d-2024-07-01"),
        },
    ]
    assert_valid(httproute(kube))
    # the pools those refs name, as the InferencePool CRD (v1) wants them
    for ref in weighted:
        pool = {
            "apiVersion": "inference.networking.k8s.io/v1",
            "kind": "InferencePool",
            "metadata": {"name": ref["name"], "namespace": "models"},
            "spec": {
                "selector": {"matchLabels": {"app.kubernetes.io/name": "chat-7b"}},
                "targetPorts": [{"number": 8000}],
                "endpointPickerRef": {"name": f"{ref['name']}-epp", "port": {"number": 9002}},
            },
        }
        assert_valid(pool)


async def test_gateway_conflict_names_the_other_field_manager(
    kube: KubeApiServer, gateway: TrafficRouter, routers: list[TrafficRouter]
) -> None:
    await gateway.apply(route(weight=5))

    def hotfix(obj: Obj) -> None:
        obj["spec"]["rules"][-1]["backendRefs"][1]["weight"] = 0

    kube.update(kube.key("httproutes", "models", "chat-7b"), hotfix, manager="kubectl-edit")
    with pytest.raises(RouterError) as caught:
        await gateway.apply(route(weight=20))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        "apply HTTPRoute models/chat-7b: field manager 'kubectl-edit' owns .spec.rules"
    )
    assert "force: true" in message
    assert httproute(kube)["spec"]["rules"][-1]["backendRefs"][1]["weight"] == 0  # untouched
    forced = make("gateway-api", kube, force=True)
    routers.append(forced)
    result = await applied(forced, route(weight=20))
    assert result.confirmed
    assert kube.calls("PATCH")[-1].query["force"] == "true"
    assert "kubectl-edit" not in kube.managers("httproutes", "models", "chat-7b")


async def test_gateway_rules_in_the_platform_manifest_conflict(
    kube: KubeApiServer, routers: list[TrafficRouter]
) -> None:
    """A route created by a client-side `kubectl apply` with its own rules: preflight's first
    write names that manager (docs: leave spec.rules out, or set force)."""
    obj = example("gateway-api", "httproute.yaml")
    obj["spec"]["rules"] = example("gateway-api", "initial-rules.yaml")["spec"]["rules"]
    kube.create(obj, manager="kubectl-client-side-apply", operation="Update")
    router = make("gateway-api", kube)
    routers.append(router)
    with pytest.raises(
        RouterError, match=r"field manager 'kubectl-client-side-apply' owns \.spec\.rules"
    ):
        await router.apply(route())


async def test_gateway_retries_429_and_5xx_then_succeeds(
    kube: KubeApiServer, gateway: TrafficRouter
) -> None:
    kube.fail("get", status=500, times=2)
    kube.fail("patch", status=429, times=1, retry_after="0")
    kube.fail("patch", status=503, times=1)
    kube.fail(  # optimistic concurrency, not a field owner: worth another try
        "patch",
        status=409,
        message='Operation cannot be fulfilled on httproutes.gateway.networking.k8s.io "chat-7b": '
        "the object has been modified; please apply your changes to the latest version",
    )
    result = await applied(gateway, route(weight=5))
    assert result.confirmed
    assert [s.status for s in kube.calls("GET")][:3] == [500, 500, 200]
    assert [s.status for s in kube.calls("PATCH")] == [429, 503, 409, 200]


async def test_gateway_gives_up_after_its_retries(
    kube: KubeApiServer, routers: list[TrafficRouter]
) -> None:
    seed(kube, "gateway-api", "httproute.yaml", "initial-rules.yaml")
    router = make("gateway-api", kube, retries=1)
    routers.append(router)
    kube.fail("patch", status=500, times=2)
    with pytest.raises(RouterError) as caught:
        await router.apply(route())
    assert str(caught.value) == (
        "patch HTTPRoute models/chat-7b: HTTP 500 after 2 tries: an error on the server "
        "(InternalError) has prevented the request"
    )


async def test_gateway_403_names_verb_resource_and_rbac(
    kube: KubeApiServer, gateway: TrafficRouter
) -> None:
    (role, _) = yaml.safe_load_all((EXAMPLES / "gateway-api" / "rbac.yaml").read_text())
    read_only = [{**rule, "verbs": ["get"]} for rule in role["rules"]]
    kube.authorize(read_only)
    with pytest.raises(RouterError) as caught:
        await gateway.apply(route())
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        "patch httproutes.gateway.networking.k8s.io models/chat-7b forbidden: the "
        "canary-controller's service account needs get and patch on it (the Role in "
        "deploy/k8s/examples/gateway-api/rbac.yaml)"
    )
    assert 'cannot patch resource "httproutes"' in message
    # the example Role as it is: enough for everything the router does
    kube.authorize(role["rules"])
    assert (await applied(gateway, route())).confirmed
    assert {s.method for s in kube.requests} == {"GET", "PATCH"}


async def test_gateway_404_says_create_it_first_and_creates_nothing(
    kube: KubeApiServer, routers: list[TrafficRouter]
) -> None:
    router = make("gateway-api", kube, name="missing")
    routers.append(router)
    expected = (
        "HTTPRoute models/missing not found — create it first (docs/data-planes/gateway-api.md)"
    )
    with pytest.raises(RouterError) as caught:
        await router.apply(route())
    assert str(caught.value) == expected
    with pytest.raises(RouterError) as caught:
        await router.read(route())
    assert str(caught.value) == expected
    assert kube.objects == {}
    assert kube.calls("PATCH") == []


async def test_gateway_401_never_shows_the_token(
    kube: KubeApiServer, routers: list[TrafficRouter]
) -> None:
    seed(kube, "gateway-api", "httproute.yaml", "initial-rules.yaml")
    router = make("gateway-api", kube, token="wrong-token-do-not-print")
    routers.append(router)
    with pytest.raises(RouterError) as caught:
        await router.read(route())
    message = str(caught.value)
    assert "401 Unauthorized" in message and "wrong-token" not in message
    assert "the API URL in settings" in message


async def test_gateway_invalid_and_undeclared_fields_come_back_from_the_api(
    kube: KubeApiServer, gateway: TrafficRouter, routers: list[TrafficRouter]
) -> None:
    bogus = make("gateway-api", kube, matches=[{"path": {"type": "Prefix", "value": "/"}}])
    routers.append(bogus)
    with pytest.raises(RouterError) as caught:
        await bogus.apply(route())
    message = str(caught.value)
    assert message.startswith(
        "patch HTTPRoute models/chat-7b: the API refused the object as invalid:"
    )
    assert "spec.rules[0].matches[0].path.type" in message and "'Prefix' is not one of" in message
    typo = make("gateway-api", kube, matches=[{"pathh": {"value": "/"}}])
    routers.append(typo)
    with pytest.raises(
        RouterError, match=r"\.spec\.rules\[0\]\.matches\[0\]\.pathh: field not declared"
    ):
        await typo.apply(route())


# ---- Istio: VirtualService --------------------------------------------------------------------


@pytest.fixture
def istio(kube: KubeApiServer, routers: list[TrafficRouter]) -> TrafficRouter:
    seed(kube, "istio", "virtualservice.yaml", "initial-http.yaml")
    router = make("istio", kube)
    routers.append(router)
    return router


def virtualservice(kube: KubeApiServer) -> Obj:
    return kube.get("virtualservices", "models", "chat-7b")


async def test_istio_apply_then_read(kube: KubeApiServer, istio: TrafficRouter) -> None:
    result = await applied(istio, route(weight=10))
    assert result.confirmed, result.detail
    assert result.weight == 10.0
    assert result.detail.endswith("no status from istiod (confirmed from the spec alone)")
    obj = virtualservice(kube)
    assert_valid(obj)
    http = {h["name"]: h for h in obj["spec"]["http"]}
    assert [h["name"] for h in obj["spec"]["http"]] == [
        "preflight-pin-stable",
        "preflight-pin-canary",
        "preflight",
    ]
    assert http["preflight"]["route"] == [
        {
            "destination": {
                "host": "chat-7b.models.svc.cluster.local",
                "subset": "v-2024-06-01",
                "port": {"number": 8000},
            },
            "weight": 90,
            "headers": {"request": {"set": marks("stable", V1, "d-2024-07-01")}},
        },
        {
            "destination": {
                "host": "chat-7b.models.svc.cluster.local",
                "subset": "v-2024-07-01",
                "port": {"number": 8000},
            },
            "weight": 10,
            "headers": {"request": {"set": marks("canary", V2, "d-2024-07-01")}},
        },
    ]
    assert http["preflight-pin-canary"]["match"] == [
        {"headers": {"x-preflight-pin": {"exact": "canary"}}}
    ]
    assert http["preflight-pin-canary"]["route"][0]["destination"]["subset"] == "v-2024-07-01"
    assert obj["spec"]["hosts"] == ["chat-7b.models.svc.cluster.local"]  # the platform's, kept
    # stable only: what initial-http.yaml holds
    await istio.apply(first_route())
    assert (
        virtualservice(kube)["spec"]["http"]
        == example("istio", "initial-http.yaml")["spec"]["http"]
    )


@pytest.mark.parametrize(
    ("weight", "total", "expected", "read"),
    [
        (2.5, 100, [97, 3], 3.0),  # integers out of 100, half up; the rounded value is read back
        (0.4, 100, [100, 0], 0.0),
        (2.5, 1000, [975, 25], 2.5),
        (12.25, 1000, [877, 123], 12.3),
    ],
)
async def test_istio_rounds_fractional_weights(
    kube: KubeApiServer,
    routers: list[TrafficRouter],
    weight: float,
    total: int,
    expected: list[int],
    read: float,
) -> None:
    seed(kube, "istio", "virtualservice.yaml", "initial-http.yaml")
    router = make("istio", kube, weight_total=total)
    routers.append(router)
    result = await applied(router, route(weight=weight))
    assert result.confirmed, result.detail
    assert result.weight == read
    weighted = virtualservice(kube)["spec"]["http"][-1]["route"]
    assert [d["weight"] for d in weighted] == expected


async def test_istio_status_when_istiod_writes_it(
    kube: KubeApiServer, istio: TrafficRouter, routers: list[TrafficRouter]
) -> None:
    strict = make("istio", kube, require_status=True)
    routers.append(strict)
    r = route(weight=5)
    result = await applied(strict, r)
    assert not result.confirmed
    assert "istiod reports no status.observedGeneration (require_status is set" in result.detail
    kube.istio_status = True
    kube.controller = "manual"
    await strict.apply(route(weight=6))
    kube.reconcile()
    await strict.apply(r)
    lagging = await strict.read(r)
    assert not lagging.confirmed
    assert lagging.detail == (
        "VirtualService models/chat-7b: istiod has observed generation 4, the object is at 5"
    )
    kube.reconcile()
    ok = await strict.read(r)
    assert ok.confirmed and ok.detail.endswith("istiod observed generation 5")
    kube.istio_messages = [
        {
            "level": "ERROR",
            "type": {"code": "IST0101", "name": "ReferencedResourceNotFound"},
            "message": 'Referenced host+subset in destinationrule not found: "v-2024-07-01"',
        }
    ]
    kube.reconcile()
    broken = await istio.read(r)
    assert not broken.confirmed
    assert "istiod reports an error (IST0101): Referenced host+subset" in broken.detail


async def test_istio_hosts_per_version(kube: KubeApiServer, routers: list[TrafficRouter]) -> None:
    seed(kube, "istio", "virtualservice.yaml", "initial-http.yaml")
    router = make(
        "istio",
        kube,
        host=None,
        host_template="{model_token}-{version_token}.models.svc.cluster.local",
        pin=False,
    )
    routers.append(router)
    assert router.supports_pin is False
    result = await applied(router, route(weight=50))
    assert result.confirmed, result.detail
    http = virtualservice(kube)["spec"]["http"]
    assert [h["name"] for h in http] == ["preflight"]
    assert [d["destination"]["host"] for d in http[0]["route"]] == [
        "org-chat-7b-2024-06-01.models.svc.cluster.local",
        "org-chat-7b-2024-07-01.models.svc.cluster.local",
    ]


async def test_istio_conflict_and_404(
    kube: KubeApiServer, istio: TrafficRouter, routers: list[TrafficRouter]
) -> None:
    await istio.apply(route())

    def retarget(obj: Obj) -> None:
        obj["spec"]["http"][-1]["route"][0]["weight"] = 100
        obj["spec"]["http"][-1]["route"][1]["weight"] = 0

    kube.update(
        kube.key("virtualservices", "models", "chat-7b"), retarget, manager="argocd-controller"
    )
    with pytest.raises(RouterError, match=r"field manager 'argocd-controller' owns \.spec\.http"):
        await istio.apply(route(weight=20))
    missing = make("istio", kube, name="gone")
    routers.append(missing)
    with pytest.raises(RouterError) as caught:
        await missing.read(route())
    assert str(caught.value) == (
        "VirtualService models/gone not found — create it first (docs/data-planes/istio.md)"
    )


# ---- KServe: InferenceService -----------------------------------------------------------------


@pytest.fixture
def kserve(kube: KubeApiServer, routers: list[TrafficRouter]) -> TrafficRouter:
    seed(kube, "kserve", "inferenceservice.yaml", "initial-model.yaml")
    router = make("kserve", kube)
    routers.append(router)
    return router


def isvc(kube: KubeApiServer) -> Obj:
    return kube.get("inferenceservices", "models", "chat-7b")


async def test_kserve_knative_canary_traffic_percent(
    kube: KubeApiServer, kserve: TrafficRouter
) -> None:
    assert kserve.supports_pin is False
    result = await applied(kserve, route(weight=10))
    assert result.confirmed, result.detail
    assert result.weight == 10.0
    obj = isvc(kube)
    assert_valid(obj)
    predictor = obj["spec"]["predictor"]
    assert predictor["canaryTrafficPercent"] == 10
    assert predictor["model"]["storageUri"] == "s3://models/org/chat-7b/2024-07-01"
    assert predictor["model"]["modelFormat"] == {"name": "huggingface"}  # the platform's, kept
    assert result.detail == (
        "InferenceService models/chat-7b: revision chat-7b-predictor-00003 (latest) serves 10%, "
        "90% to chat-7b-predictor-00002; Ready=True"
    )
    owners = kube.managers("inferenceservices", "models", "chat-7b")
    assert owners["preflight"] == {
        ("spec", "predictor", "model", "storageUri"),
        ("spec", "predictor", "canaryTrafficPercent"),
    }
    # fractional: integer percent, half up
    result = await applied(kserve, route(weight=2.5))
    assert result.confirmed and result.weight == 3.0
    # promotion: the canary's model at 100%, the percent field dropped (preflight owned it)
    result = await applied(kserve, route(stable=V2, canary=None))
    assert result.confirmed, result.detail
    assert "canaryTrafficPercent" not in isvc(kube)["spec"]["predictor"]
    assert isvc(kube)["status"]["components"]["predictor"]["traffic"] == [
        {
            "revisionName": "chat-7b-predictor-00003",
            "percent": 100,
            "latestRevision": True,
            "tag": "latest",
        }
    ]


async def test_kserve_knative_unconfirmed_until_reconciled_and_ready(
    kube: KubeApiServer, kserve: TrafficRouter
) -> None:
    kube.controller = "manual"
    r = route(weight=10)
    await kserve.apply(r)
    stale = await kserve.read(r)
    assert not stale.confirmed
    assert stale.detail == (
        "InferenceService models/chat-7b: status.components.predictor.traffic is "
        "chat-7b-predictor-00002=100% (latest), wanted the latest revision "
        "chat-7b-predictor-00002 at 10%"
    )
    kube.kserve.ready = False
    kube.reconcile()
    loading = await kserve.read(r)
    assert not loading.confirmed
    assert loading.detail == (
        "InferenceService models/chat-7b: predictor revision chat-7b-predictor-00003 is not "
        "ready yet (latest ready: chat-7b-predictor-00002)"
    )
    kube.kserve.ready = True
    kube.reconcile()
    assert (await kserve.read(r)).confirmed


def standard_isvc() -> tuple[Obj, Obj]:
    main = example("kserve", "inferenceservice.yaml")
    main["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] = "Standard"
    initial = example("kserve", "initial-model.yaml")
    initial["spec"]["predictor"]["name"] = "v-2024-06-01"
    return main, initial


async def test_kserve_standard_mode_spec_canary(
    kube: KubeApiServer, routers: list[TrafficRouter]
) -> None:
    main, initial = standard_isvc()
    kube.apply(main, manager="kubectl")
    kube.apply(initial, manager=FIELD_MANAGER)
    router = make("kserve", kube)
    routers.append(router)

    kube.controller = "manual"
    r = route(weight=25)
    await router.apply(r)
    pending = await router.read(r)
    assert not pending.confirmed
    assert (
        pending.detail
        == "InferenceService models/chat-7b: KServe reports no status for canary v-2024-07-01 yet"
    )
    kube.reconcile()
    result = await router.read(r)
    assert result.confirmed, result.detail
    assert result.weight == 25.0
    obj = isvc(kube)
    assert_valid(obj)
    assert obj["spec"]["predictor"]["name"] == "v-2024-06-01"
    assert obj["spec"]["canary"] == [
        {
            "trafficPercent": 25,
            "predictor": {
                "name": "v-2024-07-01",
                "model": {
                    "name": "kserve-container",
                    "modelFormat": {"name": "huggingface"},
                    "storageUri": "s3://models/org/chat-7b/2024-07-01",
                },
            },
        }
    ]
    assert result.detail.endswith(
        "canary v-2024-07-01 at 25%; Ready=True, CanaryPredictorReady=True"
    )
    # promotion: the stable takes the canary's name (KServe reuses its Deployment), no canary
    kube.controller = "immediate"
    promoted = route(stable=V2, canary=None)
    result = await applied(router, promoted)
    assert result.confirmed, result.detail
    spec = isvc(kube)["spec"]
    assert spec["canary"] == [] and spec["predictor"]["name"] == "v-2024-07-01"
    assert "canaryStatuses" not in isvc(kube)["status"]
    # a new canary that never becomes ready
    kube.kserve.ready = False
    result = await applied(router, route(stable=V2, canary=V3, weight=5))
    assert not result.confirmed
    assert result.detail == (
        "InferenceService models/chat-7b: canary v-2024-08-01 is not ready (status.canaryStatuses)"
    )


async def test_kserve_needs_a_known_mode(kube: KubeApiServer, routers: list[TrafficRouter]) -> None:
    obj = example("kserve", "inferenceservice.yaml")
    del obj["metadata"]["annotations"]
    kube.controller = "never"
    kube.create(obj, manager="kubectl")
    router = make("kserve", kube)
    routers.append(router)
    with pytest.raises(
        RouterError, match=r"no deployment mode .* set the annotation or options\.mode"
    ):
        await router.apply(route())
    explicit = make("kserve", kube, mode="knative")
    routers.append(explicit)
    await explicit.apply(route(weight=10))
    assert isvc(kube)["spec"]["predictor"]["canaryTrafficPercent"] == 10


# ---- options ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("router", "options", "message"),
    [
        (
            "gateway-api",
            {"namespace": "models", "name": "r", "port": 80, "wieght_total": 5},
            "wieght_total: Extra inputs are not permitted",
        ),
        (
            "gateway-api",
            {"namespace": "models", "name": "r"},
            "port is required when backend_kind is Service",
        ),
        (
            "gateway-api",
            {"namespace": "models", "name": "r", "port": 80, "backend_template": "{model}-{tag}"},
            "options.backend_template: unknown placeholder(s) 'tag'",
        ),
        (
            "gateway-api",
            {"namespace": "Models", "name": "r", "port": 80},
            "namespace: String should match pattern",
        ),
        ("istio", {"namespace": "models", "name": "vs"}, "set exactly one of host"),
        (
            "istio",
            {"namespace": "models", "name": "vs", "host": "h", "weight_total": 50},
            "weight_total: Input should be 100 or 1000",
        ),
        (
            "istio",
            {
                "namespace": "models",
                "name": "vs",
                "host": "h",
                "match": [{"headers": {"X-Preflight-Pin": {"exact": "x"}}}],
            },
            "must not match on X-Preflight-Pin",
        ),
        (
            "kserve",
            {"namespace": "models", "name": "m", "mode": "serverless"},
            "mode: Input should be 'auto', 'knative' or 'standard'",
        ),
        ("kserve", {"namespace": "models"}, "name: Field required"),
    ],
)
def test_bad_options_name_the_router_and_key(router: str, options: Obj, message: str) -> None:
    with pytest.raises(RouterConfigError) as caught:
        build(router, options, SimpleNamespace())
    assert f"traffic router {router!r}" in str(caught.value)
    assert message in str(caught.value)


# ---- the generated objects against the CRD schemas, directly ----------------------------------


async def test_every_generated_object_fits_its_crd(
    kube: KubeApiServer, routers: list[TrafficRouter]
) -> None:
    """Each router's object after each kind of route, checked with jsonschema here (the server
    checked them too); and each partial it applies declares no field the CRD lacks."""
    for name, files in FILES.items():
        seed(kube, name, *files)
    made = {name: make(name, kube) for name in ("gateway-api", "istio", "kserve")}
    made["gateway-pool"] = make("gateway-api", kube, backend_kind="InferencePool", port=None)
    routers.extend(made.values())
    cases = [route(weight=w) for w in (0, 0.1, 2.5, 50, 99.95, 100)]
    cases += [route(canary=None), route(stable=None, canary=V2, weight=100)]
    plurals = {**PLURALS, "gateway-pool": "httproutes"}
    checked = 0
    for name, router in made.items():
        for r in cases:
            await router.apply(r)
            obj = kube.get(plurals[name], "models", "chat-7b")
            assert_valid(obj)
            patch = kube.calls("PATCH", ok=True)[-1].body
            assert patch is not None
            crd, version = crd_for(patch["apiVersion"], patch["kind"])
            assert unknown_fields(patch, crd.schemas[version]) == []
            checked += 1
    assert checked == 4 * len(cases)


@pytest.mark.parametrize(
    ("router", "path", "value", "expected"),
    [
        (
            "gateway-api",
            ("spec", "rules", -1, "backendRefs", 0, "weight"),
            2_000_000,
            "greater than the maximum of 1000000",
        ),
        (
            "gateway-api",
            ("spec", "rules", -1, "backendRefs", 0, "port"),
            "8000",
            "is not of type 'integer'",
        ),
        ("istio", ("spec", "http", -1, "route", 0, "weight"), "90", "is not of type 'integer'"),
        (
            "istio",
            ("spec", "http", -1, "route", 0, "destinaton"),
            {"host": "x"},
            "field not declared in schema",
        ),
        (
            "kserve",
            ("spec", "predictor", "canaryTrafficPercent"),
            "ten",
            "is not of type 'integer'",
        ),
        (
            "kserve",
            ("spec", "canary"),
            [{"trafficPercent": 101, "predictor": {"name": "v-2"}}],
            "greater than the maximum of 100",
        ),
    ],
)
async def test_the_schema_check_bites(
    kube: KubeApiServer,
    routers: list[TrafficRouter],
    router: str,
    path: tuple[str | int, ...],
    value: Any,
    expected: str,
) -> None:
    """A good object, then the same with one field wrong: the check that passed the routers'
    objects refuses it, so it is not vacuous."""
    seed(kube, router, *FILES[router])
    made = make(router, kube)
    routers.append(made)
    await made.apply(route(weight=10))
    good = kube.get(PLURALS[router], "models", "chat-7b")
    assert_valid(good)
    bad = copy.deepcopy(good)
    node: Any = bad
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    problems = object_problems(bad)
    assert any(expected in p for p in problems), problems


async def test_connection_errors_are_retried_then_reported(
    routers: list[TrafficRouter],
) -> None:
    async with KubeApiServer() as gone:
        url = gone.url  # a port that was just served and now refuses connections
    settings = SimpleNamespace(kube_api_url=f"http://user:pw@{url.removeprefix('http://')}")
    router = build(
        "gateway-api", {**example_options("gateway-api"), **FAST, "retries": 2}, settings
    )
    routers.append(router)
    with pytest.raises(RouterError) as caught:
        await router.read(route())
    message = str(caught.value)
    assert message.startswith(
        f"get HTTPRoute models/chat-7b: cannot reach the Kubernetes API (the API URL in "
        f"settings ({url})) after 3 tries:"
    )
    assert "pw" not in message


async def test_gateway_pin_rule_removed_is_unconfirmed(
    kube: KubeApiServer, gateway: TrafficRouter
) -> None:
    r = route(weight=10)
    assert (await applied(gateway, r)).confirmed

    def drop_canary_pin(obj: Obj) -> None:
        obj["spec"]["rules"] = [
            rule
            for rule in obj["spec"]["rules"]
            if not any(
                h.get("value") == "canary" for m in rule["matches"] for h in m.get("headers", [])
            )
        ]

    kube.update(
        kube.key("httproutes", "models", "chat-7b"), drop_canary_pin, manager="kubectl-edit"
    )
    result = await gateway.read(r)
    assert not result.confirmed
    assert result.detail == (
        "HTTPRoute models/chat-7b: no X-Preflight-Pin rule for canary in spec.rules"
    )
