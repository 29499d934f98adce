"""Interrupted runs lose nothing: SIGINT/SIGTERM checkpoints and resume (foof.checkpoint)."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

from foof import checkpoint as checkpoints
from foof.experiments import runner as runner_module
from foof.experiments.runner import reproduce
from foof.experiments.spec import Figure, Run
from foof.io import read_json
from foof.train import TrainCallback, TrainConfig, train


class _SignalAt(TrainCallback):
    """Sends ``signum`` to this process after step ``step`` (as a user or a scheduler would)."""

    def __init__(self, step: int, signum: int = signal.SIGTERM) -> None:
        self.step, self.signum = step, signum

    def after_step(self, context) -> None:
        if context.step == self.step:
            os.kill(os.getpid(), self.signum)


def _config(optimizer: str = "kfac", **changes) -> TrainConfig:
    values = dict(
        dataset="mnist",
        model="mlp",
        model_options={"hidden": [16]},
        optimizer=optimizer,
        lr=0.05,
        damping=1.0,
        subset=120,
        batch_size=40,
        epochs=3,
    )
    values.update(changes)
    return TrainConfig(**values)


@pytest.mark.parametrize(
    ("optimizer", "signum", "step"),
    [("kfac", signal.SIGTERM, 4), ("foof", signal.SIGINT, 2), ("sgd", signal.SIGTERM, 5)],
)
def test_interrupted_run_resumes_to_the_uninterrupted_result(
    tmp_path, data_dir, optimizer, signum, step
):
    # KFAC's MC Fisher draws labels from torch's global RNG: resuming must restore it too
    config = _config(optimizer, data_dir=str(data_dir))
    reference = train(config, progress=False)
    out, ckpt = tmp_path / "run.json", tmp_path / "run.ckpt.pt"
    with pytest.raises(checkpoints.TrainingInterrupted) as stopped:
        train(config, out, progress=False, checkpoint=ckpt, callbacks=[_SignalAt(step, signum)])
    assert stopped.value.signal_name == signal.Signals(signum).name
    assert stopped.value.exit_status == 128 + signum
    assert isinstance(stopped.value, KeyboardInterrupt)
    partial = read_json(out)
    assert partial["complete"] is False and len(partial["steps"]["loss"]) == step + 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    torch.load(ckpt, weights_only=True)  # no pickled code in a checkpoint

    resumed = train(config, out, progress=False, checkpoint=ckpt)
    assert resumed["complete"] and resumed["resumed"] == 1
    assert not ckpt.exists()  # a complete run leaves only its results
    # tolerance: the same float32 operations in the same order, so equal up to rounding
    torch.testing.assert_close(
        torch.tensor(resumed["steps"]["loss"]),
        torch.tensor(reference["steps"]["loss"]),
        rtol=1e-5,
        atol=1e-7,
    )
    assert resumed["epochs"]["epoch"] == reference["epochs"]["epoch"]
    assert resumed["final"]["test_accuracy"] == pytest.approx(
        reference["final"]["test_accuracy"], abs=1e-9
    )


def test_epoch_checkpoints_and_a_checkpoint_of_another_config(tmp_path, data_dir):
    config = _config("foof", data_dir=str(data_dir), epochs=2)
    ckpt = tmp_path / "run.ckpt.pt"

    class Inspect(TrainCallback):
        seen = []

        def after_step(self, context) -> None:
            Inspect.seen.append(ckpt.exists())

    train(config, progress=False, checkpoint=ckpt, callbacks=[Inspect()])
    assert Inspect.seen[:3] == [False] * 3 and all(Inspect.seen[3:])  # written after epoch 1
    assert not ckpt.exists()

    with pytest.raises(checkpoints.TrainingInterrupted):
        train(config, progress=False, checkpoint=ckpt, callbacks=[_SignalAt(1)])
    other = _config("foof", data_dir=str(data_dir), epochs=2, lr=0.01)
    with pytest.raises(checkpoints.CheckpointError, match="fields differ: lr"):
        train(other, progress=False, checkpoint=ckpt)
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoints.CheckpointError, match="cannot be read.*delete it"):
        train(config, progress=False, checkpoint=ckpt)


def test_a_second_signal_interrupts_at_once():
    previous = signal.getsignal(signal.SIGINT)
    with checkpoints.StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is previous


def test_interrupted_reproduce_keeps_finished_runs_and_resumes(tmp_path, data_dir, monkeypatch):
    base = dict(dataset="mnist", model="logistic", subset=100, batch_size=25, epochs=2)
    figure = Figure(
        id="T2",
        title="tiny",
        claim="-",
        mode="quick",
        base=base,
        runs=(
            Run("a", "a", {"optimizer": "sgd", "lr": 0.01}, tune=()),
            Run("b", "b", {"optimizer": "foof", "lr": 0.1, "damping": 1.0}, tune=()),
        ),
        seeds=1,
    )
    kwargs = dict(out=tmp_path, progress=False, data_dir=data_dir, entries={})
    real_train = runner_module.train

    def interrupt_b(config, **options):
        callbacks = list(options.pop("callbacks", ()))
        if config.optimizer == "foof":
            callbacks.append(_SignalAt(5))
        return real_train(config, callbacks=callbacks, **options)

    monkeypatch.setattr(runner_module, "train", interrupt_b)
    with pytest.raises(checkpoints.TrainingInterrupted):
        reproduce([figure], **kwargs)
    assert read_json(tmp_path / "T2" / "a-seed0.json")["complete"]
    assert (tmp_path / "T2" / "b-seed0.ckpt.pt").is_file()
    assert not (tmp_path / "T2" / "b-seed0.json").exists()

    monkeypatch.setattr(runner_module, "train", real_train)
    statuses = {o.name: o.status for o in reproduce([figure], **kwargs)}
    assert statuses == {"T2/a seed 0": "skipped", "T2/b seed 0": "trained"}
    results = read_json(tmp_path / "T2" / "b-seed0.json")
    assert results["complete"] and results["resumed"] == 1
    assert len(results["steps"]["loss"]) == 8
    assert not (tmp_path / "T2" / "b-seed0.ckpt.pt").exists()


def test_cli_train_stops_on_sigterm_and_the_same_command_resumes(tmp_path, data_dir):
    out = tmp_path / "run.json"
    command = [
        sys.executable, "-m", "foof", "train", "--model", "logistic", "--dataset", "mnist",
        "--subset", "200", "--batch-size", "10", "--epochs", "400", "--optimizer", "sgd",
        "--lr", "0.01", "--data-dir", str(data_dir), "--out", str(out), "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path / "run.ckpt.pt"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ckpt.exists(), "no checkpoint after the first epoch"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "stopped by SIGTERM" in stderr and "rerun the same command to resume" in stderr
    done = len(read_json(out)["steps"]["loss"])
    assert 0 < done < 400 * 20

    # the same command again: resumes from the checkpoint (stopped again once it went on)
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
        results = read_json(out) if out.exists() else None
        if results and len(results["steps"]["loss"]) > done:
            break
    process.send_signal(signal.SIGINT)  # stop the resumed run too: it went on from `done`
    _, stderr = process.communicate(timeout=120)
    assert "resuming from" in stderr
    assert process.returncode == 130, stderr
    results = read_json(out)
    assert results["resumed"] == 1 and len(results["steps"]["loss"]) > done


def test_a_truncated_checkpoint_names_the_problem_and_leaves_no_file_open(tmp_path):
    from foof import FOOF

    model = torch.nn.Sequential(torch.nn.Linear(30, 20), torch.nn.Tanh(), torch.nn.Linear(20, 3))
    opt = FOOF(model, lr=0.1, damping=1.0)
    opt.zero_grad()
    model(torch.randn(8, 30)).sum().backward()
    opt.step()
    path = tmp_path / "run.ckpt.pt"
    checkpoints.save(path, {"config": {}, "optimizer": opt.state_dict()})
    whole = path.read_bytes()
    assert checkpoints.read(path)["optimizer"]["foof"]["optimizer"] == "FOOF"
    fds = f"/proc/{os.getpid()}/fd"
    before = len(os.listdir(fds)) if os.path.isdir(fds) else None
    # cuts at the start, in the middle and near the end give different errors inside torch
    # (EOFError, a zip reader error, OSError [Errno 22]); every one must read the same
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        for cut in (0, 10, len(whole) // 2, len(whole) - 30):
            path.write_bytes(whole[:cut])
            for reader in (checkpoints.read, lambda p: checkpoints.load(p, {})):
                with pytest.raises(checkpoints.CheckpointError, match="file truncated or corrupt"):
                    reader(path)
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
    if before is not None:
        assert len(os.listdir(fds)) == before
