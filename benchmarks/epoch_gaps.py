"""Time lost between epochs: the wall time from one epoch's log line to the next minus that epoch's training
seconds, as a share of those seconds, under `tapeline stage train`, `tapeline run` with Prefect's ephemeral
API, and `tapeline run` against a real Prefect server (started here). Lines are timestamped as they arrive
(the output is read live), so the figure depends on no log format. What is between two epoch lines:
validation, early stopping, the checkpoint write and the log call; TensorBoard events, the Prefect progress
artifact and uploads run beside the next epoch.

    .venv/bin/python benchmarks/epoch_gaps.py [--epochs 6] [--set KEY=VALUE ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from benchmarks.lib import machine  # noqa: E402
from tapeline.cluster import free_ports  # noqa: E402

TAPELINE = str(Path(sys.executable).with_name("tapeline"))
EPOCH_LINE = re.compile(r"epoch (\d+): loss .*\(([\d.]+) s, \d+ img/s\)")


def epoch_arrivals(command: list[str], env: dict[str, str]) -> list[tuple[float, int, float]]:
    """Run `command`, returning (arrival time, epoch, training seconds) of each epoch line it prints."""
    rows: list[tuple[float, int, float]] = []
    with subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as process:
        assert process.stdout is not None
        for line in process.stdout:
            match = EPOCH_LINE.search(line)
            if match and int(match.group(1)) not in {epoch for _, epoch, _ in rows}:
                rows.append((time.monotonic(), int(match.group(1)), float(match.group(2))))
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed with exit status {process.returncode}")
    return rows


def gap_shares(rows: list[tuple[float, int, float]]) -> list[float]:
    """For every epoch after the first: (time since the previous epoch line - training seconds) / training seconds."""
    return [round((t - t_before - seconds) / seconds, 4)
            for (t_before, _, _), (t, _, seconds) in zip(rows, rows[1:], strict=False)]


def summary_of(shares: list[float]) -> dict:
    """Median and worst share, and every share."""
    return {"median": round(statistics.median(shares), 4), "worst": round(max(shares), 4), "shares": shares}


def start_server(env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """A Prefect server on a free port with its own database; returns it and its API URL once healthy."""
    [port] = free_ports(1)
    server = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "server", "start", "--host",
                               "127.0.0.1", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return server, url
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("the Prefect server did not answer within 120 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    config = [a for o in [f"train.max_epochs={args.epochs}", "train.patience=100", *args.overrides]
              for a in ("--set", o)]
    work = Path(tempfile.mkdtemp(prefix="tapeline-gaps-"))
    base_env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TF_CPP_MIN_LOG_LEVEL": "3",
                "PREFECT_HOME": str(work / "prefect-home")}
    base_env.pop("PREFECT_API_URL", None)
    results: dict[str, dict] = {}

    stage_dir = str(work / "stage")
    for stage in ("data", "validate", "model"):
        subprocess.run([TAPELINE, "stage", stage, "--artifacts", stage_dir, *config], env=base_env, cwd=ROOT,
                       check=True, capture_output=True)
    rows = epoch_arrivals([TAPELINE, "stage", "train", "--artifacts", stage_dir, *config], base_env)
    results["stage_train"] = summary_of(gap_shares(rows))
    print("tapeline stage train", results["stage_train"], flush=True)

    rows = epoch_arrivals([TAPELINE, "run", "--artifacts", str(work / "ephemeral"), *config], base_env)
    results["run_ephemeral_api"] = summary_of(gap_shares(rows))
    print("tapeline run (ephemeral API)", results["run_ephemeral_api"], flush=True)

    server, url = start_server(base_env)
    try:
        rows = epoch_arrivals([TAPELINE, "run", "--artifacts", str(work / "server"), *config],
                              {**base_env, "PREFECT_API_URL": url})
    finally:
        server.terminate()
        server.wait(timeout=30)
    results["run_real_server"] = summary_of(gap_shares(rows))
    print("tapeline run (real server)", results["run_real_server"], flush=True)

    summary = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "epochs": args.epochs,
               "overrides": args.overrides, "results": results}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
