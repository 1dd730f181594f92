"""Data sources: local IDX files, Keras downloads, TFDS, Parquet (on disk or in a bucket) and image folders
(`stages.images`), read into uint8 arrays.

Every source has a cheap `identity()` (file checksums, or a dataset name and version) used in the
data fingerprint, and an expensive `load()` that is only called when the cache misses.
"""

from __future__ import annotations

import glob
import gzip
import io
import math
import os
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from stages.cache import sha256_file
from stages.errors import DataSourceError, DownloadError, ImageError
from stages.store import is_remote, list_objects, object_version

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
MNIST_CLASSES = tuple(str(i) for i in range(10))
KNOWN_CLASS_NAMES = {"fashion_mnist": FASHION_MNIST_CLASSES, "mnist": MNIST_CLASSES}
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
MAX_CLASSES = 1000
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_IDX_DATA_BYTES = 2 * 1024**3  # 45x Fashion-MNIST's training images


@dataclass(frozen=True)
class RawData:
    """Images as uint8 [N, H, W, C] and int64 labels. Images are an array, or read on demand (an image folder's
    `stages.images.SpooledImages`: a `shape`, a length and `images[indices]`). `test_*` (`validation_*`) is None
    when the source has no test (validation) split of its own. `skipped` lists the files a source could not use,
    with the reason; `files` is how many it tried (image folders)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray | None
    test_labels: np.ndarray | None
    class_names: tuple[str, ...]
    validation_images: np.ndarray | None = None
    validation_labels: np.ndarray | None = None
    skipped: tuple[dict[str, str], ...] = ()
    files: int | None = None

    def release(self) -> None:
        """Free what holds images read on demand (an image folder's on-disk spool); arrays need nothing."""
        from stages.images import SpooledImages

        for images in (self.train_images, self.test_images, self.validation_images):
            if isinstance(images, SpooledImages):
                images.spool.close()


class Source(Protocol):
    """What the data stage needs of a source."""

    def identity(self) -> dict[str, Any]:
        """A cheap description that changes whenever the data changes."""
        ...

    def load(self) -> RawData:
        """Read the whole dataset."""
        ...


def with_channels(images: np.ndarray) -> np.ndarray:
    """[N, H, W] -> [N, H, W, 1]; [N, H, W, C] unchanged."""
    return images[..., np.newaxis] if images.ndim == 3 else images


def class_names_for(labels: list[np.ndarray], known: tuple[str, ...] | None, where: str) -> tuple[str, ...]:
    """Class names covering every label: the known names, else "0".."K-1"; rejects bad labels."""
    present = [lab for lab in labels if lab is not None and lab.size]
    if not present:
        raise DataSourceError(f"{where}: no labelled examples")
    low = min(int(lab.min()) for lab in present)
    high = max(int(lab.max()) for lab in present)
    if low < 0 or high >= MAX_CLASSES:
        raise DataSourceError(f"{where}: label values must be in 0..{MAX_CLASSES - 1}, found {low}..{high}")
    if known is not None:
        if high >= len(known):
            raise DataSourceError(f"{where}: label {high} is out of range for {len(known)} classes")
        return known
    if high == 0:
        raise DataSourceError(f"{where}: every example has label 0; a classifier needs at least two classes")
    return tuple(str(i) for i in range(high + 1))


@lru_cache(maxsize=1024)
def _sha256_of_version(path: str, _size: int, _mtime_ns: int, _inode: int) -> str:
    return sha256_file(Path(path))


def source_sha256(path: Path) -> str:
    """The SHA-256 of a source file, hashed once per process while its size, mtime and inode stay the same
    (a run computes fingerprints several times; hashing 30 MB each time would dominate `tapeline plan`)."""
    st = path.stat()
    return _sha256_of_version(str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


# ---------------------------------------------------------------- IDX

def idx_header(data: bytes, where: str) -> tuple[int, list[int], np.dtype]:
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
            header, dims, dtype = idx_header(head, str(path))
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
    header, dims, dtype = idx_header(data, where)
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


def idx_paths(directory: Path) -> dict[str, Path]:
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
        return {"kind": "idx", "files": {p.name: source_sha256(p) for p in idx_paths(self.directory).values()}}

    def load(self) -> RawData:
        """Parse the four files."""
        paths = idx_paths(self.directory)
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


# ---------------------------------------------------------------- TFDS

def tfds_arrays(dataset: Any) -> tuple[np.ndarray, np.ndarray]:
    """A supervised TFDS split as (images, labels) numpy arrays, read in large batches."""
    import tensorflow_datasets as tfds

    batches = list(tfds.as_numpy(dataset.batch(4096)))
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


@dataclass(frozen=True)
class TfdsSource:
    """A TFDS image-classification dataset with train/test splits: `tfds:NAME[:VERSION]`."""

    spec: str
    data_dir: str | None = None

    def _name(self) -> str:
        name, _, version = self.spec.partition(":")
        return f"{name}:{version}" if version else name

    def identity(self) -> dict[str, Any]:
        """Dataset name and version, from the builder (no download)."""
        import tensorflow_datasets as tfds

        try:
            builder = tfds.builder(self._name(), data_dir=self.data_dir)
        except Exception as exc:  # noqa: BLE001 - TFDS raises many types for unknown names
            raise DataSourceError(f"tfds:{self.spec}: unknown dataset or version ({exc})") from exc
        return {"kind": "tfds", "name": builder.name, "version": str(builder.version)}

    def load(self) -> RawData:
        """tfds.load both splits as numpy arrays."""
        import tensorflow_datasets as tfds

        try:
            (train, test), info = tfds.load(
                self._name(), split=["train", "test"], as_supervised=True, data_dir=self.data_dir, with_info=True
            )
            train_x, train_y = tfds_arrays(train)
            test_x, test_y = tfds_arrays(test)
        except Exception as exc:  # noqa: BLE001
            raise DownloadError(
                f"tfds:{self.spec}: cannot load ({type(exc).__name__}: {exc}); prepare it with "
                "`tfds build` online, or set data.tfds_data_dir to where it is prepared"
            ) from exc
        if train_x.dtype != np.uint8 or train_x.ndim != 4:
            raise DataSourceError(
                f"tfds:{self.spec}: expected uint8 images [N, H, W, C], got {train_x.dtype} {train_x.shape}"
            )
        label = info.features["label"]
        known = tuple(label.names) if getattr(label, "names", None) else None
        names = class_names_for([train_y, test_y], known, f"tfds:{self.spec}")
        return RawData(train_x, train_y.astype(np.int64), test_x, test_y.astype(np.int64), names)


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


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
WIDE_MODES = ("I", "F")
COLOUR_MODES = ("RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBa")


def pillow_pixels(img: Any, where: str) -> np.ndarray:
    """A decoded Pillow image as uint8 [H, W] (grey) or [H, W, 3] (colour), for training data and `predict`.

    16-bit images are scaled from 0..65535 (not clipped: a clipped scan turns white), 32-bit integer and
    float images from their own min..max; palette, alpha, CMYK and other colour modes become RGB (alpha
    dropped), 1-bit becomes grey. Anything else is refused by name."""
    mode = img.mode
    if mode in SIXTEEN_BIT_MODES:
        return np.round(np.asarray(img, dtype=np.float64) / 257.0).astype(np.uint8)
    if mode in WIDE_MODES:
        values = np.asarray(img, dtype=np.float64)
        if not np.isfinite(values).all():
            raise ImageError(f"{where}: {mode} image holds non-finite values")
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
        return np.round(scaled).astype(np.uint8)
    if mode in ("L", "RGB"):  # from the raw bytes: NumPy's array interface to Pillow costs half as much again
        return np.frombuffer(img.tobytes(), np.uint8).reshape(img.height, img.width, *((3,) if mode == "RGB" else ()))
    if mode in ("1", "LA", "La"):
        return np.asarray(img.convert("L"), dtype=np.uint8)
    if mode in COLOUR_MODES:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    raise ImageError(f"{where}: Pillow image mode {mode!r} is not supported; convert it to 8-bit grey or RGB")


def open_image(data: bytes | Path, where: str, formats: tuple[str, ...] | None = None) -> np.ndarray:
    """PNG/JPEG/… bytes or file as uint8 [H, W] or [H, W, 3], refusing oversize images and decompression
    bombs by name before any pixel is decoded, and (with `formats`) content of any other format than those."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes | bytearray) else data) as img:
            if formats is not None and img.format not in formats:
                suffix = Path(where).suffix
                raise ImageError(f"the extension {suffix} says {formats[0]} but the content is {img.format}")
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise ImageError(f"{where} is {img.width}x{img.height} pixels, larger than tapeline accepts "
                                 f"({MAX_IMAGE_PIXELS} pixels)")
            return pillow_pixels(img, where)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{where} is a decompression bomb ({exc}); refused") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{where} is not an image tapeline can read (PNG, JPEG or .npy): {exc}") from exc


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


def stack_images(images: list[np.ndarray], where: str) -> np.ndarray:
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


def load_parquet(files: list[tuple[str, bytes | None]], where: str
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels) from Parquet files: (path, None) on disk, (URL,
    bytes) from a bucket."""
    parts = {"train": ([], []), "test": ([], [])}
    for path, data in files:
        images, labels, splits = read_parquet_file(path, data)
        for img, lab, split in zip(images, labels, splits, strict=True):
            parts[split][0].append(img)
            parts[split][1].append(lab)
    train_x = stack_images(parts["train"][0], where)
    test_x = stack_images(parts["test"][0], where)
    if len(parts["train"][0]) and len(parts["test"][0]) and train_x.shape[1:] != test_x.shape[1:]:
        raise DataSourceError(f"{where}: train images are {train_x.shape[1:]}, test images {test_x.shape[1:]}")
    return train_x, np.asarray(parts["train"][1], np.int64), test_x, np.asarray(parts["test"][1], np.int64)


def remote_parquet_files(url: str) -> dict[str, str]:
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
            return {"kind": "parquet", "objects": remote_parquet_files(self.pattern)}
        return {"kind": "parquet", "files": {str(p): source_sha256(p) for p in parquet_files(self.pattern)}}

    def files(self) -> list[tuple[str, bytes | None]]:
        """(path, None) for files on disk, (URL, bytes) for objects fetched from a bucket."""
        if not is_remote(self.pattern):
            return [(str(p), None) for p in parquet_files(self.pattern)]
        from stages.store import guarded, remote_filesystem

        urls = list(remote_parquet_files(self.pattern))
        if not urls:
            raise DataSourceError(f"parquet:{self.pattern}: no Parquet objects found under this prefix")
        fs, _ = remote_filesystem(self.pattern)
        with guarded(self.pattern):
            return [(url, fs.cat_file(url)) for url in urls]

    def is_empty(self) -> bool:
        """Whether the pattern names no Parquet file at all (an empty drop folder or prefix adds nothing)."""
        if is_remote(self.pattern):
            return not remote_parquet_files(self.pattern)
        path = Path(self.pattern)
        return path.is_dir() and not any(path.rglob("*.parquet"))

    def load(self) -> RawData:
        """Read and decode every row."""
        train_x, train_y, test_x, test_y = load_parquet(self.files(), f"parquet:{self.pattern}")
        if not len(train_y):
            raise DataSourceError(f"parquet:{self.pattern}: no training rows")
        names = class_names_for([train_y, test_y], None, f"parquet:{self.pattern}")
        has_test = len(test_y) > 0
        return RawData(train_x, train_y, test_x if has_test else None, test_y if has_test else None, names)


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
        from stages.images import ImageFolderSource

        class_names, options = images if images is not None else (None, None)
        return ImageFolderSource(rest, class_names, options) if options else ImageFolderSource(rest, class_names)
    raise DataSourceError(f"data.source {source!r}: unknown source (fashion_mnist, mnist, idx:, tfds:, parquet:, "
                          "images:)")
