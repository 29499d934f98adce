"""Output gradients ``e`` at the labels a Fisher estimate prescribes, and the loss they assume.

Conventions (shared by KFAC, natural gradients and :class:`foof.fisher.SubsampledFisher`):

* **Output rows.** The network output is ``(B, C)`` or ``(B, ..., C)``: ``B`` samples (batch
  first), each with ``P = Π(...)`` rows of ``C`` numbers (``P = 1`` for ``(B, C)``; ``P = T``
  for ``(B, T, V)`` language-model logits). A 1-D output ``(B,)`` is ``(B, 1)``: one binary logit
  or one regression target per sample. The likelihood acts on each row independently: the
  ``C`` logits of a softmax (categorical), ``C`` independent sigmoid logits (bernoulli) or the
  mean of a unit-variance Gaussian in ``C`` dimensions.
* **The loss** is the mean over all ``N = B·P`` rows of ``−log p(y_r | x)``: for ``(B, C)``
  logits ``F.cross_entropy(logits, y)``, for ``(B, T, V)`` the per-token mean
  ``F.cross_entropy(logits.flatten(0, 1), y.flatten())`` (see the README's table for the other
  likelihoods, and :func:`loss_mismatch`, which checks it once).
* **The Fisher** ``F = (1/N) Σ_i E_{y_i~p(·|x_i)}[g_i(y_i) g_i(y_i)ᵀ]`` with
  ``g_i(y) = ∇_θ Σ_{r ∈ i} −log p(y_r | x_i)`` the gradient of sample ``i``'s summed
  negative log-likelihood, its ``P`` labels drawn independently. Scores of different rows are
  uncorrelated under the model, so ``F = (1/N) Σ_r E[g_r g_rᵀ]``: the mean per-row Fisher, which
  is the generalised Gauss-Newton matrix of the loss above. For ``P = 1`` this is the usual
  ``(1/B) Σ_i E[g_i g_iᵀ]``.
* ``fisher="mc"``: one label per row, ``ŷ_r ~ p(·|x)`` (Martens & Grosse, 2015), backpropagated
  for all rows at once (``K = 1`` term per sample, unbiased); ``"full"``: the exact expectation
  as ``K = P·C`` terms per sample (term ``(t, k)`` is row ``t``'s ``k``-th square-root factor of
  its output Fisher, zero on the other rows: a softmax needs ``sqrt(p_k)(p − e_k)``, a sigmoid
  ``sqrt(σ_k(1 − σ_k)) e_k``, a unit Gaussian ``e_k``), so ``P·C`` backward passes; ``"empirical"``:
  the dataset labels, i.e. the training loss's own backward pass.
* Per layer, ``e`` is the gradient of ``Σ_{r ∈ i} −log p`` (one sample, *not* divided by ``N``)
  w.r.t. the layer's output, summed over the ``K`` terms' outer products.

Each estimate is written as ``F = (1/B) Σ_k Σ_i g_{k,i} g_{k,i}ᵀ``: the per-layer ``e`` this
module hands out carry the factor ``sqrt(B/N) = 1/sqrt(P)``, so that everything downstream
(factors, Gram matrices) treats the ``K`` terms alike and divides by the number of samples ``B``.

Likelihoods: ``"categorical"`` (softmax cross-entropy on logits), ``"bernoulli"`` (independent
sigmoid logits: a binary classifier with one logit, or multi-label ``(B, K)``; the
``binary_cross_entropy_with_logits`` case) and ``"gaussian"`` (unit variance,
``−log p(y|x) = ½‖y − f(x)‖²`` up to a constant, the mean-squared-error case).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from foof import distributed
from foof.capture import Capture, output_rows

FISHER_TYPES = ("mc", "full", "empirical")
LIKELIHOODS = ("categorical", "bernoulli", "gaussian")


class LossScaleWarning(UserWarning):
    """The loss handed to ``opt.backward(loss, output)`` does not match the likelihood."""


def output_shape(output: Tensor) -> tuple[int, int, int]:
    """``(B, P, C)``: samples, rows per sample and numbers per row of a network output."""
    if output.dim() == 0:
        raise ValueError("the network output must have a batch dimension, got a scalar")
    if output.dim() == 1:
        return output.shape[0], 1, 1
    return output.shape[0], math.prod(output.shape[1:-1]), output.shape[-1]


def check_output(output: Tensor, likelihood: str) -> None:
    """Refuse an output the likelihood cannot describe.

    Raises:
        ValueError: for ``likelihood="categorical"`` on rows of one number: a softmax over one
            class is constant, so every Fisher gradient would be exactly zero.
    """
    if likelihood == "categorical" and output_shape(output)[2] == 1:
        raise ValueError(
            f"likelihood='categorical' on an output of shape {tuple(output.shape)} with a single "
            "logit per row: a softmax over one class is constant, so the Fisher would be zero. "
            "For a binary classifier (one logit, BCEWithLogitsLoss) pass likelihood='bernoulli'; "
            "for a regression output pass likelihood='gaussian'."
        )


def _row_probabilities(rows: Tensor, likelihood: str) -> Tensor:
    """Softmax (categorical) or sigmoid (bernoulli) of ``(N, C)`` rows, in at least float32."""
    # in at least float32 (bf16 logits), in float64 for a float64 model
    wide = rows.to(torch.promote_types(rows.dtype, torch.float32))
    return torch.softmax(wide, dim=-1) if likelihood == "categorical" else torch.sigmoid(wide)


def output_fisher_mv(output: Tensor, vector: Tensor, likelihood: str) -> Tensor:
    """``Λ_r v_r`` per row: the output Fisher (= Hessian of ``−log p``) times ``vector``.

    Categorical ``Λ = diag(p) − ppᵀ``; bernoulli ``diag(σ(1 − σ))``; gaussian ``I``.
    ``output`` and ``vector`` have the same shape; so has the result (in ``vector``'s dtype).
    """
    _, _, classes = output_shape(output)
    if likelihood == "gaussian":
        return vector
    probs = _row_probabilities(output.detach().reshape(-1, classes), likelihood)
    v = vector.reshape(-1, classes).to(probs.dtype)
    if likelihood == "categorical":
        product = probs * v - probs * (probs * v).sum(-1, keepdim=True)
    else:
        product = probs * (1 - probs) * v
    return product.reshape(vector.shape).to(vector.dtype)


def sample_output_grads(
    output: Tensor, fisher: str, likelihood: str, generator: torch.Generator | None = None
) -> Tensor:
    """Gradients of ``−log p(y|x)`` w.r.t. the network output at the prescribed labels.

    Args:
        output: network output ``(B, ..., C)`` or ``(B,)`` (see the module docstring):
            logits (categorical, bernoulli) or means (gaussian).
        fisher: ``"mc"`` or ``"full"`` (the empirical Fisher needs the dataset labels and is
            taken from the training loss's own backward pass instead).
        likelihood: ``"categorical"``, ``"bernoulli"`` or ``"gaussian"``.
        generator: random generator for ``"mc"`` (on ``output``'s device).

    Returns:
        ``(K, *output.shape)``, not scaled by ``1/sqrt(P)``: ``K = 1`` for mc, ``K = P·C`` for
        full, where term ``(t, k)`` is nonzero on row ``t`` of each sample only and is the
        ``k``-th column of a square root of that row's output Fisher, so that ``Σ`` of outer
        products over the terms is the expectation.
    """
    check_output(output, likelihood)
    output = output.detach()
    batch, positions, classes = output_shape(output)
    rows = output.reshape(batch * positions, classes)
    if fisher == "mc":
        if likelihood == "gaussian":
            # y = f + ε, so ∇_f ½‖y − f‖² = −ε; the sign does not matter in g gᵀ.
            grads = torch.randn(
                rows.shape, generator=generator, dtype=output.dtype, device=output.device
            )
        else:
            probs = _row_probabilities(rows, likelihood)
            if likelihood == "categorical":
                labels = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                target = nn.functional.one_hot(labels, classes).to(probs.dtype)
            else:
                target = torch.bernoulli(probs, generator=generator)
            grads = (probs - target).to(output.dtype)
        return grads.reshape(1, *output.shape)
    eye = torch.eye(classes, dtype=torch.promote_types(output.dtype, torch.float32))
    eye = eye.to(output.device)
    if likelihood == "categorical":
        probs = _row_probabilities(rows, likelihood)
        # term k, row r: sqrt(p_rk) · (p_r − onehot(k))
        terms = probs.T.sqrt().unsqueeze(2) * (probs.unsqueeze(0) - eye.unsqueeze(1))
    elif likelihood == "bernoulli":
        probs = _row_probabilities(rows, likelihood)
        # term k, row r: sqrt(σ_rk (1 − σ_rk)) · onehot(k)
        terms = (probs * (1 - probs)).T.sqrt().unsqueeze(2) * eye.unsqueeze(1)
    else:
        terms = eye.unsqueeze(1).expand(classes, rows.shape[0], classes)
    terms = terms.reshape(classes, batch, positions, classes)
    if positions > 1:
        # term (t, k) lives on row t only: rows of one sample share its backward pass, so
        # backpropagating term k on all rows at once would add cross-row products.
        spread = torch.eye(positions, dtype=terms.dtype, device=terms.device)
        terms = torch.einsum("kbsc,ts->tkbsc", terms, spread)
    return terms.reshape(-1, *output.shape).to(output.dtype)


def empirical_output_grads(
    capture: Capture, num_rows: int, kfac_approx: str = "expand"
) -> dict[nn.Module, Tensor]:
    """``{layer: (1, rows, out)}``: the recorded loss gradients ``E`` times the ``N`` rows.

    The loss is a mean over ``N`` output rows, so ``N·E`` is the gradient of each sample's
    summed negative log-likelihood at the dataset labels (not yet scaled by ``1/sqrt(P)``).
    ``kfac_approx="reduce"`` sums each sample's rows (:func:`foof.capture.output_rows`).
    """
    grads = {}
    for module in capture.layers.values():
        rows = capture.output_grads(module, kfac_approx)
        if rows is not None:
            grads[module] = (rows * num_rows).unsqueeze(0)
    return grads


def layer_output_grads(
    capture: Capture,
    output: Tensor,
    fisher: str,
    likelihood: str,
    generator: torch.Generator | None = None,
    samples: Tensor | None = None,
    kfac_approx: str = "expand",
) -> dict[nn.Module, Tensor]:
    """Per-layer ``e`` rows for the Fisher estimate ``fisher``, from the captured layers.

    For ``"mc"``/``"full"`` this backpropagates the sampled output gradients to the layer
    outputs recorded since the last such pass (:meth:`~foof.capture.Capture.take_outputs`) with
    ``torch.autograd.grad`` (the graph is retained and no parameter ``.grad`` is touched). For
    ``"empirical"`` it reuses the output gradients recorded during the training loss's backward
    pass, multiplied by the ``N`` rows of ``output`` to undo the mean
    (:func:`empirical_output_grads`).

    Args:
        capture: a capture that recorded outputs (mc/full) or output gradients (empirical).
        output: the network output ``(B, ..., C)`` of the same forward pass.
        fisher: ``"mc"``, ``"full"`` or ``"empirical"``.
        likelihood: ``"categorical"``, ``"bernoulli"`` or ``"gaussian"``.
        generator: random generator for ``"mc"``.
        samples: the output gradients ``(K, *output.shape)`` to backpropagate, if already drawn
            (see :func:`sample_output_grads`); by default they are drawn here.
        kfac_approx: ``"expand"`` (a row per sample and position) or ``"reduce"`` (each
            sample's rows summed, :func:`foof.capture.output_rows`).

    Returns:
        ``{layer: (K, rows, out_dim)}`` for every layer with recorded data, not yet scaled by
        ``1/sqrt(P)`` (see :func:`fisher_scale`).
    """
    if fisher == "empirical":
        batch, positions, _ = output_shape(output)
        return empirical_output_grads(capture, batch * positions, kfac_approx)
    taken = capture.take_outputs()
    if not taken:
        return {}
    layers = list(taken)
    outputs = [out for m in layers for out in taken[m]]
    if samples is None:
        samples = sample_output_grads(output, fisher, likelihood, generator)
    per_term: list[tuple[Tensor, ...]] = []
    with capture.paused_grads():
        for grad_output in samples:
            per_term.append(
                torch.autograd.grad(
                    output,
                    outputs,
                    grad_outputs=grad_output,
                    retain_graph=True,
                    allow_unused=True,
                )
            )
    result: dict[nn.Module, Tensor] = {}
    position = 0
    for module in layers:
        calls = len(taken[module])
        terms = []
        for grads in per_term:
            parts = [
                output_rows(module, g if g is not None else torch.zeros_like(o), kfac_approx)
                for g, o in zip(
                    grads[position : position + calls],
                    outputs[position : position + calls],
                )
            ]
            terms.append(parts[0] if calls == 1 else torch.cat(parts))
        result[module] = torch.stack(terms)
        position += calls
    return result


def fisher_scale(samples: int, rows: int) -> float:
    """``sqrt(B/N)``: the factor on ``e`` that turns ``(1/B) Σ`` into the Fisher's ``(1/N) Σ``."""
    return (samples / rows) ** 0.5 if rows else 1.0


@dataclass(frozen=True)
class LossCurvature:
    """How the loss's Hessian w.r.t. the output compares with a likelihood's ``Λ/N``.

    Attributes:
        scale: ``s`` of the best fit ``H v ≈ s·Λ v / N`` (the loss's weight per row, times ``N``).
        residual: ``‖H v − s·Λ v / N‖ / ‖H v‖``: 0 when the loss has the likelihood's curvature.
        rows: ``N``, the output rows of the probed forward pass.
        classes: ``C``, numbers per row.
    """

    scale: float
    residual: float
    rows: int
    classes: int


def loss_curvatures(loss: Tensor, output: Tensor) -> dict[str, LossCurvature]:
    """Probe the Hessian of ``loss`` w.r.t. ``output`` against every likelihood's ``Λ/N``.

    For the three likelihoods (canonical links) the Hessian of ``−log p(y_r|x)`` w.r.t. row
    ``r`` of the output is its output Fisher ``Λ_r`` whatever the label ``y_r`` (soft labels and
    label smoothing included), so the loss of the convention, the mean over the ``N`` rows, has
    the Hessian ``Λ/N``. One Hessian-vector product ``H v`` with a fixed random ``v`` (a double
    backward through the loss head only, not the network) measures the loss's actual
    curvature. The graph is retained.

    Returns:
        ``{likelihood: fit}`` for the likelihoods that can be compared: none where the Hessian
        cannot be measured (a loss without a second derivative, an output the loss does not
        depend on, no rows), and not those whose ``Λ`` vanishes on this output (saturated).
    """
    batch, positions, classes = output_shape(output)
    rows = batch * positions
    if rows == 0 or not output.requires_grad:
        return {}
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(output.shape, generator=generator, dtype=torch.float64)
    probe = probe.to(device=output.device, dtype=output.dtype)
    try:
        (grad,) = torch.autograd.grad(loss, output, create_graph=True, allow_unused=True)
        if grad is None:
            return {}
        hv = None
        if grad.requires_grad:  # else the gradient does not depend on the output: H = 0
            (hv,) = torch.autograd.grad(
                grad, output, grad_outputs=probe, retain_graph=True, allow_unused=True
            )
    except RuntimeError:  # no double backward for some op of the loss
        return {}
    measured = (torch.zeros_like(probe) if hv is None else hv).detach().double().flatten()
    measured_norm = float(measured.norm())
    fits = {}
    for likelihood in LIKELIHOODS:
        if likelihood == "categorical" and classes == 1:
            continue
        expected = output_fisher_mv(output, probe, likelihood).double().flatten() / rows
        expected_norm = float(expected.norm())
        if not expected_norm > 1e-12 * float(probe.double().norm()) / rows:
            continue
        scale = float(measured @ expected) / expected_norm**2
        residual = (
            float((measured - scale * expected).norm()) / measured_norm if measured_norm else 1.0
        )
        fits[likelihood] = LossCurvature(scale, residual, rows, classes)
    return fits


#: relative tolerance of the loss check: generous enough for a bf16 output's rounding.
LOSS_CHECK_TOLERANCE = 0.05


def loss_mismatch(
    fits: dict[str, LossCurvature], likelihood: str, total_rows: int | None = None
) -> str | None:
    """A message saying how the probed loss differs from the likelihood's convention, or None.

    Args:
        fits: :func:`loss_curvatures` of the loss handed to ``opt.backward(loss, output)``.
        likelihood: the optimizer's likelihood.
        total_rows: the rows of every micro-batch the step accumulates (default: the probed
            one's); with gradient accumulation each micro-batch's loss should be its sum over
            rows divided by this total (the mean divided by the number of equal micro-batches).

    Returns:
        None if the loss is the mean over the rows of the likelihood's ``−log p(y|x)`` (within
        :data:`LOSS_CHECK_TOLERANCE`) or if it cannot be told.
    """
    fit = fits.get(likelihood)
    if fit is None:
        return None
    total = fit.rows if total_rows is None else total_rows

    def factor(f: LossCurvature) -> float:
        return f.scale * total / f.rows

    if fit.residual > LOSS_CHECK_TOLERANCE:
        others = [
            f"likelihood={name!r} (at {factor(other):.4g} times its scale)"
            for name, other in fits.items()
            if name != likelihood and other.residual <= LOSS_CHECK_TOLERANCE
        ]
        hint = (
            f"it matches {' and '.join(others)}: pass that likelihood"
            if others
            else "no likelihood foof knows matches it"
        )
        return (
            "the loss handed to opt.backward(loss, output) does not have the curvature of "
            f"likelihood={likelihood!r} (its Hessian w.r.t. the output differs by "
            f"{fit.residual:.0%}); {hint}. See the README's table of losses and likelihoods."
        )
    found = factor(fit)
    if abs(found - 1) <= LOSS_CHECK_TOLERANCE:
        return None
    hints = [
        f"the loss handed to opt.backward(loss, output) is {found:.4g} times the mean over the "
        f"{total} output rows of −log p(y|x) that likelihood={likelihood!r} assumes, so the "
        "Fisher and the gradient disagree in scale (as if damping and learning rate changed)"
    ]
    classes = fit.classes
    if abs(found / total - 1) <= LOSS_CHECK_TOLERANCE:
        hints.append("it looks like a sum (reduction='sum'): use the mean over the rows")
    elif likelihood == "gaussian" and abs(found * classes / 2 - 1) <= LOSS_CHECK_TOLERANCE:
        hints.append(
            f"F.mse_loss averages over all {classes} outputs of a row and has no ½: use "
            f"F.mse_loss(output, target) * {classes} / 2"
        )
    elif likelihood == "bernoulli" and abs(found * classes - 1) <= LOSS_CHECK_TOLERANCE:
        hints.append(
            f"binary_cross_entropy_with_logits averages over all {classes} logits of a row: "
            f"multiply it by {classes}"
        )
    if total != fit.rows:
        hints.append(
            "with gradient accumulation, divide each micro-batch's summed loss by the rows of "
            "all micro-batches (the mean by their number, for equal micro-batches)"
        )
    return "; ".join(hints) + ". See the README's table of losses and likelihoods."


class FisherSampler:
    """The Fisher's extra backward passes of a training step, and the generator it samples with.

    Shared by :class:`foof.KFAC` and :class:`foof.NaturalGradient`: on steps where the method
    refreshes its curvature, :meth:`backward` computes the per-layer output gradients ``e`` at the
    labels ``fisher`` prescribes (before ``loss.backward()`` for mc/full; for empirical the loss's
    own output gradients, read when the step takes them) and keeps them until :meth:`pop`.

    Gradient accumulation: every :meth:`backward` between two :meth:`pop` (or :meth:`clear`)
    adds its samples, so the step's Fisher is that of all micro-batches together, exactly the
    big batch's with ``fisher="full"`` or ``"empirical"`` (for the empirical Fisher the
    micro-batch losses must add up to the mean over all rows, as accumulated gradients do).

    The first :meth:`backward` with an output also checks, once, that the loss has the
    likelihood's curvature and scale (:func:`loss_mismatch`); the first :meth:`pop` warns with a
    :class:`LossScaleWarning` if not.

    Args:
        fisher: ``"mc"``, ``"full"`` or ``"empirical"``.
        likelihood: ``"categorical"``, ``"bernoulli"`` or ``"gaussian"``.
        seed: seed of the MC generator; ``None`` draws one from torch's global RNG, so
            ``torch.manual_seed`` makes runs reproducible.
        owner: name of the optimizer, for messages.

    Under ``torch.distributed`` the MC labels are drawn for the *global* batch: the network
    outputs ``(B_r, ...)`` of all ranks are all-gathered (``B·P·C`` numbers per statistics
    step), every rank draws the same labels for all of them from its generator (seeded alike:
    the seed is broadcast from rank 0 when the generator is created) and keeps its own rows. The
    ranks thus use exactly the labels one process would draw for the concatenated batch, and
    the generator state, saved in checkpoints, is the same on every rank.
    """

    def __init__(
        self,
        fisher: str,
        likelihood: str,
        seed: int | None = None,
        owner: str = "optimizer",
        kfac_approx: str = "expand",
    ) -> None:
        self.fisher = fisher
        #: "expand" or "reduce": the rows of the per-layer ``e`` (see foof.capture.output_rows)
        self.kfac_approx = kfac_approx
        self.likelihood = likelihood
        self.owner = owner
        self.seed = int(torch.randint(0, 2**62, (1,)).item()) if seed is None else int(seed)
        self._generator: torch.Generator | None = None
        self._reset()
        # the loss check: probed at the first active backward, judged at the first pop (which
        # knows every accumulated micro-batch), then never again
        self._loss_fits: dict[str, LossCurvature] | None = None
        self._loss_checked = False

    def _reset(self) -> None:
        self._passes: list[dict[nn.Module, Tensor]] = []
        self._samples = 0
        self._rows = 0
        self._capture: Capture | None = None
        self._result: tuple[dict[nn.Module, Tensor], int] | None = None

    def generator(self, device: torch.device) -> torch.Generator:
        """The MC generator on ``device`` (created on first use from :attr:`seed`)."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def backward(self, capture: Capture, loss: Tensor, output: Tensor | None, active: bool) -> None:
        """``loss.backward()``, plus the Fisher pass when ``active``.

        Raises:
            ValueError: if ``active`` and ``output`` is missing, or the output does not fit the
                likelihood (:func:`check_output`).
        """
        if not active:
            loss.backward()
            return
        if output is None:
            raise ValueError("this optimizer needs the network output: opt.backward(loss, output)")
        check_output(output, self.likelihood)
        samples = None
        if self.fisher == "mc" and distributed.is_distributed():
            samples = self._global_samples(output)
            finite = samples is not None
        else:
            finite = bool(torch.isfinite(output.detach()).all())
        if not finite:
            # No labels can be sampled from a non-finite output; the non-finite loss gradients
            # make the optimizer skip this step (see CurvatureOptimizer.find_nonfinite).
            loss.backward()
            return
        if not self._loss_checked and self._loss_fits is None:
            with capture.paused_grads():
                self._loss_fits = loss_curvatures(loss, output)
        if self.fisher != "empirical":
            grads = layer_output_grads(
                capture,
                output,
                self.fisher,
                self.likelihood,
                self.generator(output.device) if samples is None else None,
                samples=samples,
                kfac_approx=self.kfac_approx,
            )
            self._passes.append(grads)
        self._capture = capture
        loss.backward()
        batch, positions, _ = output_shape(output)
        self._samples += batch
        self._rows += batch * positions
        self._result = None

    def _global_samples(self, output: Tensor) -> Tensor | None:
        """This rank's rows of MC output gradients drawn for the all-gathered global batch.

        None if some rank's output is not finite (then no rank draws, and all skip the step).
        """
        if self._generator is None:
            self.seed = distributed.broadcast_int(self.seed)
        (everyone,), counts = distributed.all_gather_rows([output.detach()])
        if not bool(torch.isfinite(everyone).all()):
            return None
        samples = sample_output_grads(
            everyone, "mc", self.likelihood, self.generator(output.device)
        )
        start = sum(c[0] for c in counts[: distributed.rank()])
        return samples[:, start : start + output.shape[0]]

    def _collect(self) -> tuple[dict[nn.Module, Tensor], int] | None:
        """The accumulated per-layer ``e`` ``(K, rows, out)``, scaled, and the samples ``B``."""
        if self._samples == 0 and not self._passes:
            return None
        if self._result is None:
            if self.fisher == "empirical":
                raw = (
                    {}
                    if self._capture is None
                    else empirical_output_grads(self._capture, self._rows, self.kfac_approx)
                )
            else:
                raw = {}
                for grads in self._passes:
                    for module, e in grads.items():
                        raw.setdefault(module, []).append(e)
                raw = {
                    m: parts[0] if len(parts) == 1 else _concat_terms(parts, self.fisher)
                    for m, parts in raw.items()
                }
            scale = fisher_scale(self._samples, self._rows)
            grads = raw if scale == 1.0 else {m: e * scale for m, e in raw.items()}
            self._result = (grads, self._samples)
        return self._result

    @property
    def pending(self) -> tuple[dict[nn.Module, Tensor], int] | None:
        """The gradients :meth:`pop` would return, without taking them."""
        return self._collect()

    def pop(self) -> tuple[dict[nn.Module, Tensor], int] | None:
        """The step's accumulated Fisher gradients and their number of samples ``B``, once.

        ``{layer: (K, rows, out)}`` scaled by :func:`fisher_scale`, so that
        ``(1/B) Σ_k Σ_rows e eᵀ`` is the layer's gradient factor. Warns once
        (:class:`LossScaleWarning`) if the loss of the first step did not match the likelihood.
        """
        pending = self._collect()
        if self._loss_fits is not None and pending is not None:
            message = loss_mismatch(self._loss_fits, self.likelihood, self._rows)
            if message is not None:
                warnings.warn(f"{self.owner}: {message}", LossScaleWarning, stacklevel=4)
            self._loss_fits, self._loss_checked = None, True
        self._reset()
        return pending

    def clear(self) -> None:
        """Drop pending gradients (called by ``zero_grad``)."""
        self._reset()

    def state_dict(self) -> dict[str, object]:
        """Seed and generator state, so a resumed run samples the same labels."""
        return {
            "seed": self.seed,
            "state": None if self._generator is None else self._generator.get_state(),
            "device": None if self._generator is None else str(self._generator.device),
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore :meth:`state_dict`."""
        self.seed = int(state["seed"])
        self._generator = None
        if state["state"] is not None:
            self.generator(torch.device(str(state["device"]))).set_state(state["state"])


def _concat_terms(parts: list[Tensor], fisher: str) -> Tensor:
    """Rows of several micro-batches' ``(K, rows, out)`` side by side: ``(K, Σ rows, out)``."""
    if len({p.shape[0] for p in parts}) > 1:
        raise ValueError(
            f"fisher={fisher!r}: the accumulated micro-batches have different numbers of Fisher "
            "terms (rows per sample times outputs per row); accumulate micro-batches of one "
            "output shape, or use fisher='mc'"
        )
    return torch.cat(parts, dim=1)
