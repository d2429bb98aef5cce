"""CPU kernels that XLA:CPU runs slowly, written in C++ as XLA FFI custom calls (`jax.ffi`).

`build.library()` compiles them on first use (g++ -O3 -march=native, or the target named by
`TLJAX_NATIVE_MARCH`; a few seconds) into a per-machine cache and registers them with JAX;
without a C++ compiler, or with `TLJAX_NATIVE=0`, the models fall back to their pure-JAX form
(`tljax.models.layers`), with the same numbers and slower training. Built without AVX-512,
the library has no direct convolution nor 1x1 product (`conv.direct_available()`), and the
layers run XLA's convolutions and dots there. `depthwise` holds the depthwise convolution and its
gradients, `batchnorm` training BatchNorm with the activation that follows it, `conv` a direct
convolution (forward and kernel gradient, AVX-512) with the flipped, transposed kernel of its
input gradient (and a matrix transpose that XLA cannot fold into the product before it), `pool`
max pooling and its gradient.
"""
