"""Which `Store` reads a model location: s3://, hf:// and https:// are remote; anything else is
a local path (or file://) that the validator and loader read directly.

    s3://bucket/prefix/          any S3-compatible endpoint (AWS_ENDPOINT_URL, profiles, roles)
    hf://org/name[@revision]     a Hugging Face Hub repo (HF_ENDPOINT, HF_TOKEN); default: main
    https://host/base/           a base URL with a manifest.json (or a files list) beside the model
"""

from __future__ import annotations

from pathlib import Path

from services.storage.base import Store, StoreError

REMOTE_SCHEMES = ("s3", "hf", "https")


def scheme_of(location: str) -> str | None:
    """The URI scheme of a location, lower-cased; None for a plain path."""
    head, sep, _ = location.partition("://")
    if not sep or "/" in head:
        return None
    return head.lower()


def is_remote(location: str) -> bool:
    return scheme_of(location) in REMOTE_SCHEMES


def outside_roots(location: str, roots: str | None) -> str | None:
    """Why a local `location` may not be read under `roots` (directories joined by ':'), or
    None. The path is resolved first (symlinks, `..`), so a link inside a root that points
    out of it is outside. A client could otherwise ask for `file:///etc/shadow` or `/etc` and
    read the first bytes of a host file, or the host's file names, back from the outcome."""
    if roots is None or is_remote(location):
        return None
    allowed = [Path(r).resolve() for r in roots.split(":") if r.strip()]
    path = location.split("://", 1)[1] if scheme_of(location) == "file" else location
    resolved = Path(path).resolve()
    if any(resolved.is_relative_to(root) for root in allowed):
        return None
    shown = ", ".join(str(r) for r in allowed) or "(none)"
    return f"{location}: local models must be under PREFLIGHT_MODEL_ROOTS ({shown})"


def remote_not_allowed(location: str, prefixes: str | None) -> str | None:
    """Why a remote `location` may not be fetched under `prefixes` (comma-separated), or None.
    Compared as given and lower-cased in scheme and host, so `HTTPS://Models...` is the same."""
    if prefixes is None or not is_remote(location):
        return None
    allowed = [p.strip() for p in prefixes.split(",") if p.strip()]
    scheme, _, rest = location.partition("://")
    host, slash, path = rest.partition("/")
    normal = f"{scheme.lower()}://{host.lower()}{slash}{path}"
    if any(starts_under(normal, prefix) or starts_under(location, prefix) for prefix in allowed):
        return None
    shown = ", ".join(allowed) or "(none)"
    return f"{location}: remote models must be under PREFLIGHT_REMOTE_LOCATION_PREFIXES ({shown})"


def starts_under(location: str, prefix: str) -> bool:
    """`location` starts with `prefix` at a path boundary: https://models.example.com does not
    admit https://models.example.com.evil.test/."""
    if not location.startswith(prefix):
        return False
    return prefix.endswith("/") or len(location) == len(prefix) or location[len(prefix)] in "/@"


def open_store(location: str) -> Store:
    """The store for a remote location. Raises StoreError (one line) for an unsupported one."""
    scheme = scheme_of(location)
    if scheme == "s3":
        from services.storage.s3 import S3Store

        return S3Store(location)
    if scheme == "hf":
        from services.storage.hub import HubStore

        return HubStore(location)
    if scheme == "https":
        from services.storage.https import HttpsStore

        return HttpsStore(location)
    raise StoreError(
        f"{location}: not a remote model location (s3://BUCKET/PREFIX/, hf://ORG/NAME@REVISION "
        "or https://HOST/BASE/)",
        kind="unsupported",
    )
