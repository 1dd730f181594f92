"""What a scoring source holds now: one input per image file, keyed by its path under the source and versioned by
its content (SHA-256 on disk, ETag on a bucket), with its label when it lies in a folder named after one of the
model's classes. The listing is the data stage's own (`images:` folders, on disk or on a bucket)."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from stages.data.sources.images import (
    FOLDER,
    IMAGE_EXTENSIONS,
    SPLIT_FOLDERS,
    ImageFile,
    file_location,
    list_files,
    read_sources,
    reason_of,
)
from stages.score.arrays import ARRAY_SCHEMES, digest, forget, row_bytes, row_image, source_rows
from tapeline.errors import DataSourceError, ImageError, PredictError, ScoreError
from tapeline.imaging import IMAGE_FORMATS, open_image
from tapeline.predict import Resize, fit_to_spec
from tapeline.results import InputSpec

SCHEME = "images:"


class ScoreInput(NamedTuple):
    """One input of the source: key (path under the source), content digest, size, label (None: unlabelled). A
    named tuple: a listing holds one per file, and the driver's memory must not grow much with the files."""

    key: str
    digest: str
    size: int = 0
    label: int | None = None


@dataclass(frozen=True)
class SourceListing:
    """Every input of a source as it is now, and what could not be listed ({path, reason})."""

    root: str
    inputs: tuple[ScoreInput, ...]
    skipped: tuple[dict[str, str], ...] = ()

    @property
    def labelled(self) -> bool:
        """Whether any input has a label."""
        return any(i.label is not None for i in self.inputs)


def _source_root(source: str) -> str:
    """The folder or bucket prefix of an `images:` source; ScoreError for any other kind."""
    if not source.startswith(SCHEME) or not source[len(SCHEME):].strip():
        raise ScoreError(f"score: SOURCE {source!r} is not images:DIR (a folder of {IMAGE_FORMATS} files, flat or in "
                         "class folders, on disk or s3://…/gs://…), idx:DIR or parquet:PATH")
    return source[len(SCHEME):]


def label_of(relative: str, class_names: Sequence[str]) -> int | None:
    """The class index of a file in a class folder (`<class>/…` or `<split>/<class>/…`), else None."""
    parts = relative.split("/")
    if len(parts) > 2 and parts[0] in SPLIT_FOLDERS and parts[1] in class_names:
        return list(class_names).index(parts[1])
    if len(parts) > 1 and parts[0] in class_names:
        return list(class_names).index(parts[0])
    return None


def _list_array_source(source: str, class_names: Sequence[str]) -> SourceListing:
    """The rows of an `idx:` or `parquet:` source now (read again: a file may have changed since)."""
    forget(source)
    rows = source_rows(source)
    inputs = tuple(ScoreInput(key=key, digest=digest(row_bytes(value)),
                              label=label if label is not None and 0 <= label < len(class_names) else None)
                   for key, (value, label) in rows.items())
    return SourceListing(root=source, inputs=inputs)


def list_source(source: str, class_names: Sequence[str]) -> SourceListing:
    """The inputs of a source now; ScoreError naming the source when it does not exist or holds no image."""
    if source.startswith(ARRAY_SCHEMES):
        return _list_array_source(source, class_names)
    root = _source_root(source)
    try:
        listing = list_files(root)
    except DataSourceError as exc:
        raise ScoreError(f"score: {str(exc).removeprefix('data.source ')}") from None
    inputs = tuple(ScoreInput(key=f.relative, digest=f.version, size=f.size, label=label_of(f.relative, class_names))
                   for f in listing.files)
    skipped = tuple({"path": p["path"], "reason": p["reason"]} for p in listing.problems if p.get("kind") != FOLDER)
    if not inputs:
        raise ScoreError(f"score: {source} holds no image files ({IMAGE_FORMATS}); check the folder or prefix")
    return SourceListing(root=root, inputs=inputs, skipped=skipped)


Fitted = Iterator[tuple[int, np.ndarray | None, str | None]]


def fitted_images(root: str, inputs: Sequence[ScoreInput], spec: InputSpec, resize: Resize) -> Fitted:
    """(index into `inputs`, the image fitted to the model's input as `tapeline predict` fits it, None) or
    (index, None, why it was skipped) for each input, in order."""
    if root.startswith(ARRAY_SCHEMES):
        return _fitted_rows(root, inputs, spec, resize)
    return _fitted_files(root, inputs, spec, resize)


def _fitted_rows(source: str, inputs: Sequence[ScoreInput], spec: InputSpec, resize: Resize) -> Fitted:
    """`fitted_images` for the rows of an `idx:` or `parquet:` source."""
    for index, member in enumerate(inputs):
        try:
            yield index, fit_to_spec(row_image(source, member.key), spec, member.key, resize), None  # type: ignore[arg-type]
        except (ImageError, PredictError, ValueError) as exc:
            yield index, None, str(exc)[:300]


def _fitted_files(root: str, inputs: Sequence[ScoreInput], spec: InputSpec, resize: Resize) -> Fitted:
    """`fitted_images` for the files of an `images:` folder or bucket prefix (read a window at a time)."""
    files = tuple(ImageFile(i.key, i.size, i.digest) for i in inputs)
    for window in read_sources(root, files):
        for index, source, relative in window:
            if isinstance(source, Exception):
                yield index, None, f"cannot be read ({type(source).__name__}: {source})"
                continue
            try:
                suffix = "." + relative.rpartition(".")[2].lower()
                image = open_image(source, relative, IMAGE_EXTENSIONS.get(suffix))
                image = image[..., np.newaxis] if image.ndim == 2 else image
                yield index, fit_to_spec(image, spec, relative, resize), None  # type: ignore[arg-type]
            except (ImageError, PredictError, OSError, ValueError) as exc:
                yield index, None, reason_of(exc, relative)


@contextlib.contextmanager
def shard_plan(groups: Sequence[Sequence[ScoreInput]]) -> Iterator[Path]:
    """The shards' members in a file of the local read cache, for the life of the block."""
    from tapeline.store import cache_dir

    folder = cache_dir() / "score-plans"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{uuid.uuid4().hex}.json"
    path.write_text(json.dumps([[list(member) for member in group] for group in groups]))
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def read_plan(path: Path) -> list[list[ScoreInput]]:
    """The shards' members written by `shard_plan`."""
    return [[ScoreInput(*member) for member in group] for group in json.loads(path.read_text())]


def skipped_entry(root: str, key: str, reason: str) -> dict[str, str]:
    """A skipped input as the manifest lists it: its real path or URL (a row: the source and `<file>#<row>`) and
    why."""
    if root.startswith(ARRAY_SCHEMES):
        return {"path": f"{root}/{key}", "reason": reason}
    return {"path": file_location(root, key), "reason": reason}
