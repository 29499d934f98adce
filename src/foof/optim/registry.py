"""Build any optimizer foof knows by name, and the uniform backward call of a training step."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

OPTIMIZERS = ("sgd", "adam", "foof", "kfac", "natural")


def build_optimizer(name: str, model: nn.Module, **hyperparameters: Any) -> torch.optim.Optimizer:
    """Construct the optimizer called ``name`` for ``model``.

    Args:
        name: one of :data:`OPTIMIZERS`.
        model: the network to train; curvature methods hook into its layers.
        **hyperparameters: keyword arguments of that optimizer (``lr``, ``damping``,
            ``momentum``, ...). ``None`` values are dropped so callers can pass CLI defaults.
            For FOOF, KFAC and the natural gradient ``fallback`` defaults to ``"none"`` here
            (not to the classes' AdamW): the paper's protocols (``foof train``, the figures,
            the benchmarks) give parameters outside every layer plain SGD, and keep their
            numbers; pass ``fallback="adamw"`` and ``fallback_options`` to change it.

    Returns:
        A ``torch.optim.Optimizer``.

    Example:
        >>> from foof.models import mlp
        >>> opt = build_optimizer("foof", mlp(hidden=(8,)), lr=0.1, damping=1.0)
    """
    from foof.optim.foof import FOOF
    from foof.optim.kfac import KFAC
    from foof.optim.natural import NaturalGradient

    kwargs = {k: v for k, v in hyperparameters.items() if v is not None}
    if name == "sgd":
        kwargs.pop("damping", None)
        return torch.optim.SGD(model.parameters(), **kwargs)
    if name == "adam":
        kwargs.pop("damping", None)
        kwargs.pop("momentum", None)
        return torch.optim.Adam(model.parameters(), **kwargs)
    if name in ("foof", "kfac", "natural"):
        kwargs.setdefault("fallback", "none")
    if name == "foof":
        return FOOF(model, **kwargs)
    if name == "kfac":
        return KFAC(model, **kwargs)
    if name == "natural":
        return NaturalGradient(model, **kwargs)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def backward(optimizer: torch.optim.Optimizer, loss: torch.Tensor, output: torch.Tensor) -> None:
    """The backward pass of the uniform training step.

    foof's curvature optimizers may need extra passes (sampled labels for an MC Fisher); they
    provide ``optimizer.backward(loss, output)``. Plain ``torch.optim`` optimizers just get
    ``loss.backward()``.
    """
    custom = getattr(optimizer, "backward", None)
    if custom is not None:
        custom(loss, output)
    else:
        loss.backward()
