"""The fast subsampled Fisher as a public tool: products, inverses, Laplace samples (App. C).

:class:`SubsampledFisher` holds, per layer, only the inputs ``A`` and output gradients ``E`` of
one batch (``O(batch · neurons)`` memory) and offers what App. C lists: ``F v`` and ``vᵀ F v``
(EWC, C.2), ``(λI + F)⁻¹ v`` (implicit-function bilevel methods, C.3) and exact samples of the
full-covariance Laplace posterior (C.1, eqs. 7-11) through :class:`LaplacePosterior`.
:class:`foof.NaturalGradient` uses the same Woodbury algebra
(:mod:`foof.curvature.woodbury`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from foof.capture import Capture
from foof.curvature.sampling import (
    FISHER_TYPES,
    LIKELIHOODS,
    check_output,
    fisher_scale,
    layer_output_grads,
    output_shape,
)
from foof.curvature.woodbury import LayerFisherData, cholesky_solve_damped, damped_inverse_mv
from foof.validation import check_choice

Vector = Tensor | Sequence[Tensor]


class SubsampledFisher:
    r"""The Fisher ``F = (1/B) Σ_i E_y[g_i(y) g_i(y)ᵀ] = G Gᵀ`` of one batch, never formed.

    ``F`` covers the parameters of the model's Linear and (ungrouped) Conv2d layers,
    :meth:`parameters` in order (per layer: weight, then bias). Vectors are either a list of
    parameter-shaped tensors in that order or one flat vector of their concatenation; results
    come back in the same form. See :mod:`foof.curvature.sampling` for the Fisher conventions
    (``fisher``, ``likelihood``) and :mod:`foof.curvature.woodbury` for the algebra.

    Args:
        model: the network; it is run once on ``inputs`` (in whatever train/eval mode it is in).
        inputs: a batch ``(B, ...)``.
        targets: dataset labels (needed for ``fisher="empirical"`` only), shaped like the
            output: class indices ``(B,)`` / ``(B, ...)`` for categorical, ``{0, 1}`` (or
            soft) labels like the logits for bernoulli, targets like the means for gaussian.
        fisher: ``"mc"``, ``"full"`` or ``"empirical"``.
        likelihood: ``"categorical"`` (softmax logits), ``"bernoulli"`` (sigmoid logits,
            binary ``(B,)``/``(B, 1)`` or multi-label ``(B, K)``) or ``"gaussian"``. An output
            ``(B, ..., C)`` has rows over its middle dimensions and ``F`` is normalised by all
            ``N`` rows (see :mod:`foof.curvature.sampling`).
        block_diagonal: keep only the per-layer blocks of ``F``.
        generator: random generator for ``fisher="mc"``.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> fisher = SubsampledFisher(model, torch.randn(16, 4), fisher="full")
        >>> v = [torch.randn_like(p) for p in fisher.parameters()]
        >>> bool(fisher.quadratic(v) >= 0)
        True
        >>> x = fisher.inverse_mv(fisher.mv(v), damping=1e-3)   # ≈ v restricted to range(F)
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Tensor,
        targets: Tensor | None = None,
        fisher: str = "mc",
        likelihood: str = "categorical",
        block_diagonal: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        check_choice("fisher", fisher, FISHER_TYPES)
        check_choice("likelihood", likelihood, LIKELIHOODS)
        if fisher == "empirical" and targets is None:
            raise ValueError("fisher='empirical' needs the dataset targets")
        self.block_diagonal = block_diagonal
        self.likelihood = likelihood
        with (
            Capture(
                model,
                record_inputs=lambda: True,
                record_outputs=lambda: fisher != "empirical",
                record_output_grads=lambda: fisher == "empirical",
                training_only=False,
            ) as capture,
            torch.enable_grad(),
        ):
            output = model(inputs)
            check_output(output, likelihood)
            if fisher == "empirical":
                per_row = _negative_log_likelihood(output, targets, likelihood)
                params = [p for m in capture.layers.values() for p in m.parameters(False)]
                # gradients w.r.t. layer outputs only: parameters' .grad stay untouched
                torch.autograd.grad(per_row.mean(), params, allow_unused=True)
            grads = layer_output_grads(capture, output, fisher, likelihood, generator)
            batch, positions, _ = output_shape(output)
            scale = fisher_scale(batch, batch * positions)
            self.layers: list[nn.Module] = []
            self.data: list[LayerFisherData] = []
            for module in capture.layers.values():
                rows = capture.inputs(module)
                if rows is None or module not in grads:
                    continue
                self.layers.append(module)
                self.data.append(
                    LayerFisherData(rows.detach(), grads[module].detach() * scale, len(inputs))
                )

    @classmethod
    def from_layer_data(
        cls,
        layers: Sequence[nn.Module],
        data: Sequence[LayerFisherData],
        block_diagonal: bool = False,
        likelihood: str = "categorical",
    ) -> SubsampledFisher:
        """A Fisher from already captured per-layer ``A``/``E`` (what optimizers hold).

        Args:
            layers: the Linear/Conv2d modules, in vector order.
            data: their :class:`~foof.curvature.woodbury.LayerFisherData`, same order.
            block_diagonal: keep only the per-layer blocks.
            likelihood: the likelihood ``data`` was computed for (the predictive's link).
        """
        check_choice("likelihood", likelihood, LIKELIHOODS)
        fisher = cls.__new__(cls)
        fisher.layers, fisher.data = list(layers), list(data)
        fisher.block_diagonal = block_diagonal
        fisher.likelihood = likelihood
        return fisher

    def inverse_mv_matrices(self, matrices: Sequence[Tensor], damping: float) -> list[Tensor]:
        """``(λI + F)⁻¹ v`` for ``v`` given as one ``(out, in_dim)`` matrix ``[W, b]`` per layer."""
        return damped_inverse_mv(self.data, list(matrices), damping, self.block_diagonal)

    # -- vector plumbing ---------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        """The parameters ``F`` acts on, in vector order (per layer: weight, then bias)."""
        return [p for m in self.layers for p in m.parameters(recurse=False)]

    def _to_matrices(self, vector: Vector) -> tuple[list[Tensor], bool]:
        params = self.parameters()
        flat = isinstance(vector, Tensor)
        if flat:
            sizes = [p.numel() for p in params]
            if vector.dim() != 1 or vector.numel() != sum(sizes):
                raise ValueError(
                    f"a flat vector must have {sum(sizes)} entries, got shape {tuple(vector.shape)}"
                )
            parts = list(torch.split(vector, sizes))
        else:
            parts = list(vector)
            if len(parts) != len(params):
                raise ValueError(
                    f"expected {len(params)} parameter-shaped tensors, got {len(parts)}"
                )
        matrices, position = [], 0
        for module in self.layers:
            weight = parts[position].reshape(module.weight.shape[0], -1)
            position += 1
            if module.bias is not None:
                weight = torch.cat([weight, parts[position].reshape(-1, 1)], dim=1)
                position += 1
            matrices.append(weight.to(self.data[0].inputs.dtype))
        return matrices, flat

    def _from_matrices(self, matrices: list[Tensor], flat: bool) -> Vector:
        parts = []
        for module, matrix in zip(self.layers, matrices):
            if module.bias is not None:
                parts.append(matrix[:, :-1].reshape(module.weight.shape))
                parts.append(matrix[:, -1].reshape(module.bias.shape))
            else:
                parts.append(matrix.reshape(module.weight.shape))
        return torch.cat([p.reshape(-1) for p in parts]) if flat else parts

    # -- products ------------------------------------------------------------------------------
    def gram(self) -> Tensor:
        """``GᵀG`` ``(M, M)``, ``M = K·B`` (the sum of per-layer Gram matrices)."""
        return sum(d.gram() for d in self.data)

    def transpose_mv(self, vector: Vector) -> Tensor:
        """``Gᵀ v`` ``(M,)``: ``v``'s inner products with the scaled per-sample gradients."""
        matrices, _ = self._to_matrices(vector)
        return sum(d.transpose_mv(m) for d, m in zip(self.data, matrices))

    def mv(self, vector: Vector) -> Vector:
        """``F v`` (per-layer blocks ``F_l v_l`` if ``block_diagonal``)."""
        matrices, flat = self._to_matrices(vector)
        if self.block_diagonal:
            out = [d.mv(d.transpose_mv(m)) for d, m in zip(self.data, matrices)]
        else:
            w = sum(d.transpose_mv(m) for d, m in zip(self.data, matrices))
            out = [d.mv(w) for d in self.data]
        return self._from_matrices(out, flat)

    def quadratic(self, vector: Vector) -> Tensor:
        """``vᵀ F v = ‖Gᵀ v‖²`` (a scalar), what EWC needs (App. C.2)."""
        matrices, _ = self._to_matrices(vector)
        if self.block_diagonal:
            return sum(d.transpose_mv(m).square().sum() for d, m in zip(self.data, matrices))
        return self.transpose_mv(vector).square().sum()

    def inverse_mv(self, vector: Vector, damping: float) -> Vector:
        """``(λI + F)⁻¹ v`` by the Woodbury identity (App. C.3, I); ``damping = λ > 0``."""
        if not damping > 0:
            raise ValueError(f"damping must be > 0, got {damping!r}")
        matrices, flat = self._to_matrices(vector)
        return self._from_matrices(self.inverse_mv_matrices(matrices, damping), flat)


def _negative_log_likelihood(output: Tensor, targets: Tensor, likelihood: str) -> Tensor:
    """``−log p(y_r | x)`` per output row ``r`` (up to constants): ``(N,)``."""
    batch, positions, classes = output_shape(output)
    rows = output.reshape(batch * positions, classes)
    if likelihood == "categorical":
        return nn.functional.cross_entropy(rows, targets.reshape(-1), reduction="none")
    targets = targets.reshape(rows.shape).to(rows.dtype)
    if likelihood == "bernoulli":
        return nn.functional.binary_cross_entropy_with_logits(rows, targets, reduction="none").sum(
            -1
        )
    return 0.5 * (rows - targets).square().sum(-1)


def predictive_probabilities(output: Tensor, likelihood: str) -> Tensor:
    """The predictive a sample's output gives: softmax, sigmoid (bernoulli) or the mean."""
    if likelihood == "categorical":
        return torch.softmax(output, dim=-1)
    if likelihood == "bernoulli":
        return torch.sigmoid(output)
    return output


class LaplacePosterior:
    r"""Exact samples of the full-covariance Laplace posterior ``N(θ_MAP, Λ⁻¹)`` (App. C.1).

    ``Λ = Λ_prior + N·F`` with ``F`` a :class:`SubsampledFisher` (not block-diagonal) and a
    diagonal prior that is constant per layer, ``Λ_prior = diag(τ_l)``. Samples (eqs. 7-11)::

        V = (N Λ_prior⁻¹)^{1/2} G,   U = I + VᵀV   (M×M)
        y ~ N(0, I_params),  z ~ N(0, I_M)
        x = y − V U⁻¹ (Vᵀ y + z)          ⇒ Cov(x) = I − V U⁻¹ Vᵀ = (I + V Vᵀ)⁻¹
        θ = θ_MAP + Λ_prior^{-1/2} x      ⇒ Cov(θ) = (Λ_prior + N G Gᵀ)⁻¹ = Λ⁻¹

    Args:
        fisher: the subsampled Fisher at ``θ_MAP``.
        prior_precision: ``τ`` for all layers, or one ``τ_l > 0`` per layer (per
            ``fisher.layers``).
        num_data: ``N``, the size of the training set.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> posterior = LaplacePosterior(SubsampledFisher(model, torch.randn(16, 4)), 1.0, 1000)
        >>> samples = posterior.sample(5)          # list of parameter lists
        >>> probs = posterior.predictive(model, torch.randn(2, 4), num_samples=5)
    """

    #: samples drawn per batched solve (bounds memory to chunk_size × parameters).
    chunk_size = 64

    def __init__(
        self,
        fisher: SubsampledFisher,
        prior_precision: float | Sequence[float],
        num_data: int,
    ) -> None:
        if fisher.block_diagonal:
            raise ValueError("LaplacePosterior needs the full (not block-diagonal) Fisher")
        count = len(fisher.layers)
        if isinstance(prior_precision, (int, float)):
            prior_precision = [float(prior_precision)] * count
        prior_precision = [float(t) for t in prior_precision]
        if len(prior_precision) != count or not all(t > 0 for t in prior_precision):
            raise ValueError(
                f"prior_precision must be > 0, one value or {count} values, got {prior_precision}"
            )
        if not num_data > 0:
            raise ValueError(f"num_data must be > 0, got {num_data!r}")
        self.fisher = fisher
        #: the likelihood of ``fisher``: the link :meth:`predictive` applies to each sample.
        self.likelihood = getattr(fisher, "likelihood", "categorical")
        self.prior_precision = prior_precision
        self.num_data = num_data
        self.scales = [(num_data / t) ** 0.5 for t in prior_precision]  # (N/τ_l)^{1/2}
        # U = I + VᵀV = I + Σ_l (N/τ_l) G_lᵀG_l
        u = sum(s**2 * d.gram() for s, d in zip(self.scales, fisher.data))
        u.diagonal().add_(1.0)
        self._u = u

    def sample_displacements(self, y: list[Tensor], z: Tensor) -> list[Tensor]:
        """The deterministic map ``(y, z) ↦ θ − θ_MAP`` (eqs. 7-11), per layer ``(out, in_dim)``.

        Args:
            y: one ``(S, out, in_dim)`` (or ``(out, in_dim)``) matrix per layer, standard normal
                for ``S`` samples.
            z: ``(S, M)`` (or ``(M,)``), standard normal.

        Returns:
            one ``(S, out, in_dim)`` (or ``(out, in_dim)``) displacement per layer.
        """
        data = self.fisher.data
        v_t_y = sum(s * d.transpose_mv(m) for s, d, m in zip(self.scales, data, y))
        rhs = v_t_y + z
        # U⁻¹ (Vᵀy + z), all samples as columns of one solve
        w = cholesky_solve_damped(self._u, rhs.reshape(-1, rhs.shape[-1]).T, 0.0).T
        w = w.reshape(rhs.shape)
        return [
            (m - s * d.mv(w)) / tau**0.5
            for s, d, m, tau in zip(self.scales, data, y, self.prior_precision)
        ]

    def sample(self, num_samples: int = 1, generator: torch.Generator | None = None) -> list:
        """``num_samples`` samples, each a list of tensors shaped like ``fisher.parameters()``."""
        data = self.fisher.data
        dtype, device = data[0].inputs.dtype, data[0].inputs.device
        centre, _ = self.fisher._to_matrices([p.detach() for p in self.fisher.parameters()])
        samples = []
        for start in range(0, num_samples, self.chunk_size):
            count = min(self.chunk_size, num_samples - start)
            y = [
                torch.randn(
                    count,
                    d.output_grads.shape[-1],
                    d.inputs.shape[1],
                    generator=generator,
                    dtype=dtype,
                    device=device,
                )
                for d in data
            ]
            z = torch.randn(
                count, data[0].num_columns, generator=generator, dtype=dtype, device=device
            )
            displacement = self.sample_displacements(y, z)
            for i in range(count):
                samples.append(
                    self.fisher._from_matrices(
                        [c + x[i] for c, x in zip(centre, displacement)], False
                    )
                )
        return samples

    def parameters(self) -> list[nn.Parameter]:
        """The parameters samples replace (``fisher.parameters()``)."""
        return self.fisher.parameters()

    def predictive(
        self,
        model: nn.Module,
        inputs: Tensor,
        num_samples: int = 20,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Monte-Carlo predictive ``(B, C)``, see :func:`monte_carlo_predictive`."""
        return monte_carlo_predictive(self, model, inputs, num_samples, generator)


class KroneckerLaplace:
    r"""Laplace posterior with a Kronecker-factored Fisher per layer (Ritter et al., 2018; App. G).

    Per layer the precision is ``Λ_l = N·(Ā ⊗ Ḡ) + τ_l I`` (``second_factor=True``: KFAC
    Laplace) or ``Λ_l = N·(Ā ⊗ I) + τ_l I`` (App. G's "first factor only" variant); layers are
    independent. With eigendecompositions ``Ā = Q_A diag(a) Q_Aᵀ`` and ``Ḡ = Q_G diag(g) Q_Gᵀ`` a
    sample is ``W = W_MAP + Q_G [Z / sqrt(N g aᵀ + τ)] Q_Aᵀ`` with ``Z`` standard normal, exact for
    that precision.

    Args:
        layers: the Linear/Conv2d modules, in the order of ``factors``.
        factors: per layer ``(Ā, Ḡ)``: ``(in_dim, in_dim)`` and ``(out, out)`` (e.g. a
            :class:`foof.KFAC` state's ``input_covariance`` and ``gradient_covariance``).
        prior_precision: ``τ`` for all layers or one per layer, ``> 0``.
        num_data: ``N``.
        second_factor: keep ``Ḡ``; False replaces it by the identity.
        likelihood: the likelihood the factors were computed for (``"categorical"``,
            ``"bernoulli"`` or ``"gaussian"``): the link :meth:`predictive` applies.
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        factors: Sequence[tuple[Tensor, Tensor]],
        prior_precision: float | Sequence[float],
        num_data: int,
        second_factor: bool = True,
        likelihood: str = "categorical",
    ) -> None:
        check_choice("likelihood", likelihood, LIKELIHOODS)
        self.likelihood = likelihood
        if isinstance(prior_precision, (int, float)):
            prior_precision = [float(prior_precision)] * len(layers)
        if len(prior_precision) != len(layers) or not all(t > 0 for t in prior_precision):
            raise ValueError(f"prior_precision must be > 0 per layer, got {prior_precision}")
        self.layers = list(layers)
        self.eigen = []
        for (input_cov, gradient_cov), tau in zip(factors, prior_precision):
            a, q_a = torch.linalg.eigh(input_cov)
            if second_factor:
                g, q_g = torch.linalg.eigh(gradient_cov)
            else:
                g = torch.ones(gradient_cov.shape[0], dtype=a.dtype, device=a.device)
                q_g = torch.eye(gradient_cov.shape[0], dtype=a.dtype, device=a.device)
            variance = 1.0 / (num_data * torch.outer(g.clamp_min(0), a.clamp_min(0)) + tau)
            self.eigen.append((q_a, q_g, variance.sqrt()))

    def sample(self, num_samples: int = 1, generator: torch.Generator | None = None) -> list:
        """``num_samples`` samples, each a list of tensors shaped like the layers' parameters."""
        per_layer = []  # (S, out, in_dim) per layer, all samples drawn at once
        for module, (q_a, q_g, std) in zip(self.layers, self.eigen):
            noise = torch.randn(
                (num_samples, *std.shape), generator=generator, dtype=std.dtype, device=std.device
            )
            centre = module.weight.detach().flatten(1)
            if module.bias is not None:
                centre = torch.cat([centre, module.bias.detach()[:, None]], dim=1)
            per_layer.append(centre.to(std.dtype) + q_g @ (noise * std) @ q_a.T)
        samples = []
        for index in range(num_samples):
            sample = []
            for module, matrices in zip(self.layers, per_layer):
                matrix = matrices[index]
                if module.bias is not None:
                    sample += [matrix[:, :-1].reshape(module.weight.shape), matrix[:, -1]]
                else:
                    sample.append(matrix.reshape(module.weight.shape))
            samples.append(sample)
        return samples

    def parameters(self) -> list[nn.Parameter]:
        """The parameters samples replace, in order (per layer: weight, then bias)."""
        return [p for m in self.layers for p in m.parameters(recurse=False)]

    def predictive(
        self,
        model: nn.Module,
        inputs: Tensor,
        num_samples: int = 20,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Monte-Carlo predictive ``(B, C)``, see :func:`monte_carlo_predictive`."""
        return monte_carlo_predictive(self, model, inputs, num_samples, generator)


def monte_carlo_predictive(
    posterior: LaplacePosterior | KroneckerLaplace,
    model: nn.Module,
    inputs: Tensor,
    num_samples: int = 20,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
) -> Tensor:
    """``(1/S) Σ_s link(f(x; θ_s))`` ``(B, C)`` over posterior samples ``θ_s``.

    The link is the posterior's likelihood's (:func:`predictive_probabilities`): softmax
    (categorical), sigmoid per logit (bernoulli: the probabilities of the positive labels) or
    the identity (gaussian: the predictive mean).

    The model's parameters are swapped for each sample and restored afterwards, also on error.
    ``batch_size`` runs the model on that many inputs at a time (the same samples for all).
    """
    params = posterior.parameters()
    saved = [p.detach().clone() for p in params]
    step = batch_size or len(inputs)
    total = None
    try:
        with torch.no_grad():
            for sample in posterior.sample(num_samples, generator):
                for p, value in zip(params, sample):
                    p.copy_(value)
                parts = [model(inputs[i : i + step]) for i in range(0, len(inputs), step)]
                probs = predictive_probabilities(torch.cat(parts), posterior.likelihood)
                total = probs if total is None else total + probs
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value)
    return total / num_samples
