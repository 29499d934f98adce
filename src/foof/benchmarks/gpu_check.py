"""``scripts/gpu-check``: every check that needs a GPU, in one run of a few minutes, and its report.

On a machine where torch sees a CUDA device it

1. runs the test suite's CUDA-marked tests (``pytest -m cuda``: FOOF, KFAC and NaturalGradient
   steps on the GPU against float64 CPU steps, bf16 autocast, memory; see
   ``tests/test_cuda.py``), each result listed;
2. runs the 2-process NCCL data-parallel test among them where 2 GPUs exist, and says so
   where only one does;
3. times SGD, FOOF and KFAC on the paper-width Wide ResNet-18 at batch 100
   (:func:`foof.benchmarks.conv.time_wrn`, amortised with T=500, S=10) on a CIFAR-10 batch, or
   on ``fake-cifar10`` when CIFAR-10 is not found, against the paper's Fig. 5A claim (FOOF
   +10%, KFAC +15% time per update over SGD);
4. writes ``docs/benchmarks/gpu.md`` (and the raw ``gpu.json`` beside it).

Each stage has a deadline so that the whole run stays under 8 minutes on one GPU; a stage
that runs out of time is reported as such. Without a CUDA device it prints why, writes
nothing and exits 0 (``--require-gpu``: exits 1), so CI can run it anywhere.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from foof.benchmarks.conv import format_wrn, time_wrn
from foof.data import DataError, load_dataset, search_dirs
from foof.io import atomic_open

REPO = Path(__file__).resolve().parents[3]
"""The checkout holding ``tests/`` (the script runs from a source checkout)."""

PAPER_RATIOS = {"foof": 1.10, "kfac": 1.15}
"""Fig. 5A: amortised time per update relative to SGD."""

TEST_TIMEOUT = 240.0
"""Seconds the CUDA-marked tests may take."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the GPU check (module docstring); ``argv`` as on the command line.

    Returns:
        0 when every check ran and passed, or when there is no GPU (unless ``--require-gpu``);
        1 when a test failed, a stage timed out, or ``--require-gpu`` found no GPU.
    """
    parser = argparse.ArgumentParser(prog="scripts/gpu-check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "gpu.md")
    parser.add_argument("--data-root", default=None, help="directory holding CIFAR-10")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per phase")
    parser.add_argument("--require-gpu", action="store_true", help="exit 1 without a GPU")
    parser.add_argument("--no-tests", action="store_true", help="only the timing")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            f"gpu-check: skipped: torch {torch.__version__} sees no CUDA device "
            f"(built with CUDA {torch.version.cuda or 'none'}); nothing run, nothing written"
        )
        return 1 if args.require_gpu else 0
    report = gpu_report(
        "cuda", data_root=args.data_root, steps=args.steps, tests=not args.no_tests, log=print
    )
    write_report(report, args.out)
    print(f"gpu-check: wrote {args.out}")
    return 0 if report["ok"] else 1


def gpu_report(
    device: str = "cuda",
    *,
    data_root: str | None = None,
    steps: int = 10,
    tests: bool = True,
    width: int = 64,
    batch_size: int = 100,
    budget: float = 360.0,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the stages of the module docstring on ``device`` and collect their results.

    Args:
        device: ``"cuda"`` (``"cpu"`` only to test this function with a tiny network).
        data_root: searched first for CIFAR-10 (then ``$FOOF_DATA`` and the user cache).
        steps: timed steps per phase of :func:`~foof.benchmarks.conv.time_wrn`.
        tests: run the CUDA-marked tests.
        width: the WRN's width (64: the paper-scale network).
        batch_size: images per timed step ``B``.
        budget: seconds after which the remaining timing runs are skipped.
        log: called with progress lines.

    Returns:
        JSON-ready ``{"environment", "tests", "ddp", "data", "timing", "ok"}``.
    """
    start = time.monotonic()
    log = log or (lambda line: None)
    report: dict[str, Any] = {"environment": _environment(device), "ok": True}
    if tests:
        log("gpu-check: running the CUDA-marked tests ...")
        report["tests"] = run_cuda_tests()
        report["ok"] &= report["tests"]["ok"]
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    ddp = [t for t in report.get("tests", {}).get("cases", []) if "nccl" in t["name"]]
    if gpus < 2:
        report["ddp"] = f"not run: NCCL between 2 processes needs 2 GPUs, {gpus} visible"
    elif not ddp:
        report["ddp"] = "not run: the tests were skipped (--no-tests) or not collected"
    else:
        report["ddp"] = ", ".join(f"{t['name']}: {t['outcome']}" for t in ddp)
    images, labels, report["data"] = _batch(data_root, batch_size)
    report["timing"] = {}
    for low_rank in (False, True):
        key = f"low_rank={low_rank}"
        if time.monotonic() - start > budget:
            report["timing"][key] = {"skipped": f"out of time ({budget:.0f} s budget)"}
            report["ok"] = False
            continue
        log(f"gpu-check: timing the WRN-18, {key} ...")
        report["timing"][key] = time_wrn(
            width=width,
            batch_size=batch_size,
            steps=steps,
            low_rank=low_rank,
            device=device,
            inputs=(images, labels),
            log=lambda line: log(f"  {line}"),
        )
    report["seconds"] = time.monotonic() - start
    return report


def run_cuda_tests(timeout: float = TEST_TIMEOUT) -> dict[str, Any]:
    """``pytest -m cuda`` over the checkout's tests, in a subprocess, read from its JUnit XML.

    Args:
        timeout: seconds before the run is stopped and reported as timed out.

    Returns:
        ``{"ok", "summary", "cases": [{"name", "outcome", "message"}]}``; ``outcome`` is
        ``passed``, ``failed``, ``skipped`` or ``xfailed``.
    """
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "cuda.xml"
        command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", f"--junitxml={xml}"]
        try:
            result = subprocess.run(
                [*command, str(REPO / "tests")],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return {"ok": False, "summary": f"timed out after {timeout:.0f} s", "cases": []}
        lines = result.stdout.strip().splitlines()
        summary = lines[-1] if lines else result.stderr.strip()[-300:]
        cases = read_junit(xml) if xml.is_file() else []
    # pytest exits 5 when every test was deselected; no test is no pass.
    ok = result.returncode == 0 and any(c["outcome"] == "passed" for c in cases)
    return {"ok": ok, "summary": summary, "cases": cases}


def read_junit(path: str | Path) -> list[dict[str, str]]:
    """Each test case of a pytest JUnit XML file with its outcome and the first line of why."""
    cases = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped":
                outcome = "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
            else:
                continue
            # a markdown table cell: the first line, without the column separator
            message = (child.get("message") or "").split("\n")[0][:160].replace("|", "/")
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        cases.append({"name": name, "outcome": outcome, "message": message})
    return cases


def format_report(report: dict[str, Any]) -> str:
    """The markdown of ``docs/benchmarks/gpu.md`` for a :func:`gpu_report`."""
    env = report["environment"]
    lines = [
        "# GPU check",
        "",
        f"`scripts/gpu-check` ({Path(__file__).relative_to(REPO / 'src')}), "
        f"{env['date']}: {env['device']}; torch {env['torch']}, CUDA {env['cuda']}, "
        f"{env['platform']}. Total {report.get('seconds', 0.0):.0f} s.",
        "",
    ]
    tests = report.get("tests")
    lines += ["## CUDA-marked tests (`pytest -m cuda`)", ""]
    if tests is None:
        lines.append("Not run (`--no-tests`).")
    else:
        lines += [
            f"Result: {tests['summary']}",
            "",
            "| test | outcome | note |",
            "| --- | --- | --- |",
        ]
        lines += [f"| `{c['name']}` | {c['outcome']} | {c['message']} |" for c in tests["cases"]]
    lines += ["", "## Data-parallel on NCCL (2 processes)", "", report["ddp"], ""]
    lines += ["## Time per update, Wide ResNet-18 (Fig. 5A)", "", f"Data: {report['data']}.", ""]
    lines.append(
        "Paper: amortised FOOF +10% and KFAC +15% time per update over SGD (T=500, S=10). "
        "Phases timed as in [wrn-cpu.md](wrn-cpu.md)."
    )
    for key, timing in report["timing"].items():
        lines += ["", f"### FOOF/KFAC {key}", ""]
        if "skipped" in timing:
            lines.append(f"Skipped: {timing['skipped']}.")
            continue
        lines.append(format_wrn(timing).rstrip())
        ratios = ", ".join(
            f"{name.upper()} {100 * (timing['methods'][name]['ratio'] - 1):+.0f}% (paper "
            f"{100 * (paper - 1):+.0f}%)"
            for name, paper in PAPER_RATIOS.items()
        )
        lines += ["", f"Measured over SGD: {ratios}."]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: Path) -> None:
    """Write ``out`` (markdown) and the raw results beside it (same name, ``.json``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(out, "w") as handle:
        handle.write(format_report(report))
    with atomic_open(out.with_suffix(".json"), "w") as handle:
        json.dump(report, handle, indent=2)
        handle.write("\n")


def _batch(data_root: str | None, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The first ``batch_size`` CIFAR-10 training images, else fake-cifar10's, and a note."""
    try:
        data = load_dataset("cifar10", data_dir=data_root)
        note = f"the first {batch_size} CIFAR-10 training images, from {data.source}"
    except DataError as error:
        data = load_dataset("fake-cifar10")
        if str(error).startswith("dataset 'cifar10' not found"):
            dirs = ", ".join(str(d) for d in search_dirs(data_root))
            why = f"CIFAR-10 not found in {dirs}"
        else:  # a damaged file is worth seeing in the report, not only a fallback
            why = str(error).splitlines()[0]
        note = f"fake-cifar10, of CIFAR-10's shape ({why}); a step's time does not depend on it"
    return data.x_train[:batch_size], data.y_train[:batch_size], note


def _environment(device: str) -> dict[str, str]:
    if device == "cuda":
        count = torch.cuda.device_count()
        name = f"{count} x {torch.cuda.get_device_name(0)}"
    else:
        name = f"cpu ({platform.processor() or platform.machine()})"
    return {
        "device": name,
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d"),
    }


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
