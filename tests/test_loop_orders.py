"""Any training-loop order gives the canonical update (issue 22, item 1).

The canonical loop is ``zero_grad; forward; backward; step``. Statistics belong to the
training forward passes since the last ``step()``, so the orders below see the same gradients
and the same statistics; each is compared with the canonical loop after a few steps, in
float64 at ``rtol=1e-10``, for FOOF, KFAC (full Fisher, deterministic) and the natural
gradient (full Fisher).
"""

import pytest
import torch
from torch import nn
from torch.nn.functional import cross_entropy

from foof import FOOF, KFAC, NaturalGradient

TOL = dict(rtol=1e-10, atol=1e-12)
STEPS = 4
MAKERS = {
    "foof": lambda m, **kw: FOOF(m, lr=0.1, damping=0.1, ema_decay=0.5, momentum=0.9, **kw),
    "kfac": lambda m, **kw: KFAC(
        m, lr=0.1, damping=0.1, fisher="full", ema_decay=0.5, momentum=0.9, **kw
    ),
    "natural": lambda m, **kw: NaturalGradient(
        m, lr=0.1, damping=0.1, fisher="full", momentum=0.9, **kw
    ),
}
NAMES = list(MAKERS)


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def data(step):
    generator = torch.Generator().manual_seed(10 + step)
    x = torch.randn(12, 5, generator=generator, dtype=torch.float64)
    return x, torch.randint(0, 3, (12,), generator=generator)


def canonical(model, opt, x, y):
    opt.zero_grad()
    out = model(x)
    opt.backward(cross_entropy(out, y), out)
    opt.step()


def zero_grad_after_forward(model, opt, x, y, set_to_none=True):
    out = model(x)
    opt.zero_grad(set_to_none=set_to_none)
    opt.backward(cross_entropy(out, y), out)
    opt.step()


def zeros_before_forward(model, opt, x, y):
    opt.zero_grad(set_to_none=False)
    out = model(x)
    opt.backward(cross_entropy(out, y), out)
    opt.step()


def accumulated(model, opt, x, y, micro=3):
    """``micro`` micro-batches, each loss divided by ``micro``: the big batch's gradient."""
    opt.zero_grad()
    for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
        out = model(xs)
        opt.backward(cross_entropy(out, ys) / micro, out)
    opt.step()


def with_closure(model, opt, x, y):
    def closure():
        opt.zero_grad()
        out = model(x)
        loss = cross_entropy(out, y)
        opt.backward(loss, out)
        return loss

    loss = opt.step(closure)
    assert torch.isfinite(loss)


def with_an_extra_forward_before_zero_grad(model, opt, x, y):
    """A logging forward pass in train mode before the canonical loop is not a statistic."""
    model(x + 1.0).sum()
    canonical(model, opt, x, y)


def run(name, loop, steps=STEPS, **kwargs):
    model = net()
    opt = MAKERS[name](model, **kwargs)
    for step in range(steps):
        loop(model, opt, *data(step))
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "loop",
    [
        zero_grad_after_forward,
        lambda m, o, x, y: zero_grad_after_forward(m, o, x, y, set_to_none=False),
        zeros_before_forward,
        with_closure,
        with_an_extra_forward_before_zero_grad,
    ],
    ids=[
        "zero_grad-after-forward",
        "set_to_none-false-after-forward",
        "zeros-before",
        "closure",
        "extra-forward-before-zero_grad",
    ],
)
def test_loop_order_gives_the_canonical_update(name, loop):
    torch.testing.assert_close(run(name, loop), run(name, canonical), **TOL)


@pytest.mark.parametrize("name", NAMES)
def test_set_to_none_false_with_the_fused_backward_gives_the_canonical_update(name):
    """Fused backward: zero_grad(set_to_none=False) zeroes only formed gradients; the skipped
    weights' stay None, which is what sends the step to the recorded ``E`` and ``A``."""
    fused = run(name, zeros_before_forward, fused_backward=True)
    torch.testing.assert_close(fused, run(name, canonical), **TOL)


@pytest.mark.parametrize("name", NAMES)
def test_accumulated_micro_batches_give_the_big_batch_update(name):
    """Statistics of all three forward passes, one step: the big batch's (full Fisher, and
    FOOF's Σ, are means over the same rows)."""
    torch.testing.assert_close(run(name, accumulated), run(name, canonical), **TOL)


@pytest.mark.parametrize("name", NAMES)
def test_clip_grad_norm_between_backward_and_step_is_the_clipped_gradients_update(name):
    """The low-rank product notices the clipped gradient is no longer ``EᵀA`` and uses it:
    FOOF and KFAC equal their dense product (``low_rank=False``) on the clipped gradient; the
    natural gradient, whose solve has no dense switch, differs from the unclipped update."""

    def clipped(model, opt, x, y):
        opt.zero_grad()
        out = model(x)
        opt.backward(cross_entropy(out, y), out)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
        opt.step()

    result = run(name, clipped)
    if name != "natural":
        torch.testing.assert_close(result, run(name, clipped, low_rank=False), **TOL)
    assert torch.isfinite(result).all()
    assert not torch.allclose(result, run(name, canonical))
