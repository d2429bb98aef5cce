"""Encoded image -> uint8 RGB at the model's input size, as TensorFlow ops for `tf.data`.

Training takes a random resized crop (the box drawn as `tf.image.sample_distorted_bounding_box`
draws it, from a stateless seed); evaluation the central square of `crop_fraction` of the
shorter side. Both resize the box to `size` x `size`.

A JPEG is never decoded whole. Its header gives the image's shape, the box is drawn on that
shape, and `decode_and_crop_jpeg` decodes only the blocks the box covers, at the largest DCT
scale (1/2, 1/4 or 1/8) that keeps both sides of the box at least `size` pixels (the box's
edges then rounded to the scaled image's pixels: less than half an output pixel). A bilinear
resize finishes it; after the scaled decode it shrinks by less than 2x, so it needs no
antialiasing. At 1/8, the smallest scale, what is left may shrink by more, and that resize
is antialiased.
Other formats (PNG, BMP, GIF) are decoded whole, the box drawn on the decoded shape, and
resized with antialiasing. (Those two branches resize to the output size themselves; the
bilinear resize after the branch is then an identity.) The bilinear resize is tljax's op
(`tljax.datasets.resize`), which gives TensorFlow's bits at less cost.

Every op of a `tf.data` function, and every branch most of all, costs CPU time per image, so
the function is kept to one `tf.switch_case` (format and DCT scale) whose JPEG branches are one
decode each, and few small ops; the shape of a non-JPEG image is read in its branch.
docs/benchmarks.md ("Input pipeline") has the measurements.
"""

from __future__ import annotations

from tljax.datasets import resize

SCALES = (2, 4, 8)  # the reduced DCT scales libjpeg decodes at, besides 1
FULL_BOX = ((0.0, 0.0, 1.0, 1.0),)
# A 1x1 JPEG: what `extract_jpeg_shape` reads in place of an image of another format, so that
# the JPEG shape is found without a branch.
_ONE_PIXEL_JPEG = bytes.fromhex(
    "ffd8ffe000104a46494600010100000100010000ffdb004300080606070605080707070909080a0c140d0c0b"
    "0b0c1912130f141d1a1f1e1d1a1c1c20242e2720222c231c1c2837292c30313434341f27393d38323c2e3334"
    "32ffc0000b080001000101011100ffc4001f0000010501010101010100000000000000000102030405060708"
    "090a0bffc400b5100002010303020403050504040000017d0102030004110512213141061351610722711432"
    "8191a1082342b1c11552d1f02433627282090a161718191a25262728292a3435363738393a43444546474849"
    "4a535455565758595a636465666768696a737475767778797a838485868788898a92939495969798999aa2a3"
    "a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3c4c5c6c7c8c9cad2d3d4d5d6d7d8d9dae1e2e3e4e5e6e7e8e9ea"
    "f1f2f3f4f5f6f7f8f9faffda0008010100003f00fbd3ffd9")


def _tf():
    import tensorflow as tf

    return tf


def random_box(shape, seed, area, aspect):
    """`(begin, extent)` of a random-resized-crop box on an image of `shape` ((h, w, c)), as
    `tf.image.stateless_sample_distorted_bounding_box` returns them (only their first two
    entries count); `area=None`: the whole image."""
    tf = _tf()
    if area is None:
        return tf.zeros([3], tf.int32), shape
    begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.constant([FULL_BOX]), seed=seed, min_object_covered=0.0,
        aspect_ratio_range=aspect, area_range=area, max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    return begin, extent


def central_box(shape, crop_fraction: float):
    """`(begin, extent)` of the central square of side `crop_fraction` x the shorter side of an
    image of `shape` ((h, w, c); only the first two entries count), or with
    `crop_fraction >= 1` the whole image, resized without keeping its aspect."""
    tf = _tf()
    if crop_fraction >= 1.0:
        return tf.zeros([3], tf.int32), shape
    side = tf.maximum(tf.cast(tf.cast(tf.reduce_min(shape[:2]), tf.float32) * crop_fraction
                              + 0.5, tf.int32), 1)
    return (shape - side) // 2, tf.fill([3], side)


def crop(data, size: int, box_of):
    """The box `box_of(shape) -> (begin, extent)` of encoded `data`, resized to `size` x
    `size`, uint8 RGB (see the module docstring)."""
    tf = _tf()
    jpeg = tf.io.is_jpeg(data)
    shape = tf.io.extract_jpeg_shape(tf.where(jpeg, data, _ONE_PIXEL_JPEG))
    begin, extent = box_of(shape)
    scale = tf.raw_ops.Bucketize(input=tf.reduce_min(extent[:2]),
                                 boundaries=[float(r * size) for r in SCALES])
    # The box on the grid of the image decoded at 1/r (sides ceil(side / r)), its edges rounded
    # to the nearest scaled pixel: each within half a scaled pixel, less than half an output
    # pixel. At r = 1 it is the box itself.
    r = tf.bitwise.left_shift(1, scale)
    top_left = (begin[:2] + r // 2) // r
    bottom_right = tf.minimum((begin[:2] + extent[:2] + r // 2) // r, (shape[:2] + r - 1) // r)
    window = tf.concat([top_left, bottom_right - top_left], 0)
    branch = tf.where(jpeg, scale + 1, 0)

    def jpeg_at(r):
        image = tf.io.decode_and_crop_jpeg(data, window, channels=3, ratio=r)
        if r == SCALES[-1]:  # no smaller scale: what is left to shrink may exceed 2x
            image = tf.image.resize(image, (size, size), antialias=True)
            image = tf.cast(tf.clip_by_value(image + 0.5, 0.0, 255.0), tf.uint8)
        return image

    def other():
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        b, e = box_of(tf.shape(image))
        image = tf.slice(image, tf.concat([b[:2], [0]], 0), tf.concat([e[:2], [-1]], 0))
        image = tf.image.resize(image, (size, size), antialias=True)
        return tf.cast(tf.clip_by_value(image + 0.5, 0.0, 255.0), tf.uint8)

    image = tf.switch_case(branch, [other] + [lambda r=r: jpeg_at(r) for r in (1,) + SCALES])
    return resize.bilinear(image, size)


def train_image(data, size: int, seed, area=(0.08, 1.0), aspect=(3 / 4, 4 / 3)):
    """A random resized crop of encoded `data`, drawn from the stateless `seed` (shape (2,),
    int64): uint8 (size, size, 3). The flip is the step's (`flip`)."""
    return crop(data, size, lambda shape: random_box(shape, seed, area, aspect))


def eval_image(data, size: int, crop_fraction: float):
    """The central crop of encoded `data` resized to uint8 (size, size, 3)."""
    return crop(data, size, lambda shape: central_box(shape, crop_fraction))


def flip(seed):
    """A fair coin from the stateless `seed`: whether to mirror the example."""
    tf = _tf()
    return tf.random.stateless_uniform([], seed) < 0.5
