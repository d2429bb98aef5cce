"""Input preprocessing, equal to Keras's `preprocess_input` plus the model's own input layers.

Every function takes RGB NHWC images with values in 0-255 (uint8 or float) and returns float32.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# Keras imagenet_utils 'caffe' mode: BGR channel means of the ImageNet training set.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def caffe(images):
    """VGG and ResNet v1: RGB -> BGR, subtract the ImageNet mean per channel, no scaling."""
    x = jnp.asarray(images, jnp.float32)[..., ::-1]
    return x - jnp.asarray(CAFFE_MEAN_BGR, jnp.float32)


def tf(images):
    """InceptionV3 and ResNet v2: scale to [-1, 1]."""
    return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def raw(images):
    """EfficientNet B0-B7: the model rescales and normalises inside (as Keras's does)."""
    return jnp.asarray(images, jnp.float32)


def lite(images):
    """EfficientNet-Lite (TF lite builder): (x - 127) / 128."""
    return (jnp.asarray(images, jnp.float32) - 127.0) / 128.0


FUNCTIONS = {"caffe": caffe, "tf": tf, "raw": raw, "lite": lite}


def preprocess(name: str, images) -> jnp.ndarray:
    """The model input of registered model `name` for RGB 0-255 `images` (N, H, W, 3)."""
    from tljax.models.registry import spec

    arr = images if isinstance(images, jnp.ndarray) else np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(
            f"preprocess({name!r}): expected RGB images shaped (batch, height, width, 3) with "
            f"values 0-255, got shape {tuple(arr.shape)}"
        )
    return FUNCTIONS[spec(name).numerics.preprocessing](arr)
