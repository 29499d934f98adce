"""foof.data.vision, through load_dataset: fake-cifar10 and the missing-dataset messages."""

from __future__ import annotations

import pytest
import torch

from foof.data import DataError, load_dataset


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """No test sees the user's cache or a FOOF_DATA of the caller."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("FOOF_DATA", raising=False)


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


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("cifar10", "cifar-10-batches-py/data_batch_1"),
        ("cifar100", "cifar-100-python/train"),
        ("svhn", "train_32x32.mat"),
    ],
)
def test_missing_vision_dataset_names_the_layout_and_the_fix(tmp_path, name, expected):
    with pytest.raises(DataError) as error:
        load_dataset(name, data_dir=tmp_path / "root")
    message = str(error.value)
    assert f"dataset {name!r} not found" in message and str(tmp_path / "root") in message
    assert f"ROOT/{expected}" in message and "--data-root" in message and "--download" in message


def test_vision_dataset_without_torchvision_says_how_to_install(tmp_path, monkeypatch):
    import builtins

    root = tmp_path / "root"
    for name in ("data_batch_1", "data_batch_5", "test_batch", "batches.meta"):
        (root / "cifar-10-batches-py").mkdir(parents=True, exist_ok=True)
        (root / "cifar-10-batches-py" / name).write_bytes(b"")
    real_import = builtins.__import__

    def no_torchvision(name, *args, **kwargs):
        if name.startswith("torchvision"):
            raise ImportError("No module named 'torchvision'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchvision)
    with pytest.raises(DataError, match=r"needs torchvision .*pip install 'foof\[vision\]'"):
        load_dataset("cifar10", data_dir=root)
