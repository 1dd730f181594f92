"""The promotion step: compare the run's model with production and switch production when it is better.

Not a cached stage: it runs on every run, because production may have changed since the challenger's
outputs were cached. The champion's figures on this run's test split come from the evaluate stage's
own cached output for the champion's trained model (built once, then reused), so the comparison is
like for like. Each run leaves a record in `runs/<run_id>/`: metrics.json and the model card, both
with the comparison and the decision.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from stages.cache import file_lock, manifest_problem, read_manifest
from stages.config import ExportConfig, PipelineConfig
from stages.errors import CacheError
from stages.evaluate import test_metrics
from stages.export import render_model_card
from stages.graph import run_stage
from stages.registry import models_dir, production, publish_version, switch_production
from stages.results import DataResult, EvaluateResult, ExportResult, Promotion, TrainResult
from stages.train import train_result

RUNS = "runs"
log = logging.getLogger("tapeline.promotion")


def decide(challenger: float, champion: float | None, config: ExportConfig) -> tuple[bool, str]:
    """The gate: at least export.min_accuracy, and better than the champion by export.promote_min_delta."""
    if challenger < config.min_accuracy:
        return False, f"rejected: test accuracy {challenger:.4f} < export.min_accuracy {config.min_accuracy:.4f}"
    if champion is None:
        return True, f"promoted: no comparable production model; test accuracy {challenger:.4f}"
    if challenger > champion and challenger - champion >= config.promote_min_delta:
        return True, f"promoted: {challenger:.4f} beats production {champion:.4f}"
    return False, (f"kept production: {challenger:.4f} does not beat {champion:.4f} "
                   f"by export.promote_min_delta {config.promote_min_delta}")


def comparable(artifacts: Path, champion: dict[str, Any], data: DataResult) -> bool:
    """Whether the champion takes the same images and classes as this run's data."""
    card_path = artifacts / champion["path"] / "model_card.json"
    try:
        spec = json.loads(card_path.read_text())["input_spec"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CacheError(f"{card_path} is unreadable ({exc}); restore the version from its export") from exc
    same = tuple(spec["shape"]) == data.input_spec.shape and tuple(spec["class_names"]) == data.input_spec.class_names
    if not same:
        log.warning("production model %s takes other images or classes; not comparable", champion["version"])
    return same


def champion_accuracy(config: PipelineConfig, artifacts: Path, champion: dict[str, Any], data: DataResult
                      ) -> float | None:
    """The champion's test accuracy on this run's test split (None when not comparable).

    Read from the evaluate stage's output for (this data, the champion's trained model), built on first
    use; when the champion's train output is gone, its promoted .keras file is evaluated directly.
    """
    if not comparable(artifacts, champion, data):
        return None
    train_dir = artifacts / "train" / champion["train_fingerprint"]
    if manifest_problem(train_dir) is None:
        trained = train_result(train_dir, read_manifest(train_dir), True, 0.0)
        evaluation = run_stage("evaluate", config, artifacts, {"data": data, "train": trained})
        return evaluation.test_accuracy
    log.warning("the train output of production %s is gone; evaluating its promoted model", champion["version"])
    metrics, *_ = test_metrics(artifacts / champion["path"] / "model.keras", data)
    return float(metrics["test_accuracy"])


def decide_and_switch(config: PipelineConfig, artifacts: Path, data: DataResult, train: TrainResult,
                      evaluation: EvaluateResult, export: ExportResult) -> Promotion:
    """Under the promotion lock: compare with the current production model and switch when better."""
    models_dir(artifacts).mkdir(parents=True, exist_ok=True)
    with file_lock(models_dir(artifacts) / ".promotion.lock", config.export.lock_timeout_seconds, "promotion"):
        current = production(artifacts)
        if current is not None and current["train_fingerprint"] == train.fingerprint:
            return Promotion(promoted=False, decision=f"already production ({current['version']})",
                             model_path=artifacts / current["path"], test_accuracy=evaluation.test_accuracy,
                             champion_version=current["version"], champion_accuracy=evaluation.test_accuracy)
        theirs = champion_accuracy(config, artifacts, current, data) if current is not None else None
        promoted, decision = decide(evaluation.test_accuracy, theirs, config.export)
        outcome = Promotion(promoted=promoted, decision=decision, model_path=export.path,
                            test_accuracy=evaluation.test_accuracy,
                            champion_version=current["version"] if current and theirs is not None else None,
                            champion_accuracy=theirs)
        if not promoted:
            return outcome
        record = {"train_fingerprint": train.fingerprint, "test_accuracy": evaluation.test_accuracy,
                  "champion_accuracy": theirs, "previous": current and current["version"],
                  "decision": decision, "export": str(export.path),
                  "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        version = publish_version(artifacts, export.path, record)
        switch_production(artifacts, {**record, "version": version, "path": f"models/{version}"})
        log.info("%s -> production is now %s", decision, version)
        return outcome.model_copy(update={"model_path": models_dir(artifacts) / version})


def comparison(promotion: Promotion) -> dict[str, Any]:
    """The champion comparison and decision, as recorded with the run."""
    return {"champion": None if promotion.champion_version is None else {
                "version": promotion.champion_version, "test_accuracy": promotion.champion_accuracy},
            "promotion": {"promoted": promotion.promoted, "decision": promotion.decision,
                          "model_path": str(promotion.model_path)}}


def write_run_record(artifacts: Path, run_id: str, evaluation: EvaluateResult, export: ExportResult,
                     promotion: Promotion) -> Path:
    """runs/<run_id>/: metrics.json and model_card.json/.md with the comparison; complete before it has its name."""
    final = artifacts / RUNS / run_id
    staging = final.with_name(f".partial-{run_id}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    extra = comparison(promotion)
    (staging / "metrics.json").write_text(json.dumps({**evaluation.metrics(), **extra}, indent=2))
    card = {**json.loads((export.path / "model_card.json").read_text()), **extra}
    (staging / "model_card.json").write_text(json.dumps(card, indent=2))
    champion = extra["champion"]
    (staging / "model_card.md").write_text(render_model_card(card) + "\n".join([
        "## Promotion", "",
        f"- Production before this run: {champion['version']} (test accuracy {champion['test_accuracy']:.4f} "
        "on this test split)" if champion else "- Production before this run: none comparable",
        f"- Decision: {promotion.decision}", "",
    ]))
    staging.rename(final)
    return final


def promote(config: PipelineConfig, data: DataResult, train: TrainResult, evaluation: EvaluateResult,
            export: ExportResult, artifacts: Path, run_id: str) -> Promotion:
    """The promotion step: decide (and switch production) one run at a time, then record the run."""
    promotion = decide_and_switch(config, artifacts, data, train, evaluation, export)
    record = write_run_record(artifacts, run_id, evaluation, export, promotion)
    return promotion.model_copy(update={"record": record})
