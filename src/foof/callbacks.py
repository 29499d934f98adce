"""Training details that a :class:`~foof.train.TrainConfig` switches on, as train callbacks.

App. D.6 (the Wide ResNet on CIFAR-10) trains with two extras that :func:`foof.train.train`
realises through its :class:`~foof.train.TrainCallback` hooks instead of a second loop:

* :class:`DelayedMomentum` (``TrainConfig.momentum_delay``): "we switched on the momentum term
  only after the first epoch was completed" (KFAC was unstable with momentum from the start on
  the BatchNorm ResNet; the paper used it for all methods);
* :class:`PolyakAveraging` (``TrainConfig.polyak_decay``): an exponential moving average of the
  parameters, "following (Grosse and Martens, 2016)", with which the network is evaluated.

:func:`config_callbacks` builds the ones a config asks for; :func:`~foof.train.train` runs them
before any user callback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from foof.train import StepContext, TrainCallback, TrainConfig

POLYAK_DECAY = 0.99
"""Decay of the parameter average in the paper's Polyak-averaged runs. The paper takes "the decay
value recommended" by Grosse & Martens (2016) without stating it; 0.99 is our reading of that
paper, not checked against its text here."""


class DelayedMomentum(TrainCallback):
    """Momentum 0 during the first ``epochs`` epochs, the optimizer's own value afterwards.

    Before every ``opt.step()`` the callback sets ``group["momentum"]`` of every parameter group
    that has one (SGD, FOOF, KFAC, natural gradients; Adam has none and is left alone) to 0 while
    ``context.epoch <= epochs`` and back to the value it had at the first step afterwards. With
    momentum 0 no momentum buffer is kept, so the first step of epoch ``epochs + 1`` starts the
    buffer from that step's direction, as a fresh optimizer with momentum would.

    Args:
        epochs: number of epochs without momentum (App. D.6: 1).

    Example:
        >>> callback = DelayedMomentum(epochs=1)
    """

    def __init__(self, epochs: int = 1) -> None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"epochs must be an integer >= 0, got {epochs!r}")
        self.epochs = epochs
        self._momentum: list[float | None] | None = None

    def before_step(self, context: StepContext) -> None:
        """Set each group's momentum for the step's epoch."""
        groups = context.optimizer.param_groups
        if self._momentum is None:
            self._momentum = [group.get("momentum") for group in groups]
        for group, momentum in zip(groups, self._momentum):
            if momentum is not None:
                group["momentum"] = 0.0 if context.epoch <= self.epochs else momentum

    def state_dict(self) -> dict[str, Any]:
        """The momentum values to restore (for checkpoints of :func:`foof.train.train`)."""
        return {"epochs": self.epochs, "momentum": self._momentum}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
        self.epochs, self._momentum = state["epochs"], state["momentum"]


class PolyakAveraging(TrainCallback):
    r"""Exponential moving average of the parameters, used for every evaluation.

    After every step ``θ̄_t = θ̄_{t−1} + w_t (θ_t − θ̄_{t−1})`` with ``w_t = (1 − d) / (1 − dᵗ)``
    (the bias-corrected EMA of decay ``d``: ``θ̄_1 = θ_1``, and ``w_t → 1 − d``); before any step
    ``θ̄ = θ_0``. During :meth:`evaluation` the model's parameters are replaced by ``θ̄`` and put
    back afterwards; training always continues from ``θ_t``. Only parameters are averaged:
    BatchNorm's running statistics are those of the trained network.

    Args:
        model: the network (the averages are kept for ``model.parameters()``).
        decay: ``d`` in ``[0, 1)``; 0 evaluates the current parameters.

    Example:
        >>> model = nn.Linear(3, 2)
        >>> averaging = PolyakAveraging(model, decay=0.99)
        >>> with averaging.evaluation(model):
        ...     pass  # evaluate here with the averaged parameters
    """

    def __init__(self, model: nn.Module, decay: float = POLYAK_DECAY) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        self.decay = decay
        self.steps = 0
        self.params = list(model.parameters())
        self.averages = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def after_step(self, context: StepContext) -> None:
        """Fold the step's parameters into the average."""
        self.steps += 1
        weight = (1.0 - self.decay) / (1.0 - self.decay**self.steps)
        torch._foreach_lerp_(self.averages, [p.detach() for p in self.params], weight)

    def state_dict(self) -> dict[str, Any]:
        """Step count and averages (for checkpoints of :func:`foof.train.train`)."""
        return {"decay": self.decay, "steps": self.steps, "averages": self.averages}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict` (averages copied into this callback's tensors)."""
        self.decay, self.steps = state["decay"], state["steps"]
        with torch.no_grad():
            for average, saved in zip(self.averages, state["averages"]):
                average.copy_(saved)

    @contextlib.contextmanager
    def evaluation(self, model: nn.Module) -> Iterator[None]:
        """Swap the averaged parameters in for the duration of the context."""
        with torch.no_grad():
            current = [p.detach().clone() for p in self.params]
            for param, average in zip(self.params, self.averages):
                param.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(self.params, current):
                    param.copy_(value)


def config_callbacks(config: TrainConfig, model: nn.Module) -> list[TrainCallback]:
    """The callbacks ``config`` asks for, in the order :func:`foof.train.train` runs them.

    Args:
        config: the run; ``momentum_delay > 0`` adds :class:`DelayedMomentum`, ``polyak_decay``
            adds :class:`PolyakAveraging` of ``model``'s parameters.
        model: the network being trained (unwrapped, not the DDP wrapper).

    Returns:
        A list, empty when the config uses neither.
    """
    callbacks: list[TrainCallback] = []
    if config.momentum_delay:
        callbacks.append(DelayedMomentum(config.momentum_delay))
    if config.polyak_decay is not None:
        callbacks.append(PolyakAveraging(model, config.polyak_decay))
    return callbacks
