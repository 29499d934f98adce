"""The low-rank product Ĝ P = Eᵀ(A P) is exact, used when cheaper, and refused when Ĝ ≠ EᵀA."""

import pytest
import torch
from torch import nn

from foof import FOOF, KFAC
from tests.reference import gradient_matrices, layer_input_rows, layer_inputs

TOL = dict(rtol=1e-9, atol=1e-12)


def wide_model():
    torch.manual_seed(0)
    # batch 4 ≪ widths 30/40: the factored form needs fewer flops for both layers
    return nn.Sequential(nn.Linear(30, 40), nn.Tanh(), nn.Linear(40, 35, bias=False)).double()


def batch():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 30, generator=generator, dtype=torch.float64)
    return x, torch.randint(0, 35, (4,), generator=generator)


def loss_fn(logits, y):
    return nn.functional.cross_entropy(logits, y)


def spy(opt):
    used = []
    original = opt.low_rank_factors

    def wrapped(module, grad, two_sided):
        result = original(module, grad, two_sided)
        used.append(result is not None)
        return result

    opt.low_rank_factors = wrapped
    return used


def step_moves(model, opt, x, y, modify=None):
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    logits = model(x)
    opt.backward(loss_fn(logits, y), logits)
    if modify is not None:
        modify(model)
    opt.step()
    return [
        (b - p.detach()) / opt.param_groups[0]["lr"] for b, p in zip(before, model.parameters())
    ]


def expected_foof(model, x, y, damping, grads=None):
    grads = grads or gradient_matrices(model, loss_fn, x, y)
    out = []
    for layer, inputs in layer_inputs(model, x).items():
        rows = layer_input_rows(layer, inputs)
        sigma = rows.T @ rows / len(rows)
        d = grads[layer] @ torch.linalg.inv(
            sigma + damping * torch.eye(len(sigma), dtype=sigma.dtype)
        )
        if layer.bias is not None:
            out += [d[:, :-1], d[:, -1]]
        else:
            out.append(d)
    return out


def test_foof_low_rank_path_is_taken_and_exact():
    model = wide_model()
    x, y = batch()
    expected = expected_foof(model, x, y, 0.1)
    opt = FOOF(model, lr=0.5, damping=0.1, ema_decay=0.0)
    used = spy(opt)
    moves = step_moves(model, opt, x, y)
    assert used == [True, True]
    for move, ref in zip(moves, expected):
        torch.testing.assert_close(move, ref.reshape(move.shape), **TOL)


def test_modified_gradient_falls_back_to_the_dense_product():
    model = wide_model()
    x, y = batch()
    grads = gradient_matrices(model, loss_fn, x, y)
    layer = model[2]
    grads[layer] = grads[layer] * 0.5 + 0.01  # what the hook below does to the gradient
    expected = expected_foof(model, x, y, 0.1, grads)
    opt = FOOF(model, lr=0.5, damping=0.1, ema_decay=0.0)
    used = spy(opt)

    def clip(m):
        m[2].weight.grad.mul_(0.5).add_(0.01)

    moves = step_moves(model, opt, x, y, modify=clip)
    assert used == [True, False]
    for move, ref in zip(moves, expected):
        torch.testing.assert_close(move, ref.reshape(move.shape), **TOL)


@pytest.mark.parametrize("second_factor", [True, False])
def test_kfac_heuristic_low_rank_equals_dense(second_factor):
    x, y = batch()
    moves = {}
    for low_rank in (True, False):
        model = wide_model()
        opt = KFAC(
            model,
            lr=0.5,
            damping=0.1,
            ema_decay=0.0,
            fisher="full",
            second_factor=second_factor,
            low_rank=low_rank,
        )
        used = spy(opt)
        moves[low_rank] = step_moves(model, opt, x, y)
        assert all(used) == low_rank
    for a, b in zip(moves[True], moves[False]):
        torch.testing.assert_close(a, b, **TOL)


def test_layers_where_low_rank_never_pays_are_not_recorded_between_statistics_steps():
    # batch 64 ≫ width 8: the factored form is never cheaper, so after one step that showed it,
    # inputs and output gradients are recorded only on statistics steps (inv_every=5,
    # stats_steps=1: steps 4, 9, ...); the updates stay the dense formula's
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 5)).double()
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(64, 8, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 5, (64,), generator=generator)
    opt = FOOF(model, lr=0.1, damping=0.1, inv_every=5, stats_steps=1)
    recorded = []
    for _ in range(10):
        opt.zero_grad()
        logits = model(x)
        recorded.append(bool(opt.capture.records[model[0]].inputs))
        opt.backward(loss_fn(logits, y), logits)
        opt.step()
    assert recorded == [True, False, False, False, False, True, False, False, False, False]
    assert opt._low_rank_cheaper is False

    wide = wide_model()
    opt = FOOF(wide, lr=0.1, damping=0.1, inv_every=5, stats_steps=1)
    xs, ys = batch()
    for _ in range(3):
        opt.zero_grad()
        logits = wide(xs)
        assert opt.capture.records[wide[0]].inputs  # the low-rank product needs A every step
        opt.backward(loss_fn(logits, ys), logits)
        opt.step()
    assert opt._low_rank_cheaper is True


@pytest.mark.parametrize("low_rank", [True, False])
@pytest.mark.parametrize("second_factor", [True, False])
def test_kfac_cholesky_solves_equal_the_formed_inverses(second_factor, low_rank, monkeypatch):
    # inv_every=1: KFAC keeps Cholesky factors and solves; forcing formed inverses must give
    # the same update (float64, TOL)
    x, y = batch()
    moves = {}
    for solves in (True, False):
        if not solves:
            monkeypatch.setattr(KFAC, "solves", staticmethod(lambda group: False))
        model = wide_model()
        opt = KFAC(
            model,
            lr=0.5,
            damping=0.1,
            fisher="full",
            second_factor=second_factor,
            low_rank=low_rank,
        )
        moves[solves] = step_moves(model, opt, x, y)
        state = opt.state[model[0].weight]
        assert ("input_cholesky" in state, "input_inverse" in state) == (solves, not solves)
    for a, b in zip(moves[True], moves[False]):
        torch.testing.assert_close(a, b, **TOL)
