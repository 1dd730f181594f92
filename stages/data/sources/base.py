"""What every data source shares: the raw arrays a source returns, the Source protocol, class names."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tapeline.cache import sha256_file
from tapeline.errors import DataSourceError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
MNIST_CLASSES = tuple(str(i) for i in range(10))
KNOWN_CLASS_NAMES = {"fashion_mnist": FASHION_MNIST_CLASSES, "mnist": MNIST_CLASSES}
MAX_CLASSES = 1000


@dataclass(frozen=True)
class RawData:
    """Images as uint8 [N, H, W, C] and int64 labels. Images are an array, or read on demand (an image folder's
    `stages.data.sources.images.SpooledImages`: a `shape`, a length and `images[indices]`). `test_*`
    (`validation_*`) is None when the source has no test (validation) split of its own. `skipped` lists the files
    a source could not use, with the reason; `files` is how many it tried (image folders)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray | None
    test_labels: np.ndarray | None
    class_names: tuple[str, ...]
    validation_images: np.ndarray | None = None
    validation_labels: np.ndarray | None = None
    skipped: tuple[dict[str, str], ...] = ()
    unwalked: tuple[dict[str, str], ...] = ()  # folders and links not walked (never images): {path, reason}
    files: int | None = None

    def release(self) -> None:
        """Free what holds images read on demand (an image folder's on-disk spool); arrays need nothing."""
        for images in (self.train_images, self.test_images, self.validation_images):
            spool = getattr(images, "spool", None)  # SpooledImages (image folders); an ndarray has none
            if spool is not None:
                spool.close()


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
