"""Figures as data: a :class:`Figure` is a claim, a list of :class:`Run` s and the checks.

A run is a label plus the :class:`~foof.train.TrainConfig` fields it sets; :meth:`Figure.config`
turns it into the config :func:`foof.train.train` runs, after the tuned hyperparameters (see
:mod:`foof.experiments.hyperparameters`) are filled in. Nothing here trains anything.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from foof.train import TrainConfig

MODES = ("quick", "standard")
"""``quick``: CI-sized smoke runs of the whole pipeline; ``standard``: the paper's settings."""

KINDS = ("train", "toy", "laplace")
"""How a figure's runs are produced: by :func:`foof.train.train`, by the exact toy
computation of App. F (:mod:`foof.experiments.toy`), or as posterior approximations around a
trained network (App. G, :mod:`foof.experiments.laplace`; the run label names the method)."""

PLOTS = ("curves", "bars", "sweep", "trajectory", "toy", "laplace")
"""Plot styles :mod:`foof.experiments.report` knows."""

TUNABLE = ("lr", "damping", "momentum")
"""Hyperparameters ``foof tune`` can search (App. D.2)."""

_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclass(frozen=True)
class Run:
    """One curve of a figure.

    Attributes:
        label: short file-safe name, unique in the figure (``<label>-seed<S>.json``).
        legend: what the plot and the report call it, e.g. ``"KFAC (heuristic damping)"``.
        overrides: :class:`~foof.train.TrainConfig` fields on top of the figure's base config,
            including the starting hyperparameters (the paper's Table D.4 values where it has
            them) that a tuned entry replaces.
        tune: the hyperparameters ``foof tune`` searches for this run, a subset of
            :data:`TUNABLE`; the others stay as ``overrides`` set them.
        hyperparameters: key of the tuned entry in ``hyperparameters.json``; ``None`` for
            ``"<figure>/<label>"``. Runs that the paper does not re-tune (its "same as 1A")
            point at the entry they share.
        instruments: names of per-step instruments attached to the run (see
            :data:`foof.experiments.instruments.INSTRUMENTS`), e.g. ``("kfac-foof-cosine",)``
            for Fig. 3B.
        group: panel of the plot this run belongs to (e.g. the dataset in Fig. 1A).
        series: for sweeps, the curve this run is a point of (e.g. ``"KFAC"`` in Fig. 3C).
        x: for sweeps, the run's position on the x axis (e.g. its damping).
    """

    label: str
    legend: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    tune: tuple[str, ...] = ("lr", "damping")
    hyperparameters: str | None = None
    instruments: tuple[str, ...] = ()
    group: str | None = None
    series: str | None = None
    x: float | None = None

    def __post_init__(self) -> None:
        if not _LABEL.match(self.label):
            raise ValueError(f"run label must be file-safe ([A-Za-z0-9._+-]), got {self.label!r}")
        unknown = sorted(set(self.tune) - set(TUNABLE))
        if unknown:
            raise ValueError(f"run {self.label!r}: cannot tune {unknown}; choose from {TUNABLE}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        values = dataclasses.asdict(self)
        values["overrides"] = _jsonable(dict(self.overrides))
        values["tune"] = list(self.tune)
        values["instruments"] = list(self.instruments)
        return values


@dataclass(frozen=True)
class Figure:
    """One figure of the paper in one mode: its claim, its runs and how the claim is judged.

    Attributes:
        id: the figure's id as the command line takes it (``"1A"``, ``"3CD"``, ``"F"``, ...).
        title: one line, e.g. ``"Fig. 1A: KFAC vs subsampled natural gradients"``.
        claim: the paper's claim in one sentence.
        mode: one of :data:`MODES`.
        runs: the curves.
        checks: how the claim is judged (see :mod:`foof.experiments.checks`).
        base: :class:`~foof.train.TrainConfig` fields shared by all runs (each run's
            ``overrides`` win).
        seeds: number of seeds (``0 .. seeds-1``) each run is repeated with.
        metric: the main metric of the figure (a :func:`foof.experiments.checks.metric_value`
            name), tabulated per run in the report.
        plot: plot style, one of :data:`PLOTS`.
        kind: one of :data:`KINDS`.
        instrument_every: runs with instruments measure every this many steps.
        test_subset: evaluate on only the first this many test images (quick mode, where
            evaluating 10,000 images would cost more than training); ``None`` for all.
        reduction: what this mode drops from the paper's setting (fewer seeds or epochs, a
            smaller network, ...), printed in the report; ``None`` if nothing.
        notes: further remarks for the report (interpretations, deviations from the paper).
        paper: the paper's numbers for this figure where it states any, for the report.
        options: settings of the figure's kind beyond the training config (for ``"laplace"``:
            :class:`foof.experiments.laplace.LaplaceOptions` fields); part of every run's
            record, so changing them reruns the figure.
    """

    id: str
    title: str
    claim: str
    mode: str
    runs: tuple[Run, ...]
    checks: tuple[Any, ...] = ()
    base: Mapping[str, Any] = field(default_factory=dict)
    seeds: int = 3
    metric: str = "final_train_loss"
    plot: str = "curves"
    kind: str = "train"
    instrument_every: int = 1
    test_subset: int | None = None
    reduction: str | None = None
    notes: str = ""
    paper: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.plot not in PLOTS:
            raise ValueError(f"plot must be one of {PLOTS}, got {self.plot!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        labels = [run.label for run in self.runs]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ValueError(f"figure {self.id}: duplicate run labels {duplicates}")
        for check in self.checks:
            missing = sorted(set(check.labels()) - set(labels))
            if missing:
                raise ValueError(f"figure {self.id}: check {check} names unknown runs {missing}")

    def run(self, label: str) -> Run:
        """The run called ``label``."""
        for run in self.runs:
            if run.label == label:
                return run
        raise KeyError(
            f"figure {self.id} has no run {label!r}; runs: {', '.join(r.label for r in self.runs)}"
        )

    def hyperparameter_key(self, run: Run) -> str:
        """The key of ``run``'s entry in ``hyperparameters.json``."""
        return run.hyperparameters or f"{self.id}/{run.label}"

    def config(
        self, run: Run, seed: int = 0, tuned: Mapping[str, Any] | None = None
    ) -> TrainConfig:
        """The resolved :class:`~foof.train.TrainConfig` of ``run`` with ``seed``.

        Args:
            run: one of :attr:`runs`.
            seed: the run's seed.
            tuned: hyperparameters replacing the spec's (only the names in ``run.tune`` are
                taken).

        Returns:
            The config, resolved (see :meth:`foof.train.TrainConfig.resolved`) and validated.
        """
        values: dict[str, Any] = {**dict(self.base), **dict(run.overrides)}
        for name, value in (tuned or {}).items():
            if name in run.tune:
                values[name] = value
        values["seed"] = seed
        config = TrainConfig(**_config_fields(values)).resolved()
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (claims, runs, checks), saved next to the results."""
        return {
            "id": self.id,
            "title": self.title,
            "claim": self.claim,
            "mode": self.mode,
            "runs": [run.to_dict() for run in self.runs],
            "checks": [check.to_dict() for check in self.checks],
            "base": {k: _jsonable(v) for k, v in self.base.items()},
            "seeds": self.seeds,
            "metric": self.metric,
            "plot": self.plot,
            "kind": self.kind,
            "instrument_every": self.instrument_every,
            "test_subset": self.test_subset,
            "reduction": self.reduction,
            "notes": self.notes,
            "paper": self.paper,
            "options": _jsonable(dict(self.options)),
        }


def _config_fields(values: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown TrainConfig field(s): {', '.join(unknown)}")
    return dict(values)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value
