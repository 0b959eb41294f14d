"""Kubernetes access shared by the gateway-api, istio and kserve routers: server-side apply.

Each router writes a *partial* object (only the fields it owns) with server-side apply under the
field manager `preflight`, and reads the whole object back. The official `kubernetes` client does
the HTTP; it is synchronous, so every call runs in a worker thread (`asyncio.to_thread`).

    RouterError                     str() is one line; never a token or a header
    ├── 404  "<Kind> ns/name not found — create it first (docs/data-planes/<page>.md)"
    ├── 403  the verb, resource and group refused, and the Role in deploy/k8s/examples/<router>/
    ├── 401  the credentials were refused (which source: in-cluster, kubeconfig, settings)
    ├── 409  another field manager owns a field preflight writes: its name and the fields
    ├── 400/422  the API's own message (strict field validation, schema, webhooks)
    └── 429/5xx/connection errors, after `retries` tries with exponential backoff

Where the API is (first that applies): `options.api_url` or `settings.kube_api_url` (with
`settings.kube_token` as the bearer token: tests and out-of-cluster runs), `options.kubeconfig` /
`options.context`, the pod's service account (in-cluster), then `KUBECONFIG` / ~/.kube/config.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import string
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Final, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

import urllib3
from kubernetes import client as kube_client
from kubernetes import config as _kube_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.contracts.events import Route, RouteTarget
from services.envoy.config import DEPLOYMENT_HEADER, PINNED_HEADER, ROLE_HEADER, VERSION_HEADER
from services.router.routes import MODEL_HEADER
from services.traffic.base import RouterConfigError, RouterError

log = logging.getLogger(__name__)

FIELD_MANAGER: Final = "preflight"
"""The field manager of every apply: `kubectl get -o yaml --show-managed-fields` shows it."""

APPLY_PATCH: Final = "application/apply-patch+yaml"
TRANSIENT_STATUSES: Final = frozenset({429, 500, 502, 503, 504})
MAX_RETRY_AFTER_S: Final = 10.0
DNS_LABEL: Final = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN: Final = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
TEMPLATE_FIELDS: Final = frozenset(
    {"model", "model_token", "version", "version_token", "deployment_id", "location", "role"}
)
"""What a name template in the options may use: `{model_token}-{version_token}`, ..."""

Role = Literal["stable", "canary"]
Obj = dict[str, Any]
T = TypeVar("T")
# The config loaders carry no annotations; typed as Any rather than with an ignore that could go
# stale when they gain some.
kube_config: Any = _kube_config


@dataclass(frozen=True)
class Resource:
    """One custom resource type a router patches, and where its docs and RBAC example are."""

    group: str
    version: str
    plural: str
    kind: str
    router: str
    """The router's registry name: docs/data-planes/<router>.md, deploy/k8s/examples/<router>/."""

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"

    @property
    def docs(self) -> str:
        return f"docs/data-planes/{self.router}.md"

    @property
    def rbac(self) -> str:
        return f"deploy/k8s/examples/{self.router}/rbac.yaml"


@dataclass(frozen=True)
class ObjectRef:
    resource: Resource
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.resource.kind} {self.namespace}/{self.name}"

    def skeleton(self) -> Obj:
        """The head every applied object carries (server-side apply requires it)."""
        return {
            "apiVersion": self.resource.api_version,
            "kind": self.resource.kind,
            "metadata": {"name": self.name, "namespace": self.namespace},
        }


class KubeOptions(BaseModel):
    """Options every Kubernetes router takes (its own add to these); unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    namespace: str = Field(pattern=DNS_LABEL, max_length=63, description="The object's namespace.")
    name: str = Field(pattern=DNS_SUBDOMAIN, max_length=253, description="The object's name.")
    force: bool = Field(
        default=False,
        description="Take over fields another field manager owns (server-side apply `force`); "
        "off: such a conflict is an error that names the other manager.",
    )
    timeout_s: float = Field(default=10.0, gt=0, le=120, description="Per API request.")
    retries: int = Field(default=4, ge=0, le=10, description="Tries after a 429/5xx/network error.")
    retry_backoff_s: float = Field(
        default=0.5, ge=0, le=30, description="First wait between tries; doubles each time."
    )
    api_url: str | None = Field(
        default=None, description="Kubernetes API URL; else settings, in-cluster, kubeconfig."
    )
    kubeconfig: str | None = Field(default=None, description="A kubeconfig file to use.")
    context: str | None = Field(default=None, description="A context in that kubeconfig.")


OptionsT = TypeVar("OptionsT", bound=KubeOptions)


def parse_options(model: type[OptionsT], router: str, options: Mapping[str, Any]) -> OptionsT:
    """The router's options, or RouterConfigError naming the router and each bad key."""
    try:
        return model.model_validate(dict(options))
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "<options>"
            problems.append(f"{key}: {err['msg']}")
        raise RouterConfigError(
            f"traffic router {router!r}: canary.traffic.options: {'; '.join(problems)}"
        ) from None


def check_template(router: str, key: str, template: str) -> str:
    """A name template's placeholders, checked when the options are read, not at first use."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise RouterConfigError(f"traffic router {router!r}: options.{key}: {exc}") from None
    unknown = fields - TEMPLATE_FIELDS
    if unknown or "" in fields:
        raise RouterConfigError(
            f"traffic router {router!r}: options.{key}: unknown placeholder(s) "
            f"{', '.join(sorted(repr(f) for f in unknown or {''}))}; "
            f"known: {', '.join(sorted(TEMPLATE_FIELDS))}"
        )
    return template


def dns_token(text: str) -> str:
    """`org/Chat_7B` -> `org-chat-7b`: a DNS label (lower case, digits, `-`; at most 63)."""
    token = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return token[:63].rstrip("-") or "x"


def render(template: str, *, model: str, role: Role, target: RouteTarget) -> str:
    """A name from a template checked by `check_template`."""
    return template.format(
        model=model,
        model_token=dns_token(model),
        version=target.version,
        version_token=dns_token(target.version),
        deployment_id=target.deployment_id or "",
        location=target.location or "",
        role=role,
    )


# ---- weights ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Share:
    """One target of a route and its integer weight out of the router's total."""

    role: Role
    target: RouteTarget
    weight: int


def scaled(percent: float, total: int) -> int:
    """`percent` of `total`, rounded half up (2.5% of 100 -> 3, 0.25% of 1000 -> 3)."""
    exact = Decimal(str(percent)) * total / 100
    return int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def shares(route: Route, total: int) -> tuple[Share, ...]:
    """Who gets what, in integers summing to `total`: stable first, then canary.

    No canary: all to stable. No stable (a model's first version): all to the canary, as the
    builtin router does. A canary at weight 0 keeps its backend (weight 0), so the pin route can
    still reach it."""
    if route.stable is None and route.canary is None:
        raise RouterError(f"route for {route.model} names no stable and no canary version")
    if route.canary is None:
        assert route.stable is not None
        return (Share("stable", route.stable, total),)
    if route.stable is None:
        return (Share("canary", route.canary, total),)
    canary = scaled(route.canary_weight, total)
    return (Share("stable", route.stable, total - canary), Share("canary", route.canary, canary))


def record_deployment(route: Route) -> str:
    """The deployment id both roles' records carry: the canary's while it takes traffic, else the
    stable's. The built-in router's rule (services/router/routes.py `record_deployment_id`),
    without its need for an upstream URL: here the data plane knows where the canary is."""
    live = route.canary is not None and route.canary_weight > 0
    target = route.canary if live else route.stable
    return (target.deployment_id if target is not None else None) or ""


def record_headers(route: Route, share: Share, *, pinned: bool = False) -> list[tuple[str, str]]:
    """The request headers a backend's requests carry, for the Envoy access log that feeds
    envoy-receiver (docs/data-planes/envoy.md): model, role, version, the deployment id the
    record counts for, and whether a pin rule sent it (pinned records stay out of the canary
    analysis). Empty values are left out."""
    pairs = [
        (MODEL_HEADER.lower(), route.model),
        (ROLE_HEADER, share.role),
        (VERSION_HEADER, share.target.version),
        (DEPLOYMENT_HEADER, record_deployment(route)),
        (PINNED_HEADER, "true" if pinned else "false"),
    ]
    return [(name, value) for name, value in pairs if value]


def percent(canary: int, total: int) -> float:
    return 100.0 * canary / total if total > 0 else 0.0


def canary_percent(found: Mapping[Role, int]) -> float:
    """The canary's percent from weights read back (relative integers)."""
    total = sum(found.values())
    if "canary" not in found:
        return 0.0
    if "stable" not in found:
        return 100.0
    return round(percent(found["canary"], total), 4)


# ---- the client ---------------------------------------------------------------------------------


def _secret(value: Any) -> str | None:
    if value is None:
        return None
    getter = getattr(value, "get_secret_value", None)
    text = getter() if callable(getter) else value
    return str(text) if text else None


def configure(options: KubeOptions, settings: Any) -> tuple[kube_client.Configuration, str]:
    """The client configuration and, in words, where it came from (for error messages)."""
    cfg = kube_client.Configuration()
    configured = getattr(settings, "kube_api_url", None)
    url = options.api_url or configured
    if url:
        cfg.host = str(url).rstrip("/")
        token = _secret(getattr(settings, "kube_token", None))
        # The token is PREFLIGHT_KUBE_API_URL's: never sent to a URL the options name instead
        # (a request that could set them received the controller's token at its own server).
        if token and (not options.api_url or _same_url(options.api_url, configured)):
            cfg.api_key = {"BearerToken": token}
            cfg.api_key_prefix = {"BearerToken": "Bearer"}
        ca_file = getattr(settings, "kube_ca_file", None)
        if ca_file:
            cfg.ssl_ca_cert = str(ca_file)
        where = "options" if options.api_url else "settings"
        source = f"the API URL in {where} ({_without_userinfo(cfg.host)})"
    else:
        try:
            if options.kubeconfig or options.context:
                kube_config.load_kube_config(
                    config_file=options.kubeconfig,
                    context=options.context,
                    client_configuration=cfg,
                    persist_config=False,
                )
                source = f"kubeconfig {options.kubeconfig or '(default)'}"
            else:
                try:
                    kube_config.load_incluster_config(client_configuration=cfg)
                    source = "the pod's service account"
                except ConfigException:
                    kube_config.load_kube_config(client_configuration=cfg, persist_config=False)
                    source = "kubeconfig (KUBECONFIG or ~/.kube/config)"
        except (ConfigException, OSError, TypeError, ValueError) as exc:
            raise RouterError(
                "no Kubernetes API configured: not in a pod with a service account, and no "
                f"kubeconfig could be loaded ({type(exc).__name__}: {_one_line(str(exc), 200)})"
            ) from None
    cfg.retries = False  # our own loop retries, with backoff, and knows which errors are transient
    return cfg, source


def _same_url(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and str(a).rstrip("/") == str(b).rstrip("/")


def _without_userinfo(url: str) -> str:
    """The URL as it may be shown: never a `user:password@` part."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _one_line(text: str, limit: int = 400) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _status_body(exc: ApiException) -> Obj:
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


def _retry_after(exc: ApiException) -> float | None:
    headers = exc.headers or {}
    value = headers.get("Retry-After") if hasattr(headers, "get") else None
    try:
        return min(float(value), MAX_RETRY_AFTER_S) if value is not None else None
    except ValueError:
        return None


def _field_conflicts(body: Obj) -> list[tuple[str, str]]:
    """(manager, field) for each FieldManagerConflict cause of a 409 Status."""
    causes = (body.get("details") or {}).get("causes") or []
    found = []
    for cause in causes:
        if not isinstance(cause, dict) or cause.get("type") != "FieldManagerConflict":
            continue
        match = re.search(r'conflict with "([^"]+)"', str(cause.get("message", "")))
        found.append((match.group(1) if match else "?", str(cause.get("field", "?"))))
    if not found:  # older servers: only the message
        for manager, fields in re.findall(
            r'conflicts? with "([^"]+)"[^:]*:\s*([^\n]+)', str(body.get("message", ""))
        ):
            found.append((manager, fields.strip()))
    return found


Verb = Literal["get", "patch"]


class KubeApi:
    """GET and server-side apply of one resource type's objects, with retries and one-line
    errors. Built lazily: constructing a router reads no kubeconfig and opens no connection."""

    def __init__(
        self,
        options: KubeOptions,
        settings: Any,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.options = options
        self.settings = settings
        self._sleep = sleep
        self._api_client: kube_client.ApiClient | None = None
        self._source = ""

    def _custom(self) -> kube_client.CustomObjectsApi:
        if self._api_client is None:
            cfg, self._source = configure(self.options, self.settings)
            self._api_client = kube_client.ApiClient(cfg)
        return kube_client.CustomObjectsApi(self._api_client)

    async def get(self, ref: ObjectRef) -> Obj:
        """The whole object, status included."""
        api = self._custom()
        res = ref.resource

        def call() -> Any:
            return api.get_namespaced_custom_object(
                res.group,
                res.version,
                ref.namespace,
                res.plural,
                ref.name,
                _request_timeout=self.options.timeout_s,
            )

        return _as_object(await self._call("get", ref, call), ref)

    async def apply(self, ref: ObjectRef, body: Obj) -> Obj:
        """Server-side apply of `body` (a partial object: only the fields preflight owns).

        The caller GETs the object first: apply would create a missing object, and a routing
        object made of preflight's fields alone would route nothing."""
        api = self._custom()
        res = ref.resource
        extra: dict[str, Any] = {"force": True} if self.options.force else {}

        def call() -> Any:
            return api.patch_namespaced_custom_object(
                res.group,
                res.version,
                ref.namespace,
                res.plural,
                ref.name,
                body,
                field_manager=FIELD_MANAGER,
                field_validation="Strict",
                _content_type=APPLY_PATCH,
                _request_timeout=self.options.timeout_s,
                **extra,
            )

        return _as_object(await self._call("patch", ref, call), ref)

    async def aclose(self) -> None:
        if self._api_client is not None:
            api_client, self._api_client = self._api_client, None
            await asyncio.to_thread(api_client.close)

    async def _call(self, verb: Verb, ref: ObjectRef, call: Callable[[], T]) -> T:
        attempt = 0
        while True:
            wait = self.options.retry_backoff_s * (2**attempt)
            try:
                return await asyncio.to_thread(call)
            except ApiException as exc:
                body = _status_body(exc)
                status = int(exc.status or 0)
                retryable = status in TRANSIENT_STATUSES or (
                    status == 409 and not _field_conflicts(body)  # "the object has been modified"
                )
                if not retryable or attempt >= self.options.retries:
                    raise self._error(verb, ref, status, exc.reason, body, attempt) from None
                retry_after = _retry_after(exc) if status in (429, 503) else None
                if retry_after is not None:
                    wait = retry_after
                log.warning(
                    "%s %s: HTTP %s, try %d of %d in %.2fs",
                    verb,
                    ref,
                    status,
                    attempt + 2,
                    self.options.retries + 1,
                    wait,
                )
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                if attempt >= self.options.retries:
                    raise RouterError(
                        f"{verb} {ref}: cannot reach the Kubernetes API ({self._source}) after "
                        f"{attempt + 1} tries: {type(exc).__name__}"
                    ) from None
                log.warning(
                    "%s %s: %s, try %d of %d in %.2fs",
                    verb,
                    ref,
                    type(exc).__name__,
                    attempt + 2,
                    self.options.retries + 1,
                    wait,
                )
            attempt += 1
            await self._sleep(wait)

    def _error(
        self, verb: Verb, ref: ObjectRef, status: int, reason: Any, body: Obj, attempt: int
    ) -> RouterError:
        res = ref.resource
        message = _one_line(str(body.get("message") or reason or ""))
        tries = f" after {attempt + 1} tries" if attempt else ""
        if status == 404:
            return RouterError(f"{ref} not found — create it first ({res.docs})")
        if status == 403:
            return RouterError(
                f"{verb} {res.plural}.{res.group} {ref.namespace}/{ref.name} forbidden: the "
                f"canary-controller's service account needs get and patch on it (the Role in "
                f"{res.rbac}); the API said: {message}"
            )
        if status == 401:
            return RouterError(
                f"{verb} {ref}: the Kubernetes API refused the credentials from {self._source} "
                "(401 Unauthorized): check the service account token or kubeconfig"
            )
        if status == 409:
            conflicts = _field_conflicts(body)
            if conflicts:
                managers = sorted({m for m, _ in conflicts})
                fields = ", ".join(sorted({f for _, f in conflicts}))
                return RouterError(
                    f"apply {ref}: field manager {', '.join(repr(m) for m in managers)} owns "
                    f"{fields}, which preflight writes; remove those fields from that manager's "
                    "manifest (and re-apply it with --server-side), or set `force: true` in "
                    f"canary.traffic.options to take them over ({res.docs})"
                )
        if status == 422:
            return RouterError(f"{verb} {ref}: the API refused the object as invalid: {message}")
        if status == 400:
            return RouterError(f"{verb} {ref}: the API refused the request: {message}")
        return RouterError(f"{verb} {ref}: HTTP {status}{tries}: {message}")


def _as_object(value: Any, ref: ObjectRef) -> Obj:
    if not isinstance(value, dict):
        raise RouterError(f"{ref}: the API answered {type(value).__name__}, not an object")
    return value


# ---- reading objects back -----------------------------------------------------------------------


def dig(obj: Any, *path: str | int) -> Any:
    """`obj[p0][p1]...`, or None where any step is missing or of the wrong type."""
    node = obj
    for step in path:
        if isinstance(step, int):
            if not isinstance(node, list) or not -len(node) <= step < len(node):
                return None
        elif not isinstance(node, dict):
            return None
        node = node[step] if isinstance(step, int) else node.get(step)
        if node is None:
            return None
    return node


def generation(obj: Obj) -> int:
    value = dig(obj, "metadata", "generation")
    return int(value) if isinstance(value, int | str) and str(value).isdigit() else 0


def as_int(value: Any) -> int | None:
    """An integer from an int-or-string field (Istio writes `observedGeneration: "3"`)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def condition(conditions: Any, kind: str) -> Obj | None:
    for item in conditions if isinstance(conditions, list) else []:
        if isinstance(item, dict) and item.get("type") == kind:
            return item
    return None


def describe_condition(cond: Obj) -> str:
    """`ResolvedRefs=False (BackendNotFound: service "x" not found)`."""
    why = ": ".join(str(p) for p in (cond.get("reason"), cond.get("message")) if p)
    text = f"{cond.get('type')}={cond.get('status')}"
    return f"{text} ({_one_line(why, 200)})" if why else text


__all__ = [
    "FIELD_MANAGER",
    "KubeApi",
    "KubeOptions",
    "ObjectRef",
    "Resource",
    "Share",
    "canary_percent",
    "check_template",
    "condition",
    "configure",
    "describe_condition",
    "dig",
    "dns_token",
    "generation",
    "parse_options",
    "percent",
    "record_headers",
    "render",
    "scaled",
    "shares",
]
