"""Likelihoods (categorical, bernoulli, gaussian) against dense Fishers, and the loss check.

Every Fisher here is compared with a dense float64 matrix built independently with
``torch.func`` (per-sample Jacobians, the output Fisher as the Hessian of ``−log p``, see
tests/reference.py); tolerance ``rtol=1e-8``.
"""

import warnings

import pytest
import torch
from torch import nn

from foof import KFAC, KroneckerLaplace, LaplacePosterior, NaturalGradient, SubsampledFisher
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

TOL = dict(rtol=1e-8, atol=1e-12)  # float64

# (name, output shape after the batch dimension, likelihood)
HEADS = [
    ("binary-one-logit", (1,), "bernoulli"),
    ("binary-flat", (), "bernoulli"),
    ("multi-label", (4,), "bernoulli"),
    ("categorical", (3,), "categorical"),
    ("gaussian", (2,), "gaussian"),
]
HEAD_IDS = [h[0] for h in HEADS]


class Head(nn.Module):
    """A tiny MLP whose output has the shape ``(B, *shape)``."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = shape
        self.body = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, max(1, *shape, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).reshape(x.shape[0], *self.shape)


def problem(shape, likelihood, batch=6, seed=0):
    torch.manual_seed(seed)
    model = Head(shape).double()
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 4, generator=generator, dtype=torch.float64)
    out_shape = (batch, *shape)
    if likelihood == "categorical":
        y = torch.randint(0, shape[-1], out_shape[:-1], generator=generator)
    elif likelihood == "bernoulli":
        y = torch.randint(0, 2, out_shape, generator=generator).double()
    else:
        y = torch.randn(out_shape, generator=generator, dtype=torch.float64)
    return model, x, y


def train_step(model, opt, x, y, likelihood):
    opt.zero_grad()
    out = model(x)
    opt.backward(convention_loss(out, y, likelihood), out)
    opt.step()


@pytest.mark.parametrize("fisher", ["mc", "full", "empirical"])
@pytest.mark.parametrize(("name", "shape", "likelihood"), HEADS, ids=HEAD_IDS)
def test_kfac_factors_equal_dense_definitions_for_every_likelihood(name, shape, likelihood, fisher):
    model, x, y = problem(shape, likelihood)
    residuals = fisher_residuals(model, x, y, fisher, likelihood, seed=5)
    input_cov, gradient_cov = kfac_general_factors(model, x, likelihood, residuals)
    opt = KFAC(
        model, lr=0.1, damping=0.1, fisher=fisher, likelihood=likelihood, ema_decay=0.0, seed=5
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", LossScaleWarning)  # the convention's loss: no warning
        train_step(model, opt, x, y, likelihood)
    for _, module, state in opt.layer_items():
        torch.testing.assert_close(state["input_covariance"], input_cov[module], **TOL)
        torch.testing.assert_close(state["gradient_covariance"], gradient_cov[module], **TOL)
    if likelihood == "bernoulli" and fisher != "empirical":
        # the curvature a one-logit binary classifier used to lose (categorical: exactly 0)
        assert all(float(g.norm()) > 1e-4 for g in gradient_cov.values())


@pytest.mark.parametrize("fisher", ["mc", "full", "empirical"])
@pytest.mark.parametrize(("name", "shape", "likelihood"), HEADS, ids=HEAD_IDS)
def test_natural_gradient_is_exact_for_every_likelihood(name, shape, likelihood, fisher):
    model, x, y = problem(shape, likelihood)
    damping, lr = 0.05, 0.1
    residuals = fisher_residuals(model, x, y, fisher, likelihood, seed=7)
    dense = dense_general_fisher(model, x, likelihood, residuals)
    grad = flat_gradient(model, lambda out, t: convention_loss(out, t, likelihood), x, y)
    expected = torch.linalg.solve(dense + damping * torch.eye(len(dense), dtype=dense.dtype), grad)
    opt = NaturalGradient(
        model, lr=lr, damping=damping, fisher=fisher, likelihood=likelihood, seed=7
    )
    before = flat_parameters(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LossScaleWarning)
        train_step(model, opt, x, y, likelihood)
    torch.testing.assert_close((before - flat_parameters(model)) / lr, expected, **TOL)


@pytest.mark.parametrize("fisher", ["mc", "full", "empirical"])
@pytest.mark.parametrize(("name", "shape", "likelihood"), HEADS[:3], ids=HEAD_IDS[:3])
def test_subsampled_fisher_and_laplace_with_bernoulli(name, shape, likelihood, fisher):
    model, x, y = problem(shape, likelihood)
    residuals = fisher_residuals(model, x, y, fisher, likelihood, seed=3)
    dense = dense_general_fisher(model, x, likelihood, residuals)
    f = SubsampledFisher(
        model,
        x,
        y,
        fisher=fisher,
        likelihood=likelihood,
        generator=torch.Generator().manual_seed(3),
    )
    v = torch.randn(len(dense), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # the tiny MLP's parameters are in layer-matrix order already ([W, b] per layer, row-major
    # with the bias as the last column) only after the reference's flattening: compare there
    names = {id(p): n for n, p in model.named_parameters()}
    params = f.parameters()

    def dense_order(vector):
        parts = torch.split(vector, [p.numel() for p in params])
        return flatten_layer_matrices(
            model, {names[id(p)]: t.reshape(p.shape) for p, t in zip(params, parts)}
        )

    torch.testing.assert_close(dense_order(f.mv(v)), dense @ dense_order(v), **TOL)
    expected = torch.linalg.solve(
        dense + 0.1 * torch.eye(len(dense), dtype=dense.dtype), dense_order(v)
    )
    torch.testing.assert_close(dense_order(f.inverse_mv(v, 0.1)), expected, **TOL)
    # the predictive of a bernoulli posterior is a probability per logit (sigmoid, not softmax)
    posterior = LaplacePosterior(f, prior_precision=1.0, num_data=100)
    probs = posterior.predictive(
        model, x, num_samples=3, generator=torch.Generator().manual_seed(0)
    )
    assert probs.shape == model(x).shape
    assert bool(((probs > 0) & (probs < 1)).all())


def test_kronecker_laplace_predictive_uses_the_likelihoods_link():
    model, x, y = problem((4,), "bernoulli")
    opt = KFAC(model, lr=0.0, damping=0.1, fisher="full", likelihood="bernoulli", ema_decay=0.0)
    train_step(model, opt, x, y, "bernoulli")
    layers = [m for _, m, _ in opt.layer_items()]
    factors = [(s["input_covariance"], s["gradient_covariance"]) for _, _, s in opt.layer_items()]
    posterior = KroneckerLaplace(layers, factors, 1.0, 100, likelihood="bernoulli")
    probs = posterior.predictive(
        model, x, num_samples=4, generator=torch.Generator().manual_seed(0)
    )
    # four independent sigmoids per row: they need not sum to one, as a softmax's would
    assert not torch.allclose(probs.sum(-1), torch.ones(len(x), dtype=probs.dtype))
    assert bool(((probs > 0) & (probs < 1)).all())


@pytest.mark.parametrize("make", [KFAC, NaturalGradient, SubsampledFisher])
@pytest.mark.parametrize("shape", [(1,), ()], ids=["(B, 1)", "(B,)"])
def test_categorical_on_a_single_logit_is_refused_naming_bernoulli(make, shape):
    model, x, y = problem(shape, "bernoulli")
    with pytest.raises(ValueError, match="likelihood='bernoulli'"):
        if make is SubsampledFisher:
            SubsampledFisher(model, x, fisher="full")
            return
        opt = make(model, lr=0.1, damping=0.1)
        out = model(x)
        opt.backward(nn.functional.binary_cross_entropy_with_logits(out, y), out)


# -- the loss check --------------------------------------------------------------------------
def first_step_warnings(make, shape, likelihood, loss_fn, micro_batches=1, steps=1):
    """The LossScaleWarning messages of ``steps`` steps of ``loss_fn(out, y)``."""
    model, x, y = problem(shape, "gaussian" if likelihood == "gaussian" else likelihood, batch=8)
    if make is KFAC:
        opt = KFAC(model, lr=0.01, damping=0.1, likelihood=likelihood)
    else:
        opt = NaturalGradient(model, lr=0.01, damping=0.1, likelihood=likelihood)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            opt.zero_grad()
            for xs, ys in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
                out = model(xs)
                opt.backward(loss_fn(out, ys), out)
            opt.step()
    return [str(w.message) for w in caught if issubclass(w.category, LossScaleWarning)]


OPTIMIZERS = [KFAC, NaturalGradient]


@pytest.mark.parametrize("make", OPTIMIZERS)
def test_loss_check_names_the_mse_factor(make):
    messages = first_step_warnings(make, (3,), "gaussian", nn.functional.mse_loss)
    assert len(messages) == 1
    assert "0.6667 times" in messages[0]  # mean over B·C without ½: 2/C
    assert "F.mse_loss(output, target) * 3 / 2" in messages[0]
    assert not first_step_warnings(
        make, (3,), "gaussian", lambda o, t: nn.functional.mse_loss(o, t) * 3 / 2
    )


@pytest.mark.parametrize("make", OPTIMIZERS)
def test_loss_check_names_a_sum_reduction(make):
    loss = lambda o, t: nn.functional.cross_entropy(o, t, reduction="sum")  # noqa: E731
    (message,) = first_step_warnings(make, (3,), "categorical", loss)
    assert "8 times" in message and "reduction='sum'" in message


@pytest.mark.parametrize("make", OPTIMIZERS)
def test_loss_check_names_the_multi_label_bce_factor(make):
    bce = nn.functional.binary_cross_entropy_with_logits
    (message,) = first_step_warnings(make, (4,), "bernoulli", bce)
    assert "0.25 times" in message and "multiply it by 4" in message
    assert not first_step_warnings(make, (4,), "bernoulli", lambda o, t: bce(o, t) * 4)
    assert not first_step_warnings(make, (1,), "bernoulli", bce)  # one logit: the mean is right


@pytest.mark.parametrize("make", OPTIMIZERS)
def test_loss_check_suggests_the_likelihood_the_loss_has(make):
    bce = nn.functional.binary_cross_entropy_with_logits
    (message,) = first_step_warnings(
        make, (4,), "categorical", lambda o, t: bce(o, torch.rand_like(o)) * 4
    )
    assert "likelihood='bernoulli'" in message
    regression = lambda o, t: 0.5 * (o - torch.ones_like(o)).square().sum(-1).mean()  # noqa: E731
    (message,) = first_step_warnings(make, (3,), "categorical", regression)
    assert "likelihood='gaussian'" in message


@pytest.mark.parametrize("make", OPTIMIZERS)
def test_loss_check_accepts_matching_losses_and_warns_once(make):
    smoothed = lambda o, t: nn.functional.cross_entropy(o, t, label_smoothing=0.1)  # noqa: E731
    assert not first_step_warnings(make, (3,), "categorical", smoothed)
    loss = lambda o, t: nn.functional.cross_entropy(o, t, reduction="sum")  # noqa: E731
    assert len(first_step_warnings(make, (3,), "categorical", loss, steps=3)) == 1


@pytest.mark.parametrize("make", OPTIMIZERS)
def test_loss_check_knows_gradient_accumulation(make):
    ce = nn.functional.cross_entropy
    # four micro-batches, each mean divided by four: the big batch's mean
    assert not first_step_warnings(make, (3,), "categorical", lambda o, t: ce(o, t) / 4, 4)
    (message,) = first_step_warnings(make, (3,), "categorical", ce, micro_batches=4)
    assert "4 times" in message and "gradient accumulation" in message
