"""Shared fixtures (quiet TF logs, synthetic datasets, one Prefect test server, SeaweedFS) and the two tiers: every
test that needs a server or runs `tapeline` in a subprocess is `slow`; `make test-fast` runs the others."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tapeline.hardware import onednn_origin  # noqa: E402
from tapeline.testing import write_idx_dir  # noqa: E402

onednn_origin()  # as every entry point does before TensorFlow is imported
SERVER_FIXTURES = frozenset({"harness", "prefect_api", "s3_server", "s3_url", "mlflow_uri"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `slow` what the fast tier leaves out: the scenario suites, and any test that uses a server."""
    for item in items:
        if "scenarios" in item.path.parts or SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def idx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic 300/100 IDX dataset (read-only by convention)."""
    return write_idx_dir(tmp_path_factory.mktemp("idx"))


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    """A fresh artifacts directory."""
    return tmp_path / "artifacts"


@pytest.fixture(scope="session")
def harness():
    """One Prefect test server for the session (it takes ~20 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


@pytest.fixture(scope="session")
def prefect_api(harness) -> str:
    """The session's Prefect API (the harness's server) for `tapeline run` subprocesses: with PREFECT_API_URL set
    they use it, instead of each starting a temporary API of its own (about 20 s of CPU apiece). Tests of the
    temporary API itself leave the variable out."""
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value())


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """One real S3-compatible server (SeaweedFS) for the session, stopped at the end."""
    from tapeline.testing import start_s3_server

    server = start_s3_server(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture
def s3_url(s3_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    """A fresh bucket on the session's S3 server, its URL, and this process pointed at it (AWS settings,
    an empty read cache)."""
    import re
    import uuid

    import fsspec

    from tapeline.store import open_remote

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("TAPELINE_CACHE_DIR", str(tmp_path / "read-cache"))
    open_remote.cache_clear()
    bucket = f"t-{re.sub(r'[^a-z0-9]', '-', request.node.name.lower())[:40]}-{uuid.uuid4().hex[:6]}"
    fsspec.filesystem("s3").mkdir(bucket)
    yield f"s3://{bucket}/tapeline"
    open_remote.cache_clear()
