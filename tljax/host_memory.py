"""Host memory that XLA:CPU can reuse from one step to the next.

XLA:CPU takes each program's buffers from the C library's `malloc`. glibc serves large blocks
with fresh `mmap`s (in each thread's own arena) and unmaps them when freed, so every step of a
training loop page-faults its whole working set in again: on the 2-core test machine an
elementwise pass over 64 MB ran at 2.5 GB/s with a fresh output buffer against 17 GB/s with a
reused one, and in `scripts/benchmark.py --quick` (112x112, batch 16) the EfficientNet-B0 full
fine-tune step went from 14.4 to 20.5 images/s and its inference from 141 to 203 when freed
memory was kept (docs/benchmarks.md).

`keep_freed_memory()` makes glibc keep it: one arena for all threads, no `mmap` for large
blocks, no trimming of the heap (`M_TRIM_THRESHOLD` -1, which glibc reads as "never"; the
largest positive threshold, 2 GiB, still trimmed ResNet50's heap at 224x224, whose full step
uses ~1.8 GB of temporaries: 440-460 thousand page faults, +300-400 ms, in 1-3 of the 12
steps after the first two, against none with -1; docs/benchmarks.md). The process's
resident memory then stays at its high-water mark, as a caching allocator's does (PyTorch's,
or XLA's own on GPUs). It only works when called before the threads that allocate exist, so
`import tljax` calls it, on Linux with glibc when JAX will compute on the CPU (no GPU or TPU
plugin installed, or `JAX_PLATFORMS=cpu`). Opt out with `TLJAX_KEEP_FREED_MEMORY=0` in the
environment. `state()` says what was done, for run records.
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
