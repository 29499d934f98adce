"""App. G's posterior comparison (foof.experiments.laplace): metrics, factors, caching, resume."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from foof.experiments import laplace
from foof.experiments.figures import build
from foof.experiments.report import write_report
from foof.experiments.runner import reproduce
from foof.experiments.spec import Figure, Run
from foof.fisher import SubsampledFisher
from foof.io import read_json


def test_expected_calibration_error_by_hand():
    # two bins used: confidences 0.9 (both right) and 0.6 (one of two right)
    probs = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.6, 0.4]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1])
    ece = laplace.expected_calibration_error(probs, labels, bins=10)
    assert ece == pytest.approx(0.5 * 0.1 + 0.5 * 0.1, abs=1e-12)
    metrics = laplace.predictive_metrics(probs, labels, bins=10)
    assert metrics["accuracy"] == 0.75
    expected_nll = -(2 * math.log(0.9) + math.log(0.6) + math.log(0.4)) / 4
    assert metrics["nll"] == pytest.approx(expected_nll, rel=1e-12)


def test_kronecker_factors_are_exact_for_one_sample():
    # B = 1, empirical Fisher: F = g gᵀ with g = e ⊗ ā per layer, so F's layer block is Ā ⊗ Ḡ
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(1, 4, dtype=torch.float64), torch.tensor([2])
    fisher = SubsampledFisher(model, x, y, fisher="empirical")
    params = fisher.parameters()
    sizes = [p.numel() for p in params]
    dense = torch.stack(
        [
            torch.cat([t.flatten() for t in fisher.mv(list(basis.split(sizes)))])
            for basis in torch.eye(sum(sizes), dtype=torch.float64)
        ]
    )
    start = 0
    for module, (a, g) in zip(fisher.layers, laplace.kronecker_factors(fisher)):
        width = module.weight.numel() + module.bias.numel()
        block = dense[start : start + width, start : start + width]
        # fisher vectors per layer: weight (out, in) then bias (out,); the layer matrix is
        # [W | b] (out, in + 1), row-major, so permute the block into that order
        out, inp = module.weight.shape
        order = torch.arange(out * (inp + 1)).reshape(out, inp + 1)
        index = torch.cat([order[:, :inp].flatten(), order[:, inp]])
        kron = torch.kron(g, a)  # vec row-major of [W|b]: out-major
        assert torch.allclose(block, kron[index][:, index], atol=1e-12)
        start += width


def _tiny_laplace_figure() -> Figure:
    return Figure(
        id="TL",
        title="tiny Laplace",
        claim="smoke",
        mode="quick",
        base=dict(
            dataset="mnist",
            model="mlp",
            model_options={"hidden": [8]},
            subset=60,
            batch_size=30,
            epochs=1,
            optimizer="sgd",
            lr=0.05,
        ),
        runs=tuple(Run(label, legend, {}, tune=()) for label, legend in laplace.METHODS.items()),
        seeds=1,
        metric="value:test_nll",
        plot="laplace",
        kind="laplace",
        test_subset=80,
        options=dict(fisher_batch=10, num_samples=4, prior_precisions=[1.0, 100.0], validation=40),
    )


def test_laplace_figure_runs_caches_the_map_and_resumes(tmp_path, data_dir, monkeypatch):
    figure = _tiny_laplace_figure()
    kwargs = dict(out=tmp_path, progress=False, data_dir=data_dir, entries={})
    first = reproduce([figure], **kwargs)
    assert [o.status for o in first] == ["trained"] * 4, [o.message for o in first]
    assert (tmp_path / "TL" / "map-model-seed0.pt").is_file()
    nll = {}
    for label in laplace.METHODS:
        results = read_json(tmp_path / "TL" / f"{label}-seed0.json")
        values = results["values"]
        assert all(math.isfinite(values[k]) for k in ("test_nll", "test_accuracy", "test_ece"))
        assert results["sizes"] == {
            "validation": 40,
            "test": 40,
            "fisher_batch": 10,
            "num_data": 60,
        }
        nll[label] = values["test_nll"]
        if label == "map":
            assert values["prior_precision"] is None and results["grid"] == []
        else:
            assert values["prior_precision"] in (1.0, 100.0) and len(results["grid"]) == 2
            best = min(results["grid"], key=lambda point: point["nll"])
            assert best["prior_precision"] == values["prior_precision"]
    assert len(set(nll.values())) == 4  # four different posteriors, none copied from another

    # rerun: nothing trained again, the MAP network is not retrained either
    monkeypatch.setattr(laplace, "train", lambda *a, **k: pytest.fail("MAP retrained"))
    again = reproduce([figure], **kwargs)
    assert [o.status for o in again] == ["skipped"] * 4
    # a changed option reruns the posteriors from the cached MAP network
    changed = Figure(**{**figure.__dict__, "options": {**figure.options, "num_samples": 3}})
    rerun = reproduce([changed], **kwargs)
    assert [o.status for o in rerun] == ["trained"] * 4

    report = write_report([tmp_path]).read_text()
    assert "τ 1" in report or "τ 100" in report  # chosen prior precisions in the runs table
    assert "| MAP (no posterior) | 1 |" in report
    assert (tmp_path / "TL.png").is_file()


def test_map_model_loads_weights_only_and_retrains_on_other_config(tmp_path, data_dir):
    figure = _tiny_laplace_figure()
    config = figure.config(figure.runs[0], seed=0)
    from foof.data import load_dataset

    data = load_dataset("mnist", data_dir=data_dir, subset=60)
    path = tmp_path / "map.pt"
    model, summary = laplace.map_model(config, data, path)
    saved = torch.load(path, weights_only=True)
    assert set(saved) == {"format", "config", "state_dict", "summary"}
    again, _ = laplace.map_model(config, data, path)
    for p, q in zip(model.parameters(), again.parameters()):
        assert torch.equal(p, q)
    other = config.__class__.from_dict({**config.to_dict(), "lr": 0.01})
    laplace.map_model(other, data, path)
    assert torch.load(path, weights_only=True)["config"] == other.to_dict()


def test_laplace_figure_spec_and_options():
    for mode in ("quick", "standard"):
        figure = build("laplace", mode)
        assert figure.kind == "laplace"
        assert [run.label for run in figure.runs] == list(laplace.METHODS)
        laplace.LaplaceOptions.from_mapping(figure.options)
    with pytest.raises(ValueError, match="unknown Laplace option"):
        laplace.LaplaceOptions.from_mapping({"samples": 3})
