"""foof.experiments.instruments and the checks of Figs. 3B-3D, 4B, 4C, 5 and J against cases
worked by hand.

The instruments' hand case is a network whose layers all have **one output unit**: then KFAC's
gradient factor ``Ḡ_l`` is a positive scalar ``g_l`` (1×1), and KFAC's update is FOOF's direction
(with KFAC's ``λ_A``) times a scalar,

    U_l = lr · D_l / (g_l + λ_G,l),   D_l = Ĝ_l (Σ_l + λ_A,l I)⁻¹,   λ_A = π√λ, λ_G = √λ/π,

so every quantity of Figs. 3B and 4C has a closed form:

* per-layer cosine: 1 (parallel updates, in any metric);
* network cosine with D.9's rescaling ``V_l = D_l λ_A,l/λ = D_l/λ_G,l``:
  ``Σ a_l b_l w_l / sqrt(Σ a_l² w_l · Σ b_l² w_l)`` with ``a_l = 1/(g_l + λ_G,l)``,
  ``b_l = 1/λ_G,l`` and ``w_l = ⟨D_l, D_l⟩ = Ĝ_l (Σ_l + λ_A,l I)⁻¹ Ĝ_lᵀ``; it tends to 1 as
  ``λ → ∞`` (``a_l/b_l = λ_G/(g + λ_G) → 1``), the paper's "stronger damping, more similar";
  without the rescaling (``b_l = 1``) it does not, as ``a_l ≈ π_l/√λ`` differs between layers;
* Fig. 4C's norm-matched update without the second factor *is* KFAC's update, so both make the
  same progress, ``(L₀ − L₁)/L₀`` of the linear model's quadratic loss.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from foof.experiments import build
from foof.experiments.checks import (
    Below,
    Increasing,
    LowerWorkingDamping,
    NotApplicable,
    PairedBelow,
    RatioAtMost,
    check_from_dict,
    combine,
)
from foof.experiments.figures import KFAC_1A, figure_1a
from foof.experiments.instruments import (
    INSTRUMENTS,
    KfacFoofCosine,
    SecondFactorProgress,
    instrument_record,
    network_cosine,
)
from foof.experiments.runner import plan
from foof.optim.kfac import KFAC
from foof.train import StepContext


def _values(table):
    return lambda label, metric: list(table.get(label, []))


def _scalar_output_case(seed: int = 0):
    """Two bias-free linear layers 3 → 1 → 1, Gaussian likelihood, batch of 8 (float64)."""
    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 1, bias=False), nn.Linear(1, 1, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.5, -1.0, 2.0]]))
        model[1].weight.fill_(1.5)
    x = torch.randn(8, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(8, 1, generator=generator, dtype=torch.float64)
    return model, x, y


def _loss(out, y):
    """The Gaussian likelihood's loss, ½‖f − y‖² per sample, mean over the batch."""
    return 0.5 * ((out - y) ** 2).sum(1).mean()


def _by_hand(model, x, y, damping):
    """Per layer ``(Σ, g, Ĝ)`` of :func:`_scalar_output_case`, from the model's formulas."""
    w1, w2 = model[0].weight.detach(), model[1].weight.detach()
    batch = len(x)
    h = x @ w1.T  # (B, 1)
    residual = h @ w2.T - y  # e of the last layer, (B, 1)
    e1 = residual * w2  # e of the first layer (chain rule through f = w2 h)
    layers = []
    for a, e in ((x, e1), (h, residual)):
        sigma = a.T @ a / batch
        g = float((e**2).mean())  # empirical Fisher: the dataset label's e
        grad = e.T @ a / batch  # Ĝ = mean_i e_i a_iᵀ
        pi = math.sqrt(float(sigma.diagonal().mean()) / g)
        layers.append(dict(sigma=sigma, g=g, grad=grad, pi=pi))
    root = math.sqrt(damping)
    for layer in layers:
        lam_a, lam_g = layer["pi"] * root, root / layer["pi"]
        eye = torch.eye(len(layer["sigma"]), dtype=torch.float64)
        layer.update(
            lam_a=lam_a, lam_g=lam_g, inverse=torch.linalg.inv(layer["sigma"] + lam_a * eye)
        )
        layer["w"] = float(layer["grad"] @ layer["inverse"] @ layer["grad"].T)
    return layers


def _step(model, opt, x, y, instruments, step=0):
    opt.zero_grad()
    out = model(x)
    loss = _loss(out, y)
    opt.backward(loss, out)
    context = StepContext(step, 1, model, opt, x, y, out, loss, _loss)
    for inst in instruments:
        inst.before_step(context)
    opt.step()
    for inst in instruments:
        inst.after_step(context)
    return float(loss.detach())


def _kfac(model, damping, **options):
    return KFAC(
        model,
        lr=0.1,
        damping=damping,
        fisher="empirical",
        likelihood="gaussian",
        ema_decay=0.0,
        **options,
    )


@pytest.mark.parametrize("damping", [0.01, 1.0, 100.0])
def test_cosine_matches_the_closed_form_of_scalar_gradient_factors(damping):
    model, x, y = _scalar_output_case()
    layers = _by_hand(model, x, y, damping)
    cosine = KfacFoofCosine()
    _step(model, _kfac(model, damping), x, y, [cosine])

    a = [1 / (layer["g"] + layer["lam_g"]) for layer in layers]
    b = [1 / layer["lam_g"] for layer in layers]
    w = [layer["w"] for layer in layers]

    def closed_form(b):
        num = sum(ai * bi * wi for ai, bi, wi in zip(a, b, w))
        return num / math.sqrt(
            sum(ai**2 * wi for ai, wi in zip(a, w)) * sum(bi**2 * wi for bi, wi in zip(b, w))
        )

    summary = cosine.summary()
    assert summary["network_d9"][0] == pytest.approx(closed_form(b), rel=1e-10)
    assert summary["network_unscaled"][0] == pytest.approx(closed_form([1.0, 1.0]), rel=1e-10)
    for series in summary["per_layer"].values():
        assert series[0] == pytest.approx(1.0, rel=1e-12)
    assert summary["layer_mean"] == pytest.approx(1.0, rel=1e-12)
    # the case is not degenerate: the two layers' π differ, so the rescaling matters
    assert layers[0]["pi"] / layers[1]["pi"] > 1.5 or layers[1]["pi"] / layers[0]["pi"] > 1.5


def test_d9_rescaling_makes_the_cosine_tend_to_one_with_damping():
    """Paper Sec. 4: "as we ... increase the damping strength ..., KFAC's update will become
    more and more aligned with FOOF" holds for D.9's rescaled network cosine, not without it."""
    d9, unscaled = [], []
    for damping in (0.01, 1.0, 100.0, 1e4, 1e6):
        model, x, y = _scalar_output_case()
        cosine = KfacFoofCosine()
        _step(model, _kfac(model, damping), x, y, [cosine])
        d9.append(cosine.summary()["network_d9_mean"])
        unscaled.append(cosine.summary()["network_unscaled_mean"])
    assert all(lo < hi for lo, hi in zip(d9, d9[1:]))  # monotonic in λ
    assert d9[-1] == pytest.approx(1.0, abs=1e-4)
    assert unscaled[-1] < 0.99


def test_network_cosine_by_hand():
    # two layers, ⟨U,V⟩, ⟨U,U⟩, ⟨V,V⟩ = (1, 1, 4) and (3, 9, 1); scales 1 and 3:
    # Σ c uv = 1 + 9 = 10; Σ uu = 10; Σ c² vv = 4 + 9 = 13  ->  10 / sqrt(130)
    products = {"a": (1.0, 1.0, 4.0), "b": (3.0, 9.0, 1.0)}
    assert network_cosine(products) == pytest.approx(4 / math.sqrt(50), rel=1e-15)
    assert network_cosine(products, {"a": 1.0, "b": 3.0}) == pytest.approx(
        10 / math.sqrt(130), rel=1e-15
    )
    assert math.isnan(network_cosine({"a": (0.0, 0.0, 1.0)}))


@pytest.mark.parametrize("inv_every", [1, 3])
def test_norm_matched_update_without_second_factor_equals_kfac_for_scalar_factors(inv_every):
    """With ``Ḡ`` a scalar, dropping it and matching KFAC's norm per layer gives KFAC's update:
    the same relative decrease, on every step, also on steps reusing an older inverse."""
    model, x, y = _scalar_output_case()
    opt = _kfac(model, 1.0, inv_every=inv_every)
    progress, cosine = SecondFactorProgress(), KfacFoofCosine()
    generator = torch.Generator().manual_seed(5)
    for step in range(4):
        batch_x = x + 0.3 * torch.randn(x.shape, generator=generator, dtype=x.dtype)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        loss0 = _step(model, opt, batch_x, y, [progress, cosine], step=step)
        with torch.no_grad():
            loss1 = float(_loss(model(batch_x), y))
        assert progress.kfac[-1] == pytest.approx((loss0 - loss1) / loss0, rel=1e-10)
        assert progress.foof[-1] == pytest.approx(progress.kfac[-1], rel=1e-9)
        for layer_series in cosine.per_layer.values():
            assert layer_series[-1] == pytest.approx(1.0, rel=1e-10)
        assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert progress.summary()["foof_ge_kfac"] is not None


def test_progress_on_a_quadratic_by_hand():
    """Linear regression with two outputs, y = W* x exactly: L(W) = ½ tr((W − W*) Σ (W − W*)ᵀ).

    Ĝ = (W − W*) Σ, FOOF's direction D = Ĝ (Σ + λ_A I)⁻¹, rescaled to KFAC's norm ‖U‖; both
    decreases follow from the closed-form loss.
    """
    generator = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 2, bias=False)).double()
    x = torch.randn(16, 3, generator=generator, dtype=torch.float64)
    target = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 1.0]], dtype=torch.float64)
    y = x @ target.T
    weight0 = model[0].weight.detach().clone()
    progress = SecondFactorProgress()
    opt = _kfac(model, 0.1)
    _step(model, opt, x, y, [progress])

    sigma = x.T @ x / len(x)
    error = weight0 - target

    def loss(weight):
        diff = weight - target
        return 0.5 * float((diff @ sigma * diff).sum())

    update = weight0 - model[0].weight.detach()
    residual = x @ error.T  # e = f − y, (B, 2)
    g = residual.T @ residual / len(x)
    pi = math.sqrt(float(sigma.diagonal().mean()) / float(g.diagonal().mean()))
    direction = (error @ sigma) @ torch.linalg.inv(sigma + pi * math.sqrt(0.1) * torch.eye(3))
    scaled = direction * update.norm() / direction.norm()
    l0 = loss(weight0)
    assert progress.kfac[0] == pytest.approx((l0 - loss(weight0 - update)) / l0, rel=1e-9)
    assert progress.foof[0] == pytest.approx((l0 - loss(weight0 - scaled)) / l0, rel=1e-9)
    assert progress.foof[0] != pytest.approx(progress.kfac[0], rel=1e-3)  # Ḡ is not scalar


def test_instruments_refuse_a_fused_backward():
    model, x, y = _scalar_output_case()
    opt = _kfac(model, 1.0, fused_backward=True)
    out = model(x)
    context = StepContext(0, 1, model, opt, x, y, out, _loss(out, y), _loss)
    with pytest.raises(ValueError, match="fused_backward"):
        KfacFoofCosine().before_step(context)


def test_instrument_record_versions_changed_definitions():
    assert instrument_record(["kfac-foof-cosine", "second-factor-progress"]) == [
        f"kfac-foof-cosine@{INSTRUMENTS['kfac-foof-cosine'].version}",
        f"second-factor-progress@{INSTRUMENTS['second-factor-progress'].version}",
    ]
    assert all(cls.version >= 2 for cls in INSTRUMENTS.values())
    assert instrument_record([]) == []


# -- checks -------------------------------------------------------------------------------------


def test_paired_below_counts_wins_per_seed():
    # means overlap within ± std, but a wins on every seed
    v = _values({"a": [1.0, 2.0, 3.0], "b": [1.1, 2.2, 3.3], "c": [0.9, 2.5, 2.9]})
    assert Below("a", "b").evaluate(v).verdict == "inconclusive"
    outcome = PairedBelow("a", "b").evaluate(v)
    assert outcome.verdict == "yes" and "1.1, 1.1, 1.1" in outcome.measured
    assert "3/3" in outcome.measured
    assert PairedBelow("b", "a").evaluate(v).verdict == "no"
    assert PairedBelow("a", "c").evaluate(v).verdict == "inconclusive"  # 1 of 3
    diverged = _values({"a": [1.0, math.inf], "b": [2.0, math.inf], "c": [math.inf, 1.0]})
    assert PairedBelow("a", "b").evaluate(diverged).verdict == "inconclusive"  # a tie
    assert PairedBelow("a", "c").evaluate(diverged).verdict == "inconclusive"
    assert PairedBelow("a", "b").evaluate(_values({"a": [1.0], "b": [1.0, 2.0]})).verdict == (
        "missing"
    )
    check = PairedBelow("a", "b", factor=1.05)
    assert check_from_dict(check.to_dict()) == check


def test_lower_working_damping_reports_each_tolerance():
    # FOOF best 0.2 at 1e-4, 0.24 at 1e-2 (1.2x), 0.32 at 1e-6 (1.6x), diverged at 1e-8;
    # KFAC best 0.19 at 1e-2, 0.27 at 1e-4 (1.42x), 0.5 at 1e-6 (2.6x), diverged at 1e-8.
    table = {
        "f8": [math.inf],
        "f6": [0.32],
        "f4": [0.2],
        "f2": [0.24],
        "k8": [math.inf],
        "k6": [0.5],
        "k4": [0.27],
        "k2": [0.19],
    }
    foof = (("f8", 1e-8), ("f6", 1e-6), ("f4", 1e-4), ("f2", 1e-2))
    kfac = (("k8", 1e-8), ("k6", 1e-6), ("k4", 1e-4), ("k2", 1e-2))
    check = LowerWorkingDamping(foof, kfac, within=(1.25, 1.5, 2.0))
    outcome = check.evaluate(_values(table))
    # 1.25: FOOF 1e-4 vs KFAC 1e-2 (yes); 1.5: 1e-4 vs 1e-4 (same); 2: 1e-6 vs 1e-4 (yes)
    assert "within 1.25×: 0.0001 vs 0.01" in outcome.measured
    assert "within 1.5×: 0.0001 vs 0.0001 (same)" in outcome.measured
    assert "within 2×: 1e-06 vs 0.0001" in outcome.measured
    assert outcome.verdict == "inconclusive" and "still works" not in outcome.measured
    assert LowerWorkingDamping(foof, kfac, within=(1.25, 2.0)).evaluate(_values(table)).verdict == (
        "yes"
    )
    assert LowerWorkingDamping(kfac, foof, within=(1.25, 2.0)).evaluate(_values(table)).verdict == (
        "no"
    )
    # a sweep that stops where FOOF still works says so
    short = LowerWorkingDamping(foof[2:], kfac[2:], within=2.0).evaluate(_values(table))
    assert "f4 still works at its sweep's smallest damping 0.0001" in short.measured
    assert check_from_dict(check.to_dict()) == check
    with pytest.raises(ValueError, match="within"):
        LowerWorkingDamping(foof, kfac, within=(0.5,))


def test_not_applicable_is_shown_but_not_judged():
    v = _values({"a": [2.0], "b": [1.0]})
    check = NotApplicable.of(RatioAtMost("a", "b", 1.25, metric="time_per_update"), "no GPU")
    outcome = check.evaluate(v)
    assert outcome.verdict == "not applicable"
    assert "ratio 2" in outcome.measured and "no GPU" in outcome.measured
    assert check_from_dict(check.to_dict()) == check
    assert combine(["yes", "not applicable"]) == "yes"
    assert combine(["not applicable", "inconclusive"]) == "inconclusive"
    assert combine(["not applicable"]) == "not applicable"


# -- figure wiring ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["quick", "standard"])
def test_figure_wiring_of_the_instrument_checks(mode):
    fig_3b = build("3B", mode)
    cosine_checks = [c for c in fig_3b.checks if isinstance(c, (Below, Increasing))]
    assert {c.metric for c in cosine_checks} == {
        "metric:kfac-foof-cosine/network_d9_mean",
        "metric:kfac-foof-cosine/layer_mean",
    }
    (sweep,) = build("3CD", mode).checks
    assert sweep.tolerances == (1.25, 1.5, 2.0)
    assert min(x for _, x in sweep.a) < 1e-4 and min(x for _, x in sweep.b) < 1e-4
    assert all(isinstance(c, PairedBelow) for c in build("4B", mode).checks)
    timing = [c for c in build("5", mode).checks if isinstance(c, NotApplicable)]
    assert len(timing) == 2 and all(c.inner.metric == "time_per_update" for c in timing)


def test_4c_follows_kfacs_tuned_entry():
    """Fig. 4C uses "learning rate and damping that are optimal for KFAC": Fig. 1A's entry, with
    every axis 1A tunes (so a retuned entry flows through)."""
    kfac_1a = next(r for r in figure_1a("standard").runs if r.label == "fashion-mnist-kfac")
    entries = {KFAC_1A: {"standard": {"values": {"lr": 0.0123, "damping": 0.0456}}}}
    fig = build("4C", "standard")
    (run,) = fig.runs
    assert fig.hyperparameter_key(run) == KFAC_1A and set(kfac_1a.tune) <= set(run.tune)
    (planned, *_) = plan(fig, "/nonexistent", entries=entries)
    assert (planned.config.lr, planned.config.damping) == (0.0123, 0.0456)
    assert planned.config.epochs == 1  # 4C's own budget, not 1A's


def test_report_lists_the_network_and_per_layer_cosines(tmp_path):
    from foof.experiments.report import FigureResults, _cosine_table
    from foof.io import write_json_atomic

    figure = build("3B", "quick")
    directory = tmp_path / "3B"
    directory.mkdir()
    write_json_atomic(directory / "figure.json", figure.to_dict())
    for i, run in enumerate(figure.runs):
        metrics = {
            "network_d9_mean": 0.5 + 0.1 * i,
            "network_unscaled_mean": 0.4,
            "per_layer_mean": {"1": 0.9, "3": 0.8},
        }
        results = {"complete": True, "metrics": {"kfac-foof-cosine": metrics}}
        write_json_atomic(directory / f"{run.label}-seed0.json", results)
    lines = _cosine_table(FigureResults(directory))
    header = next(line for line in lines if line.startswith("| run"))
    assert "network (D.9" in header and "layer 1" in header and "layer 3" in header
    rows = [line for line in lines if line.startswith("| KFAC")]
    assert len(rows) == len(figure.runs)
    assert rows[1].rstrip(" |").split(" | ")[2:6] == ["0.6", "0.4", "0.9", "0.8"]
