"""The `istio` router: destination weights in an existing Istio VirtualService.

preflight owns `spec.http` of the VirtualService (an atomic list: written whole); hosts, gateways
and everything else stay the platform's. The http routes it writes, in order (Istio takes the
first that matches):

    <route_name>-pin-canary   header x-preflight-pin: canary -> the canary destination
    <route_name>-pin-stable   header x-preflight-pin: stable -> the stable destination
    <route_name>              `match` (default: everything) -> stable, canary with weights

Destinations are a subset per version of one host (`host` + `subset_template`, subsets defined
in a DestinationRule) or a host per version (`host_template`). Weights are integers out of
`weight_total`: 100 (the default, what every Istio accepts) rounds the percent half up (2.5% ->
canary 3, stable 97) and that rounded weight is what has to be read back; 1000 (Istio 1.15+
takes any non-negative weights) keeps a tenth of a percent.

Istio writes no per-route status: a weight counts as applied when the VirtualService read back
holds exactly these routes and weights and, where istiod writes status (`enableAnalysis`),
`status.observedGeneration` has reached `metadata.generation` with no error-level
`validationMessages`. `require_status: true` insists on that status. docs/data-planes/istio.md.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Final, Literal

from pydantic import Field, model_validator

from services.contracts.events import Route
from services.traffic.base import PIN_HEADER, Applied, RouterConfigError
from services.traffic.k8s import (
    KubeApi,
    KubeOptions,
    Obj,
    ObjectRef,
    Resource,
    Role,
    Share,
    as_int,
    canary_percent,
    check_template,
    dig,
    generation,
    parse_options,
    record_headers,
    render,
    shares,
)

NAME: Final = "istio"
VIRTUAL_SERVICE: Final = Resource(
    "networking.istio.io", "v1", "virtualservices", "VirtualService", NAME
)
PIN_HEADER_KEY: Final = PIN_HEADER.lower()
"""Istio refuses header matches with upper-case names; HTTP header names are case-insensitive."""


class IstioOptions(KubeOptions):
    """`canary.traffic.options` for `router: istio`. `namespace`/`name`: the VirtualService."""

    host: str | None = Field(
        default=None, description="Destination host shared by all versions (subsets mode)."
    )
    subset_template: str = Field(
        default="{version_token}", description="Subset name per version (DestinationRule)."
    )
    host_template: str | None = Field(
        default=None, description="Destination host per version (hosts mode), instead of host."
    )
    port: int | None = Field(default=None, ge=1, le=65535, description="Destination port.")
    match: tuple[dict[str, Any], ...] = Field(
        default=(), max_length=8, description="HTTPMatchRequest objects; empty: every request."
    )
    pin: bool = Field(default=True, description=f"Install the {PIN_HEADER} header routes.")
    record_headers: bool = Field(
        default=True,
        description="Set the x-preflight-* request headers per destination "
        "(route[].headers.request.set) for the Envoy access log behind envoy-receiver.",
    )
    weight_total: Literal[100, 1000] = Field(default=100, description="Sum of the weights.")
    route_name: str = Field(
        default="preflight", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=40
    )
    require_status: bool = Field(
        default=False,
        description="Confirm only once istiod reports status.observedGeneration for the "
        "current generation (needs istiod's analysis: values.global.istiod.enableAnalysis).",
    )

    @model_validator(mode="after")
    def _one_destination_mode(self) -> IstioOptions:
        if (self.host is None) == (self.host_template is None):
            raise ValueError("set exactly one of host (with subsets) and host_template")
        return self


def build(options: Mapping[str, Any], settings: Any) -> IstioRouter:
    opts = parse_options(IstioOptions, NAME, options)
    check_template(NAME, "subset_template", opts.subset_template)
    if opts.host_template is not None:
        check_template(NAME, "host_template", opts.host_template)
    for i, match in enumerate(opts.match):
        if any(key.lower() == PIN_HEADER_KEY for key in match.get("headers", {})):
            raise RouterConfigError(
                f"traffic router {NAME!r}: options.match.{i}: must not match on {PIN_HEADER}"
            )
    return IstioRouter(opts, KubeApi(opts, settings))


class IstioRouter:
    name = NAME

    def __init__(self, options: IstioOptions, api: KubeApi) -> None:
        self.options = options
        self.api = api
        self.ref = ObjectRef(VIRTUAL_SERVICE, options.namespace, options.name)
        self.supports_pin = options.pin

    # ---- writing --------------------------------------------------------------------------

    def destination(self, route: Route, share: Share) -> Obj:
        o = self.options
        if o.host_template is not None:
            dest: Obj = {
                "host": render(
                    o.host_template, model=route.model, role=share.role, target=share.target
                )
            }
        else:
            subset = render(
                o.subset_template, model=route.model, role=share.role, target=share.target
            )
            dest = {"host": o.host, "subset": subset}
        if o.port is not None:
            dest["port"] = {"number": o.port}
        return dest

    def way(self, route: Route, share: Share, weight: int | None, *, pinned: bool = False) -> Obj:
        """One HTTPRouteDestination: where, how much, and the record headers (`pinned`: a pin
        route's, whose records stay out of the analysis)."""
        out: Obj = {"destination": self.destination(route, share)}
        if weight is not None:
            out["weight"] = weight
        if self.options.record_headers:
            headers = dict(record_headers(route, share, pinned=pinned))
            out["headers"] = {"request": {"set": headers}}
        return out

    def http(self, route: Route) -> list[Obj]:
        """spec.http as preflight wants it for `route`."""
        o = self.options
        split = shares(route, o.weight_total)
        out: list[Obj] = []
        if o.pin:
            for share in split:
                pin = {"headers": {PIN_HEADER_KEY: {"exact": share.role}}}
                matches = [merge_headers(m, pin["headers"]) for m in o.match] or [pin]
                out.append(
                    {
                        "name": f"{o.route_name}-pin-{share.role}",
                        "match": matches,
                        "route": [self.way(route, share, None, pinned=True)],
                    }
                )
        weighted: Obj = {
            "name": o.route_name,
            "route": [self.way(route, s, s.weight) for s in split],
        }
        if o.match:
            weighted["match"] = [copy.deepcopy(m) for m in o.match]
        out.append(weighted)
        return out

    def manifest(self, route: Route) -> Obj:
        return {**self.ref.skeleton(), "spec": {"http": self.http(route)}}

    async def apply(self, route: Route) -> None:
        await self.api.get(self.ref)  # missing: "create it first", never created half-made
        await self.api.apply(self.ref, self.manifest(route))

    # ---- reading back ---------------------------------------------------------------------

    async def read(self, route: Route) -> Applied:
        return self.verdict(route, await self.api.get(self.ref))

    def verdict(self, route: Route, obj: Obj) -> Applied:
        """Whether `obj` (the VirtualService as read) has `route` in force; pure."""
        o = self.options
        split = shares(route, o.weight_total)
        roles = {dest_key(self.destination(route, s)): s.role for s in split}
        want = {s.role: s.weight for s in split}
        wanted = ", ".join(f"{dest_label(self.destination(route, s))}={s.weight}" for s in split)
        http = [h for h in dig(obj, "spec", "http") or [] if isinstance(h, dict)]
        by_name = {h.get("name"): h for h in http}
        weighted = by_name.get(o.route_name)
        if weighted is None:
            return Applied(False, None, f"{self.ref}: no http route named {o.route_name!r}")
        found: dict[Role, int] = {}
        seen = []
        dests = [d for d in weighted.get("route") or [] if isinstance(d, dict)]
        marks = {s.role: self.way(route, s, None).get("headers") for s in split}
        unmarked = []
        for dest in dests:
            # Istio: a lone destination takes everything whatever its weight.
            weight = o.weight_total if len(dests) == 1 else int(dest.get("weight", 0))
            seen.append(f"{dest_label(dest.get('destination') or {})}={weight}")
            role = roles.get(dest_key(dest.get("destination") or {}))
            if role is not None:
                found[role] = found.get(role, 0) + weight
                if dest.get("headers") != marks[role]:
                    unmarked.append(dest_label(dest.get("destination") or {}))
        weight_read = canary_percent(found) if found else None
        if len(dests) != len(split) or found != want:
            return Applied(
                False,
                weight_read,
                f"{self.ref}: http route {o.route_name!r} has {', '.join(seen) or 'no route'}, "
                f"wanted {wanted} (out of {o.weight_total})",
            )
        if unmarked:
            return Applied(
                False,
                weight_read,
                f"{self.ref}: destinations {', '.join(unmarked)} lack the record headers "
                "preflight sets (changed by someone else?)",
            )
        if o.pin:
            missing = [
                s.role
                for s in split
                if not pin_route_ok(
                    by_name.get(f"{o.route_name}-pin-{s.role}"), self.destination(route, s), s.role
                )
            ]
            if missing:
                return Applied(
                    False,
                    weight_read,
                    f"{self.ref}: no {PIN_HEADER_KEY} route for {', '.join(missing)} in spec.http",
                )
        problem = self.status_problem(obj)
        if problem is not None:
            return Applied(False, weight_read, f"{self.ref}: {problem}")
        gen = generation(obj)
        observed = as_int(dig(obj, "status", "observedGeneration"))
        seen_by = (
            f"istiod observed generation {observed}"
            if observed is not None
            else "no status from istiod (confirmed from the spec alone)"
        )
        return Applied(
            True,
            weight_read,
            f"{self.ref}: http route {o.route_name!r} {wanted} (canary {weight_read}%) at "
            f"generation {gen}; {seen_by}",
        )

    def status_problem(self, obj: Obj) -> str | None:
        status = dig(obj, "status") or {}
        gen = generation(obj)
        observed = as_int(status.get("observedGeneration")) if isinstance(status, dict) else None
        if observed is None:
            if self.options.require_status:
                return (
                    "istiod reports no status.observedGeneration (require_status is set: turn on "
                    "istiod's analysis, values.global.istiod.enableAnalysis=true)"
                )
            return None
        if observed < gen:
            return f"istiod has observed generation {observed}, the object is at {gen}"
        for msg in status.get("validationMessages") or []:
            if isinstance(msg, dict) and str(dig(msg, "level") or "").upper() == "ERROR":
                code = dig(msg, "type", "code") or dig(msg, "type", "name") or "?"
                return f"istiod reports an error ({code}): {msg.get('message', '')}"
        for cond in status.get("conditions") or []:
            if isinstance(cond, dict) and cond.get("status") == "False":
                why = cond.get("message") or cond.get("reason") or ""
                return f"istiod reports {cond.get('type')}=False: {why}"
        return None

    async def aclose(self) -> None:
        await self.api.aclose()


def merge_headers(match: Mapping[str, Any], headers: Mapping[str, Any]) -> Obj:
    out = copy.deepcopy(dict(match))
    out["headers"] = {**match.get("headers", {}), **headers}
    return out


def dest_key(dest: Mapping[str, Any]) -> tuple[Any, ...]:
    return (dest.get("host"), dest.get("subset"), dig(dest, "port", "number"))


def dest_label(dest: Mapping[str, Any]) -> str:
    subset = f"/{dest['subset']}" if dest.get("subset") else ""
    return f"{dest.get('host')}{subset}"


def pin_route_ok(http: Mapping[str, Any] | None, destination: Obj, role: Role) -> bool:
    if http is None:
        return False
    dests = [d.get("destination") or {} for d in http.get("route") or [] if isinstance(d, dict)]
    if [dest_key(d) for d in dests] != [dest_key(destination)]:
        return False
    matches = [m for m in http.get("match") or [] if isinstance(m, dict)]
    return bool(matches) and all(
        dig(m, "headers", PIN_HEADER_KEY, "exact") == role for m in matches
    )
