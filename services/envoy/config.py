"""Envoy configuration as data: the bootstrap, and the RDS/CDS resources for a set of routes.

Pure functions, no I/O: `bootstrap(...)` is the file Envoy starts on; `route_configuration` and
`clusters` turn `Route`s into the xDS resources Envoy reads from its watched directory;
`served(...)` reads back, from Envoy's admin `/config_dump`, what it has in force for one model.

One virtual host serves every model. Per model, in this order (the built-in router's choice,
services/router/routes.py, in Envoy's terms):

    <model>|pin-canary   X-Preflight-Model: <model> and X-Preflight-Pin: canary -> canary cluster
    <model>|pin-stable   X-Preflight-Model: <model> and X-Preflight-Pin: stable -> stable cluster
    <model>|split        X-Preflight-Model: <model> -> weighted_clusters, weights out of 10,000

then `unknown_model` (404) for any other non-blank model header, the default model's three
routes without the header condition (the settings' default model, or the only model), and
`no_model` (400). Every route that reaches a cluster sets the request headers the access log
carries to the receiver (model, role, version, and the deployment id the record counts for),
overwriting whatever the client sent, and marks the response with version and role as the
built-in router does.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from services.contracts.events import Route, RouteTarget
from services.router.routes import MODEL_HEADER, canary_live, record_deployment_id
from services.traffic.base import PIN_HEADER

Role = Literal["stable", "canary"]

WEIGHT_TOTAL: Final = 10_000
"""Envoy's weighted_clusters take integers; out of 10,000 a weight keeps two decimals of a
percent (12.34 % is 1234)."""

ROUTE_CONFIG_NAME: Final = "preflight_routes"
VIRTUAL_HOST_NAME: Final = "preflight"
LISTENER_NAME: Final = "preflight_inference"
ALS_CLUSTER: Final = "preflight_access_log"
ALS_LOG_NAME: Final = "preflight"
CLUSTER_PREFIX: Final = "preflight"
RDS_FILE: Final = "rds.json"
CDS_FILE: Final = "cds.json"
METADATA_NAMESPACE: Final = "preflight"

ROLE_HEADER: Final = "x-preflight-role"
VERSION_HEADER: Final = "x-preflight-version"
DEPLOYMENT_HEADER: Final = "x-preflight-deployment"
PINNED_HEADER: Final = "x-preflight-pinned"
"""`true` on the pin routes' requests, `false` on the split's: pinned records stay out of the
canary analysis (RequestRecord.pinned)."""
LOGGED_REQUEST_HEADERS: Final = (
    MODEL_HEADER.lower(),
    ROLE_HEADER,
    VERSION_HEADER,
    DEPLOYMENT_HEADER,
    PINNED_HEADER,
)
"""Request headers the access log sends to the receiver (all set by the routes, never trusted
from the client)."""

ROUTE_TYPE: Final = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER_TYPE: Final = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
_HCM_TYPE: Final = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)
_ROUTER_TYPE: Final = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_ALS_TYPE: Final = (
    "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig"
)
_H2_OPTIONS_TYPE: Final = (
    "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
)
_TLS_TYPE: Final = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
)
_NONBLANK: Final = r".*\S.*"


class UpstreamError(ValueError):
    """A target's upstream is not a URL Envoy can route to as a cluster (one line, with why)."""


@dataclass(frozen=True)
class XdsOptions:
    """What the routes need besides the `Route`s: the settings the built-in router also uses."""

    connect_timeout_s: float = 2.0
    upstream_timeout_s: float = 60.0
    default_model: str | None = None
    sticky_header: str | None = "x-preflight-client"
    max_concurrency: int = 100_000
    """Per cluster: connections, pending and active requests (Envoy's circuit breakers). Envoy's
    default, 1,024, answered a burst at 2,000 requests/s with hundreds of 503s (UO) that nginx
    and the built-in router never send, and the canary would be judged on them; the inference
    servers' own limits are the ones that should shed load."""

    @classmethod
    def from_settings(cls, settings: Any) -> XdsOptions:
        """From the process settings (any object: missing attributes keep the defaults)."""
        base = cls()
        return cls(
            connect_timeout_s=float(
                getattr(settings, "router_connect_timeout_s", base.connect_timeout_s)
            ),
            upstream_timeout_s=float(
                getattr(settings, "router_upstream_timeout_s", base.upstream_timeout_s)
            ),
            default_model=getattr(settings, "router_default_model", base.default_model),
            sticky_header=getattr(settings, "router_sticky_header", base.sticky_header),
        )


@dataclass(frozen=True)
class Upstream:
    scheme: Literal["http", "https"]
    host: str
    port: int

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


def parse_upstream(url: str) -> Upstream:
    """`http://host:port` (or https) as a cluster endpoint; a path other than `/` is refused:
    Envoy's weighted clusters cannot rewrite the path per cluster."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UpstreamError(f"upstream {url!r} is not an http(s)://host[:port] URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise UpstreamError(
            f"upstream {url!r} has a path; the envoy router forwards the request path unchanged, "
            "so give the server's base URL (http://host:port)"
        )
    if parts.username or parts.password:
        raise UpstreamError(f"upstream {url!r} carries credentials; Envoy clusters take none")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise UpstreamError(f"upstream {url!r}: {exc}") from exc
    scheme: Literal["http", "https"] = "https" if parts.scheme == "https" else "http"
    return Upstream(scheme, parts.hostname, port)


def cluster_name(model: str, role: Role, target: RouteTarget) -> str:
    """`preflight|<model>|<role>|<digest>`: the digest covers deployment, version and upstream,
    so a new target is a new cluster and traffic meant for one version never reaches another
    while Envoy swaps configurations."""
    digest = hashlib.blake2b(
        f"{target.deployment_id or ''}\0{target.version}\0{target.upstream or ''}".encode(),
        digest_size=5,
    ).hexdigest()
    return f"{CLUSTER_PREFIX}|{model}|{role}|{digest}"


def split(route: Route) -> tuple[tuple[Role, RouteTarget, int], ...]:
    """(role, target, weight out of WEIGHT_TOTAL) of the weighted choice, as `pick_role` makes
    it: stable unless a canary with an upstream takes weight; canary alone at 100 % or without a
    stable target. Empty: the route has no target at all."""
    if not canary_live(route):
        return (("stable", route.stable, WEIGHT_TOTAL),) if route.stable is not None else ()
    assert route.canary is not None
    units = round(route.canary_weight * WEIGHT_TOTAL / 100)
    if route.stable is None or units >= WEIGHT_TOTAL:
        return (("canary", route.canary, WEIGHT_TOTAL),)
    if units <= 0:
        return (("stable", route.stable, WEIGHT_TOTAL),)
    return (("stable", route.stable, WEIGHT_TOTAL - units), ("canary", route.canary, units))


def pins(route: Route) -> tuple[tuple[Role, RouteTarget], ...]:
    """The roles a pin header can reach: the canary while it has an upstream, the stable while it
    exists (services/router/routes.py `select`)."""
    out: list[tuple[Role, RouteTarget]] = []
    if route.canary is not None and route.canary.upstream is not None:
        out.append(("canary", route.canary))
    if route.stable is not None:
        out.append(("stable", route.stable))
    return tuple(out)


def canary_units(route: Route) -> int:
    """The canary's share out of WEIGHT_TOTAL that `split` gives it."""
    return sum(units for role, _, units in split(route) if role == "canary")


# ---- resources ----------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s"


def _set_header(name: str, value: str) -> dict[str, Any]:
    return {
        "header": {"key": name, "value": value},
        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        "keep_empty_value": True,
    }


def _marks(
    model: str, role: Role, target: RouteTarget, deployment_id: str, *, pinned: bool = False
) -> dict[str, Any]:
    """Header mutations of one way to a cluster: what the access log reports, what the client
    sees (the built-in router's X-Preflight-Version and X-Preflight-Role)."""
    return {
        "request_headers_to_add": [
            _set_header(MODEL_HEADER.lower(), model),
            _set_header(ROLE_HEADER, role),
            _set_header(VERSION_HEADER, target.version),
            _set_header(DEPLOYMENT_HEADER, deployment_id),
            _set_header(PINNED_HEADER, "true" if pinned else "false"),
        ],
        "response_headers_to_add": [
            _set_header(VERSION_HEADER, target.version),
            _set_header(ROLE_HEADER, role),
        ],
    }


def _json_reply(status: int, error: str, message: str, **extra: str) -> dict[str, Any]:
    body = json.dumps({"error": error, "message": message, **extra})
    return {"status": status, "body": {"inline_string": body}}


def _match(model: str | None, pin: Role | None = None) -> dict[str, Any]:
    headers: list[dict[str, Any]] = []
    if model is not None:
        headers.append({"name": MODEL_HEADER, "string_match": {"exact": model}})
    if pin is not None:
        headers.append({"name": PIN_HEADER, "string_match": {"exact": pin, "ignore_case": True}})
    match: dict[str, Any] = {"prefix": "/"}
    if headers:
        match["headers"] = headers
    return match


def model_routes(
    route: Route, options: XdsOptions, *, by_header: bool = True
) -> list[dict[str, Any]]:
    """The routes of one model: pins first, then the weighted split. `by_header=False`: the
    same without the model header condition (the default model's)."""
    model = route.model
    name = model if by_header else f"{model}|default"
    header = model if by_header else None
    deployment_id = record_deployment_id(route)
    metadata = {
        "filter_metadata": {
            METADATA_NAMESPACE: {
                "model": model,
                "updated_at": route.updated_at.isoformat(),
                "canary_units": canary_units(route),
            }
        }
    }
    timeout = _duration(options.upstream_timeout_s)
    out: list[dict[str, Any]] = []
    for role, target in pins(route):
        out.append(
            {
                "name": f"{name}|pin-{role}",
                "match": _match(header, role),
                "metadata": metadata,
                "route": {"cluster": cluster_name(model, role, target), "timeout": timeout},
                **_marks(model, role, target, deployment_id, pinned=True),
            }
        )
    parts = split(route)
    entry: dict[str, Any] = {
        "name": f"{name}|split",
        "match": _match(header),
        "metadata": metadata,
    }
    if not parts:
        entry["direct_response"] = _json_reply(
            503, "no_upstream", f"model {model!r} has no stable or canary target"
        )
    elif len(parts) == 1:
        role, target, _ = parts[0]
        entry["route"] = {"cluster": cluster_name(model, role, target), "timeout": timeout}
        entry.update(_marks(model, role, target, deployment_id))
    else:
        action: dict[str, Any] = {
            "weighted_clusters": {
                "clusters": [
                    {
                        "name": cluster_name(model, role, target),
                        "weight": units,
                        **_marks(model, role, target, deployment_id),
                    }
                    for role, target, units in parts
                ],
            },
            "timeout": timeout,
        }
        if options.sticky_header:
            # A client keeps its version for the rollout (the built-in router's sticky header):
            # the header's hash picks the cluster; without the header the pick is random.
            action["hash_policy"] = [{"header": {"header_name": options.sticky_header}}]
            action["weighted_clusters"]["use_hash_policy"] = True
        entry["route"] = action
    out.append(entry)
    return out


def default_model(routes: Mapping[str, Route], options: XdsOptions) -> str | None:
    """The model of requests without a model header: the configured one, else the only one."""
    if options.default_model:
        return options.default_model if options.default_model in routes else None
    return next(iter(routes)) if len(routes) == 1 else None


def route_configuration(routes: Iterable[Route], options: XdsOptions) -> dict[str, Any]:
    """The one RouteConfiguration (RDS) for every model, ordered by model name."""
    table = {route.model: route for route in sorted(routes, key=lambda r: r.model)}
    entries: list[dict[str, Any]] = []
    for route in table.values():
        entries += model_routes(route, options)
    entries.append(
        {
            "name": "unknown_model",
            "match": {
                "prefix": "/",
                "headers": [
                    {"name": MODEL_HEADER, "string_match": {"safe_regex": {"regex": _NONBLANK}}}
                ],
            },
            "direct_response": _json_reply(
                404, "unknown_model", "no route for this model", header=MODEL_HEADER
            ),
        }
    )
    fallback = default_model(table, options)
    if fallback is not None:
        entries += model_routes(table[fallback], options, by_header=False)
    known = f"{len(table)} routes exist" if table else "no routes exist yet"
    entries.append(
        {
            "name": "no_model",
            "match": {"prefix": "/"},
            "direct_response": _json_reply(
                400,
                "no_model",
                f"set the {MODEL_HEADER} header to choose a model ({known})",
                header=MODEL_HEADER,
            ),
        }
    )
    return {
        "@type": ROUTE_TYPE,
        "name": ROUTE_CONFIG_NAME,
        "virtual_hosts": [{"name": VIRTUAL_HOST_NAME, "domains": ["*"], "routes": entries}],
    }


def cluster(model: str, role: Role, target: RouteTarget, options: XdsOptions) -> dict[str, Any]:
    """One upstream as a cluster; a target without an upstream is a cluster without endpoints
    (Envoy answers 503 `no_healthy_upstream`, as the built-in router answers `no_upstream`)."""
    name = cluster_name(model, role, target)
    endpoints: list[dict[str, Any]] = []
    resource: dict[str, Any] = {
        "@type": CLUSTER_TYPE,
        "name": name,
        "alt_stat_name": name.replace("|", "_").replace(".", "_").replace("/", "_"),
        "connect_timeout": _duration(options.connect_timeout_s),
        "lb_policy": "ROUND_ROBIN",
        "type": "STATIC",
        "circuit_breakers": {
            "thresholds": [
                {
                    "priority": "DEFAULT",
                    "max_connections": options.max_concurrency,
                    "max_pending_requests": options.max_concurrency,
                    "max_requests": options.max_concurrency,
                }
            ]
        },
        "metadata": {
            "filter_metadata": {
                METADATA_NAMESPACE: {
                    "model": model,
                    "role": role,
                    "deployment_id": target.deployment_id or "",
                    "version": target.version,
                    "upstream": target.upstream or "",
                }
            }
        },
    }
    if target.upstream is not None:
        upstream = parse_upstream(target.upstream)
        if not upstream.is_ip:
            resource["type"] = "STRICT_DNS"
            resource["dns_lookup_family"] = "V4_PREFERRED"
        endpoints = [
            {
                "lb_endpoints": [
                    {
                        "endpoint": {
                            "address": {
                                "socket_address": {
                                    "address": upstream.host,
                                    "port_value": upstream.port,
                                }
                            }
                        }
                    }
                ]
            }
        ]
        if upstream.scheme == "https":
            resource["transport_socket"] = {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {"@type": _TLS_TYPE, "sni": upstream.host},
            }
    resource["load_assignment"] = {"cluster_name": name, "endpoints": endpoints}
    return resource


def route_clusters(route: Route) -> dict[str, tuple[Role, RouteTarget]]:
    """Cluster name -> (role, target) of every cluster the model's routes name."""
    out: dict[str, tuple[Role, RouteTarget]] = {}
    for role, target in pins(route):
        out[cluster_name(route.model, role, target)] = (role, target)
    for role, target, _ in split(route):
        out[cluster_name(route.model, role, target)] = (role, target)
    return out


def clusters(routes: Iterable[Route], options: XdsOptions) -> list[dict[str, Any]]:
    """Every cluster the routes name (CDS), ordered by name."""
    found: dict[str, dict[str, Any]] = {}
    for route in routes:
        for name, (role, target) in route_clusters(route).items():
            found[name] = cluster(route.model, role, target, options)
    return [found[name] for name in sorted(found)]


def version_of(resources: Sequence[Mapping[str, Any]]) -> str:
    """A version_info that depends on the content alone: two writers of the same routes write
    the same version, and a reader can tell which content Envoy has loaded."""
    canonical = json.dumps(list(resources), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def discovery_response(resources: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The file form of a filesystem xDS subscription (a DiscoveryResponse)."""
    return {"version_info": version_of(resources), "resources": list(resources)}


# ---- bootstrap ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Receiver:
    """Where the gRPC access-log service listens, and how Envoy batches entries for it."""

    host: str
    port: int
    flush_interval_s: float = 0.1
    buffer_size_bytes: int = 64 * 1024


def access_log(receiver: Receiver) -> dict[str, Any]:
    """The http_grpc access logger that sends every request to preflight's receiver."""
    return {
        "name": "envoy.access_loggers.http_grpc",
        "typed_config": {
            "@type": _ALS_TYPE,
            "common_config": {
                "log_name": ALS_LOG_NAME,
                "transport_api_version": "V3",
                "grpc_service": {"envoy_grpc": {"cluster_name": ALS_CLUSTER}},
                "buffer_flush_interval": _duration(receiver.flush_interval_s),
                "buffer_size_bytes": receiver.buffer_size_bytes,
            },
            "additional_request_headers_to_log": list(LOGGED_REQUEST_HEADERS),
        },
    }


def receiver_cluster(receiver: Receiver) -> dict[str, Any]:
    """The static HTTP/2 cluster of the access-log service."""
    return {
        "name": ALS_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _H2_OPTIONS_TYPE,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": ALS_CLUSTER,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {
                                        "address": receiver.host,
                                        "port_value": receiver.port,
                                    }
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }


def _file_source(xds_dir: Path, name: str) -> dict[str, Any]:
    """A filesystem xDS source. Envoy reloads the file when any file is *moved* into the
    watched directory, which is what an atomic rename does (xds_files.py writes that way)."""
    return {
        "resource_api_version": "V3",
        "path_config_source": {
            "path": str(xds_dir / name),
            "watched_directory": {"path": str(xds_dir)},
        },
    }


def bootstrap(
    *,
    xds_dir: Path,
    listen_port: int,
    admin_port: int,
    receiver: Receiver | None,
    listen_host: str = "127.0.0.1",
    admin_host: str = "127.0.0.1",
    node_id: str = "preflight",
) -> dict[str, Any]:
    """The bootstrap Envoy starts on: admin, the inference listener (routes from RDS, clusters
    from CDS, both files under `xds_dir`) and, with a receiver, the gRPC access log."""
    hcm: dict[str, Any] = {
        "@type": _HCM_TYPE,
        "stat_prefix": "preflight",
        "codec_type": "AUTO",
        "use_remote_address": True,  # append the client to X-Forwarded-For, as the router does
        "generate_request_id": False,
        "rds": {
            "route_config_name": ROUTE_CONFIG_NAME,
            "config_source": _file_source(xds_dir, RDS_FILE),
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": _ROUTER_TYPE, "suppress_envoy_headers": True},
            }
        ],
    }
    static_clusters: list[dict[str, Any]] = []
    if receiver is not None:
        hcm["access_log"] = [access_log(receiver)]
        static_clusters.append(receiver_cluster(receiver))
    return {
        "node": {"id": node_id, "cluster": "preflight"},
        "admin": {"address": {"socket_address": {"address": admin_host, "port_value": admin_port}}},
        "dynamic_resources": {"cds_config": _file_source(xds_dir, CDS_FILE)},
        "static_resources": {
            "listeners": [
                {
                    "name": LISTENER_NAME,
                    "address": {
                        "socket_address": {"address": listen_host, "port_value": listen_port}
                    },
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": static_clusters,
        },
    }


# ---- reading back -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    """What Envoy's `/config_dump` says it has in force for one model, against `route`.

    `problems` is empty when the model's routes send exactly the route's split and pins to
    active clusters with the route's upstreams; `canary_units` is the canary's served share
    (None: the model has no route in Envoy)."""

    rds_version: str | None
    cds_version: str | None
    canary_units: int | None
    problems: tuple[str, ...]


def _configs(dump: Any) -> list[dict[str, Any]]:
    if not isinstance(dump, dict):
        return []
    return [c for c in dump.get("configs") or () if isinstance(c, dict)]


def _sends_to(entry: Mapping[str, Any]) -> dict[str, int]:
    """Cluster -> weight of one served route (a single cluster has the whole)."""
    action = entry.get("route") or {}
    if "cluster" in action:
        return {str(action["cluster"]): WEIGHT_TOTAL}
    weighted = (action.get("weighted_clusters") or {}).get("clusters") or ()
    return {str(c.get("name")): int(c.get("weight") or 0) for c in weighted}


def _endpoints(resource: Mapping[str, Any]) -> set[tuple[str, int]]:
    found: set[tuple[str, int]] = set()
    for locality in (resource.get("load_assignment") or {}).get("endpoints") or ():
        for lb in locality.get("lb_endpoints") or ():
            socket = ((lb.get("endpoint") or {}).get("address") or {}).get("socket_address") or {}
            if "address" in socket:
                found.add((str(socket["address"]), int(socket.get("port_value") or 0)))
    return found


def cds_version(versions_dump: Any) -> str | None:
    """The version of the last CDS response Envoy processed, from `/config_dump?mask=version_info`
    (each cluster's own version_info is the version it last changed in, not the latest)."""
    for item in _configs(versions_dump):
        if str(item.get("@type", "")).endswith("admin.v3.ClustersConfigDump"):
            version = item.get("version_info")
            return str(version) if version else None
    return None


def served(route: Route, routes_dump: Any, clusters_dump: Any, versions_dump: Any = None) -> Served:
    """Compare what Envoy serves for `route.model` with what `route` asks for.

    `routes_dump`: `/config_dump?resource=dynamic_route_configs`; `clusters_dump`:
    `/config_dump?resource=dynamic_active_clusters` (warming clusters are not in force);
    `versions_dump`: `/config_dump?mask=version_info`."""
    problems: list[str] = []
    rds_version: str | None = None
    entries: dict[str, Mapping[str, Any]] = {}
    for item in _configs(routes_dump):
        route_config = item.get("route_config") or {}
        if route_config.get("name") != ROUTE_CONFIG_NAME:
            continue
        rds_version = item.get("version_info")
        for vhost in route_config.get("virtual_hosts") or ():
            for entry in vhost.get("routes") or ():
                if isinstance(entry, dict) and entry.get("name"):
                    entries.setdefault(str(entry["name"]), entry)
    active: dict[str, Mapping[str, Any]] = {}
    for item in _configs(clusters_dump):
        resource = item.get("cluster") or {}
        if "name" in resource:
            active[str(resource["name"])] = resource
    cds = cds_version(versions_dump)
    if rds_version is None:
        return Served(None, cds, None, (f"no {ROUTE_CONFIG_NAME} route configuration",))
    model = route.model
    split_entry = entries.get(f"{model}|split")
    if split_entry is None:
        return Served(rds_version, cds, None, (f"no route for {model}",))
    sends = _sends_to(split_entry)
    want = {cluster_name(model, role, target): units for role, target, units in split(route)}
    names = {cluster_name(model, role, target): role for role, target in pins(route)}
    names.update({cluster_name(model, role, target): role for role, target, _ in split(route)})
    units = sum(w for name, w in sends.items() if name.split("|")[2:3] == ["canary"])
    if sends != want:
        problems.append(f"split {_describe_split(sends)} instead of {_describe_split(want)}")
    updated = ((split_entry.get("metadata") or {}).get("filter_metadata") or {}).get(
        METADATA_NAMESPACE, {}
    )
    if updated.get("updated_at") != route.updated_at.isoformat():
        problems.append(
            f"route written at {updated.get('updated_at')}, not {route.updated_at.isoformat()}"
        )
    for role, target in pins(route):
        entry = entries.get(f"{model}|pin-{role}")
        expected = cluster_name(model, role, target)
        if entry is None or _sends_to(entry) != {expected: WEIGHT_TOTAL}:
            problems.append(f"pin {role} not to {expected}")
    for name in sorted(names):
        resource = active.get(name)
        if resource is None:
            problems.append(f"cluster {name} not active")
            continue
        _, target = route_clusters(route)[name]
        wanted: set[tuple[str, int]] = set()
        if target.upstream is not None:
            upstream = parse_upstream(target.upstream)
            wanted = {(upstream.host, upstream.port)}
        if _endpoints(resource) != wanted and not (
            resource.get("type") == "STRICT_DNS" and target.upstream is not None
        ):
            problems.append(f"cluster {name} has endpoints {sorted(_endpoints(resource))}")
    return Served(rds_version, cds, units, tuple(problems))


def _describe_split(sends: Mapping[str, int]) -> str:
    if not sends:
        return "nowhere"
    return ", ".join(
        f"{'|'.join(name.split('|')[2:3]) or name} {w / WEIGHT_TOTAL * 100:g}%"
        for name, w in sorted(sends.items())
    )
