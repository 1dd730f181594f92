"""Artifacts on S3 vs on local disk, side by side in one script run, against a real S3 server (SeaweedFS
on loopback, started here): a fully cached `tapeline run`, the data stage's cold build on Fashion-MNIST,
and the read cache's fill rate.

    .venv/bin/python benchmarks/object_store.py [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
from benchmarks.lib import machine  # noqa: E402

TAPELINE = str(Path(sys.executable).with_name("tapeline"))


def new_bucket() -> str:
    """A fresh bucket; its URL with a prefix."""
    import fsspec

    bucket = f"bench-{uuid.uuid4().hex[:10]}"
    fsspec.filesystem("s3").mkdir(bucket)
    return f"s3://{bucket}/tapeline"


def timed_run(artifacts: str, overrides: list[str], env: dict[str, str], cwd: Path) -> float:
    """Wall seconds of one `tapeline run` in a fresh process."""
    started = time.perf_counter()
    done = subprocess.run([TAPELINE, "run", "--artifacts", artifacts, *overrides, "--json"], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    return seconds if summary["all_cached"] else float("nan")


def cached_runs(work: Path, repeats: int) -> dict[str, list[float]]:
    """A fully cached run on local disk and on S3, interleaved (tiny synthetic data, the full pipeline)."""
    from tapeline.testing import tiny_overrides, write_idx_dir

    source = write_idx_dir(work / "tiny")
    overrides = [a for o in tiny_overrides(f"idx:{source}", "train.max_epochs=2") for a in ("--set", o)]
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "TAPELINE_CACHE_DIR": str(work / "read-cache")}
    env.pop("PREFECT_API_URL", None)
    stores = {"local": str(work / "artifacts"), "s3": new_bucket()}
    for artifacts in stores.values():  # build once; the timed runs are all cache hits
        subprocess.run([TAPELINE, "run", "--artifacts", artifacts, *overrides], env=env, cwd=work,
                       capture_output=True, check=True, timeout=900)
    seconds: dict[str, list[float]] = {name: [] for name in stores}
    for _ in range(repeats):
        for name, artifacts in stores.items():
            seconds[name].append(timed_run(artifacts, overrides, env, work))
    return seconds


def data_builds(work: Path, repeats: int) -> tuple[dict[str, list[float]], list[float], int]:
    """Cold data-stage builds (Fashion-MNIST) on local disk and on S3, interleaved; then read-cache fills."""
    from stages.graph import fingerprints, run_stage
    from tapeline.config import load_config
    from tapeline.store import open_store

    config = load_config()
    seconds: dict[str, list[float]] = {"local": [], "s3": []}
    fills: list[float] = []
    size = 0
    for i in range(repeats):
        for name in seconds:
            os.environ["TAPELINE_CACHE_DIR"] = str(work / f"cache-{name}-{i}")
            artifacts = str(work / f"data-{i}") if name == "local" else new_bucket()
            started = time.perf_counter()
            result = run_stage("data", config, artifacts)
            seconds[name].append(time.perf_counter() - started)
            if name == "s3":
                size = sum(p.stat().st_size for p in result.path.rglob("*") if p.is_file())
                os.environ["TAPELINE_CACHE_DIR"] = str(work / f"fill-{i}")  # another machine: empty cache
                started = time.perf_counter()
                open_store(artifacts).fetch("data", fingerprints(config, artifacts)["data"])
                fills.append(size / 1e6 / (time.perf_counter() - started))
            shutil.rmtree(work / f"cache-{name}-{i}", ignore_errors=True)
    return seconds, fills, size


def main() -> None:
    """Run every measurement and print (and optionally write) the medians and ratios."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from tapeline.testing import start_s3_server

    work = Path(tempfile.mkdtemp(prefix="tapeline-s3-bench-"))
    server = start_s3_server(work / "seaweedfs")
    os.environ.update(server.env())
    try:
        runs = cached_runs(work, args.repeats)
        builds, fills, size = data_builds(work, args.repeats)
    finally:
        server.stop()
    median = {k: round(statistics.median(v), 2) for k, v in runs.items()}
    build_median = {k: round(statistics.median(v), 2) for k, v in builds.items()}
    summary = {
        "date": time.strftime("%Y-%m-%d"), "machine": machine(), "repeats": args.repeats,
        "cached_run_seconds": {k: [round(x, 2) for x in v] for k, v in runs.items()},
        "cached_run_median": median, "cached_run_ratio_s3_vs_local": round(median["s3"] / median["local"], 3),
        "data_build_seconds": {k: [round(x, 2) for x in v] for k, v in builds.items()},
        "data_build_median": build_median,
        "data_build_ratio_s3_vs_local": round(build_median["s3"] / build_median["local"], 3),
        "data_output_megabytes": round(size / 1e6, 1),
        "read_cache_fill_megabytes_per_second": [round(x, 1) for x in fills],
        "read_cache_fill_median": round(statistics.median(fills), 1),
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
