"""The input pipeline: decoded, resized and augmented uint8 batches in a fixed order.

Images leave the pipeline as uint8 RGB at the model's input size; the model's own preprocessing
(`tljax.models.preprocess`) runs on the device inside the step (`StepConfig.preprocess`), so
four times fewer bytes cross to the device.

Order and resumption. TensorFlow's global seed is set to the config's seed (tf.data combines it
with each op's seed). Training examples are shuffled with a seed and repeated
(`shuffle(seed, reshuffle_each_iteration=True).repeat()`), then numbered; the augmentation of
example number i draws from stateless random ops seeded with `(seed, process, i)`. The stream is
therefore a function of the seed alone, and a run restored at step s starts it with
`skip(s * local_batch)`, before any decoding: a resumed run sees exactly the batches an
uninterrupted run would have seen.

Each process reads its own part of a split (`Source.read(split, index, count)`). Evaluation
batches are padded (with `mask` 0) to the local batch size, and every process yields the same
number of them, so that the compiled evaluation step runs in lockstep on all hosts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import numpy as np

from tljax.datasets.sources import DataError, Source, describe, undecodable

AUTOTUNE = -1


@dataclasses.dataclass(frozen=True)
class Augment:
    """Training augmentation. `area` is the random-resized-crop area range (None: no crop,
    resize the whole image); `flip`: random horizontal flips."""

    area: tuple[float, float] | None = (0.08, 1.0)
    aspect: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True

    @property
    def off(self) -> bool:
        return self.area is None and not self.flip


def _decode(image_bytes):
    import tensorflow as tf

    return tf.io.decode_image(image_bytes, channels=3, expand_animations=False)


def _to_uint8(image):
    import tensorflow as tf

    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def eval_image(image, size: int, crop_fraction: float):
    """Resize the shorter side to `size / crop_fraction` and crop the centre `size` square
    (`crop_fraction=1`: resize the whole image to `size` x `size`)."""
    import tensorflow as tf

    if crop_fraction >= 1.0:
        return _to_uint8(tf.image.resize(image, (size, size), antialias=True))
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = (size / crop_fraction) / tf.reduce_min(shape)
    new = tf.cast(tf.math.ceil(shape * scale), tf.int32)
    image = tf.image.resize(image, new, antialias=True)
    top = (new[0] - size) // 2
    left = (new[1] - size) // 2
    return _to_uint8(image[top:top + size, left:left + size])


def train_image(image, size: int, augment: Augment, seed):
    """Random resized crop and flip, drawn from the stateless `seed` (shape (2,), int64)."""
    import tensorflow as tf

    crop_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, num=2))
    if augment.area is not None:
        begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
            seed=crop_seed, min_object_covered=0.0, aspect_ratio_range=augment.aspect,
            area_range=augment.area, max_attempts=10, use_image_if_no_bounding_boxes=True)
        image = tf.slice(image, begin, extent)
    image = tf.image.resize(image, (size, size), antialias=True)
    if augment.flip:
        image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    return _to_uint8(image)


def _options(ds):
    import tensorflow as tf

    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)


def _checked(iterator, src: Source, split: str):
    """Re-raise a decoding failure with the names of the files that do not decode."""
    import tensorflow as tf

    decode_errors = (tf.errors.InvalidArgumentError, tf.errors.UnknownError)
    try:
        yield from iterator
    except decode_errors as e:
        bad = undecodable(src, split)
        if not bad:
            raise
        raise DataError(
            f"{src.name} [{split}]: {len(bad)}{'+' if len(bad) >= 20 else ''} image(s) cannot "
            f"be decoded: {describe(bad)}. Remove or replace them (the decoder said: "
            f"{e.message.splitlines()[0] if hasattr(e, 'message') else e})"
        ) from None


def train_batches(src: Source, split: str, local_batch: int, size: int, seed: int,
                  augment: Augment, start_step: int = 0, process_index: int = 0,
                  process_count: int = 1, cache: bool | None = None,
                  shuffle_buffer: int = 50_000) -> Iterator[dict[str, np.ndarray]]:
    """Endless training batches `{'image': uint8 (B, size, size, 3), 'label': int32 (B,)}`
    for this process, from step `start_step` on (see the module docstring)."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    # tf.data combines an op's seed with TensorFlow's global seed, which other code in the
    # process (Keras's set_random_seed, ...) may have set: fix it, so that the order depends on
    # `seed` alone and a resumed process sees the batches of the process it replaces.
    tf.random.set_seed(seed)
    n = src.process_examples(split, process_count)[process_index]
    if n < local_batch:
        raise DataError(f"{src.name} [{split}] has {n} examples for this process, fewer than "
                        f"its batch of {local_batch}; use a smaller batch_size")
    ds = src.read(split, process_index, process_count).map(
        lambda ex: {"image": ex["image"], "label": ex["label"]})
    # Small datasets stay in memory, encoded (decoding happens after the skip).
    if cache if cache is not None else n <= 100_000:
        ds = ds.cache()
    ds = ds.shuffle(min(n, shuffle_buffer), seed=seed, reshuffle_each_iteration=True).repeat()
    ds = ds.enumerate().skip(start_step * local_batch)
    base = tf.constant([seed, process_index], tf.int64)

    def prepare(i, ex):
        example_seed = tf.random.experimental.stateless_fold_in(base, i)
        image = train_image(_decode(ex["image"]), size, augment, example_seed)
        return {"image": image, "label": tf.cast(ex["label"], tf.int32)}

    ds = ds.map(prepare, num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = _options(ds.batch(local_batch, drop_remainder=True).prefetch(AUTOTUNE))
    return _checked(tfds.as_numpy(ds), src, split)


def eval_batches(src: Source, split: str, local_batch: int, size: int,
                 crop_fraction: float = 0.875, process_index: int = 0,
                 process_count: int = 1) -> tuple[Iterator[dict[str, np.ndarray]], int]:
    """One pass over `split`: `(batches, count)` with `{'image', 'label', 'mask'}` batches, the
    last padded; `count` batches on every process."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    per_process = src.process_examples(split, process_count)
    count = math.ceil(max(per_process) / local_batch)

    def prepare(ex):
        return {"image": eval_image(_decode(ex["image"]), size, crop_fraction),
                "label": tf.cast(ex["label"], tf.int32)}

    ds = src.read(split, process_index, process_count)
    ds = ds.map(prepare, num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = _options(ds.batch(local_batch).prefetch(AUTOTUNE))

    def batches():
        done = 0
        for b in _checked(tfds.as_numpy(ds), src, split):
            yield pad(b, local_batch)
            done += 1
        empty = {"image": np.zeros((local_batch, size, size, 3), np.uint8),
                 "label": np.zeros((local_batch,), np.int32),
                 "mask": np.zeros((local_batch,), np.float32)}
        for _ in range(count - done):
            yield empty

    return batches(), count


def pad(batch: dict, size: int) -> dict:
    """`batch` zero-padded to `size` examples, with `mask` 1 for the real ones."""
    n = len(batch["label"])
    mask = np.zeros((size,), np.float32)
    mask[:n] = 1.0
    if n == size:
        return {**batch, "mask": mask}
    pad = {k: np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)])
           for k, v in batch.items()}
    return {**pad, "mask": mask}


def check_split(src: Source, split: str) -> int:
    """Examples in `split`, or a DataError that lists the dataset's splits."""
    n = src.num_examples(split)
    if n == 0:
        raise DataError(f"{src.name} [{split}] is empty")
    return n
