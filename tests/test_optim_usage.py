"""Unusual use of the optimizers (issue 25): empty batches, steps without a backward, frozen and
unfrozen parameters, ``add_param_group``, foreign or wrapped checkpoints, two optimizers on one
model, dropped optimizers.
"""

import copy
import gc
import io
import warnings

import pytest
import torch
from torch import nn

from foof import FOOF, KFAC, NaturalGradient

OPTIMIZERS = {
    "foof": lambda m, **kw: FOOF(m, lr=0.1, damping=0.1, ema_decay=0.5, momentum=0.9, **kw),
    "kfac": lambda m, **kw: KFAC(m, lr=0.1, damping=0.1, ema_decay=0.5, momentum=0.9, **kw),
    "natural": lambda m, **kw: NaturalGradient(m, lr=0.1, damping=0.1, momentum=0.9, **kw),
}
NAMES = list(OPTIMIZERS)


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def batch(size, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 4, generator=generator, dtype=torch.float64)
    return x, torch.randint(0, 3, (size,), generator=generator)


def train_step(model, opt, x, y):
    opt.zero_grad()
    out = model(x)
    opt.backward(nn.functional.cross_entropy(out, y), out)
    opt.step()


def roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_same_state(a, b):
    """Two optimizer state dicts, bitwise (tensors with torch.equal)."""
    assert a.keys() == b.keys()
    for key in a:
        left, right = a[key], b[key]
        if isinstance(left, dict):
            assert_same_state(left, right)
        elif isinstance(left, list | tuple):
            assert len(left) == len(right)
            for x, y in zip(left, right):
                assert_same_state({0: x}, {0: y})
        elif torch.is_tensor(left):
            assert torch.equal(left, right), key
        else:
            assert left == right, key


# -- 3: empty batches -------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_empty_batch_is_skipped_with_one_warning_and_leaves_no_trace(name):
    runs = {}
    for with_empty in (False, True):
        model = net()
        opt = OPTIMIZERS[name](model, **({} if name == "foof" else {"seed": 3}))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for seed, size in enumerate((5, 0, 1, 0, 4)):
                if size == 0 and not with_empty:
                    continue
                train_step(model, opt, *batch(size, seed))
        skips = [w for w in caught if "empty" in str(w.message)]
        assert len(skips) == (1 if with_empty else 0)  # once, however many empty batches
        assert opt.skipped_steps == (2 if with_empty else 0)
        runs[with_empty] = (model, opt)
    (model, opt), (model_e, opt_e) = runs[False], runs[True]
    # batch size 1 still works, and the run with empty batches is the run without them, bitwise
    assert opt_e.step_count == opt.step_count == 3
    for p, q in zip(model.parameters(), model_e.parameters()):
        assert torch.equal(p, q)
    assert_same_state(opt.state_dict(), opt_e.state_dict())


# -- 12: step() without a backward, two optimizers, dropped optimizers -----------------------


@pytest.mark.parametrize("name", NAMES)
def test_step_without_backward_raises_and_changes_nothing(name):
    model = net()
    opt = OPTIMIZERS[name](model)
    with pytest.raises(RuntimeError, match=r"no parameter has a gradient.*backward"):
        opt.step()
    train_step(model, opt, *batch(5, 0))
    state = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    with pytest.raises(RuntimeError, match="no parameter has a gradient"):
        opt.step()
    assert opt.step_count == 1
    assert_same_state(state, opt.state_dict())

    def closure():
        opt.zero_grad()
        x, y = batch(5, 1)
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
        opt.backward(loss, out)
        return loss

    assert torch.isfinite(opt.step(closure))  # a closure that runs the backward still works
    assert opt.step_count == 2


def test_a_second_optimizer_on_the_same_model_warns():
    model = net()
    first = FOOF(model, lr=0.1, damping=1.0)
    with pytest.warns(UserWarning, match="already hooked by a live FOOF optimizer"):
        KFAC(model, lr=0.1, damping=1.0).close()
    first.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NaturalGradient(model, lr=0.1, damping=1.0).close()  # the first one is closed


@pytest.mark.parametrize("name", NAMES)
def test_a_dropped_optimizer_releases_its_hooks_without_the_cycle_collector(name):
    model = net()
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        opt = OPTIMIZERS[name](model)
        for seed in range(2):
            train_step(model, opt, *batch(5, seed))
        del opt
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    finally:
        if enabled:
            gc.enable()


# -- 7: parameters added or unfrozen later ----------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_refuses_a_parameter_already_in_a_group(name):
    model = net()
    opt = OPTIMIZERS[name](model)
    with pytest.raises(ValueError, match=r"'2\.weight' is already in param group 0"):
        opt.add_param_group({"params": [model[2].weight], "lr": 0.01})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("name", NAMES)
def test_a_layer_unfrozen_later_is_trained_and_preconditioned(name):
    model = net()
    model[0].requires_grad_(False)
    opt = OPTIMIZERS[name](model)
    frozen = model[0].weight.detach().clone()
    train_step(model, opt, *batch(5, 0))
    assert torch.equal(model[0].weight, frozen)  # left alone while frozen
    model[0].requires_grad_(True)
    train_step(model, opt, *batch(5, 1))
    assert not torch.equal(model[0].weight, frozen)  # updated once unfrozen
    assert "0" in opt.layers
    state = opt.state[model[0].weight]
    assert {"input_covariance", "fisher_inputs"} & set(state)  # with curvature of its own


def test_a_layer_unfrozen_between_statistics_steps_gets_a_gradient_step_then_curvature():
    model = net()
    model[0].requires_grad_(False)
    opt = FOOF(model, lr=0.1, damping=0.1, inv_every=3, stats_steps=1)
    train_step(model, opt, *batch(5, 0))  # step 0: statistics and inversion
    model[0].requires_grad_(True)
    before = model[0].weight.detach().clone()
    opt.zero_grad()
    out = model(batch(5, 1)[0])
    nn.functional.cross_entropy(out, batch(5, 1)[1]).backward()
    grad = model[0].weight.grad.clone()
    with pytest.warns(UserWarning, match=r"layer '0' has no statistics yet.*plain gradient"):
        opt.step()  # step 1: no statistics step, so no curvature for layer 0 yet
    torch.testing.assert_close(before - model[0].weight.detach(), 0.1 * grad)
    for seed in (2, 3):  # step 3 is the next statistics and inversion step
        train_step(model, opt, *batch(5, seed))
    assert "inverse" in opt.state[model[0].weight]


def test_a_bias_whose_weight_is_frozen_still_trains():
    model = net()
    model[2].weight.requires_grad_(False)
    opt = FOOF(model, lr=0.1, damping=0.1)
    bias = model[2].bias.detach().clone()
    train_step(model, opt, *batch(5, 0))
    assert not torch.equal(model[2].bias, bias)
    assert set(opt.layers) == {"0"}


# -- 6: checkpoints ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_a_torch_optim_state_dict_is_not_a_foof_optimizer_state(name):
    model = net()
    adam = torch.optim.Adam(model.parameters())
    opt = OPTIMIZERS[name](model)
    before = copy.deepcopy(opt.param_groups[0])
    before.pop("params")
    with pytest.raises(ValueError, match=r"not a foof optimizer state.*betas"):
        opt.load_state_dict(adam.state_dict())
    after = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    assert after == before  # no hyperparameter replaced
    train_step(model, opt, *batch(5, 0))


class Wrapper(nn.Module):
    """Stands in for DistributedDataParallel: the model under ``module.``."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


@pytest.mark.parametrize(
    "wrap",
    [Wrapper, nn.Sequential, torch.compile],
    ids=["ddp-like-module.", "container", "torch.compile-_orig_mod."],
)
@pytest.mark.parametrize("name", NAMES)
def test_a_wrapped_model_checkpoint_loads_into_the_bare_model_and_back(name, wrap):
    seeded = {} if name == "foof" else {"seed": 3}
    model = net()
    wrapped_opt = OPTIMIZERS[name](wrap(model), **seeded)
    assert next(iter(wrapped_opt.layers)) != "0"  # the names carry the wrapper's prefix
    for seed in range(2):
        train_step(model, wrapped_opt, *batch(5, seed))
    state = roundtrip(wrapped_opt.state_dict())
    wrapped_opt.close()
    bare = copy.deepcopy(model)
    bare_opt = OPTIMIZERS[name](bare, **seeded)
    bare_opt.load_state_dict(state)
    rewrapped_opt = OPTIMIZERS[name](wrap(copy.deepcopy(model)), **seeded)
    rewrapped_opt.load_state_dict(roundtrip(bare_opt.state_dict()))
    assert_same_state(rewrapped_opt.state_dict()["state"], state["state"])
    bare_opt.close()
    rewrapped_opt.close()


def test_a_wrapped_model_with_other_shapes_is_still_refused():
    opt = FOOF(Wrapper(net()), lr=0.1, damping=1.0)
    other = FOOF(nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 3)), lr=0.1, damping=1.0)
    with pytest.raises(ValueError, match=r"different model.*layer #0: checkpoint 'module.0'"):
        other.load_state_dict(opt.state_dict())
