"""Checkpoints, hooks and unusual shapes or modules (issue 8's faults, injected one by one)."""

import gc
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from foof import FOOF, KFAC, NaturalGradient
from tests.reference import gradient_matrices, layer_input_rows, layer_inputs


def roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def train_step(model, opt, x, y):
    opt.zero_grad()
    out = model(x)
    opt.backward(nn.functional.cross_entropy(out, y), out)
    opt.step()


def net(width=8, bias=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, width, bias=bias), nn.ReLU(), nn.Linear(width, 3))


def data(n=6):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=generator), torch.randint(0, 3, (n,), generator=generator)


def test_checkpoint_of_another_model_is_refused_clearly():
    model = net()
    opt = FOOF(model, lr=0.1, damping=1.0)
    train_step(model, opt, *data())
    state = roundtrip(opt.state_dict())
    other = FOOF(net(width=16), lr=0.1, damping=1.0)
    with pytest.raises(
        ValueError, match=r"different model.*layer '0': checkpoint \[8, 5\], model \[16, 5\]"
    ):
        other.load_state_dict(state)


def test_checkpoint_of_another_optimizer_is_refused_clearly():
    model = net()
    opt = FOOF(model, lr=0.1, damping=1.0)
    train_step(model, opt, *data())
    with pytest.raises(ValueError, match="from a FOOF optimizer, not KFAC"):
        KFAC(net(), lr=0.1, damping=1.0).load_state_dict(roundtrip(opt.state_dict()))


def test_discarded_optimizers_leave_no_hooks():
    model = net()
    for _ in range(50):
        FOOF(model, lr=0.1, damping=1.0)  # never closed
    gc.collect()
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    with FOOF(model, lr=0.1, damping=1.0) as opt:
        train_step(model, opt, *data())
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


@pytest.mark.parametrize("make", [FOOF, KFAC, NaturalGradient], ids=["foof", "kfac", "natural"])
def test_optimizers_dropped_after_stepping_leave_no_hooks(make):
    # Regression: each new optimizer's forward pass also ran the hooks of the previous, not yet
    # collected one; KFAC kept those outputs, whose tensor hooks referenced its capture, a
    # cycle the garbage collector cannot see through, so hooks piled up (3 per optimizer).
    model = net()
    for _ in range(5):
        opt = make(model, lr=0.1, damping=1.0)
        train_step(model, opt, *data())
        del opt
    gc.collect()
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


@pytest.mark.parametrize(
    "make",
    [
        lambda m: FOOF(m, lr=0.1, damping=0.1),
        lambda m: KFAC(m, lr=0.1, damping=0.1),
        lambda m: NaturalGradient(m, lr=0.1, damping=0.1),
    ],
    ids=["foof", "kfac", "natural"],
)
@pytest.mark.parametrize("batch", [1, 40], ids=["batch-1", "batch-larger-than-width"])
def test_tiny_and_large_batches_stay_finite(make, batch):
    model = net()
    opt = make(model)
    for _ in range(3):
        train_step(model, opt, *data(batch))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_frozen_parameters_are_left_alone():
    model = net()
    model[0].weight.requires_grad_(False)
    opt = FOOF(model, lr=0.1, damping=1.0)
    frozen = model[0].weight.detach().clone()
    train_step(model, opt, *data())
    assert torch.equal(model[0].weight, frozen)
    assert "0" not in opt.layers


def test_layer_that_takes_no_part_in_the_loss_is_skipped():
    model = nn.ModuleDict({"used": nn.Linear(4, 3), "unused": nn.Linear(4, 3)})
    opt = FOOF(model, lr=0.1, damping=1.0)
    before = model["unused"].weight.detach().clone()
    x, y = data()
    opt.zero_grad()
    nn.functional.cross_entropy(model["used"](x), y).backward()
    opt.step()
    assert torch.equal(model["unused"].weight, before)


def test_module_used_twice_counts_the_rows_of_both_uses():
    """Weight sharing: Σ is the mean over the rows of both calls, Ĝ the summed gradient."""
    torch.manual_seed(0)
    shared = nn.Linear(4, 4, bias=False).double()
    model = nn.Sequential(shared, nn.Tanh(), shared)
    x = torch.randn(5, 4, dtype=torch.float64)
    opt = FOOF(model, lr=1.0, damping=0.3, ema_decay=0.0, low_rank=False)
    with torch.no_grad():
        first = x
        second = torch.tanh(shared(x))
    rows = torch.cat([first, second])
    sigma = rows.T @ rows / len(rows)
    opt.zero_grad()
    loss = model(x).pow(2).sum()
    loss.backward()
    grad = shared.weight.grad.clone()
    before = shared.weight.detach().clone()
    opt.step()
    expected = grad @ torch.linalg.inv(sigma + 0.3 * torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(before - shared.weight.detach(), expected, rtol=1e-10, atol=1e-12)


def test_layer_added_after_construction_gets_no_preconditioning_but_old_ones_work():
    model = net()
    opt = FOOF(model, lr=0.1, damping=1.0)
    model.append(nn.Linear(3, 3))  # not among the optimizer's parameters
    train_step(model, opt, *data())
    assert set(opt.layers) == {"0", "2"}


@settings(max_examples=25, deadline=None)
@given(
    in_channels=st.integers(1, 3),
    out_channels=st.integers(1, 4),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    bias=st.booleans(),
    batch=st.integers(1, 3),
    damping=st.sampled_from([1e-3, 0.1, 10.0]),
)
def test_property_conv_update_matches_dense_formula(
    in_channels, out_channels, kernel, stride, padding, dilation, bias, batch, damping
):
    size = 7
    if (kernel - 1) * dilation + 1 > size + 2 * padding:
        return
    torch.manual_seed(0)
    conv = nn.Conv2d(
        in_channels,
        out_channels,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        bias=bias,
    ).double()
    model = nn.Sequential(conv, nn.Flatten())
    x = torch.randn(batch, in_channels, size, size, dtype=torch.float64)

    def loss_fn(out, _):
        return out.pow(2).mean()

    grads = gradient_matrices(model, loss_fn, x, None)
    rows = layer_input_rows(conv, layer_inputs(model, x)[conv])
    sigma = rows.T @ rows / len(rows)
    expected = grads[conv] @ torch.linalg.inv(
        sigma + damping * torch.eye(len(sigma), dtype=torch.float64)
    )
    before = torch.cat(
        [conv.weight.detach().flatten(1)] + ([conv.bias.detach()[:, None]] if bias else []), 1
    )
    opt = FOOF(model, lr=1.0, damping=damping, ema_decay=0.0)
    opt.zero_grad()
    loss_fn(model(x), None).backward()
    opt.step()
    after = torch.cat(
        [conv.weight.detach().flatten(1)] + ([conv.bias.detach()[:, None]] if bias else []), 1
    )
    torch.testing.assert_close(before - after, expected, rtol=1e-8, atol=1e-10)
    opt.close()


@settings(max_examples=25, deadline=None)
@given(
    widths=st.lists(st.integers(1, 12), min_size=2, max_size=4),
    bias=st.booleans(),
    batch=st.integers(1, 16),
    damping=st.sampled_from([1e-3, 0.1, 10.0]),
)
def test_property_linear_update_matches_dense_formula(widths, bias, batch, damping):
    torch.manual_seed(0)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b, bias=bias), nn.Tanh()]
    model = nn.Sequential(*layers[:-1]).double()
    x = torch.randn(batch, widths[0], dtype=torch.float64)

    def loss_fn(out, _):
        return out.pow(2).mean()

    grads = gradient_matrices(model, loss_fn, x, None)
    inputs = layer_inputs(model, x)
    before = {
        m: torch.cat([m.weight.detach()] + ([m.bias.detach()[:, None]] if bias else []), 1)
        for m in grads
    }
    opt = FOOF(model, lr=1.0, damping=damping, ema_decay=0.0)
    opt.zero_grad()
    loss_fn(model(x), None).backward()
    opt.step()
    for m, grad in grads.items():
        rows = layer_input_rows(m, inputs[m])
        sigma = rows.T @ rows / len(rows)
        expected = grad @ torch.linalg.inv(
            sigma + damping * torch.eye(len(sigma), dtype=torch.float64)
        )
        after = torch.cat([m.weight.detach()] + ([m.bias.detach()[:, None]] if bias else []), 1)
        torch.testing.assert_close(before[m] - after, expected, rtol=1e-8, atol=1e-10)
    opt.close()
