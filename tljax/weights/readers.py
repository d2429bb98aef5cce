"""Readers that turn a weight file into `SourceLayer`s (framework code lives here, not in tljax).

- Keras legacy HDF5 (`*.h5`): written by Keras 2 (`model.save_weights`, weight names ending in
  ':0') or Keras 3 (`legacy_h5_format`, no ':0'); also whole-model files (`model_weights/`).
- Keras 3 `.weights.h5`: layers are stored under class-based keys (`layers/conv2d_7/vars/0`)
  in the order of the Keras model's `layers`, so the Keras application is built (no weights)
  to recover each key's layer name.
- Keras 3 `.keras` archives (`model.save(...)`): a zip whose `model.weights.h5` is laid out as
  a `.weights.h5` file; it is read as Keras's own loading code reads it.
- torch state dicts (`.pth`/`.pt`), read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import zipfile

import numpy as np

from tljax.weights.layer_map import SourceLayer


class UnreadableFileError(ValueError):
    """The input file is missing, truncated, or not in a format the converter reads."""


KERAS_ARCHIVE_WEIGHTS = "model.weights.h5"  # where a `.keras` archive keeps the weights


def detect_format(path: str) -> str:
    """'keras_h5', 'keras_weights_h5', 'keras_archive' or 'torch', from the file's content
    (not its name)."""
    if not os.path.isfile(path):
        raise UnreadableFileError(f"input file {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        h5 = _open_h5(path)
        with h5:
            if "layer_names" in h5.attrs or "model_weights" in h5:
                return "keras_h5"
            if "layers" in h5 or "vars" in h5:
                return "keras_weights_h5"
        raise UnreadableFileError(
            f"{path} is an HDF5 file but holds no Keras weights (no 'layer_names' attribute, no "
            f"'layers' group)"
        )
    if head.startswith(b"PK\x03\x04"):  # a zip: a Keras 3 archive or a torch file
        names = _zip_names(path)
        return "keras_archive" if KERAS_ARCHIVE_WEIGHTS in names else "torch"
    if head[:2] == b"\x80\x02":
        return "torch"
    raise UnreadableFileError(
        f"{path}: not a Keras HDF5 file nor a torch state dict (it starts with {head!r})"
    )


def _zip_names(path: str) -> list[str]:
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise UnreadableFileError(
            f"{path} ({os.path.getsize(path)} bytes) starts as a zip archive (a Keras .keras "
            f"file or a torch file) but cannot be read as one: it is truncated or corrupt "
            f"({e}). Save or download it again."
        ) from None


@contextlib.contextmanager
def keras_weights_file(path: str, fmt: str):
    """The path of the `.weights.h5` data of `path`: the file itself ('keras_weights_h5'), or
    a `.keras` archive's `model.weights.h5`, extracted to a temporary directory for the
    duration ('keras_archive')."""
    if fmt != "keras_archive":
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="tljax-keras-") as tmp:
        try:
            with zipfile.ZipFile(path) as z:
                extracted = z.extract(KERAS_ARCHIVE_WEIGHTS, tmp)
        except (zipfile.BadZipFile, OSError, KeyError, EOFError) as e:
            raise UnreadableFileError(
                f"{path}: the Keras archive's {KERAS_ARCHIVE_WEIGHTS} cannot be extracted "
                f"({e.__class__.__name__}: {e}); the file is truncated or corrupt. Save it "
                f"again with model.save(...)"
            ) from None
        yield extracted


def _open_h5(path: str):
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as e:
        size = os.path.getsize(path)
        raise UnreadableFileError(
            f"{path} ({size} bytes) cannot be opened as HDF5: it is truncated or corrupt "
            f"({e.__class__.__name__}: {str(e).splitlines()[0]}). Download it again."
        ) from None


def _decode(x) -> str:
    return x.decode("utf8") if isinstance(x, bytes) else str(x)


def read_keras_h5(path: str) -> list[SourceLayer]:
    """Layers with weights of a Keras legacy HDF5 file, in file (= Keras load) order."""
    h5 = _open_h5(path)
    try:
        with h5:
            group = h5["model_weights"] if "model_weights" in h5 else h5
            if "layer_names" not in group.attrs:
                raise UnreadableFileError(f"{path}: no 'layer_names' attribute; not a Keras file")
            layers = []
            for name in (_decode(n) for n in group.attrs["layer_names"]):
                g = group[name]
                weights = {}
                for wname in (_decode(w) for w in g.attrs.get("weight_names", [])):
                    # 'conv1/kernel:0' (Keras 2) or 'conv1/kernel' (Keras 3) -> 'kernel'
                    key = re.sub(r":\d+$", "", wname).rsplit("/", 1)[-1]
                    weights[key] = np.asarray(g[wname])
                if weights:
                    layers.append(SourceLayer(name, weights))
            return layers
    except (OSError, KeyError, RuntimeError) as e:
        raise UnreadableFileError(
            f"{path}: reading the HDF5 data failed ({e.__class__.__name__}: {e}); the file is "
            f"truncated or corrupt. Download it again."
        ) from None


def read_keras_weights_h5(path: str, keras_model) -> list[SourceLayer]:
    """Layers of a Keras 3 `.weights.h5` file, named after `keras_model`'s layers."""
    from keras.src.utils.naming import to_snake_case

    h5 = _open_h5(path)
    try:
        with h5:
            if "layers" not in h5:
                raise UnreadableFileError(f"{path}: no 'layers' group; not a Keras 3 weights file")
            stored: dict[str, list[tuple[int, str]]] = {}
            for key in h5["layers"]:
                m = re.fullmatch(r"(.*?)(?:_(\d+))?", key)
                stored.setdefault(m.group(1), []).append((int(m.group(2) or 0), key))
            per_class: dict[str, list] = {}
            for layer in keras_model.layers:
                per_class.setdefault(to_snake_case(layer.__class__.__name__), []).append(layer)
            layers = []
            for cls, model_layers in per_class.items():
                keys = [k for _, k in sorted(stored.get(cls, []))]
                with_vars = [k for k in keys if len(h5["layers"][k].get("vars", {})) > 0]
                wanted = [lyr for lyr in model_layers if lyr.weights]
                if len(with_vars) != len(wanted):
                    raise UnreadableFileError(
                        f"{path}: the file holds {len(with_vars)} '{cls}' layers with weights, "
                        f"the Keras {keras_model.name} model {len(wanted)}: is it a file of "
                        f"another architecture?"
                    )
                for key, lyr in zip(with_vars, wanted, strict=True):
                    v = h5["layers"][key]["vars"]
                    layers.append(SourceLayer(lyr.name, {i: np.asarray(v[i]) for i in v}))
            return layers
    except (OSError, KeyError, RuntimeError) as e:
        raise UnreadableFileError(
            f"{path}: reading the HDF5 data failed ({e.__class__.__name__}: {e}); the file is "
            f"truncated or corrupt."
        ) from None


def read_torch(path: str) -> list[SourceLayer]:
    """Modules of a torch state dict (`prefix.weight`, ...), in the dict's order.

    Loaded with `torch.load(weights_only=True)`: a file that holds anything but tensors (a
    pickled model object, code) is refused, never unpickled.
    """
    import pickle

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnreadableFileError(
            f"{path}: refused to load: the file holds Python objects other than tensors, and "
            f"tljax never unpickles arbitrary objects (torch.load weights_only=True said: "
            f"{str(e).splitlines()[0]}). Save a state dict: torch.save(model.state_dict(), path)"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise UnreadableFileError(
            f"{path}: not a readable torch file ({e.__class__.__name__}: "
            f"{str(e).splitlines()[0]}); it may be truncated"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        bad = type(state).__name__ if not isinstance(state, dict) else next(
            f"{k!r}: {type(v).__name__}" for k, v in state.items()
            if not (isinstance(k, str) and isinstance(v, torch.Tensor))
        )
        raise UnreadableFileError(
            f"{path}: expected a state dict mapping names to tensors, found {bad}"
        )
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in state.items():
        prefix, _, leaf = key.rpartition(".")
        modules.setdefault(prefix, {})[leaf] = tensor.detach().cpu().float().numpy()
    return [SourceLayer(name, w, layout="torch") for name, w in modules.items()]
