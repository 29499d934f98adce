"""The few collectives foof's optimizers need under ``torch.distributed``, and their byte count.

foof runs on the process group every PyTorch cluster already has (DDP launched by ``torchrun``);
it has no communication layer of its own. ``DistributedDataParallel`` averages ``p.grad``; on
top of that each optimizer calls the helpers below so that every rank preconditions with the
statistics of the *global* batch. Per optimizer step, with ``W`` ranks:

* **every step**: one ``int32`` all-reduce (4 bytes) agreeing whether some rank met a
  non-finite value, so that all ranks skip the same steps (:func:`any_rank`);
* **FOOF / KFAC, statistics steps only** (``stats_steps``/``inv_every`` amortisation cuts
  communication exactly as it cuts computation): one packed all-reduce of every layer's
  *unnormalised* batch sums ``Σ_r ā_r ā_rᵀ`` (and ``Σ e eᵀ`` for KFAC) and their row / sample
  counts, each symmetric matrix sent as its upper triangle, ``n(n+1)/2`` numbers
  (:func:`all_reduce_sum_`); KFAC's MC Fisher also all-gathers the network outputs
  ``(B, C)`` so that the labels are drawn for the global batch (:func:`all_gather_rows`);
* **FOOF / KFAC, inversion steps with** ``inverse_sharding="sharded"``: layer ``i``'s inverse
  (or eigendecomposition) is computed on rank ``i mod W`` and broadcast, ``n²`` numbers per
  factor (:func:`broadcast_from_owners`); ``"replicated"`` inverts everywhere and sends nothing;
* **NaturalGradient, Fisher refresh steps only**: an all-gather of every layer's inputs ``A``
  and Fisher output gradients ``E`` (``O(global batch · neurons)`` numbers, never
  parameters², :func:`all_gather_rows`) plus the batch size; the ``M×M`` Gram matrix is then
  computed, identically, on every rank.

Byte counts are the payload this rank hands to each collective (what :data:`TRAFFIC` adds up),
not the wire traffic of the backend's algorithm (a ring all-reduce moves about ``2(W−1)/W``
times the payload per rank).

Without a process group of more than one rank (:func:`is_distributed` false) every helper
communicates nothing and leaves its input as it is, so the single-process path is untouched.
:func:`launch_local` starts local gloo processes for tests and benchmarks.
"""

from __future__ import annotations

import atexit
import io
import math
import multiprocessing
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

DEFAULT_TIMEOUT = timedelta(minutes=10)
"""Collective timeout used when foof initialises the process group itself."""


@dataclass
class Traffic:
    """Running count of the payload bytes this rank handed to foof's collectives.

    Attributes:
        bytes: total bytes since the last :meth:`reset`.
        calls: number of collectives since the last :meth:`reset`.
        seconds: wall-clock time spent in them (waiting for slower ranks included).
        by_kind: bytes per collective kind (``"all_reduce"``, ``"all_gather"``, ...).
    """

    bytes: int = 0
    calls: int = 0
    seconds: float = 0.0
    by_kind: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, count: int, seconds: float = 0.0) -> None:
        """Record one collective of ``count`` payload bytes that took ``seconds``."""
        self.bytes += count
        self.calls += 1
        self.seconds += seconds
        self.by_kind[kind] = self.by_kind.get(kind, 0) + count

    def reset(self) -> None:
        """Start counting from zero."""
        self.bytes, self.calls, self.seconds = 0, 0, 0.0
        self.by_kind.clear()


TRAFFIC = Traffic()
"""The process-wide byte counter of every helper in this module."""


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _run(kind: str, tensor: Tensor, collective: Callable[[], Any]) -> None:
    """Run a blocking collective on ``tensor`` and count its bytes and time."""
    start = time.perf_counter()
    collective()
    TRAFFIC.add(kind, _nbytes(tensor), time.perf_counter() - start)


def is_distributed() -> bool:
    """Whether the default process group is initialised and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Ranks in the default process group, 1 when there is none."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group; without one, ``$RANK`` (torchrun) or 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def _device(like: Tensor | None = None) -> torch.device:
    """Where small bookkeeping tensors must live for the backend (NCCL needs CUDA)."""
    if dist.get_backend() == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return like.device if like is not None else torch.device("cpu")


def any_rank(flag: bool, like: Tensor | None = None) -> bool:
    """Whether ``flag`` is true on at least one rank (an ``int32`` max all-reduce, 4 bytes)."""
    return bool(max_over_ranks(int(flag), like))


def max_over_ranks(number: int, like: Tensor | None = None) -> int:
    """The largest of every rank's ``number`` (an ``int32`` max all-reduce, 4 bytes)."""
    if not is_distributed():
        return number
    value = torch.tensor([number], dtype=torch.int32, device=_device(like))
    _run("all_reduce", value, lambda: dist.all_reduce(value, op=dist.ReduceOp.MAX))
    return int(value.item())


def all_reduce_mean_(tensor: Tensor) -> Tensor:
    """Average ``tensor`` over ranks, in place; ``numel·itemsize`` bytes. Returns ``tensor``."""
    if is_distributed():
        _run("all_reduce", tensor, lambda: dist.all_reduce(tensor))
        tensor.div_(dist.get_world_size())
    return tensor


def all_reduce_sum_(tensors: Sequence[Tensor], symmetric: Sequence[bool] | None = None) -> None:
    """Sum each tensor over ranks, in place, with one all-reduce per dtype and device.

    The tensors are packed into one flat buffer so that many small per-layer statistics cost
    one collective's latency. A tensor flagged ``symmetric`` (a square symmetric matrix) travels
    as its upper triangle, ``n(n+1)/2`` numbers instead of ``n²``, and is mirrored back.

    Args:
        tensors: any shapes; every rank must pass the same shapes in the same order.
        symmetric: per tensor, whether it is a symmetric matrix; default none is.
    """
    if not is_distributed() or not tensors:
        return
    flags = list(symmetric) if symmetric is not None else [False] * len(tensors)
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for index, tensor in enumerate(tensors):
        groups.setdefault((tensor.dtype, tensor.device), []).append(index)
    for indices in groups.values():
        parts, triangles = [], {}
        for index in indices:
            tensor = tensors[index]
            if flags[index]:
                # a boolean mask: 1 byte per entry, where triu_indices would take 16
                mask = torch.ones_like(tensor, dtype=torch.bool).triu_()
                triangles[index] = mask
                parts.append(tensor[mask])
            else:
                parts.append(tensor.reshape(-1))
        buffer = torch.cat(parts)
        _run("all_reduce", buffer, lambda b=buffer: dist.all_reduce(b))
        position = 0
        for index, part in zip(indices, parts):
            chunk = buffer[position : position + part.numel()]
            position += part.numel()
            tensor = tensors[index]
            if index in triangles:
                tensor.zero_()[triangles[index]] = chunk
                tensor.add_(tensor.triu(1).T)
            else:
                tensor.copy_(chunk.view_as(tensor))


def all_gather_rows(tensors: Sequence[Tensor]) -> tuple[list[Tensor], list[list[int]]]:
    """Concatenate each tensor along dim 0 over ranks (rank 0's rows first); sizes may differ.

    First the row counts are exchanged (one ``int64`` per tensor), then every tensor of a
    dtype is packed into one flat buffer, padded to the longest rank's and all-gathered: this
    rank sends ``max_r(Σ rows_r · row size)`` numbers, which is its own share when the ranks
    hold equal batches.

    Args:
        tensors: ``(rows_r, ...)`` per tensor; trailing dims, dtypes and order equal on every
            rank.

    Returns:
        The gathered ``(Σ_r rows_r, ...)`` tensors, and ``counts[r][i]``, the rows tensor ``i``
        had on rank ``r`` (to find this rank's slice again).
    """
    if not is_distributed():
        return list(tensors), [[t.shape[0] for t in tensors]]
    world = dist.get_world_size()
    device = _device(tensors[0] if tensors else None)
    local = torch.tensor([t.shape[0] for t in tensors], dtype=torch.int64, device=device)
    everyone = [torch.empty_like(local) for _ in range(world)]
    _run("all_gather", local, lambda: dist.all_gather(everyone, local))
    counts = [c.tolist() for c in everyone]
    gathered: list[Tensor | None] = [None] * len(tensors)
    groups: dict[torch.dtype, list[int]] = {}
    for index, tensor in enumerate(tensors):
        groups.setdefault(tensor.dtype, []).append(index)
    for dtype, indices in groups.items():
        row_size = [math.prod(tensors[i].shape[1:]) for i in indices]
        lengths = [sum(counts[r][i] * s for i, s in zip(indices, row_size)) for r in range(world)]
        buffer = torch.zeros(max(lengths), dtype=dtype, device=tensors[indices[0]].device)
        flat = torch.cat([tensors[i].reshape(-1) for i in indices])
        buffer[: flat.numel()] = flat
        received = [torch.empty_like(buffer) for _ in range(world)]
        _run("all_gather", buffer, lambda r=received, b=buffer: dist.all_gather(r, b))
        pieces: dict[int, list[Tensor]] = {i: [] for i in indices}
        for r in range(world):
            position = 0
            for i, size in zip(indices, row_size):
                length = counts[r][i] * size
                shape = (counts[r][i], *tensors[i].shape[1:])
                pieces[i].append(received[r][position : position + length].view(shape))
                position += length
        for i in indices:
            gathered[i] = torch.cat(pieces[i])
    return [g for g in gathered if g is not None], counts  # every slot is filled by now


def broadcast_from_owners(items: Sequence[tuple[Tensor, int]]) -> None:
    """Broadcast each ``(tensor, owner)`` from its owner rank to all others, in place.

    All broadcasts are issued asynchronously and then awaited, so a rank that owns several
    tensors does not serialise the others. Counts ``numel·itemsize`` per tensor on every rank.
    """
    if not is_distributed():
        return
    start = time.perf_counter()
    work = [dist.broadcast(tensor, src=owner, async_op=True) for tensor, owner in items]
    for handle in work:
        handle.wait()
    for tensor, _ in items:
        TRAFFIC.add("broadcast", _nbytes(tensor))
    TRAFFIC.seconds += time.perf_counter() - start


def broadcast_int(value: int, src: int = 0) -> int:
    """Rank ``src``'s ``value`` on every rank (8 bytes)."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=_device())
    _run("broadcast", tensor, lambda: dist.broadcast(tensor, src=src))
    return int(tensor.item())


# -- setting up and launching --------------------------------------------------------------------
def backend_for(device: torch.device | str) -> str:
    """``"nccl"`` for CUDA devices, ``"gloo"`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_from_environment(
    device: torch.device | str = "cpu", timeout: timedelta = DEFAULT_TIMEOUT
) -> bool:
    """Initialise the default process group from torchrun's variables, if there is work to do.

    Does nothing when the group already exists or ``$WORLD_SIZE`` is unset or 1. A group
    created here is destroyed when the process exits.

    Args:
        device: the training device; selects the backend (NCCL for CUDA, else gloo).
        timeout: how long a collective waits for the other ranks before raising, so that a rank
            that died cannot leave the others hanging forever.

    Returns:
        Whether this call created the group (the caller then destroys it when done).
    """
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend_for(device), timeout=timeout)
    atexit.register(_destroy)
    return True


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def local_device(device: torch.device | str) -> torch.device:
    """``device``, with a bare ``"cuda"`` made this rank's GPU (``$LOCAL_RANK``)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and is_distributed():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


class RankError(RuntimeError):
    """One or more ranks of :func:`launch_local` failed; the message holds their tracebacks."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(
    fn: Callable[..., Any],
    args: tuple,
    index: int,
    world: int,
    port: int,
    timeout: float,
    results: Any,
    threads: int,
) -> None:
    torch.set_num_threads(threads)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(index),
        LOCAL_RANK=str(index),
        WORLD_SIZE=str(world),
    )
    try:
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout))
        try:
            value = fn(index, world, *args)
            # torch's queue pickler shares tensor storage with the sending process, which exits
            # right after; plain bytes outlive it.
            buffer = io.BytesIO()
            torch.save(value, buffer)
            results.put((index, "ok", buffer.getvalue()))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - everything must reach the parent
        results.put((index, "error", traceback.format_exc()))


def launch_local(
    fn: Callable[..., Any],
    world_size: int = 2,
    args: tuple = (),
    timeout: float = 60.0,
    threads: int | None = None,
    limit: float = 600.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` local CPU processes (gloo).

    For tests and benchmarks: each process initialises the default group on a free localhost
    port with collective timeout ``timeout`` and returns ``fn``'s value. A rank that raises does
    not hang the others: they fail in their next collective (connection closed) or after
    ``timeout``. As a last resort, once one rank has reported, the others have ``timeout + 5``
    seconds to follow before they are terminated (and reported as hung); nothing runs longer
    than ``limit`` seconds.

    Args:
        fn: a module-level function (it is pickled into spawned processes); its value must be
            something ``torch.save`` can write.
        world_size: number of processes.
        args: further (picklable) arguments of ``fn``.
        timeout: collective timeout in seconds.
        threads: torch threads per process; default ``cpu_count // world_size`` (at least 1),
            so that the ranks do not oversubscribe the cores.
        limit: seconds after which every process still running is terminated.

    Returns:
        ``fn``'s value on each rank, by rank.

    Raises:
        RankError: some rank raised, hung or died; the message has every failing rank's story.
    """
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    processes = [
        context.Process(
            target=_worker,
            args=(fn, args, index, world_size, port, timeout, results, threads),
            daemon=True,
        )
        for index in range(world_size)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + limit
    outcomes: dict[int, tuple[str, Any]] = {}
    try:
        while len(outcomes) < world_size and time.monotonic() < deadline:
            try:
                index, status, value = results.get(timeout=0.2)
            except queue.Empty:
                if not any(p.is_alive() for p in processes) and results.empty():
                    break
                continue
            outcomes[index] = (status, value)
            deadline = min(deadline, time.monotonic() + timeout + 5)
    finally:
        for process in processes:
            process.join(timeout=1)
            if process.is_alive():
                process.terminate()
                process.join()
    failures = []
    for index, process in enumerate(processes):
        status, value = outcomes.get(index, ("missing", None))
        if status == "error":
            failures.append(f"rank {index} raised:\n{value}")
        elif status == "missing":
            failures.append(
                f"rank {index} returned nothing (exit code {process.exitcode}: it died, or hung "
                "and was terminated)"
            )
    if failures:
        raise RankError("\n".join(failures))
    return [torch.load(io.BytesIO(outcomes[i][1]), weights_only=False) for i in range(world_size)]
