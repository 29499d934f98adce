"""Argument checks with messages that name the argument and show the bad value."""

from __future__ import annotations

from typing import Any


def check_range(
    name: str,
    value: Any,
    low: float,
    high: float | None = None,
    *,
    high_open: bool = False,
    allow_none: bool = False,
) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``low <= value <= high`` (or ``< high``)."""
    if value is None and allow_none:
        return
    bound = "" if high is None else (f" and < {high}" if high_open else f" and <= {high}")
    message = f"{name} must be >= {low}{bound}, got {value!r}"
    try:
        ok = value >= low and (high is None or (value < high if high_open else value <= high))
    except TypeError as error:
        raise ValueError(message) from error
    if not ok or isinstance(value, bool):
        raise ValueError(message)


def check_int(name: str, value: Any, low: int, *, allow_none: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an integer ``>= low``."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
