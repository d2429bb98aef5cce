"""tljax's XLA compiler options (tljax/xla_options.py): YNNPACK's convolutions off on CPU,
nothing elsewhere, the user's XLA_FLAGS and TLJAX_XLA_OPTIONS=0 respected, and the same
numbers as XLA's defaults."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from tljax import xla_options


def test_options_per_platform(monkeypatch):
    monkeypatch.delenv("TLJAX_XLA_OPTIONS", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert xla_options.for_platform("cpu") == xla_options.CPU
    assert "INDIVIDUAL_CONVOLUTION" not in xla_options.CPU[xla_options._YNN]
    assert xla_options.for_platform("gpu") is None
    assert xla_options.for_platform("tpu") is None
    monkeypatch.setenv("TLJAX_XLA_OPTIONS", "0")
    assert xla_options.for_platform("cpu") is None
    monkeypatch.delenv("TLJAX_XLA_OPTIONS")
    # The user's own setting of the flag wins.
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
    assert xla_options.for_platform("cpu") is None


def conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def ynn_convolutions(hlo: str) -> int:
    """How many convolutions the compiled module `hlo` hands to YNNPACK fusions."""
    ynn = set(re.findall(r"calls=%([\w.\-]+)[^\n]*__ynn_fusion", hlo))
    bodies = re.findall(r"^%([\w.\-]+) [^\n]*\{\n(.*?)^\}", hlo, flags=re.M | re.S)
    return sum(body.count("convolution(") for name, body in bodies if name in ynn)


def test_convolutions_leave_ynnpack_and_keep_their_numbers(monkeypatch):
    monkeypatch.delenv("TLJAX_XLA_OPTIONS", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 16, 16, 64)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, 64, 64)) * 0.05, jnp.float32)

    def loss(x, k):
        return jnp.sum(jnp.tanh(conv(x, k)))

    grad = jax.grad(loss, argnums=(0, 1))
    ours = xla_options.jit(grad)
    hlo = ours.lower(x, k).compile().as_text()
    # Every convolution (forward, both gradients) is XLA's own, none inside a YNNPACK fusion.
    assert ynn_convolutions(hlo) == 0 and "convolution(" in hlo
    for a, b in zip(ours(x, k), jax.jit(grad)(x, k), strict=True):
        # float32 sums of 576 products in another order: differences of ~1e-6 of the scale.
        scale = float(np.abs(b).max())
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * scale)


_PROBE = """
import re, jax, jax.numpy as jnp, numpy as np
from tljax import xla_options

def f(x, k, a, b):
    y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return (jnp.sum(jnp.tanh(y)) + (a @ a).sum() + jnp.sum(jnp.exp(a))
            + jnp.sum(b.sum((0, 1, 2)) ** 2))

r = np.random.default_rng(0)
args = (jnp.asarray(r.normal(size=(2, 16, 16, 64)), jnp.float32),
        jnp.asarray(r.normal(size=(3, 3, 64, 64)), jnp.float32),
        jnp.asarray(r.normal(size=(512, 512)), jnp.float32),
        jnp.asarray(r.normal(size=(8, 32, 32, 64)), jnp.float32))
grad = jax.grad(f, argnums=(0, 1, 2, 3))
fn = xla_options.jit(grad) if TLJAX else jax.jit(grad)
hlo = fn.lower(*args).compile().as_text()
ynn = set(re.findall(r"calls=%([\\w.\\-]+)[^\\n]*__ynn_fusion", hlo))
bodies = dict(re.findall(r"^%([\\w.\\-]+) [^\\n]*\\{\\n(.*?)^\\}", hlo, flags=re.M | re.S))
kinds = sorted(op for name in ynn for op in re.findall(r"= \\S+ (\\w+)\\(", bodies[name])
               if op in ("dot", "convolution", "reduce", "add", "multiply", "exponential", "tanh"))
print("KINDS", " ".join(kinds))
"""


def test_options_equal_xla_defaults_less_ynnpack_convolutions():
    """tljax's per-program option lists YNNPACK's fusion types by name (per-program options take
    no '-' prefix), as this jaxlib's default set less convolutions. Compared with XLA's own
    `--xla_cpu_experimental_ynn_fusion_type=-individual_convolution` on a program with a
    convolution, a matrix product, reductions and elementwise work, the compiled programs hand
    YNNPACK the same operations: a jaxlib whose default set changes fails here, and CPU in
    `xla_options` needs updating."""
    import os
    import subprocess
    import sys

    def kinds(tljax: bool, flags: str) -> str:
        env = {**os.environ, "XLA_FLAGS": flags, "TLJAX_XLA_OPTIONS": "1"}
        out = subprocess.run([sys.executable, "-c", f"TLJAX = {tljax}\n" + _PROBE],
                             capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return next(line for line in out.stdout.splitlines() if line.startswith("KINDS"))

    ours = kinds(True, "")
    xla = kinds(False, "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution")
    default = kinds(False, "")
    assert ours == xla
    assert "dot" in ours and "reduce" in ours and "convolution" not in ours
    assert "convolution" in default  # the probe does exercise YNNPACK's convolutions
