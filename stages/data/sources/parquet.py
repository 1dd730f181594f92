"""Parquet files of encoded images and labels (`parquet:GLOB`, local or on an object store)."""

from __future__ import annotations

import glob
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.data.sources.base import RawData, class_names_for, source_sha256, with_channels
from tapeline.errors import DataSourceError, ImageError
from tapeline.imaging import open_image
from tapeline.store import is_remote, list_objects, object_version

# ---------------------------------------------------------------- Parquet

def parquet_files(pattern: str) -> list[Path]:
    """Files named by a path: a file, every *.parquet under a directory, or a glob."""
    path = Path(pattern[len("file://"):] if pattern.startswith("file://") else pattern)
    pattern = str(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
    else:
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not files:
        raise DataSourceError(f"parquet:{pattern}: no Parquet files found (give a file, a directory or a glob)")
    return files


def decode_image_cell(cell: Any, shape: tuple[int, int, int] | None, where: str) -> np.ndarray:
    """A Parquet image cell (PNG/JPEG bytes or a flat list of uint8) as uint8 [H, W, C]."""
    if isinstance(cell, bytes | bytearray):
        try:
            array = open_image(cell, where)
        except ImageError as exc:
            raise DataSourceError(f"{where}: image bytes cannot be decoded ({exc})") from exc
        return with_channels(array[np.newaxis])[0]
    if isinstance(cell, list | np.ndarray):
        values = np.asarray(cell)
        if values.dtype.kind not in "iu" or (values.size and (values.min() < 0 or values.max() > 255)):
            raise DataSourceError(f"{where}: image list must hold integers in 0..255")
        if shape is None:
            side = math.isqrt(values.size)
            if side * side != values.size or side == 0:
                raise DataSourceError(
                    f"{where}: a list of {values.size} pixels is not square; add height/width/channels columns"
                )
            shape = (side, side, 1)
        if math.prod(shape) != values.size:
            raise DataSourceError(f"{where}: {values.size} pixels do not fill shape {list(shape)}")
        return values.astype(np.uint8).reshape(shape)
    raise DataSourceError(f"{where}: column 'image' must hold PNG bytes or a list of uint8, got {type(cell).__name__}")


def row_shape(table: Any, row: int, where: str) -> tuple[int, int, int] | None:
    """(height, width, channels) from optional columns, or None; DataSourceError naming the row and column of
    an impossible value."""
    names = table.column_names
    if "height" not in names or "width" not in names:
        return None
    shape = {"height": table.column("height")[row].as_py(), "width": table.column("width")[row].as_py(),
             "channels": table.column("channels")[row].as_py() if "channels" in names else 1}
    for column, value in shape.items():
        allowed = (1, 3) if column == "channels" else range(1, 1 << 16)
        if not isinstance(value, int) or value not in allowed:
            fix = "use 1 (grey) or 3 (RGB)" if column == "channels" else "give a positive number of pixels"
            raise DataSourceError(f"{where}: column '{column}' is {value!r}; {fix}")
    return shape["height"], shape["width"], shape["channels"]


def read_parquet_file(path: Path | str, data: bytes | None = None) -> tuple[list[np.ndarray], list[int], list[str]]:
    """Images, labels and split names ("train" when absent) of one Parquet file (its `data`, when fetched from a
    bucket)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data) if data is not None else path)
    except (pa.ArrowException, OSError) as exc:
        raise DataSourceError(f"{path}: not a readable Parquet file ({exc})") from exc
    missing = [c for c in ("image", "label") if c not in table.column_names]
    if missing:
        raise DataSourceError(
            f"{path}: missing column(s) {', '.join(missing)}; expected 'image' (PNG bytes or list of uint8), "
            "'label' (int) and optionally 'split'"
        )
    if not pa.types.is_integer(table.schema.field("label").type):
        raise DataSourceError(f"{path}: column 'label' must be integers, got {table.schema.field('label').type}")
    labels = table.column("label").to_pylist()
    if any(v is None for v in labels):
        raise DataSourceError(f"{path}: column 'label' has missing values")
    splits = table.column("split").to_pylist() if "split" in table.column_names else ["train"] * len(labels)
    bad = sorted({s for s in splits if s not in ("train", "test")}, key=str)
    if bad:
        raise DataSourceError(f"{path}: column 'split' must be 'train' or 'test', found {bad}")
    images = [
        decode_image_cell(cell, row_shape(table, i, f"{path} row {i}"), f"{path} row {i}")
        for i, cell in enumerate(table.column("image").to_pylist())
    ]
    return images, labels, splits


def _stack_images(images: list[np.ndarray], where: str) -> np.ndarray:
    """Stack equally sized images, naming the first that differs."""
    if not images:
        return np.zeros((0, 1, 1, 1), np.uint8)
    first = images[0].shape
    for i, img in enumerate(images):
        if img.shape != first:
            raise DataSourceError(
                f"{where}: mixed image sizes: image {i} is {list(img.shape)}, the first is {list(first)}"
            )
    return np.stack(images)


def _load_parquet(files: list[tuple[str, bytes | None]], where: str
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels) from Parquet files: (path, None) on disk, (URL,
    bytes) from a bucket."""
    parts = {"train": ([], []), "test": ([], [])}
    for path, data in files:
        images, labels, splits = read_parquet_file(path, data)
        for img, lab, split in zip(images, labels, splits, strict=True):
            parts[split][0].append(img)
            parts[split][1].append(lab)
    train_x = _stack_images(parts["train"][0], where)
    test_x = _stack_images(parts["test"][0], where)
    if len(parts["train"][0]) and len(parts["test"][0]) and train_x.shape[1:] != test_x.shape[1:]:
        raise DataSourceError(f"{where}: train images are {train_x.shape[1:]}, test images {test_x.shape[1:]}")
    return train_x, np.asarray(parts["train"][1], np.int64), test_x, np.asarray(parts["test"][1], np.int64)


def _remote_parquet_files(url: str) -> dict[str, str]:
    """{URL: ETag} of the *.parquet objects under a bucket prefix (or matching a glob), from one listing."""
    scheme = url.split("://", 1)[0]
    _, found = list_objects(url)
    return {f"{scheme}://{key}": object_version(info)
            for key, info in sorted(found.items()) if key.endswith(".parquet")}


@dataclass(frozen=True)
class ParquetSource:
    """Labelled images in Parquet: `image`, `label`, optional `split` (train/test); files on disk, or objects
    under a bucket prefix."""

    pattern: str

    def identity(self) -> dict[str, Any]:
        """Checksums of every matched file; for a bucket, each object's ETag from one listing."""
        if is_remote(self.pattern):
            return {"kind": "parquet", "objects": _remote_parquet_files(self.pattern)}
        return {"kind": "parquet", "files": {str(p): source_sha256(p) for p in parquet_files(self.pattern)}}

    def files(self) -> list[tuple[str, bytes | None]]:
        """(path, None) for files on disk, (URL, bytes) for objects fetched from a bucket."""
        if not is_remote(self.pattern):
            return [(str(p), None) for p in parquet_files(self.pattern)]
        from tapeline.store import guarded, remote_filesystem

        urls = list(_remote_parquet_files(self.pattern))
        if not urls:
            raise DataSourceError(f"parquet:{self.pattern}: no Parquet objects found under this prefix")
        fs, _ = remote_filesystem(self.pattern)
        with guarded(self.pattern):
            return [(url, fs.cat_file(url)) for url in urls]

    def is_empty(self) -> bool:
        """Whether the pattern names no Parquet file at all (an empty drop folder or prefix adds nothing)."""
        if is_remote(self.pattern):
            return not _remote_parquet_files(self.pattern)
        path = Path(self.pattern)
        return path.is_dir() and not any(path.rglob("*.parquet"))

    def load(self) -> RawData:
        """Read and decode every row."""
        train_x, train_y, test_x, test_y = _load_parquet(self.files(), f"parquet:{self.pattern}")
        if not len(train_y):
            raise DataSourceError(f"parquet:{self.pattern}: no training rows")
        names = class_names_for([train_y, test_y], None, f"parquet:{self.pattern}")
        has_test = len(test_y) > 0
        return RawData(train_x, train_y, test_x if has_test else None, test_y if has_test else None, names)
