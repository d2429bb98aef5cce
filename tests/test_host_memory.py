"""tljax's programs make glibc keep freed memory for XLA:CPU (tljax/host_memory.py) where JAX
computes on the CPU, and leave the allocator alone when told to or when an accelerator will
compute; `import tljax` changes nothing. Each case runs in a fresh interpreter: the setting is
made once, before anything allocates."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")


# The training program's start, up to its --help: the policy is set before it parses flags.
_PROGRAM = """
import runpy, sys
sys.argv = ["tljax.train", "--help"]
try:
    runpy.run_module("tljax.train", run_name="__main__")
except SystemExit:
    pass
import tljax.host_memory as h
print(h.state())
"""


def state_after_import(code: str = _PROGRAM, **env) -> str:
    full = {k: v for k, v in os.environ.items()
            if k not in ("TLJAX_KEEP_FREED_MEMORY", "JAX_PLATFORMS")}
    full.update(env)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=full, timeout=120, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_import_tljax_sets_nothing():
    """A library import leaves the process's allocator as it found it."""
    code = ("import tljax, tljax.models, tljax.train, tljax.host_memory as h\n"
            "print(h.state())\n")
    assert state_after_import(code, JAX_PLATFORMS="cpu") == "not attempted"


def test_on_for_cpu_computation():
    assert state_after_import(JAX_PLATFORMS="cpu") == "on (glibc keeps freed memory)"


def test_opt_out():
    assert state_after_import(TLJAX_KEEP_FREED_MEMORY="0") == "off (TLJAX_KEEP_FREED_MEMORY=0)"


def test_left_alone_for_accelerators():
    assert state_after_import(JAX_PLATFORMS="cuda,cpu") == \
        "off (JAX computes on an accelerator)"


def test_heap_is_never_trimmed():
    """A freed block above glibc's largest positive trim threshold (2 GiB) stays in the heap:
    the threshold is -1, "never". Its pages are never touched, so nothing becomes resident."""
    code = ("import ctypes, tljax.host_memory as h\n"
            "h.keep_freed_memory()\n"
            "libc = ctypes.CDLL(None)\n"
            "libc.malloc.restype = libc.sbrk.restype = ctypes.c_void_p\n"
            "libc.malloc.argtypes, libc.free.argtypes = [ctypes.c_size_t], [ctypes.c_void_p]\n"
            "libc.sbrk.argtypes = [ctypes.c_ssize_t]\n"
            "p = libc.malloc(5 << 29)\n"
            "top = libc.sbrk(0)\n"
            "libc.free(p)\n"
            "print(h.state(), p is not None, libc.sbrk(0) == top)\n")
    env = {k: v for k, v in os.environ.items() if k != "TLJAX_KEEP_FREED_MEMORY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(env, JAX_PLATFORMS="cpu"), timeout=120, check=True)
    assert out.stdout.split("\n")[0] == "on (glibc keeps freed memory) True True"
