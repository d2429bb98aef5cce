"""Freezing as data: which parameters learn, and how fast.

A freeze specification is an ordered list of `(regex, label)` rules. Each parameter's path
(`stage4/block2/conv1/kernel`) is matched with `re.fullmatch` against the rules in order; the
first match gives its label. The label `frozen` means the parameter does not learn
(`optax.set_to_zero`, no optimizer state) and its BatchNorm runs on its moving statistics,
which stay unchanged (see `tljax.models.layers.TrainMode`). Every other label is a trained group
whose learning rate is the base rate times the group's multiplier (default 1).

A parameter that matches no rule, and a rule that matches no parameter, are errors: a typo in a
regex must not silently train (or freeze) the wrong layers.

Presets, for every registered model (`preset(name, params, family)`):
- `none`: everything trains (full fine-tuning);
- `backbone`: only the head trains (linear probing);
- `up_to:STAGE`: the model's units from the first up to STAGE (e.g. `stem`, `stage2`, `mixed5`,
  `block3`) are frozen, the rest trains;
- `top:N`: only the last N blocks (`stage4/block3`, `mixed10`, ...), what follows them and the
  head train.
The units, their order and what a block is come from the model's family
(`tljax.models.family.Family`). The head is its own group, `head`, so that it can learn faster
(`multipliers={'head': 10}`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence

import numpy as np
from flax import traverse_util

from tljax.models.family import Family

log = logging.getLogger("tljax.freeze")

FROZEN = "frozen"
HEAD = "head"
TRAIN = "train"

Spec = Sequence[tuple[str, str]]


class FreezeError(ValueError):
    """A freeze specification that does not fit the model; the message says what to change."""


def paths(params: Mapping) -> list[str]:
    """Parameter paths (`stage1/block1/conv1/kernel`), numbered parts in number order."""
    flat = traverse_util.flatten_dict(params)
    return sorted(("/".join(k) for k in flat), key=_natural_key)


def _natural_key(path: str) -> tuple:
    return tuple((int(m.group(1)), p) if (m := re.fullmatch(r"[a-z_]*?(\d+)", p)) else (-1, p)
                 for p in path.split("/"))


def units(params: Mapping, family: Family | None = None) -> list[str]:
    """The model's top-level units, in the family's order (`stem`, `stage1`, ..., `head`);
    without a family, by name."""
    names = {p.split("/")[0] for p in paths(params)}
    if family is None:
        return sorted(names, key=_natural_key)
    return sorted(names, key=family.unit_rank)


def blocks(params: Mapping, family: Family) -> list[str]:
    """The model's blocks in order (`family.blocks`: `stage1/block1`, ... for ResNet and
    EfficientNet; the numbered units themselves, `mixed0`, `block1`, for InceptionV3 and
    VGG)."""
    pattern = re.compile(family.blocks)
    found = set()
    for p in paths(params):
        parts = p.split("/")
        for n in range(1, len(parts)):
            if pattern.fullmatch("/".join(parts[:n])):
                found.add("/".join(parts[:n]))
                break
    return sorted(found, key=lambda b: (family.unit_rank(b.split("/")[0]), _natural_key(b)))


def _alternation(names: Sequence[str]) -> str:
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"


def preset(name: str, params: Mapping, family: Family | None = None) -> list[tuple[str, str]]:
    """The freeze specification of preset `name` for a model of `family` with these `params`
    (`none` and `backbone` need no family)."""
    head_unit = family.head if family is not None else HEAD
    all_units = units(params, family)
    head = [(re.escape(head_unit) + "/.*", HEAD)] if head_unit in all_units else []
    if name == "none":
        return head + [(r".*", TRAIN)]
    if name == "backbone":
        if not head:
            raise FreezeError("preset 'backbone' trains only the head, but the model has none "
                              "(create it with include_top=True)")
        return head + [(r".*", FROZEN)]
    if name.startswith(("up_to:", "top:")) and family is None:
        raise FreezeError(f"preset {name!r} needs the model's family (`tljax.models.family`): "
                          f"pass family=models.family(MODEL)")
    if name.startswith("up_to:"):
        stage = name.split(":", 1)[1]
        body = [u for u in all_units if u != head_unit]
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
        all_blocks = blocks(params, family)
        if not 0 <= n <= len(all_blocks):
            raise FreezeError(
                f"preset {name!r}: the model has {len(all_blocks)} blocks "
                f"({all_blocks[0]} ... {all_blocks[-1]}); choose N from 0 to {len(all_blocks)}"
            )
        if n == 0:
            return preset("backbone", params)
        trained = all_blocks[len(all_blocks) - n:]
        after = _after_blocks(all_units, all_blocks, family)
        return head + [(_alternation(trained + after) + "/.*", TRAIN), (r".*", FROZEN)]
    raise FreezeError(
        f"unknown freeze preset {name!r}; presets are 'none', 'backbone', 'up_to:STAGE' and "
        f"'top:N' (units of this model: {', '.join(all_units)})"
    )


def _after_blocks(all_units: list[str], all_blocks: list[str], family: Family) -> list[str]:
    """The units after the last block's, less the head (`top`, `post_bn`, `fc1`, ...)."""
    last = family.unit_rank(all_blocks[-1].split("/")[0])
    return [u for u in all_units if family.unit_rank(u) > last and u != family.head]


def resolve(params: Mapping, spec: Spec | str, family: Family | None = None) -> dict:
    """Labels for every parameter (a pytree shaped like `params`); `spec` may be a preset name
    (`up_to:` and `top:` need the model's `family`).

    Raises FreezeError for an invalid regex, a rule that matches nothing, and a parameter that
    no rule covers.
    """
    if isinstance(spec, str):
        spec = preset(spec, params, family)
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
                f"{', '.join(units(params, family))}; paths look like {paths(params)[0]}"
            )
    return traverse_util.unflatten_dict(labels)


def trainable(labels: Mapping) -> frozenset[str]:
    """Paths of the parameters that learn."""
    return frozenset("/".join(k) for k, v in traverse_util.flatten_dict(labels).items()
                     if v != FROZEN)


def frozen_batchnorm(labels: Mapping, batch_stats: Mapping, family: Family | None = None,
                     everywhere: bool = False) -> frozenset[str]:
    """Module paths whose statistics stay unchanged: the BatchNorm layers whose parameters are
    all frozen (they run on their moving statistics), and the modules whose statistics are the
    family's constants (`Family.constants`: an input normalisation). `everywhere`: every
    module with statistics, trained or not (Keras's `base_model(x, training=False)`)."""
    flat = traverse_util.flatten_dict(labels)
    modules: dict[str, set] = {}
    for key, label in flat.items():
        modules.setdefault("/".join(key[:-1]), set()).add(label)
    stats = {"/".join(k[:-1]) for k in traverse_util.flatten_dict(batch_stats)}
    return frozenset(m for m in stats if everywhere or modules.get(m) == {FROZEN}
                     or (family is not None and family.constant(m)))


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


def layerwise_decay(params: Mapping, family: Family, decay: float,
                    head_multiplier: float = 1.0):
    """Layer-wise learning-rate decay: the last block learns at the base rate, each earlier
    block `decay` times slower, the units before the first block slowest. Returns
    `(spec, multipliers)`."""
    all_blocks = blocks(params, family)
    all_units = units(params, family)
    spec, multipliers = [], {}
    if family.head in all_units:
        spec.append((re.escape(family.head) + "/.*", HEAD))
        multipliers[HEAD] = head_multiplier
    after = _after_blocks(all_units, all_blocks, family)
    if after:
        spec.append((_alternation(after) + "/.*", "top"))
        multipliers["top"] = 1.0
    n = len(all_blocks)
    for i, b in enumerate(reversed(all_blocks)):
        label = f"block{n - i:03d}"
        spec.append((re.escape(b) + "/.*", label))
        multipliers[label] = decay ** i
    first = family.unit_rank(all_blocks[0].split("/")[0])
    before = [u for u in all_units if family.unit_rank(u) < first]
    if before:
        spec.append((_alternation(before) + "/.*", "stem"))
        multipliers["stem"] = decay ** n
    return spec, multipliers
