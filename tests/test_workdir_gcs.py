"""A training run whose workdir is a `gs://` bucket (a GCS emulator on 127.0.0.1): killed with
SIGKILL, resumed from the bucket, bitwise equal to an uninterrupted local run; nothing local
named `gs:`."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
from gcs import environment, forget_listings
from processes import ROOT
from test_train import STEPS, final_params, run_cli, tiny_args, tiny_config, wait_for

from tljax import storage

pytestmark = pytest.mark.xdist_group("gcs")  # as tests/test_storage.py: the same worker


def bucket_checkpoints(workdir: str) -> list[int]:
    forget_listings()
    d = storage.path(storage.join(workdir, "checkpoints"))
    if not d.exists():
        return []
    # Orbax writes a gs:// checkpoint in place and marks it complete with this file.
    return sorted(int(p.name) for p in d.iterdir()
                  if p.name.isdigit() and (p / "commit_success.txt").exists())


def test_killed_run_resumes_from_the_bucket(gcs, gcs_server, data_dir, tmp_path):
    from tljax import metrics, train

    reference = str(tmp_path / "local")
    train.train_and_evaluate(tiny_config(data_dir), reference)

    workdir = storage.join(gcs, "runs", "killed")
    args = tiny_args(data_dir) + [f"--workdir={workdir}"]
    env = environment(gcs_server)
    proc = run_cli(args, env_extra=env, wait=False)
    wait_for(lambda: bucket_checkpoints(workdir) and max(
        [r["step"] for r in metrics.read(workdir) if "train/loss" in r] or [0]) >= 5, proc,
        what="the first checkpoint in the bucket")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = bucket_checkpoints(workdir)
    assert first and max(first) < STEPS

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
