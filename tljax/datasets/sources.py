"""Where the images come from: a TFDS dataset by name, `digits`, or a folder of images.

`source(name, data_dir)` returns a `Source`: the dataset's splits and classes, and
`records(split, budget)`, random access to a split's encoded examples (`tljax.datasets.records`)
that the input pipeline decodes itself, in the order its seed gives, and can name a file that
does not decode.

Dataset names:
- `digits`: scikit-learn's handwritten digits as a TFDS builder (`tljax.datasets.digits`); no
  download, prepared in `data_dir` in seconds.
- `folder:/path/to/images` or `folder:gs://bucket/images`: a folder with one sub-folder of
  images per class (then a fixed held-out share, drawn with seed 0, becomes the `validation`
  split), or with split folders holding the class folders (`train/cat/1.jpg`,
  `test/cat/7.jpg`); the classes are the folders that hold images, sorted. It is listed in
  one pass; in object storage a split too large for the memory budget is copied once to a
  local ArrayRecord file (a folder whose files change keeps its copy: remove it).
- any other name: a TFDS dataset (`tf_flowers`, `cifar10`, `oxford_iiit_pet`, `imagenette`, ...),
  from `data_dir` when prepared there, else downloaded and prepared by TFDS (`download=True`)
  as ArrayRecord, which the pipeline reads with random access whatever its size. A split of a
  dataset prepared as TFRecord is read once: into memory when it fits the budget, else into an
  ArrayRecord copy in this host's cache (`storage.local_cache()/datasets/...`), made once.
  A `gs://` data_dir is read through TensorFlow's filesystem when it holds TFRecord files;
  ArrayRecord files there need a gcsfuse mount (the error says so).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import logging
import math
import os
import types
from collections.abc import Callable, Sequence

import numpy as np

from tljax import storage
from tljax.datasets import records as records_

log = logging.getLogger("tljax.datasets")

FOLDER_PREFIX = "folder:"
BUILTIN = ("digits",)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


class DataError(ValueError):
    """A dataset that cannot be found, read or decoded; the message says what to do."""


@dataclasses.dataclass
class Source:
    """A dataset: its splits, classes, and random access to each split's encoded examples."""

    name: str
    splits: dict[str, int]  # split name -> number of examples
    class_names: list[str]
    _records: Callable[[str, int], records_.Records]  # (split, budget bytes) -> Records
    _bytes: Callable[[str], int]  # split -> its encoded size (estimated for TFDS slices)
    builder: object = None  # tfds.core.DatasetBuilder, for TFDS datasets

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def num_examples(self, split: str) -> int:
        return sum(_span(start, to, n) for _, start, to, n in self._instructions(split))

    def _instructions(self, split: str) -> list[tuple[str, int | None, int | None, int]]:
        import tensorflow_datasets as tfds

        infos = {s: types.SimpleNamespace(num_examples=n) for s, n in self.splits.items()}
        try:
            spans = tfds.core.ReadInstruction.from_spec(split).to_absolute(infos)
        except (KeyError, ValueError, AssertionError, AttributeError) as e:
            raise DataError(
                f"dataset {self.name!r} has no split {split!r} ({e}); its splits are "
                f"{', '.join(self.splits)}; slices such as 'train[:90%]' work too"
            ) from None
        return [(i.splitname, i.from_, i.to, self.splits[i.splitname]) for i in spans]

    def encoded_bytes(self, split: str) -> int:
        return self._bytes(split)

    def records(self, split: str, budget_bytes: int) -> records_.Records:
        """Random access to `split`: in memory when its encoded size fits `budget_bytes`."""
        self.num_examples(split)  # a clear error for an unknown split
        r = self._records(split, budget_bytes)
        log.info("%s [%s]: %d examples, read %s", self.name, split, r.n, r.where)
        return r

    def default_splits(self) -> tuple[str, str, str | None]:
        """(train, validation, test) splits when the config leaves them to the dataset. Model
        selection uses validation: the dataset's own `validation` (or `val`), else the last
        10% of train, held out (a fixed slice). Test is the dataset's `test`, or None; a
        dataset with a single split gives 80% / 10% / 10% of it."""
        names = list(self.splits)
        train = "train" if "train" in names else names[0]
        validation = next((s for s in ("validation", "val") if s in names and s != train), None)
        test = "test" if "test" in names and train != "test" else None
        if validation is not None:
            return train, validation, test
        if test is None and len(names) == 1:
            return f"{train}[:80%]", f"{train}[80%:90%]", f"{train}[90%:]"
        return f"{train}[:90%]", f"{train}[90%:]", test


def _span(start: int | None, to: int | None, n: int) -> int:
    """Examples in [start, to) of a split of `n` (None: its start or end)."""
    return max(0, (n if to is None else to) - (start or 0))


def source(name: str, data_dir: str | None = None, download: bool = True,
           holdout_fraction: float = 0.1) -> Source:
    """The dataset called `name` (see the module docstring)."""
    if name.startswith(FOLDER_PREFIX):
        return _folder(name[len(FOLDER_PREFIX):], holdout_fraction)
    import tensorflow_datasets as tfds

    if name == "digits":
        from tljax.datasets import digits  # noqa: F401  (registers the builder)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(_unknown(name)) from None
    if not builder.is_prepared():
        if storage.is_remote(builder.data_dir):
            raise DataError(
                f"dataset {name!r} is not prepared in {builder.data_dir}, and tljax prepares "
                f"datasets only on a local disk (ArrayRecord files are written locally). "
                f"Prepare it on one machine (`tfds build {name} --data_dir DIR "
                f"--file_format=array_record`), copy DIR to the bucket, and mount the bucket "
                f"on every host with gcsfuse (data_dir=/path/of/the/mount/...)")
        if not download and name not in BUILTIN:
            raise DataError(
                f"dataset {name!r} is not prepared in {builder.data_dir} and download is off; "
                f"prepare it with `tfds build {name} --data_dir DIR --file_format=array_record`"
                f" or allow the download"
            )
        # ArrayRecord: random access, so that any size trains without a memory cache.
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
        log.info("preparing %s in %s (ArrayRecord)", name, builder.data_dir)
        try:
            builder.download_and_prepare()
        except Exception as e:  # network, manual download, disk: the user needs the cause
            raise DataError(
                f"could not download and prepare {name!r} into {builder.data_dir}: "
                f"{type(e).__name__}: {e}. Prepare it where there is network "
                f"(`tfds build {name} --data_dir DIR --file_format=array_record`) and pass "
                f"that data_dir"
            ) from None
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise DataError(
            f"dataset {name!r} has features {sorted(features)}; an image classification "
            f"dataset with 'image' and 'label' features is needed"
        )
    splits = {s: int(i.num_examples) for s, i in builder.info.splits.items()}
    sizes = {s: int(i.num_bytes) for s, i in builder.info.splits.items()}
    src = Source(name, splits, list(features["label"].names), None, None, builder)

    def encoded(split: str) -> int:
        # Slices share their split's bytes in proportion to their examples.
        return int(sum(sizes[s] * _span(start, to, n) / max(n, 1)
                       for s, start, to, n in src._instructions(split)))

    src._bytes = encoded
    src._records = lambda split, budget: _tfds_records(src, split, budget)
    return src


def _tfds_records(src: Source, split: str, budget: int) -> records_.Records:
    import tensorflow_datasets as tfds

    builder = src.builder
    size = src.encoded_bytes(split)
    skip = {"image": tfds.decode.SkipDecoding()}
    formats = {str(getattr(f, "value", f)) for f in builder.info.available_file_formats()}
    n = src.num_examples(split)
    what = f"{src.name} [{split}]"
    if storage.is_remote(builder.data_dir) and "tfrecord" in formats:
        formats.discard("array_record")  # what TensorFlow's filesystem can read there
    if "array_record" in formats:
        if storage.is_remote(builder.data_dir):
            raise DataError(
                f"{what}: prepared as ArrayRecord in {builder.data_dir}, which ArrayRecord's "
                f"reader cannot open in object storage. Mount the bucket on every host with "
                f"gcsfuse and pass the mount's path as data_dir (random access, any size), or "
                f"copy the dataset to each host's disk")
        data = builder.as_data_source(split=split, decoders=skip, file_format="array_record")
        if size > budget:
            return records_.array_records(data, f"ArrayRecord, {records_.gib(size)}")
        examples, fmt = ((data[i]["image"], data[i]["label"]) for i in range(n)), "array_record"
    else:
        def read():  # one sequential pass, only when it is needed
            ds = builder.as_dataset(split=split, decoders=skip, shuffle_files=False,
                                    read_config=tfds.ReadConfig(interleave_cycle_length=1))
            for ex in tfds.as_numpy(ds):
                yield ex["image"], ex["label"]

        examples, fmt = read(), "tfrecord"
        if size > budget:
            path = os.path.join(storage.local_cache(), "datasets", builder.info.full_name,
                                f"{_file_name(split)}.array_record")
            return records_.converted(path, examples, n, what)
    from tqdm import tqdm

    images, labels = [], []
    for image, label in tqdm(examples, total=n, leave=False, desc=f"caching {what}",
                             unit="img", disable=n < 20_000):
        images.append(image)
        labels.append(label)
    return records_.memory_records(images, labels, where=f"{fmt} read once")


def _file_name(split: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in split)


def _unknown(name: str) -> str:
    import tensorflow_datasets as tfds

    known = list(BUILTIN) + tfds.list_builders()
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return (f"unknown dataset {name!r}: {hint}Use 'digits' (bundled), 'folder:/path/to/images' "
            f"(one sub-folder per class), or a TensorFlow Datasets name "
            f"({len(known) - len(BUILTIN)} known, e.g. tf_flowers, cifar10, oxford_iiit_pet)")


def _folder(root: str, holdout_fraction: float) -> Source:
    root = storage.absolute(root)
    if not storage.is_remote(root) and not os.path.isdir(root):
        raise DataError(f"folder dataset: {root} is not a directory")
    # One listing of everything below the root (in object storage: one paginated request).
    images = {rel: size for rel, size in storage.files(root, max_depth=2).items()
              if rel.lower().endswith(IMAGE_EXTENSIONS) and rel.count("/") in (1, 2)}
    if not images and storage.is_remote(root) and not storage.exists(root):
        raise DataError(f"folder dataset: {root} does not exist (no object has this prefix)")
    flat = {rel for rel in images if rel.count("/") == 1}  # class/1.jpg
    if flat:
        classes = sorted({rel.split("/")[0] for rel in flat})
        index = {c: k for k, c in enumerate(classes)}
        files = [(rel, index[rel.split("/")[0]])
                 for rel in sorted(flat, key=lambda rel: rel.split("/"))]
        n = len(files)
        holdout = max(1, math.floor(n * holdout_fraction))
        if n - holdout < 1:
            raise DataError(f"folder dataset {root}: {n} image(s) is too few to hold out "
                            f"{holdout_fraction:.0%} for validation")
        held = np.zeros(n, bool)
        held[np.random.default_rng(0).permutation(n)[:holdout]] = True
        by_split = {"train": [f for f, h in zip(files, held, strict=True) if not h],
                    "validation": [f for f, h in zip(files, held, strict=True) if h]}
    elif images:  # train/class/1.jpg
        parts = sorted(rel.split("/") for rel in images)
        classes = sorted({c for _, c, _ in parts})
        index = {c: k for k, c in enumerate(classes)}
        by_split = {}
        for split, c, name in parts:
            by_split.setdefault(split, []).append((f"{split}/{c}/{name}", index[c]))
    else:
        raise DataError(
            f"folder dataset {root}: expected one sub-folder of images per class "
            f"({root}/cat/1.jpg, {root}/dog/2.jpg), or split folders holding them "
            f"({root}/train/cat/1.jpg); image files end in {', '.join(IMAGE_EXTENSIONS)}"
        )
    src = Source(FOLDER_PREFIX + root, {s: len(v) for s, v in by_split.items()}, classes,
                 None, None)

    def chosen(split: str) -> list[tuple[str, int]]:
        return [f for s, start, to, _ in src._instructions(split)
                for f in by_split[s][start:to]]

    def records(split: str, budget: int) -> records_.Records:
        files = chosen(split)
        paths = [storage.join(root, rel) for rel, _ in files]
        labels = [k for _, k in files]
        if sum(images[rel] for rel, _ in files) <= budget:
            return records_.memory_records(records_.read_files(paths), labels, paths,
                                           "files read once")
        if not storage.is_remote(root):
            return records_.file_records(paths, labels)
        # Object storage: TensorFlow's reader cannot be relied on there (tests/gcs.py), so a
        # split too large to hold is copied once, in parallel, to a local ArrayRecord file.
        key = hashlib.sha256("\n".join([root] + [f"{rel} {images[rel]} {k}" for rel, k in files])
                             .encode()).hexdigest()[:16]
        path = os.path.join(storage.local_cache(), "datasets", "folder",
                            f"{_file_name(split)}-{key}.array_record")
        examples = zip(records_.stream_files(paths), labels, strict=True)
        return records_.converted(path, examples, len(paths), f"{root} [{split}]")

    src._records = records
    src._bytes = lambda split: sum(images[rel] for rel, _ in chosen(split))
    return src


def undecodable(recs: records_.Records, limit: int = 20) -> list[str]:
    """Names of the examples of `recs` that TensorFlow cannot decode as images."""
    import tensorflow as tf

    bad = []
    for i in range(recs.n):
        try:
            data, _ = recs.lookup(tf.constant(i, tf.int64))
            tf.io.decode_image(data, channels=3, expand_animations=False)
        except (tf.errors.InvalidArgumentError, tf.errors.UnknownError):
            bad.append(recs.name(i))
            if len(bad) >= limit:
                break
    return bad


def describe(names: Sequence[str]) -> str:
    return ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
