"""tapeline stages: pure stage logic (no Prefect) for data, model, train, evaluate and export."""
