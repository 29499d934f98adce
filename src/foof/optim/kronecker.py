"""The amortised Kronecker-factored family: FOOF (input factor only) and KFAC (both factors).

Both keep an EMA of the input covariance ``Ā = Σ`` per layer, update it on the ``stats_steps``
steps before each inversion (Algorithm 1), and recompute their damped inverses every
``inv_every`` steps. The subclasses only say how to invert and how to precondition.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from foof.curvature.kronecker import gradient_covariance
from foof.curvature.linalg import second_moment, update_ema_
from foof.optim.base import CurvatureOptimizer
from foof.validation import check_int, check_range


def is_stats_step(step: int, inv_every: int, stats_steps: int | None) -> bool:
    """Whether step ``step`` updates the statistics (Algorithm 1, line 10).

    With ``stats_steps=S`` the statistics are updated on the ``S`` steps that end with (and
    include) each inversion step ``t ≡ 0 (mod inv_every)``; ``None`` means every step.
    """
    if stats_steps is None or stats_steps >= inv_every:
        return True
    phase = step % inv_every
    return phase == 0 or phase > inv_every - stats_steps


def factor_dtype(param: Tensor) -> torch.dtype:
    """Factors are float32, or float64 for a float64 model, whatever autocast does."""
    return torch.promote_types(param.dtype, torch.float32)


class KroneckerFactoredOptimizer(CurvatureOptimizer):
    """Base of FOOF and KFAC: EMA statistics, the amortisation schedule, the inversion cadence.

    Subclasses implement :meth:`invert` (fill the layer state with whatever
    :meth:`~foof.optim.base.CurvatureOptimizer.precondition` needs) and may set
    ``uses_gradient_factor`` and provide :meth:`gradient_rows`.
    """

    uses_gradient_factor = False

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        damping: float,
        ema_decay: float,
        inv_every: int,
        stats_steps: int | None,
        momentum: float,
        weight_decay: float,
        low_rank: bool = True,
        **extra: Any,
    ) -> None:
        check_range("damping", damping, 0.0)
        check_range("ema_decay", ema_decay, 0.0, 1.0, high_open=True)
        check_int("inv_every", inv_every, 1)
        check_int("stats_steps", stats_steps, 1, allow_none=True)
        if stats_steps is not None and stats_steps > inv_every:
            raise ValueError(f"stats_steps must be <= inv_every ({inv_every}), got {stats_steps}")
        defaults: dict[str, Any] = dict(
            lr=lr,
            damping=damping,
            ema_decay=ema_decay,
            inv_every=inv_every,
            stats_steps=stats_steps,
            momentum=momentum,
            weight_decay=weight_decay,
            **extra,
        )
        super().__init__(model, defaults)
        self.low_rank = bool(low_rank)
        self._step_rows: dict[nn.Module, Tensor | None] = {}
        self._probes: dict[nn.Module, Tensor] = {}

    def is_stats_step(self) -> bool:
        """Whether the coming (current) step updates the statistics."""
        group = self.param_groups[0]
        return is_stats_step(group["step"], group["inv_every"], group["stats_steps"])

    def wants_inputs(self) -> bool:
        """Inputs on statistics steps, and on every step for the low-rank product."""
        return self.low_rank or self.is_stats_step()

    def wants_output_grads(self) -> bool:
        """Output gradients of the loss for the low-rank product ``Ĝ = EᵀA``."""
        return self.low_rank

    def low_rank_factors(self, module: nn.Module, grad: Tensor, two_sided: bool) -> tuple | None:
        """``(E, A)`` with ``Ĝ = EᵀA`` when that form of the product is cheaper and exact.

        A Linear layer's gradient has rank ≤ rows: ``Ĝ = EᵀA`` with ``E`` ``(R, out)`` the
        recorded output gradients and ``A`` ``(R, in_dim)`` the input rows, so a product such as
        ``Ĝ P`` costs ``R·in² + out·R·in`` as ``Eᵀ(A P)`` instead of ``out·in²``. It is used only
        when it needs fewer flops (decided from the shapes) and when ``Ĝ`` really is ``EᵀA``:
        a gradient changed after backward (clipping, an L2 term added outside the layer output)
        is detected by comparing ``Ĝ r`` with ``Eᵀ(A r)`` for a fixed random ``r``, and then the
        dense product is used.

        Args:
            module: the layer.
            grad: its gradient matrix ``(out, in_dim)``.
            two_sided: whether the product also multiplies from the left (KFAC's ``Ḡ⁻¹``).

        Returns:
            ``(E, A)`` in ``grad``'s factor dtype, or None for the dense product.
        """
        if not self.low_rank:
            return None
        output_grads = self.capture.output_grads(module)
        rows = self._step_rows.get(module)
        if output_grads is None or rows is None or rows.shape[0] != output_grads.shape[0]:
            return None
        count, in_dim = rows.shape
        out = output_grads.shape[1]
        low_rank_cost = count * (in_dim * in_dim + out * in_dim + (out * out if two_sided else 0))
        dense_cost = out * in_dim * (in_dim + (out if two_sided else 0))
        if low_rank_cost >= dense_cost:
            return None
        dtype = factor_dtype(module.weight)
        output_grads, rows = output_grads.to(dtype), rows.to(dtype)
        probe = self._probes.get(module)
        if probe is None or probe.shape[0] != in_dim:
            generator = torch.Generator(device="cpu").manual_seed(in_dim * 7919 + out)
            probe = torch.randn(in_dim, generator=generator, dtype=dtype).to(rows.device)
            self._probes[module] = probe
        direct = grad.to(dtype) @ probe
        factored = output_grads.T @ (rows @ probe)
        tolerance = 1e-4 if dtype == torch.float32 else 1e-10
        if not torch.allclose(
            direct, factored, rtol=tolerance, atol=tolerance * float(direct.abs().max())
        ):
            return None
        return output_grads, rows

    def gradient_rows(self) -> tuple[dict[nn.Module, Tensor], int]:
        """Per-layer ``(K, rows, out)`` output gradients for ``Ḡ`` and the batch size ``B``."""
        raise NotImplementedError

    def invert(self, name: str, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Recompute the layer's damped inverse(s) from its factors in ``state``."""
        raise NotImplementedError

    def update_curvature(self, group: dict[str, Any]) -> None:
        """EMA of the factors on statistics steps, then the inverses on inversion steps."""
        invert = group["step"] % group["inv_every"] == 0
        decay = group["ema_decay"]
        stats_step = self.is_stats_step()
        gradients: dict[nn.Module, Tensor] = {}
        batch_size = 0
        if self.uses_gradient_factor and stats_step:
            gradients, batch_size = self.gradient_rows()
        self._step_rows = {}
        for name, module, state in self.layer_items():
            if module.weight.grad is None:
                continue
            dtype = factor_dtype(module.weight)
            rows = self.capture.inputs(module)
            self._step_rows[module] = rows
            if rows is not None and stats_step:
                state["input_covariance"] = update_ema_(
                    state.get("input_covariance"), second_moment(rows, dtype), decay
                )
            if module in gradients:
                state["gradient_covariance"] = update_ema_(
                    state.get("gradient_covariance"),
                    gradient_covariance(gradients[module], batch_size, dtype),
                    decay,
                )
            if invert or not self.has_inverse(state):
                missing = [k for k in self.factor_names() if k not in state]
                if missing:
                    raise RuntimeError(
                        f"{type(self).__name__}: no statistics ({', '.join(missing)}) for layer "
                        f"{name!r}. Run the training step's forward pass with the model in "
                        "train() mode and autograd enabled"
                        + (
                            ", and call opt.backward(loss, output)"
                            if self.uses_gradient_factor
                            else ""
                        )
                        + "."
                    )
                self.invert(name, state, group)

    def factor_names(self) -> tuple[str, ...]:
        """State keys of the factors this method needs before it can invert."""
        if self.uses_gradient_factor:
            return ("input_covariance", "gradient_covariance")
        return ("input_covariance",)

    def has_inverse(self, state: dict[str, Any]) -> bool:
        """Whether ``state`` already holds an inverse (e.g. restored from a checkpoint)."""
        return all(k in state for k in self.inverse_keys)

    inverse_keys: tuple[str, ...] = ()
