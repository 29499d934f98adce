import io

import pytest
import torch
from torch import nn

from foof import KFAC
from tests.cases import CASE_IDS, CASES
from tests.reference import (
    gradient_matrices,
    layer_input_rows,
    layer_inputs,
    layer_output_gradients,
    mc_labels,
)

TOL = dict(rtol=1e-8, atol=1e-12)  # float64


def cross_entropy(logits, y):
    return nn.functional.cross_entropy(logits, y)


def layer_weights(model):
    out = {}
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            parts = [m.weight.detach().flatten(1)]
            if m.bias is not None:
                parts.append(m.bias.detach()[:, None])
            out[m] = torch.cat(parts, 1)
    return out


def reference_factors(model, x, y, fisher, seed):
    """Ā and Ḡ per layer from their definitions, independently of foof's capture."""
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1)
    classes = probs.shape[1]
    if fisher == "full":
        eye = torch.eye(classes, dtype=probs.dtype)
        logit_grads = [probs[:, k : k + 1].sqrt() * (probs - eye[k]) for k in range(classes)]
    else:
        labels = mc_labels(model, x, seed) if fisher == "mc" else y
        logit_grads = [probs - nn.functional.one_hot(labels, classes).to(probs.dtype)]
    gradient_cov = {}
    for grads in logit_grads:
        for layer, rows in layer_output_gradients(model, x, grads).items():
            term = rows.T @ rows / len(x)
            gradient_cov[layer] = gradient_cov.get(layer, 0) + term
    input_cov = {}
    for layer, inp in layer_inputs(model, x).items():
        rows = layer_input_rows(layer, inp)
        input_cov[layer] = rows.T @ rows / rows.shape[0]
    return input_cov, gradient_cov


def one_step(model, opt, x, y):
    before = layer_weights(model)
    opt.zero_grad()
    logits = model(x)
    opt.backward(cross_entropy(logits, y), logits)
    opt.step()
    after = layer_weights(model)
    lr = opt.param_groups[0]["lr"]
    return {m: (before[m] - after[m]) / lr for m in before}


def dense_standard(input_cov, gradient_cov, grad, damping):
    """mat((Ā ⊗ Ḡ + λI)⁻¹ vec Ĝ) with column-stacking vec, Kronecker product formed explicitly."""
    kron = torch.kron(input_cov, gradient_cov)
    vec = grad.T.reshape(-1)
    solved = torch.linalg.solve(kron + damping * torch.eye(len(kron), dtype=kron.dtype), vec)
    return solved.reshape(grad.shape[1], grad.shape[0]).T


def dense_heuristic(input_cov, gradient_cov, grad, damping, second_factor=True):
    pi = ((input_cov.trace() / len(input_cov)) / (gradient_cov.trace() / len(gradient_cov))).sqrt()
    eye_a = torch.eye(len(input_cov), dtype=input_cov.dtype)
    eye_g = torch.eye(len(gradient_cov), dtype=input_cov.dtype)
    right = torch.linalg.inv(input_cov + pi * damping**0.5 * eye_a)
    if not second_factor:
        return grad @ right
    left = torch.linalg.inv(gradient_cov + damping**0.5 / pi * eye_g)
    return left @ grad @ right


@pytest.mark.parametrize("fisher", ["mc", "full", "empirical"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_factors_equal_their_definitions(case, fisher):
    model = case.model()
    x, y = case.batch()
    input_cov, gradient_cov = reference_factors(model, x, y, fisher, seed=5)
    opt = KFAC(model, lr=0.1, damping=0.1, fisher=fisher, ema_decay=0.0, seed=5)
    one_step(model, opt, x, y)
    for _, module, state in opt.layer_items():
        torch.testing.assert_close(state["input_covariance"], input_cov[module], **TOL)
        torch.testing.assert_close(state["gradient_covariance"], gradient_cov[module], **TOL)


@pytest.mark.parametrize("mode", ["standard", "heuristic", "heuristic-no-second-factor"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_update_equals_dense_formula(case, mode):
    model = case.model()
    x, y = case.batch()
    damping = 0.03
    input_cov, gradient_cov = reference_factors(model, x, y, "full", seed=0)
    grads = gradient_matrices(model, cross_entropy, x, y)
    opt = KFAC(
        model,
        lr=0.2,
        damping=damping,
        fisher="full",
        ema_decay=0.0,
        damping_mode="standard" if mode == "standard" else "heuristic",
        second_factor=mode != "heuristic-no-second-factor",
    )
    moves = one_step(model, opt, x, y)
    for layer, grad in grads.items():
        if mode == "standard":
            expected = dense_standard(input_cov[layer], gradient_cov[layer], grad, damping)
        else:
            expected = dense_heuristic(
                input_cov[layer], gradient_cov[layer], grad, damping, mode == "heuristic"
            )
        torch.testing.assert_close(moves[layer], expected, **TOL)


def test_fisher_pass_leaves_parameter_gradients_alone():
    case = CASES[3]
    x, y = case.batch()
    model, twin = case.model(), case.model()
    opt = KFAC(model, lr=0.1, damping=0.1, fisher="full")
    opt.zero_grad()
    logits = model(x)
    opt.backward(cross_entropy(logits, y), logits)
    cross_entropy(twin(x), y).backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)


def train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        logits = model(x)
        opt.backward(cross_entropy(logits, y), logits)
        opt.step()


@pytest.mark.parametrize("damping_mode", ["heuristic", "standard"])
def test_checkpoint_resume_is_bit_identical_with_mc_sampling(damping_mode):
    case = CASES[3]
    data = [case.batch(seed=20 + i) for i in range(6)]
    hyper = dict(
        lr=0.05,
        damping=0.1,
        damping_mode=damping_mode,
        ema_decay=0.9,
        inv_every=2,
        stats_steps=1,
        momentum=0.9,
        seed=3,
    )
    full = case.model()
    opt_full = KFAC(full, **hyper)
    train(full, opt_full, data)
    first = case.model()
    opt_first = KFAC(first, **hyper)
    train(first, opt_first, data[:3])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt_first.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = case.model(seed=9)
    resumed.load_state_dict(checkpoint["model"])
    opt_resumed = KFAC(resumed, **(hyper | {"seed": 1234}))
    opt_resumed.load_state_dict(checkpoint["optimizer"])
    train(resumed, opt_resumed, data[3:])
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    ("inv_warmup", "source"), [(0, [0, 0, 0, 0, 4, 4]), (3, [0, 1, 2, 2, 4, 4])]
)
def test_inv_warmup_uses_the_factors_of_the_last_inversion_step(inv_warmup, source):
    """Step t's update is eq. 2 with this step's gradient and the factors of the last inversion
    step (``source[t]``): 0, 4, ... every T=4 steps, and each of the first 3 with the warm-up.
    ema_decay=0
    and the full Fisher make each step's factors those of its own batch, deterministically."""
    case = CASES[0]
    model = case.model()
    damping = 0.1
    opt = KFAC(
        model,
        lr=0.05,
        damping=damping,
        fisher="full",
        ema_decay=0.0,
        inv_every=4,
        inv_warmup=inv_warmup,
    )
    factors = {}
    for step, (x, y) in enumerate(case.batch(seed=30 + i) for i in range(len(source))):
        factors[step] = reference_factors(model, x, y, "full", seed=None)
        grads = gradient_matrices(model, cross_entropy, x, y)
        input_cov, gradient_cov = factors[source[step]]
        update = one_step(model, opt, x, y)
        for layer, grad in grads.items():
            expected = dense_heuristic(input_cov[layer], gradient_cov[layer], grad, damping)
            torch.testing.assert_close(update[layer], expected, **TOL)


def test_gaussian_likelihood_full_fisher_factor():
    """For ½‖y − f‖² the output Fisher is I: Ḡ = (1/B) Σ_k Σ_i e_i(k) e_i(k)ᵀ with unit vectors."""

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()

    x = torch.randn(5, 3, dtype=torch.float64)
    expected = {}
    reference_model = make()
    for k in range(3):
        basis = torch.zeros(5, 3, dtype=torch.float64)
        basis[:, k] = 1
        for layer, rows in layer_output_gradients(reference_model, x, basis).items():
            expected[layer] = expected.get(layer, 0) + rows.T @ rows / 5
    model = make()
    opt = KFAC(model, lr=0.1, damping=0.1, fisher="full", likelihood="gaussian", ema_decay=0.0)
    opt.zero_grad()
    out = model(x)
    opt.backward(0.5 * ((out - x) ** 2).sum(1).mean(), out)
    opt.step()
    for (_, _, state), ref_layer in zip(opt.layer_items(), expected):
        torch.testing.assert_close(state["gradient_covariance"], expected[ref_layer], **TOL)
    torch.testing.assert_close(
        opt.state[model[2].weight]["gradient_covariance"], torch.eye(3, dtype=torch.float64), **TOL
    )


def test_standard_loop_without_output_raises_clearly():
    model = CASES[0].model()
    opt = KFAC(model, lr=0.1, damping=0.1)
    x, y = CASES[0].batch()
    opt.zero_grad()
    cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"opt\.backward\(loss, output\)"):
        opt.step()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(damping_mode="adaptive"), "damping_mode"),
        (dict(fisher="exact"), "fisher"),
        (dict(likelihood="poisson"), "likelihood"),
        (dict(damping=0.0, damping_mode="standard"), "damping"),
        (dict(inv_every=0), "inv_every"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KFAC(nn.Linear(2, 2), **(dict(lr=0.1, damping=0.1) | kwargs))
