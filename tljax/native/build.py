"""Compile, cache and register the C++ CPU kernels of `tljax.native` (XLA FFI custom calls).

The shared library is built once per source, compiler, machine and jaxlib version, from
the `.cc` and `.h` files beside this file, with the FFI headers that jaxlib ships
(`jax.ffi.include_dir()`), into `$TLJAX_NATIVE_CACHE` (default `~/.cache/tljax/native`).
It is compiled for the instruction set of the machine that builds it (`-march=native`), so
the key includes what that flag means here (a cluster's shared home with different CPUs gets
one library per CPU kind). `TLJAX_NATIVE_MARCH` names another target: `x86-64-v3` (AVX2 and
FMA, no AVX-512) builds what a CPU without AVX-512 runs, the kernels' other path, which a
machine with AVX-512 can then test (`.ci/run` does).
Concurrent processes (the hosts of a pod, the workers of a test run) may build at once: each
writes its own temporary file and renames it into place.

`compile_library` and `cache_key` also build the input pipeline's TensorFlow op
(`tljax.datasets.resize`) into the same cache.

`python -m tljax.native.build` builds ahead of time and prints the library's path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

import jax
import jax.numpy as jnp

from tljax.varying import vary_as

SOURCES = ("depthwise_cpu.cc", "batchnorm_cpu.cc", "conv_cpu.cc", "pool_cpu.cc")
HEADERS = ("parallel_for.h",)
# (FFI target name, exported symbol) registered for the CPU platform.
TARGETS = (
    ("tljax_depthwise_forward", "TljaxDepthwiseForward"),
    ("tljax_depthwise_input_grad", "TljaxDepthwiseInputGrad"),
    ("tljax_depthwise_kernel_grad", "TljaxDepthwiseKernelGrad"),
    ("tljax_batchnorm_forward", "TljaxBatchNormForward"),
    ("tljax_batchnorm_backward", "TljaxBatchNormBackward"),
    ("tljax_flip_transpose", "TljaxFlipTranspose"),
    ("tljax_conv_forward", "TljaxConvForward"),
    ("tljax_matmul", "TljaxMatmul"),
    ("tljax_matmul_bn", "TljaxMatmulBatchNorm"),
    ("tljax_matmul_bn_add", "TljaxMatmulBatchNormAdd"),
    ("tljax_conv_kernel_grad", "TljaxConvKernelGrad"),
    ("tljax_max_pool_forward", "TljaxMaxPoolForward"),
    ("tljax_max_pool_backward", "TljaxMaxPoolBackward"),
)
FLAGS = ("-O3", "-std=c++20", "-shared", "-fPIC", "-fno-math-errno",
         "-fno-trapping-math", "-w")


class BuildError(RuntimeError):
    """The C++ kernels could not be compiled or loaded."""


def cache_dir() -> str:
    return os.environ.get("TLJAX_NATIVE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "tljax", "native")


def march() -> str:
    """The `-march` target the kernels are compiled for: `$TLJAX_NATIVE_MARCH`, default
    `native` (this CPU's instruction set)."""
    return os.environ.get("TLJAX_NATIVE_MARCH", "").strip() or "native"


def cpu_isa() -> str:
    """This CPU's widest x86 vector instruction set, 'AVX-512' or 'AVX2' (else the machine's
    name): the kernels' path depends on it, with AVX-512 they have the direct convolution and
    product (`conv.direct_available()`)."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else platform.machine()


def compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise BuildError("no C++ compiler found (set $CXX, or install g++: "
                         "`apt install g++`)")
    return cxx


def compiler_output(cxx: str, *args: str, hint: str = "") -> bytes:
    """What the compiler `cxx` prints for `args` (its version, its predefined macros): part of
    a library's cache key. Raises `BuildError` (with `hint`) when it fails."""
    try:
        done = subprocess.run([cxx, *args], capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"could not run the C++ compiler {cxx!r}: {e}") from e
    if done.returncode != 0:
        raise BuildError(f"the C++ compiler {cxx!r} refused `{' '.join(args)}`{hint}:\n"
                         f"{done.stderr.decode(errors='replace')[-1000:]}")
    return done.stdout


def cache_key(cxx: str, files, flags, *extra: bytes) -> str:
    """A hash of the contents of `files`, the `flags`, the compiler's version and `extra`."""
    h = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            h.update(f.read())
    h.update(" ".join(flags).encode())
    h.update(compiler_output(cxx, "--version"))
    for e in extra:
        h.update(e)
    return h.hexdigest()[:16]


def compile_library(cxx: str, name: str, sources, flags, key: str, what: str) -> str:
    """The path of shared library `name` compiled from `sources` with `flags`, in the cache
    folder `key`, building it there if it is not there yet (`what` names it in errors)."""
    out_dir = os.path.join(cache_dir(), key)
    path = os.path.join(out_dir, name)
    if os.path.exists(path):
        return path
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
    except OSError as e:
        raise BuildError(f"cannot write tljax's kernel cache {out_dir} ({e}); set "
                         "TLJAX_NATIVE_CACHE to a writable folder") from e
    cmd = [cxx, *sources, *flags, "-o", tmp]
    try:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as e:
            raise BuildError(f"compiling {what} failed:\n  {' '.join(cmd)}\n{e}") from e
        if done.returncode != 0:
            raise BuildError(f"compiling {what} failed:\n  {' '.join(cmd)}\n"
                             f"{done.stderr[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def build() -> str:
    """The path of the compiled library, building it if this machine has none yet. Its key:
    the sources, flags, the compiler and what the `-march` target (`march()`) means to it on
    this CPU (the macros it predefines, `__AVX512F__` among them), jaxlib's version."""
    import jaxlib

    cxx = compiler()
    here = os.path.dirname(__file__)
    flags = [*FLAGS, f"-march={march()}", "-I", jax.ffi.include_dir(), "-I", here]
    hint = (f" (TLJAX_NATIVE_MARCH={march()} names a target it does not know: try native, "
            "x86-64-v3 or x86-64-v4, or unset it)" if march() != "native" else "")
    target = compiler_output(cxx, f"-march={march()}", "-E", "-dM", "-x", "c++", os.devnull,
                             hint=hint)
    key = cache_key(cxx, [os.path.join(here, n) for n in SOURCES + HEADERS], FLAGS,
                    jaxlib.__version__.encode(), target)
    return compile_library(cxx, "libtljax_cpu.so", [os.path.join(here, n) for n in SOURCES],
                           flags, key, "tljax's CPU kernels")


def call(target: str, shapes, *args, **attributes) -> list:
    """Run the FFI target `target` (registering the kernels first) on float32 `args`, with
    results of the float32 `shapes`; each result varies along the same devices as `args[0]`
    inside `jax.shard_map(check_vma=True)` (a custom call's results carry no varying axes of
    their own). `attributes` go to the handler as named XLA FFI attributes."""
    library()
    outs = jax.ffi.ffi_call(target, [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes],
                            vmap_method="sequential")(*args, **attributes)
    return [vary_as(out, args[0]) for out in outs]


@functools.cache
def library() -> ctypes.CDLL:
    """Build (once per machine) and load the kernels, and register them as XLA FFI targets for
    the CPU platform. Raises `BuildError`."""
    path = build()
    try:
        lib = ctypes.CDLL(path)
        for target, symbol in TARGETS:
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                        platform="cpu")
    except (OSError, AttributeError) as e:
        raise BuildError(f"loading {path} failed ({e}); delete it to rebuild") from e
    return lib


@functools.cache
def available() -> bool:
    """Whether the kernels are built (building them the first time); when they cannot be,
    warns once with the reason and returns False, and the CPU engine uses its pure-JAX
    rewrites."""
    try:
        library()
    except BuildError as e:
        warnings.warn(f"{e}\ntljax falls back to its pure-JAX rewrites (depthwise convolutions, "
                      "training BatchNorm, convolutions, max pooling): the same numbers, slower "
                      "training on CPU. Set TLJAX_CPU_ENGINE=jax to silence this.",
                      RuntimeWarning, stacklevel=2)
        return False
    return True


if __name__ == "__main__":
    try:
        print(build())
    except BuildError as e:
        sys.exit(str(e))
