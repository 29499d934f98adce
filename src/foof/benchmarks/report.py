"""The benchmark's results as Markdown, and the verdict on each speed target of issue 5."""

from __future__ import annotations

from typing import Any

from foof.benchmarks.methods import FUSED_SUFFIX


def find(results: dict[str, Any], workload: str, method: str) -> dict[str, Any] | None:
    """The row of ``method`` on ``workload`` in ``results`` (``None`` if absent or not run)."""
    for entry in results.get("workloads", []):
        if entry["key"] != workload:
            continue
        for row in entry["methods"]:
            if row["key"] == method and row["status"] == "ok" and row["ratio_mean"] is not None:
                return row
    return None


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each issue-5 target with the measured value and whether it is met.

    Per-step targets are judged on the amortised ratio (mean step time over SGD+momentum's mean
    in the same run); the median ratio is shown next to it. A target whose methods were not
    measured has ``met = None``.
    """
    targets = []

    def ratio_target(text: str, workload: str, method: str, limit: float) -> None:
        # the method as it is and, where measured, with fused_backward=True: met if either is
        parts, verdicts = [], []
        for key in (method, method + FUSED_SUFFIX[0]):
            row = find(results, workload, key)
            if row is None:
                continue
            value = row["ratio_mean"]
            parts.append(f"{key}: mean {value:.2f}x (median {row['ratio_median']:.2f}x)")
            verdicts.append(value <= limit)
        if not parts:
            targets.append(_target(text, None, "not measured"))
            return
        detail = "; ".join(parts) + f"; limit {limit:g}x"
        targets.append(_target(text, any(verdicts), detail))

    def speedup_target(
        text: str, workload: str, pairs: list[tuple[str, str]], factor: float, fused: bool = False
    ) -> None:
        # met if every pair meets it, either all plain or (``fused``) all with fused_backward
        settings = [pairs]
        if fused:
            settings.append([(a + FUSED_SUFFIX[0], b + FUSED_SUFFIX[0]) for a, b in pairs])
        parts, met_by_setting = [], []
        for setting in settings:
            verdicts = []
            for slow, fast in setting:
                slow_row, fast_row = find(results, workload, slow), find(results, workload, fast)
                if slow_row is None or fast_row is None:
                    missing = slow if slow_row is None else fast
                    parts.append(f"{fast} vs {slow}: {missing} not measured")
                    verdicts.append(None)
                    continue
                speedup = slow_row["mean_ms"] / fast_row["mean_ms"]
                parts.append(f"{fast} {speedup:.2f}x faster than {slow}")
                verdicts.append(speedup >= factor)
            met_by_setting.append(None if None in verdicts else all(verdicts))
        met = True if True in met_by_setting else (None if None in met_by_setting else False)
        targets.append(_target(text, met, "; ".join(parts) + f" (need >= {factor:g}x)"))

    ratio_target(
        "FOOF inv_every=100, stats_steps=10 <= 1.5x SGD (MLP, B=100)",
        "mlp-b100",
        "foof-100-s10",
        1.5,
    )
    ratio_target("FOOF inv_every=1 <= 4x SGD (MLP, B=100)", "mlp-b100", "foof-1", 4.0)
    ratio_target(
        "KFAC (heuristic) inv_every=100 <= 3x SGD (MLP, B=100)",
        "mlp-b100",
        "kfac-heuristic-100",
        3.0,
    )
    speedup_target(
        "FOOF >= 1.5x faster than our KFAC at equal settings (MLP, B=100)",
        "mlp-b100",
        [("kfac-heuristic-1", "foof-1"), ("kfac-heuristic-100", "foof-100")],
        1.5,
        fused=True,
    )
    speedup_target(
        "our KFAC >= 2x faster than ASDL's KFAC at equal settings (MLP, B=100)",
        "mlp-b100",
        [("asdl-kfac-1", "kfac-heuristic-1"), ("asdl-kfac-100", "kfac-heuristic-100")],
        2.0,
    )
    ratio_target("NaturalGradient MC <= 1.6x SGD (MLP, B=100)", "mlp-b100", "natural-mc", 1.6)
    ratio_target(
        "small CNN, FOOF inv_every=500, stats_steps=10 <= 1.10x SGD",
        "cnn-b100",
        "foof-500-s10",
        1.10,
    )
    ratio_target(
        "small CNN, KFAC inv_every=500, stats_steps=10 <= 1.15x SGD",
        "cnn-b100",
        "kfac-heuristic-500-s10",
        1.15,
    )
    targets.append(_time_to_target_verdict(results.get("time_to_target")))
    targets.append(_memory_verdict(results))
    return targets


def _target(text: str, met: bool | None, detail: str) -> dict[str, Any]:
    return {"target": text, "met": met, "detail": detail}


def _time_to_target_verdict(section: dict[str, Any] | None) -> dict[str, Any]:
    text = "FOOF reaches Adam's 10-epoch training loss in <= 1/3 of Adam's time (Fashion-MNIST)"
    if not section or section.get("skipped") or section.get("target_loss") is None:
        reason = (section or {}).get("skipped", "not measured")
        return _target(text, None, reason)
    foof_runs = [r for r in section["runs"] if r["method"].startswith("foof")]
    parts, best = [], None
    for run in foof_runs:
        ratio = run.get("time_ratio")
        if run["diverged"]:
            parts.append(f"{run['method']}: diverged at step {run['steps']}")
            continue
        if ratio is None:
            loss = run["window_loss"]
            parts.append(
                f"{run['method']}: not reached in {run['seconds']:.0f} s (Adam's time; "
                f"loss {_fmt(loss, 3)} after {run['steps']} steps)"
            )
            continue
        parts.append(f"{run['method']}: {ratio:.2f}x Adam's time")
        best = ratio if best is None else min(best, ratio)
    scope = f"{section['epochs']} epochs"
    subset = section["dataset"].get("num_train")
    if subset:
        scope += f" on {subset} images"
    detail = "; ".join(parts) + f" ({scope})"
    if not foof_runs:
        return _target(text, None, "no FOOF run")
    return _target(text, best is not None and best <= 1 / 3, detail)


def _memory_verdict(results: dict[str, Any]) -> dict[str, Any]:
    text = "FOOF's extra memory is its factors and inverses only (2 x sum n_in^2 floats)"
    row = find(results, "mlp-b100", "foof-1")
    entry = next((w for w in results.get("workloads", []) if w["key"] == "mlp-b100"), None)
    if row is None or entry is None or row.get("state_bytes") is None:
        return _target(text, None, "not measured")
    floats = entry["sum_in_dim_squared"]
    expected = 2 * floats * 4
    measured = row["state_bytes"]
    detail = (
        f"state {measured / 2**20:.1f} MiB = {measured / (4 * floats):.2f} x sum n_in^2 floats "
        f"(factor + inverse: {expected / 2**20:.1f} MiB)"
    )
    return _target(text, measured <= expected * 1.01, detail)


# -- Markdown ------------------------------------------------------------------------------


def to_markdown(results: dict[str, Any]) -> str:
    """The whole report: machine notes, one table per workload, time to target, targets.

    A ``summary`` string in ``results`` (Markdown, e.g. added by hand to a committed run and
    re-rendered with ``foof bench --from-json``) is shown first.
    """
    lines = [f"# foof benchmark ({results['settings']['device']})", ""]
    if results.get("summary"):
        # a hand-written reading of the run, kept in the JSON so that re-rendering keeps it
        lines += ["## Summary", "", results["summary"].strip(), "", "## Run", ""]
    lines += _machine_notes(results)
    lines += ["", "## Targets of issue 5", ""]
    lines += _table(
        ["target", "met", "measured"],
        [[t["target"], _verdict(t["met"]), t["detail"]] for t in results.get("targets", [])],
    )
    lines += ["", "## Per-step time, as a ratio to SGD+momentum in the same run", ""]
    lines += [
        "Ratios: median/median, mean/mean (the amortised cost: whole periods of `inv_every` "
        "steps), and p10, p90 of the method's step time over SGD+momentum's median. "
        "`state` is the memory the method keeps between steps beyond the model and its "
        "gradients (factors, inverses, momentum, stored Fisher batches); `peak` is the memory "
        "growth during the first two steps of a fresh copy (RSS on CPU). ms are milliseconds "
        "per step.",
        "",
    ]
    for entry in results.get("workloads", []):
        lines += [f"### {entry['title']}", ""]
        lines += _table(
            [
                "method",
                "median",
                "mean",
                "p10-p90",
                "median ms",
                "mean ms",
                "steps",
                "state MiB",
                "peak MiB",
                "note",
            ],
            [_method_row(row) for row in entry["methods"]],
        )
        lines.append("")
    lines += _target_section(results.get("time_to_target"))
    lines += _profile_section(results.get("profiles"))
    return "\n".join(lines).rstrip() + "\n"


def _machine_notes(results: dict[str, Any]) -> list[str]:
    machine, settings = results["machine"], results["settings"]
    load = machine.get("loadavg_start"), machine.get("loadavg_end")
    git = machine.get("git") or {}
    dirty = git.get("modified") or []
    peers = ", ".join(
        f"{name} {version}" if version else f"{name}: not installed"
        for name, version in machine.get("peers", {}).items()
    )
    threads = settings.get("threads") or machine["threads"]
    notes = [
        f"- Run: {results['created']}, mode `{results['mode']}`, "
        f"{results.get('total_seconds', 0):.0f} s in all.",
        f"- Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, "
        f"torch {machine['torch']} with {_count(threads, 'thread')}, Python "
        f"{machine['python']}, {machine['platform']}"
        + (f", GPU {machine['gpu']}" if machine.get("gpu") else "")
        + ".",
        f"- Load average (1 min) at start / end: {_fmt(load[0])} / {_fmt(load[1])}"
        + (
            " — other jobs shared the CPU, so absolute times are noisy; the ratios are "
            "measured under the same load (interleaved)."
            if max((x or 0) for x in load) > 0.5 * (machine.get("cores") or 1)
            else "."
        ),
        f"- Code: commit {git.get('commit', '?')}"
        + (f", with uncommitted changes in {', '.join(dirty)}" if dirty else "")
        + ".",
        f"- Peers: {peers or 'none'}.",
        f"- Settings: {settings['steps']} measured steps per method (rounded up to whole "
        f"periods: {settings['whole_periods']}), {settings['warmup']} warm-up steps excluded, "
        f"{settings['chunk']} steps per method per round, methods with period 1 stop after "
        f"{settings['budget_s']:g} s measured (at least {settings['min_steps']} steps); fixed "
        "random data (8 batches, cycled); hyperparameters of `foof.train` (the paper's "
        "Fashion-MNIST values) with learning rates x "
        f"{_lr_scales(results)} (no method diverges on random data; a step's cost does not "
        "depend on the learning rate).",
    ]
    return notes


def _lr_scales(results: dict[str, Any]) -> str:
    scales = sorted({w.get("lr_scale", 1.0) for w in results.get("workloads", [])})
    return "/".join(f"{s:g}" for s in scales) or "1"


def _method_row(row: dict[str, Any]) -> list[str]:
    if row["status"] != "ok" or row["ratio_mean"] is None:
        note = row["status"] if not row["note"] else f"{row['status']}: {row['note']}"
        return [row["label"], "", "", "", "", "", "", "", "", note[:160]]
    notes = []
    if row["steps"] < row["planned_steps"]:
        notes.append(f"stopped after {row['steps']} of {row['planned_steps']} steps (budget)")
    if row["final_loss"] is None:
        notes.append("loss not finite")
    if row["note"]:
        notes.append(row["note"])
    return [
        row["label"],
        f"{row['ratio_median']:.2f}",
        f"{row['ratio_mean']:.2f}",
        f"{row['ratio_p10']:.2f}-{row['ratio_p90']:.2f}",
        f"{row['median_ms']:.1f}",
        f"{row['mean_ms']:.1f}",
        str(row["steps"]),
        _mib(row.get("state_bytes")),
        _mib(row.get("peak_step_bytes")),
        "; ".join(notes),
    ]


def _target_section(section: dict[str, Any] | None) -> list[str]:
    lines = ["## Time to target training loss", ""]
    if not section or section.get("skipped"):
        reason = (section or {}).get("skipped", "not run")
        return lines + [f"Skipped: {reason}.", ""]
    dataset = section["dataset"]
    ref = section["reference"]
    target = section["target_loss"]
    lines += [
        f"{dataset['name']}, {dataset['num_train']} training images, paper's MLP, batch "
        f"{section['batch_size']}. Target: {ref['label']}'s training loss after "
        f"{section['epochs']} epochs (mean step loss over its last epoch) = "
        f"{_fmt(target, 4)}. A method's training loss is the mean of its step losses over the "
        "last epoch's worth of steps; time is the sum of its own step times. Methods run one "
        f"after another, each capped at {section['time_cap']:g}x the reference's time.",
        "",
    ]
    rows = []
    for run in [ref, *section["runs"]]:
        reached = run["seconds_to_target"]
        ratio = run.get("time_ratio", 1.0 if run is ref else None)
        status = "diverged" if run["diverged"] else run["status"]
        rows.append(
            [
                run["label"],
                f"{reached:.1f}" if reached is not None else f"not reached ({run['seconds']:.0f})",
                str(run["steps_to_target"] or ""),
                f"{ratio:.2f}" if ratio is not None else "",
                _fmt(run["window_loss"], 4),
                status if status != "ok" else "",
            ]
        )
    lines += _table(
        ["method", "seconds to target", "steps", "time / Adam's", "last loss", "note"], rows
    )
    return lines + [""]


def _profile_section(profiles: dict[str, Any] | None) -> list[str]:
    if not profiles:
        return []
    lines = [
        "## Where the time goes",
        "",
        f"{profiles['workload_title']}: {profiles['steps']} steps of each method after "
        f"{profiles['warmup']} warm-up steps. First the torch operators by self time (what "
        "the kernels cost), then foof's functions by cumulative time (which part of the "
        "algorithm calls them; profiler overhead inflates these).",
        "",
    ]
    if profiles.get("note"):
        lines += [profiles["note"], ""]
    for entry in profiles["methods"]:
        lines += [f"### {entry.get('label', entry['method'])}", ""]
        if "error" in entry:
            lines += [f"Not profiled: {entry['error']}", ""]
            continue
        lines += _table(
            ["torch operator", "calls/step", "self ms/step", "self %"],
            [
                [
                    f"`{op['name']}`",
                    f"{op['calls_per_step']:g}",
                    f"{op['self_ms_per_step']:.2f}",
                    f"{op['self_percent']:.1f}",
                ]
                for op in entry["ops"]
            ],
        )
        lines.append("")
        lines += _table(
            ["function", "calls/step", "cumulative ms/step", "%"],
            [
                [
                    f"`{row['function']}`",
                    f"{row['calls_per_step']:g}",
                    f"{row['cumulative_ms_per_step']:.2f}",
                    f"{row['cumulative_percent']:.1f}",
                ]
                for row in entry["python"]
            ],
        )
        lines.append("")
    return lines


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(header), line(["---"] * len(header)), *(line(r) for r in rows)]


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "**not met**", None: "not measured"}[met]


def _mib(value: int | None) -> str:
    return "" if value is None else f"{value / 2**20:.1f}"


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
