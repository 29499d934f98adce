"""The amortised Kronecker-factored family: FOOF (input factor only) and KFAC (both factors).

Both keep an EMA of the input covariance ``Ā = Σ`` per layer, update it on the ``stats_steps``
steps before each inversion (Algorithm 1), and recompute their damped inverses every
``inv_every`` steps. The subclasses only say how to invert and how to precondition.

Under ``torch.distributed`` (see :mod:`foof.distributed`) the batch statistics are summed over
ranks before the EMA, on statistics steps only, so every rank holds the factors of the global
batch; with ``inverse_sharding="sharded"`` each layer's inverse is computed on one rank and
broadcast.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from foof import distributed
from foof.capture import is_block, layer_in_dim, layer_out_dim, token_frequencies
from foof.curvature.linalg import update_ema_, update_second_moment_ema_
from foof.optim.base import CurvatureOptimizer
from foof.validation import check_choice, check_int, check_range

INVERSE_SHARDINGS = ("replicated", "sharded")

WARM_START_BATCHES = 50
"""Mini-batches of statistics taken before the first update (App. K, "Initialisation")."""

LossFunction = Callable[[Tensor, Tensor], Tensor]


def is_inversion_step(step: int, inv_every: int, inv_warmup: int = 0) -> bool:
    """Whether step ``step`` recomputes the inverses (Algorithm 1, line 12).

    Every ``inv_every``-th step starting at step 0, and every one of the first ``inv_warmup``
    steps. The warm-up is not in the paper: early on the activations move fast, and an inverse
    reused for even a few steps can make an aggressive learning rate diverge (FOOF on the
    Fig. 4B setting with ``inv_every`` 4 to 100 and seed 1 diverges at step 12; inverting on
    each of the first 10 steps avoids it, see docs/reproduction/README.md).
    """
    return step < inv_warmup or step % inv_every == 0


def is_stats_step(step: int, inv_every: int, stats_steps: int | None, inv_warmup: int = 0) -> bool:
    """Whether step ``step`` updates the statistics (Algorithm 1, line 10).

    With ``stats_steps=S`` the statistics are updated on the ``S`` steps that end with (and
    include) each inversion step ``t ≡ 0 (mod inv_every)``, and on each of the first
    ``inv_warmup`` steps (each of which inverts, see :func:`is_inversion_step`); ``None``
    means every step.
    """
    if stats_steps is None or stats_steps >= inv_every or step < inv_warmup:
        return True
    phase = step % inv_every
    return phase == 0 or phase > inv_every - stats_steps


def low_rank_is_cheaper(
    count: int, in_dim: int, out: int, two_sided: bool, gradient_formed: bool = True
) -> bool:
    """Whether a product with ``Ĝ = EᵀA`` (``count`` rows) needs fewer flops on ``E``, ``A``.

    ``Eᵀ(A P)`` costs ``count·in² + out·count·in`` (plus ``count·out²`` for KFAC's left factor)
    against ``out·in²`` (plus ``out²·in``) for ``Ĝ P``; when ``Ĝ`` has not been formed (fused
    backward) the dense route also pays the ``out·count·in`` of forming it.
    """
    low_rank = count * (in_dim * in_dim + out * in_dim + (out * out if two_sided else 0))
    dense = out * in_dim * (in_dim + (out if two_sided else 0))
    if not gradient_formed:
        dense += out * count * in_dim
    return low_rank < dense


def warmup(group: dict[str, Any]) -> int:
    """A group's ``inv_warmup`` (0 for a state dict saved before the option existed)."""
    return int(group.get("inv_warmup", 0))


def factor_dtype(param: Tensor) -> torch.dtype:
    """Factors are float32, or float64 for a float64 model, whatever autocast does."""
    return torch.promote_types(param.dtype, torch.float32)


class KroneckerFactoredOptimizer(CurvatureOptimizer):
    """Base of FOOF and KFAC: EMA statistics, the amortisation schedule, the inversion cadence.

    Subclasses implement :meth:`invert` (fill the layer state with whatever
    :meth:`~foof.optim.base.CurvatureOptimizer.precondition` needs) and
    :meth:`inverse_shapes`, and may set ``uses_gradient_factor`` and provide
    :meth:`gradient_rows`.

    Distributed training (``torch.distributed`` initialised with more than one rank, the model
    wrapped in ``DistributedDataParallel``; pass the optimizer the unwrapped model):

    * On statistics steps every layer's *unnormalised* batch sums (``Σ_r ā_r ā_rᵀ`` and its row
      count; for KFAC also ``Σ e eᵀ`` and its sample count) are summed over ranks in one packed
      all-reduce and only then normalised and averaged into the EMA, so each rank holds exactly
      the factors one process would compute from the global batch, whatever the local batch
      sizes. Steps that take no statistics communicate nothing.
    * ``inverse_sharding="sharded"``: on inversion steps layer ``i`` (in ``model.named_modules()``
      order) is inverted on rank ``i mod world_size`` and the result broadcast (KAISA, Pauloski
      et al., 2021); ``"replicated"`` (the default, and what a single process does) inverts
      every layer on every rank and sends nothing.
    * The low-rank product is skipped: ``Ĝ`` is the all-reduced gradient of the global batch
      while the recorded ``E``, ``A`` are this rank's, so ``Ĝ = EᵀA`` never holds.
    * ``p.grad`` is DDP's average over ranks, which is the global batch's gradient when the
      ranks hold equal batches (as ``DistributedSampler`` gives).
    """

    uses_gradient_factor = False
    global_options = ("inv_every", "stats_steps", "inv_warmup", "inverse_sharding", "nonfinite")
    supports = staticmethod(is_block)

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
        inverse_sharding: str = "replicated",
        fused_backward: bool = False,
        inv_warmup: int = 0,
        param_groups: Iterable[dict[str, Any]] | None = None,
        fallback: type[torch.optim.Optimizer] | str | None = None,
        fallback_options: dict[str, Any] | None = None,
        **extra: Any,
    ) -> None:
        check_range("damping", damping, 0.0)
        check_choice("inverse_sharding", inverse_sharding, INVERSE_SHARDINGS)
        check_range("ema_decay", ema_decay, 0.0, 1.0, high_open=True)
        check_int("inv_every", inv_every, 1)
        check_int("stats_steps", stats_steps, 1, allow_none=True)
        check_int("inv_warmup", inv_warmup, 0)
        if stats_steps is not None and stats_steps > inv_every:
            raise ValueError(f"stats_steps must be <= inv_every ({inv_every}), got {stats_steps}")
        defaults: dict[str, Any] = dict(
            lr=lr,
            damping=damping,
            ema_decay=ema_decay,
            inv_every=inv_every,
            stats_steps=stats_steps,
            inv_warmup=inv_warmup,
            momentum=momentum,
            weight_decay=weight_decay,
            inverse_sharding=inverse_sharding,
            **extra,
        )
        super().__init__(model, defaults, fused_backward, param_groups, fallback, fallback_options)
        self.low_rank = bool(low_rank)
        self._step_rows: dict[nn.Module, Tensor | None] = {}
        # Whether the low-rank product was cheaper for some layer when last evaluated (None:
        # not yet). When it was not (convolutions: rows = batch × positions), recording A and E
        # on every step is pure overhead, so it happens only on statistics steps, which also
        # re-evaluate the shapes.
        self._low_rank_cheaper: bool | None = None
        self._cheaper_this_step: dict[nn.Module, bool] = {}
        # True while warm_start() runs its forward/backward passes: every pass takes statistics
        self._warming_up = False

    def is_stats_step(self) -> bool:
        """Whether the coming (current) step updates the statistics (always during warm start)."""
        if self._warming_up:
            return True
        group = self.schedule
        return is_stats_step(group["step"], group["inv_every"], group["stats_steps"], warmup(group))

    def is_inversion_step(self) -> bool:
        """Whether the coming (current) step recomputes the inverses."""
        group = self.schedule
        return is_inversion_step(group["step"], group["inv_every"], warmup(group))

    def uses_low_rank(self) -> bool:
        """Whether the low-rank product may be used: ``low_rank`` and a single process."""
        return self.low_rank and not distributed.is_distributed()

    def _records_for_low_rank(self) -> bool:
        if self._warming_up:
            return False  # no update is taken, so no product with the gradient either
        return self.uses_low_rank() and (
            self._low_rank_cheaper is not False or self.is_stats_step()
        )

    def wants_inputs(self) -> bool:
        """Inputs on statistics steps, and on every step while the low-rank product pays."""
        return self.is_stats_step() or self._records_for_low_rank()

    def wants_output_grads(self) -> bool:
        """Output gradients of the loss for the low-rank product ``Ĝ = EᵀA``."""
        return self._records_for_low_rank()

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Take one optimization step (see the class docstring for the update)."""
        self._cheaper_this_step = {}
        loss = super().step(closure)
        if self._cheaper_this_step:
            self._low_rank_cheaper = any(self._cheaper_this_step.values())
        return loss

    def warm_start(
        self,
        batches: Iterable[tuple[Tensor, Tensor]],
        loss_fn: LossFunction | None = None,
        num_batches: int = WARM_START_BATCHES,
        model: nn.Module | None = None,
    ) -> int:
        """Initialise the statistics from ``num_batches`` mini-batches before training (App. K).

        The paper's initialisation: "perform [the moving-average update of Algorithm 1] for a
        number of minibatches (50) before training and then [invert] once", with the moving
        average normalised. Each batch runs a training-mode forward pass and, for KFAC, the
        Fisher's backward pass (:meth:`backward`), and is folded into the EMA of ``Ā``
        (and ``Ḡ``) with ``ema_decay``; nothing is updated. Step 0 then adds its own batch and
        inverts, as on every inversion step, so the first inverse (and, with ``inv_every=T``,
        the next ``T`` updates) rests on ``num_batches + 1`` batches instead of one; an inverse
        of a single batch's ``Σ`` can make a large learning rate diverge within the first
        ``T`` steps.

        The model is left as it was: parameters (no update, gradients cleared), buffers (e.g.
        BatchNorm running statistics are restored) and the step counter; only the Fisher
        sampler's generator (KFAC's MC labels) and torch's global RNG (dropout) advance. Under
        ``torch.distributed`` every rank must call it with the same number of batches (its
        share of each global batch); the statistics are reduced over ranks as on a step.

        Args:
            batches: ``(inputs, targets)`` pairs, e.g. a ``DataLoader`` over the training set;
                only the first ``num_batches`` are used. Targets are passed to ``loss_fn``
                only (FOOF and KFAC's mc/full Fisher do not use them; the empirical Fisher
                does).
            loss_fn: ``loss_fn(model(inputs), targets)``, a mean over the batch; default
                softmax cross-entropy.
            num_batches: ``N >= 1`` (App. K uses 50).
            model: the network to run; default the model the optimizer was built for.

        Returns:
            The number of batches used (fewer than ``num_batches`` if ``batches`` ran out;
            batches with a non-finite loss or statistic are left out).

        Raises:
            RuntimeError: called after the first step (the statistics already exist).

        Example:
            >>> loader = [(torch.randn(32, 784), torch.randint(0, 10, (32,)))] * 50
            >>> model = nn.Sequential(nn.Linear(784, 10))
            >>> opt = foof.FOOF(model, lr=1.0, damping=10.0)  # doctest: +SKIP
            >>> opt.warm_start(loader)  # doctest: +SKIP
            50
        """
        if self.step_count > 0:
            raise RuntimeError(
                f"{type(self).__name__}.warm_start() initialises the statistics before the "
                f"first step; this optimizer has taken {self.step_count} steps already"
            )
        if not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f"num_batches must be an integer >= 1, got {num_batches!r}")
        model = self._model() if model is None else model
        if model is None:
            raise RuntimeError("the model this optimizer was built for no longer exists")
        loss_fn = nn.functional.cross_entropy if loss_fn is None else loss_fn
        group = self.schedule
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        was_training = model.training
        used = 0
        self._warming_up = True
        try:
            model.train()
            for inputs, targets in itertools.islice(batches, num_batches):
                self.zero_grad()  # each batch alone: its statistics, no gradient kept
                self.clear_records()
                with torch.enable_grad():  # the capture records only passes under autograd
                    output = model(inputs)
                    if self.uses_gradient_factor:  # Ḡ needs the Fisher's backward pass
                        self.backward(loss_fn(output, targets), output)
                if self.find_nonfinite() is None:
                    with (
                        torch.no_grad(),
                        torch.autocast(device_type=group["params"][0].device.type, enabled=False),
                    ):
                        self.update_statistics(group)
                    used += 1
        finally:
            self._warming_up = False
            self._step_rows = {}
            self.zero_grad()
            self.clear_records()
            model.train(was_training)
            with torch.no_grad():
                for name, buffer in model.named_buffers():
                    if name in buffers:
                        buffer.copy_(buffers[name])
        return used

    def low_rank_factors(self, module: nn.Module, grad: Tensor, two_sided: bool) -> tuple | None:
        """``(E, A)`` with ``Ĝ = EᵀA`` when that form of the product is cheaper and exact.

        A Linear layer's gradient has rank ≤ rows: ``Ĝ = EᵀA`` with ``E`` ``(R, out)`` the
        recorded output gradients and ``A`` ``(R, in_dim)`` the input rows, so a product such as
        ``Ĝ P`` costs ``R·in² + out·R·in`` as ``Eᵀ(A P)`` instead of ``out·in²``. It is used only
        when it needs fewer flops (decided from the shapes) and when ``Ĝ`` really is ``EᵀA``:
        a gradient changed after backward (clipping, an L2 term added outside the layer output)
        is detected by comparing ``Ĝ r`` with ``Eᵀ(A r)`` for a fixed random ``r``, and then the
        dense product is used. Under ``torch.distributed`` it is never used (the check would
        always fail, see the class docstring), and ``E`` is then not even recorded.

        Args:
            module: the layer.
            grad: its gradient matrix ``(out, in_dim)``.
            two_sided: whether the product also multiplies from the left (KFAC's ``Ḡ⁻¹``).

        Returns:
            ``(E, A)`` in ``grad``'s factor dtype, or None for the dense product.
        """
        if not self.uses_low_rank() or isinstance(module, nn.Embedding):
            return None  # an embedding's diagonal Σ makes its dense product O(out·V) already
        # decide from shapes before materialising anything: for a convolution the rows
        # (unfolded patches) cost more to build than the dense product they would replace
        recorded = self.capture.records[module].output_grads
        if not recorded:
            return None
        out = module.weight.shape[0]
        count = sum(g.numel() for g in recorded) // out
        cheaper = low_rank_is_cheaper(count, layer_in_dim(module), out, two_sided)
        self._cheaper_this_step[module] = cheaper
        if not cheaper:
            return None
        factors = self.recorded_factors(module)
        if factors is None:
            return None
        output_grads, rows = factors
        dtype = factor_dtype(module.weight)
        output_grads, rows = output_grads.to(dtype), rows.to(dtype)
        if not self.gradient_is_product(module, grad, output_grads, rows):
            return None
        return output_grads, rows

    def takes_part(self, module: nn.Module) -> bool:
        """Whether ``module`` has a gradient this step (formed, or skipped by fused backward)."""
        if module.weight.grad is not None:
            return True
        return self.fused_backward and bool(self.capture.records[module].output_grads)

    def layer_rows(self, module: nn.Module) -> Tensor | None:
        """This step's input rows ``A``, built at most once per step and only when used."""
        if module not in self._step_rows:
            self._step_rows[module] = super().layer_rows(module)
        return self._step_rows[module]

    def two_sided(self, group: dict[str, Any]) -> bool:
        """Whether the product also multiplies ``Ĝ`` from the left (KFAC's ``Ḡ⁻¹``)."""
        return False

    def statistic_rows(self, module: nn.Module) -> Tensor | None:
        """The rows ``Ā``/``Σ`` is the mean outer product of, by the group's ``kfac_approx``.

        ``"expand"``: this step's :meth:`layer_rows` (one per sample and position, also those of
        the low-rank product); ``"reduce"``: one row per sample, the mean over its positions
        (:func:`foof.capture.input_rows`).
        """
        if self.param_groups[0].get("kfac_approx", "expand") == "reduce":
            return self.capture.inputs(module, kfac_approx="reduce")
        return self.layer_rows(module)

    def precondition_rows(
        self, module: nn.Module, output_grads: Tensor, rows: Tensor, group: dict[str, Any]
    ) -> Tensor | None:
        """The direction as a product on ``E`` ``(rows, out)`` and ``A`` ``(rows, in_dim)``.

        Both in the factors' dtype. None when the method has no such form (the caller then
        multiplies the formed ``Ĝ``).
        """
        return None

    def precondition_factors(
        self, module: nn.Module, output_grads: Tensor, rows: Tensor, group: dict[str, Any]
    ) -> Tensor:
        """Fused backward: ``Eᵀ(A P)``-style product, or ``Ĝ = EᵀA`` formed when cheaper."""
        count, in_dim = rows.shape
        out = output_grads.shape[1]
        if low_rank_is_cheaper(count, in_dim, out, self.two_sided(group), gradient_formed=False):
            dtype = factor_dtype(module.weight)
            direction = self.precondition_rows(
                module, output_grads.to(dtype), rows.to(dtype), group
            )
            if direction is not None:
                return direction.to(module.weight.dtype)
        grad = (output_grads.T @ rows).to(module.weight.dtype)
        return self.precondition(module, grad, group)

    def gradient_rows(self) -> tuple[dict[nn.Module, Tensor], int]:
        """Per-layer ``(K, rows, out)`` output gradients for ``Ḡ`` and the batch size ``B``."""
        raise NotImplementedError

    def invert(self, name: str, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Recompute the layer's damped inverse(s) from its factors in ``state``."""
        raise NotImplementedError

    def inverse_shapes(self, state: dict[str, Any], group: dict[str, Any]) -> dict[str, tuple]:
        """Shape of every tensor :meth:`invert` writes into ``state`` (in the factors' dtype).

        Used by sharded inversion: the ranks that do not invert a layer allocate these to
        receive the broadcast.
        """
        raise NotImplementedError

    def update_curvature(self, group: dict[str, Any]) -> None:
        """EMA of the factors on statistics steps, then the inverses on inversion steps."""
        invert = is_inversion_step(group["step"], group["inv_every"], warmup(group))
        stats_step = self.is_stats_step()
        active = self.update_statistics(group)
        pending = []
        for name, module, state in active:
            if not invert and self.has_inverse(state, self.group_of(module.weight)):
                continue
            missing = [k for k in self.factor_names() if k not in state]
            if missing and not stats_step:
                # Step 0 is a statistics step, so this layer joined since the last one
                # (unfrozen, or first used by the loss): nothing to invert before the next one.
                self._unpreconditioned.add(module)
                if f"joined {name}" not in self._warned:
                    self._warned.add(f"joined {name}")
                    warnings.warn(
                        f"{type(self).__name__}: layer {name!r} has no statistics yet (unfrozen "
                        f"or first used after the last statistics step); step {group['step']} "
                        "gives it a plain gradient step, it is preconditioned from its first "
                        "statistics step on",
                        stacklevel=4,
                    )
                continue
            if missing:
                raise RuntimeError(
                    f"{type(self).__name__}: no statistics ({', '.join(missing)}) for layer "
                    f"{name!r}. Run the training step's forward pass with the model in "
                    "train() mode and autograd enabled"
                    + (", and call opt.backward(loss, output)" if self.uses_gradient_factor else "")
                    + "."
                )
            pending.append((name, module, state))
        self.invert_layers(pending, group)

    def update_statistics(self, group: dict[str, Any]) -> list[tuple[str, nn.Module, dict]]:
        """On statistics steps, fold this step's ``Ā`` (and ``Ḡ``) into the EMAs (App. D.1).

        Returns:
            ``(name, module, state)`` of the layers that took part in this step.
        """
        stats_step = self.is_stats_step()
        gradients: dict[nn.Module, Tensor] = {}
        batch_size = 0
        if self.uses_gradient_factor and stats_step:
            gradients, batch_size = self.gradient_rows()
        self._step_rows = {}
        if self._warming_up:  # no backward for FOOF: a layer takes part if it saw inputs
            active = [item for item in self.layer_items() if self.capture.records[item[1]].inputs]
        else:
            active = [item for item in self.layer_items() if self.takes_part(item[1])]
        if stats_step and not distributed.is_distributed():
            # (1/R) Σ ā āᵀ straight into the EMA, one GEMM per factor (paper App. D.1)
            for _, module, state in active:
                decay = self.group_of(module.weight)["ema_decay"]
                dtype = factor_dtype(module.weight)
                if isinstance(module, nn.Embedding):  # diagonal Σ: token frequencies
                    inputs = self.capture.records[module].inputs
                    frequencies, count = token_frequencies(module, inputs) if inputs else (0, 0)
                    if count > 0:
                        state["input_covariance"] = update_ema_(
                            state.get("input_covariance"), frequencies.to(dtype), decay
                        )
                else:
                    rows = self.statistic_rows(module)
                    if rows is not None and rows.shape[0] > 0:  # no row reached it: no mean
                        state["input_covariance"] = update_second_moment_ema_(
                            state.get("input_covariance"), rows.to(dtype), rows.shape[0], decay
                        )
                if module in gradients:  # Ḡ = (1/B) Σ_k Σ_r e_{k,r} e_{k,r}ᵀ from (K, rows, out)
                    flat = gradients[module].reshape(-1, layer_out_dim(module)).to(dtype)
                    state["gradient_covariance"] = update_second_moment_ema_(
                        state.get("gradient_covariance"), flat, batch_size, decay
                    )
        elif stats_step:
            statistics = self.batch_statistics(active, gradients, batch_size)
            for _, module, state in active:
                decay = self.group_of(module.weight)["ema_decay"]
                input_cov, gradient_cov = statistics[module]
                if input_cov is not None:
                    state["input_covariance"] = update_ema_(
                        state.get("input_covariance"), input_cov, decay
                    )
                if gradient_cov is not None:
                    state["gradient_covariance"] = update_ema_(
                        state.get("gradient_covariance"), gradient_cov, decay
                    )
        return active

    def batch_statistics(
        self,
        layers: list[tuple[str, nn.Module, dict[str, Any]]],
        gradients: dict[nn.Module, Tensor],
        batch_size: int,
    ) -> dict[nn.Module, tuple[Tensor | None, Tensor | None]]:
        """Under ``torch.distributed``: this step's ``(1/R) Σ ā āᵀ`` and ``Ḡ`` of the global batch.

        (A single process folds its own rows straight into the EMAs, see
        :meth:`update_curvature`.) Every rank contributes the unnormalised sums and their
        counts (rows for ``Ā``, samples ``B`` for ``Ḡ``; zeros for a layer it has no data for)
        to one all-reduce and divides the global sums by the global counts, so unequal local
        batches are weighted correctly.

        Returns:
            ``{module: (input covariance or None, gradient covariance or None)}``; None where
            no rank had data (the factor is then left as it was).
        """
        tensors: list[Tensor] = []
        symmetric: list[bool] = []
        for _, module, _ in layers:
            weight = module.weight
            dtype = factor_dtype(weight)
            in_dim, out = layer_in_dim(module), layer_out_dim(module)
            diagonal = isinstance(module, nn.Embedding)
            if diagonal:  # token counts, summed over ranks like any other sum
                inputs = self.capture.records[module].inputs
                frequencies, input_count = token_frequencies(module, inputs) if inputs else (0, 0)
                input_sum = (
                    frequencies.to(dtype) * input_count
                    if input_count
                    else weight.new_zeros(in_dim, dtype=dtype)
                )
            else:
                rows = self.statistic_rows(module)
                if rows is None:
                    input_sum = weight.new_zeros(in_dim, in_dim, dtype=dtype)
                    input_count = 0
                else:
                    rows = rows.to(dtype)
                    input_sum, input_count = rows.T @ rows, rows.shape[0]
            tensors.append(input_sum)
            # counts travel in the factors' dtype, exact up to 2^24 rows per step in float32
            tensors.append(weight.new_tensor([input_count], dtype=dtype))
            symmetric += [not diagonal, False]
            if self.uses_gradient_factor:
                if module in gradients:
                    flat = gradients[module].reshape(-1, out).to(dtype)
                    gradient_sum, gradient_count = flat.T @ flat, batch_size
                else:
                    gradient_sum = weight.new_zeros(out, out, dtype=dtype)
                    gradient_count = 0
                tensors += [gradient_sum, weight.new_tensor([gradient_count], dtype=dtype)]
                symmetric += [True, False]
        distributed.all_reduce_sum_(tensors, symmetric)
        reduced = iter(tensors)
        statistics = {}
        for _, module, _ in layers:
            input_sum, input_count = next(reduced), float(next(reduced))
            gradient_cov = None
            if self.uses_gradient_factor:
                gradient_sum, gradient_count = next(reduced), float(next(reduced))
                if gradient_count > 0:
                    gradient_cov = gradient_sum.div_(gradient_count)
            input_cov = input_sum.div_(input_count) if input_count > 0 else None
            statistics[module] = (input_cov, gradient_cov)
        return statistics

    def invert_layers(
        self, layers: list[tuple[str, nn.Module, dict[str, Any]]], group: dict[str, Any]
    ) -> None:
        """Run :meth:`invert` for ``layers``: everywhere, or sharded over ranks and broadcast.

        With ``inverse_sharding="sharded"`` under ``torch.distributed``, layer ``i`` (its index
        in :attr:`layers`, the same on every rank) is inverted on rank ``i mod world_size``;
        every rank first inverts all the layers it owns, then all results are broadcast at
        once, so no rank waits on another's inversion before starting its own.
        """
        sharded = group.get("inverse_sharding", "replicated") == "sharded"
        if not (sharded and distributed.is_distributed()):
            for name, module, state in layers:
                self.invert(name, state, self.group_of(module.weight))
            return
        world, me = distributed.world_size(), distributed.rank()
        index = {module: i for i, module in enumerate(self.layers.values())}
        owners = [index[module] % world for _, module, _ in layers]
        for (name, module, state), owner in zip(layers, owners):
            if owner == me:
                self.invert(name, state, self.group_of(module.weight))
        items = []
        for (_, module, state), owner in zip(layers, owners):
            like = state["input_covariance"]
            for key, shape in self.inverse_shapes(state, self.group_of(module.weight)).items():
                # Same memory layout on every rank (cholesky_inverse and eigh return
                # column-major results), so the products round alike and replicas stay equal.
                state[key] = state[key].contiguous() if owner == me else like.new_empty(shape)
                items.append((state[key], owner))
        distributed.broadcast_from_owners(items)

    def factor_names(self) -> tuple[str, ...]:
        """State keys of the factors this method needs before it can invert."""
        if self.uses_gradient_factor:
            return ("input_covariance", "gradient_covariance")
        return ("input_covariance",)

    def has_inverse(self, state: dict[str, Any], group: dict[str, Any]) -> bool:
        """Whether ``state`` already holds an inverse (e.g. restored from a checkpoint)."""
        raise NotImplementedError
