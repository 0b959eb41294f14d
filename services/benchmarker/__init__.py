"""benchmarker: perplexity, latency and consistency against the version being replaced."""
