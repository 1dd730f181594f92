"""Reading the data stage's TFRecords: tf.data pipelines (shuffle, batch, augmentation) and whole splits in memory.

The stages past data read through this module only: it imports no source and no image decoder, so their code
fingerprints do not change when those do."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.data.layout import split_files
from tapeline.cache import read_manifest


def _parse_batch(serialized: Any, shape: tuple[int, int, int], normalize: bool) -> tuple[Any, Any]:
    """Vectorized parse of a batch of serialized Examples into (images, labels)."""
    import tensorflow as tf

    features = tf.io.parse_example(serialized, {
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
    })
    images = tf.reshape(tf.io.decode_raw(features["image"], tf.uint8), (-1, *shape))
    if normalize:
        images = tf.cast(images, tf.float32) / 255.0
    return images, features["label"]


@dataclass(frozen=True)
class Augment:
    """Training-only augmentation: integer shifts of up to `shift` pixels each way (zeros fill in) and
    horizontal flips of half the images. Drawn with stateless ops keyed by (seed, epoch, batch), so an
    epoch sees the same augmented batches whether or not the run was resumed."""

    shift: int = 0
    flip: bool = False

    @property
    def active(self) -> bool:
        """Whether this changes any image."""
        return self.shift > 0 or self.flip


NO_AUGMENT = Augment()


def augment_batch(images: Any, augment: Augment, key: Any) -> Any:
    """A batch of float images (B, H, W, C), shifted and flipped per image as `augment` says, deterministic in `key`
    (an int64 pair)."""
    import tensorflow as tf

    count = tf.shape(images)[0]
    if augment.shift > 0:
        offsets = tf.random.stateless_uniform((count, 2), seed=key, minval=-augment.shift,
                                              maxval=augment.shift + 1, dtype=tf.int32)
        offsets = tf.cast(offsets, tf.float32)
        ones, zeros = tf.ones((count, 1)), tf.zeros((count, 1))
        # Row of a projective transform mapping output (x, y) to input (x + dx, y + dy).
        transforms = tf.concat([ones, zeros, offsets[:, :1], zeros, ones, offsets[:, 1:], zeros, zeros], axis=1)
        images = tf.raw_ops.ImageProjectiveTransformV3(
            images=images, transforms=transforms, output_shape=tf.shape(images)[1:3], fill_value=0.0,
            interpolation="NEAREST", fill_mode="CONSTANT")
    if augment.flip:
        flip = tf.random.stateless_uniform((count, 1, 1, 1), seed=key + [0, 1 << 40]) < 0.5
        images = tf.where(flip, tf.reverse(images, axis=[2]), images)
    return images


def _epoch_seed(seed: int, epoch: Any) -> Any:
    """The seed of one epoch's shuffle and augmentation (the formula both input pipelines share)."""
    return seed * 100_003 + epoch


def _with_augmentation(ds: Any, augment: Augment, seed: int, epoch: Any, lane: int = 0, lanes: int = 1) -> Any:
    """Augment every (images, labels) batch of `ds`, keyed by (seed, epoch, batch index); worker `lane` of
    `lanes` draws its own keys."""
    import tensorflow as tf

    if not augment.active:
        return ds
    base = tf.cast(_epoch_seed(seed, epoch), tf.int64)

    def apply(index: Any, batch: tuple[Any, Any]) -> tuple[Any, Any]:
        return augment_batch(batch[0], augment, tf.stack([base, index * lanes + lane])), batch[1]

    return ds.enumerate().map(apply, num_parallel_calls=tf.data.AUTOTUNE)


def make_dataset(
    data_path: Path,
    split: str,
    batch_size: int,
    *,
    training: bool = False,
    shuffle_buffer: int = 10000,
    seed: int = 0,
    epoch: int = 0,
    normalize: bool = True,
    augment: Augment = NO_AUGMENT,
) -> Any:
    """A batched tf.data.Dataset of (float32 images in [0, 1], int64 labels) from a split's TFRecords.

    For training the shard order, the shuffle and the augmentation are seeded by (seed, epoch), so a
    resumed run sees exactly the batches an uninterrupted run would have seen in that epoch.
    """
    import tensorflow as tf

    manifest = read_manifest(data_path)
    shape = tuple(manifest["input_spec"]["shape"])
    files = split_files(data_path, split)
    if training:
        shuffle_seed = _epoch_seed(seed, epoch)
        ds = tf.data.Dataset.from_tensor_slices(files).shuffle(len(files), seed=shuffle_seed)
        ds = ds.interleave(
            tf.data.TFRecordDataset, cycle_length=len(files), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
        ds = ds.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
    else:
        ds = tf.data.TFRecordDataset(files)
    ds = ds.batch(batch_size).map(lambda s: _parse_batch(s, shape, normalize), num_parallel_calls=tf.data.AUTOTUNE)
    if training:
        ds = _with_augmentation(ds, augment, seed, epoch)
    return ds.prefetch(tf.data.AUTOTUNE)


def make_worker_dataset(data_path: Path, global_batch: int, workers: int, index: int, *, shuffle_buffer: int,
                        seed: int, epoch: int, augment: Augment = NO_AUGMENT) -> Any:
    """Worker `index`'s training batches for `epoch` when `workers` train together: its shard of the split
    (whole files when there are at least as many files as workers, else every `workers`-th record of the
    same seeded order), in batches of global_batch / workers. The shard repeats, so every worker has a batch
    for each of the epoch's steps even when shards differ by a few records."""
    import tensorflow as tf

    shape = tuple(read_manifest(data_path)["input_spec"]["shape"])
    files = split_files(data_path, "train")
    shuffle_seed = _epoch_seed(seed, epoch)
    by_file = len(files) >= workers
    # The same file order on every pass: the shard repeats, and each pass must take the same files.
    ds = tf.data.Dataset.from_tensor_slices(files).shuffle(len(files), seed=shuffle_seed,
                                                           reshuffle_each_iteration=False)
    if by_file:
        ds = ds.shard(workers, index)
    ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=-(-len(files) // workers) if by_file else len(files),
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if not by_file:
        ds = ds.shard(workers, index)
    ds = ds.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False).repeat()
    ds = ds.batch(global_batch // workers).map(lambda s: _parse_batch(s, shape, True),
                                               num_parallel_calls=tf.data.AUTOTUNE)
    return _with_augmentation(ds, augment, seed, epoch, index, workers).prefetch(tf.data.AUTOTUNE)


def make_memory_dataset(images: Any, labels: Any, batch_size: int, *, seed: int = 0, epoch: int = 0,
                        epochs: int = 1, augment: Augment = NO_AUGMENT) -> Any:
    """Training batches gathered from uint8 tensors held in memory, `epochs` epochs from `epoch` on, each a
    full permutation seeded by (seed, epoch), normalized after batching exactly as the TFRecord reader does
    and augmented with the same keys.

    No parsing and no shuffle buffer in the hot loop, and one iterator serves every epoch: creating and
    tearing down an iterator over captured tensors costs seconds per epoch.
    """
    import tensorflow as tf

    records = int(labels.shape[0])

    def gather(indices: Any) -> tuple[Any, Any]:
        return tf.cast(tf.gather(images, indices), tf.float32) / 255.0, tf.gather(labels, indices)

    def one_epoch(number: Any) -> Any:
        key = tf.stack([tf.constant(seed, tf.int64), number])
        order = tf.random.experimental.stateless_shuffle(tf.range(records, dtype=tf.int32), seed=key)
        batches = tf.data.Dataset.from_tensor_slices(order).batch(batch_size).map(gather)
        return _with_augmentation(batches, augment, seed, number)

    return tf.data.Dataset.range(epoch, epoch + epochs).flat_map(one_epoch).prefetch(2)


def without_autotune_thread(ds: Any) -> Any:
    """`ds` without tf.data's autotuning model thread: what the trainer reads through. That thread's waits double
    from 10 ms (so it wakes 0.01, 0.03, … 5.11, 10.23, 20.47 s … after the iterator starts: inferred from where
    deletions ended, 5.11 and 10.23 s), and deleting the iterator can wait for its next wake: a verbatim tutorial
    loop's epochs of 5–10 s took exactly 10.23 s, a finished training run's process waited 20–30 s to exit (the
    defaults on Fashion-MNIST; 0.9 s without it, epochs no slower), and 3 of 8 stream-pipeline epochs ran at half
    speed beside the previous epoch's teardown (none without it)."""
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)


def load_split(data_path: Path, split: str, normalize: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A whole split as numpy arrays (uint8 images unless `normalize`), in record order."""
    batches = list(make_dataset(data_path, split, 4096, normalize=normalize).as_numpy_iterator())
    if not batches:
        shape = tuple(read_manifest(data_path)["input_spec"]["shape"])
        return np.zeros((0, *shape), np.float32 if normalize else np.uint8), np.zeros(0, np.int64)
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
