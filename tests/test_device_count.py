"""The same run on 1 device, on 8, and on 2 processes of 4: with the same seed and global batch
the training program trains on the same examples, crops and flips them the same way, draws
the same dropout and stochastic-depth masks for them, and so logs the same losses and ends
with the same eval loss (to 1e-5), whatever the hardware.

`test_efficientnet` at 32x32 on `digits`, its top three blocks training (stochastic depth in
the second block of stage 6, dropout before the head) with synchronised BatchNorm (so that
the batch statistics are those of the global batch), random crops and flips."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from processes import CONFIG, ROOT, config_module, finish, free_port

pytestmark = pytest.mark.xdist_group("device_count")
STEPS = 8
RTOL = 1e-5


def args(data_dir: str, workdir: str) -> list[str]:
    return [f"--config={CONFIG}:model=test_efficientnet,init=scratch,steps={STEPS},"
            "batch_size=16,freeze=top:3",
            "--config.image_size=32", f"--config.eval_every={STEPS}", "--config.log_every=2",
            f"--config.checkpoint_every={STEPS}", "--config.sync_bn=true",
            "--config.augment.flip=true", "--config.optimizer.learning_rate=0.05",
            f"--config.data_dir={data_dir}", f"--workdir={workdir}"]


def losses(workdir: str) -> dict:
    from tljax import metrics

    records = metrics.read(workdir)
    return {"train": [(r["step"], r["train/loss"]) for r in records if "train/loss" in r],
            "eval": [r["eval/loss"] for r in records if "eval/loss" in r]}


def assert_same_run(a: dict, b: dict) -> None:
    assert [s for s, _ in a["train"]] == [s for s, _ in b["train"]] == [2, 4, 6, 8]
    for (step, x), (_, y) in zip(a["train"], b["train"], strict=True):
        assert abs(x - y) <= RTOL * abs(x), (step, x, y)
    assert len(a["eval"]) == len(b["eval"]) == 1
    assert abs(a["eval"][0] - b["eval"][0]) <= RTOL * abs(a["eval"][0]), (a["eval"], b["eval"])


def cli(extra: list[str], devices: int):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return subprocess.Popen([sys.executable, "-m", "tljax.train", *extra], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def eight_devices(data_dir, tmp_path_factory):
    """The run in this process, on its 8 CPU devices."""
    import jax

    from tljax import train

    assert jax.device_count() == 8
    workdir = str(tmp_path_factory.mktemp("eight"))
    c = config_module().get_config(
        f"model=test_efficientnet,init=scratch,steps={STEPS},batch_size=16,freeze=top:3")
    c.image_size, c.eval_every, c.log_every, c.checkpoint_every = 32, STEPS, 2, STEPS
    c.sync_bn, c.augment.flip, c.optimizer.learning_rate = True, True, 0.05
    c.data_dir = data_dir
    train.train_and_evaluate(c, workdir)
    with open(os.path.join(workdir, "run.json")) as f:
        assert json.load(f)["devices"] == 8
    return losses(workdir)


def test_one_device_trains_as_eight(eight_devices, data_dir, tmp_path):
    workdir = str(tmp_path / "one")
    log = finish([cli(args(data_dir, workdir), 1)])[0]
    assert "1 device(s) in 1 process(es)" in log
    assert_same_run(losses(workdir), eight_devices)


def test_two_processes_of_four_devices_train_as_eight(eight_devices, data_dir, tmp_path):
    port = free_port()
    workdir = str(tmp_path / "two")
    logs = finish([cli([*args(data_dir, workdir), "--distributed",
                        f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                        f"--process_id={i}"], 4) for i in range(2)])
    assert "8 device(s) in 2 process(es)" in logs[0]
    assert_same_run(losses(workdir), eight_devices)
