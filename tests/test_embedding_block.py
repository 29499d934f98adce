"""nn.Embedding as a block: a Linear layer on one-hot inputs, so Σ (and KFAC's Ā) is diagonal.

Reference, built without foof's capture: the one-hot rows ``onehot(t)`` of the looked-up ids
(``torch.eye(V)[tokens]``), the dense ``(V, V)`` ``Σ = AᵀA / R``, the embedding's gradient from
``torch.func.grad`` as the Linear-convention matrix ``Ĝ = (∇W)ᵀ`` ``(d, V)``, and for KFAC the
output gradients of the embedding's output ``h`` by ``torch.autograd.grad`` at the Fisher's
output residuals; the update from one dense solve. Float64, ``rtol=1e-8``.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

from foof import FOOF, KFAC
from tests.reference import convention_loss, fisher_residuals
from tests.test_sequence_outputs import CausalMean

TOL = dict(rtol=1e-8, atol=1e-12)
VOCAB, WIDTH, BATCH, LENGTH = 7, 4, 3, 5


def embedding_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Embedding(VOCAB, WIDTH), nn.Tanh(), CausalMean(), nn.Linear(WIDTH, VOCAB)
    ).double()


def batch():
    generator = torch.Generator().manual_seed(3)
    # token 6 never occurs: its frequency is 0, only the damping keeps Σ + λI invertible
    tokens = torch.randint(0, VOCAB - 1, (BATCH, LENGTH), generator=generator)
    return tokens, torch.randint(0, VOCAB, (BATCH, LENGTH), generator=generator)


def loss_fn(out, y):
    return convention_loss(out, y, "categorical")


def dense_reference(model, tokens, y, residuals=None):
    one_hot = torch.eye(VOCAB, dtype=torch.float64)[tokens.reshape(-1)]  # (R, V)
    sigma = one_hot.T @ one_hot / one_hot.shape[0]
    params = {k: v.detach() for k, v in model.named_parameters()}
    grad = torch.func.grad(lambda p: loss_fn(torch.func.functional_call(model, p, (tokens,)), y))(
        params
    )["0.weight"].T  # (d, V)
    gradient_cov = None
    if residuals is not None:
        h = model[0](tokens)
        out = model[3](model[2](model[1](h)))
        e = torch.autograd.grad(out, h, residuals)[0].reshape(-1, WIDTH)
        gradient_cov = e.T @ e / (BATCH * LENGTH)
    return sigma, grad, gradient_cov


def test_foof_sigma_is_the_token_frequencies_and_the_update_is_dense():
    model = embedding_model()
    tokens, y = batch()
    lr, damping = 0.1, 0.05
    sigma, grad, _ = dense_reference(model, tokens, y)
    before = model[0].weight.detach().clone()
    opt = FOOF(model, lr=lr, damping=damping, ema_decay=0.0)
    opt.zero_grad()
    loss_fn(model(tokens), y).backward()
    opt.step()
    state = opt.state[model[0].weight]
    assert state["input_covariance"].shape == (VOCAB,)  # stored as the diagonal
    torch.testing.assert_close(torch.diag(state["input_covariance"]), sigma, **TOL)
    expected = torch.linalg.solve(sigma + damping * torch.eye(VOCAB, dtype=sigma.dtype), grad.T).T
    torch.testing.assert_close((before - model[0].weight.detach()) / lr, expected.T, **TOL)


@pytest.mark.parametrize("damping_mode", ["heuristic", "standard"])
@pytest.mark.parametrize("fisher", ["mc", "empirical"])
def test_kfac_embedding_factors_and_update_are_dense(fisher, damping_mode):
    model = embedding_model()
    tokens, y = batch()
    lr, damping = 0.1, 0.05
    residuals = fisher_residuals(model, tokens, y, fisher, "categorical", seed=5)
    a, grad, g = dense_reference(model, tokens, y, residuals)
    before = model[0].weight.detach().clone()
    opt = KFAC(
        model,
        lr=lr,
        damping=damping,
        fisher=fisher,
        damping_mode=damping_mode,
        ema_decay=0.0,
        seed=5,
    )
    opt.zero_grad()
    logits = model(tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        opt.backward(loss_fn(logits, y), logits)
        opt.step()
    state = opt.state[model[0].weight]
    torch.testing.assert_close(torch.diag(state["input_covariance"]), a, **TOL)
    torch.testing.assert_close(state["gradient_covariance"], g, **TOL)
    eye_a, eye_g = torch.eye(VOCAB, dtype=a.dtype), torch.eye(WIDTH, dtype=a.dtype)
    if damping_mode == "heuristic":  # paper eq. 2 as one Kronecker solve, vec_r(G⁻¹ X A⁻¹)
        pi = ((a.trace() / VOCAB) / (g.trace() / WIDTH)).sqrt()
        matrix = torch.kron(g + damping**0.5 / pi * eye_g, a + pi * damping**0.5 * eye_a)
    else:  # paper eq. 3: (Ā ⊗ Ḡ + λI)⁻¹ vec Ĝ
        matrix = torch.kron(g, a) + damping * torch.eye(VOCAB * WIDTH, dtype=a.dtype)
    expected = torch.linalg.solve(matrix, grad.flatten()).reshape(WIDTH, VOCAB)
    torch.testing.assert_close((before - model[0].weight.detach()) / lr, expected.T, **TOL)


def test_an_embedding_block_round_trips_through_state_dict():
    model = embedding_model()
    tokens, y = batch()
    opt = FOOF(model, lr=0.1, damping=0.05, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        loss_fn(model(tokens), y).backward()
        opt.step()
    twin = embedding_model()
    twin.load_state_dict(model.state_dict())
    reloaded = FOOF(twin, lr=0.1, damping=0.05, momentum=0.9)
    # a saved copy (torch.optim's load_state_dict would share the buffers otherwise)
    reloaded.load_state_dict(copy.deepcopy(opt.state_dict()))
    for m, o in ((model, opt), (twin, reloaded)):
        o.zero_grad()
        loss_fn(m(tokens), y).backward()
        o.step()
    torch.testing.assert_close(twin[0].weight, model[0].weight, rtol=0, atol=0)
