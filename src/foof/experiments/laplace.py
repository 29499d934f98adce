"""App. G's proposed test: exact subsampled Laplace vs Kronecker-factored Laplace posteriors.

The paper (App. G) asks whether Kronecker-factored Laplace posteriors (Ritter et al., 2018) owe
their success to approximating the Fisher, and proposes two tests, "controlling for the amount of
data given to both": compare KFAC Laplace (``Ā ⊗ Ḡ``) with the exact full-covariance Laplace
posterior of the same subsampled Fisher (App. C.1, :class:`foof.fisher.LaplacePosterior`), and
with a posterior that keeps only the first factor (``Ā ⊗ I``, eq. 15).

One *run* of this figure is one posterior approximation (:data:`METHODS`) around one MAP
network. The MAP network is trained once per seed with :func:`foof.train.train` (the figure's
config) and cached beside the results as ``map-model-seed<S>.pt`` (loaded with
``weights_only=True``), so the four methods of a seed share it. Every method's curvature comes
from the same ``fisher_batch`` training images (``fisher``-type Fisher at ``θ_MAP``):

- ``map``: the MAP network's own softmax outputs;
- ``exact``: ``Λ = τ I + N·F`` with ``F = G Gᵀ`` the subsampled Fisher, sampled exactly through the
  Woodbury identity (eqs. 7-11);
- ``kfac``: per layer ``Λ_l = τ I + N·(Ā ⊗ Ḡ)`` with ``Ā = AᵀA / B`` and ``Ḡ = Σ_y EᵀE / B``
  taken from the same ``A`` and ``E``;
- ``first-factor``: per layer ``Λ_l = τ I + N·(c Ā ⊗ I)``, ``c = tr Ḡ / dim Ḡ``: App. G's "keep
  only the first factor", with the identity scaled to ``Ḡ``'s mean eigenvalue so that the
  likelihood term has KFAC's overall size (with the bare identity the posterior would be as
  narrow as ``1/c`` times KFAC's, a difference of scale rather than of shape).

The prior precision ``τ`` (one value for all layers) of each method is chosen on a validation
split (the first ``validation`` test images) by predictive NLL over :attr:`LaplaceOptions.
prior_precisions`; the reported numbers are on the remaining test images, so the choice never
sees them. Predictives are Monte-Carlo averages of softmax outputs over ``num_samples``
posterior samples (:func:`foof.fisher.monte_carlo_predictive`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from foof import checkpoint as checkpoints
from foof.data import Dataset
from foof.fisher import (
    KroneckerLaplace,
    LaplacePosterior,
    SubsampledFisher,
    monte_carlo_predictive,
)
from foof.models import build_model
from foof.train import StepContext, TrainCallback, TrainConfig, environment, train

METHODS: dict[str, str] = {
    "map": "MAP (no posterior)",
    "exact": "exact subsampled Laplace (full covariance)",
    "kfac": "KFAC Laplace (Ā ⊗ Ḡ)",
    "first-factor": "first factor only (Ā ⊗ I)",
}
"""The posterior approximations compared, by run label."""

RESULTS_FORMAT = "foof.experiments.laplace/1"
"""Version tag of :func:`evaluate`'s results."""


@dataclass(frozen=True)
class LaplaceOptions:
    """How the posteriors are built and judged (the figure's ``options``).

    Attributes:
        fisher: Fisher type of the curvature, ``"full"`` (the GGN of the cross-entropy),
            ``"mc"`` or ``"empirical"``.
        fisher_batch: ``B``, training images the curvature of every method is computed from.
        num_samples: posterior samples per predictive.
        prior_precisions: the grid ``τ`` is chosen from.
        validation: test images (the first ones) used to choose ``τ``; the rest are the test
            set the figure reports.
        ece_bins: equal-width confidence bins of the expected calibration error.
    """

    fisher: str = "full"
    fisher_batch: int = 100
    num_samples: int = 20
    prior_precisions: tuple[float, ...] = tuple(10.0**k for k in range(-2, 7))
    validation: int = 5000
    ece_bins: int = 15

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> LaplaceOptions:
        """Options from a figure's ``options`` mapping (unknown keys raise ``ValueError``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown Laplace option(s): {', '.join(unknown)}")
        values = dict(values)
        if "prior_precisions" in values:
            values["prior_precisions"] = tuple(float(t) for t in values["prior_precisions"])
        return cls(**values)


def expected_calibration_error(probs: Tensor, labels: Tensor, bins: int = 15) -> float:
    """``Σ_b (n_b / n) |accuracy_b − confidence_b|`` over equal-width confidence bins.

    Args:
        probs: predictive probabilities ``(n, C)``.
        labels: class indices ``(n,)``.
        bins: number of bins of ``[0, 1]``.
    """
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).to(probs.dtype)
    index = (confidence * bins).long().clamp_(max=bins - 1)
    total = 0.0
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        if count:
            gap = correct[members].mean() - confidence[members].mean()
            total += count / len(labels) * float(gap.abs())
    return total


def predictive_metrics(probs: Tensor, labels: Tensor, bins: int = 15) -> dict[str, float]:
    """NLL (mean ``−log p(y|x)``), accuracy and ECE of predictive probabilities ``(n, C)``."""
    picked = probs.gather(1, labels[:, None]).squeeze(1)
    return {
        "nll": float(-picked.clamp_min(torch.finfo(probs.dtype).tiny).log().mean()),
        "accuracy": float((probs.argmax(1) == labels).double().mean()),
        "ece": expected_calibration_error(probs, labels, bins),
    }


class _KeepModel(TrainCallback):
    """Remembers the trained model (``train`` returns results only)."""

    model: nn.Module | None = None

    def after_step(self, context: StepContext) -> None:
        self.model = context.model


def map_model(
    config: TrainConfig, data: Dataset, path: str | os.PathLike[str], progress: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    """The MAP network of ``config``: loaded from ``path``, else trained and saved there.

    Returns:
        The model (in eval mode) and a summary of its training run (final training loss,
        test accuracy, seconds).
    """
    path = Path(path)
    if path.exists():
        try:
            saved = checkpoints.load(path, config.to_dict())
        except checkpoints.CheckpointError:
            pass  # made with another config, or unreadable: train again
        else:
            model = build_model(config.model, **dict(config.model_options)).to(config.device)
            model.load_state_dict(saved["state_dict"])
            return model.eval(), dict(saved["summary"])
    keeper = _KeepModel()
    results = train(config, progress=progress, data=data, callbacks=[keeper])
    if keeper.model is None:
        raise RuntimeError("the MAP run made no training step")
    summary = {
        "final_train_loss": results["final"]["train_loss"],
        "test_accuracy": results["final"]["test_accuracy"],
        "seconds": results["total_time"],
        "diverged": bool(results["diverged"]),
    }
    state = {"config": config.to_dict(), "state_dict": keeper.model.state_dict()}
    checkpoints.save(path, {**state, "summary": summary})
    return keeper.model.eval(), summary


def kronecker_factors(fisher: SubsampledFisher) -> list[tuple[Tensor, Tensor]]:
    """KFAC's factors of ``fisher``'s own batch: per layer ``(AᵀA / B, Σ_k E_kᵀE_k / B)``.

    ``(in_dim, in_dim)`` and ``(out, out)``; ``Ā ⊗ Ḡ`` approximates the layer's block of
    ``F = G Gᵀ`` from exactly the data ``F`` is made of.
    """
    factors = []
    for data in fisher.data:
        a = data.inputs.T @ data.inputs / data.batch_size
        e = data.output_grads.flatten(0, 1)
        factors.append((a, e.T @ e / data.batch_size))
    return factors


def _posterior_factory(
    method: str,
    model: nn.Module,
    x_fisher: Tensor,
    y_fisher: Tensor,
    options: LaplaceOptions,
    num_data: int,
    generator: torch.Generator,
) -> Callable[[float], Any] | None:
    if method == "map":
        return None
    fisher = SubsampledFisher(model, x_fisher, y_fisher, fisher=options.fisher, generator=generator)
    if method == "exact":
        return lambda tau: LaplacePosterior(fisher, tau, num_data)
    factors = kronecker_factors(fisher)
    if method == "first-factor":
        factors = [(a * torch.diagonal(g).mean(), g) for a, g in factors]
    second = method == "kfac"
    return lambda tau: KroneckerLaplace(fisher.layers, factors, tau, num_data, second)


def _predict(
    posterior: Any, model: nn.Module, x: Tensor, samples: int, seed: int, chunk: int = 2000
) -> Tensor:
    """Predictive probabilities ``(n, C)`` in float64 (MAP's own when ``posterior`` is None)."""
    if posterior is None:
        with torch.no_grad():
            parts = [model(x[i : i + chunk]) for i in range(0, len(x), chunk)]
            return torch.softmax(torch.cat(parts), -1).double()
    generator = torch.Generator().manual_seed(seed)
    return monte_carlo_predictive(posterior, model, x, samples, generator, chunk).double()


def evaluate(
    method: str,
    config: TrainConfig,
    options: LaplaceOptions | Mapping[str, Any],
    data: Dataset,
    map_path: str | os.PathLike[str],
    progress: bool = False,
) -> dict[str, Any]:
    """Build ``method``'s posterior around the MAP network of ``config`` and measure it.

    Args:
        method: a key of :data:`METHODS`.
        config: the MAP network's training run (its ``seed`` also seeds the Fisher batch and
            the posterior samples).
        options: see :class:`LaplaceOptions`.
        data: the dataset ``config`` trains on (test images split into validation and test).
        map_path: where the MAP network is cached (see :func:`map_model`).
        progress: show the MAP run's progress bar.

    Returns:
        Results with ``format``, ``complete``, ``config`` (the MAP run's), ``environment``,
        ``map`` (its training summary), ``grid`` (validation metrics per ``τ``) and
        ``values``: ``prior_precision`` (chosen ``τ``; ``null`` for MAP) and ``test_nll``,
        ``test_accuracy``, ``test_ece``, ``validation_nll`` on the held-out splits.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if not isinstance(options, LaplaceOptions):
        options = LaplaceOptions.from_mapping(options)
    start = time.perf_counter()
    model, summary = map_model(config, data, map_path, progress)
    device = next(model.parameters()).device
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    if not 0 < options.validation < len(y_test):
        raise ValueError(
            f"validation must leave test images: {options.validation} of {len(y_test)}"
        )
    x_val, y_val = x_test[: options.validation], y_test[: options.validation]
    x_test, y_test = x_test[options.validation :], y_test[options.validation :]
    generator = torch.Generator().manual_seed(config.seed)
    num_data = len(data.y_train)
    batch = min(options.fisher_batch, num_data)
    index = torch.randperm(num_data, generator=generator)[:batch]
    x_fisher, y_fisher = data.x_train[index].to(device), data.y_train[index].to(device)
    factory = _posterior_factory(method, model, x_fisher, y_fisher, options, num_data, generator)
    grid = []
    if factory is None:
        chosen, posterior = None, None
    else:
        best = (math.inf, None)
        for tau in options.prior_precisions:
            probs = _predict(factory(tau), model, x_val, options.num_samples, config.seed)
            metrics = predictive_metrics(probs, y_val, options.ece_bins)
            grid.append({"prior_precision": tau, **metrics})
            if metrics["nll"] < best[0]:
                best = (metrics["nll"], tau)
        chosen = best[1]
        if chosen is None:  # every τ gave a non-finite NLL
            chosen = options.prior_precisions[-1]
        posterior = factory(chosen)
    seed = config.seed + 1  # fresh samples for the test split
    val_probs = _predict(posterior, model, x_val, options.num_samples, config.seed)
    test_probs = _predict(posterior, model, x_test, options.num_samples, seed)
    validation = predictive_metrics(val_probs, y_val, options.ece_bins)
    test = predictive_metrics(test_probs, y_test, options.ece_bins)
    return {
        "format": RESULTS_FORMAT,
        "complete": True,
        "method": method,
        "config": config.to_dict(),
        "options": _options_dict(options),
        "environment": environment(device),
        "dataset": data.describe(),
        "map": summary,
        "grid": grid,
        "values": {
            "prior_precision": chosen,
            "test_nll": test["nll"],
            "test_accuracy": test["accuracy"],
            "test_ece": test["ece"],
            "validation_nll": validation["nll"],
            "map_train_loss": summary["final_train_loss"],
        },
        "sizes": {
            "validation": len(y_val),
            "test": len(y_test),
            "fisher_batch": batch,
            "num_data": num_data,
        },
        "total_time": time.perf_counter() - start,
    }


def _options_dict(options: LaplaceOptions) -> dict[str, Any]:
    values = dataclasses.asdict(options)
    values["prior_precisions"] = list(options.prior_precisions)
    return values


def options_record(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The options as stored in results (defaults filled in), for matching reruns."""
    return _options_dict(LaplaceOptions.from_mapping(dict(options or {})))
