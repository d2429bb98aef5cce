"""`digits`: scikit-learn's bundled handwritten digits as a TensorFlow Datasets builder.

1,797 grey 8x8 images of the digits 0-9 (the UCI optical-recognition test set that
scikit-learn ships inside its wheel), so the training program has a real dataset on a machine
with no data and no network. Pixel values 0-16 are scaled to 0-255. The split is fixed: a
permutation with seed 0, the first 1,437 images `train`, the other 360 `test` (80/20).

Importing this module registers the builder: `tfds.builder('digits', data_dir=...)`.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

TRAIN_EXAMPLES = 1437


def _images_and_labels() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, d.target.astype(np.int64)


class Digits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's handwritten digits (8x8, 10 classes), split 1437 train / 360 test."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: scikit-learn's load_digits, seed-0 80/20 split."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(8, 8, 1)),
                "label": tfds.features.ClassLabel(names=[str(i) for i in range(10)]),
            }),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the data ships with scikit-learn: nothing to download
        order = np.random.default_rng(0).permutation(len(_images_and_labels()[1]))
        return {
            "train": self._generate_examples(order[:TRAIN_EXAMPLES]),
            "test": self._generate_examples(order[TRAIN_EXAMPLES:]),
        }

    def _generate_examples(self, indices):
        images, labels = _images_and_labels()
        for i in indices:
            yield int(i), {"image": images[i], "label": int(labels[i])}
