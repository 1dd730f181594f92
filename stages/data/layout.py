"""The data stage's on-disk layout, shared by its writer and every reader: split names, shard names, pixel keys."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from tapeline.cache import read_manifest

SPLITS = ("train", "validation", "test")
ENCODING = "uint8"


def image_keys(images: np.ndarray) -> np.ndarray:
    """A 16-byte hash of each image's decoded pixels (`pixel_key`): equal keys, equal images."""
    return np.array([pixel_key(image) for image in np.ascontiguousarray(images)], dtype="S16").reshape(-1)


# ---------------------------------------------------------------- writing

def shard_name(split: str, index: int, shards: int) -> str:
    """`train-00000-of-00004.tfrecord`."""
    return f"{split}-{index:05d}-of-{shards:05d}.tfrecord"


# ---------------------------------------------------------------- reading

def split_files(data_path: Path, split: str) -> list[str]:
    """The shard paths of a split, in order, from the manifest."""
    return [str(data_path / f["name"]) for f in read_manifest(data_path)["splits"][split]["files"]]


def pixel_key(pixels: np.ndarray) -> bytes:
    """A 16-byte BLAKE2b of an image's pixel bytes (C order): equal keys, equal images (`image_keys`)."""
    return hashlib.blake2b(np.ascontiguousarray(pixels).data, digest_size=16).digest()
