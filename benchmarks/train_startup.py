"""What a train stage spends before it trains at full speed, for this checkout against an earlier commit, side by
side: building the trainer (model, optimizer, step functions, the training split in memory), the first training call
beyond a later one (tracing, instantiating, first kernel runs) and the first validation beyond the second. Each round
runs both trees in fresh processes, interleaved; the data stage's cache is built once per tree and left out.

    .venv/bin/python benchmarks/train_startup.py --baseline 97d3f2a [--rounds 5] [--set KEY=VALUE ...] [--json out.json]

Set `ONEDNN_MAX_CPU_ISA=AVX2` in the environment to measure as on an AVX2-only CPU (see cpu_speed.py --as-on-avx2).
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

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("build", "first_call_extra", "first_validate_extra", "total")


def measure(artifacts: Path, overrides: list[str]) -> dict[str, float]:
    """One fresh trainer on Fashion-MNIST: seconds to build it, and the first call's and first validation's extra
    over later ones (32 steps a call, as the trainer runs them)."""
    import tensorflow as tf

    from stages.pipeline import run_data, run_model
    from stages.train.loop import build_trainer
    from tapeline.config import load_config

    config = load_config(None, ["data.source=fashion_mnist", *overrides])
    data = run_data(config, artifacts)
    model = run_model(config, data, artifacts)
    started = time.perf_counter()
    trainer = build_trainer(config, data, model, Path(tempfile.mkdtemp(prefix="tapeline-startup-")))
    build = time.perf_counter() - started
    iterator, steps = trainer.training_batches(0), tf.constant(32, tf.int64)
    calls = []
    for _ in range(3):
        started = time.perf_counter()
        trainer.steps.train(iterator, steps)
        trainer.steps.nonfinite_step.numpy()
        calls.append(time.perf_counter() - started)
    validations = []
    for _ in range(2):
        started = time.perf_counter()
        trainer.validate()
        validations.append(time.perf_counter() - started)
    first_call, first_validate = calls[0] - min(calls[1:]), validations[0] - validations[1]
    return {"build": build, "first_call_extra": first_call, "first_validate_extra": first_validate,
            "total": build + first_call + first_validate}


def run_in(tree: Path, artifacts: Path, overrides: list[str]) -> dict[str, float]:
    """`measure` in a fresh process importing tapeline from `tree`."""
    env = {**os.environ, "PYTHONPATH": str(tree), "TF_CPP_MIN_LOG_LEVEL": "3"}
    argv = [sys.executable, __file__, "--worker", str(artifacts), *[f"--set={o}" for o in overrides]]
    output = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in output.splitlines() if line.startswith("{")))


def baseline_tree(ref: str, where: Path) -> Path:
    """A worktree of `ref` under `where` (removed by `main` at the end)."""
    tree = where / "baseline"
    subprocess.run(["git", "worktree", "add", "--detach", "-f", str(tree), ref], cwd=ROOT, check=True,
                   capture_output=True)
    return tree


def medians(rows: list[dict[str, float]]) -> dict[str, float]:
    """The median of each part over rounds."""
    return {part: round(statistics.median(row[part] for row in rows), 3) for part in PARTS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", help="git ref to compare against")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(measure(args.worker, args.overrides)))
        return
    if not args.baseline:
        parser.error("--baseline is required")
    from benchmarks.lib import machine
    where = Path(tempfile.mkdtemp(prefix="tapeline-startup-bench-"))
    trees = {"baseline": baseline_tree(args.baseline, where), "this_checkout": ROOT}
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    try:
        for number in range(args.rounds):
            for name, tree in trees.items():
                rows[name].append(run_in(tree, where / f"artifacts-{name}", args.overrides))
                print(f"round {number + 1} {name}: " + ", ".join(f"{k} {v:.3f} s" for k, v in rows[name][-1].items()),
                      flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(trees["baseline"])], cwd=ROOT, check=False)
    summary: dict[str, Any] = {name: medians(found) for name, found in rows.items()}
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "baseline": args.baseline,
              "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"), "overrides": args.overrides,
              "rounds": rows, "medians": summary,
              "total_vs_baseline": round(summary["this_checkout"]["total"] / summary["baseline"]["total"], 3)}
    print(json.dumps(result["medians"], indent=2), "\ntotal vs baseline:", result["total_vs_baseline"])
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
