"""tljax as a library: a wheel built from the repository, installed into a fresh virtual
environment with the tested versions (constraints.txt), trains with the config that ships
inside the package, and `pip check` finds nothing to complain about."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest
from processes import ROOT

pytestmark = pytest.mark.slow


def run(cmd: list[str], **kwargs) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, **kwargs)
    assert out.returncode == 0, f"{' '.join(cmd)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


def test_a_wheel_installs_and_trains_with_its_packaged_config(tmp_path):
    import shutil

    # From a copy without build outputs, which could carry modules the tree no longer has.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "runs", "*.egg-info", "__pycache__", ".cache"))
    wheels = tmp_path / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(wheels),
         str(source)])
    (wheel,) = wheels.glob("tljax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for packaged in ("tljax/configs/finetune.py", "tljax/native/conv_cpu.cc",
                     "tljax/native/parallel_for.h", "tljax/datasets/resize_op.cc",
                     "tljax/data/imagenet_classes.tsv", "weights_conversion/__main__.py"):
        assert packaged in names, packaged
    assert not any(n.startswith(("tests/", "configs/")) for n in names)

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    python = str(venv / "bin" / "python")
    constraints = os.path.join(ROOT, "constraints.txt")
    run([python, "-m", "pip", "install", "--quiet", "-c", constraints, f"{wheel}[data]"])
    assert "No broken requirements found" in run([python, "-m", "pip", "check"])

    # Away from the repository, so that nothing but the installed package is imported.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env.update(HOME=str(tmp_path / "home"), TLJAX_CACHE=str(tmp_path / "cache"),
               TFDS_DATA_DIR=str(tmp_path / "tfds"))
    log = run([python, "-m", "tljax.train", "--config=finetune:init=scratch,steps=4",
               "--config.eval_every=4", "--config.log_every=2",
               f"--workdir={tmp_path / 'run'}"], cwd=str(tmp_path), env=env)
    assert "efficientnet_lite0 on digits (scratch" in log and "4 steps" in log, log[-3000:]
    site = run([python, "-c", "import tljax.configs, tljax.train; "
                "print(tljax.configs.__file__, tljax.train.__file__)"], cwd=str(tmp_path))
    assert str(venv) in site and ROOT not in site
