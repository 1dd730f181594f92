"""Sweeps side by side: tapeline's sweep (TPE with ASHA or Hyperband inside the tape loop, warm trial workers)
against Keras Tuner's `Hyperband` (`model.fit` with `EarlyStopping`) on the same search space, the same
Fashion-MNIST data, the same maximum epochs per trial and the same budget in epochs (tapeline stops proposing once
it has trained as many epochs as Hyperband did), one round per seed (Keras Tuner's `seed` and `sweep.seed` alike),
medians over the rounds; then the rerun of the finished sweep (zero epochs, its wall time through `tapeline
sweep`). Each contender runs in a process of its own, each tapeline round in a store of its own (no trial is a
cache hit of another round's); the data is built before the clock starts.

    python -m benchmarks.sweeps --limit 0 --max-epochs 6 --seeds 0,1,2 --pruners asha,hyperband \
        --json benchmarks/results/sweeps_full_seeds.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.lib import ROOT, epoch_ends, machine

SPACE = {
    "train.learning_rate": {"float": [0.0003, 0.01], "log": True},
    "model.dense_units": {"choice": [32, 64, 128]},
    "model.dropout": {"float": [0.0, 0.5]},
}


def base_overrides(source: str, limit: int, max_epochs: int, patience: int) -> list[str]:
    """The shared training recipe: what Keras Tuner's `model.fit` does too (constant Adam, no augmentation)."""
    return [f"data.source={source}", *([f"data.limit={limit}"] if limit else []), "data.batch_size=128",
            "train.lr_schedule=constant", "train.random_shift=0", "train.random_flip=false", "train.precision=float32",
            "train.warmup_epochs=0", f"train.max_epochs={max_epochs}", f"train.patience={patience}",
            "train.restore_best_weights=true"]


class BudgetSpent(Exception):  # noqa: N818 - a stop signal, not an error
    """Raised from the trial-end callback once tapeline has trained Keras Tuner's number of epochs."""


def tapeline_worker(artifacts: Path, overrides: list[str], budget_epochs: int, trials: int, seed: int = 0,
                    pruner: str = "asha") -> dict[str, Any]:
    """tapeline's sweep of at most `trials` until it has trained `budget_epochs`, then the best trial's evaluate
    stage (the test split, once). Returns timings, trials and accuracies. (`trials` also sets TPE's random start:
    a quarter of them, at least 2.)"""
    from stages.graph import run_stage
    from sweeps.driver import run_sweep
    from sweeps.state import SweepFiles, sweep_name
    from sweeps.study import best_trial
    from tapeline.config import load_config, validate_config
    from tapeline.store import open_store

    config = load_config(None, [*overrides, f"sweep.space={json.dumps(SPACE)}", f"sweep.trials={trials}",
                                "sweep.min_epochs=2", "sweep.reduction_factor=3", f"sweep.seed={seed}",
                                f"sweep.pruner={pruner}"])
    spent = [0]

    def count(record: Any) -> None:
        spent[0] += sum(record.trained.values())
        if spent[0] >= budget_epochs:
            raise BudgetSpent

    started = time.perf_counter()
    try:
        run_sweep(config, artifacts, count)
    except BudgetSpent:
        pass
    search_seconds = time.perf_counter() - started
    records = SweepFiles(open_store(artifacts), sweep_name(config)).trials()
    logs = artifacts / "sweeps" / sweep_name(config) / "logs"
    training = sum(seconds for log in logs.glob("trial-*.log") for _at, _epoch, seconds in epoch_ends(log))
    best = best_trial(config.sweep, records)
    best_config = validate_config(best.config)
    results: dict[str, Any] = {}
    for name in ("data", "validate", "model", "train", "evaluate"):
        results[name] = run_stage(name, best_config, artifacts, results)
    return {"seconds": round(time.perf_counter() - started, 1), "search_seconds": round(search_seconds, 1),
            "trials": len(records), "states": [r.state for r in records],
            "epochs_trained": sum(sum(r.trained.values()) for r in records), "best_val_accuracy": best.value,
            "training_seconds": round(training, 1), "best_params": best.params,
            "test_accuracy": results["evaluate"].test_accuracy}


def keras_tuner_worker(data_path: Path, directory: Path, max_epochs: int, patience: int, epoch_log: Path | None = None,
                       overwrite: bool = True, seed: int = 0) -> dict[str, Any]:
    """Keras Tuner's Hyperband on the same space and recipe: the same CNN (tapeline's builder), Adam at a constant
    rate, batch 128, `EarlyStopping` on val_accuracy; then the best model's test accuracy."""
    import keras
    import keras_tuner as kt
    import numpy as np

    from stages.data.readers import load_split
    from stages.model import build_cnn
    from tapeline.config import ModelConfig
    from tapeline.results import InputSpec

    train = load_split(data_path, "train", normalize=True)
    validation = load_split(data_path, "validation", normalize=True)
    test = load_split(data_path, "test", normalize=True)
    spec = InputSpec(shape=train[0].shape[1:], class_names=tuple(str(i) for i in range(10)))
    epochs = [0]
    training = {"seconds": 0.0, "since": None}

    class CountEpochs(keras.callbacks.Callback):
        def on_epoch_begin(self, _epoch: int, _logs: Any = None) -> None:
            training["since"] = time.perf_counter()

        def on_test_begin(self, _logs: Any = None) -> None:  # fit's validation: the epoch's training has ended
            if training["since"] is not None:
                training["seconds"] += time.perf_counter() - training["since"]
                training["since"] = None

        def on_epoch_end(self, _epoch: int, _logs: Any = None) -> None:
            epochs[0] += 1
            if epoch_log is not None:
                with epoch_log.open("a") as out:
                    out.write("epoch\n")

    def build(hp: Any) -> Any:
        lr = hp.Float("train.learning_rate", *SPACE["train.learning_rate"]["float"], sampling="log")
        units = hp.Choice("model.dense_units", SPACE["model.dense_units"]["choice"])
        dropout = hp.Float("model.dropout", *SPACE["model.dropout"]["float"])
        model = build_cnn(ModelConfig(dense_units=units, dropout=dropout), spec)
        model.compile(optimizer=keras.optimizers.Adam(lr), metrics=["accuracy"],
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    started = time.perf_counter()
    tuner = kt.Hyperband(build, objective="val_accuracy", max_epochs=max_epochs, factor=3, seed=seed,
                         directory=str(directory), project_name="fashion", overwrite=overwrite)
    stop = keras.callbacks.EarlyStopping(monitor="val_accuracy", patience=patience, restore_best_weights=True)
    tuner.search(*train, validation_data=validation, batch_size=128, callbacks=[stop, CountEpochs()], verbose=0)
    search_seconds = time.perf_counter() - started
    best_trial = tuner.oracle.get_best_trials(1)[0]
    best_model = tuner.get_best_models(1)[0]
    logits = best_model.predict(test[0], batch_size=1024, verbose=0)
    return {"seconds": round(time.perf_counter() - started, 1), "search_seconds": round(search_seconds, 1),
            "trials": len(tuner.oracle.trials), "epochs_trained": epochs[0],
            "training_seconds": round(training["seconds"], 1),
            "best_val_accuracy": float(best_trial.score), "best_params": best_trial.hyperparameters.values,
            "test_accuracy": float((np.argmax(logits, axis=1) == test[1]).mean())}


KILL_DRIVER = "import sys; from sweeps.driver import run_sweep; from tapeline.config import load_config; " \
              "run_sweep(load_config(None, sys.argv[2:]), sys.argv[1])"


def epochs_recorded(artifacts: Path, config: Any) -> int:
    """Epochs the sweep's trial records say were trained, all invocations together."""
    from sweeps.state import SweepFiles, sweep_name
    from tapeline.store import open_store

    return sum(sum(r.trained.values()) for r in SweepFiles(open_store(artifacts), sweep_name(config)).trials())


def kill_when(process: subprocess.Popen, spent: Any, target: int) -> None:
    """SIGKILL `process` once `spent()` reaches `target` epochs."""
    while spent() < target:
        if process.poll() is not None:
            raise RuntimeError(f"the run ended before it was killed ({process.returncode})")
        time.sleep(0.05)
    process.kill()
    process.wait()


def tapeline_kill(root: Path, overrides: list[str], trials: int) -> dict[str, Any]:
    """An uninterrupted sweep, then the same sweep killed (SIGKILL of the driver) half way and started again:
    epochs trained in all, trials and the best trial of each."""
    from sweeps.driver import run_sweep
    from tapeline.config import load_config

    args = [*overrides, f"sweep.space={json.dumps(SPACE)}", f"sweep.trials={trials}", "sweep.min_epochs=2",
            "sweep.seed=3"]
    config = load_config(None, args)
    started = time.perf_counter()
    reference = run_sweep(config, root / "uninterrupted")
    uninterrupted_seconds = time.perf_counter() - started
    total = epochs_recorded(root / "uninterrupted", config)
    killed = root / "killed"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    driver = subprocess.Popen([sys.executable, "-c", KILL_DRIVER, str(killed), *args], env=env,  # noqa: S603
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = time.perf_counter()
    kill_when(driver, lambda: epochs_recorded(killed, config), total // 2)
    killed_after = time.perf_counter() - started
    before = epochs_recorded(killed, config)
    started = time.perf_counter()
    resumed = run_sweep(config, killed)
    resumed_seconds = time.perf_counter() - started
    return {"uninterrupted_seconds": round(uninterrupted_seconds, 1), "killed_after_seconds": round(killed_after, 1),
            "resumed_seconds": round(resumed_seconds, 1),
            "uninterrupted_epochs": total, "epochs_before_the_kill": before,
            "epochs_in_all": epochs_recorded(killed, config),
            "same_trials": [r.params for r in resumed.records] == [r.params for r in reference.records],
            "best": [reference.best.number, resumed.best.number],
            "best_values": [reference.best.value, resumed.best.value]}


def keras_tuner_kill(data_path: Path, root: Path, max_epochs: int, patience: int) -> dict[str, Any]:
    """Keras Tuner's Hyperband uninterrupted, then killed half way and rerun with `overwrite=False`: epochs
    trained in all (counted by a callback into a file) and the best trial of each."""
    command = [sys.executable, "-m", "benchmarks.sweeps", "--worker=keras-tuner", f"--artifacts={data_path}",
               f"--max-epochs={max_epochs}", f"--patience={patience}"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    runs = {}
    for name in ("uninterrupted", "killed"):
        log = root / f"{name}-epochs.txt"
        run = [*command, f"--tuner-dir={root / name}", f"--epoch-log={log}", "--keep"]
        if name == "killed":
            process = subprocess.Popen(run, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,  # noqa: S603
                                       stderr=subprocess.DEVNULL)
            kill_when(process, lambda log=log: len(log.read_text().splitlines()) if log.exists() else 0,
                      runs["uninterrupted"]["epochs_trained"] // 2)
        done = subprocess.run(run, env=env, cwd=ROOT, capture_output=True, text=True, check=True)  # noqa: S603
        runs[name] = json.loads(next(line for line in done.stdout.splitlines()
                                     if line.startswith("RESULT "))[len("RESULT "):])
        runs[name]["epochs_in_all"] = len(log.read_text().splitlines())
    return {"uninterrupted_epochs": runs["uninterrupted"]["epochs_in_all"],
            "epochs_in_all": runs["killed"]["epochs_in_all"],
            "best_values": [runs["uninterrupted"]["best_val_accuracy"], runs["killed"]["best_val_accuracy"]],
            "best_params": [runs["uninterrupted"]["best_params"], runs["killed"]["best_params"]]}


def run_worker(*argv: str) -> dict[str, Any]:
    """Run this script as a worker process; its RESULT line, with `process_seconds`: the process's whole wall time
    (Python's start, TensorFlow's import, Keras Tuner's data load; `seconds` starts after them)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "benchmarks.sweeps", *argv], env=env, cwd=ROOT,  # noqa: S603
                          capture_output=True, text=True, check=False)
    seconds = round(time.perf_counter() - started, 1)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return {**json.loads(line[len("RESULT "):]), "process_seconds": seconds}
    raise RuntimeError(f"worker {argv[0]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")


def rerun_seconds(artifacts: Path, overrides: list[str], rounds: int) -> list[float]:
    """Wall seconds of `tapeline sweep` on a finished sweep (a temporary Prefect API each time), `rounds` times."""
    config = Path(tempfile.mkdtemp()) / "sweep.yaml"
    config.write_text(json.dumps({"sweep": {"space": SPACE, "trials": 3, "min_epochs": 2, "seed": 5}}))
    command = [str(Path(sys.executable).with_name("tapeline")), "sweep", "--artifacts", str(artifacts),
               "--config", str(config), "--json", *(f"--set={o}" for o in overrides)]
    subprocess.run(command, check=True, capture_output=True, cwd=ROOT)  # the sweep itself
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        done = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
        times.append(round(time.perf_counter() - started, 2))
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        assert sum(t["epochs_trained"] for t in summary["trials"]) == 0, summary
    return times


def median_summary(rounds: list[dict[str, Any]], contender: str) -> dict[str, float]:
    """Medians over the rounds of one contender's wall time, epochs, best validation and test accuracy."""
    return {key: statistics.median(r[contender][key] for r in rounds)
            for key in ("seconds", "process_seconds", "training_seconds", "epochs_trained", "best_val_accuracy",
                        "test_accuracy")}


def compare_rounds(data_path: Path, overrides: list[str], common: list[str], seeds: list[int], pruners: list[str]
                   ) -> dict[str, Any]:
    """One round per seed: Keras Tuner, then tapeline with each pruner on Keras Tuner's epoch budget, each tapeline
    sweep in a store of its own holding only the data; every round, then the medians and their ratios."""
    from stages.pipeline import run_data
    from tapeline.config import load_config

    rounds = []
    for seed in seeds:
        keras_tuner = run_worker("--worker=keras-tuner", f"--artifacts={data_path}", f"--seed={seed}", *common)
        print(f"seed {seed} keras tuner:", keras_tuner, flush=True)
        entry: dict[str, Any] = {"seed": seed, "keras_tuner_hyperband": keras_tuner}
        for pruner in pruners:
            artifacts = Path(tempfile.mkdtemp(prefix=f"tapeline-sweeps-{seed}-{pruner}-")) / "artifacts"
            run_data(load_config(None, overrides), artifacts)
            entry[f"tapeline_{pruner}"] = run_worker(
                "--worker=tapeline", f"--artifacts={artifacts}", f"--budget={keras_tuner['epochs_trained']}",
                f"--seed={seed}", f"--pruner={pruner}", *common)
            print(f"seed {seed} tapeline {pruner}:", entry[f"tapeline_{pruner}"], flush=True)
        rounds.append(entry)
    medians = {name: median_summary(rounds, name) for name in ["keras_tuner_hyperband"] +
               [f"tapeline_{p}" for p in pruners]}
    kt = medians["keras_tuner_hyperband"]
    return {"rounds": rounds, "medians": medians, "median_wall_ratio_over_keras_tuner": {
        name: round(m["seconds"] / kt["seconds"], 3) for name, m in medians.items() if name.startswith("tapeline")},
        "median_process_wall_ratio_over_keras_tuner": {
        name: round(m["process_seconds"] / kt["process_seconds"], 3) for name, m in medians.items()
        if name.startswith("tapeline")},
        "median_val_accuracy_difference": {
        name: round(m["best_val_accuracy"] - kt["best_val_accuracy"], 4) for name, m in medians.items()
        if name.startswith("tapeline")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=20000, help="training images (data.limit; 0: all)")
    parser.add_argument("--max-epochs", type=int, default=6)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--rerun-rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", choices=("tapeline", "keras-tuner"))
    parser.add_argument("--artifacts", type=Path)
    parser.add_argument("--budget", type=int, default=0)
    parser.add_argument("--trials", type=int, default=12, help="tapeline's sweep.trials (the epoch budget usually "
                        "ends it first)")
    parser.add_argument("--source", default="fashion_mnist")
    parser.add_argument("--tuner-dir", type=Path)
    parser.add_argument("--epoch-log", type=Path)
    parser.add_argument("--keep", action="store_true", help="keras tuner: overwrite=False (resume a killed search)")
    parser.add_argument("--parts", default="compare,rerun", help="comma-separated: compare (tapeline against "
                        "Keras Tuner), rerun (a finished sweep again), kill (each contender killed half way, rerun)")
    parser.add_argument("--kill-trials", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0, help="worker: Keras Tuner's seed, tapeline's sweep.seed")
    parser.add_argument("--pruner", default="asha", help="worker: tapeline's sweep.pruner")
    parser.add_argument("--seeds", default="0", help="compare: comma-separated seeds, one round each")
    parser.add_argument("--pruners", default="asha", help="compare: comma-separated sweep.pruner values for "
                        "tapeline, each a contender of its own")
    args = parser.parse_args()
    overrides = base_overrides(args.source, args.limit, args.max_epochs, args.patience)
    if args.worker == "tapeline":
        print("RESULT " + json.dumps(tapeline_worker(args.artifacts, overrides, args.budget, args.trials, args.seed,
                                                     args.pruner)), flush=True)
        return
    if args.worker == "keras-tuner":
        print("RESULT " + json.dumps(keras_tuner_worker(args.artifacts, args.tuner_dir or args.artifacts.parent / "kt",
                                                        args.max_epochs, args.patience, args.epoch_log,
                                                        overwrite=not args.keep, seed=args.seed)), flush=True)
        return

    from stages.pipeline import run_data
    from tapeline.config import load_config

    artifacts = Path(tempfile.mkdtemp(prefix="tapeline-sweeps-")) / "artifacts"
    data = run_data(load_config(None, overrides), artifacts)
    common = [f"--limit={args.limit}", f"--max-epochs={args.max_epochs}", f"--patience={args.patience}",
              f"--source={args.source}", f"--trials={args.trials}"]
    parts = set(args.parts.split(","))
    results: dict[str, Any] = {}
    if "compare" in parts:
        results.update(compare_rounds(data.path, overrides, common, [int(x) for x in args.seeds.split(",")],
                                      args.pruners.split(",")))
    if "rerun" in parts:
        rerun = rerun_seconds(artifacts, overrides, args.rerun_rounds)
        results.update({"rerun_of_a_finished_sweep_seconds": rerun,
                        "rerun_median_seconds": sorted(rerun)[len(rerun) // 2]})
    if "kill" in parts:
        root = Path(tempfile.mkdtemp(prefix="tapeline-sweep-kill-"))
        results["kill_and_resume"] = {
            "keras_tuner_overwrite_false": keras_tuner_kill(data.path, root / "kt", args.max_epochs, args.patience),
            "tapeline": tapeline_kill(root / "tapeline", overrides, args.kill_trials)}
        print("kill:", results["kill_and_resume"], flush=True)
    summary = {
        "date": time.strftime("%Y-%m-%d"), "machine": machine(), "command": " ".join(sys.argv),
        "space": SPACE, "overrides": overrides, "records": data.records, **results,
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
