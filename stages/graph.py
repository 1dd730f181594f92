"""The stage graph: the one declaration of every stage, and the machinery that runs it.

Each `Stage` names its upstream stages, its build function, how a result is read back from its
manifest, and what its fingerprint covers. Everything else derives from `GRAPH`: the CLI's stage
names, `run_stage`, `find_output`, output paths, `plan`, `run_all` and the Prefect flow. Adding a
stage is one module with a `build_*` and a `*_result` function, plus one entry here.

A stage's fingerprint hashes: the config keys that shape its output (`covers`, minus runtime knobs,
plus keys another section marks `used_by` it), a key per upstream output, the code of its module and
of every project module that module imports (`tapeline.codehash`), and, for stages that read outside
their upstream outputs, a cheap identity of what they read (the data sources' checksums; validate's
baseline, the data production was trained on). The key of an `early_cutoff` stage's output (data's:
records framed by hand, byte-reproducible) is its content digest (its files' checksums and the manifest
keys its dependents `reads`), the early cutoff of build systems: when it runs again and writes the
same bytes, its dependents stay cached. So `plan` knows the fingerprint of a stage downstream of data
once data's output exists; until then the stage waits on it. Other stages' outputs carry save times
(Keras zips, HDF5, TensorBoard events), so their dependents key on their fingerprints.

A stage may declare a `gate`, called on its result whether it was built or cached: validate's raises
when the report has errors, so the run stops before the model stage and the report is kept.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.data.stage import build_data, data_result, source_identity
from stages.evaluate import build_evaluation, evaluate_result
from stages.export import build_export, export_result
from stages.model import build_model_dir, model_result
from stages.train.stage import build_train_dir, train_result
from stages.train.warm_start import init_identity
from stages.validate import baseline_identity, build_validate, ensure_passed, validate_result
from tapeline.builder import builder_identity
from tapeline.cache import files_digest, fingerprint, manifest_problem, read_manifest
from tapeline.cluster import Cluster, check_workers, current_cluster, launch_local_workers, worker_command
from tapeline.codehash import code_fingerprint, module_closure
from tapeline.config import PipelineConfig, output_config
from tapeline.errors import MissingUpstreamError
from tapeline.hardware import onednn_origin, planned_choices
from tapeline.results import EpochCallback, StageInputs, StageResult, StopCheck
from tapeline.store import SavePartial, Store, open_store

log = logging.getLogger("tapeline.graph")
BuildFn = Callable[[Path, StageInputs], dict[str, Any]]
ResultFn = Callable[[Path, dict[str, Any], bool, float], StageResult]
ExternalFn = Callable[[PipelineConfig, Store, Mapping[str, str]], Any]
Artifacts = Path | str


@dataclass(frozen=True)
class Stage:
    """One node of the graph."""

    name: str
    upstream: tuple[str, ...]
    build: BuildFn
    result: ResultFn
    covers: tuple[str, ...]
    external: ExternalFn | None = None
    gate: Callable[[Any], None] | None = None
    resumable: bool = False
    distributed: bool = False
    reads: tuple[str, ...] = ()
    early_cutoff: bool = False


    @property
    def module(self) -> str:
        """The module whose code (and imports) the fingerprint covers."""
        return self.build.__module__


def user_model_code(config: PipelineConfig, *_context: Any) -> dict[str, Any] | None:
    """The code of the user's `model.builder` and of every module of theirs it imports (None for the CNN)."""
    return builder_identity(config.model.builder)


GRAPH: tuple[Stage, ...] = (
    Stage("data", (), build_data, data_result, covers=("seed", "data"), external=source_identity, early_cutoff=True,
          reads=("input_spec", "encoding", "normalization", "splits", "skipped", "image_files",
                 "dropped_test_duplicates")),
    Stage("validate", ("data",), build_validate, validate_result, covers=("validate",), external=baseline_identity,
          gate=ensure_passed),
    Stage("model", ("data",), build_model_dir, model_result, covers=("seed", "model"), external=user_model_code),
    Stage("train", ("data", "model"), build_train_dir, train_result, covers=("seed", "train"), external=init_identity,
          resumable=True, distributed=True),
    Stage("evaluate", ("data", "train"), build_evaluation, evaluate_result, covers=("evaluate",)),
    Stage("export", ("data", "train", "evaluate"), build_export, export_result, covers=("export",)),
)
STAGES: dict[str, Stage] = {stage.name: stage for stage in GRAPH}
STAGE_NAMES: tuple[str, ...] = tuple(STAGES)


def external_inputs(stage: Stage, config: PipelineConfig, store: Store, upstream: Mapping[str, str]) -> Any:
    """What `stage` reads from outside its upstream outputs: the source files' identity, a baseline."""
    return stage.external(config, store, upstream) if stage.external else None


def content_digest(stage: Stage, manifest: Mapping[str, Any]) -> str:
    """What a stage's dependents read of its output, hashed: every file's name and SHA-256 and the manifest
    keys it `reads` (never timings, versions or run ids). Two builds that wrote the same bytes have one digest."""
    return fingerprint({"files": files_digest(manifest), "reads": {key: manifest.get(key) for key in stage.reads}})


def stage_fingerprint(stage: Stage, config: PipelineConfig, upstream: Mapping[str, str], external: Any) -> str:
    """The fingerprint of `stage` given its upstream outputs' keys (`key_of`) and its external inputs (early
    cutoff: an upstream data stage that ran again and wrote the same bytes leaves this fingerprint as it was)."""
    return fingerprint({
        "stage": stage.name,
        "config": output_config(config, stage.name, stage.covers),
        "upstream": {name: upstream[name] for name in stage.upstream},
        "code": code_fingerprint(stage.module),
        "external": external,
    })


@dataclass(frozen=True)
class Keys:
    """The graph's keys for one config and store: each stage's fingerprint (None while it depends on the content of
    an upstream output not built yet, named in `waits_on`) and what dependents key on for each known stage."""

    fingerprints: dict[str, str | None]
    keys: dict[str, str]
    waits_on: dict[str, str]


def graph_keys(config: PipelineConfig, artifacts: Artifacts) -> Keys:
    """Walk the graph in order. A stage's fingerprint needs its upstream keys: an early-cutoff stage's key is its
    output's content digest, read from its manifest, so a stage downstream of one not built (yet) waits on it."""
    store = open_store(artifacts)
    fps: dict[str, str | None] = {}
    keys: dict[str, str] = {}
    waits_on: dict[str, str] = {}
    for stage in GRAPH:
        missing = next((u for u in stage.upstream if u not in keys), None)
        located_fps = {u: fps[u] for u in stage.upstream}
        external = external_inputs(stage, config, store, located_fps)  # also when waiting: a bad reference is said now
        if missing is not None:
            fps[stage.name], waits_on[stage.name] = None, waits_on.get(missing, missing)
            continue
        fp = stage_fingerprint(stage, config, keys, external)
        fps[stage.name] = fp
        if not stage.early_cutoff:
            keys[stage.name] = fp
        elif (manifest := store.manifest(stage.name, fp)) is not None:
            keys[stage.name] = content_digest(stage, manifest)
    return Keys(fps, keys, waits_on)


def fingerprints(config: PipelineConfig, artifacts: Artifacts) -> dict[str, str | None]:
    """Every stage's fingerprint for this config and store, in graph order (None: waits on an upstream output)."""
    return graph_keys(config, artifacts).fingerprints


def known_fingerprint(name: str, config: PipelineConfig, artifacts: Artifacts) -> str:
    """Stage `name`'s fingerprint, or MissingUpstreamError naming the upstream stage to run first."""
    keys = graph_keys(config, artifacts)
    fp = keys.fingerprints[name]
    if fp is None:
        first = keys.waits_on[name]
        raise MissingUpstreamError(f"no valid {first} output for this config (stage {name} needs it): run "
                                   f"`tapeline stage {first}` with the same config first")
    return fp


def output_path(name: str, config: PipelineConfig, artifacts: Path) -> Path:
    """Where stage `name`'s output for this config lives in an artifacts directory (built or not)."""
    return artifacts / name / known_fingerprint(name, config, artifacts)


def output_location(name: str, config: PipelineConfig, artifacts: Artifacts) -> str:
    """Where stage `name`'s output for this config lives in any store, as a path or URL."""
    return open_store(artifacts).location(name, known_fingerprint(name, config, artifacts))


def located(stage: Stage, store: Store, fp: str, manifest: dict[str, Any], local: Path, cached: bool,
            seconds: float) -> StageResult:
    """A stage result read from its manifest: `path` the local copy, `location` the store's."""
    result = stage.result(local, manifest, cached, seconds)
    return result.model_copy(update={"location": store.location(stage.name, fp)})


def find_output(name: str, config: PipelineConfig, artifacts: Artifacts, verify: bool = False) -> StageResult:
    """The valid cached output of stage `name` (fetched locally), or MissingUpstreamError saying to run it first."""
    return find_output_by_fingerprint(name, known_fingerprint(name, config, artifacts), artifacts, verify)


def find_output_by_fingerprint(name: str, fp: str, artifacts: Artifacts, verify: bool = False) -> StageResult:
    """The valid output of stage `name` with fingerprint `fp`, fetched locally; MissingUpstreamError when none."""
    store = open_store(artifacts)
    manifest, local = store.fetch(name, fp, verify)
    return located(STAGES[name], store, fp, manifest, local, True, 0.0)


def usable_locally(result: StageResult, store: Store, verify: bool) -> StageResult:
    """An upstream result whose `path` is a valid local copy: a result made on another machine (a Prefect
    cache hit, say) is fetched again from the store by its fingerprint."""
    if manifest_problem(result.path) is None:
        return result
    manifest, local = store.fetch(result.stage, result.fingerprint, verify)
    return result.model_copy(update={"path": local})


def key_of(result: StageResult) -> str:
    """What a dependent's fingerprint keys on for this upstream output: its content digest (from its local
    manifest) when the stage writes byte-reproducible output (`early_cutoff`: the data stage's hand-framed
    records), else its fingerprint (Keras zips, HDF5 files and TensorBoard events carry save times, so their
    bytes never repeat)."""
    stage = STAGES[result.stage]
    return content_digest(stage, read_manifest(result.path)) if stage.early_cutoff else result.fingerprint


def run_stage(name: str, config: PipelineConfig, artifacts: Artifacts,
              upstream: Mapping[str, StageResult] | None = None, *, verify: bool = False,
              on_epoch_end: EpochCallback | None = None, should_stop: StopCheck | None = None) -> StageResult:
    """Run one stage: reuse its valid cached output, or build it. Upstream results not given are looked
    up by fingerprint; a missing one is a MissingUpstreamError naming the stage to run first. `should_stop`
    (train, one process) may pause training after an epoch: TrainingPaused, nothing committed."""
    onednn_origin()
    stage = STAGES[name]
    store = open_store(artifacts)
    started = time.perf_counter()
    given = dict(upstream or {})
    inputs = {u: usable_locally(given[u], store, verify) if u in given else find_output(u, config, store.root, verify)
              for u in stage.upstream}
    upstream_fps = {u: r.fingerprint for u, r in inputs.items()}
    external = external_inputs(stage, config, store, upstream_fps)
    fp = stage_fingerprint(stage, config, {u: key_of(r) for u, r in inputs.items()}, external)

    def stage_inputs(hooks: EpochCallback | None, stop: StopCheck | None = None) -> StageInputs:
        return StageInputs(config, inputs, hooks, external, lambda s, f: store.fetch(s, f)[1], store, stop)

    if stage.distributed:
        cluster = current_cluster()
        check_workers(cluster, config.train.workers)
        if cluster is None and config.train.workers > 1:
            return run_local_workers(stage, config, store, fp, verify, started)
        if cluster is not None and not cluster.is_chief:
            return run_as_follower(stage, store, fp, stage_inputs(None), cluster, verify, started)

    def make(staging: Path, save_partial: SavePartial) -> dict[str, Any]:
        return stage.build(staging, stage_inputs(with_partial_saves(on_epoch_end, save_partial), should_stop))

    manifest, cached, local = store.build(name, fp, make, verify=verify, resumable=stage.resumable)
    seconds = time.perf_counter() - started
    log.info("%s %s %s in %.2f s", name, fp, "reused from cache" if cached else "built", seconds)
    result = located(stage, store, fp, manifest, local, cached, seconds)
    if stage.gate is not None:
        stage.gate(result)
    return result


def cached_result(stage: Stage, store: Store, fp: str, verify: bool, started: float) -> StageResult | None:
    """The stage's valid committed output as a cached result, or None when there is none."""
    if store.problem(stage.name, fp, verify) is not None:
        return None
    manifest, local = store.fetch(stage.name, fp, verify)
    return located(stage, store, fp, manifest, local, True, time.perf_counter() - started)


def run_local_workers(stage: Stage, config: PipelineConfig, store: Store, fp: str, verify: bool,
                      started: float) -> StageResult:
    """Train with `train.workers` local processes (TF_CONFIG on loopback ports); the chief commits the output,
    which is then read like any cached one."""
    cached = cached_result(stage, store, fp, verify, started)
    if cached is not None:
        return cached
    with tempfile.TemporaryDirectory(prefix="tapeline-workers-") as tmp:
        config_file = Path(tmp) / "config.json"
        config_file.write_text(config.model_dump_json())
        log.info("starting %d training workers", config.train.workers)
        launch_local_workers(worker_command(config_file, store.root), config.train.workers,
                             config.train.worker_timeout_seconds)
    manifest, local = store.fetch(stage.name, fp, verify)
    seconds = time.perf_counter() - started
    log.info("%s %s built by %d workers in %.2f s", stage.name, fp, config.train.workers, seconds)
    return located(stage, store, fp, manifest, local, False, seconds)


def run_as_follower(stage: Stage, store: Store, fp: str, inputs: StageInputs, cluster: Cluster, verify: bool,
                    started: float) -> StageResult:
    """A non-chief worker's share of a distributed stage: train in a private temporary directory, starting
    from the chief's checkpoints, and commit nothing (TensorFlow has every worker save; only the chief's
    copy is kept)."""
    cached = cached_result(stage, store, fp, verify, started)
    if cached is not None:
        return cached
    staging = Path(tempfile.mkdtemp(prefix=f"tapeline-{stage.name}-worker{cluster.index}-"))
    try:
        store.copy_partial(stage.name, fp, staging)
        body = stage.build(staging, inputs)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    seconds = time.perf_counter() - started
    log.info("%s %s trained as %s in %.2f s; the chief commits the output", stage.name, fp, cluster.name(), seconds)
    location = store.location(stage.name, fp)
    result = stage.result(Path(location), {**body, "fingerprint": fp}, False, seconds)
    return result.model_copy(update={"location": location})


def with_partial_saves(on_epoch_end: EpochCallback | None, save_partial: SavePartial) -> EpochCallback:
    """The epoch callback, preceded by saving the checkpoints written so far to the store."""

    def callback(row: dict[str, float], max_epochs: int) -> None:
        save_partial()
        if on_epoch_end is not None:
            on_epoch_end(row, max_epochs)

    return callback


def output_is_valid(name: str, config: PipelineConfig, artifacts: Artifacts, verify: bool = False) -> bool:
    """Whether the stage's cached output exists and matches its manifest (sizes; SHA-256 with `verify`)."""
    fp = fingerprints(config, artifacts)[name]
    return fp is not None and open_store(artifacts).problem(name, fp, verify) is None


def plan(config: PipelineConfig, artifacts: Artifacts, verify: bool = False) -> dict[str, Any]:
    """What `tapeline run` would do, running nothing: each stage's fingerprint, output location, whether a valid
    output is cached and the project modules its code fingerprint covers, and the stages that would run (the
    promotion step always runs). A stage downstream of one that must run has no fingerprint yet: it depends on
    that stage's new output (`waits_on`), and is a cache hit after all if that output comes out byte-identical."""
    store = open_store(artifacts)
    keys = graph_keys(config, artifacts)
    stages: dict[str, dict[str, Any]] = {}
    for stage in GRAPH:
        fp = keys.fingerprints[stage.name]
        row: dict[str, Any] = {"fingerprint": fp, "cached": fp is not None and store.problem(stage.name, fp, verify)
                               is None, "path": store.location(stage.name, fp) if fp else None}
        if fp is None:
            row["waits_on"] = keys.waits_on[stage.name]
        stages[stage.name] = {**row, "code": module_closure(stage.module)}
    return {"stages": stages, "would_run": [name for name, row in stages.items() if not row["cached"]],
            "auto": planned_choices(config.train.precision)}
