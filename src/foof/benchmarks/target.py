"""Time to a target training loss on Fashion-MNIST (the paper's MLP, batch 100).

The target is the reference method's (Adam's) training loss after ``epochs`` epochs: the mean
of its step losses over its last epoch. Every method's *training loss* at a step is the mean of
its step losses over the last epoch's worth of steps (the same window), and its time to target
is the sum of its own step times (forward, loss, backward, optimizer step, reading the loss)
until that mean first falls below the target. The reference runs first and for the full
``epochs``; the others stop at the target, after ``epochs`` epochs, or after
``time_cap × (reference's time)``, whichever comes first. Methods run one after another (a run
cannot be interleaved without also sharing its wall clock), so a change in machine load
between runs shows in their times; the step counts to target do not depend on it.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from foof.benchmarks.methods import Method, Workload
from foof.benchmarks.timing import Log, build_stepper
from foof.data import Dataset
from foof.optim.kronecker import WARM_START_BATCHES
from foof.train import warm_start_indices


@dataclass(frozen=True)
class TargetConfig:
    """Settings of the time-to-target runs.

    Attributes:
        dataset: ``"fashion-mnist"`` (or ``"mnist"``).
        subset: training images used (``None``: all 60,000).
        epochs: epochs of the reference, and the most any method gets.
        batch_size: mini-batch size.
        time_cap: a method stops after this multiple of the reference's time.
        data_dir: directory searched first for the data.
        model_options: arguments of the MLP factory (default: the paper's MLP).
    """

    dataset: str = "fashion-mnist"
    subset: int | None = 10_000
    epochs: int = 10
    batch_size: int = 100
    time_cap: float = 1.0
    data_dir: str | None = None
    model_options: Mapping[str, Any] = field(default_factory=dict)


def train_until(
    workload: Workload,
    method: Method,
    data: Dataset,
    epochs: int,
    target: float | None,
    time_limit: float | None,
    device: torch.device,
    seed: int = 0,
) -> dict[str, Any]:
    """Train ``method`` with the uniform step; stop at ``target``, ``time_limit`` or ``epochs``.

    Returns:
        ``steps`` taken, ``seconds`` (sum of step times), ``window_loss`` (mean step loss over
        the last epoch-long window), ``steps_to_target`` and ``seconds_to_target`` (``None``
        if not reached), ``diverged``, ``status`` and ``note``.
    """
    stepper, status, note = build_stepper(workload, method, device, seed)
    result: dict[str, Any] = {
        "method": method.key,
        "label": method.label,
        "status": status,
        "note": note,
        "steps": 0,
        "seconds": 0.0,
        "window_loss": None,
        "steps_to_target": None,
        "seconds_to_target": None,
        "diverged": False,
    }
    if stepper is None:
        return result
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    n = len(y_train)
    batch = min(workload.batch_size, n)
    window: deque[float] = deque(maxlen=math.ceil(n / batch))
    shuffle = torch.Generator().manual_seed(seed)
    seconds = 0.0
    curve: list[tuple[int, float, float]] = []
    try:
        seconds += _warm_start(stepper, x_train, y_train, batch, seed)
        for _ in range(epochs):
            order = torch.randperm(n, generator=shuffle).to(device)
            for first in range(0, n, batch):
                index = order[first : first + batch]
                start = time.perf_counter()
                value = float(stepper.step(x_train[index], y_train[index]))
                seconds += time.perf_counter() - start
                result["steps"] += 1
                if not math.isfinite(value):
                    result["diverged"] = True
                    return result
                window.append(value)
                if len(window) == window.maxlen:
                    result["window_loss"] = sum(window) / len(window)
                    curve.append((result["steps"], seconds, result["window_loss"]))
                    reached = target is not None and result["window_loss"] <= target
                    if reached and result["steps_to_target"] is None:
                        result["steps_to_target"] = result["steps"]
                        result["seconds_to_target"] = seconds
                        return result
                if time_limit is not None and seconds > time_limit:
                    return result
    except Exception as error:  # noqa: BLE001 - report and go on with the next method
        result["status"], result["note"] = "error", f"{type(error).__name__}: {error}"
    finally:
        result["seconds"] = seconds
        result["curve"] = curve
        stepper.close()
    return result


def _warm_start(stepper: Any, x_train: Tensor, y_train: Tensor, batch: int, seed: int) -> float:
    """App. K's initialisation for FOOF/KFAC steppers, as ``foof train`` does; its seconds.

    The time counts towards the method's time to target: it is part of the method's cost.
    """
    optimizer = getattr(stepper, "optimizer", None)
    if not hasattr(optimizer, "warm_start"):
        return 0.0
    indices = warm_start_indices(len(y_train), batch, WARM_START_BATCHES, seed, x_train.device)
    batches = ((x_train[i], y_train[i]) for i in indices)
    start = time.perf_counter()
    optimizer.warm_start(batches, loss_fn=stepper.loss_fn, model=stepper.model)
    return time.perf_counter() - start


def time_to_target(
    workload: Workload,
    reference: Method,
    methods: tuple[Method, ...],
    data: Dataset,
    config: TargetConfig,
    device: torch.device | str = "cpu",
    seed: int = 0,
    log: Log | None = None,
) -> dict[str, Any]:
    """Run the reference for ``config.epochs`` epochs, then each method until its loss.

    Args:
        workload: the model and batch size (its methods are ignored).
        reference: the method whose final training loss is the target (Adam).
        methods: the methods timed against it.
        data: the training data.
        config: epochs, caps and the data description.
        device: where to train.
        seed: init and batch-order seed, the same for every method.
        log: progress messages.

    Returns:
        ``target_loss``, ``reference`` (its run, with ``seconds_to_target`` by the same rule as
        the others) and ``runs`` (one per method, with ``time_ratio``: seconds to target over
        the reference's seconds to target).
    """
    device = torch.device(device)
    if log is not None:
        log(f"time to target: {reference.label}, {config.epochs} epochs")
    ref = train_until(workload, reference, data, config.epochs, None, None, device, seed)
    target = ref["window_loss"] if ref["status"] == "ok" and not ref["diverged"] else None
    if target is not None:
        # the reference against its own target, by the same windowed rule as every method
        ref["steps_to_target"], ref["seconds_to_target"] = next(
            (step, seconds) for step, seconds, loss in ref["curve"] if loss <= target
        )
    runs = []
    for method in methods:
        if target is None:
            break
        if log is not None:
            log(f"time to target: {method.label}")
        limit = config.time_cap * ref["seconds"]
        run = train_until(workload, method, data, config.epochs, target, limit, device, seed)
        reached = run["seconds_to_target"]
        run["time_ratio"] = reached / ref["seconds_to_target"] if reached is not None else None
        run.pop("curve", None)
        runs.append(run)
    ref.pop("curve", None)
    return {
        "dataset": data.describe(),
        "model": workload.model,
        "batch_size": workload.batch_size,
        "epochs": config.epochs,
        "time_cap": config.time_cap,
        "target_loss": target,
        "reference": ref,
        "runs": runs,
    }
