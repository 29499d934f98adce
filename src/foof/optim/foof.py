"""FOOF: gradient descent on neurons (paper eq. 6, Algorithm 1)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from foof.capture import KFAC_APPROXIMATIONS
from foof.curvature.linalg import damped_cholesky, damped_inverse, right_multiply
from foof.optim.kronecker import KroneckerFactoredOptimizer, is_inversion_step, is_stats_step
from foof.validation import check_choice

__all__ = ["FOOF", "is_inversion_step", "is_stats_step"]


class FOOF(KroneckerFactoredOptimizer):
    r"""First-Order Optimizer on Functions: gradient descent on neurons (Benzing, 2022).

    Each layer's gradient is preconditioned by the damped inverse of its input covariance
    (paper eq. 6, Algorithm 1)::

        Σ_l ← ema_decay·Σ_l + (1 − ema_decay)·(1/R) Σ_r ā_r ā_rᵀ      (on statistics steps)
        P_l = (Σ_l + damping·I)⁻¹                                     (every inv_every steps)
        D_l = Ĝ_l · P_l
        buf ← momentum·buf + D_l;  W ← W − lr·weight_decay·W;  W ← W − lr·buf

    Conventions:
        * ``Ĝ_l`` is the layer's gradient ``[∇W, ∇b]`` as an ``(out, in_dim)`` matrix (a Conv2d
          weight is flattened to ``(C_out, C_in·kh·kw)``), so weight and bias are preconditioned
          jointly.
        * ``ā_r`` is an input row with a 1 appended when the layer has a bias. Rows are samples for
          Linear and (sample, output position) pairs for Conv2d (unfolded patches), and
          ``Σ_l`` is the *mean* over rows, so ``damping`` does not depend on the batch size.
        * The EMA is normalised by initialising it with the first batch: ``ema_decay=0`` means
          "this batch only".
        * On each step the statistics are updated first, then (every ``inv_every`` steps,
          starting at step 0, and on the first ``inv_warmup`` steps) inverted, then used.
          The paper starts from the statistics of 50 batches (App. K):
          :meth:`~foof.optim.kronecker.KroneckerFactoredOptimizer.warm_start` does that before
          the first step (``foof train`` by default); without it step 0 inverts its own
          batch's ``Σ`` alone, which with ``inv_every=T`` then serves ``T`` steps.
        * ``Σ_l`` is a mean over rows. Algorithm 1 writes the paper's as ``A Aᵀ``, a sum over
          the batch; if taken literally, the paper's ``(lr, damping)`` are foof's
          ``(lr/B, damping/B)`` (docs/reproduction/README.md weighs the two readings).
          ``stats_steps=S`` updates ``Σ`` only on the ``S`` steps ending with each inversion
          (Algorithm 1, line 10); on other steps the inputs are not even recorded.
        * ``P_l`` comes from a Cholesky factorisation (eigendecomposition fallback with a
          warning if it fails). Factors are kept on the parameters' device in float32 (float64
          for a float64 model), also when the forward pass runs under bf16/fp16 autocast.
        * Statistics are recorded only by forward passes in training mode with autograd on; an
          evaluation pass under ``model.eval()`` or ``torch.no_grad()`` touches nothing.
        * Parameters of unsupported layers (anything but Linear and ungrouped Conv2d) go to
          the ``fallback`` optimizer (AdamW by default, its own options); a warning names them.
        * Statistics belong to the training forward passes since the last ``step()``:
          ``zero_grad()`` before the forward pass or between forward and backward, ``k``
          micro-batches accumulated before one step, and closures all give the same update.

    Args:
        model: the network. FOOF hooks into its layers, so it takes the model, not parameters.
        lr: learning rate ``η >= 0``.
        damping: ``λ >= 0`` added to ``Σ_l`` before inversion.
        ema_decay: ``m ∈ [0, 1)``, decay of the moving average of ``Σ_l``.
        inv_every: ``T >= 1``, inversion period. With ``T = 1`` (not sharded) each layer keeps
            the Cholesky factor of ``Σ_l + λI`` and solves instead of forming ``P_l``.
        stats_steps: ``S ∈ [1, T]`` statistics steps before each inversion, ``None`` for all.
        inv_warmup: invert (and take statistics) on each of the first ``inv_warmup`` steps,
            then every ``T`` steps: early inverses go stale within a few steps (see
            :func:`~foof.optim.kronecker.is_inversion_step`). Not in the paper; default 0.
        momentum: heavy-ball momentum in ``[0, 1)`` as in ``torch.optim.SGD``.
        weight_decay: decoupled weight decay ``>= 0``.
        low_rank: compute the product through ``Ĝ = EᵀA`` when that needs fewer flops (exact;
            see :meth:`~foof.optim.kronecker.KroneckerFactoredOptimizer.low_rank_factors`).
            Where the shapes never make it cheaper (convolutions), ``A`` and ``E`` are then
            recorded only on statistics steps.
        inverse_sharding: under ``torch.distributed``, ``"replicated"`` (default) inverts every
            layer on every rank; ``"sharded"`` inverts layer ``i`` on rank ``i mod world_size``
            and broadcasts ``P_l``. Without a process group both invert locally. Statistics are
            always reduced over ranks (see
            :class:`~foof.optim.kronecker.KroneckerFactoredOptimizer`).
        fused_backward: skip autograd's weight-gradient GEMM of the preconditioned layers and
            compute the direction from the recorded ``E`` and ``A`` (``Eᵀ(A P)``); the
            same update up to rounding, one ``out·batch·in`` GEMM per layer cheaper. The skipped
            layers' ``weight.grad`` stays ``None`` (see
            :class:`~foof.optim.base.CurvatureOptimizer`); not under ``torch.distributed``.
        nonfinite: ``"skip"`` (default): a step whose loss, gradients or statistics hold a
            NaN/Inf changes nothing (parameters, momentum, statistics, step counter) and warns
            once per cause; ``"raise"``: raise :class:`foof.optim.base.NonFiniteError`.
        param_groups: groups of the model's parameters with their own options, as in
            ``torch.optim`` (``[{"params": model.head.parameters(), "lr": 0.1}]``); the rest
            form group 0 (see :class:`~foof.optim.base.CurvatureOptimizer`). The schedule
            options are optimizer-wide and cannot differ per group.
        fallback: optimizer of the parameters outside every Linear/Conv2d (norms,
            embeddings): a ``torch.optim.Optimizer`` class, ``"adamw"``, ``"adam"``, ``"sgd"``,
            or ``None`` for plain SGD(+momentum) with their group's lr (the paper's rule,
            catastrophic at a FOOF lr like 30 on a LayerNorm). Default AdamW, as Muon-style
            optimizers route non-matrix parameters.
        fallback_options: keyword arguments of the fallback (its own ``lr``, ``betas``,
            ``weight_decay``; default the fallback's defaults, e.g. AdamW's lr 1e-3).
        kfac_approx: weight sharing (a Linear on ``(B, T, d)``, a convolution's positions):
            ``"expand"`` (default) takes ``Σ_l`` over every position's row; ``"reduce"`` over
            one row per sample, the mean of its positions' ``ā``,
            ``Σ_l = (1/B) Σ_n ā_n ā_nᵀ`` (Eschenhagen et al., NeurIPS 2023; see
            :func:`foof.capture.input_rows`). The gradient ``Ĝ_l`` is the same either way.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(784, 100, bias=False), nn.ReLU(),
        ...                       nn.Linear(100, 10, bias=False))
        >>> opt = FOOF(model, lr=0.1, damping=1.0)
        >>> x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
        >>> opt.zero_grad()
        >>> nn.functional.cross_entropy(model(x), y).backward()
        >>> opt.step()

    Reference:
        F. Benzing. Gradient Descent on Neurons and its Link to Approximate Second-Order
        Optimization. ICML 2022. Eq. 6 and Algorithm 1.
    """

    factor_keys = ("input_covariance", "inverse", "cholesky")

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        damping: float,
        ema_decay: float = 0.95,
        inv_every: int = 1,
        stats_steps: int | None = None,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nonfinite: str = "skip",
        low_rank: bool = True,
        inverse_sharding: str = "replicated",
        fused_backward: bool = False,
        inv_warmup: int = 0,
        param_groups: Iterable[dict[str, Any]] | None = None,
        fallback: type[torch.optim.Optimizer] | str | None = torch.optim.AdamW,
        fallback_options: dict[str, Any] | None = None,
        kfac_approx: str = "expand",
    ) -> None:
        check_choice("kfac_approx", kfac_approx, KFAC_APPROXIMATIONS)
        super().__init__(
            model,
            lr,
            damping,
            ema_decay,
            inv_every,
            stats_steps,
            momentum,
            weight_decay,
            low_rank,
            inverse_sharding,
            fused_backward,
            inv_warmup,
            param_groups,
            fallback,
            fallback_options,
            nonfinite=nonfinite,
            kfac_approx=kfac_approx,
        )

    def solves(self, group: dict[str, Any]) -> bool:
        """Whether each inverse is used for one step only (``inv_every=1``, not sharded).

        Then the layer keeps the Cholesky factor ``L`` of ``Σ_l + λI`` and the product is two
        triangular solves (``2·in²·k`` flops for ``k`` right-hand sides) instead of forming
        ``P_l`` (about ``in³`` flops more), the same update up to rounding.
        """
        schedule = self.schedule
        return schedule["inv_every"] == 1 and schedule["inverse_sharding"] == "replicated"

    def invert(self, name: str, state: dict[str, Any], group: dict[str, Any]) -> None:
        """``P_l = (Σ_l + λI)⁻¹``, or its Cholesky factor if used once (see :meth:`solves`)."""
        if self.solves(group):
            cholesky = damped_cholesky(state["input_covariance"], group["damping"])
            if cholesky is not None:
                state["cholesky"] = cholesky
                state.pop("inverse", None)
                return
        state.pop("cholesky", None)
        state["inverse"] = damped_inverse(state["input_covariance"], group["damping"])

    def has_inverse(self, state: dict[str, Any], group: dict[str, Any]) -> bool:
        """Whether ``state`` holds ``P_l`` or its Cholesky factor."""
        return "inverse" in state or "cholesky" in state

    def inverse_shapes(self, state: dict[str, Any], group: dict[str, Any]) -> dict[str, tuple]:
        """``P_l`` has the shape of ``Σ_l``."""
        return {"inverse": tuple(state["input_covariance"].shape)}

    def precondition(self, module: nn.Module, grad: Tensor, group: dict[str, Any]) -> Tensor:
        """``D = Ĝ · P`` (paper eq. 6): ``(out, in_dim) @ (in_dim, in_dim)``, or ``Eᵀ(A P)``."""
        factors = self.low_rank_factors(module, grad, two_sided=False)
        if factors is not None:
            return self.precondition_rows(module, *factors, group).to(grad.dtype)
        state = self.state[module.weight]
        cholesky = state.get("cholesky")
        if cholesky is not None:  # P Xᵀ = solve(Σ + λI, Xᵀ); P is symmetric, so (P Xᵀ)ᵀ = X P
            return torch.cholesky_solve(grad.to(cholesky.dtype).T, cholesky).T.to(grad.dtype)
        inverse = state["inverse"]  # (in_dim,) for an embedding's diagonal Σ
        return right_multiply(grad.to(inverse.dtype), inverse).to(grad.dtype)

    def precondition_rows(
        self, module: nn.Module, output_grads: Tensor, rows: Tensor, group: dict[str, Any]
    ) -> Tensor:
        """``D = Eᵀ(A P)`` (paper eq. 6 with ``Ĝ = EᵀA``): ``R·in² + out·R·in`` flops."""
        state = self.state[module.weight]
        cholesky = state.get("cholesky")
        if cholesky is not None:
            return output_grads.T @ torch.cholesky_solve(rows.T, cholesky).T
        return output_grads.T @ (rows @ state["inverse"])
