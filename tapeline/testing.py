"""What tests and benchmarks share (neither imports the other): synthetic IDX datasets and PNGs, a fast config,
a local SeaweedFS S3 server and an MLflow tracking server on free loopback ports. Like `prefect.testing`: for tests,
never for a run."""

from __future__ import annotations

import contextlib
import gzip
import io
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

import numpy as np

from tapeline.config import PipelineConfig, load_config


def idx_bytes(array: np.ndarray) -> bytes:
    """An array in MNIST IDX format (uint8 only)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


def synthetic_images(n: int, classes: int = 10, shape: tuple[int, ...] = (28, 28), seed: int = 0,
                     brightness: int = 0):
    """Images whose class is a bright horizontal band at a class-specific height, plus noise (raised by
    `brightness` grey levels)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    rng.shuffle(labels)
    images = rng.integers(brightness, 60 + brightness, size=(n, *shape), dtype=np.uint8)
    band = max(1, shape[0] // classes)
    for i, label in enumerate(labels):
        images[i, label * band : (label + 1) * band] = 220
    return images, labels.astype(np.uint8)


def write_idx_dir(directory: Path, n_train: int = 300, n_test: int = 100, gz: bool = False, seed: int = 0,
                  classes: int = 10, brightness: int = 0) -> Path:
    """The four MNIST-format files of a synthetic dataset."""
    directory.mkdir(parents=True, exist_ok=True)
    train_x, train_y = synthetic_images(n_train, classes, seed=seed, brightness=brightness)
    test_x, test_y = synthetic_images(n_test, classes, seed=seed + 1, brightness=brightness)
    files = {
        "train-images-idx3-ubyte": train_x, "train-labels-idx1-ubyte": train_y,
        "t10k-images-idx3-ubyte": test_x, "t10k-labels-idx1-ubyte": test_y,
    }
    for name, array in files.items():
        data = idx_bytes(array)
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (directory / name).write_bytes(data)
    return directory


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 image (H, W) or (H, W, 3) as PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def tiny_overrides(source: str, *more: str) -> list[str]:
    """`--set` overrides of a fast config: a small CNN, small batches, few epochs, and the v1 training recipe (no
    augmentation, plateau schedule, float32) that these tests were written against; tests of the current defaults
    drop the preset."""
    return ["preset=v1", f"data.source={source}", "data.batch_size=32", "data.shards=2", "data.shuffle_buffer=256",
            "model.conv_filters=[8, 16]", "model.dense_units=16", "train.max_epochs=3", "train.patience=2",
            "train.steps_per_execution=4", *more]


def tiny_config(source: str, *overrides: str) -> PipelineConfig:
    """The fast config of `tiny_overrides`."""
    return load_config(None, tiny_overrides(source, *overrides))

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


def _free_weed_port(taken: set[int]) -> int:
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
        """Stop the server (its whole process group). SeaweedFS takes 20 s to end on SIGTERM; a test server's data
        is thrown away, so it gets 3 s before SIGKILL."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def _answers_writes(server: S3Server) -> bool:
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


def _weed_binary() -> str:
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
        ports.add(_free_weed_port(ports))
    s3, master, volume, filer = sorted(ports)
    command = [_weed_binary(), "server", f"-dir={directory}", "-s3", f"-s3.port={s3}", f"-s3.config={config}",
               f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}", "-ip=127.0.0.1",
               "-ip.bind=127.0.0.1", "-metricsPort=0", "-s3.port.lance=0", "-s3.port.iceberg=0", "-s3.iam=false",
               # one collection per bucket, several volumes each: small volumes, and many of them
               "-master.volumeSizeLimitMB=64", "-volume.max=1000"]
    log = (directory / "weed.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(process, f"http://127.0.0.1:{s3}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if _answers_writes(server):
            return server
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"SeaweedFS did not start:\n{(directory / 'weed.log').read_text()[-3000:]}")


@dataclass
class MlflowServer:
    """A real `mlflow server` (SQLite backend store, local artifact root) in its own process group."""

    uri: str
    process: subprocess.Popen

    def stop(self) -> None:
        """End the server's whole process group (its job consumers outlive a kill of the server alone)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def start_mlflow_server(directory: Path, timeout: float = 180) -> MlflowServer:
    """`mlflow server` on a free loopback port with its store and artifacts under `directory`; waits for /health."""
    import httpx

    directory.mkdir(parents=True, exist_ok=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mlflow = Path(sys.executable).parent / "mlflow"
    log = (directory / "server.log").open("ab")
    process = subprocess.Popen(
        [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{directory / 'mlflow.db'}",
         "--default-artifact-root", str(directory / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = MlflowServer(f"http://127.0.0.1:{port}", process)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited {process.returncode}: "
                               f"{(directory / 'server.log').read_text()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.uri}/health", timeout=2).status_code == 200:
                return server
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"mlflow server did not answer within {timeout:g} s")
