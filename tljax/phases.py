"""Fine-tuning schedules as a list of phases.

A phase is a number of steps with its own freeze specification, learning rate (a float or an
optax schedule), optimizer and per-group multipliers; the classic transfer recipe is two:
train the new head with the backbone frozen, then unfreeze the top blocks at a lower rate
(`classic`).

Between phases the parameters and the BatchNorm statistics are kept. The optimizer state is
handled explicitly by `Phase.optimizer_state`:
- `"reset"` (the default): a fresh optimizer state. The groups usually change between phases
  (layers are unfrozen), and stale momentum of the head from a high-rate phase would kick the
  newly unfrozen, low-rate phase. A schedule counts the phase's own steps from 0.
- `"carry"`: keep the previous phase's state (momentum, Adam moments, schedule count); only
  possible when the freeze groups and the optimizer's structure are unchanged, else an error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import optax

from tljax import freeze
from tljax import train_step as steps
from tljax.models.family import Family


def sgd_momentum(learning_rate) -> optax.GradientTransformation:
    return optax.sgd(learning_rate, momentum=0.9)


@dataclasses.dataclass(frozen=True)
class Phase:
    """One phase of a fine-tuning schedule (see the module docstring)."""

    steps: int
    freeze: str | Sequence[tuple[str, str]]
    learning_rate: float | Callable[[Any], Any]
    optimizer: Callable[[Any], optax.GradientTransformation] = sgd_momentum
    multipliers: Mapping[str, float] = dataclasses.field(default_factory=dict)
    optimizer_state: str = "reset"
    name: str = ""


class PhaseError(ValueError):
    """A schedule that does not fit the model; the message names the phase."""


def classic(head_steps: int, finetune_steps: int, head_lr: float = 0.01,
            finetune_lr: float = 0.001, top_blocks: int = 2) -> list[Phase]:
    """Train the head with the backbone frozen, then the top blocks and head at a lower rate."""
    return [
        Phase(head_steps, "backbone", head_lr, name="head"),
        Phase(finetune_steps, f"top:{top_blocks}", finetune_lr, name="finetune"),
    ]


def _label(i: int, phase: Phase) -> str:
    return f"phase {i}" + (f" ({phase.name!r})" if phase.name else "")


def resolve(phases: Sequence[Phase], params, family: Family | None = None) -> list[dict]:
    """The freeze labels of every phase, checked before any training starts (presets
    `up_to:` and `top:` need the model's `family`)."""
    out = []
    for i, phase in enumerate(phases):
        if phase.steps <= 0:
            raise PhaseError(f"{_label(i, phase)}: steps must be positive, got {phase.steps}")
        if phase.optimizer_state not in ("reset", "carry"):
            raise PhaseError(f"{_label(i, phase)}: optimizer_state must be 'reset' or 'carry', "
                             f"got {phase.optimizer_state!r}")
        if i == 0 and phase.optimizer_state == "carry":
            raise PhaseError(f"{_label(i, phase)}: the first phase has no state to carry")
        try:
            out.append(freeze.resolve(params, phase.freeze, family))
        except freeze.FreezeError as e:
            raise PhaseError(f"{_label(i, phase)}: {e}") from None
        if phase.optimizer_state == "carry" and out[-1] != out[-2]:
            raise PhaseError(
                f"{_label(i, phase)}: optimizer_state='carry' needs the same freeze groups as the "
                f"phase before; use 'reset' when layers are unfrozen"
            )
    return out


def begin(phase: Phase, labels: Mapping, state: steps.TrainState, model,
          sync_bn: bool = False, bn_follows_freeze: bool = True, axis_name: str = "batch",
          family: Family | None = None) -> tuple[steps.TrainState, steps.StepConfig]:
    """The state and step configuration for `phase`, continuing from `state` (parameters and
    BatchNorm statistics kept; optimizer state reset or carried as the phase says)."""
    freeze.log_table(labels, state.params)
    tx = steps.optimizer(labels, phase.optimizer, phase.learning_rate, phase.multipliers)
    if phase.optimizer_state == "carry":
        fresh = jax.eval_shape(tx.init, state.params)
        if jax.tree.structure(fresh) != jax.tree.structure(state.opt_state):
            raise PhaseError("optimizer_state='carry': the optimizer's state has another "
                             "structure than the previous phase's; use 'reset'")
        opt_state = state.opt_state
    else:
        opt_state = tx.init(state.params)
    config = steps.StepConfig(
        model=model, tx=tx, trainable=freeze.trainable(labels),
        frozen_bn=(freeze.frozen_batchnorm(labels, state.batch_stats, family)
                   if bn_follows_freeze else frozenset()),
        sync_bn=sync_bn, axis_name=axis_name,
    )
    return state.replace(opt_state=opt_state), config
