"""Run the whole benchmark: per-step times, memory, profiles, time to target; write the report."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from foof.benchmarks.methods import (
    BASELINE,
    Workload,
    adam,
    default_workloads,
    foof,
    kfac,
    mlp_methods,
    peer_version,
    sgd,
)
from foof.benchmarks.profiling import profile_method
from foof.benchmarks.report import evaluate_targets, to_markdown
from foof.benchmarks.target import TargetConfig, time_to_target
from foof.benchmarks.timing import MethodRun, measure_memory, ratios, summarize, time_workload
from foof.capture import is_supported, layer_in_dim
from foof.data import DataError, load_dataset
from foof.io import atomic_open, write_json_atomic

RESULTS_FORMAT = "foof.bench/1"
"""Version tag of the results dictionary written by :func:`run_benchmark`."""

PEERS = {"asdl": "asdfghjkl"}
"""Optional peer libraries: import name to pip package."""

PROFILED = (
    "foof-1",
    "kfac-heuristic-1",
    "foof-100-s10",
    "foof-100-s10-fused",
    "kfac-heuristic-100-fused",
    "natural-mc-fused",
)
"""Methods profiled: the every-step FOOF and KFAC, FOOF's amortised steady state (the profiled
steps after warm-up fall between its statistics windows), and the fused-backward variants of
the targets that are closest to their limits."""
"""Optional peer libraries: import name to pip package."""


@dataclass(frozen=True)
class BenchConfig:
    """Everything that defines a benchmark run.

    Attributes:
        workloads: what to time (see :func:`foof.benchmarks.methods.default_workloads`).
        steps: measured steps per method, rounded up to whole periods if ``whole_periods``.
        warmup: excluded steps at the start of every method.
        chunk: consecutive steps per method per round of the interleaving.
        budget_s: seconds after which a method with period 1 stops early.
        min_steps: measured steps every method gets regardless of ``budget_s``.
        whole_periods: measure amortised methods over whole periods.
        device: ``"cpu"`` or ``"cuda"``.
        seed: model init and data seed.
        memory: measure peak step memory.
        profile: profile FOOF and KFAC (``inv_every=1``) on ``profile_workload``.
        profile_workload: the workload profiled (default: the first one).
        profile_steps: profiled steps per method.
        target: time-to-target settings, ``None`` to skip it.
        mode: a name for the report (``"full"``, ``"quick"``, ``"custom"``).
        threads: torch's intra-op threads for the run (``None``: leave torch's default).
    """

    workloads: tuple[Workload, ...] = field(default_factory=default_workloads)
    steps: int = 100
    warmup: int = 3
    chunk: int = 10
    budget_s: float = 15.0
    min_steps: int = 5
    whole_periods: bool = True
    device: str = "cpu"
    seed: int = 0
    memory: bool = True
    profile: bool = True
    profile_workload: Workload | None = None
    profile_steps: int = 10
    target: TargetConfig | None = field(default_factory=TargetConfig)
    mode: str = "full"
    threads: int | None = None

    def settings(self) -> dict[str, Any]:
        """The scalar settings, for the JSON record."""
        return {
            "steps": self.steps,
            "warmup": self.warmup,
            "chunk": self.chunk,
            "budget_s": self.budget_s,
            "min_steps": self.min_steps,
            "whole_periods": self.whole_periods,
            "device": self.device,
            "seed": self.seed,
            "threads": self.threads,
            "target": None if self.target is None else _jsonable(vars(self.target)),
        }


def quick_config(**overrides: Any) -> BenchConfig:
    """A run of a few minutes.

    The MLP at batch 100 only, 20 steps per method (partial periods allowed), short profiles,
    and time to target on 1,000 images for 2 epochs. ``overrides`` replace any field.
    """
    values: dict[str, Any] = dict(
        workloads=tuple(w for w in default_workloads() if w.key == "mlp-b100"),
        steps=20,
        warmup=2,
        chunk=5,
        budget_s=5.0,
        min_steps=5,
        whole_periods=False,
        profile_steps=3,
        target=TargetConfig(subset=1000, epochs=2),
        mode="quick",
    )
    values.update(overrides)
    return BenchConfig(**values)


def run_benchmark(
    config: BenchConfig,
    out_dir: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the benchmark; write ``<device>.json`` and ``<device>.md`` into ``out_dir``.

    Args:
        config: what to run.
        out_dir: where to write the report (created if missing); ``None`` writes nothing.
        log: progress messages (e.g. ``print``).

    Returns:
        The results (format :data:`RESULTS_FORMAT`): ``machine``, ``settings``,
        ``workloads`` (rows per method: times in ms, ratios to SGD+momentum, memory),
        ``time_to_target``, ``profiles``, ``targets`` (issue 5's, with verdicts).

    Example:
        >>> from foof.benchmarks import quick_config, run_benchmark
        >>> results = run_benchmark(quick_config(), "runs/bench")  # doctest: +SKIP
    """
    say = log or (lambda message: None)
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch sees no CUDA device")
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _run(config, device, out_dir, say)
    finally:
        torch.set_num_threads(threads)


def _run(
    config: BenchConfig,
    device: torch.device,
    out_dir: str | os.PathLike[str] | None,
    say: Callable[[str], None],
) -> dict[str, Any]:
    start = time.perf_counter()
    results: dict[str, Any] = {
        "format": RESULTS_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": config.mode,
        "settings": config.settings(),
        "machine": machine_notes(device),
        "workloads": [],
    }

    def checkpoint() -> None:
        # the report so far, so that an interrupted run still leaves its finished parts
        results["machine"]["loadavg_end"] = _loadavg()
        results["total_seconds"] = time.perf_counter() - start
        results["targets"] = evaluate_targets(results)
        if out_dir is not None:
            write_report(results, out_dir)

    if config.profile and config.workloads:
        results["profiles"] = _profiles(config, device, say)
        checkpoint()
    if config.target is not None:
        try:
            results["time_to_target"] = _time_to_target(config, device, say)
        except Exception as error:  # noqa: BLE001 - keep the timings already measured
            results["time_to_target"] = {"skipped": f"failed: {type(error).__name__}: {error}"}
    timed = []
    for workload in config.workloads:
        say(f"timing {workload.key}: {len(workload.methods)} methods")
        runs = time_workload(
            workload,
            config.steps,
            config.warmup,
            config.chunk,
            config.budget_s,
            config.min_steps,
            config.whole_periods,
            device,
            config.seed,
            log=say,
        )
        timed.append((workload, runs))
        results["workloads"].append(workload_entry(workload, runs))
        checkpoint()
    if config.memory:
        # last: the memory meter changes how malloc hands out memory, which would slow the
        # timed steps of any workload after it
        for index, (workload, runs) in enumerate(timed):
            say(f"memory {workload.key}")
            measure_memory(workload, runs, device, config.seed)
            results["workloads"][index] = workload_entry(workload, runs)
    checkpoint()
    return results


def write_report(results: dict[str, Any], out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``<device>.json`` and ``<device>.md`` atomically; returns their paths."""
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    name = torch.device(results["settings"]["device"]).type
    json_path = write_json_atomic(directory / f"{name}.json", results)
    md_path = directory / f"{name}.md"
    with atomic_open(md_path) as handle:
        handle.write(to_markdown(results))
    return json_path, md_path


def workload_entry(workload: Workload, runs: list[MethodRun]) -> dict[str, Any]:
    """The JSON record of one workload: its model, and one row per method."""
    torch.manual_seed(0)
    model = workload.build_model(torch.device("cpu"))
    baseline = next((r for r in runs if r.method.key == BASELINE and r.status == "ok"), None)
    base_summary = summarize(baseline.times) if baseline is not None else None
    rows = []
    for run in runs:
        summary = summarize(run.times)
        row = {
            "key": run.method.key,
            "label": run.method.label,
            "optimizer": run.method.optimizer,
            "peer": run.method.peer,
            "settings": _jsonable(dict(run.method.settings)),
            "period": run.method.period,
            "status": run.status,
            "note": run.note,
            "planned_steps": run.planned_steps,
            "steps": len(run.times),
            **(summary or dict.fromkeys(("median_ms", "mean_ms", "p10_ms", "p90_ms"))),
            **ratios(summary, base_summary),
            "final_loss": run.final_loss,
            "state_bytes": run.state_bytes,
            "peak_step_bytes": run.peak_step_bytes,
        }
        rows.append(row)
    return {
        "key": workload.key,
        "title": workload.title,
        "model": workload.model,
        "model_options": _jsonable(dict(workload.model_options)),
        "batch_size": workload.batch_size,
        "lr_scale": workload.lr_scale,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "sum_in_dim_squared": sum_in_dim_squared(model),
        "methods": rows,
    }


def sum_in_dim_squared(model: nn.Module) -> int:
    """``Σ_l in_dim_l²`` over preconditioned layers: the floats of one set of FOOF factors."""
    return sum(layer_in_dim(m) ** 2 for m in model.modules() if is_supported(m))


def machine_notes(device: torch.device) -> dict[str, Any]:
    """CPU, cores, threads, versions, load, the code's git state and the peers' versions."""
    notes: dict[str, Any] = {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_start": _loadavg(),
        "git": _git_state(),
        "peers": {package: peer_version(name, package) for name, package in PEERS.items()},
    }
    if device.type == "cuda":
        notes["gpu"] = torch.cuda.get_device_name(device)
    return notes


def _profiles(config: BenchConfig, device: torch.device, say: Callable[[str], None]) -> dict:
    workload = config.profile_workload or config.workloads[0]
    available = {m.key: m for m in (*mlp_methods(peers=False), *workload.methods)}
    methods = [available[key] for key in PROFILED if key in available]
    warmup = 3
    say(f"profiling {', '.join(m.key for m in methods)} on {workload.key}")
    return {
        "workload": workload.key,
        "workload_title": workload.title,
        "steps": config.profile_steps,
        "warmup": warmup,
        "methods": [
            profile_method(workload, m, config.profile_steps, warmup, device=device)
            for m in methods
        ],
    }


def target_methods() -> tuple:
    """Adam (the reference), then SGD+momentum, FOOF at 1 and (100, 10) (also fused), KFAC."""
    methods = (sgd(), foof(1), foof(100, 10), foof(100, 10, fused=True), kfac("heuristic", 100))
    return adam(), methods


def _time_to_target(config: BenchConfig, device: torch.device, say: Callable[[str], None]):
    target = config.target
    try:
        data = load_dataset(target.dataset, data_dir=target.data_dir, subset=target.subset)
    except DataError as error:
        say(f"time to target skipped: {error}")
        return {"skipped": f"dataset not found ({str(error).splitlines()[0]})"}
    reference, methods = target_methods()
    workload = Workload("target", "time to target", "mlp", target.batch_size, (reference, *methods))
    section = time_to_target(
        workload, reference, methods, data, target, device, config.seed, log=say
    )
    section["caveats"] = data.caveats
    return section


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _git_state() -> dict[str, Any] | None:
    root = Path(__file__).resolve().parents[3]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    modified = [line[3:] for line in status.splitlines() if line.strip()]
    return {"commit": commit, "modified": modified}
