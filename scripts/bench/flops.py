"""Model FLOPs of a JAX function, counted from its jaxpr: 2 x the multiply-adds of every
convolution and matrix product, nothing else (BatchNorm, activations and the optimizer's
elementwise updates are a few percent and are not what MFU measures).

Why not XLA's cost analysis: it counts the compiled program, which differs by backend. On GPUs
the convolutions become cuDNN custom calls, which it counts as 0 FLOPs (an H200 run reported
121 GFLOP for a ResNet50 step of ~6 TFLOP); on CPU tljax writes 1x1 and depthwise convolutions
as matmuls and multiply-adds (the CPU engine, `tljax.cpu`). Counting the jaxpr traced
under `tljax.cpu.engine_scope('xla')` gives one figure per program on every backend.
"""

from __future__ import annotations

import math

import jax
from jax.extend import core

from tljax import cpu


def _conv(eqn) -> float:
    rhs = eqn.invars[1].aval
    out = eqn.outvars[0].aval
    dn = eqn.params["dimension_numbers"]
    rhs_out = dn.rhs_spec[0]
    # Each output element sums over the kernel's window and its (per-group) input features;
    # with batch_group_count (weight gradients) the output's batch shrinks, the rule holds.
    per_output = math.prod(rhs.shape) // rhs.shape[rhs_out]
    return 2.0 * math.prod(out.shape) * per_output


def _dot(eqn) -> float:
    lhs = eqn.invars[0].aval
    (contract, _), _ = eqn.params["dimension_numbers"]
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs.shape[d] for d in contract)


def jaxpr_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            total += _conv(eqn)
        elif name == "dot_general":
            total += _dot(eqn)
        subs = [jaxpr_flops(j) for j in core.jaxprs_in_params(eqn.params)]
        if not subs:
            continue
        if name == "cond":  # one branch runs
            total += max(subs)
        elif name == "scan":
            total += eqn.params["length"] * sum(subs)
        else:  # calls run their body once; a while loop's trip count is unknown: one iteration
            total += sum(subs)
    return total


def model_flops(fn, *args, axis_env=None) -> float:
    """FLOPs of convolutions and matrix products in one call of `fn(*args)`, traced with XLA's
    own convolution ops (`cpu.engine_scope('xla')`); `axis_env`: `[(name, size)]` for
    collectives over named axes. `fn` is traced through a new function: `make_jaxpr` reuses
    `jax.jit`'s cached trace of the same function, which for a program already traced on CPU
    holds the C++ kernels' custom calls (not counted) in place of its convolutions."""
    with cpu.engine_scope("xla"):
        closed = jax.make_jaxpr(lambda *a: fn(*a), axis_env=axis_env or [])(*args)
    return jaxpr_flops(closed.jaxpr)
