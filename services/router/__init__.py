"""router: the data plane that splits traffic between stable and canary."""
