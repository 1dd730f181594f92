"""tapeline orchestration: Prefect tasks, the flow and the CLI."""
