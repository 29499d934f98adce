"""The experiment commands of ``foof``: ``reproduce``, ``tune`` and ``report``.

:func:`add_commands` adds them to ``foof``'s subparsers (see :func:`foof.cli.build_parser`).
Handlers return the exit status: 0 on success, 1 if some run failed (the others still ran),
2 for bad arguments (argparse's own exit, or a :class:`~foof.train.ConfigError`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from foof.experiments.figures import FIGURES, figure_id
from foof.experiments.spec import MODES
from foof.train import ConfigError


def add_commands(commands: Any) -> None:
    """Add ``reproduce``, ``tune`` and ``report`` to an argparse subparsers object."""
    figures = ", ".join(FIGURES)

    reproduce = commands.add_parser(
        "reproduce",
        help="run the paper's figures (resumable) and write their results",
        description=f"Run figures ({figures}, or 'all'): one results file per run and seed "
        "under OUT/<figure>/. Runs with a complete results file are skipped, so an interrupted "
        "reproduce reruns only what is missing.",
    )
    reproduce.add_argument("figures", nargs="+", type=_figure_or_all, metavar="FIGURE")
    _mode(reproduce)
    reproduce.add_argument(
        "--seeds", type=_positive, default=None, help="seeds per run (default: the figure's)"
    )
    reproduce.add_argument(
        "--protocol",
        choices=("tuned", "paper"),
        default="tuned",
        help="tuned (default): hyperparameters from hyperparameters.json (foof tune); paper: "
        "the paper's Table D.4 values (as printed) for every run",
    )
    reproduce.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default: runs/reproduction/MODE, or MODE-paper)",
    )
    reproduce.add_argument(
        "--data-dir",
        "--data-root",
        dest="data_dir",
        default=None,
        help="directory searched first for data (for CIFAR-10/100 and SVHN: the directory "
        "holding cifar-10-python.tar.gz, train_32x32.mat, ..., see foof.data.vision)",
    )
    reproduce.add_argument(
        "--download",
        action="store_true",
        help="let the loaders download missing datasets (CIFAR/SVHN through torchvision)",
    )
    reproduce.add_argument("--device", default=None, help="torch device (default: cpu)")
    reproduce.add_argument(
        "--report", action="store_true", help="write OUT/REPORT.md afterwards (foof report OUT)"
    )
    reproduce.add_argument("--no-progress", action="store_true", help="no progress bars")
    reproduce.set_defaults(handler=_reproduce)

    tune = commands.add_parser(
        "tune",
        help="grid-search a figure run's hyperparameters (App. D.2)",
        description="Grid search of learning rate (1e-i, 3e-i), damping (10^2k) and, where "
        "tuned, momentum (0, 0.9), extended while a best or near-best value sits on an edge "
        "that is not a divergence boundary; the best final training loss at the figure's full "
        "budget wins (successive halving on prefixes of the full runs, the winner's "
        "neighbourhood confirmed at the full budget) and is saved in hyperparameters.json, "
        "which reproduce reads. Resumes from its record of every point tried.",
    )
    tune.add_argument("figure", type=_figure, metavar="FIGURE")
    tune.add_argument(
        "--method", required=True, help="the run's label in the figure, or 'all' for every run"
    )
    _mode(tune)
    tune.add_argument(
        "--protocol",
        choices=("full-budget", "short"),
        default="full-budget",
        help="full-budget (default): the paper's protocol, winners by their loss at the "
        "figure's full budget; short: the earlier searches (--search, --budget-epochs, "
        "--max-extensions), every point at one fixed budget",
    )
    tune.add_argument(
        "--budget-epochs",
        type=_positive,
        default=None,
        help="--protocol short: train each grid point this many epochs (default: the figure's)",
    )
    tune.add_argument("--seeds", type=_positive, default=1, help="seeds per grid point")
    tune.add_argument("--max-extensions", type=_natural, default=3, help="per side of an axis")
    tune.add_argument(
        "--search",
        choices=("rows", "window"),
        default="rows",
        help="rows: a learning-rate line search per damping/momentum value (default); window: "
        "one product grid around the current values",
    )
    tune.add_argument(
        "--dampings",
        type=_floats,
        default=None,
        metavar="D1,D2,...",
        help="damping values to search (default: the paper's 1e-6,1e-4,...,1e6)",
    )
    tune.add_argument("--out", type=Path, default=None, help="grid runs (default: runs/tuning)")
    tune.add_argument(
        "--record",
        type=Path,
        default=None,
        help="directory of the full-budget records, every point tried (default: --out); a "
        "committed record lets another session resume the search",
    )
    tune.add_argument(
        "--hyperparameters",
        type=Path,
        default=None,
        help="file to update (default: the package's hyperparameters.json)",
    )
    tune.add_argument("--data-dir", default=None, help="directory searched first for data")
    tune.add_argument("--no-progress", action="store_true", help="no progress bar")
    tune.set_defaults(handler=_tune)

    report = commands.add_parser(
        "report",
        help="write REPORT.md and plots from reproduce's results",
        description="Write REPORT.md, one PNG per figure and summary.json from results files "
        "only. With several directories each figure comes from the first that has it. "
        "Default: runs/reproduction/standard and runs/reproduction/quick, where they exist.",
    )
    report.add_argument("directories", nargs="*", type=Path, metavar="DIR")
    report.add_argument("--out", type=Path, default=None, help="default: the first DIR")
    report.add_argument(
        "--paper",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="results of `foof reproduce --protocol paper`: each figure's verdict at the "
        "paper's values, beside the tuned one (repeatable; default: runs/reproduction/"
        "standard-paper where it exists)",
    )
    report.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    report.set_defaults(handler=_report)


def _mode(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=MODES, default="quick", help="default: quick")


def _figure(text: str) -> str:
    try:
        return figure_id(text)
    except KeyError as error:
        raise argparse.ArgumentTypeError(str(error.args[0])) from None


def _figure_or_all(text: str) -> str:
    return "all" if text.lower() == "all" else _figure(text)


def _floats(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas, got {text!r}"
        ) from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _positive(text: str) -> int:
    return _integer(text, 1)


def _natural(text: str) -> int:
    return _integer(text, 0)


def _integer(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def _reproduce(args: argparse.Namespace) -> int:
    from foof.experiments.report import write_report
    from foof.experiments.runner import default_out, reproduce

    names = list(FIGURES) if "all" in args.figures else list(dict.fromkeys(args.figures))
    out = args.out if args.out is not None else default_out(args.mode, args.protocol)
    start = time.perf_counter()
    outcomes = reproduce(
        names,
        args.mode,
        out=out,
        seeds=args.seeds,
        progress=not args.no_progress,
        data_dir=args.data_dir,
        download=args.download,
        device=args.device,
        protocol=args.protocol,
    )
    counts = {s: sum(o.status == s for o in outcomes) for s in ("trained", "reused", "skipped")}
    failed = [o for o in outcomes if o.status == "failed"]
    print(
        f"foof: reproduce {' '.join(names)} ({args.mode}): {counts['trained']} trained, "
        f"{counts['reused']} reused, {counts['skipped']} already done, {len(failed)} failed "
        f"in {time.perf_counter() - start:.1f} s; results in {out}"
    )
    for outcome in failed:
        print(f"foof: {outcome.name} failed: {outcome.message}", file=sys.stderr)
    if args.report:
        print(f"foof: report -> {write_report([out])}")
    return 1 if failed else 0


def _tune(args: argparse.Namespace) -> int:
    from foof.experiments.figures import build
    from foof.experiments.tune import tunable_runs, tune

    figure = build(args.figure, args.mode)
    if args.method == "all":
        methods = [run.label for run in tunable_runs(figure)]
    else:
        methods = [args.method]
    for method in methods:
        try:
            entry = tune(
                args.figure,
                method,
                args.mode,
                budget_epochs=args.budget_epochs,
                seeds=args.seeds,
                out=args.out,
                max_extensions=args.max_extensions,
                search=args.search,
                dampings=args.dampings,
                hyperparameters_path=args.hyperparameters,
                data_dir=args.data_dir,
                progress=not args.no_progress,
                protocol=args.protocol,
                record=args.record,
            )
        except (KeyError, ValueError) as error:
            raise ConfigError(str(error.args[0]) if error.args else str(error)) from error
        values = ", ".join(f"{k}={v:g}" for k, v in entry["values"].items())
        loss = "diverged" if entry["objective"] is None else f"{entry['objective']:.4g}"
        print(
            f"foof: tune {figure.id}/{method} ({args.mode}): best {values} "
            f"(final train loss {loss}, {len(entry['grid'])} grid points, {entry['note']})"
        )
    return 0


def _report(args: argparse.Namespace) -> int:
    from foof.experiments.report import find_figures, format_summary_line, write_report
    from foof.experiments.runner import default_out

    directories = args.directories
    if not directories:
        directories = [d for d in (default_out(m) for m in ("standard", "quick")) if d.is_dir()]
        if not directories:
            raise ConfigError(
                "no results found in runs/reproduction/{standard,quick}; run `foof reproduce` "
                "first or name the directory"
            )
    paper = args.paper
    if not paper and not args.directories:
        paper = [d for d in (default_out("standard", "paper"),) if d.is_dir()]
    missing = [str(d) for d in [*directories, *paper] if not d.is_dir()]
    if missing:
        raise ConfigError(f"no such results directory: {', '.join(missing)}")
    path = write_report(directories, args.out, plots=not args.no_plots, paper=paper)
    for figure in find_figures(directories).values():
        print(f"foof: {format_summary_line(figure)}")
    print(f"foof: report -> {path}")
    return 0
