"""The training graph: the one declaration of every training stage. The engine that runs a graph (fingerprints,
the cache, early cutoff, gates, distributed stages, `plan`) is `tapeline.engine`; the functions below run this
graph on it.

Each `Stage` names its upstream stages, its build function, how a result is read back from its manifest, what
config its fingerprint covers, and what it reads from outside its upstream outputs (`external`). Everything else
derives from `GRAPH`: the CLI's stage names, `run_stage`, `find_output`, output paths, `plan`, `run_all` and the
Prefect flow. Adding a stage is one module with a `build_*` and a `*_result` function, plus one entry here.

The data stage is `early_cutoff` (its records are framed by hand, byte-reproducible): its dependents key on its
content, so a data stage that runs again and writes the same bytes leaves them cached. Validate's `gate` stops the
run before the model stage when the report has errors (the report is kept); train is resumable and distributed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stages.data.stage import build_data, data_result, source_identity
from stages.evaluate import build_evaluation, evaluate_result
from stages.export import build_export, export_result
from stages.model import build_model_dir, model_result
from stages.train.stage import build_train_dir, train_result
from stages.train.warm_start import init_identity
from stages.validate import baseline_identity, build_validate, ensure_passed, validate_result
from tapeline import engine
from tapeline.builder import builder_identity
from tapeline.config import PipelineConfig
from tapeline.engine import Artifacts, Graph, Stage
from tapeline.results import EpochCallback, StageResult, StopCheck
from tapeline.store import open_store

__all__ = ["GRAPH", "STAGES", "STAGE_NAMES", "Artifacts", "Stage", "find_output", "find_output_by_fingerprint",
           "fingerprints", "known_fingerprint", "output_is_valid", "output_location", "output_path", "plan",
           "run_stage"]


def _user_model_code(config: PipelineConfig, *_context: Any) -> dict[str, Any] | None:
    """The code of the user's `model.builder` and of every module of theirs it imports (None for the CNN)."""
    return builder_identity(config.model.builder)


GRAPH = Graph((
    Stage("data", (), build_data, data_result, covers=("seed", "data"), external=source_identity, early_cutoff=True,
          reads=("input_spec", "encoding", "normalization", "splits", "skipped", "image_files",
                 "dropped_test_duplicates")),
    Stage("validate", ("data",), build_validate, validate_result, covers=("validate",), external=baseline_identity,
          gate=ensure_passed),
    Stage("model", ("data",), build_model_dir, model_result, covers=("seed", "model"), external=_user_model_code),
    Stage("train", ("data", "model"), build_train_dir, train_result, covers=("seed", "train"), external=init_identity,
          resumable=True, distributed=True),
    Stage("evaluate", ("data", "train"), build_evaluation, evaluate_result, covers=("evaluate",)),
    Stage("export", ("data", "train", "evaluate"), build_export, export_result, covers=("export",)),
))
STAGES: dict[str, Stage] = {stage.name: stage for stage in GRAPH}
STAGE_NAMES: tuple[str, ...] = GRAPH.names


def fingerprints(config: PipelineConfig, artifacts: Artifacts) -> dict[str, str | None]:
    """Every stage's fingerprint for this config and store, in graph order (None: waits on an upstream output)."""
    return engine.graph_keys(GRAPH, config, artifacts).fingerprints


def known_fingerprint(name: str, config: PipelineConfig, artifacts: Artifacts) -> str:
    """Stage `name`'s fingerprint, or MissingUpstreamError naming the upstream stage to run first."""
    return engine.known_fingerprint(GRAPH, name, config, artifacts)


def output_path(name: str, config: PipelineConfig, artifacts: Path) -> Path:
    """Where stage `name`'s output for this config lives in an artifacts directory (built or not)."""
    return artifacts / name / known_fingerprint(name, config, artifacts)


def output_location(name: str, config: PipelineConfig, artifacts: Artifacts) -> str:
    """Where stage `name`'s output for this config lives in any store, as a path or URL."""
    return open_store(artifacts).location(name, known_fingerprint(name, config, artifacts))


def find_output(name: str, config: PipelineConfig, artifacts: Artifacts, verify: bool = False) -> StageResult:
    """The valid cached output of stage `name` (fetched locally), or MissingUpstreamError saying to run it first."""
    return engine.find_output(GRAPH, name, config, artifacts, verify)


def find_output_by_fingerprint(name: str, fp: str, artifacts: Artifacts, verify: bool = False) -> StageResult:
    """The valid output of stage `name` with fingerprint `fp`, fetched locally; MissingUpstreamError when none."""
    return engine.find_output_by_fingerprint(GRAPH, name, fp, artifacts, verify)


def run_stage(name: str, config: PipelineConfig, artifacts: Artifacts,
              upstream: Mapping[str, StageResult] | None = None, *, verify: bool = False,
              on_epoch_end: EpochCallback | None = None, should_stop: StopCheck | None = None) -> StageResult:
    """Run one training stage on the engine: its valid cached output, or a new build (see `engine.run_stage`)."""
    return engine.run_stage(GRAPH, name, config, artifacts, upstream, verify=verify, on_epoch_end=on_epoch_end,
                            should_stop=should_stop)


def output_is_valid(name: str, config: PipelineConfig, artifacts: Artifacts, verify: bool = False) -> bool:
    """Whether the stage's cached output exists and matches its manifest (sizes; SHA-256 with `verify`)."""
    return engine.output_is_valid(GRAPH, name, config, artifacts, verify)


def plan(config: PipelineConfig, artifacts: Artifacts, verify: bool = False) -> dict[str, Any]:
    """What `tapeline run` would do, running nothing (the promotion step always runs): see `engine.plan`."""
    return engine.plan(GRAPH, config, artifacts, verify)
