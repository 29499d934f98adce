"""Where a step's time goes: torch operator totals and foof's Python call tree.

Two views of the same steps, for the methods the speed targets are about:

* ``torch.profiler``: self CPU (or CUDA) time per aten operator (GEMMs, Cholesky, copies), i.e.
  which kernels the time is spent in;
* ``cProfile``: cumulative time of foof's own functions (capture hooks, the Fisher pass,
  statistics, inversion, preconditioning), i.e. which part of the algorithm calls them.
"""

from __future__ import annotations

import cProfile
import os
import pstats
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from foof.benchmarks.methods import Method, Workload
from foof.benchmarks.timing import build_stepper

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def profile_method(
    workload: Workload,
    method: Method,
    steps: int = 10,
    warmup: int = 3,
    top: int = 12,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Profile ``steps`` steps of ``method`` on ``workload`` after ``warmup`` steps.

    Args:
        workload: model and batch size.
        method: the method (its period should divide ``steps`` for a representative mix).
        steps: profiled steps.
        warmup: steps before profiling.
        top: rows kept in each table.
        device: where it runs.
        seed: model init and data seed.

    Returns:
        ``{"method", "steps", "ops": [...], "python": [...]}``, or ``{"method", "error"}``.
        ``ops`` rows: ``name``, ``calls_per_step``, ``self_ms_per_step``, ``self_percent``.
        ``python`` rows: ``function``, ``calls_per_step``, ``cumulative_ms_per_step``,
        ``cumulative_percent`` (of the profiled steps' total), foof functions and builtins
        (which include the torch operators called from Python).
    """
    device = torch.device(device)
    stepper, status, note = build_stepper(workload, method, device, seed)
    if stepper is None:
        return {"method": method.key, "error": f"{status}: {note}"}
    batches = workload.make_batches(4, device, seed)
    try:
        for i in range(warmup):
            stepper.step(*batches[i % len(batches)])
        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        with profile(activities=activities) as prof:
            for i in range(steps):
                stepper.step(*batches[i % len(batches)])
        ops = _operator_table(prof, steps, top, cuda=device.type == "cuda")
        profiler = cProfile.Profile()
        profiler.enable()
        for i in range(steps):
            stepper.step(*batches[i % len(batches)])
        profiler.disable()
        python = _python_table(profiler, steps, top)
    except Exception as error:  # noqa: BLE001 - a profile must not stop the benchmark
        return {"method": method.key, "error": f"{type(error).__name__}: {error}"}
    finally:
        stepper.close()
    return {
        "method": method.key,
        "label": method.label,
        "steps": steps,
        "ops": ops,
        "python": python,
    }


def _operator_table(prof: Any, steps: int, top: int, cuda: bool) -> list[dict[str, Any]]:
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    total = sum(getattr(e, attr) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [
        {
            "name": e.key,
            "calls_per_step": e.count / steps,
            "self_ms_per_step": getattr(e, attr) / 1e3 / steps,
            "self_percent": 100.0 * getattr(e, attr) / total,
        }
        for e in events[:top]
    ]


def _python_table(profiler: cProfile.Profile, steps: int, top: int) -> list[dict[str, Any]]:
    stats = pstats.Stats(profiler)
    entries = stats.stats  # type: ignore[attr-defined]
    total = max((ct for (_, _, _, ct, _) in entries.values()), default=1.0) or 1.0
    rows = []
    for (filename, line, name), (_, calls, _, cumulative, _) in entries.items():
        if filename.startswith(_PACKAGE_DIR):
            where = os.path.relpath(filename, os.path.dirname(_PACKAGE_DIR))
            function = f"{where}:{line}({name})"
        elif filename == "~" and cumulative / total > 0.02:
            function = name
        else:
            continue
        rows.append(
            {
                "function": function,
                "calls_per_step": calls / steps,
                "cumulative_ms_per_step": cumulative * 1e3 / steps,
                "cumulative_percent": 100.0 * cumulative / total,
            }
        )
    rows.sort(key=lambda row: row["cumulative_ms_per_step"], reverse=True)
    return rows[:top]
