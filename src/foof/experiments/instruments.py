r"""Per-step instruments along KFAC's trajectory (Figs. 3B, 4C and J.19), as training callbacks.

Both compare, at every instrumented step, the update KFAC applies with the update of FOOF
*with KFAC's input damping* (App. D.9, "computing the parameter update only using the first
kronecker factor AAᵀ, while omitting the second factor"): per layer, with ``Ĝ`` the gradient
matrix ``[∇W, ∇b]`` ``(out, in_dim)``, ``Σ`` KFAC's input factor ``Ā`` (the same matrix as FOOF's
``Σ``: the mean over rows of ``ā āᵀ``, an EMA) and ``Ḡ`` its gradient factor,

.. math::

    λ_A = π \sqrt{λ}, \quad λ_G = \sqrt{λ} / π, \quad π = \sqrt{\frac{\operatorname{tr} Σ / \dim Σ}
    {\operatorname{tr} Ḡ / \dim Ḡ}}, \qquad D_{\mathrm{FOOF}} = Ĝ (Σ + λ_A I)^{-1},

which is the direction of ``foof.KFAC(..., second_factor=False)`` (FOOF with KFAC's λ_A). With
heuristic damping ``(Σ + λ_A I)⁻¹`` is the very inverse (or Cholesky factor) KFAC's step used, so
with ``inv_every > 1`` (App. J's autoencoder) both updates come from the same, possibly stale,
factors; with standard damping (which has no ``λ_A``) it is solved from the current ``Σ``. KFAC's
update ``U`` is read off the parameters (``before − after`` of ``opt.step()``), so it is exactly
what KFAC applied, whatever its damping mode, learning rate or momentum.

* :class:`KfacFoofCosine` (Fig. 3B): the cosine between ``U`` and FOOF's update in FOOF's inner
  product ``⟨U, V⟩ = Σ_l tr(U_l (Σ_l + λ_{A,l} I) V_lᵀ)`` (the network's block-diagonal metric).
  FOOF's update is D.9's for Fig. 3, ``V_l = (λ_{A,l}/λ) D_{FOOF,l} = D_{FOOF,l}/λ_{G,l}``
  ("we simply multiply the update by the scalar λ_G⁻¹ = λ_A/λ"). The factor differs between
  layers, so it changes the network's cosine (not the per-layer ones, which are also recorded,
  nor a common scale such as the learning rate).
* :class:`SecondFactorProgress` (Figs. 4C, J.19): the relative decrease ``(L₀ − L₁)/L₀`` of the
  loss on the step's own mini-batch from KFAC's update, and from ``D_FOOF`` rescaled per layer to
  the Frobenius norm of KFAC's update of that layer (D.9: "so that at each layer, the norm of the
  update had the same norm as the KFAC update").

Instruments read the optimizer's state after ``opt.step()``, i.e. the factors the step itself used.
``λ_A`` (the metric's damping and D.9's scale) is computed from the current factors, which are
the ones KFAC inverted when ``inv_every=1`` (Fig. 3B's setting). They evaluate the model only
under ``torch.no_grad()``, which foof's optimizers never record.

Each instrument has a :attr:`~KfacTrajectoryInstrument.version`, bumped whenever what it measures
changes, so that ``foof reproduce`` reruns results made by an older definition (see
:func:`instrument_record`).
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
    """KFAC's direction without its second factor, ``Ĝ (Σ + λ_A I)⁻¹``, and ``λ_A`` (App. D.9).

    With heuristic damping the inverse is the one KFAC's step used (its Cholesky factor with
    ``inv_every=1``, else the damped inverse of the last inversion step); with standard damping,
    which keeps only eigendecompositions, ``Σ + λ_A I`` is solved in float64.

    Args:
        optimizer: a KFAC optimizer that has taken at least one step.
        module: one of its layers; its ``p.grad`` must hold the step's gradient.

    Returns:
        The direction ``(out, in_dim)`` (in the covariance's dtype) and ``λ_A``.
    """
    state = optimizer.state[module.weight]
    covariance = state["input_covariance"]
    damping = input_damping(optimizer, module)
    grad = gradient_matrix(module, zero_if_missing=True)
    if "input_cholesky" in state:
        factor = state["input_cholesky"]
        return torch.cholesky_solve(grad.to(factor.dtype).T, factor).T.to(covariance.dtype), damping
    if "input_inverse" in state:
        inverse = state["input_inverse"]
        return (grad.to(inverse.dtype) @ inverse).to(covariance.dtype), damping
    return damped_solve(grad, covariance, damping), damping


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


def foof_products(u: Tensor, v: Tensor, covariance: Tensor, damping: float) -> tuple[float, ...]:
    """``(⟨U, V⟩, ⟨U, U⟩, ⟨V, V⟩)`` of one layer in FOOF's inner product (float64).

    Args:
        u: ``(out, in_dim)``.
        v: ``(out, in_dim)``.
        covariance: ``Σ`` ``(in_dim, in_dim)``, symmetric.
        damping: ``λ``.
    """
    u, v, cov = u.double(), v.double(), covariance.double()
    return tuple(float(foof_inner_product(x, y, cov, damping)) for x, y in ((u, v), (u, u), (v, v)))


def network_cosine(
    products: dict[str, tuple[float, float, float]], scales: dict[str, float] | None = None
) -> float:
    r"""The network's cosine from per-layer products, the second update scaled per layer.

    With ``c_l`` = ``scales[l]`` (1 if ``None``) and ``V_l → c_l V_l``,

    .. math::

        \cos = \frac{Σ_l c_l ⟨U_l, V_l⟩}{\sqrt{Σ_l ⟨U_l, U_l⟩ \; Σ_l c_l^2 ⟨V_l, V_l⟩}}.

    Args:
        products: per layer name, ``(⟨U, V⟩, ⟨U, U⟩, ⟨V, V⟩)`` (:func:`foof_products`).
        scales: per layer name, ``c_l > 0``.

    Returns:
        The cosine; ``nan`` if either update is zero.
    """
    uv = uu = vv = 0.0
    for name, (p_uv, p_uu, p_vv) in products.items():
        c = 1.0 if scales is None else scales[name]
        uv, uu, vv = uv + c * p_uv, uu + p_uu, vv + c * c * p_vv
    denominator = math.sqrt(uu * vv)
    return uv / denominator if denominator > 0 else math.nan


def layer_cosine(products: tuple[float, float, float]) -> float:
    """One layer's cosine ``⟨U, V⟩ / sqrt(⟨U, U⟩ ⟨V, V⟩)`` (``nan`` for a zero update)."""
    uv, uu, vv = products
    return uv / math.sqrt(uu * vv) if uu > 0 and vv > 0 else math.nan


def foof_cosine(
    updates: dict[str, Tensor],
    directions: dict[str, Tensor],
    covariances: dict[str, Tensor],
    dampings: dict[str, float],
    scales: dict[str, float] | None = None,
) -> tuple[float, dict[str, float]]:
    """Cosine similarity of two network updates in FOOF's block-diagonal inner product.

    ``cos = ⟨U, cV⟩ / sqrt(⟨U, U⟩ ⟨cV, cV⟩)`` with ``⟨U, V⟩ = Σ_l tr(U_l (Σ_l + λ_l I) V_lᵀ)``
    and ``(cV)_l = c_l V_l`` (:func:`network_cosine`).

    Args:
        updates: per layer name, the first update ``U_l`` ``(out, in_dim)``.
        directions: per layer name, the second ``V_l``.
        covariances: per layer name, ``Σ_l``.
        dampings: per layer name, ``λ_l``.
        scales: per layer name, ``c_l`` (``None``: all 1).

    Returns:
        The network's cosine and the per-layer cosines (``nan`` for a zero update), which do not
        depend on ``scales``.
    """
    products = {
        name: foof_products(u, directions[name], covariances[name], dampings[name])
        for name, u in updates.items()
    }
    return network_cosine(products, scales), {n: layer_cosine(p) for n, p in products.items()}


class KfacTrajectoryInstrument(TrainCallback):
    """Base of the instruments: checks the optimizer, snapshots the layers before each step.

    Args:
        every: instrument every ``every``-th step (from step 0); the others run untouched.
    """

    name = ""
    version = 1
    """Bumped whenever what the instrument measures changes (see :func:`instrument_record`)."""

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
        if getattr(context.optimizer, "fused_backward", False):
            raise ValueError(
                f"instrument {self.name!r} needs the layers' gradients, which fused_backward=True "
                "does not keep"
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

    Per instrumented step it records, per layer, ``⟨U, D⟩``, ``⟨U, U⟩`` and ``⟨D, D⟩`` (FOOF's
    inner product, ``D = D_FOOF``) and D.9's scale ``c = λ_A/λ``; from them the network's
    cosine with D.9's rescaling (the paper's Fig. 3 measure), the network's cosine without it
    (``c = 1``, for comparison) and each layer's cosine (the same either way).

    ``summary()`` gives ``step``; the series ``network_d9``, ``network_unscaled`` and
    ``per_layer`` (per layer name); their means ``network_d9_mean``, ``network_unscaled_mean``
    and ``per_layer_mean``; ``network_d9_last``; and ``layer_mean`` and ``layer_min``, the mean
    and smallest of the per-layer means.
    """

    name = "kfac-foof-cosine"
    version = 2  # 1: network cosine without D.9's rescaling

    def __init__(self, every: int = 1) -> None:
        super().__init__(every)
        self.network_d9: list[float] = []
        self.network_unscaled: list[float] = []
        self.per_layer: dict[str, list[float]] = {}

    def measure(self, context, optimizer, before, updates) -> None:  # noqa: D102
        damping = optimizer.param_groups[0]["damping"]
        products, scales = {}, {}
        for name, module in optimizer.layers.items():
            direction, input_damping_ = foof_direction(optimizer, module)
            covariance = optimizer.state[module.weight]["input_covariance"]
            products[name] = foof_products(updates[name], direction, covariance, input_damping_)
            scales[name] = input_damping_ / damping if damping > 0 else 1.0
        self.steps.append(context.step)
        self.network_d9.append(network_cosine(products, scales))
        self.network_unscaled.append(network_cosine(products))
        for name, value in products.items():
            self.per_layer.setdefault(name, []).append(layer_cosine(value))

    def summary(self) -> dict[str, Any]:  # noqa: D102
        per_layer_mean = {name: _mean(v) for name, v in self.per_layer.items()}
        layer_means = [v for v in per_layer_mean.values() if v is not None]
        return {
            "every": self.every,
            "step": self.steps,
            "network_d9": [_finite(c) for c in self.network_d9],
            "network_unscaled": [_finite(c) for c in self.network_unscaled],
            "per_layer": {n: [_finite(c) for c in v] for n, v in self.per_layer.items()},
            "network_d9_mean": _mean(self.network_d9),
            "network_d9_last": _finite(self.network_d9[-1]) if self.network_d9 else None,
            "network_unscaled_mean": _mean(self.network_unscaled),
            "per_layer_mean": per_layer_mean,
            "layer_mean": _mean(layer_means),
            "layer_min": min(layer_means) if layer_means else None,
        }


class SecondFactorProgress(KfacTrajectoryInstrument):
    """Fig. 4C: relative loss decrease on the step's mini-batch, KFAC vs norm-matched FOOF.

    ``summary()`` gives ``step``, ``kfac`` and ``foof`` (relative decreases
    ``(L₀ − L₁)/L₀``), their means ``kfac_mean`` and ``foof_mean``, and ``foof_ge_kfac``, the
    fraction of steps on which FOOF's decrease is at least KFAC's.
    """

    name = "second-factor-progress"
    version = 2  # 1: FOOF's direction from the current Σ, not KFAC's inverse (inv_every > 1)

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


def instrument_record(names: tuple[str, ...] | list[str]) -> list[str]:
    """How a results file records its instruments: ``name``, or ``name@version`` if version > 1.

    ``foof reproduce`` compares this record with a results file's, so results made by an older
    definition of an instrument no longer count as done and are rerun.
    """
    versions = {name: INSTRUMENTS[name].version for name in names if name in INSTRUMENTS}
    return [f"{n}@{versions[n]}" if versions.get(n, 1) > 1 else n for n in names]


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
