"""A local HTTP server shaped like the Kubernetes API for custom resources, for router tests.

    async with KubeApiServer() as kube:           # http://127.0.0.1:<port>, bearer TOKEN
        kube.apply(httproute, manager="kubectl")   # as `kubectl apply --server-side` would
        kube.fail("patch", status=429, times=2)    # the next two PATCHes answer 429
        kube.controller = "manual"                 # status only when kube.reconcile() runs
        kube.get("httproutes", "models", "chat")   # the object as stored, status included

What it does as the real API server does, for the paths the `kubernetes` client uses
(`/apis/<group>/<version>/namespaces/<ns>/<plural>/<name>`, GET and server-side apply PATCH):

- types come from the vendored CRDs (tests/schemas/k8s/): an unknown group/plural is a 404, an
  applied object is defaulted from its `openAPIV3Schema` and checked against it (jsonschema);
  a violation is a 422 `Invalid` Status, an undeclared field a 400 under
  `fieldValidation=Strict` (and silently dropped otherwise);
- server-side apply keeps `managedFields` per field manager (maps are merged key by key, lists
  are atomic, as every list these CRDs declare or default to): a field another manager owns
  with a different value is a 409 `Conflict` naming that manager, unless `force=true`; fields
  the applier owned before and leaves out are removed; an apply to a missing object creates it;
- `metadata.generation` goes up when anything outside metadata and status changes,
  `resourceVersion` on every write;
- a bearer token is required (401), and `authorize(rules)` enforces a Role's rules (403);
- `fail(verb, status)` queues answers (429/500/503 with Retry-After, 403, 401, 404, ...);
- a controller writes status: Gateway API `status.parents` conditions (with observedGeneration),
  istiod's `observedGeneration`, KServe's `status.components.predictor.traffic` (Knative
  revisions) or `status.canaryStatuses` (Standard mode): `controller = "immediate"` after each
  change, `"manual"` on `reconcile()`, `"never"`.

It evaluates no CEL (`x-kubernetes-validations`) and runs no admission webhooks.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self

import jsonschema
import yaml
from aiohttp import web

TOKEN = "k8s-test-token-0000-secret"
SCHEMAS = Path(__file__).resolve().parent / "schemas" / "k8s"
FIXED_TIME = "2026-01-01T00:00:00Z"
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

Obj = dict[str, Any]
FieldPath = tuple[str, ...]
Verb = Literal["get", "patch"]
ControllerMode = Literal["immediate", "manual", "never"]


# ---- the vendored CRDs ------------------------------------------------------------------------


@dataclass(frozen=True)
class Crd:
    group: str
    kind: str
    plural: str
    schemas: Mapping[str, Obj]
    """Served version -> its openAPIV3Schema."""
    source: str


@functools.cache
def crds() -> dict[tuple[str, str], Crd]:
    """(group, plural) -> CRD, for every CustomResourceDefinition under tests/schemas/k8s/."""
    found: dict[tuple[str, str], Crd] = {}
    for path in sorted(SCHEMAS.glob("*.yaml")):
        for doc in yaml.load_all(path.read_text("utf-8"), Loader=_LOADER):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            versions = {
                v["name"]: v["schema"]["openAPIV3Schema"] for v in spec["versions"] if v["served"]
            }
            crd = Crd(
                spec["group"], spec["names"]["kind"], spec["names"]["plural"], versions, path.name
            )
            found[(crd.group, crd.plural)] = crd
    return found


def crd_for(api_version: str, kind: str) -> tuple[Crd, str]:
    group, _, version = api_version.rpartition("/")
    for crd in crds().values():
        if crd.group == group and crd.kind == kind and version in crd.schemas:
            return crd, version
    raise KeyError(f"no vendored CRD serves {kind} {api_version}")


@functools.cache
def _validator(group: str, plural: str, version: str) -> jsonschema.Draft4Validator:
    # OpenAPI 3.0 schemas are closest to draft 4 (boolean exclusiveMaximum, no `const`).
    return jsonschema.Draft4Validator(crds()[(group, plural)].schemas[version])


def _path_text(parts: Iterator[Any] | list[Any]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def schema_errors(obj: Obj) -> list[str]:
    """Each way `obj` breaks its CRD's structural schema: `path: message`, sorted."""
    crd, version = crd_for(obj["apiVersion"], obj["kind"])
    errors = _validator(crd.group, crd.plural, version).iter_errors(obj)
    return sorted(f"{_path_text(list(e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


ROOT_FIELDS = {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {}}
"""Every object has these whether or not its CRD's schema spells them out (Istio's does not)."""


def unknown_fields(obj: Any, schema: Obj, path: str = "") -> list[str]:
    """Fields `schema` does not declare (what `fieldValidation=Strict` refuses)."""
    out: list[str] = []
    if not path and schema.get("properties") is not None:
        schema = {**schema, "properties": {**ROOT_FIELDS, **schema["properties"]}}
    if isinstance(obj, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        preserve = bool(schema.get("x-kubernetes-preserve-unknown-fields"))
        for key, value in obj.items():
            where = f"{path}.{key}" if path else key
            if props is not None and key in props:
                out += unknown_fields(value, props[key], where)
            elif isinstance(extra, dict):
                out += unknown_fields(value, extra, where)
            elif props is not None and not preserve and extra is not True:
                out.append(where)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            out += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return out


def prune_unknown(obj: Any, schema: Obj, root: bool = True) -> None:
    """Drop the fields `unknown_fields` lists, in place."""
    if root and schema.get("properties") is not None:
        schema = {**schema, "properties": {**ROOT_FIELDS, **schema["properties"]}}
    if isinstance(obj, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        preserve = bool(schema.get("x-kubernetes-preserve-unknown-fields"))
        for key in list(obj):
            if props is not None and key in props:
                prune_unknown(obj[key], props[key], False)
            elif isinstance(extra, dict):
                prune_unknown(obj[key], extra, False)
            elif props is not None and not preserve and extra is not True:
                del obj[key]
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for item in obj:
            prune_unknown(item, schema["items"], False)


def object_problems(obj: Obj) -> list[str]:
    """Schema errors and undeclared fields of a whole object, as the API server would see them."""
    crd, version = crd_for(obj["apiVersion"], obj["kind"])
    strict = [
        f"{p}: field not declared in schema" for p in unknown_fields(obj, crd.schemas[version])
    ]
    return strict + schema_errors(obj)


def apply_defaults(node: Any, schema: Obj) -> None:
    """Fill in `default`s the schema declares, as the API server does on every write."""
    if isinstance(node, dict):
        props = schema.get("properties") or {}
        for key, sub in props.items():
            if key not in node and "default" in sub:
                node[key] = copy.deepcopy(sub["default"])
            if key in node:
                apply_defaults(node[key], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key, value in node.items():
                if key not in props:
                    apply_defaults(value, extra)
    elif isinstance(node, list) and isinstance(schema.get("items"), dict):
        for item in node:
            apply_defaults(item, schema["items"])


# ---- field ownership (server-side apply) ------------------------------------------------------

HEAD_KEYS = ("apiVersion", "kind", "status")
OWNED_METADATA = ("labels", "annotations")


def owned_part(obj: Obj) -> Obj:
    """What field managers own: everything but the head, status and system metadata."""
    out = {k: v for k, v in obj.items() if k not in (*HEAD_KEYS, "metadata")}
    meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k in OWNED_METADATA}
    if meta:
        out["metadata"] = meta
    return out


def leaves(node: Any, prefix: FieldPath = ()) -> dict[FieldPath, Any]:
    """Field path -> value; maps are granular, lists and scalars are leaves (atomic)."""
    if isinstance(node, dict) and node:
        out: dict[FieldPath, Any] = {}
        for key, value in node.items():
            out.update(leaves(value, (*prefix, key)))
        return out
    return {prefix: node} if prefix else {}


def get_path(obj: Any, path: FieldPath) -> Any:
    for step in path:
        if not isinstance(obj, dict) or step not in obj:
            return _MISSING
        obj = obj[step]
    return obj


def set_path(obj: Obj, path: FieldPath, value: Any) -> None:
    for step in path[:-1]:
        if not isinstance(obj.get(step), dict):
            obj[step] = {}
        obj = obj[step]
    obj[path[-1]] = copy.deepcopy(value)


def delete_path(obj: Obj, path: FieldPath) -> None:
    parents = [obj]
    for step in path[:-1]:
        nxt = parents[-1].get(step)
        if not isinstance(nxt, dict):
            return
        parents.append(nxt)
    parents[-1].pop(path[-1], None)
    for depth in range(len(path) - 1, 0, -1):  # drop maps left empty
        if parents[depth] == {}:
            parents[depth - 1].pop(path[depth - 1], None)


_MISSING = object()


def overlaps(a: FieldPath, b: FieldPath) -> bool:
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def fields_v1(paths: set[FieldPath]) -> Obj:
    """managedFields' FieldsV1 encoding: `{"f:spec": {"f:rules": {}}}`."""
    out: Obj = {}
    for path in sorted(paths):
        node = out
        for step in path:
            node = node.setdefault(f"f:{step}", {})
    return out


@dataclass
class Managed:
    operation: Literal["Apply", "Update"]
    api_version: str
    fields: set[FieldPath]


@dataclass
class Stored:
    obj: Obj
    managers: dict[str, Managed] = field(default_factory=dict)
    revisions: list[tuple[str, str]] = field(default_factory=list)
    """KServe Knative simulation: (revision name, predictor spec without the percent)."""
    rolled_out: list[str] = field(default_factory=list)


class ApiError(Exception):
    """An answer other than 200: the Status object the API returns."""

    def __init__(self, code: int, reason: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.body: Obj = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        }
        if details:
            self.body["details"] = details
        self.headers: dict[str, str] = {}


REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
}


@dataclass
class Failure:
    status: int
    message: str | None
    retry_after: str | None
    name: str | None


@dataclass(frozen=True)
class Seen:
    """One request as it arrived (never its Authorization header)."""

    method: str
    path: str
    query: dict[str, str]
    content_type: str
    status: int
    body: Obj | None


@dataclass
class GatewayController:
    """Plays a Gateway API implementation writing `status.parents` for each parentRef."""

    name: str = "example.net/gateway-controller"
    accepted: bool = True
    missing_backends: set[str] = field(default_factory=set)


@dataclass
class KServeController:
    ready: bool = True
    """False: the newest revision / the canaries never become ready."""


@dataclass
class KubeApiServer:
    """The fake API server; `token` is the only bearer token it accepts."""

    token: str = TOKEN
    port: int = 0
    objects: dict[tuple[str, str, str, str], Stored] = field(default_factory=dict)
    requests: list[Seen] = field(default_factory=list)
    failures: dict[Verb, list[Failure]] = field(default_factory=dict)
    controller: ControllerMode = "immediate"
    gateway: GatewayController = field(default_factory=GatewayController)
    kserve: KServeController = field(default_factory=KServeController)
    istio_status: bool = False
    """True: play istiod with analysis on (status.observedGeneration, validationMessages)."""
    istio_messages: list[Obj] = field(default_factory=list)
    rules: list[Obj] | None = None
    """A Role's rules; None: everything is allowed (see `authorize`)."""
    _runner: web.AppRunner | None = None
    _resource_version: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---- test controls ------------------------------------------------------------------

    def fail(
        self,
        verb: Verb,
        *,
        status: int,
        times: int = 1,
        message: str | None = None,
        retry_after: str | None = None,
        name: str | None = None,
    ) -> None:
        """The next `times` `verb` requests (for object `name`, or any) answer `status`."""
        self.failures.setdefault(verb, []).extend(
            Failure(status, message, retry_after, name) for _ in range(times)
        )

    def authorize(self, rules: list[Obj]) -> None:
        """Enforce these PolicyRules (a Role's `rules`) on every request, in every namespace
        (the Role's namespace is the test's business): anything they do not grant is a 403."""
        self.rules = [dict(r) for r in rules]

    def create(
        self,
        obj: Obj,
        *,
        manager: str = "kubectl",
        operation: Literal["Apply", "Update"] = "Apply",
    ) -> Obj:
        """Create `obj` as `manager` would: `kubectl apply --server-side` (Apply: owns exactly
        these fields) or `kubectl create`/client-side apply (Update: "kubectl-client-side-apply"
        owns them too). Status in `obj` is kept as given."""
        crd, version = crd_for(obj["apiVersion"], obj["kind"])
        meta = obj["metadata"]
        key = (crd.group, crd.plural, meta["namespace"], meta["name"])
        assert key not in self.objects, f"{key} exists"
        stored = Stored(obj={})
        self.objects[key] = stored
        status = copy.deepcopy(obj.get("status"))
        self._write(stored, crd, version, obj, manager, force=False, operation=operation)
        if status is not None:
            stored.obj["status"] = status
        self._reconcile_after_write(key)
        return self.get_object(key)

    def apply(self, obj: Obj, *, manager: str = "kubectl", force: bool = False) -> Obj:
        """Server-side apply of `obj` as `manager` without HTTP, as
        `kubectl apply --server-side --field-manager=<manager>` would: creates or merges."""
        crd, version = crd_for(obj["apiVersion"], obj["kind"])
        meta = obj["metadata"]
        key = (crd.group, crd.plural, meta["namespace"], meta["name"])
        stored = self.objects.get(key) or Stored(obj={})
        self._write(stored, crd, version, obj, manager, force=force, operation="Apply")
        self.objects[key] = stored
        self._reconcile_after_write(key)
        return self.get_object(key)

    def update(self, kind_key: tuple[str, str, str, str], mutate: Any, manager: str) -> None:
        """An Update by another actor (`kubectl edit`, an operator): `mutate(obj)` edits a copy;
        the fields it changed become `manager`'s, taken from whoever owned them (no conflict:
        only apply checks for conflicts)."""
        stored = self.objects[kind_key]
        crd = crds()[(kind_key[0], kind_key[1])]
        new = copy.deepcopy(stored.obj)
        mutate(new)
        before, after = leaves(owned_part(stored.obj)), leaves(owned_part(new))
        changed = {p for p in after if before.get(p, _MISSING) != after[p]}
        for managed in stored.managers.values():
            managed.fields -= {q for q in managed.fields if any(overlaps(p, q) for p in changed)}
        mine = stored.managers.setdefault(manager, Managed("Update", new["apiVersion"], set()))
        mine.fields |= changed
        self._store(stored, crd, new)
        self._reconcile_after_write(kind_key)

    def key(self, plural: str, namespace: str, name: str) -> tuple[str, str, str, str]:
        for group, p in crds():
            if p == plural:
                return (group, plural, namespace, name)
        raise KeyError(plural)

    def get(self, plural: str, namespace: str, name: str) -> Obj:
        """The object as stored, with managedFields."""
        return self.get_object(self.key(plural, namespace, name))

    def get_object(self, key: tuple[str, str, str, str]) -> Obj:
        stored = self.objects[key]
        obj = copy.deepcopy(stored.obj)
        obj["metadata"]["managedFields"] = [
            {
                "manager": name,
                "operation": m.operation,
                "apiVersion": m.api_version,
                "time": FIXED_TIME,
                "fieldsType": "FieldsV1",
                "fieldsV1": fields_v1(m.fields),
            }
            for name, m in stored.managers.items()
        ]
        return obj

    def managers(self, plural: str, namespace: str, name: str) -> dict[str, set[FieldPath]]:
        stored = self.objects[self.key(plural, namespace, name)]
        return {n: set(m.fields) for n, m in stored.managers.items()}

    def reconcile(self) -> None:
        """Run the controllers once over every object (what `controller = "manual"` waits for)."""
        for key in list(self.objects):
            self._run_controller(key)

    def calls(self, method: str, *, ok: bool | None = None) -> list[Seen]:
        return [
            s
            for s in self.requests
            if s.method == method and (ok is None or (s.status == 200) == ok)
        ]

    # ---- the HTTP side ------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        app = web.Application()
        app.router.add_route(
            "*", "/apis/{group}/{version}/namespaces/{namespace}/{plural}/{name}", self._handle
        )
        app.router.add_route("*", "/{tail:.*}", self._not_served)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _not_served(self, request: web.Request) -> web.Response:
        error = ApiError(404, "NotFound", "the server could not find the requested resource")
        return self._answer(request, error, None)

    async def _handle(self, request: web.Request) -> web.Response:
        body: Obj | None = None
        try:
            raw = await request.read()
            if raw:
                loaded = yaml.load(raw.decode("utf-8"), Loader=_LOADER)  # noqa: S506
                body = loaded if isinstance(loaded, dict) else None
            result = self._dispatch(request, body)
        except ApiError as error:
            return self._answer(request, error, body)
        return self._answer(request, result, body)

    def _answer(
        self, request: web.Request, result: Obj | ApiError, body: Obj | None
    ) -> web.Response:
        status = result.code if isinstance(result, ApiError) else 200
        self.requests.append(
            Seen(
                request.method,
                request.path,
                dict(request.query),
                request.headers.get("Content-Type", ""),
                status,
                body,
            )
        )
        if isinstance(result, ApiError):
            return web.json_response(result.body, status=result.code, headers=result.headers)
        return web.json_response(result)

    def _dispatch(self, request: web.Request, body: Obj | None) -> Obj:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            raise ApiError(401, "Unauthorized", "Unauthorized")
        info = request.match_info
        group, version, ns, plural, name = (
            info["group"],
            info["version"],
            info["namespace"],
            info["plural"],
            info["name"],
        )
        verb: Verb
        if request.method == "GET":
            verb = "get"
        elif request.method == "PATCH":
            verb = "patch"
        else:
            raise ApiError(405, "MethodNotAllowed", f"{request.method} is not served here")
        self._take_failure(verb, group, plural, ns, name)
        self._check_rbac(verb, group, plural, ns, name)
        crd = crds().get((group, plural))
        if crd is None or version not in crd.schemas:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        key = (group, plural, ns, name)
        if verb == "get":
            if key not in self.objects:
                raise _not_found(crd, name)
            obj = self.get_object(key)
            obj["apiVersion"] = f"{group}/{version}"
            return obj
        content_type = request.headers.get("Content-Type", "")
        if content_type.split(";")[0].strip() != "application/apply-patch+yaml":
            raise ApiError(415, "UnsupportedMediaType", f"{content_type} is not served here")
        query = request.query
        manager = query.get("fieldManager")
        if not manager:
            raise ApiError(
                400,
                "BadRequest",
                "PatchOptions.meta.k8s.io is invalid: fieldManager: Required value: is required "
                "for apply patch",
            )
        if body is None:
            raise ApiError(400, "BadRequest", "the body of the request was in an unknown format")
        meta = body.get("metadata") or {}
        if body.get("apiVersion") != f"{group}/{version}" or body.get("kind") != crd.kind:
            raise ApiError(400, "BadRequest", "apiVersion/kind of the body do not match the URL")
        if meta.get("name") != name or meta.get("namespace", ns) != ns:
            raise ApiError(400, "BadRequest", "the name of the object does not match the URL")
        strict = query.get("fieldValidation") == "Strict"
        stored = self.objects.get(key)
        created = stored is None
        if stored is None:
            stored = Stored(obj={})
        self._write(
            stored,
            crd,
            version,
            body,
            manager,
            force=query.get("force") == "true",
            operation="Apply",
            strict=strict,
        )
        if created:
            self.objects[key] = stored
        self._reconcile_after_write(key)
        return self.get_object(key)

    def _take_failure(self, verb: Verb, group: str, plural: str, ns: str, name: str) -> None:
        queue = self.failures.get(verb) or []
        for i, failure in enumerate(queue):
            if failure.name is None or failure.name == name:
                queue.pop(i)
                message = failure.message or _default_message(
                    failure.status, verb, group, plural, ns, name
                )
                error = ApiError(failure.status, REASONS.get(failure.status, "Unknown"), message)
                if failure.retry_after is not None:
                    error.headers["Retry-After"] = failure.retry_after
                raise error

    def _check_rbac(self, verb: Verb, group: str, plural: str, ns: str, name: str) -> None:
        if self.rules is None:
            return
        for rule in self.rules:
            if (
                _grants(rule.get("apiGroups"), group)
                and _grants(rule.get("resources"), plural)
                and _grants(rule.get("verbs"), verb)
                and (not rule.get("resourceNames") or name in rule["resourceNames"])
            ):
                return
        raise ApiError(403, "Forbidden", _default_message(403, verb, group, plural, ns, name))

    # ---- writing ------------------------------------------------------------------------

    def _write(
        self,
        stored: Stored,
        crd: Crd,
        version: str,
        config: Obj,
        manager: str,
        *,
        force: bool,
        operation: Literal["Apply", "Update"],
        strict: bool = True,
    ) -> None:
        schema = crd.schemas[version]
        config = copy.deepcopy(config)
        config.pop("status", None)  # the status subresource is written apart
        undeclared = unknown_fields(config, schema)
        if undeclared and strict:
            raise ApiError(
                400,
                "BadRequest",
                "; ".join(f".{p}: field not declared in schema" for p in undeclared),
            )
        if undeclared:  # dropped, as fieldValidation=Warn/Ignore does
            prune_unknown(config, schema)
        old = stored.obj or {
            "apiVersion": config["apiVersion"],
            "kind": config["kind"],
            "metadata": {
                "name": config["metadata"]["name"],
                "namespace": config["metadata"]["namespace"],
            },
        }
        applied = leaves(owned_part(config))
        mine = stored.managers.get(manager)
        before = mine.fields if mine is not None else set()
        others = {n: m for n, m in stored.managers.items() if n != manager}
        owned_by_others = set().union(*(m.fields for m in others.values())) if others else set()
        merged = copy.deepcopy(old)
        for path in before - set(applied):
            if not any(overlaps(path, q) for q in owned_by_others):
                delete_path(merged, path)
        for path, value in applied.items():
            set_path(merged, path, value)
        apply_defaults(merged, schema)
        conflicts: list[tuple[str, Managed, FieldPath]] = []
        for path in applied:
            if get_path(old, path) == get_path(merged, path):
                continue  # same value: shared ownership, no conflict
            for name, managed in others.items():
                if any(overlaps(path, q) for q in managed.fields):
                    conflicts.append((name, managed, path))
        if conflicts and not force:
            raise _conflict(conflicts)
        for _name, managed, path in conflicts:  # force: ownership moves to the applier
            managed.fields -= {q for q in managed.fields if overlaps(path, q)}
        problems = schema_errors_for(merged, crd, version)
        if problems:
            name = merged["metadata"]["name"]
            raise ApiError(
                422,
                "Invalid",
                f'{crd.kind}.{crd.group} "{name}" is invalid: ' + "; ".join(problems),
                name=name,
                group=crd.group,
                kind=crd.kind,
                causes=[{"reason": "FieldValueInvalid", "message": p} for p in problems],
            )
        stored.managers[manager] = Managed(operation, config["apiVersion"], set(applied))
        for name in [n for n, m in stored.managers.items() if not m.fields]:
            del stored.managers[name]
        self._store(stored, crd, merged)

    def _store(self, stored: Stored, crd: Crd, new: Obj) -> None:
        old = stored.obj
        meta = new["metadata"]
        if not old:
            meta.update(
                generation=1,
                uid=f"00000000-0000-0000-0000-{len(self.objects):012d}",
                creationTimestamp=FIXED_TIME,
            )
        elif _spec_part(old) != _spec_part(new):
            meta["generation"] = int(old["metadata"].get("generation", 1)) + 1
        if new != old:
            self._resource_version += 1
            meta["resourceVersion"] = str(self._resource_version)
        stored.obj = new

    # ---- controllers --------------------------------------------------------------------

    def _reconcile_after_write(self, key: tuple[str, str, str, str]) -> None:
        if self.controller == "immediate":
            self._run_controller(key)

    def _run_controller(self, key: tuple[str, str, str, str]) -> None:
        stored = self.objects[key]
        obj = stored.obj
        kind = obj["kind"]
        if kind == "HTTPRoute":
            status = self._gateway_status(obj)
        elif kind == "VirtualService":
            if not self.istio_status:
                return
            status = {
                "observedGeneration": str(obj["metadata"]["generation"]),
                "validationMessages": copy.deepcopy(self.istio_messages),
            }
        elif kind == "InferenceService":
            status = self._kserve_status(stored)
        else:
            return
        new = copy.deepcopy(obj)
        new["status"] = status
        crd = crds()[(key[0], key[1])]
        _, version = crd_for(new["apiVersion"], kind)
        problems = schema_errors_for(new, crd, version)
        assert not problems, f"the fake controller wrote an invalid status: {problems}"
        if new != obj:
            self._resource_version += 1
            new["metadata"]["resourceVersion"] = str(self._resource_version)
            stored.obj = new

    def _gateway_status(self, obj: Obj) -> Obj:
        gen = obj["metadata"]["generation"]
        backends = {
            ref.get("name")
            for rule in obj["spec"].get("rules", [])
            for ref in rule.get("backendRefs", [])
        }
        missing = sorted(backends & self.gateway.missing_backends)
        parents = []
        for parent in obj["spec"].get("parentRefs", []):
            accepted = _condition(
                "Accepted",
                self.gateway.accepted,
                "Accepted" if self.gateway.accepted else "NotAllowedByListeners",
                "Route is accepted" if self.gateway.accepted else "no listener allows this route",
                gen,
            )
            resolved = _condition(
                "ResolvedRefs",
                not missing,
                "ResolvedRefs" if not missing else "BackendNotFound",
                "Resolved all the Object references for the Route"
                if not missing
                else f'Service "{missing[0]}" not found',
                gen,
            )
            parents.append(
                {
                    "parentRef": copy.deepcopy(parent),
                    "controllerName": self.gateway.name,
                    "conditions": [accepted, resolved],
                }
            )
        return {"parents": parents}

    def _kserve_status(self, stored: Stored) -> Obj:
        obj = stored.obj
        annotations = obj["metadata"].get("annotations") or {}
        mode = annotations.get("serving.kserve.io/deploymentMode", "Serverless")
        ready = "True" if self.kserve.ready else "False"
        conditions = [
            {"type": "PredictorReady", "status": ready, "lastTransitionTime": FIXED_TIME},
            {"type": "Ready", "status": ready, "lastTransitionTime": FIXED_TIME},
        ]
        predictor = obj["spec"]["predictor"]
        if mode in ("RawDeployment", "Standard"):
            canaries = obj["spec"].get("canary") or []
            status: Obj = {"deploymentMode": "Standard", "conditions": conditions}
            if canaries:
                status["canaryStatuses"] = [
                    {
                        "name": c["predictor"]["name"],
                        "ready": self.kserve.ready,
                        "trafficPercent": c["trafficPercent"],
                    }
                    for c in canaries
                ]
                conditions.append(
                    {
                        "type": "CanaryPredictorReady",
                        "status": ready,
                        "reason": "AllCanariesReady" if self.kserve.ready else "CanariesNotReady",
                        "lastTransitionTime": FIXED_TIME,
                    }
                )
            return status
        # Knative: a new revision per predictor change; canaryTrafficPercent splits the latest
        # revision against the last one rolled out at 100% (KServe's PropagateStatus).
        template = json.dumps(
            {k: v for k, v in predictor.items() if k != "canaryTrafficPercent"}, sort_keys=True
        )
        if not stored.revisions or stored.revisions[-1][1] != template:
            name = f"{obj['metadata']['name']}-predictor-{len(stored.revisions) + 1:05d}"
            stored.revisions.append((name, template))
        latest = stored.revisions[-1][0]
        ready_revision = (
            latest
            if self.kserve.ready
            else (stored.revisions[-2][0] if len(stored.revisions) > 1 else None)
        )
        percent = predictor.get("canaryTrafficPercent")
        rolled = stored.rolled_out[-1] if stored.rolled_out else None
        # Knative's `latestRevision: true` entry follows the latest READY revision.
        serving = ready_revision
        traffic: list[Obj] = []
        if serving is None:
            pass
        elif percent is None or percent >= 100 or rolled is None or rolled == serving:
            share = 100 if percent is None or rolled is None or rolled != serving else percent
            traffic = [
                {"revisionName": serving, "percent": share, "latestRevision": True, "tag": "latest"}
            ]
            if share < 100:
                traffic.append(
                    {"revisionName": rolled, "percent": 100 - share, "latestRevision": False}
                )
            elif rolled != serving:
                stored.rolled_out.append(serving)
        else:
            traffic = [
                {
                    "revisionName": serving,
                    "percent": percent,
                    "latestRevision": True,
                    "tag": "latest",
                },
                {
                    "revisionName": rolled,
                    "percent": 100 - percent,
                    "latestRevision": False,
                    "tag": "prev",
                },
            ]
        component: Obj = {
            "latestCreatedRevision": latest,
            "traffic": traffic,
        }
        if ready_revision is not None:
            component["latestReadyRevision"] = ready_revision
        if stored.rolled_out:
            component["latestRolledoutRevision"] = stored.rolled_out[-1]
        if len(stored.rolled_out) > 1:
            component["previousRolledoutRevision"] = stored.rolled_out[-2]
        return {
            "deploymentMode": "Serverless",
            "conditions": conditions,
            "components": {"predictor": component},
        }


def schema_errors_for(obj: Obj, crd: Crd, version: str) -> list[str]:
    validator = _validator(crd.group, crd.plural, version)
    return sorted(
        f"{_path_text(list(e.absolute_path)) or '<root>'}: Invalid value: "
        f"{json.dumps(e.instance)[:80]}: {e.message[:300]}"
        for e in validator.iter_errors(obj)
    )


def _spec_part(obj: Obj) -> Obj:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


def _condition(kind: str, ok: bool, reason: str, message: str, generation: int) -> Obj:
    return {
        "type": kind,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": FIXED_TIME,
    }


def _grants(allowed: Any, value: str) -> bool:
    return isinstance(allowed, list) and ("*" in allowed or value in allowed)


def _not_found(crd: Crd, name: str) -> ApiError:
    return ApiError(
        404,
        "NotFound",
        f'{crd.plural}.{crd.group} "{name}" not found',
        name=name,
        group=crd.group,
        kind=crd.plural,
    )


def _conflict(conflicts: list[tuple[str, Managed, FieldPath]]) -> ApiError:
    causes = [
        {
            "type": "FieldManagerConflict",
            "message": f'conflict with "{name}" using {managed.api_version}',
            "field": "." + ".".join(path),
        }
        for name, managed, path in conflicts
    ]
    lines = [f"{c['message']}: {c['field']}" for c in causes]
    plural = "conflict" if len(lines) == 1 else "conflicts"
    return ApiError(
        409,
        "Conflict",
        f"Apply failed with {len(lines)} {plural}: " + "\n".join(lines),
        causes=causes,
    )


def _default_message(status: int, verb: str, group: str, plural: str, ns: str, name: str) -> str:
    if status == 403:
        return (
            f'{plural}.{group} "{name}" is forbidden: User '
            f'"system:serviceaccount:preflight:canary-controller" cannot {verb} resource '
            f'"{plural}" in API group "{group}" in the namespace "{ns}"'
        )
    if status == 404:
        return f'{plural}.{group} "{name}" not found'
    if status == 401:
        return "Unauthorized"
    if status == 429:
        return "the server has received too many requests and has asked us to try again later"
    return f"an error on the server ({REASONS.get(status, 'Unknown')}) has prevented the request"
