"""Bilinear resizing of one uint8 image inside the input pipeline.

`bilinear(image, size)` gives, bit for bit, what
`tf.cast(tf.image.resize(tf.cast(image, tf.float32), (size, size)) + 0.5, tf.uint8)` gives
(half-pixel centres, no antialiasing), with tljax's TensorFlow op `TljaxResizeBilinear`
(`resize_op.cc`): one pass, no float32 copies of the image (docs/benchmarks.md, "Input
pipeline", has its cost beside TensorFlow's).

The op is compiled on first use against the installed TensorFlow (its headers and flags,
`tf.sysconfig`) into tljax's kernel cache (`$TLJAX_NATIVE_CACHE`, as `tljax.native`), once per
machine and TensorFlow version. Where it cannot be built or loaded, TensorFlow's own ops compute
the same bits, more slowly, after one warning; `TLJAX_INPUT_RESIZE=tensorflow` chooses them
without one. The setting, `$CXX` and the cache are read once per process, the first time a
pipeline is built.
"""

from __future__ import annotations

import functools
import os
import warnings

SOURCE = "resize_op.cc"
FLAGS = ("-O3", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno", "-w")
SETTING = "TLJAX_INPUT_RESIZE"  # tljax (default) | tensorflow


def _build() -> str:
    import tensorflow as tf

    from tljax.native import build

    cxx = build.compiler()
    source = [os.path.join(os.path.dirname(__file__), SOURCE)]
    flags = [*FLAGS, *tf.sysconfig.get_compile_flags(), *tf.sysconfig.get_link_flags()]
    key = build.cache_key(cxx, source, flags, tf.__version__.encode())
    return build.compile_library(cxx, "libtljax_resize.so", source, flags, key,
                                 "tljax's resize op for TensorFlow")


@functools.cache
def op():
    """The loaded op library; None with `TLJAX_INPUT_RESIZE=tensorflow`, and where it cannot
    be built or loaded (after one warning that says why)."""
    choice = os.environ.get(SETTING, "").strip().lower() or "tljax"
    if choice not in ("tljax", "tensorflow"):
        raise ValueError(f"{SETTING}={choice!r}: use 'tljax' (its op, the default) or "
                         "'tensorflow' (TensorFlow's resize, the same bits, slower)")
    if choice == "tensorflow":
        return None
    import tensorflow as tf

    from tljax.native.build import BuildError

    try:
        library = tf.load_op_library(_build())
        if not hasattr(library, "tljax_resize_bilinear"):  # another copy is loaded already
            raise BuildError("the resize op library loaded without its op")
        return library
    except (BuildError, OSError, RuntimeError, tf.errors.OpError) as e:
        warnings.warn(f"{e}\ntljax's input pipeline resizes with TensorFlow's ops instead: "
                      f"the same images, more CPU time per image. Set {SETTING}=tensorflow to "
                      "silence this.", RuntimeWarning, stacklevel=2)
        return None


def bilinear(image, size: int):
    """uint8 `image` (h, w, c) resized to uint8 (size, size, c), bilinear with half-pixel
    centres and no antialiasing, rounded to the nearest integer."""
    import tensorflow as tf

    library = op()
    if library is not None:
        return library.tljax_resize_bilinear(image, height=size, width=size)
    # Cast first: TensorFlow's bilinear resize is faster from float32 than from uint8. Its
    # output lies within its inputs' range: round without clipping.
    return tf.cast(tf.image.resize(tf.cast(image, tf.float32), (size, size)) + 0.5, tf.uint8)
