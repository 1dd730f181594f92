"""The sweep in TensorBoard: the HParams experiment at the root, each trial's parameters, state, final metric and
per-epoch curves in its own run directory, read back from the event files; on a directory and on a bucket."""

from __future__ import annotations

from pathlib import Path

import pytest

from sweeps.state import SweepFiles, TrialRecord
from sweeps.tensorboard import FOLDER, write_sweep_tensorboard
from tapeline.config import load_config
from tapeline.store import open_store


def records() -> list[TrialRecord]:
    return [TrialRecord(number=0, params={"train.learning_rate": 0.01, "model.dense_units": 64}, config={},
                        state="complete", value=0.8, intermediate={1: 0.7, 2: 0.8}),
            TrialRecord(number=1, params={"train.learning_rate": 0.3, "model.dense_units": 32}, config={},
                        state="pruned", value=0.2, intermediate={1: 0.2})]


def read_events(folder: Path) -> dict[str, dict]:
    """Run directory -> {hparams: {name: value}, scalars: {tag: [(step, value)]}, experiment: bool}."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import plugin_data_pb2

    runs: dict[str, dict] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        run = runs.setdefault(path.parent.relative_to(folder).as_posix(), {"hparams": {}, "scalars": {},
                                                                          "experiment": False})
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "hparams":
                    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    run["experiment"] |= data.HasField("experiment")
                    for name, hp in data.session_start_info.hparams.items():
                        run["hparams"][name] = hp.number_value if hp.HasField("number_value") else hp.string_value
                else:
                    run["scalars"].setdefault(value.tag, []).append(
                        (event.step, round(float(tf.make_ndarray(value.tensor)), 6)))
    return runs


def check(runs: dict[str, dict]) -> None:
    assert runs["."]["experiment"] is True
    assert runs["trial-0000"]["hparams"] == {"train.learning_rate": 0.01, "model.dense_units": 64.0}
    assert runs["trial-0000"]["scalars"]["epoch/val_accuracy"] == [(1, 0.7), (2, 0.8)]
    assert runs["trial-0000"]["scalars"]["final/val_accuracy"] == [(2, 0.8)]
    assert runs["trial-0001"]["scalars"]["final/state"] == [(0, 1.0)]  # pruned
    assert runs["trial-0001"]["hparams"]["model.dense_units"] == 32.0


def test_the_sweep_writes_hparams_and_curves_for_tensorboard(tmp_path: Path) -> None:
    config = load_config(None, ["sweep.space.train.learning_rate={float: [0.001, 0.5], log: true}"])
    store = open_store(tmp_path / "artifacts")
    files = SweepFiles(store, "s")
    written = write_sweep_tensorboard(files, store, config, records())
    assert {name.split("/")[0] for name in written} >= {"trial-0000", "trial-0001"}
    check(read_events(Path(files.location(FOLDER))))
    write_sweep_tensorboard(files, store, config, records())  # again: the whole picture replaced, not doubled
    check(read_events(Path(files.location(FOLDER))))


@pytest.mark.slow
def test_the_sweep_writes_tensorboard_on_a_bucket(s3_url: str, tmp_path: Path) -> None:
    import fsspec

    config = load_config(None, ["sweep.space.train.learning_rate={float: [0.001, 0.5], log: true}"])
    store = open_store(s3_url)
    files = SweepFiles(store, "s")
    write_sweep_tensorboard(files, store, config, records())
    local = tmp_path / "copy"
    fsspec.filesystem("s3").get(f"{s3_url.removeprefix('s3://')}/sweeps/s/{FOLDER}/", str(local), recursive=True)
    check(read_events(local))
