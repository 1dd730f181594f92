"""Scoring on a real Dask cluster: a scheduler and two worker processes started here (with `dask`'s own commands),
shards sent to them through prefect-dask's task runner, the images and the store on the suite's SeaweedFS bucket.
Each worker loads the model once, however many shards it takes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stages.pipeline import run_all
from tapeline.config import load_config
from tapeline.testing import png_bytes, port_is_free, synthetic_images, tiny_config

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def free_port(start: int) -> int:
    return next(p for p in range(start, start + 400) if port_is_free(p) and port_is_free(p + 1))


@pytest.fixture
def dask_cluster(s3_url: str, tmp_path: Path) -> Iterator[str]:
    """A Dask scheduler and two single-threaded worker processes on loopback (each in its own process group, all
    ended afterwards); the workers see this process's environment (the bucket's settings)."""
    from distributed import Client

    port = free_port(38786)
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TAPELINE_CACHE_DIR": str(tmp_path / "worker-cache")}
    log = (tmp_path / "dask.log").open("wb")
    processes = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                   "--dashboard-address", ":0", "--no-show"], env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)]
    processes += [subprocess.Popen([str(BIN / "dask"), "worker", address, "--nthreads", "1", "--nworkers", "1",
                                    "--name", f"w{i}", "--no-dashboard"], env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True) for i in range(2)]
    try:
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        yield address
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        log.close()


def test_shards_are_scored_on_dask_workers_from_the_bucket(harness, s3_url: str, dask_cluster: str, idx_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import fsspec
    from distributed import Client

    from flows.scoring import batch_scoring

    assert run_all(tiny_config(f"idx:{idx_dir}"), s3_url)["promotion"].promoted
    images, labels = synthetic_images(48, seed=3)
    fs = fsspec.filesystem("s3")
    source = s3_url.rsplit("/", 1)[0] + "/incoming"
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        fs.pipe_file(f"{source.removeprefix('s3://')}/{label}/x{i:03d}.png", png_bytes(image))
    monkeypatch.setenv("TAPELINE_ARTIFACTS", s3_url)
    started = time.monotonic()
    result = batch_scoring(source=f"images:{source}", config=load_config(None, ["score.shard_size=8"]),
                           dask_address=dask_cluster)
    assert (result["images"], result["scored"], result["skipped"]) == (48, 48, [])
    assert result["output"].startswith(f"{s3_url}/scores/v0001/outputs/")
    fs.invalidate_cache()
    assert fs.exists(f"{result['output'].removeprefix('s3://')}/predictions.parquet")
    with Client(dask_cluster) as client:
        loaded = client.run(lambda: len(__import__("stages.score.model", fromlist=["_LOADED"])._LOADED))
        processed = client.run(lambda dask_worker: len(dask_worker.data) + dask_worker.state.executed_count)
    assert sum(loaded.values()) == 2 and set(loaded.values()) == {1}, loaded  # once per worker, 6 shards between them
    assert all(count > 0 for count in processed.values()), processed
    again = batch_scoring(source=f"images:{source}", config=load_config(), dask_address=dask_cluster)
    assert again["scored"] == 0 and time.monotonic() - started < 600
