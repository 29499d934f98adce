"""Data-parallel training on ``torch.distributed``: 2 gloo processes spawned by the tests.

What is checked: 2 ranks × 50 samples take exactly the steps of 1 process × 100 (float64
models, every method and variant, including the MC Fisher, whose labels the ranks draw for the
gathered global batch); sharded and replicated inversion agree; statistics travel only on
statistics steps; checkpoints move between 2 ranks and 1 process both ways; ``train()`` and
``foof train`` under ``torchrun`` match one process; and a rank that raises or hangs makes the
others fail within the collective timeout instead of waiting forever.

Each launch starts fresh processes (seconds of imports), so all the comparisons run in one
launch (a module fixture) and the tests read its results.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from foof import distributed
from foof.optim.registry import build_optimizer
from foof.train import TrainConfig, train

WORLD = 2
BATCH = 100  # global batch: 2 ranks × 50
STEPS = 4
TIMEOUT = 60.0


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5)).double()


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 36, 5)
    ).double()


MODELS = {"mlp": (_mlp, (12,)), "cnn": (_cnn, (1, 6, 6))}

KFAC = dict(lr=0.1, damping=0.1, ema_decay=0.9, inv_every=2)
CASES: dict[str, tuple[str, str, dict]] = {
    "foof": (
        "foof",
        "mlp",
        dict(lr=0.1, damping=0.3, ema_decay=0.9, inv_every=2, momentum=0.9, weight_decay=1e-3),
    ),
    "foof-stats-steps-cnn": (
        "foof",
        "cnn",
        dict(lr=0.1, damping=0.3, ema_decay=0.8, inv_every=3, stats_steps=2),
    ),
    "kfac-heuristic-full": ("kfac", "mlp", dict(KFAC, fisher="full", momentum=0.5)),
    "kfac-heuristic-empirical-cnn": ("kfac", "cnn", dict(KFAC, fisher="empirical")),
    "kfac-standard-full": ("kfac", "mlp", dict(KFAC, damping_mode="standard", fisher="full")),
    "kfac-standard-empirical-cnn": (
        "kfac",
        "cnn",
        dict(KFAC, damping_mode="standard", fisher="empirical"),
    ),
    "kfac-mc-cnn": ("kfac", "cnn", dict(KFAC, fisher="mc", seed=7)),
    "kfac-one-factor": ("kfac", "mlp", dict(KFAC, fisher="full", second_factor=False)),
    "natural-full": ("natural", "mlp", dict(lr=0.1, damping=0.1, fisher="full")),
    "natural-full-cnn-block-previous": (
        "natural",
        "cnn",
        dict(lr=0.1, damping=0.1, fisher="full", block_diagonal=True, fisher_batch="previous"),
    ),
    "natural-mc": ("natural", "mlp", dict(lr=0.1, damping=0.1, fisher="mc", seed=7, inv_every=2)),
    "natural-empirical-cnn": ("natural", "cnn", dict(lr=0.1, damping=0.1, fisher="empirical")),
}
SHARDED = [name for name, (optimizer, _, _) in CASES.items() if optimizer in ("foof", "kfac")]
for _name in SHARDED:
    _optimizer, _model, _kwargs = CASES[_name]
    CASES[_name + "+sharded"] = (_optimizer, _model, dict(_kwargs, inverse_sharding="sharded"))
# one statistics step (step 0) in STEPS: what travels is counted exactly
CASES["foof-amortised"] = ("foof", "mlp", dict(lr=0.1, damping=0.3, inv_every=4, stats_steps=1))
CHECKPOINTED = ["kfac-mc-cnn", "foof-stats-steps-cnn", "natural-full-cnn-block-previous"]
SPLIT = 2  # the checkpoint is taken after this many steps


def _data(model: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    shape = MODELS[model][1]
    x = torch.randn(STEPS, BATCH, *shape, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 5, (STEPS, BATCH), generator=generator)
    return x, y


def _run(
    name: str, first: int, last: int, checkpoint: bytes | None = None, rank: int = 0, world: int = 1
) -> dict:
    """Steps ``first..last-1`` of case ``name`` on this rank's shard of each global batch."""
    optimizer_name, model_name, kwargs = CASES[name]
    torch.manual_seed(0)
    model = MODELS[model_name][0]()
    optimizer = build_optimizer(optimizer_name, model, **kwargs)
    if checkpoint is not None:
        state = torch.load(io.BytesIO(checkpoint), weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    network = DistributedDataParallel(model) if world > 1 else model
    xs, ys = _data(model_name)
    distributed.TRAFFIC.reset()
    for step in range(first, last):
        x, y = xs[step].tensor_split(world)[rank], ys[step].tensor_split(world)[rank]
        optimizer.zero_grad()
        output = network(x)
        optimizer.backward(nn.functional.cross_entropy(output, y), output)
        optimizer.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "checkpoint": buffer.getvalue(),
        "traffic": dict(distributed.TRAFFIC.by_kind),
    }


def _helpers(rank: int, world: int) -> dict:
    rows = torch.arange(3 * (rank + 1), dtype=torch.float64).reshape(rank + 1, 3) + 10 * rank
    labels = torch.full((2 - rank,), rank)
    gathered, counts = distributed.all_gather_rows([rows, labels])
    generator = torch.Generator().manual_seed(rank)
    square = torch.randn(4, 4, generator=generator, dtype=torch.float64)
    local = square + square.T
    summed = local.clone()
    vector = torch.full((3,), float(rank))
    distributed.all_reduce_sum_([summed, vector], symmetric=[True, False])
    owned = torch.full((2,), float(rank))
    distributed.broadcast_from_owners([(owned, 1)])
    return {
        "gathered": gathered,
        "counts": counts,
        "local": local,
        "summed": summed,
        "vector": vector,
        "owned": owned,
        "mean": distributed.all_reduce_mean_(torch.tensor([float(rank)])),
        "any": (distributed.any_rank(rank == 1), distributed.any_rank(False)),
    }


def _all_jobs(rank: int, world: int, single_checkpoints: dict[str, bytes]) -> dict:
    results = {"helpers": _helpers(rank, world)}
    for name in CASES:
        results[name] = _run(name, 0, STEPS, rank=rank, world=world)
    for name in CHECKPOINTED:
        results["first-half", name] = _run(name, 0, SPLIT, rank=rank, world=world)
        results["resumed", name] = _run(
            name, SPLIT, STEPS, single_checkpoints[name], rank=rank, world=world
        )
    return results


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny; on a busy machine extra threads only spin (100x slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    """Every distributed job, run once on 2 ranks; the 1-process halves are run here first."""
    single = {name: _run(name, 0, SPLIT)["checkpoint"] for name in CHECKPOINTED}
    return distributed.launch_local(_all_jobs, WORLD, (single,), timeout=TIMEOUT)


@pytest.fixture(scope="module")
def reference() -> dict[str, dict]:
    return {name: _run(name, 0, STEPS) for name in CASES}


def _assert_close(actual: list, expected: list, what: str) -> None:
    for index, (a, e) in enumerate(zip(actual, expected)):
        error = float((a - e).abs().max())
        assert torch.allclose(a, e, rtol=1e-9, atol=1e-11), (
            f"{what}: parameter {index} differs by up to {error:.3g}"
        )


def test_helpers_are_identities_without_a_process_group():
    tensor = torch.ones(2, 2)
    assert not distributed.is_distributed()
    assert distributed.world_size() == 1
    assert distributed.all_reduce_mean_(tensor) is tensor
    gathered, counts = distributed.all_gather_rows([tensor])
    assert gathered[0] is tensor and counts == [[2]]
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    assert distributed.broadcast_int(5) == 5


def test_helpers_on_two_ranks(ranks):
    zero, one = ranks[0]["helpers"], ranks[1]["helpers"]
    for result in (zero, one):
        rows, labels = result["gathered"]
        expected_rows = torch.cat(
            [
                torch.arange(3.0, dtype=torch.float64).reshape(1, 3),
                torch.arange(6.0).reshape(2, 3) + 10,
            ]
        )
        assert torch.equal(rows, expected_rows.double())
        assert labels.tolist() == [0, 0, 1]
        assert result["counts"] == [[1, 2], [2, 1]]
        assert torch.allclose(result["summed"], zero["local"] + one["local"])
        assert result["vector"].tolist() == [1.0, 1.0, 1.0]
        assert result["owned"].tolist() == [1.0, 1.0]
        assert result["mean"].tolist() == [0.5]
        assert result["any"] == (True, False)


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_take_the_steps_of_one_process(ranks, reference, name):
    _assert_close(ranks[0][name]["params"], reference[name]["params"], f"{name}, rank 0")
    for a, b in zip(ranks[0][name]["params"], ranks[1][name]["params"]):
        assert torch.equal(a, b), f"{name}: the ranks' replicas diverged"


@pytest.mark.parametrize("name", SHARDED)
def test_sharded_inversion_matches_replicated(ranks, name):
    replicated, sharded = ranks[0][name], ranks[0][name + "+sharded"]
    _assert_close(sharded["params"], replicated["params"], f"{name}, sharded vs replicated")
    seed = 8 if CASES[name][2].get("fisher") == "mc" else 0  # the MC seed, broadcast once
    assert replicated["traffic"].get("broadcast", 0) == seed
    assert sharded["traffic"]["broadcast"] > seed


def test_statistics_travel_only_on_statistics_steps(ranks):
    """FOOF with inv_every=4, stats_steps=1 for 4 steps: one reduction of Σ's triangles."""
    model = _mlp()
    dims = [m.in_features + 1 for m in model if isinstance(m, nn.Linear)]
    statistics = sum(n * (n + 1) // 2 + 1 for n in dims) * 8  # float64 triangles + counts
    agreement = STEPS * 4  # the int32 non-finite flag of every step
    for result in ranks:
        assert result["foof-amortised"]["traffic"] == {"all_reduce": statistics + agreement}


@pytest.mark.parametrize("name", CHECKPOINTED)
def test_checkpoint_from_two_ranks_resumes_in_one_process(ranks, reference, name):
    resumed = _run(name, SPLIT, STEPS, ranks[0]["first-half", name]["checkpoint"])
    _assert_close(resumed["params"], reference[name]["params"], f"{name}, 2 ranks then 1")


@pytest.mark.parametrize("name", CHECKPOINTED)
def test_checkpoint_from_one_process_resumes_on_two_ranks(ranks, reference, name):
    for rank in ranks:
        _assert_close(
            rank["resumed", name]["params"], reference[name]["params"], f"{name}, 1 then 2 ranks"
        )


def _raise_on_rank_one(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("rank one fails on purpose")
    _run("kfac-heuristic-full", 0, STEPS, rank=rank, world=world)


def test_a_rank_that_raises_does_not_hang_the_other():
    with pytest.raises(distributed.RankError) as error:
        distributed.launch_local(_raise_on_rank_one, WORLD, timeout=TIMEOUT)
    message = str(error.value)
    assert "rank one fails on purpose" in message
    # rank 0 failed by itself (connection closed by its peer), not by waiting out the
    # collective timeout, which would say "Timed out" (see the next test); no clock is read,
    # so a loaded machine cannot fail this
    assert "rank 0 raised" in message and "Timed out" not in message


def _hang_on_rank_one(rank: int, world: int) -> None:
    if rank == 1:
        time.sleep(120)
    dist.all_reduce(torch.ones(1))


def test_a_rank_that_hangs_makes_the_other_time_out():
    with pytest.raises(distributed.RankError) as error:
        distributed.launch_local(_hang_on_rank_one, WORLD, timeout=3.0)
    message = str(error.value)
    assert "rank 0 raised" in message and "Timed out" in message  # its own collective timeout
    # terminated while still asleep: the launcher did not wait for it (no clock is read)
    assert "rank 1 returned nothing" in message


def _train_on_rank(rank: int, world: int, config: dict, out_dir: str) -> dict:
    results = train(
        TrainConfig.from_dict(config), Path(out_dir) / f"rank{rank}.json", progress=False
    )
    return {"losses": results["steps"]["loss"], "final": results["final"]}


@pytest.mark.slow
def test_train_on_two_ranks_matches_one_process(data_dir, tmp_path):
    config = dict(
        model="mlp",
        model_options={"hidden": [32]},
        optimizer="kfac",
        optimizer_options={"fisher": "mc", "seed": 3},
        lr=0.1,
        damping=1.0,
        epochs=2,
        batch_size=100,
        subset=200,
        data_dir=str(data_dir),
    )
    ranks = distributed.launch_local(
        _train_on_rank, WORLD, (config, str(tmp_path)), timeout=TIMEOUT
    )
    single = train(TrainConfig.from_dict(config), progress=False)
    for result in ranks:
        assert len(result["losses"]) == 4
        assert result["losses"] == pytest.approx(single["steps"]["loss"], rel=1e-4)
        assert result["final"]["test_accuracy"] == pytest.approx(
            single["final"]["test_accuracy"], abs=0.01
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.json"]  # only rank 0 writes


@pytest.mark.slow
def test_foof_train_under_torchrun(data_dir, tmp_path):
    out = tmp_path / "results.json"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "foof",
        "train",
        "--optimizer",
        "foof",
        "--model-option",
        "hidden=[16]",
        "--subset",
        "200",
        "--epochs",
        "1",
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
        "--no-progress",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=2 * TIMEOUT, env=env
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("foof: final train loss") == 1, completed.stdout
    results = json.loads(out.read_text())
    assert results["environment"]["world_size"] == 2
    assert len(results["steps"]["loss"]) == 2
