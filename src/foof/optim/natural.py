"""Exact natural gradients for the subsampled Fisher, through the Woodbury identity (App. I)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from foof import distributed
from foof.curvature.sampling import FISHER_TYPES, LIKELIHOODS, FisherSampler
from foof.curvature.woodbury import (
    FactoredGradient,
    LayerFisherData,
    damped_inverse_mv,
    factored_projection_is_cheaper,
)
from foof.optim.base import CurvatureOptimizer, gradient_matrix
from foof.optim.kronecker import factor_dtype
from foof.validation import check_choice, check_int, check_range

FISHER_BATCHES = ("same", "previous")


class NaturalGradient(CurvatureOptimizer):
    r"""Exact damped natural gradient ``(λI + F)⁻¹ ∇L`` for the subsampled Fisher.

    ``F = (1/B) Σ_i E_{y~p(·|x_i)}[g_i(y) g_i(y)ᵀ]`` is the Fisher of one mini-batch (see
    :class:`foof.KFAC` for the ``fisher`` and ``likelihood`` conventions). Writing ``F = G Gᵀ``
    with ``M = K·B`` columns (``K = 1`` for mc/empirical, the number of classes for full), the
    Woodbury identity gives (paper App. I, eqs. 20-23)::

        (λI + G Gᵀ)⁻¹ ∇L = (∇L − G (λI + GᵀG)⁻¹ Gᵀ ∇L) / λ

    where ``Gᵀ∇L``, ``G w`` and the ``M×M`` Gram matrix ``GᵀG = Σ_l (A_l A_lᵀ) ∘ (E_l E_lᵀ)`` are
    computed from the captured per-layer inputs ``A`` and output gradients ``E``: no per-sample
    gradient of a Linear layer and no parameters² matrix is ever formed, and no second forward
    pass is needed. ``block_diagonal=True`` applies the same per layer (paper Fig. 2B/2C).

    Then momentum, decoupled weight decay and ``θ ← θ − lr·D`` as in :class:`foof.FOOF`.
    Parameters of unsupported layers (BatchNorm, ...) are outside ``F`` and go to the
    ``fallback`` optimizer (AdamW by default; ``None``: plain SGD), as in FOOF and KFAC.
    ``damping``, ``fisher``, ``block_diagonal`` and the Fisher-batch options are optimizer-wide
    (one solve over all layers); lr, momentum and weight decay may differ per group.

    An output ``(B, T, V)`` (per-token loss) has one column of ``G`` per sequence and term, the
    gradient of the sequence's summed ``−log p``, and ``F`` is normalised by the ``B·T`` rows (the
    mean per-token Fisher; ``fisher="full"`` then has ``K = T·V`` terms). Several
    ``opt.backward`` calls before one ``step`` (gradient accumulation) make one Fisher batch of
    all their samples. ``A``, ``E`` and the solve are float32 (float64 for a float64 model),
    also for a bf16/fp16 model or under autocast.

    Distributed (``torch.distributed`` with more than one rank, the model wrapped in
    ``DistributedDataParallel``, the optimizer given the unwrapped model): on steps that refresh
    the Fisher batch every rank all-gathers every layer's ``A`` and ``E`` (rank 0's rows first)
    and the batch sizes, so the stored Fisher is that of the *global* batch;
    that is ``Σ_l global rows · (in_dim_l + K·out_l)`` numbers per refresh, ``O(global batch ·
    neurons)`` and never ``O(parameters²)``. The ``M×M`` Gram matrix, ``Gᵀ∇L`` and the solve are
    then computed identically on every rank from the global data and DDP's averaged gradient,
    so nothing else travels; steps between refreshes (``inv_every``) communicate nothing.

    Args:
        model: the network.
        lr: learning rate.
        damping: ``λ > 0``.
        fisher: ``"mc"``, ``"full"`` or ``"empirical"``.
        block_diagonal: use only the per-layer blocks of ``F``.
        fisher_batch: ``"same"``: the Fisher of the current mini-batch; ``"previous"``: of the
            previous (independent) mini-batch, App. I.5 (the first step uses its own batch).
        inv_every: the Fisher batch is refreshed every ``inv_every`` steps and reused between.
        momentum: heavy-ball momentum in ``[0, 1)``.
        weight_decay: decoupled weight decay.
        likelihood: ``"categorical"``, ``"bernoulli"`` or ``"gaussian"``.
        seed: seed of the MC label generator (``None``: from torch's global RNG).
        fused_backward: skip autograd's weight-gradient GEMM of the layers; ``∇L`` enters
            the solve as ``EᵀA`` from the recorded ``E`` and ``A``. Their ``weight.grad`` stays
            ``None`` (see :class:`~foof.optim.base.CurvatureOptimizer`).
        nonfinite: ``"skip"`` (default): a step whose loss, gradients or statistics hold a
            NaN/Inf changes nothing (parameters, momentum, statistics, step counter) and warns
            once per cause; ``"raise"``: raise :class:`foof.optim.base.NonFiniteError`.
        param_groups, fallback, fallback_options: parameter groups with their own options,
            and the optimizer of the parameters outside every layer (default AdamW, ``None``
            for plain SGD), as in :class:`~foof.optim.foof.FOOF`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5))
        >>> opt = NaturalGradient(model, lr=0.1, damping=1e-2, fisher="full")
        >>> x, y = torch.randn(16, 20), torch.randint(0, 5, (16,))
        >>> opt.zero_grad()
        >>> logits = model(x)
        >>> opt.backward(nn.functional.cross_entropy(logits, y), logits)
        >>> opt.step()
    """

    factor_keys = ("fisher_inputs", "fisher_output_grads")
    #: one Fisher batch and one damped solve for all layers: these are the optimizer's
    global_options = (
        "damping",
        "fisher",
        "block_diagonal",
        "fisher_batch",
        "inv_every",
        "likelihood",
        "nonfinite",
    )

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        damping: float,
        fisher: str = "mc",
        block_diagonal: bool = False,
        fisher_batch: str = "same",
        inv_every: int = 1,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        likelihood: str = "categorical",
        seed: int | None = None,
        nonfinite: str = "skip",
        fused_backward: bool = False,
        param_groups: Iterable[dict[str, Any]] | None = None,
        fallback: type[torch.optim.Optimizer] | str | None = torch.optim.AdamW,
        fallback_options: dict[str, Any] | None = None,
    ) -> None:
        check_range("damping", damping, 0.0)
        if not damping > 0:
            raise ValueError(f"damping must be > 0 for natural gradients, got {damping!r}")
        check_choice("fisher", fisher, FISHER_TYPES)
        check_choice("fisher_batch", fisher_batch, FISHER_BATCHES)
        check_choice("likelihood", likelihood, LIKELIHOODS)
        check_int("inv_every", inv_every, 1)
        defaults: dict[str, Any] = dict(
            lr=lr,
            damping=damping,
            fisher=fisher,
            block_diagonal=bool(block_diagonal),
            fisher_batch=fisher_batch,
            inv_every=inv_every,
            momentum=momentum,
            weight_decay=weight_decay,
            likelihood=likelihood,
            nonfinite=nonfinite,
        )
        super().__init__(model, defaults, fused_backward, param_groups, fallback, fallback_options)
        self.sampler = FisherSampler(fisher, likelihood, seed, owner=type(self).__name__)
        self._directions: dict[nn.Module, Tensor] = {}

    def is_refresh_step(self) -> bool:
        """Whether this step takes a new Fisher batch.

        Every ``inv_every`` steps, and whenever a layer has none stored (it was unfrozen since
        the last refresh).
        """
        group = self.schedule
        if group["step"] % group["inv_every"] == 0:
            return True
        return any("fisher_inputs" not in state for _, _, state in self.layer_items())

    def wants_inputs(self) -> bool:
        """Record ``A`` on every step: the Fisher batch, and the factors of ``∇L = EᵀA``."""
        return True

    def wants_outputs(self) -> bool:
        """Keep layer outputs for the Fisher backward (mc/full) on refresh steps."""
        return self.schedule["fisher"] != "empirical" and self.is_refresh_step()

    def wants_output_grads(self) -> bool:
        """Record the loss's output gradients: the empirical Fisher, and ``∇L = EᵀA``."""
        return True

    def backward(self, loss: Tensor, output: Tensor | None = None) -> None:
        """The Fisher's backward pass on refresh steps, then ``loss.backward()``.

        Args:
            loss: the training loss (mean over the batch).
            output: the network output the loss was computed from: ``(B, C)``, ``(B,)`` or
                ``(B, ..., C)`` (see :mod:`foof.curvature.sampling`).
        """
        self.sampler.backward(self.capture, loss, output, active=self.is_refresh_step())

    def fisher_data(self) -> list[tuple[nn.Module, LayerFisherData]]:
        """The stored Fisher batch: ``A``/``E`` per layer (see :mod:`foof.curvature.woodbury`)."""
        data = []
        for _, module, state in self.layer_items():
            if "fisher_inputs" in state:
                data.append(
                    (
                        module,
                        LayerFisherData(
                            state["fisher_inputs"],
                            state["fisher_output_grads"],
                            state["fisher_batch_size"],
                        ),
                    )
                )
        return data

    def _store_current_batch(self) -> None:
        pending = self.sampler.pop()
        if pending is None:
            raise RuntimeError(
                "NaturalGradient: no Fisher statistics for this step. Run the forward pass in "
                "train() mode with autograd enabled and call opt.backward(loss, output)."
            )
        grads, batch_size = pending
        layers = list(self.layer_items())
        inputs, output_grads = [], []
        for name, module, _ in layers:
            rows = self.capture.inputs(module)
            if rows is None or module not in grads:
                raise RuntimeError(f"NaturalGradient: layer {name!r} took no part in the forward")
            # float32 (float64 for a float64 model) whatever the model's or autocast's dtype, as
            # FOOF's and KFAC's factors: the Gram matrix and its Cholesky need the precision
            dtype = factor_dtype(module.weight)
            inputs.append(rows.to(dtype))
            output_grads.append(grads[module].to(dtype))
        if distributed.is_distributed():
            # E is (K, rows, out): gathered along its rows, i.e. as (rows, K, out)
            gathered, _ = distributed.all_gather_rows(
                inputs + [e.transpose(0, 1) for e in output_grads]
            )
            inputs = gathered[: len(layers)]
            output_grads = [e.transpose(0, 1).contiguous() for e in gathered[len(layers) :]]
            total = torch.tensor([batch_size], device=inputs[0].device)
            distributed.all_reduce_sum_([total])
            batch_size = int(total.item())
        for (_, _, state), rows, e in zip(layers, inputs, output_grads):
            state["fisher_inputs"] = rows
            state["fisher_output_grads"] = e
            state["fisher_batch_size"] = batch_size

    def update_curvature(self, group: dict[str, Any]) -> None:
        """Choose the Fisher batch, then solve for every layer's direction at once."""
        refresh = self.is_refresh_step()
        if not self.layers:
            # nothing to precondition: every parameter gets the SGD fallback, as in FOOF/KFAC
            self.sampler.pop()
            return
        previous = group["fisher_batch"] == "previous"
        has_stored = all("fisher_inputs" in s for _, _, s in self.layer_items())
        if refresh and (not previous or not has_stored):
            self._store_current_batch()
        modules = [m for _, m, _ in self.layer_items()]
        data = self.fisher_data()
        current = refresh and not (previous and has_stored)  # the Fisher batch is this step's
        vectors = [self._gradient(m, d, current) for m, (_, d) in zip(modules, data)]
        directions = damped_inverse_mv(
            [d for _, d in data], vectors, group["damping"], group["block_diagonal"]
        )
        self._directions = dict(zip(modules, directions))
        if refresh and previous and has_stored:
            self._store_current_batch()

    def _gradient(
        self, module: nn.Module, data: LayerFisherData, current_batch: bool
    ) -> Tensor | FactoredGradient:
        """``∇L`` of one layer for the solve: formed, or as ``E_LᵀA_L`` where that is cheaper.

        The factored form (:class:`~foof.curvature.woodbury.FactoredGradient`) saves the
        projection ``Gᵀ∇L`` (row Gram matrices instead of an ``out·in`` contraction per Fisher
        column); a formed ``weight.grad`` is used only as the check that it equals ``EᵀA``.
        When the Fisher batch is this step's own, ``A_L`` is the stored Fisher rows, so that the
        final ``∇L − G w`` is a single GEMM.
        """
        dtype = data.inputs.dtype
        grad = gradient_matrix(module)
        factors = self.gradient_factors(module) if grad is None else self.recorded_factors(module)
        if factors is None or distributed.is_distributed():
            if grad is None:
                grad = gradient_matrix(module, zero_if_missing=True)
            return grad.to(dtype)
        output_grads, rows = factors[0].to(dtype), factors[1].to(dtype)
        if grad is not None and not self.gradient_is_product(module, grad, output_grads, rows):
            return grad.to(dtype)
        if current_batch and rows.shape == data.inputs.shape:
            rows = data.inputs
        if not factored_projection_is_cheaper(data, rows.shape[0]):
            return (output_grads.T @ rows) if grad is None else grad.to(dtype)
        return FactoredGradient(output_grads, rows)

    def precondition_factors(
        self, module: nn.Module, output_grads: Tensor, rows: Tensor, group: dict[str, Any]
    ) -> Tensor:
        """The layer's block of ``(λI + F)⁻¹ ∇L``, solved in :meth:`update_curvature`."""
        return self._directions.pop(module).to(module.weight.dtype)

    def precondition(self, module: nn.Module, grad: Tensor, group: dict[str, Any]) -> Tensor:
        """The layer's block of ``(λI + F)⁻¹ ∇L`` computed in :meth:`update_curvature`."""
        return self._directions.pop(module).to(grad.dtype)
