"""The benchmark results kept in the repository say which machine they were measured on (issue 21: a figure
holds for a CPU kind, not for tapeline in general)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tapeline.hardware import FEATURES

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda p: p.name)
def test_every_result_names_its_machine(path: Path) -> None:
    machine = json.loads(path.read_text())["machine"]
    assert isinstance(machine["cpu"], str) and machine["cpu"] not in ("", "unknown")
    assert isinstance(machine["cores"], int) and machine["cores"] >= 1
    assert machine["isa"] and set(machine["isa"]) <= set(FEATURES)


def test_the_results_folder_is_not_empty() -> None:
    assert len(list(RESULTS.glob("*.json"))) >= 10


ROOT = RESULTS.parents[1]
PAGES_WITH_FIGURES = [ROOT / "benchmarks" / "README.md", ROOT / "README.md"]


def figure_rows(page: Path) -> list[dict[str, str]]:
    """The rows of every Markdown table on `page` that has a `results` column, as {column: cell}."""
    rows, header = [], None
    for line in page.read_text().splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif set(cells[0]) > {"-"} and "results" in header:
            rows.append(dict(zip(header, cells, strict=True)))
    return rows


@pytest.mark.parametrize("page", PAGES_WITH_FIGURES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_figure_in_the_docs_tables_has_a_results_file_of_that_date(page: Path) -> None:
    rows = figure_rows(page)
    assert rows, f"{page} has no figure table with a results column"
    for row in rows:
        name = row["results"].strip("`").rpartition("/")[2].rstrip(")").strip("`")
        result = json.loads((RESULTS / name).read_text())
        assert result["machine"]["cpu"] and result["date"] == row["date"], row
