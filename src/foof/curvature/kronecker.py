"""Kronecker-factored curvature blocks ``Ā ⊗ Ḡ`` (KFAC) and their damped inverses.

For a layer with gradient matrix ``Ĝ`` ``(out, in_dim)``, KFAC approximates the Fisher block by
``Ā ⊗ Ḡ`` with ``Ā = (1/R) Σ_r ā_r ā_rᵀ`` ``(in_dim, in_dim)`` and ``Ḡ = (1/B) Σ_k Σ_r e_{k,r}
e_{k,r}ᵀ`` ``(out, out)``. With column-stacking ``vec``, ``(Ā ⊗ Ḡ) vec(X) = vec(Ḡ X Ā)``.

Conv2d (KFC, Grosse & Martens 2016): rows are (sample, position) pairs. ``Ā`` is the mean over
*all* rows (so it equals FOOF's ``Σ``) and ``Ḡ`` is the mean over samples of the *sum* over
positions. The product ``Ā ⊗ Ḡ`` is then exactly KFC's ``Ω ⊗ Γ`` (which puts the sum over
positions into ``Ω`` and the mean into ``Γ``); only the split of the scale differs, and heuristic
damping's ``π`` is invariant to that split.
"""

from __future__ import annotations

import torch
from torch import Tensor

from foof.curvature.linalg import damped_inverse


def pi_factor(input_covariance: Tensor, gradient_covariance: Tensor) -> float:
    """Heuristic damping's ``π = sqrt((tr Ā / dim Ā) / (tr Ḡ / dim Ḡ))`` (paper Sec. 2.3).

    Degenerate factors (a zero trace: dead layer, zero gradient) give ``π = 1``.
    """
    diagonal = input_covariance if input_covariance.dim() == 1 else input_covariance.diagonal()
    mean_a = float(diagonal.mean())
    mean_g = float(gradient_covariance.diagonal().mean())
    if not (mean_a > 0 and mean_g > 0):
        return 1.0
    return (mean_a / mean_g) ** 0.5


def heuristic_inverses(
    input_covariance: Tensor, gradient_covariance: Tensor, damping: float
) -> tuple[Tensor, Tensor]:
    """``((Ā + π√λ I)⁻¹, (Ḡ + √λ/π I)⁻¹)`` for heuristic damping (paper eq. 2)."""
    pi = pi_factor(input_covariance, gradient_covariance)
    root = damping**0.5
    return (
        damped_inverse(input_covariance, pi * root),
        damped_inverse(gradient_covariance, root / pi),
    )


def eigendecomposition(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (clamped at 0 against round-off) and eigenvectors of a PSD matrix.

    A 1-D ``matrix`` is a diagonal: its entries and the identity.
    """
    if matrix.dim() == 1:
        return matrix.clamp_min(0.0), torch.eye(
            len(matrix), dtype=matrix.dtype, device=matrix.device
        )
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return eigenvalues.clamp_min_(0.0), eigenvectors


def standard_damped_solve(
    grad: Tensor,
    input_eigen: tuple[Tensor, Tensor],
    gradient_eigen: tuple[Tensor, Tensor],
    damping: float,
) -> Tensor:
    """``mat((Ā ⊗ Ḡ + λI)⁻¹ vec Ĝ)`` through both eigendecompositions (paper eq. 3).

    With ``Ā = Q_A diag(a) Q_Aᵀ`` and ``Ḡ = Q_G diag(g) Q_Gᵀ`` the Kronecker product is diagonal in
    the basis ``Q_A ⊗ Q_G`` (George et al., 2018), so the solve is
    ``Q_G [(Q_Gᵀ Ĝ Q_A) / (g aᵀ + λ)] Q_Aᵀ`` and ``Ā ⊗ Ḡ`` is never formed.

    Args:
        grad: ``Ĝ`` ``(out, in_dim)``.
        input_eigen: ``(a, Q_A)`` of ``Ā``.
        gradient_eigen: ``(g, Q_G)`` of ``Ḡ``.
        damping: ``λ > 0``.

    Returns:
        ``(out, in_dim)``.
    """
    a, q_a = input_eigen
    g, q_g = gradient_eigen
    rotated = q_g.T @ grad @ q_a
    rotated.div_(torch.outer(g, a).add_(damping))
    return q_g @ rotated @ q_a.T
