"""Fast on every CPU: the tutorial preset's speed, the default train stage and the physical limit, side by side
in one script run on whatever CPU this is (its model, cores and ISA features are in the JSON).

Every contender runs in a process of its own, because TensorFlow chooses its kernels (oneDNN or Eigen) once,
when it loads: the tutorial loop runs as a user runs it (TensorFlow imported first: its own choice for this
CPU), tapeline as `tapeline run` runs it (`stages` imported first: oneDNN on unless the user chose).

1. Throughput, --rounds interleaved epochs (A B C A B C …; each process keeps training; round 0 is the
   warm-up): the verbatim tutorial loop, tapeline's loop with `--preset tutorial`, and the same with
   TF_ENABLE_ONEDNN_OPTS=0 (what the oneDNN lever alone buys).
2. The ceiling: the fp32 (and, where the CPU has bf16 instructions, bf16) matmul rate measured in the same
   run, and each contender's share of it (training FLOPs of its model x images per second).
3. The train stage, --stage-rounds interleaved rounds: today's defaults as a user got them before this work
   (`--preset v2` in the precision `auto` picked then: bf16 with AMX, float32 elsewhere; TensorFlow's own kernel
   choice) vs the defaults, and the defaults in float32 (what
   `train.precision=auto` buys where it picks bf16): train stage seconds, test accuracy and seconds to 0.90
   validation accuracy, and the tutorial loop's seconds to 0.90 (tapeline's validation split for every
   contender).

With --as-on-avx2, every contender runs as it would on an AVX2-only x86 CPU, on this (AVX-512) one: oneDNN limited
to its AVX2 kernels (ONEDNN_MAX_CPU_ISA=AVX2), TensorFlow's own kernel choice there (Eigen: oneDNN off) for the
contenders that import TensorFlow first, and float32 wherever `auto` would pick it. A stand-in, not the real
thing: Eigen's kernels are the same build either way, and the core under them is this one.

    .venv/bin/python benchmarks/cpu_speed.py [--rounds 3] [--limit 20000] [--stage-rounds 1] [--as-on-avx2]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.lib import (
    STAGES,
    TARGET,
    THROUGHPUT,
    Worker,
    as_on_avx2,
    matmul_gflops,
    numpy_gflops,
    overrides_argv,
    sets_precision,
    training_flops,
    v2_precision,
)

AVX2_LIMIT = {"ONEDNN_MAX_CPU_ISA": "AVX2"}


def this_process() -> dict[str, Any]:
    """The machine and this process's kernel choice."""
    from benchmarks.lib import machine
    from tapeline.hardware import onednn_decision

    return {"machine": machine(), "onednn": onednn_decision()}


def say(payload: dict[str, Any]) -> None:
    """One JSON line to the parent."""
    print("RESULT " + json.dumps(payload), flush=True)


def throughput_worker(overrides: list[str] | None, limit: int, artifacts: Path) -> None:
    """Serve the parent: `epoch` trains one epoch and answers its seconds; `ceiling` answers the matmul rates;
    `accuracy` the validation accuracy."""
    import io
    from contextlib import redirect_stdout

    import keras

    from benchmarks.lib import prepare_data, throughput_contender, tutorial_contender
    from tapeline.hardware import cpu

    keras.utils.set_random_seed(0)
    with redirect_stdout(io.StringIO()):
        config, data, train, validation = prepare_data(limit, artifacts)
    if overrides is None:
        epoch, accuracy = tutorial_contender(train, validation)
        flops = 16.8e6  # the tutorial CNN (training_flops of the same model)
    else:
        epoch, accuracy = throughput_contender(config, data, validation, artifacts, *overrides)
        from stages.model import build_model
        from tapeline.config import load_config

        flops = training_flops(build_model(load_config(None, overrides).model, data.input_spec))
    say({"ready": True, "images": len(train[1]), "training_flops_per_image": flops, **this_process()})
    for line in sys.stdin:
        command = line.strip()
        if command == "epoch":
            started = time.perf_counter()
            with redirect_stdout(io.StringIO()):
                epoch()
            say({"seconds": time.perf_counter() - started})
        elif command == "ceiling":
            bf16 = any(f in cpu()["isa"] for f in ("avx512_bf16", "amx_bf16"))
            bf16 = bf16 and not AVX2_LIMIT.keys() & os.environ.keys()  # no bf16 kernels under an AVX2 limit
            say({"fp32": matmul_gflops("float32"), "bf16": matmul_gflops("bfloat16") if bf16 else None,
                 "fp32_numpy": numpy_gflops()})
        elif command == "accuracy":
            say({"val_accuracy": accuracy()})


def stage_worker(overrides: list[str] | None, max_epochs: int) -> None:
    """One train-stage contender (or the tutorial loop until TARGET), as time_to_accuracy.py runs it."""
    import keras

    from benchmarks.lib import loop_contender, prepare_data, stage_contender, tutorial_contender
    from stages.data.readers import load_split

    keras.utils.set_random_seed(0)
    if overrides is None:
        _, data, train, validation = prepare_data(None, Path(tempfile.mkdtemp(prefix="tapeline-cpu-")))
        test = load_split(data.path, "test", normalize=True)
        result = loop_contender("tutorial_loop", tutorial_contender, train, validation, test, max_epochs,
                                stop_at=TARGET)
    else:
        from stages.data.sources.base import DEBIAN_FASHION_MNIST

        if not DEBIAN_FASHION_MNIST.is_dir():
            raise SystemExit("the train-stage part needs Fashion-MNIST (apt-get install dataset-fashion-mnist)")
        from stages.model import build_model
        from tapeline.config import load_config
        from tapeline.results import InputSpec

        result = stage_contender(" ".join(overrides) or "defaults", "fashion_mnist", overrides, max_epochs)
        spec = InputSpec(shape=(28, 28, 1), class_names=tuple("0123456789"))
        result["training_flops_per_image"] = training_flops(build_model(load_config(None, overrides).model, spec))
    say({**result, **this_process()})


def throughput_part(rounds: int, limit: int, artifacts: Path, contenders: dict[str, Any]) -> dict[str, Any]:
    """Part 1 and 2: interleaved epochs of each THROUGHPUT contender, and the matmul ceiling."""
    workers: dict[str, Worker] = {}
    ready: dict[str, dict[str, Any]] = {}
    for name, (first, environment, overrides) in contenders.items():  # one at a time: the first builds the cache
        workers[name] = Worker(["--worker", "throughput", f"--limit={limit}", f"--artifacts={artifacts}",
                                *overrides_argv(overrides)], first, environment)
        ready[name] = workers[name].ask()
    seconds: dict[str, list[float]] = {name: [] for name in workers}
    for index in range(rounds + 1):
        for name, worker in workers.items():
            seconds[name].append(worker.ask("epoch")["seconds"])
            rate = ready[name]["images"] / seconds[name][-1]
            print(f"round {index} {name:<40} {rate:8.0f} img/s{'  (warm-up)' if index == 0 else ''}", flush=True)
    ceiling = workers["tapeline_tutorial_preset"].ask("ceiling")
    results = {}
    for name, worker in workers.items():
        rates = [ready[name]["images"] / s for s in seconds[name][1:]]
        median = statistics.median(rates)
        results[name] = {
            "images_per_second": [round(r, 1) for r in rates], "median": round(median, 1),
            "gflops": round(median * ready[name]["training_flops_per_image"] / 1e9, 1),
            "share_of_fp32_matmul": round(median * ready[name]["training_flops_per_image"] / 1e9 / ceiling["fp32"], 3),
            "val_accuracy": round(worker.ask("accuracy")["val_accuracy"], 4), "onednn": ready[name]["onednn"],
        }
        worker.close()
    tutorial = results["tutorial_loop"]["median"]
    return {
        "images_per_round": ready["tutorial_loop"]["images"], "batch_size": 32, "results": results,
        "matmul_gflops": {k: None if v is None else round(v, 1) for k, v in ceiling.items()},
        "ratio_tutorial_preset_vs_tutorial_loop": round(results["tapeline_tutorial_preset"]["median"] / tutorial, 3),
        "ratio_tutorial_preset_onednn_off_vs_tutorial_loop":
            round(results["tapeline_tutorial_preset_onednn_off"]["median"] / tutorial, 3),
        "machine": ready["tutorial_loop"]["machine"],
    }


def stage_part(rounds: int, max_epochs: int, fp32_gflops: float, contenders: dict[str, Any]) -> dict[str, Any]:
    """Part 3: each STAGES contender in a fresh process, rounds interleaved."""
    from tapeline.hardware import cpu

    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
    for index in range(rounds):
        for name, (first, environment, overrides) in contenders.items():
            if name == "tapeline_v2_defaults" and not sets_precision(overrides):
                overrides = [*overrides, v2_precision(cpu()["isa"])]
            worker = Worker(["--worker", "stage", f"--max-epochs={max_epochs}", *overrides_argv(overrides)],
                            first, environment)
            runs[name].append(worker.ask())
            worker.close()
            row = runs[name][-1]
            print(f"stage round {index} {name}: to {TARGET} {row['seconds_to'].get(f'{TARGET:.2f}')} s, train "
                  f"{row['train_seconds']} s, test {row['test_accuracy']}", flush=True)

    def median_of(name: str, pick: Any) -> float | None:
        values = [v for v in (pick(r) for r in runs.get(name, [])) if v is not None]  # none: left out
        return round(statistics.median(values), 4) if values else None

    def to_target(row: dict[str, Any]) -> float | None:
        return row["seconds_to"].get(f"{TARGET:.2f}")

    tutorial, old, new = (median_of(n, to_target) for n in ("tutorial_loop", "tapeline_v2_defaults",
                                                              "tapeline_defaults"))
    old_train, new_train, fp32_train = (median_of(n, lambda r: r["train_seconds"]) for n in (
        "tapeline_v2_defaults", "tapeline_defaults", "tapeline_defaults_float32"))
    return {
        "runs": runs,
        "defaults_train_stage_vs_v2": round(new_train / old_train, 3) if new_train and old_train else None,
        "defaults_train_stage_vs_defaults_float32": round(new_train / fp32_train, 3) if new_train and fp32_train
        else None,
        "defaults_float32_test_accuracy": median_of("tapeline_defaults_float32", lambda r: r["test_accuracy"]),
        "defaults_seconds_to_0.90_vs_tutorial_loop": round(new / tutorial, 3) if new and tutorial else None,
        "v2_seconds_to_0.90_vs_tutorial_loop": round(old / tutorial, 3) if old and tutorial else None,
        "defaults_test_accuracy": median_of("tapeline_defaults", lambda r: r["test_accuracy"]),
        "defaults_images_per_second": median_of("tapeline_defaults", lambda r: r["median_images_per_second"]),
        "defaults_share_of_fp32_matmul": median_of(
            "tapeline_defaults", lambda r: r["median_images_per_second"] * r["training_flops_per_image"] / 1e9
            / fp32_gflops),
        "v2_share_of_fp32_matmul": median_of(
            "tapeline_v2_defaults", lambda r: r["median_images_per_second"] * r["training_flops_per_image"] / 1e9
            / fp32_gflops),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="timed throughput rounds after the warm-up")
    parser.add_argument("--limit", type=int, default=20000, help="training images in the throughput part")
    parser.add_argument("--stage-rounds", type=int, default=1, help="train-stage rounds (0 = skip the part)")
    parser.add_argument("--max-epochs", type=int, default=15, help="epoch cap (tutorial loop; constant-rate presets)")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--as-on-avx2", action="store_true",
                        help="run every contender as on an AVX2-only x86 CPU (see above): a stand-in for one")
    parser.add_argument("--worker", choices=("throughput", "stage"), help=argparse.SUPPRESS)
    parser.add_argument("--tensorflow-first", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tutorial-loop", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--artifacts", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tensorflow_first:
        import tensorflow  # noqa: F401  (before tapeline: TensorFlow's own kernel choice, as the user's script has it)
    from tapeline.hardware import onednn_origin

    onednn_origin()  # otherwise first: oneDNN as `tapeline run` has it
    overrides = None if args.tutorial_loop else args.set
    if args.worker == "throughput":
        return throughput_worker(overrides, args.limit, args.artifacts)
    if args.worker == "stage":
        return stage_worker(overrides, args.max_epochs)

    throughput, stage = (as_on_avx2(THROUGHPUT), as_on_avx2(STAGES)) if args.as_on_avx2 else (THROUGHPUT, STAGES)
    if args.as_on_avx2:
        os.environ.update(AVX2_LIMIT)  # every worker inherits it
    summary: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"),
                               "as_on_avx2": {**AVX2_LIMIT, "contenders": stage} if args.as_on_avx2 else None}
    summary["throughput"] = throughput_part(args.rounds, args.limit, Path(tempfile.mkdtemp(prefix="tapeline-cpu-")),
                                            throughput)
    summary["machine"] = summary["throughput"]["machine"]
    if args.stage_rounds:
        summary["train_stage"] = stage_part(args.stage_rounds, args.max_epochs,
                                            summary["throughput"]["matmul_gflops"]["fp32"], stage)
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
