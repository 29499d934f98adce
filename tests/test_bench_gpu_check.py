"""foof.benchmarks.gpu_check (scripts/gpu-check): a clean skip without a GPU, and the report.

The GPU stages themselves cannot run here; :func:`gpu_report` is exercised on the CPU with a
width-2 WRN, and the JUnit reading on a file written by a pytest run of its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from foof.benchmarks import gpu_check

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_script_skips_cleanly_without_a_gpu(tmp_path):
    out = tmp_path / "gpu.md"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    result = subprocess.run(
        [str(REPO / "scripts" / "gpu-check"), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "gpu-check: skipped: torch" in result.stdout and "sees no CUDA device" in result.stdout
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert gpu_check.main(["--out", str(out), "--require-gpu"]) == 1
    assert not out.exists()


def test_report_on_cpu_with_fake_data_names_the_data_and_the_paper(tmp_path, monkeypatch):
    monkeypatch.delenv("FOOF_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    report = gpu_check.gpu_report(
        "cpu", data_root=str(tmp_path / "none"), steps=1, tests=False, width=2, batch_size=4
    )
    assert report["ok"] and report["ddp"].startswith("not run: NCCL between 2 processes")
    assert report["data"].startswith("fake-cifar10") and "CIFAR-10 not found in" in report["data"]
    assert str(tmp_path / "none") in report["data"]
    for key in ("low_rank=False", "low_rank=True"):
        methods = report["timing"][key]["methods"]
        assert set(methods) == {"sgd", "foof", "kfac"} and methods["sgd"]["ratio"] == 1.0
    gpu_check.write_report(report, tmp_path / "gpu.md")
    text = (tmp_path / "gpu.md").read_text()
    assert "Not run (`--no-tests`)" in text and "FOOF +10%" in text and "(paper +15%)" in text
    assert (tmp_path / "gpu.json").is_file()


def test_a_stage_out_of_time_is_reported_not_run(tmp_path):
    report = gpu_check.gpu_report("cpu", steps=1, tests=False, width=2, batch_size=4, budget=-1)
    assert not report["ok"]
    assert report["timing"]["low_rank=False"] == {"skipped": "out of time (-1 s budget)"}
    assert "Skipped: out of time" in gpu_check.format_report(report)


def test_read_junit_gives_each_outcome(tmp_path):
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_ok(): pass\n"
        "def test_bad(): assert 1 == 2, 'one is not two'\n"
        "@pytest.mark.skip(reason='no gpu here')\n"
        "def test_skip(): pass\n"
        "@pytest.mark.xfail(reason='known bug', strict=True)\n"
        "def test_xfail(): raise RuntimeError\n"
    )
    xml = tmp_path / "out.xml"
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}"],
        cwd=tmp_path,
        capture_output=True,
        timeout=120,
    )
    outcomes = {c["name"].split("::")[1]: c for c in gpu_check.read_junit(xml)}
    assert {k: v["outcome"] for k, v in outcomes.items()} == {
        "test_ok": "passed",
        "test_bad": "failed",
        "test_skip": "skipped",
        "test_xfail": "xfailed",
    }
    assert "one is not two" in outcomes["test_bad"]["message"]
    assert outcomes["test_skip"]["message"] == "no gpu here"


def test_timing_uses_a_cifar10_batch_when_the_data_is_there(tmp_path):
    from tests.test_data_vision import cifar_batches, write_cifar_archive

    archive = write_cifar_archive(tmp_path, "cifar10", cifar_batches("cifar10")[0])
    report = gpu_check.gpu_report(
        "cpu", data_root=str(tmp_path), tests=False, batch_size=4, budget=-1
    )
    assert report["data"] == f"the first 4 CIFAR-10 training images, from {archive}"
