"""The engine: runs any graph of stages over a store, caching each stage's output by fingerprint.

A `Graph` is a tuple of `Stage`s in run order; `stages/graph.py` declares the training graph. Each `Stage` names
its upstream stages, its build function, how a result is read back from its manifest, and what its fingerprint
covers. Everything else derives from the graph: `run_stage`, `find_output`, output paths, `plan`.

A stage's fingerprint hashes: the config keys that shape its output (`covers`, minus runtime knobs, plus keys
another section marks `used_by` it), a key per upstream output, the code of its module and of every project module
that module imports (`tapeline.codehash`), and, for stages that read outside their upstream outputs, a cheap
identity of what they read (`external`: a data source's checksums, a baseline). The key of an `early_cutoff`
stage's output (byte-reproducible output, such as the data stage's hand-framed records) is its content digest (its
files' checksums and the manifest keys its dependents `reads`), the early cutoff of build systems: when it runs
again and writes the same bytes, its dependents stay cached. So `plan` knows the fingerprint of a stage downstream
of one once that output exists; until then the stage waits on it. Other stages' outputs carry save times (Keras
zips, HDF5, TensorBoard events), so their dependents key on their fingerprints.

A stage may declare a `gate`, called on its result whether it was built or cached (validate's raises when the
report has errors, so the run stops before the model stage and the report is kept), and may be `distributed`
(trained by several workers, the chief committing) and `resumable` (partial output kept across a crash).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tapeline.cache import files_digest, fingerprint, manifest_problem, read_manifest
from tapeline.cluster import Cluster, check_workers, current_cluster, launch_local_workers, worker_command
from tapeline.codehash import code_fingerprint, module_closure
from tapeline.config import PipelineConfig, output_config
from tapeline.errors import MissingUpstreamError
from tapeline.hardware import onednn_origin, planned_choices
from tapeline.results import EpochCallback, StageInputs, StageResult, StopCheck
from tapeline.store import SavePartial, Store, open_store

log = logging.getLogger("tapeline.engine")
BuildFn = Callable[[Path, StageInputs], dict[str, Any]]
ResultFn = Callable[[Path, dict[str, Any], bool, float], StageResult]
ExternalFn = Callable[[PipelineConfig, Store, Mapping[str, str]], Any]
Artifacts = Path | str


@dataclass(frozen=True)
class Stage:
    """One node of a graph."""

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


@dataclass(frozen=True)
class Graph:
    """Stages in run order, each upstream declared before its dependents."""

    stages: tuple[Stage, ...]

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for stage in self.stages:
            if unknown := [u for u in stage.upstream if u not in seen]:
                raise ValueError(f"stage {stage.name} comes before its upstream {', '.join(unknown)}")
            seen.add(stage.name)

    def __iter__(self) -> Iterator[Stage]:
        return iter(self.stages)

    def __len__(self) -> int:
        return len(self.stages)

    def __getitem__(self, name: str) -> Stage:
        return next(stage for stage in self.stages if stage.name == name)

    @property
    def names(self) -> tuple[str, ...]:
        """The stages' names, in run order."""
        return tuple(stage.name for stage in self.stages)


def _external_inputs(stage: Stage, config: PipelineConfig, store: Store, upstream: Mapping[str, str]) -> Any:
    """What `stage` reads from outside its upstream outputs: the source files' identity, a baseline."""
    return stage.external(config, store, upstream) if stage.external else None


def _content_digest(stage: Stage, manifest: Mapping[str, Any]) -> str:
    """What a stage's dependents read of its output, hashed: every file's name and SHA-256 and the manifest
    keys it `reads` (never timings, versions or run ids). Two builds that wrote the same bytes have one digest."""
    return fingerprint({"files": files_digest(manifest), "reads": {key: manifest.get(key) for key in stage.reads}})


def _stage_fingerprint(stage: Stage, config: PipelineConfig, upstream: Mapping[str, str], external: Any) -> str:
    """The fingerprint of `stage` given its upstream outputs' keys (`_key_of`) and its external inputs (early
    cutoff: an upstream stage that ran again and wrote the same bytes leaves this fingerprint as it was)."""
    return fingerprint({
        "stage": stage.name,
        "config": output_config(config, stage.name, stage.covers),
        "upstream": {name: upstream[name] for name in stage.upstream},
        "code": code_fingerprint(stage.module),
        "external": external,
    })


@dataclass(frozen=True)
class Keys:
    """A graph's keys for one config and store: each stage's fingerprint (None while it depends on the content of
    an upstream output not built yet, named in `waits_on`) and what dependents key on for each known stage."""

    fingerprints: dict[str, str | None]
    keys: dict[str, str]
    waits_on: dict[str, str]


def graph_keys(graph: Graph, config: PipelineConfig, artifacts: Artifacts) -> Keys:
    """Walk the graph in order. A stage's fingerprint needs its upstream keys: an early-cutoff stage's key is its
    output's content digest, read from its manifest, so a stage downstream of one not built (yet) waits on it."""
    store = open_store(artifacts)
    fps: dict[str, str | None] = {}
    keys: dict[str, str] = {}
    waits_on: dict[str, str] = {}
    for stage in graph:
        missing = next((u for u in stage.upstream if u not in keys), None)
        located_fps = {u: fps[u] for u in stage.upstream}
        external = _external_inputs(stage, config, store, located_fps)  # also when waiting: a bad reference is said now
        if missing is not None:
            fps[stage.name], waits_on[stage.name] = None, waits_on.get(missing, missing)
            continue
        fp = _stage_fingerprint(stage, config, keys, external)
        fps[stage.name] = fp
        if not stage.early_cutoff:
            keys[stage.name] = fp
        elif (manifest := store.manifest(stage.name, fp)) is not None:
            keys[stage.name] = _content_digest(stage, manifest)
    return Keys(fps, keys, waits_on)


def known_fingerprint(graph: Graph, name: str, config: PipelineConfig, artifacts: Artifacts) -> str:
    """Stage `name`'s fingerprint, or MissingUpstreamError naming the upstream stage to run first."""
    keys = graph_keys(graph, config, artifacts)
    fp = keys.fingerprints[name]
    if fp is None:
        first = keys.waits_on[name]
        raise MissingUpstreamError(f"no valid {first} output for this config (stage {name} needs it): run "
                                   f"`tapeline stage {first}` with the same config first")
    return fp


def _located(stage: Stage, store: Store, fp: str, manifest: dict[str, Any], local: Path, cached: bool,
            seconds: float) -> StageResult:
    """A stage result read from its manifest: `path` the local copy, `location` the store's."""
    result = stage.result(local, manifest, cached, seconds)
    return result.model_copy(update={"location": store.location(stage.name, fp)})


def find_output(graph: Graph, name: str, config: PipelineConfig, artifacts: Artifacts,
                verify: bool = False) -> StageResult:
    """The valid cached output of stage `name` (fetched locally), or MissingUpstreamError saying to run it first."""
    return find_output_by_fingerprint(graph, name, known_fingerprint(graph, name, config, artifacts), artifacts,
                                      verify)


def find_output_by_fingerprint(graph: Graph, name: str, fp: str, artifacts: Artifacts,
                               verify: bool = False) -> StageResult:
    """The valid output of stage `name` with fingerprint `fp`, fetched locally; MissingUpstreamError when none."""
    store = open_store(artifacts)
    manifest, local = store.fetch(name, fp, verify)
    return _located(graph[name], store, fp, manifest, local, True, 0.0)


def _usable_locally(result: StageResult, store: Store, verify: bool) -> StageResult:
    """An upstream result whose `path` is a valid local copy: a result made on another machine (a Prefect
    cache hit, say) is fetched again from the store by its fingerprint."""
    if manifest_problem(result.path) is None:
        return result
    manifest, local = store.fetch(result.stage, result.fingerprint, verify)
    return result.model_copy(update={"path": local})


def _key_of(graph: Graph, result: StageResult) -> str:
    """What a dependent's fingerprint keys on for this upstream output: its content digest (from its local
    manifest) when the stage writes byte-reproducible output (`early_cutoff`), else its fingerprint."""
    stage = graph[result.stage]
    return _content_digest(stage, read_manifest(result.path)) if stage.early_cutoff else result.fingerprint


def run_stage(graph: Graph, name: str, config: PipelineConfig, artifacts: Artifacts,
              upstream: Mapping[str, StageResult] | None = None, *, verify: bool = False,
              on_epoch_end: EpochCallback | None = None, should_stop: StopCheck | None = None) -> StageResult:
    """Run one stage: reuse its valid cached output, or build it. Upstream results not given are looked
    up by fingerprint; a missing one is a MissingUpstreamError naming the stage to run first. `should_stop`
    (train, one process) may pause training after an epoch: TrainingPaused, nothing committed."""
    onednn_origin()
    stage = graph[name]
    store = open_store(artifacts)
    started = time.perf_counter()
    given = dict(upstream or {})
    inputs = {u: _usable_locally(given[u], store, verify) if u in given
              else find_output(graph, u, config, store.root, verify) for u in stage.upstream}
    upstream_fps = {u: r.fingerprint for u, r in inputs.items()}
    external = _external_inputs(stage, config, store, upstream_fps)
    fp = _stage_fingerprint(stage, config, {u: _key_of(graph, r) for u, r in inputs.items()}, external)

    def stage_inputs(hooks: EpochCallback | None, stop: StopCheck | None = None) -> StageInputs:
        return StageInputs(config, inputs, hooks, external, lambda s, f: store.fetch(s, f)[1], store, stop)

    if stage.distributed:
        cluster = current_cluster()
        check_workers(cluster, config.train.workers)
        if cluster is None and config.train.workers > 1:
            return _run_local_workers(stage, config, store, fp, verify, started)
        if cluster is not None and not cluster.is_chief:
            return _run_as_follower(stage, store, fp, stage_inputs(None), cluster, verify, started)

    def make(staging: Path, save_partial: SavePartial) -> dict[str, Any]:
        return stage.build(staging, stage_inputs(_with_partial_saves(on_epoch_end, save_partial), should_stop))

    manifest, cached, local = store.build(name, fp, make, verify=verify, resumable=stage.resumable)
    seconds = time.perf_counter() - started
    log.info("%s %s %s in %.2f s", name, fp, "reused from cache" if cached else "built", seconds)
    result = _located(stage, store, fp, manifest, local, cached, seconds)
    if stage.gate is not None:
        stage.gate(result)
    return result


def _cached_result(stage: Stage, store: Store, fp: str, verify: bool, started: float) -> StageResult | None:
    """The stage's valid committed output as a cached result, or None when there is none."""
    if store.problem(stage.name, fp, verify) is not None:
        return None
    manifest, local = store.fetch(stage.name, fp, verify)
    return _located(stage, store, fp, manifest, local, True, time.perf_counter() - started)


def _run_local_workers(stage: Stage, config: PipelineConfig, store: Store, fp: str, verify: bool,
                      started: float) -> StageResult:
    """Train with `train.workers` local processes (TF_CONFIG on loopback ports); the chief commits the output,
    which is then read like any cached one."""
    cached = _cached_result(stage, store, fp, verify, started)
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
    return _located(stage, store, fp, manifest, local, False, seconds)


def _run_as_follower(stage: Stage, store: Store, fp: str, inputs: StageInputs, cluster: Cluster, verify: bool,
                    started: float) -> StageResult:
    """A non-chief worker's share of a distributed stage: train in a private temporary directory, starting
    from the chief's checkpoints, and commit nothing (TensorFlow has every worker save; only the chief's
    copy is kept)."""
    cached = _cached_result(stage, store, fp, verify, started)
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


def _with_partial_saves(on_epoch_end: EpochCallback | None, save_partial: SavePartial) -> EpochCallback:
    """The epoch callback, preceded by saving the checkpoints written so far to the store."""

    def callback(row: dict[str, float], max_epochs: int) -> None:
        save_partial()
        if on_epoch_end is not None:
            on_epoch_end(row, max_epochs)

    return callback


def output_is_valid(graph: Graph, name: str, config: PipelineConfig, artifacts: Artifacts,
                    verify: bool = False) -> bool:
    """Whether the stage's cached output exists and matches its manifest (sizes; SHA-256 with `verify`)."""
    fp = graph_keys(graph, config, artifacts).fingerprints[name]
    return fp is not None and open_store(artifacts).problem(name, fp, verify) is None


def plan(graph: Graph, config: PipelineConfig, artifacts: Artifacts, verify: bool = False) -> dict[str, Any]:
    """What running the graph would do, running nothing: each stage's fingerprint, output location, whether a
    valid output is cached and the project modules its code fingerprint covers, and the stages that would run. A
    stage downstream of one that must run has no fingerprint yet: it depends on that stage's new output
    (`waits_on`), and is a cache hit after all if that output comes out byte-identical."""
    store = open_store(artifacts)
    keys = graph_keys(graph, config, artifacts)
    stages: dict[str, dict[str, Any]] = {}
    for stage in graph:
        fp = keys.fingerprints[stage.name]
        row: dict[str, Any] = {"fingerprint": fp, "cached": fp is not None and store.problem(stage.name, fp, verify)
                               is None, "path": store.location(stage.name, fp) if fp else None}
        if fp is None:
            row["waits_on"] = keys.waits_on[stage.name]
        stages[stage.name] = {**row, "code": module_closure(stage.module)}
    return {"stages": stages, "would_run": [name for name, row in stages.items() if not row["cached"]],
            "auto": planned_choices(config.train.precision)}
