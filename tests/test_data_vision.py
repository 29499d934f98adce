"""foof.data.vision, through load_dataset: CIFAR-10/100 and SVHN files written here in the real
formats, read back (shapes, dtypes, labels, pixel layout, App. D.6 normalisation), malformed
files refused with a DataError naming them, fake-cifar10, and no torchvision anywhere.

The CIFAR batches are written as the official ones are, Python 2 pickles of protocol 2, by an
opcode writer of their own (:func:`py2_pickle`), independently of the reader under test; the
SVHN files with scipy's MATLAB writer, as the official ones are MATLAB files.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from foof.data import DataError, load_dataset, locate_vision_dataset, read_svhn_mat
from foof.data.vision import RestrictedUnpickler, unpickle_batch

REPO = Path(__file__).resolve().parent.parent

# -- writers of the real formats ---------------------------------------------------------------


def py2_pickle(obj: object) -> bytes:
    """``obj`` as Python 2's cPickle writes it with protocol 2 (how the CIFAR batches were made).

    Handles what the batches hold: dicts with ``str`` keys, lists of ints, ``str`` (a Python 2
    byte string), ints and uint8 numpy arrays. An array is pickled the way numpy 1.x reduces it
    under Python 2: ``numpy.core.multiarray._reconstruct(ndarray, (0,), 'b')`` then a BUILD with
    ``(1, shape, dtype, is_fortran, raw bytes as a Python 2 str)``.
    """

    def string(value: bytes) -> bytes:
        if len(value) < 256:
            return b"U" + bytes([len(value)]) + value  # SHORT_BINSTRING
        return b"T" + struct.pack("<i", len(value)) + value  # BINSTRING

    def integer(value: int) -> bytes:
        if 0 <= value < 256:
            return b"K" + bytes([value])  # BININT1
        return b"J" + struct.pack("<i", value)  # BININT

    def glob(module: str, name: str) -> bytes:
        return b"c" + module.encode() + b"\n" + name.encode() + b"\n"

    def dump(value: object) -> bytes:
        if isinstance(value, dict):
            items = b"".join(dump(k) + dump(v) for k, v in value.items())
            return b"}(" + items + b"u"  # EMPTY_DICT MARK ... SETITEMS
        if isinstance(value, list):
            return b"](" + b"".join(dump(v) for v in value) + b"e"  # EMPTY_LIST MARK ... APPENDS
        if isinstance(value, str):
            return string(value.encode("latin1"))
        if isinstance(value, int):
            return integer(value)
        if isinstance(value, np.ndarray):
            assert value.dtype == np.uint8
            dtype = (
                glob("numpy", "dtype")
                + string(b"u1")
                + integer(0)
                + integer(1)
                + b"\x87R"  # TUPLE3 REDUCE
                + b"("
                + integer(3)
                + string(b"|")
                + b"NNN"
                + struct.pack("<ci", b"J", -1) * 2
                + integer(0)
                + b"tb"  # TUPLE BUILD
            )
            shape = b"(" + b"".join(integer(d) for d in value.shape) + b"t"
            return (
                glob("numpy.core.multiarray", "_reconstruct")
                + glob("numpy", "ndarray")
                + integer(0)
                + b"\x85"  # TUPLE1
                + string(b"b")
                + b"\x87R"
                + b"("
                + integer(1)
                + shape
                + dtype
                + b"\x89"  # NEWFALSE: C order
                + string(np.ascontiguousarray(value).tobytes())
                + b"tb"
            )
        raise TypeError(type(value))

    return b"\x80\x02" + dump(obj) + b"."


def cifar_images(n: int, offset: int) -> np.ndarray:
    """uint8 ``(n, 3, 32, 32)`` images; pixel (0, 0, 0) of image i is ``offset + i``."""
    rng = np.random.default_rng(offset)
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    images[:, 0, 0, 0] = offset + np.arange(n)
    return images


def cifar_row(images: np.ndarray) -> np.ndarray:
    """The batches' ``data`` layout: the red, green and blue 32x32 planes, each row-major."""
    return np.concatenate([images[:, c].reshape(len(images), 1024) for c in range(3)], axis=1)


CIFAR = {
    "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz", 10),
    "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz", 100),
}


def cifar_batches(name: str, per_batch: int = 4) -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    """The files of a tiny CIFAR dataset (``{filename: bytes}``) and the arrays they hold."""
    classes = CIFAR[name][2]
    if name == "cifar10":
        splits = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        meta = {"batches.meta": {"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072}}
    else:
        splits = {"train": ["train"], "test": ["test"]}
        meta = {"meta": {"fine_label_names": [f"f{i}" for i in range(100)]}}
    files = {k: py2_pickle(v) for k, v in meta.items()}
    expected: dict[str, list] = {}
    offset = 0
    for split, batches in splits.items():
        for batch in batches:
            n = per_batch * (5 if name == "cifar100" and split == "train" else 1)
            images = cifar_images(n, offset)
            labels = [(offset + i) * 7 % classes for i in range(n)]
            content = {"batch_label": f"{batch} of tiny", "data": cifar_row(images)}
            content["labels" if name == "cifar10" else "fine_labels"] = labels
            if name == "cifar100":
                content["coarse_labels"] = [label // 5 for label in labels]
            content["filenames"] = [f"img_{offset + i}.png" for i in range(n)]
            files[batch] = py2_pickle(content)
            expected.setdefault(f"x_{split}", []).append(images)
            expected.setdefault(f"y_{split}", []).append(np.asarray(labels))
            offset += n
    return files, {key: np.concatenate(parts) for key, parts in expected.items()}


def write_cifar_dir(root: Path, name: str, files: dict[str, bytes]) -> Path:
    directory = root / CIFAR[name][0]
    directory.mkdir(parents=True, exist_ok=True)
    for filename, content in files.items():
        (directory / filename).write_bytes(content)
    return directory


def write_cifar_archive(root: Path, name: str, files: dict[str, bytes]) -> Path:
    """A ``.tar.gz`` laid out as the published one: a directory entry, a readme, the batches."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / CIFAR[name][1]
    with tarfile.open(path, "w:gz") as archive:
        folder = tarfile.TarInfo(CIFAR[name][0])
        folder.type = tarfile.DIRTYPE
        archive.addfile(folder)
        for filename, content in {"readme.html": b"<html></html>", **files}.items():
            info = tarfile.TarInfo(f"{CIFAR[name][0]}/{filename}")
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return path


def write_svhn(root: Path, sizes: tuple[int, int] = (12, 8)) -> dict[str, np.ndarray]:
    """``train_32x32.mat`` / ``test_32x32.mat`` as published: X ``(32, 32, 3, N)``, y 1-10."""
    root.mkdir(parents=True, exist_ok=True)
    expected = {}
    for split, n in zip(("train", "test"), sizes):
        images = cifar_images(n, 100 if split == "test" else 0)  # (N, C, H, W)
        digits = (np.arange(n) % 10 + 1).astype(np.uint8)  # 1..10; 10 stands for the digit 0
        mat = {"X": images.transpose(2, 3, 1, 0), "y": digits[:, None]}
        scipy.io.savemat(root / f"{split}_32x32.mat", mat, do_compression=True)
        expected[f"x_{split}"], expected[f"y_{split}"] = images, digits % 10
    return expected


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """No test sees the user's cache or a FOOF_DATA of the caller."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("FOOF_DATA", raising=False)


def raw_pixels(x: torch.Tensor) -> np.ndarray:
    return (x * 255).round().to(torch.uint8).numpy()


# -- CIFAR -------------------------------------------------------------------------------------


def test_the_py2_writer_makes_what_python_reads_as_the_official_batches():
    # Guards the test writer itself: plain pickle (with numpy) reads it back as the batches' dict.
    images = cifar_images(2, 0)
    blob = py2_pickle({"data": cifar_row(images), "labels": [3, 300]})
    loaded = pickle.loads(blob, encoding="latin1")
    assert loaded["labels"] == [3, 300]
    np.testing.assert_array_equal(loaded["data"], images.reshape(2, 3072))


@pytest.mark.parametrize("layout", ["archive", "directory"])
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_reads_back_shapes_dtypes_labels_and_pixels(tmp_path, name, layout):
    files, expected = cifar_batches(name)
    write = write_cifar_archive if layout == "archive" else write_cifar_dir
    path = write(tmp_path, name, files)
    data = load_dataset(name, data_dir=tmp_path, normalize=False)
    n_train, n_test = len(expected["y_train"]), len(expected["y_test"])
    assert data.x_train.shape == (n_train, 3, 32, 32) and data.x_test.shape == (n_test, 3, 32, 32)
    assert data.x_train.dtype == data.x_test.dtype == torch.float32
    assert data.y_train.dtype == data.y_test.dtype == torch.int64
    assert data.num_classes == CIFAR[name][2] and data.source == str(path)
    for split in ("train", "test"):
        np.testing.assert_array_equal(
            raw_pixels(getattr(data, f"x_{split}")), expected[f"x_{split}"]
        )
        np.testing.assert_array_equal(getattr(data, f"y_{split}").numpy(), expected[f"y_{split}"])
    # The batches concatenate in order: data_batch_1's first image comes first.
    assert raw_pixels(data.x_train)[:, 0, 0, 0].tolist() == list(range(n_train))


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_is_normalised_per_channel_with_training_statistics(tmp_path, name):
    write_cifar_archive(tmp_path, name, cifar_batches(name)[0])
    raw = load_dataset(name, data_dir=tmp_path, normalize=False)
    data = load_dataset(name, data_dir=tmp_path)
    torch.testing.assert_close(data.x_train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(data.x_train.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-5, rtol=0)
    mean = raw.x_train.mean(dim=(0, 2, 3), keepdim=True)
    std = raw.x_train.std(dim=(0, 2, 3), keepdim=True)
    torch.testing.assert_close(data.x_test, (raw.x_test - mean) / std)  # the train statistics
    assert data.caveats == ""


def test_cifar_subset_draws_from_the_training_set_only(tmp_path):
    write_cifar_dir(tmp_path, "cifar10", cifar_batches("cifar10")[0])
    full = load_dataset("cifar10", data_dir=tmp_path, normalize=False)
    small = load_dataset("cifar10", data_dir=tmp_path, normalize=False, subset=7, seed=2)
    index = raw_pixels(small.x_train)[:, 0, 0, 0].astype(np.int64)
    assert len(set(index.tolist())) == 7
    torch.testing.assert_close(small.y_train, full.y_train[index])
    torch.testing.assert_close(small.x_test, full.x_test)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_batches_re_pickled_by_python3_are_read(tmp_path, protocol):
    files, expected = cifar_batches("cifar10")
    for filename in list(files):
        batch = pickle.loads(files[filename], encoding="latin1")
        files[filename] = pickle.dumps({k.encode(): v for k, v in batch.items()}, protocol)
    write_cifar_dir(tmp_path, "cifar10", files)
    data = load_dataset("cifar10", data_dir=tmp_path, normalize=False)
    np.testing.assert_array_equal(raw_pixels(data.x_test), expected["x_test"])


class _Payload:
    """Pickles to a call of ``os.mkdir``: what an unchecked unpickler would run."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return os.mkdir, (str(self.target),)


def test_a_pickle_naming_any_other_global_is_refused_and_nothing_runs(tmp_path):
    files, _ = cifar_batches("cifar10")
    target = tmp_path / "created-by-the-pickle"
    files["data_batch_2"] = pickle.dumps({"data": _Payload(target), "labels": []}, protocol=2)
    directory = write_cifar_dir(tmp_path / "root", "cifar10", files)
    with pytest.raises(DataError, match=r"refused the global (posix|nt)\.mkdir") as info:
        load_dataset("cifar10", data_dir=tmp_path / "root")
    assert str(directory / "data_batch_2") in str(info.value)
    assert not target.exists()


def test_restricted_unpickler_refuses_object_construction():
    blob = pickle.dumps({"labels": [1], "extra": Path("x")}, protocol=4)
    with pytest.raises(pickle.UnpicklingError, match="refused the global pathlib"):
        RestrictedUnpickler(io.BytesIO(blob), encoding="latin1").load()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ([1, 2, 3], "holds a list, expected a dict"),
        ({"labels": [0]}, "lacks the key 'data'"),
        ({"data": np.zeros((2, 3072), np.uint8)}, "lacks the key 'labels'"),
        ({"data": np.zeros((2, 1024), np.uint8), "labels": [0, 1]}, r"expected a uint8 array"),
        ({"data": np.zeros((2, 3072), np.float32), "labels": [0, 1]}, "dtype float32"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}, "has 1 labels for 2 images"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}, r"holds 0\.\.10"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": ["a", "b"]}, "a list of ints"),
    ],
    ids=["list", "no-data", "no-labels", "shape", "dtype", "count", "range", "strings"],
)
def test_malformed_batches_name_the_file_and_the_problem(tmp_path, content, message):
    files, _ = cifar_batches("cifar10")
    files["test_batch"] = pickle.dumps(content, protocol=2)
    archive = write_cifar_archive(tmp_path, "cifar10", files)
    with pytest.raises(DataError, match=message) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    assert f"{archive} (member cifar-10-batches-py/test_batch)" in str(info.value)


def test_cifar100_needs_its_fine_labels(tmp_path):
    files, _ = cifar_batches("cifar100")
    batch = pickle.loads(files["test"], encoding="latin1")
    batch["labels"] = batch.pop("fine_labels")
    files["test"] = pickle.dumps(batch, protocol=2)
    write_cifar_dir(tmp_path, "cifar100", files)
    with pytest.raises(DataError, match="lacks the key 'fine_labels'"):
        load_dataset("cifar100", data_dir=tmp_path)


def test_not_a_pickle_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="somewhere: not a CIFAR batch"):
        unpickle_batch(b"GIF89a not a pickle", "somewhere")


def test_truncated_archive_names_it(tmp_path):
    archive = write_cifar_archive(tmp_path, "cifar10", cifar_batches("cifar10", per_batch=50)[0])
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated") as info:
        load_dataset("cifar10", data_dir=tmp_path)
    assert str(archive) in str(info.value) and "cifar-10-python.tar.gz from https://" in str(
        info.value
    )


def test_archive_without_a_batch_and_garbage_archive(tmp_path):
    files, _ = cifar_batches("cifar10")
    del files["data_batch_3"]
    archive = write_cifar_archive(tmp_path, "cifar10", files)
    with pytest.raises(DataError, match="lacks cifar-10-batches-py/data_batch_3") as info:
        load_dataset("cifar10", data_dir=tmp_path)
    assert str(archive) in str(info.value)
    archive.write_bytes(b"definitely not a tar file")
    with pytest.raises(DataError, match=f"cannot read {archive}"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_extracted_directory_wins_and_an_incomplete_one_falls_back_to_the_archive(tmp_path):
    files, _ = cifar_batches("cifar10")
    archive = write_cifar_archive(tmp_path, "cifar10", files)
    directory = write_cifar_dir(tmp_path, "cifar10", files)
    assert locate_vision_dataset("cifar10", tmp_path) == directory
    (directory / "data_batch_5").unlink()
    assert locate_vision_dataset("cifar10", tmp_path) == archive
    assert load_dataset("cifar10", data_dir=tmp_path).source == str(archive)
    archive.unlink()
    with pytest.raises(DataError, match=r"incomplete: lacks data_batch_5"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_search_order_data_root_then_env_then_cache(tmp_path, monkeypatch):
    for directory in (tmp_path / "env", tmp_path / "cache" / "foof"):
        write_cifar_archive(directory, "cifar10", cifar_batches("cifar10")[0])
    assert load_dataset("cifar10").source.startswith(str(tmp_path / "cache" / "foof"))
    monkeypatch.setenv("FOOF_DATA", str(tmp_path / "env"))
    assert load_dataset("cifar10").source.startswith(str(tmp_path / "env"))


# -- SVHN --------------------------------------------------------------------------------------


def test_svhn_reads_back_with_label_10_as_digit_0_and_the_layout_transposed(tmp_path):
    expected = write_svhn(tmp_path)
    data = load_dataset("svhn", data_dir=tmp_path, normalize=False)
    assert data.x_train.shape == (12, 3, 32, 32) and data.x_test.shape == (8, 3, 32, 32)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    for split in ("train", "test"):
        np.testing.assert_array_equal(
            raw_pixels(getattr(data, f"x_{split}")), expected[f"x_{split}"]
        )
        np.testing.assert_array_equal(getattr(data, f"y_{split}").numpy(), expected[f"y_{split}"])
    assert data.y_train[9].item() == 0 and data.y_train[0].item() == 1
    mat = scipy.io.loadmat(tmp_path / "train_32x32.mat")
    assert mat["X"][5, 7, 2, 3] == raw_pixels(data.x_train)[3, 2, 5, 7]  # X[h, w, c, n]
    assert data.source == str(tmp_path) and "extra_32x32.mat" in data.caveats


def test_svhn_is_normalised_per_channel(tmp_path):
    write_svhn(tmp_path)
    data = load_dataset("svhn", data_dir=tmp_path)
    torch.testing.assert_close(data.x_train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(data.x_train.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("mat", "message"),
    [
        ({"X": np.zeros((28, 28, 3, 4), np.uint8), "y": np.ones((4, 1))}, r"X has shape \(28, 28"),
        (
            {"X": np.zeros((32, 32, 3), np.uint8), "y": np.ones((1, 1))},
            r"X has shape \(32, 32, 3\)",
        ),
        ({"X": np.zeros((32, 32, 3, 4)), "y": np.ones((4, 1))}, "X has dtype float64"),
        ({"X": np.zeros((32, 32, 3, 4), np.uint8), "y": np.ones((3, 1))}, r"y has shape \(3, 1\)"),
        ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[0], [1]])}, "digits 1-10"),
        ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[1.5], [1]])}, "integer"),
        ({"X": np.zeros((32, 32, 3, 2), np.uint8)}, "lacks the variable y"),
    ],
    ids=["hw", "3d", "dtype", "count", "zero", "fraction", "no-y"],
)
def test_malformed_svhn_mat_names_the_file_and_the_problem(tmp_path, mat, message):
    write_svhn(tmp_path)
    scipy.io.savemat(tmp_path / "test_32x32.mat", mat)
    with pytest.raises(DataError, match=message) as info:
        load_dataset("svhn", data_dir=tmp_path)
    assert str(tmp_path / "test_32x32.mat") in str(info.value)


def test_unreadable_svhn_mat_and_missing_scipy(tmp_path, monkeypatch):
    path = tmp_path / "train_32x32.mat"
    path.write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    with pytest.raises(DataError, match=f"cannot read {path}"):
        read_svhn_mat(path)
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # makes `import scipy.io` fail
    with pytest.raises(DataError, match=r"needs scipy .*pip install 'foof\[svhn\]'"):
        read_svhn_mat(path)


# -- missing data, downloads, fake data --------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("cifar10", ["cifar-10-batches-py/{data_batch_1", "cifar-10-python.tar.gz"]),
        ("cifar100", ["cifar-100-python/{train, test}", "cifar-100-python.tar.gz"]),
        ("svhn", ["train_32x32.mat", "test_32x32.mat"]),
    ],
)
def test_missing_vision_dataset_names_every_path_and_the_fix(tmp_path, name, expected):
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(DataError) as error:
        load_dataset(name, data_dir=root)
    message = str(error.value)
    assert f"dataset {name!r} not found" in message
    for path in expected:
        assert str(root / path) in message
    assert str(tmp_path / "cache" / "foof") + "/ (directory does not exist)" in message
    assert "--data-root" in message and "FOOF_DATA" in message and "--download" in message


def test_download_without_torchvision_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` fail
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(DataError, match=r"--download needs torchvision") as error:
        load_dataset("cifar10", data_dir=tmp_path / "root", download=True)
    assert "pip install 'foof[vision]'" in str(error.value)
    assert "not found" in str(error.value)  # and where it looked


def test_fake_cifar10_is_deterministic_normalised_and_cifar_shaped():
    data = load_dataset("fake-cifar10")
    again = load_dataset("fake-cifar10")
    assert data.x_train.shape == (512, 3, 32, 32) and data.x_test.shape == (256, 3, 32, 32)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert torch.equal(data.x_train, again.x_train) and torch.equal(data.y_test, again.y_test)
    assert sorted(data.y_train.unique().tolist()) == list(range(10)) and data.num_classes == 10
    channel_mean = data.x_train.mean(dim=(0, 2, 3))
    channel_std = data.x_train.std(dim=(0, 2, 3))
    torch.testing.assert_close(channel_mean, torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(channel_std, torch.ones(3), atol=1e-4, rtol=0)
    assert "not CIFAR-10" in data.caveats and data.describe()["num_train"] == 512
    small = load_dataset("fake-cifar10", subset=100, seed=3)
    assert small.x_train.shape[0] == 100 and small.x_test.shape[0] == 256


# -- the command line, without torchvision ----------------------------------------------------

_TRAIN_WITHOUT_TORCHVISION = """
import json, sys
from foof.cli import main
status = main(sys.argv[1:])
print(json.dumps({"status": status, "torchvision": sorted(
    m for m in sys.modules if m.split(".")[0] == "torchvision")}))
"""


@pytest.mark.slow
def test_foof_train_on_a_cifar10_archive_with_data_root_never_imports_torchvision(tmp_path):
    write_cifar_archive(tmp_path / "data", "cifar10", cifar_batches("cifar10", per_batch=8)[0])
    out = tmp_path / "run.json"
    args = ["train", "--dataset", "cifar10", "--data-root", str(tmp_path / "data")]
    args += ["--model", "wrn18", "--model-option", "width=2", "--optimizer", "foof"]
    args += ["--epochs", "1", "--batch-size", "20", "--augment", "--no-progress"]
    args += ["--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("FOOF_DATA", None)
    result = subprocess.run(
        [sys.executable, "-c", _TRAIN_WITHOUT_TORCHVISION, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"status": 0, "torchvision": []}
    results = json.loads(out.read_text())
    assert results["dataset"]["source"] == str(tmp_path / "data" / "cifar-10-python.tar.gz")
    assert results["dataset"]["num_train"] == 40 and results["dataset"]["num_test"] == 8
