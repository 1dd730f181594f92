"""End to end with real parts: a Prefect server, a process work pool, `prefect deploy`, a deployment run, a
worker, and the artifacts on a real S3-compatible server (`TAPELINE_ARTIFACTS=s3://…`)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import httpx
import pyarrow.parquet as pq
import pytest

from tapeline.registry import local_version, read_production, runs_of
from tapeline.store import open_store

ROOT = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))
pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prefect(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    done = subprocess.run([PREFECT, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture
def server(tmp_path: Path, s3_url: str, s3_server):
    """A real `prefect server start` on a free port with a temporary PREFECT_HOME; stopped by PID. The
    worker's flow runs keep their artifacts in a fresh bucket."""
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PWD": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3",
           "TAPELINE_ARTIFACTS": s3_url, "TAPELINE_CACHE_DIR": str(tmp_path / "worker-cache"), **s3_server.env()}
    env.pop("PREFECT_API_KEY", None)
    log = (tmp_path / "server.log").open("w")
    process = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                               cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{env['PREFECT_API_URL']}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        stop(process)
        pytest.fail(f"prefect server did not start:\n{(tmp_path / 'server.log').read_text()[-3000:]}")
    yield env
    stop(process)


DROP_ROWS = 20


def drop_file(seed: int) -> bytes:
    """A Parquet file of DROP_ROWS labelled PNG images, as a team's nightly export would write it."""
    import numpy as np
    import pyarrow as pa

    from tapeline.testing import png_bytes, synthetic_images

    images, labels = synthetic_images(DROP_ROWS, seed=seed)
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.table({"image": [png_bytes(i) for i in images], "label": labels.astype(np.int64)}), buffer)
    return buffer.getvalue().to_pybytes()


def run_deployment(env: dict[str, str], params: dict, deployment: str = "training-pipeline/manual") -> str:
    """Create a run of the deployment, let a worker execute it; its flow run id (COMPLETED)."""
    out = prefect(env, "deployment", "run", deployment, "--params", json.dumps(params))
    flow_run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1)
    worker = subprocess.run([PREFECT, "worker", "start", "--pool", "local", "--run-once"], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
    run = httpx.get(f"{env['PREFECT_API_URL']}/flow_runs/{flow_run_id}").json()
    assert run["state"]["type"] == "COMPLETED", (run["state"], worker.stdout[-3000:])
    return flow_run_id


def wait_for_final_state(api: str, flow_run_id: str, timeout: float) -> str:
    """Poll a flow run until its state is final; its state type."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = httpx.get(f"{api}/flow_runs/{flow_run_id}").json()["state"]
        if state and state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return state["type"]
        time.sleep(2)
    return "TIMED OUT"


def test_deployment_run_with_worker(server: dict[str, str], idx_dir: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    env = server
    api = env["PREFECT_API_URL"]
    prefect(env, "work-pool", "create", "local", "--type", "process")
    prefect(env, "--no-prompt", "deploy", "--all")
    artifacts = env["TAPELINE_ARTIFACTS"]
    fs = fsspec.filesystem("s3")
    drop = f"{artifacts.rsplit('/', 1)[0]}/incoming"  # the nightly drop: a bucket prefix beside the artifacts
    fs.pipe_file(f"{drop.removeprefix('s3://')}/day1.parquet", drop_file(seed=11))
    params = {"config": {"data": {"source": f"idx:{idx_dir}", "shards": 2, "extra": drop},
                         "model": {"conv_filters": [8, 16], "dense_units": 16},
                         "train": {"max_epochs": 2}}}
    flow_run_id = run_deployment(env, params)
    registry = runs_of(artifacts)
    assert [r["run_id"] for r in registry] == [flow_run_id]
    assert registry[0]["promoted"] is True
    bucket_prefix = artifacts.removeprefix("s3://")
    record = json.loads(fs.cat_file(f"{bucket_prefix}/runs/{flow_run_id}/metrics.json"))
    assert record["promotion"]["promoted"] is True and record["test_accuracy"] == registry[0]["test_accuracy"]
    production, _ = read_production(open_store(artifacts))
    assert (local_version(open_store(artifacts), production["version"]) / "saved_model" / "saved_model.pb").exists()
    assert not (ROOT / "artifacts" / "registry.parquet").exists() or \
        flow_run_id not in str(pq.read_table(ROOT / "artifacts" / "registry.parquet").to_pylist())
    keys = {a["key"] for a in httpx.post(f"{api}/artifacts/filter", json={}).json()}
    assert {"training-summary", "per-class-metrics", "evaluation-pictures", "training-progress"} <= keys
    nightly = httpx.get(f"{api}/deployments/name/training-pipeline/nightly").json()
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 2 * * *"]
    assert nightly["schedules"][0]["schedule"]["timezone"] == "UTC"
    assert nightly["parameters"]["config"]["data"]["extra"] == "incoming"

    # A new file dropped into the bucket prefix: the next run sees new data and trains on it.
    store = open_store(artifacts)
    first_data = registry[0]["data_fingerprint"]
    fs.pipe_file(f"{drop.removeprefix('s3://')}/day2.parquet", drop_file(seed=12))
    second_run = run_deployment(env, params)
    second = next(r for r in runs_of(artifacts) if r["run_id"] == second_run)
    assert second["data_fingerprint"] != first_data
    records = {fp: sum(s["records"] for s in store.manifest("data", fp)["splits"].values())
               for fp in (first_data, second["data_fingerprint"])}
    assert records[second["data_fingerprint"]] == records[first_data] + DROP_ROWS

    # The sweep deployment on the same worker and bucket: its trials, its winner through the gate.
    space = {"train.learning_rate": {"float": [0.001, 0.02], "log": True}}
    sweep_params = {"config": {**params["config"], "data": {"source": f"idx:{idx_dir}", "shards": 2},
                               "sweep": {"trials": 2, "space": space}}}
    sweep_run = run_deployment(env, sweep_params, "sweep/cnn")
    row = next(r for r in runs_of(artifacts) if r["run_id"] == sweep_run)
    assert row["sweep"] and row["trial"] in (0, 1)
    trials = fs.ls(f"{bucket_prefix}/sweeps/{row['sweep']}/trials")
    assert len(trials) == 2
    result = httpx.get(f"{api}/flow_runs/{sweep_run}").json()
    assert result["state"]["type"] == "COMPLETED"
    keys = {a["key"] for a in httpx.post(f"{api}/artifacts/filter", json={}).json()}
    assert {"sweep-trials", "sweep-pictures"} <= keys
    assert fs.exists(f"{bucket_prefix}/sweeps/{row['sweep']}/best.yaml")

    # The same with sweep.deployment: each trial a flow run of training-pipeline/manual, taken by the pool's worker.
    pool_config = {**sweep_params["config"], "sweep": {"trials": 2, "space": space, "seed": 1,
                                                       "deployment": "training-pipeline/manual"}}
    out = prefect(env, "deployment", "run", "sweep/cnn", "--params", json.dumps({"config": pool_config}))
    pool_run = re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1)
    worker_log = (Path(env["PREFECT_HOME"]) / "worker.log").open("w")
    worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "local"], cwd=ROOT, stdout=worker_log,
                              stderr=subprocess.STDOUT, start_new_session=True,
                              env={**env, "PREFECT_WORKER_QUERY_SECONDS": "2"})
    try:
        state = wait_for_final_state(api, pool_run, timeout=480)
    finally:
        stop(worker)
    assert state == "COMPLETED", (Path(env["PREFECT_HOME"]) / "worker.log").read_text()[-3000:]
    pool_row = next(r for r in runs_of(artifacts) if r["run_id"] == pool_run)
    named = {"flow_runs": {"name": {"like_": pool_row["sweep"]}}}
    trial_runs = httpx.post(f"{api}/flow_runs/filter", json=named).json()
    assert sorted(r["name"] for r in trial_runs) == [f"{pool_row['sweep']}-trial-{n}" for n in (0, 1)]
    assert {r["state"]["type"] for r in trial_runs} == {"COMPLETED"}
    assert all(r["parameters"]["trial"]["sweep"] == pool_row["sweep"] for r in trial_runs)
    assert len(fs.ls(f"{bucket_prefix}/sweeps/{pool_row['sweep']}/trials")) == 2

    # Batch scoring on the worker: an inverted batch on the bucket drifts, the event fires, and the on-drift
    # deployment's trigger creates a training-pipeline run.
    import numpy as np

    from tapeline.testing import png_bytes, synthetic_images

    inverted = f"{artifacts.rsplit('/', 1)[0]}/to-score"
    images, _ = synthetic_images(30, seed=21)
    for i, image in enumerate(images):
        fs.pipe_file(f"{inverted.removeprefix('s3://')}/x{i:03d}.png", png_bytes((255 - image).astype(np.uint8)))
    scoring_run = run_deployment(env, {"source": f"images:{inverted}",
                                       "config": {"score": {"min_drift_images": 20}}}, "batch-scoring/manual")
    scored = httpx.get(f"{api}/flow_runs/{scoring_run}").json()
    assert scored["state"]["type"] == "COMPLETED"
    deadline = time.monotonic() + 60
    drift_events: list = []
    while not drift_events and time.monotonic() < deadline:  # the server stores events a moment after they come
        found = httpx.post(f"{api}/events/filter", json={"filter": {"event": {"prefix": ["tapeline."]}}}).json()
        drift_events = [e for e in found["events"] if e["event"] == "tapeline.drift.detected"]
        time.sleep(1)
    assert len(drift_events) == 1, [e["event"] for e in found["events"]]
    assert drift_events[0]["payload"]["detected"] is True
    assert drift_events[0]["payload"]["images"] == 30 and drift_events[0]["payload"]["pixel_divergence"] > 0.05
    on_drift = httpx.get(f"{api}/deployments/name/training-pipeline/on-drift").json()
    deadline = time.monotonic() + 90
    triggered: list = []
    while not triggered and time.monotonic() < deadline:
        query = {"deployments": {"id": {"any_": [on_drift["id"]]}}}
        triggered = httpx.post(f"{api}/flow_runs/filter", json=query).json()
        time.sleep(1)
    assert len(triggered) == 1, "the drift event did not trigger a training-pipeline run"
    httpx.delete(f"{api}/flow_runs/{triggered[0]['id']}")  # a full retraining is not this test's business
    keys = {a["key"] for a in httpx.post(f"{api}/artifacts/filter", json={}).json()}
    assert "drift-report" in keys
    print(f"e2e wall time {time.monotonic() - started:.1f} s")
