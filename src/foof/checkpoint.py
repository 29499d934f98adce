"""Interrupt-safe training: checkpoints and the SIGINT/SIGTERM handling of :func:`foof.train.train`.

A long run killed by Ctrl-C, ``kill`` or a cluster's pre-emption must lose nothing: on the first
SIGINT or SIGTERM :class:`StopSignals` only records the signal; the training loop finishes the
step it is in, saves a checkpoint and the partial results, and raises
:class:`TrainingInterrupted`. Rerunning the same command (same config, same checkpoint path)
resumes from the checkpoint, mid-epoch included, with the same data order and random streams, so
the resumed run takes the same steps an uninterrupted one would have. A second signal while the
checkpoint is being written is left to Python's default behaviour (an immediate
``KeyboardInterrupt``), for a user who really wants out.

Checkpoints are written atomically (temporary file, then ``os.replace``) and loaded with
``torch.load(weights_only=True)``: a checkpoint file cannot run code. They hold only tensors,
numbers, strings and containers of them: model and optimizer ``state_dict`` s, the results so
far, the position in the epoch, and the states of the random generators.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from foof.io import atomic_open

FORMAT = "foof.checkpoint/1"
"""Version tag stored in every checkpoint."""


class CheckpointError(ValueError):
    """A checkpoint cannot be used: unreadable, or made by a different run."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint and the partial results.

    A ``KeyboardInterrupt`` so that code which already stops on Ctrl-C stops on it too.

    Attributes:
        signal_name: ``"SIGINT"`` or ``"SIGTERM"``.
        checkpoint: where the checkpoint was saved (``None`` if the run had no checkpoint
            path).
    """

    def __init__(self, signal_name: str, checkpoint: Path | None) -> None:
        where = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint path given"
        super().__init__(f"stopped by {signal_name}; {where}")
        self.signal_name = signal_name
        self.checkpoint = checkpoint

    @property
    def exit_status(self) -> int:
        """The conventional shell status, 128 + the signal number (130 or 143)."""
        return 128 + int(getattr(signal, self.signal_name))


class StopSignals:
    """Context manager: the first SIGINT/SIGTERM sets :attr:`received` instead of killing.

    Handlers are installed only in the main thread (elsewhere Python forbids it, and the
    context does nothing) and the previous handlers come back on exit. A second signal runs
    the previous handler, e.g. raises ``KeyboardInterrupt`` at once.

    Example:
        >>> with StopSignals() as stop:
        ...     for step in range(3):
        ...         if stop.received:
        ...             break
    """

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.received is not None:
            previous = self._previous.get(number)
            if callable(previous):
                previous(number, frame)
                return
            raise KeyboardInterrupt
        self.received = signal.Signals(number).name

    def __enter__(self) -> StopSignals:
        if self.enabled:
            for name in self.SIGNALS:
                number = getattr(signal, name)
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()


def save(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plus the format tag) to ``path`` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as handle:
        torch.save({"format": FORMAT, **payload}, handle)
    return path


def read(path: str | os.PathLike[str]) -> Any:
    """Read a file written by ``torch.save``: a checkpoint, or an optimizer's ``state_dict()``.

    Loaded with ``weights_only=True`` (the file cannot run code) onto the CPU, from a file
    opened and closed here, so that no handle stays open whatever fails.

    Example:
        >>> opt.load_state_dict(read("opt.pt"))  # doctest: +SKIP

    Raises:
        FileNotFoundError: there is no file at ``path``.
        CheckpointError: the file is truncated, corrupt or not written by foof; the message
            names the file and the way out (torch's own advises ``weights_only=False``).
    """
    path = Path(path)
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except (IsADirectoryError, PermissionError) as error:
        raise CheckpointError(f"checkpoint {path} cannot be read: {error}") from error
    with handle:
        try:
            return torch.load(handle, weights_only=True, map_location="cpu")
        except Exception as error:  # noqa: BLE001 - any unreadable file gets the same advice
            detail = (str(error).strip().splitlines() or [""])[0][:120]
            raise CheckpointError(
                f"checkpoint {path} cannot be read: file truncated or corrupt, or not written "
                f"by foof ({type(error).__name__}: {detail}); delete it to start the run afresh"
            ) from error


def load(path: str | os.PathLike[str], config: dict[str, Any]) -> dict[str, Any]:
    """Read the checkpoint at ``path`` made by the run ``config`` (a ``TrainConfig.to_dict()``).

    Raises:
        CheckpointError: the file is unreadable (see :func:`read`), not a foof checkpoint, or
            was made with a different config (the message names the differing fields and the
            way out).
    """
    path = Path(path)
    payload = read(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint; delete it or pass another")
    saved = payload.get("config", {})
    if saved != config:
        differing = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
        raise CheckpointError(
            f"checkpoint {path} was made by a different run (fields differ: "
            f"{', '.join(differing)}); delete it, or rerun with the config that made it"
        )
    return payload


def generator_states(*generators: torch.Generator | None) -> list[torch.Tensor | None]:
    """The states of ``generators`` (``None`` kept), for :func:`save`."""
    return [None if g is None else g.get_state() for g in generators]


def restore_generators(
    states: list[torch.Tensor | None], *generators: torch.Generator | None
) -> None:
    """Inverse of :func:`generator_states`."""
    for state, generator in zip(states, generators):
        if generator is not None and state is not None:
            generator.set_state(state)
