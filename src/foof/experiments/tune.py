"""``foof tune``: the paper's grid search (App. D.2) for one run of a figure.

* learning rates ``1·10^i`` and ``3·10^i``: five values around the current one;
* damping ``10^{2k}`` (the paper's ``10^{-6}, 10^{-4}, …, 10^6``): three values around the
  current one, for the runs that tune it;
* momentum ``{0, 0.9}`` for SGD;
* the product of these axes is trained (optionally for a shortened budget of epochs), and while
  the best point sits on the edge of the learning-rate or damping axis, that axis is extended by
  one value in that direction (at most ``max_extensions`` times per side);
* the best mean final training loss over the seeds wins (a diverged run counts as ``inf``).

The winner, the whole grid and the command that regenerates it are saved in
``hyperparameters.json`` (:mod:`foof.experiments.hyperparameters`), which ``foof reproduce``
reads. Every grid point's results file lives under ``OUT/<mode>/<figure>/<label>/``, so an
interrupted search resumes where it stopped.
"""

from __future__ import annotations

import datetime
import itertools
import math
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from foof.experiments import hyperparameters as hp
from foof.experiments.checks import format_number, metric_value
from foof.experiments.figures import build
from foof.experiments.runner import DataCache, PlannedRun, execute, is_done
from foof.experiments.spec import Figure, Run
from foof.io import read_json
from foof.train import TrainConfig

DEFAULT_ROOT = Path("runs") / "tuning"
"""Where ``foof tune`` keeps its grid runs by default: ``runs/tuning/<mode>/<figure>/<label>``."""

MOMENTA = (0.0, 0.9)
"""SGD's momentum grid (App. D.2)."""


def lr_value(index: int) -> float:
    """The ``index``-th learning rate of the grid ``…, 0.1, 0.3, 1, 3, 10, …`` (``0 ↦ 1``)."""
    decade, third = divmod(index, 2)
    return float(f"{3 if third else 1}e{decade}")


def lr_index(value: float) -> int:
    """The grid index of the learning rate nearest to ``value`` (in log scale)."""
    if not value > 0:
        raise ValueError(f"learning rate must be > 0, got {value!r}")
    return min(range(-40, 41), key=lambda i: abs(math.log10(lr_value(i)) - math.log10(value)))


def damping_value(index: int) -> float:
    """The ``index``-th damping of the grid ``10^{2k}`` (``0 ↦ 1``)."""
    return float(f"1e{2 * index}")


def damping_index(value: float) -> int:
    """The grid index of the damping nearest to ``value`` (in log scale)."""
    if not value > 0:
        raise ValueError(f"damping must be > 0, got {value!r}")
    return math.floor(math.log10(value) / 2 + 0.5)


def tunable_runs(figure: Figure) -> list[Run]:
    """The runs of ``figure`` that own their hyperparameter entry (others share one)."""
    return [
        run
        for run in figure.runs
        if run.tune and figure.hyperparameter_key(run).split("/")[0] == figure.id
    ]


def tune(
    figure_name: str,
    method: str,
    mode: str = "quick",
    *,
    budget_epochs: int | None = None,
    seeds: int = 1,
    out: str | os.PathLike[str] | None = None,
    max_extensions: int = 3,
    hyperparameters_path: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    save: bool = True,
    log: Any = None,
) -> dict[str, Any]:
    """Grid-search the hyperparameters of run ``method`` of figure ``figure_name``.

    Args:
        figure_name: a figure id.
        method: the run's label in that figure.
        mode: ``"quick"`` or ``"standard"``.
        budget_epochs: train each grid point for this many epochs instead of the figure's (the
            entry records it as a short tuning run).
        seeds: seeds per grid point (``0 .. seeds-1``).
        out: directory of the grid runs; ``None`` for ``runs/tuning``.
        max_extensions: how often each side of an axis may be extended.
        hyperparameters_path: the file to update; ``None`` for the package's.
        data_dir: directory searched first for the data.
        progress: show a progress bar.
        save: write the entry (else only return it).
        log: stream for one line per grid point (default ``sys.stderr``).

    Returns:
        The entry: ``values`` (the winner), ``objective``, ``grid``, ``command``, ....

    Raises:
        KeyError: unknown figure or run.
        ValueError: the run has nothing to tune, or shares another figure's entry.
    """
    log = sys.stderr if log is None else log
    figure = build(figure_name, mode)
    run = figure.run(method)
    key = figure.hyperparameter_key(run)
    if not run.tune:
        raise ValueError(f"run {method!r} of figure {figure.id} has no hyperparameters to tune")
    owner = key.split("/")[0]
    if owner != figure.id:
        source = key.split("/", 1)[1]
        raise ValueError(
            f"run {method!r} of figure {figure.id} shares figure {owner}'s hyperparameters "
            f"(as in the paper); tune them with `foof tune {owner} --method {source}`"
        )
    entries = hp.load(hyperparameters_path)
    current, _, _ = hp.lookup(entries, key, mode)
    start = figure.config(run, 0, current)
    if budget_epochs is not None and budget_epochs < 1:
        raise ValueError(f"budget_epochs must be >= 1, got {budget_epochs!r}")
    epochs = budget_epochs if budget_epochs is not None else start.epochs

    axes: dict[str, list[int] | list[float]] = {}
    if "lr" in run.tune:
        center = lr_index(start.lr)
        axes["lr"] = list(range(center - 2, center + 3))
    if "damping" in run.tune and start.damping is not None:
        center = damping_index(start.damping)
        axes["damping"] = list(range(center - 1, center + 2))
    if "momentum" in run.tune:
        axes["momentum"] = list(MOMENTA)
    directory = Path(out or DEFAULT_ROOT) / mode / figure.id / run.label
    cache = DataCache(data_dir)
    results: dict[tuple, float] = {}
    extensions = {(name, side): 0 for name in ("lr", "damping") for side in (-1, 1)}
    bar = tqdm(disable=not progress, desc=f"tune {figure.id}/{run.label}", unit="run")
    try:
        while True:
            points = [p for p in itertools.product(*axes.values()) if p not in results]
            bar.total = (bar.total or 0) + len(points) * seeds
            bar.refresh()
            for point in points:
                values = _values(axes, point)
                losses = []
                for seed in range(seeds):
                    planned = _planned(figure, run, values, seed, epochs, directory)
                    if not is_done(planned.path, planned.record):
                        execute(planned, cache, progress=False)
                    losses.append(metric_value(read_json(planned.path), "final_train_loss"))
                    bar.update()
                results[point] = math.fsum(losses) / len(losses)
                text = ", ".join(f"{k}={v:g}" for k, v in values.items())
                bar.write(
                    f"foof: tune {figure.id}/{run.label}: {text}: final train loss "
                    f"{format_number(results[point])}",
                    file=log,
                )
            best = min(results, key=lambda p: (results[p], p))
            if not _extend(axes, best, results, extensions, max_extensions):
                break
    finally:
        bar.close()
    best = min(results, key=lambda p: (results[p], p))
    names = list(axes)
    entry = {
        "values": _values(axes, best),
        "objective": None if math.isinf(results[best]) else results[best],
        "budget_epochs": epochs,
        "epochs": start.epochs,
        "seeds": seeds,
        "grid": [
            {**_values(axes, p), "loss": None if math.isinf(v) else v}
            for p, v in sorted(results.items())
        ],
        "axes": names,
        "command": tune_command(figure.id, run.label, mode, budget_epochs, seeds),
        "note": (
            f"short tuning run: {epochs} of {start.epochs} epochs"
            if epochs < start.epochs
            else "full-length tuning runs"
        ),
        "updated": datetime.date.today().isoformat(),
    }
    if save:
        hp.save_entry(key, mode, entry, hyperparameters_path)
    return entry


def tune_command(figure: str, label: str, mode: str, budget_epochs: int | None, seeds: int) -> str:
    """The ``foof tune`` command line that regenerates an entry."""
    parts = ["foof", "tune", figure, "--method", label, "--mode", mode]
    if budget_epochs is not None:
        parts += ["--budget-epochs", str(budget_epochs)]
    if seeds != 1:
        parts += ["--seeds", str(seeds)]
    return shlex.join(parts)


def _values(axes: dict[str, Sequence], point: tuple) -> dict[str, float]:
    values = {}
    for name, value in zip(axes, point):
        if name == "lr":
            values[name] = lr_value(value)
        elif name == "damping":
            values[name] = damping_value(value)
        else:
            values[name] = float(value)
    return values


def _extend(
    axes: dict[str, list],
    best: tuple,
    results: dict[tuple, float],
    extensions: dict[tuple[str, int], int],
    max_extensions: int,
) -> bool:
    """Extend the lr/damping axes where ``best`` sits on their edge; False if none was."""
    extended = False
    names = list(axes)
    all_diverged = all(math.isinf(v) for v in results.values())
    for name in ("lr", "damping"):
        if name not in axes:
            continue
        values = axes[name]
        position = best[names.index(name)]
        for side, edge in ((-1, values[0]), (1, values[-1])):
            on_edge = position == edge
            if all_diverged:  # nothing trains: only smaller learning rates can help
                on_edge = name == "lr" and side == -1
            if on_edge and extensions[(name, side)] < max_extensions:
                extensions[(name, side)] += 1
                if side < 0:
                    values.insert(0, values[0] - 1)
                else:
                    values.append(values[-1] + 1)
                extended = True
    return extended


def _planned(
    figure: Figure,
    run: Run,
    values: dict[str, float],
    seed: int,
    epochs: int,
    directory: Path,
) -> PlannedRun:
    config = figure.config(run, seed, values)
    # Only the final training loss matters here: evaluate it once, at the end.
    config = TrainConfig.from_dict(
        {**config.to_dict(), "epochs": epochs, "eval_every_epoch": False, "eval_train": True}
    )
    name = "-".join(f"{k}{v:g}" for k, v in values.items())
    path = directory / f"{name}-e{epochs}-seed{seed}.json"
    bare = Run(run.label, run.legend, run.overrides, run.tune, run.hyperparameters)
    return PlannedRun(figure, bare, seed, config, path, {"values": values, "source": "grid"})
