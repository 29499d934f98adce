"""App. K's initialisation (``warm_start``): statistics of N batches, no update, one inversion."""

import pytest
import torch
from torch import nn

from foof import FOOF, KFAC
from foof.train import ConfigError, TrainConfig, train


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()


def _batches(count, size=16):
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(size, 6, generator=generator, dtype=torch.float64),
            torch.randint(0, 3, (size,), generator=generator),
        )
        for _ in range(count)
    ]


def _explicit_ema(rows, decay=0.95):
    """Σ = normalised EMA of (1/R) Σ_r ā ā^T over the batches (App. D.1)."""
    ema = None
    for block in rows:
        covariance = block.T @ block / block.shape[0]
        ema = covariance if ema is None else decay * ema + (1 - decay) * covariance
    return ema


@pytest.mark.parametrize(
    "make", [lambda m: FOOF(m, lr=0.1, damping=1.0), lambda m: KFAC(m, lr=0.1, damping=1.0)]
)
def test_warm_start_folds_n_batches_into_the_ema_and_changes_nothing_else(make):
    model = _model()
    with pytest.warns(UserWarning, match="without curvature support"):
        opt = make(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = _batches(7)
    used = opt.warm_start(batches, num_batches=5)
    assert used == 5
    # the model is untouched: parameters, BatchNorm running statistics, no gradients
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())
    assert opt.step_count == 0
    # the first layer's Σ is the EMA of its five batches' input rows (bias column appended)
    rows = [torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1) for x, _ in batches[:5]]
    state = opt.state[model[0].weight]
    torch.testing.assert_close(state["input_covariance"], _explicit_ema(rows), rtol=0, atol=1e-12)
    if isinstance(opt, KFAC):
        assert state["gradient_covariance"].shape == (8, 8)
    # step 0 adds its own batch and inverts: Σ has seen 6 batches
    x, y = batches[5]
    opt.zero_grad()
    output = model(x)
    opt.backward(nn.functional.cross_entropy(output, y), output)
    opt.step()
    expected = _explicit_ema([*rows, torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)])
    torch.testing.assert_close(state["input_covariance"], expected, rtol=0, atol=1e-12)


def test_warm_start_refuses_after_the_first_step_and_bad_counts():
    model = nn.Sequential(nn.Linear(6, 3)).double()
    opt = FOOF(model, lr=0.1, damping=1.0)
    with pytest.raises(ValueError, match="num_batches must be an integer >= 1"):
        opt.warm_start(_batches(1), num_batches=0)
    x, y = _batches(1)[0]
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    with pytest.raises(RuntimeError, match="before the first step"):
        opt.warm_start(_batches(1))


def test_train_warm_starts_foof_and_kfac_by_default(data_dir):
    base = dict(dataset="mnist", model="logistic", subset=200, batch_size=50, epochs=1)
    config = TrainConfig(optimizer="foof", lr=0.1, damping=1.0, **base).resolved()
    assert config.init_batches == 50
    assert TrainConfig(optimizer="sgd", **base).resolved().init_batches is None
    kwargs = dict(progress=False)
    warm = train(
        TrainConfig(
            optimizer="kfac", lr=0.1, damping=1.0, init_batches=3, data_dir=str(data_dir), **base
        ),
        **kwargs,
    )
    assert warm["warm_start"]["batches"] == 3
    cold = train(
        TrainConfig(
            optimizer="kfac", lr=0.1, damping=1.0, init_batches=0, data_dir=str(data_dir), **base
        ),
        **kwargs,
    )
    assert "warm_start" not in cold
    # the training batches do not depend on the warm start: same first loss, then they differ
    assert warm["steps"]["loss"][0] == cold["steps"]["loss"][0]
    assert warm["steps"]["loss"][1] != cold["steps"]["loss"][1]
    with pytest.raises(ConfigError, match="init_batches is for foof and kfac"):
        TrainConfig(optimizer="sgd", init_batches=5, **base).validate()
