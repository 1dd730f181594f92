"""Stage results: the small frozen records that cross task boundaries (paths, fingerprints, scalars)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict


class InputSpec(BaseModel):
    """What the model stage needs to know about the images: read from the data manifest."""

    model_config = ConfigDict(frozen=True)

    shape: tuple[int, int, int]
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        """Number of label classes."""
        return len(self.class_names)


class StageResult(BaseModel):
    """Common to every stage: where the output is, its fingerprint, and whether it came from the cache."""

    model_config = ConfigDict(frozen=True)

    stage: str
    fingerprint: str
    path: Path
    cached: bool
    seconds: float


class DataResult(StageResult):
    """Sharded TFRecords of the train / validation / test splits."""

    input_spec: InputSpec
    records: dict[str, int]


class ModelResult(StageResult):
    """The seeded, initialized model."""

    parameters: int


class TrainResult(StageResult):
    """The trained model, its history and checkpoints."""

    epochs_run: int
    best_epoch: int
    stopped_early: bool
    best_val_accuracy: float
    train_seconds: float


class EvaluateResult(StageResult):
    """Test-split metrics of the challenger, and of the champion when there is one."""

    test_accuracy: float
    test_loss: float
    champion_version: str | None
    champion_accuracy: float | None


class ExportResult(StageResult):
    """Exported, verified artifacts."""

    formats: tuple[str, ...]


class Promotion(BaseModel):
    """The promotion gate's decision for one run (never cached: production may change between runs)."""

    model_config = ConfigDict(frozen=True)

    promoted: bool
    decision: str
    model_path: Path
