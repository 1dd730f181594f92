"""MLflow tracking against a real `mlflow server` (SQLite backend store, local artifact root) started here: a run's
parameters, epochs, tags and artifacts; a cached rerun that logs no epochs and names the run that trained; the
registered model's `champion` alias; a sweep as a parent run with a child per trial; a server that is down or
refuses costs one warning line and the run goes on."""

from __future__ import annotations

import http.server
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sweeps.state import TrialRecord
from sweeps.tracking import track_sweep
from tapeline.config import TrackingConfig, load_config
from tapeline.testing import tiny_overrides
from tapeline.tracking import open_tracker

pytestmark = pytest.mark.slow  # a real MLflow server (about 30 s to start on two busy cores)


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from tapeline.testing import start_mlflow_server

    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
    yield server.uri
    server.stop()


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def runs_of(uri: str, experiment: str) -> list:
    found = client(uri).get_experiment_by_name(experiment)
    return [] if found is None else client(uri).search_runs([found.experiment_id],
                                                            order_by=["attributes.start_time ASC"])


def artifact_paths(uri: str, run_id: str, folder: str) -> list[str]:
    return sorted(Path(f.path).name for f in client(uri).list_artifacts(run_id, folder))


def run_flow(idx_dir: Path, artifacts: Path, monkeypatch: pytest.MonkeyPatch, *sets: str) -> dict:
    from flows.training import training_pipeline

    monkeypatch.setenv("TAPELINE_ARTIFACTS", str(artifacts))
    return training_pipeline(config=load_config(None, tiny_overrides(f"idx:{idx_dir}", *sets)))


def test_a_run_is_an_mlflow_run_and_a_cached_rerun_points_at_the_one_that_trained(
        harness, mlflow_uri: str, idx_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sets = (f"tracking.mlflow_uri={mlflow_uri}", "tracking.experiment=runs", "tracking.registered_model=fashion")
    first = run_flow(idx_dir, tmp_path / "artifacts", monkeypatch, *sets)
    assert first["promoted"] and not first["all_cached"]
    [trained] = runs_of(mlflow_uri, "runs")
    assert first["mlflow_run"] == trained.info.run_id
    params, tags = trained.data.params, trained.data.tags
    assert params["train.learning_rate"] == str(load_config(None, tiny_overrides("idx:x")).train.learning_rate)
    assert params["model.dense_units"] == "16" and "data.source" in params
    assert tags["tapeline.train.cached"] == "false" and tags["tapeline.trained_here"] == "true"
    assert tags["prefect.flow_run_id"] and tags["tapeline.run_id"] == first["run_id"]
    assert tags["tapeline.train"] == first["stages"]["train"]["fingerprint"]
    epochs = client(mlflow_uri).get_metric_history(trained.info.run_id, "val_accuracy")
    assert [m.step for m in epochs] == list(range(1, len(epochs) + 1)) and len(epochs) >= 1
    assert trained.data.metrics["test_accuracy"] == pytest.approx(first["test_accuracy"])
    assert artifact_paths(mlflow_uri, trained.info.run_id, "model_card") == ["model_card.json", "model_card.md"]
    assert "confusion_matrix.png" in artifact_paths(mlflow_uri, trained.info.run_id, "evaluation")
    assert "report.md" in artifact_paths(mlflow_uri, trained.info.run_id, "validation")
    champion = client(mlflow_uri).get_model_version_by_alias("fashion", "champion")
    assert (champion.version, champion.run_id) == ("1", trained.info.run_id)
    assert "saved_model" in artifact_paths(mlflow_uri, trained.info.run_id, "model")

    again = run_flow(idx_dir, tmp_path / "artifacts", monkeypatch, *sets)
    assert again["all_cached"]
    cached = runs_of(mlflow_uri, "runs")[-1]
    assert cached.info.run_id == again["mlflow_run"] != trained.info.run_id
    assert client(mlflow_uri).get_metric_history(cached.info.run_id, "val_accuracy") == []
    assert cached.data.tags["tapeline.trained_by"] == trained.info.run_id
    assert cached.data.tags["tapeline.train.cached"] == "true"
    assert [v.version for v in client(mlflow_uri).search_model_versions("name = 'fashion'")] == ["1"]


def records() -> list[TrialRecord]:
    return [TrialRecord(number=0, params={"train.learning_rate": 0.01}, config={}, state="complete", value=0.8,
                        intermediate={1: 0.7, 2: 0.8}, train_fingerprint="abc"),
            TrialRecord(number=1, params={"train.learning_rate": 1000.0}, config={}, state="failed", value=0.1,
                        intermediate={1: 0.1}, reason="did not learn: validation accuracy 0.1000"),
            TrialRecord(number=2, params={"train.learning_rate": 0.1}, config={}, state="running")]


def test_a_sweep_is_a_parent_run_with_a_child_per_finished_trial(mlflow_uri: str) -> None:
    config = load_config(None, [f"tracking.mlflow_uri={mlflow_uri}", "tracking.experiment=sweeps"])
    trials = records()
    parent = track_sweep(config, "cnn", trials, trials[0])
    assert track_sweep(config, "cnn", trials, trials[0]) == parent  # again: no second parent, no child twice
    runs = {run.info.run_id: run for run in runs_of(mlflow_uri, "sweeps")}
    children = sorted((r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") == parent),
                      key=lambda r: r.data.tags["tapeline.trial"])
    assert len(runs) == 3 and runs[parent].data.tags["tapeline.best_trial"] == "0"
    assert runs[parent].data.metrics["best_value"] == 0.8
    assert [(c.data.tags["tapeline.trial"], c.info.status) for c in children] == [("0", "FINISHED"), ("1", "FAILED")]
    assert children[0].data.params == {"train.learning_rate": "0.01"}
    history = client(mlflow_uri).get_metric_history(children[0].info.run_id, "val_accuracy")
    assert [(m.step, m.value) for m in history] == [(1, 0.7), (2, 0.8)]
    assert children[1].data.tags["tapeline.trial_reason"] == "did not learn: validation accuracy 0.1000"


class Refusing(http.server.BaseHTTPRequestHandler):
    """A 'tracking server' whose /health answers and which refuses everything else."""

    def do_GET(self) -> None:  # noqa: N802 - the handler's protocol
        self.send_response(200 if self.path == "/health" else 403)
        self.end_headers()
        self.wfile.write(b"OK" if self.path == "/health" else b'{"error_code": "PERMISSION_DENIED"}')

    do_POST = do_GET

    def log_message(self, *_args: object) -> None:
        return


def test_a_server_that_is_down_or_refuses_costs_one_warning(harness, idx_dir: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    refusing = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=refusing.serve_forever, daemon=True).start()
    down = "http://127.0.0.1:9"  # the discard port: nothing answers
    try:
        with caplog.at_level(logging.WARNING, logger="tapeline.tracking"):
            assert open_tracker(TrackingConfig(mlflow_uri=down)) is None
            assert open_tracker(TrackingConfig(mlflow_uri=f"http://127.0.0.1:{refusing.server_port}")) is None
        warnings = [r.getMessage() for r in caplog.records if r.name == "tapeline.tracking"]
        assert len(warnings) == 2
        assert warnings[0].startswith(f"MLflow tracking at {down} does not answer (")
        assert "stopped (get experiment: " in warnings[1] and warnings[1].endswith("the run goes on untracked")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tapeline.tracking"):
            summary = run_flow(idx_dir, tmp_path / "artifacts", monkeypatch, f"tracking.mlflow_uri={down}")
        assert summary["promoted"] and summary.get("mlflow_run") is None
        assert [r.name for r in caplog.records if r.name == "tapeline.tracking"] == ["tapeline.tracking"]
    finally:
        refusing.shutdown()
