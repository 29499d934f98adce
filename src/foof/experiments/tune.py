"""``foof tune``: the paper's grid search (App. D.2) for one run of a figure.

``protocol="full-budget"`` (the default) is the paper's protocol: the winner is the best final
training loss at the figure's whole budget, on the paper's grids (learning rate ``{1, 3}·10^i``,
damping ``10^{2k}`` from ``10^{-6}`` to ``10^6``, momentum ``{0, 0.9}`` where tuned), extended
without a cap while a best or near-best point sits on an edge that is not a divergence boundary;
successive halving on prefixes of the full runs keeps its cost down
(:mod:`foof.experiments.search`). Every point and rung is written to a record
(``<record>/<mode>/<figure>/<label>.json``) as soon as it finishes, and a rerun of the same
command skips what the record (or a results file, or a checkpoint) already holds, so an
interrupted search resumes, also in another session from a committed record.

``protocol="short"`` keeps the earlier searches below, each point at one fixed budget:

* damping ``10^{2k}``: the paper's ``10^{-6}, 10^{-4}, …, 10^6`` (or a given subset), for the
  runs that tune it; momentum ``{0, 0.9}`` for SGD;
* for every damping (and momentum) value, a learning-rate line search over ``1·10^i`` and
  ``3·10^i``: five values (centred on the best of the neighbouring damping's line), extended by
  one value while that line's best sits on an edge (at most ``max_extensions`` times per side),
  so that each damping gets its own learning rate (as the paper does for Fig. 3C); the damping
  axis itself is extended the same way when the overall best sits on its edge;
* every point trains for the figure's epochs or a shortened budget; the best mean final
  training loss over the seeds wins (a diverged run counts as ``inf``).

``search="window"`` is the earlier, more local variant: one product grid of five learning rates
by three dampings around the current values, extended at its edges.

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
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from foof.experiments import hyperparameters as hp
from foof.experiments.checks import format_number, metric_value
from foof.experiments.figures import build
from foof.experiments.runner import DataCache, PlannedRun, execute, is_done
from foof.experiments.search import SearchResult, full_budget_search, rungs
from foof.experiments.spec import Figure, Run
from foof.io import read_json, write_json_atomic
from foof.train import TrainConfig

DEFAULT_ROOT = Path("runs") / "tuning"
"""Where ``foof tune`` keeps its grid runs by default: ``runs/tuning/<mode>/<figure>/<label>``."""

MOMENTA = (0.0, 0.9)
"""SGD's momentum grid (App. D.2)."""

PAPER_DAMPINGS = tuple(range(-3, 4))
"""Indices of the paper's damping grid ``10^{-6}, 10^{-4}, …, 10^6`` (see :func:`damping_value`)."""

SEARCHES = ("rows", "window")
"""Search strategies of the ``short`` protocol of :func:`tune`."""

PROTOCOLS = ("full-budget", "short")
"""``full-budget`` (default): :mod:`foof.experiments.search`, winners by their final loss at
the figure's whole budget; ``short``: the earlier searches (:data:`SEARCHES`), every point at a
fixed, possibly shortened budget."""

RECORD_FORMAT = "foof.tune/1"
"""Version tag of a full-budget tuning record (every point tried, per rung)."""


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
    search: str = "rows",
    dampings: Sequence[float] | None = None,
    hyperparameters_path: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    save: bool = True,
    log: Any = None,
    protocol: str = "full-budget",
    record: str | os.PathLike[str] | None = None,
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
        max_extensions: how often each side of an axis (of each row's lr line) may be extended.
        search: ``"rows"`` (default): for every damping (and momentum) value, its own learning
            rate line search, as the paper does for Fig. 3C; ``"window"``: one product grid
            around the current values (an earlier, more local search).
        dampings: the damping values to search (default: the paper's ``10^{-6}, …, 10^6`` for
            ``"rows"``; three around the current value for ``"window"``).
        hyperparameters_path: the file to update; ``None`` for the package's.
        data_dir: directory searched first for the data.
        progress: show a progress bar.
        save: write the entry (else only return it).
        log: stream for one line per grid point (default ``sys.stderr``).
        protocol: one of :data:`PROTOCOLS`; ``full-budget`` ignores ``budget_epochs``,
            ``search`` and ``max_extensions`` (it has its own rules) and refuses a
            ``budget_epochs`` other than the figure's.
        record: directory of full-budget tuning records (default: ``out``).

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

    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if protocol == "full-budget" and epochs != start.epochs:
        raise ValueError(
            f"the full-budget protocol tunes at the figure's {start.epochs} epochs; "
            f"--budget-epochs {epochs} belongs to --protocol short"
        )
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {', '.join(SEARCHES)}, got {search!r}")
    axes: dict[str, list] = {}
    if "lr" not in run.tune:
        raise ValueError(f"run {method!r} of figure {figure.id} does not tune its learning rate")
    center = lr_index(start.lr)
    axes["lr"] = list(range(center - 2, center + 3))
    if "damping" in run.tune and start.damping is not None:
        if dampings:
            axes["damping"] = sorted({damping_index(d) for d in dampings})
        elif search == "rows":
            axes["damping"] = list(PAPER_DAMPINGS)
        else:
            center = damping_index(start.damping)
            axes["damping"] = list(range(center - 1, center + 2))
    if "momentum" in run.tune:
        axes["momentum"] = list(MOMENTA)
    directory = Path(out or DEFAULT_ROOT) / mode / figure.id / run.label
    cache = DataCache(data_dir)
    if protocol == "full-budget":
        if "damping" in axes and not dampings:
            axes["damping"] = list(PAPER_DAMPINGS)
        record_path = Path(record or out or DEFAULT_ROOT) / mode / figure.id / f"{run.label}.json"
        entry = _tune_full_budget(
            figure,
            run,
            key,
            start,
            axes,
            seeds,
            directory / "full-budget",
            record_path,
            cache,
            dampings,
            progress,
            log,
        )
        if save:
            hp.save_entry(key, mode, entry, hyperparameters_path)
        return entry
    results: dict[tuple, float] = {}
    bar = tqdm(disable=not progress, desc=f"tune {figure.id}/{run.label}", unit="run")

    def evaluate(points: list[tuple]) -> None:
        points = [p for p in points if p not in results]
        bar.total = (bar.total or 0) + len(points) * seeds
        bar.refresh()
        for point in points:
            values = _values(names, point)
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

    names = list(axes)
    try:
        if search == "window":
            extensions = {(name, side): 0 for name in ("lr", "damping") for side in (-1, 1)}
            while True:
                evaluate(list(itertools.product(*axes.values())))
                best = min(results, key=lambda p: (results[p], p))
                if not _extend(axes, best, results, extensions, max_extensions):
                    break
        else:
            start_damping = damping_index(start.damping) if "damping" in axes else None
            _search_rows(axes, results, evaluate, max_extensions, start_damping)
    finally:
        bar.close()
    best = min(results, key=lambda p: (results[p], p))
    entry = {
        "values": _values(names, best),
        "objective": None if math.isinf(results[best]) else results[best],
        "budget_epochs": epochs,
        "epochs": start.epochs,
        "seeds": seeds,
        "protocol": "short",
        "search": search,
        "grid": [
            {**_values(names, p), "loss": None if math.isinf(v) else v}
            for p, v in sorted(results.items())
        ],
        "axes": names,
        "command": tune_command(
            figure.id,
            run.label,
            mode,
            budget_epochs,
            seeds,
            search,
            dampings,
            max_extensions,
            protocol="short",
        ),
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


def tune_command(
    figure: str,
    label: str,
    mode: str,
    budget_epochs: int | None,
    seeds: int,
    search: str = "rows",
    dampings: Sequence[float] | None = None,
    max_extensions: int = 3,
    protocol: str = "full-budget",
) -> str:
    """The ``foof tune`` command line that regenerates an entry."""
    parts = ["foof", "tune", figure, "--method", label, "--mode", mode]
    if protocol == "full-budget":
        if seeds != 1:
            parts += ["--seeds", str(seeds)]
        if dampings:
            parts += ["--dampings", ",".join(f"{d:g}" for d in dampings)]
        return shlex.join(parts)
    parts += ["--protocol", protocol]
    if budget_epochs is not None:
        parts += ["--budget-epochs", str(budget_epochs)]
    if seeds != 1:
        parts += ["--seeds", str(seeds)]
    if search != "rows":
        parts += ["--search", search]
    if dampings:
        parts += ["--dampings", ",".join(f"{d:g}" for d in dampings)]
    if max_extensions != 3:
        parts += ["--max-extensions", str(max_extensions)]
    return shlex.join(parts)


def _tune_full_budget(
    figure: Figure,
    run: Run,
    key: str,
    start: TrainConfig,
    axes: dict[str, list],
    seeds: int,
    directory: Path,
    record_path: Path,
    cache: DataCache,
    dampings: Sequence[float] | None,
    progress: bool,
    log: Any,
) -> dict[str, Any]:
    """The full-budget protocol (:mod:`foof.experiments.search`) on real training runs."""
    names = list(axes)
    full = start.epochs
    budgets = rungs(full)
    record = _load_record(record_path, figure, run, key, names, budgets, seeds)
    record_path.parent.mkdir(parents=True, exist_ok=True)
    done = {_record_key(p): p for p in record["points"]}
    bar = tqdm(disable=not progress, desc=f"tune {figure.id}/{run.label}", unit="run")

    def evaluate(point: tuple, epochs: int) -> float:
        values = _values(names, point)
        entry = done.get(_record_key(values))
        if entry is not None and str(epochs) in entry["budgets"]:
            loss = entry["budgets"][str(epochs)]["loss"]
            return math.inf if loss is None else loss
        losses, seconds = [], 0.0
        for seed in range(seeds):
            planned = _planned(figure, run, values, seed, full, directory)
            loss = _rung_loss(planned, epochs)
            if loss is None:
                tick = time.perf_counter()
                execute(planned, cache, progress=False, stop_after_epochs=epochs)
                seconds += time.perf_counter() - tick
                loss = _rung_loss(planned, epochs)
                if loss is None:  # pragma: no cover - train always evaluates where it stops
                    raise RuntimeError(f"{planned.path} holds no loss after epoch {epochs}")
            losses.append(loss)
            bar.update()
        mean = math.fsum(losses) / len(losses)
        if entry is None:
            entry = done[_record_key(values)] = {**values, "budgets": {}}
            record["points"].append(entry)
        entry["budgets"][str(epochs)] = {
            "loss": None if math.isinf(mean) else mean,
            "diverged": math.isinf(mean),
            "seconds": round(seconds, 2),
        }
        record["updated"] = datetime.datetime.now().isoformat(timespec="seconds")
        write_json_atomic(record_path, record)
        text = ", ".join(f"{k}={v:g}" for k, v in values.items())
        bar.write(
            f"foof: tune {figure.id}/{run.label}: {text}: train loss after {epochs} of {full} "
            f"epochs {format_number(mean)}",
            file=log,
        )
        return mean

    # A resumed search starts where the record's did, whatever hyperparameters.json says now
    # (a finished search has replaced the values it started from).
    origin = record.setdefault("start", {"lr": start.lr, "damping": start.damping})
    start_row = None
    if "damping" in axes:
        start_row = tuple(
            damping_index(origin["damping"]) if name == "damping" else axes[name][0]
            for name in names[1:]
        )
    try:
        result = full_budget_search(
            axes, evaluate, budgets, center_lr=lr_index(origin["lr"]), start_row=start_row
        )
    finally:
        bar.close()
    entry = _full_budget_entry(figure, run, names, result, seeds, dampings, record_path)
    record["result"] = {k: entry[k] for k in ("values", "objective", "finalists", "capped")}
    write_json_atomic(record_path, record)
    return entry


def protocol_problems(entry: dict[str, Any]) -> list[str]:
    """What keeps a ``hyperparameters.json`` entry from meeting the full-budget protocol.

    Met when it was made by ``--protocol full-budget``, its winner's learning-rate neighbours
    ran the full budget and are not better (or diverged), and every row's (damping, momentum)
    best learning rate at the first rung has both neighbours evaluated, the upper one no
    better or diverged: each best is interior to the grid or sits at a divergence edge.

    Returns:
        One sentence per problem; empty when the entry meets the protocol.
    """
    if entry.get("protocol") != "full-budget":
        return [f"tuned by the {entry.get('protocol', 'short')!r} protocol, not 'full-budget'"]
    problems = [f"search hit its safety guard: {', '.join(entry['capped'])}"] * bool(
        entry.get("capped")
    )
    names = entry["axes"]
    rows = [n for n in names if n != "lr"]
    full, first = entry["rungs"][-1], entry["rungs"][0]

    def losses(epochs: int) -> dict[tuple, float]:
        return {
            tuple(point[n] for n in names): math.inf if point["loss"] is None else point["loss"]
            for point in entry["grid"]
            if point["epochs"] == epochs
        }

    def interior(line: dict[int, float], best: int, what: str) -> None:
        for step in (-1, 1):
            neighbour = line.get(best + step)
            if neighbour is None:
                problems.append(f"{what}: lr {lr_value(best):g} has no neighbour at {step:+d}")
            elif neighbour < line[best]:
                problems.append(f"{what}: lr {lr_value(best + step):g} is better")

    winner = entry["values"]
    row = tuple(winner[n] for n in rows)
    at_full = {lr_index(k[0]): v for k, v in losses(full).items() if k[1:] == row}
    interior(at_full, lr_index(winner["lr"]), f"winner at {full} epochs")
    by_row: dict[tuple, dict[int, float]] = {}
    for key, value in losses(first).items():
        by_row.setdefault(key[1:], {})[lr_index(key[0])] = value
    for key, line in sorted(by_row.items()):
        finite = {lr: v for lr, v in line.items() if not math.isinf(v)}
        if not finite:
            continue  # a row where nothing trains has no best to place
        best = min(finite, key=lambda lr: (finite[lr], lr))
        label = ", ".join(f"{n} {v:g}" for n, v in zip(rows, key)) or "the line"
        interior(line, best, f"row {label} at {first} epochs")
    return problems


def _full_budget_entry(
    figure: Figure,
    run: Run,
    names: list[str],
    result: SearchResult,
    seeds: int,
    dampings: Sequence[float] | None,
    record_path: Path,
) -> dict[str, Any]:
    full = result.rungs[-1]
    objective = result.losses[(result.winner, full)]
    grid = [
        {**_values(names, point), "epochs": epochs, "loss": None if math.isinf(v) else v}
        for (point, epochs), v in sorted(result.losses.items())
    ]
    return {
        "values": _values(names, result.winner),
        "objective": None if math.isinf(objective) else objective,
        "budget_epochs": full,
        "epochs": full,
        "seeds": seeds,
        "protocol": "full-budget",
        "rungs": list(result.rungs),
        "finalists": [_values(names, p) for p in result.finalists],
        "capped": list(result.capped),
        "grid": grid,
        "axes": names,
        "record": record_path.as_posix(),
        "command": tune_command(figure.id, run.label, figure.mode, None, seeds, dampings=dampings),
        "note": (
            f"full-budget protocol: every point {result.rungs[0]} epochs, the best third on to "
            f"{', '.join(str(e) for e in result.rungs[1:])}; winner and its neighbours at the "
            f"full {full} epochs"
        ),
        "updated": datetime.date.today().isoformat(),
    }


def _record_key(values: dict[str, Any]) -> tuple:
    return tuple(
        sorted((k, float(v)) for k, v in values.items() if k in ("lr", "damping", "momentum"))
    )


def _load_record(
    path: Path,
    figure: Figure,
    run: Run,
    key: str,
    names: list[str],
    budgets: tuple[int, ...],
    seeds: int,
) -> dict[str, Any]:
    """The record at ``path`` if it belongs to this search (same runs, rungs, seeds), else new.

    A record of another config is not reused: its points would be other runs. The check is on
    the resolved config of the starting point without its tuned values.
    """
    identity = {
        "figure": figure.id,
        "label": run.label,
        "key": key,
        "mode": figure.mode,
        "axes": names,
        "rungs": list(budgets),
        "seeds": seeds,
        "config": _identity_config(figure, run),
    }
    if path.is_file():
        saved = read_json(path)
        if saved.get("format") == RECORD_FORMAT and all(
            saved.get(k) == v for k, v in identity.items()
        ):
            return saved
    return {"format": RECORD_FORMAT, "protocol": "full-budget", **identity, "points": []}


def _identity_config(figure: Figure, run: Run) -> dict[str, Any]:
    config = figure.config(run, 0).to_dict()
    for name in (*run.tune, "seed"):
        config.pop(name, None)
    return config


def _rung_loss(planned: PlannedRun, epochs: int) -> float | None:
    """The training loss of ``planned`` after ``epochs`` epochs, if its results file has it.

    ``inf`` if the run diverged at or before that epoch; None if the file is absent, made by
    another config, or has not evaluated that epoch.
    """
    if not planned.path.is_file():
        return None
    results = read_json(planned.path)
    if results.get("config") != planned.record["config"]:
        return None
    recorded = results["epochs"]
    evaluated = dict(zip(recorded["epoch"], recorded.get("train_eval_loss") or []))
    if epochs in evaluated and evaluated[epochs] is not None:
        return float(evaluated[epochs])
    if results.get("diverged"):
        return math.inf
    return None


def _search_rows(
    axes: dict[str, list],
    results: dict[tuple, float],
    evaluate: Callable[[list[tuple]], None],
    max_extensions: int,
    start_damping: int | None = None,
) -> None:
    """A learning-rate line search per row (damping × momentum value), extending edges.

    Rows are searched outward from the starting damping; each row's five learning rates are
    centred on the best learning rate of the row next to it (inner neighbour), so that a ridge
    ``lr ∝ damping`` (natural gradients) or ``lr ∝ √damping`` (KFAC) is followed across the whole
    damping grid without unbounded extensions.
    """
    row_names = [name for name in axes if name != "lr"]
    window = len(axes["lr"]) // 2
    center = axes["lr"][window]

    def line_search(row: tuple, middle: int) -> int:
        values = list(range(middle - window, middle + window + 1))
        extensions = {-1: 0, 1: 0}
        while True:
            evaluate([(lr, *row) for lr in values])
            losses = {lr: results[(lr, *row)] for lr in values}
            best = min(values, key=lambda lr: (losses[lr], lr))
            if all(math.isinf(v) for v in losses.values()):
                side = -1  # nothing trains: only smaller learning rates can help
            elif best == values[0]:
                side = -1
            elif best == values[-1]:
                side = 1
            else:
                return best
            if extensions[side] >= max_extensions:
                return best
            extensions[side] += 1
            if side < 0:
                values.insert(0, values[0] - 1)
            else:
                values.append(values[-1] + 1)

    if "damping" not in axes:
        for row in itertools.product(*(axes[name] for name in row_names)):
            line_search(row, center)
        return
    position = row_names.index("damping")
    others = [axes[name] for name in row_names if name != "damping"]
    dampings = axes["damping"]
    target = start_damping if start_damping is not None else 0
    first = dampings.index(min(dampings, key=lambda d: abs(d - target)))
    best_lr: dict[tuple, int] = {}

    def search(damping: int, neighbour: int | None) -> None:
        for rest in itertools.product(*others):
            row = (*rest[:position], damping, *rest[position:])
            middle = center
            if neighbour is not None:
                middle = best_lr[(*rest[:position], neighbour, *rest[position:])]
            best_lr[row] = line_search(row, middle)

    search(dampings[first], None)
    for k in range(first - 1, -1, -1):
        search(dampings[k], dampings[k + 1])
    for k in range(first + 1, len(dampings)):
        search(dampings[k], dampings[k - 1])
    extensions = {-1: 0, 1: 0}
    while True:
        best = min(results, key=lambda p: (results[p], p))
        low, high = dampings[0], dampings[-1]
        side = -1 if best[1 + position] == low else 1 if best[1 + position] == high else 0
        if side == 0 or extensions[side] >= max_extensions:
            return
        extensions[side] += 1
        if side < 0:
            dampings.insert(0, low - 1)
            search(low - 1, low)
        else:
            dampings.append(high + 1)
            search(high + 1, high)


def _values(names: Sequence[str], point: tuple) -> dict[str, float]:
    values = {}
    for name, value in zip(names, point):
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
