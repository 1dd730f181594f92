"""Artifacts on S3-compatible object storage, against a real server (SeaweedFS): two machines sharing a
bucket, kills during uploads, damaged objects, concurrent promotions, resumed training, bad settings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest

from stages.data.readers import load_split
from stages.graph import STAGE_NAMES
from stages.pipeline import run_all, run_data, run_model, run_train
from tapeline.config import load_config
from tapeline.registry import read_production, runs_of
from tapeline.store import PARTIAL, open_store
from tapeline.testing import tiny_overrides
from tests.helpers import Interrupted, interrupt_after

ROOT = Path(__file__).resolve().parents[1]
TAPELINE = str(Path(sys.executable).with_name("tapeline"))


def objects(url: str) -> dict[str, int]:
    """{key under the URL: size} of every object."""
    fs = fsspec.filesystem("s3")
    base = url.removeprefix("s3://")
    return {k.removeprefix(base + "/"): int(v["size"]) for k, v in fs.find(base, detail=True, withdirs=False).items()}


def machine_env(s3_server, home: Path, api: str | None = None) -> dict[str, str]:
    """The environment of another machine: its own Prefect home and read cache, the bucket's settings, the team's
    Prefect API when given (else a run starts a temporary one)."""
    env = {**os.environ, **s3_server.env(), "PREFECT_HOME": str(home / "prefect"), "TF_CPP_MIN_LOG_LEVEL": "3",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TAPELINE_CACHE_DIR": str(home / "cache")}
    env.pop("PREFECT_API_URL", None)
    env.pop("TAPELINE_ARTIFACTS", None)
    return env if api is None else {**env, "PREFECT_API_URL": api}


def tapeline(env: dict[str, str], cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([TAPELINE, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@pytest.mark.slow
def test_two_machines_share_one_bucket(s3_server, s3_url: str, prefect_api: str, tmp_path: Path,
                                       idx_dir: Path) -> None:
    overrides = sets(tiny_overrides(f"idx:{idx_dir}", "train.max_epochs=2"))
    first_home, second_home = tmp_path / "machine-a", tmp_path / "machine-b"
    first_home.mkdir()
    second_home.mkdir()
    first = tapeline(machine_env(s3_server, first_home, prefect_api), first_home, "run", "--artifacts", s3_url,
                     *overrides, "--json")
    assert first.returncode == 0, first.stderr[-3000:]
    built = json.loads(first.stdout.strip().splitlines()[-1])
    assert not any(row["cached"] for row in built["stages"].values()) and built["promoted"] is True
    assert built["model_path"] == f"{s3_url}/models/v0001"

    second = tapeline(machine_env(s3_server, second_home, prefect_api), second_home, "run", "--artifacts", s3_url,
                      *overrides, "--json")
    assert second.returncode == 0, second.stderr[-3000:]
    reused = json.loads(second.stdout.strip().splitlines()[-1])
    assert reused["all_cached"] and reused["decision"] == "already production (v0001)"
    assert {n: r["fingerprint"] for n, r in reused["stages"].items()} == \
        {n: r["fingerprint"] for n, r in built["stages"].items()}

    images, labels = load_split(second_home / "cache" / "data" / built["stages"]["data"]["fingerprint"], "test")
    np.save(second_home / "one.npy", images[0])
    predicted = tapeline(machine_env(s3_server, second_home), second_home, "predict", "--artifacts", s3_url,
                         str(second_home / "one.npy"))
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    assert predicted.stdout.split("\t")[0] == str(second_home / "one.npy")
    runs = tapeline(machine_env(s3_server, second_home), second_home, "runs", "--artifacts", s3_url, "--json")
    assert [r["run_id"] for r in json.loads(runs.stdout)] == [reused["run_id"], built["run_id"]]
    assert not (first_home / "artifacts").exists() and not (second_home / "artifacts").exists()
    keys = objects(s3_url)
    assert {"models/production.json", "models/v0001/manifest.json"} <= set(keys)
    assert all(not k.startswith(f"train/{built['stages']['train']['fingerprint']}/{PARTIAL}") for k in keys)


CHILD = textwrap.dedent("""
    import sys, time
    import tapeline.store
    from tapeline.config import load_config
    from stages.pipeline import run_all
    url, where = sys.argv[1], sys.argv[2]
    original = tapeline.store.RemoteStore.upload_dir

    def stalled(self, local, key, uploaded=None):
        if f"/{where}/" in key and "/attempt-" in key:
            first = sorted(p for p in local.rglob("*") if p.is_file())[0]
            self.fs.put_file(str(first), f"{key}/{first.relative_to(local).as_posix()}")
            time.sleep(120)
        return original(self, local, key, uploaded)

    tapeline.store.RemoteStore.upload_dir = stalled
    run_all(load_config(None, sys.argv[3:]), url)
""")


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["data", "export"])
def test_kill_during_upload_commits_nothing(s3_server, s3_url: str, tmp_path: Path, idx_dir: Path,
                                            stage: str) -> None:
    overrides = tiny_overrides(f"idx:{idx_dir}", "train.max_epochs=1")
    child = subprocess.Popen([sys.executable, "-c", CHILD, s3_url, stage, *overrides], cwd=ROOT,
                             env=machine_env(s3_server, tmp_path / "killed"))
    deadline = time.monotonic() + 240
    while child.poll() is None and time.monotonic() < deadline:
        if any(k.startswith(f"{stage}/") and "/attempt-" in k for k in objects(s3_url)):
            break
        time.sleep(0.2)
    assert child.poll() is None, "the child ended before it uploaded"
    child.send_signal(signal.SIGKILL)
    child.wait()
    leftover = [k for k in objects(s3_url) if k.startswith(f"{stage}/")]
    assert leftover and not any(k.endswith("/manifest.json") for k in leftover)  # uploaded, not committed

    results = run_all(load_config(None, overrides), s3_url)
    assert not results[stage].cached and results["promotion"].promoted
    manifest = json.loads(fsspec.filesystem("s3").cat_file(
        f"{s3_url.removeprefix('s3://')}/{stage}/{results[stage].fingerprint}/manifest.json"))
    assert not any(k.startswith(f"{stage}/{results[stage].fingerprint}/{manifest['root']}/") for k in leftover)


def test_damaged_objects_are_found_and_rebuilt(s3_url: str, idx_dir: Path) -> None:
    config = load_config(None, tiny_overrides(f"idx:{idx_dir}", "train.max_epochs=1"))
    first = run_all(config, s3_url)
    fs = fsspec.filesystem("s3")
    data_key = f"{s3_url.removeprefix('s3://')}/data/{first['data'].fingerprint}"
    root = json.loads(fs.cat_file(f"{data_key}/manifest.json"))["root"]
    shard = f"{data_key}/{root}/train-00000-of-00002.tfrecord"

    fs.rm(shard)
    again = run_all(config, s3_url)
    assert [again[s].cached for s in STAGE_NAMES] == [False, True, True, True, True, True]

    root = json.loads(fs.cat_file(f"{data_key}/manifest.json"))["root"]
    shard = f"{data_key}/{root}/train-00000-of-00002.tfrecord"
    good = fs.cat_file(shard)
    fs.pipe_file(shard, good[:-10])
    assert not run_all(config, s3_url)["data"].cached  # truncated: sizes tell

    root = json.loads(fs.cat_file(f"{data_key}/manifest.json"))["root"]
    shard = f"{data_key}/{root}/train-00000-of-00002.tfrecord"
    good = fs.cat_file(shard)
    fs.pipe_file(shard, good[:100] + bytes([good[100] ^ 0xFF]) + good[101:])
    assert run_all(config, s3_url)["data"].cached  # same size: only a checksum tells
    assert open_store(s3_url).problem("data", first["data"].fingerprint, verify=True).endswith(
        "does not match its sha256 checksum")
    verified = run_all(config, s3_url, verify=True)
    assert not verified["data"].cached and open_store(s3_url).problem("data", first["data"].fingerprint, True) is None
    assert any(k.startswith(f"data/{first['data'].fingerprint}/.invalid-manifest-") for k in objects(s3_url))


def test_damaged_local_copy_is_fetched_again(s3_url: str, idx_dir: Path) -> None:
    config = load_config(None, tiny_overrides(f"idx:{idx_dir}"))
    data = run_data(config, s3_url)
    shard = data.path / "train-00000-of-00002.tfrecord"
    intact = shard.read_bytes()
    shard.write_bytes(intact[:50])
    again = run_data(config, s3_url)
    assert again.cached and again.path == data.path and shard.read_bytes() == intact


PROMOTER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import stages.promotion
    from tapeline.config import load_config
    from stages.pipeline import new_run_id, record_run, registry_row, run_all
    url, name, barrier = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    original, calls = stages.promotion.read_production, []

    def read_together(store):
        found = original(store)
        if not calls:  # both runs read production before either switches it
            calls.append(1)
            (barrier / name).touch()
            deadline = time.monotonic() + 120
            while len(list(barrier.iterdir())) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
        return found

    stages.promotion.read_production = read_together
    config = load_config(None, sys.argv[4:])
    run_id = new_run_id() + "-" + name
    results = run_all(config, url, run_id=run_id)
    record_run(url, registry_row(run_id, config, results))
    print(results["promotion"].decision)
""")


@pytest.mark.slow
def test_concurrent_promotions_end_at_the_better_model(s3_server, s3_url: str, tmp_path: Path,
                                                       idx_dir: Path) -> None:
    base = tiny_overrides(f"idx:{idx_dir}")
    for epochs in (1, 4):  # build both models first, so the promotions themselves race
        run_all(load_config(None, [*base, f"train.max_epochs={epochs}"]), s3_url)
    fs = fsspec.filesystem("s3")
    fs.rm(f"{s3_url.removeprefix('s3://')}/models", recursive=True)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    children = {
        name: subprocess.Popen([sys.executable, "-c", PROMOTER, s3_url, name, str(barrier), *base,
                                f"train.max_epochs={epochs}"], cwd=ROOT, env=machine_env(s3_server, tmp_path / name),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, epochs in (("weak", 1), ("strong", 4))
    }
    outputs = {name: child.communicate(timeout=300) for name, child in children.items()}
    assert all(child.returncode == 0 for child in children.values()), {n: o[1][-2000:] for n, o in outputs.items()}
    strong = run_all(load_config(None, [*base, "train.max_epochs=4"]), s3_url)
    weak = run_all(load_config(None, [*base, "train.max_epochs=1"]), s3_url)
    assert strong["evaluate"].test_accuracy > weak["evaluate"].test_accuracy
    pointer, _ = read_production(open_store(s3_url))
    assert pointer["train_fingerprint"] == strong["train"].fingerprint
    rows = runs_of(s3_url)
    assert sorted(r["run_id"].rsplit("-", 1)[-1] for r in rows) == ["strong", "weak"]


def test_killed_training_resumes_on_another_machine(s3_url: str, tmp_path: Path, idx_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(None, tiny_overrides(f"idx:{idx_dir}", "train.max_epochs=4", "train.patience=3"))
    data = run_data(config, s3_url)
    model = run_model(config, data, s3_url)
    with pytest.raises(Interrupted):
        run_train(config, data, model, s3_url, on_epoch_end=interrupt_after(2))
    assert any(k.startswith("train/") and f"/{PARTIAL}/checkpoints/" in k for k in objects(s3_url))

    monkeypatch.setenv("TAPELINE_CACHE_DIR", str(tmp_path / "another-pod"))  # a new pod: empty disk
    epochs: list[int] = []
    resumed = run_train(config, run_data(config, s3_url), run_model(config, data, s3_url), s3_url,
                        on_epoch_end=lambda row, _: epochs.append(row["epoch"]))
    assert epochs == [3, 4] and resumed.epochs_run == 4
    assert not any(f"/{PARTIAL}/" in k for k in objects(s3_url))

    monkeypatch.setenv("TAPELINE_CACHE_DIR", str(tmp_path / "reference"))
    reference = run_train(config, data, model, str(tmp_path / "local-artifacts-reference"))
    import keras

    ours = keras.models.load_model(resumed.path / "model.keras").get_weights()
    theirs = keras.models.load_model(reference.path / "model.keras").get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_bad_store_settings_are_one_line_errors(s3_server, s3_url: str, tmp_path: Path) -> None:
    env = machine_env(s3_server, tmp_path)
    bucket = s3_url.removeprefix("s3://").split("/")[0]
    cases = [
        ({}, "s3://no-such-bucket-here/x", "bucket 'no-such-bucket-here' does not exist"),
        ({"AWS_SECRET_ACCESS_KEY": "wrong"}, s3_url, "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"),
        ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, s3_url, "cannot reach the object store"),
        ({}, f"ftp://{bucket}/x", "unsupported URL scheme 'ftp'"),
    ]
    for extra, url, message in cases:
        done = tapeline({**env, **extra}, tmp_path, "plan", "--artifacts", url, timeout=120)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
        assert lines[0].startswith(f"tapeline: error: {url}") or url in lines[0]
        assert message in lines[0] and "Traceback" not in done.stderr
        assert env["AWS_SECRET_ACCESS_KEY"] not in done.stderr
