"""PNG plots of a figure's results (matplotlib, Agg backend), in the paper's style.

* ``curves``: training loss per epoch (log scale), mean ± std over seeds, one panel per group;
* ``bars``: the figure's metric per run (e.g. time per update), mean ± std;
* ``sweep``: final loss against damping, one line per series (Figs. 3C/3D);
* ``trajectory``: an instrument's per-step series along KFAC's trajectory (Figs. 3B, 4C);
* ``toy``: App. F's weight space with SGD's direction and FOOF's step.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from foof.experiments.checks import Summary, metric_name

if TYPE_CHECKING:
    from foof.experiments.report import FigureResults


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_figure(figure: FigureResults, path: Path) -> Path | None:
    """Draw ``figure`` into ``path``; ``None`` if it has nothing to plot yet."""
    if not any(figure.results.values()):
        return None
    style = figure.spec["plot"]
    plt = _pyplot()
    drawer = {
        "curves": _curves,
        "bars": _bars,
        "sweep": _sweep,
        "trajectory": _trajectory,
        "toy": _toy,
        "laplace": _laplace,
    }[style]
    fig = drawer(plt, figure)
    fig.suptitle(f"{figure.spec['title']} ({figure.spec['mode']} mode)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _loss_curve(results: dict[str, Any]) -> tuple[list[int], np.ndarray]:
    from foof.experiments.report import loss_curve

    epochs, values = loss_curve(results)
    return epochs, np.array([np.nan if v is None else v for v in values], dtype=float)


def _band(ax, x, curves: list[np.ndarray], label: str) -> None:
    length = max(len(c) for c in curves)
    padded = np.full((len(curves), length), np.nan)
    for i, curve in enumerate(curves):
        padded[i, : len(curve)] = curve
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(padded, axis=0)
        std = np.nanstd(padded, axis=0, ddof=1) if len(curves) > 1 else np.zeros(length)
    x = np.asarray(x[:length])
    (line,) = ax.plot(x, mean, label=label)
    if len(curves) > 1:
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)


def _curves(plt, figure: FigureResults):
    groups: dict[str | None, list[dict]] = {}
    for run in figure.runs:
        groups.setdefault(run.get("group"), []).append(run)
    fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 3.8), squeeze=False)
    for ax, (group, runs) in zip(axes[0], groups.items()):
        for run in runs:
            results = figure.results[run["label"]]
            if not results:
                continue
            curves = [_loss_curve(r) for r in results]
            epochs = max((c[0] for c in curves), key=len)
            _band(ax, epochs, [c[1] for c in curves], run["legend"])
        _log_scale(ax, "y")
        ax.set_xlabel("epoch")
        ax.set_ylabel("training loss")
        if group:
            ax.set_title(group, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    return fig


def _bars(plt, figure: FigureResults):
    metric = figure.spec["metric"]
    labels, means, stds = [], [], []
    for run in figure.runs:
        summary = Summary.of(figure.values(run["label"], metric))
        if summary.n:
            labels.append(run["legend"])
            means.append(summary.mean)
            stds.append(summary.std)
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.bar(range(len(labels)), means, yerr=stds, color="tab:blue", alpha=0.8)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(metric_name(metric))
    ax.grid(alpha=0.3, axis="y")
    return fig


def _sweep(plt, figure: FigureResults):
    metric = figure.spec["metric"]
    series: dict[str, list[tuple[float, Summary]]] = {}
    for run in figure.runs:
        summary = Summary.of(figure.values(run["label"], metric))
        if summary.n:
            series.setdefault(run["series"], []).append((run["x"], summary))
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, points in series.items():
        points.sort(key=lambda p: p[0])
        xs = [x for x, _ in points]
        ys = [s.mean if math.isfinite(s.mean) else np.nan for _, s in points]
        errors = [s.std if math.isfinite(s.mean) else 0 for _, s in points]
        ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=name)
    ax.set_xscale("log")
    _log_scale(ax, "y")
    ax.set_xlabel("damping λ")
    ax.set_ylabel(metric_name(metric) + " (best lr per λ)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return fig


def _log_scale(ax, axis: str) -> None:
    """Log scale on ``axis`` if the plotted data has a finite positive value, else linear.

    A panel whose every run diverged (or has no point yet) has nothing a log axis can show,
    and matplotlib refuses to lay it out.
    """
    data = [
        np.asarray(line.get_ydata() if axis == "y" else line.get_xdata(), dtype=float)
        for line in ax.get_lines()
    ]
    if any(np.any(np.isfinite(d) & (d > 0)) for d in data):
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")


def _smooth(values: np.ndarray, width: int) -> np.ndarray:
    if len(values) < width or width < 2:
        return values
    kernel = np.ones(width) / width
    return np.convolve(values, kernel, mode="valid")


def _trajectory(plt, figure: FigureResults):
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for run in figure.runs:
        for instrument in run.get("instruments", []):
            results = figure.results[run["label"]]
            if not results:
                continue
            metrics = [r["metrics"][instrument] for r in results if instrument in r["metrics"]]
            if not metrics:
                continue
            steps = np.array(metrics[0]["step"])
            keys = ["network_d9"] if instrument == "kfac-foof-cosine" else ["kfac", "foof"]
            for key in keys:
                if any(key not in m for m in metrics):
                    continue  # results of an older instrument version
                length = min(len(m[key]) for m in metrics)
                series = np.array(
                    [[np.nan if v is None else v for v in m[key][:length]] for m in metrics]
                )
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    mean = np.nanmean(series, axis=0)
                width = max(1, length // 50)
                smooth = _smooth(mean, width)
                legend = (
                    run["legend"]
                    if key == "network_d9"
                    else {
                        "kfac": "KFAC's update",
                        "foof": "without 2nd factor, norm-matched (FOOF)",
                    }[key]
                )
                ax.plot(
                    steps[: len(smooth)] + (width - 1) / 2 * _spacing(steps), smooth, label=legend
                )
    ylabel = {
        "kfac-foof-cosine": "cosine(KFAC, FOOF·λ_A/λ) in FOOF's metric",
        "second-factor-progress": "relative loss decrease on mini-batch",
    }
    instruments = {i for run in figure.runs for i in run.get("instruments", [])}
    ax.set_ylabel(" / ".join(ylabel[i] for i in sorted(instruments)))
    ax.set_xlabel("step of KFAC's trajectory")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _spacing(steps: np.ndarray) -> float:
    return float(steps[1] - steps[0]) if len(steps) > 1 else 1.0


def _toy(plt, figure: FigureResults):
    results = figure.results["toy"]
    values = results[0]["values"]
    fig, ax = plt.subplots(figsize=(5, 4.2))
    w1 = np.linspace(-2.5, 3.0, 200)
    ax.plot(w1, 1 - 3 * w1, color="tab:gray", label="zero loss on x₁=(3,1), y₁=1")
    ax.axvline(-1, color="tab:olive", label="zero loss on x₂=(1,0), y₂=−1")
    sgd = np.array([values["sgd_direction_0"], values["sgd_direction_1"]])
    ax.annotate(
        "",
        xy=sgd / np.linalg.norm(sgd) * 1.5,
        xytext=(0, 0),
        arrowprops={"arrowstyle": "->", "color": "tab:red", "lw": 2},
    )
    ax.plot([], [], color="tab:red", label="SGD direction (2, 1)")
    foof = (values["foof_weight_0"], values["foof_weight_1"])
    ax.annotate(
        "", xy=foof, xytext=(0, 0), arrowprops={"arrowstyle": "->", "color": "tab:blue", "lw": 2}
    )
    ax.plot(*foof, "o", color="tab:blue", label=f"one FOOF step → ({foof[0]:.3g}, {foof[1]:.3g})")
    ax.set_xlim(-2.5, 3)
    ax.set_ylim(-1.5, 5)
    ax.set_xlabel("w₁")
    ax.set_ylabel("w₂")
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
    return fig


def _laplace(plt, figure: FigureResults):
    metrics = ("value:test_nll", "value:test_accuracy", "value:test_ece")
    fig, axes = plt.subplots(1, len(metrics), figsize=(12, 3.8))
    for ax, metric in zip(axes, metrics):
        labels, means, stds = [], [], []
        for run in figure.runs:
            summary = Summary.of(figure.values(run["label"], metric))
            if summary.n:
                labels.append(run["legend"].split(" (")[0])
                means.append(summary.mean)
                stds.append(summary.std)
        ax.bar(range(len(labels)), means, yerr=stds, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
        ax.set_title(metric_name(metric), fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        if metric != "value:test_accuracy" and means:
            ax.set_ylim(0, max(m + s for m, s in zip(means, stds)) * 1.15)
        elif means:
            low = min(m - s for m, s in zip(means, stds))
            ax.set_ylim(max(0.0, low - 0.05), min(1.0, max(means) + 0.05))
    return fig
