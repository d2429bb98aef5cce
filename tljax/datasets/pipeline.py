"""The input pipeline: decoded and cropped uint8 batches in an order fixed by the seed.

Images leave the pipeline as uint8 RGB at the model's input size; the model's own preprocessing
(`tljax.models.preprocess`) runs on the device inside the step (`StepConfig.preprocess`), so
four times fewer bytes cross to the device. So does the training flip: a batch carries a
`flip` flag per example, and the step mirrors those images before preprocessing them.

Order. The training stream is a function of the seed and of the global example position
alone: position `p` (batch `p // global_batch`, row `p % global_batch`) holds, in epoch
`e = p // n`, example `index_shuffle(p % n, (seed, e))` of the split's `n`, a permutation
computed per position without materialising it; its crop box draws from the stateless seed
`(8 * seed + 1, p)` and its flip from `(8 * seed + 2, p)`. Process `k` of `P` makes rows
`[k * local, (k + 1) * local)` of every global batch and reads only those examples. So the
same seed and global batch give the same batches whatever the number of devices and
processes, and a run restored at step `s` starts at position `s * global_batch` at once,
reading nothing that came before.

Reading. Each split is random access (`tljax.datasets.records`): held in memory when its
encoded size fits the cache budget, else read per example from its files or ArrayRecord.
Decoding crops inside the JPEG decoder at a reduced DCT scale (`tljax.datasets.images`).
The pipeline's function decodes `CHUNK` examples per call, which `rebatch` joins into
batches: the same examples in the same order as one call per example, at less cost.

Evaluation reads each process's contiguous share of the split; batches are padded (with `mask`
0) to the local batch size, and every process yields the same number of them, so that the
compiled evaluation step runs in lockstep on all hosts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import numpy as np

from tljax.datasets import images
from tljax.datasets.records import Records
from tljax.datasets.sources import DataError, describe, undecodable

AUTOTUNE = -1
# Examples decoded per call of the pipeline's function: one call per example costs tf.data
# more than the decoding's own branches do (docs/benchmarks.md, "Input pipeline").
CHUNK = 8
BOX_STREAM, FLIP_STREAM = 1, 2  # random streams of the run besides the order


@dataclasses.dataclass(frozen=True)
class Augment:
    """Training augmentation. `area` is the random-resized-crop area range (None: no crop,
    resize the whole image); `flip`: random horizontal flips."""

    area: tuple[float, float] | None = (0.08, 1.0)
    aspect: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True


def _options(ds):
    import tensorflow as tf

    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)


def _stacked(examples: list[dict]) -> dict:
    import tensorflow as tf

    return {key: tf.stack([ex[key] for ex in examples]) for key in examples[0]}


def _checked(iterator, recs: Records, what: str):
    """Re-raise a decoding failure with the names of the files that do not decode."""
    import tensorflow as tf

    decode_errors = (tf.errors.InvalidArgumentError, tf.errors.UnknownError)
    try:
        yield from iterator
    except decode_errors as e:
        bad = undecodable(recs)
        if not bad:
            raise
        raise DataError(
            f"{what}: {len(bad)}{'+' if len(bad) >= 20 else ''} image(s) cannot "
            f"be decoded: {describe(bad)}. Remove or replace them (the decoder said: "
            f"{e.message.splitlines()[0] if hasattr(e, 'message') else e})"
        ) from None


def example_at(positions, n: int, seed: int):
    """The example indices at global `positions` (int64 tensor) of a stream over `n` examples:
    a fresh permutation of `n` per epoch, drawn from `(seed, epoch)`."""
    import tensorflow as tf

    epoch = positions // n
    seeds = tf.stack([tf.fill(tf.shape(epoch), tf.constant(seed, tf.int64)), epoch,
                      tf.zeros_like(epoch)], -1)
    return tf.raw_ops.RandomIndexShuffle(index=positions % n, seed=seeds,
                                         max_index=tf.fill(tf.shape(epoch), tf.constant(
                                             n - 1, tf.int64)), rounds=4)


def stream_key(seed: int, stream: int):
    """The first half of a stateless seed `(key, position)` for one random stream of the
    run: distinct for every (seed, stream) with 0 <= stream < 8."""
    return seed * 8 + stream


def train_batches(recs: Records, local_batch: int, global_batch: int, size: int, seed: int,
                  augment: Augment, start_step: int = 0, process_index: int = 0,
                  what: str = "train", first_row: int | None = None
                  ) -> Iterator[dict[str, np.ndarray]]:
    """Endless training batches: rows `[first_row, first_row + local_batch)` of global batches
    `start_step`, `start_step + 1`, ... (see the module docstring; `first_row` defaults to
    `process_index * local_batch`, and `tljax.parallel.process_rows` gives it for a mesh), as
    `{'image': uint8 (B, size, size, 3),
    'label': int32 (B,), 'flip': bool (B,)}`. The step applies the flip on the device
    (`train_step.StepConfig.inputs`), which does it for free, where the host would pay for
    it (docs/benchmarks.md, "Input pipeline")."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    if recs.n < global_batch:
        raise DataError(f"{what} has {recs.n} examples, fewer than the global batch of "
                        f"{global_batch}; use a smaller batch_size")
    n, b = recs.n, local_batch
    first = process_index * local_batch if first_row is None else first_row
    if not 0 <= first <= global_batch - b:
        raise ValueError(f"rows [{first}, {first + b}) are not within the global batch of "
                         f"{global_batch}")
    box_key, flip_key = stream_key(seed, BOX_STREAM), stream_key(seed, FLIP_STREAM)
    area = tuple(augment.area) if augment.area is not None else None
    per_call = max(d for d in range(1, CHUNK + 1) if b % d == 0)
    calls_per_step = b // per_call

    def prepare(p, index):
        data, label = recs.lookup(index)
        image = images.train_image(data, size, tf.stack([tf.constant(box_key, tf.int64), p]),
                                   area, augment.aspect)
        flip = (images.flip(tf.stack([tf.constant(flip_key, tf.int64), p])) if augment.flip
                else tf.constant(False))
        return {"image": image, "label": tf.cast(label, tf.int32), "flip": flip}

    def prepare_chunk(c):  # chunk c: `per_call` of this process's rows of one global batch
        step, part = c // calls_per_step, c % calls_per_step
        p = (step * global_batch + first + part * per_call
             + tf.range(per_call, dtype=tf.int64))
        index = example_at(p, n, seed)
        return _stacked([prepare(p[j], index[j]) for j in range(per_call)])

    ds = tf.data.Dataset.range(start_step * calls_per_step, 2**62)
    ds = ds.map(prepare_chunk, num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = _options(ds.rebatch(b, drop_remainder=True).prefetch(AUTOTUNE))
    return _checked(tfds.as_numpy(ds), recs, what)


def process_share(n: int, process_index: int, process_count: int) -> tuple[int, int]:
    """[start, stop) of the examples that process `process_index` evaluates."""
    bounds = [n * k // process_count for k in range(process_count + 1)]
    return bounds[process_index], bounds[process_index + 1]


def eval_batches(recs: Records, local_batch: int, size: int, crop_fraction: float = 0.875,
                 process_index: int = 0, process_count: int = 1,
                 what: str = "eval") -> tuple[Iterator[dict[str, np.ndarray]], int]:
    """One pass over `recs`: `(batches, count)` with `{'image', 'label', 'mask'}` batches, the
    last padded; `count` batches on every process."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    count = math.ceil(max(b - a for a, b in (process_share(recs.n, k, process_count)
                                             for k in range(process_count))) / local_batch)
    start, stop = process_share(recs.n, process_index, process_count)

    def prepare(i):
        data, label = recs.lookup(i)
        return {"image": images.eval_image(data, size, crop_fraction),
                "label": tf.cast(label, tf.int32)}

    def prepare_chunk(i):  # examples [i, i + CHUNK) of the share, the last chunk cut short
        indices = tf.minimum(i + tf.range(CHUNK, dtype=tf.int64), stop - 1)
        chunk = _stacked([prepare(indices[j]) for j in range(CHUNK)])
        return {key: v[:tf.minimum(stop - i, CHUNK)] for key, v in chunk.items()}

    ds = tf.data.Dataset.range(start, stop, CHUNK)
    ds = ds.map(prepare_chunk, num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = _options(ds.rebatch(local_batch).prefetch(AUTOTUNE))

    def batches():
        done = 0
        for b in _checked(tfds.as_numpy(ds), recs, what):
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
    padded = {k: np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)])
              for k, v in batch.items()}
    return {**padded, "mask": mask}


def check_split(src, split: str) -> int:
    """Examples in `split`, or a DataError that lists the dataset's splits."""
    n = src.num_examples(split)
    if n == 0:
        raise DataError(f"{src.name} [{split}] is empty")
    return n
