"""``foof reproduce``: run every (figure, run, seed) that has no complete results file yet.

Layout of an output directory::

    OUT/<figure>/figure.json            the figure's spec (claim, runs, checks) and its command
    OUT/<figure>/<label>-seed<S>.json   one results file per run and seed (foof.train's format,
                                        plus "experiment" and, for instrumented runs, "metrics")

A results file is written atomically once its run is complete, so it is either absent or whole;
a run is *done* when its file exists, is marked ``complete`` and was made with the same resolved
config and instruments as the spec now asks for (a changed hyperparameter reruns it). An
interrupted ``reproduce`` therefore reruns exactly the missing or stale runs. A run whose config
and instruments equal those of a complete run elsewhere in ``OUT`` (Fig. 1B reuses Fig. 1A's
natural-gradient run, for instance) is copied rather than trained again, with ``reused_from``
saying so.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
import time
import traceback
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from foof.data import Dataset, load_dataset
from foof.experiments import hyperparameters as hp
from foof.experiments import laplace
from foof.experiments.checks import format_number, metric_value
from foof.experiments.figures import build
from foof.experiments.instruments import build_instruments, instrument_record
from foof.experiments.spec import Figure, Run
from foof.experiments.toy import toy_example
from foof.io import read_json, write_json_atomic
from foof.train import TrainConfig, train

DEFAULT_ROOT = Path("runs") / "reproduction"
"""Where ``foof reproduce`` writes by default: ``runs/reproduction/<mode>``."""

FIGURE_FILE = "figure.json"

PROTOCOLS = ("tuned", "paper")
"""Where a run's hyperparameters come from: ``tuned`` (``hyperparameters.json``, chosen here by
``foof tune``; the spec's values where an entry is missing) or ``paper`` (the figure spec's
values, the paper's Table D.4 as printed, ignoring every entry)."""


def default_out(mode: str, protocol: str = "tuned") -> Path:
    """The default output directory of ``mode``: ``runs/reproduction/<mode>[-paper]``."""
    return DEFAULT_ROOT / (mode if protocol == "tuned" else f"{mode}-{protocol}")


@dataclass(frozen=True)
class PlannedRun:
    """One (run, seed) of a figure with everything needed to execute it."""

    figure: Figure
    run: Run
    seed: int
    config: TrainConfig | None
    path: Path
    hyperparameters: dict[str, Any]

    @property
    def record(self) -> dict[str, Any]:
        """What a complete results file must match to count as this run.

        Its config and instruments; for Laplace figures also the method and the options.
        """
        record = {
            "config": self.config.to_dict() if self.config is not None else None,
            "instruments": instrument_record(self.run.instruments),
            "instrument_every": self.figure.instrument_every if self.run.instruments else None,
            "test_subset": self.figure.test_subset,
        }
        if self.figure.kind == "laplace":
            record["laplace"] = {
                "method": self.run.label,
                **laplace.options_record(self.figure.options),
            }
        return record

    @property
    def name(self) -> str:
        """``<figure>/<label> seed <S>``."""
        return f"{self.figure.id}/{self.run.label} seed {self.seed}"


@dataclass
class RunOutcome:
    """What :func:`reproduce` did with one run: its status and how long it took.

    ``status`` is ``trained``, ``skipped`` (already done), ``reused`` (copied) or ``failed``.
    """

    name: str
    path: Path
    status: str
    seconds: float = 0.0
    message: str = ""


@dataclass
class DataCache:
    """Datasets loaded once per process, keyed by (name, subset, subset seed)."""

    data_dir: str | os.PathLike[str] | None = None
    download: bool = False
    _cache: dict[tuple[str, int | None, int], Dataset] = field(default_factory=dict)

    def get(self, config: TrainConfig, test_subset: int | None = None) -> Dataset:
        """The dataset ``config`` trains on, its test set cut to ``test_subset`` images."""
        key = (config.dataset, config.subset, config.subset_seed)
        if key not in self._cache:
            self._cache[key] = load_dataset(
                config.dataset,
                data_dir=self.data_dir if self.data_dir is not None else config.data_dir,
                subset=config.subset,
                seed=config.subset_seed,
                download=self.download,
            )
        data = self._cache[key]
        if test_subset is not None and test_subset < len(data.y_test):
            data = dataclasses.replace(
                data, x_test=data.x_test[:test_subset], y_test=data.y_test[:test_subset]
            )
        return data


def plan(
    figure: Figure,
    out: str | os.PathLike[str],
    seeds: int | None = None,
    entries: dict[str, Any] | None = None,
    device: str | None = None,
    protocol: str = "tuned",
) -> list[PlannedRun]:
    """Every (run, seed) of ``figure`` with its resolved config and results path.

    Args:
        figure: the figure.
        out: the output directory (the figure's files go to ``out/<figure id>/``).
        seeds: seeds per run; ``None`` for the figure's own number.
        entries: tuned hyperparameters (:func:`foof.experiments.hyperparameters.load`);
            ``None`` reads the default file.
        device: torch device for every run (``None``: the config's, ``cpu``).
        protocol: one of :data:`PROTOCOLS`; ``paper`` ignores ``entries``.

    Returns:
        The planned runs, run by run, seed by seed.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    entries = {} if protocol == "paper" else hp.load() if entries is None else entries
    seeds = figure.seeds if seeds is None else seeds
    directory = Path(out) / figure.id
    planned = []
    for run in figure.runs:
        key = figure.hyperparameter_key(run)
        values, entry, entry_mode = hp.lookup(entries, key, figure.mode)
        values = {k: v for k, v in values.items() if k in run.tune}
        info: dict[str, Any] = {"key": key, "values": values}
        if entry is not None:
            info.update(
                source=f"tuned ({entry_mode} mode)",
                command=entry.get("command"),
                note=entry.get("note"),
                search=entry.get("search", "window"),
                protocol=entry.get("protocol", "short"),
            )
        elif protocol == "paper":
            info["source"] = "paper's values (Table D.4 as printed, or a default)"
        else:
            info["source"] = "figure spec (paper's Table D.4 or a default; not tuned)"
        for seed in range(seeds):
            config = None
            if figure.kind in ("train", "laplace"):
                config = figure.config(run, seed, values)
                if device is not None:
                    config = TrainConfig.from_dict({**config.to_dict(), "device": device})
            path = directory / f"{run.label}-seed{seed}.json"
            planned.append(PlannedRun(figure, run, seed, config, path, info))
    return planned


def checkpoint_path(results_path: Path) -> Path:
    """Where the run writing ``results_path`` keeps its checkpoint (``<label>-seed<S>.ckpt.pt``).

    A ``reproduce`` stopped by SIGINT/SIGTERM leaves it behind; the next ``reproduce`` resumes
    the run from it (see :func:`foof.train.train`).
    """
    return results_path.with_name(results_path.stem + ".ckpt.pt")


def is_done(path: Path, record: dict[str, Any]) -> bool:
    """Whether ``path`` holds complete results made with ``record``'s config and instruments."""
    results = _read(path)
    return results is not None and _matches(results, record)


def reproduce(
    figures: Iterable[str | Figure],
    mode: str = "quick",
    *,
    out: str | os.PathLike[str] | None = None,
    seeds: int | None = None,
    progress: bool = True,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    entries: dict[str, Any] | None = None,
    device: str | None = None,
    command: str | None = None,
    log: Any = None,
    protocol: str = "tuned",
) -> list[RunOutcome]:
    """Run what is missing of ``figures`` and return what happened to each run.

    Args:
        figures: figure ids (see :data:`foof.experiments.figures.FIGURES`) or
            :class:`~foof.experiments.spec.Figure` objects (used as they are, whatever ``mode``).
        mode: ``"quick"`` or ``"standard"`` for figures given by id.
        out: output directory; ``None`` for :func:`default_out`.
        seeds: seeds per run; ``None`` for each figure's own number.
        progress: show progress bars (one over the runs, one inside each run).
        data_dir: directory searched first for the data.
        download: let the data loader fetch missing datasets.
        entries: tuned hyperparameters; ``None`` reads ``hyperparameters.json``.
        device: torch device for every run.
        command: the command line recorded in each ``figure.json`` (default: rebuilt from the
            arguments).
        log: stream for one line per run (default ``sys.stderr``).
        protocol: :data:`PROTOCOLS`: ``tuned`` (default) or ``paper`` (the spec's values).

    Returns:
        One :class:`RunOutcome` per run and seed.
    """
    log = sys.stderr if log is None else log
    out = Path(out) if out is not None else default_out(mode, protocol)
    specs = [f if isinstance(f, Figure) else build(f, mode) for f in figures]
    entries = hp.load() if entries is None else entries
    plans = {spec.id: plan(spec, out, seeds, entries, device, protocol) for spec in specs}
    index = _index(out)
    cache = DataCache(data_dir, download)
    outcomes: list[RunOutcome] = []
    total = sum(len(p) for p in plans.values())
    bar = tqdm(total=total, disable=not progress, desc="reproduce", unit="run", position=0)
    try:
        for spec in specs:
            directory = out / spec.id
            directory.mkdir(parents=True, exist_ok=True)
            figure_seeds = spec.seeds if seeds is None else seeds
            figure_command = command or reproduce_command(
                spec.id,
                spec.mode,
                out,
                seeds,
                device=device,
                data_root=_data_root(spec, data_dir),
                protocol=protocol,
            )
            _write_figure(directory, spec, figure_seeds, figure_command, plans[spec.id], protocol)
            for planned in plans[spec.id]:
                bar.set_description(f"reproduce {planned.name}")
                outcome = _execute(planned, index, cache, progress)
                outcomes.append(outcome)
                if outcome.status != "skipped" or not progress:
                    bar.write(_describe(outcome), file=log)
                bar.update()
    finally:
        bar.close()
    return outcomes


def reproduce_command(
    figure: str,
    mode: str,
    out: str | os.PathLike[str] | None,
    seeds: int | None,
    device: str | None = None,
    data_root: str | os.PathLike[str] | None = None,
    protocol: str = "tuned",
) -> str:
    """The ``foof reproduce`` command line that regenerates ``figure``.

    ``device`` (unless CPU) and ``data_root`` (where CIFAR/SVHN were read from) are part of it;
    the directory of the bundled MNIST files is not, being a property of the machine.
    """
    parts = ["foof", "reproduce", figure, "--mode", mode]
    if protocol != "tuned":
        parts += ["--protocol", protocol]
    if seeds is not None:
        parts += ["--seeds", str(seeds)]
    if out is not None and Path(out) != default_out(mode, protocol):
        parts += ["--out", str(out)]
    if data_root is not None:
        parts += ["--data-root", str(data_root)]
    if device is not None and device != "cpu":
        parts += ["--device", device]
    return shlex.join(parts)


def _data_root(figure: Figure, data_dir: str | os.PathLike[str] | None) -> str | None:
    """``data_dir`` if ``figure`` reads a dataset from a user's root (CIFAR, SVHN), else None."""
    from foof.data import VISION_DATASETS

    datasets = {figure.base.get("dataset")} | {r.overrides.get("dataset") for r in figure.runs}
    real = {d for d in datasets if d in VISION_DATASETS and not str(d).startswith("fake")}
    return str(data_dir) if data_dir is not None and real else None


def execute(
    planned: PlannedRun,
    cache: DataCache | None = None,
    progress: bool = False,
    stop_after_epochs: int | None = None,
) -> dict[str, Any]:
    """Run one planned run (train it, or compute the toy example) and save its results.

    Args:
        planned: the run.
        cache: datasets already loaded.
        progress: show the training progress bar.
        stop_after_epochs: train only this many epochs of the run, keeping its checkpoint so a
            later call continues it (see :func:`foof.train.train`); training runs only.

    Returns:
        The results dictionary written to ``planned.path``.
    """
    cache = cache or DataCache()
    start = time.perf_counter()
    # Numerical warnings (a Cholesky falling back to eigh, ...) can come once per step; they
    # are counted into the results instead of flooding the log.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if planned.figure.kind == "toy":
            results = toy_example()
        elif planned.figure.kind == "laplace":
            assert planned.config is not None
            results = laplace.evaluate(
                planned.run.label,
                planned.config,
                planned.figure.options,
                cache.get(planned.config, planned.figure.test_subset),
                planned.path.parent / f"map-model-seed{planned.seed}.pt",
                progress=progress,
            )
        else:
            assert planned.config is not None
            instruments = build_instruments(
                planned.run.instruments, planned.figure.instrument_every
            )
            results = train(
                planned.config,
                progress=progress,
                data=cache.get(planned.config, planned.figure.test_subset),
                callbacks=instruments,
                checkpoint=checkpoint_path(planned.path),
                stop_after_epochs=stop_after_epochs,
            )
            if instruments:
                results["metrics"] = {inst.name: inst.summary() for inst in instruments}
    messages = [f"{w.category.__name__}: {w.message}" for w in caught]
    results["experiment"] = {
        "figure": planned.figure.id,
        "label": planned.run.label,
        "legend": planned.run.legend,
        "seed": planned.seed,
        "mode": planned.figure.mode,
        **planned.record,
        "hyperparameters": planned.hyperparameters,
        "reused_from": None,
        "seconds": time.perf_counter() - start,
        "warnings": {"count": len(messages), "first": list(dict.fromkeys(messages))[:3]},
    }
    planned.path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(planned.path, results)
    return results


def _execute(
    planned: PlannedRun, index: dict[str, Path], cache: DataCache, progress: bool
) -> RunOutcome:
    record = planned.record
    done = _read(planned.path)
    if done is not None and _matches(done, record):
        _refresh_provenance(planned, done)
        return RunOutcome(planned.name, planned.path, "skipped")
    start = time.perf_counter()
    source = index.get(_digest(record))
    if source is not None and source != planned.path:
        results = _read(source)
        if results is not None and _matches(results, record):
            results["experiment"] = {
                **results.get("experiment", {}),
                "figure": planned.figure.id,
                "label": planned.run.label,
                "legend": planned.run.legend,
                "seed": planned.seed,
                "mode": planned.figure.mode,
                "hyperparameters": planned.hyperparameters,
                "reused_from": str(source.relative_to(source.parent.parent)),
            }
            write_json_atomic(planned.path, results)
            return RunOutcome(planned.name, planned.path, "reused", message=f"same run as {source}")
    try:
        results = execute(planned, cache, progress)
    except KeyboardInterrupt:
        raise
    except Exception as error:  # noqa: BLE001 - one failing run must not stop the others
        detail = "".join(traceback.format_exception_only(type(error), error)).strip()
        return RunOutcome(planned.name, planned.path, "failed", time.perf_counter() - start, detail)
    index[_digest(record)] = planned.path
    message = ""
    if planned.figure.kind == "train":
        loss = metric_value(results, "final_train_loss")
        message = f"final train loss {format_number(loss)}"
        if results.get("diverged"):
            message = f"diverged at step {results['diverged_step']}"
    count = results["experiment"]["warnings"]["count"]
    if count:
        message += f"; {count} warning(s) recorded in the results file"
    return RunOutcome(planned.name, planned.path, "trained", time.perf_counter() - start, message)


def _refresh_provenance(planned: PlannedRun, results: dict[str, Any]) -> None:
    """Record where a finished run's values now come from, if that changed since it ran.

    A search that confirms the values a run already used (``foof tune`` choosing the spec's
    learning rate, say) does not change the run, only the record of where its values come from;
    the report reads that record, so it is brought up to date instead of retraining.
    """
    if "experiment" not in results:
        return
    if results["experiment"].get("hyperparameters") != planned.hyperparameters:
        results["experiment"]["hyperparameters"] = planned.hyperparameters
        write_json_atomic(planned.path, results)


def _describe(outcome: RunOutcome) -> str:
    text = f"foof: {outcome.name}: {outcome.status}"
    if outcome.seconds:
        text += f" in {outcome.seconds:.1f} s"
    if outcome.message:
        text += f" ({outcome.message})"
    return text


def _write_figure(
    directory: Path,
    spec: Figure,
    seeds: int,
    command: str,
    planned: Sequence[PlannedRun],
    protocol: str = "tuned",
) -> None:
    description = spec.to_dict()
    description["protocol"] = protocol
    description["seeds"] = seeds
    description["command"] = command
    description["hyperparameters"] = {p.run.label: p.hyperparameters for p in planned}
    path = directory / FIGURE_FILE
    if _read_any(path) != description:
        write_json_atomic(path, description)


def _read_any(path: Path) -> Any:
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def _read(path: Path) -> dict[str, Any] | None:
    """Complete results at ``path``, else None (absent, partial or unreadable)."""
    results = _read_any(path)
    if not isinstance(results, dict) or not results.get("complete"):
        return None
    return results


def _with_defaults(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """``config`` with TrainConfig fields added since it was written set to their defaults.

    A results file written before a field existed was made with that field's default, so it
    still counts as the same run.
    """
    if config is None:
        return None
    defaults = TrainConfig().to_dict()
    return {**{k: v for k, v in defaults.items() if k not in config}, **config}


def _matches(results: dict[str, Any], record: dict[str, Any]) -> bool:
    experiment = results.get("experiment", {})
    if record["config"] is not None and _with_defaults(results.get("config")) != record["config"]:
        return False
    return (
        experiment.get("instruments", []) == record["instruments"]
        and experiment.get("instrument_every") == record["instrument_every"]
        and experiment.get("test_subset") == record["test_subset"]
        and experiment.get("laplace") == record.get("laplace")
    )


def _digest(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True)


def _index(out: Path) -> dict[str, Path]:
    """Complete training results under ``out`` by their config and instruments."""
    index: dict[str, Path] = {}
    if not out.is_dir():
        return index
    for path in sorted(out.glob("*/*-seed*.json")):
        results = _read(path)
        if results is None or "experiment" not in results or results.get("config") is None:
            continue
        experiment = results["experiment"]
        if experiment.get("reused_from"):
            continue
        record = {
            "config": _with_defaults(results["config"]),
            "instruments": experiment.get("instruments", []),
            "instrument_every": experiment.get("instrument_every"),
            "test_subset": experiment.get("test_subset"),
        }
        if experiment.get("laplace") is not None:
            record["laplace"] = experiment["laplace"]
        index.setdefault(_digest(record), path)
    return index
