"""router service: the weighted stable/canary proxy. Not built yet (issue #5)."""

from __future__ import annotations

NAME = "router"
NOT_BUILT = "router: not built yet (issue #5); the pipeline runs without traffic splitting"
