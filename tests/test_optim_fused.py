"""fused_backward=True: autograd skips the weight-gradient GEMM, the updates stay the same.

Every comparison is float64 against the same optimizer without the fused backward (itself
checked against dense formulas in the other optimizer tests), rtol 1e-9, over three steps so
that momentum, EMAs and amortised inverses are exercised; one test compares with the dense
FOOF formula directly.
"""

import gc

import pytest
import torch
from torch import nn

from foof import FOOF, KFAC, NaturalGradient
from foof.optim import base
from tests.cases import CASES
from tests.test_optim_low_rank import batch, expected_foof, step_moves, wide_model

TOL = dict(rtol=1e-9, atol=1e-12)

OPTIMIZERS = {
    "foof": lambda m, f: FOOF(m, lr=0.3, damping=0.1, fused_backward=f),
    "foof-amortised": lambda m, f: FOOF(
        m, lr=0.3, damping=0.1, inv_every=2, momentum=0.9, weight_decay=0.01, fused_backward=f
    ),
    "kfac": lambda m, f: KFAC(m, lr=0.3, damping=0.1, seed=0, fused_backward=f),
    "kfac-first-factor": lambda m, f: KFAC(
        m, lr=0.3, damping=0.1, second_factor=False, fisher="full", fused_backward=f
    ),
    "kfac-standard": lambda m, f: KFAC(
        m, lr=0.3, damping=0.1, damping_mode="standard", fisher="empirical", fused_backward=f
    ),
    "natural-mc": lambda m, f: NaturalGradient(
        m, lr=0.3, damping=0.1, seed=0, momentum=0.5, fused_backward=f
    ),
    "natural-block-full": lambda m, f: NaturalGradient(
        m, lr=0.3, damping=0.1, fisher="full", block_diagonal=True, fused_backward=f
    ),
}


def deep_conv():
    # a convolution in the middle (its input requires grad; its weight gradient is still formed
    # by autograd) before a Linear layer whose weight gradient is skipped
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 4, 3, stride=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 3),
    ).double()


MODELS = {case.name: (case.model, case.batch) for case in CASES}
MODELS["wide"] = (wide_model, batch)
MODELS["deep-conv"] = (
    lambda: (torch.manual_seed(0), deep_conv())[1],
    lambda: (torch.randn(6, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (6,))),
)


def fused_layers(model):
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def train(make_model, make_batch, make_opt, fused, steps=3):
    torch.manual_seed(5)
    model = make_model()
    x, y = make_batch()
    opt = make_opt(model, fused)
    skipped = []
    for _ in range(steps):
        opt.zero_grad()
        output = model(x)
        opt.backward(nn.functional.cross_entropy(output, y), output)
        skipped.append([m.weight.grad is None for m in opt.layers.values()])
        opt.step()
    return model, skipped


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("method", sorted(OPTIMIZERS))
def test_fused_backward_gives_the_same_updates(method, model_name):
    make_model, make_batch = MODELS[model_name]
    plain, skipped_plain = train(make_model, make_batch, OPTIMIZERS[method], fused=False)
    fused, skipped_fused = train(make_model, make_batch, OPTIMIZERS[method], fused=True)
    for a, b in zip(plain.parameters(), fused.parameters()):
        torch.testing.assert_close(a, b, **TOL)
    assert not any(any(s) for s in skipped_plain)
    # every Linear layer skips its weight gradient on every step (the first one too: its
    # output is re-attached to the graph so that E reaches it); convolutions keep autograd's
    expected = [isinstance(m, nn.Linear) for m in fused_layers(fused)]
    assert skipped_fused == [expected] * 3
    assert all(p.requires_grad for p in fused.parameters())


def test_fused_foof_matches_the_dense_formula_on_the_low_rank_path():
    model = wide_model()
    x, y = batch()
    expected = expected_foof(model, x, y, 0.1)
    opt = FOOF(model, lr=0.5, damping=0.1, ema_decay=0.0, fused_backward=True)
    moves = step_moves(model, opt, x, y)
    for move, ref in zip(moves, expected):
        torch.testing.assert_close(move, ref.reshape(move.shape), **TOL)


def test_biases_keep_their_gradients_and_eval_passes_are_untouched():
    model = wide_model()
    x, y = batch()
    opt = FOOF(model, lr=0.1, damping=0.1, fused_backward=True)
    nn.functional.cross_entropy(model(x), y).backward()
    assert model[0].bias.grad is not None  # model[2] has no bias
    assert model[0].weight.grad is None and model[2].weight.grad is None
    opt.zero_grad()
    model.eval()  # evaluation mode: nothing is skipped, gradients are formed as usual
    nn.functional.cross_entropy(model(x), y).backward()
    assert model[2].weight.grad is not None
    model.train()
    with torch.no_grad():
        model(x)
    assert all(p.requires_grad for p in model.parameters())


def test_weight_requires_grad_is_restored_when_the_forward_raises():
    model = wide_model()
    FOOF(model, lr=0.1, damping=0.1, fused_backward=True)
    x = torch.randn(4, 30, dtype=torch.float64, requires_grad=True)
    model[2].register_forward_hook(lambda *_: 1 / 0)  # runs after the skipper's pre-hook
    with pytest.raises(ZeroDivisionError):
        model(x)
    assert model[2].weight.requires_grad


class PoisonGradient(torch.autograd.Function):
    """Identity forward; NaN gradients backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class Poison(nn.Module):
    def forward(self, x):
        return PoisonGradient.apply(x)


def test_nonfinite_output_gradients_skip_the_step():
    # Only the fused layer's recorded E is NaN: the layer before it is frozen (its input, x,
    # requires grad so the fused layer's does too) and the fused layer has no bias, so no
    # formed gradient carries the NaN and the check of E must catch it.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(30, 40, bias=False).requires_grad_(False),
        nn.Tanh(),
        nn.Linear(40, 35, bias=False),
        Poison(),
    ).double()
    x, y = batch()
    x.requires_grad_(True)
    opt = FOOF(model, lr=0.1, damping=0.1, fused_backward=True)
    before = model[2].weight.detach().clone()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    assert model[2].weight.grad is None
    with pytest.warns(RuntimeWarning, match="output gradients of layer '2'"):
        opt.step()
    assert opt.skipped_steps == 1
    torch.testing.assert_close(model[2].weight, before, rtol=0, atol=0)


def test_fused_backward_is_refused_under_torch_distributed(monkeypatch):
    monkeypatch.setattr(base.distributed, "is_distributed", lambda: True)
    with pytest.raises(ValueError, match="torch.distributed"):
        FOOF(wide_model(), lr=0.1, damping=0.1, fused_backward=True)


def test_a_dropped_fused_optimizer_leaves_no_hooks():
    model = wide_model()
    x, y = batch()
    for _ in range(3):
        opt = KFAC(model, lr=0.1, damping=0.1, fused_backward=True, seed=0)
        opt.zero_grad()
        logits = model(x)
        opt.backward(nn.functional.cross_entropy(logits, y), logits)
        opt.step()
        del opt
    gc.collect()
    for layer in (model[0], model[2]):
        assert not layer._forward_pre_hooks and not layer._forward_hooks


def _accumulated_step(fused, passes):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(30, 40), nn.Tanh(), nn.Linear(40, 35), nn.Tanh(), nn.Linear(35, 5)
    ).double()
    opt = FOOF(model, lr=0.1, damping=0.1, fused_backward=fused)
    generator = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(n, 30, generator=generator, dtype=torch.float64), torch.arange(n) % 5)
        for n in (4, 3)
    ]
    opt.zero_grad()
    passes(model, batches)
    opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _two_backward_passes(model, batches):
    for x, y in batches:
        nn.functional.cross_entropy(model(x), y).backward()


def _one_graph_two_calls(model, batches):
    sum(nn.functional.cross_entropy(model(x), y) for x, y in batches).backward()


def _extra_forward_without_backward(model, batches):
    (x, y), (other, _) = batches
    model(other)  # e.g. a metric computed in train mode with autograd on: never backpropagated
    nn.functional.cross_entropy(model(x), y).backward()


def _output_backpropagated_twice(model, batches):
    x, y = batches[0]
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward(retain_graph=True)
    (0.5 * loss).backward()


@pytest.mark.parametrize(
    "passes",
    [
        _two_backward_passes,
        _one_graph_two_calls,
        _extra_forward_without_backward,
        _output_backpropagated_twice,
    ],
)
def test_fused_rows_pair_up_call_by_call(passes):
    # E and A must pair row for row whatever order the backward passes ran in; the plain
    # optimizer (autograd's own gradient) is the reference
    torch.testing.assert_close(
        _accumulated_step(True, passes), _accumulated_step(False, passes), **TOL
    )


def test_a_first_layer_without_bias_still_receives_its_output_gradient():
    # input (the data) and weight out of the graph, no bias: the output is re-attached, E is
    # recorded, and nothing but the leaf anchor is created (no input gradient for the data)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 40, bias=False), nn.Tanh(), nn.Linear(40, 5)).double()
    x, _ = batch()
    opt = FOOF(model, lr=0.1, damping=0.1, fused_backward=True)
    output = model[0](x)
    assert output.requires_grad and model[0].weight.requires_grad
    model(x).sum().backward()
    assert model[0].weight.grad is None and x.grad is None
    # the first, standalone call was never backpropagated: E of the second call only
    assert opt.capture.output_grads(model[0]).shape == (4, 40)
    output_grads, rows = opt.gradient_factors(model[0])
    assert output_grads.shape == (4, 40) and rows.shape == (4, 30)
