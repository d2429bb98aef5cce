"""Paths that are local or in object storage (`gs://bucket/...`), through `etils.epath`, the
layer Orbax and TFDS use.

Every path tljax reads or writes that may be in a bucket goes through here (workdirs, converted
weights, `$TLJAX_CACHE`, image folders), so that `--workdir gs://bucket/run` is the bucket and
never a local folder named `gs:`. Object storage has no append: `Appender` rewrites the whole
object on each flush (small files: metrics, events).

With TensorFlow installed, etils would read and write `gs://` through TensorFlow's filesystem;
importing `tljax` sets `EPATH_USE_TF=false` (unless it is set) when gcsfs is installed, so that
etils uses gcsfs: the client the tests run against a local emulator, which TensorFlow's
filesystem cannot be pointed at.
"""

from __future__ import annotations

import os

from etils import epath

try:
    import fsspec
except ImportError:  # without the [data] extra: local paths only
    fsspec = None
else:
    # gcsfs does not cache listings: another host may have written to the bucket since (a
    # checkpoint, converted weights). etils asks for the filesystem as 'gs'.
    for _protocol in ("gs", "gcs"):
        fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)

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


def rmtree(p) -> None:
    """Remove folder `p` and everything below it (absent: nothing to do)."""
    if exists(p):
        _guard(p, lambda: path(p).rmtree())


def files(root, max_depth: int | None = None) -> dict[str, int]:
    """Every file below folder `root`, at most `max_depth` folders down (None: any): its path
    relative to `root` (with `/`) -> its size in bytes. Local folders are walked following
    symbolic links; in object storage it is one listing of the prefix, not a call per file."""
    root = absolute(root)
    if not is_remote(root):
        def fail(error):
            raise error

        out = {}
        for folder, subs, names in os.walk(root, onerror=fail, followlinks=True):
            rel = os.path.relpath(folder, root)
            depth = 0 if rel == "." else rel.count(os.sep) + 1
            if max_depth is not None and depth >= max_depth:
                subs.clear()
            for name in names:
                full = os.path.join(folder, name)
                if os.path.isfile(full):  # not a broken link
                    key = os.path.relpath(full, root).replace(os.sep, "/")
                    out[key] = os.path.getsize(full)
        return out
    from etils.epath import backend

    p = path(root)
    prefix = root.rstrip("/") + "/"
    levels = None if max_depth is None else max_depth + 1
    if p._backend is backend.fsspec_backend:  # noqa: SLF001  (one listing with the sizes)
        found = _guard(root, lambda: backend.fsspec_backend.fs(root).find(
            root, maxdepth=levels, detail=True))
        bare = prefix.split("://", 1)[1]  # fsspec names objects without the scheme
        return {k.split("://", 1)[-1][len(bare):]: int(v["size"])
                for k, v in found.items() if v.get("type") != "directory"}
    out = {}  # TensorFlow's filesystem: a walk, then a stat per file
    for folder, _, names in _guard(root, lambda: list(p.walk())):
        for name in names:
            key = os.fspath(folder / name)[len(prefix):]
            if max_depth is None or key.count("/") <= max_depth:
                out[key] = (folder / name).stat().length
    return out


def cache() -> str:
    """tljax's cache, `$TLJAX_CACHE` (default `~/.cache/tljax`): converted weights. May be in
    object storage, shared by the hosts of a pod."""
    return os.environ.get("TLJAX_CACHE") or local_cache()


def local_cache() -> str:
    """This host's own scratch: the XLA compilation cache, downloads, dataset copies.
    `$TLJAX_CACHE` when it is local, else `~/.cache/tljax`."""
    env = os.environ.get("TLJAX_CACHE")
    if env and not is_remote(env):
        return absolute(env)
    return os.path.join(os.path.expanduser("~"), ".cache", "tljax")


def read_text(p) -> str:
    return _guard(p, lambda: path(p).read_text())


def write_text(p, text: str) -> None:
    write_bytes(p, text.encode())


def read_bytes(p) -> bytes:
    return _guard(p, lambda: path(p).read_bytes())


def write_bytes(p, data: bytes) -> None:
    """Write the file `p` whole: a reader (another process) sees the old or the new content,
    never a part (locally through a temporary file and a rename; an object is written at
    once)."""
    if is_remote(p):
        _guard(p, lambda: path(p).write_bytes(data))
        return
    p = absolute(p)
    partial = f"{p}.{os.getpid()}.partial"
    with open(partial, "wb") as f:
        f.write(data)
    os.replace(partial, p)


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
