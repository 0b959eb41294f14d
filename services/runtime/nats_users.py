"""NATS users: the shipped configuration's users and, for the embedded stack, their passwords.

deploy/nats/nats.conf is the one description of who may do what on the bus; docker-compose,
Kubernetes and `preflight up` all run it. It names each password as `$NATS_<USER>_PASSWORD`. The
embedded stack generates those passwords once per data directory, into a file only its owner can
read (mode 0600), so another local user cannot connect and steer rollouts; the CLI reads the
file to connect as `client` (commands, deployments) or `admin` (`preflight bootstrap`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NATS_CONF = ROOT / "deploy" / "nats" / "nats.conf"
CREDENTIALS_FILE = "credentials.json"

ADMIN = "admin"
CLIENT = "client"


class CredentialsError(RuntimeError):
    """The credentials file is missing, unreadable or readable by others."""


def conf_path() -> Path:
    if not NATS_CONF.exists():
        raise CredentialsError(
            f"{NATS_CONF} not found: the embedded stack runs the shipped NATS configuration "
            "from the repository checkout"
        )
    return NATS_CONF


def users(conf: Path | None = None) -> dict[str, str]:
    """User -> the environment variable the configuration reads its password from."""
    text = (conf or conf_path()).read_text("utf-8")
    return dict(re.findall(r"user:\s*([\w-]+)\s*\n\s*password:\s*\$(\w+)", text))


def user_of_service(service: str) -> str:
    """Each service connects as the user of its own name (deploy/nats/nats.conf); the Envoy
    access-log receiver is a data plane's record source, so it is the `router` user."""
    if service == "envoy-receiver":
        return "router"
    if service not in users():
        raise CredentialsError(f"deploy/nats/nats.conf has no user for service {service!r}")
    return service


def credentials_path(data_dir: Path) -> Path:
    return data_dir / "nats" / CREDENTIALS_FILE


def ensure_credentials(data_dir: Path) -> dict[str, str]:
    """User -> password for this data directory, made on first use (hex: nats.conf reads the
    value as a token) and kept in a file of mode 0600."""
    path = credentials_path(data_dir)
    known: dict[str, str] = {}
    if path.exists():
        known = load_credentials(data_dir)
    wanted = {user: known.get(user) or secrets.token_hex(24) for user in users()}
    if wanted != known:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(wanted, indent=2) + "\n")
        tmp.replace(path)
    return wanted


def load_credentials(data_dir: Path) -> dict[str, str]:
    path = credentials_path(data_dir)
    try:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise CredentialsError(
                f"{path} is readable by others (mode {mode:o}); `chmod 600 {path}`"
            )
        found = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CredentialsError(f"{path} not found: start the stack with `preflight up`") from exc
    except (OSError, ValueError) as exc:
        raise CredentialsError(f"{path} unreadable: {exc}") from exc
    if not isinstance(found, dict) or not all(isinstance(v, str) for v in found.values()):
        raise CredentialsError(f"{path} is not a user -> password map")
    return found


def server_env(credentials: dict[str, str]) -> dict[str, str]:
    """The environment nats-server resolves the configuration's `$NATS_*_PASSWORD` from."""
    return {variable: credentials[user] for user, variable in users().items()}
