"""foof.experiments: figure specs, checks, instruments (vs dense math), toy example, runner
(resume, reuse, atomic writes), tuning, report and the CLI commands."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch
from torch import nn
from torch.func import functional_call

import foof.train
from foof.cli import main
from foof.experiments import FIGURES, build, figure_id
from foof.experiments import hyperparameters as hp
from foof.experiments import report as report_module
from foof.experiments import runner as runner_module
from foof.experiments import tune as tune_module
from foof.experiments.checks import (
    AtLeast,
    Below,
    Equals,
    Exceeds,
    Increasing,
    LowerWorkingDamping,
    Near,
    RatioAtMost,
    Summary,
    check_from_dict,
    combine,
    metric_value,
)
from foof.experiments.figures import FULLBATCH_IMAGES
from foof.experiments.instruments import KfacFoofCosine, SecondFactorProgress
from foof.experiments.report import write_report
from foof.experiments.runner import DataCache, execute, plan, reproduce
from foof.experiments.spec import Figure, Run
from foof.experiments.toy import toy_example
from foof.io import read_json, write_json_atomic
from foof.optim.kfac import KFAC
from foof.train import StepContext, TrainCallback, TrainConfig, train

# -- specs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["quick", "standard"])
@pytest.mark.parametrize("name", list(FIGURES))
def test_every_figure_resolves_to_valid_configs(name, mode):
    figure = build(name, mode)
    assert figure.id == name and figure.mode == mode and figure.claim and figure.checks
    for entries in ({}, hp.load()):
        planned = plan(figure, "/nonexistent", entries=entries)
        assert len(planned) == len(figure.runs) * figure.seeds
        for p in planned:
            if figure.kind == "train":
                p.config.validate()  # resolved and valid
                assert TrainConfig.from_dict(p.config.to_dict()) == p.config
                assert p.config.seed == p.seed
            assert p.path.name == f"{p.run.label}-seed{p.seed}.json"
    for check in figure.checks:
        assert check_from_dict(json.loads(json.dumps(check.to_dict()))) == check
    json.dumps(figure.to_dict())


def test_standard_mode_follows_the_paper():
    figure = build("1A", "standard")
    config = plan(figure, "/x", entries={})[0].config
    assert (config.model, config.batch_size, config.epochs) == ("mlp", 100, 10)
    assert config.model_options == {} and figure.seeds == 3
    full_figure = build("1D", "standard")
    full = plan(full_figure, "/x", entries={})[0].config
    # the paper's 1,000 images, reduced (and said so) because exact full-Fisher steps are slow
    assert (full.subset, full.batch_size, full.epochs) == (FULLBATCH_IMAGES, None, 100)
    assert "instead of the paper's 1,000" in full_figure.reduction


def test_figure_ids_and_aliases():
    assert figure_id("3c") == "3CD" and figure_id("toy") == "F" and figure_id("conv") == "5"
    with pytest.raises(KeyError, match="unknown figure"):
        figure_id("7Z")


def test_spec_rejects_bad_runs_and_checks():
    with pytest.raises(ValueError, match="file-safe"):
        Run("a b", "x")
    with pytest.raises(ValueError, match="cannot tune"):
        Run("a", "x", tune=("ema_decay",))
    with pytest.raises(ValueError, match="unknown runs"):
        Figure("X", "t", "c", "quick", runs=(Run("a", "A"),), checks=(Below("a", "b"),))


# -- checks -----------------------------------------------------------------------------------


def _values(table):
    return lambda label, metric: table.get(label, [])


def test_below_verdicts():
    assert Below("a", "b").evaluate(_values({"a": [1, 1.1], "b": [5, 5.2]})).verdict == "yes"
    assert Below("a", "b").evaluate(_values({"a": [5, 5.2], "b": [1, 1.1]})).verdict == "no"
    overlap = _values({"a": [1, 3], "b": [2, 4]})
    assert Below("a", "b").evaluate(overlap).verdict == "inconclusive"
    ten = _values({"a": [1.0], "b": [5.0]})
    assert Below("a", "b", factor=10).evaluate(ten).verdict == "no"
    assert Below("a", "b").evaluate(_values({"a": [1.0]})).verdict == "missing"
    diverged = _values({"a": [1.0], "b": [math.inf]})
    assert Below("a", "b").evaluate(diverged).verdict == "yes"
    assert Below("b", "a").evaluate(diverged).verdict == "no"


def test_other_checks():
    v = _values({"a": [1.0, 1.1], "b": [1.5, 1.6], "c": [9.0], "d": [0.2, 0.3]})
    assert Near("a", "b", 2).evaluate(v).verdict == "yes"
    assert Near("a", "c", 2).evaluate(v).verdict == "no"
    assert RatioAtMost("b", "a", 2).evaluate(v).verdict == "yes"
    assert RatioAtMost("c", "a", 2).evaluate(v).verdict == "no"
    assert Increasing(("d", "a", "c"), "m").evaluate(v).verdict == "yes"
    assert Increasing(("c", "a"), "m").evaluate(v).verdict == "no"
    assert Equals("c", "m", 9.0).evaluate(v).verdict == "yes"
    assert AtLeast("d", "m", 0.25).evaluate(v).verdict == "no"
    assert AtLeast("d", "m", 0.2).evaluate(v).verdict == "yes"
    assert AtLeast("d", "m", 0.2, strict=True).evaluate(v).verdict == "no"
    two = lambda label, metric: {"hi": [2.0, 2.1], "lo": [1.0, 1.1]}[metric]  # noqa: E731
    assert Exceeds("x", "hi", "lo").evaluate(two).verdict == "yes"
    assert Exceeds("x", "lo", "hi").evaluate(two).verdict == "no"
    sweep = _values({"f1": [1.0], "f2": [0.5], "f3": [0.6], "k1": [9.0], "k2": [3.0], "k3": [0.5]})
    check = LowerWorkingDamping(
        (("f1", 1), ("f2", 2), ("f3", 3)), (("k1", 1), ("k2", 2), ("k3", 3))
    )
    assert check.evaluate(sweep).verdict == "yes"
    assert combine(["yes", "inconclusive"]) == "inconclusive"
    assert combine(["yes", "no", "missing"]) == "no"
    assert combine(["yes", "yes"]) == "yes"


def test_summary_and_metrics():
    s = Summary.of([1.0, 2.0, 3.0])
    assert (s.mean, s.std, s.n) == (2.0, 1.0, 3)
    assert str(Summary.of([1.0, math.inf])) == "diverged"
    results = {
        "diverged": False,
        "epochs": {"train_eval_loss": [0.5, 0.25]},
        "final": {"train_loss": 0.3, "test_accuracy": 0.9},
        "steps": {"time": [1.0, 2.0, 4.0]},
        "metrics": {"inst": {"mean": 0.7}},
    }
    assert metric_value(results, "final_train_loss") == 0.25
    assert metric_value(results, "time_per_update") == 1.5
    assert metric_value(results, "metric:inst/mean") == 0.7
    assert metric_value({**results, "diverged": True}, "final_train_loss") == math.inf


# -- toy example ------------------------------------------------------------------------------


def test_toy_example_matches_the_paper():
    values = toy_example()["values"]
    assert (values["negative_gradient_1_0"], values["negative_gradient_1_1"]) == (3.0, 1.0)
    assert (values["negative_gradient_2_0"], values["negative_gradient_2_1"]) == (-1.0, 0.0)
    assert (values["sgd_direction_0"], values["sgd_direction_1"]) == (2.0, 1.0)
    assert values["sgd_loss_2_increase_min"] > 0
    assert values["foof_weight_0"] == pytest.approx(-1.0, abs=1e-12)
    assert values["foof_weight_1"] == pytest.approx(4.0, abs=1e-12)
    assert values["foof_loss_1"] == pytest.approx(0.0, abs=1e-20)
    assert values["foof_loss_2"] == pytest.approx(0.0, abs=1e-20)
    figure = build("F")
    outcomes = [
        c.evaluate(lambda label, m: [metric_value({"values": values}, m)]) for c in figure.checks
    ]
    assert all(o.verdict == "yes" for o in outcomes)


# -- instruments vs dense float64 math --------------------------------------------------------


def _tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3, bias=False)).double()


def _dense_factors(model, x, lr, damping, mode):
    """Per layer: Ā (mean of ā āᵀ), Ḡ (full Fisher), Ĝ and KFAC's direction, all dense."""
    layers = [m for m in model if isinstance(m, nn.Linear)]
    inputs, outputs = {}, {}

    def record(module, args, output):
        inputs[module], outputs[module] = args[0], output

    hooks = [m.register_forward_hook(record) for m in layers]
    logits = model(x)
    for h in hooks:
        h.remove()
    probs = logits.softmax(-1).detach()
    batch, classes = probs.shape
    factors = {}
    for m in layers:
        a = inputs[m].detach()
        if m.bias is not None:
            a = torch.cat([a, torch.ones(batch, 1, dtype=a.dtype)], 1)
        factors[m] = {"A": a.T @ a / batch, "G": torch.zeros(m.out_features, m.out_features)}
        factors[m]["G"] = factors[m]["G"].double()
    for i in range(batch):
        for c in range(classes):
            nll = -logits[i].log_softmax(-1)[c]
            grads = torch.autograd.grad(nll, [outputs[m] for m in layers], retain_graph=True)
            for m, g in zip(layers, grads):
                e = g[i]
                factors[m]["G"] += probs[i, c] * torch.outer(e, e) / batch
    return layers, factors


def _gradient_matrix(m):
    g = m.weight.grad.flatten(1)
    return torch.cat([g, m.bias.grad[:, None]], 1) if m.bias is not None else g


def _vec(matrix):
    return matrix.T.reshape(-1)  # column-major


def _unvec(vector, shape):
    return vector.reshape(shape[1], shape[0]).T


@pytest.mark.parametrize("mode", ["heuristic", "standard"])
def test_instruments_match_dense_computation(mode):
    lr, damping = 0.2, 0.5
    model = _tiny_net()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=generator)
    opt = KFAC(model, lr=lr, damping=damping, damping_mode=mode, fisher="full", ema_decay=0.0)
    cosine, progress = KfacFoofCosine(), SecondFactorProgress()
    loss_fn = nn.functional.cross_entropy
    layers, factors = _dense_factors(model, x, lr, damping, mode)
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}

    opt.zero_grad()
    out = model(x)
    loss = loss_fn(out, y)
    opt.backward(loss, out)
    context = StepContext(0, 1, model, opt, x, y, out, loss, loss_fn)
    for inst in (cosine, progress):
        inst.before_step(context)
    opt.step()
    for inst in (cosine, progress):
        inst.after_step(context)

    names = {m: n for n, m in model.named_modules()}
    uv = uu = vv = uv_d9 = vv_d9 = 0.0
    kfac_step, foof_step = dict(theta), dict(theta)
    for m in layers:
        A, G, grad = factors[m]["A"], factors[m]["G"], _gradient_matrix(m)
        ia, ig = torch.eye(len(A), dtype=A.dtype), torch.eye(len(G), dtype=G.dtype)
        pi = math.sqrt((A.trace() / len(A)) / (G.trace() / len(G)))
        lam_a = pi * math.sqrt(damping)
        if mode == "heuristic":
            curvature = torch.kron(A + lam_a * ia, G + math.sqrt(damping) / pi * ig)
        else:
            curvature = torch.kron(A, G) + damping * torch.eye(len(A) * len(G)).double()
        kfac_dir = _unvec(torch.linalg.solve(curvature, _vec(grad)), grad.shape)
        foof_dir = _unvec(
            torch.linalg.solve(torch.kron(A + lam_a * ia, ig), _vec(grad)), grad.shape
        )
        update = lr * kfac_dir
        metric = torch.kron(A + lam_a * ia, ig)
        uv += float(_vec(update) @ metric @ _vec(foof_dir))
        uu += float(_vec(update) @ metric @ _vec(update))
        vv += float(_vec(foof_dir) @ metric @ _vec(foof_dir))
        d9 = lam_a / damping  # App. D.9: FOOF's update times λ_A/λ in Fig. 3
        uv_d9 += d9 * float(_vec(update) @ metric @ _vec(foof_dir))
        vv_d9 += d9**2 * float(_vec(foof_dir) @ metric @ _vec(foof_dir))
        scaled = foof_dir * update.norm() / foof_dir.norm()
        prefix = names[m]
        for key, step in ((kfac_step, update), (foof_step, scaled)):
            key[f"{prefix}.weight"] = theta[f"{prefix}.weight"] - step[:, : m.in_features]
            if m.bias is not None:
                key[f"{prefix}.bias"] = theta[f"{prefix}.bias"] - step[:, -1]
        # the update the optimizer applied is the dense KFAC update
        torch.testing.assert_close(m.weight.detach(), kfac_step[f"{prefix}.weight"])

    assert cosine.network_unscaled[0] == pytest.approx(uv / math.sqrt(uu * vv), rel=1e-9)
    assert cosine.network_d9[0] == pytest.approx(uv_d9 / math.sqrt(uu * vv_d9), rel=1e-9)
    loss0 = float(loss_fn(functional_call(model, theta, (x,)), y))
    for params, measured in ((kfac_step, progress.kfac[0]), (foof_step, progress.foof[0])):
        loss1 = float(loss_fn(functional_call(model, params, (x,)), y))
        assert measured == pytest.approx((loss0 - loss1) / loss0, rel=1e-9, abs=1e-12)
    # the instrument restored KFAC's parameters after trying FOOF's update
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), kfac_step[name])
    summary = cosine.summary()
    assert summary["step"] == [0]
    assert summary["network_d9_mean"] == pytest.approx(cosine.network_d9[0])
    assert set(progress.summary()) >= {"kfac_mean", "foof_mean", "foof_ge_kfac"}


def test_instrument_rejects_other_optimizers():
    model = _tiny_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.zeros(2, 4, dtype=torch.float64)
    context = StepContext(0, 1, model, opt, x, None, None, None, None)
    with pytest.raises(TypeError, match="KFAC"):
        KfacFoofCosine().before_step(context)


# -- the train hook -----------------------------------------------------------------------------


def _tiny_config(data_dir, **overrides):
    values = dict(
        dataset="mnist",
        model="logistic",
        optimizer="sgd",
        lr=0.01,
        momentum=0.0,
        epochs=1,
        batch_size=50,
        subset=100,
        data_dir=str(data_dir),
    )
    values.update(overrides)
    return TrainConfig(**values)


def test_callbacks_see_each_step_and_are_not_timed(data_dir, monkeypatch):
    class Clock:
        """train()'s clock: ticks 1 ms per reading, plus what a callback spends."""

        now = 0.0

        @classmethod
        def perf_counter(cls):
            cls.now += 1e-3
            return cls.now

    monkeypatch.setattr(foof.train, "time", Clock)

    class Slow(TrainCallback):
        def __init__(self):
            self.calls = []

        def before_step(self, context):
            self.calls.append(("before", context.step, context.inputs.shape[0]))
            assert all(p.grad is not None for p in context.model.parameters())
            Clock.now += 1000.0  # an hour-long callback, on the clock train() reads

        def after_step(self, context):
            self.calls.append(("after", context.step, context.loss.item()))

    slow = Slow()
    results = train(_tiny_config(data_dir, epochs=2), progress=False, callbacks=[slow])
    assert [c[:2] for c in slow.calls[:4]] == [
        ("before", 0),
        ("after", 0),
        ("before", 1),
        ("after", 1),
    ]
    assert len(slow.calls) == 2 * len(results["steps"]["loss"]) == 8
    # each step's reading spans 1000 s of callback; none of it is counted (no wall clock read)
    assert 0 < results["steps"]["time"][-1] < 1000.0


# -- runner -----------------------------------------------------------------------------------


def _tiny_figure(seeds=2, lr_b=0.03):
    base = dict(dataset="mnist", model="logistic", subset=100, batch_size=50, epochs=1)
    return Figure(
        id="T1",
        title="tiny",
        claim="b beats a",
        mode="quick",
        base=base,
        runs=(
            Run("a", "SGD a", {"optimizer": "sgd", "lr": 0.01}, tune=("lr",)),
            Run("b", "SGD b", {"optimizer": "sgd", "lr": lr_b}, tune=("lr",)),
            Run("c", "same as a", {"optimizer": "sgd", "lr": 0.01}, tune=("lr",)),
        ),
        checks=(Below("b", "a"),),
        seeds=seeds,
    )


def _statuses(outcomes):
    return {o.name.split("/", 1)[1]: o.status for o in outcomes}


def test_reproduce_resumes_only_missing_runs(tmp_path, data_dir):
    figure = _tiny_figure()
    kwargs = dict(out=tmp_path, progress=False, data_dir=data_dir, entries={})
    first = _statuses(reproduce([figure], **kwargs))
    assert first == {
        "a seed 0": "trained",
        "a seed 1": "trained",
        "b seed 0": "trained",
        "b seed 1": "trained",
        "c seed 0": "reused",  # same config as a: copied, not retrained
        "c seed 1": "reused",
    }
    files = sorted((tmp_path / "T1").glob("*-seed*.json"))
    assert len(files) == 6
    mtimes = {p.name: p.stat().st_mtime_ns for p in files}
    results = read_json(tmp_path / "T1" / "b-seed1.json")
    assert results["complete"] and results["config"]["lr"] == 0.03
    assert results["experiment"]["label"] == "b" and results["experiment"]["seed"] == 1
    assert read_json(tmp_path / "T1" / "c-seed0.json")["experiment"]["reused_from"] == (
        "T1/a-seed0.json"
    )
    saved = read_json(tmp_path / "T1" / "figure.json")
    assert saved["claim"] == "b beats a" and saved["checks"][0]["kind"] == "below"

    (tmp_path / "T1" / "b-seed0.json").unlink()
    second = _statuses(reproduce([figure], **kwargs))
    assert [k for k, v in second.items() if v != "skipped"] == ["b seed 0"]
    assert second["b seed 0"] == "trained"
    for path in files:
        if path.name != "b-seed0.json":
            assert path.stat().st_mtime_ns == mtimes[path.name]

    # a changed hyperparameter makes the old file stale: only that run trains again
    entries = {"T1/b": {"quick": {"values": {"lr": 0.1}}}}
    third = _statuses(reproduce([figure], **{**kwargs, "entries": entries}))
    assert {k for k, v in third.items() if v == "trained"} == {"b seed 0", "b seed 1"}
    assert read_json(tmp_path / "T1" / "b-seed0.json")["config"]["lr"] == 0.1
    info = read_json(tmp_path / "T1" / "b-seed0.json")["experiment"]["hyperparameters"]
    assert info["source"].startswith("tuned") and info["values"] == {"lr": 0.1}

    # a search that confirms a's spec value (lr 0.01) changes where it comes from, not the run:
    # nothing retrains, but a's results now say "tuned"
    a_mtime = (tmp_path / "T1" / "a-seed0.json").stat().st_mtime_ns
    entries = {**entries, "T1/a": {"quick": {"values": {"lr": 0.01}, "note": "full-length"}}}
    fourth = _statuses(reproduce([figure], **{**kwargs, "entries": entries}))
    assert set(fourth.values()) == {"skipped"}
    a_results = read_json(tmp_path / "T1" / "a-seed0.json")
    assert a_results["experiment"]["hyperparameters"]["source"].startswith("tuned")
    assert a_results["config"]["lr"] == 0.01
    assert (tmp_path / "T1" / "a-seed0.json").stat().st_mtime_ns != a_mtime


def test_a_failing_run_leaves_no_partial_file(tmp_path, data_dir, monkeypatch):
    figure = _tiny_figure(seeds=1)
    kwargs = dict(out=tmp_path, progress=False, data_dir=data_dir, entries={})
    reproduce([figure], **kwargs)
    before = (tmp_path / "T1" / "a-seed0.json").read_bytes()

    def crash(config, *args, **kw):
        raise RuntimeError("killed mid-run")

    monkeypatch.setattr(runner_module, "train", crash)
    (tmp_path / "T1" / "b-seed0.json").unlink()
    outcomes = reproduce(
        [figure], **{**kwargs, "entries": {"T1/a": {"quick": {"values": {"lr": 1}}}}}
    )
    status = _statuses(outcomes)
    assert status["a seed 0"] == "failed" and status["b seed 0"] == "failed"
    assert "killed mid-run" in next(o.message for o in outcomes if o.status == "failed")
    assert not (tmp_path / "T1" / "b-seed0.json").exists()
    assert (tmp_path / "T1" / "a-seed0.json").read_bytes() == before  # old file untouched
    assert not list((tmp_path / "T1").glob(".*tmp"))  # no temporary files left behind


def test_toy_figure_and_report_sections(tmp_path, data_dir):
    reproduce(["F", _tiny_figure(seeds=1)], out=tmp_path, progress=False, data_dir=data_dir)
    assert read_json(tmp_path / "F" / "toy-seed0.json")["values"]["sgd_direction_0"] == 2.0
    path = write_report([tmp_path])
    text = path.read_text()
    for name in FIGURES:
        assert f"\n## {name} " in text, name
    assert "**Verdict: yes**" in text  # the toy example
    assert "**Verdict: not run**" in text  # figures without results still get a section
    assert (tmp_path / "F.png").stat().st_size > 1000
    summary = read_json(tmp_path / "summary.json")
    assert summary["figures"]["F"]["verdict"] == "yes"
    assert summary["figures"]["1A"]["verdict"] == "missing"
    assert "foof reproduce F --mode quick" in text


# -- tuning -----------------------------------------------------------------------------------


def test_grid_helpers():
    assert [tune_module.lr_value(i) for i in range(-2, 3)] == [0.1, 0.3, 1.0, 3.0, 10.0]
    assert tune_module.lr_index(0.3) == -1 and tune_module.lr_index(0.01) == -4
    assert tune_module.lr_index(0.02) == -3  # nearest in log scale is 0.03
    assert tune_module.damping_value(-2) == 1e-4 and tune_module.damping_index(1e-4) == -2
    assert tune_module.damping_index(1.0) == 0 and tune_module.damping_index(10.0) == 1
    axes = {"lr": [-1, 0, 1], "damping": [-1, 0, 1]}
    extensions = {(n, side): 0 for n in ("lr", "damping") for side in (-1, 1)}
    assert tune_module._extend(axes, (1, 0), {(1, 0): 0.1}, extensions, max_extensions=3)
    assert axes == {"lr": [-1, 0, 1, 2], "damping": [-1, 0, 1]}
    assert not tune_module._extend(axes, (0, 0), {(0, 0): 0.1}, extensions, max_extensions=3)
    extensions[("lr", 1)] = 3  # at most max_extensions per side
    assert not tune_module._extend(axes, (2, 0), {(2, 0): 0.1}, extensions, max_extensions=3)
    diverged = {(p, 0): math.inf for p in axes["lr"]}
    assert tune_module._extend(axes, (2, 0), diverged, extensions, max_extensions=3)
    assert axes["lr"][0] == -2  # nothing trained: try smaller learning rates


def test_row_search_follows_the_ridge_across_dampings():
    # a synthetic objective whose best learning-rate index is 4 × damping index (lr ∝ damping,
    # as for natural gradients): far from the starting window at the grid's ends
    results = {}

    def evaluate(points):
        for lr, damping in points:
            results[(lr, damping)] = float((lr - 4 * damping) ** 2)

    axes = {"lr": [-2, -1, 0, 1, 2], "damping": [-3, -2, -1, 0, 1, 2, 3]}
    tune_module._search_rows(axes, results, evaluate, max_extensions=3, start_damping=0)
    for damping in axes["damping"]:
        row = {lr: v for (lr, d), v in results.items() if d == damping}
        assert min(row, key=row.get) == 4 * damping, (damping, sorted(row))
    assert len(results) < 7 * 12  # lines of at most 5 + 2 · 3 points


def test_tune_cli_options(capsys):
    with pytest.raises(SystemExit):
        main(["tune", "1D", "--method", "kfac", "--dampings", "1,-2"])
    assert "expected positive numbers" in capsys.readouterr().err
    command = tune_module.tune_command(
        "1D", "kfac", "standard", 15, 1, "rows", [1.0, 100.0], 2, protocol="short"
    )
    assert command == (
        "foof tune 1D --method kfac --mode standard --protocol short --budget-epochs 15 "
        "--dampings 1,100 --max-extensions 2"
    )
    assert tune_module.tune_command("1D", "kfac", "standard", None, 1) == (
        "foof tune 1D --method kfac --mode standard"
    )


def test_tune_searches_saves_and_feeds_reproduce(tmp_path, data_dir, monkeypatch):
    figure = _tiny_figure(seeds=1)
    monkeypatch.setattr(tune_module, "build", lambda name, mode: figure)
    target = tmp_path / "hyperparameters.json"
    entry = tune_module.tune(
        "T1",
        "b",
        "quick",
        out=tmp_path / "grid",
        hyperparameters_path=target,
        data_dir=data_dir,
        progress=False,
        max_extensions=1,
        log=open(tmp_path / "log.txt", "w"),  # noqa: SIM115
        protocol="short",
    )
    grid_lrs = sorted(point["lr"] for point in entry["grid"])
    assert {0.003, 0.01, 0.03, 0.1, 0.3} <= set(grid_lrs)  # five values around lr=0.03
    assert entry["values"]["lr"] in grid_lrs
    best = min(entry["grid"], key=lambda p: p["loss"] if p["loss"] is not None else math.inf)
    assert best["lr"] == entry["values"]["lr"]
    assert entry["command"] == (
        "foof tune T1 --method b --mode quick --protocol short --max-extensions 1"
    )
    entries = hp.load(target)
    assert entries["T1/b"]["quick"]["values"] == entry["values"]
    planned = plan(figure, tmp_path, entries=entries)
    assert [p.config.lr for p in planned if p.run.label == "b"] == [entry["values"]["lr"]]
    # resumable: a second search trains nothing new
    monkeypatch.setattr(runner_module, "train", lambda *a, **k: pytest.fail("retrained"))
    again = tune_module.tune(
        "T1",
        "b",
        "quick",
        out=tmp_path / "grid",
        hyperparameters_path=target,
        data_dir=data_dir,
        progress=False,
        max_extensions=1,
        save=False,
        log=open(tmp_path / "log2.txt", "w"),  # noqa: SIM115
        protocol="short",
    )
    assert again["values"] == entry["values"]


def test_tune_full_budget_decides_at_the_full_budget_records_and_resumes(
    tmp_path, data_dir, monkeypatch
):
    figure = dataclasses.replace(
        _tiny_figure(seeds=1), base={**_tiny_figure().base, "epochs": 3, "eval_train": True}
    )
    monkeypatch.setattr(tune_module, "build", lambda name, mode: figure)
    target = tmp_path / "hyperparameters.json"
    kwargs = dict(
        out=tmp_path / "grid",
        record=tmp_path / "records",
        hyperparameters_path=target,
        data_dir=data_dir,
        progress=False,
    )
    entry = tune_module.tune("T1", "b", "quick", log=open(tmp_path / "log.txt", "w"), **kwargs)  # noqa: SIM115
    assert entry["protocol"] == "full-budget" and entry["rungs"] == [1, 3]
    assert entry["command"] == "foof tune T1 --method b --mode quick"
    full = {p["lr"]: p["loss"] for p in entry["grid"] if p["epochs"] == 3}
    # the winner is the best loss at the full budget, and both its lr neighbours ran it too
    assert entry["objective"] == min(v for v in full.values() if v is not None)
    winner = entry["values"]["lr"]
    index = tune_module.lr_index(winner)
    for neighbour in (index - 1, index + 1):
        assert tune_module.lr_value(neighbour) in full
    assert len(entry["finalists"]) >= 3
    record = read_json(tmp_path / "records" / "quick" / "T1" / "b.json")
    assert record["format"] == tune_module.RECORD_FORMAT
    assert {tuple(sorted(p["budgets"])) for p in record["points"]} <= {("1",), ("1", "3")}
    for point in record["points"]:
        for budget in point["budgets"].values():
            assert set(budget) == {"loss", "diverged", "seconds"}
    # a rung continues the same run: the 3-epoch loss of a point equals a straight 3-epoch run
    values = {"lr": winner}
    planned = tune_module._planned(figure, figure.run("b"), values, 0, 3, tmp_path / "fresh")
    straight = execute(planned, DataCache(data_dir))
    assert metric_value(straight, "final_train_loss") == pytest.approx(full[winner], rel=1e-6)
    # resumable from the record alone (another session: no grid runs, no checkpoints)
    shutil.rmtree(tmp_path / "grid")
    monkeypatch.setattr(runner_module, "train", lambda *a, **k: pytest.fail("retrained"))
    again = tune_module.tune(
        "T1",
        "b",
        "quick",
        save=False,
        log=open(tmp_path / "log2.txt", "w"),
        **kwargs,  # noqa: SIM115
    )
    assert again["values"] == entry["values"] and again["grid"] == entry["grid"]
    with pytest.raises(ValueError, match="--protocol short"):
        tune_module.tune("T1", "b", "quick", budget_epochs=1, save=False, progress=False)


def test_tune_refuses_shared_entries():
    with pytest.raises(ValueError, match="foof tune 1A --method fashion-mnist-natural"):
        tune_module.tune("1B", "natural", "quick", save=False, progress=False)


def test_fig3b_trajectories_share_fig3c_learning_rates():
    # Sharing is sound only if the runs are the same training run (3B only adds an instrument).
    trajectories, sweep = build("3B", "standard"), build("3CD", "standard")
    for damping in (0.01, 1.0, 100.0):
        label = f"kfac-d{damping:g}"
        run = trajectories.run(label)
        assert trajectories.hyperparameter_key(run) == f"3CD/{label}"
        values = {"lr": 0.1}
        assert (
            trajectories.config(run, 0, values).to_dict()
            == sweep.config(sweep.run(label), 0, values).to_dict()
        )
    with pytest.raises(ValueError, match="foof tune 3CD --method kfac-d1"):
        tune_module.tune("3B", "kfac-d1", "standard", save=False, progress=False)


# -- CLI --------------------------------------------------------------------------------------


def test_cli_bad_arguments_exit_2(capsys):
    for argv in (
        ["reproduce", "7Z"],
        ["reproduce", "1A", "--mode", "huge"],
        ["reproduce", "1A", "--seeds", "0"],
        ["tune", "1A"],
        ["tune", "1A", "--method", "kfac", "--budget-epochs", "x"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2, argv
    assert "unknown figure '7Z'" in capsys.readouterr().err


def test_cli_errors_and_report(tmp_path, data_dir, capsys):
    assert main(["tune", "1A", "--method", "nope", "--out", str(tmp_path)]) == 2
    assert "has no run 'nope'" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert main(["reproduce", "toy", "--out", str(tmp_path), "--no-progress", "--report"]) == 0
    out = capsys.readouterr().out
    assert "1 trained" in out and "REPORT.md" in out
    assert main(["report", str(tmp_path), "--no-plots"]) == 0
    assert "F: yes (quick, 1/1 seeds)" in capsys.readouterr().out


def test_results_written_before_a_new_config_field_still_count_as_done(tmp_path, data_dir):
    # a TrainConfig field added later (with its default) must not make finished runs stale
    figure = _tiny_figure(seeds=1)
    kwargs = dict(out=tmp_path, progress=False, data_dir=data_dir, entries={})
    reproduce([figure], **kwargs)
    path = tmp_path / "T1" / "a-seed0.json"
    results = read_json(path)
    del results["config"]["eval_train"]  # as if written before eval_train existed
    results["experiment"]["config"] = results["config"]
    write_json_atomic(path, results)
    statuses = _statuses(reproduce([figure], **kwargs))
    assert statuses["a seed 0"] == "skipped"


# -- the conv figures (quick mode on fake CIFAR-shaped data) ------------------------------------


def test_conv_figures_standard_mode_is_the_paper_setting():
    figure = build("fig5", "standard")
    assert figure.id == "5WRN" and build("j18", "quick").id == "J17"
    for p in plan(figure, "/nonexistent", entries={}):
        config = p.config
        assert (config.dataset, config.model, config.batch_size, config.epochs) == (
            "cifar10",
            "wrn18",
            100,
            50,
        )
        assert config.augment and config.momentum_delay == 1 and config.momentum == 0.9
        assert config.model_options["width"] == 64
        if config.optimizer in ("foof", "kfac"):
            assert (config.inv_every, config.stats_steps) == (500, 10)
            if config.model_options["batch_norm"]:
                assert config.model_options["train_norm"] is False
        else:
            assert "train_norm" not in config.model_options
    assert {p.config.polyak_decay for p in plan(figure, "/x", entries={})} == {None, 0.99}
    svhn = plan(build("J17", "standard"), "/x", entries={})
    assert {p.config.batch_size for p in svhn} == {128, 256, 512, 1024}
    assert {p.config.inv_every for p in svhn if p.config.optimizer != "sgd"} == {100}
    assert {p.config.dataset for p in plan(build("J16", "standard"), "/x", entries={})} == {
        "cifar100"
    }


def test_quick_conv_figure_runs_on_fake_data_resumes_and_reports(tmp_path, capsys):
    out = tmp_path / "quick"
    args = ["reproduce", "J14", "--mode", "quick", "--out", str(out), "--no-progress"]
    assert main([*args, "--data-root", str(tmp_path / "nowhere")]) == 0
    assert "3 trained, 0 reused, 0 already done, 0 failed" in capsys.readouterr().out
    results = read_json(out / "J14" / "kfac-seed0.json")
    assert results["complete"] and results["dataset"]["name"] == "fake-cifar10"
    assert results["config"]["model"] == "wrn18" and results["config"]["augment"]
    assert results["config"]["model_options"] == {
        "width": 4,
        "batch_norm": True,
        "train_norm": False,
    }
    assert main(args) == 0  # resume: nothing left to run
    assert "0 trained, 0 reused, 3 already done, 0 failed" in capsys.readouterr().out
    report = write_report([out], plots=False).read_text()
    assert "**Ran on.** fake-cifar10 (generated by foof.data.vision) on cpu" in report
    assert "Standard mode needs cifar10's files" in report  # 5WRN was not run


def test_reproduce_command_names_a_real_data_root_and_a_gpu_but_not_the_bundled_data():
    command = runner_module.reproduce_command(
        "5WRN", "standard", None, None, device="cuda", data_root="/data/cifar"
    )
    assert command == "foof reproduce 5WRN --mode standard --data-root /data/cifar --device cuda"
    assert runner_module.reproduce_command("1D", "quick", None, None, device="cpu") == (
        "foof reproduce 1D --mode quick"
    )
    assert runner_module._data_root(build("5WRN", "standard"), "/data") == "/data"
    assert runner_module._data_root(build("1D", "standard"), "/data") is None
    assert runner_module._data_root(build("5WRN", "quick"), "/data") is None  # fake data


def test_report_carries_both_protocols_and_does_not_judge_a_no_below_protocol(tmp_path, data_dir):
    # b's lr (0.003) is far worse than a's: "b beats a" fails under both protocols
    figure = _tiny_figure(seeds=1, lr_b=0.003)
    kwargs = dict(progress=False, data_dir=data_dir)
    reproduce([figure], out=tmp_path / "paper", protocol="paper", entries={"T1/b": {}}, **kwargs)
    saved = read_json(tmp_path / "paper" / "T1" / "figure.json")
    assert saved["protocol"] == "paper" and "--protocol paper" in saved["command"]
    assert saved["hyperparameters"]["b"]["source"].startswith("paper's values")
    short = {"T1/a": {"quick": {"values": {"lr": 0.03}, "protocol": "short"}}}
    reproduce([figure], out=tmp_path / "tuned", entries=short, **kwargs)
    tuned = report_module.find_figures([tmp_path / "tuned"])["T1"]
    paper = report_module.find_figures([tmp_path / "paper"])["T1"]
    assert paper.verdict() == "no" and paper.below_protocol() == []
    # the same "no" with baselines not tuned by the full-budget protocol is not judged
    assert combine([o.verdict for _, o in tuned.outcomes()]) == "no"
    assert set(tuned.below_protocol()) == {"a", "b", "c"} and tuned.verdict() == "unjudged"
    full = {
        "T1/" + k: {"quick": {"values": {"lr": v}, "protocol": "full-budget"}}
        for k, v in (("a", 0.03), ("b", 0.003), ("c", 0.01))
    }
    reproduce([figure], out=tmp_path / "full", entries=full, **kwargs)
    assert report_module.find_figures([tmp_path / "full"])["T1"].verdict() == "no"
    path = write_report(
        [tmp_path / "tuned"], tmp_path / "report", plots=False, paper=[tmp_path / "paper"]
    )
    text = path.read_text()
    assert "| verdict (tuned here) | verdict (paper's values) |" in text
    assert "**At the paper's values**" in text and "Below the full-budget protocol" in text
    summary = read_json(tmp_path / "report" / "summary.json")
    assert summary["figures"]["T1"]["verdict"] == "unjudged"
    assert summary["figures"]["T1"]["paper_values"]["verdict"] == "no"
