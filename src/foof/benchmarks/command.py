"""``foof bench``: the benchmark from the command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from foof.benchmarks.methods import default_workloads
from foof.benchmarks.report import evaluate_targets
from foof.benchmarks.runner import BenchConfig, quick_config, run_benchmark, write_report
from foof.benchmarks.target import TargetConfig
from foof.io import read_json


def add_commands(subparsers: Any) -> None:
    """Add ``bench`` to the ``foof`` command's subparsers (see :func:`foof.cli.build_parser`).

    Args:
        subparsers: the object returned by ``ArgumentParser.add_subparsers``.
    """
    workloads = ", ".join(w.key for w in default_workloads())
    bench = subparsers.add_parser(
        "bench",
        help="time every optimizer per step (ratio to SGD+momentum), memory, time to target",
        description="Time every optimizer's training step, interleaved in one process, as a "
        "ratio to SGD with momentum; measure memory, profile FOOF and KFAC, and time each "
        "method to Adam's training loss on Fashion-MNIST. Writes <device>.md and "
        "<device>.json into --out.",
    )
    arg = bench.add_argument
    arg("--quick", action="store_true", help="a few minutes: MLP at batch 100, 20 steps")
    arg(
        "--suite",
        choices=("default", "wrn", "memory", "lm"),
        default="default",
        help="wrn: SGD, FOOF and KFAC on the Wide ResNet-18 at batch 100, phase by phase "
        "(foof.benchmarks.conv; --steps per phase, default 3); writes wrn-<device>.md/.json. "
        "memory: resident memory over --steps (default 10,000) training steps per method and "
        "over 1,000 dropped optimizers (foof.benchmarks.endurance); writes memory-cpu.md/.json. "
        "lm: a byte-level GPT on the Python docs corpus, AdamW/Muon/SOAP/PSGD-Kron/FOOF/KFAC "
        "interleaved (foof.benchmarks.lm; --steps, --seeds); writes lm-cpu.md/.json/.png",
    )
    arg(
        "--no-low-rank",
        action="store_true",
        help="wrn suite: FOOF and KFAC with low_rank=False (no per-step capture)",
    )
    arg("--out", type=Path, default=Path("runs/bench"), help="default: runs/bench")
    arg("--device", choices=("cpu", "cuda"), default="cpu", help="default: cpu")
    arg("--steps", type=_positive, default=None, help="measured steps per method (default 100)")
    arg("--warmup", type=_natural, default=None, help="excluded steps per method (default 3)")
    arg("--threads", type=_positive, default=None, help="torch threads (default: torch's)")
    arg("--budget", type=float, default=None, help="seconds before a slow method stops")
    arg("--workloads", default=None, help=f"comma-separated subset of: {workloads}")
    arg("--no-peers", action="store_true", help="leave out peer libraries (ASDL)")
    arg("--no-memory", action="store_true", help="skip the peak-memory pass")
    arg("--no-profile", action="store_true", help="skip the profiles")
    arg("--no-target", action="store_true", help="skip time to target")
    arg("--target-subset", type=_natural, default=None, help="training images; 0 for all")
    arg("--target-epochs", type=_positive, default=None, help="epochs of the reference (Adam)")
    arg("--data-dir", default=None, help="directory searched first for the data (else FOOF_DATA)")
    arg("--seeds", type=_positive, default=None, help="lm suite: number of seeds (default 3)")
    arg(
        "--from-json",
        type=Path,
        default=None,
        metavar="FILE",
        help="run nothing: re-render FILE (a bench JSON) into --out, targets re-evaluated",
    )
    bench.set_defaults(handler=run_command)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The :class:`BenchConfig` the command line asks for."""
    config = quick_config() if args.quick else BenchConfig()
    workloads = default_workloads(quick=args.quick, peers=not args.no_peers)
    if args.workloads:
        wanted = [key.strip() for key in args.workloads.split(",") if key.strip()]
        known = {w.key: w for w in default_workloads(peers=not args.no_peers)}
        unknown = [key for key in wanted if key not in known]
        if unknown:
            raise SystemExit(
                f"foof bench: unknown workload(s) {', '.join(unknown)}; choose from "
                f"{', '.join(known)}"
            )
        workloads = tuple(known[key] for key in wanted)
    target = config.target
    if args.no_target:
        target = None
    elif target is not None:
        target = replace(
            target,
            data_dir=args.data_dir,
            subset=target.subset if args.target_subset is None else (args.target_subset or None),
            epochs=target.epochs if args.target_epochs is None else args.target_epochs,
        )
    changes: dict[str, Any] = {
        "workloads": workloads,
        "device": args.device,
        "memory": not args.no_memory,
        "profile": not args.no_profile,
        "target": target,
        "threads": args.threads,
    }
    if args.steps is not None:
        changes["steps"] = args.steps
    if args.warmup is not None:
        changes["warmup"] = args.warmup
    if args.budget is not None:
        changes["budget_s"] = args.budget
    return replace(config, **changes)


def run_command(args: argparse.Namespace) -> int:
    """Run the benchmark (or re-render a saved one) and print where the report went."""
    if args.from_json is not None:
        results = read_json(args.from_json)
        results["targets"] = evaluate_targets(results)
        json_path, md_path = write_report(results, args.out)
        print(f"foof bench: re-rendered {args.from_json} -> {md_path}, {json_path}")
        return 0

    def log(message: str) -> None:
        print(f"foof bench: {message}", file=sys.stderr, flush=True)

    if args.suite == "wrn":
        return _run_wrn(args, log)
    if args.suite == "lm":
        return _run_lm(args, log)
    if args.suite == "memory":
        from foof.benchmarks.endurance import EnduranceConfig, run_endurance

        if args.threads is not None:
            torch.set_num_threads(args.threads)
        endurance = EnduranceConfig(data_dir=args.data_dir)
        if args.steps is not None:
            endurance.steps = args.steps
            endurance.warmup = min(endurance.warmup, max(1, args.steps // 10))
            endurance.sample_every = min(endurance.sample_every, max(1, args.steps // 40))
        run_endurance(endurance, args.out, log=log)
        print(f"foof bench: memory report -> {args.out / 'memory-cpu.md'}")
        return 0
    config = config_from_args(args)

    results = run_benchmark(config, args.out, log=log)
    device = config.device
    met = sum(1 for t in results["targets"] if t["met"])
    print(
        f"foof bench: {met} of {len(results['targets'])} targets met | "
        f"{results['total_seconds']:.0f} s | report -> {args.out / (device + '.md')}"
    )
    return 0


def _run_wrn(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    from foof.benchmarks.conv import format_wrn, time_wrn
    from foof.io import write_json_atomic

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    low_rank = not args.no_low_rank
    results = time_wrn(steps=args.steps or 3, low_rank=low_rank, device=args.device, log=log)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"wrn-{args.device}" + ("" if low_rank else "-no-low-rank")
    write_json_atomic(args.out / f"{name}.json", results)
    path = args.out / f"{name}.md"
    path.write_text(format_wrn(results), encoding="utf-8")
    print(f"foof bench: report -> {path}")
    return 0


def _run_lm(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    from foof.benchmarks.lm import LMConfig, quick_lm_config, run_lm

    config = quick_lm_config() if args.quick else LMConfig()
    changes: dict[str, Any] = {"data_dir": args.data_dir}
    if args.steps is not None:
        changes["steps"] = args.steps
        changes["warmup"] = max(1, args.steps // 10)
        changes["eval_every"] = max(1, min(config.eval_every, args.steps // 6))
    if args.seeds is not None:
        changes["seeds"] = tuple(range(args.seeds))
    if args.threads is not None:
        changes["threads"] = args.threads
    try:
        results = run_lm(replace(config, **changes), args.out, log=log)
    except FileNotFoundError as error:
        raise SystemExit(f"foof bench: {error}") from error
    final = results["methods"].get("adamw", {}).get("final_val_loss", float("nan"))
    print(
        f"foof bench: lm suite, AdamW final val loss {final:.3f} | "
        f"{results['total_seconds']:.0f} s | report -> {args.out / 'lm-cpu.md'}"
    )
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _natural(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


__all__ = ["TargetConfig", "add_commands", "config_from_args", "run_command"]
