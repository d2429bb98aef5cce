"""The input pipeline: the order as a function of (seed, global position), each process reading
its rows of a global batch, resuming without reading, caching by bytes, the JPEG decode
inside the box at reduced DCT scales, and the other image formats."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest

# `digits` is prepared once per module and xdist worker.
pytestmark = pytest.mark.xdist_group("data")


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    """An (h, w, 3) uint8 picture: the cat tiled, with noise, so that JPEG has detail to keep."""
    from skimage import data

    cat = data.chelsea()
    reps = (h // cat.shape[0] + 1, w // cat.shape[1] + 1, 1)
    img = np.tile(cat, reps)[:h, :w].astype(np.int16)
    img += np.random.default_rng(seed).integers(-4, 5, img.shape, dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def _encode(img: np.ndarray, fmt: str, **kw) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """24 JPEGs in 3 classes, 120x160 to 600x800 (so that boxes at size 64 take every DCT
    scale), with one PNG among them."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for i in range(24):
        cls = root / f"c{i % 3}"
        cls.mkdir(exist_ok=True)
        h = int(rng.choice([120, 300, 600]))
        img = _photo(h, h * 4 // 3, i)
        if i == 5:
            (cls / f"{i}.png").write_bytes(_encode(img, "PNG"))
        else:
            (cls / f"{i}.jpg").write_bytes(_encode(img, "JPEG", quality=90))
    return str(root)


def _take(batches, k: int) -> list[dict]:
    return [next(batches) for _ in range(k)]


def _equal(a: list[dict], b: list[dict]) -> bool:
    return all(set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x)
               for x, y in zip(a, b, strict=True))


def test_processes_read_their_rows_of_each_global_batch(folder):
    """Two or four processes, each making its rows of every global batch, make between them
    the batches of one process: images, labels and flips."""
    from tljax import datasets

    recs = datasets.source(f"folder:{folder}").records("train", datasets.budget(1.0))
    augment = datasets.Augment()
    one = _take(datasets.train_batches(recs, 8, 8, 32, 3, augment), 4)
    for count in (2, 4):
        parts = [_take(datasets.train_batches(recs, 8 // count, 8, 32, 3, augment,
                                              process_index=k), 4) for k in range(count)]
        joined = [{key: np.concatenate([p[s][key] for p in parts]) for key in one[s]}
                  for s in range(4)]
        assert _equal(joined, one), count
    assert {"image", "label", "flip"} == set(one[0])
    assert one[0]["image"].dtype == np.uint8 and one[0]["image"].shape == (8, 32, 32, 3)
    assert 0 < np.concatenate([b["flip"] for b in one]).mean() < 1


def test_a_resumed_stream_starts_at_its_step_without_reading_the_rest(folder):
    from tljax import datasets

    recs = datasets.source(f"folder:{folder}").records("train", 0)
    augment = datasets.Augment()
    whole = _take(datasets.train_batches(recs, 4, 4, 32, 0, augment), 9)
    assert _equal(_take(datasets.train_batches(recs, 4, 4, 32, 0, augment, start_step=5), 4),
                  whole[5:])
    # Step 10^9 is 4 * 10^9 examples in: a stream that skipped them would not start at all.
    t = time.perf_counter()
    far = next(datasets.train_batches(recs, 4, 4, 32, 0, augment, start_step=10**9))
    assert far["image"].shape == (4, 32, 32, 3) and time.perf_counter() - t < 120


def test_every_epoch_is_a_fresh_permutation():
    import tensorflow as tf

    from tljax.datasets import pipeline

    n = 37
    order = pipeline.example_at(tf.range(3 * n, dtype=tf.int64), n, seed=0).numpy()
    epochs = order.reshape(3, n)
    for e in epochs:
        assert sorted(e) == list(range(n))
    assert not np.array_equal(epochs[0], epochs[1])
    other = pipeline.example_at(tf.range(n, dtype=tf.int64), n, seed=1).numpy()
    assert not np.array_equal(other, epochs[0])


def test_memory_and_disk_give_the_same_batches(folder, data_dir):
    """Whether a split is held in memory or read per example (files, ArrayRecord) changes
    nothing in the batches."""
    from tljax import datasets

    for name, where in ((f"folder:{folder}", None), ("digits", data_dir)):
        src = datasets.source(name, where)
        memory, disk = (src.records("train", datasets.budget(b)) for b in (1.0, 0.0))
        assert memory.held > 0 and memory.where.startswith("in memory")
        assert disk.held == 0 and disk.where.startswith("from")
        assert _equal(
            _take(datasets.train_batches(memory, 8, 8, 32, 0, datasets.Augment()), 3),
            _take(datasets.train_batches(disk, 8, 8, 32, 0, datasets.Augment()), 3)), name
        evals = [list(datasets.eval_batches(r, 16, 32)[0]) for r in (memory, disk)]
        assert _equal(*evals), name


def test_a_tfrecord_split_over_the_budget_is_copied_once_for_random_access(tmp_path,
                                                                           monkeypatch):
    """TFDS's default format has no random access: a split that fits the budget is read into
    memory; one that does not is copied once into an ArrayRecord file in $TLJAX_CACHE, read
    from there (also by the next run), and gives the same batches."""
    import tensorflow_datasets as tfds

    from tljax import datasets
    from tljax.datasets import digits  # noqa: F401  (registers the builder)

    monkeypatch.setenv("TLJAX_CACHE", str(tmp_path / "cache"))
    data_dir = str(tmp_path / "tfds")
    tfds.builder("digits", data_dir=data_dir, file_format="tfrecord").download_and_prepare()
    src = datasets.source("digits", data_dir)
    memory = src.records("train", datasets.budget(1.0))
    assert memory.held > 0 and "tfrecord read once" in memory.where
    copied = src.records("train", 1000)
    path = tmp_path / "cache" / "datasets" / "digits" / "1.0.0" / "train.array_record"
    assert path.exists() and "ArrayRecord copy" in copied.where and copied.held == 0
    mtime = path.stat().st_mtime_ns
    again = src.records("train", 1000)
    assert path.stat().st_mtime_ns == mtime  # not copied twice
    for recs in (copied, again):
        assert _equal(
            _take(datasets.train_batches(memory, 8, 8, 32, 0, datasets.Augment()), 2),
            _take(datasets.train_batches(recs, 8, 8, 32, 0, datasets.Augment()), 2))
    assert src.num_examples("train[:0]") == 0 and src.num_examples("train[:50%]") == 718


def test_evaluation_shares_cover_every_example_once(data_dir):
    from tljax import datasets

    recs = datasets.source("digits", data_dir).records("test", datasets.budget(1.0))
    labels = []
    counts = set()
    for k in range(3):
        batches, count = datasets.eval_batches(recs, 64, 16, 1.0, k, 3)
        counts.add(count)
        for b in batches:
            labels.append(b["label"][b["mask"] > 0])
    assert counts == {2} and len(np.concatenate(labels)) == recs.n == 360
    one = np.concatenate([b["label"][b["mask"] > 0]
                          for b in datasets.eval_batches(recs, 64, 16, 1.0)[0]])
    assert np.array_equal(np.concatenate(labels), one)


@pytest.mark.parametrize("h", [120, 240, 600, 1600])
def test_a_jpeg_box_is_the_crop_of_the_whole_image(h):
    """The box decoded inside the JPEG is the crop of the fully decoded image, resized: at DCT
    scale 1 the same pixels as a bilinear resize of that crop; at scales 2, 4 and 8 (a 64
    output from boxes of 130-1600 pixels) the same picture as an antialiased resize of the
    exact box: at 16x16 (the filters differ in the finest detail, the edges by up to half an
    output pixel) a mean error < 4 of 255 (measured 0.7-2.5), where a box one output pixel off
    gives 10-19."""
    import tensorflow as tf

    from tljax.datasets import images

    data = _encode(_photo(h, h * 4 // 3, 1), "JPEG", quality=95)
    whole = tf.io.decode_jpeg(data, channels=3)
    scales = set()
    for seed in range(4):
        begin, extent = images.random_box(tf.shape(whole), tf.constant([seed, 7], tf.int64),
                                          (0.3, 1.0), (3 / 4, 4 / 3))
        out = images.train_image(data, 64, tf.constant([seed, 7], tf.int64), (0.3, 1.0))
        assert out.dtype == tf.uint8 and out.shape == (64, 64, 3)
        r = _scale(extent)
        scales.add(r)
        ref = tf.image.resize(tf.slice(whole, begin, extent), (64, 64), antialias=r > 1)
        assert _error(out, ref, r) < (0.5 if r == 1 else 4.0), (h, seed, r)
    assert scales == {120: {1}, 240: {2}, 600: {4, 8}, 1600: {8}}[h]
    centre = images.eval_image(data, 64, 0.875)
    side = round(min(whole.shape[:2]) * 0.875)
    top, left = (whole.shape[0] - side) // 2, (whole.shape[1] - side) // 2
    r = _scale([side, side])
    ref = tf.image.resize(whole[top:top + side, left:left + side], (64, 64), antialias=r > 1)
    assert _error(centre, ref, r) < (0.5 if r == 1 else 4.0)


def _scale(extent, size: int = 64) -> int:
    return max([s for s in (1, 2, 4, 8) if min(int(extent[0]), int(extent[1])) >= s * size],
               default=1)


def _error(out, ref, scale: int) -> float:
    """Mean |out - ref|: per pixel at DCT scale 1, else at 16x16."""
    import tensorflow as tf

    out, ref = tf.cast(out, tf.float32), tf.cast(ref, tf.float32)
    if scale > 1:
        out, ref = (tf.image.resize(x, (16, 16), method="area") for x in (out, ref))
    return float(tf.reduce_mean(tf.abs(out - ref)))


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "BMP", "JPEG-grey", "JPEG-CMYK"])
def test_other_formats_decode_crop_and_resize(fmt):
    """PNG, GIF and BMP (decoded whole, the box drawn on the decoded shape), grey and CMYK
    JPEGs: uint8 RGB at the size asked; the PNG's crop is the JPEG's (same box)."""
    import tensorflow as tf

    from tljax.datasets import images

    img = _photo(90, 120, 2)
    if fmt == "JPEG-grey":
        data = _encode(img[..., 0], "JPEG", quality=95)
    elif fmt == "JPEG-CMYK":
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(img).convert("CMYK").save(buf, "JPEG", quality=95)
        data = buf.getvalue()
    else:
        data = _encode(img, fmt)
    seed = tf.constant([3, 4], tf.int64)
    out = images.train_image(data, 48, seed).numpy()
    assert out.dtype == np.uint8 and out.shape == (48, 48, 3)
    assert images.eval_image(data, 48, 0.875).numpy().shape == (48, 48, 3)
    if fmt in ("PNG", "BMP"):
        jpeg = images.train_image(_encode(img, "JPEG", quality=100), 48, seed).numpy()
        assert np.abs(out.astype(float) - jpeg).mean() < 3.0


def test_an_undecodable_file_is_named(tmp_path):
    from tljax import datasets

    root = tmp_path / "images" / "a"
    root.mkdir(parents=True)
    for i in range(5):
        (root / f"{i}.jpg").write_bytes(_encode(_photo(40, 40, i), "JPEG"))
    (root / "7.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    src = datasets.source(f"folder:{tmp_path / 'images'}", holdout_fraction=0.2)
    recs = {s: src.records(s, 0) for s in src.splits}
    with pytest.raises(datasets.DataError, match=r"7\.jpg"):
        for r in recs.values():
            for _ in datasets.eval_batches(r, 2, 16)[0]:
                pass


def test_folder_splits_and_holdout_are_fixed(tmp_path):
    from tljax import datasets

    for split in ("train", "test"):
        for c in ("cat", "dog"):
            d = tmp_path / "split" / split / c
            d.mkdir(parents=True)
            for i in range(3 if split == "train" else 1):
                (d / f"{i}.jpg").write_bytes(_encode(_photo(20, 20, i), "JPEG"))
    src = datasets.source(f"folder:{tmp_path / 'split'}")
    assert src.splits == {"test": 2, "train": 6} and src.class_names == ["cat", "dog"]
    assert src.default_splits() == ("train[:90%]", "train[90%:]", "test")
    assert src.num_examples("train[:50%]") == 3
    with pytest.raises(datasets.DataError, match="no split 'validation'.*test, train"):
        src.records("validation", 0)
    a = datasets.source(f"folder:{tmp_path / 'split' / 'train'}")
    b = datasets.source(f"folder:{tmp_path / 'split' / 'train'}")
    names = [[r.name(i) for i in range(r.n)] for r in
             (a.records("validation", 0), b.records("validation", 0))]
    assert names[0] == names[1] and len(names[0]) == 1
