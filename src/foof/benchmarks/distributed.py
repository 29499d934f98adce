"""Benchmark (not a test) of data-parallel training: time per step and bytes per step.

For the paper's MLP (784-1000-1000-1000-10, no biases) and the small CNN, at a global batch of
100, every method takes the same steps with 1 process and with ``--world`` processes (DDP on
gloo, each rank a contiguous shard of the batch), each process with ``--threads`` torch threads
(default 1: the question is what a second worker buys, and on a busy machine extra OpenMP
threads mostly spin). Reported per method:

* seconds per step (median over the timed steps, rank 0's clock; DDP keeps ranks in step);
* the payload bytes per step foof's own collectives hand to the backend on one rank (counted in
  :mod:`foof.distributed`: statistics, MC outputs, gathered Fisher data, inverse broadcasts,
  the non-finite flag), averaged over whole ``inv_every`` periods;
* the payload of DDP's gradient all-reduce (4 bytes per float32 parameter), which every method,
  SGD included, pays on every step.

Inputs are standard-normal images and uniform labels (per-step cost does not depend on the pixel
values). Run::

    python -m foof.benchmarks.distributed --steps 6 --out docs/benchmarks/distributed.md

Timings on a shared CPU machine are only indicative: the report records the load average.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from foof import distributed
from foof.models import build_model
from foof.optim.registry import backward, build_optimizer

GLOBAL_BATCH = 100


@dataclass(frozen=True)
class Case:
    """One method on one model.

    Attributes:
        model: a key of :data:`foof.models.MODELS` (``"mlp"`` or ``"cnn"``).
        label: the table row.
        optimizer: a registry name.
        settings: the optimizer's keyword arguments.
    """

    model: str
    label: str
    optimizer: str
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def period(self) -> int:
        """Steps in one inversion period: timings and bytes are averaged over whole periods."""
        return int(self.settings.get("inv_every", 1))


def default_cases() -> list[Case]:
    """SGD, FOOF (every step, amortised, sharded), KFAC (mc; replicated, sharded), NG (mc)."""
    foof = dict(lr=0.01, damping=10.0)
    kfac = dict(lr=0.01, damping=1.0, fisher="mc", seed=0)
    natural = dict(lr=1e-4, damping=1e-3, fisher="mc", seed=0)
    sharded = dict(inverse_sharding="sharded")
    cases = []
    for model in ("mlp", "cnn"):
        cases += [
            Case(model, "SGD + momentum", "sgd", dict(lr=0.01, momentum=0.9)),
            Case(model, "FOOF", "foof", foof),
            Case(model, "FOOF, sharded inverses", "foof", dict(foof, **sharded)),
            Case(model, "FOOF, T=5, S=1", "foof", dict(foof, inv_every=5, stats_steps=1)),
            Case(model, "KFAC (MC)", "kfac", kfac),
            Case(model, "KFAC (MC), sharded inverses", "kfac", dict(kfac, **sharded)),
            Case(model, "natural gradient (MC)", "natural", natural),
        ]
    return cases


def _measure(rank: int, world: int, cases: list[Case], steps: int, warmup: int) -> list[dict]:
    """Run every case for ``warmup + steps`` steps on this rank; rank 0's numbers are kept."""
    results = []
    for case in cases:
        torch.manual_seed(0)
        model = build_model(case.model)
        optimizer = build_optimizer(case.optimizer, model, **case.settings)
        network = DistributedDataParallel(model) if world > 1 else model
        generator = torch.Generator().manual_seed(0)
        periods = -(-steps // case.period)
        total = warmup * case.period + periods * case.period
        x = torch.randn(GLOBAL_BATCH, 1, 28, 28, generator=generator)
        y = torch.randint(0, 10, (GLOBAL_BATCH,), generator=generator)
        x, y = x.tensor_split(world)[rank], y.tensor_split(world)[rank]
        times = []
        for step in range(total):
            if step == warmup * case.period:
                distributed.TRAFFIC.reset()
            tick = time.perf_counter()
            optimizer.zero_grad()
            output = network(x)
            loss = nn.functional.cross_entropy(output, y)
            backward(optimizer, loss, output)
            optimizer.step()
            times.append(time.perf_counter() - tick)
        timed = times[warmup * case.period :]
        # median over whole periods of the per-period mean: the amortised cost, robust to noise
        per_period = [
            statistics.fmean(timed[i : i + case.period]) for i in range(0, len(timed), case.period)
        ]
        results.append(
            {
                "seconds": statistics.median(per_period),
                "bytes": distributed.TRAFFIC.bytes / len(timed),
                "comm_seconds": distributed.TRAFFIC.seconds / len(timed),
                "by_kind": {k: v / len(timed) for k, v in distributed.TRAFFIC.by_kind.items()},
                "gradient_bytes": 4 * sum(p.numel() for p in model.parameters()) * (world > 1),
            }
        )
        if hasattr(optimizer, "close"):
            optimizer.close()
    return results


def run(
    steps: int = 6, warmup: int = 1, world: int = 2, threads: int = 1, timeout: float = 600.0
) -> dict[str, Any]:
    """Measure :func:`default_cases` with 1 and ``world`` processes.

    Returns:
        ``cases`` (model, label), ``single`` and ``parallel`` (one measurement per case),
        and the conditions (threads, load average before and after, versions).
    """
    cases = default_cases()
    load_before = os.getloadavg()
    single = distributed.launch_local(
        _measure, 1, (cases, steps, warmup), timeout=timeout, threads=threads
    )[0]
    parallel = distributed.launch_local(
        _measure, world, (cases, steps, warmup), timeout=timeout, threads=threads
    )[0]
    return {
        "cases": [(c.model, c.label) for c in cases],
        "single": single,
        "parallel": parallel,
        "world": world,
        "threads": threads,
        "steps": steps,
        "load": (load_before, os.getloadavg()),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def _size(count: float) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count:.0f} B"


def report(results: dict[str, Any]) -> str:
    """The Markdown report of :func:`run`."""
    world = results["world"]
    lines = [
        "# Data-parallel training: time and communication per step",
        "",
        "Written by `python -m foof.benchmarks.distributed` (a benchmark, not a test). Global "
        f"batch {GLOBAL_BATCH}; 1 process against {world} processes (DDP, gloo, "
        f"{GLOBAL_BATCH // world} samples each), {results['threads']} torch thread(s) per "
        f"process. Median over {results['steps']} timed steps "
        "(whole `inv_every` periods), after warm-up. Random inputs of the data's shape.",
        "",
        "*foof bytes* are the payload one rank hands to foof's collectives per step (see "
        "`foof/distributed.py`): statistics sums (upper triangles) on statistics steps, MC "
        "network outputs, gathered natural-gradient data, broadcast inverses, and a 4-byte "
        "non-finite flag. *DDP gradient bytes* are the gradient all-reduce that DDP performs "
        "on every step for every method (float32 parameters).",
        "",
        f"Machine: {results['cpus']} CPU cores, {results['platform']}, torch {results['torch']}. "
        "Load average (1, 5, 15 min) before: "
        + ", ".join(f"{v:.1f}" for v in results["load"][0])
        + "; after: "
        + ", ".join(f"{v:.1f}" for v in results["load"][1])
        + ". **Other jobs shared these cores**, so the times (and above all the ratio) are "
        "indicative only; the byte counts are exact.",
        "",
        f"| model | method | 1 process (s/step) | {world} processes (s/step) | speed-up | "
        "in foof's collectives (s/step) | foof bytes/step | of which | DDP gradient bytes/step |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    names = {"mlp": "paper MLP", "cnn": "small CNN"}
    for (model, label), one, many in zip(results["cases"], results["single"], results["parallel"]):
        kinds = ", ".join(f"{k} {_size(v)}" for k, v in sorted(many["by_kind"].items()))
        lines.append(
            f"| {names[model]} | {label} | {one['seconds']:.3f} | {many['seconds']:.3f} | "
            f"{one['seconds'] / many['seconds']:.2f}× | {many['comm_seconds']:.3f} | "
            f"{_size(many['bytes'])} | {kinds or '–'} | "
            f"{_size(many['gradient_bytes'])} |"
        )
    lines += [
        "",
        "Reading the table: FOOF and KFAC send each layer's `n(n+1)/2` statistics per statistics "
        "step (the MLP's 784- and 1000-wide inputs: about 2 MB per layer in float32), so "
        "`T=5, S=1` (`inv_every=5, stats_steps=1`) divides it by 5; sharded inversion adds "
        "the broadcast inverses (`n²` per factor per inversion) but computes each inverse on "
        "one rank only. "
        "Natural gradients gather `A` and `E` of the global batch on every refresh, "
        "`O(batch · neurons)`, never `O(parameters²)`. The collectives column is wall-clock "
        "time inside foof's collectives, waiting for the slower rank included. Under DDP the "
        "low-rank product `Eᵀ(A P)` is off (one rank's `E`, `A` do not give the averaged "
        "gradient), so the dense `Ĝ P` is paid on every step. A speed-up below 1× with little "
        "time in the collectives means the ranks were short of CPU, not of bandwidth: each "
        "rank still does the replicated inversions and the dense products, and on a shared "
        "2-core machine the two ranks and the other jobs compete for the same cores.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m foof.benchmarks.distributed``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per case (default 6)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed periods (default 1)")
    parser.add_argument("--world", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="threads per process (default 1)")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/distributed.md"))
    args = parser.parse_args(argv)
    results = run(args.steps, args.warmup, args.world, args.threads)
    text = report(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
