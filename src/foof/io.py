"""Crash-safe file writes: a reader never sees a half-written result or dataset file."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` that replaces ``path`` only on success.

    The data goes to a hidden temporary file in the same directory (so that the final
    ``os.replace`` is a rename within one file system, which POSIX makes atomic); it is flushed
    and fsynced before the rename. If the ``with`` body raises, the temporary file is removed
    and ``path`` is left as it was.

    Args:
        path: the destination. Its directory must exist.
        mode: ``"w"`` for text (UTF-8) or ``"wb"`` for bytes.

    Yields:
        The open temporary file.

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "note.txt"
        >>> with atomic_open(target) as f:
        ...     _ = f.write("done")
        >>> target.read_text()
        'done'
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        encoding = "utf-8" if mode == "w" else None
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates files readable by the owner only; give the result the usual mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_directory(path.parent)


def write_json_atomic(path: str | os.PathLike[str], obj: Any, indent: int | None = 1) -> Path:
    """Write ``obj`` as strict JSON to ``path`` atomically (see :func:`atomic_open`).

    NaN and infinities are rejected (``allow_nan=False``) because they are not valid JSON and
    other tools would fail to read the file; callers store non-finite numbers as ``None``.

    Args:
        path: the destination file; its directory must exist.
        obj: anything ``json.dump`` accepts.
        indent: passed to ``json.dump``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "r.json"
        >>> _ = write_json_atomic(target, {"loss": [1.0, 0.5]})
        >>> json.loads(target.read_text())
        {'loss': [1.0, 0.5]}
    """
    path = Path(path)
    with atomic_open(path, "w") as handle:
        json.dump(obj, handle, indent=indent, allow_nan=False)
        handle.write("\n")
    return path


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file written by :func:`write_json_atomic`."""
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable. Not possible on every platform (e.g. Windows), and a
    # failure here never corrupts the file, so it is best effort.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
