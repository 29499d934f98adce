"""The subsampled Fisher ``F = G Gᵀ`` held as per-layer ``A``/``E``, and its Woodbury algebra.

Paper App. I (eqs. 20-23). With ``K`` Fisher terms per input (see
:mod:`foof.curvature.sampling`) the Fisher of a batch of ``B`` inputs is
``F = (1/B) Σ_k Σ_i g_{k,i} g_{k,i}ᵀ = G Gᵀ`` where ``G`` has the ``M = K·B`` columns
``g_{k,i}/√B``. A column restricted to one layer is ``Σ_p e_{k,i,p} ā_{i,p}ᵀ / √B`` (a sum over
spatial positions ``p`` for Conv2d; a single term for Linear). Everything is computed from the
per-layer inputs ``A`` ``(B·P, in_dim)`` and output gradients ``E`` ``(K, B·P, out)``:

* ``Gᵀ v`` per layer: ``Σ_p (E V)_{k,i,p} · ā_{i,p}``;
* ``G w`` per layer: ``(Σ_k w_k ⊙ E_k)ᵀ A``;
* ``Gᵀ G = Σ_l (A_l A_lᵀ) ∘ (E_l E_lᵀ)`` for Linear layers; for Conv2d the sum over positions
  is done either on rows (a ``(B·P)²`` Hadamard product summed in ``P×P`` blocks) or through the
  layer's per-sample gradients, whichever needs fewer flops;
* ``(λI + G Gᵀ)⁻¹ v = (v − G (λI + GᵀG)⁻¹ Gᵀ v) / λ`` with a Cholesky solve of the small
  ``M×M`` system.

A gradient is itself of this form: ``∇L = E_Lᵀ A_L`` with the loss's output gradients ``E_L``
(:class:`FactoredGradient`). Then ``Gᵀ∇L`` needs only row Gram matrices,
``Σ_r (e_{k,i}·e_{L,r})(ā_i·ā_{L,r})``, and ``∇L − G w`` is one GEMM on stacked rows, so the
natural gradient never forms a weight gradient (see ``fused_backward`` of
:class:`foof.NaturalGradient`).

Memory is ``O(B·neurons)``, never ``O(parameters²)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LayerFisherData:
    """``A`` and ``E`` of one layer for one Fisher batch.

    Attributes:
        inputs: ``A`` ``(B·P, in_dim)``, bias column included.
        output_grads: ``E`` ``(K, B·P, out)``.
        batch_size: ``B``; ``P = rows / B`` positions per sample.
    """

    inputs: Tensor
    output_grads: Tensor
    batch_size: int

    @property
    def positions(self) -> int:
        """Rows per sample ``P`` (1 for Linear)."""
        return self.inputs.shape[0] // self.batch_size

    @property
    def num_columns(self) -> int:
        """``M = K·B``."""
        return self.output_grads.shape[0] * self.batch_size

    def per_sample_gradients(self) -> Tensor:
        """``(M, out, in_dim)`` columns of ``G`` for this layer (scaled by ``1/√B``)."""
        k, _, out = self.output_grads.shape
        b, p = self.batch_size, self.positions
        e = self.output_grads.reshape(k, b, p, out)
        a = self.inputs.reshape(b, p, -1)
        return torch.einsum("kbpo,bpi->kboi", e, a).reshape(k * b, out, -1) / b**0.5

    def gram(self, method: str = "auto") -> Tensor:
        """This layer's ``G_lᵀ G_l`` ``(M, M)``.

        Args:
            method: ``"rows"`` (Hadamard product of row Gram matrices, summed over position
                blocks), ``"per_sample"`` (through per-sample gradients) or ``"auto"`` (fewer
                flops).
        """
        k, rows, out = self.output_grads.shape
        b, p, n = self.batch_size, self.positions, self.inputs.shape[1]
        if method == "auto":
            rows_cost = rows * rows * (n + k * k * out)
            per_sample_cost = k * rows * out * n + (k * b) ** 2 * out * n
            method = "rows" if rows_cost <= per_sample_cost else "per_sample"
        if method == "per_sample":
            flat = self.per_sample_gradients().reshape(k * b, -1)
            return flat @ flat.T
        input_gram = self.inputs @ self.inputs.T  # (B·P, B·P)
        e = self.output_grads.reshape(k * rows, out)
        output_gram = e @ e.T  # (K·B·P, K·B·P)
        product = output_gram.reshape(k, rows, k, rows) * input_gram[None, :, None, :]
        # sum the P×P blocks of each pair of samples
        product = product.reshape(k, b, p, k, b, p).sum(dim=(2, 5))
        return product.reshape(k * b, k * b) / b

    def transpose_mv(self, matrix: Tensor) -> Tensor:
        """``G_lᵀ v`` for layer-shaped ``v`` ``(..., out, in_dim)`` → ``(..., M)``."""
        k = self.output_grads.shape[0]
        lead = matrix.shape[:-2]
        projected = (self.output_grads @ matrix.unsqueeze(-3)) * self.inputs  # (..., K, B·P, in)
        per_row = projected.sum(-1).reshape(*lead, k, self.batch_size, self.positions).sum(-1)
        return per_row.reshape(*lead, -1) / self.batch_size**0.5

    def mv(self, weights: Tensor) -> Tensor:
        """``G_l w`` for ``w`` ``(..., M)`` → ``(..., out, in_dim)``."""
        k, rows, out = self.output_grads.shape
        lead = weights.shape[:-1]
        w = weights.reshape(*lead, k, self.batch_size, 1, 1)
        e = self.output_grads.reshape(k, self.batch_size, self.positions, out)
        weighted = (e * w).sum(-4).reshape(*lead, rows, out)
        return weighted.transpose(-1, -2) @ self.inputs / self.batch_size**0.5


@dataclass
class FactoredGradient:
    """A layer gradient ``Ĝ = Eᵀ A`` ``(out, in_dim)`` held as its factors.

    Attributes:
        output_grads: ``E`` ``(R, out)``, gradients of the (batch-mean) loss w.r.t. the outputs.
        inputs: ``A`` ``(R, in_dim)``, the layer's input rows, bias column included.
    """

    output_grads: Tensor
    inputs: Tensor


def factored_projection_is_cheaper(layer: LayerFisherData, rows: int) -> bool:
    """Whether ``G_lᵀ (EᵀA)`` on row Gram matrices beats forming ``EᵀA`` and projecting it.

    Row Gram matrices cost ``K·rows_F·R·out + rows_F·R·in``; the dense route ``out·R·in``
    (forming) plus ``K·rows_F·out·in`` (projecting). For Linear layers at batch sizes below the
    widths the factored form wins by about ``min(in, out) / B``; for convolutions with many
    positions per sample it loses.
    """
    k, fisher_rows, out = layer.output_grads.shape
    in_dim = layer.inputs.shape[1]
    factored = fisher_rows * rows * (k * out + in_dim)
    dense = out * rows * in_dim + k * fisher_rows * out * in_dim
    return factored < dense


def _transpose_mv_factored(layer: LayerFisherData, grad: FactoredGradient) -> Tensor:
    """``G_lᵀ (E_Lᵀ A_L)`` ``(M,)`` from row Gram matrices."""
    k = layer.output_grads.shape[0]
    input_gram = layer.inputs @ grad.inputs.T  # (rows_F, R)
    inner = (layer.output_grads @ grad.output_grads.T) * input_gram  # (K, rows_F, R)
    per_row = inner.sum(-1).reshape(k, layer.batch_size, layer.positions).sum(-1)
    return per_row.reshape(-1) / layer.batch_size**0.5


def _subtract_mv(
    layer: LayerFisherData, vector: Tensor | FactoredGradient, weights: Tensor, scale: float
) -> Tensor:
    """``(v − G_l w)·scale`` ``(out, in_dim)``; for a factored ``v`` one GEMM on stacked rows.

    The scale is applied to the ``(rows, out)`` factor, not to the ``(out, in_dim)`` result.
    """
    if isinstance(vector, Tensor):
        return (vector - layer.mv(weights)).mul_(scale)
    k, rows, out = layer.output_grads.shape
    e = layer.output_grads.reshape(k, layer.batch_size, layer.positions, out)
    weighted = (e * weights.reshape(k, layer.batch_size, 1, 1)).sum(0).reshape(rows, out)
    weighted = weighted / layer.batch_size**0.5
    if vector.inputs is layer.inputs:  # the loss's batch is the Fisher batch: shared rows
        return ((vector.output_grads - weighted).mul_(scale)).T @ layer.inputs
    stacked = torch.cat([vector.output_grads, -weighted]).mul_(scale)
    return stacked.T @ torch.cat([vector.inputs, layer.inputs])


def _transpose_mv(layer: LayerFisherData, vector: Tensor | FactoredGradient) -> Tensor:
    if isinstance(vector, Tensor):
        return layer.transpose_mv(vector)
    return _transpose_mv_factored(layer, vector)


def cholesky_solve_damped(gram: Tensor, rhs: Tensor, damping: float) -> Tensor:
    """``(λI + GᵀG)⁻¹ rhs`` by Cholesky; ``rhs`` ``(M,)`` or ``(M, c)``."""
    damped = gram.clone()
    damped.diagonal().add_(damping)
    factor, info = torch.linalg.cholesky_ex(damped)
    if int(info) != 0:
        return torch.linalg.solve(damped, rhs)
    column = rhs.dim() == 1
    solution = torch.cholesky_solve(rhs.unsqueeze(1) if column else rhs, factor)
    return solution.squeeze(1) if column else solution


def damped_inverse_mv(
    layers: list[LayerFisherData],
    vectors: list[Tensor | FactoredGradient],
    damping: float,
    block_diagonal: bool,
) -> list[Tensor]:
    """``(λI + F)⁻¹ v`` by the Woodbury identity (paper eqs. 20-23).

    Args:
        layers: the Fisher data of each layer.
        vectors: one ``(out, in_dim)`` matrix per layer, or its :class:`FactoredGradient`.
        damping: ``λ > 0``.
        block_diagonal: if True, ``F`` is replaced by its layer-diagonal blocks.

    Returns:
        one ``(out, in_dim)`` matrix per layer.
    """
    if block_diagonal:
        results = []
        for layer, v in zip(layers, vectors):
            w = cholesky_solve_damped(layer.gram(), _transpose_mv(layer, v), damping)
            results.append(_subtract_mv(layer, v, w, 1.0 / damping))
        return results
    gram = sum(layer.gram() for layer in layers)
    projected = sum(_transpose_mv(layer, v) for layer, v in zip(layers, vectors))
    w = cholesky_solve_damped(gram, projected, damping)
    return [_subtract_mv(layer, v, w, 1.0 / damping) for layer, v in zip(layers, vectors)]
