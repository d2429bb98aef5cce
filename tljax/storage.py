"""Paths that are local or in object storage (`gs://bucket/...`), through `etils.epath`, the
layer Orbax and TFDS use.

Every file tljax reads or writes in a workdir goes through here, so that `--workdir
gs://bucket/run` is the bucket and never a local folder named `gs:`. Object storage has no
append: `Appender` rewrites the whole object on each flush (small files: metrics, events).

With TensorFlow installed, etils reads and writes `gs://` through TensorFlow's filesystem;
`EPATH_USE_TF=false` makes it use gcsfs instead (what the tests do, against a local
emulator that TensorFlow cannot be pointed at).
"""

from __future__ import annotations

import os

from etils import epath

SCHEMES = ("gs://", "s3://", "az://", "hf://")


class StorageError(OSError):
    """A path in object storage that cannot be read or written; the message names it."""


def is_remote(path) -> bool:
    """Whether `path` is in object storage (`gs://...`)."""
    return str(path).startswith(SCHEMES)


def absolute(path) -> str:
    """`path` made absolute when local (`~` expanded); a `gs://` path as it is."""
    path = os.fspath(path)
    return path if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def path(p) -> epath.Path:
    """An `epath.Path` for `p` (local: absolute)."""
    return epath.Path(absolute(p))


def join(base, *parts) -> str:
    """`base/parts...` as a string, for local and `gs://` bases alike."""
    return os.fspath(path(base).joinpath(*parts))


def exists(p) -> bool:
    return _guard(p, lambda: path(p).exists())


def makedirs(p) -> None:
    """Create the folder `p` (in object storage folders are prefixes: nothing to create)."""
    if not is_remote(p):
        os.makedirs(absolute(p), exist_ok=True)


def read_text(p) -> str:
    return _guard(p, lambda: path(p).read_text())


def write_text(p, text: str) -> None:
    _guard(p, lambda: path(p).write_text(text))


def read_bytes(p) -> bytes:
    return _guard(p, lambda: path(p).read_bytes())


def write_bytes(p, data: bytes) -> None:
    _guard(p, lambda: path(p).write_bytes(data))


def _guard(p, fn):
    """`fn()`, its object-storage errors made to name `p` (the clients name an API URL)."""
    try:
        return fn()
    except FileNotFoundError as e:
        if not is_remote(p):
            raise
        raise FileNotFoundError(f"{p}: no such object, or its bucket does not exist") from e
    except (OSError, ValueError) as e:  # no access, a malformed bucket name, ...
        if not is_remote(p):
            raise
        raise StorageError(f"{p}: {type(e).__name__}: {e}") from e


class Appender:
    """A file written by appending: locally an append, in object storage the whole object
    rewritten on each `flush` (objects cannot be appended to). `initial` starts it anew with
    these bytes."""

    def __init__(self, p, initial: bytes = b""):
        self.path = absolute(p)
        self._remote = is_remote(self.path)
        self._data = bytearray(initial)
        self._pending = bytearray()
        if self._remote:
            write_bytes(self.path, bytes(self._data))
        else:
            with open(self.path, "wb") as f:
                f.write(initial)

    def write(self, data: bytes) -> None:
        self._pending += data

    def flush(self) -> None:
        if not self._pending:
            return
        if self._remote:
            self._data += self._pending
            write_bytes(self.path, bytes(self._data))
        else:
            with open(self.path, "ab") as f:
                f.write(self._pending)
        self._pending = bytearray()

    def close(self) -> None:
        self.flush()

    @property
    def closed(self) -> bool:
        return False
