r"""Per-step instruments along KFAC's trajectory (Figs. 3B and 4C), as training callbacks.

Both compare, at every instrumented step, the update KFAC applies with the update of FOOF
*with KFAC's input damping* (App. D.9): per layer, with ``Ĝ`` the gradient matrix ``[∇W, ∇b]``
``(out, in_dim)``, ``Σ`` KFAC's input factor ``Ā`` (the same matrix as FOOF's ``Σ``: the mean over
rows of ``ā āᵀ``, an EMA) and ``Ḡ`` its gradient factor,

.. math::

    λ_A = π \sqrt{λ}, \quad π = \sqrt{\frac{\operatorname{tr} Σ / \dim Σ}
    {\operatorname{tr} Ḡ / \dim Ḡ}}, \qquad D_{\mathrm{FOOF}} = Ĝ (Σ + λ_A I)^{-1},

which is the direction of ``foof.KFAC(..., second_factor=False)`` (FOOF with KFAC's λ_A). KFAC's
update ``U`` is read off the parameters (``before − after`` of ``opt.step()``), so it is exactly
what KFAC applied, whatever its damping mode, learning rate or momentum.

* :class:`KfacFoofCosine` (Fig. 3B): the cosine between ``U`` and ``D_FOOF`` in FOOF's inner
  product ``⟨U, V⟩ = Σ_l tr(U_l (Σ_l + λ_{A,l} I) V_lᵀ)`` (the network's block-diagonal metric).
* :class:`SecondFactorProgress` (Fig. 4C): the relative decrease ``(L₀ − L₁)/L₀`` of the loss on
  the step's own mini-batch from KFAC's update, and from ``D_FOOF`` rescaled per layer to the
  Frobenius norm of KFAC's update of that layer.

Instruments read the optimizer's state after ``opt.step()``, i.e. the factors the step itself used
(with ``inv_every=1``, the default of these figures). They evaluate the model only under
``torch.no_grad()``, which foof's optimizers never record.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from foof.curvature.kronecker import pi_factor
from foof.optim.base import gradient_matrix
from foof.optim.kfac import KFAC
from foof.train import StepContext, TrainCallback


def layer_matrix(module: nn.Module) -> Tensor:
    """The layer's parameters as one matrix ``[W, b]``: ``(out, in_dim)`` (as ``Ĝ``)."""
    weight = module.weight.detach().flatten(1)
    if module.bias is None:
        return weight.clone()
    return torch.cat([weight, module.bias.detach().unsqueeze(1)], dim=1)


@torch.no_grad()
def set_layer_matrix(module: nn.Module, matrix: Tensor) -> None:
    """Inverse of :func:`layer_matrix`: write ``[W, b]`` back into the layer."""
    columns = module.weight[0].numel()
    module.weight.copy_(matrix[:, :columns].reshape(module.weight.shape))
    if module.bias is not None:
        module.bias.copy_(matrix[:, columns])


def input_damping(optimizer: KFAC, module: nn.Module) -> float:
    """KFAC's damping of the input factor, ``λ_A = π √λ`` (paper eq. 2, App. D.9)."""
    state = optimizer.state[module.weight]
    pi = pi_factor(state["input_covariance"], state["gradient_covariance"])
    return pi * math.sqrt(optimizer.param_groups[0]["damping"])


def foof_direction(optimizer: KFAC, module: nn.Module) -> tuple[Tensor, float]:
    """FOOF's direction with KFAC's input damping, ``Ĝ (Σ + λ_A I)⁻¹``, and ``λ_A``.

    Args:
        optimizer: a KFAC optimizer that has taken at least one step.
        module: one of its layers; its ``p.grad`` must hold the step's gradient.

    Returns:
        The direction ``(out, in_dim)`` (in the covariance's dtype) and ``λ_A``.
    """
    covariance = optimizer.state[module.weight]["input_covariance"]
    damping = input_damping(optimizer, module)
    return damped_solve(gradient_matrix(module, zero_if_missing=True), covariance, damping), damping


def damped_solve(grad: Tensor, covariance: Tensor, damping: float) -> Tensor:
    """``grad (Σ + λI)⁻¹`` in float64, returned in ``covariance``'s dtype.

    A Cholesky solve; if ``Σ + λI`` is not numerically positive definite (a tiny ``λ`` on a
    singular ``Σ``), the eigendecomposition with eigenvalues clamped at a relative ``1e-12``
    instead, so that an instrument never stops a run.
    """
    matrix = covariance.double()
    identity = torch.eye(len(matrix), dtype=matrix.dtype, device=matrix.device)
    matrix = matrix + damping * identity
    rhs = grad.detach().double().T
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        solution = torch.cholesky_solve(rhs, factor)
    else:
        values, vectors = torch.linalg.eigh(matrix)
        values = values.clamp_min(values.abs().max() * 1e-12)
        solution = vectors @ ((vectors.T @ rhs) / values[:, None])
    return solution.T.to(covariance.dtype)


def foof_inner_product(u: Tensor, v: Tensor, covariance: Tensor, damping: float) -> Tensor:
    """FOOF's inner product of two layer updates, ``tr(U (Σ + λI) Vᵀ)``.

    Args:
        u: ``(out, in_dim)``.
        v: ``(out, in_dim)``.
        covariance: ``Σ`` ``(in_dim, in_dim)``, symmetric.
        damping: ``λ``.

    Returns:
        A scalar tensor.
    """
    return ((u @ covariance) * v).sum() + damping * (u * v).sum()


def foof_cosine(
    updates: dict[str, Tensor],
    directions: dict[str, Tensor],
    covariances: dict[str, Tensor],
    dampings: dict[str, float],
) -> tuple[float, dict[str, float]]:
    """Cosine similarity of two network updates in FOOF's block-diagonal inner product.

    ``cos = ⟨U, V⟩ / sqrt(⟨U, U⟩ ⟨V, V⟩)`` with ``⟨U, V⟩ = Σ_l tr(U_l (Σ_l + λ_l I) V_lᵀ)``.

    Args:
        updates: per layer name, the first update ``U_l`` ``(out, in_dim)``.
        directions: per layer name, the second ``V_l``.
        covariances: per layer name, ``Σ_l``.
        dampings: per layer name, ``λ_l``.

    Returns:
        The network's cosine and the per-layer cosines (``nan`` for a zero update).
    """
    total = {"uv": 0.0, "uu": 0.0, "vv": 0.0}
    per_layer: dict[str, float] = {}
    for name, u in updates.items():
        v, cov, lam = directions[name].to(u.dtype), covariances[name].to(u.dtype), dampings[name]
        uv = float(foof_inner_product(u, v, cov, lam))
        uu = float(foof_inner_product(u, u, cov, lam))
        vv = float(foof_inner_product(v, v, cov, lam))
        total["uv"] += uv
        total["uu"] += uu
        total["vv"] += vv
        per_layer[name] = uv / math.sqrt(uu * vv) if uu > 0 and vv > 0 else math.nan
    denominator = math.sqrt(total["uu"] * total["vv"])
    return (total["uv"] / denominator if denominator > 0 else math.nan), per_layer


class KfacTrajectoryInstrument(TrainCallback):
    """Base of the instruments: checks the optimizer, snapshots the layers before each step.

    Args:
        every: instrument every ``every``-th step (from step 0); the others run untouched.
    """

    name = ""

    def __init__(self, every: int = 1) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        self.every = every
        self.steps: list[int] = []
        self._before: dict[str, Tensor] | None = None

    def before_step(self, context: StepContext) -> None:
        """Snapshot ``[W, b]`` of every layer on instrumented steps."""
        if not isinstance(context.optimizer, KFAC):
            raise TypeError(
                f"instrument {self.name!r} follows KFAC's trajectory; the run's optimizer is "
                f"{type(context.optimizer).__name__}"
            )
        self._before = None
        if context.step % self.every == 0:
            self._before = {
                name: layer_matrix(module) for name, module in context.optimizer.layers.items()
            }

    def after_step(self, context: StepContext) -> None:
        """Measure, if this step was snapshot."""
        if self._before is None:
            return
        before, self._before = self._before, None
        optimizer: KFAC = context.optimizer  # type: ignore[assignment]
        updates = {
            name: before[name] - layer_matrix(module) for name, module in optimizer.layers.items()
        }
        if not any(bool(u.abs().sum() > 0) for u in updates.values()):
            return  # the optimizer skipped the step (non-finite values)
        self.measure(context, optimizer, before, updates)

    def measure(
        self,
        context: StepContext,
        optimizer: KFAC,
        before: dict[str, Tensor],
        updates: dict[str, Tensor],
    ) -> None:
        """Record this step's numbers; ``updates`` are KFAC's ``before − after`` per layer."""
        raise NotImplementedError

    def summary(self) -> dict[str, Any]:
        """The recorded series and their summary, stored in ``results["metrics"][name]``."""
        raise NotImplementedError


class KfacFoofCosine(KfacTrajectoryInstrument):
    """Fig. 3B: cosine between KFAC's update and FOOF's (KFAC's λ_A) in FOOF's inner product.

    ``summary()`` gives ``step``, ``cosine`` (one value per instrumented step), ``mean``,
    ``last`` and ``per_layer_mean``.
    """

    name = "kfac-foof-cosine"

    def __init__(self, every: int = 1) -> None:
        super().__init__(every)
        self.cosines: list[float] = []
        self.per_layer: dict[str, list[float]] = {}

    def measure(self, context, optimizer, before, updates) -> None:  # noqa: D102
        directions, covariances, dampings = {}, {}, {}
        for name, module in optimizer.layers.items():
            directions[name], dampings[name] = foof_direction(optimizer, module)
            covariances[name] = optimizer.state[module.weight]["input_covariance"]
        cosine, per_layer = foof_cosine(updates, directions, covariances, dampings)
        self.steps.append(context.step)
        self.cosines.append(cosine)
        for name, value in per_layer.items():
            self.per_layer.setdefault(name, []).append(value)

    def summary(self) -> dict[str, Any]:  # noqa: D102
        return {
            "every": self.every,
            "step": self.steps,
            "cosine": [_finite(c) for c in self.cosines],
            "mean": _mean(self.cosines),
            "last": _finite(self.cosines[-1]) if self.cosines else None,
            "per_layer_mean": {name: _mean(v) for name, v in self.per_layer.items()},
        }


class SecondFactorProgress(KfacTrajectoryInstrument):
    """Fig. 4C: relative loss decrease on the step's mini-batch, KFAC vs norm-matched FOOF.

    ``summary()`` gives ``step``, ``kfac`` and ``foof`` (relative decreases
    ``(L₀ − L₁)/L₀``), their means ``kfac_mean`` and ``foof_mean``, and ``foof_ge_kfac``, the
    fraction of steps on which FOOF's decrease is at least KFAC's.
    """

    name = "second-factor-progress"

    def __init__(self, every: int = 1) -> None:
        super().__init__(every)
        self.kfac: list[float] = []
        self.foof: list[float] = []

    @torch.no_grad()
    def measure(self, context, optimizer, before, updates) -> None:  # noqa: D102
        loss_before = float(context.loss.detach())
        if not (math.isfinite(loss_before) and loss_before > 0):
            return
        loss_kfac = float(context.loss_fn(context.model(context.inputs), context.targets))
        after = {name: layer_matrix(module) for name, module in optimizer.layers.items()}
        try:
            for name, module in optimizer.layers.items():
                direction, _ = foof_direction(optimizer, module)
                direction = direction.to(updates[name].dtype)
                norm = direction.norm()
                scale = updates[name].norm() / norm if norm > 0 else 0.0
                set_layer_matrix(module, before[name] - scale * direction)
            loss_foof = float(context.loss_fn(context.model(context.inputs), context.targets))
        finally:
            for name, module in optimizer.layers.items():
                set_layer_matrix(module, after[name])
        self.steps.append(context.step)
        self.kfac.append((loss_before - loss_kfac) / loss_before)
        self.foof.append((loss_before - loss_foof) / loss_before)

    def summary(self) -> dict[str, Any]:  # noqa: D102
        pairs = [(k, f) for k, f in zip(self.kfac, self.foof) if math.isfinite(k + f)]
        return {
            "every": self.every,
            "step": self.steps,
            "kfac": [_finite(v) for v in self.kfac],
            "foof": [_finite(v) for v in self.foof],
            "kfac_mean": _mean(self.kfac),
            "foof_mean": _mean(self.foof),
            "foof_ge_kfac": (sum(f >= k for k, f in pairs) / len(pairs)) if pairs else None,
        }


INSTRUMENTS: dict[str, type[KfacTrajectoryInstrument]] = {
    KfacFoofCosine.name: KfacFoofCosine,
    SecondFactorProgress.name: SecondFactorProgress,
}
"""Instruments by name, as :class:`foof.experiments.spec.Run` lists them."""


def build_instruments(names: tuple[str, ...], every: int = 1) -> list[KfacTrajectoryInstrument]:
    """Instantiate the instruments called ``names``."""
    unknown = sorted(set(names) - set(INSTRUMENTS))
    if unknown:
        raise ValueError(f"unknown instrument(s) {unknown}; known: {', '.join(INSTRUMENTS)}")
    return [INSTRUMENTS[name](every=every) for name in names]


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return math.fsum(finite) / len(finite) if finite else None
