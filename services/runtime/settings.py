"""Settings read once from the environment (`PREFLIGHT_*`) at the edge and passed down."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def redact_url(url: str) -> str:
    """A URL (or comma-separated URLs) safe to log: user:password@ becomes ***@."""
    out = []
    for part in url.split(","):
        parts = urlsplit(part.strip())
        if parts.username or parts.password:
            host = parts.hostname or ""
            if parts.port:
                host += f":{parts.port}"
            part = urlunsplit(parts._replace(netloc=f"***@{host}"))
        out.append(part)
    return ",".join(out)


def _default_instance() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    """Every knob of every service; `PREFLIGHT_NATS_URL` sets `nats_url`, and so on."""

    model_config = SettingsConfigDict(env_prefix="PREFLIGHT_", frozen=True, extra="ignore")

    nats_url: str = Field(
        default="nats://127.0.0.1:4222", description="NATS server(s), comma-separated."
    )
    nats_user: str | None = None
    nats_password: SecretStr | None = None
    data_dir: Path = Field(default=Path(".preflight"), description="Embedded stack state.")
    policy_file: Path | None = Field(default=None, description="Policy YAML; default: built-in.")
    clickhouse_url: str = Field(
        default="chdb",
        description="`chdb` for the embedded engine under data_dir, or http(s)://user:pass@host:port/db.",
    )
    clickhouse_path: Path | None = Field(default=None, description="chDB data path override.")
    metrics_table: str = "request_metrics"
    metrics_ttl_days: int = Field(default=30, ge=1)
    metrics_url_template: str | None = Field(
        default=None,
        description=(
            "Link sent with outcomes, e.g. a Grafana dashboard URL with {deployment_id}, "
            "{model}, {from_ms}, {to_ms}. Unset: the controller's own rollout page "
            "(http://<controller_http_host>:<controller_http_port>/rollouts/{deployment_id})."
        ),
    )
    controller_http_host: str = Field(default="127.0.0.1", description="Rollout page and API.")
    controller_http_port: int = Field(default=8471, ge=0, le=65535, description="0: no page.")
    controller_public_url: str | None = Field(
        default=None, description="Base URL people reach the controller's page at, if proxied."
    )
    slack_token: SecretStr | None = None
    slack_webhook_url: SecretStr | None = None
    slack_base_url: str | None = Field(
        default=None, description="Slack Web API base URL; tests point it at a local server."
    )
    slack_channel: str | None = Field(
        default=None, description="Channel when neither the policy nor the request names one."
    )
    slack_max_attempts: int = Field(default=5, ge=1, description="Per notice, 429/5xx included.")
    webhook_url: str | None = Field(default=None, description="Generic JSON webhook for outcomes.")
    webhook_secret: SecretStr | None = Field(
        default=None, description="HMAC-SHA256 key; signature in `X-Preflight-Signature`."
    )
    request_webhook_prefixes: str | None = Field(
        default=None,
        description=(
            "URL prefixes, comma-separated, that a deployment request's own `notify.webhook_url` "
            "may start with (e.g. https://hooks.example.com/); unset: requests may not name "
            "webhooks. The notifier signs what it sends, so an open choice let anyone make it "
            "post, signed, to any address, loopback and cloud metadata included."
        ),
    )
    router_host: str = "127.0.0.1"
    router_port: int = Field(default=8480, ge=0, le=65535)
    router_default_model: str | None = Field(
        default=None, description="Model for requests without an `X-Preflight-Model` header."
    )
    router_sticky_header: str | None = Field(
        default="x-preflight-client",
        description="Requests with the same value of this header see the same version.",
    )
    router_connect_timeout_s: float = Field(default=2.0, gt=0)
    router_upstream_timeout_s: float = Field(default=60.0, gt=0, description="Whole request.")
    metrics_batch_max_records: int = Field(
        default=500,
        ge=1,
        le=2_000,
        description="Records per batch; 2,000 keeps a batch (~230 B a record) under NATS's 1 MiB.",
    )
    metrics_batch_interval_s: float = Field(default=0.2, gt=0)
    metrics_buffer_max_records: int = Field(
        default=50_000, ge=1, description="Records kept while the bus is slow; beyond: dropped."
    )
    ingest_fetch_batch: int = Field(default=64, ge=1, description="Metric batches per insert.")
    instance: str = Field(default_factory=_default_instance)
    log_level: str = "INFO"
    events_duplicate_window_s: float = Field(default=3600.0, gt=0)
    events_max_age_days: float = Field(default=90.0, gt=0)
    # The streams share the server's JetStream store (nats.conf: max_file_store 20GB). Each is
    # bounded, oldest dropped first, so a flood of junk (each stored, each dead-lettered) ages
    # out history instead of filling the store and refusing every publish.
    events_max_bytes: int = Field(default=8 * 1024**3, gt=0)
    deadletter_max_bytes: int = Field(default=2 * 1024**3, gt=0)
    metrics_max_age_s: float = Field(default=86400.0, gt=0)
    metrics_max_bytes: int = Field(default=2 * 1024**3, gt=0)
    max_deliver: int = Field(default=5, ge=1, description="Deliveries before a dead letter.")
    ack_wait_s: float = Field(default=60.0, gt=0)
    max_handler_s: float = Field(
        default=3600.0,
        gt=0,
        description="In-progress acks stop after this: a hung handler's message is redelivered.",
    )
    model_roots: str | None = Field(
        default=None,
        description=(
            "Directories local model locations must lie in, separated by ':' (compose and "
            "Kubernetes: /models). A request for a local path outside them is blocked before a "
            "byte is read; unset: any path the service can read (development, the embedded "
            "stack). Remote locations (s3://, hf://, https://) are not affected."
        ),
    )
    remote_location_prefixes: str | None = Field(
        default=None,
        description=(
            "Comma-separated prefixes remote locations must start with (s3://models/, "
            "hf://acme/, https://models.example.com/); unset: any. An https:// location is "
            "fetched by the validator, so an open choice lets a request probe hosts and ports "
            "the validator can reach."
        ),
    )
    benchmark_time_limit_s: float = Field(
        default=1800.0,
        gt=0,
        description=(
            "Hard limit on one deployment's benchmark, loading not counted: measurements stop "
            "at the next window, run or prompt after it, and the checks not run say so. What a "
            "model or a request asks for can no longer hold a benchmarker for hours. A step "
            "that never returns (a tokenizer call, a forward pass) is stopped with the child "
            "process the benchmark runs in, once past the limit plus max(60 s, 10%)."
        ),
    )
    benchmark_load_time_limit_s: float = Field(
        default=600.0,
        gt=0,
        description=(
            "Hard limit on loading one model for the benchmark (a remote model's fetch is not "
            "counted: it logs progress): past it the child process the benchmark runs in is "
            "stopped and the benchmark says `could not run` and why. Two loads (candidate, "
            "previous version) and the measurements' limit should fit in max_handler_s."
        ),
    )
    benchmark_fetch_time_limit_s: float = Field(
        default=3600.0,
        gt=0,
        description=(
            "Hard limit on fetching one remote model into the model cache for the benchmark "
            "(s3://, hf://, https://): past it the child process is stopped and the benchmark "
            "says `could not run`. The stores' timeouts bound each read, not a server that "
            "answers a byte at a time."
        ),
    )
    benchmark_memory_limit: str | None = Field(
        default=None,
        description=(
            "Memory (resident) the benchmark's child process may use: bytes or with a unit "
            "(16GiB). Past it the child is stopped and the benchmark says so; a model's files "
            "can no longer take the host's memory. Default: 80% of this host's, or its "
            "container's, memory."
        ),
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description=(
            "CPU threads for benchmarks; default: torch's own. On a small shared machine 1 is "
            "steadier (docs/benchmarks.md: 2 threads beside a busy neighbour ran 10-100x slower)."
        ),
    )
    model_cache_dir: Path | None = Field(
        default=None,
        description="Benchmarkers' cache of remote models (s3://, hf://, https://), shared by "
        "every benchmarker on the host; default ~/.cache/preflight/fetched-models "
        "(docs/locations.md).",
    )
    model_cache_max_bytes: str | None = Field(
        default=None,
        description="Bound on that cache: bytes, or with a unit (500GB, 100GiB); default 100GiB.",
    )
    data_plane: Literal["builtin", "envoy"] = Field(
        default="builtin",
        description="`preflight up`: what carries inference traffic: preflight's own router, or "
        "a real Envoy fed by xDS files, its access logs received back (docs/data-planes/).",
    )
    envoy_xds_dir: Path | None = Field(
        default=None, description="Envoy router: the directory Envoy watches for RDS/CDS files."
    )
    envoy_admin_url: str | None = Field(
        default=None, description="Envoy router: its admin interface, read back (/config_dump)."
    )
    envoy_receiver_host: str = Field(default="127.0.0.1", description="Access-log receiver.")
    envoy_receiver_port: int = Field(default=9902, ge=0, le=65535, description="Its gRPC port.")
    envoy_receiver_http_port: int | None = Field(
        default=None, ge=0, le=65535, description="Receiver /healthz and /metrics; None: off."
    )
    kube_api_url: str | None = Field(
        default=None,
        description="Kubernetes routers: the API server; default: in-cluster, else kubeconfig.",
    )
    kube_token: SecretStr | None = Field(
        default=None, description="Kubernetes routers: a bearer token for `kube_api_url`."
    )
    kube_ca_file: Path | None = Field(
        default=None, description="Kubernetes routers: CA bundle for `kube_api_url`."
    )
    stack_host: str = "127.0.0.1"
    stack_nats_port: int = Field(default=-1, description="-1: a free port.")
    command_users: str = Field(
        default="client,admin",
        description=(
            "NATS users whose promote/abort/pause/resume the controller obeys, comma-separated. "
            "The sender is the authenticated user (the command's subject, checked by the "
            "server); `anonymous` stands for a bus without authentication."
        ),
    )

    def command_senders(self) -> frozenset[str]:
        return frozenset(u.strip() for u in self.command_users.split(",") if u.strip())

    def chdb_path(self) -> Path:
        return self.clickhouse_path or (self.data_dir / "clickhouse")
