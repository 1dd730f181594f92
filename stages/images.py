"""`images:DIR`: folders of PNG / JPEG / BMP / GIF files, one folder per class, on disk or in a bucket.

Layouts: `DIR/<class>/…`, or `DIR/train/<class>/…` and `DIR/test/<class>/…` (optionally `DIR/validation/<class>/…`).
Files are found recursively below each class folder; hidden files and folders (a leading `.`, such as
`.ipynb_checkpoints`) are skipped; class order is the sorted folder names (Keras's order) or `data.class_names`.

The listing is the identity: (relative path, size, content SHA-256) for files on disk, hashed once per process
while a file's stat is unchanged; (key, size, ETag) from one listing for a bucket, nothing downloaded. Images are
decoded once, in parallel on every core, resized to `data.image_size` with the configured interpolation, and
converted to the configured colour mode; a file that cannot be used (empty, truncated, not an image, an
extension that lies, a format or mode Pillow refuses, a bomb) is skipped with its reason, never raised.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any

import numpy as np

from stages.errors import DataSourceError, ImageError

IMAGE_EXTENSIONS = {".png": ("PNG",), ".jpg": ("JPEG", "MPO"), ".jpeg": ("JPEG", "MPO"), ".bmp": ("BMP",),
                    ".gif": ("GIF",)}
SPLIT_FOLDERS = ("train", "validation", "test")
INTERPOLATIONS = ("bilinear", "nearest", "area", "bicubic")
DECODE_CHUNK = 256  # files per task sent to a decoding process: amortizes the pickling, bounds memory in flight
WINDOW = 8192  # bucket objects fetched at once
FORK = "fork"
IN_PROCESS_BELOW = 1024  # fewer files than this are decoded in this process
log = logging.getLogger("tapeline.images")


@dataclass(frozen=True)
class ImageFile:
    """One listed file: its path relative to DIR, its size and a version (content SHA-256 or ETag)."""

    relative: str
    size: int
    version: str

    @property
    def parts(self) -> list[str]:
        """The path's folders and name."""
        return self.relative.split("/")


@dataclass(frozen=True)
class Layout:
    """What the listing says: the class names and, per file, its class and split (None: to be split)."""

    class_names: tuple[str, ...]
    files: tuple[ImageFile, ...]
    labels: tuple[int, ...]
    splits: tuple[str | None, ...]


@dataclass(frozen=True)
class ImageOptions:
    """How files become arrays: target size (None: keep, all must agree), colour mode, interpolation, crop."""

    image_size: tuple[int, int] | None = None
    color_mode: str = "auto"
    interpolation: str = "bilinear"
    crop_to_aspect_ratio: bool = False


# ---------------------------------------------------------------- listing

def is_visible(relative: str) -> bool:
    """No part of the path starts with a dot (hidden files and folders are skipped)."""
    return not any(part.startswith(".") for part in relative.split("/"))


def has_image_extension(relative: str) -> bool:
    """Whether the file name ends in one of IMAGE_EXTENSIONS, in any case."""
    return os.path.splitext(relative)[1].lower() in IMAGE_EXTENSIONS


@lru_cache(maxsize=1 << 20)
def content_sha256(path: str, _size: int, _mtime_ns: int, _inode: int) -> str:
    """A file's SHA-256, hashed once per process while its size, mtime and inode stay the same."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def walk(directory: str, relative: str = "") -> Iterator[tuple[str, os.stat_result, str]]:
    """(relative path, stat, full path) of every visible file below `directory`, in sorted order."""
    with os.scandir(directory) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            name = f"{relative}{entry.name}"
            if entry.is_dir(follow_symlinks=True):
                yield from walk(entry.path, f"{name}/")
            elif entry.is_file(follow_symlinks=True):
                yield name, entry.stat(follow_symlinks=True), entry.path


def list_local(root: Path) -> list[ImageFile]:
    """Every visible image file under `root`, sorted, with its size and content SHA-256."""
    if not root.is_dir():
        raise DataSourceError(f"data.source images:{root}: directory does not exist")
    return [ImageFile(relative, st.st_size, content_sha256(path, st.st_size, st.st_mtime_ns, st.st_ino))
            for relative, st, path in walk(str(root)) if has_image_extension(relative)]


def list_remote(url: str) -> list[ImageFile]:
    """Every visible image object under a bucket prefix, from one listing: key, size and ETag."""
    from stages.store import list_objects, object_version

    base, entries = list_objects(url)
    prefix = base.rstrip("/") + "/"
    found = []
    for key, info in entries.items():
        relative = key[len(prefix):] if key.startswith(prefix) else key
        if is_visible(relative) and has_image_extension(relative):
            found.append(ImageFile(relative, int(info.get("size") or 0), object_version(info)))
    if not found and not entries:
        raise DataSourceError(f"data.source images:{url}: nothing under this prefix; check the bucket and prefix")
    return sorted(found, key=lambda f: f.relative)


def list_files(root: str) -> list[ImageFile]:
    """The listing of a directory or a bucket prefix."""
    from stages.store import is_remote

    return list_remote(root) if is_remote(root) else list_local(Path(local_root(root)))


def local_root(root: str) -> str:
    """A directory from `DIR` or `file://DIR`."""
    return root[len("file://"):] if root.startswith("file://") else os.path.expanduser(root)


def identity_digest(files: list[ImageFile]) -> str:
    """A hash of the listing: changes when a file is added, removed or changed, not otherwise."""
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.relative}\0{f.size}\0{f.version}\n".encode())
    return digest.hexdigest()


def layout_of(root: str, files: list[ImageFile], class_names: tuple[str, ...] | None) -> Layout:
    """Classes and splits from the folder structure; DataSourceError naming what does not fit."""
    where = f"data.source images:{root}"
    tops = {f.parts[0] for f in files if len(f.parts) > 1}
    by_split = "train" in tops and tops <= set(SPLIT_FOLDERS)
    depth = 2 if by_split else 1
    loose = [f.relative for f in files if len(f.parts) <= depth]
    if loose:
        log.warning("%s: %d files are not inside a class folder and are ignored (e.g. %s)", where, len(loose),
                    loose[0])
    placed = [f for f in files if len(f.parts) > depth]
    if not placed:
        raise DataSourceError(f"{where}: no image files in class folders; expected DIR/<class>/*.png or "
                              "DIR/train/<class>/*.png (extensions .png .jpg .jpeg .bmp .gif)")
    folders = sorted({f.parts[depth - 1] for f in placed})
    names = check_class_names(where, folders, class_names)
    index = {name: i for i, name in enumerate(names)}
    if by_split:
        train_classes = {f.parts[1] for f in placed if f.parts[0] == "train"}
        extra = sorted({f.parts[1] for f in placed} - train_classes)
        if extra:
            raise DataSourceError(f"{where}: class folder(s) {', '.join(extra)} are in test/validation but not in "
                                  "train/; add training images for them or remove the folders")
    return Layout(
        class_names=names, files=tuple(placed), labels=tuple(index[f.parts[depth - 1]] for f in placed),
        splits=tuple(f.parts[0] if by_split else None for f in placed),
    )


def check_class_names(where: str, folders: list[str], class_names: tuple[str, ...] | None) -> tuple[str, ...]:
    """The class order: sorted folder names, or `data.class_names`, which must name every folder exactly."""
    if class_names is None:
        if len(folders) < 2:
            raise DataSourceError(f"{where}: only one class folder ({folders[0]}); a classifier needs at least two")
        return tuple(folders)
    missing = [name for name in class_names if name not in folders]
    if missing:
        raise DataSourceError(f"data.class_names: {', '.join(missing)} is not a folder of {where}; the folders are "
                              f"{', '.join(folders)}")
    unlisted = [name for name in folders if name not in class_names]
    if unlisted:
        raise DataSourceError(f"data.class_names does not list the folder(s) {', '.join(unlisted)} of {where}; add "
                              "them, or move them out of the data folder")
    return tuple(class_names)


# ---------------------------------------------------------------- decoding

def resample_filter(interpolation: str) -> Any:
    """Pillow's resampling filter for `data.interpolation` (area is Pillow's box filter)."""
    from PIL import Image

    return {"bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST,
            "area": Image.Resampling.BOX, "bicubic": Image.Resampling.BICUBIC}[interpolation]


def crop_box(width: int, height: int, target: tuple[int, int]) -> tuple[int, int, int, int]:
    """The largest centred box of the target's aspect ratio (H, W) inside a width x height image."""
    target_h, target_w = target
    crop_w = min(width, round(height * target_w / target_h))
    crop_h = min(height, round(width * target_h / target_w))
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return left, top, left + crop_w, top + crop_h


def resize_pixels(pixels: np.ndarray, size: tuple[int, int] | None, interpolation: str = "bilinear",
                  crop_to_aspect_ratio: bool = False) -> np.ndarray:
    """uint8 [H, W] or [H, W, 3] resized to `size` (H, W); centre-cropped to its aspect ratio first when asked.
    The data stage and `tapeline predict` both resize through here."""
    if size is None or pixels.shape[:2] == tuple(size):
        return pixels
    from PIL import Image

    img = Image.fromarray(pixels)
    box = crop_box(img.width, img.height, size) if crop_to_aspect_ratio else None
    return np.asarray(img.resize((size[1], size[0]), resample_filter(interpolation), box=box))


def to_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """uint8 [H, W] or [H, W, 3] as [H, W, channels] (RGB to grey with Pillow's ITU-R 601 luma, as `predict`)."""
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if channels == 1:
        if pixels.ndim == 3:
            from PIL import Image

            pixels = np.asarray(Image.fromarray(pixels).convert("L"))
        return pixels[..., np.newaxis]
    return pixels if pixels.ndim == 3 else np.repeat(pixels[..., np.newaxis], 3, axis=-1)


def decode_one(source: bytes | str, relative: str, options: ImageOptions) -> np.ndarray:
    """A file (its bytes, or its local path) as uint8 [H, W] or [H, W, 3] at the target size; ImageError with the
    reason otherwise."""
    from stages.sources import open_image

    if (os.path.getsize(source) if isinstance(source, str) else len(source)) == 0:
        raise ImageError("empty file (0 bytes)")
    data = Path(source) if isinstance(source, str) else source
    pixels = open_image(data, relative, IMAGE_EXTENSIONS[os.path.splitext(relative)[1].lower()])
    return resize_pixels(pixels, options.image_size, options.interpolation, options.crop_to_aspect_ratio)


Job = tuple[int, bytes | str | Exception, str]


def decode_chunk(chunk: list[Job], options: ImageOptions
                 ) -> list[tuple[int, np.ndarray | None, str | None]]:
    """Decode a chunk of (index, bytes or local path, relative path): (index, pixels or None, reason or None).
    Runs in a worker process; never raises for a bad file."""
    from PIL import UnidentifiedImageError

    out: list[tuple[int, np.ndarray | None, str | None]] = []
    for index, source, relative in chunk:
        if isinstance(source, Exception):
            out.append((index, None, f"cannot be read ({type(source).__name__}: {source})"))
            continue
        try:
            out.append((index, decode_one(source, relative, options), None))
        except (ImageError, UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            out.append((index, None, reason_of(exc, relative)))
    return out


def reason_of(exc: BaseException, relative: str) -> str:
    """Why a file was skipped, without the path (the manifest lists it beside the reason)."""
    text = " ".join(str(exc).split()).replace(f"{relative} ", "").replace(relative, "the file")
    return text[:300] or type(exc).__name__


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    """`items` in consecutive lists of at most `size`."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def read_sources(root: str, files: tuple[ImageFile, ...]) -> Iterator[list[Job]]:
    """Decoding jobs in windows: local files go as paths (each worker reads its own), bucket objects are
    fetched by this process, a window at a time, concurrently (`fs.cat`)."""
    from stages.store import guarded, is_remote, remote_filesystem

    if not is_remote(root):
        base = Path(local_root(root))
        yield [(i, str(base / f.relative), f.relative) for i, f in enumerate(files)]
        return
    fs, prefix = remote_filesystem(root)
    for window in chunks(list(enumerate(files)), WINDOW):
        keys = [f"{prefix.rstrip('/')}/{f.relative}" for _, f in window]
        with guarded(root):
            fetched = fs.cat(keys, on_error="return")
        yield [(i, data if isinstance(data, bytes | Exception) else ImageError("no data"), f.relative)
               for (i, f), data in zip(window, (fetched[k] for k in keys), strict=True)]


@dataclass
class Decoded:
    """Decoded images in file order (None where skipped) and the skipped files with their reasons."""

    pixels: list[np.ndarray | None]
    skipped: list[dict[str, str]]


def decode_all(root: str, files: tuple[ImageFile, ...], options: ImageOptions, workers: int | None = None
               ) -> Decoded:
    """Decode every file once, on `workers` processes (default: every core)."""
    workers = workers or os.cpu_count() or 1
    pixels: list[np.ndarray | None] = [None] * len(files)
    skipped: list[dict[str, str]] = []

    def store(results: list[tuple[int, np.ndarray | None, str | None]]) -> None:
        for index, image, reason in results:
            if image is None:
                skipped.append({"path": files[index].relative, "reason": reason or "unreadable"})
            else:
                pixels[index] = image

    if workers == 1 or len(files) < IN_PROCESS_BELOW:  # starting processes costs more than it saves
        for window in read_sources(root, files):
            store(decode_chunk(window, options))
        return Decoded(pixels, skipped)
    # fork (where there is one) starts at once and re-imports no __main__; the children run only Pillow and
    # numpy, never the TensorFlow threads the parent may hold (PyTorch's DataLoader makes the same choice).
    with ProcessPoolExecutor(workers, mp_context=get_context(FORK if FORK in get_all_start_methods() else None)) \
            as pool:
        for window in read_sources(root, files):
            jobs = list(chunks(window, DECODE_CHUNK))
            for results in pool.map(decode_chunk, jobs, [options] * len(jobs)):
                store(results)
    return Decoded(pixels, skipped)


def stack_decoded(pixels: list[np.ndarray], color_mode: str, image_size: tuple[int, int] | None, where: str
                  ) -> np.ndarray:
    """The decoded images as one uint8 [N, H, W, C] array in the colour mode (auto: RGB when any has colour)."""
    channels = 3 if color_mode == "rgb" or (color_mode == "auto" and any(p.ndim == 3 for p in pixels)) else 1
    if image_size is None:
        sizes = {p.shape[:2] for p in pixels}
        if len(sizes) > 1:
            listed = ", ".join(f"{h}x{w}" for h, w in sorted(sizes)[:4]) + ("…" if len(sizes) > 4 else "")
            raise DataSourceError(f"data.image_size: {where} has images of {len(sizes)} sizes ({listed}); set "
                                  "data.image_size: [H, W] to resize them to one size")
    out = np.empty((len(pixels), *pixels[0].shape[:2], channels), np.uint8)
    for i, p in enumerate(pixels):
        out[i] = to_channels(p, channels)
    return out


# ---------------------------------------------------------------- the source

@dataclass(frozen=True)
class ImageFolderSource:
    """`images:DIR`: class folders of image files on disk or in a bucket."""

    root: str
    class_names: tuple[str, ...] | None = None
    options: ImageOptions = ImageOptions()

    def identity(self) -> dict[str, Any]:
        """The listing's digest: (path, size, SHA-256) per file on disk, (key, size, ETag) in a bucket."""
        files = list_files(self.root)
        return {"kind": "images", "files": len(files), "digest": identity_digest(files)}

    def load(self) -> Any:
        """Decode every listed file once; the unreadable ones are skipped and reported, never raised."""
        from stages.sources import RawData

        where = f"images:{self.root}"
        listed = list_files(self.root)
        layout = layout_of(self.root, listed, self.class_names)
        decoded = decode_all(self.root, layout.files, self.options)
        kept = [i for i, p in enumerate(decoded.pixels) if p is not None]
        if not kept:
            example = decoded.skipped[0] if decoded.skipped else {"path": "-", "reason": "no files"}
            raise DataSourceError(f"data.source {where}: none of the {len(layout.files)} files is a readable image "
                                  f"(e.g. {example['path']}: {example['reason']})")
        images = stack_decoded([decoded.pixels[i] for i in kept], self.options.color_mode, self.options.image_size,
                               f"data.source {where}")
        labels = np.asarray([layout.labels[i] for i in kept], np.int64)
        splits = np.asarray([layout.splits[i] or "train" for i in kept])

        def part(name: str) -> tuple[np.ndarray | None, np.ndarray | None]:
            mask = splits == name
            return (images[mask], labels[mask]) if mask.any() else (None, None)

        for skipped in decoded.skipped[:5]:
            log.warning("skipped %s: %s", skipped["path"], skipped["reason"])
        if decoded.skipped:
            log.warning("skipped %d of %d image files (listed in the data manifest)", len(decoded.skipped),
                        len(layout.files))
        train_x, train_y = part("train")
        if train_x is None:
            raise DataSourceError(f"data.source {where}: no readable training images")
        test_x, test_y = part("test")
        val_x, val_y = part("validation")
        return RawData(train_x, train_y, test_x, test_y, layout.class_names, validation_images=val_x,
                       validation_labels=val_y, skipped=tuple(decoded.skipped), files=len(layout.files))
