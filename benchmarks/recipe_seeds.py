"""Is a recipe's accuracy difference bigger than the seed's? Each recipe's train stage on Fashion-MNIST, once per
seed (`seed` moves the validation split, the initial weights and the shuffle; the 10,000 test images stay), every
run in a fresh process as `benchmarks/cpu_speed.py` runs its train-stage contenders, seeds interleaved
(A B C … per seed). Reports each recipe's test accuracy (mean, sample standard deviation, every value), train-stage
seconds and seconds to 0.90 validation accuracy (medians), and each recipe's mean accuracy difference from the
first recipe with its standard error, on the machine it ran on.

    .venv/bin/python benchmarks/recipe_seeds.py [--seeds 0 1 2] [--recipe "NAME=KEY=VALUE KEY=VALUE" ...]
        [--json out.json]

Without --recipe: `v2` (the defaults until 2026-12-02, in the precision `auto` picked then) against the defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.lib import TARGET, Worker, overrides_argv, v2_precision


def default_recipes(isa: list[str]) -> dict[str, list[str]]:
    """The v2 recipe as users had it on this CPU, and today's defaults."""
    return {"v2": ["preset=v2", v2_precision(isa)], "defaults": []}


def parse_recipe(text: str) -> tuple[str, list[str]]:
    """`NAME=KEY=VALUE KEY=VALUE` as (NAME, [KEY=VALUE, …]) (spaces between keys: values hold commas);
    `NAME=` is the defaults."""
    name, _, overrides = text.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"recipe {text!r}: write NAME=KEY=VALUE KEY=VALUE (NAME= for the defaults)")
    return name, overrides.split()


def mean_difference(values: list[float], reference: list[float]) -> tuple[float, float | None]:
    """(mean(values) - mean(reference), its standard error from the two sample variances; None under 2 each)."""
    difference = statistics.fmean(values) - statistics.fmean(reference)
    if len(values) < 2 or len(reference) < 2:
        return difference, None
    error = math.sqrt(statistics.variance(values) / len(values) + statistics.variance(reference) / len(reference))
    return difference, error


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One recipe's runs as accuracy mean/sd/values and median seconds."""
    accuracies = [r["test_accuracy"] for r in runs]
    reached = [r["seconds_to"][f"{TARGET:.2f}"] for r in runs if r["seconds_to"][f"{TARGET:.2f}"] is not None]
    return {
        "test_accuracy": accuracies,
        "test_accuracy_mean": round(statistics.fmean(accuracies), 4),
        "test_accuracy_sd": round(statistics.stdev(accuracies), 4) if len(accuracies) > 1 else None,
        "train_seconds_median": round(statistics.median(r["train_seconds"] for r in runs), 1),
        "seconds_to_0.90_median": round(statistics.median(reached), 1) if reached else None,
        "epochs_to_0.90": [r["epochs_to"][f"{TARGET:.2f}"] for r in runs],
        "epochs_run": [r["epochs_run"] for r in runs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipe", type=parse_recipe, action="append", help="NAME=KEY=VALUE KEY=VALUE (quoted)")
    parser.add_argument("--max-epochs", type=int, default=15)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from tapeline.hardware import cpu

    recipes = dict(args.recipe) if args.recipe else default_recipes(cpu()["isa"])
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in recipes}
    machine: dict[str, Any] = {}
    for seed in args.seeds:
        for name, overrides in recipes.items():
            worker = Worker(["--worker", "stage", f"--max-epochs={args.max_epochs}",
                             *overrides_argv([*overrides, f"seed={seed}"])], False, {})
            row = worker.ask()
            worker.close()
            machine = row.pop("machine")
            runs[name].append({"seed": seed, **row})
            print(f"seed {seed} {name}: test {row['test_accuracy']}, train {row['train_seconds']} s, "
                  f"to {TARGET} {row['seconds_to'][f'{TARGET:.2f}']} s", flush=True)
    reference = next(iter(recipes))
    summary: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": machine, "seeds": args.seeds,
                               "recipes": recipes, "runs": runs, "summary": {}}
    for name in recipes:
        row = summarize(runs[name])
        difference, error = mean_difference(row["test_accuracy"], [r["test_accuracy"] for r in runs[reference]])
        row[f"accuracy_minus_{reference}"] = round(difference, 4)
        row["standard_error"] = None if error is None else round(error, 4)
        summary["summary"][name] = row
    print(json.dumps(summary["summary"], indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
