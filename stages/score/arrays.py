"""Scoring sources that hold their images in files of many (`idx:DIR` on disk, `parquet:PATH` on disk or a bucket
prefix): one input per row, keyed `<file>#<row>` and versioned by the SHA-256 of the row's own bytes, so a file
rewritten with one new row scores that row alone. A process reads such a source once and keeps its rows for every
shard it scores."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

import numpy as np

from stages.data.sources.idx import IDX_FILES, find_idx_file, load_idx_pair, parse_idx, read_idx_bytes
from stages.data.sources.parquet import ParquetSource, decode_image_cell, row_shape
from tapeline.errors import DataSourceError, ScoreError

ARRAY_SCHEMES = ("idx:", "parquet:")
_ROWS: dict[str, dict[str, tuple[Any, int | None]]] = {}
_READING = threading.Lock()


def digest(data: bytes) -> str:
    """The content digest of one row."""
    return hashlib.sha256(data).hexdigest()


def _idx_rows(directory: Path) -> dict[str, tuple[Any, int | None]]:
    """key -> (uint8 [H, W, C] image, label or None) of every IDX images file in `directory` (labels when its
    labels file is there)."""
    if not directory.is_dir():
        raise ScoreError(f"score: idx:{directory}: directory does not exist")
    rows: dict[str, tuple[Any, int | None]] = {}
    for split in ("test", "train"):
        images_path = find_idx_file(directory, IDX_FILES[f"{split}_images"])
        if images_path is None:
            continue
        labels_path = find_idx_file(directory, IDX_FILES[f"{split}_labels"])
        if labels_path is not None:
            images, labels = load_idx_pair(images_path, labels_path)
            found = [int(v) for v in labels]
        else:
            images = parse_idx(read_idx_bytes(images_path), str(images_path))
            images = images[..., np.newaxis] if images.ndim == 3 else images
            found = [None] * len(images)
        rows.update({f"{images_path.name}#{i}": (image, label) for i, (image, label) in
                     enumerate(zip(images, found, strict=True))})
    if not rows:
        raise ScoreError(f"score: idx:{directory} holds no IDX images file ({IDX_FILES['test_images']} or "
                         f"{IDX_FILES['train_images']}, raw or .gz)")
    return rows


def _row_file_name(pattern: str, where: str, files: int) -> str:
    """A Parquet file's name in its rows' keys: relative to the directory or prefix the source names."""
    if "://" in where:
        prefix = pattern.rstrip("/") + "/"
        return where[len(prefix):] if where.startswith(prefix) else where.rsplit("/", 1)[-1]
    path = Path(where)
    base = Path(pattern).parent if files == 1 else Path(pattern)
    return str(path.relative_to(base)) if path.is_relative_to(base) else path.name


def _parquet_rows(pattern: str) -> dict[str, tuple[Any, int | None]]:
    """key -> (the row's image cell, label or None) of every Parquet file a path or bucket prefix names (the data
    stage's own listing and fetch); the cells are decoded when scored."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        files = ParquetSource(pattern).files()
    except DataSourceError as exc:
        raise ScoreError(f"score: {exc}") from None
    rows: dict[str, tuple[Any, int | None]] = {}
    for where, data in files:
        table = pq.read_table(pa.BufferReader(data) if data is not None else where)
        if "image" not in table.column_names:
            raise ScoreError(f"score: {where} has no 'image' column (PNG bytes or a list of uint8 per row); its "
                             f"columns are {', '.join(table.column_names)}")
        labels = table.column("label").to_pylist() if "label" in table.column_names else [None] * table.num_rows
        name = _row_file_name(pattern, where, len(files))
        for i, cell in enumerate(table.column("image").to_pylist()):
            rows[f"{name}#{i}"] = ((cell, row_shape(table, i, f"{where} row {i}")), labels[i])
    return rows


def source_rows(source: str) -> dict[str, tuple[Any, int | None]]:
    """The rows of an `idx:` or `parquet:` source, read once per process."""
    with _READING:
        if source not in _ROWS:
            location = source.split(":", 1)[1]
            if "://" in location and source.startswith("idx:"):
                raise ScoreError(f"score: {source}: idx: sources are read from disk (as the data stage reads them); "
                                 "copy the files here, or use parquet: or images: on a bucket")
            _ROWS[source] = _idx_rows(Path(location)) if source.startswith("idx:") else _parquet_rows(location)
        return _ROWS[source]


def forget(source: str) -> None:
    """Drop a source's rows from this process (a new listing reads it again)."""
    with _READING:
        _ROWS.pop(source, None)


def row_bytes(value: Any) -> bytes:
    """The bytes a row's digest covers: its image cell or pixels."""
    if isinstance(value, np.ndarray):
        return value.tobytes()
    cell, shape = value
    return cell if isinstance(cell, bytes | bytearray) else np.asarray(cell, np.int64).tobytes() + repr(shape).encode()


def row_image(source: str, key: str) -> np.ndarray:
    """One row's image as uint8 [H, W, C] (a Parquet cell decoded now)."""
    value, _ = source_rows(source)[key]
    if isinstance(value, np.ndarray):
        return value
    cell, shape = value
    try:
        return decode_image_cell(cell, shape, key)
    except DataSourceError as exc:
        raise ValueError(str(exc).removeprefix(f"{key}: ")) from None
