"""Prefect artifacts: the run summary, per-class metrics, pictures and a live training progress bar."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from stages.train.outputs import epoch_log_line
from tapeline.results import EpochCallback, ValidateResult


def progress_reporter() -> EpochCallback:
    """An epoch callback that keeps a Prefect progress artifact (percent of max_epochs) up to date.

    The artifact is created at the first epoch, so a stage that trains nothing (or a cache hit) makes none."""
    artifact_ids: list[Any] = []

    def report(row: dict[str, float], max_epochs: int) -> None:
        if not artifact_ids:
            artifact_ids.append(create_progress_artifact(progress=0.0, key="training-progress",
                                                         description="epochs done, as a share of train.max_epochs"))
        update_progress_artifact(artifact_ids[0], progress=min(100.0, 100.0 * row["epoch"] / max_epochs),
                                 description=epoch_log_line(row))

    return report


def _summary_markdown(summary: dict[str, Any]) -> str:
    """The run summary: per-stage table, metrics and the promotion decision."""
    lines = [
        f"# tapeline run `{summary['run_id']}`", "",
        f"**Test accuracy {summary['test_accuracy']:.4f}**"
        + (f" (production: {summary['champion_accuracy']:.4f})" if summary["champion_accuracy"] is not None else ""),
        "", f"**Promotion:** {summary['decision']}", "", f"Model: `{summary['model_path']}`", "",
        "| stage | fingerprint | cached | seconds | output |", "|---|---|---|---|---|",
        *(f"| {name} | `{s['fingerprint']}` | {'yes' if s['cached'] else 'no'} | {s['seconds']:.1f} | `{s['path']}` |"
          for name, s in summary["stages"].items()),
    ]
    return "\n".join(lines)


def _png_markdown(title: str, path: Path) -> str:
    """A PNG file embedded as a data URI, so the Prefect UI shows it without a file server."""
    return png_data_markdown(title, path.read_bytes())


def png_data_markdown(title: str, data: bytes) -> str:
    """PNG bytes embedded as a data URI under a heading."""
    encoded = base64.b64encode(data).decode()
    return f"## {title}\n\n![{title}](data:image/png;base64,{encoded})\n"


def publish_artifacts(summary: dict[str, Any], evaluate_dir: Path) -> None:
    """Create the summary, per-class table and pictures artifacts of a finished run."""
    create_markdown_artifact(_summary_markdown(summary), key="training-summary", description="tapeline run summary")
    metrics = json.loads((evaluate_dir / "metrics.json").read_text())
    create_table_artifact(metrics["per_class"], key="per-class-metrics", description="test precision / recall / F1")
    pictures = [("Learning curves", "learning_curves.png"), ("Confusion matrix", "confusion_matrix.png"),
                ("Worst misclassified test images", "worst_misclassified.png")]
    create_markdown_artifact("\n".join(_png_markdown(t, evaluate_dir / f) for t, f in pictures),
                             key="evaluation-pictures", description="learning curves and confusion matrix")


def publish_validation_report(result: ValidateResult) -> None:
    """The validation report with its pictures (also when it failed: the evidence)."""
    report = (result.path / "report.md").read_text()
    body = report.split("![class histogram]")[0]
    pictures = [("Class histogram", result.path / "class_histogram.png"),
                ("Pixel intensity histogram", result.path / "pixel_histogram.png")]
    create_markdown_artifact(body + "\n" + "\n".join(_png_markdown(t, p) for t, p in pictures),
                             key="validation-report", description="data validation before training")
