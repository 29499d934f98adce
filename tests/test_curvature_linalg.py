import pytest
import torch
from torch import nn

from foof import FOOF
from foof.curvature.linalg import (
    damped_inverse,
    second_moment,
    update_ema_,
    update_second_moment_ema_,
)


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


@pytest.mark.parametrize("decay", [0.0, 0.95])
def test_fused_second_moment_ema_equals_ema_of_the_second_moment(decay):
    generator = torch.Generator().manual_seed(3)
    rows = [torch.randn(7, 4, generator=generator, dtype=torch.float64) for _ in range(3)]
    reference = fused = None
    for batch in rows:
        reference = update_ema_(reference, second_moment(batch, torch.float64), decay)
        fused = update_second_moment_ema_(fused, batch, 7, decay)
    torch.testing.assert_close(fused, reference, rtol=1e-12, atol=1e-12)
    # decay 0 ("this batch only") must not let a non-finite old average through
    fused.fill_(float("nan"))
    update_second_moment_ema_(fused, rows[0], 7, 0.0)
    torch.testing.assert_close(fused, rows[0].T @ rows[0] / 7, rtol=1e-12, atol=1e-12)
