"""The stage graph: the one declaration of every stage, and the machinery that runs it.

Each `Stage` names its upstream stages, its build function, how a result is read back from its
manifest, and what its fingerprint covers. Everything else derives from `GRAPH`: the CLI's stage
names, `run_stage`, `find_output`, output paths, `plan`, `run_all` and the Prefect flow. Adding a
stage is one module with a `build_*` and a `*_result` function, plus one entry here.

A stage's fingerprint hashes: the config keys that shape its output (`covers`, minus runtime knobs,
plus keys another section marks `used_by` it), its upstream fingerprints, the code of its module and
of every project module that module imports (`stages.codehash`), and, for stages that read outside
the artifacts (the data sources), a cheap identity of what they read. Fingerprints depend on the
config and the code only, never on what is on disk, so `plan` computes them all without running anything.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.cache import cached_build, fingerprint, manifest_problem, require_valid
from stages.codehash import code_fingerprint
from stages.config import PipelineConfig, output_config
from stages.data import build_data, data_result, source_identity
from stages.evaluate import build_evaluation, evaluate_result
from stages.export import build_export, export_result
from stages.model import build_model_dir, model_result
from stages.results import EpochCallback, StageInputs, StageResult
from stages.train import build_train_dir, train_result

log = logging.getLogger("tapeline.graph")
BuildFn = Callable[[Path, StageInputs], dict[str, Any]]
ResultFn = Callable[[Path, dict[str, Any], bool, float], StageResult]


@dataclass(frozen=True)
class Stage:
    """One node of the graph."""

    name: str
    upstream: tuple[str, ...]
    build: BuildFn
    result: ResultFn
    covers: tuple[str, ...]
    external: Callable[[PipelineConfig], Any] | None = None
    resumable: bool = False

    @property
    def module(self) -> str:
        """The module whose code (and imports) the fingerprint covers."""
        return self.build.__module__


GRAPH: tuple[Stage, ...] = (
    Stage("data", (), build_data, data_result, covers=("seed", "data"), external=source_identity),
    Stage("model", ("data",), build_model_dir, model_result, covers=("seed", "model")),
    Stage("train", ("data", "model"), build_train_dir, train_result, covers=("seed", "train"), resumable=True),
    Stage("evaluate", ("data", "train"), build_evaluation, evaluate_result, covers=("evaluate",)),
    Stage("export", ("data", "train", "evaluate"), build_export, export_result, covers=("export",)),
)
STAGES: dict[str, Stage] = {stage.name: stage for stage in GRAPH}
STAGE_NAMES: tuple[str, ...] = tuple(STAGES)


def stage_fingerprint(stage: Stage, config: PipelineConfig, upstream: Mapping[str, str]) -> str:
    """The fingerprint of `stage` given its upstream stages' fingerprints."""
    return fingerprint({
        "stage": stage.name,
        "config": output_config(config, stage.name, stage.covers),
        "upstream": {name: upstream[name] for name in stage.upstream},
        "code": code_fingerprint(stage.module),
        "external": stage.external(config) if stage.external else None,
    })


def fingerprints(config: PipelineConfig) -> dict[str, str]:
    """Every stage's fingerprint for this config, in graph order."""
    found: dict[str, str] = {}
    for stage in GRAPH:
        found[stage.name] = stage_fingerprint(stage, config, found)
    return found


def output_path(name: str, config: PipelineConfig, artifacts: Path) -> Path:
    """Where stage `name`'s output for this config lives (built or not)."""
    return artifacts / name / fingerprints(config)[name]


def find_output(name: str, config: PipelineConfig, artifacts: Path, verify: bool = False) -> StageResult:
    """The valid cached output of stage `name`, or MissingUpstreamError saying to run that stage first."""
    path = output_path(name, config, artifacts)
    return STAGES[name].result(path, require_valid(path, name, verify), True, 0.0)


def run_stage(name: str, config: PipelineConfig, artifacts: Path, upstream: Mapping[str, StageResult] | None = None,
              *, verify: bool = False, on_epoch_end: EpochCallback | None = None) -> StageResult:
    """Run one stage: reuse its valid cached output, or build it. Upstream results not given are looked
    up by fingerprint; a missing one is a MissingUpstreamError naming the stage to run first."""
    stage = STAGES[name]
    started = time.perf_counter()
    given = dict(upstream or {})
    inputs = {u: given[u] if u in given else find_output(u, config, artifacts, verify) for u in stage.upstream}
    fp = stage_fingerprint(stage, config, {u: r.fingerprint for u, r in inputs.items()})
    manifest, cached = cached_build(
        artifacts / name, fp, lambda staging: stage.build(staging, StageInputs(config, inputs, on_epoch_end)),
        verify=verify, resumable=stage.resumable,
    )
    seconds = time.perf_counter() - started
    log.info("%s %s %s in %.2f s", name, fp, "reused from cache" if cached else "built", seconds)
    return stage.result(artifacts / name / fp, manifest, cached, seconds)


def output_is_valid(name: str, config: PipelineConfig, artifacts: Path, verify: bool = False) -> bool:
    """Whether the stage's cached output exists and matches its manifest (sizes; SHA-256 with `verify`)."""
    return manifest_problem(output_path(name, config, artifacts), verify) is None


def plan(config: PipelineConfig, artifacts: Path, verify: bool = False) -> dict[str, Any]:
    """What `tapeline run` would do, running nothing: each stage's fingerprint, output path and whether a
    valid output is cached, and the stages that would run (the promotion step always runs)."""
    stages = {}
    for name, fp in fingerprints(config).items():
        path = artifacts / name / fp
        stages[name] = {"fingerprint": fp, "cached": manifest_problem(path, verify) is None, "path": str(path)}
    return {"stages": stages, "would_run": [name for name, row in stages.items() if not row["cached"]]}
