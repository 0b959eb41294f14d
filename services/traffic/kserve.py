"""The `kserve` router: the canary split of an existing KServe InferenceService.

KServe has two ways, one per deployment mode (annotation `serving.kserve.io/deploymentMode`, or
the `status.deploymentMode` KServe writes; `mode` in the options overrides both):

Knative (`Serverless`/`Knative`): the predictor's model is the canary's (`storageUri`) and
`spec.predictor.canaryTrafficPercent` the canary's integer percent; KServe sends the rest to the
previously rolled-out revision. Read back from `status.components.predictor`: the latest revision
ready (`latestReadyRevision == latestCreatedRevision`), its `traffic` percent, and Ready=True.

Standard (`RawDeployment`/`Standard`, KServe v0.20+): the stable predictor keeps its own model and
is named for its version (`spec.predictor.name`); the canary is the one entry of `spec.canary`
(`trafficPercent`, a predictor named for the canary's version with its `storageUri`). Read back
from `status.canaryStatuses` (the canary's name, `ready`, `trafficPercent`) and the Ready and
CanaryPredictorReady conditions. Promotion names the stable for the canary's version, which
KServe takes over without restarting the canary's pods.

Both store integer percents: fractional weights round half up (2.5% -> 3%), and the rounded
value is what must be read back. preflight owns `spec.predictor.model.storageUri`,
`spec.predictor.canaryTrafficPercent` (Knative) or `spec.predictor.name` and `spec.canary`
(Standard). There is no header pin: KServe routes by revision tag or Service, not by header.
docs/data-planes/kserve.md.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final, Literal

from pydantic import Field

from services.contracts.events import Route
from services.traffic.base import Applied, RouterError
from services.traffic.k8s import (
    KubeApi,
    KubeOptions,
    Obj,
    ObjectRef,
    Resource,
    Share,
    check_template,
    condition,
    describe_condition,
    dig,
    parse_options,
    render,
    shares,
)

NAME: Final = "kserve"
INFERENCE_SERVICE: Final = Resource(
    "serving.kserve.io", "v1beta1", "inferenceservices", "InferenceService", NAME
)
MODE_ANNOTATION: Final = "serving.kserve.io/deploymentMode"
MODES: Final[dict[str, Literal["knative", "standard"]]] = {
    "serverless": "knative",
    "knative": "knative",
    "rawdeployment": "standard",
    "standard": "standard",
}
DEFAULT_CONTAINER: Final = "kserve-container"
"""The predictor container's name KServe gives it (constants.InferenceServiceContainerName)."""
PREDICTOR_NAME: Final = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
"""The CRD's pattern for `predictor.name` (it names the Deployment `{isvc}-{name}-predictor`)."""

Mode = Literal["knative", "standard"]


class KServeOptions(KubeOptions):
    """`canary.traffic.options` for `router: kserve`. `namespace`/`name`: the InferenceService."""

    mode: Literal["auto", "knative", "standard"] = Field(
        default="auto", description="auto: from the deploymentMode annotation or status."
    )
    storage_uri_template: str = Field(
        default="{location}", description="storageUri per version (the route's location)."
    )
    name_template: str = Field(
        default="v-{version_token}",
        description="Standard mode: predictor name per version (lower case, starts a-z).",
    )


def build(options: Mapping[str, Any], settings: Any) -> KServeRouter:
    opts = parse_options(KServeOptions, NAME, options)
    check_template(NAME, "storage_uri_template", opts.storage_uri_template)
    check_template(NAME, "name_template", opts.name_template)
    return KServeRouter(opts, KubeApi(opts, settings))


class KServeRouter:
    name = NAME
    supports_pin = False

    def __init__(self, options: KServeOptions, api: KubeApi) -> None:
        self.options = options
        self.api = api
        self.ref = ObjectRef(INFERENCE_SERVICE, options.namespace, options.name)

    # ---- what to write --------------------------------------------------------------------

    def mode(self, obj: Obj) -> Mode:
        if self.options.mode != "auto":
            return self.options.mode
        found = dig(obj, "metadata", "annotations", MODE_ANNOTATION) or dig(
            obj, "status", "deploymentMode"
        )
        mode = MODES.get(str(found or "").lower())
        if mode is None:
            said = f"deployment mode {found!r}" if found else "no deployment mode"
            raise RouterError(
                f"{self.ref}: {said} (annotation {MODE_ANNOTATION} or status.deploymentMode); "
                "the kserve router handles Knative/Serverless and Standard/RawDeployment: set "
                "the annotation or options.mode"
            )
        return mode

    def storage_uri(self, route: Route, share: Share) -> str:
        if not share.target.location:
            raise RouterError(
                f"route for {route.model}: {share.role} {share.target.version} has no location "
                "(the kserve router writes it as the predictor's storageUri)"
            )
        return render(
            self.options.storage_uri_template,
            model=route.model,
            role=share.role,
            target=share.target,
        )

    def predictor_name(self, route: Route, share: Share) -> str:
        name = render(
            self.options.name_template, model=route.model, role=share.role, target=share.target
        )
        if not PREDICTOR_NAME.match(name) or len(name) > 63:
            raise RouterError(
                f"{self.ref}: predictor name {name!r} (options.name_template) is not a valid "
                "name: lower case letters, digits and '-', starting with a letter"
            )
        return name

    def manifest(self, route: Route, obj: Obj) -> Obj:
        """The partial InferenceService applied for `route`, given the live object `obj`."""
        split = shares(route, 100)
        first = split[-1]  # the canary where there is one, else the only target
        if self.mode(obj) == "knative":
            predictor: Obj = {"model": {"storageUri": self.storage_uri(route, first)}}
            if len(split) == 2:
                predictor["canaryTrafficPercent"] = first.weight
            return {**self.ref.skeleton(), "spec": {"predictor": predictor}}
        stable = split[0]
        predictor = {
            "name": self.predictor_name(route, stable),
            "model": {"storageUri": self.storage_uri(route, stable)},
        }
        canaries: list[Obj] = []
        if len(split) == 2:
            canary = split[1]
            name = self.predictor_name(route, canary)
            if name == predictor["name"]:
                raise RouterError(
                    f"{self.ref}: stable and canary would both be predictor {name!r}; "
                    "options.name_template must tell their versions apart"
                )
            model_format = dig(obj, "spec", "predictor", "model", "modelFormat")
            if not isinstance(model_format, dict):
                raise RouterError(
                    f"{self.ref}: spec.predictor.model.modelFormat is not set; the kserve router "
                    "copies it into the canary (docs/data-planes/kserve.md)"
                )
            # The CRD requires a container name in a canary's model (ModelSpec inlines a
            # Container); KServe merges the canary onto the stable, so the stable's name
            # (KServe's default: kserve-container) changes nothing.
            container = dig(obj, "spec", "predictor", "model", "name") or DEFAULT_CONTAINER
            model = {
                "name": container,
                "modelFormat": model_format,
                "storageUri": self.storage_uri(route, canary),
            }
            canaries.append(
                {"trafficPercent": canary.weight, "predictor": {"name": name, "model": model}}
            )
        return {**self.ref.skeleton(), "spec": {"predictor": predictor, "canary": canaries}}

    async def apply(self, route: Route) -> None:
        obj = await self.api.get(self.ref)  # the mode and modelFormat; missing: "create it first"
        await self.api.apply(self.ref, self.manifest(route, obj))

    # ---- reading back ---------------------------------------------------------------------

    async def read(self, route: Route) -> Applied:
        return self.verdict(route, await self.api.get(self.ref))

    def verdict(self, route: Route, obj: Obj) -> Applied:
        """Whether `obj` (the InferenceService as read) has `route` in force; pure."""
        want = self.manifest(route, obj)
        if self.mode(obj) == "knative":
            return self._knative(route, obj, want)
        return self._standard(route, obj, want)

    def _knative(self, route: Route, obj: Obj, want: Obj) -> Applied:
        split = shares(route, 100)
        wanted_pct = split[-1].weight if len(split) == 2 else 100
        uri = dig(want, "spec", "predictor", "model", "storageUri")
        spec_uri = dig(obj, "spec", "predictor", "model", "storageUri")
        spec_pct = dig(obj, "spec", "predictor", "canaryTrafficPercent")
        if spec_uri != uri or (spec_pct if spec_pct is not None else 100) != wanted_pct:
            return Applied(
                False,
                None,
                f"{self.ref}: spec.predictor has storageUri {spec_uri} at canaryTrafficPercent "
                f"{spec_pct}, wanted {uri} at {wanted_pct}",
            )
        status = dig(obj, "status", "components", "predictor") or {}
        created, ready = status.get("latestCreatedRevision"), status.get("latestReadyRevision")
        traffic = [t for t in status.get("traffic") or [] if isinstance(t, dict)]
        latest = [t for t in traffic if t.get("latestRevision") is True]
        latest_pct = sum(int(t.get("percent") or 0) for t in latest) if latest else None
        weight = float(latest_pct) if latest_pct is not None and len(split) == 2 else None
        if weight is None and latest_pct is not None:
            weight = 100.0 if split[-1].role == "canary" else 0.0
        if not created or not latest:
            return Applied(
                False, weight, f"{self.ref}: KServe reports no predictor revision traffic yet"
            )
        if created != ready:
            return Applied(
                False,
                weight,
                f"{self.ref}: predictor revision {created} is not ready yet (latest ready: "
                f"{ready or 'none'})",
            )
        if latest_pct != wanted_pct or any(t.get("revisionName") != created for t in latest):
            shown = ", ".join(
                f"{t.get('revisionName')}={t.get('percent')}%"
                + (" (latest)" if t.get("latestRevision") else "")
                for t in traffic
            )
            return Applied(
                False,
                weight,
                f"{self.ref}: status.components.predictor.traffic is {shown}, wanted the "
                f"latest revision {created} at {wanted_pct}%",
            )
        ready_cond = condition(dig(obj, "status", "conditions"), "Ready")
        if ready_cond is None or ready_cond.get("status") != "True":
            said = describe_condition(ready_cond) if ready_cond else "no Ready condition"
            return Applied(False, weight, f"{self.ref}: {said}")
        others = ", ".join(
            f"{t.get('percent')}% to {t.get('revisionName')}"
            for t in traffic
            if t.get("latestRevision") is not True and t.get("percent")
        )
        rest = f", {others}" if others else ""
        return Applied(
            True,
            weight,
            f"{self.ref}: revision {created} (latest) serves {wanted_pct}%{rest}; Ready=True",
        )

    def _standard(self, route: Route, obj: Obj, want: Obj) -> Applied:
        spec_want = want["spec"]
        spec = dig(obj, "spec") or {}
        got = (
            dig(spec, "predictor", "name"),
            dig(spec, "predictor", "model", "storageUri"),
            [_canary_key(c) for c in spec.get("canary") or [] if isinstance(c, dict)],
        )
        expected = (
            spec_want["predictor"]["name"],
            spec_want["predictor"]["model"]["storageUri"],
            [_canary_key(c) for c in spec_want["canary"]],
        )
        if got != expected:
            return Applied(
                False,
                None,
                f"{self.ref}: spec has predictor {got[0]} ({got[1]}) and canaries "
                f"{_canaries_label(got[2])}, wanted {expected[0]} ({expected[1]}) and "
                f"{_canaries_label(expected[2])}",
            )
        statuses = {
            s.get("name"): s
            for s in dig(obj, "status", "canaryStatuses") or []
            if isinstance(s, dict)
        }
        weight: float | None = None
        wanted = {name: pct for name, pct, _ in expected[2]}
        for name, pct in wanted.items():
            found = statuses.get(name)
            if found is None:
                return Applied(
                    False, None, f"{self.ref}: KServe reports no status for canary {name} yet"
                )
            weight = float(found.get("trafficPercent", 0))
            if found.get("trafficPercent") != pct:
                return Applied(
                    False,
                    weight,
                    f"{self.ref}: status.canaryStatuses gives canary {name} "
                    f"{found.get('trafficPercent')}%, wanted {pct}%",
                )
            if found.get("ready") is not True:
                return Applied(
                    False, weight, f"{self.ref}: canary {name} is not ready (status.canaryStatuses)"
                )
        extra = sorted(str(n) for n in statuses if n not in wanted)
        if extra:
            return Applied(
                False, weight, f"{self.ref}: KServe still reports canary {', '.join(extra)}"
            )
        if not wanted:
            weight = 100.0 if shares(route, 100)[-1].role == "canary" else 0.0
        kinds = ("Ready", "CanaryPredictorReady") if wanted else ("Ready",)
        for kind in kinds:
            cond = condition(dig(obj, "status", "conditions"), kind)
            if cond is None or cond.get("status") != "True":
                said = describe_condition(cond) if cond else f"no {kind} condition"
                return Applied(False, weight, f"{self.ref}: {said}")
        where = ", ".join(f"canary {n} at {p}%" for n, p in wanted.items()) or "no canary"
        return Applied(
            True,
            weight,
            f"{self.ref}: predictor {expected[0]} with {where}; Ready=True"
            + (", CanaryPredictorReady=True" if wanted else ""),
        )

    async def aclose(self) -> None:
        await self.api.aclose()


def _canary_key(canary: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    return (
        dig(canary, "predictor", "name"),
        canary.get("trafficPercent"),
        dig(canary, "predictor", "model", "storageUri"),
    )


def _canaries_label(canaries: list[tuple[Any, Any, Any]]) -> str:
    return "[" + ", ".join(f"{n} {p}% ({u})" for n, p, u in canaries) + "]"
