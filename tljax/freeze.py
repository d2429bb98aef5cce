"""Freezing as data: which parameters learn, and how fast.

A freeze specification is an ordered list of `(regex, label)` rules. Each parameter's path
(`stage4/block2/conv1/kernel`) is matched with `re.fullmatch` against the rules in order; the
first match gives its label. The label `frozen` means the parameter does not learn
(`optax.set_to_zero`, no optimizer state) and its BatchNorm runs on its moving statistics,
which stay unchanged (see `tljax.models.layers.TrainMode`). Every other label is a trained group
whose learning rate is the base rate times the group's multiplier (default 1).

A parameter that matches no rule, and a rule that matches no parameter, are errors: a typo in a
regex must not silently train (or freeze) the wrong layers.

Presets, for every registered model (`preset(name, params)`):
- `none`: everything trains (full fine-tuning);
- `backbone`: only the head trains (linear probing);
- `up_to:STAGE`: the model's units from the first up to STAGE (e.g. `stem`, `stage2`, `mixed5`,
  `block3`) are frozen, the rest trains;
- `top:N`: only the last N blocks (`stage4/block3`, `mixed10`, ...), what follows them and the
  head train.
The head is its own group, `head`, so that it can learn faster (`multipliers={'head': 10}`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence

import numpy as np
from flax import traverse_util

log = logging.getLogger("tljax.freeze")

FROZEN = "frozen"
HEAD = "head"
TRAIN = "train"

Spec = Sequence[tuple[str, str]]


class FreezeError(ValueError):
    """A freeze specification that does not fit the model; the message says what to change."""


def paths(params: Mapping) -> list[str]:
    """Parameter paths (`stage1/block1/conv1/kernel`), in natural model order."""
    flat = traverse_util.flatten_dict(params)
    return sorted(("/".join(k) for k in flat), key=_natural_key)


def _unit_rank(name: str) -> tuple:
    if name == "stem":
        return (0, 0, "")
    if name == HEAD:
        return (3, 0, "")
    m = re.fullmatch(r"([a-z_]+?)(\d+)", name)
    if m and m.group(1) in ("stage", "mixed", "block"):
        return (1, int(m.group(2)), "")
    return (2, 0, name)  # post_bn, top, fc1, fc2: after the numbered units, before the head


def _natural_key(path: str) -> tuple:
    parts = path.split("/")
    return (_unit_rank(parts[0]),) + tuple(
        (0, int(p), "") if p.isdigit() else (1, int(m.group(1)), p)
        if (m := re.fullmatch(r"[a-z_]*?(\d+)", p)) else (2, 0, p)
        for p in parts[1:]
    )


def units(params: Mapping) -> list[str]:
    """The model's top-level units in order: `stem`, `stage1`..., `post_bn`/`top`, `head`."""
    return sorted({p.split("/")[0] for p in paths(params)}, key=_unit_rank)


def blocks(params: Mapping) -> list[str]:
    """The model's blocks in order: `stage1/block1`, ... for ResNet and EfficientNet; the
    numbered units themselves (`mixed0`, `block1`) for InceptionV3 and VGG."""
    out: list[str] = []
    for p in paths(params):
        parts = p.split("/")
        if _unit_rank(parts[0])[0] != 1:
            continue
        block = "/".join(parts[:2]) if re.fullmatch(r"block\d+", parts[1]) else parts[0]
        if block not in out:
            out.append(block)
    return out


def _alternation(names: Sequence[str]) -> str:
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"


def preset(name: str, params: Mapping) -> list[tuple[str, str]]:
    """The freeze specification of preset `name` for a model with these `params`."""
    all_units = units(params)
    head = [(r"head/.*", HEAD)] if HEAD in all_units else []
    if name == "none":
        return head + [(r".*", TRAIN)]
    if name == "backbone":
        if not head:
            raise FreezeError("preset 'backbone' trains only the head, but the model has none "
                              "(create it with include_top=True)")
        return head + [(r".*", FROZEN)]
    if name.startswith("up_to:"):
        stage = name.split(":", 1)[1]
        body = [u for u in all_units if u != HEAD]
        if stage not in body:
            raise FreezeError(
                f"preset {name!r}: the model has no unit {stage!r}; its units are "
                f"{', '.join(body)}"
            )
        frozen = body[: body.index(stage) + 1]
        rules = head + [(_alternation(frozen) + "/.*", FROZEN)]
        return rules + ([(r".*", TRAIN)] if len(frozen) < len(body) else [])
    if name.startswith("top:"):
        try:
            n = int(name.split(":", 1)[1])
        except ValueError:
            raise FreezeError(f"preset {name!r}: N must be an integer, as in 'top:2'") from None
        all_blocks = blocks(params)
        if not 0 <= n <= len(all_blocks):
            raise FreezeError(
                f"preset {name!r}: the model has {len(all_blocks)} blocks "
                f"({all_blocks[0]} ... {all_blocks[-1]}); choose N from 0 to {len(all_blocks)}"
            )
        if n == 0:
            return preset("backbone", params)
        trained = all_blocks[len(all_blocks) - n:]
        last = all_blocks[-1].split("/")[0]
        after = [u for u in all_units if _unit_rank(u) > _unit_rank(last) and u != HEAD]
        return head + [(_alternation(trained + after) + "/.*", TRAIN), (r".*", FROZEN)]
    raise FreezeError(
        f"unknown freeze preset {name!r}; presets are 'none', 'backbone', 'up_to:STAGE' and "
        f"'top:N' (units of this model: {', '.join(all_units)})"
    )


def resolve(params: Mapping, spec: Spec | str) -> dict:
    """Labels for every parameter (a pytree shaped like `params`); `spec` may be a preset name.

    Raises FreezeError for an invalid regex, a rule that matches nothing, and a parameter that
    no rule covers.
    """
    if isinstance(spec, str):
        spec = preset(spec, params)
    rules = []
    for i, (pattern, label) in enumerate(spec):
        try:
            rules.append((re.compile(pattern), label))
        except re.error as e:
            raise FreezeError(
                f"rule {i} ({pattern!r} -> {label!r}) is not a valid regex: {e}"
            ) from None
    hits = [0] * len(rules)
    flat = traverse_util.flatten_dict(params)
    labels, uncovered = {}, []
    for key in flat:
        path = "/".join(key)
        for i, (regex, label) in enumerate(rules):
            if regex.fullmatch(path):
                labels[key] = label
                hits[i] += 1
                break
        else:
            uncovered.append(path)
    if uncovered:
        shown = ", ".join(sorted(uncovered, key=_natural_key)[:10])
        raise FreezeError(
            f"{len(uncovered)} parameter(s) match no freeze rule: {shown}"
            f"{' ...' if len(uncovered) > 10 else ''}. Add a rule that covers them (a last "
            f"catch-all such as ('.*', 'frozen') or ('.*', 'train'))"
        )
    for i, n in enumerate(hits):
        if n == 0:
            pattern, label = spec[i]
            raise FreezeError(
                f"freeze rule {i} ({pattern!r} -> {label!r}) matches no parameter (rules match "
                f"the whole path with re.fullmatch, first match wins). The model's units are "
                f"{', '.join(units(params))}; paths look like {paths(params)[0]}"
            )
    return traverse_util.unflatten_dict(labels)


def trainable(labels: Mapping) -> frozenset[str]:
    """Paths of the parameters that learn."""
    return frozenset("/".join(k) for k, v in traverse_util.flatten_dict(labels).items()
                     if v != FROZEN)


def frozen_batchnorm(labels: Mapping, batch_stats: Mapping) -> frozenset[str]:
    """Module paths of the BatchNorm layers whose parameters are all frozen: they run on their
    moving statistics and keep them unchanged. A BatchNorm layer is found through its
    statistics (`.../mean`, `.../var`); EfficientNet's input Normalization (which only has
    `mean` and `std`) is never trained and needs no entry."""
    flat = traverse_util.flatten_dict(labels)
    modules: dict[str, set] = {}
    for key, label in flat.items():
        modules.setdefault("/".join(key[:-1]), set()).add(label)
    bn = {"/".join(k[:-1]) for k in traverse_util.flatten_dict(batch_stats) if k[-1] == "var"}
    return frozenset(m for m in bn if modules.get(m) == {FROZEN})


def table(labels: Mapping, params: Mapping) -> str:
    """The resolved grouping as a table: group, number of tensors, number of parameters."""
    flat_l = traverse_util.flatten_dict(labels)
    flat_p = traverse_util.flatten_dict(params)
    groups: dict[str, list[int]] = {}
    for key, label in flat_l.items():
        g = groups.setdefault(label, [0, 0])
        g[0] += 1
        g[1] += int(np.prod(np.shape(flat_p[key])))
    total = sum(v[1] for v in groups.values())
    rows = [f"{'group':<10} {'tensors':>8} {'parameters':>14} {'share':>7}"]
    for label in sorted(groups, key=lambda g: (g == FROZEN, g)):
        n_t, n_p = groups[label]
        rows.append(f"{label:<10} {n_t:>8} {n_p:>14,} {n_p / max(total, 1):>7.1%}")
    return "\n".join(rows)


def log_table(labels: Mapping, params: Mapping) -> None:
    for line in table(labels, params).splitlines():
        log.info(line)


def layerwise_decay(params: Mapping, decay: float, head_multiplier: float = 1.0):
    """Layer-wise learning-rate decay: the last block learns at the base rate, each earlier
    block `decay` times slower, the stem slowest. Returns `(spec, multipliers)`."""
    all_blocks = blocks(params)
    spec, multipliers = [], {}
    if HEAD in units(params):
        spec.append((r"head/.*", HEAD))
        multipliers[HEAD] = head_multiplier
    last_unit = all_blocks[-1].split("/")[0]
    after = [u for u in units(params) if _unit_rank(u) > _unit_rank(last_unit) and u != HEAD]
    if after:
        spec.append((_alternation(after) + "/.*", "top"))
        multipliers["top"] = 1.0
    n = len(all_blocks)
    for i, b in enumerate(reversed(all_blocks)):
        label = f"block{n - i:03d}"
        spec.append((re.escape(b) + "/.*", label))
        multipliers[label] = decay ** i
    if "stem" in units(params):
        spec.append((r"stem/.*", "stem"))
        multipliers["stem"] = decay ** n
    return spec, multipliers
