"""Scoring in shards, cached per file by content: a shard is a set of inputs no output of this model version has
scored, its rows committed as an output of the store (`scores/<version>/shards/<fp>/`, a manifest written last)
as soon as it is scored, so a killed run loses at most the shards in flight. Its fingerprint covers the model and
its members' (key, digest) only, so one new file never rescores its neighbours. The output a run names is a
snapshot, `scores/<version>/outputs/<fp>/`: one row per readable input of the source as it is now, gathered from
the shards, keyed on the model and the source's (key, digest) set: the same command again scores nothing."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stages.score.inputs import ScoreInput, SourceListing, fitted_images, skipped_entry
from stages.score.model import ModelRef, ScoringModel, resolve, serving_function
from tapeline.cache import fingerprint
from tapeline.codehash import code_fingerprint
from tapeline.store import LocalStore, RemoteStore, Store, open_store

ROWS = "rows.parquet"
PREDICTIONS = "predictions.parquet"
SHARDS, OUTPUTS = "shards", "outputs"


def scores_stage(version: str, kind: str) -> str:
    """The store's 'stage' of a model version's shards or outputs: `scores/<version>/<kind>`."""
    return f"scores/{version}/{kind}"


def _shard_fingerprint(model: ScoringModel, members: Sequence[ScoreInput]) -> str:
    """A shard's fingerprint: the model's export, its members' keys and digests, the scoring code."""
    return fingerprint({"model": model.export_fingerprint, "members": sorted((m.key, m.digest) for m in members),
                        "code": code_fingerprint("stages.score.shards")})[:16]


def shard_groups(todo: Sequence[ScoreInput], size: int) -> list[list[ScoreInput]]:
    """The inputs to score, in key order, `size` at a time."""
    ordered = sorted(todo, key=lambda i: i.key)
    return [ordered[start:start + size] for start in range(0, len(ordered), size)]


def stored_shards(store: Store, version: str) -> list[dict[str, Any]]:
    """The manifests of every committed shard of a model version."""
    stage = scores_stage(version, SHARDS)
    if isinstance(store, RemoteStore):
        names = {name.split("/", 1)[0] for name in store.listing(store.key(stage)) if name.endswith("/manifest.json")}
    else:
        assert isinstance(store, LocalStore)
        folder = store.path / stage
        names = {p.name for p in folder.iterdir() if not p.name.startswith(".")} if folder.is_dir() else set()
    return [m for m in (store.manifest(stage, name) for name in sorted(names)) if m is not None]


def scored_members(shards: Sequence[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """(key, digest) -> the shard that holds it, over the given shard manifests."""
    return {(key, digest): shard["fingerprint"] for shard in shards for key, digest in shard["members"]}


def newly_scored(groups: Sequence[Sequence[ScoreInput]], shards: Sequence[dict[str, Any]]
                 ) -> dict[tuple[str, str], str]:
    """(key, digest) -> shard for the shards just scored, from the groups they were given (in order)."""
    return {(m.key, m.digest): shard["fingerprint"] for group, shard in zip(groups, shards, strict=True)
            for m in group}


def to_score(listing: SourceListing, done: dict[tuple[str, str], str]) -> list[ScoreInput]:
    """The inputs no shard of this model version holds (new files, changed files)."""
    return [i for i in listing.inputs if (i.key, i.digest) not in done]


def _score_rows(model: ScoringModel, root: str, members: Sequence[ScoreInput], batch_size: int
               ) -> tuple[dict[str, list[Any]], list[dict[str, str]], np.ndarray]:
    """Score the members: (columns of the rows, the skipped inputs {path, reason}, the grey-level counts of the
    fitted images)."""
    import tensorflow as tf

    serve = serving_function(model.saved_model)
    names = model.spec.class_names
    columns: dict[str, list[Any]] = {"key": [], "digest": [], "class_index": [], "class_name": [], "probability": [],
                                     "probabilities": [], "model_version": [], "label": []}
    skipped: list[dict[str, str]] = []
    counts = np.zeros(256, np.int64)
    batch: list[tuple[ScoreInput, np.ndarray]] = []

    def flush() -> None:
        images = np.stack([image for _, image in batch])
        probabilities = serve(images=tf.constant(images))["probabilities"].numpy().astype(np.float64)
        for (member, _), row in zip(batch, probabilities, strict=True):
            best = int(row.argmax())
            columns["key"].append(member.key)
            columns["digest"].append(member.digest)
            columns["class_index"].append(best)
            columns["class_name"].append(names[best])
            columns["probability"].append(float(row[best]))
            columns["probabilities"].append([float(p) for p in row])
            columns["model_version"].append(model.ref.label)
            columns["label"].append(member.label)
        batch.clear()

    for index, image, reason in fitted_images(root, members, model.spec, model.resize):
        if image is None:
            skipped.append(skipped_entry(root, members[index].key, str(reason)))
            continue
        counts += np.bincount(image.reshape(-1), minlength=256)
        batch.append((members[index], image))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return columns, skipped, counts


def _write_rows(path: Path, columns: dict[str, list[Any]]) -> None:
    """The rows as a Parquet file (probabilities as a list column)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("key", pa.string()), ("digest", pa.string()), ("class_index", pa.int32()),
                        ("class_name", pa.string()), ("probability", pa.float64()),
                        ("probabilities", pa.list_(pa.float64())), ("model_version", pa.string()),
                        ("label", pa.int32())])
    pq.write_table(pa.Table.from_pydict(columns, schema=schema), path)


def score_shard(ref: ModelRef, root: str, members: list[ScoreInput], batch_size: int) -> dict[str, Any]:
    """Score one shard and commit it (or find it committed): its fingerprint, rows, skipped inputs and grey-level
    counts (its members are the caller's already). Runs wherever the task runs (a thread
    here, a Dask worker elsewhere): the model is resolved and loaded there, once per process."""
    model = resolve(ref)
    store = open_store(ref.artifacts)
    fp = _shard_fingerprint(model, members)

    def make(staging: Path, _save_partial: Any) -> dict[str, Any]:
        columns, skipped, counts = _score_rows(model, root, members, batch_size)
        _write_rows(staging / ROWS, columns)
        return {"stage": "score-shard", "model_version": ref.label, "model": model.export_fingerprint,
                "members": [[m.key, m.digest] for m in members], "rows": len(columns["key"]), "skipped": skipped,
                "pixel_counts": counts.tolist()}

    manifest, _cached, _local = store.build(scores_stage(ref.label, SHARDS), fp, make)
    return {key: manifest[key] for key in ("fingerprint", "rows", "skipped", "pixel_counts")}  # not the members


def snapshot_fingerprint(model: ScoringModel, listing: SourceListing) -> str:
    """The output's fingerprint: the model and the source's (key, digest) set as it is now."""
    return fingerprint({"model": model.export_fingerprint, "version": model.ref.label,
                        "inputs": sorted((i.key, i.digest) for i in listing.inputs),
                        "code": code_fingerprint("stages.score.shards")})[:16]


def _gather_rows(store: Store, version: str, listing: SourceListing, shards: Sequence[str]) -> Any:
    """The rows of every current input, read from the shards that hold them (a changed file's old row left out)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    wanted = {(i.key, i.digest) for i in listing.inputs}
    tables = []
    for shard in shards:
        _, local = store.fetch(scores_stage(version, SHARDS), shard)
        table = pq.read_table(local / ROWS)
        keep = [(k, d) in wanted for k, d in zip(table["key"].to_pylist(), table["digest"].to_pylist(), strict=True)]
        tables.append(table.filter(pa.array(keep, pa.bool_())))
    table = pa.concat_tables(tables) if tables else None
    if table is None:
        return None
    table = table.sort_by("key")
    if all(i.label is None for i in listing.inputs):
        table = table.drop_columns(["label"])
    return table.set_column(table.schema.get_field_index("key"), "path", pc.cast(table["key"], pa.string()))


def _shard_skips(store: Store, version: str, shards: Sequence[str]) -> list[dict[str, str]]:
    """The inputs the given shards skipped (unreadable), with their paths and reasons."""
    skipped: list[dict[str, str]] = []
    for shard in shards:
        skipped += (store.manifest(scores_stage(version, SHARDS), shard) or {}).get("skipped") or []
    return skipped


def _current_shards(listing: SourceListing, done: dict[tuple[str, str], str]) -> list[str]:
    """The shards that hold the source's current inputs, sorted."""
    return sorted({done[k] for i in listing.inputs if (k := (i.key, i.digest)) in done})


def write_snapshot(store: Store, model: ScoringModel, listing: SourceListing, done: dict[tuple[str, str], str],
                   fp: str, source: str, drift: dict[str, Any], report: dict[str, bytes]
                   ) -> tuple[dict[str, Any], bool, str]:
    """The run's output `fp` (or the one committed before for the same model and inputs): (manifest, cached,
    where)."""
    import pyarrow.parquet as pq

    version = model.ref.label
    stage = scores_stage(version, OUTPUTS)
    shards = _current_shards(listing, done)

    def make(staging: Path, _save_partial: Any) -> dict[str, Any]:
        table = _gather_rows(store, version, listing, shards)
        if table is not None:
            pq.write_table(table, staging / PREDICTIONS)
        for name, data in report.items():
            (staging / name).write_bytes(data)
        skipped = [*listing.skipped, *_shard_skips(store, version, shards)]
        return {"stage": "score", "source": source, "model_version": version, "model": model.export_fingerprint,
                "images": 0 if table is None else table.num_rows, "skipped": skipped, "drift": drift,
                "shards": shards}

    manifest, cached, _local = store.build(stage, fp, make)
    return manifest, cached, store.location(stage, fp)
