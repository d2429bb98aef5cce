"""What an architecture family declares so that the rest of tljax works with it.

A family is a Flax module (or several sizes of one) plus one `Family` object in its file. The
freezing presets (`tljax.freeze`), the train step and the weight converter read what they need
from that object and from the model's modules; nothing outside the family's file names its
units or its special layers. docs/adding_a_model.md walks through adding one.
"""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class Family:
    """A family's contract.

    Attributes:
      name: the family's name (`resnet`), as `tljax.models.info` reports it.
      units: regular expressions of the model's top-level modules, in model order, the head
        last. One with a number in it (`stage\\d+`) stands for numbered units, taken in the
        order of their number. `up_to:UNIT` freezes the units up to UNIT.
      blocks: regular expression of a block's path (`stage\\d+/block\\d+`, or `mixed\\d+` where
        the units are the blocks): what `top:N` counts from the end.
      head: the top-level module of the classifier (the part `backbone` does not freeze).
      constants: regular expression of the module paths whose statistics (`batch_stats`) are
        constants, never updated by training (an input normalisation layer); None: none.
    """

    name: str
    units: tuple[str, ...]
    blocks: str
    head: str = "head"
    constants: str | None = None

    def unit_rank(self, unit: str) -> tuple[int, int]:
        """`(position of the pattern that matches unit in units, its number)`; a unit that no
        pattern matches is refused with the patterns named."""
        for i, pattern in enumerate(self.units):
            if re.fullmatch(pattern, unit):
                number = re.search(r"\d+", unit) if re.search(r"\\d", pattern) else None
                return i, int(number.group()) if number else 0
        raise ValueError(f"{self.name}: the unit {unit!r} matches none of the family's unit "
                         f"patterns {self.units}; list it in its Family(units=...)")

    def constant(self, module_path: str) -> bool:
        """Whether the statistics of the module at `module_path` are constants."""
        return self.constants is not None and re.fullmatch(self.constants, module_path) is not None
