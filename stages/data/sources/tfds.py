"""TensorFlow Datasets as a source (`tfds:NAME`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from stages.data.sources.base import RawData, class_names_for
from tapeline.errors import DataSourceError, DownloadError

# ---------------------------------------------------------------- TFDS

def _tfds_arrays(dataset: Any) -> tuple[np.ndarray, np.ndarray]:
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
            train_x, train_y = _tfds_arrays(train)
            test_x, test_y = _tfds_arrays(test)
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
