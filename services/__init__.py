"""preflight: gates ML model deployments through validation, benchmarks and a canary."""

__version__ = "0.1.0"
