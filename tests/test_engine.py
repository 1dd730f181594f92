"""The engine runs any graph, not only the training one: a two-stage graph of plain functions, its cache, its early
cutoff, its gate and its plan, on a directory store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tapeline import engine
from tapeline.config import PipelineConfig
from tapeline.engine import Graph, Stage
from tapeline.errors import MissingUpstreamError
from tapeline.results import StageInputs, StageResult

BUILT: list[str] = []


def build_parity(staging: Path, inputs: StageInputs) -> dict[str, Any]:
    """Writes the seed's parity: seeds 1 and 3 give the same bytes."""
    BUILT.append("parity")
    (staging / "parity.txt").write_text(str(inputs.config.seed % 2))
    return {"stage": "parity"}


def build_doubled(staging: Path, inputs: StageInputs) -> dict[str, Any]:
    """Reads its upstream's file and writes it doubled."""
    BUILT.append("doubled")
    parity = int((inputs.upstream["parity"].path / "parity.txt").read_text())
    (staging / "doubled.txt").write_text(str(2 * parity))
    return {"stage": "doubled", "doubled": 2 * parity}


def plain_result(path: Path, manifest: dict[str, Any], cached: bool, seconds: float) -> StageResult:
    return StageResult(stage=manifest["stage"], fingerprint=manifest["fingerprint"], path=path, cached=cached,
                       seconds=seconds)


def refuse_odd(result: StageResult) -> None:
    if (result.path / "doubled.txt").read_text() == "2":
        raise ValueError("odd parity refused")


TOY = Graph((
    Stage("parity", (), build_parity, plain_result, covers=("seed",), early_cutoff=True),
    Stage("doubled", ("parity",), build_doubled, plain_result, covers=()),
))


@pytest.fixture(autouse=True)
def fresh_log() -> None:
    BUILT.clear()


def run_toy(artifacts: Path, seed: int) -> StageResult:
    config = PipelineConfig(seed=seed)
    parity = engine.run_stage(TOY, "parity", config, artifacts)
    return engine.run_stage(TOY, "doubled", config, artifacts, {"parity": parity})


def test_a_graph_lists_each_stage_after_its_upstream() -> None:
    with pytest.raises(ValueError, match="^stage doubled comes before its upstream parity$"):
        Graph((TOY["doubled"], TOY["parity"]))
    assert TOY.names == ("parity", "doubled")


def test_the_engine_builds_a_graph_once_and_then_reuses_it(tmp_path: Path) -> None:
    first = run_toy(tmp_path, seed=1)
    again = run_toy(tmp_path, seed=1)
    assert BUILT == ["parity", "doubled"]
    assert (first.cached, again.cached) == (False, True)
    assert again.fingerprint == first.fingerprint
    assert (again.path / "doubled.txt").read_text() == "2"
    assert engine.output_is_valid(TOY, "doubled", PipelineConfig(seed=1), tmp_path)


def test_an_early_cutoff_stage_that_writes_the_same_bytes_keeps_its_dependents_cached(tmp_path: Path) -> None:
    run_toy(tmp_path, seed=1)
    BUILT.clear()
    same_bytes = run_toy(tmp_path, seed=3)  # another fingerprint for parity, the same file
    assert BUILT == ["parity"]
    assert same_bytes.cached
    other = run_toy(tmp_path, seed=2)
    assert BUILT == ["parity", "parity", "doubled"]
    assert (other.path / "doubled.txt").read_text() == "0"


def test_plan_of_any_graph_waits_on_an_early_cutoff_stage_not_built(tmp_path: Path) -> None:
    config = PipelineConfig(seed=5)
    before = engine.plan(TOY, config, tmp_path)
    assert before["would_run"] == ["parity", "doubled"]
    assert before["stages"]["doubled"]["waits_on"] == "parity"
    with pytest.raises(MissingUpstreamError, match="run `tapeline stage parity`"):
        engine.find_output(TOY, "doubled", config, tmp_path)
    run_toy(tmp_path, seed=5)
    assert engine.plan(TOY, config, tmp_path)["would_run"] == []
    assert BUILT == ["parity", "doubled"]


def test_a_gate_runs_on_a_cached_result_too(tmp_path: Path) -> None:
    gated = Graph((TOY["parity"], Stage("doubled", ("parity",), build_doubled, plain_result, covers=(),
                                        gate=refuse_odd)))
    config = PipelineConfig(seed=1)
    parity = engine.run_stage(gated, "parity", config, tmp_path)
    for _ in range(2):
        with pytest.raises(ValueError, match="odd parity refused"):
            engine.run_stage(gated, "doubled", config, tmp_path, {"parity": parity})
    assert BUILT == ["parity", "doubled"]
