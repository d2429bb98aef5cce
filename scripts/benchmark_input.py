r"""Input pipeline throughput, quality, time to the first batch when resuming, and memory.

  python scripts/benchmark_input.py            # --quick: one round, 400 images
  python scripts/benchmark_input.py --json out.json

Makes a folder of JPEGs from scikit-image's photos (ImageNet-like: ~500x375 at quality 90; and
a large-photo variant, ~3000x2250), then measures in one process, side by side:
- tljax's training and evaluation paths (`tljax.datasets.pipeline`), reading from memory and
  from the files (the training flip is left to the device);
- the previous path (tljax before the crop-in-decoder change): the whole JPEG decoded, cropped,
  resized with antialiasing;
- a reference tf.data pipeline: `tf.io.decode_and_crop_jpeg` on the sampled box (training, with
  a flip) or the central 87.5% (evaluation), bilinear resize without antialiasing;
- Grain (not with --quick): a `grain.MapDataset` over the files with 2 worker processes,
  decoding with Pillow (DCT-scaled `draft`, then a bilinear resize of the box), or with tljax's
  own decoding function run as a `tf.function` in the workers.
Each is timed alone for a few seconds, in interleaved rounds: images/s, and images per CPU-
second of the process and its workers ("per core"); the ratios to the reference are of the per-
core medians. Then: the PSNR of each path's crops against a Lanczos-5 resize of the fully
decoded box; the time from opening the split to the first batch of a run started at step 0,
10^4 and 10^6 (the folder, the same images as a TFDS ArrayRecord dataset read from disk, and as
a TFRecord one, read into memory first); and the peak RSS of a pass over the large photos with
a cache budget of a quarter of their encoded size, and with all of them in memory.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def photos() -> list[np.ndarray]:
    """scikit-image's colour photos (the cat, the astronaut, coffee, ...)."""
    from skimage import data

    out = []
    for name in ("chelsea", "astronaut", "coffee", "rocket", "hubble_deep_field",
                 "immunohistochemistry", "retina", "cat", "colorwheel", "logo"):
        try:
            img = getattr(data, name)()
        except Exception:  # an image a scikit-image version lacks, or one needing pooch
            continue
        if img.ndim == 3 and img.shape[2] >= 3:
            out.append(np.ascontiguousarray(img[..., :3]))
    return out


def make_folder(root: str, count: int, long_side: tuple[int, int], seed: int = 0,
                classes: int = 10, quality: int = 90) -> int:
    """`count` JPEGs in `classes` sub-folders, long side in `long_side`, aspect 4:3 or 3:4
    (+-10%). Each is a mosaic of tiles cut from the photos at their own resolution (never
    enlarged), flipped at random, with mild sensor-like noise, so that its detail and its JPEG
    size are those of a camera photo rather than of an enlarged small one. Returns the total
    bytes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = photos()
    grain = np.round(rng.normal(0.0, 5.0, (256, 256, 3))).astype(np.int16)
    total = 0
    for c in range(classes):
        os.makedirs(os.path.join(root, f"class_{c:02d}"), exist_ok=True)
    for i in range(count):
        long = int(rng.integers(*long_side))
        aspect = (4 / 3 if rng.random() < 0.7 else 3 / 4) * rng.uniform(0.9, 1.1)
        w, h = (long, int(long / aspect)) if aspect > 1 else (int(long * aspect), long)
        canvas = np.empty((h, w, 3), np.uint8)
        tile = int(rng.integers(160, 320))
        for top in range(0, h, tile):
            for left in range(0, w, tile):
                img = base[rng.integers(len(base))]
                th, tw = min(tile, h - top), min(tile, w - left)
                y = rng.integers(0, img.shape[0] - th + 1) if img.shape[0] >= th else 0
                x = rng.integers(0, img.shape[1] - tw + 1) if img.shape[1] >= tw else 0
                part = img[y:y + th, x:x + tw]
                if rng.random() < 0.5:
                    part = part[:, ::-1]
                ph, pw = part.shape[:2]
                canvas[top:top + th, left:left + tw] = np.pad(
                    part, ((0, th - ph), (0, tw - pw), (0, 0)), mode="reflect")
        dy, dx = rng.integers(0, 256, 2)
        noise = np.tile(grain, (h // 256 + 2, w // 256 + 2, 1))[dy:dy + h, dx:dx + w]
        canvas = np.clip(canvas + noise, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(canvas).save(buf, "JPEG", quality=quality)
        path = os.path.join(root, f"class_{i % classes:02d}", f"{i:06d}.jpg")
        with open(path, "wb") as f:
            f.write(buf.getvalue())
        total += buf.tell()
    return total


# ----------------------------------------------------------------------------- the pipelines


def _paths_labels(root: str):
    paths, labels = [], []
    for k, c in enumerate(sorted(os.listdir(root))):
        for f in sorted(os.listdir(os.path.join(root, c))):
            paths.append(os.path.join(root, c, f))
            labels.append(k)
    return paths, labels


def reference(paths, labels, batch: int, size: int, train: bool):
    """decode_and_crop_jpeg on the sampled box (training) or the central 87.5% (evaluation),
    bilinear resize without antialiasing."""
    import tensorflow as tf

    def prepare(path, label, i):
        data = tf.io.read_file(path)
        shape = tf.io.extract_jpeg_shape(data)
        if train:
            seed = tf.random.experimental.stateless_fold_in([0, 1], i)
            begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
                shape, tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
                min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3),
                area_range=(0.08, 1.0), max_attempts=10, use_image_if_no_bounding_boxes=True)
            window = tf.stack([begin[0], begin[1], extent[0], extent[1]])
        else:
            side = tf.cast(tf.cast(tf.reduce_min(shape[:2]), tf.float32) * 0.875, tf.int32)
            window = tf.stack([(shape[0] - side) // 2, (shape[1] - side) // 2, side, side])
        image = tf.io.decode_and_crop_jpeg(data, window, channels=3)
        image = tf.image.resize(image, (size, size), method="bilinear")
        if train:
            image = tf.image.stateless_random_flip_left_right(image, seed=[i, 2])
        return {"image": tf.cast(image, tf.uint8), "label": label}

    n = len(paths)
    ds = tf.data.Dataset.from_tensor_slices((paths, labels, np.arange(n, dtype=np.int64)))
    ds = ds.repeat() if train else ds
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch, drop_remainder=train).prefetch(tf.data.AUTOTUNE)


def previous(paths, labels, batch: int, size: int, train: bool):
    """tljax's path before this change: whole decode, crop, antialiased resize."""
    import tensorflow as tf

    def prepare(path, label, i):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        if train:
            seed = tf.random.experimental.stateless_fold_in([0, 1], i)
            begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
                tf.shape(image), tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
                min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3),
                area_range=(0.08, 1.0), max_attempts=10, use_image_if_no_bounding_boxes=True)
            image = tf.image.resize(tf.slice(image, begin, extent), (size, size),
                                    antialias=True)
            image = tf.image.stateless_random_flip_left_right(image, seed=[i, 2])
        else:
            shape = tf.cast(tf.shape(image)[:2], tf.float32)
            new = tf.cast(tf.math.ceil(shape * (size / 0.875) / tf.reduce_min(shape)), tf.int32)
            image = tf.image.resize(image, new, antialias=True)
            top, left = (new[0] - size) // 2, (new[1] - size) // 2
            image = image[top:top + size, left:left + size]
        image = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
        return {"image": image, "label": label}

    n = len(paths)
    ds = tf.data.Dataset.from_tensor_slices((paths, labels, np.arange(n, dtype=np.int64)))
    ds = ds.repeat() if train else ds
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch, drop_remainder=train).prefetch(tf.data.AUTOTUNE)


def tljax_source(root: str, budget_gb: float):
    from tljax import datasets
    from tljax.datasets import records

    src = datasets.source(f"folder:{root}", holdout_fraction=0.0001)
    return src.records("train", records.budget(budget_gb))


def tljax_pipeline(recs, batch: int, size: int, train: bool, start_step: int = 0):
    from tljax.datasets import pipeline

    if train:
        return pipeline.train_batches(recs, batch, batch, size, 0, pipeline.Augment(),
                                      start_step)
    return pipeline.eval_batches(recs, batch, size, 0.875)[0]


class PillowDecode:
    """Grain transform: (path, label) at stream index i -> the training box (a random resized
    crop drawn from `(0, i)`) or the central 87.5%, decoded by Pillow at the largest DCT scale
    that keeps the box >= `size` (`Image.draft`), resized bilinearly to `size`."""

    def __init__(self, size: int, train: bool):
        self.size, self.train = size, train

    def __call__(self, i, example):
        from PIL import Image

        path, label = example
        image = Image.open(path)
        w, h = image.size
        x, y, cw, ch = 0, 0, w, h
        if self.train:
            rng = np.random.default_rng([0, i])
            for _ in range(10):
                area = w * h * rng.uniform(0.08, 1.0)
                aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
                bw, bh = round(np.sqrt(area * aspect)), round(np.sqrt(area / aspect))
                if 0 < bw <= w and 0 < bh <= h:
                    x, y, cw, ch = rng.integers(w - bw + 1), rng.integers(h - bh + 1), bw, bh
                    break
        else:
            side = round(min(w, h) * 0.875)
            x, y, cw, ch = (w - side) // 2, (h - side) // 2, side, side
        r = max([k for k in (1, 2, 4, 8) if min(cw, ch) >= k * self.size], default=1)
        if r > 1:
            image.draft("RGB", (w // r, h // r))
        sx, sy = image.size[0] / w, image.size[1] / h
        image = image.convert("RGB").resize(
            (self.size, self.size), Image.BILINEAR,
            box=(x * sx, y * sy, (x + cw) * sx, (y + ch) * sy))
        return {"image": np.asarray(image), "label": np.int32(label)}


@functools.cache
def _tljax_decode(size: int, train: bool):
    """tljax's decoding function as a `tf.function` (one per worker process)."""
    import tensorflow as tf

    from tljax.datasets import images

    def decode(data, seed):
        if train:
            return images.train_image(data, size, seed)
        return images.eval_image(data, size, 0.875)

    return tf.function(decode, input_signature=[tf.TensorSpec([], tf.string),
                                                tf.TensorSpec([2], tf.int64)])


class TljaxDecode:
    """Grain transform: tljax's decoding function (`tljax.datasets.images`) as a
    `tf.function`, called once per example in the worker."""

    def __init__(self, size: int, train: bool):
        self.size, self.train = size, train

    def __call__(self, i, example):
        path, label = example
        with open(path, "rb") as f:
            data = f.read()
        image = _tljax_decode(self.size, self.train)(data, np.array([1, i], np.int64))
        return {"image": image.numpy(), "label": np.int32(label)}


def grain_pipeline(paths, labels, batch: int, size: int, train: bool, decode, workers: int = 2):
    """A Grain stream over the files: a global shuffle (training) and `decode` in `workers`
    processes."""
    import grain
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    ds = grain.MapDataset.source(list(zip(paths, labels, strict=True)))
    if train:
        ds = ds.shuffle(seed=0).repeat()
    ds = ds.map_with_index(decode(size, train)).batch(batch, drop_remainder=train)
    return ds.to_iter_dataset().mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))


def cpu_seconds() -> float:
    """CPU seconds of this process and of its live children (Grain's workers)."""
    import psutil

    seconds = 0.0
    me = psutil.Process()
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.Error:  # a child that has just exited
            continue
        seconds += t.user + t.system
    return seconds


def rate(batches, seconds: float, warmup: float = 1.5) -> tuple[float, float]:
    """(images per second, images per CPU-second of this process and its workers) over
    `seconds`, after `warmup` seconds in which tf.data tunes its parallelism (and Grain starts
    its workers); a finite stream (evaluation) is restarted with the `batches` factory."""
    it = iter(batches())
    t = time.perf_counter()
    while time.perf_counter() - t < warmup:
        if next(it, None) is None:
            it = iter(batches())
    t, c, done = time.perf_counter(), cpu_seconds(), 0
    while time.perf_counter() - t < seconds:
        b = next(it, None)
        if b is None:
            it = iter(batches())
            continue
        done += len(b["label"])
    return done / (time.perf_counter() - t), done / (cpu_seconds() - c)


def numpy_batches(ds):
    import tensorflow_datasets as tfds

    return tfds.as_numpy(ds)


# ----------------------------------------------------------------------------- the measures


def throughput(root: str, batch: int, size: int, seconds: float, repeats: int,
               paths_only: tuple[str, ...] = ("train", "eval"), grain: bool = False
               ) -> list[dict]:
    """Images/s of each pipeline, training and evaluation, interleaved `repeats` times (with
    `grain`, Grain's too). An evaluation pass is over the folder 20 times over, so that
    building the pipeline is not what is timed."""
    from tljax.datasets import records

    paths, labels = _paths_labels(root)
    memory = tljax_source(root, 64.0)
    files = tljax_source(root, 0.0)
    eval_paths, eval_labels = paths * 20, labels * 20
    eval_memory = eval_files = None
    if "eval" in paths_only:
        eval_memory = records.memory_records(records.read_files(paths) * 20, eval_labels)
        eval_files = records.file_records(eval_paths, eval_labels)
    def cases(train: bool) -> dict:
        p, y = (paths, labels) if train else (eval_paths, eval_labels)
        mem, disk = (memory, files) if train else (eval_memory, eval_files)
        out = {
            "tljax (memory)": lambda: tljax_pipeline(mem, batch, size, train),
            "tljax (files)": lambda: tljax_pipeline(disk, batch, size, train),
            "previous tljax": lambda: numpy_batches(previous(p, y, batch, size, train)),
            "reference decode_and_crop": lambda: numpy_batches(
                reference(p, y, batch, size, train)),
        }
        return out

    rows = {}
    for _ in range(repeats):
        for train in [k == "train" for k in paths_only]:
            for name, make in cases(train).items():
                rows.setdefault(("train" if train else "eval", name), []).append(
                    rate(make, seconds))
    out = _rows(rows)
    if grain:
        out += grain_throughput(root, batch, size, seconds, min(repeats, 2), paths_only, rows)
    return out


def _rows(rows: dict) -> list[dict]:
    """Medians of the runs of each `(path, pipeline)`, and their ratios to the reference's."""
    out = []
    for (kind, name), runs in rows.items():
        ref = rows[(kind, "reference decode_and_crop")]
        wall, per_cpu = np.median([w for w, _ in runs]), np.median([c for _, c in runs])
        out.append({"path": kind, "pipeline": name, "img_per_s": float(wall),
                    "img_per_cpu_s": float(per_cpu),
                    "vs_reference": float(per_cpu / np.median([c for _, c in ref])),
                    "vs_reference_wall": float(wall / np.median([w for w, _ in ref])),
                    "runs": runs})
    return out


def grain_throughput(root: str, batch: int, size: int, seconds: float, repeats: int,
                     paths_only: tuple[str, ...], reference_rows: dict) -> list[dict]:
    """Grain's rows: each run in a fresh process of its own (a Grain iterator that followed
    another in one process stalled), its ratios to the reference's runs of this process."""
    rows = {}
    for _ in range(repeats):
        for kind in paths_only:
            for name, decoder in (("Grain + Pillow (2 workers)", "PillowDecode"),
                                  ("Grain + tljax decode (2 w.)", "TljaxDecode")):
                code = (f"import json, sys; sys.path.insert(0, {ROOT!r})\n"
                        "from scripts.benchmark_input import grain_child\n"
                        "if __name__ == '__main__':\n"
                        f"    print(json.dumps(grain_child({root!r}, {batch}, {size}, "
                        f"{seconds}, {kind!r}, {decoder!r})))\n")
                with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
                    f.write(code)
                child = subprocess.Popen([sys.executable, f.name], stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, text=True,
                                         start_new_session=True,
                                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
                try:
                    out, _ = child.communicate(timeout=120)
                    rows.setdefault((kind, name), []).append(
                        tuple(json.loads(out.strip().splitlines()[-1])))
                except (subprocess.TimeoutExpired, ValueError, IndexError):
                    print(f"{kind} {name}: no result (stalled or failed)", file=sys.stderr)
                finally:  # the child and any worker it left behind
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(child.pid, signal.SIGKILL)
                    os.remove(f.name)
    rows.update({k: v for k, v in reference_rows.items() if k[1].startswith("reference")})
    return [r for r in _rows(rows) if r["pipeline"].startswith("Grain")]


def grain_child(root: str, batch: int, size: int, seconds: float, kind: str,
                decoder: str) -> tuple[float, float]:
    """One Grain run (`grain_throughput`), in its own process: (images/s, per core)."""
    paths, labels = _paths_labels(root)
    train = kind == "train"
    p, y = (paths, labels) if train else (paths * 20, labels * 20)
    decode = {"PillowDecode": PillowDecode, "TljaxDecode": TljaxDecode}[decoder]
    # The warmup covers the workers' start (and their import of TensorFlow).
    return rate(functools.partial(grain_pipeline, p, y, batch, size, train, decode), seconds,
                warmup=8.0)


def quality(root: str, size: int, count: int) -> dict:
    """PSNR (dB) of each path's training crops against a Lanczos-5 antialiased resize of the
    fully decoded box it crops (tljax's box with its edges rounded to its DCT scale's grid),
    over `count` images x 3 boxes."""
    import tensorflow as tf

    from tljax.datasets import images

    paths, _ = _paths_labels(root)
    out: dict[str, list[float]] = {}
    for j, path in enumerate(paths[:count]):
        with open(path, "rb") as f:
            data = f.read()
        whole = tf.io.decode_jpeg(data, channels=3)
        for k in range(3):
            seed = tf.constant([j, k], tf.int64)
            begin, extent = images.random_box(tf.shape(whole), seed, (0.08, 1.0),
                                              (3 / 4, 4 / 3))
            top, left, h, w = (int(v) for v in (*begin[:2], *extent[:2]))
            r = max([x for x in (1, 2, 4, 8) if min(h, w) >= x * size], default=1)
            exact = tf.cast(whole[top:top + h, left:left + w], tf.float32)
            t0, l0 = (top + r // 2) // r * r, (left + r // 2) // r * r
            t1, l1 = (top + h + r // 2) // r * r, (left + w + r // 2) // r * r
            snapped = tf.cast(whole[t0:t1, l0:l1], tf.float32)
            cases = {
                "tljax": (images.train_image(data, size, seed, (0.08, 1.0)), snapped),
                "previous tljax": (tf.image.resize(exact, (size, size), antialias=True),
                                   exact),
                "reference decode_and_crop": (tf.image.resize(exact, (size, size)), exact),
            }
            for name, (got, box) in cases.items():
                truth = tf.round(tf.image.resize(box, (size, size), "lanczos5", antialias=True))
                got = tf.clip_by_value(tf.round(tf.cast(got, tf.float32)), 0.0, 255.0)
                mse = float(tf.reduce_mean((got - tf.clip_by_value(truth, 0.0, 255.0)) ** 2))
                out.setdefault(name, []).append(10 * np.log10(255.0**2 / max(mse, 1e-6)))
    return {k: float(np.mean(v)) for k, v in out.items()}


def first_batch(make_records, batch: int, size: int, steps=(0, 10**4, 10**6)) -> dict:
    """Seconds from opening the split (`make_records()`: for a split read into memory, that
    read) to the first batch of a run started at each of `steps`."""
    out = {}
    for s in steps:
        t = time.perf_counter()
        next(iter(tljax_pipeline(make_records(), batch, size, True, start_step=s)))
        out[str(s)] = time.perf_counter() - t
    return out


def prepare_tfds(root: str, data_dir: str, file_format: str = "array_record") -> str:
    """The folder as a TFDS dataset (`tfds build` of an ImageFolder-like builder): ArrayRecord,
    the way the README tells users to prepare large datasets, or TFRecord, TFDS's default."""
    import tensorflow_datasets as tfds

    paths, labels = _paths_labels(root)
    classes = sorted(os.listdir(root))

    class BenchFolderBase(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(), "label": tfds.features.ClassLabel(
                    names=classes)}), supervised_keys=("image", "label"))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, (p, k) in enumerate(zip(paths, labels, strict=True)):
                yield i, {"image": p, "label": k}

    # One registered name per format: `datasets.source` finds it by name.
    name = "BenchFolder" + "".join(w.title() for w in file_format.split("_"))
    builder = type(name, (BenchFolderBase,), {})(data_dir=data_dir, file_format=file_format)
    builder.download_and_prepare()
    return builder.name


def peak_rss_of_pass(root: str, budget_gb: float, batch: int, size: int, images: int) -> dict:
    """Peak RSS (MiB) of a child process that trains over `images` images of `root` with a
    cache budget of `budget_gb`: its VmHWM (`ru_maxrss` would carry the parent's, inherited
    through fork)."""
    code = (
        f"import sys, time; sys.path.insert(0, {ROOT!r})\n"
        "from scripts.benchmark_input import tljax_source, tljax_pipeline\n"
        f"recs = tljax_source({root!r}, {budget_gb!r})\n"
        f"it = tljax_pipeline(recs, {batch}, {size}, True); done = 0; t = time.perf_counter()\n"
        f"while done < {images}: done += len(next(it)['label'])\n"
        "rate = done / (time.perf_counter() - t)\n"
        "hwm = [int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmHWM')]\n"
        "print(recs.where, '|', rate, '|', hwm[0] / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    where, rate_, rss = out.stdout.strip().splitlines()[-1].split(" | ")
    return {"budget_gb": budget_gb, "read": where, "img_per_s": float(rate_),
            "peak_rss_mib": float(rss)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--quick", action="store_true", help="fewer images and one repeat (<2 min)")
    p.add_argument("--images", type=int, default=0, help="JPEGs in the folder (default 2000, "
                   "--quick 400)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=0, help="interleaved rounds (default 5, "
                   "--quick 1)")
    p.add_argument("--json", help="also write the figures here")
    a = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    n = a.images or (400 if a.quick else 2000)
    repeats = a.repeats or (1 if a.quick else 5)
    work = tempfile.mkdtemp(prefix="tljax_bench_input_")
    folder = os.path.join(work, "imagenet_like")
    t = time.perf_counter()
    size_bytes = make_folder(folder, n, (400, 520))
    print(f"made {n} ImageNet-like JPEGs ({size_bytes / 2**20:.0f} MiB) in "
          f"{time.perf_counter() - t:.0f} s; {os.cpu_count()} cores")
    results = {"cores": os.cpu_count(), "images": n, "batch": a.batch, "size": a.size}

    rows = throughput(folder, a.batch, a.size, 2.0 if a.quick else 4.0, repeats,
                      grain=not a.quick)
    results["throughput"] = rows
    print(f"\nbatch {a.batch}, {a.size}x{a.size}, median of {repeats} interleaved rounds; "
          f"per core: images per CPU-second of the process and its workers "
          f"({os.cpu_count()} cores)")
    print(f"{'path':6} {'pipeline':28} {'img/s':>7} {'per core':>9} {'vs ref':>7} "
          f"{'(wall)':>7}")
    for r in rows:
        print(f"{r['path']:6} {r['pipeline']:28} {r['img_per_s']:7.0f} "
              f"{r['img_per_cpu_s']:9.0f} {r['vs_reference']:6.2f}x "
              f"{r['vs_reference_wall']:6.2f}x")

    fb = {"folder (files)": first_batch(lambda: tljax_source(folder, 0.0), a.batch, a.size)}
    from tljax import datasets

    for fmt, label, budget in (("array_record", "TFDS ArrayRecord (from disk)", 0.0),
                               ("tfrecord", "TFDS TFRecord (read into memory)", 64.0)):
        data_dir = os.path.join(work, f"tfds_{fmt}")
        src = datasets.source(prepare_tfds(folder, data_dir, fmt), data_dir, download=False)
        fb[label] = first_batch(lambda src=src, budget=budget: src.records(
            "train", datasets.budget(budget)), a.batch, a.size)
    results["first_batch_s"] = fb
    print("\ntime to the first batch (s) of a run started at step:")
    print(f"{'':32} {'0':>8} {'10^4':>8} {'10^6':>8}")
    for k, v in fb.items():
        print(f"{k:32} {v['0']:8.2f} {v['10000']:8.2f} {v['1000000']:8.2f}")

    large = os.path.join(work, "large_photos")
    n_large = 60 if a.quick else 200
    large_bytes = make_folder(large, n_large, (2800, 3200), seed=1, quality=92)
    large_rows = throughput(large, 16, a.size, 2.0 if a.quick else 4.0, 1 if a.quick else 3,
                            ("train",))
    results["large_photos_throughput"] = large_rows
    print("\nlarge photos, training path, batch 16 (per core: images per CPU-second)")
    for r in large_rows:
        print(f"{r['pipeline']:28} {r['img_per_s']:7.0f} img/s {r['img_per_cpu_s']:7.0f} per core "
              f"{r['vs_reference']:6.2f}x")
    q = {"ImageNet-like": quality(folder, a.size, 20 if a.quick else 60),
         "large photos": quality(large, a.size, 10 if a.quick else 30)}
    results["quality_psnr_db"] = q
    print("\nquality: PSNR (dB) against Lanczos-5 of the fully decoded box")
    for k, v in q.items():
        print(f"{k:14} " + "  ".join(f"{n} {x:.1f}" for n, x in v.items()))
    budget = large_bytes / 4 / 2**30
    rss = [peak_rss_of_pass(large, budget, 16, a.size, n_large),
           peak_rss_of_pass(large, 64.0, 16, a.size, n_large)]
    results["large_photos"] = {"images": n_large, "encoded_mib": large_bytes / 2**20,
                               "runs": rss}
    print(f"\nlarge photos: {n_large} JPEGs ~3000x2250, {large_bytes / 2**20:.0f} MiB encoded")
    print(f"{'cache budget':>14} {'read':50} {'img/s':>7} {'peak RSS MiB':>13}")
    for r in rss:
        print(f"{r['budget_gb'] * 1024:10.0f} MiB {r['read'][:50]:50} {r['img_per_s']:7.0f} "
              f"{r['peak_rss_mib']:13.0f}")
    results["peak_rss_mib_self"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
