"""The toy example of App. F: SGD lets one datapoint's gradient overwrite another's, FOOF not.

Linear regression ``f(x) = w·x`` with two inputs and one output, two datapoints
``x₁ = (3, 1), y₁ = 1`` and ``x₂ = (1, 0), y₂ = −1``, weights initialised at ``w = (0, 0)`` and
the squared loss ``½(w·x − y)²``. The paper states: the datapoints' negative gradients are
``(3, 1)`` and ``(−1, 0)``; SGD's direction is their sum ``(2, 1)``, which increases the loss on the
second datapoint whatever the step size; the undamped FOOF update is ``(−1, 4)``, and one FOOF step
with step size 1 reaches a global optimum (both losses 0).

:func:`toy_example` computes all of it with the library's own optimizers (``torch.optim.SGD``
and :class:`foof.FOOF` with ``damping=0``) on the mean loss over the two datapoints, in float64.
With the mean loss, ``∇L`` and FOOF's ``Σ`` are both means over the two rows, so FOOF's step with
``lr=1`` is the paper's ``(−1, 4)`` exactly; SGD's direction is reported as the sum of the
per-datapoint negative gradients, the paper's convention.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from foof.optim.foof import FOOF

INPUTS = ((3.0, 1.0), (1.0, 0.0))
"""The two datapoints' inputs (App. F)."""

TARGETS = (1.0, -1.0)
"""Their labels."""

SGD_STEP_SIZES = (1e-3, 1e-2, 1e-1, 1.0)
"""Step sizes at which SGD's effect on the second datapoint's loss is measured."""

RESULTS_FORMAT = "foof.experiments.toy/1"
"""Version tag of :func:`toy_example`'s results."""


def _losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return 0.5 * (model(x).squeeze(1) - y).square()


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, x, y) -> None:
    optimizer.zero_grad()
    loss = 0.5 * (model(x).squeeze(1) - y).square().mean()
    loss.backward()
    optimizer.step()


def _model() -> nn.Linear:
    model = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.zero_()
    return model


def toy_example() -> dict[str, Any]:
    """Run App. F's example; returns the numbers the report checks.

    Returns:
        A results dictionary with ``format``, ``complete`` (always ``True``), ``values`` (flat
        numbers: ``negative_gradient_1_0`` …, ``sgd_direction_0/1``, ``foof_weight_0/1`` after one
        FOOF step with ``lr=1``, ``foof_loss_1/2`` after it, ``sgd_loss_2_increase_min``: the
        smallest increase of the second datapoint's loss over one SGD step among
        :data:`SGD_STEP_SIZES`, and ``sgd_loss_1_after``, ``sgd_loss_2_after`` at step size 0.1),
        ``sgd_step_sizes`` and ``total_time``.

    Example:
        >>> values = toy_example()["values"]
        >>> values["foof_weight_0"], values["foof_weight_1"]
        (-1.0, 4.0)
    """
    start = time.perf_counter()
    x = torch.tensor(INPUTS, dtype=torch.float64)
    y = torch.tensor(TARGETS, dtype=torch.float64)
    values: dict[str, float] = {}

    model = _model()
    for i in range(2):
        model.zero_grad()
        (0.5 * (model(x[i : i + 1]).squeeze(1) - y[i : i + 1]).square().sum()).backward()
        for j, g in enumerate((-model.weight.grad).flatten().tolist()):
            values[f"negative_gradient_{i + 1}_{j}"] = g
    model.zero_grad()
    (0.5 * (model(x).squeeze(1) - y).square().sum()).backward()
    for j, g in enumerate((-model.weight.grad).flatten().tolist()):
        values[f"sgd_direction_{j}"] = g

    increases = []
    for lr in SGD_STEP_SIZES:
        model = _model()
        before = _losses(model, x, y)
        _step(model, torch.optim.SGD(model.parameters(), lr=lr), x, y)
        after = _losses(model, x, y)
        increases.append(float(after[1] - before[1]))
        if lr == 0.1:
            values["sgd_loss_1_after"] = float(after[0])
            values["sgd_loss_2_after"] = float(after[1])
    values["sgd_loss_2_increase_min"] = min(increases)

    model = _model()
    values["loss_1_before"], values["loss_2_before"] = _losses(model, x, y).tolist()
    _step(model, FOOF(model, lr=1.0, damping=0.0, ema_decay=0.0), x, y)
    values["foof_weight_0"], values["foof_weight_1"] = model.weight.detach().flatten().tolist()
    values["foof_loss_1"], values["foof_loss_2"] = _losses(model, x, y).tolist()
    return {
        "format": RESULTS_FORMAT,
        "complete": True,
        "config": {"inputs": INPUTS, "targets": TARGETS, "initial_weights": [0.0, 0.0]},
        "values": values,
        "sgd_step_sizes": list(SGD_STEP_SIZES),
        "total_time": time.perf_counter() - start,
    }
