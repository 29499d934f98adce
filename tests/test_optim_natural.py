import pytest
import torch
from torch import nn

from foof import NaturalGradient
from foof.curvature.woodbury import LayerFisherData
from foof.optim import natural as natural_module
from tests.cases import CASE_IDS, CASES
from tests.reference import (
    dense_fisher,
    flat_gradient,
    flatten_layer_matrices,
    mc_labels,
    supported_layers,
)

TOL = dict(rtol=1e-8, atol=1e-12)  # the acceptance bar: <= 1e-8 relative, float64


def cross_entropy(logits, y):
    return nn.functional.cross_entropy(logits, y)


def flat_params(model):
    return flatten_layer_matrices(
        model, {k: v.detach().clone() for k, v in model.named_parameters()}
    )


def one_step(model, opt, x, y):
    before = flat_params(model)
    opt.zero_grad()
    logits = model(x)
    opt.backward(cross_entropy(logits, y), logits)
    opt.step()
    return (before - flat_params(model)) / opt.param_groups[0]["lr"]


def block_diagonal(model, matrix):
    mask = torch.zeros_like(matrix, dtype=torch.bool)
    start = 0
    for _, m in supported_layers(model):
        size = sum(p.numel() for p in m.parameters(recurse=False))
        mask[start : start + size, start : start + size] = True
        start += size
    return matrix * mask


def natural_direction(fisher, grad, damping):
    return torch.linalg.solve(fisher + damping * torch.eye(len(fisher), dtype=fisher.dtype), grad)


@pytest.fixture(params=["shape-chosen", "factored"])
def gradient_form(request, monkeypatch):
    """How ∇L enters the solve: as the shapes decide (mostly formed on these tiny layers), or
    always as the factors E_LᵀA_L (row Gram matrices; conv layers included)."""
    taken = []
    if request.param == "factored":

        def always(layer, rows):
            taken.append(rows)
            return True

        monkeypatch.setattr(natural_module, "factored_projection_is_cheaper", always)
    yield request.param, taken


@pytest.mark.parametrize("block", [False, True], ids=["full-matrix", "block-diagonal"])
@pytest.mark.parametrize("fisher", ["full", "mc", "empirical"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_update_is_exact_damped_natural_gradient(case, fisher, block, gradient_form):
    """(λI + F)⁻¹ ∇L against the explicit Fisher from per-sample Jacobians (torch.func)."""
    model = case.model()
    x, y = case.batch()
    damping, seed = 0.05, 7
    labels = {"full": None, "mc": mc_labels(model, x, seed), "empirical": y}[fisher]
    dense = dense_fisher(model, x, labels)
    if block:
        dense = block_diagonal(model, dense)
    expected = natural_direction(dense, flat_gradient(model, cross_entropy, x, y), damping)
    opt = NaturalGradient(
        model, lr=0.5, damping=damping, fisher=fisher, block_diagonal=block, seed=seed
    )
    torch.testing.assert_close(one_step(model, opt, x, y), expected, **TOL)
    form, taken = gradient_form
    assert len(taken) == (len(opt.layers) if form == "factored" else 0)


def test_logistic_regression_block_diagonal_equals_full():
    case = next(c for c in CASES if c.name == "logistic")
    x, y = case.batch()
    directions = []
    for block in (False, True):
        model = case.model()
        opt = NaturalGradient(model, lr=1.0, damping=0.01, fisher="full", block_diagonal=block)
        directions.append(one_step(model, opt, x, y))
    torch.testing.assert_close(directions[0], directions[1], **TOL)


def test_previous_fisher_batch_uses_the_last_batch(gradient_form):
    case = CASES[0]
    (x0, y0), (x1, y1) = case.batch(seed=3), case.batch(seed=4)
    model = case.model()
    # the Fisher of the first batch, at the parameters where it was captured
    fisher_first = dense_fisher(case.model(), x0, None)
    opt = NaturalGradient(model, lr=0.1, damping=0.1, fisher="full", fisher_batch="previous")
    first = one_step(model, opt, x0, y0)
    expected_first = natural_direction(
        fisher_first, flat_gradient(case.model(), cross_entropy, x0, y0), 0.1
    )
    torch.testing.assert_close(first, expected_first, **TOL)  # step 0 has no previous batch
    expected = natural_direction(fisher_first, flat_gradient(model, cross_entropy, x1, y1), 0.1)
    torch.testing.assert_close(one_step(model, opt, x1, y1), expected, **TOL)


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.name.startswith("conv")], ids=lambda c: c.name
)
def test_conv_gram_by_rows_equals_gram_by_per_sample_gradients(case):
    generator = torch.Generator().manual_seed(0)
    batch, positions = 4, 9
    data = LayerFisherData(
        torch.randn(batch * positions, 7, generator=generator, dtype=torch.float64),
        torch.randn(3, batch * positions, 5, generator=generator, dtype=torch.float64),
        batch,
    )
    torch.testing.assert_close(data.gram("rows"), data.gram("per_sample"), **TOL)
    flat = data.per_sample_gradients().reshape(data.num_columns, -1)
    v = torch.randn(5, 7, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(data.transpose_mv(v), flat @ v.reshape(-1), **TOL)
    w = torch.randn(data.num_columns, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(data.mv(w).reshape(-1), flat.T @ w, **TOL)


def test_requires_output_for_backward_and_positive_damping():
    model = CASES[0].model()
    with pytest.raises(ValueError, match="damping"):
        NaturalGradient(model, lr=0.1, damping=0.0)
    with pytest.raises(ValueError, match="fisher_batch"):
        NaturalGradient(model, lr=0.1, damping=1.0, fisher_batch="next")
    opt = NaturalGradient(model, lr=0.1, damping=1.0)
    x, y = CASES[0].batch()
    opt.zero_grad()
    with pytest.raises(ValueError, match="opt.backward"):
        opt.backward(cross_entropy(model(x), y))


def test_a_gradient_changed_after_backward_is_used_as_it_is(monkeypatch):
    """∇L is taken as E_LᵀA_L only when the formed gradient equals it (probe check)."""
    monkeypatch.setattr(natural_module, "factored_projection_is_cheaper", lambda *_: True)
    case = CASES[0]
    x, y = case.batch()
    model = case.model()
    dense = dense_fisher(model, x, None)
    grad = flat_gradient(model, cross_entropy, x, y) * 0.5  # what the hook below does
    expected = natural_direction(dense, grad, 0.1)
    opt = NaturalGradient(model, lr=0.5, damping=0.1, fisher="full")
    before = flat_params(model)
    opt.zero_grad()
    logits = model(x)
    opt.backward(cross_entropy(logits, y), logits)
    for p in model.parameters():
        p.grad.mul_(0.5)
    opt.step()
    torch.testing.assert_close((before - flat_params(model)) / 0.5, expected, **TOL)


def _mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def _natural_step(model, x, y, autocast=None):
    """One full-Fisher natural-gradient step; returns the optimizer and the float64 update."""
    opt = NaturalGradient(model, lr=0.1, damping=0.1, fisher="full")
    before = [p.detach().double().clone() for p in model.parameters()]
    opt.zero_grad()
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        logits = model(x.to(next(model.parameters()).dtype))
        loss = cross_entropy(logits, y)
    opt.backward(loss, logits)
    opt.step()
    after = [p.detach().double() for p in model.parameters()]
    update = torch.cat([(b - a).flatten() for b, a in zip(before, after)])
    return opt, update


@pytest.mark.parametrize(
    ("dtype", "autocast"),
    [(torch.float32, torch.bfloat16), (torch.bfloat16, None), (torch.float16, None)],
    ids=["bf16-autocast", "bf16-model", "fp16-model"],
)
def test_low_precision_keeps_fp32_internals_and_the_fp32_step(dtype, autocast):
    """As FOOF and KFAC: A, E and the solve in float32; the step is the float32 one up to the
    low-precision forward/backward (bf16: 8 bits of mantissa, so rtol 5e-2 on the update)."""
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 8, generator=generator), torch.randint(0, 3, (12,), generator=generator)
    _, reference = _natural_step(_mlp(), x, y)
    model = _mlp(dtype)
    opt, update = _natural_step(model, x, y, autocast)
    for _, _, state in opt.layer_items():
        assert state["fisher_inputs"].dtype == torch.float32
        assert state["fisher_output_grads"].dtype == torch.float32
    assert all(p.dtype == dtype for p in model.parameters())
    assert bool(torch.isfinite(update).all())
    error = float((update - reference).norm() / reference.norm())
    assert error < 5e-2, error


def test_a_model_without_supported_layers_trains_alike_in_all_three_optimizers():
    """No Linear/Conv2d: FOOF, KFAC and the natural gradient all fall back to SGD with momentum,
    warning once which parameters, and take identical steps (float64, exact)."""
    from foof import FOOF, KFAC

    class Bilinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Bilinear(4, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(x, x)

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=generator)
    results = []
    for make in (FOOF, KFAC, NaturalGradient, torch.optim.SGD):
        torch.manual_seed(0)
        model = Bilinear().double()
        if make is torch.optim.SGD:
            opt = make(model.parameters(), lr=0.1, momentum=0.9)
        else:
            with pytest.warns(UserWarning, match="plain SGD"):
                opt = make(model, lr=0.1, damping=0.1, momentum=0.9, fallback=None)
        for _ in range(3):
            opt.zero_grad()
            logits = model(x)
            loss = cross_entropy(logits, y)
            if make is torch.optim.SGD:
                loss.backward()
            else:
                opt.backward(loss, logits)
            opt.step()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-12, atol=1e-14)
