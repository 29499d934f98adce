"""Non-finite values: a step that meets one changes nothing, warns once, or raises on request."""

import pytest
import torch
from torch import nn

from foof import FOOF, KFAC, NaturalGradient
from foof.optim.base import NonFiniteError
from tests.cases import CASES

OPTIMIZERS = {
    "foof": lambda m, **kw: FOOF(m, lr=0.1, damping=0.1, ema_decay=0.5, momentum=0.9, **kw),
    "kfac": lambda m, **kw: KFAC(m, lr=0.1, damping=0.1, ema_decay=0.5, momentum=0.9, **kw),
    "natural": lambda m, **kw: NaturalGradient(m, lr=0.1, damping=0.1, momentum=0.9, **kw),
}


def step(model, opt, x, y):
    opt.zero_grad()
    logits = model(x)
    opt.backward(nn.functional.cross_entropy(logits, y), logits)
    opt.step()


def snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = {
        id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
        for p, s in opt.state.items()
    }
    return params, state, opt.param_groups[0]["step"]


def assert_same(before, after):
    for p, q in zip(before[0], after[0]):
        assert torch.equal(p, q)
    assert before[1].keys() == after[1].keys()
    for key in before[1]:
        for name, value in before[1][key].items():
            other = after[1][key][name]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, name
    assert before[2] == after[2]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("fault", ["nan-input", "inf-gradient"])
def test_nonfinite_step_is_skipped_and_changes_nothing(name, fault):
    case = CASES[3]  # conv + linear with biases
    model = case.model()
    opt = OPTIMIZERS[name](model)
    for seed in range(2):
        step(model, opt, *case.batch(seed=seed))
    before = snapshot(model, opt)
    x, y = case.batch(seed=5)
    if fault == "nan-input":
        x[0, 0, 0, 0] = float("nan")
        with pytest.warns(RuntimeWarning, match="not finite"):
            step(model, opt, x, y)
    else:
        hook = model[3].weight.register_hook(lambda g: g * float("inf"))
        with pytest.warns(RuntimeWarning, match=r"gradient of layer '3'"):
            step(model, opt, x, y)
        hook.remove()
    assert_same(before, snapshot(model, opt))
    assert opt.skipped_steps == 1
    step(model, opt, *case.batch(seed=6))  # and training goes on
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.param_groups[0]["step"] == before[2] + 1


def test_warns_once_per_cause():
    case = CASES[0]
    model = case.model()
    opt = OPTIMIZERS["foof"](model)
    x, y = case.batch()
    x[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning) as record:
        for _ in range(3):
            step(model, opt, x, y)
    assert len([w for w in record if "not finite" in str(w.message)]) == 1
    assert opt.skipped_steps == 3


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_raise_policy(name):
    case = CASES[0]
    model = case.model()
    opt = OPTIMIZERS[name](model, nonfinite="raise")
    x, y = case.batch()
    x[1, 2] = float("inf")
    with pytest.raises(NonFiniteError, match="not finite"):
        step(model, opt, x, y)


def test_invalid_policy():
    with pytest.raises(ValueError, match="nonfinite"):
        FOOF(nn.Linear(2, 2), lr=0.1, damping=1.0, nonfinite="ignore")


def test_huge_but_finite_gradient_is_not_mistaken_for_a_fault():
    # the fast check sums each tensor; a float32 sum of 3e38 + 3e38 overflows although every
    # entry is finite, and the exact elementwise check must then let the step through
    model = nn.Sequential(nn.Linear(2, 2, bias=False))
    opt = FOOF(model, lr=0.0, damping=1.0)
    opt.zero_grad()
    model(torch.ones(1, 2)).sum().backward()
    model[0].weight.grad.fill_(3e38)
    assert opt.find_nonfinite() is None
    model[0].weight.grad[0, 0] = float("inf")
    assert opt.find_nonfinite() == "the weight gradient of layer '0'"
