"""The project's own error types: each names the problem and the fix."""

from __future__ import annotations


class TapelineError(Exception):
    """Base class of every error tapeline raises on purpose. The command exits with `exit_status`: 2 for bad input,
    as argparse does."""

    exit_status = 2


class OutcomeError(TapelineError):
    """The command ran as asked and its outcome is a failure a script must see (every trial of a sweep failed):
    exit status 1."""

    exit_status = 1


class ConfigError(TapelineError):
    """The configuration is invalid (unknown key, bad value)."""


class DataSourceError(TapelineError):
    """A data source cannot be read: missing, malformed or inconsistent files."""


class DownloadError(DataSourceError):
    """A download failed: possibly transient, so the flow retries it."""


class CacheError(TapelineError):
    """A cached stage output is missing, incomplete or corrupt."""


class MissingUpstreamError(TapelineError):
    """A stage was asked to run before the stage it depends on."""


class TrainingError(TapelineError):
    """Training cannot continue (for example, a non-finite loss)."""


class ExportError(TapelineError):
    """An exported artifact does not reproduce the trained model."""


class PredictError(TapelineError):
    """An input given to `tapeline predict` cannot be used."""


class LockTimeoutError(TapelineError):
    """Another tapeline process holds a lock for longer than we may wait."""


class StoreError(TapelineError):
    """The artifacts store cannot be used as given: unsupported URL, missing bucket, refused credentials."""


class StoreConnectionError(TapelineError):
    """The object store did not answer: possibly transient, so the flow retries it."""


class ValidationError(TapelineError):
    """The data failed validation: the report names each error kind and count."""

    def __init__(self, message: str, result: object = None) -> None:
        super().__init__(message)
        self.result = result

    def __reduce__(self) -> tuple[type, tuple[str, object]]:
        # Prefect pickles a failed task's exception: keep the result (the report) with it.
        return type(self), (str(self), self.result)


class ImageError(TapelineError):
    """An image cannot be used: undecodable, oversize, a decompression bomb, or an unsupported mode."""


class TrainingPaused(Exception):  # noqa: N818 - not an error: a caller asked the loop to stop here
    """Training stopped after `epoch` because the caller's stop check said so (a sweep's pruner). The epoch's
    checkpoint is saved: training the same config again resumes from it."""

    def __init__(self, epoch: int) -> None:
        super().__init__(f"training paused after epoch {epoch}")
        self.epoch = epoch

    def __reduce__(self) -> tuple[type, tuple[int]]:
        return type(self), (self.epoch,)


class ScoreError(TapelineError):
    """A scoring run cannot start as asked: no production model, a version that does not exist, an empty source."""


class InstallError(TapelineError):
    """The environment lacks what tapeline needs, or holds two builds of it (TensorFlow)."""
