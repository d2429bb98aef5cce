"""Helpers of the tests that run the training program: its config file as a module, and
subprocesses (one per host of a multi-process run) waited for and never left behind."""

from __future__ import annotations

import importlib.util
import os
import socket

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "finetune.py")


def config_module():
    """configs/finetune.py, imported."""
    spec = importlib.util.spec_from_file_location("finetune_config", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finish(procs, timeout: float = 600) -> list[str]:
    """The output of each process; every one must exit 0 (else its last lines are shown)."""
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:  # never leave a process behind
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    return logs
