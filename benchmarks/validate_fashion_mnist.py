"""The validate stage on full Fashion-MNIST: does the default run pass, and how long does the check take
warm (TensorFlow loaded, the data stage's output cached)? Copies the report and its class histogram
into benchmarks/results/ for the README.

    .venv/bin/python benchmarks/validate_fashion_mnist.py [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
from benchmarks.lib import machine  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    """Build the data output, then time the validate build `--repeats` times in this process."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from stages.graph import run_stage
    from stages.validate import build_validate
    from tapeline.config import load_config
    from tapeline.results import StageInputs

    config = load_config()
    artifacts = Path(tempfile.mkdtemp(prefix="tapeline-validate-bench-"))
    data = run_stage("data", config, artifacts)
    seconds, report = [], {}
    for i in range(args.repeats + 1):  # the first build warms TensorFlow's reader up
        staging = artifacts / f"staging-{i}"
        staging.mkdir()
        started = time.perf_counter()
        build_validate(staging, StageInputs(config, {"data": data}))
        if i:
            seconds.append(time.perf_counter() - started)
        report = json.loads((staging / "report.json").read_text())
    RESULTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(staging / "report.md", RESULTS / "validate_fashion_mnist_report.md")
    shutil.copy(staging / "class_histogram.png", RESULTS / "validate_fashion_mnist_class_histogram.png")
    summary = {"date": time.strftime("%Y-%m-%d"), "machine": machine(),
               "records": report["records"], "passed": report["passed"],
               "anomalies": {a["kind"]: [a["severity"], a["count"]] for a in report["anomalies"]},
               "duplicates": report["duplicates"], "warm_seconds": [round(s, 2) for s in seconds],
               "warm_median_seconds": round(statistics.median(seconds), 2)}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
