"""The `gateway-api` router: weighted backendRefs on an existing Gateway API HTTPRoute.

preflight owns `spec.rules` of the route (an atomic list: it is written whole) and nothing else;
parentRefs, hostnames and the Gateway stay the platform's. The rules it writes:

    1. `PIN_HEADER: canary` -> the canary backend      } `pin: true` (default), one per role
    2. `PIN_HEADER: stable` -> the stable backend      } present in the route
    3. every request matching `matches` -> stable (weight total - w), canary (weight w)

Weights are relative integers in Gateway API; preflight writes them out of `weight_total`
(default 1000, per-mille): 2.5% -> canary 25, stable 975; finer fractions round half up.
A weight counts as applied only when the spec read back holds exactly those backendRefs and
weights AND every parent Gateway in `spec.parentRefs` reports Accepted=True and ResolvedRefs=True
in `status.parents` for the object's current `metadata.generation`.
docs/data-planes/gateway-api.md.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Final, Literal

from pydantic import Field, model_validator

from services.contracts.events import Route
from services.traffic.base import PIN_HEADER, Applied, RouterConfigError
from services.traffic.k8s import (
    DNS_LABEL,
    KubeApi,
    KubeOptions,
    Obj,
    ObjectRef,
    Resource,
    Role,
    Share,
    canary_percent,
    check_template,
    condition,
    describe_condition,
    dig,
    generation,
    parse_options,
    record_headers,
    render,
    shares,
)

NAME: Final = "gateway-api"
HTTPROUTE: Final = Resource("gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute", NAME)
GATEWAY_GROUP: Final = "gateway.networking.k8s.io"
INFERENCE_POOL_GROUP: Final = "inference.networking.k8s.io"
"""InferencePool's group since gateway-api-inference-extension v1.0 (`v1`; before: the
experimental `inference.networking.x-k8s.io/v1alpha2`)."""
REQUIRED_CONDITIONS: Final = ("Accepted", "ResolvedRefs")


class GatewayApiOptions(KubeOptions):
    """`canary.traffic.options` for `router: gateway-api`. `namespace`/`name`: the HTTPRoute."""

    backend_kind: Literal["Service", "InferencePool"] = Field(
        default="Service",
        description="Service: one Service per version; InferencePool: one pool per version.",
    )
    backend_template: str = Field(
        default="{model_token}-{version_token}",
        description="Backend name per version; placeholders as in services/traffic/k8s.py.",
    )
    stable_backend: str | None = Field(default=None, description="Overrides for the stable.")
    canary_backend: str | None = Field(default=None, description="Overrides for the canary.")
    backend_namespace: str | None = Field(
        default=None, pattern=DNS_LABEL, description="Backends elsewhere (needs a ReferenceGrant)."
    )
    port: int | None = Field(default=None, ge=1, le=65535, description="Service port (required).")
    matches: tuple[dict[str, Any], ...] = Field(
        default=({"path": {"type": "PathPrefix", "value": "/"}},),
        min_length=1,
        max_length=8,
        description="HTTPRouteMatch objects the weighted rule (and each pin rule) matches.",
    )
    pin: bool = Field(default=True, description=f"Install the {PIN_HEADER} header rules.")
    record_headers: bool = Field(
        default=True,
        description="Set the x-preflight-* request headers per backend (a RequestHeaderModifier "
        "filter on each backendRef) for the Envoy access log behind envoy-receiver.",
    )
    weight_total: int = Field(default=1000, ge=100, le=1_000_000, description="Sum of weights.")
    controller_name: str | None = Field(
        default=None,
        description="Only count status.parents written by this controller (e.g. "
        "gateway.envoyproxy.io/gatewayclass-controller); default: every controller's.",
    )

    @model_validator(mode="after")
    def _port_for_services(self) -> GatewayApiOptions:
        if self.backend_kind == "Service" and self.port is None:
            raise ValueError("port is required when backend_kind is Service")
        return self


def build(options: Mapping[str, Any], settings: Any) -> GatewayApiRouter:
    opts = parse_options(GatewayApiOptions, NAME, options)
    for key in ("backend_template", "stable_backend", "canary_backend"):
        value = getattr(opts, key)
        if value is not None:
            check_template(NAME, key, value)
    for i, match in enumerate(opts.matches):
        if any(h.get("name", "").lower() == PIN_HEADER.lower() for h in match.get("headers", [])):
            raise RouterConfigError(
                f"traffic router {NAME!r}: options.matches.{i}: must not match on {PIN_HEADER}"
            )
    return GatewayApiRouter(opts, KubeApi(opts, settings))


class GatewayApiRouter:
    """One HTTPRoute. Keeps no state: everything comes from the route and the object."""

    name = NAME

    def __init__(self, options: GatewayApiOptions, api: KubeApi) -> None:
        self.options = options
        self.api = api
        self.ref = ObjectRef(HTTPROUTE, options.namespace, options.name)
        self.supports_pin = options.pin

    # ---- writing --------------------------------------------------------------------------

    def backend_name(self, route: Route, share: Share) -> str:
        o = self.options
        template = {"stable": o.stable_backend, "canary": o.canary_backend}[share.role]
        return render(
            template or o.backend_template, model=route.model, role=share.role, target=share.target
        )

    def backend_ref(self, route: Route, share: Share, weight: int, *, pinned: bool = False) -> Obj:
        o = self.options
        ref: Obj = {"name": self.backend_name(route, share), "weight": weight}
        if o.backend_kind == "Service":
            ref.update(group="", kind="Service", port=o.port)
        else:
            ref.update(group=INFERENCE_POOL_GROUP, kind="InferencePool")
            if o.port is not None:
                ref["port"] = o.port
        if o.backend_namespace is not None:
            ref["namespace"] = o.backend_namespace
        if o.record_headers:
            ref["filters"] = [
                {
                    "type": "RequestHeaderModifier",
                    "requestHeaderModifier": {
                        "set": [
                            {"name": n, "value": v}
                            for n, v in record_headers(route, share, pinned=pinned)
                        ]
                    },
                }
            ]
        return ref

    def rules(self, route: Route) -> list[Obj]:
        """spec.rules as preflight wants them for `route` (pin rules first, then the split)."""
        split = shares(route, self.options.weight_total)
        out: list[Obj] = []
        if self.options.pin:
            for share in split:
                out.append(
                    {
                        "matches": [pin_match(m, share.role) for m in self.options.matches],
                        "backendRefs": [self.backend_ref(route, share, 1, pinned=True)],
                    }
                )
        out.append(
            {
                "matches": [copy.deepcopy(m) for m in self.options.matches],
                "backendRefs": [self.backend_ref(route, s, s.weight) for s in split],
            }
        )
        return out

    def manifest(self, route: Route) -> Obj:
        """The partial object server-side applied: head + spec.rules."""
        return {**self.ref.skeleton(), "spec": {"rules": self.rules(route)}}

    async def apply(self, route: Route) -> None:
        await self.api.get(self.ref)  # missing: "create it first", never created half-made
        await self.api.apply(self.ref, self.manifest(route))

    # ---- reading back ---------------------------------------------------------------------

    async def read(self, route: Route) -> Applied:
        obj = await self.api.get(self.ref)
        return self.verdict(route, obj)

    def verdict(self, route: Route, obj: Obj) -> Applied:
        """Whether `obj` (the HTTPRoute as read) has `route` in force; pure."""
        split = shares(route, self.options.weight_total)
        want = {
            s.role: (backend_key(self.backend_ref(route, s, s.weight)), s.weight) for s in split
        }
        names = {backend_key(self.backend_ref(route, s, 0)): s.role for s in split}
        rules = dig(obj, "spec", "rules") or []
        weighted = [r for r in rules if isinstance(r, dict) and not is_pin_rule(r)]
        filters = {s.role: self.backend_ref(route, s, 0).get("filters") for s in split}
        found: dict[Role, int] = {}
        seen: list[str] = []
        unmarked: list[str] = []
        for backend in (weighted[0].get("backendRefs") or []) if weighted else []:
            key = backend_key(backend)
            weight = int(backend.get("weight", 1))
            seen.append(f"{key[3]}={weight}")
            role = names.get(key)
            if role is not None:
                found[role] = found.get(role, 0) + weight
                if backend.get("filters") != filters[role]:
                    unmarked.append(key[3])
        weight_read = canary_percent(found) if found else None
        wanted = ", ".join(f"{k[3]}={w}" for k, w in want.values())
        if not weighted:
            return Applied(False, None, f"{self.ref}: no weighted rule in spec.rules")
        if len(seen) != len(want) or any(found.get(r) != w for r, (_, w) in want.items()):
            return Applied(
                False,
                weight_read,
                f"{self.ref}: spec.rules backendRefs are {', '.join(seen) or 'empty'}, "
                f"wanted {wanted} (out of {self.options.weight_total})",
            )
        if unmarked:
            return Applied(
                False,
                weight_read,
                f"{self.ref}: backendRefs {', '.join(unmarked)} lack the record headers "
                "preflight sets (filters changed by someone else?)",
            )
        if self.options.pin:
            keys = {role: key for key, role in names.items()}
            pinned = {
                role
                for rule in rules
                if isinstance(rule, dict)
                for role in pin_roles(rule)
                if role in keys
                and [backend_key(b) for b in rule.get("backendRefs") or []] == [keys[role]]
            }
            missing = [s.role for s in split if s.role not in pinned]
            if missing:
                return Applied(
                    False,
                    weight_read,
                    f"{self.ref}: no {PIN_HEADER} rule for {', '.join(missing)} in spec.rules",
                )
        problem = self.parent_problem(obj)
        if problem is not None:
            return Applied(False, weight_read, f"{self.ref}: {problem}")
        gens = generation(obj)
        return Applied(
            True,
            weight_read,
            f"{self.ref}: backendRefs {wanted} (canary {weight_read}%), accepted with refs "
            f"resolved by {', '.join(self.parent_names(obj))} at generation {gens}",
        )

    def parent_names(self, obj: Obj) -> list[str]:
        route_ns = dig(obj, "metadata", "namespace") or self.ref.namespace
        return [parent_label(p, route_ns) for p in dig(obj, "spec", "parentRefs") or []]

    def parent_problem(self, obj: Obj) -> str | None:
        """Why status.parents does not confirm the current generation, or None."""
        route_ns = dig(obj, "metadata", "namespace") or self.ref.namespace
        parents = dig(obj, "spec", "parentRefs") or []
        if not parents:
            return "spec.parentRefs is empty: the route is attached to no Gateway"
        gen = generation(obj)
        statuses = [s for s in dig(obj, "status", "parents") or [] if isinstance(s, dict)]
        if self.options.controller_name is not None:
            statuses = [
                s for s in statuses if s.get("controllerName") == self.options.controller_name
            ]
        for parent in parents:
            label = parent_label(parent, route_ns)
            entries = [
                s
                for s in statuses
                if parent_key(s.get("parentRef") or {}, route_ns) == parent_key(parent, route_ns)
            ]
            if not entries:
                by = f" from {self.options.controller_name}" if self.options.controller_name else ""
                return (
                    f"no status{by} for parent {label} yet (its gateway controller has not "
                    "reconciled this route)"
                )
            for entry in entries:
                who = entry.get("controllerName", "?")
                for kind in REQUIRED_CONDITIONS:
                    cond = condition(entry.get("conditions"), kind)
                    if cond is None:
                        return f"parent {label} ({who}) reports no {kind} condition"
                    observed = cond.get("observedGeneration")
                    if not isinstance(observed, int) or observed < gen:
                        return (
                            f"parent {label} ({who}): {kind} is for generation {observed}, the "
                            f"route is at generation {gen} (not reconciled yet)"
                        )
                    if cond.get("status") != "True":
                        return f"parent {label} ({who}): {describe_condition(cond)}"
        return None

    async def aclose(self) -> None:
        await self.api.aclose()


def pin_match(match: Mapping[str, Any], role: Role) -> Obj:
    out = copy.deepcopy(dict(match))
    out["headers"] = [
        *match.get("headers", []),
        {"type": "Exact", "name": PIN_HEADER, "value": role},
    ]
    return out


def pin_roles(rule: Mapping[str, Any]) -> set[Role]:
    roles: set[Role] = set()
    for match in rule.get("matches") or []:
        for header in match.get("headers") or [] if isinstance(match, dict) else []:
            if str(header.get("name", "")).lower() == PIN_HEADER.lower():
                value = header.get("value")
                if value in ("stable", "canary"):
                    roles.add(value)
    return roles


def is_pin_rule(rule: Mapping[str, Any]) -> bool:
    return bool(pin_roles(rule))


def backend_key(ref: Mapping[str, Any]) -> tuple[str, str, str | None, str, int | None]:
    """A backendRef with the API's defaults filled in (group "", kind Service), weight aside."""
    return (
        str(ref.get("group", "")),
        str(ref.get("kind", "Service")),
        ref.get("namespace"),
        str(ref.get("name", "")),
        ref.get("port"),
    )


def parent_key(ref: Mapping[str, Any], route_ns: str) -> tuple[Any, ...]:
    return (
        ref.get("group", GATEWAY_GROUP),
        ref.get("kind", "Gateway"),
        ref.get("namespace", route_ns),
        ref.get("name"),
        ref.get("sectionName"),
        ref.get("port"),
    )


def parent_label(ref: Mapping[str, Any], route_ns: str) -> str:
    section = f" ({ref['sectionName']})" if ref.get("sectionName") else ""
    return (
        f"{ref.get('kind', 'Gateway')} {ref.get('namespace', route_ns)}/{ref.get('name')}{section}"
    )
