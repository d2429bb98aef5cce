"""Varying manual axes inside `jax.shard_map(check_vma=True)`, for hand-written gradients
(`jax.custom_vjp`) and custom calls (`jax.ffi`), whose outputs JAX cannot type on its own."""

from __future__ import annotations

import jax


def varying_axes(x) -> frozenset:
    """The manual mesh axes along which `x` varies inside `jax.shard_map` with `check_vma`
    (empty outside, and without the check)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # jax 0.10; `vma` in later versions
    return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))


def varying_like(x, *params):
    """`params` cast to vary along `x`'s axes, for the custom-gradient layers of tljax. Inside a
    `shard_map` that checks varying axes, a parameter replicated across devices combined with a
    per-device `x` is cast implicitly by JAX's own ops, and the transpose of that cast sums the
    gradient over devices; inside a `custom_vjp` the cast would be hidden, and the hand-written
    gradient, per device, would not type-check against the replicated parameter. Cast ahead, the
    sum happens outside, as for autodiff. A no-op without `check_vma` (tljax's default step)."""
    return [None if p is None else vary_as(p, x) for p in params]


def vary_as(out, like):
    """`out` cast to vary along every axis that `like` varies along and `out` does not: a
    replicated parameter beside per-device data (`varying_like`), or a custom call's result,
    which carries no varying axes of its own (`tljax.native.build.call`)."""
    missing = tuple(sorted(varying_axes(like) - varying_axes(out)))
    return jax.lax.pcast(out, missing, to="varying") if missing else out
