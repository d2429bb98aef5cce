"""Parsing a config file's argument (`configs/finetune.py:model=resnet50,steps=300`).

`parse_arg(arg, **defaults)` returns the defaults updated from `arg`; each value is converted to
its default's type. A name that is not a default is an error listing the valid names (with the
closest one suggested), so a typo never silently falls back to a default.
"""

from __future__ import annotations

import difflib
from typing import Any

import ml_collections


class ConfigError(ValueError):
    """A config argument or field that does not exist or does not parse."""


def _convert(name: str, text: str, default: Any) -> Any:
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ConfigError(f"config argument {name}={text!r}: expected true or false")
    if isinstance(default, int | float):
        try:
            return type(default)(text)
        except ValueError:
            raise ConfigError(
                f"config argument {name}={text!r}: expected {type(default).__name__}"
            ) from None
    return text


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """`defaults` updated from `arg` (`key=value,key=value`)."""
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        if "=" not in item:
            raise ConfigError(f"config argument {item!r}: expected key=value "
                              f"(valid keys: {', '.join(defaults)})")
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in defaults:
            close = difflib.get_close_matches(key, defaults, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"unknown config argument {key!r}: {hint}valid keys are "
                              f"{', '.join(defaults)}")
        out[key] = _convert(key, value, defaults[key])
    return ml_collections.ConfigDict(out)
