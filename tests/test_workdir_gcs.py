"""A training run whose workdir is a `gs://` bucket (a GCS emulator on 127.0.0.1): killed with
SIGKILL, resumed from the bucket, bitwise equal to an uninterrupted local run; nothing local
named `gs:`."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from gcs import environment, forget_listings
from processes import CONFIG, ROOT, config_module
from test_train import (
    STEPS,
    final_params,
    kill_after_first_checkpoint,
    run_cli,
    tiny_args,
    tiny_config,
)

from tljax import storage

pytestmark = pytest.mark.xdist_group("gcs")  # as tests/test_storage.py: the same worker


def bucket_checkpoints(workdir: str) -> list[int]:
    """The finished checkpoints in the bucket (Orbax marks a gs:// one with
    `commit_success.txt`), as another host sees them."""
    from tljax import checkpoint

    forget_listings()
    d = storage.join(workdir, "checkpoints")
    return checkpoint.steps_in(d) if storage.exists(d) else []


def test_killed_run_resumes_from_the_bucket(gcs, gcs_server, data_dir, tmp_path):
    from tljax import metrics, train

    reference = str(tmp_path / "local")
    train.train_and_evaluate(tiny_config(data_dir), reference)

    workdir = storage.join(gcs, "runs", "killed")
    args = tiny_args(data_dir) + [f"--workdir={workdir}"]
    env = environment(gcs_server)
    first = kill_after_first_checkpoint([run_cli(args, env_extra=env, wait=False)], workdir,
                                        bucket_checkpoints, logged=5)

    done = run_cli(args, env_extra=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    forget_listings()
    assert f"resuming from {workdir}/checkpoints/{max(first)}" in done.stderr
    a, b = final_params(reference), final_params(workdir)
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    summary = json.loads(storage.read_text(storage.join(workdir, "summary.json")))
    assert summary["workdir"] == workdir and summary["plot"] == f"{workdir}/curves.png"
    assert storage.read_bytes(summary["plot"])[:8] == b"\x89PNG\r\n\x1a\n"
    steps = [r["step"] for r in metrics.read(workdir) if "train/loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS
    assert not os.path.exists(os.path.join(ROOT, "gs:")) and not os.path.exists("gs:")

    out = run_cli(["--workdir", workdir, "--checkpoint", "latest", "--json"], env_extra=env,
                  module="tljax.evaluate")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["step"] == STEPS and result["top1"] == pytest.approx(summary["top1"], abs=1e-6)


def images_and_weights(bucket: str, model: str = "test_resnet") -> tuple[str, str]:
    """`(folder, converted)` in the bucket: 100 digits as 32x32 PNGs, one folder per class,
    and a weights directory of `model` (as `weights_conversion` writes), made once."""
    import io

    from PIL import Image
    from sklearn.datasets import load_digits

    from tljax import pretrained, weights
    from tljax.models import registry

    folder, converted = storage.join(bucket, "digits"), storage.join(bucket, model)
    if storage.exists(storage.join(converted, weights.store.RECORD)):
        return folder, converted
    digits = load_digits()
    for i in range(100 if not storage.exists(storage.join(folder, "d0", "0.png")) else 0):
        image = np.kron(digits.images[i] * 255 / 16, np.ones((4, 4))).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(np.stack([image] * 3, -1)).save(buf, "PNG")
        storage.write_bytes(storage.join(folder, f"d{digits.target[i]}", f"{i}.png"),
                            buf.getvalue())
    module = registry.create(model, num_classes=10)
    variables = pretrained.variables(module, model, None, 32, seed=7, num_classes=10)
    weights.save(converted, variables, {"model": model,
                                        "options": {"include_top": True, "num_classes": 10}})
    return folder, converted


def bucket_args(data_dir: str, folder: str, converted: str, steps: int = STEPS) -> list[str]:
    return tiny_args(data_dir, steps) + [f"--config.dataset=folder:{folder}",
                                         f"--config.init={converted}"]


def test_data_weights_and_workdir_all_in_the_bucket(gcs, gcs_server, data_dir):
    """`dataset=folder:gs://...` trains from `init=gs://...` (converted weights) into a
    `gs://` workdir."""
    folder, converted = images_and_weights(gcs)
    workdir = storage.join(gcs, "runs", "all_in_bucket")
    done = run_cli(bucket_args(data_dir, folder, converted, steps=4) + [f"--workdir={workdir}"],
                   env_extra=environment(gcs_server))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"init: {converted} (" in done.stderr
    assert f"test_resnet on folder:{folder}: 10 classes" in done.stderr
    forget_listings()
    summary = json.loads(storage.read_text(storage.join(workdir, "summary.json")))
    assert summary["steps"] == 4 and 0.0 <= summary["top1"] <= 1.0


@pytest.mark.slow
def test_two_hosts_that_share_only_the_bucket(gcs, gcs_server, tmp_path):
    """2 processes x 4 CPU devices, each with its own home and temporary folder, the data, the
    weights and the workdir in the bucket: killed after the first checkpoint, resumed, and
    ending with the eval loss of the same run in one process of 8 devices."""
    import subprocess
    import sys

    from processes import finish, free_port

    from tljax import metrics, train

    # The run of tests/test_device_count.py, which two processes train as one (to 1e-5).
    folder, converted = images_and_weights(gcs, "test_efficientnet")
    config = config_module().get_config(
        f"model=test_efficientnet,steps={STEPS},batch_size=16,freeze=top:3")
    config.image_size, config.eval_every, config.log_every, config.checkpoint_every = 32, 6, 2, 4
    config.sync_bn, config.augment.flip, config.optimizer.learning_rate = True, True, 0.05
    config.dataset, config.init = f"folder:{folder}", converted
    reference = storage.join(gcs, "runs", "one_process")
    train.train_and_evaluate(config, reference)
    args = [f"--config={CONFIG}:model=test_efficientnet,steps={STEPS},batch_size=16,"
            "freeze=top:3", "--config.image_size=32", "--config.eval_every=6",
            "--config.log_every=2", "--config.checkpoint_every=4", "--config.sync_bn=true",
            "--config.augment.flip=true", "--config.optimizer.learning_rate=0.05",
            f"--config.dataset=folder:{folder}", f"--config.init={converted}"]

    workdir = storage.join(gcs, "runs", "two_hosts")
    port = free_port()

    def start():
        procs = []
        for i in range(2):
            home, tmp = tmp_path / f"host{i}" / "home", tmp_path / f"host{i}" / "tmp"
            home.mkdir(parents=True, exist_ok=True)
            tmp.mkdir(parents=True, exist_ok=True)
            env = {k: v for k, v in os.environ.items()
                   if k not in ("XLA_FLAGS", "TLJAX_CACHE", "TLJAX_NATIVE_CACHE")}
            env.update(environment(gcs_server), HOME=str(home), TMPDIR=str(tmp),
                       XLA_FLAGS="--xla_force_host_platform_device_count=4")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "tljax.train", *args, f"--workdir={workdir}",
                 "--distributed",
                 f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                 f"--process_id={i}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True))
        return procs

    first = kill_after_first_checkpoint(start(), workdir, bucket_checkpoints)
    logs = finish(start())
    assert f"resuming from {workdir}/checkpoints/{max(first)}" in logs[0]
    assert "8 device(s) in 2 process(es)" in logs[0]
    forget_listings()
    assert bucket_checkpoints(workdir)[-1] == STEPS
    eval_loss = [[r["eval/loss"] for r in metrics.read(w) if "eval/loss" in r]
                 for w in (reference, workdir)]
    assert len(eval_loss[0]) == len(eval_loss[1]) == 2
    assert eval_loss[1] == pytest.approx(eval_loss[0], rel=1e-5)
    for i in range(2):  # each host's scratch (compiled programs) in its own home
        assert (tmp_path / f"host{i}" / "home" / ".cache" / "tljax" / "xla").is_dir()
    assert not os.path.exists(os.path.join(ROOT, "gs:"))
