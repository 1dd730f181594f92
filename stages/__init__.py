"""tapeline's stages and the graph that wires them: plain functions, no Prefect (that lives in `flows`)."""
