"""Stage results: the small frozen records that cross task boundaries (paths, fingerprints, scalars)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict

from tapeline.config import PipelineConfig

METRICS_FILE = "metrics.json"


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
    location: str = ""


class DataResult(StageResult):
    """Sharded TFRecords of the train / validation / test splits."""

    input_spec: InputSpec
    records: dict[str, int]


class ValidateResult(StageResult):
    """The data validation report: whether it passed, and the error and warning kinds with their counts."""

    passed: bool
    errors: dict[str, int]
    warnings: dict[str, int]


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
    """Test-split metrics of the trained model (a pure function of the model, the data and the config)."""

    test_accuracy: float
    test_loss: float

    def metrics(self) -> dict[str, Any]:
        """The full metrics.json: per-class figures and the confusion matrix."""
        return json.loads((self.path / METRICS_FILE).read_text())


class ExportResult(StageResult):
    """Exported, verified artifacts."""

    formats: tuple[str, ...]


class Promotion(BaseModel):
    """The promotion step's decision for one run (never cached: production may change between runs)."""

    model_config = ConfigDict(frozen=True)

    promoted: bool
    decision: str
    model_path: str
    test_accuracy: float
    champion_version: str | None = None
    champion_accuracy: float | None = None
    record: str | None = None


R = TypeVar("R", bound=StageResult)


EpochCallback = Callable[[dict[str, float], int], None]
StopCheck = Callable[[list[dict[str, float]]], bool]  # the history so far -> stop training here


@dataclass(frozen=True)
class StageInputs:
    """What a stage's build function gets: the config, its upstream results, and optional hooks."""

    config: PipelineConfig
    upstream: Mapping[str, StageResult]
    on_epoch_end: EpochCallback | None = None
    external: Any = None
    fetch: Callable[[str, str], Path] | None = None
    store: Any = None  # the artifacts Store (promoted models are read from it)
    should_stop: StopCheck | None = None  # asked after each epoch's checkpoint (a sweep's pruner)

    def result(self, name: str, kind: type[R]) -> R:
        """The upstream result of stage `name`, typed."""
        found = self.upstream[name]
        if not isinstance(found, kind):
            raise TypeError(f"upstream {name} is a {type(found).__name__}, not a {kind.__name__}")
        return found

    @property
    def data(self) -> DataResult:
        """The data stage's result."""
        return self.result("data", DataResult)

    @property
    def model(self) -> ModelResult:
        """The model stage's result."""
        return self.result("model", ModelResult)

    @property
    def train(self) -> TrainResult:
        """The train stage's result."""
        return self.result("train", TrainResult)

    @property
    def evaluate(self) -> EvaluateResult:
        """The evaluate stage's result."""
        return self.result("evaluate", EvaluateResult)
