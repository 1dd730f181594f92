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
