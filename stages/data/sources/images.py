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

import errno
import hashlib
import logging
import os
import re
import tempfile
import weakref
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from stages.data.layout import pixel_key
from tapeline.errors import DataSourceError, ImageError
from tapeline.imaging import resize_pixels, to_channels

IMAGE_EXTENSIONS = {".png": ("PNG",), ".jpg": ("JPEG", "MPO"), ".jpeg": ("JPEG", "MPO"), ".bmp": ("BMP",),
                    ".gif": ("GIF",)}
SPLIT_FOLDERS = ("train", "validation", "test")
DECODE_CHUNK = 256  # files per task sent to a decoding process: amortizes the pickling, bounds memory in flight
WINDOW = 8192  # bucket objects fetched at once
FORK = "fork"
IN_PROCESS_BELOW = 1024  # fewer files than this are decoded (hashed) in this process
HASH_CHUNK = 2048  # files per hashing task: hashing a small file costs less than sending its path
MAX_REMEMBERED_HASHES = 1 << 21
UNREADABLE = -2  # a listed file's size when it cannot be read: its reason takes the hash's place
FILE, FOLDER = "file", "folder"  # what a listing problem skipped: an image file, or a folder (never an image)
_hashes: dict[tuple[str, int, int, int], str] = {}  # (path, size, mtime_ns, inode) -> SHA-256, in this process
_listings: dict[str, tuple[str, Listing]] = {}  # root -> (digest, listing) of its last identity() here
log = logging.getLogger("tapeline.images")


class ImageFile(NamedTuple):
    """One listed file: its path relative to DIR, its size and a version (content SHA-256 or ETag). A named
    tuple: a listing holds one per file, and a tuple is built several times faster than a frozen dataclass."""

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

def _is_visible(relative: str) -> bool:
    """No part of the path starts with a dot (hidden files and folders are skipped)."""
    return not any(part.startswith(".") for part in relative.split("/"))


def _has_image_extension(relative: str) -> bool:
    """Whether the file name ends in one of IMAGE_EXTENSIONS, in any case."""
    name = relative.rpartition("/")[2]
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in IMAGE_EXTENSIONS  # as os.path.splitext: ".png" alone has none


def file_sha256(path: str) -> str:
    """A file's SHA-256 (read with os.read: for a small file, Python's buffered file object costs more than the
    reading)."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        while block := os.read(fd, 1 << 20):
            digest.update(block)
    finally:
        os.close(fd)
    return digest.hexdigest()


def _stat_and_hash(paths: list[str]) -> list[tuple[int, int, int, str]]:
    """(size, mtime_ns, inode, SHA-256) of each file, the hash remembered by this process (or, forked, by its
    parent) while size, mtime and inode are unchanged: a decoding process's share of a listing."""
    out = []
    for path in paths:
        try:
            st = os.stat(path)
            key = (path, st.st_size, st.st_mtime_ns, st.st_ino)
            out.append((*key[1:], _hashes.get(key) or file_sha256(path)))
        except FileNotFoundError:  # removed since the walk: not part of this listing
            out.append((-1, 0, 0, ""))
        except OSError as exc:  # listed and reported, like a file that does not decode
            out.append((UNREADABLE, 0, 0, f"unreadable file ({exc.strerror})"))
    return out


def _stats_and_hashes(paths: list[str]) -> list[tuple[int, int, int, str]]:
    """`_stat_and_hash` of every path on every core (the stat calls and reading dominate a walk of small files);
    the hashes are remembered here for the next listing."""
    if len(_hashes) + len(paths) > MAX_REMEMBERED_HASHES:
        _hashes.clear()
    found = _on_every_core(_stat_and_hash, paths, HASH_CHUNK)
    _hashes.update(((path, size, mtime, inode), sha)
                   for path, (size, mtime, inode, sha) in zip(paths, found, strict=True) if size >= 0)
    return found


def forget_hashes() -> None:
    """Drop what this process remembers of files' hashes (a benchmark's cold round)."""
    _hashes.clear()


def _on_every_core(function: Any, items: list[Any], chunk: int) -> list[Any]:
    """`function` (list -> list of results) over `items` in chunks on every core, results in order; in this
    process when there are few."""
    workers = os.cpu_count() or 1
    if workers == 1 or len(items) < IN_PROCESS_BELOW:
        return function(items)
    with ProcessPoolExecutor(workers, mp_context=_fork_context()) as pool:
        return [result for part in pool.map(function, chunks(items, chunk)) for result in part]


def _fork_context() -> Any:
    """fork where there is one: it starts at once and re-imports no __main__; the children run only Pillow,
    hashlib and numpy, never the TensorFlow threads the parent may hold (PyTorch's DataLoader does the same)."""
    return get_context(FORK if FORK in get_all_start_methods() else None)


def walk(directory: str, problems: list[dict[str, str]], relative: str = "",
         seen: set[tuple[int, int]] | None = None, folders: list[str] | None = None) -> Iterator[tuple[str, str]]:
    """(relative path, full path) of every visible file below `directory`, in sorted order (no stat: the
    directory entries say what is a file); every visible folder walked goes into `folders` (relative, with a
    trailing slash). What cannot be walked is appended to `problems` as {path, reason, kind}, never raised: a
    dangling link (kind `file` when its name is an image's), a link back into a folder already walked (a loop, or a
    second way to one folder: each real folder is walked once), an unreadable directory (kind `folder`)."""
    seen = seen if seen is not None else {_directory_key(directory)}
    try:
        with os.scandir(directory) as scanned:
            entries = sorted(scanned, key=lambda e: e.name)
    except OSError as exc:
        if not relative:
            raise
        problems.append({"path": os.path.realpath(directory), "reason": f"unreadable directory ({exc.strerror})",
                         "kind": FOLDER})
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        name = f"{relative}{entry.name}"
        if entry.is_symlink() and not os.path.exists(entry.path):
            problems.append({"path": entry.path, "reason": f"dangling link to {os.readlink(entry.path)}",
                             "kind": FILE if _has_image_extension(name) else FOLDER})
        elif entry.is_dir(follow_symlinks=True):
            key = _directory_key(entry.path)
            if key in seen:
                problems.append({"path": entry.path, "reason": f"link to {os.path.realpath(entry.path)}, a folder "
                                 "walked already (a loop, or a second way to it): not followed", "kind": FOLDER})
                continue
            seen.add(key)
            if folders is not None:
                folders.append(f"{name}/")
            yield from walk(entry.path, problems, f"{name}/", seen, folders)
        elif entry.is_file(follow_symlinks=True):
            yield name, entry.path


def _directory_key(path: str) -> tuple[int, int]:
    """(device, inode) of a directory, links followed: what makes two paths one folder."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _list_local(root: Path) -> Listing:
    """Every visible image file under `root`, sorted, with its size and content SHA-256; and what could not be
    listed (links, unreadable directories and files), each {path (the real one), reason}."""
    if not root.is_dir():
        raise DataSourceError(f"data.source images:{root}: directory does not exist")
    problems: list[dict[str, str]] = []
    folders: list[str] = []
    try:
        found = [(relative, path) for relative, path in walk(str(root), problems, folders=folders)
                 if _has_image_extension(relative)]
    except OSError as exc:
        raise DataSourceError(f"data.source images:{root}: cannot read the folder ({exc.strerror}); give a readable "
                              "directory") from None
    described = _stats_and_hashes([path for _, path in found])
    problems += [{"path": os.path.realpath(path), "reason": sha, "kind": FILE}
                 for (_, path), (size, _, _, sha) in zip(found, described, strict=True) if size == UNREADABLE]
    files = [ImageFile(relative, size, sha)
             for (relative, _), (size, _, _, sha) in zip(found, described, strict=True) if size >= 0]
    return Listing(files, tuple(problems), tuple(folders))


def _list_remote(url: str) -> list[ImageFile]:
    """Every visible image object under a bucket prefix, from one listing: key, size and ETag."""
    from tapeline.store import list_objects, object_version

    base, entries = list_objects(url)
    prefix = base.rstrip("/") + "/"
    found = []
    for key, info in entries.items():
        relative = key[len(prefix):] if key.startswith(prefix) else key
        if _is_visible(relative) and _has_image_extension(relative):
            found.append(ImageFile(relative, int(info.get("size") or 0), object_version(info)))
    if not found and not entries:
        raise DataSourceError(f"data.source images:{url}: nothing under this prefix; check the bucket and prefix")
    return sorted(found, key=lambda f: f.relative)


class Listing(NamedTuple):
    """A folder's image files, what could not be listed ({path, reason}: skipped, reported, never raised), and
    its folders (relative, `a/b/`; on disk only: a bucket has no empty folders)."""

    files: list[ImageFile]
    problems: tuple[dict[str, str], ...] = ()
    folders: tuple[str, ...] = ()


def list_files(root: str) -> Listing:
    """The listing of a directory or a bucket prefix."""
    from tapeline.store import is_remote

    return Listing(_list_remote(root)) if is_remote(root) else _list_local(Path(_local_root(root)))


def _local_root(root: str) -> str:
    """A directory from `DIR` or `file://DIR`."""
    return root[len("file://"):] if root.startswith("file://") else os.path.expanduser(root)


def _identity_digest(listing: Listing) -> str:
    """A hash of the listing: changes when a file is added, removed or changed, or when what could not be read
    changes (a link mended, a permission fixed), not otherwise."""
    digest = hashlib.sha256()
    for f in listing.files:
        digest.update(f"{f.relative}\0{f.size}\0{f.version}\n".encode())
    for problem in listing.problems:
        digest.update(f"!{problem['path']}\0{problem['reason']}\n".encode())
    for folder in listing.folders:
        digest.update(f"/{folder}\n".encode())
    return digest.hexdigest()


def _empty_class_folders(folders: tuple[str, ...], files: list[ImageFile], by_split: bool) -> set[str]:
    """Class folders without a single image file: classes too (of zero images, as a folder whose files are all
    unreadable becomes), so that the validate gate reports them rather than the class silently disappearing."""
    depth = 2 if by_split else 1
    at_class_depth = {f for f in folders if f.count("/") == depth
                      and (not by_split or f.split("/", 1)[0] in SPLIT_FOLDERS)}
    holding = {"/".join(f.parts[:depth]) + "/" for f in files if len(f.parts) > depth}
    return {f.rstrip("/").rsplit("/", 1)[-1] for f in at_class_depth - holding}


def layout_of(root: str, files: list[ImageFile], class_names: tuple[str, ...] | None,
              folders: tuple[str, ...] = ()) -> Layout:
    """Classes and splits from the folder structure (an empty class folder is a class of no images);
    DataSourceError naming what does not fit."""
    where = f"data.source images:{root}"
    parts = [f.parts for f in files]  # split once: a listing can hold millions of paths
    tops = {p[0] for p in parts if len(p) > 1} | {f.split("/", 1)[0] for f in folders if f.count("/") > 1}
    by_split = "train" in tops and tops <= set(SPLIT_FOLDERS)
    depth = 2 if by_split else 1
    loose = [f.relative for f, p in zip(files, parts, strict=True) if len(p) <= depth]
    if loose:
        log.warning("%s: %d files are not inside a class folder and are ignored (e.g. %s)", where, len(loose),
                    loose[0])
    kept = [i for i, p in enumerate(parts) if len(p) > depth]
    if not kept:
        raise DataSourceError(f"{where}: no image files in class folders; expected DIR/<class>/*.png or "
                              "DIR/train/<class>/*.png (extensions .png .jpg .jpeg .bmp .gif)")
    classes = [parts[i][depth - 1] for i in kept]
    empty = _empty_class_folders(folders, files, by_split)
    if empty:
        log.warning("%s: class folder(s) %s hold no image files", where, ", ".join(sorted(empty)))
    names = _check_class_names(where, sorted(set(classes) | empty), class_names)
    index = {name: i for i, name in enumerate(names)}
    if by_split:
        train_classes = {c for i, c in zip(kept, classes, strict=True) if parts[i][0] == "train"}
        extra = sorted(set(classes) - train_classes)
        if extra:
            raise DataSourceError(f"{where}: class folder(s) {', '.join(extra)} are in test/validation but not in "
                                  "train/; add training images for them or remove the folders")
    return Layout(
        class_names=names, files=tuple(files[i] for i in kept), labels=tuple(index[c] for c in classes),
        splits=tuple(parts[i][0] if by_split else None for i in kept),
    )


def _check_class_names(where: str, folders: list[str], class_names: tuple[str, ...] | None) -> tuple[str, ...]:
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


def decode_one(source: bytes | str, relative: str, options: ImageOptions) -> np.ndarray:
    """A file (its bytes, or its local path) as uint8 [H, W] or [H, W, 3] at the target size; ImageError with the
    reason otherwise."""
    from tapeline.imaging import open_image

    try:
        pixels = open_image(source, relative, IMAGE_EXTENSIONS[os.path.splitext(relative)[1].lower()])
    except ImageError:
        # Asked only on failure: a stat per good file cost a tenth of the decoding of a small PNG.
        if (os.path.getsize(source) if isinstance(source, str) else len(source)) == 0:
            raise ImageError("empty file (0 bytes)") from None
        raise
    return resize_pixels(pixels, options.image_size, options.interpolation, options.crop_to_aspect_ratio)


Job = tuple[int, bytes | str | Exception, str]


@dataclass(frozen=True)
class Chunk:
    """What a decoding process sends back for a chunk: where in its spool file each good image went, its shape
    and pixel key, as arrays (one message, not a tuple per image), and the skipped files' (index, reason)."""

    spool_file: str
    places: np.ndarray  # int64 [k, 6]: offset, h, w, c (1 for [H, W]), ndim, listing index
    keys: np.ndarray  # S16 [k]
    skipped: list[tuple[int, str]]


_spool_writers: dict[str, Any] = {}  # per process: its spool file in each spool directory


def spool_writer(directory: str) -> Any:
    """This process's append-only spool file in `directory` (one per process, so writers never share one)."""
    if directory not in _spool_writers:
        _spool_writers[directory] = open(os.path.join(directory, f"rows-{os.getpid()}.bin"), "ab")  # noqa: SIM115
    return _spool_writers[directory]


def _close_spool_writer(directory: str) -> None:
    """Close this process's spool file in `directory`, if it has one."""
    writer = _spool_writers.pop(directory, None)
    if writer is not None:
        writer.close()


def _decode_chunk(chunk: list[Job], options: ImageOptions, directory: str) -> Chunk:
    """Decode a chunk of (index, bytes or local path, relative path) and append the pixels to this process's spool
    file in `directory`. Runs in a worker process; never raises for a bad file, and sends back no pixels, only
    their places and keys (for duplicates and leakage: hashed here, on every core)."""
    from PIL import UnidentifiedImageError

    writer = spool_writer(directory)
    places: list[tuple[int, ...]] = []
    keys: list[bytes] = []
    skipped: list[tuple[int, str]] = []
    offset = writer.tell()
    for index, source, relative in chunk:
        if isinstance(source, Exception):
            skipped.append((index, f"cannot be read ({type(source).__name__}: {source})"))
            continue
        try:
            pixels = np.ascontiguousarray(decode_one(source, relative, options))
        except (ImageError, UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            skipped.append((index, reason_of(exc, relative)))
            continue
        shape = pixels.shape
        places.append((offset, shape[0], shape[1], shape[2] if len(shape) == 3 else 1, len(shape), index))
        keys.append(pixel_key(pixels))
        offset += writer.write(pixels.data)
    writer.flush()
    table = np.asarray(places, np.int64).reshape(-1, 6)
    return Chunk(os.path.basename(writer.name), table, np.asarray(keys, "S16").reshape(-1), skipped)


def reason_of(exc: BaseException, relative: str) -> str:
    """Why a file was skipped, without its name (the manifest lists its path beside the reason): Pillow's "cannot
    identify image file '/the/path.png'" is "cannot identify image file"."""
    text = " ".join(str(exc).split())
    text = re.sub(r"\s*'[^']*" + re.escape(relative) + "'", "", text).replace(f"{relative} ", "")
    return text.replace(relative, "").strip()[:300] or type(exc).__name__


def file_location(root: str, relative: str) -> str:
    """A listed file's real path (on disk) or URL (on a bucket), as the manifest names skipped files."""
    from tapeline.store import is_remote

    if is_remote(root):
        return f"{root.rstrip('/')}/{relative}"
    return os.path.realpath(os.path.join(_local_root(root), relative))


def chunks(items: Any, size: int) -> Iterator[Any]:
    """`items` (a list or an array) in consecutive slices of at most `size`."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def read_sources(root: str, files: tuple[ImageFile, ...]) -> Iterator[list[Job]]:
    """Decoding jobs in windows: local files go as paths (each worker reads its own), bucket objects are
    fetched by this process, a window at a time, concurrently (`fs.cat`)."""
    from tapeline.store import guarded, is_remote, remote_filesystem

    if not is_remote(root):
        base = f"{Path(_local_root(root))}/"  # a string join: pathlib costs more than decoding a small PNG's header
        yield [(i, base + f.relative, f.relative) for i, f in enumerate(files)]
        return
    fs, prefix = remote_filesystem(root)
    for window in chunks(list(enumerate(files)), WINDOW):
        keys = [f"{prefix.rstrip('/')}/{f.relative}" for _, f in window]
        with guarded(root):
            fetched = fs.cat(keys, on_error="return")
        yield [(i, data if isinstance(data, bytes | Exception) else ImageError("no data"), f.relative)
               for (i, f), data in zip(window, (fetched[k] for k in keys), strict=True)]


class Spool:
    """Decoded images on local disk (one append-only file per decoding process), in file order, with each image's
    place, shape and key: what this process holds per image is about 70 bytes (file index, offset, shape, key),
    never its pixels. The files are removed with the spool (`close`, or when it is garbage-collected)."""

    def __init__(self) -> None:
        self._directory = tempfile.TemporaryDirectory(prefix="tapeline-spool-")
        self.directory = self._directory.name
        self._names: list[str] = []
        self._fds: list[int] = []
        self._chunks: list[tuple[int, np.ndarray, np.ndarray]] = []  # (spool file index, Chunk.places, Chunk.keys)
        self._release = weakref.finalize(self, _release_spool, self._fds, self._directory)
        self.rows = np.zeros(0, np.int64)  # per spooled image: its index in the listing
        self.place = np.zeros((0, 2), np.int64)
        self.shapes = np.zeros((0, 4), np.int32)  # h, w, c (1 for [H, W]), ndim
        self.keys = np.zeros(0, "S16")  # `pixel_key` of each image as decoded

    def add(self, chunk: Chunk, files: tuple[ImageFile, ...], skipped: list[dict[str, str]]) -> None:
        """Record a decoded chunk, and its skipped files."""
        if chunk.spool_file not in self._names:
            self._names.append(chunk.spool_file)
            self._fds.append(os.open(os.path.join(self.directory, chunk.spool_file), os.O_RDONLY))
        self._chunks.append((self._names.index(chunk.spool_file), chunk.places, chunk.keys))
        skipped.extend({"path": files[index].relative, "reason": reason or "unreadable"}
                       for index, reason in chunk.skipped)

    def seal(self) -> None:
        """Turn the recorded chunks into arrays, in listing order (chunks come back from several processes)."""
        tables = [np.column_stack([np.full(len(places), file_index), places]) for file_index, places, _ in self._chunks]
        table = np.concatenate(tables) if tables else np.zeros((0, 7), np.int64)
        keys = np.concatenate([k for _, _, k in self._chunks]) if self._chunks else np.zeros(0, "S16")
        order = np.argsort(table[:, 6], kind="stable")
        table, self.keys, self._chunks = table[order], keys[order], []
        self.rows, self.place, self.shapes = table[:, 6], table[:, 0:2], table[:, 2:6].astype(np.int32)

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, row: int) -> np.ndarray:
        """Spooled image `row` as decoded: uint8 [H, W] or [H, W, C]."""
        h, w, c, ndim = (int(v) for v in self.shapes[row])
        out = np.empty((h, w, c) if ndim == 3 else (h, w), np.uint8)
        self.read_rows(np.asarray([row]), out[np.newaxis])
        return out

    def read_rows(self, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """The bytes of spooled images `rows` (all of one size) straight into `out` [len(rows), ...]: one pread
        each, no copy."""
        if not len(rows):
            return out
        size = out[0].nbytes
        flat = memoryview(out.reshape(-1))
        done = 0
        for i, (file_index, offset) in enumerate(self.place[rows].tolist()):
            done += os.preadv(self._fds[file_index], [flat[i * size:(i + 1) * size]], offset)
        if done != out.nbytes:
            raise DataSourceError(f"the decoded-image spool in {self.directory} is shorter than written; was it "
                                  "removed while the data stage ran?")
        return out

    def close(self) -> None:
        """Remove the spool files (at once; otherwise when the spool is garbage-collected)."""
        self._release()


def _release_spool(fds: list[int], directory: tempfile.TemporaryDirectory) -> None:
    """Close a spool's files and remove its directory."""
    while fds:
        os.close(fds.pop())
    directory.cleanup()


@dataclass(frozen=True)
class SpooledImages:
    """Some of a spool's images as the model sees them, uint8 [N, H, W, C] in one size and colour mode, read on
    demand: `images[indices]` gives an array, the way a NumPy array of all of them would."""

    spool: Spool
    rows: np.ndarray
    size: tuple[int, int]
    channels: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(N, H, W, C)."""
        return (len(self.rows), *self.size, self.channels)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, indices: np.ndarray) -> np.ndarray:
        picked = self.rows[indices]
        shape = (*self.size, self.channels)
        direct = self.spool.shapes[picked, 2] == self.channels  # no conversion: the spooled bytes are the image's
        if direct.all():
            return self.spool.read_rows(picked, np.empty((len(picked), *shape), np.uint8))
        out = np.empty((len(picked), *shape), np.uint8)
        out[direct] = self.spool.read_rows(picked[direct], np.empty((int(direct.sum()), *shape), np.uint8))
        for i in np.flatnonzero(~direct):
            out[i] = to_channels(self.spool.read(int(picked[i])), self.channels)
        return out

    def image_keys(self) -> np.ndarray:
        """`stages.data.layout.image_keys` of these images: the decoding processes' keys, recomputed only for images
        whose colour mode was converted here."""
        keys = self.spool.keys[self.rows].copy()
        converted = np.flatnonzero(self.spool.shapes[self.rows, 2] != self.channels)
        for batch in chunks(converted, DECODE_CHUNK):
            keys[batch] = [pixel_key(image) for image in self[batch]]
        return keys


def decode_all(root: str, files: tuple[ImageFile, ...], options: ImageOptions, workers: int | None = None
               ) -> tuple[Spool, list[dict[str, str]]]:
    """Decode every file once, on `workers` processes (default: every core), into a spool on local disk; returns
    it and the skipped files with their reasons."""
    workers = workers or os.cpu_count() or 1
    spool, skipped = Spool(), []
    try:
        if workers == 1 or len(files) < IN_PROCESS_BELOW:  # starting processes costs more than it saves
            try:
                for window in read_sources(root, files):
                    spool.add(_decode_chunk(window, options, spool.directory), files, skipped)
            finally:
                _close_spool_writer(spool.directory)
        else:
            with ProcessPoolExecutor(workers, mp_context=_fork_context()) as pool:
                for window in read_sources(root, files):
                    jobs = list(chunks(window, DECODE_CHUNK))
                    for chunk in pool.map(_decode_chunk, jobs, [options] * len(jobs), [spool.directory] * len(jobs)):
                        spool.add(chunk, files, skipped)
        spool.seal()
    except OSError as exc:
        spool.close()
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DataSourceError(
                f"data.source images:{root}: the decoded-image spool in {spool.directory} ran out of disk space "
                f"({exc.strerror}); it needs about the decoded size of every image (H x W x C bytes each); free "
                "space there or point TMPDIR at a larger local disk") from None
        raise
    except BaseException:
        spool.close()
        raise
    return spool, skipped


def _channels_of(spool: Spool, color_mode: str) -> int:
    """1 or 3: the colour mode's channels (auto: RGB when any image has colour)."""
    return 3 if color_mode == "rgb" or (color_mode == "auto" and bool((spool.shapes[:, 3] == 3).any())) else 1


def _common_size(spool: Spool, image_size: tuple[int, int] | None, where: str) -> tuple[int, int]:
    """The images' one size: `data.image_size`, or the size they all share (DataSourceError otherwise)."""
    if image_size is not None:
        return tuple(image_size)
    sizes = np.unique(spool.shapes[:, :2], axis=0)
    if len(sizes) > 1:
        listed = ", ".join(f"{h}x{w}" for h, w in sizes[:4]) + ("…" if len(sizes) > 4 else "")
        raise DataSourceError(f"data.image_size: {where} has images of {len(sizes)} sizes ({listed}); set "
                              "data.image_size: [H, W] to resize them to one size")
    return int(sizes[0][0]), int(sizes[0][1])


# ---------------------------------------------------------------- the source

@dataclass(frozen=True)
class ImageFolderSource:
    """`images:DIR`: class folders of image files on disk or in a bucket."""

    root: str
    class_names: tuple[str, ...] | None = None
    options: ImageOptions = ImageOptions()

    def identity(self) -> dict[str, Any]:
        """The listing's digest: (path, size, SHA-256) per file on disk, (key, size, ETag) in a bucket."""
        listing = list_files(self.root)
        digest = _identity_digest(listing)
        _listings[self.root] = (digest, listing)
        return {"kind": "images", "files": len(listing.files), "digest": digest}

    def load(self) -> Any:
        """`load_listed` with a listing of its own."""
        return self.load_listed(None)

    def load_listed(self, identity: dict[str, Any] | None) -> Any:
        """Decode every listed file once into a spool on local disk; the unreadable ones are skipped and reported,
        never raised. The splits' images are read from the spool when the shards are written. `identity` is
        what `identity()` gave the fingerprint: when this process made that listing (same digest, so the same
        paths, sizes and versions), it is used rather than listing again."""
        from stages.data.sources.base import RawData

        where = f"images:{self.root}"
        known = _listings.get(self.root)
        listing = known[1] if identity and known and known[0] == identity.get("digest") else list_files(self.root)
        layout = layout_of(self.root, listing.files, self.class_names, listing.folders)
        spool, decoded_skipped = decode_all(self.root, layout.files, self.options)
        unlisted = [{"path": p["path"], "reason": p["reason"]} for p in listing.problems if p.get("kind") != FOLDER]
        unwalked = [{"path": p["path"], "reason": p["reason"]} for p in listing.problems if p.get("kind") == FOLDER]
        skipped = [*unlisted, *({"path": file_location(self.root, s["path"]), "reason": s["reason"]}
                                for s in decoded_skipped)]
        tried = len(layout.files) + len(unlisted)
        if not len(spool):
            spool.close()
            example = skipped[0] if skipped else {"path": "-", "reason": "no files"}
            raise DataSourceError(f"data.source {where}: none of the {len(layout.files)} files is a readable image "
                                  f"(e.g. {example['path']}: {example['reason']})")
        try:
            size = _common_size(spool, self.options.image_size, f"data.source {where}")
        except DataSourceError:
            spool.close()
            raise
        channels = _channels_of(spool, self.options.color_mode)
        labels = np.asarray(layout.labels, np.int64)[spool.rows]
        splits = np.asarray([s or "train" for s in layout.splits])[spool.rows]

        def part(name: str) -> tuple[SpooledImages | None, np.ndarray | None]:
            rows = np.flatnonzero(splits == name)
            return (SpooledImages(spool, rows, size, channels), labels[rows]) if len(rows) else (None, None)

        for bad in [*skipped, *unwalked][:5]:
            log.warning("skipped %s: %s", bad["path"], bad["reason"])
        if skipped:
            log.warning("skipped %d of %d image files (listed in the data manifest)", len(skipped), tried)
        if unwalked:
            log.warning("did not walk %d folder(s) or link(s) (listed in the data manifest)", len(unwalked))
        train_x, train_y = part("train")
        if train_x is None:
            spool.close()
            raise DataSourceError(f"data.source {where}: no readable training images")
        test_x, test_y = part("test")
        val_x, val_y = part("validation")
        return RawData(train_x, train_y, test_x, test_y, layout.class_names, validation_images=val_x,
                       validation_labels=val_y, skipped=tuple(skipped), unwalked=tuple(unwalked), files=tried)
