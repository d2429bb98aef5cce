"""CPU kernels that XLA:CPU runs slowly, written in C++ as XLA FFI custom calls (`jax.ffi`).

`build.library()` compiles them on first use (g++ -O3 -march=native, or the target named by
`TLJAX_NATIVE_MARCH`; a few seconds) into a per-machine cache and registers them with JAX. The
CPU engine (`tljax.cpu`) is their only caller: without a C++ compiler, or with
`TLJAX_CPU_ENGINE=jax`, it uses its pure-JAX rewrites, with the same numbers. Built without
AVX-512, the library has no direct convolution nor 1x1 product (`conv.direct_available()`), and
the engine runs XLA's convolutions and dots there. `depthwise` holds the depthwise convolution
and its gradients, `batchnorm` training BatchNorm with the activation that follows it, `conv` a
direct convolution (forward and kernel gradient, AVX-512) with the flipped, transposed kernel
of its input gradient (and a matrix transpose that XLA cannot fold into the product before it),
`pool` max pooling and its gradient.
"""
