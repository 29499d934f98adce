"""On a GPU: FOOF, KFAC and NaturalGradient steps equal float64 CPU steps, bf16 autocast keeps
float32 factors, memory stays flat, and 2 NCCL processes take the steps of one.

The GPU cases are marked ``cuda`` and skip without a CUDA device (``scripts/gpu-check`` runs
``pytest -m cuda``). Each comparison also runs with ``device="cpu"`` in float32, unmarked, so
the tolerances are known to hold for float32 arithmetic before any GPU sees them. TF32 is
switched off for the comparisons: with it a float32 convolution on an Ampere+ GPU rounds its
inputs to 10 mantissa bits, which is a different (and documented) precision contract.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from foof.optim.registry import backward, build_optimizer
from tests.cases import CASES

CUDA = torch.cuda.is_available()
GPUS = torch.cuda.device_count() if CUDA else 0
on_cuda = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]
DEVICES = [pytest.param("cpu", id="cpu-float32"), pytest.param("cuda", marks=on_cuda, id="cuda")]

METHODS = {
    "foof": dict(lr=0.1, damping=0.1, ema_decay=0.9, inv_every=2, momentum=0.9),
    "kfac-full": dict(lr=0.1, damping=0.1, ema_decay=0.9, inv_every=2, fisher="full"),
    "kfac-empirical": dict(lr=0.1, damping=0.1, inv_every=1, fisher="empirical"),
    "natural-full": dict(lr=0.1, damping=0.1, fisher="full"),
}
CASE_NAMES = ("linear-bias", "conv-stride1-pad1", "conv-stride2-pad2-dil2")
STEPS = 4


@pytest.fixture(autouse=True)
def _no_tf32() -> Iterator[None]:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _optimizer(method: str, model: nn.Module) -> torch.optim.Optimizer:
    return build_optimizer(method.split("-")[0], model, **METHODS[method])


def _train(
    method: str,
    case_name: str,
    device: str,
    dtype: torch.dtype,
    autocast: bool = False,
) -> tuple[list[list[torch.Tensor]], torch.optim.Optimizer]:
    """Parameters (on the CPU, float64) after each of ``STEPS`` steps on fixed batches."""
    case = next(c for c in CASES if c.name == case_name)
    model = case.model(seed=0).to(device=device, dtype=dtype)
    optimizer = _optimizer(method, model)
    trajectory = []
    for step in range(STEPS):
        x, y = case.batch(seed=10 + step)
        x, y = x.to(device=device, dtype=dtype), y.to(device)
        optimizer.zero_grad()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            output = model(x)
        loss = nn.functional.cross_entropy(output.float(), y)
        backward(optimizer, loss, output)
        optimizer.step()
        trajectory.append(
            [p.detach().to("cpu", torch.float64, copy=True) for p in model.parameters()]
        )
    return trajectory, optimizer


@pytest.mark.parametrize("case_name", CASE_NAMES)
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("device", DEVICES)
def test_float32_steps_equal_float64_cpu_steps(device, method, case_name):
    expected, _ = _train(method, case_name, "cpu", torch.float64)
    actual, _ = _train(method, case_name, device, torch.float32)
    for step, (got, want) in enumerate(zip(actual, expected)):
        for i, (a, b) in enumerate(zip(got, want)):
            torch.testing.assert_close(
                a, b, rtol=1e-4, atol=1e-5, msg=lambda m, s=step, j=i: f"step {s}, param {j}: {m}"
            )


BF16_METHODS = ["foof", "kfac-full", "natural-full"]


@pytest.mark.parametrize("method", BF16_METHODS)
@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_keeps_float32_factors_and_follows_the_float32_steps(device, method):
    reference, _ = _train(method, "conv-stride1-pad1", device, torch.float32)
    actual, optimizer = _train(method, "conv-stride1-pad1", device, torch.float32, autocast=True)
    for _, _, state in optimizer.layer_items():
        for key in optimizer.factor_keys:
            if isinstance(state.get(key), torch.Tensor):
                assert state[key].dtype == torch.float32, key
    start = [p.detach().to("cpu", torch.float64) for p in _initial("conv-stride1-pad1")]
    # bf16 keeps 8 mantissa bits: the parameters' displacement agrees to a few percent. The
    # natural gradient's solve with (λI + GᵀG) amplifies the rounding of the bf16 layer inputs
    # more than a Kronecker factor's inverse (on this case 5.2% for the conv weight, 12% for a
    # bias that moved by 0.009), so it is compared over all parameters at once, within 10%.
    if method.startswith("natural"):
        got, want, init = (
            torch.cat([t.flatten() for t in ts]) for ts in (actual[-1], reference[-1], start)
        )
        assert (got - want).norm() <= 0.10 * (want - init).norm()
        return
    for got, want, init in zip(actual[-1], reference[-1], start):
        moved = (want - init).norm()
        assert (got - want).norm() <= 0.05 * moved + 1e-6


def _initial(case_name: str) -> list[torch.Tensor]:
    case = next(c for c in CASES if c.name == case_name)
    return list(case.model(seed=0).parameters())


def _steps_then_free(method: str) -> list[int]:
    """``memory_allocated`` after each of 12 steps; the model and optimizer are then dropped."""
    case = next(c for c in CASES if c.name == "conv-stride1-pad1")
    model = case.model(seed=0).to("cuda", torch.float32)
    optimizer = _optimizer(method, model)
    x, y = (t.to("cuda") for t in case.batch(seed=1))
    allocated = []
    for _ in range(12):
        optimizer.zero_grad()
        output = model(x.float())
        backward(optimizer, nn.functional.cross_entropy(output, y), output)
        optimizer.step()
        torch.cuda.synchronize()
        allocated.append(torch.cuda.memory_allocated())
    if hasattr(optimizer, "close"):
        optimizer.close()
    del optimizer, model, output
    gc.collect()  # the optimizer's hooks and the model reference each other
    return allocated


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["foof", "kfac-full", "natural-full"])
def test_gpu_memory_is_flat_across_steps_and_freed_with_the_optimizer(method):
    _steps_then_free(method)  # first use allocates cuBLAS/cuSOLVER workspaces, which persist
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    allocated = _steps_then_free(method)
    # Steps of the same phase (inv_every=2) after the first periods hold the same tensors; a
    # leak would make the later one larger.
    assert allocated[-1] == allocated[-7], allocated
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before


_DDP_WORKER = """
import json, sys
import torch, torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from foof.optim.registry import backward, build_optimizer

method, device = sys.argv[1], sys.argv[2]
dist.init_process_group("nccl" if device == "cuda" else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
if device == "cuda":
    torch.cuda.set_device(rank)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5)).to(device)
optimizer = build_optimizer(method, model, lr=0.1, damping=0.1, inv_every=2)
ddp = DistributedDataParallel(model, device_ids=[rank] if device == "cuda" else None)
generator = torch.Generator().manual_seed(1)
for _ in range(4):
    x = torch.randn(100, 12, generator=generator)
    y = torch.randint(0, 5, (100,), generator=generator)
    share = slice(rank * 100 // world, (rank + 1) * 100 // world)
    optimizer.zero_grad()
    output = ddp(x[share].to(device))
    backward(optimizer, nn.functional.cross_entropy(output, y[share].to(device)), output)
    optimizer.step()
if rank == 0:
    print(json.dumps([p.detach().cpu().double().flatten().tolist() for p in model.parameters()]))
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


two_gpus = [
    pytest.mark.cuda,
    pytest.mark.skipif(GPUS < 2, reason=f"NCCL between 2 processes needs 2 GPUs, found {GPUS}"),
]


@pytest.mark.parametrize(
    ("device", "method"),
    [
        # gloo on the CPU checks this test's own worker everywhere; one method is enough.
        pytest.param("cpu", "kfac", id="gloo-cpu-kfac"),
        pytest.param("cuda", "foof", marks=two_gpus, id="nccl-cuda-foof"),
        pytest.param("cuda", "kfac", marks=two_gpus, id="nccl-cuda-kfac"),
    ],
)
def test_two_processes_take_the_steps_of_one(device, method):
    port = str(_free_port())
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port,
        "WORLD_SIZE": "2",
    }
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _DDP_WORKER, method, device],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=240) for p in processes]
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-2000:]
    two = json.loads(outputs[0][0].strip().splitlines()[-1])
    single = subprocess.run(
        [sys.executable, "-c", _DDP_WORKER, method, device],
        env={**env, "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "1", "RANK": "0"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    one = json.loads(single.stdout.strip().splitlines()[-1])
    for a, b in zip(two, one):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-5)
