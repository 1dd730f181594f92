"""Pipeline overhead: wall time of a fully cached `tapeline run` (ephemeral Prefect API, then a
running server), the data stage's cold build of Fashion-MNIST, and TFRecord read throughput.

    .venv/bin/python benchmarks/pipeline_overhead.py [--repeats 3] [--train-ips N | --train-json FILE] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
from benchmarks.lib import machine  # noqa: E402

TAPELINE = str(Path(sys.executable).with_name("tapeline"))
PREFECT = str(Path(sys.executable).with_name("prefect"))
TINY = ["--set", "data.shards=2", "--set", "model.conv_filters=[8,16]", "--set", "model.dense_units=16",
        "--set", "train.max_epochs=1"]


def run_seconds(args: list[str], env: dict[str, str]) -> float:
    """Wall seconds of one command, which must succeed."""
    started = time.perf_counter()
    done = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - started


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cached_run_times(repeats: int, workdir: Path) -> dict:
    """Median wall time of a fully cached `tapeline run` on a tiny dataset, ephemeral vs server."""
    import httpx

    from tapeline.testing import write_idx_dir

    source = write_idx_dir(workdir / "idx")
    env = {**os.environ, "PREFECT_HOME": str(workdir / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("PREFECT_API_URL", None)
    command = [TAPELINE, "run", "--artifacts", str(workdir / "artifacts"), "--set", f"data.source=idx:{source}", *TINY]
    first = run_seconds(command, env)
    ephemeral = [run_seconds(command, env) for _ in range(repeats)]
    port = free_port()
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        api = f"http://127.0.0.1:{port}/api"
        for _ in range(240):
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        served = [run_seconds(command, {**env, "PREFECT_API_URL": api}) for _ in range(repeats)]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    return {"first_run_seconds": round(first, 1), "cached_ephemeral_seconds": [round(s, 2) for s in ephemeral],
            "cached_ephemeral_median": round(statistics.median(ephemeral), 2),
            "cached_server_seconds": [round(s, 2) for s in served],
            "cached_server_median": round(statistics.median(served), 2)}


def data_stage_times(repeats: int, workdir: Path) -> dict:
    """Cold builds of the Fashion-MNIST cache: decode (IDX gz) and split+write seconds, from the manifests."""
    from stages.data.readers import make_dataset
    from stages.pipeline import run_data
    from tapeline.cache import read_manifest
    from tapeline.config import load_config

    config = load_config()
    loads, writes, totals = [], [], []
    for i in range(repeats):
        result = run_data(config, workdir / f"data-{i}")
        seconds = read_manifest(result.path)["seconds"]
        loads.append(seconds["load"])
        writes.append(seconds["split_and_write"])
        totals.append(result.seconds)
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        count = sum(int(y.shape[0]) for _, y in make_dataset(result.path, "train", 32, training=True))
        rates.append(count / (time.perf_counter() - started))
    return {"decode_seconds_median": round(statistics.median(loads), 2),
            "write_seconds_after_decoding_median": round(statistics.median(writes), 2),
            "cold_build_seconds_median": round(statistics.median(totals), 2),
            "reader_images_per_second": [round(r) for r in rates],
            "reader_images_per_second_median": round(statistics.median(rates))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-ips", type=float, help="training img/s to compare the reader with")
    parser.add_argument("--train-json", type=Path, help="train_throughput.py --json output to take it from")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="tapeline-overhead-"))
    summary = {"date": time.strftime("%Y-%m-%d"), "machine": machine(),
               "cached_run": cached_run_times(args.repeats, workdir),
               "data_stage": data_stage_times(args.repeats, workdir)}
    train_ips = args.train_ips
    if args.train_json:
        train_ips = json.loads(args.train_json.read_text())["results"]["tapeline"]["median"]
    if train_ips:
        summary["reader_vs_training_throughput"] = round(
            summary["data_stage"]["reader_images_per_second_median"] / train_ips, 1)
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
