"""What every loader of :mod:`foof.data` shares: the dataset type, the error, the search path.

The directories searched for data, in order (the first directory holding a dataset wins):

1. ``data_dir`` if given (``--data-dir`` / ``--data-root``), else ``$FOOF_DATA``;
2. the user cache, ``$XDG_CACHE_HOME/foof`` or ``~/.cache/foof``.

Each loader (:mod:`foof.data.mnist`, :mod:`foof.data.vision`) says which files it accepts inside
such a directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

DATASETS = ("fashion-mnist", "mnist")
"""The MNIST-family datasets (:mod:`foof.data.mnist`; ``foof data`` manages them)."""

VISION_DATASETS = ("cifar10", "cifar100", "svhn", "fake-cifar10")
"""The conv experiments' datasets (:mod:`foof.data.vision`)."""

ALL_DATASETS = DATASETS + VISION_DATASETS
"""Names accepted by :func:`foof.data.load_dataset`."""


class DataError(RuntimeError):
    """A dataset is missing, unreadable or malformed. The message says where and what to do."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """An image classification dataset held in memory.

    Attributes:
        name: a name of :data:`ALL_DATASETS`.
        x_train: float32 images, shape ``(N_train, 1, 28, 28)`` (``(N_train, 3, 32, 32)`` for
            the vision datasets).
        y_train: int64 labels in ``[0, num_classes)``, shape ``(N_train,)``.
        x_test: float32 images, shape ``(N_test, 1, 28, 28)`` (or ``(N_test, 3, 32, 32)``).
        y_test: int64 labels, shape ``(N_test,)``.
        source: the file or directory the data came from.
        caveats: deviations from the paper's data, to state next to any result ("" if none).
        num_classes: number of classes (10; 100 for CIFAR-100).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    source: str
    caveats: str
    num_classes: int = 10

    def describe(self) -> dict[str, object]:
        """JSON-ready summary: name, source, caveats and split sizes."""
        return {
            "name": self.name,
            "source": self.source,
            "caveats": self.caveats,
            "num_train": len(self.y_train),
            "num_test": len(self.y_test),
        }


def default_cache_dir() -> Path:
    """The user cache for datasets: ``$XDG_CACHE_HOME/foof``, else ``~/.cache/foof``."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "foof"


def search_dirs(data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The directories the loaders search, in order.

    Args:
        data_dir: an explicit data directory; it replaces ``$FOOF_DATA``.

    Returns:
        ``[data_dir or $FOOF_DATA (if either is set), user cache]``.
    """
    dirs = []
    explicit = data_dir if data_dir is not None else os.environ.get("FOOF_DATA") or None
    if explicit is not None:
        dirs.append(Path(explicit).expanduser())
    dirs.append(default_cache_dir())
    return dirs


def check_subset(subset: int | None) -> None:
    """Raise ``ValueError`` unless ``subset`` is None or a positive integer."""
    if subset is not None and (isinstance(subset, bool) or int(subset) != subset or subset < 1):
        raise ValueError(f"subset must be a positive integer or None, got {subset!r}")


def subset_indices(num_images: int, subset: int, seed: int, name: str) -> torch.Tensor:
    """The ``subset`` training images a subset keeps: a permutation seeded with ``seed``, cut.

    Every loader draws its subsets here, so a subset means the same images whatever the format.

    Args:
        num_images: training images available ``N``.
        subset: images to keep ``n <= N``.
        seed: seed of the permutation's ``torch.Generator``.
        name: the dataset, for the error message.

    Returns:
        int64 indices into the training set, shape ``(subset,)``.

    Raises:
        ValueError: ``subset`` exceeds the ``num_images`` training images of ``name``.
    """
    if subset > num_images:
        raise ValueError(f"subset={subset} exceeds the {num_images} training images of {name}")
    return torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))[:subset]


def check_name(name: str) -> None:
    """Raise ``ValueError`` naming the choices unless ``name`` is one of :data:`ALL_DATASETS`."""
    if name not in ALL_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(ALL_DATASETS)}")
