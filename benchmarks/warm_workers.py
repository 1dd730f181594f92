"""Warm trial workers against a process per trial: the per-trial overhead (from the end of one trial's last epoch
to the start of the next trial's first epoch, the same architecture) and a warm worker's resident memory across
trials, from the trials' own logs.

`python -m benchmarks.warm_workers --trials 24 --process-trials 8` runs the same sweep twice on Fashion-MNIST
(the default CNN, `train.learning_rate` searched, 2 epochs a trial, no pruner, one trial at a time): once with
`sweep.trials_per_worker=1` (a process per trial, tapeline's behaviour before warm workers) and once with one warm
worker for every trial; medians of the gaps between consecutive trials.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.lib import ROOT, epoch_ends, machine

MEMORY = re.compile(r"trial (\d+) done in this worker \((\d+) so far\); resident memory (\d+) MiB")


def gaps(logs: Path, trials: int) -> list[float]:
    """Seconds from the end of trial k's last epoch to the start of trial k+1's first epoch."""
    ends = [epoch_ends(logs / f"trial-{n:05d}.log") for n in range(trials)]
    return [round((following[0][0] - following[0][2]) - previous[-1][0], 3)
            for previous, following in zip(ends, ends[1:], strict=False) if previous and following]


def sweep(artifacts: Path, trials: int, per_worker: int, limit: int) -> dict[str, Any]:
    """One sweep of `trials` 2-epoch trials; its gaps and, for warm workers, the memory after each trial."""
    from sweeps.driver import run_sweep
    from tapeline.config import load_config

    config = load_config(None, [f"data.limit={limit}", "train.max_epochs=2", "sweep.pruner=none",
                                f"sweep.trials={trials}", f"sweep.trials_per_worker={per_worker}",
                                "sweep.worker_max_growth_mib=100000",
                                "sweep.space.train.learning_rate={float: [0.0005, 0.005], log: true}"])
    started = time.perf_counter()
    outcome = run_sweep(config, artifacts)
    seconds = time.perf_counter() - started
    logs = artifacts / "sweeps" / outcome.name / "logs"
    memory = {}
    workers = logs / "workers.log"
    if workers.exists():
        for match in MEMORY.finditer(workers.read_text(errors="replace")):
            memory[int(match.group(2))] = int(match.group(3))
    found = gaps(logs, trials)
    return {"trials": trials, "trials_per_worker": per_worker, "seconds": round(seconds, 1), "gaps": found,
            "median_gap": statistics.median(found) if found else None, "rss_mib_after_trials": memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--process-trials", type=int, default=8)
    parser.add_argument("--limit", type=int, default=4000)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "warm_workers.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tapeline-bench-warm-") as tmp:
        process = sweep(Path(tmp) / "process", args.process_trials, 1, args.limit) if args.process_trials else None
        warm = sweep(Path(tmp) / "warm", args.trials, args.trials, args.limit)
    memory = warm["rss_mib_after_trials"]
    growth = round(memory[args.trials] / memory[2] - 1, 4) if {2, args.trials} <= memory.keys() else None
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"),
              "command": f"python -m benchmarks.warm_workers --trials {args.trials} --process-trials "
                         f"{args.process_trials} --limit {args.limit}",
              "process_per_trial": process, "warm_worker": warm, "rss_growth_2_to_last": growth}
    print(json.dumps(result, indent=2))
    args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
