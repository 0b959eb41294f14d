"""Pre-deploy checks: pure functions from an inventory of model files to a CheckResult."""
