"""foof.train and foof.io: the one training loop, its results file and its failure modes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import foof.models
from foof.data import load_dataset
from foof.io import read_json, write_json_atomic
from foof.train import (
    DEFAULT_HYPERPARAMETERS,
    RESULTS_FORMAT,
    ConfigError,
    TrainCallback,
    TrainConfig,
    reconstruction_error,
    results_path,
    train,
)

TOP_KEYS = {
    "format",
    "complete",
    "config",
    "environment",
    "dataset",
    "model",
    "steps",
    "epochs",
    "initial",
    "final",
    "diverged",
    "diverged_step",
    "total_time",
}


@pytest.fixture(scope="module")
def mnist200(data_dir):
    return load_dataset("mnist", data_dir=data_dir, subset=200)


def tiny(data_dir, **overrides) -> TrainConfig:
    values = dict(
        dataset="mnist",
        model="logistic",
        optimizer="sgd",
        lr=0.01,
        momentum=0.0,
        epochs=2,
        batch_size=50,
        subset=200,
        data_dir=str(data_dir),
    )
    values.update(overrides)
    return TrainConfig(**values)


def test_tiny_sgd_run_has_finite_decreasing_loss_and_valid_results_file(data_dir, tmp_path):
    out = tmp_path / "run.json"
    config = tiny(data_dir, dataset="fashion-mnist", epochs=3)
    results = train(config, out_path=out, progress=False)
    assert set(results) == TOP_KEYS
    assert results["format"] == RESULTS_FORMAT and results["complete"] is True
    assert not results["diverged"] and results["diverged_step"] is None
    steps = results["steps"]
    assert len(steps["loss"]) == len(steps["time"]) == 3 * 4
    assert all(math.isfinite(v) for v in steps["loss"])
    assert steps["time"] == sorted(steps["time"])
    epochs = results["epochs"]
    assert epochs["epoch"] == [1, 2, 3]
    assert epochs["train_loss"][0] > epochs["train_loss"][1] > epochs["train_loss"][2]
    assert epochs["test_loss"][-1] < results["initial"]["test_loss"]
    assert 0.3 < epochs["test_accuracy"][-1] <= 1.0
    assert results["final"]["test_accuracy"] == epochs["test_accuracy"][-1]
    assert results["dataset"]["num_train"] == 200 and results["dataset"]["num_test"] == 10000
    assert "0.1307" in results["dataset"]["caveats"]
    assert results["model"] == {
        "name": "logistic",
        "task": "classification",
        "num_parameters": 7840,
    }
    env = results["environment"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["num_threads"] >= 1
    assert json.loads(out.read_text()) == results
    assert TrainConfig.from_dict(results["config"]) == config.resolved()


def test_same_seed_gives_identical_runs_and_another_seed_does_not(data_dir, mnist200):
    config = tiny(data_dir, model="mlp", model_options={"hidden": [16]}, momentum=0.9)
    first = train(config, progress=False, data=mnist200)
    second = train(config, progress=False, data=mnist200)
    other = train(
        tiny(data_dir, model="mlp", model_options={"hidden": [16]}, seed=1),
        progress=False,
        data=mnist200,
    )
    assert first["steps"]["loss"] == second["steps"]["loss"]
    assert first["epochs"]["test_loss"] == second["epochs"]["test_loss"]
    assert first["steps"]["loss"] != other["steps"]["loss"]


def test_atomic_write_leaves_only_the_results_file(data_dir, mnist200, tmp_path):
    out = tmp_path / "r.json"
    train(tiny(data_dir), out_path=out, progress=False, data=mnist200)
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_write_json_atomic_keeps_old_file_on_failure_and_rejects_nan(tmp_path):
    path = write_json_atomic(tmp_path / "a.json", {"x": [1, 2]})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"x": object()})
    with pytest.raises(ValueError):
        write_json_atomic(path, {"x": float("nan")})
    assert read_json(path) == {"x": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_divergence_stops_early_and_results_stay_valid_json(data_dir, mnist200, tmp_path):
    out = tmp_path / "d.json"
    config = tiny(data_dir, model="mlp", model_options={"hidden": [16]}, lr=1e30, epochs=3)
    results = train(config, out_path=out, progress=False, data=mnist200)
    assert results["diverged"] is True
    assert 0 < results["diverged_step"] < 12
    assert len(results["steps"]["loss"]) == results["diverged_step"]
    json.loads(out.read_text(), parse_constant=pytest.fail)  # no NaN/Infinity tokens
    assert results["complete"] is True


def test_a_huge_finite_loss_is_divergence_and_train_still_returns_results(data_dir, mnist200):
    class BlowUp(TrainCallback):
        def after_step(self, context):
            if context.step == 1:
                with torch.no_grad():
                    for p in context.model.parameters():
                        p.mul_(1e9)  # logits ~1e9: a finite loss a million times the first

    results = train(tiny(data_dir), progress=False, data=mnist200, callbacks=[BlowUp()])
    assert results["diverged"] is True and results["diverged_step"] == 2
    assert results["complete"] is True  # a result for reproduce and tune, not an exception


def test_full_batch_and_eval_options(data_dir, mnist200):
    config = tiny(data_dir, batch_size=None, epochs=3, eval_every_epoch=False, eval_train=True)
    results = train(config, progress=False, data=mnist200)
    assert len(results["steps"]["loss"]) == 3
    assert results["epochs"]["epoch"] == [3]
    assert len(results["epochs"]["train_eval_loss"]) == 1
    assert train(tiny(data_dir, batch_size=0, epochs=1), progress=False, data=mnist200)["steps"][
        "loss"
    ]


def test_autoencoder_trains_on_its_input_with_half_squared_error(data_dir, mnist200):
    options = {"encoder": [16, 4]}
    config = tiny(data_dir, model="autoencoder", model_options=options, lr=1e-3, momentum=0.9)
    results = train(config, progress=False, data=mnist200)
    assert results["model"]["task"] == "reconstruction"
    assert results["epochs"]["test_accuracy"] == [None, None]
    losses = results["epochs"]["train_loss"]
    assert losses[1] < losses[0]
    output, target = torch.ones(2, 784), torch.zeros(2, 784)
    assert reconstruction_error(output, target).item() == pytest.approx(0.5 * 784)


def test_evaluation_runs_in_eval_mode_without_grad_and_training_in_train_mode(
    data_dir, mnist200, monkeypatch
):
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append((self.training, torch.is_grad_enabled()))
            return x

    def factory():
        return nn.Sequential(nn.Flatten(), Probe(), nn.Linear(784, 10, bias=False))

    monkeypatch.setitem(foof.models.MODELS, "probe", factory)
    monkeypatch.setitem(foof.models.TASKS, "probe", "classification")
    train(tiny(data_dir, model="probe", epochs=1, batch_size=100), progress=False, data=mnist200)
    # 2,000 test images are evaluated in 2 batches before and after the 2 training steps.
    assert seen == [(False, False)] * 2 + [(True, True)] * 2 + [(False, False)] * 2


def test_foof_runs_through_the_uniform_backward(data_dir, mnist200):
    config = tiny(data_dir, optimizer="foof", lr=0.1, damping=1.0, inv_every=10, epochs=1)
    results = train(config, progress=False, data=mnist200)
    assert not results["diverged"] and len(results["steps"]["loss"]) == 4
    assert results["config"]["ema_decay"] is None  # FOOF's own default, not overridden


def test_kfac_gets_the_gaussian_likelihood_for_the_autoencoder(data_dir):
    config = tiny(data_dir, model="autoencoder", optimizer="kfac", model_options={"encoder": [4]})
    assert config.resolved().optimizer_options == {"likelihood": "gaussian"}
    assert tiny(data_dir, optimizer="kfac").resolved().optimizer_options == {
        "likelihood": "categorical"
    }
    assert tiny(data_dir, optimizer="sgd").resolved().optimizer_options == {}


def test_defaults_fill_only_missing_hyperparameters():
    config = TrainConfig(optimizer="foof", lr=0.5).resolved()
    assert config.lr == 0.5
    assert config.damping == DEFAULT_HYPERPARAMETERS["foof"]["damping"]
    assert TrainConfig(optimizer="adam").resolved().momentum is None


def test_bad_configs_raise_config_error(data_dir, mnist200):
    with pytest.raises(ConfigError, match="ema_decay"):
        train(tiny(data_dir, ema_decay=0.9), progress=False, data=mnist200)
    with pytest.raises(ConfigError, match="optimizer must be one of"):
        train(tiny(data_dir, optimizer="lbfgs"), progress=False, data=mnist200)
    with pytest.raises(ConfigError, match="epochs"):
        train(tiny(data_dir, epochs=-1), progress=False, data=mnist200)
    with pytest.raises(ConfigError, match="fashion-mnist"):
        train(tiny(data_dir, dataset="fashion-mnist"), progress=False, data=mnist200)
    with pytest.raises(ConfigError, match="config.subset is 300"):
        train(tiny(data_dir, subset=300), progress=False, data=mnist200)
    with pytest.raises(ConfigError, match="hidden"):
        train(tiny(data_dir, model_options={"hidden": "x"}), progress=False, data=mnist200)
    with pytest.raises(ConfigError, match="lr"):
        train(tiny(data_dir, lr=-1.0), progress=False, data=mnist200)
    with pytest.raises(ConfigError, match="torch device"):
        train(tiny(data_dir, device="abacus"), progress=False, data=mnist200)
    with pytest.raises(ConfigError, match="bogus"):
        TrainConfig.from_dict({"bogus": 1})


def test_config_round_trip_and_default_path():
    config = TrainConfig(optimizer="foof", model_options={"hidden": (3,)}, seed=2)
    values = json.loads(json.dumps(config.to_dict()))
    assert values["model_options"] == {"hidden": [3]}
    assert TrainConfig.from_dict(values).seed == 2
    assert results_path(config) == Path("runs/foof-mlp-fashion-mnist-seed2.json")
