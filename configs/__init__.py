"""tljax's configs, installed with the package as `tljax.configs` (pyproject.toml maps this
folder there): `python -m tljax.train --config=finetune:ARGS` names `finetune.py` here."""

import os


def path(name: str) -> str:
    """The file of config `name` (`finetune`), as `--config` takes it."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
