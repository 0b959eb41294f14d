"""canary-controller: shifts traffic 5% -> 50% -> 100% and rolls back on bad numbers."""
