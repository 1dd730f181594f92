"""Multi-worker training: which cluster this process belongs to (TF_CONFIG), and a local launcher that starts
N worker processes on free loopback ports, forwards their logs and reports the first one that failed.

A cluster launcher (a Kubeflow TFJob, a Kubernetes indexed Job, a JobSet) gives every worker a TF_CONFIG and
runs `tapeline stage train` in each; locally `tapeline stage train --workers N` (or `train.workers: N`) does
the same with subprocesses. Worker 0 is the chief: it alone commits the output and its checkpoints.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from tapeline.errors import ConfigError, TrainingError
from tapeline.processes import start_child

TF_CONFIG = "TF_CONFIG"
log = logging.getLogger("tapeline.cluster")


@dataclass(frozen=True)
class Cluster:
    """The worker addresses of a training cluster and this process's place in it."""

    workers: tuple[str, ...]
    index: int

    @property
    def size(self) -> int:
        """Number of workers."""
        return len(self.workers)

    @property
    def is_chief(self) -> bool:
        """Worker 0 commits outputs and checkpoints; the others keep theirs private."""
        return self.index == 0

    def name(self, index: int | None = None) -> str:
        """`worker I (HOST:PORT)`, for messages."""
        i = self.index if index is None else index
        return f"worker {i} ({self.workers[i]})"


def parse_tf_config(text: str) -> Cluster:
    """A Cluster from TF_CONFIG's JSON; ConfigError naming what is wrong (one line) otherwise.

    Accepted: {"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": i}}; a separate
    "chief" job is accepted too and becomes worker 0.
    """
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"TF_CONFIG is not valid JSON ({exc.msg} at character {exc.pos}); expected "
                          '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": 0}}'
                          ) from None
    if not isinstance(loaded, dict) or not isinstance(loaded.get("cluster"), dict):
        raise ConfigError('TF_CONFIG has no "cluster" mapping; expected {"cluster": {"worker": [...]}, "task": {...}}')
    jobs, task = loaded["cluster"], loaded.get("task")
    chief, workers = jobs.get("chief", []), jobs.get("worker", [])
    if not isinstance(chief, list) or not isinstance(workers, list) or not chief + workers:
        raise ConfigError('TF_CONFIG cluster.worker must be a non-empty list of "host:port" addresses')
    if len(chief) > 1:
        raise ConfigError(f"TF_CONFIG cluster.chief names {len(chief)} tasks; a cluster has at most one chief")
    addresses = tuple(chief + workers)
    for address in addresses:
        if not isinstance(address, str) or not re.fullmatch(r"[^\s:/]+:\d{1,5}", address) \
                or not 0 < int(address.rsplit(":", 1)[1]) < 65536:
            raise ConfigError(f"TF_CONFIG address {address!r} is not HOST:PORT")
    if len(set(addresses)) != len(addresses):
        raise ConfigError("TF_CONFIG names the same address twice; every worker needs its own host:port")
    if not isinstance(task, dict) or task.get("type") not in ("worker", "chief") \
            or not isinstance(task.get("index"), int) or isinstance(task.get("index"), bool):
        raise ConfigError('TF_CONFIG task must be {"type": "worker" or "chief", "index": N}')
    if task["type"] == "chief" and (not chief or task["index"] != 0):
        raise ConfigError("TF_CONFIG task is the chief, but cluster.chief does not list exactly that task")
    members = chief if task["type"] == "chief" else workers
    if not 0 <= task["index"] < len(members):
        raise ConfigError(f"TF_CONFIG task.index {task['index']} is outside cluster.{task['type']} "
                          f"({len(members)} addresses)")
    return Cluster(addresses, task["index"] + (len(chief) if task["type"] == "worker" else 0))


def current_cluster(environ: Mapping[str, str] = os.environ) -> Cluster | None:
    """The cluster TF_CONFIG describes, or None when it is unset or empty."""
    text = environ.get(TF_CONFIG, "").strip()
    return parse_tf_config(text) if text else None


def check_workers(cluster: Cluster | None, workers: int) -> None:
    """TF_CONFIG and `train.workers` must agree: the worker count is part of the train fingerprint."""
    if cluster is not None and cluster.size != workers:
        raise ConfigError(
            f"TF_CONFIG names {cluster.size} workers but train.workers is {workers}; set train.workers={cluster.size} "
            "(--set train.workers=N) on every worker: the output's fingerprint records how it was trained"
        )


def check_port_free(cluster: Cluster) -> None:
    """ConfigError when this worker's port is taken: TensorFlow would otherwise fail deep inside gRPC."""
    port = int(cluster.workers[cluster.index].rsplit(":", 1)[1])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise ConfigError(f"TF_CONFIG gives {cluster.name()} port {port}, which another process is using; "
                              "free it or give this worker another port") from None


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on the loopback interface (held open together so they differ)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def local_tf_configs(count: int) -> list[str]:
    """TF_CONFIG of each of `count` workers on loopback ports."""
    workers = [f"127.0.0.1:{port}" for port in free_ports(count)]
    return [json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}})
            for i in range(count)]


def _failed_worker(message: str) -> int | None:
    """The worker a TensorFlow collective error blames (`/job:worker/replica:0/task:1` → 1), if any."""
    found = re.search(r"/job:(?:worker|chief)/(?:replica:\d+/)?task:(\d+)", message)
    return int(found.group(1)) if found else None


def _lost_peer_reason(text: str, timeout: float) -> str:
    """How TensorFlow noticed a peer was gone, in a few words."""
    if "heartbeat" in text:
        return "stopped sending heartbeats"
    if any(sign in text for sign in ("Socket closed", "Connection reset", "failed to connect", "Connection refused",
                                     "UNAVAILABLE", "unavailable")):
        return "dropped its connection"
    if "Deadline" in text or "deadline" in text or "timed out" in text:
        return f"did not answer within train.worker_timeout_seconds={timeout:g}"
    return "stopped answering"


def worker_failure(cluster: Cluster, exc: BaseException, timeout: float) -> TrainingError:
    """The one error a worker raises when a peer died or stopped answering (TensorFlow's own message, long and
    multi-line, is logged as a warning)."""
    text = str(exc)
    condensed = " ".join(text.split())
    shown = condensed if len(condensed) <= 800 else f"{condensed[:200]} … {condensed[-600:]}"
    log.warning("TensorFlow reported: %s", shown)
    blamed = _failed_worker(text.split("The error could be from")[0])
    who = cluster.name(blamed) if blamed is not None and blamed < cluster.size and blamed != cluster.index \
        else "another worker"
    return TrainingError(
        f"{who} {_lost_peer_reason(text, timeout)}; {cluster.name()} stopped too. Run the same command on every "
        "worker again: each resumes from the chief's last checkpoint"
    )


# ---------------------------------------------------------------- local launcher

def forward(stream: TextIO, prefix: str, sink: logging.Logger) -> None:
    """Log every line of a worker's output with its prefix."""
    for line in stream:
        line = line.rstrip("\n")
        if line:
            sink.info("%s %s", prefix, line)


def _describe_exit(code: int) -> str:
    """`exit status 2`, or `killed by SIGKILL`."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


def launch_local_workers(argv: Sequence[str], count: int, timeout: float, env: Mapping[str, str] | None = None,
                         cwd: Path | None = None) -> None:
    """Run `argv` as `count` worker processes with TF_CONFIG on loopback ports and wait for all of them.

    Their output is logged line by line as `[worker I] …`. When one fails, the others get `timeout` seconds to
    notice and stop by themselves (TensorFlow's heartbeats), then are terminated; the TrainingError names the
    first worker that failed.
    """
    base = dict(os.environ if env is None else env)
    processes: list[subprocess.Popen[str]] = []
    threads: list[threading.Thread] = []
    try:
        for index, tf_config in enumerate(local_tf_configs(count)):
            process = start_child(argv, env={**base, TF_CONFIG: tf_config}, cwd=cwd, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)
            processes.append(process)
            thread = threading.Thread(target=forward, args=(process.stdout, f"[worker {index}]", log), daemon=True)
            thread.start()
            threads.append(thread)
        first_failure = wait_for_workers(processes, timeout)
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
            if process.poll() is None:
                process.kill()
                process.wait()
        for thread in threads:
            thread.join(timeout=5)
    if first_failure is not None:
        index, code = first_failure
        raise TrainingError(f"worker {index} of {count} failed ({_describe_exit(code)}); see its [worker {index}] "
                            "lines above. Run the same command again to resume from the chief's last checkpoint")


def wait_for_workers(processes: Sequence[subprocess.Popen[str]], timeout: float) -> tuple[int, int] | None:
    """Wait until every process has exited, or until `timeout` after the first failure; (index, exit code) of
    the first failure, None when all succeeded."""
    first: tuple[int, int] | None = None
    deadline = float("inf")
    while time.monotonic() < deadline:
        codes = [p.poll() for p in processes]
        if first is None:
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                first = failed[0]
                deadline = time.monotonic() + timeout
        if all(c is not None for c in codes):
            break
        time.sleep(0.2)
    return first


def worker_command(config_file: Path, artifacts: str) -> list[str]:
    """The command a local worker runs: the train stage of this config, in a fresh interpreter."""
    return [sys.executable, "-m", "stages.train.worker", str(config_file), artifacts]
