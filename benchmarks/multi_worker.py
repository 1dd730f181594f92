"""Training throughput of 2 workers × 1 thread vs 1 worker × 2 threads (MultiWorkerMirroredStrategy over
loopback vs the default strategy), same config and global batch, the TFRecord stream for both. On a 2-core
machine no speed-up is expected: this shows what the all-reduce costs, the multi-worker tests show that it
is correct.

Each round trains `--epochs` epochs in a fresh `tapeline stage train` (the workers' epoch lines carry the
global img/s); rounds alternate A B A B; the first epoch of each round (tracing, cluster start-up) is left out.

    .venv/bin/python benchmarks/multi_worker.py [--rounds 2] [--epochs 3] [--limit 20000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from benchmarks.lib import machine  # noqa: E402

TAPELINE = str(Path(sys.executable).with_name("tapeline"))
EPOCH = re.compile(r"(?:\[worker 0\] .*)?tapeline.train INFO epoch (\d+): .*\(([\d.]+) s, (\d+) img/s\)")


def epoch_rates(output: str, workers: int) -> list[float]:
    """img/s of every epoch after the first, from the (chief's) epoch lines."""
    rows = []
    for line in output.splitlines():
        if workers > 1 and "[worker 0]" not in line:
            continue
        match = EPOCH.search(line)
        if match and int(match.group(1)) > 1:
            rows.append(float(match.group(3)))
    return rows


def train_round(artifacts: Path, overrides: list[str], workers: int, threads: int) -> list[float]:
    """One fresh training run; the img/s of its epochs after the first."""
    args = [a for o in [*overrides, f"train.workers={workers}"] for a in ("--set", o)]
    env = {**os.environ, "TF_NUM_INTRAOP_THREADS": str(threads), "TF_NUM_INTEROP_THREADS": "1",
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    shutil.rmtree(artifacts / "train", ignore_errors=True)
    done = subprocess.run([TAPELINE, "stage", "train", "--artifacts", str(artifacts), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return epoch_rates(done.stderr, workers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--limit", type=int, default=20000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    artifacts = Path(tempfile.mkdtemp(prefix="tapeline-mw-"))
    overrides = [f"data.limit={args.limit}", f"train.max_epochs={args.epochs}", "train.patience=100",
                 "train.input_pipeline=stream"]
    for stage in ("data", "validate", "model"):
        subprocess.run([TAPELINE, "stage", stage, "--artifacts", str(artifacts),
                        *(a for o in overrides for a in ("--set", o))], cwd=ROOT, check=True, capture_output=True)
    rates: dict[str, list[float]] = {"1_worker_x_2_threads": [], "2_workers_x_1_thread": []}
    for round_index in range(args.rounds):
        for name, workers, threads in (("1_worker_x_2_threads", 1, 2), ("2_workers_x_1_thread", 2, 1)):
            found = train_round(artifacts, overrides, workers, threads)
            rates[name].extend(found)
            print(f"round {round_index} {name}: {found} img/s", flush=True)
    medians = {name: round(statistics.median(values), 1) for name, values in rates.items()}
    summary = {"date": time.strftime("%Y-%m-%d"), "machine": machine(),
               "overrides": overrides, "images_per_second": rates,
               "median": medians,
               "ratio_2_workers_vs_1": round(medians["2_workers_x_1_thread"] / medians["1_worker_x_2_threads"], 3)}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
