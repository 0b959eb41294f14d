"""Sample inference server (synthetic or a small real model) and a load generator, for demos."""
