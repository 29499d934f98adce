"""The tuned hyperparameters that ``foof reproduce`` uses, kept in ``hyperparameters.json``.

The file maps a key (``"<figure>/<run label>"``, or the key a run shares, e.g. Fig. 1B's natural
gradient uses ``"1A/fashion-mnist-natural"``) to one entry per mode::

    {"1D/kfac": {"standard": {"values": {"lr": 0.1, "damping": 0.0001},
                              "objective": 0.0123, "budget_epochs": 30, "epochs": 100,
                              "seeds": 1, "grid": [{"lr": ..., "damping": ..., "loss": ...}, ...],
                              "command": "foof tune 1D --method kfac --mode standard ...",
                              "note": "...", "updated": "2025-..."}}}

``foof tune`` writes entries (:func:`save_entry`); :func:`lookup` reads them: a run in ``quick``
mode takes the ``quick`` entry if there is one, else the ``standard`` one; without any entry the
figure spec's own values (the paper's Table D.4 where it has them) are used.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from foof.io import read_json, write_json_atomic

DEFAULT_PATH = Path(__file__).with_name("hyperparameters.json")
"""The committed file, inside the package."""


def path_from_env() -> Path:
    """``$FOOF_HYPERPARAMETERS`` if set, else :data:`DEFAULT_PATH`."""
    return Path(os.environ.get("FOOF_HYPERPARAMETERS") or DEFAULT_PATH)


def load(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """All entries of the file (``{}`` if it does not exist)."""
    path = Path(path) if path is not None else path_from_env()
    if not path.is_file():
        return {}
    data = read_json(path)
    return data.get("entries", {})


def lookup(
    entries: dict[str, Any], key: str, mode: str
) -> tuple[dict[str, Any], dict[str, Any] | None, str | None]:
    """The tuned values for ``key`` in ``mode``.

    Args:
        entries: as returned by :func:`load`.
        key: ``"<figure>/<label>"``.
        mode: ``"quick"`` or ``"standard"``.

    Returns:
        ``(values, entry, entry_mode)``: the hyperparameters (``{}`` if none), the whole entry
        and the mode it was tuned in (``None`` if none).
    """
    modes = entries.get(key, {})
    for candidate in (mode, "standard"):
        if candidate in modes:
            entry = modes[candidate]
            return dict(entry.get("values", {})), entry, candidate
    return {}, None, None


def save_entry(
    key: str, mode: str, entry: dict[str, Any], path: str | os.PathLike[str] | None = None
) -> Path:
    """Store ``entry`` under ``key``/``mode`` (atomically, other entries kept).

    Concurrent ``foof tune`` processes serialise their read-modify-write on a lock file next to
    ``path`` (POSIX ``flock``; elsewhere unlocked), so none loses another's entry.
    """
    path = Path(path) if path is not None else path_from_env()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.with_name(f".{path.name}.lock")):
        return _save_entry(key, mode, entry, path)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _save_entry(key: str, mode: str, entry: dict[str, Any], path: Path) -> Path:
    data = read_json(path) if path.is_file() else {}
    data.setdefault(
        "about",
        "Hyperparameters chosen by `foof tune` (App. D.2 grid search, best final training loss). "
        "Each entry records its grid, budget and the command that regenerates it.",
    )
    entries = data.setdefault("entries", {})
    entries.setdefault(key, {})[mode] = entry
    data["entries"] = {k: entries[k] for k in sorted(entries)}
    return write_json_atomic(path, data)
