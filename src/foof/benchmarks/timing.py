"""Per-step time of many methods interleaved in one process, and their memory.

Timing rules (issue 5):

* Every method keeps its own model and optimizer; all start from the same initial weights.
* Methods are interleaved: rounds go over the methods in turn, ``chunk`` steps each, so that a
  change in machine load (other jobs, thermal state) hits every method alike. The baseline
  keeps running until the last method is done, so it is always measured under the same load.
* The first ``warmup`` steps of every method are excluded (fewer, at least one, for a method
  with period 1 whose warm-up steps take more than ``budget_s / 3`` seconds).
* Amortised methods (period ``T = inv_every``) are measured over a whole number of periods, so
  that the window holds exactly one inversion (and ``stats_steps`` statistics steps) per ``T``
  steps and the *mean* is the amortised cost; the *median* is the cost of a typical step.
* A method whose steps are slow (a period of 1, more than ``budget_s`` seconds measured) stops
  early, after at least ``min_steps`` measured steps; the table shows how many steps it got.
* On CUDA each step is bracketed by ``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import ctypes
import gc
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from foof.benchmarks.methods import BASELINE, Method, PeerUnavailableError, Stepper, Workload

Log = Callable[[str], None]


@dataclass
class MethodRun:
    """One method's measurements on one workload.

    Attributes:
        method: what was run.
        status: ``"ok"``, ``"not installed"``, ``"not applicable"`` or ``"error"``.
        note: why a method was not run, or what went wrong.
        planned_steps: measured steps it was to take (whole periods for amortised methods).
        times: seconds of each measured step.
        final_loss: the loss of its last step (``None`` if not finite).
        state_bytes: bytes of its persistent state tensors (factors, inverses, momentum, stored
            Fisher batches), the memory it needs beyond the model and its gradients.
        peak_step_bytes: peak memory growth during its first two steps (the first one inverts)
            in a fresh model: RSS growth on CPU, ``max_memory_allocated`` growth on CUDA; ``None``
            where it cannot be measured.
    """

    method: Method
    status: str = "ok"
    note: str = ""
    planned_steps: int = 0
    times: list[float] = field(default_factory=list)
    final_loss: float | None = None
    state_bytes: int | None = None
    peak_step_bytes: int | None = None
    stepper: Stepper | None = field(default=None, repr=False)


def planned_steps(method: Method, steps: int, whole_periods: bool) -> int:
    """``steps`` rounded up to whole periods of an amortised method (if ``whole_periods``)."""
    if not whole_periods or method.period <= 1:
        return steps
    return math.ceil(steps / method.period) * method.period


def build_stepper(
    workload: Workload, method: Method, device: torch.device, seed: int
) -> tuple[Stepper | None, str, str]:
    """Fresh model (seeded, so every method starts from the same weights) and its stepper.

    Returns:
        ``(stepper, status, note)``; ``stepper`` is ``None`` when the status is not ``"ok"``.
    """
    torch.manual_seed(seed)
    model = workload.build_model(device)
    try:
        return method.build(model, workload), "ok", ""
    except PeerUnavailableError as error:
        message = str(error)
        status = "not applicable" if message.startswith("not applicable") else "not installed"
        return None, status, message
    except Exception as error:  # noqa: BLE001 - a broken method must not stop the benchmark
        return None, "error", f"{type(error).__name__}: {error}"


def time_workload(
    workload: Workload,
    steps: int,
    warmup: int = 5,
    chunk: int = 10,
    budget_s: float = 60.0,
    min_steps: int = 10,
    whole_periods: bool = True,
    device: torch.device | str = "cpu",
    seed: int = 0,
    log: Log | None = None,
) -> list[MethodRun]:
    """Time every method of ``workload``, interleaved, in this process.

    Args:
        workload: the model, batch size and methods (the baseline must be among them).
        steps: measured steps per method before rounding up to whole periods.
        warmup: excluded steps at the start of each method.
        chunk: consecutive steps a method takes per round.
        budget_s: measured seconds after which a method with period 1 may stop early.
        min_steps: measured steps every method gets regardless of ``budget_s``.
        whole_periods: round amortised methods up to whole periods (off in quick runs).
        device: where models and data live.
        seed: seeds the models' initialisation and the data.
        log: progress messages.

    Returns:
        One :class:`MethodRun` per method, in the workload's order; steppers are closed.
    """
    device = torch.device(device)
    batches = workload.make_batches(8, device, seed)
    runs = []
    for method in workload.methods:
        stepper, status, note = build_stepper(workload, method, device, seed)
        wanted = workload.steps if workload.steps is not None else steps
        run = MethodRun(method, status, note, planned_steps(method, wanted, whole_periods))
        run.stepper = stepper
        runs.append(run)
    taken = {id(run): 0 for run in runs}
    measured_time = {id(run): 0.0 for run in runs}
    warmup_time = {id(run): 0.0 for run in runs}
    warming = {id(run): warmup > 0 for run in runs}

    def done(run: MethodRun) -> bool:
        if run.status != "ok":
            return True
        count = len(run.times)
        if run.method.key == BASELINE:
            others = [r for r in runs if r is not run and not done(r)]
            return count >= run.planned_steps and not others
        if count >= run.planned_steps:
            return True
        slow = measured_time[id(run)] > budget_s
        return run.method.period == 1 and slow and count >= min_steps

    rounds, last_log = 0, time.perf_counter()
    while not all(done(run) for run in runs):
        for run in runs:
            for _ in range(chunk):
                if done(run):
                    break
                x, y = batches[taken[id(run)] % len(batches)]
                try:
                    seconds, loss = _timed_step(run.stepper, x, y, device)
                except Exception as error:  # noqa: BLE001 - report, drop, go on
                    run.status, run.note = "error", f"{type(error).__name__}: {error}"
                    break
                if warming[id(run)]:
                    warmup_time[id(run)] += seconds
                    # a slow method warms up in fewer steps (its first steps dominate less)
                    slow = run.method.period == 1 and warmup_time[id(run)] > budget_s / 3
                    warming[id(run)] = taken[id(run)] + 1 < warmup and not slow
                else:
                    run.times.append(seconds)
                    measured_time[id(run)] += seconds
                taken[id(run)] += 1
                run.final_loss = loss
        rounds += 1
        if log is not None and time.perf_counter() - last_log > 60:
            last_log = time.perf_counter()
            left = [run.method.key for run in runs if not done(run)]
            log(f"{workload.key}: round {rounds}, still running: {', '.join(left)}")
    for run in runs:
        if run.stepper is not None:
            if run.status == "ok":
                run.state_bytes = state_bytes(run.stepper, exclude=batches)
            run.stepper.close()
            run.stepper = None
    return runs


def _timed_step(stepper: Stepper, x: Tensor, y: Tensor, device: torch.device) -> tuple[float, Any]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    loss = stepper.step(x, y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    value = float(loss)
    return seconds, value if math.isfinite(value) else None


def summarize(times: list[float]) -> dict[str, float] | None:
    """Median, mean, p10 and p90 of step times, in milliseconds (``None`` if empty)."""
    if not times:
        return None
    ms = np.asarray(times) * 1e3
    return {
        "median_ms": float(np.median(ms)),
        "mean_ms": float(np.mean(ms)),
        "p10_ms": float(np.percentile(ms, 10)),
        "p90_ms": float(np.percentile(ms, 90)),
    }


def ratios(summary: dict[str, float] | None, baseline: dict[str, float] | None) -> dict:
    """A method's times over the baseline's: median/median, mean/mean, p10 and p90 / median."""
    if summary is None or baseline is None:
        return {"ratio_median": None, "ratio_mean": None, "ratio_p10": None, "ratio_p90": None}
    return {
        "ratio_median": summary["median_ms"] / baseline["median_ms"],
        "ratio_mean": summary["mean_ms"] / baseline["mean_ms"],
        "ratio_p10": summary["p10_ms"] / baseline["median_ms"],
        "ratio_p90": summary["p90_ms"] / baseline["median_ms"],
    }


# -- memory -------------------------------------------------------------------------------


def state_bytes(stepper: Stepper, exclude: Iterable[Any] = ()) -> int:
    """Bytes of the distinct tensor storages reachable from ``stepper.state_roots()``.

    Parameters, their gradients and the tensors in ``exclude`` (e.g. the data) do not count:
    what remains is the memory the method keeps beyond what plain SGD needs (factors,
    inverses, momentum, stored Fisher data).
    """
    skip = {_storage_key(p) for p in stepper.model.parameters()}
    skip |= {_storage_key(p.grad) for p in stepper.model.parameters() if p.grad is not None}
    skip |= {_storage_key(t) for t in _tensors_in(exclude, depth=3)}
    sizes: dict[int, int] = {}
    for tensor in _tensors_in(stepper.state_roots(), depth=8):
        key = _storage_key(tensor)
        if key not in skip:
            sizes[key] = tensor.untyped_storage().nbytes()
    return sum(sizes.values())


def _storage_key(tensor: Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _tensors_in(root: Any, depth: int) -> Iterable[Tensor]:
    """Tensors inside containers and plain objects, up to ``depth`` levels (modules skipped)."""
    seen: set[int] = set()
    stack = [(root, 0)]
    while stack:
        obj, level = stack.pop()
        if id(obj) in seen or level > depth:
            continue
        seen.add(id(obj))
        if isinstance(obj, Tensor):
            if obj.untyped_storage().nbytes() > 0:
                yield obj
        elif isinstance(obj, nn.Module | type) or callable(obj):
            continue
        elif isinstance(obj, dict):
            stack.extend((value, level + 1) for value in obj.values())
        elif isinstance(obj, list | tuple | set | frozenset):
            stack.extend((value, level + 1) for value in obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, str | bytes):
            stack.extend((value, level + 1) for value in vars(obj).values())


class PeakMemory:
    """Peak memory growth of a block of code: RSS on Linux CPUs, the allocator on CUDA.

    On CPU this resets the kernel's peak-RSS counter (``/proc/self/clear_refs``) and makes
    glibc return large blocks to the system (``mallopt(M_MMAP_THRESHOLD)``, ``malloc_trim``), so
    that a block's allocations show up as RSS growth rather than reuse of freed memory. Changes
    malloc's behaviour until :meth:`close`, which sets the threshold to 32 MiB, the ceiling
    glibc's own adjustment reaches on 64-bit systems (big blocks are then reused, as after
    glibc's warm-up). Call it after the timing runs.
    """

    _MMAP_THRESHOLD = -3  # glibc's M_MMAP_THRESHOLD
    _THRESHOLD_AFTER = 32 * 1024 * 1024

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._libc = None
        self.available = device.type == "cuda"
        if device.type == "cpu":
            try:
                libc = ctypes.CDLL("libc.so.6")
                with open("/proc/self/clear_refs", "w") as handle:
                    handle.write("5")
                libc.mallopt(self._MMAP_THRESHOLD, 128 * 1024)
                self._libc = libc
                self.available = _proc_status("VmHWM") is not None
            except (OSError, AttributeError):
                self.available = False

    def start(self) -> None:
        """Release freed memory and reset the peak counter."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.available:
            self._libc.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            self._base = _proc_status("VmRSS")

    def close(self) -> None:
        """Let malloc keep large freed blocks for reuse again (see the class docstring)."""
        if self._libc is not None:
            self._libc.mallopt(self._MMAP_THRESHOLD, self._THRESHOLD_AFTER)

    def peak(self) -> int | None:
        """Bytes by which memory rose above its level at :meth:`start`, at the peak."""
        if not self.available:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self._base
        return max(0, _proc_status("VmHWM") - self._base)


def _proc_status(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            text = handle.read()
    except OSError:
        return None
    match = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def measure_memory(
    workload: Workload, runs: list[MethodRun], device: torch.device | str, seed: int = 0
) -> None:
    """Fill ``peak_step_bytes`` of each run: two steps of a fresh copy of the method.

    The first step of every method inverts (or takes its first Fisher batch), so two steps see
    both kinds of step. The fresh model, optimizer and data exist before the counter starts.
    """
    device = torch.device(device)
    meter = PeakMemory(device)
    if not meter.available:
        return
    batches = workload.make_batches(2, device, seed)
    gc.collect()
    gc.freeze()  # later collections then skip the (many) objects that exist now: much faster
    try:
        _measure_each(workload, runs, batches, meter, device, seed)
    finally:
        gc.unfreeze()
        meter.close()


def _measure_each(
    workload: Workload,
    runs: list[MethodRun],
    batches: list[tuple[Tensor, Tensor]],
    meter: PeakMemory,
    device: torch.device,
    seed: int,
) -> None:
    for run in runs:
        if run.status != "ok":
            continue
        stepper, status, _ = build_stepper(workload, run.method, device, seed)
        if stepper is None or status != "ok":
            continue
        try:
            meter.start()
            for x, y in batches:
                stepper.step(x, y)
            run.peak_step_bytes = meter.peak()
        except Exception as error:  # noqa: BLE001 - memory is secondary to the timing
            run.note = (run.note + "; " if run.note else "") + f"memory: {error}"
        finally:
            stepper.close()
            del stepper
