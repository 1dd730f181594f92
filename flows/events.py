"""Prefect events for what a team wants to be told about: a nightly drop that failed validation, and each
promotion decision. Automations (notifications, tickets, a retrain on another pool) trigger on them."""

from __future__ import annotations

from typing import Any

from prefect.events import emit_event

from tapeline.results import Promotion, ValidateResult

RESOURCE = {"prefect.resource.id": "tapeline.pipeline.training-pipeline", "prefect.resource.name": "tapeline"}


def _flow_run_resource(flow_run_id: str | None) -> list[dict[str, str]]:
    """The flow run as the event's related resource (none outside a flow run)."""
    if not flow_run_id:
        return []
    return [{"prefect.resource.id": f"prefect.flow-run.{flow_run_id}", "prefect.resource.role": "flow-run"}]


def emit(name: str, payload: dict[str, Any], flow_run_id: str | None) -> None:
    """Emit one tapeline event."""
    emit_event(event=name, resource=RESOURCE, related=_flow_run_resource(flow_run_id), payload=payload)


def validation_failed(result: ValidateResult, flow_run_id: str | None) -> None:
    """`tapeline.validation.failed`: the error kinds and counts, the warnings, and where the report is."""
    emit("tapeline.validation.failed", {"errors": result.errors, "warnings": result.warnings,
                                        "report": f"{result.location or result.path}/report.md"}, flow_run_id)


def promotion_decided(promotion: Promotion, flow_run_id: str | None) -> None:
    """`tapeline.model.promoted` or `tapeline.model.rejected` with the decision and both accuracies (nothing
    when the model was already production: no decision was made)."""
    if promotion.decision.startswith("already production"):
        return
    emit("tapeline.model.promoted" if promotion.promoted else "tapeline.model.rejected",
         {"decision": promotion.decision, "test_accuracy": promotion.test_accuracy,
          "champion_version": promotion.champion_version, "champion_accuracy": promotion.champion_accuracy,
          "model_path": promotion.model_path}, flow_run_id)


SCORING = {"prefect.resource.id": "tapeline.pipeline.batch-scoring", "prefect.resource.name": "tapeline scoring"}


def drift_detected(figures: dict[str, Any], source: str, model_version: str, output: str,
                   flow_run_id: str | None) -> None:
    """`tapeline.drift.detected`: the scored batch moved away from the model's training data (the figures and the
    reasons); the `training-pipeline/on-drift` deployment is triggered by it."""
    emit_event(event="tapeline.drift.detected", resource=SCORING, related=_flow_run_resource(flow_run_id),
               payload={"source": source, "model_version": model_version, "output": output, **figures})
