"""The Prefect flow under prefect_test_harness: caching across runs, selective re-runs, manifest checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stages.data.readers import load_split
from stages.graph import STAGE_NAMES
from tapeline.cache import manifest_problem
from tapeline.config import PipelineConfig
from tapeline.testing import synthetic_images, tiny_config
from tests.helpers import reference_test_accuracy


def write_parquet(path: Path, images, labels) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [img.reshape(-1).tolist() for img in images], "label": labels.tolist(),
                             "height": [images.shape[1]] * len(images), "width": [images.shape[2]] * len(images)}),
                   path)


@pytest.fixture
def flow_env(harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    artifacts = tmp_path / "artifacts"
    monkeypatch.setenv("TAPELINE_ARTIFACTS", str(artifacts))
    return artifacts


def run(config: PipelineConfig, verify: bool = False) -> dict:
    from flows.training import training_pipeline

    return training_pipeline(config=config, verify=verify)


def file_times(root: Path) -> dict[Path, int]:
    """Modification times of every stage output and model version (not the per-run records and registry)."""
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and "registry" not in p.name
            and not p.name.startswith(".") and p.relative_to(root).parts[0] != "runs"}


def states(summary: dict) -> dict[str, str]:
    return {name: row["state"] for name, row in summary["stages"].items()}


def test_caching_across_runs(flow_env: Path, idx_dir: Path) -> None:
    config = tiny_config(f"idx:{idx_dir}", "train.max_epochs=2")
    first = run(config)
    assert states(first) == dict.fromkeys(STAGE_NAMES, "Completed")
    assert not any(row["cached"] for row in first["stages"].values())
    assert first["promoted"]
    assert first["test_accuracy"] == reference_test_accuracy(Path(first["stages"]["data"]["path"]),
                                                             Path(first["stages"]["train"]["path"]))
    before = file_times(flow_env)

    second = run(config)
    assert states(second) == dict.fromkeys(STAGE_NAMES, "Cached")
    assert second["all_cached"] and second["message"].startswith("nothing changed")
    assert second["decision"] == "already production (v0001)" and not second["promoted"]
    assert {n: r["fingerprint"] for n, r in second["stages"].items()} == \
        {n: r["fingerprint"] for n, r in first["stages"].items()}
    assert file_times(flow_env) == before  # nothing rewritten (the registry gains a row, runs/ a record)
    assert len(list((flow_env / "runs").iterdir())) == 2

    shard = Path(first["stages"]["data"]["path"]) / "train-00000-of-00002.tfrecord"
    shard.unlink()
    rebuilt = run(config)
    assert states(rebuilt) == {"data": "Completed", "validate": "Cached", "model": "Cached", "train": "Cached",
                               "evaluate": "Cached", "export": "Cached"}
    assert rebuilt["stages"]["data"]["fingerprint"] == first["stages"]["data"]["fingerprint"]
    assert shard.exists()

    longer = run(tiny_config(f"idx:{idx_dir}", "train.max_epochs=3"))
    assert states(longer) == {"data": "Cached", "validate": "Cached", "model": "Cached", "train": "Completed",
                              "evaluate": "Completed", "export": "Completed"}

    from tapeline.registry import read_runs

    assert len(read_runs(flow_env)) == 4


def test_deleted_downstream_output_reruns_only_that_stage(flow_env: Path, idx_dir: Path) -> None:
    import shutil

    config = tiny_config(f"idx:{idx_dir}", "train.max_epochs=1")
    first = run(config)
    shutil.rmtree(first["stages"]["evaluate"]["path"])
    again = run(config)
    assert states(again) == {"data": "Cached", "validate": "Cached", "model": "Cached", "train": "Cached",
                             "evaluate": "Completed", "export": "Cached"}


def test_run_verify_checksums_every_reused_output(flow_env: Path, idx_dir: Path) -> None:
    config = tiny_config(f"idx:{idx_dir}", "train.max_epochs=1", "seed=3")
    first = run(config)
    shard = Path(first["stages"]["data"]["path"]) / "train-00000-of-00002.tfrecord"
    damaged = bytearray(shard.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    shard.write_bytes(bytes(damaged))
    assert states(run(config)) == dict.fromkeys(STAGE_NAMES, "Cached")  # sizes match: only a checksum tells
    verified = run(config, verify=True)
    assert states(verified) == {"data": "Completed", "validate": "Cached", "model": "Cached", "train": "Cached",
                                "evaluate": "Cached", "export": "Cached"}
    assert shard.read_bytes() != bytes(damaged)
    assert manifest_problem(Path(first["stages"]["data"]["path"]), verify=True) is None
    assert len(list((flow_env / "data").glob(".invalid-*"))) == 1  # the damaged copy is kept aside


def test_failed_stage_fails_the_flow_with_its_message(flow_env: Path, tmp_path: Path) -> None:
    from tapeline.errors import DataSourceError

    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (bad / name).write_bytes(b"junk")
    with pytest.raises(DataSourceError, match="bad IDX magic number"):
        run(tiny_config(f"idx:{bad}"))


def test_downloads_are_retried_bad_input_is_not(flow_env: Path, idx_dir: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.training
    from stages.graph import run_stage
    from tapeline.errors import DataSourceError, DownloadError

    calls: list[str] = []

    def flaky(name: str, *args, **kwargs):
        if name == "data":
            calls.append("call")
            if len(calls) == 1:
                raise DownloadError("connection reset")
        return run_stage(name, *args, **kwargs)

    monkeypatch.setattr(flows.training, "run_stage", flaky)
    summary = run(tiny_config(f"idx:{idx_dir}", "train.max_epochs=1", "data.retries=1", "seed=7"))
    assert len(calls) == 2 and summary["stages"]["data"]["state"] == "Completed"

    def bad_input(name: str, *args, **kwargs):
        calls.append("bad")
        raise DataSourceError("bad IDX magic number")

    monkeypatch.setattr(flows.training, "run_stage", bad_input)
    with pytest.raises(DataSourceError):
        run(tiny_config(f"idx:{idx_dir}", "data.retries=2", "seed=8"))
    assert calls.count("bad") == 1


def api_events(name: str, wanted, deadline_seconds: float = 60) -> list[dict]:
    """Events named `name` that satisfy `wanted`, read back from the (real) Prefect server of the harness
    (events arrive asynchronously; other tests' events are on the same server)."""
    import time

    import httpx
    from prefect.settings import PREFECT_API_URL

    deadline = time.monotonic() + deadline_seconds
    while True:
        response = httpx.post(f"{PREFECT_API_URL.value()}/events/filter",
                              json={"filter": {"event": {"name": [name]}}, "limit": 50})
        found = [event for event in response.json()["events"] if wanted(event)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(1)


def test_nightly_drop_clean_trains_conflict_stops_at_validate(flow_env: Path, idx_dir: Path, tmp_path: Path) -> None:
    from stages.graph import output_location
    from stages.pipeline import run_data
    from tapeline.errors import ValidationError

    incoming = tmp_path / "incoming"
    incoming.mkdir()
    images, labels = synthetic_images(60, seed=21)
    write_parquet(incoming / "clean.parquet", images, labels)
    config = tiny_config(f"idx:{idx_dir}", "train.max_epochs=1", f"data.extra={incoming}", "seed=5")
    clean = run(config)
    assert clean["stages"]["validate"]["state"] == "Completed" and clean["promoted"]
    assert states(clean) == dict.fromkeys(STAGE_NAMES, "Completed")
    flow_run = {"prefect.resource.id": f"prefect.flow-run.{clean['run_id']}", "prefect.resource.role": "flow-run"}
    (promoted,) = api_events("tapeline.model.promoted", lambda e: flow_run in e["related"])
    assert promoted["payload"]["test_accuracy"] == clean["test_accuracy"]
    assert promoted["payload"]["decision"] == clean["decision"]

    source_train, source_labels = load_split(run_data(config, flow_env).path, "train")
    write_parquet(incoming / "relabelled.parquet", source_train[:4, ..., 0], (source_labels[:4] + 1) % 10)
    with pytest.raises(ValidationError, match=r"label_conflict \(4\)"):
        run(config)
    assert not Path(output_location("model", config, flow_env)).exists()  # nothing downstream ran
    (failed,) = api_events("tapeline.validation.failed", lambda e: e["payload"]["errors"] == {"label_conflict": 4})
    assert failed["related"][0]["prefect.resource.id"].startswith("prefect.flow-run.")
    assert failed["payload"]["report"].endswith("report.md")


def test_transient_store_errors_are_retried_bad_settings_are_not() -> None:
    from flows.training import is_transient
    from tapeline.errors import StoreConnectionError, StoreError

    class Failed:
        def __init__(self, error: Exception) -> None:
            self.error = error

        def result(self) -> None:
            raise self.error

    assert is_transient(None, None, Failed(StoreConnectionError("s3://b/p: timed out")))
    assert not is_transient(None, None, Failed(StoreError("s3://b/p: bucket 'b' does not exist")))


def test_flow_parameter_accepts_partial_json(harness) -> None:
    from flows.training import training_pipeline

    params = training_pipeline.validate_parameters({"config": {"train": {"max_epochs": 1}}})
    assert params["config"].train.max_epochs == 1 and params["config"].data.batch_size == 256
    # A preset given as a flow parameter expands like --preset, under the keys given next to it.
    tutorial = training_pipeline.validate_parameters({"config": {"preset": "tutorial", "data": {"batch_size": 64}}})
    assert (tutorial["config"].train.lr_schedule, tutorial["config"].data.batch_size) == ("constant", 64)
    schema = training_pipeline.parameters.model_dump()
    assert "config" in schema["properties"]
    assert os.environ.get("PREFECT_LOGGING_EXTRA_LOGGERS") == "tapeline"
