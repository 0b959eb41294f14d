"""The embedded stack (`preflight up`), the demo and the `preflight` CLI."""
