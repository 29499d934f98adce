"""Dense linear algebra shared by the curvature blocks: damped inverses and EMA updates."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor


def damped_cholesky(matrix: Tensor, damping: float) -> Tensor | None:
    """The lower Cholesky factor ``L`` of ``matrix + damping·I``, or None if it does not exist.

    For an inverse used once, ``torch.cholesky_solve(B, L)`` (``(matrix + damping·I)⁻¹ B``,
    two triangular solves) is cheaper than forming the inverse; None means: fall back to
    :func:`damped_inverse`, which handles the failure.

    Args:
        matrix: ``(n, n)`` symmetric positive semi-definite.
        damping: ``λ >= 0`` added to the diagonal.
    """
    if matrix.dim() == 1:  # a diagonal factor: damped_inverse is exact and O(n)
        return None
    damped = matrix.clone()
    damped.diagonal().add_(damping)
    cholesky, info = torch.linalg.cholesky_ex(damped)
    return cholesky if int(info) == 0 else None


def damped_inverse(matrix: Tensor, damping: float) -> Tensor:
    """``(matrix + damping·I)^-1`` of a symmetric PSD matrix through its Cholesky factor.

    Cholesky is both faster and numerically kinder than ``torch.inverse`` for a PSD matrix. If
    the factorisation fails (damping 0 on a rank-deficient matrix, float32 round-off), fall back
    to an eigendecomposition whose eigenvalues are clamped to a small positive floor, and warn.

    Args:
        matrix: ``(n, n)`` symmetric positive semi-definite.
        damping: ``λ >= 0`` added to the diagonal.

    A 1-D ``matrix`` is a diagonal (an embedding's token frequencies): the result is the 1-D
    ``1 / (d + λ)``, and 0 where ``d + λ = 0`` (a token never seen with ``λ = 0``, whose gradient
    row is 0 too: the pseudo-inverse).

    Returns:
        ``(n, n)`` symmetric inverse, same dtype and device as ``matrix`` (``(n,)`` for a
        diagonal).
    """
    if matrix.dim() == 1:
        damped = matrix + damping
        return torch.where(damped > 0, 1.0 / damped.clamp_min(torch.finfo(damped.dtype).tiny), 0.0)
    cholesky = damped_cholesky(matrix, damping)
    if cholesky is not None:
        return torch.cholesky_inverse(cholesky)
    damped = matrix.clone()
    damped.diagonal().add_(damping)
    eigenvalues, eigenvectors = torch.linalg.eigh(damped)
    floor = eigenvalues.abs().max().clamp_min(1.0) * torch.finfo(matrix.dtype).eps * matrix.shape[0]
    warnings.warn(
        f"Cholesky of a damped {tuple(matrix.shape)} factor failed (damping={damping:g}); "
        "using an eigendecomposition with clamped eigenvalues instead",
        RuntimeWarning,
        stacklevel=2,
    )
    return (eigenvectors / eigenvalues.clamp_min(floor)) @ eigenvectors.T


def second_moment(rows: Tensor, dtype: torch.dtype) -> Tensor:
    """``(1/R) Σ_r x_r x_rᵀ`` of the rows of ``rows`` (``(R, n)`` → ``(n, n)``), in ``dtype``."""
    rows = rows.to(dtype)
    return (rows.T @ rows).div_(rows.shape[0])


def update_ema_(average: Tensor | None, value: Tensor, decay: float) -> Tensor:
    """Exponential moving average ``decay·average + (1-decay)·value`` (paper App. D.1), in place.

    The average is normalised by initialising it with the first value, so ``decay=0`` means
    "this batch only" and there is no bias towards zero early on.
    """
    if average is None:
        return value.clone()
    return average.mul_(decay).add_(value, alpha=1.0 - decay)


def update_second_moment_ema_(
    average: Tensor | None, rows: Tensor, count: int, decay: float
) -> Tensor:
    """``decay·average + (1-decay)·(1/count) Σ_r x_r x_rᵀ`` in place, as one GEMM.

    The same as :func:`update_ema_` of :func:`second_moment` (normalised by ``count``, which
    is the number of rows for ``Ā`` and the batch size for ``Ḡ``), without materialising the
    batch term: ``addmm_`` scales the average by ``beta`` while accumulating the product, so
    the ``(n, n)`` average is read and written once.

    Args:
        average: ``(n, n)`` running average, or None for the first batch (then the batch term
            itself is returned).
        rows: ``(R, n)`` in the average's dtype.
        count: normaliser of the batch term.
        decay: ``m ∈ [0, 1)``.
    """
    if average is None:
        return (rows.T @ rows).div_(count)
    return average.addmm_(rows.T, rows, beta=decay, alpha=(1.0 - decay) / count)


def right_multiply(matrix: Tensor, factor: Tensor) -> Tensor:
    """``matrix @ factor``, with a 1-D ``factor`` a diagonal (scales the columns)."""
    return matrix * factor if factor.dim() == 1 else matrix @ factor
