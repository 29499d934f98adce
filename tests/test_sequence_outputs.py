"""Outputs with extra dimensions: ``(B, T, V)`` logits of a tiny sequence model, per-token loss.

The convention (foof.curvature.sampling): the loss is the mean over the ``B·T`` rows (tokens) of
``−log p``, and ``F = (1/(B·T)) Σ_i E[g_i g_iᵀ]`` with ``g_i`` the gradient of sequence ``i``'s
summed ``−log p``, its labels drawn per token: the mean per-token Fisher. The model mixes
positions (a causal running mean), so a token's loss reaches every earlier position and the
Fisher's cross-position structure is exercised. Dense references: tests/reference.py, float64,
``rtol=1e-8``.
"""

import warnings

import pytest
import torch
from torch import nn

from foof import KFAC, NaturalGradient, SubsampledFisher
from foof.curvature.sampling import LossScaleWarning
from tests.reference import (
    convention_loss,
    dense_general_fisher,
    fisher_residuals,
    flat_gradient,
    flat_parameters,
    flatten_layer_matrices,
    kfac_general_factors,
)

TOL = dict(rtol=1e-8, atol=1e-12)
BATCH, LENGTH, WIDTH, VOCAB = 3, 4, 3, 5


class CausalMean(nn.Module):
    """Position ``t`` sees the mean of positions ``≤ t``: tokens interact, causally."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        counts = torch.arange(1, h.shape[1] + 1, dtype=h.dtype, device=h.device)
        return h.cumsum(1) / counts[:, None]


def sequence_model(classes=VOCAB):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(WIDTH, 4), nn.Tanh(), CausalMean(), nn.Linear(4, classes)
    ).double()


def sequence_batch(likelihood, classes=VOCAB, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, LENGTH, WIDTH, generator=generator, dtype=torch.float64)
    if likelihood == "categorical":
        y = torch.randint(0, classes, (BATCH, LENGTH), generator=generator)
    elif likelihood == "bernoulli":
        y = torch.randint(0, 2, (BATCH, LENGTH, classes), generator=generator).double()
    else:
        y = torch.randn(BATCH, LENGTH, classes, generator=generator, dtype=torch.float64)
    return x, y


def per_token_step(model, opt, x, y, likelihood):
    opt.zero_grad()
    logits = model(x)  # (B, T, V)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LossScaleWarning)  # the per-token mean is the convention
        opt.backward(convention_loss(logits, y, likelihood), logits)
        opt.step()


LIKELIHOODS = ["categorical", "bernoulli", "gaussian"]


@pytest.mark.parametrize("fisher", ["mc", "full", "empirical"])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_kfac_factors_of_a_sequence_model_equal_their_definitions(likelihood, fisher):
    model = sequence_model()
    x, y = sequence_batch(likelihood)
    residuals = fisher_residuals(model, x, y, fisher, likelihood, seed=5)
    input_cov, gradient_cov = kfac_general_factors(model, x, likelihood, residuals)
    opt = KFAC(
        model, lr=0.1, damping=0.1, fisher=fisher, likelihood=likelihood, ema_decay=0.0, seed=5
    )
    per_token_step(model, opt, x, y, likelihood)
    for _, module, state in opt.layer_items():
        torch.testing.assert_close(state["input_covariance"], input_cov[module], **TOL)
        torch.testing.assert_close(state["gradient_covariance"], gradient_cov[module], **TOL)


@pytest.mark.parametrize("block", [False, True], ids=["full-matrix", "block-diagonal"])
@pytest.mark.parametrize("fisher", ["mc", "full", "empirical"])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_natural_gradient_of_a_sequence_model_is_exact(likelihood, fisher, block):
    model = sequence_model()
    x, y = sequence_batch(likelihood)
    damping, lr = 0.05, 0.1
    dense = dense_general_fisher(
        model, x, likelihood, fisher_residuals(model, x, y, fisher, likelihood, 7)
    )
    if block:
        sizes = [sum(p.numel() for p in m.parameters()) for m in model if isinstance(m, nn.Linear)]
        mask = torch.block_diag(*[torch.ones(s, s, dtype=torch.bool) for s in sizes])
        dense = dense * mask
    grad = flat_gradient(model, lambda out, t: convention_loss(out, t, likelihood), x, y)
    expected = torch.linalg.solve(dense + damping * torch.eye(len(dense), dtype=dense.dtype), grad)
    opt = NaturalGradient(
        model,
        lr=lr,
        damping=damping,
        fisher=fisher,
        likelihood=likelihood,
        block_diagonal=block,
        seed=7,
    )
    before = flat_parameters(model)
    per_token_step(model, opt, x, y, likelihood)
    torch.testing.assert_close((before - flat_parameters(model)) / lr, expected, **TOL)


@pytest.mark.parametrize("fisher", ["mc", "full", "empirical"])
def test_subsampled_fisher_of_a_sequence_model_equals_dense(fisher):
    model = sequence_model()
    x, y = sequence_batch("categorical")
    dense = dense_general_fisher(
        model, x, "categorical", fisher_residuals(model, x, y, fisher, "categorical", 3)
    )
    f = SubsampledFisher(model, x, y, fisher=fisher, generator=torch.Generator().manual_seed(3))
    # the Sequential's parameters are already in the reference's [W, b] layer order
    v = [torch.randn_like(p) for p in f.parameters()]
    names = {id(p): n for n, p in model.named_parameters()}

    def dense_order(parts):
        return flatten_layer_matrices(
            model, {names[id(p)]: t for p, t in zip(f.parameters(), parts)}
        )

    torch.testing.assert_close(dense_order(f.mv(v)), dense @ dense_order(v), **TOL)


def test_a_per_sequence_sum_is_reported_as_t_times_the_convention():
    model = sequence_model()
    x, y = sequence_batch("categorical")
    opt = KFAC(model, lr=0.1, damping=0.1)
    logits = model(x)
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / BATCH
    with pytest.warns(LossScaleWarning, match=f"{LENGTH} times the mean over the {BATCH * LENGTH}"):
        opt.backward(loss, logits)
        opt.step()
