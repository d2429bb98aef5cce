"""Where the images come from: a TFDS dataset by name, `digits`, or a local folder.

`source(name, data_dir)` returns a `Source` whose `read(split)` gives undecoded examples
(`image` bytes, `label`, and `image/filename` for folders), so that the input pipeline decodes
them itself, after shuffling and skipping, and can name a file that does not decode.

Dataset names:
- `digits`: scikit-learn's handwritten digits as a TFDS builder (`tljax.datasets.digits`); no
  download, prepared in `data_dir` in seconds.
- `folder:/path/to/images`: a folder with one sub-folder of images per class (then a fixed
  held-out share becomes the `validation` split), or with split folders holding the class
  folders (`train/cat/1.jpg`, `test/cat/7.jpg`), read with TFDS's `ImageFolder`.
- any other name: a TFDS dataset (`tf_flowers`, `cifar10`, `oxford_iiit_pet`, `imagenette`, ...),
  from `data_dir` when prepared there, else downloaded and prepared by TFDS (`download=True`).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import tempfile
from collections.abc import Sequence

log = logging.getLogger("tljax.datasets")

FOLDER_PREFIX = "folder:"
BUILTIN = ("digits",)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


class DataError(ValueError):
    """A dataset that cannot be found, read or decoded; the message says what to do."""


@dataclasses.dataclass
class Source:
    """A dataset: its splits, classes, and a reader of undecoded examples."""

    name: str
    builder: object  # tfds.core.DatasetBuilder
    splits: dict[str, int]  # split name -> number of examples
    class_names: list[str]
    holdout: int = 0  # folder with class sub-folders only: the first `holdout` are validation

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def num_examples(self, split: str) -> int:
        try:
            if self.holdout:
                return self.splits[split]
            return int(self.builder.info.splits[split].num_examples)
        except (KeyError, ValueError, AssertionError) as e:
            slices = "" if self.holdout else ". TFDS slices such as 'train[:90%]' work too"
            raise DataError(
                f"dataset {self.name!r} has no split {split!r} ({e}); its splits are "
                f"{', '.join(self.splits)}{slices}"
            ) from None

    def process_split(self, split: str, index: int, count: int) -> str:
        """The part of `split` that process `index` of `count` reads (TFDS even splits)."""
        if count == 1 or self.holdout:
            return split
        import tensorflow_datasets as tfds

        return tfds.even_splits(split, n=count, drop_remainder=False)[index]

    def read(self, split: str, index: int = 0, count: int = 1):
        """Undecoded examples of this process's part of `split`, in a fixed order."""
        import tensorflow_datasets as tfds

        skip = {"image": tfds.decode.SkipDecoding()}
        if self.holdout:
            ds = self.builder.as_dataset(split="train", decoders=skip, shuffle_files=False)
            ds = ds.take(self.holdout) if split == "validation" else ds.skip(self.holdout)
            return ds.shard(count, index) if count > 1 else ds
        self.num_examples(split)  # a clear error for an unknown split
        return self.builder.as_dataset(
            split=self.process_split(split, index, count), decoders=skip, shuffle_files=False,
            read_config=tfds.ReadConfig(interleave_cycle_length=1, add_tfds_id=False),
        )

    def process_examples(self, split: str, count: int) -> list[int]:
        """Examples each of `count` processes reads from `split`."""
        if count == 1:
            return [self.num_examples(split)]
        if self.holdout:
            n = self.splits[split]
            return [n // count + (i < n % count) for i in range(count)]
        return [self.num_examples(self.process_split(split, i, count)) for i in range(count)]

    def default_splits(self) -> tuple[str, str]:
        """(train, eval) splits when the config leaves them to the dataset."""
        names = list(self.splits)
        train = "train" if "train" in names else names[0]
        for candidate in ("test", "validation", "val"):
            if candidate in names and candidate != train:
                return train, candidate
        # A dataset with a single split (tf_flowers): hold out its last 10%.
        return f"{train}[:90%]", f"{train}[90%:]"


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
        if not download and name not in BUILTIN:
            raise DataError(
                f"dataset {name!r} is not prepared in {builder.data_dir} and download is off; "
                f"prepare it with `tfds build {name} --data_dir DIR` or allow the download"
            )
        log.info("preparing %s in %s", name, builder.data_dir)
        try:
            builder.download_and_prepare()
        except Exception as e:  # network, manual download, disk: the user needs the cause
            raise DataError(
                f"could not download and prepare {name!r} into {builder.data_dir}: "
                f"{type(e).__name__}: {e}. Prepare it where there is network "
                f"(`tfds build {name} --data_dir DIR`) and pass that data_dir"
            ) from None
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise DataError(
            f"dataset {name!r} has features {sorted(features)}; an image classification "
            f"dataset with 'image' and 'label' features is needed"
        )
    splits = {s: int(i.num_examples) for s, i in builder.info.splits.items()}
    return Source(name, builder, splits, list(features["label"].names))


def _unknown(name: str) -> str:
    import tensorflow_datasets as tfds

    known = list(BUILTIN) + tfds.list_builders()
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return (f"unknown dataset {name!r}: {hint}Use 'digits' (bundled), 'folder:/path/to/images' "
            f"(one sub-folder per class), or a TensorFlow Datasets name "
            f"({len(known) - len(BUILTIN)} known, e.g. tf_flowers, cifar10, oxford_iiit_pet)")


def _images_in(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(
                      os.path.join(folder, f)))


def _subfolders(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if os.path.isdir(os.path.join(folder, f)))


def _folder(root: str, holdout_fraction: float) -> Source:
    import tensorflow_datasets as tfds

    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise DataError(f"folder dataset: {root} is not a directory")
    subs = _subfolders(root)
    class_layout = any(_images_in(os.path.join(root, s)) for s in subs)
    if not subs or not (class_layout or any(_subfolders(os.path.join(root, s)) for s in subs)):
        raise DataError(
            f"folder dataset {root}: expected one sub-folder of images per class "
            f"({root}/cat/1.jpg, {root}/dog/2.jpg), or split folders holding them "
            f"({root}/train/cat/1.jpg); image files end in {', '.join(IMAGE_EXTENSIONS)}"
        )
    if class_layout:
        # ImageFolder wants split folders: give it one, `train`, that is the user's folder.
        stage = tempfile.mkdtemp(prefix="tljax_folder_")
        os.symlink(root, os.path.join(stage, "train"))
        builder = tfds.ImageFolder(stage)
        n = int(builder.info.splits["train"].num_examples)
        holdout = max(1, math.floor(n * holdout_fraction))
        if n - holdout < 1:
            raise DataError(f"folder dataset {root}: {n} image(s) is too few to hold out "
                            f"{holdout_fraction:.0%} for validation")
        splits = {"train": n - holdout, "validation": holdout}
        return Source(FOLDER_PREFIX + root, builder, splits,
                      list(builder.info.features["label"].names), holdout=holdout)
    builder = tfds.ImageFolder(root)
    splits = {s: int(i.num_examples) for s, i in builder.info.splits.items()}
    return Source(FOLDER_PREFIX + root, builder, splits,
                  list(builder.info.features["label"].names))


def undecodable(src: Source, split: str, limit: int = 20) -> list[str]:
    """Files (or example numbers) of `split` that TensorFlow cannot decode as images."""
    import tensorflow as tf

    bad = []
    for i, ex in enumerate(src.read(split)):
        try:
            tf.io.decode_image(ex["image"], channels=3, expand_animations=False)
        except (tf.errors.InvalidArgumentError, tf.errors.UnknownError):
            name = ex.get("image/filename")
            bad.append(name.numpy().decode() if name is not None else f"example {i}")
            if len(bad) >= limit:
                break
    return bad


def describe(names: Sequence[str]) -> str:
    return ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
