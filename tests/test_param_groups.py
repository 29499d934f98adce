"""Parameter groups with torch.optim semantics and the fallback optimizer (issues 21, 22).

Per group: lr, damping, weight decay, momentum and the curvature options; the schedule is the
optimizer's. Parameters outside every Linear/Conv2d go to a fallback optimizer (AdamW by
default) that shares this optimizer's groups and state. All comparisons in float64.
"""

import copy

import pytest
import torch
from torch import nn
from torch.nn.functional import cross_entropy

from foof import FOOF, KFAC, NaturalGradient

TOL = dict(rtol=1e-10, atol=1e-12)
MAKERS = {
    "foof": lambda m, **kw: FOOF(m, **{"lr": 0.1, "damping": 0.1, **kw}),
    "kfac": lambda m, **kw: KFAC(m, **{"lr": 0.1, "damping": 0.1, "fisher": "full", **kw}),
    "natural": lambda m, **kw: NaturalGradient(
        m, **{"lr": 0.1, "damping": 0.1, "fisher": "full", "block_diagonal": True, **kw}
    ),
}
NAMES = list(MAKERS)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def normed(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).double()


def data(step):
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(8, 4, generator=generator, dtype=torch.float64)
    return x, torch.randint(0, 3, (8,), generator=generator)


def train(model, opt, steps=3, start=0):
    for step in range(start, start + steps):
        x, y = data(step)
        opt.zero_grad()
        out = model(x)
        opt.backward(cross_entropy(out, y), out)
        opt.step()


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("key, value", [("lr", 0.03), ("weight_decay", 0.2)])
def test_a_group_option_acts_on_its_layer_as_the_optimizer_wide_value_does(name, key, value):
    """Block-diagonal methods, one step (later steps couple the layers through the network):
    layer 2 in a group with ``key=value`` moves exactly as in a one-group run with that value,
    layer 0 as in the one-group run with the default."""
    grouped, base, other = mlp(), mlp(), mlp()
    opt = MAKERS[name](grouped, param_groups=[{"params": grouped[2].parameters(), key: value}])
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]
    train(grouped, opt, steps=1)
    train(base, MAKERS[name](base), steps=1)
    train(other, MAKERS[name](other, **{key: value}), steps=1)
    torch.testing.assert_close(grouped[0].weight, base[0].weight, **TOL)
    torch.testing.assert_close(grouped[2].weight, other[2].weight, **TOL)
    torch.testing.assert_close(grouped[2].bias, other[2].bias, **TOL)


@pytest.mark.parametrize("name", ["foof", "kfac"])
def test_per_group_damping_and_ema_decay_reach_their_layer(name):
    grouped, other = mlp(), mlp()
    opt = MAKERS[name](
        grouped, param_groups=[{"params": grouped[0].parameters(), "damping": 1.0, "ema_decay": 0}]
    )
    train(grouped, opt, steps=1)
    train(other, MAKERS[name](other, damping=1.0, ema_decay=0.0), steps=1)
    torch.testing.assert_close(grouped[0].weight, other[0].weight, **TOL)


def test_lambda_lr_with_one_lambda_per_group_drives_each_group():
    model, reference = mlp(), mlp()
    opt = FOOF(model, lr=0.1, damping=0.1, param_groups=[{"params": model[2].parameters()}])
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, [lambda t: 0.5**t, lambda t: 1.0 + t])
    manual = FOOF(
        reference, lr=0.1, damping=0.1, param_groups=[{"params": reference[2].parameters()}]
    )
    for step in range(3):
        train(model, opt, steps=1, start=step)
        scheduler.step()
        train(reference, manual, steps=1, start=step)
        manual.param_groups[0]["lr"] = 0.1 * 0.5 ** (step + 1)
        manual.param_groups[1]["lr"] = 0.1 * (2 + step)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1 * 0.125, 0.1 * 4])
    torch.testing.assert_close(flat(model), flat(reference), rtol=0, atol=0)


def test_the_schedule_is_optimizer_wide_and_a_group_value_of_its_own_is_refused():
    model = mlp()
    with pytest.raises(ValueError, match=r"param group 1: inv_every=5 cannot be set per group"):
        FOOF(
            model,
            lr=0.1,
            damping=0.1,
            param_groups=[{"params": model[2].parameters(), "inv_every": 5}],
        )
    opt = FOOF(
        model, lr=0.1, damping=0.1, inv_every=2, param_groups=[{"params": model[2].parameters()}]
    )
    assert "inv_every" not in opt.param_groups[1] and "step" not in opt.param_groups[1]
    assert opt.param_groups[0]["inv_every"] == 2 and opt.param_groups[0]["step"] == 0


@pytest.mark.parametrize(
    "groups, message",
    [
        (lambda m: [{"params": m[0].parameters(), "lr": -1.0}], r"param group 1: lr must be >= 0"),
        (lambda m: [{"params": [m[0].weight]}, {"params": [m[0].weight]}], "belongs to one group"),
        (lambda m: [{"params": [nn.Parameter(torch.zeros(2))]}], "not in the model"),
    ],
)
def test_bad_groups_are_refused_with_the_bad_value(groups, message):
    model = mlp()
    with pytest.raises(ValueError, match=message):
        FOOF(model, lr=0.1, damping=0.1, param_groups=groups(model))


def test_state_dict_has_torch_optims_layout_side_by_side():
    """Same param_groups structure and state ids as torch.optim for the same groups; the
    fallback's state is exactly a standalone AdamW's on the same gradients."""
    model = normed()
    norm = list(model[1].parameters())
    with pytest.warns(UserWarning, match=r"param group\(s\) 2: 1\.weight, 1\.bias"):
        opt = FOOF(
            model,
            lr=0.1,
            damping=0.1,
            momentum=0.9,
            param_groups=[{"params": model[3].parameters(), "lr": 0.05}],
        )
    twin = normed()  # the same initialisation, unhooked
    layers = [twin[0].weight, twin[0].bias]
    torch_opt = torch.optim.SGD(
        [
            {"params": layers},
            {"params": list(twin[3].parameters())},
            {"params": list(twin[1].parameters())},
        ],
        lr=0.1,
        momentum=0.9,
    )
    adamw = torch.optim.AdamW(list(twin[1].parameters()))
    for step in range(2):
        x, y = data(step)
        with torch.no_grad():  # the same point, so the same gradients
            for p, q in zip(model.parameters(), twin.parameters()):
                q.copy_(p)
        opt.zero_grad()
        cross_entropy(model(x), y).backward()
        torch_opt.zero_grad()
        adamw.zero_grad()
        cross_entropy(twin(x), y).backward()
        for p, q in zip(norm, twin[1].parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
        opt.step()
        adamw.step()
        for p, q in zip(norm, twin[1].parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
        torch_opt.step()  # for its state layout only; the next step resynchronises
    ours, theirs = opt.state_dict(), torch_opt.state_dict()
    assert [g["params"] for g in ours["param_groups"]] == [
        g["params"] for g in theirs["param_groups"]
    ]
    assert ours["param_groups"][2]["fallback"] == "AdamW"
    assert set(ours["state"]) == {0, 2, 4, 5}  # each layer's weight, each fallback parameter
    assert set(ours["state"]) <= set(theirs["state"])
    reference = adamw.state_dict()["state"]
    for ours_id, theirs_id in ((4, 0), (5, 1)):
        assert ours["state"][ours_id].keys() == reference[theirs_id].keys()
        for key, value in reference[theirs_id].items():
            torch.testing.assert_close(ours["state"][ours_id][key], value, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_the_fallback_round_trips_bitwise_through_state_dict(name):
    model = normed()
    with pytest.warns(
        UserWarning, match=r"fallback optimizer AdamW \(lr=0\.002.*1\.weight, 1\.bias"
    ):
        opt = MAKERS[name](model, momentum=0.9, fallback_options={"lr": 2e-3, "weight_decay": 0.1})
    train(model, opt, steps=2)
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt, steps=2, start=2)
    resumed = normed(seed=1)
    resumed.load_state_dict(saved_model)
    with pytest.warns(UserWarning):
        again = MAKERS[name](
            resumed, momentum=0.9, fallback_options={"lr": 2e-3, "weight_decay": 0.1}
        )
    again.load_state_dict(saved)
    assert again.fallback.state is again.state
    train(resumed, again, steps=2, start=2)
    assert torch.equal(flat(model), flat(resumed))


def test_the_fallback_gets_its_own_options_and_zero_grad_and_scheduler_reach_it():
    model = normed()
    with pytest.warns(UserWarning):
        opt = FOOF(
            model, lr=30.0, damping=1.0, fallback=torch.optim.SGD, fallback_options={"lr": 0.01}
        )
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    before = model[1].weight.detach().clone()
    x, y = data(0)
    opt.zero_grad()
    cross_entropy(model(x), y).backward()
    grad = model[1].weight.grad.clone()
    opt.step()
    torch.testing.assert_close(model[1].weight.detach(), before - 0.01 * grad, **TOL)
    opt.zero_grad()
    assert model[1].weight.grad is None
    scheduler.step()
    assert opt.fallback.param_groups[0]["lr"] == pytest.approx(0.005)


def test_a_group_mixing_layers_and_fallback_parameters_is_refused():
    model = normed()
    with pytest.raises(ValueError, match=r"mixes parameters.*AdamW \(1\.weight, 1\.bias\)"):
        FOOF(model, lr=0.1, damping=0.1, param_groups=[{"params": model[:2].parameters()}])


def test_add_param_group_sends_a_new_parameter_to_the_fallback():
    model = mlp()
    opt = FOOF(model, lr=0.1, damping=0.1)
    scale = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt.add_param_group({"params": [scale], "lr": 0.5})
    assert opt.param_groups[1]["fallback"] == "AdamW" and opt.param_groups[1]["lr"] == 0.5
    x, y = data(0)
    opt.zero_grad()
    cross_entropy(model(x) * scale, y).backward()
    opt.step()
    assert "exp_avg" in opt.state[scale]
    assert not torch.equal(scale.detach(), torch.ones(3, dtype=torch.float64))


def test_a_checkpoint_from_before_the_fallback_is_refused_with_what_to_do():
    model = normed()
    with pytest.warns(UserWarning):
        old = FOOF(model, lr=0.1, damping=0.1, fallback=None)
    saved = old.state_dict()
    del saved["foof"]["fallback"]  # as saved before the fallback optimizer existed
    old.close()
    with pytest.warns(UserWarning):
        new = FOOF(model, lr=0.1, damping=0.1)
    with pytest.raises(ValueError, match=r"before the fallback optimizer existed.*fallback=None"):
        new.load_state_dict(saved)
    with pytest.warns(UserWarning):
        FOOF(model, lr=0.1, damping=0.1, fallback=None).load_state_dict(saved)


def test_fallback_none_keeps_one_group_and_the_plain_sgd_rule():
    model = normed()
    with pytest.warns(UserWarning, match="plain SGD"):
        opt = FOOF(model, lr=0.1, damping=0.1, fallback=None)
    assert len(opt.param_groups) == 1 and opt.fallback is None
    with pytest.raises(ValueError, match="fallback_options"):
        FOOF(model, lr=0.1, damping=0.1, fallback=None, fallback_options={"lr": 1.0})
    with pytest.raises(TypeError, match="torch.optim.Optimizer class"):
        FOOF(model, lr=0.1, damping=0.1, fallback=FOOF)


@pytest.mark.parametrize("name", NAMES)
def test_a_model_without_layers_is_trained_by_the_fallback_alone_as_adamw_would(name):
    def model():
        torch.manual_seed(0)
        # no block for any method (an nn.Embedding is a FOOF/KFAC block)
        return nn.Sequential(nn.LayerNorm(3), nn.Tanh(), nn.LayerNorm(3)).double()

    ours, theirs = model(), model()
    with pytest.warns(UserWarning, match="fallback optimizer AdamW"):
        opt = MAKERS[name](ours)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["step"] == 0
    adamw = torch.optim.AdamW(theirs.parameters())
    for step in range(3):
        tokens = torch.randn(6, 3, generator=torch.Generator().manual_seed(step)).double()
        targets = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(50 + step))
        opt.zero_grad()
        out = ours(tokens)
        opt.backward(cross_entropy(out, targets), out)
        opt.step()
        adamw.zero_grad()
        cross_entropy(theirs(tokens), targets).backward()
        adamw.step()
    assert torch.equal(flat(ours), flat(theirs)) and opt.step_count == 3
