"""The networks of the paper's MNIST / Fashion-MNIST experiments, and a small CNN.

Every model is an ``nn.Sequential`` whose only parametrised layers are ``nn.Linear`` and
ungrouped ``nn.Conv2d``, the layer types foof's curvature optimizers precondition (plus, in
the Wide ResNet of :mod:`foof.conv_models`, BatchNorm, which FOOF and KFAC leave untrained).
Weights use Kaiming-He initialisation (normal, fan-in, ReLU gain: ``std = sqrt(2 / fan_in)``)
as the paper states for all its models (App. D); biases start at zero.

All models defined here take images of shape ``(N, 1, 28, 28)`` (or already flat ``(N, 784)``
for the fully connected ones); ``wrn18`` and ``vgg11`` take ``(N, 3, 32, 32)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from foof.conv_models import vgg11, wide_resnet18

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}


def he_init_(model: nn.Module) -> nn.Module:
    r"""Kaiming-He initialise every Linear and Conv2d layer of ``model`` in place.

    Weights are drawn from :math:`\mathcal N(0, 2 / \text{fan\_in})` (``fan_in`` = inputs per
    output unit, ``C_in·kh·kw`` for a convolution); biases are set to zero.

    Args:
        model: any module; other layer types are left alone.

    Returns:
        ``model``, for chaining.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model


def mlp(
    input_dim: int = 784,
    hidden: Sequence[int] = (1000, 1000, 1000),
    num_classes: int = 10,
    bias: bool = False,
    activation: str = "relu",
) -> nn.Sequential:
    """The paper's fully connected classifier: 3 hidden layers of 1000 units, no biases (App. D.5).

    Args:
        input_dim: flattened input size (784 for 28x28 images).
        hidden: widths of the hidden layers; ``()`` gives logistic regression.
        num_classes: number of logits.
        bias: give every Linear layer a bias (the paper omits them).
        activation: ``"relu"`` or ``"tanh"``.

    Returns:
        ``Flatten → [Linear → activation] * len(hidden) → Linear``, mapping ``(N, 1, 28, 28)``
        (or ``(N, input_dim)``) to logits ``(N, num_classes)``.

    Example:
        >>> import torch
        >>> mlp(hidden=(100,))(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"unknown activation {activation!r}; choose one of {', '.join(_ACTIVATIONS)}"
        )
    widths = [input_dim, *hidden, num_classes]
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(fan_in, fan_out, bias=bias))
        if i < len(widths) - 2:
            layers.append(_ACTIVATIONS[activation]())
    return he_init_(nn.Sequential(*layers))


def logistic_regression(
    input_dim: int = 784, num_classes: int = 10, bias: bool = False
) -> nn.Sequential:
    """A network without hidden layer, i.e. multinomial logistic regression (Fig. 2A).

    Args:
        input_dim: flattened input size.
        num_classes: number of logits.
        bias: add a bias (the paper omits it).

    Returns:
        ``Flatten → Linear``, mapping ``(N, 1, 28, 28)`` to logits ``(N, num_classes)``.
    """
    return mlp(input_dim=input_dim, hidden=(), num_classes=num_classes, bias=bias)


def autoencoder(
    input_dim: int = 784,
    encoder: Sequence[int] = (1000, 500, 250, 30),
    bias: bool = True,
    activation: str = "tanh",
) -> nn.Sequential:
    """The deep autoencoder of App. D.7 (after Martens & Grosse, 2015, and tensorflow/kfac).

    Layers ``784-1000-500-250-30-250-500-1000-784``; every hidden layer except the 30-unit code
    is followed by ``tanh``, and the output is linear (a reconstruction of the normalised
    pixels, to be compared with a squared error, see :mod:`foof.train`). The layers have biases,
    as in the tensorflow/kfac example the paper replicates (its classifiers are the ones without
    biases).

    Args:
        input_dim: number of pixels ``d``.
        encoder: widths of the encoder layers; the decoder mirrors them (without the code).
        bias: give every layer a bias.
        activation: nonlinearity of the hidden layers, ``"tanh"`` or ``"relu"``.

    Returns:
        A model mapping ``(N, 1, 28, 28)`` (or ``(N, input_dim)``) to ``(N, input_dim)``.

    Example:
        >>> import torch
        >>> autoencoder()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 784])
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"unknown activation {activation!r}; choose one of {', '.join(_ACTIVATIONS)}"
        )
    if not encoder:
        raise ValueError("encoder needs at least one layer (the code)")
    widths = [input_dim, *encoder, *reversed(encoder[:-1]), input_dim]
    code_layer = len(encoder) - 1
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(fan_in, fan_out, bias=bias))
        if i != code_layer and i < len(widths) - 2:
            layers.append(_ACTIVATIONS[activation]())
    return he_init_(nn.Sequential(*layers))


def small_cnn(num_classes: int = 10, in_channels: int = 1) -> nn.Sequential:
    """A small convolutional classifier for 28x28 images (not from the paper).

    ``conv 3x3 (32) → ReLU → maxpool 2 → conv 3x3 (64) → ReLU → maxpool 2 → Linear 3136→128 →
    ReLU → Linear 128→num_classes``, with biases and without BatchNorm, so that every
    parametrised layer is one FOOF and KFAC precondition.

    Args:
        num_classes: number of logits.
        in_channels: image channels.

    Returns:
        A model mapping ``(N, in_channels, 28, 28)`` to logits ``(N, num_classes)``.

    Example:
        >>> import torch
        >>> small_cnn()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    model = nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )
    return he_init_(model)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "logistic": logistic_regression,
    "autoencoder": autoencoder,
    "cnn": small_cnn,
    "wrn18": wide_resnet18,
    "vgg11": vgg11,
}
"""Model factories by name, for configs and the command line (``wrn18`` and ``vgg11`` are the
CIFAR/SVHN networks of :mod:`foof.conv_models`)."""

TASKS: dict[str, str] = {
    "mlp": "classification",
    "logistic": "classification",
    "autoencoder": "reconstruction",
    "cnn": "classification",
    "wrn18": "classification",
    "vgg11": "classification",
}
"""What each model is trained for: ``"classification"`` (cross-entropy on labels) or
``"reconstruction"`` (squared error on its own input)."""


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Construct the model called ``name`` (a key of :data:`MODELS`).

    Args:
        name: ``"mlp"``, ``"logistic"``, ``"autoencoder"``, ``"cnn"``, ``"wrn18"`` or ``"vgg11"``.
        **kwargs: arguments of that factory, e.g. ``hidden=(100,)`` for ``"mlp"``.

    Returns:
        The freshly initialised model (its init draws from torch's global RNG).

    Example:
        >>> build_model("mlp", hidden=(10,))
        Sequential(
          (0): Flatten(start_dim=1, end_dim=-1)
          (1): Linear(in_features=784, out_features=10, bias=False)
          (2): ReLU()
          (3): Linear(in_features=10, out_features=10, bias=False)
        )
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name](**kwargs)
