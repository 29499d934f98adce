"""Gradient accumulation: several ``opt.backward`` calls before one ``step``.

Four micro-batches of 8, each loss the micro-batch mean divided by 4, must give the step of one
batch of 32: the accumulated gradient is the big batch's, and so must be the curvature. Exact
(float64, ``rtol=1e-10``) for FOOF and for the deterministic Fishers (full, empirical); the MC
Fisher draws its labels micro-batch by micro-batch from one generator, and is compared with the
dense big-batch Fisher at exactly those labels.
"""

import copy

import pytest
import torch
from torch import nn

from foof import FOOF, KFAC, NaturalGradient
from tests.reference import (
    dense_general_fisher,
    flat_gradient,
    flat_parameters,
    kfac_general_factors,
    mc_residuals,
)

TOL = dict(rtol=1e-10, atol=1e-13)
BATCH, MICRO = 32, 4


def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 4)).double()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 6, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 4, (BATCH,), generator=generator)
    return model, x, y


def step(model, opt, x, y, micro_batches):
    """One step over ``micro_batches`` equal micro-batches; returns the parameter change / lr."""
    before = flat_parameters(model)
    opt.zero_grad()
    for xs, ys in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
        logits = model(xs)
        opt.backward(nn.functional.cross_entropy(logits, ys) / micro_batches, logits)
    opt.step()
    return (before - flat_parameters(model)) / opt.param_groups[0]["lr"]


def make(name, model, fisher):
    if name == "foof":
        return FOOF(model, lr=0.1, damping=0.1, ema_decay=0.0)
    if name == "kfac":
        return KFAC(model, lr=0.1, damping=0.1, fisher=fisher, ema_decay=0.0, seed=3)
    return NaturalGradient(model, lr=0.1, damping=0.1, fisher=fisher, seed=3)


@pytest.mark.parametrize(
    ("name", "fisher"),
    [("foof", None)] + [(n, f) for n in ("kfac", "natural") for f in ("full", "empirical")],
)
def test_accumulated_micro_batches_give_the_big_batch_step(name, fisher):
    model, x, y = setup()
    twin = copy.deepcopy(model)
    accumulated = step(model, make(name, model, fisher), x, y, MICRO)
    big = step(twin, make(name, twin, fisher), x, y, 1)
    torch.testing.assert_close(accumulated, big, **TOL)


def mc_labels_per_micro_batch(model, x):
    """The output gradients foof draws: micro-batch after micro-batch, one generator."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        return torch.cat(
            [mc_residuals(model(xs), "categorical", generator) for xs in x.chunk(MICRO)]
        )


def test_accumulated_mc_fisher_of_kfac_is_the_big_batch_fisher_at_the_drawn_labels():
    model, x, y = setup()
    residuals = mc_labels_per_micro_batch(model, x)
    input_cov, gradient_cov = kfac_general_factors(model, x, "categorical", residuals)
    opt = make("kfac", model, "mc")
    step(model, opt, x, y, MICRO)
    for _, module, state in opt.layer_items():
        torch.testing.assert_close(state["input_covariance"], input_cov[module], **TOL)
        torch.testing.assert_close(state["gradient_covariance"], gradient_cov[module], **TOL)


def test_accumulated_mc_fisher_of_the_natural_gradient_is_the_big_batch_fisher():
    model, x, y = setup()
    dense = dense_general_fisher(model, x, "categorical", mc_labels_per_micro_batch(model, x))
    grad = flat_gradient(model, nn.functional.cross_entropy, x, y)
    expected = torch.linalg.solve(dense + 0.1 * torch.eye(len(dense), dtype=dense.dtype), grad)
    opt = make("natural", model, "mc")
    torch.testing.assert_close(step(model, opt, x, y, MICRO), expected, **TOL)
