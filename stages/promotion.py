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
from typing import Any

from stages.evaluate import test_metrics
from stages.export import render_model_card
from stages.floor import did_not_learn
from stages.graph import Artifacts, find_output_by_fingerprint, run_stage
from tapeline.cache import read_manifest
from tapeline.config import ExportConfig, PipelineConfig
from tapeline.errors import CacheError, LockTimeoutError
from tapeline.registry import local_version, publish, read_production, switch
from tapeline.results import DataResult, EvaluateResult, ExportResult, Promotion, TrainResult
from tapeline.serving import publish_serving
from tapeline.store import LocalStore, RemoteStore, Store, open_store, with_lock

RUNS = "runs"
SWITCH_ATTEMPTS = 5
log = logging.getLogger("tapeline.promotion")


def decide(challenger: float, champion: float | None, config: ExportConfig, floor: str | None = None
           ) -> tuple[bool, str]:
    """The gate: above the floor (`floor` says why a model is below it), at least export.min_accuracy, and better
    than the champion by export.promote_min_delta."""
    if floor is not None:
        return False, f"rejected: {floor}"
    if challenger < config.min_accuracy:
        return False, f"rejected: test accuracy {challenger:.4f} < export.min_accuracy {config.min_accuracy:.4f}"
    if champion is None:
        return True, f"promoted: no comparable production model; test accuracy {challenger:.4f}"
    if challenger > champion and challenger - champion >= config.promote_min_delta:
        return True, f"promoted: {challenger:.4f} beats production {champion:.4f}"
    return False, (f"kept production: {challenger:.4f} does not beat {champion:.4f} "
                   f"by export.promote_min_delta {config.promote_min_delta}")


def _split_counts(data: DataResult, split: str) -> list[int]:
    """The class counts of one split of the data output, from its manifest."""
    return list(read_manifest(data.path)["splits"][split]["class_counts"])


def comparable(store: Store, champion: dict[str, Any], data: DataResult) -> bool:
    """Whether the champion takes the same images and classes as this run's data."""
    card_path = local_version(store, champion["version"]) / "model_card.json"
    try:
        spec = json.loads(card_path.read_text())["input_spec"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CacheError(f"{card_path} is unreadable ({exc}); restore the version from its export") from exc
    same = tuple(spec["shape"]) == data.input_spec.shape and tuple(spec["class_names"]) == data.input_spec.class_names
    if not same:
        log.warning("production model %s takes other images or classes; not comparable", champion["version"])
    return same


def champion_accuracy(config: PipelineConfig, store: Store, champion: dict[str, Any], data: DataResult
                      ) -> float | None:
    """The champion's test accuracy on this run's test split (None when not comparable).

    Read from the evaluate stage's output for (this data, the champion's trained model), built on first
    use; when the champion's train output is gone, its promoted .keras file is evaluated directly.
    """
    if not comparable(store, champion, data):
        return None
    if store.problem("train", champion["train_fingerprint"]) is None:
        trained = find_output_by_fingerprint("train", champion["train_fingerprint"], store.root)
        evaluation = run_stage("evaluate", config, store.root, {"data": data, "train": trained})
        return evaluation.test_accuracy
    log.warning("the train output of production %s is gone; evaluating its promoted model", champion["version"])
    metrics, *_ = test_metrics(local_version(store, champion["version"]) / "model.keras", data)
    return float(metrics["test_accuracy"])


def _decide_and_switch(config: PipelineConfig, store: Store, data: DataResult, train: TrainResult,
                      evaluation: EvaluateResult, export: ExportResult) -> Promotion:
    """Compare with the current production model and switch when better: one decision at a time (a lock
    on a directory; on an object store a conditional switch, re-deciding when another run won)."""
    with with_lock(store, "models/.promotion.lock", config.export.lock_timeout_seconds, "promotion"):
        for _ in range(SWITCH_ATTEMPTS):
            current, etag = read_production(store)
            if current is not None and current["train_fingerprint"] == train.fingerprint:
                return Promotion(promoted=False, decision=f"already production ({current['version']})",
                                 model_path=_model_location(store, current["version"]),
                                 test_accuracy=evaluation.test_accuracy, champion_version=current["version"],
                                 champion_accuracy=evaluation.test_accuracy)
            theirs = champion_accuracy(config, store, current, data) if current is not None else None
            floor = did_not_learn(config, evaluation.test_accuracy, evaluation.test_loss, _split_counts(data, "test"),
                                  "test")
            promoted, decision = decide(evaluation.test_accuracy, theirs, config.export, floor)
            outcome = Promotion(promoted=promoted, decision=decision, model_path=export.location or str(export.path),
                                test_accuracy=evaluation.test_accuracy,
                                champion_version=current["version"] if current and theirs is not None else None,
                                champion_accuracy=theirs)
            if not promoted:
                return outcome
            record = {"train_fingerprint": train.fingerprint, "test_accuracy": evaluation.test_accuracy,
                      "champion_accuracy": theirs, "previous": current and current["version"],
                      "decision": decision, "export": export.location or str(export.path),
                      "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            version = publish(store, export.path, export.fingerprint, record)
            if switch(store, {**record, "version": version, "path": f"models/{version}"}, etag):
                log.info("%s -> production is now %s", decision, version)
                served = publish_serving(store, version, export.formats)
                if served is not None:
                    log.info("published %s for TF Serving at %s", version, served)
                return outcome.model_copy(update={"model_path": _model_location(store, version)})
            log.info("another run switched production while this one decided; deciding again")
    raise LockTimeoutError(f"promotion: production changed {SWITCH_ATTEMPTS} times while this run decided; "
                           "run the promotion step again (`tapeline stage promotion`)")


def _model_location(store: Store, version: str) -> str:
    """Where a promoted version lives (a directory or a URL)."""
    if isinstance(store, RemoteStore):
        return store.url("models", version)
    assert isinstance(store, LocalStore)
    return str(store.path / "models" / version)


def comparison(promotion: Promotion) -> dict[str, Any]:
    """The champion comparison and decision, as recorded with the run."""
    return {"champion": None if promotion.champion_version is None else {
                "version": promotion.champion_version, "test_accuracy": promotion.champion_accuracy},
            "promotion": {"promoted": promotion.promoted, "decision": promotion.decision,
                          "model_path": str(promotion.model_path)}}


def _run_record_files(evaluation: EvaluateResult, export: ExportResult, promotion: Promotion) -> dict[str, bytes]:
    """metrics.json and model_card.json/.md of one run, with the champion comparison and the decision."""
    extra = comparison(promotion)
    card = {**json.loads((export.path / "model_card.json").read_text()), **extra}
    champion = extra["champion"]
    markdown = render_model_card(card) + "\n".join([
        "## Promotion", "",
        f"- Production before this run: {champion['version']} (test accuracy {champion['test_accuracy']:.4f} "
        "on this test split)" if champion else "- Production before this run: none comparable",
        f"- Decision: {promotion.decision}", "",
    ])
    return {"metrics.json": json.dumps({**evaluation.metrics(), **extra}, indent=2).encode(),
            "model_card.json": json.dumps(card, indent=2).encode(), "model_card.md": markdown.encode()}


def _write_run_record(store: Store, run_id: str, files: dict[str, bytes]) -> str:
    """runs/<run_id>/ with `files`: complete before it has its name on disk; each file one PUT on a store."""
    if isinstance(store, RemoteStore):
        for name, data in files.items():
            store.put_bytes(store.key(RUNS, run_id, name), data)
        return store.url(RUNS, run_id)
    assert isinstance(store, LocalStore)
    final = store.path / RUNS / run_id
    staging = final.with_name(f".partial-{run_id}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, data in files.items():
        (staging / name).write_bytes(data)
    staging.rename(final)
    return str(final)


def promote(config: PipelineConfig, data: DataResult, train: TrainResult, evaluation: EvaluateResult,
            export: ExportResult, artifacts: Artifacts, run_id: str) -> Promotion:
    """The promotion step: decide (and switch production) one run at a time, then record the run."""
    store = open_store(artifacts)
    promotion = _decide_and_switch(config, store, data, train, evaluation, export)
    record = _write_run_record(store, run_id, _run_record_files(evaluation, export, promotion))
    return promotion.model_copy(update={"record": record})
