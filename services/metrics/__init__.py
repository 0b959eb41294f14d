"""Request metrics: ingest from the metrics stream into ClickHouse, and the controller's queries."""
