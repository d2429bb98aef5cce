"""tljax's hand-written gradients (`jax.custom_vjp`) inside `jax.shard_map(check_vma=True)`,
JAX's default, on every path a CPU can take: the C++ kernels as this machine built them, the
C++ kernels with the layers choosing as if the AVX-512 ones (direct convolution, product) were
missing, the pure-JAX rewrites (`TLJAX_CPU_ENGINE=jax`, or no compiler) and XLA's own ops
(`TLJAX_CPU_ENGINE=xla`, as on accelerators). Each replicated parameter's gradient must be
the sum of the devices' per-shard gradients, as autodiff gives for flax's own layers
(`tljax.varying`). The library built for a CPU with AVX2 only is tested as a whole by
`scripts/test.sh --kernels avx2`, which runs this file too."""

from __future__ import annotations

import contextlib
import importlib
import pkgutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import tljax.cpu
import tljax.native
from tljax import cpu
from tljax.models import layers
from tljax.native import build
from tljax.native import conv as native_conv

FORMS = ("cpp", "cpp_without_avx512", "pure_jax", "plain_xla")


@contextlib.contextmanager
def _form(name: str, monkeypatch):
    """Trace the layers on path `name` within this block; skips the paths this machine lacks."""
    if name in ("cpp", "cpp_without_avx512") and not build.available():
        pytest.skip("the C++ kernels are off (TLJAX_CPU_ENGINE=jax) or could not be built")
    if name == "cpp_without_avx512":
        if not native_conv.direct_available():
            pytest.skip("the C++ kernels were built without AVX-512 (this CPU, or "
                        "TLJAX_NATIVE_MARCH): 'cpp' is already that path")
        monkeypatch.setattr(native_conv, "direct_available", lambda: False)
    engine = {"pure_jax": "jax", "plain_xla": "xla"}.get(name, "native")
    with cpu.engine_scope(engine):
        yield


class _Fn(nn.Module):
    """A layer without parameters, as a module."""
    fn: object

    def __call__(self, x):
        return self.fn(x)


class _ConvBN(nn.Module):
    """`layers.conv_norm` in inference mode (folded into the C++ product where it is built), a
    1x1 convolution to 24 channels; with `residual`, ResNet's last layer of a block."""
    activation: object
    residual: bool = False

    @nn.compact
    def __call__(self, x):
        conv = layers.Conv(24, (1, 1), use_bias=self.residual, name="conv")
        norm = layers.BatchNorm(use_running_average=None, epsilon=1e-3, use_fast_variance=False,
                                activation=None if self.residual else self.activation)
        if self.residual:
            return layers.conv_norm(conv, norm, x, shortcut=x[..., :24] * 2,
                                    activation=self.activation)
        return layers.conv_norm(conv, norm, x)


def _train_bn(**options):
    return layers.BatchNorm(use_running_average=None, training=True, use_fast_variance=False,
                            **options)


# (input channels, the layer): every layer with a hand-written gradient on some path.
LAYERS = {
    "depthwise_3x3_s2": (5, lambda: layers.DepthwiseConv(3, 2)),
    "depthwise_5x5": (5, lambda: layers.DepthwiseConv(5, 1)),
    "pointwise_expand": (5, lambda: layers.Conv(6, (1, 1))),
    "pointwise_reduce_narrow": (12, lambda: layers.Conv(5, (1, 1))),  # dk transposed in C++
    "pointwise_reduce_64": (96, lambda: layers.Conv(64, (1, 1))),  # the direct dk (AVX-512)
    "conv_3x3": (5, lambda: layers.Conv(6, (3, 3))),
    "conv_3x3_s2": (5, lambda: layers.Conv(6, (3, 3), strides=2)),
    "max_pool_3_s2": (5, lambda: _Fn(lambda x: layers.max_pool(x, 3, 2))),  # C++ where built
    "max_pool_2_s2": (5, lambda: _Fn(lambda x: layers.max_pool(x, 2, 2))),  # shifted maxima
    "avg_pool_3": (5, lambda: _Fn(lambda x: layers.avg_pool_same(x, 3))),
    "batchnorm_train_relu": (5, lambda: _train_bn(activation=jax.nn.relu)),
    "batchnorm_train_no_scale": (5, lambda: _train_bn(use_scale=False)),  # InceptionV3's
    "conv_bn_inference": (40, lambda: _ConvBN(jax.nn.silu)),
    "conv_bn_residual": (40, lambda: _ConvBN(jax.nn.relu, residual=True)),
}


def _close(a, b, rtol=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= rtol * max(np.abs(b).max(), 1e-6)


def _setup(layer: str, n: int):
    channels, make = LAYERS[layer]
    module = make()
    x = jax.random.normal(jax.random.key(0), (2 * n, 9, 9, channels))
    v = module.init(jax.random.key(1), x[:2])
    # Moving statistics away from (0, 1), so that an inference BatchNorm does something.
    v = jax.tree.map(lambda a: a + jax.random.uniform(jax.random.key(2), a.shape), v)
    params, rest = v.get("params", {}), {k: val for k, val in v.items() if k != "params"}

    def shard_loss(p, xs):
        out = module.apply({"params": p, **rest}, xs, mutable=list(rest))[0] if rest else \
            module.apply({"params": p}, xs)
        return jnp.sum(jnp.sin(out))

    return module, x, params, shard_loss


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("layer", LAYERS)
def test_gradients_under_shard_map_with_check_vma(layer, form, monkeypatch):
    """The gradients of the parameters (summed over devices) and of the input (per device)
    inside `jax.shard_map(check_vma=True)` equal those of the layer run on each shard alone."""
    n = 4
    devices = jax.devices()[:n]
    if len(devices) < n:
        pytest.skip("needs 4 devices (tests/conftest.py sets 8 CPU devices)")
    mesh = jax.make_mesh((n,), ("b",), devices=devices)
    with _form(form, monkeypatch):
        _, x, params, shard_loss = _setup(layer, n)

        def total(p, x):
            return jax.lax.psum(shard_loss(p, x), "b")

        grad = jax.grad(jax.shard_map(total, mesh=mesh, in_specs=(P(), P("b")), out_specs=P(),
                                      check_vma=True), argnums=(0, 1))
        got_p, got_x = jax.jit(grad)(jax.device_put(params, NamedSharding(mesh, P())),
                                     jax.device_put(x, NamedSharding(mesh, P("b"))))
        shard_grad = jax.jit(jax.grad(shard_loss, argnums=(0, 1)))
        per_shard = [shard_grad(params, xs) for xs in jnp.split(x, n)]
    want_p = jax.tree.map(lambda *g: sum(g), *[g for g, _ in per_shard])
    jax.tree.map(_close, got_p, want_p)
    _close(got_x, jnp.concatenate([g for _, g in per_shard]))


def _custom_gradients(jaxpr) -> set:
    """The backward functions of the `custom_vjp` calls in `jaxpr` and its sub-jaxprs."""
    found = set()
    for e in jaxpr.eqns:
        if e.primitive.name == "custom_vjp_call":
            bwd = e.params["bwd"]
            found.add(getattr(bwd, "f", bwd))
        for sub in jax.extend.core.jaxprs_in_params(e.params):
            found |= _custom_gradients(sub)
    return found


def _defined_custom_gradients() -> dict:
    """{backward function: 'module.name'} of every `jax.custom_vjp` in tljax's CPU engine and
    C++ kernels."""
    found = {}
    for package in (tljax.cpu, tljax.native):
        for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
            module = importlib.import_module(info.name)
            for name, value in vars(module).items():
                if isinstance(value, jax.custom_vjp):
                    found[value.bwd] = f"{info.name}.{name}"
    return found


def test_every_custom_gradient_is_covered(monkeypatch):
    """The layers above reach every hand-written gradient of tljax on the paths this machine
    can take (the C++ ones where the kernels are built, the C++ product's where they have
    AVX-512), so a new one cannot go untested under `check_vma`."""
    defined = _defined_custom_gradients()
    seen = set()
    for form in FORMS:
        with contextlib.suppress(pytest.skip.Exception), monkeypatch.context() as m, \
                _form(form, m):
            for layer in LAYERS:
                _, x, params, shard_loss = _setup(layer, 1)
                seen |= _custom_gradients(jax.make_jaxpr(shard_loss)(params, x).jaxpr)
    reachable = {bwd for bwd, name in defined.items()
                 if (build.available() or not name.startswith("tljax.native."))
                 and (name != "tljax.native.conv._matmul_bn_vjp" or (
                     build.available() and native_conv.direct_available()))}
    assert len(defined) >= 10, defined  # the scan found tljax's gradients
    missing = sorted(defined[b] for b in reachable - seen)
    assert not missing, f"no layer of LAYERS reaches these hand-written gradients: {missing}"
