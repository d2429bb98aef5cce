"""tljax: transfer learning for computer vision in JAX/Flax."""

from tljax import host_memory as _host_memory

__version__ = "0.1.0"

# Before any thread of XLA or TensorFlow allocates: let XLA:CPU reuse freed host memory from step
# to step instead of page-faulting it in again (tljax/host_memory.py; CPU-only installs).
_host_memory.keep_freed_memory()
