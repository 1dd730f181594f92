"""Shared fixtures: quiet TF logs and synthetic datasets."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests.helpers import write_idx_dir  # noqa: E402


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
