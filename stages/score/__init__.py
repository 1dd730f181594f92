"""Batch scoring: new images classified with an exported model, cached per file by content, and drift against the
data the model was trained on. Plain functions, no Prefect: `flows/scoring.py` wires them as tasks."""
