"""Experiment tracking in MLflow, optional (`pip install 'tapeline[mlflow]'`, the `mlflow-skinny` client): the
connection and the few calls tapeline makes, each guarded. Tracking is bookkeeping beside the registry, never in
its way: no URI, no tracking; a client that is not installed, a server that is down or refuses, cost one warning
line and the run goes on untracked. What a training run or a sweep logs is `stages.tracking` and `sweeps.tracking`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tapeline.config import TrackingConfig

log = logging.getLogger("tapeline.tracking")
T = TypeVar("T")
CHAMPION = "champion"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter's value
BATCH = 500  # metrics or tags per log_batch call (MLflow takes at most 1000)
MAX_PARAMS = 100  # parameters per log_batch call (MLflow's limit)
# The client retries a refused request for minutes by default (a tracking server must never hold training up),
# and prints a "View run" line on stdout, where `--json` promises one object on the last line.
CLIENT_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
                   "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


def chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    """`items` in consecutive pieces of at most `size`."""
    return [items[start:start + size] for start in range(0, len(items), size)]


def tracking_uri(config: TrackingConfig, environ: Mapping[str, str] = os.environ) -> str | None:
    """`tracking.mlflow_uri`, else MLFLOW_TRACKING_URI, else None (no tracking)."""
    return config.mlflow_uri or environ.get("MLFLOW_TRACKING_URI") or None


def _server_problem(uri: str, timeout: float = 5.0) -> str | None:
    """Why an http(s) tracking server cannot be used now (its /health does not answer 200), or None."""
    if not uri.startswith(("http://", "https://")):
        return None
    import httpx

    try:
        response = httpx.get(f"{uri.rstrip('/')}/health", timeout=timeout)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if response.status_code == 200 else f"/health answered HTTP {response.status_code}"


class Tracker:
    """An MLflow client bound to one experiment. After its first failure every later call is skipped: one warning
    line per run, however many calls the server refuses."""

    def __init__(self, client: Any, uri: str, experiment_id: str) -> None:
        self.client, self.uri, self.experiment_id = client, uri, experiment_id
        self.failed: str | None = None

    def call(self, what: str, fn: Callable[[], T]) -> T | None:
        """`fn()`, or None (with the one warning) when the server refuses or is gone."""
        if self.failed is not None:
            return None
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - any failure of the tracking server is a warning, never the run's
            self.failed = f"{what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log.warning("MLflow tracking at %s stopped (%s); the run goes on untracked", self.uri, self.failed)
            return None

    def find_runs(self, tags: Mapping[str, str], limit: int = 1000) -> list[tuple[str, dict[str, str]]]:
        """(run id, tags) of the experiment's runs with all these tags, newest first."""
        query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
        runs = self.call("search runs", lambda: self.client.search_runs(
            [self.experiment_id], filter_string=query, max_results=limit, order_by=["attributes.start_time DESC"]))
        return [(run.info.run_id, dict(run.data.tags)) for run in runs or ()]

    def find_run(self, tags: Mapping[str, str]) -> str | None:
        """The newest run of the experiment with all these tags, or None."""
        runs = self.find_runs(tags, limit=1)
        return runs[0][0] if runs else None

    def start_run(self, name: str, tags: Mapping[str, str]) -> str | None:
        """A new run, its id (a `mlflow.parentRunId` tag makes it a child)."""
        run = self.call("create run", lambda: self.client.create_run(self.experiment_id, run_name=name,
                                                                      tags=dict(tags)))
        return None if run is None else run.info.run_id

    def log(self, run_id: str, params: Mapping[str, Any] | None = None,
            metrics: Iterable[tuple[str, float, int]] = (), tags: Mapping[str, str] | None = None) -> None:
        """Parameters, metrics (key, value, step) and tags, in batches of the sizes MLflow takes."""
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        batches = [{"params": [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in chunk]}
                   for chunk in chunks(list((params or {}).items()), MAX_PARAMS)]
        batches += [{"metrics": [Metric(k, float(v), now, int(step)) for k, v, step in chunk]}
                    for chunk in chunks(list(metrics), BATCH)]
        batches += [{"tags": [RunTag(k, str(v)) for k, v in chunk]} for chunk in chunks(list((tags or {}).items()),
                                                                                      BATCH)]
        for batch in batches:
            self.call("log", lambda b=batch: self.client.log_batch(run_id, **b))

    def log_files(self, run_id: str, files: Sequence[Path], folder: str) -> None:
        """Files (and directories, whole) as the run's artifacts under `folder`."""
        for path in files:
            if path.is_dir():
                self.call("log artifacts", lambda p=path: self.client.log_artifacts(run_id, str(p),
                                                                                    f"{folder}/{p.name}"))
            elif path.is_file():
                self.call("log artifact", lambda p=path: self.client.log_artifact(run_id, str(p), folder))

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        """End the run."""
        self.call("end run", lambda: self.client.set_terminated(run_id, status))

    def model_version(self, name: str, tags: Mapping[str, str]) -> str | None:
        """The version of registered model `name` carrying all these tags, or None."""
        versions = self.call("search model versions", lambda: self.client.search_model_versions(f"name = '{name}'"))
        for version in versions or ():
            if all(version.tags.get(k) == v for k, v in tags.items()):
                return str(version.version)
        return None

    def register(self, name: str, run_id: str, folder: str, tags: Mapping[str, str]) -> str | None:
        """A new version of registered model `name` from the run's artifacts under `folder`; its number."""
        from mlflow.exceptions import MlflowException

        def ensure_model() -> None:
            try:
                self.client.create_registered_model(name)
            except MlflowException as exc:
                if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                    raise

        self.call("create registered model", ensure_model)
        source = self.call("artifact uri", lambda: self.client.get_run(run_id).info.artifact_uri)
        if source is None:
            return None
        version = self.call("create model version", lambda: self.client.create_model_version(
            name, f"{source}/{folder}", run_id=run_id, tags=dict(tags)))
        return None if version is None else str(version.version)

    def move_alias(self, name: str, alias: str, version: str) -> None:
        """Point `alias` of registered model `name` at `version`."""
        self.call("set alias", lambda: self.client.set_registered_model_alias(name, alias, version))


def open_tracker(config: TrackingConfig, environ: Mapping[str, str] = os.environ) -> Tracker | None:
    """The tracker for this config, or None: no URI (tracking off), or a warning line when the client is not
    installed or the server does not answer."""
    uri = tracking_uri(config, environ)
    if uri is None:
        return None
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        log.warning("MLflow tracking is configured (%s) but MLflow is not installed: pip install 'tapeline[mlflow]'; "
                    "the run goes on untracked", uri)
        return None
    if (problem := _server_problem(uri)) is not None:
        log.warning("MLflow tracking at %s does not answer (%s); the run goes on untracked", uri, problem)
        return None
    for key, value in CLIENT_SETTINGS.items():
        os.environ.setdefault(key, value)
    tracker = Tracker(MlflowClient(tracking_uri=uri), uri, "")
    experiment = tracker.call("get experiment", lambda: tracker.client.get_experiment_by_name(config.experiment))
    if tracker.failed is not None:
        return None
    experiment_id = experiment.experiment_id if experiment is not None else tracker.call(
        "create experiment", lambda: tracker.client.create_experiment(config.experiment))
    if experiment_id is None:
        return None
    tracker.experiment_id = str(experiment_id)
    return tracker
