"""Whether a route's upstreams accept a TCP connection: said when a rollout has no traffic.

"No canary requests" has two very different causes: nobody sends the model traffic, or the
router cannot reach the inference server. One connection attempt per upstream, with a short
timeout, tells them apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Protocol
from urllib.parse import urlsplit

from services.contracts.events import RouteTarget
from services.metrics.queries import WindowResult
from services.runtime.aio import bounded
from services.runtime.settings import redact_url

CONNECT_TIMEOUT_S = 1.0


class UpstreamProbe(Protocol):
    """Tries one upstream URL."""

    async def problem(self, url: str) -> str | None:
        """None when the upstream accepts a TCP connection, else why not, as a phrase that
        follows the URL ("refuses connections")."""
        ...


def address(url: str) -> tuple[str, int] | None:
    """(host, port) of an http(s) URL, the scheme's port when none is given; None if not one."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


class TcpProbe:
    """A TCP connect with a timeout, on the event loop (nothing blocks it)."""

    def __init__(self, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s

    async def problem(self, url: str) -> str | None:
        where = address(url)
        if where is None:
            return "is not an http(s) URL with a host"
        host, port = where
        try:
            _, writer = await bounded(asyncio.open_connection(host, port), self.timeout_s)
        except TimeoutError:
            return f"does not accept a connection within {self.timeout_s:g} s"
        except ConnectionRefusedError:
            return "refuses connections"
        except socket.gaierror:
            return f"has a host name that does not resolve ({host})"
        except OSError as exc:
            return f"cannot be reached ({exc.strerror or type(exc).__name__})"
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return None


async def unreachable(
    window: WindowResult | None,
    canary: RouteTarget | None,
    stable: RouteTarget | None,
    probe: UpstreamProbe,
) -> list[str]:
    """For each role without a single request in `window`: why its upstream is to blame, if it
    is (no endpoint, or no TCP connection); empty when every such upstream accepts one."""
    if window is None:
        return []
    quiet = [
        (role, target)
        for role, target, requests in (
            ("canary", canary, window.canary.requests),
            ("stable", stable, window.stable.requests),
        )
        if requests == 0 and target is not None
    ]

    async def why(role: str, target: RouteTarget) -> str | None:
        if not target.upstream:
            return f"the {role} ({target.version}) has no endpoint: a router cannot send it traffic"
        problem = await probe.problem(target.upstream)
        if problem is None:
            return None
        return f"the {role} upstream {redact_url(target.upstream)} {problem}"

    found = await asyncio.gather(*(why(role, target) for role, target in quiet))
    return [f for f in found if f is not None]
