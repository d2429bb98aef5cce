"""Keras 3 reference models for the parity tests.

Builds `keras.applications.<Model>(weights=None)` with a fixed seed, gives every BatchNorm (and
EfficientNet's Normalization) random statistics and affine parameters so that they are really
tested, writes the weights in the legacy HDF5 layout (as the official files are), and runs the
Keras model on images through Keras's own `preprocess_input`.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import h5py  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras.src.legacy.saving import legacy_h5_format  # noqa: E402

from tljax import models  # noqa: E402


def preprocess_input(name: str):
    """Keras's `preprocess_input` for registered model `name`."""
    spec = models.spec(name)
    apps = keras.applications
    if spec.family.name == "vgg":
        return getattr(apps, name).preprocess_input
    if spec.family.name == "inception":
        return apps.inception_v3.preprocess_input
    if spec.family.name == "resnet":
        return apps.resnet_v2.preprocess_input if "v2" in name else apps.resnet.preprocess_input
    return apps.efficientnet.preprocess_input


def randomize_statistics(model, seed: int) -> None:
    """Random gamma, beta, moving mean and moving variance for every BatchNormalization, and a
    random mean/variance for a Normalization layer (BatchNorm is not tested otherwise)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            new = []
            for w in layer.weights:
                n = w.path.rsplit("/", 1)[-1]
                shape = tuple(w.shape)
                if n == "gamma":
                    new.append(rng.uniform(0.5, 1.5, shape))
                elif n == "beta":
                    new.append(rng.normal(0.0, 0.2, shape))
                elif n == "moving_mean":
                    new.append(rng.normal(0.0, 0.2, shape))
                else:
                    new.append(rng.uniform(0.5, 2.0, shape))
            layer.set_weights([a.astype(np.float32) for a in new])
        elif isinstance(layer, keras.layers.Normalization):
            mean, var, count = layer.get_weights()
            layer.set_weights([
                rng.uniform(0.3, 0.6, mean.shape).astype(np.float32),
                rng.uniform(0.04, 0.09, var.shape).astype(np.float32),
                count,
            ])
            layer.finalize_state()  # Keras caches mean/variance; loading a file does this too


def build(name: str, include_top: bool, size: int, seed: int = 0, weights=None, **kw):
    """The Keras model for `name`, with logits (no softmax) when it has a top."""
    keras.utils.set_random_seed(seed)
    spec = models.spec(name)
    constructor = getattr(keras.applications, spec.keras_name)
    options = dict(weights=weights, include_top=include_top, input_shape=(size, size, 3), **kw)
    if include_top:
        options["classifier_activation"] = None
    else:
        options.setdefault("pooling", "avg")
    return constructor(**options)


def save_legacy_h5(model, path: str) -> str:
    """Write `model`'s weights in the legacy HDF5 layout that the official files use."""
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    return path


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """`n` RGB uint8 images: real photos (scikit-image) resized, then random ones."""
    from PIL import Image
    from skimage import data

    photos = [data.chelsea(), data.coffee(), data.astronaut()]
    out = [np.asarray(Image.fromarray(p).resize((size, size), Image.BILINEAR)) for p in photos]
    rng = np.random.default_rng(seed)
    while len(out) < n:
        out.append(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    return np.stack(out[:n])


def run(model, name: str, raw: np.ndarray) -> np.ndarray:
    x = preprocess_input(name)(raw.astype(np.float32).copy())
    return np.asarray(model(x, training=False))
