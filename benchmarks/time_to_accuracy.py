"""Time to accuracy on Fashion-MNIST, every contender in one run on the same machine: seconds from the start of
training until validation accuracy first reaches 0.90 and 0.92, the final test accuracy, and for tapeline the
train stage's wall time. Contenders: the tutorial's loop as written, Keras `fit` on the tutorial's model,
tapeline with the `tutorial` preset (the seed's settings), tapeline `v1` (the defaults before the speed work,
kept as a preset so this comparison can be rerun), tapeline's defaults and the `fast` preset.

Each contender checks the validation split after every epoch (tapeline's split for all, so nothing leaks).
The tutorial loop and Keras fit train --max-epochs epochs; tapeline contenders train to their own end (early
stopping, or the end of the cosine schedule), capped at --max-epochs for the constant-rate `tutorial` preset.

    .venv/bin/python benchmarks/time_to_accuracy.py [--max-epochs 15] [--only NAME ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from benchmarks.lib import (
    fit_contender,
    loop_contender,
    machine,
    prepare_data,
    ratio,
    stage_contender,
    tutorial_contender,
)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
TAPELINE_CONTENDERS = {
    "tapeline_tutorial_preset": ["preset=tutorial"],
    "tapeline_v1": ["preset=v1"],
    "tapeline_defaults": [],
    "tapeline_fast_preset": ["preset=fast"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-epochs", type=int, default=15)
    parser.add_argument("--only", action="append", help="run only these contenders")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import keras

    from stages.data.readers import load_split

    keras.utils.set_random_seed(0)
    config, data, train, validation = prepare_data(None, Path(tempfile.mkdtemp(prefix="tapeline-tta-data-")))
    test = load_split(data.path, "test", normalize=True)
    loops = {"tutorial_loop": tutorial_contender, "keras_fit": fit_contender}
    wanted = args.only or [*loops, *TAPELINE_CONTENDERS]
    results: dict[str, dict] = {}
    for name in wanted:
        if name in loops:
            results[name] = loop_contender(name, loops[name], train, validation, test, args.max_epochs)
        else:
            results[name] = stage_contender(name, config.data.source, TAPELINE_CONTENDERS[name], args.max_epochs)
        print(name, json.dumps(results[name]), flush=True)
    tutorial, v1, defaults = (results.get(n, {}) for n in ("tutorial_loop", "tapeline_v1", "tapeline_defaults"))
    summary = {
        "date": time.strftime("%Y-%m-%d"), "machine": machine(), "max_epochs": args.max_epochs, "results": results,
        "defaults_seconds_to_0.90_vs_tutorial_loop": ratio(defaults.get("seconds_to", {}).get("0.90"),
                                                           tutorial.get("seconds_to", {}).get("0.90")),
        "defaults_train_stage_vs_v1": ratio(defaults.get("train_seconds"), v1.get("train_seconds")),
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
