"""tljax's bilinear resize op for the input pipeline: TensorFlow's bits, a fallback with the
same bits, errors that say what is wrong; and the pipeline's chunked decoding."""

from __future__ import annotations

import os

import numpy as np
import pytest


def _op_available() -> bool:
    from tljax.native import build

    try:
        build.compiler()
    except build.BuildError:
        return False
    return os.environ.get("TLJAX_INPUT_RESIZE", "").strip().lower() in ("", "tljax")


needs_op = pytest.mark.skipif(not _op_available(), reason="no C++ compiler, or "
                              "TLJAX_INPUT_RESIZE=tensorflow: the op is not used here")


def _tensorflow(image, size):
    import tensorflow as tf

    return tf.cast(tf.image.resize(tf.cast(image, tf.float32), (size, size)) + 0.5, tf.uint8)


@pytest.fixture
def fresh(monkeypatch):
    """`resize.op()` looked up again under this test's settings, and again after it."""
    from tljax.datasets import resize

    resize.op.cache_clear()
    yield resize
    resize.op.cache_clear()


@needs_op
@pytest.mark.parametrize("shape", [(328, 328, 3), (375, 500, 3), (100, 130, 3), (224, 224, 3),
                                   (1, 1, 3), (2250, 3000, 3), (50, 400, 1), (7, 9, 4)])
def test_equals_tensorflow_bit_for_bit(shape):
    """Shrinking, enlarging, the same size, one pixel, 1 and 4 channels: TensorFlow's bits."""
    from tljax.datasets import resize

    assert resize.op() is not None  # built here: this machine has a compiler
    image = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    out = resize.bilinear(image, 224).numpy()
    assert out.shape == (224, 224, shape[2]) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, _tensorflow(image, 224).numpy())


def test_inside_a_tf_function_the_shape_is_known():
    import tensorflow as tf

    from tljax.datasets import resize

    @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
    def f(image):
        out = resize.bilinear(image, 32)
        assert out.shape.as_list() == [32, 32, 3]
        return out

    image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    np.testing.assert_array_equal(f(image).numpy(), _tensorflow(image, 32).numpy())


def test_tensorflow_setting_and_a_failed_build_give_the_same_bits(fresh, monkeypatch,
                                                                  tmp_path):
    image = np.random.default_rng(1).integers(0, 256, (90, 70, 3), dtype=np.uint8)
    want = _tensorflow(image, 48).numpy()

    monkeypatch.setenv("TLJAX_INPUT_RESIZE", "tensorflow")
    assert fresh.op() is None
    np.testing.assert_array_equal(fresh.bilinear(image, 48).numpy(), want)

    fresh.op.cache_clear()
    monkeypatch.delenv("TLJAX_INPUT_RESIZE")
    bad = tmp_path / "fake-c++"
    bad.write_text("#!/bin/sh\necho 'fake-c++: no such luck' >&2\n"
                   "[ \"$1\" = --version ] && exit 0\nexit 1\n")
    bad.chmod(0o755)
    monkeypatch.setenv("CXX", str(bad))
    monkeypatch.setenv("TLJAX_NATIVE_CACHE", str(tmp_path / "cache"))
    with pytest.warns(RuntimeWarning, match="(?s)compiling tljax's resize op.*no such luck.*"
                                            "TensorFlow's ops instead"):
        assert fresh.op() is None
    np.testing.assert_array_equal(fresh.bilinear(image, 48).numpy(), want)


def test_a_typo_in_the_setting_is_an_error_and_empty_is_the_default(fresh, monkeypatch):
    monkeypatch.setenv("TLJAX_INPUT_RESIZE", "tensorflw")
    with pytest.raises(ValueError, match="TLJAX_INPUT_RESIZE='tensorflw'.*'tensorflow'"):
        fresh.op()
    if _op_available():
        monkeypatch.setenv("TLJAX_INPUT_RESIZE", " ")
        assert fresh.op() is not None


@needs_op
def test_built_once_per_machine(monkeypatch, tmp_path):
    """Built into the kernel cache, then found there. (Not loaded: a process loads one such
    library, and this one is another file.)"""
    from tljax.datasets import resize

    monkeypatch.setenv("TLJAX_NATIVE_CACHE", str(tmp_path))
    path = resize._build()
    mtime = os.stat(path).st_mtime_ns
    assert resize._build() == path and os.stat(path).st_mtime_ns == mtime
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["libtljax_resize.so"]


@needs_op
@pytest.mark.parametrize("shape", [(0, 5, 3), (5, 5)])
def test_bad_images_are_refused(shape):
    import tensorflow as tf

    from tljax.datasets import resize

    with pytest.raises((tf.errors.InvalidArgumentError, ValueError),
                       match="empty image|height, width, channels|rank"):
        resize.bilinear(np.zeros(shape, np.uint8), 8)


@pytest.mark.parametrize("n,batch,processes", [(21, 5, 1), (21, 4, 2), (8, 8, 1), (3, 4, 2),
                                                   (2, 4, 3)])
def test_evaluation_reads_each_example_once_in_order(n, batch, processes):
    """Chunks of `CHUNK` examples, the last cut short, then batches: every example of each
    process's share once, in order, whatever n, the batch and the chunk have in common."""
    from tljax.datasets import pipeline, records

    data = [_tiny_jpeg(i) for i in range(n)]
    recs = records.memory_records(data, list(range(n)))
    seen = []
    for k in range(processes):
        batches, count = pipeline.eval_batches(recs, batch, 16, 0.875, k, processes)
        batches = list(batches)
        assert len(batches) == count
        for b in batches:
            assert b["image"].shape == (batch, 16, 16, 3)
            seen += b["label"][b["mask"] > 0].tolist()
    assert seen == list(range(n))


@pytest.mark.parametrize("local,processes", [(6, 2), (7, 1), (11, 1)])
def test_training_rows_are_the_positions_whatever_the_chunk(local, processes):
    """A local batch of 6 (chunks of 6), 7 (7) or 11 (1): each process's rows of each global
    batch are the examples at those positions."""
    import tensorflow as tf

    from tljax.datasets import pipeline, records

    n, seed, start = 40, 5, 3
    recs = records.memory_records([_tiny_jpeg(i) for i in range(n)], list(range(n)))
    g = local * processes
    for k in range(processes):
        it = pipeline.train_batches(recs, local, g, 16, seed, pipeline.Augment(), start, k)
        for step in range(start, start + 3):
            p = step * g + k * local + np.arange(local)
            want = pipeline.example_at(tf.constant(p, tf.int64), n, seed).numpy()
            np.testing.assert_array_equal(next(it)["label"], want)


def _tiny_jpeg(i: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (24 + i % 5, 20), (i * 7 % 256, 80, 160)).save(buf, "JPEG")
    return buf.getvalue()
