"""Object storage (`gs://`) through `tljax.storage`, against a GCS emulator on 127.0.0.1."""

from __future__ import annotations

import os

import numpy as np
import pytest

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


@pytest.mark.parametrize("field, value", [("init", "gs://b/converted"),
                                          ("dataset", "folder:gs://b/images"),
                                          ("data_dir", "gs://b/tfds")])
def test_data_and_weights_in_object_storage_are_refused_with_what_to_do(field, value):
    from processes import config_module

    from tljax import run

    config = config_module().get_config()
    config[field] = value
    with pytest.raises(run.RunError, match=f"config.{field}=.*gcsfuse"):
        run.resolve(config)
