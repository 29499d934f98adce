import pytest
import torch
from torch import nn

from foof import FOOF
from foof.curvature.linalg import damped_inverse, update_ema_


def test_damped_inverse_matches_dense_inverse():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    matrix = a.T @ a
    expected = torch.linalg.inv(matrix + 0.5 * torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(damped_inverse(matrix, 0.5), expected, rtol=1e-12, atol=1e-12)


def test_failed_cholesky_falls_back_with_a_warning_and_stays_finite():
    rank_one = torch.outer(torch.arange(1.0, 5.0), torch.arange(1.0, 5.0))  # rank 1, 4×4
    with pytest.warns(RuntimeWarning, match="eigendecomposition"):
        inverse = damped_inverse(rank_one, 0.0)
    assert torch.isfinite(inverse).all()
    torch.testing.assert_close(inverse, inverse.T)
    assert torch.linalg.eigvalsh(inverse.double()).min() > 0  # positive definite


def test_dead_inputs_and_zero_damping_never_give_nan_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(8, 5)
    x[:, 2] = 0.0  # a constant "pixel": Σ is rank-deficient
    with pytest.warns(RuntimeWarning):
        opt = FOOF(model, lr=0.01, damping=0.0, ema_decay=0.0)
        for _ in range(3):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_ema_is_normalised_by_its_first_value():
    first = torch.full((2, 2), 3.0)
    average = update_ema_(None, first, 0.9)
    assert torch.equal(average, first) and average is not first
    update_ema_(average, torch.ones(2, 2), 0.9)
    torch.testing.assert_close(average, torch.full((2, 2), 0.9 * 3 + 0.1))
