import io

import pytest
import torch
from torch import nn

from foof import FOOF
from foof.optim.foof import is_inversion_step, is_stats_step
from tests.cases import CASE_IDS, CASES
from tests.reference import gradient_matrices, layer_input_rows, layer_inputs

TOL = dict(rtol=1e-10, atol=1e-12)  # float64 throughout


def cross_entropy(logits, y):
    return nn.functional.cross_entropy(logits, y)


def layer_weights(model):
    return {
        m: torch.cat(
            [m.weight.detach().flatten(1)]
            + ([m.bias.detach()[:, None]] if m.bias is not None else []),
            1,
        )
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    }


@pytest.mark.parametrize("damping", [1e-3, 0.5])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_update_is_closed_form(case, damping):
    """One step moves [W, b] by lr · Ĝ (Σ + λI)⁻¹ with Σ the mean of ā āᵀ over rows (eq. 6)."""
    model = case.model()
    x, y = case.batch()
    inputs = layer_inputs(model, x)
    grads = gradient_matrices(model, cross_entropy, x, y)
    before = layer_weights(model)
    lr = 0.3
    opt = FOOF(model, lr=lr, damping=damping, ema_decay=0.0)
    opt.zero_grad()
    cross_entropy(model(x), y).backward()
    opt.step()
    after = layer_weights(model)
    for layer, grad in grads.items():
        rows = layer_input_rows(layer, inputs[layer])
        sigma = rows.T @ rows / rows.shape[0]
        expected = grad @ torch.linalg.inv(
            sigma + damping * torch.eye(len(sigma), dtype=sigma.dtype)
        )
        torch.testing.assert_close((before[layer] - after[layer]) / lr, expected, **TOL)


def test_toy_example_of_appendix_f():
    """Two points (3,1)→1, (1,0)→−1, squared loss, w=0: FOOF ∝ (−1, 4), one step solves it."""
    x = torch.tensor([[3.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([1.0, -1.0], dtype=torch.float64)
    model = nn.Linear(2, 1, bias=False).double()
    nn.init.zeros_(model.weight)

    def loss_fn():
        return 0.5 * ((model(x).squeeze(1) - y) ** 2).mean()

    per_point_losses = lambda w: 0.5 * (x @ w - y) ** 2  # noqa: E731
    loss_fn().backward()
    sgd_direction = -model.weight.grad[0].clone()
    torch.testing.assert_close(sgd_direction, torch.tensor([1.0, 0.5], dtype=torch.float64))
    # SGD's direction (2, 1) increases the second point's loss for every step size.
    for step_size in (1e-3, 0.1, 1.0):
        assert (
            per_point_losses(step_size * sgd_direction)[1]
            > per_point_losses(torch.zeros(2, dtype=torch.float64))[1]
        )

    opt = FOOF(model, lr=1.0, damping=0.0, ema_decay=0.0)
    opt.zero_grad()
    loss_fn().backward()
    opt.step()
    w = model.weight.detach()[0]
    direction = w / w.norm()
    expected = torch.tensor([-1.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(direction, expected / expected.norm(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w, expected, rtol=1e-12, atol=1e-12)  # the global optimum
    assert loss_fn().item() < 1e-24


def train_steps(model, opt, batches, extra=None):
    for i, (x, y) in enumerate(batches):
        opt.zero_grad()
        cross_entropy(model(x), y).backward()
        if extra is not None:
            extra(i)
        opt.step()


def batches(case, n, seed=10):
    return [case.batch(seed=seed + i) for i in range(n)]


def test_eval_and_no_grad_passes_leave_statistics_unchanged():
    case = CASES[3]  # conv with bias
    data = batches(case, 4)
    noise = case.batch(seed=99)[0] * 5
    reference, probed = case.model(), case.model()
    opt_ref = FOOF(reference, lr=0.1, damping=0.1, ema_decay=0.5)
    opt = FOOF(probed, lr=0.1, damping=0.1, ema_decay=0.5)
    train_steps(reference, opt_ref, data)

    def evaluate(_):
        with torch.no_grad():
            probed(noise)
        probed.eval()
        probed(noise).sum()
        probed.train()

    train_steps(probed, opt, data, extra=evaluate)
    for p, q in zip(reference.parameters(), probed.parameters()):
        assert torch.equal(p, q)
    for (_, _, s), (_, _, t) in zip(opt_ref.layer_items(), opt.layer_items()):
        assert torch.equal(s["input_covariance"], t["input_covariance"])


def snapshot(opt):
    return {name: {k: v.clone() for k, v in state.items()} for name, _, state in opt.layer_items()}


def test_inverse_only_every_inv_every_and_stats_only_on_stats_steps():
    case = CASES[0]
    model = case.model()
    # low_rank=False: inputs are then needed, and recorded, on statistics steps only
    opt = FOOF(
        model, lr=0.1, damping=0.1, ema_decay=0.5, inv_every=3, stats_steps=1, low_rank=False
    )
    history = []
    for x, y in batches(case, 7):
        opt.zero_grad()
        cross_entropy(model(x), y).backward()
        recorded = [opt.capture.inputs(m) is not None for m in opt.layers.values()]
        opt.step()
        history.append((recorded, snapshot(opt)))
    for step, (recorded, state) in enumerate(history):
        assert all(recorded) == (step % 3 == 0), step
        if step > 0:
            previous = history[step - 1][1]
            for name in state:
                changed_inverse = not torch.equal(state[name]["inverse"], previous[name]["inverse"])
                changed_stats = not torch.equal(
                    state[name]["input_covariance"], previous[name]["input_covariance"]
                )
                assert changed_inverse == (step % 3 == 0)
                assert changed_stats == (step % 3 == 0)


@pytest.mark.parametrize(
    ("inv_every", "stats_steps", "expected"),
    [
        (1, None, [True] * 6),
        (4, None, [True] * 8),
        (4, 1, [True, False, False, False, True, False, False, False]),
        (4, 2, [True, False, False, True, True, False, False, True]),
        (4, 4, [True] * 8),
    ],
)
def test_stats_step_schedule(inv_every, stats_steps, expected):
    """Algorithm 1 line 10: the S steps ending with each inversion (step ≡ 0 mod T) update Σ."""
    assert [is_stats_step(t, inv_every, stats_steps) for t in range(len(expected))] == expected


@pytest.mark.parametrize(
    ("inv_every", "stats_steps", "inv_warmup", "expected"),
    [
        (4, 1, 3, [True] * 3 + [False, True, False, False, False, True]),
        (4, 2, 6, [True] * 6 + [False, True, True, False]),
        (8, None, 2, [True] * 10),
    ],
)
def test_stats_step_schedule_with_warmup(inv_every, stats_steps, inv_warmup, expected):
    """Each of the first ``inv_warmup`` steps updates Σ, then the usual S steps per period."""
    steps = range(len(expected))
    assert [is_stats_step(t, inv_every, stats_steps, inv_warmup) for t in steps] == expected


@pytest.mark.parametrize(
    ("inv_every", "inv_warmup", "expected"),
    [
        (8, 0, [0, 8, 16]),
        (8, 3, [0, 1, 2, 8, 16]),
        (5, 12, list(range(12)) + [15]),
        (1, 4, list(range(18))),
    ],
)
def test_inversion_step_schedule(inv_every, inv_warmup, expected):
    """Every T-th step from step 0, and each of the first ``inv_warmup`` steps."""
    assert [t for t in range(18) if is_inversion_step(t, inv_every, inv_warmup)] == expected


@pytest.mark.parametrize("inv_warmup", [0, 3])
def test_warmup_inverts_the_current_statistics_on_its_schedule(inv_warmup):
    """Each inversion step leaves P = (Σ + λI)⁻¹ of that step's EMA Σ (eq. 6), computed from
    explicit rows; P is untouched on every other step, and Σ moves only on statistics steps."""
    case = CASES[1]
    model = case.model()
    damping, decay, inv_every = 0.1, 0.5, 8
    opt = FOOF(
        model,
        lr=0.05,
        damping=damping,
        ema_decay=decay,
        inv_every=inv_every,
        stats_steps=1,
        inv_warmup=inv_warmup,
        low_rank=False,
    )
    expected_inversions = [0, 1, 2, 8] if inv_warmup else [0, 8]
    expected_stats = expected_inversions
    ema: dict[nn.Module, torch.Tensor] = {}
    previous = None
    for step, (x, y) in enumerate(batches(case, 11)):
        inputs = layer_inputs(model, x)
        opt.zero_grad()
        cross_entropy(model(x), y).backward()
        opt.step()
        state = snapshot(opt)
        for name, module in opt.layers.items():
            if step in expected_stats:
                rows = layer_input_rows(module, inputs[module])
                batch_cov = rows.T @ rows / rows.shape[0]
                ema[module] = (
                    batch_cov
                    if module not in ema
                    else decay * ema[module] + (1 - decay) * batch_cov
                )
            torch.testing.assert_close(state[name]["input_covariance"], ema[module], **TOL)
            if step in expected_inversions:
                eye = torch.eye(len(ema[module]), dtype=ema[module].dtype)
                torch.testing.assert_close(
                    state[name]["inverse"], torch.linalg.inv(ema[module] + damping * eye), **TOL
                )
            else:
                assert torch.equal(state[name]["inverse"], previous[name]["inverse"]), step
        previous = state


def test_checkpoint_resume_is_bit_identical():
    case = CASES[3]
    data = batches(case, 8)
    hyper = dict(
        lr=0.05,
        damping=0.1,
        ema_decay=0.9,
        inv_every=3,
        stats_steps=2,
        momentum=0.9,
        weight_decay=0.01,
    )
    full = case.model()
    opt_full = FOOF(full, **hyper)
    train_steps(full, opt_full, data)

    first = case.model()
    opt_first = FOOF(first, **hyper)
    train_steps(first, opt_first, data[:4])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt_first.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = case.model(seed=123)
    resumed.load_state_dict(checkpoint["model"])
    opt_resumed = FOOF(resumed, **hyper)
    opt_resumed.load_state_dict(checkpoint["optimizer"])
    train_steps(resumed, opt_resumed, data[4:])
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    for (_, _, s), (_, _, t) in zip(opt_full.layer_items(), opt_resumed.layer_items()):
        assert s.keys() == t.keys()
        for key in s:
            assert torch.equal(s[key], t[key]), key


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lr=-0.1), "lr"),
        (dict(damping=-1.0), "damping"),
        (dict(ema_decay=1.0), "ema_decay"),
        (dict(ema_decay=-0.1), "ema_decay"),
        (dict(inv_every=0), "inv_every"),
        (dict(inv_every=2.5), "inv_every"),
        (dict(stats_steps=0), "stats_steps"),
        (dict(inv_every=5, stats_steps=6), "stats_steps"),
        (dict(inv_warmup=-1), "inv_warmup"),
        (dict(inv_warmup=True), "inv_warmup"),
        (dict(momentum=1.0), "momentum"),
        (dict(weight_decay=-1.0), "weight_decay"),
    ],
)
def test_invalid_hyperparameters_raise(kwargs, message):
    hyper = dict(lr=0.1, damping=1.0) | kwargs
    with pytest.raises(ValueError, match=message) as info:
        FOOF(nn.Linear(3, 2), **hyper)
    assert "got" in str(info.value)


def test_takes_a_model_not_parameters():
    with pytest.raises(TypeError, match="nn.Module"):
        FOOF(nn.Linear(3, 2).parameters(), lr=0.1, damping=1.0)


def test_unsupported_layers_get_sgd_with_one_warning():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    with pytest.warns(UserWarning, match=r"plain SGD.*1\.weight, 1\.bias"):
        opt = FOOF(model, lr=0.1, damping=1.0, fallback=None)
    x = torch.randn(8, 3, dtype=torch.float64)
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    bn_weight, grad = model[1].weight.detach().clone(), model[1].weight.grad.clone()
    opt.step()
    torch.testing.assert_close(model[1].weight.detach(), bn_weight - 0.1 * grad, **TOL)


def test_lr_scheduler_drives_the_step_size():
    model = nn.Linear(3, 2, bias=False).double()
    opt = FOOF(model, lr=1.0, damping=1.0, ema_decay=0.0)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x = torch.randn(4, 3, dtype=torch.float64)
    moves = []
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        before = model.weight.detach().clone()
        direction = model.weight.grad @ torch.linalg.inv(x.T @ x / 4 + torch.eye(3, dtype=x.dtype))
        opt.step()
        scheduler.step()
        moves.append((before - model.weight.detach()) / direction)
    assert [round(float(m.mean()), 10) for m in moves] == [1.0, 0.5, 0.25]


def test_factors_are_float32_under_bf16_autocast():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = FOOF(model, lr=0.1, damping=1.0)
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(4, 8))
        assert out.dtype == torch.bfloat16
    out.float().pow(2).mean().backward()
    opt.step()
    for _, _, state in opt.layer_items():
        assert state["input_covariance"].dtype == torch.float32
        assert state["cholesky"].dtype == torch.float32  # inv_every=1: the factor, solved with
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("inv_every", [1, 2])
def test_inverse_used_once_is_a_cholesky_solve_with_the_same_update(inv_every):
    # inv_every=1 keeps L with L Lᵀ = Σ + λI and solves; otherwise P = (Σ + λI)⁻¹ is stored.
    # Both give Ĝ P (float64, to 1e-10 relative), through the low-rank and the dense product.
    torch.manual_seed(0)
    for width, batch in ((30, 4), (6, 50)):  # low-rank pays / does not
        model = nn.Sequential(nn.Linear(width, 7, bias=False)).double()
        x = torch.randn(batch, width, dtype=torch.float64)
        opt = FOOF(model, lr=1.0, damping=0.3, ema_decay=0.0, inv_every=inv_every)
        before = model[0].weight.detach().clone()
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        grad = model[0].weight.grad.clone()
        opt.step()
        state = opt.state[model[0].weight]
        assert ("cholesky" in state) == (inv_every == 1)
        assert ("inverse" in state) == (inv_every != 1)
        sigma = x.T @ x / batch + 0.3 * torch.eye(width, dtype=torch.float64)
        expected = grad @ torch.linalg.inv(sigma)
        torch.testing.assert_close(
            before - model[0].weight.detach(), expected, rtol=1e-10, atol=1e-12
        )


def test_close_removes_hooks():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    with FOOF(model, lr=0.1, damping=1.0):
        assert all(len(m._forward_hooks) == 1 for m in model)
    assert all(len(m._forward_hooks) == 0 for m in model)


def test_foof_beats_sgd_on_a_1000_image_fashion_mnist_subset(data_dir):
    """The paper's MLP, 1,000 images, batch 100, 5 epochs (50 steps), same budget for both.

    SGD uses the paper's Fig. 1A value (lr 0.01, momentum 0.9); FOOF lr 1, damping 10,
    momentum 0.9. FOOF must end with a training loss (over the 1,000 images) at most half SGD's.
    """
    from foof.train import TrainConfig, train

    losses = {}
    for name, hyper in {
        "sgd": dict(lr=0.01, momentum=0.9),
        "foof": dict(lr=1.0, damping=10.0, momentum=0.9),
    }.items():
        config = TrainConfig(
            optimizer=name,
            subset=1000,
            epochs=5,
            batch_size=100,
            data_dir=str(data_dir),
            eval_train=True,
            **hyper,
        )
        results = train(config, progress=False)
        losses[name] = results["epochs"]["train_eval_loss"][-1]
    assert losses["foof"] < 0.5 * losses["sgd"], losses
