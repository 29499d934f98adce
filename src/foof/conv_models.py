"""The convolutional networks of the paper's CIFAR and SVHN experiments (App. D.6, D.8).

* :func:`wide_resnet18` — the "Wide ResNet18" of Fig. 5 and J.12-J.16, with or without
  BatchNorm (App. D.6);
* :func:`vgg11` — VGG11 without BatchNorm, the SVHN network of J.17/J.18 (App. D.8).

Both take images ``(N, 3, 32, 32)`` and use only ``nn.Conv2d`` (ungrouped), ``nn.Linear`` and
``nn.BatchNorm2d`` as parametrised layers, so that foof's curvature optimizers precondition every
convolution and dense layer. The paper does not give the networks' widths; ``width`` is the
number of channels of the first stage (64 gives the usual CIFAR ResNet-18 with 11.2M parameters
and the usual CIFAR VGG11 with 9.2M) and tests build tiny versions with ``width=4``.

BatchNorm and the curvature optimizers (App. D.6): "For FOOF and KFAC we include batch norm
parameters, but do not train them". ``train_norm=False`` keeps the BatchNorm layers (their
running statistics still update in training mode) but sets ``requires_grad=False`` on their
scale and shift, so no optimizer updates them; the SGD baseline keeps the default
``train_norm=True``.
"""

from __future__ import annotations

from torch import Tensor, nn

VGG11_STAGES: tuple[tuple[int, ...], ...] = ((1,), (2,), (4, 4), (8, 8), (8, 8))
"""VGG11's convolutions as multiples of ``width``, grouped by the max-pooling that ends a stage."""

RESNET18_BLOCKS = (2, 2, 2, 2)
"""Basic blocks per stage of ResNet-18; stage ``s`` has ``width·2^s`` channels."""


class BasicBlock(nn.Module):
    """The residual block of ResNet-18: ``relu(branch(x) + shortcut(x))``.

    ``branch`` is conv 3x3 (stride) → [BN] → ReLU → conv 3x3 → [BN]; ``shortcut`` is the
    identity, or a 1x1 convolution (stride) → [BN] where the shape changes.

    Args:
        in_channels: channels of the input.
        channels: channels of the output.
        stride: stride of the first convolution and the shortcut.
        batch_norm: insert BatchNorm after every convolution (convolutions then have no bias).
    """

    def __init__(self, in_channels: int, channels: int, stride: int, batch_norm: bool) -> None:
        super().__init__()
        bias = not batch_norm
        self.branch = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=bias),
            *_norm(channels, batch_norm),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=bias),
            *_norm(channels, batch_norm),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=bias),
                *_norm(channels, batch_norm),
            )
        self.activation = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """``(N, in_channels, H, W)`` → ``(N, channels, H/stride, W/stride)``."""
        return self.activation(self.branch(x) + self.shortcut(x))


def wide_resnet18(
    num_classes: int = 10,
    width: int = 64,
    batch_norm: bool = True,
    train_norm: bool = True,
    in_channels: int = 3,
) -> nn.Sequential:
    """ResNet-18 for 32x32 images, the paper's "Wide ResNet18" (Fig. 5, App. D.6).

    ``conv 3x3 (width) → [BN] → ReLU → 4 stages of 2 basic blocks (width·1, 2, 4, 8 channels,
    strides 1, 2, 2, 2) → global average pool → Linear(8·width → num_classes)`` (He et al.,
    2016, in the CIFAR form of 3x3 stem without max-pooling).

    Weights are Kaiming-He initialised (App. D). Without BatchNorm the last convolution of every
    residual branch starts at zero, so that each block starts as the identity and the signal's
    scale does not double per block (a ResNet without normalisation and with He init everywhere
    has logits of size ~10²-10³ at initialisation); the paper does not say how it initialised
    its ResNet without BatchNorm.

    Args:
        num_classes: number of logits (10 for CIFAR-10, 100 for CIFAR-100).
        width: channels of the first stage (64 in the usual ResNet-18).
        batch_norm: use BatchNorm after every convolution.
        train_norm: whether BatchNorm's scale and shift are trainable (``False`` for FOOF and
            KFAC, App. D.6).
        in_channels: image channels.

    Returns:
        A model mapping ``(N, in_channels, 32, 32)`` to logits ``(N, num_classes)``.

    Example:
        >>> import torch
        >>> wide_resnet18(width=4)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    _check_width(width)
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, width, 3, padding=1, bias=not batch_norm),
        *_norm(width, batch_norm),
        nn.ReLU(),
    ]
    channels = width
    for stage, blocks in enumerate(RESNET18_BLOCKS):
        out = width * 2**stage
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            layers.append(BasicBlock(channels, out, stride, batch_norm))
            channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    model = _he_init(nn.Sequential(*layers))
    if not batch_norm:
        for module in model.modules():
            if isinstance(module, BasicBlock):
                nn.init.zeros_(module.branch[-1].weight)
    return _set_norm_trainable(model, train_norm)


def vgg11(
    num_classes: int = 10,
    width: int = 64,
    batch_norm: bool = False,
    train_norm: bool = True,
    in_channels: int = 3,
) -> nn.Sequential:
    """VGG11 for 32x32 images, without BatchNorm as in the paper's SVHN runs (App. D.8).

    Eight 3x3 convolutions with biases and ReLU, ``width·(1 | M | 2 | M | 4, 4 | M | 8, 8 | M |
    8, 8 | M)`` channels (``M``: 2x2 max-pooling), then ``Linear(8·width → num_classes)``
    (Simonyan & Zisserman, 2014, in the usual CIFAR form with one dense layer).

    Args:
        num_classes: number of logits.
        width: channels of the first convolution (64 in VGG11).
        batch_norm: add BatchNorm after every convolution (not the paper's setting).
        train_norm: whether BatchNorm's scale and shift are trainable.
        in_channels: image channels.

    Returns:
        A model mapping ``(N, in_channels, 32, 32)`` to logits ``(N, num_classes)``.

    Example:
        >>> import torch
        >>> vgg11(width=4)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    _check_width(width)
    layers: list[nn.Module] = []
    channels = in_channels
    for stage in VGG11_STAGES:
        for multiple in stage:
            out = width * multiple
            layers += [
                nn.Conv2d(channels, out, 3, padding=1, bias=not batch_norm),
                *_norm(out, batch_norm),
                nn.ReLU(),
            ]
            channels = out
        layers.append(nn.MaxPool2d(2))
    layers += [nn.Flatten(), nn.Linear(channels, num_classes)]
    return _set_norm_trainable(_he_init(nn.Sequential(*layers)), train_norm)


def _norm(channels: int, batch_norm: bool) -> list[nn.Module]:
    return [nn.BatchNorm2d(channels)] if batch_norm else []


def _check_width(width: int) -> None:
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive integer, got {width!r}")


def _he_init(model: nn.Sequential) -> nn.Sequential:
    from foof.models import he_init_  # foof.models registers this module's factories

    return he_init_(model)


def _set_norm_trainable(model: nn.Sequential, trainable: bool) -> nn.Sequential:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.requires_grad_(trainable)
    return model
