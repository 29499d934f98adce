"""``foof bench --suite wrn``: per-step time of SGD, FOOF and KFAC on the Wide ResNet-18 (Fig. 5A).

The paper's claim (Fig. 5A, App. D.6): amortised FOOF and KFAC (inverses every ``T=500`` steps
from statistics of the ``S=10`` steps before) cost about 10% and 15% more time per update than
SGD. Timing 500-step periods of a WRN on a CPU is out of reach, so each phase of the schedule
is timed separately on one optimizer, by setting its step counter (``param_groups[0]["step"]``,
see :func:`foof.optim.kronecker.is_stats_step`) before the timed steps:

* *plain* steps (no statistics, no inversion): ``T − S`` of every ``T`` steps;
* *statistics* steps (input covariance, and for KFAC the extra MC backward pass): ``S − 1``;
* the *inversion* step (statistics and inversion): 1.

The amortised time per update is then ``((T − S)·plain + (S − 1)·stats + inversion) / T``,
the mean over a whole period of the schedule, with each phase's median over its timed steps.
Inputs are random ``(B, 3, 32, 32)`` tensors and labels; a step's time does not depend on them.
"""

from __future__ import annotations

import platform
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from foof.models import build_model
from foof.optim.registry import backward, build_optimizer
from foof.train import cross_entropy

WRN_METHODS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 1e-3, "momentum": 0.9},
    "foof": {"lr": 1e-3, "damping": 100.0, "momentum": 0.9},
    "kfac": {"lr": 1e-3, "damping": 1.0, "momentum": 0.9},
}
"""The methods timed and their (tiny, timing-only) hyperparameters."""


def time_wrn(
    *,
    width: int = 64,
    batch_size: int = 100,
    batch_norm: bool = True,
    inv_every: int = 500,
    stats_steps: int = 10,
    steps: int = 3,
    low_rank: bool = True,
    device: str = "cpu",
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    inputs: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Time SGD, FOOF and KFAC on ``wide_resnet18(width)`` phase by phase (module docstring).

    Args:
        width: channels of the network's first stage (64: the paper-scale WRN-18).
        batch_size: images per step ``B``.
        batch_norm: the ResNet with BatchNorm (frozen for FOOF and KFAC, as in App. D.6).
        inv_every: ``T``.
        stats_steps: ``S``.
        steps: timed steps per phase (plain and statistics); inversion steps are
            ``max(1, steps // 2)``. One untimed warm-up step precedes each method.
        low_rank: FOOF's and KFAC's ``low_rank`` option (default ``True``, as in the
            optimizers). With it they record every layer's inputs and output gradients on
            *every* step to try ``Ĝ = EᵀA``, which for a convolution (rows = batch x positions)
            is never the cheaper product, so ``False`` shows the cost without that capture.
        device: ``"cpu"`` or ``"cuda"``.
        seed: model initialisation and data seed.
        log: called with one line per method.
        inputs: images ``(B, 3, 32, 32)`` and int64 labels ``(B,)`` every step trains on
            (e.g. a CIFAR-10 batch); default random ones of ``batch_size``.

    Returns:
        ``{"settings", "environment", "methods"}``; ``methods[name]`` has the per-phase step
        times in seconds (``plain``, ``stats``, ``inversion``: lists), their medians, the
        amortised time per update ``amortised`` and ``ratio`` = amortised / SGD's.
    """
    target = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    if inputs is None:
        inputs = (
            torch.randn(batch_size, 3, 32, 32, generator=generator),
            torch.randint(0, 10, (batch_size,), generator=generator),
        )
    x, y = inputs[0].to(target), inputs[1].to(target)
    batch_size = len(x)
    results: dict[str, Any] = {}
    for name, hyperparameters in WRN_METHODS.items():
        torch.manual_seed(seed)
        model = build_model(
            "wrn18", width=width, batch_norm=batch_norm, train_norm=name == "sgd"
        ).to(target)
        extra: dict[str, Any] = {}
        if name != "sgd":
            extra = {"inv_every": inv_every, "stats_steps": stats_steps, "low_rank": low_rank}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimizer = build_optimizer(name, model, **hyperparameters, **extra)
        step = _stepper(model, optimizer, x, y, target)
        step()  # warm-up (for FOOF/KFAC: step 0, statistics and the first inversion)
        phases: dict[str, list[float]] = {}
        if name == "sgd":
            phases["plain"] = [step() for _ in range(steps)]
        else:
            group = optimizer.param_groups[0]
            for phase, first, count in (
                ("plain", 1, steps),
                ("stats", inv_every - stats_steps + 1, min(steps, stats_steps - 1)),
                ("inversion", inv_every, max(1, steps // 2)),
            ):
                times = []
                for i in range(count):
                    group["step"] = first + (i if phase != "inversion" else i * inv_every)
                    times.append(step())
                phases[phase] = times
        medians = {phase: statistics.median(times) for phase, times in phases.items() if times}
        if name == "sgd":
            amortised = medians["plain"]
        else:
            amortised = (
                (inv_every - stats_steps) * medians["plain"]
                + (stats_steps - 1) * medians.get("stats", medians["plain"])
                + medians["inversion"]
            ) / inv_every
        results[name] = {"times": phases, "median": medians, "amortised": amortised}
        if log is not None:
            parts = ", ".join(f"{k} {v:.3f} s" for k, v in medians.items())
            log(f"{name}: {parts}; amortised {amortised:.3f} s per update")
        if hasattr(optimizer, "close"):
            optimizer.close()
    for entry in results.values():
        entry["ratio"] = entry["amortised"] / results["sgd"]["amortised"]
    return {
        "settings": {
            "model": f"wide_resnet18(width={width}, batch_norm={batch_norm})",
            "parameters": sum(p.numel() for p in build_model("wrn18", width=width).parameters()),
            "batch_size": batch_size,
            "inv_every": inv_every,
            "stats_steps": stats_steps,
            "steps": steps,
            "low_rank": low_rank,
        },
        "environment": {
            "torch": torch.__version__,
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "device": str(target)
            + (f" ({torch.cuda.get_device_name(target)})" if target.type == "cuda" else ""),
            "threads": torch.get_num_threads(),
        },
        "methods": results,
    }


def format_wrn(results: dict[str, Any]) -> str:
    """A markdown table of :func:`time_wrn`'s results."""
    settings, env = results["settings"], results["environment"]
    lines = [
        f"Model {settings['model']} ({settings['parameters']:,} parameters), batch "
        f"{settings['batch_size']}, T={settings['inv_every']}, S={settings['stats_steps']}, "
        f"FOOF/KFAC low_rank={settings.get('low_rank', True)}; "
        f"{env['device']}, {env['threads']} thread(s), torch {env['torch']}, {env['platform']}.",
        "",
        "| method | plain step (s) | statistics step (s) | inversion step (s) | amortised per "
        "update (s) | ratio to SGD |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, entry in results["methods"].items():
        median = entry["median"]
        cells = [_seconds(median.get(k)) for k in ("plain", "stats", "inversion")]
        lines.append(
            f"| {name.upper() if name != 'sgd' else 'SGD+M'} | {' | '.join(cells)} | "
            f"{entry['amortised']:.3f} | {entry['ratio']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _stepper(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
) -> Callable[[], float]:
    """One training step as in :func:`foof.train.train`; returns its wall-clock seconds."""

    def step() -> float:
        _synchronize(device)
        start = time.perf_counter()
        optimizer.zero_grad()
        output = model(x)
        backward(optimizer, cross_entropy(output, y), output)
        optimizer.step()
        _synchronize(device)
        return time.perf_counter() - start

    return step


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
