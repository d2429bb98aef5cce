"""Host memory that XLA:CPU can reuse from one step to the next: a process-wide allocator
policy that tljax's programs set for themselves, and that library users opt into.

XLA:CPU takes each program's buffers from the C library's `malloc`. glibc serves large blocks
with fresh `mmap`s (in each thread's own arena) and unmaps them when freed, so every step of a
training loop page-faults its whole working set in again, at a fraction of the memory
bandwidth (docs/performance.md has the figures).

`keep_freed_memory()` makes glibc keep it: one arena for all threads, no `mmap` for large
blocks, no trimming of the heap (`M_TRIM_THRESHOLD` -1, which glibc reads as "never": the
largest positive threshold, 2 GiB, still trims the heap of a large model's step). The
process's resident memory then stays at its high-water mark, as a caching allocator's does
(PyTorch's, or XLA's own on GPUs). It only works before the threads that allocate exist, so
the programs (`python -m tljax.train`, `tljax.evaluate`, `tljax.demo`, the benchmark's
worker) call it first thing; `import tljax` does not. A script or notebook opts in with

    from tljax import host_memory
    host_memory.keep_freed_memory()  # before importing JAX

It acts on Linux with glibc when JAX will compute on the CPU (no GPU or TPU plugin installed,
or `JAX_PLATFORMS=cpu`); `TLJAX_KEEP_FREED_MEMORY=0` in the environment turns it off.
`state()` says what was done, for run records.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import pkgutil
import sys

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8

_state = "not attempted"


def _cpu_compute_expected() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0] == "cpu"
    if importlib.util.find_spec("libtpu") is not None:
        return False
    spec = importlib.util.find_spec("jax_plugins")
    if spec is not None and spec.submodule_search_locations:
        return not any(True for _ in pkgutil.iter_modules(spec.submodule_search_locations))
    return True


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse (see the module docstring). Returns
    whether it did."""
    global _state
    if os.environ.get("TLJAX_KEEP_FREED_MEMORY", "1") == "0":
        _state = "off (TLJAX_KEEP_FREED_MEMORY=0)"
        return False
    if not _cpu_compute_expected():
        _state = "off (JAX computes on an accelerator)"
        return False
    if not sys.platform.startswith("linux"):
        _state = f"off (not Linux: {sys.platform})"
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        _state = "off (the C library is not glibc)"
        return False
    ok = (mallopt(_M_ARENA_MAX, 1) == 1 and mallopt(_M_MMAP_MAX, 0) == 1
          and mallopt(_M_TRIM_THRESHOLD, -1) == 1)
    _state = "on (glibc keeps freed memory)" if ok else "off (mallopt refused)"
    return ok


def state() -> str:
    return _state
