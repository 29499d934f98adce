"""foof.models: shapes, parameter counts, Kaiming-He statistics and supported layer types."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from foof.capture import is_supported
from foof.models import MODELS, TASKS, autoencoder, build_model, mlp, small_cnn

IMAGES = torch.zeros(3, 1, 28, 28)


def linear_count(widths, bias):
    return sum(i * o + (o if bias else 0) for i, o in zip(widths[:-1], widths[1:]))


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: build_model(name) for name in MODELS}


def test_registry_names_and_tasks():
    assert set(MODELS) == {"mlp", "logistic", "autoencoder", "cnn", "wrn18", "vgg11"}
    assert set(TASKS) == set(MODELS)
    assert TASKS["autoencoder"] == "reconstruction"
    with pytest.raises(ValueError, match="mlp, logistic"):
        build_model("resnet")


@pytest.mark.parametrize(
    "name, shape",
    [("mlp", (3, 10)), ("logistic", (3, 10)), ("autoencoder", (3, 784)), ("cnn", (3, 10))],
)
def test_output_shapes(models, name, shape):
    assert models[name](IMAGES).shape == shape


def test_fully_connected_models_accept_flat_inputs(models):
    assert models["mlp"](torch.zeros(3, 784)).shape == (3, 10)
    assert models["autoencoder"](torch.zeros(3, 784)).shape == (3, 784)


def test_parameter_counts(models):
    counts = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    assert counts["mlp"] == linear_count([784, 1000, 1000, 1000, 10], bias=False) == 2_794_000
    assert counts["logistic"] == 7840
    assert counts["autoencoder"] == linear_count(
        [784, 1000, 500, 250, 30, 250, 500, 1000, 784], bias=True
    )
    conv = (1 * 9 + 1) * 32 + (32 * 9 + 1) * 64
    assert counts["cnn"] == conv + linear_count([3136, 128, 10], bias=True)


def test_paper_classifiers_have_no_biases(models):
    for name in ("mlp", "logistic"):
        assert all(m.bias is None for m in models[name].modules() if isinstance(m, nn.Linear))
    with_bias = mlp(hidden=(5,), bias=True)
    assert all(m.bias is not None for m in with_bias.modules() if isinstance(m, nn.Linear))


def test_autoencoder_layout_follows_app_d7():
    model = autoencoder()
    linears = [m for m in model if isinstance(m, nn.Linear)]
    widths = [linears[0].in_features] + [m.out_features for m in linears]
    assert widths == [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    assert all(m.bias is not None for m in linears)
    # tanh after every hidden layer except the 30-unit code; the output is linear.
    layers = [*model, None]
    following = [type(layers[i + 1]).__name__ for i, m in enumerate(model) if m in linears]
    assert following == ["Tanh", "Tanh", "Tanh", "Linear", "Tanh", "Tanh", "Tanh", "NoneType"]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_parametrised_layer_is_supported_by_curvature_optimizers(models, name):
    for module in models[name].modules():
        if isinstance(module, nn.BatchNorm2d):
            continue  # the WRN's BatchNorm: trained by SGD, frozen for FOOF/KFAC (App. D.6)
        if any(True for _ in module.parameters(recurse=False)):
            assert is_supported(module), f"{name}: {type(module).__name__} is not supported"
            assert not isinstance(module, nn.Conv2d) or module.groups == 1


@pytest.mark.parametrize("name", sorted(MODELS))
def test_kaiming_he_initialisation(models, name):
    for module in models[name].modules():
        if not isinstance(module, nn.Linear | nn.Conv2d):
            continue
        weight = module.weight.detach()
        fan_in = weight[0].numel()
        expected = math.sqrt(2.0 / fan_in)
        # The sample std of n normal draws has relative error ~ 1/sqrt(2n).
        tolerance = 5.0 / math.sqrt(2 * weight.numel())
        assert weight.std().item() == pytest.approx(expected, rel=tolerance)
        assert abs(weight.mean().item()) < 5 * expected / math.sqrt(weight.numel())
        if module.bias is not None:
            assert torch.count_nonzero(module.bias) == 0


def test_initialisation_follows_torch_seed():
    torch.manual_seed(5)
    a = small_cnn()
    torch.manual_seed(5)
    b = small_cnn()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_options_and_bad_activation():
    model = build_model("mlp", hidden=(7, 5), activation="tanh", num_classes=3)
    assert model(torch.zeros(2, 784)).shape == (2, 3)
    assert sum(isinstance(m, nn.Tanh) for m in model) == 2
    assert build_model("autoencoder", encoder=(8, 2))(IMAGES).shape == (3, 784)
    with pytest.raises(ValueError, match="relu, tanh"):
        mlp(activation="gelu")
