"""Linear layers on ``(B, T, d)`` inputs: KFAC-expand and KFAC-reduce against dense formulas.

Eschenhagen et al. (NeurIPS 2023): with ``P`` positions per sample, expand takes every
``(sample, position)`` row; reduce averages each sample's input rows and sums its output
gradients, ``Ā = (1/B) Σ_n ā_n ā_nᵀ``, ``Ḡ = (1/(B·P)) Σ_n ê_n ê_nᵀ``. The references are built
from tests/reference.py (input rows from Jacobians, output gradients from ``torch.autograd``),
reduced here by reshaping, in float64; ``rtol=1e-8``.
"""

import warnings

import pytest
import torch

from foof import FOOF, KFAC
from tests.reference import (
    convention_loss,
    fisher_residuals,
    gradient_matrices,
    layer_input_rows,
    layer_inputs,
    layer_output_gradients,
)
from tests.test_sequence_outputs import (
    BATCH,
    LENGTH,
    per_token_step,
    sequence_batch,
    sequence_model,
)

TOL = dict(rtol=1e-8, atol=1e-12)


def dense_input_covariances(model, x, kfac_approx):
    covariances = {}
    for layer, inp in layer_inputs(model, x).items():
        rows = layer_input_rows(layer, inp)  # (B·T, in_dim), sample-major
        if kfac_approx == "reduce":
            rows = rows.reshape(BATCH, LENGTH, -1).mean(1)
        covariances[layer] = rows.T @ rows / rows.shape[0]
    return covariances


def dense_gradient_covariances(model, x, residuals, kfac_approx):
    covariances = {}
    for layer, rows in layer_output_gradients(model, x, residuals).items():
        if kfac_approx == "reduce":
            rows = rows.reshape(BATCH, LENGTH, -1).sum(1)
        covariances[layer] = rows.T @ rows / (BATCH * LENGTH)
    return covariances


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_foof_update_on_a_sequence_model_is_the_dense_formula(kfac_approx):
    model = sequence_model()
    x, y = sequence_batch("categorical")
    lr, damping = 0.1, 0.05
    sigma = dense_input_covariances(model, x, kfac_approx)
    grads = gradient_matrices(model, lambda out, t: convention_loss(out, t, "categorical"), x, y)
    before = {m: m.weight.detach().clone() for m in sigma}
    opt = FOOF(model, lr=lr, damping=damping, ema_decay=0.0, kfac_approx=kfac_approx)
    opt.zero_grad()
    convention_loss(model(x), y, "categorical").backward()
    opt.step()
    for layer, cov in sigma.items():
        eye = torch.eye(len(cov), dtype=cov.dtype)
        expected = torch.linalg.solve(cov + damping * eye, grads[layer].T).T  # Ĝ (Σ + λI)⁻¹
        torch.testing.assert_close(opt.state[layer.weight]["input_covariance"], cov, **TOL)
        step = (before[layer] - layer.weight.detach()) / lr
        torch.testing.assert_close(step, expected[:, :-1], **TOL)


def test_reduce_and_expand_differ_on_shared_inputs_and_agree_on_one_position():
    model = sequence_model()
    x, y = sequence_batch("categorical")
    expand = dense_input_covariances(model, x, "expand")
    reduce = dense_input_covariances(model, x, "reduce")
    assert all(not torch.allclose(expand[m], reduce[m]) for m in expand)
    # one position per sample: both flavours are one and the same factor
    single = x[:, :1]
    for approx in ("expand", "reduce"):
        opt = FOOF(model, lr=0.0, damping=0.1, ema_decay=0.0, kfac_approx=approx)
        opt.zero_grad()
        convention_loss(model(single), y[:, :1], "categorical").backward()
        opt.step()
        for layer, cov in dense_input_covariances(model, single, "expand").items():
            rows = layer_input_rows(layer, layer_inputs(model, single)[layer])
            torch.testing.assert_close(cov, rows.T @ rows / rows.shape[0], **TOL)
            torch.testing.assert_close(opt.state[layer.weight]["input_covariance"], cov, **TOL)
        opt.close()


@pytest.mark.parametrize("fisher", ["mc", "empirical"])
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_kfac_factors_and_update_on_a_sequence_model_are_the_dense_formula(kfac_approx, fisher):
    model = sequence_model()
    x, y = sequence_batch("categorical")
    lr, damping = 0.1, 0.05
    residuals = fisher_residuals(model, x, y, fisher, "categorical", seed=5)
    input_cov = dense_input_covariances(model, x, kfac_approx)
    gradient_cov = dense_gradient_covariances(model, x, residuals, kfac_approx)
    grads = gradient_matrices(model, lambda out, t: convention_loss(out, t, "categorical"), x, y)
    before = {m: m.weight.detach().clone() for m in input_cov}
    opt = KFAC(
        model,
        lr=lr,
        damping=damping,
        fisher=fisher,
        ema_decay=0.0,
        seed=5,
        kfac_approx=kfac_approx,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        per_token_step(model, opt, x, y, "categorical")
    for layer in input_cov:
        a, g = input_cov[layer], gradient_cov[layer]
        state = opt.state[layer.weight]
        torch.testing.assert_close(state["input_covariance"], a, **TOL)
        torch.testing.assert_close(state["gradient_covariance"], g, **TOL)
        # heuristic damping (paper eq. 2) as one dense Kronecker solve: vec_r(G⁻¹ X A⁻¹)
        pi = ((a.trace() / len(a)) / (g.trace() / len(g))).sqrt()
        a_damped = a + pi * damping**0.5 * torch.eye(len(a), dtype=a.dtype)
        g_damped = g + damping**0.5 / pi * torch.eye(len(g), dtype=g.dtype)
        expected = torch.linalg.solve(
            torch.kron(g_damped, a_damped), grads[layer].flatten()
        ).reshape(grads[layer].shape)
        step = (before[layer] - layer.weight.detach()) / lr
        torch.testing.assert_close(step, expected[:, :-1], **TOL)


def test_kfac_approx_is_validated():
    with pytest.raises(ValueError, match="kfac_approx"):
        FOOF(sequence_model(), lr=0.1, damping=0.1, kfac_approx="mean")
    with pytest.raises(ValueError, match="kfac_approx"):
        KFAC(sequence_model(), lr=0.1, damping=0.1, kfac_approx="sum")
