"""The temporary Prefect API of `tapeline run`, `sweep` and `score` when no PREFECT_API_URL is set: Prefect's
own server app (as Prefect's temporary server runs it), in a child process tied to this one, so that a `kill -9`
of the command leaves no server behind (Prefect's own temporary server outlives it)."""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import MutableMapping
from pathlib import Path

from tapeline.errors import TapelineError
from tapeline.processes import start_child

log = logging.getLogger("tapeline.server")
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
APP = "prefect.server.api.server:create_app"


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _server_command(port: int) -> list[str]:
    """uvicorn serving Prefect's API app on 127.0.0.1:port."""
    spec = importlib.util.find_spec("prefect")
    assert spec is not None and spec.origin is not None
    return [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(spec.origin).parent.parent), "--factory", APP,
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"]


def _wait_until_healthy(process: subprocess.Popen, url: str, log_path: Path, timeout: float) -> None:
    """Poll the API's health route until it answers; TapelineError with the server's last lines if it ends."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] if log_path.exists() else []
            raise TapelineError(f"the temporary Prefect API did not start (exit status {process.returncode}"
                                f"{': ' + tail[0] if tail else ''}); start one with `prefect server start` and set "
                                "PREFECT_API_URL")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise TapelineError(f"the temporary Prefect API did not answer within {timeout:g} s; start one with `prefect "
                        "server start` and set PREFECT_API_URL")


def stop(process: subprocess.Popen, log_path: Path) -> None:
    """Terminate the server, then kill it if it lingers; remove its log."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    log_path.unlink(missing_ok=True)


def start_temporary_api(environ: MutableMapping[str, str] = os.environ, timeout: float = 120) -> str | None:
    """A Prefect API for this command: the user's (PREFECT_API_URL set: nothing started, returns None), else a
    temporary one tied to this process, its URL put in PREFECT_API_URL. It stops when this process exits, after
    Prefect has sent its last logs and events (its exit handlers, registered later, run first). Call it before
    Prefect is imported: Prefect reads its settings then."""
    if environ.get("PREFECT_API_URL"):
        return None
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    log_path = Path(tempfile.mkstemp(prefix="tapeline-prefect-api-", suffix=".log")[1])
    with log_path.open("ab") as out:
        process = start_child(_server_command(port), env={**environ, **SERVER_ENV}, stdout=out,
                              stderr=subprocess.STDOUT)
    atexit.register(stop, process, log_path)
    _wait_until_healthy(process, url, log_path, timeout)
    log.info("temporary Prefect API on %s (it ends with this command; set PREFECT_API_URL to use a server of "
             "your own)", url)
    environ["PREFECT_API_URL"] = url
    return url
