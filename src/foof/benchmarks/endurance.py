"""Memory over long runs: does anything grow over 10,000 steps, or over 1,000 optimizers?

An overnight sweep dies of a slow leak as surely as of a crash. :func:`run_endurance` trains with
each method for ``steps`` steps and samples the process's resident memory (RSS), the number of
live tensors and the number of hooks on the model as it goes; then it creates, uses once and
drops ``optimizers`` optimizers on one model. The figures reported are the growth between the
end of the warm-up (``warmup`` steps, when caches and the allocator have settled) and the last
step, and the least-squares slope in MiB per 1,000 steps.

Run it with ``foof bench --suite memory`` (``--steps`` overrides the 10,000 steps).
"""

from __future__ import annotations

import gc
import os
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from foof.data import load_dataset
from foof.io import atomic_open, write_json_atomic
from foof.models import build_model
from foof.optim.registry import backward, build_optimizer

METHODS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 0.01, "momentum": 0.9},
    "foof": {"lr": 0.1, "damping": 1.0, "inv_every": 1},
    "kfac": {"lr": 0.1, "damping": 1.0, "inv_every": 1},
    "natural": {"lr": 0.01, "damping": 1.0},
}
"""Methods and settings of the endurance run: inverses every step, the most churn."""


@dataclass
class EnduranceConfig:
    """What :func:`run_endurance` runs.

    Attributes:
        steps: training steps per method.
        warmup: steps before the baseline sample.
        sample_every: steps between memory samples.
        hidden: hidden widths of the MLP (784-…-10, no biases).
        batch_size: images per step (Fashion-MNIST, cycled).
        methods: keys of :data:`METHODS`.
        optimizers: optimizers created, stepped once and dropped in the second phase.
        data_dir: directory searched first for Fashion-MNIST.
    """

    steps: int = 10_000
    warmup: int = 1_000
    sample_every: int = 250
    hidden: tuple[int, ...] = (256, 256)
    batch_size: int = 100
    methods: tuple[str, ...] = ("sgd", "foof", "kfac", "natural")
    optimizers: int = 1_000
    data_dir: str | None = None


def resident_mib() -> float:
    """This process's resident set size in MiB (Linux ``/proc``; ``nan`` elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
    except OSError:
        return float("nan")
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def live_tensors() -> int:
    """Tensors reachable by the garbage collector (after a collection)."""
    gc.collect()
    with warnings.catch_warnings():  # isinstance on torch's deprecated module attributes
        warnings.simplefilter("ignore")
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def hook_count(model: nn.Module) -> int:
    """Forward, forward-pre and backward hooks on the model's modules."""
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    n = len(points)
    if n < 2:
        return float("nan")
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var if var else float("nan")


def _training(
    method: str, config: EnduranceConfig, x: torch.Tensor, y: torch.Tensor, log: Callable
) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_model("mlp", hidden=config.hidden)
    optimizer = build_optimizer(method, model, **METHODS[method])
    samples = []
    start = time.perf_counter()
    n = len(x)
    for step in range(1, config.steps + 1):
        first = (step - 1) * config.batch_size % (n - config.batch_size)
        xb, yb = x[first : first + config.batch_size], y[first : first + config.batch_size]
        optimizer.zero_grad()
        output = model(xb)
        loss = nn.functional.cross_entropy(output, yb)
        backward(optimizer, loss, output)
        optimizer.step()
        if step % config.sample_every == 0 or step == 1:
            sample = {"step": step, "rss_mib": resident_mib(), "hooks": hook_count(model)}
            if step in (config.warmup, config.steps):
                sample["tensors"] = live_tensors()
            samples.append(sample)
            if step % (config.sample_every * 8) == 0:
                log(f"{method}: step {step}, RSS {sample['rss_mib']:.1f} MiB")
    seconds = time.perf_counter() - start
    close = getattr(optimizer, "close", None)
    if close is not None:
        close()
    return _summarise(samples, config.warmup, seconds, float(loss.detach()))


def _summarise(samples: list[dict], warmup: int, seconds: float, loss: float) -> dict[str, Any]:
    settled = [s for s in samples if s["step"] >= warmup]
    first, last = settled[0], settled[-1]
    return {
        "samples": samples,
        "seconds": seconds,
        "final_loss": loss,
        "rss_after_warmup_mib": first["rss_mib"],
        "rss_final_mib": last["rss_mib"],
        "rss_growth_mib": last["rss_mib"] - first["rss_mib"],
        "rss_slope_mib_per_1000_steps": 1000 * _slope([(s["step"], s["rss_mib"]) for s in settled]),
        "tensors_after_warmup": first.get("tensors"),
        "tensors_final": last.get("tensors"),
        "hooks": sorted({s["hooks"] for s in samples}),
    }


def _optimizer_churn(
    method: str, config: EnduranceConfig, x: torch.Tensor, y: torch.Tensor
) -> dict[str, Any]:
    """Create an optimizer, step once, drop it without ``close()``; ``optimizers`` times."""
    torch.manual_seed(0)
    model = build_model("mlp", hidden=config.hidden)
    xb, yb = x[: config.batch_size], y[: config.batch_size]
    samples = []
    warm = max(1, config.optimizers // 10)
    baseline: dict[str, int] = {}
    for index in range(1, config.optimizers + 1):
        optimizer = build_optimizer(method, model, **METHODS[method])
        optimizer.zero_grad()
        output = model(xb)
        backward(optimizer, nn.functional.cross_entropy(output, yb), output)
        optimizer.step()
        del optimizer, output
        if index % warm == 0:
            gc.collect()
            samples.append({"step": index, "rss_mib": resident_mib(), "hooks": hook_count(model)})
            if len(samples) == 3:  # the baseline: after the allocator's warm-up
                baseline = {"objects": len(gc.get_objects()), "tensors": live_tensors()}
    gc.collect()
    start = samples[2] if len(samples) > 2 else samples[0]
    return {
        "samples": samples,
        "baseline_after": start["step"],
        "rss_growth_mib": samples[-1]["rss_mib"] - start["rss_mib"],
        "python_objects": [baseline.get("objects"), len(gc.get_objects())],
        "live_tensors": [baseline.get("tensors"), live_tensors()],
        "hooks_after": hook_count(model),
    }


def run_endurance(
    config: EnduranceConfig, out: str | os.PathLike[str], log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run the endurance benchmark and write ``memory-<device>.json`` and ``.md`` into ``out``.

    Returns:
        The results (``config``, ``environment``, ``training`` and ``churn`` per method).
    """
    data = load_dataset("fashion-mnist", data_dir=config.data_dir)
    x, y = data.x_train, data.y_train
    results: dict[str, Any] = {
        "format": "foof.benchmarks.endurance/1",
        "config": asdict(config),
        "environment": {
            "platform": platform.platform(),
            "torch": str(torch.__version__),
            "threads": torch.get_num_threads(),
        },
        "training": {},
        "churn": {},
    }
    for method in config.methods:
        log(f"{method}: {config.steps} training steps")
        results["training"][method] = _training(method, config, x, y, log)
    for method in config.methods:
        if method == "sgd":
            continue
        log(f"{method}: {config.optimizers} optimizers created and dropped")
        results["churn"][method] = _optimizer_churn(method, config, x, y)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "memory-cpu.json", results)
    with atomic_open(out / "memory-cpu.md") as handle:
        handle.write(render(results))
    return results


def render(results: dict[str, Any]) -> str:
    """The Markdown table of :func:`run_endurance`'s results."""
    config = results["config"]
    hidden = "-".join(str(h) for h in (784, *config["hidden"], 10))
    lines = [
        "# Memory over long runs",
        "",
        f"MLP {hidden} (no biases), batch {config['batch_size']}, Fashion-MNIST; inverses every "
        f"step. RSS sampled every {config['sample_every']} steps; growth is from step "
        f"{config['warmup']} (after warm-up) to step {config['steps']}. "
        f"{results['environment']['platform']}, torch {results['environment']['torch']}, "
        f"{results['environment']['threads']} threads.",
        "",
        f"Regenerate: `foof bench --suite memory --steps {config['steps']} --out docs/benchmarks`",
        "",
        "| method | steps | RSS after warm-up (MiB) | RSS at the end (MiB) | growth (MiB) | "
        "slope (MiB / 1,000 steps) | live tensors (warm-up → end) | hooks | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method, r in results["training"].items():
        lines.append(
            f"| {method} | {config['steps']} | {r['rss_after_warmup_mib']:.1f} | "
            f"{r['rss_final_mib']:.1f} | {r['rss_growth_mib']:+.1f} | "
            f"{r['rss_slope_mib_per_1000_steps']:+.2f} | {r['tensors_after_warmup']} → "
            f"{r['tensors_final']} | {', '.join(map(str, r['hooks']))} | {r['seconds']:.0f} |"
        )
    if results["churn"]:
        lines += [
            "",
            f"Optimizers created, stepped once and dropped without `close()`, "
            f"{config['optimizers']} times on one model:",
            "",
            "| method | RSS growth, 30% → end (MiB) | Python objects (30% → end) | live "
            "tensors (30% → end) | hooks left on the model |",
            "| --- | --- | --- | --- | --- |",
        ]
        for method, r in results["churn"].items():
            objects, tensors = r["python_objects"], r["live_tensors"]
            lines.append(
                f"| {method} | {r['rss_growth_mib']:+.1f} | {objects[0]} → {objects[1]} | "
                f"{tensors[0]} → {tensors[1]} | {r['hooks_after']} |"
            )
    return "\n".join(lines) + "\n"
