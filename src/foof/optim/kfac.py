"""KFAC with heuristic or standard damping and an MC, full or empirical Fisher."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from foof.capture import KFAC_APPROXIMATIONS
from foof.curvature.kronecker import (
    eigendecomposition,
    heuristic_inverses,
    pi_factor,
    standard_damped_solve,
)
from foof.curvature.linalg import damped_cholesky, damped_inverse, right_multiply
from foof.curvature.sampling import FISHER_TYPES, LIKELIHOODS, FisherSampler
from foof.optim.kronecker import KroneckerFactoredOptimizer
from foof.validation import check_choice

DAMPING_MODES = ("heuristic", "standard")


class KFAC(KroneckerFactoredOptimizer):
    r"""Kronecker-Factored Approximate Curvature (Martens & Grosse, 2015), as in the paper.

    Per layer, with ``Ĝ`` the gradient matrix ``[∇W, ∇b]`` ``(out, in_dim)``::

        Ā = EMA of (1/R) Σ_r ā_r ā_rᵀ              (in_dim, in_dim), as FOOF's Σ
        Ḡ = EMA of (1/B) Σ_k Σ_r e_{k,r} e_{k,r}ᵀ   (out, out), e at the Fisher's labels
        heuristic (eq. 2):  D = (Ḡ + √λ/π I)⁻¹ Ĝ (Ā + π√λ I)⁻¹,  π = sqrt((tr Ā/dim Ā)/(tr Ḡ/dim Ḡ))
        standard  (eq. 3):  D = mat((Ā ⊗ Ḡ + λI)⁻¹ vec Ĝ)   (via eigendecompositions)
        second_factor=False: D = Ĝ (Ā + π√λ I)⁻¹   (FOOF with KFAC's λ_A, App. D.9)

    then momentum, decoupled weight decay and ``W ← W − lr·D`` as in :class:`foof.FOOF`.

    Conventions:
        * The loss is the mean over the batch of ``−log p(y_i|x_i)``; ``likelihood`` says which
          (``"categorical"``: softmax cross-entropy on logits; ``"bernoulli"``: independent
          sigmoid logits, binary or multi-label, ``binary_cross_entropy_with_logits``;
          ``"gaussian"``: unit-variance Gaussian, i.e. ``½‖y − f‖²`` per sample, the
          mean-squared-error case). The first step checks, once, that the loss handed to
          :meth:`backward` has that curvature and scale and warns with the factor found
          (:class:`~foof.curvature.sampling.LossScaleWarning`); the README has a table of the
          torch losses that match. Outputs ``(B, ..., C)`` (language-model logits
          ``(B, T, V)``) have ``P = T`` rows per sample; the loss is then the mean over all
          ``B·P`` rows (the per-token mean) and the Fisher the mean per-row Fisher, see
          :mod:`foof.curvature.sampling`.
        * ``fisher="mc"``: ``e_i`` at one label sampled from the model per input; ``"full"``: all
          labels weighted by ``p(y|x_i)`` (``Ḡ = (1/B) Σ_i Σ_y p(y|x_i) e_i(y) e_i(y)ᵀ``; ``P·C``
          backward passes); ``"empirical"``: the dataset label. ``e_i`` is the gradient of one
          sample's ``−log p`` w.r.t. the layer output (not divided by ``B``).
        * Gradient accumulation: the ``opt.backward`` calls of several micro-batches before one
          ``step`` give the factors of all of them together, the big batch's exactly for
          ``fisher="full"`` and ``"empirical"``.
        * Conv2d: rows are (sample, position) pairs; ``Ā`` is the mean over rows and ``Ḡ`` the
          mean over samples of the sum over positions, so ``Ā ⊗ Ḡ`` equals KFC's ``Ω ⊗ Γ``
          (Grosse & Martens, 2016).
        * EMAs are normalised (initialised with the first batch); ``ema_decay=0`` is the
          paper's *subsampled KFAC* (App. D.1). Statistics and, for mc/full, the extra backward
          pass happen only on the ``stats_steps`` steps before each inversion; inverses are
          recomputed every ``inv_every`` steps.

    The training step must call ``opt.backward(loss, output)`` instead of ``loss.backward()``:
    it runs the Fisher's own backward pass (sampled labels) on statistics steps without touching
    the parameter gradients, then ``loss.backward()``.

    Args:
        model: the network.
        lr: learning rate.
        damping: ``λ >= 0`` (``> 0`` for standard damping).
        damping_mode: ``"heuristic"`` or ``"standard"``.
        fisher: ``"mc"``, ``"full"`` or ``"empirical"``.
        ema_decay: decay of the factor EMAs in ``[0, 1)``.
        inv_every: inversion period ``>= 1``. With ``1`` (heuristic damping, not sharded) the
            layer keeps the Cholesky factors of the damped factors and solves with them instead
            of forming inverses (see :meth:`solves`).
        stats_steps: statistics steps before each inversion, ``None`` for every step.
        inv_warmup: invert (and take statistics) on each of the first ``inv_warmup`` steps,
            then every ``inv_every`` steps (see
            :func:`~foof.optim.kronecker.is_inversion_step`). Not in the paper; default 0.
        momentum: heavy-ball momentum in ``[0, 1)``.
        weight_decay: decoupled weight decay.
        likelihood: ``"categorical"``, ``"bernoulli"`` or ``"gaussian"``.
        second_factor: if False, drop ``Ḡ`` from the update (``π`` still uses it).
        seed: seed of the generator for MC labels; ``None`` draws it from torch's global RNG.
        low_rank: compute the product through ``Ĝ = EᵀA`` when that needs fewer flops (exact;
            see :meth:`~foof.optim.kronecker.KroneckerFactoredOptimizer.low_rank_factors`).
        inverse_sharding: under ``torch.distributed``, ``"replicated"`` (default) inverts (or
            eigendecomposes) every layer's factors on every rank; ``"sharded"`` does layer ``i``
            on rank ``i mod world_size`` and broadcasts the results. Without a process group
            both work locally. ``Ā`` and ``Ḡ`` are always reduced over ranks (see
            :class:`~foof.optim.kronecker.KroneckerFactoredOptimizer`); with ``fisher="mc"``
            the labels are drawn for the gathered global batch, so ranks sample exactly what
            one process would (see :class:`~foof.curvature.sampling.FisherSampler`).
        fused_backward: skip autograd's weight-gradient GEMM of the preconditioned layers and
            compute the direction from the recorded ``E`` and ``A`` (``(E Ḡ⁻¹)ᵀ(A Ā⁻¹)``); the
            same update up to rounding, one ``out·batch·in`` GEMM per layer cheaper. The
            skipped layers' ``weight.grad`` stays ``None`` (see
            :class:`~foof.optim.base.CurvatureOptimizer`); not under ``torch.distributed``.
        nonfinite: ``"skip"`` (default): a step whose loss, gradients or statistics hold a
            NaN/Inf changes nothing (parameters, momentum, statistics, step counter) and warns
            once per cause; ``"raise"``: raise :class:`foof.optim.base.NonFiniteError`.
        param_groups, fallback, fallback_options: parameter groups with their own options,
            and the optimizer of the parameters outside every layer (default AdamW, ``None``
            for plain SGD), as in :class:`~foof.optim.foof.FOOF`.
        kfac_approx: weight sharing (Eschenhagen et al., NeurIPS 2023): ``"expand"`` (default,
            every position a row, as above); ``"reduce"``: per sample ``n`` with ``P``
            positions, ``Ā = (1/B) Σ_n ā_n ā_nᵀ`` with ``ā_n = (1/P) Σ_p ā_{n,p}`` and
            ``Ḡ = (1/(B·P)) Σ_k Σ_n ê_n ê_nᵀ`` with ``ê_n = Σ_p e_{n,p}``, so ``Ā ⊗ Ḡ`` keeps
            the Fisher's per-row normalisation. Exact (for the layer's Fisher block) when a
            sample's inputs are the same at all its positions.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5))
        >>> opt = KFAC(model, lr=0.1, damping=1e-2)
        >>> x, y = torch.randn(16, 20), torch.randint(0, 5, (16,))
        >>> opt.zero_grad()
        >>> logits = model(x)
        >>> loss = nn.functional.cross_entropy(logits, y)
        >>> opt.backward(loss, logits)
        >>> opt.step()

    References:
        Martens & Grosse, ICML 2015; Grosse & Martens, ICML 2016; George et al., NeurIPS 2018;
        Benzing, ICML 2022, eqs. 2-3 and App. D.
    """

    uses_gradient_factor = True

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        damping: float,
        damping_mode: str = "heuristic",
        fisher: str = "mc",
        ema_decay: float = 0.95,
        inv_every: int = 1,
        stats_steps: int | None = None,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        likelihood: str = "categorical",
        second_factor: bool = True,
        seed: int | None = None,
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
        check_choice("damping_mode", damping_mode, DAMPING_MODES)
        check_choice("kfac_approx", kfac_approx, KFAC_APPROXIMATIONS)
        check_choice("fisher", fisher, FISHER_TYPES)
        check_choice("likelihood", likelihood, LIKELIHOODS)
        if damping_mode == "standard" and not damping > 0:
            raise ValueError(f"damping must be > 0 for standard damping, got {damping!r}")
        if damping_mode == "standard" and not second_factor:
            raise ValueError("second_factor=False is defined for heuristic damping only")
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
            damping_mode=damping_mode,
            fisher=fisher,
            likelihood=likelihood,
            second_factor=second_factor,
            nonfinite=nonfinite,
            kfac_approx=kfac_approx,
        )
        self.sampler = FisherSampler(
            fisher, likelihood, seed, owner=type(self).__name__, kfac_approx=kfac_approx
        )

    factor_keys = (
        "input_covariance",
        "gradient_covariance",
        "input_inverse",
        "gradient_inverse",
        "input_cholesky",
        "gradient_cholesky",
        "input_eigenvalues",
        "input_eigenvectors",
        "gradient_eigenvalues",
        "gradient_eigenvectors",
    )

    global_options = (*KroneckerFactoredOptimizer.global_options, "fisher", "likelihood")

    def has_inverse(self, state: dict[str, Any], group: dict[str, Any]) -> bool:
        """Whether ``state`` holds what the layer group's damping mode needs."""
        if group["damping_mode"] == "standard":
            keys: tuple[str, ...] = ("input_eigenvectors", "gradient_eigenvectors")
        else:
            kind = "cholesky" if self.solves(group) else "inverse"
            sides = ("input", "gradient") if group["second_factor"] else ("input",)
            keys = tuple(f"{side}_{kind}" for side in sides)
        return all(k in state for k in keys)

    def _check_group_values(self, values: dict[str, Any], where: str) -> None:
        """Also the damping mode and its constraints, per group."""
        super()._check_group_values(values, where)
        base = getattr(self, "defaults", {})  # unset while the defaults themselves are checked
        mode = values.get("damping_mode", base.get("damping_mode"))
        if "damping_mode" in values:
            check_choice("damping_mode", values["damping_mode"], DAMPING_MODES)
        damping = values.get("damping", base.get("damping", 1.0))
        if mode == "standard" and not damping > 0:
            raise ValueError(f"{where}: damping must be > 0 for standard damping, got {damping!r}")
        second = values.get("second_factor", True)
        if mode == "standard" and not second:
            raise ValueError(f"{where}: second_factor=False is defined for heuristic damping only")

    def solves(self, group: dict[str, Any]) -> bool:
        """Whether heuristic damping's inverses are used for one step only.

        With ``inv_every=1`` (not sharded) each layer keeps the Cholesky factors of the damped
        ``Ā`` and ``Ḡ`` and the product is triangular solves: factorising costs ``n³/3``
        flops, forming the inverse from the factor another ``2n³/3`` that the solves with
        ``batch`` right-hand sides (``2n²·batch``) do not need. The same update up to rounding.
        """
        schedule = self.schedule
        return (
            group["damping_mode"] == "heuristic"
            and schedule["inv_every"] == 1
            and schedule["inverse_sharding"] == "replicated"
        )

    # -- capture: what a statistics step needs --------------------------------------------------
    def wants_outputs(self) -> bool:
        """Keep layer outputs for the Fisher backward (mc/full) on statistics steps."""
        return self.schedule["fisher"] != "empirical" and self.is_stats_step()

    def wants_output_grads(self) -> bool:
        """The loss's output gradients: empirical Fisher (stats steps) and low-rank products."""
        empirical = self.schedule["fisher"] == "empirical" and self.is_stats_step()
        return empirical or super().wants_output_grads()

    def backward(self, loss: Tensor, output: Tensor | None = None) -> None:
        """The Fisher's backward pass on statistics steps (mc/full), then ``loss.backward()``.

        Args:
            loss: the training loss (mean over the batch).
            output: the network output the loss was computed from: ``(B, C)``, ``(B,)`` or
                ``(B, ..., C)`` (see :mod:`foof.curvature.sampling`).
        """
        self.sampler.backward(self.capture, loss, output, active=self.is_stats_step())

    def gradient_rows(self) -> tuple[dict[nn.Module, Tensor], int]:
        """The per-layer Fisher output gradients of this step's :meth:`backward`."""
        return self.sampler.pop() or ({}, 0)

    # -- curvature ---------------------------------------------------------------------------
    def invert(self, name: str, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Damped inverses (heuristic) or eigendecompositions (standard) of both factors."""
        input_cov, gradient_cov = state["input_covariance"], state["gradient_covariance"]
        if group["damping_mode"] == "standard":
            a, q_a = eigendecomposition(input_cov)
            g, q_g = eigendecomposition(gradient_cov)
            state.update(
                input_eigenvalues=a,
                input_eigenvectors=q_a,
                gradient_eigenvalues=g,
                gradient_eigenvectors=q_g,
            )
            return
        for key in ("input_inverse", "gradient_inverse", "input_cholesky", "gradient_cholesky"):
            state.pop(key, None)
        pi = pi_factor(input_cov, gradient_cov)
        root = group["damping"] ** 0.5
        if self.solves(group):
            input_cholesky = damped_cholesky(input_cov, pi * root)
            gradient_cholesky = (
                damped_cholesky(gradient_cov, root / pi) if group["second_factor"] else None
            )
            if input_cholesky is not None and (
                gradient_cholesky is not None or not group["second_factor"]
            ):
                state["input_cholesky"] = input_cholesky
                if gradient_cholesky is not None:
                    state["gradient_cholesky"] = gradient_cholesky
                return
        if group["second_factor"]:
            state["input_inverse"], state["gradient_inverse"] = heuristic_inverses(
                input_cov, gradient_cov, group["damping"]
            )
        else:
            state["input_inverse"] = damped_inverse(input_cov, pi * root)

    def inverse_shapes(self, state: dict[str, Any], group: dict[str, Any]) -> dict[str, tuple]:
        """What :meth:`invert` writes for the current damping mode, by state key."""
        a = tuple(state["input_covariance"].shape)
        g = tuple(state["gradient_covariance"].shape)
        if group["damping_mode"] == "standard":
            return {
                "input_eigenvalues": a[:1],
                "input_eigenvectors": a,
                "gradient_eigenvalues": g[:1],
                "gradient_eigenvectors": g,
            }
        if group["second_factor"]:
            return {"input_inverse": a, "gradient_inverse": g}
        return {"input_inverse": a}

    def two_sided(self, group: dict[str, Any]) -> bool:
        """Whether ``Ḡ⁻¹`` multiplies from the left (``second_factor``)."""
        return bool(group["second_factor"])

    def precondition_rows(
        self, module: nn.Module, output_grads: Tensor, rows: Tensor, group: dict[str, Any]
    ) -> Tensor | None:
        """Heuristic damping on ``Ĝ = EᵀA``: ``(E Ḡ⁻¹)ᵀ (A Ā⁻¹)`` (Ḡ⁻¹ is symmetric).

        None for standard damping, whose eigenbasis product needs ``Ĝ`` itself.
        """
        if group["damping_mode"] == "standard":
            return None
        state = self.state[module.weight]
        if "input_cholesky" in state:  # X Ā⁻¹ = (Ā⁻¹ Xᵀ)ᵀ as Ā⁻¹ is symmetric; so for Ḡ
            right = torch.cholesky_solve(rows.T, state["input_cholesky"]).T
            left = output_grads
            if group["second_factor"]:
                left = torch.cholesky_solve(output_grads.T, state["gradient_cholesky"]).T
            return left.T @ right
        left = output_grads @ state["gradient_inverse"] if group["second_factor"] else output_grads
        return left.T @ (rows @ state["input_inverse"])

    def precondition(self, module: nn.Module, grad: Tensor, group: dict[str, Any]) -> Tensor:
        """Heuristic: ``(Ḡ+√λ/π I)⁻¹ Ĝ (Ā+π√λ I)⁻¹``; standard: ``mat((Ā⊗Ḡ+λI)⁻¹ vec Ĝ)``."""
        state = self.state[module.weight]
        dtype = state["input_covariance"].dtype
        g = grad.to(dtype)
        if group["damping_mode"] == "standard":
            direction = standard_damped_solve(
                g,
                (state["input_eigenvalues"], state["input_eigenvectors"]),
                (state["gradient_eigenvalues"], state["gradient_eigenvectors"]),
                group["damping"],
            )
        else:
            two_sided = group["second_factor"]
            factors = self.low_rank_factors(module, grad, two_sided=two_sided)
            if factors is not None:
                direction = self.precondition_rows(module, *factors, group)
            elif "input_cholesky" in state:
                if two_sided:
                    g = torch.cholesky_solve(g, state["gradient_cholesky"])
                direction = torch.cholesky_solve(g.T, state["input_cholesky"]).T
            elif two_sided:  # input_inverse is (in_dim,) for an embedding's diagonal Ā
                direction = right_multiply(state["gradient_inverse"] @ g, state["input_inverse"])
            else:
                direction = right_multiply(g, state["input_inverse"])
        return direction.to(grad.dtype)
