"""`data.source` strings to sources."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from stages.data.sources.base import DEBIAN_FASHION_MNIST, KNOWN_CLASS_NAMES, Source
from stages.data.sources.idx import IDX_FILES, IdxSource, KerasSource, find_idx_file
from stages.data.sources.parquet import ParquetSource, parquet_files
from stages.data.sources.tfds import TfdsSource
from tapeline.errors import DataSourceError
from tapeline.store import is_remote


def named_source(name: str) -> Source:
    """fashion_mnist / mnist: local IDX files when present, else a Keras download."""
    candidates = []
    if os.environ.get("TAPELINE_DATA_DIR"):
        candidates.append(Path(os.environ["TAPELINE_DATA_DIR"]) / name)
    if name == "fashion_mnist":
        candidates.append(DEBIAN_FASHION_MNIST)
    for directory in candidates:
        if directory.is_dir() and all(find_idx_file(directory, s) for s in IDX_FILES.values()):
            return IdxSource(directory, KNOWN_CLASS_NAMES[name])
    return KerasSource(name)


def resolve_source(source: str, tfds_data_dir: str | None = None, images: Any = None) -> Source:
    """The Source object for a `data.source` string (`images`: the ImageFolderSource's class names and options)."""
    scheme, _, rest = source.partition(":")
    if source in KNOWN_CLASS_NAMES:
        return named_source(source)
    if scheme == "idx":
        path = Path(rest).expanduser()
        if not path.is_dir():
            raise DataSourceError(f"data.source idx:{rest}: directory does not exist")
        return IdxSource(path)
    if scheme == "tfds":
        return TfdsSource(rest, tfds_data_dir)
    if scheme == "parquet":
        if not is_remote(rest):
            parquet_files(rest)
        return ParquetSource(rest)
    if scheme == "images":
        from stages.data.sources.images import ImageFolderSource

        class_names, options = images if images is not None else (None, None)
        return ImageFolderSource(rest, class_names, options) if options else ImageFolderSource(rest, class_names)
    raise DataSourceError(f"data.source {source!r}: unknown source (fashion_mnist, mnist, idx:, tfds:, parquet:, "
                          "images:)")
