"""Random access to the encoded examples of one split: example `i` of `n` by its index.

The input pipeline asks for examples in the order its seed gives them, so every split it reads
is a `Records`: `n`, and `lookup(i) -> (encoded image, label)` as TensorFlow ops that
`tf.data` runs in parallel. Three kinds:

- `MemoryRecords`: the encoded bytes held in memory. Used when the split's encoded size fits
  the cache budget (`budget_bytes`), whatever the format on disk; filled by one sequential read.
- `FileRecords`: one image file per example (local folder datasets), read when asked for.
- `array_records`: a TFDS dataset prepared as ArrayRecord (`tfds build NAME
  --file_format=array_record`), read record by record through `tfds.data_source`; or a split
  of a TFRecord-prepared one (TFDS's default, which has no random access), or of a folder in
  object storage, that does not fit the budget, copied once into an ArrayRecord file of this
  host's cache (`converted`).
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
    """The bytes of each file, local or in object storage (read by 32 threads)."""
    return list(stream_files(paths))


def stream_files(paths: Sequence[str], threads: int = 32):
    """The bytes of each file in order, read ahead by `threads` threads."""
    import collections
    from concurrent.futures import ThreadPoolExecutor

    from tljax import storage

    with ThreadPoolExecutor(threads) as pool:
        ahead = collections.deque()
        for p in paths:
            ahead.append(pool.submit(storage.read_bytes, p))
            if len(ahead) >= 4 * threads:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


def _python_records(get: Callable, n: int, where: str) -> Records:
    """Records whose `get(i) -> (bytes, label)` is Python (a reader that releases the GIL while
    it reads)."""
    import tensorflow as tf

    def fetch(i):
        data, label = get(int(i))
        return np.asarray(data, object).reshape(()), np.int64(label)

    def lookup(i):
        image, label = tf.numpy_function(fetch, [i], (tf.string, tf.int64), stateful=False)
        return tf.ensure_shape(image, ()), tf.ensure_shape(label, ())

    return Records(n, lookup, lambda i: f"example {i}", where)


def array_records(source, where: str) -> Records:
    """Records of a `tfds.data_source` whose image feature is not decoded."""

    def get(i):
        ex = source[i]
        return ex["image"], ex["label"]

    return _python_records(get, len(source), f"from disk ({where})")


def converted(path: str, examples, n: int, what: str) -> Records:
    """Records of the ArrayRecord file `path`, written first from `examples` (`(image bytes,
    label)` pairs, `n` of them) unless a complete one is there. Each record is the label
    (int64, little-endian) then the encoded image."""
    from array_record.python import array_record_data_source, array_record_module

    if not os.path.exists(path):
        from tqdm import tqdm

        log.info("%s: copying it once into %s for random access", what, path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        partial = f"{path}.{os.getpid()}.partial"
        writer = array_record_module.ArrayRecordWriter(partial, "group_size:1")
        count = 0
        try:
            for image, label in tqdm(examples, total=n, desc=f"copying {what}", unit="img",
                                     leave=False, disable=n < 20_000):
                writer.write(int(label).to_bytes(8, "little", signed=True) + bytes(image))
                count += 1
        finally:
            writer.close()
            if count != n:  # a read failed, or the source ended early: nothing half-written
                os.remove(partial)
        if count != n:
            raise OSError(f"{what}: read {count} examples of {n}; not converted")
        os.replace(partial, path)  # complete or absent, whatever else runs beside it
    source = array_record_data_source.ArrayRecordDataSource([path])
    if len(source) != n:
        raise OSError(f"{path} holds {len(source)} examples, not the {n} of {what}: remove it")

    def get(i):
        rec = source[i]
        return rec[8:], int.from_bytes(rec[:8], "little", signed=True)

    return _python_records(get, n, f"from disk (ArrayRecord copy in {path})")


def budget(gb: float) -> int:
    return int(gb * 2**30)
