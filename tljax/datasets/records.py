"""Random access to the encoded examples of one split: example `i` of `n` by its index.

The input pipeline asks for examples in the order its seed gives them, so every split it reads
is a `Records`: `n`, and `lookup(i) -> (encoded image, label)` as TensorFlow ops that
`tf.data` runs in parallel. Three kinds:

- `MemoryRecords`: the encoded bytes held in memory. Used when the split's encoded size fits
  the cache budget (`budget_bytes`), whatever the format on disk; filled by one sequential read.
- `FileRecords`: one image file per example (folder datasets), read when asked for.
- `ArrayRecords`: a TFDS dataset prepared as ArrayRecord (`tfds build NAME
  --file_format=array_record`), read record by record through `tfds.data_source`.

A TFDS dataset prepared as TFRecord (TFDS's default) has no random access: it is read into
memory when it fits the budget, and refused with the conversion command when it does not.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence

import numpy as np

log = logging.getLogger("tljax.datasets")

DEFAULT_BUDGET_GB = 2.0  # per process; the train and eval splits each count against it


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@dataclasses.dataclass
class Records:
    """`n` examples; `lookup(i)` (int64 scalar tensor) gives `(image bytes, int64 label)`.
    `name(i)` names example `i` in error messages; `where` says how they are read."""

    n: int
    lookup: Callable
    name: Callable[[int], str]
    where: str
    held: int = 0  # bytes held in memory

    def __len__(self) -> int:
        return self.n


def memory_records(images: Sequence[bytes], labels: Sequence[int], names=None,
                   where: str = "") -> Records:
    import tensorflow as tf

    size = sum(len(b) for b in images)
    data = tf.constant(list(images), tf.string)
    ys = tf.constant(np.asarray(labels, np.int64))

    def lookup(i):
        return tf.gather(data, i), tf.gather(ys, i)

    return Records(len(labels), lookup, (lambda i: names[i]) if names is not None
                   else (lambda i: f"example {i}"),
                   f"in memory ({gib(size)}{', ' + where if where else ''})", size)


def file_records(paths: Sequence[str], labels: Sequence[int]) -> Records:
    import tensorflow as tf

    files = tf.constant(list(paths), tf.string)
    ys = tf.constant(np.asarray(labels, np.int64))

    def lookup(i):
        return tf.io.read_file(tf.gather(files, i)), tf.gather(ys, i)

    return Records(len(paths), lookup, lambda i: paths[i], "from its files on disk")


def read_files(paths: Sequence[str]) -> list[bytes]:
    out = []
    for p in paths:
        with open(p, "rb") as f:
            out.append(f.read())
    return out


def array_records(source, where: str) -> Records:
    """Records of a `tfds.data_source` whose image feature is not decoded."""
    import tensorflow as tf

    def get(i):
        ex = source[int(i)]
        return np.asarray(ex["image"], object).reshape(()), np.int64(ex["label"])

    def lookup(i):
        image, label = tf.numpy_function(get, [i], (tf.string, tf.int64), stateful=False)
        return tf.ensure_shape(image, ()), tf.ensure_shape(label, ())

    return Records(len(source), lookup, lambda i: f"example {i}", f"from disk ({where})")


def budget(gb: float) -> int:
    return int(gb * 2**30)


def file_size(paths: Sequence[str]) -> int:
    return sum(os.path.getsize(p) for p in paths)
