"""IDX files (MNIST, Fashion-MNIST: Debian's dataset-fashion-mnist or a directory) and tf.keras.datasets."""

from __future__ import annotations

import gzip
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.data.sources.base import KNOWN_CLASS_NAMES, RawData, class_names_for, source_sha256, with_channels
from tapeline.errors import DataSourceError, DownloadError

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
MAX_IDX_DATA_BYTES = 2 * 1024**3  # 45x Fashion-MNIST's training images


# ---------------------------------------------------------------- IDX

def _idx_header(data: bytes, where: str) -> tuple[int, list[int], np.dtype]:
    """(header length, dims, dtype) of an IDX buffer's header: magic (0, 0, dtype, ndim), big-endian dims."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES or not 1 <= data[3] <= 4:
        raise DataSourceError(
            f"{where}: bad IDX magic number {data[:4].hex() or '(empty)'}; expected 0000 + dtype code + ndim "
            "(for example 00000803 for uint8 images): is this an MNIST-format IDX file?"
        )
    header = 4 + 4 * data[3]
    if len(data) < header:
        raise DataSourceError(f"{where}: truncated IDX header ({len(data)} bytes)")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(data[3])]
    return header, dims, np.dtype(IDX_DTYPES[data[2]])


def read_idx_bytes(path: Path) -> bytes:
    """The decompressed bytes of an IDX file (`.gz` or raw), read with memory bounded by its header: the
    header is checked first, a raw file's size is compared with it before its body is read, and a `.gz`
    is decompressed as a stream of at most the declared size (plus one byte, to notice a surplus)."""
    compressed = path.suffix == ".gz"
    try:
        with (gzip.open(path, "rb") if compressed else path.open("rb")) as f:
            head = f.read(4)
            head += f.read(4 * head[3]) if len(head) == 4 and 1 <= head[3] <= 4 else b""
            header, dims, dtype = _idx_header(head, str(path))
            declared = math.prod(dims) * dtype.itemsize
            if declared > MAX_IDX_DATA_BYTES:
                raise DataSourceError(f"{path}: header declares dims {dims} ({declared / 1e9:.1f} GB of data), more "
                                      f"than tapeline reads ({MAX_IDX_DATA_BYTES / 2**30:.0f} GiB): is the header "
                                      "corrupt?")
            if not compressed and path.stat().st_size != header + declared:
                raise DataSourceError(
                    f"{path}: header declares dims {dims} ({declared} bytes of data) but the file holds "
                    f"{path.stat().st_size - header}; the file is truncated or corrupt: fetch it again")
            return head + f.read(declared + 1)
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataSourceError(f"{path}: cannot read ({exc})") from exc


def parse_idx(data: bytes, where: str) -> np.ndarray:
    """Parse an IDX buffer: magic (0, 0, dtype, ndim), big-endian dims, then the values."""
    header, dims, dtype = _idx_header(data, where)
    expected = math.prod(dims) * dtype.itemsize
    # Compare sizes before allocating anything: a lying header must not cost memory.
    if len(data) - header != expected:
        raise DataSourceError(
            f"{where}: header declares dims {dims} ({expected} bytes of data) but the file holds "
            f"{len(data) - header}{' or more' if len(data) - header == expected + 1 else ''}; the file is "
            "truncated or corrupt: fetch it again"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def find_idx_file(directory: Path, stem: str) -> Path | None:
    """`stem` or `stem.gz` in `directory` (also the `stem` with '-idx' written as '.idx')."""
    for name in (stem, f"{stem}.gz", stem.replace("-idx", ".idx"), f"{stem.replace('-idx', '.idx')}.gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _idx_paths(directory: Path) -> dict[str, Path]:
    """The four MNIST-format files in `directory`, or an error listing the missing ones."""
    if not directory.is_dir():
        raise DataSourceError(f"idx source {directory} is not a directory")
    found = {key: find_idx_file(directory, stem) for key, stem in IDX_FILES.items()}
    missing = [IDX_FILES[k] for k, p in found.items() if p is None]
    if missing:
        raise DataSourceError(f"{directory}: missing {', '.join(missing)} (raw or .gz)")
    return {k: p for k, p in found.items() if p is not None}


def load_idx_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, H, W, C] and labels int64 [N] from two IDX files, cross-checked."""
    images = parse_idx(read_idx_bytes(images_path), str(images_path))
    labels = parse_idx(read_idx_bytes(labels_path), str(labels_path))
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise DataSourceError(
            f"{images_path}: expected uint8 images of 3 or 4 dims, got {images.dtype} with dims {list(images.shape)}"
        )
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataSourceError(f"{labels_path}: expected 1-D integer labels, got dims {list(labels.shape)}")
    if len(images) != len(labels):
        raise DataSourceError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    return with_channels(images.astype(np.uint8)), labels.astype(np.int64)


@dataclass(frozen=True)
class IdxSource:
    """A directory with the four MNIST-format IDX files."""

    directory: Path
    known_classes: tuple[str, ...] | None = None

    def identity(self) -> dict[str, Any]:
        """Checksums of the four files."""
        return {"kind": "idx", "files": {p.name: source_sha256(p) for p in _idx_paths(self.directory).values()}}

    def load(self) -> RawData:
        """Parse the four files."""
        paths = _idx_paths(self.directory)
        train_x, train_y = load_idx_pair(paths["train_images"], paths["train_labels"])
        test_x, test_y = load_idx_pair(paths["test_images"], paths["test_labels"])
        if train_x.shape[1:] != test_x.shape[1:]:
            raise DataSourceError(
                f"{self.directory}: train images are {train_x.shape[1:]} but test images are {test_x.shape[1:]}"
            )
        names = class_names_for([train_y, test_y], self.known_classes, str(self.directory))
        return RawData(train_x, train_y, test_x, test_y, names)


# ---------------------------------------------------------------- Keras download

@dataclass(frozen=True)
class KerasSource:
    """`tf.keras.datasets.<name>.load_data()`, for users who are online."""

    name: str

    def identity(self) -> dict[str, Any]:
        """The Keras dataset name (its files are fixed upstream)."""
        return {"kind": "keras", "name": self.name}

    def load(self) -> RawData:
        """Download (or read Keras's own cache) through tf.keras.datasets."""
        import tensorflow as tf

        try:
            (train_x, train_y), (test_x, test_y) = getattr(tf.keras.datasets, self.name).load_data()
        except Exception as exc:  # noqa: BLE001 - any download failure gets the same advice
            raise DownloadError(
                f"{self.name}: no local copy and the download failed ({type(exc).__name__}: {exc}). Fix either way: "
                f"put the four IDX files in $TAPELINE_DATA_DIR/{self.name}/"
                + (" or run `apt-get install dataset-fashion-mnist` (Debian)" if self.name == "fashion_mnist" else "")
                + ", or connect to the internet so tf.keras.datasets can download it"
            ) from exc
        return RawData(
            with_channels(np.asarray(train_x, np.uint8)), np.asarray(train_y, np.int64).reshape(-1),
            with_channels(np.asarray(test_x, np.uint8)), np.asarray(test_y, np.int64).reshape(-1),
            KNOWN_CLASS_NAMES[self.name],
        )
