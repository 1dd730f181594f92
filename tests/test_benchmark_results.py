"""The benchmark results kept in the repository say which machine they were measured on (issue 21: a figure
holds for a CPU kind, not for tapeline in general)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages.hardware import FEATURES

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda p: p.name)
def test_every_result_names_its_machine(path: Path) -> None:
    machine = json.loads(path.read_text())["machine"]
    assert isinstance(machine["cpu"], str) and machine["cpu"] not in ("", "unknown")
    assert isinstance(machine["cores"], int) and machine["cores"] >= 1
    assert machine["isa"] and set(machine["isa"]) <= set(FEATURES)


def test_the_results_folder_is_not_empty() -> None:
    assert len(list(RESULTS.glob("*.json"))) >= 10


def test_the_avx2_stand_in_runs_contenders_as_an_avx2_cpu_would() -> None:
    from benchmarks.cpu_speed import STAGES, THROUGHPUT, as_on_avx2

    assert as_on_avx2(STAGES) == {
        # TensorFlow imported first keeps its own choice, which on an AVX2-only x86 CPU is Eigen (oneDNN off)
        "tutorial_loop": (True, {"TF_ENABLE_ONEDNN_OPTS": "0"}, None),
        "tapeline_v2_defaults": (True, {"TF_ENABLE_ONEDNN_OPTS": "0"}, ["preset=v2", "train.precision=float32"]),
        # tapeline's own choice stays (oneDNN on); `auto` would pick float32 there, so the float32 twin goes
        "tapeline_defaults": (False, {}, ["train.precision=float32"]),
    }
    emulated = as_on_avx2(THROUGHPUT)
    assert emulated["tapeline_tutorial_preset_onednn_off"][1] == {"TF_ENABLE_ONEDNN_OPTS": "0"}
    assert emulated["tapeline_tutorial_preset"] == (False, {}, ["preset=tutorial", "train.precision=float32"])
