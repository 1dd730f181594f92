"""The data stage: sources -> train / validation / test splits -> sharded TFRecords and a manifest."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.data.layout import ENCODING, SPLITS, image_keys, shard_name
from stages.data.records import write_records
from stages.data.sources.base import RawData, Source
from stages.data.sources.images import ImageFolderSource, ImageOptions, SpooledImages, chunks
from stages.data.sources.parquet import ParquetSource
from stages.data.sources.resolve import resolve_source
from tapeline.cache import describe_files, package_versions
from tapeline.config import DataConfig, PipelineConfig
from tapeline.errors import DataSourceError
from tapeline.results import DataResult, InputSpec, StageInputs

GATHER_BATCH = 2048  # images gathered (from memory or a spool) at a time, and at most GATHER_BYTES of them:
GATHER_BYTES = 16 << 20  # what writing holds beyond the per-file bookkeeping
log = logging.getLogger("tapeline.data")


def _image_options(config: DataConfig) -> tuple[tuple[str, ...] | None, ImageOptions]:
    """The class names and decoding options of an `images:` source."""
    return config.class_names, ImageOptions(image_size=config.image_size, color_mode=config.color_mode,
                                            interpolation=config.interpolation,
                                            crop_to_aspect_ratio=config.crop_to_aspect_ratio)


def _data_sources(config: DataConfig) -> list[Source]:
    """The main source, then the optional extra Parquet data (a directory or bucket prefix with no Parquet file
    yet adds nothing)."""
    sources = [resolve_source(config.source, config.tfds_data_dir, _image_options(config))]
    if config.extra and not (extra := ParquetSource(config.extra)).is_empty():
        sources.append(extra)
    return sources


def source_identity(config: PipelineConfig, *_context: Any) -> list[dict[str, Any]]:
    """What the data fingerprint knows of the sources: checksums of their files, or a dataset name and version
    (the store and upstream fingerprints the graph also offers are not needed)."""
    return [source.identity() for source in _data_sources(config.data)]


# ---------------------------------------------------------------- pools and selections

@dataclass(frozen=True)
class Pool:
    """The images and labels of one part of every source, one after another, never copied into one array: a part
    is a NumPy array or images read on demand (`stages.data.sources.images.SpooledImages`); rows are gathered when
    written."""

    parts: tuple[Any, ...]
    labels: np.ndarray

    @classmethod
    def of(cls, pairs: list[tuple[Any, np.ndarray | None]], where: str) -> Pool:
        """The present (images, labels) pairs, which must share one image shape."""
        present = [(x, y) for x, y in pairs if x is not None and y is not None and len(y)]
        shapes = {tuple(x.shape[1:]) for x, _ in present}
        if len(shapes) > 1:
            raise DataSourceError(f"{where}: sources have different image shapes {sorted(shapes)}")
        labels = np.concatenate([y for _, y in present]) if present else np.zeros(0, np.int64)
        return cls(tuple(x for x, _ in present), labels.astype(np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """(H, W, C) of every image."""
        return tuple(int(d) for d in self.parts[0].shape[1:])

    def gather(self, indices: np.ndarray) -> np.ndarray:
        """The images at `indices` (in that order) as one uint8 array."""
        if len(self.parts) == 1:  # one source: its own gather, without a second copy
            return np.asarray(self.parts[0][indices], np.uint8)
        bounds = np.cumsum([0, *(len(p) for p in self.parts)])
        out = np.empty((len(indices), *self.image_shape), np.uint8)
        owner = np.searchsorted(bounds, indices, side="right") - 1
        for number, part in enumerate(self.parts):
            mine = np.flatnonzero(owner == number)
            if len(mine):
                out[mine] = part[indices[mine] - bounds[number]]
        return out

    @functools.cached_property
    def keys(self) -> np.ndarray:
        """`image_keys` of every image, computed once (an array's a batch at a time; a spool knows its own)."""
        return np.concatenate([keys_of(part) for part in self.parts]) if self.parts else np.zeros(0, "S16")


@dataclass(frozen=True)
class Selection:
    """A split before it is written: rows of one or more pools, in order."""

    segments: tuple[tuple[Pool, np.ndarray], ...]

    def __len__(self) -> int:
        return sum(len(rows) for _, rows in self.segments)

    @property
    def labels(self) -> np.ndarray:
        """Every row's label."""
        return np.concatenate([pool.labels[rows] for pool, rows in self.segments])

    @property
    def keys(self) -> np.ndarray:
        """Every row's `image_keys`."""
        return np.concatenate([pool.keys[rows] for pool, rows in self.segments])

    @property
    def image_shape(self) -> tuple[int, ...]:
        """(H, W, C) of every image."""
        return self.segments[0][0].image_shape

    def subset(self, picked: np.ndarray) -> Selection:
        """The rows at `picked` (positions in this selection), in that order. Only a selection of one pool is
        ever subset (the training pool, before test and validation are drawn from it)."""
        (pool, rows), = self.segments
        return Selection(((pool, rows[picked]),))

    def batches(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(images, labels) of rows start..stop, a bounded batch at a time."""
        stop = len(self) if stop is None else stop
        offset = 0
        for pool, rows in self.segments:
            lo, hi = max(start - offset, 0), min(stop - offset, len(rows))
            for chunk in chunks(rows[lo:hi], batch_for(self.image_shape)) if lo < hi else ():
                yield pool.gather(chunk), pool.labels[chunk]
            offset += len(rows)


def keys_of(images: Any) -> np.ndarray:
    """`image_keys` of an array, a batch at a time, or of `SpooledImages` (hashed when they were decoded)."""
    if isinstance(images, SpooledImages):
        return images.image_keys()
    batches = [image_keys(images[chunk])
               for chunk in chunks(np.arange(len(images)), batch_for(images.shape[1:]))]
    return np.concatenate(batches) if batches else np.zeros(0, "S16")


def batch_for(image_shape: tuple[int, ...]) -> int:
    """Images gathered at a time: GATHER_BATCH, fewer when that many would take more than GATHER_BYTES."""
    return max(1, min(GATHER_BATCH, GATHER_BYTES // max(1, int(np.prod(image_shape)))))


def whole(pool: Pool) -> Selection:
    """Every row of `pool`, in order."""
    return Selection(((pool, np.arange(len(pool))),))


def _concatenated(*selections: Selection) -> Selection:
    """The selections one after another."""
    return Selection(tuple(segment for s in selections for segment in s.segments if len(segment[1])))


# ---------------------------------------------------------------- splitting

def _stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) sorted indices; each class gives round(fraction * n) (at least 1 when it has 2+)."""
    rng = np.random.default_rng(seed)
    held = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        n = int(round(len(idx) * fraction))
        if n == 0 and len(idx) >= 2:
            n = 1
        held.append(idx[:n])
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    kept_idx = np.setdiff1d(np.arange(len(labels)), held_idx, assume_unique=True)
    return kept_idx, held_idx


def _grouped_holdout(keys: np.ndarray, labels: np.ndarray, fraction: float, seed: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """`_stratified_holdout` over distinct images (equal `image_keys`): every copy of an image lands in the same
    split. Each group is drawn by its first copy (its label), so data without duplicates splits exactly as before."""
    _, first, group = np.unique(keys, return_index=True, return_inverse=True)
    representatives = np.sort(first)
    _, held = _stratified_holdout(labels[representatives], fraction, seed)
    held_groups = np.zeros(len(first), bool)
    held_groups[group[representatives[held]]] = True
    held_mask = held_groups[group.reshape(-1)]
    return np.flatnonzero(~held_mask), np.flatnonzero(held_mask)


def limited(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subset of at most `limit` of `n` examples."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])


def _split_sources(raws: list[RawData], config: DataConfig, seed: int) -> tuple[dict[str, Selection], int]:
    """(train / validation / test selections, training copies of test images dropped): test from the source (or
    carved), limit, then a stratified validation; carving is group-aware, so copies never straddle splits. Only
    indices are computed here: the images stay where the sources hold them until the shards are written."""
    main = raws[0]
    dropped = 0
    train = whole(Pool.of([(r.train_images, r.train_labels) for r in raws], config.source))
    if main.test_images is None:
        keep, held = _grouped_holdout(train.keys, train.labels, config.test_fraction, seed + 1)
        extra_test = whole(Pool.of([(r.test_images, r.test_labels) for r in raws[1:]], config.source))
        test = _concatenated(train.subset(held), extra_test)
        train = train.subset(keep)
    else:
        test = whole(Pool.of([(r.test_images, r.test_labels) for r in raws], config.source))
        if config.drop_test_duplicates:
            copies = np.isin(train.keys, test.keys)
            dropped = int(copies.sum())
            train = train.subset(np.flatnonzero(~copies))
            if dropped:
                log.warning("dropped %d training images that are exact copies of test images "
                            "(data.drop_test_duplicates)", dropped)
    if len(test) and test.image_shape != train.image_shape:
        raise DataSourceError(f"{config.source}: sources have different image shapes "
                              f"{sorted({test.image_shape, train.image_shape})}")
    train = train.subset(limited(len(train), config.limit, seed + 2))
    if main.validation_images is not None and main.validation_labels is not None:  # the source's own split
        order = np.random.default_rng(seed + 3).permutation(len(train))
        return {"train": train.subset(order),
                "validation": whole(Pool.of([(main.validation_images, main.validation_labels)], config.source)),
                "test": test}, dropped
    keep, val = _grouped_holdout(train.keys, train.labels, config.validation_fraction, seed)
    if len(val) == 0 or len(keep) == 0:
        raise DataSourceError(
            f"{config.source}: {len(train)} training examples leave an empty train or validation split; "
            "provide more data or change data.validation_fraction"
        )
    order = np.random.default_rng(seed + 3).permutation(len(keep))
    return {"train": train.subset(keep[order]), "validation": train.subset(val), "test": test}, dropped


def write_shards(directory: Path, split: str, selection: Selection, shards: int) -> list[str]:
    """Write a split as `shards` contiguous TFRecord files, a bounded batch of images at a time; returns their
    names."""
    import tensorflow as tf

    count = max(1, min(shards, len(selection)))
    small, extra = divmod(len(selection), count)  # np.array_split's sizes: the first `extra` shards hold one more
    bounds = np.cumsum([0, *([small + 1] * extra), *([small] * (count - extra))])
    names = []
    for index in range(count):
        name = shard_name(split, index, count)
        with tf.io.TFRecordWriter(str(directory / name)) as writer:
            for images, labels in selection.batches(int(bounds[index]), int(bounds[index + 1])):
                write_records(writer, images, labels)
                del images  # before the next batch is gathered: one batch in memory, not two
        names.append(name)
    return names


def _unreadable_files(raws: list[RawData]) -> dict[str, Any]:
    """What the manifest says of files a source skipped: `skipped` [{path, reason}] image files, `image_files` (how
    many were tried), `unwalked` [{path, reason}] folders and links that were not walked (link loops, unreadable
    directories: never counted as images); nothing for sources without files of their own."""
    tried = [r.files for r in raws if r.files is not None]
    if not tried:
        return {}
    return {"image_files": sum(tried), "skipped": [dict(s) for r in raws for s in r.skipped],
            "unwalked": [dict(u) for r in raws for u in r.unwalked]}


def class_counts(labels: np.ndarray, num_classes: int) -> list[int]:
    """Examples per class."""
    return np.bincount(labels, minlength=num_classes).astype(int).tolist()


def build_data(staging: Path, inputs: StageInputs) -> dict[str, Any]:
    """Load the sources, split, write every split's shards; returns the manifest body."""
    config = inputs.config
    started = time.perf_counter()
    sources = _data_sources(config.data)
    # The graph computed the identity for the fingerprint already (for an image folder: a walk of every file).
    identity = inputs.external if inputs.external is not None else [s.identity() for s in sources]
    raws = [s.load_listed(known) if isinstance(s, ImageFolderSource) else s.load()
            for s, known in zip(sources, identity, strict=True)]
    names = max((r.class_names for r in raws), key=len)
    loaded = time.perf_counter()
    try:
        splits, dropped = _split_sources(raws, config.data, config.seed)
        shard_files = {split: write_shards(staging, split, selection, config.data.shards)
                       for split, selection in splits.items()}
        labels = {split: selection.labels for split, selection in splits.items()}
    finally:
        for raw in raws:
            raw.release()
    files = {f["name"]: f for f in describe_files(staging)}
    shape = splits["train"].image_shape
    body = {
        "stage": "data",
        "config": config.data.model_dump(mode="json"),
        "seed": config.seed,
        "source": {"spec": config.data.source, "extra": config.data.extra, "identity": identity},
        "input_spec": {"shape": shape, "class_names": list(names)},
        "encoding": ENCODING,
        "dropped_test_duplicates": dropped,
        **_unreadable_files(raws),
        "normalization": "float32 = uint8 / 255, in the reader after batching",
        "splits": {
            split: {
                "records": len(y),
                "class_counts": class_counts(y, len(names)),
                "files": [files[n] for n in shard_files[split]],
            }
            for split, y in labels.items()
        },
        "files": list(files.values()),
        "seconds": {"load": round(loaded - started, 3), "split_and_write": round(time.perf_counter() - loaded, 3)},
        "versions": package_versions(),
    }
    for split, y in labels.items():
        log.info("%s: %d records, class counts %s", split, len(y), class_counts(y, len(names)))
    unseen = [names[c] for c, n in enumerate(class_counts(labels["validation"], len(names))) if n == 0]
    if unseen:
        log.warning("classes %s have no validation examples (fewer than 2 training examples each): early "
                    "stopping cannot see them", unseen)
    log.info("wrote %.1f MB of TFRecords in %.2f s", sum(f["bytes"] for f in files.values()) / 1e6,
             time.perf_counter() - loaded)
    return body


def data_result(path: Path, manifest: dict[str, Any], cached: bool, seconds: float) -> DataResult:
    """A DataResult from a data manifest."""
    spec = manifest["input_spec"]
    return DataResult(
        stage="data", fingerprint=manifest["fingerprint"], path=path, cached=cached, seconds=seconds,
        input_spec=InputSpec(shape=tuple(spec["shape"]), class_names=tuple(spec["class_names"])),
        records={s: manifest["splits"][s]["records"] for s in SPLITS},
    )
