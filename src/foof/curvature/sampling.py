"""Output gradients ``e`` at the labels a Fisher estimate prescribes.

Conventions (shared by KFAC, natural gradients and :class:`foof.fisher.SubsampledFisher`):

* The training loss is the mean over the batch of ``−log p(y_i | x_i)``.
* ``F = (1/B) Σ_i E_{y~p(·|x_i)} [g_i(y) g_i(y)ᵀ]`` with ``g_i(y) = ∇_θ(−log p(y|x_i))``.
* ``fisher="mc"``: one label ``ŷ_i ~ p(·|x_i)`` per input (Martens & Grosse, 2015);
  ``"full"``: the exact expectation, i.e. every label ``y`` weighted by ``p(y|x_i)``;
  ``"empirical"``: the dataset label.
* Per layer, ``e_i`` is the gradient of ``−log p(y|x_i)`` (one sample, *not* divided by ``B``)
  w.r.t. the layer's output.

Each estimate is written as ``F = (1/B) Σ_k Σ_i g_{k,i} g_{k,i}ᵀ`` with ``K`` terms per input:
``K = 1`` for mc and empirical, ``K = C`` (number of classes or output dimensions) for full, where
term ``k`` carries the weight ``sqrt(p(k|x_i))`` inside ``g``. Everything downstream (factors,
Gram matrices) then treats the ``K`` terms alike.

Likelihoods: ``"categorical"`` (softmax cross-entropy on logits) and ``"gaussian"`` (unit
variance, ``−log p(y|x) = ½‖y − f(x)‖²`` up to a constant, the mean-squared-error case).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from foof import distributed
from foof.capture import Capture, output_rows

FISHER_TYPES = ("mc", "full", "empirical")
LIKELIHOODS = ("categorical", "gaussian")


def sample_output_grads(
    output: Tensor, fisher: str, likelihood: str, generator: torch.Generator | None = None
) -> Tensor:
    """Gradients of ``−log p(y|x_i)`` w.r.t. the network output at the prescribed labels.

    Args:
        output: network output ``(B, C)``: logits (categorical) or means (gaussian).
        fisher: ``"mc"`` or ``"full"`` (the empirical Fisher needs the dataset labels and is
            taken from the training loss's own backward pass instead).
        likelihood: ``"categorical"`` or ``"gaussian"``.
        generator: random generator for ``"mc"`` (on ``output``'s device).

    Returns:
        ``(K, B, C)``: ``K = 1`` for mc, ``K = C`` for full; for full, term ``k`` is already
        scaled by ``sqrt(p(k|x_i))`` so that ``Σ_k`` of outer products is the expectation.
    """
    output = output.detach()
    batch, classes = output.shape
    if likelihood == "categorical":
        # softmax in at least float32 (bf16 logits), in float64 for a float64 model
        probs = torch.softmax(output.to(torch.promote_types(output.dtype, torch.float32)), dim=1)
        if fisher == "mc":
            labels = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            onehot = nn.functional.one_hot(labels, classes).to(probs.dtype)
            return (probs - onehot).unsqueeze(0).to(output.dtype)
        eye = torch.eye(classes, dtype=probs.dtype, device=probs.device)
        # term k, sample i: sqrt(p_ik) · (p_i − onehot(k))
        return (probs.T.sqrt().unsqueeze(2) * (probs.unsqueeze(0) - eye.unsqueeze(1))).to(
            output.dtype
        )
    if likelihood == "gaussian":
        if fisher == "mc":
            # y = f + ε, so ∇_f ½‖y − f‖² = −ε; the sign does not matter in g gᵀ.
            noise = torch.randn(
                batch, classes, generator=generator, dtype=output.dtype, device=output.device
            )
            return noise.unsqueeze(0)
        eye = torch.eye(classes, dtype=output.dtype, device=output.device)
        return eye.unsqueeze(1).expand(classes, batch, classes)
    raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")


def layer_output_grads(
    capture: Capture,
    output: Tensor,
    fisher: str,
    likelihood: str,
    generator: torch.Generator | None = None,
    samples: Tensor | None = None,
) -> dict[nn.Module, Tensor]:
    """Per-layer ``e`` rows for the Fisher estimate ``fisher``, from the captured layers.

    For ``"mc"``/``"full"`` this backpropagates the sampled output gradients to the recorded layer
    outputs with ``torch.autograd.grad`` (the graph is retained and no parameter ``.grad`` is
    touched). For ``"empirical"`` it reuses the output gradients recorded during the training
    loss's backward pass, multiplied by ``B`` to undo the batch mean.

    Args:
        capture: a capture that recorded outputs (mc/full) or output gradients (empirical).
        output: the network output ``(B, C)`` of the same forward pass.
        fisher: ``"mc"``, ``"full"`` or ``"empirical"``.
        likelihood: ``"categorical"`` or ``"gaussian"``.
        generator: random generator for ``"mc"``.
        samples: the output gradients ``(K, B, C)`` to backpropagate, if already drawn (see
            :func:`sample_output_grads`); by default they are drawn here.

    Returns:
        ``{layer: (K, rows, out_dim)}`` for every layer with recorded data.
    """
    batch = output.shape[0]
    if fisher == "empirical":
        grads = {}
        for module in capture.layers.values():
            rows = capture.output_grads(module)
            if rows is not None:
                grads[module] = (rows * batch).unsqueeze(0)
        return grads
    layers = [m for m in capture.layers.values() if capture.records[m].outputs]
    outputs = [out for m in layers for out in capture.records[m].outputs]
    if not outputs:
        return {}
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
        calls = len(capture.records[module].outputs)
        terms = []
        for grads in per_term:
            parts = [
                output_rows(module, g if g is not None else torch.zeros_like(o))
                for g, o in zip(
                    grads[position : position + calls],
                    outputs[position : position + calls],
                )
            ]
            terms.append(parts[0] if calls == 1 else torch.cat(parts))
        result[module] = torch.stack(terms)
        position += calls
    return result


class FisherSampler:
    """The Fisher's extra backward pass of a training step, and the generator it samples with.

    Shared by :class:`foof.KFAC` and :class:`foof.NaturalGradient`: on steps where the method
    refreshes its curvature, :meth:`backward` computes the per-layer output gradients ``e`` at the
    labels ``fisher`` prescribes (before ``loss.backward()`` for mc/full, after it for empirical)
    and keeps them until :meth:`pop`.

    Args:
        fisher: ``"mc"``, ``"full"`` or ``"empirical"``.
        likelihood: ``"categorical"`` or ``"gaussian"``.
        seed: seed of the MC generator; ``None`` draws one from torch's global RNG, so
            ``torch.manual_seed`` makes runs reproducible.

    Under ``torch.distributed`` the MC labels are drawn for the *global* batch: the network
    outputs ``(B_r, C)`` of all ranks are all-gathered (``B·C`` numbers per statistics step),
    every rank draws the same labels for all of them from its generator (seeded alike: the seed
    is broadcast from rank 0 when the generator is created) and keeps its own rows. The ranks
    thus use exactly the labels one process would draw for the concatenated batch, and the
    generator state, saved in checkpoints, is the same on every rank.
    """

    def __init__(self, fisher: str, likelihood: str, seed: int | None = None) -> None:
        self.fisher = fisher
        self.likelihood = likelihood
        self.seed = int(torch.randint(0, 2**62, (1,)).item()) if seed is None else int(seed)
        self._generator: torch.Generator | None = None
        self._pending: tuple[dict[nn.Module, Tensor], int] | None = None

    def generator(self, device: torch.device) -> torch.Generator:
        """The MC generator on ``device`` (created on first use from :attr:`seed`)."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def backward(self, capture: Capture, loss: Tensor, output: Tensor | None, active: bool) -> None:
        """``loss.backward()``, plus the Fisher pass when ``active``.

        Raises:
            ValueError: if ``active`` and ``output`` is missing.
        """
        if not active:
            loss.backward()
            return
        if output is None:
            raise ValueError("this optimizer needs the network output: opt.backward(loss, output)")
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
        if self.fisher != "empirical":
            grads = layer_output_grads(
                capture,
                output,
                self.fisher,
                self.likelihood,
                self.generator(output.device) if samples is None else None,
                samples=samples,
            )
            loss.backward()
        else:
            loss.backward()
            grads = layer_output_grads(capture, output, "empirical", self.likelihood)
        self._pending = (grads, output.shape[0])

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

    @property
    def pending(self) -> tuple[dict[nn.Module, Tensor], int] | None:
        """The gradients :meth:`pop` would return, without taking them."""
        return self._pending

    def pop(self) -> tuple[dict[nn.Module, Tensor], int] | None:
        """The gradients of the last active :meth:`backward` and its batch size, once."""
        pending, self._pending = self._pending, None
        return pending

    def clear(self) -> None:
        """Drop pending gradients (called by ``zero_grad``)."""
        self._pending = None

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
