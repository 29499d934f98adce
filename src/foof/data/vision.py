"""CIFAR-10, CIFAR-100, SVHN and a fake stand-in as tensors, preprocessed as in App. D.6/D.8.

The real datasets are read natively, from the user's own copies of the standard files, found in
the directories of :func:`foof.data.common.search_dirs` (``data_dir`` / ``--data-root``, else
``$FOOF_DATA``, then the user cache). In one such directory ``DIR``, for each dataset, the first
of these that is complete wins::

    DIR/cifar-10-batches-py/{data_batch_1..data_batch_5, test_batch}    (cifar10, extracted)
    DIR/cifar-10-python.tar.gz                                          (cifar10, the archive)
    DIR/cifar-100-python/{train, test}                                  (cifar100, extracted)
    DIR/cifar-100-python.tar.gz                                         (cifar100, the archive)
    DIR/train_32x32.mat, DIR/test_32x32.mat                             (svhn)

* CIFAR (https://www.cs.toronto.edu/~kriz/cifar.html): each batch is a pickled dict with
  ``data``, a uint8 array ``(N, 3072)`` (1024 red, 1024 green, 1024 blue pixels, each 32x32 in
  row-major order), and the labels, a list of ``N`` integers: ``labels`` (0-9) for CIFAR-10,
  ``fine_labels`` (0-99) for CIFAR-100. The archive is read with :mod:`tarfile` without
  extracting anything. Pickles can run arbitrary code, so they are read by
  :class:`RestrictedUnpickler`, which builds nothing but dicts, lists, strings, numbers and
  numpy arrays; anything else is refused with a :class:`~foof.data.common.DataError`.
* SVHN (http://ufldl.stanford.edu/housenumbers/, the cropped digits, "Format 2"): MATLAB files
  read with :func:`scipy.io.loadmat` (``pip install 'foof[svhn]'``): ``X`` is uint8
  ``(32, 32, 3, N)`` (height, width, channel, image) and ``y`` is ``(N, 1)`` with the digits
  1-9 and 10 for the digit 0, which becomes label 0. ``extra_32x32.mat`` is not read.

torchvision is not needed, except by ``download=True`` (``--download``), which lets
torchvision's dataset classes fetch the files into the first directory searched
(``pip install 'foof[vision]'``, a torchvision build matching your torch); they are then read as
above.

``fake-cifar10`` needs nothing: deterministic generated images of CIFAR's shape (``3x32x32``,
10 classes, 512 training and 256 test images), each a class template plus noise, so that a
network can learn something. It exists for the CPU smoke tests of the conv figures and says so
in its caveats; results on it are no evidence about the paper.

Preprocessing (App. D.6: "The RGB channels are normalised to have zero mean and unit
variance"; App. D.8: the same for SVHN): pixels are scaled to ``[0, 1]`` and each channel is
normalised with the mean and standard deviation of the training split (of the subset, when
``subset`` is given). The augmentation is :func:`foof.data.augment.augment_batch`.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import tarfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from foof.data.common import (
    VISION_DATASETS,
    DataError,
    Dataset,
    check_subset,
    default_cache_dir,
    search_dirs,
    subset_indices,
)

NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10, "fake-cifar10": 10}
"""Classes per dataset."""

CIFAR_ARCHIVES = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}
"""The archive of each CIFAR dataset, as published."""

CIFAR_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
"""The directory each archive extracts to (and the prefix of its members)."""

CIFAR_BATCHES = {
    "cifar10": {
        "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test": ("test_batch",),
    },
    "cifar100": {"train": ("train",), "test": ("test",)},
}
"""The pickled batches of each split, in the order their images are concatenated."""

CIFAR_LABELS = {"cifar10": "labels", "cifar100": "fine_labels"}
"""The key of the labels in each dataset's batches (CIFAR-100: the 100 fine classes)."""

SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
"""SVHN's files of cropped digits, per split."""

SVHN_CAVEAT = (
    "SVHN: train_32x32.mat (73,257 digits) and test_32x32.mat only, without extra_32x32.mat; "
    "the paper does not say whether it trained on the extra digits."
)

FAKE_SIZES = (512, 256)
"""Training and test images of ``fake-cifar10``."""

FAKE_CAVEAT = (
    "fake-cifar10: generated images of CIFAR-10's shape (class template + noise, 512 train / "
    "256 test), not CIFAR-10; a smoke test of the pipeline, no evidence about the paper."
)

_CIFAR_PIXELS = 3 * 32 * 32
_CIFAR_HINT = "Replace it with the original from https://www.cs.toronto.edu/~kriz/cifar.html."
_SOURCES = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar.html",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar.html",
    "svhn": "http://ufldl.stanford.edu/housenumbers/",
}


def load_vision_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    subset: int | None = None,
    seed: int = 0,
    normalize: bool = True,
    download: bool = False,
) -> Dataset:
    """Load one of :data:`~foof.data.common.VISION_DATASETS` as float32 tensors.

    Args:
        name: ``"cifar10"``, ``"cifar100"``, ``"svhn"`` or ``"fake-cifar10"``.
        data_dir: the directory searched first (see the module docstring for the files it may
            hold); defaults to ``$FOOF_DATA``, then the user cache is searched.
        subset: keep only this many training images, drawn without replacement by a
            ``torch.Generator`` seeded with ``seed`` (as :func:`foof.data.load_dataset`).
        seed: seed of the subset draw (``fake-cifar10`` is always generated from seed 0).
        normalize: normalise each channel to zero mean and unit variance (training statistics).
        download: if the dataset is found nowhere, let torchvision download it into the first
            searched directory, then read it as usual.

    Returns:
        A :class:`~foof.data.common.Dataset` with images ``(N, 3, 32, 32)`` and int64 labels
        ``(N,)``.

    Raises:
        DataError: the dataset is not found (the message lists every path searched and the
            fixes), a file is malformed (the message names it and what is wrong), or reading
            needs a missing optional package (scipy for SVHN, torchvision for ``download``).
        ValueError: bad ``name`` or ``subset``.

    Example:
        >>> data = load_vision_dataset("fake-cifar10")
        >>> data.x_train.shape, data.num_classes
        (torch.Size([512, 3, 32, 32]), 10)
    """
    if name not in VISION_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(VISION_DATASETS)}")
    check_subset(subset)
    if name == "fake-cifar10":
        arrays, source, caveats = fake_cifar10(), "generated by foof.data.vision", FAKE_CAVEAT
    else:
        dirs = search_dirs(data_dir)
        found = next((p for d in dirs if (p := locate_vision_dataset(name, d)) is not None), None)
        if found is None:
            if not download:
                raise DataError(missing_message(name, dirs))
            found = _download(name, dirs)
        arrays = {key: _as_tensor(value) for key, value in read_vision_dataset(name, found).items()}
        source, caveats = str(found), SVHN_CAVEAT if name == "svhn" else ""
    x_train, y_train = arrays["x_train"], arrays["y_train"]
    if subset is not None:
        keep = subset_indices(len(x_train), subset, seed, name)
        x_train, y_train = x_train[keep], y_train[keep]
    x_test = arrays["x_test"]
    if normalize:
        mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
        std = x_train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    return Dataset(
        name=name,
        x_train=x_train.contiguous(),
        y_train=y_train,
        x_test=x_test.contiguous(),
        y_test=arrays["y_test"],
        source=source,
        caveats=caveats,
        num_classes=NUM_CLASSES[name],
    )


def locate_vision_dataset(name: str, directory: str | os.PathLike[str]) -> Path | None:
    """Where ``directory`` holds dataset ``name`` in a layout of the module docstring, or None.

    Args:
        name: ``"cifar10"``, ``"cifar100"`` or ``"svhn"``.
        directory: the directory to look in.

    Returns:
        The complete extracted CIFAR directory, else the CIFAR archive; for SVHN ``directory``
        itself when it holds both ``.mat`` files.
    """
    directory = Path(directory)
    if name == "svhn":
        return directory if all((directory / f).is_file() for f in SVHN_FILES.values()) else None
    if name not in CIFAR_DIRS:
        raise ValueError(f"{name!r} is not read from files; choose cifar10, cifar100 or svhn")
    extracted = directory / CIFAR_DIRS[name]
    if not _missing_batches(name, extracted):
        return extracted
    archive = directory / CIFAR_ARCHIVES[name]
    return archive if archive.is_file() else None


def read_vision_dataset(name: str, path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read and check the raw arrays of a located CIFAR or SVHN dataset.

    Args:
        name: ``"cifar10"``, ``"cifar100"`` or ``"svhn"``.
        path: as returned by :func:`locate_vision_dataset`.

    Returns:
        ``x_train``, ``x_test``: uint8 images ``(N, 3, 32, 32)``; ``y_train``, ``y_test``: int64
        labels ``(N,)`` in ``[0, num_classes)``.

    Raises:
        DataError: a file is unreadable or malformed; the message names it and what is wrong.
    """
    path = Path(path)
    if name == "svhn":
        arrays = {}
        for split, filename in SVHN_FILES.items():
            arrays[f"x_{split}"], arrays[f"y_{split}"] = read_svhn_mat(path / filename)
        return arrays
    if path.is_dir():
        members = {m: _read_file(path / m, name) for m in _batch_names(name)}
        where = {m: str(path / m) for m in members}
    else:
        members = _read_archive(path, name)
        where = {m: f"{path} (member {CIFAR_DIRS[name]}/{m})" for m in members}
    arrays = {}
    for split, batches in CIFAR_BATCHES[name].items():
        parts = [_cifar_batch(members[b], where[b], name) for b in batches]
        arrays[f"x_{split}"] = np.concatenate([x for x, _ in parts])
        arrays[f"y_{split}"] = np.concatenate([y for _, y in parts])
    return arrays


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds only plain data and numpy arrays, for CIFAR's batches.

    Python's pickle calls whatever global a file names, so an unchecked pickle can run any code.
    This one resolves only numpy's own reconstruction functions for arrays, dtypes and scalars
    (in their numpy 1 and numpy 2 module paths) and ``_codecs.encode`` with latin-1, which
    protocol-2 pickles written by Python 3 use for bytes. Dicts, lists, tuples, strings, bytes,
    numbers and ``None`` need no global. Everything else raises ``pickle.UnpicklingError``.

    Example:
        >>> blob = pickle.dumps({"labels": [1, 2]}, protocol=2)
        >>> RestrictedUnpickler(io.BytesIO(blob), encoding="latin1").load()
        {'labels': [1, 2]}
    """

    def find_class(self, module: str, name: str) -> Any:
        """The allowed object called ``module.name``; refuse every other global."""
        allowed = _allowed_globals().get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(
                f"refused the global {module}.{name}: a CIFAR batch holds only dicts, lists and "
                "numpy arrays"
            )
        return allowed


def unpickle_batch(raw: bytes, source: str) -> dict[str, Any]:
    """Unpickle one CIFAR batch with :class:`RestrictedUnpickler`.

    The official batches were written by Python 2; ``encoding="latin1"`` turns their byte
    strings into ``str`` (keys such as ``"data"``) and lets numpy restore the pixel bytes.

    Args:
        raw: the pickle's bytes.
        source: the file (or archive member) they came from, for error messages.

    Returns:
        The dict, its ``bytes`` keys (as Python 3 writes them) decoded to ``str``.

    Raises:
        DataError: ``raw`` is not a pickle, names a refused global, or is not a dict.
    """
    try:
        batch = RestrictedUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise DataError(f"{source}: not a CIFAR batch ({error}). {_CIFAR_HINT}") from error
    if not isinstance(batch, dict):
        raise DataError(
            f"{source}: holds a {type(batch).__name__}, expected a dict of arrays and lists. "
            f"{_CIFAR_HINT}"
        )
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}


def read_svhn_mat(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read one of SVHN's ``*_32x32.mat`` files with :func:`scipy.io.loadmat`.

    Args:
        path: ``train_32x32.mat`` or ``test_32x32.mat``.

    Returns:
        uint8 images ``(N, 3, 32, 32)`` (from ``X``, ``(32, 32, 3, N)``) and int64 labels
        ``(N,)`` (from ``y``, digits 1-10, with 10 mapped to 0).

    Raises:
        DataError: scipy is missing, or the file is unreadable or malformed.
    """
    path = Path(path)
    try:
        from scipy.io import loadmat  # optional: pip install 'foof[svhn]'
    except ImportError as error:
        raise DataError(
            f"reading {path} needs scipy ({error}); install it with `pip install 'foof[svhn]'`"
        ) from error
    try:
        mat = loadmat(path, variable_names=("X", "y"))
    # scipy's MAT readers raise many types for a damaged file (ValueError, OSError, zlib.error,
    # MatReadError, ...); all of them mean the same here, and the cause is kept.
    except Exception as error:
        raise DataError(f"cannot read {path}: {error}. {_hint(path, 'svhn')}") from error
    x, y = mat.get("X"), mat.get("y")
    problem = None
    if x is None or y is None:
        problem = f"lacks the variable {'X' if x is None else 'y'} (it has {_keys(mat)})"
    elif x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        problem = f"X has shape {x.shape}, expected (32, 32, 3, N)"
    elif x.dtype != np.uint8:
        problem = f"X has dtype {x.dtype}, expected uint8 pixels"
    elif y.size != x.shape[3] or y.ndim > 2:
        problem = f"y has shape {y.shape}, expected ({x.shape[3]}, 1), one label per image"
    else:
        labels = y.reshape(-1)
        if not np.issubdtype(labels.dtype, np.number) or np.any(labels != np.round(labels)):
            problem = f"y has dtype {y.dtype}, expected integer digits 1-10"
        elif labels.size and (labels.min() < 1 or labels.max() > 10):
            problem = f"y holds {labels.min()}..{labels.max()}, expected the digits 1-10"
    if problem is not None:
        raise DataError(f"{path}: {problem}. {_hint(path, 'svhn')}")
    labels = y.reshape(-1).astype(np.int64)
    labels[labels == 10] = 0  # SVHN writes the digit 0 as 10
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), labels


def fake_cifar10(sizes: tuple[int, int] = FAKE_SIZES, seed: int = 0) -> dict[str, Tensor]:
    """Deterministic CIFAR-shaped data: ``x = clamp(template[y] + noise)`` in ``[0, 1]``.

    Each of the 10 classes has a smooth random template (8x8 noise upsampled to 32x32); an image
    is its class template plus pixel noise of standard deviation 0.25, so classes are separable
    but not trivially.

    Args:
        sizes: numbers of training and test images.
        seed: seed of the ``torch.Generator`` everything is drawn from.

    Returns:
        ``x_train``, ``x_test``: float32 ``(N, 3, 32, 32)``; ``y_train``, ``y_test``: int64
        ``(N,)`` (balanced classes in a shuffled order).
    """
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(10, 3, 8, 8, generator=generator)
    templates = torch.nn.functional.interpolate(coarse, size=32, mode="bilinear")
    arrays = {}
    for split, size in zip(("train", "test"), sizes):
        labels = torch.arange(size) % 10
        labels = labels[torch.randperm(size, generator=generator)]
        noise = 0.25 * torch.randn(size, 3, 32, 32, generator=generator)
        arrays[f"x_{split}"] = (templates[labels] + noise).clamp_(0.0, 1.0)
        arrays[f"y_{split}"] = labels.to(torch.int64)
    return arrays


def missing_message(name: str, dirs: list[Path]) -> str:
    """What :func:`load_vision_dataset` says when ``name`` is found in none of ``dirs``.

    Args:
        name: ``"cifar10"``, ``"cifar100"`` or ``"svhn"``.
        dirs: the directories searched, in order.

    Returns:
        Every path looked at with what was wrong with it, and how to provide the files.
    """
    lines = [f"dataset {name!r} not found. Searched:"]
    for directory in dirs:
        if not directory.is_dir():
            lines.append(f"  {directory}/ (directory does not exist)")
            continue
        if name == "svhn":
            lines += [f"  {directory / f}" for f in SVHN_FILES.values()]
            continue
        extracted = directory / CIFAR_DIRS[name]
        missing = _missing_batches(name, extracted)
        state = "" if not extracted.is_dir() else f" (incomplete: lacks {', '.join(missing)})"
        lines.append(f"  {extracted}/{{{', '.join(_batch_names(name))}}}{state}")
        lines.append(f"  {directory / CIFAR_ARCHIVES[name]}")
    files = (
        " and ".join(SVHN_FILES.values())
        if name == "svhn"
        else f"{CIFAR_ARCHIVES[name]} (or the {CIFAR_DIRS[name]}/ directory it extracts to)"
    )
    lines.append(
        f"To get it: put {files}, from {_SOURCES[name]}, into a directory and pass it with "
        "--data-root (data_dir=...) or set FOOF_DATA; or add --download (download=True; needs "
        f"torchvision: pip install 'foof[vision]') to fetch it into "
        f"{dirs[0] if dirs else default_cache_dir()}."
    )
    return "\n".join(lines)


def _batch_names(name: str) -> tuple[str, ...]:
    return tuple(b for batches in CIFAR_BATCHES[name].values() for b in batches)


def _missing_batches(name: str, extracted: Path) -> list[str]:
    return [b for b in _batch_names(name) if not (extracted / b).is_file()]


def _read_file(path: Path, name: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise DataError(f"cannot read {path}: {error}. {_hint(path, name)}") from error


def _read_archive(path: Path, name: str) -> dict[str, bytes]:
    """The batches of a CIFAR archive, read member by member in one pass (nothing extracted)."""
    prefix = CIFAR_DIRS[name] + "/"
    wanted = set(_batch_names(name))
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                inside = member.name.removeprefix("./")
                batch = inside[len(prefix) :] if inside.startswith(prefix) else None
                if batch not in wanted:
                    continue
                handle = archive.extractfile(member) if member.isfile() else None
                if handle is None:
                    raise DataError(f"{path}: member {member.name} is not a regular file")
                found[batch] = handle.read()
                if len(found) == len(wanted):
                    break
    except DataError:
        raise
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise DataError(
            f"cannot read {path}: {error} (the archive is truncated or corrupt). "
            f"{_hint(path, name)}"
        ) from error
    missing = [prefix + b for b in _batch_names(name) if b not in found]
    if missing:
        raise DataError(
            f"{path} lacks {', '.join(missing)}: it is truncated or not {CIFAR_ARCHIVES[name]}. "
            f"{_hint(path, name)}"
        )
    return found


def _cifar_batch(raw: bytes, source: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 3, 32, 32)`` and labels ``(N,)`` of one batch, checked."""
    batch = unpickle_batch(raw, source)
    label_key = CIFAR_LABELS[name]
    missing = [key for key in ("data", label_key) if key not in batch]
    if missing:
        raise DataError(
            f"{source}: lacks the key {' and '.join(map(repr, missing))} (it has "
            f"{_keys(batch)}). {_CIFAR_HINT}"
        )
    data, labels = batch["data"], batch[label_key]
    problem = None
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != _CIFAR_PIXELS:
        problem = f"'data' is {_describe(data)}, expected a uint8 array (N, {_CIFAR_PIXELS})"
    elif data.dtype != np.uint8:
        problem = f"'data' has dtype {data.dtype}, expected uint8 pixels"
    else:
        labels = np.asarray(labels) if isinstance(labels, (list, np.ndarray)) else None
        classes = NUM_CLASSES[name]
        if labels is None or labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            problem = f"{label_key!r} is {_describe(batch[label_key])}, expected a list of ints"
        elif len(labels) != len(data):
            problem = f"{label_key!r} has {len(labels)} labels for {len(data)} images"
        elif labels.size and (labels.min() < 0 or labels.max() >= classes):
            problem = (
                f"{label_key!r} holds {labels.min()}..{labels.max()}, expected 0..{classes - 1}"
            )
    if problem is not None:
        raise DataError(f"{source}: {problem}. {_CIFAR_HINT}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _download(name: str, dirs: list[Path]) -> Path:
    """Let torchvision fetch ``name`` into ``dirs[0]``; return where it now is."""
    root = dirs[0]
    try:
        import torchvision.datasets as tv  # optional, only for downloading: 'foof[vision]'
    # torchvision's wheel can fail to import with a RuntimeError next to a torch build it was
    # not made for ("operator torchvision::nms does not exist"), not only an ImportError.
    except Exception as error:
        raise DataError(
            f"{missing_message(name, dirs)}\n--download needs torchvision, which did not "
            f"import ({error}); install a build matching your torch (pip install "
            "'foof[vision]'), or download the files yourself."
        ) from error
    try:
        root.mkdir(parents=True, exist_ok=True)
        if name == "svhn":
            for split in SVHN_FILES:
                tv.SVHN(str(root), split=split, download=True)
        else:
            cls = tv.CIFAR10 if name == "cifar10" else tv.CIFAR100
            cls(str(root), train=True, download=True)
    except Exception as error:  # network, checksum and disk errors alike; the cause is kept
        raise DataError(f"downloading {name!r} into {root} failed: {error}") from error
    found = locate_vision_dataset(name, root)
    if found is None:
        raise DataError(f"torchvision downloaded {name!r}, but {missing_message(name, [root])}")
    return found


def _as_tensor(array: np.ndarray | Tensor) -> Tensor:
    if isinstance(array, Tensor):
        return array
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.to(torch.float32).div_(255.0) if array.dtype == np.uint8 else tensor


@functools.cache
def _allowed_globals() -> Mapping[tuple[str, str], Any]:
    try:  # numpy >= 2 keeps its internals in numpy._core; older pickles name numpy.core
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray}
    allowed[("numpy", "dtype")] = np.dtype
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    allowed[("_codecs", "encode")] = _latin1_encode
    return allowed


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes (latin-1), and nothing more."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape} and dtype {value.dtype}"
    return f"a {type(value).__name__}"


def _keys(mapping: Mapping[str, Any]) -> str:
    return ", ".join(repr(k) for k in mapping if not str(k).startswith("__")) or "none"


def _hint(path: Path, name: str) -> str:
    original = " / ".join(SVHN_FILES.values()) if name == "svhn" else CIFAR_ARCHIVES[name]
    return f"Replace {path} with the original {original} from {_SOURCES[name]}."
