"""foof.benchmarks: a seconds-long smoke of the harness (tiny models, 3 steps per method).

Benchmarks are not tests: nothing here asserts a timing, only the structure of the results.
"""

from __future__ import annotations

import json

import pytest

from foof.benchmarks import BenchConfig, TargetConfig, Workload, run_benchmark
from foof.benchmarks.command import config_from_args
from foof.benchmarks.methods import BASELINE, asdl_kfac, cnn_methods, mlp_methods
from foof.benchmarks.runner import PROFILED
from foof.benchmarks.timing import planned_steps, time_workload
from foof.cli import build_parser, main

TINY_MLP = {"input_dim": 20, "hidden": (8,)}


def tiny_workloads() -> tuple[Workload, ...]:
    # The CNN's methods on a tiny MLP: the real CNN's 3137-wide factor takes seconds to invert.
    return (
        Workload("mlp-b100", "tiny MLP", "mlp", 8, mlp_methods(), TINY_MLP, input_shape=(20,)),
        Workload("cnn-b100", "tiny MLP, CNN methods", "mlp", 8, cnn_methods(), TINY_MLP, (20,)),
    )


@pytest.fixture(scope="module")
def results(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("bench")
    config = BenchConfig(
        workloads=tiny_workloads(),
        steps=3,
        warmup=1,
        chunk=2,
        whole_periods=False,
        min_steps=3,
        profile_steps=1,
        target=TargetConfig(
            subset=100, epochs=1, batch_size=50, data_dir=str(data_dir), model_options=TINY_MLP
        ),
        mode="test",
        threads=1,  # tiny ops; on a busy machine a second thread only waits
    )
    return run_benchmark(config, out), out


def test_writes_json_and_markdown(results):
    data, out = results
    assert json.loads((out / "cpu.json").read_text()) == data
    markdown = (out / "cpu.md").read_text()
    for heading in ("## Targets of issue 5", "## Per-step time", "## Time to target", "## Where"):
        assert heading in markdown
    for entry in data["workloads"]:
        assert f"### {entry['title']}" in markdown
        for row in entry["methods"]:
            assert row["label"] in markdown


def test_every_method_has_a_row_with_ratios_to_the_baseline(results):
    data, _ = results
    for entry, workload in zip(data["workloads"], tiny_workloads()):
        assert [row["key"] for row in entry["methods"]] == [m.key for m in workload.methods]
        baseline = entry["methods"][0]
        assert baseline["key"] == BASELINE and baseline["ratio_median"] == 1.0
        for row in entry["methods"]:
            if row["peer"] is not None and row["status"] != "ok":
                assert row["status"] in ("not installed", "not applicable")
                continue
            assert row["status"] == "ok", row["note"]
            assert row["steps"] >= 3
            assert row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
            assert row["ratio_mean"] > 0 and row["state_bytes"] >= 0


def test_machine_notes_targets_profiles_and_time_to_target(results):
    data, _ = results
    machine = data["machine"]
    assert {"cpu", "cores", "threads", "torch", "peers"} <= set(machine)
    assert len(data["targets"]) == 10
    assert all(t["met"] in (True, False, None) for t in data["targets"])
    assert [p["method"] for p in data["profiles"]["methods"]] == list(PROFILED)
    assert all(p["ops"] and p["python"] for p in data["profiles"]["methods"])
    section = data["time_to_target"]
    assert section["target_loss"] is not None
    assert section["reference"]["seconds_to_target"] is not None
    assert [r["method"] for r in section["runs"]][:2] == ["sgd", "foof-1"]


def test_foof_state_is_its_factor_and_inverse(results):
    data, _ = results
    entry = data["workloads"][0]
    foof = next(row for row in entry["methods"] if row["key"] == "foof-1")
    assert foof["state_bytes"] == 2 * 4 * entry["sum_in_dim_squared"]


def test_amortised_methods_are_timed_over_whole_periods():
    (method,) = [m for m in mlp_methods(peers=False) if m.key == "foof-100-s10"]
    assert planned_steps(method, 30, whole_periods=True) == 100
    assert planned_steps(method, 150, whole_periods=True) == 200
    assert planned_steps(method, 30, whole_periods=False) == 30


def test_a_missing_peer_is_reported_not_raised(monkeypatch):
    import foof.benchmarks.methods as methods

    def missing(module, package):
        raise methods.PeerUnavailableError(f"not installed (pip install {package})")

    monkeypatch.setattr(methods, "import_peer", missing)
    workload = Workload(
        "w", "tiny", "mlp", 4, (mlp_methods(peers=False)[0], asdl_kfac(1)), TINY_MLP, (20,)
    )
    baseline, peer = time_workload(workload, steps=2, warmup=0, chunk=1)
    assert baseline.status == "ok" and len(baseline.times) == 2
    assert peer.status == "not installed" and "asdfghjkl" in peer.note


def test_state_bytes_counts_optimizer_state_not_parameters():
    workload = tiny_workloads()[0]
    (method,) = [m for m in workload.methods if m.key == "adam"]
    runs = time_workload(Workload("w", "t", "mlp", 4, (method,), TINY_MLP, (20,)), 1, 0, 1)
    params = 20 * 8 + 8 * 10
    assert runs[0].state_bytes >= 2 * 4 * params  # exp_avg and exp_avg_sq
    assert runs[0].state_bytes < 3 * 4 * params + 1024


def test_cli_builds_the_config():
    args = build_parser().parse_args(
        ["bench", "--quick", "--steps", "7", "--workloads", "mlp-b100,cnn-b100", "--no-target"]
    )
    config = config_from_args(args)
    assert config.steps == 7 and config.target is None and config.mode == "quick"
    assert [w.key for w in config.workloads] == ["mlp-b100", "cnn-b100"]
    assert callable(args.handler)


def test_from_json_re_renders_the_same_report(results, tmp_path):
    _, out = results
    assert main(["bench", "--from-json", str(out / "cpu.json"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "cpu.md").read_text() == (out / "cpu.md").read_text()


def test_endurance_benchmark_smoke(tmp_path, data_dir):
    from foof.benchmarks.endurance import EnduranceConfig, run_endurance

    config = EnduranceConfig(
        steps=12, warmup=4, sample_every=4, hidden=(8,), optimizers=10, data_dir=str(data_dir)
    )
    results = run_endurance(config, tmp_path, log=lambda message: None)
    assert set(results["training"]) == {"sgd", "foof", "kfac", "natural"}
    for method, summary in results["training"].items():
        assert [s["step"] for s in summary["samples"]] == [1, 4, 8, 12]
        assert summary["hooks"] == ([0] if method == "sgd" else [2])  # one per Linear layer
        assert summary["tensors_after_warmup"] == summary["tensors_final"]
    for summary in results["churn"].values():
        assert summary["hooks_after"] == 0  # dropped optimizers took their hooks with them
    text = (tmp_path / "memory-cpu.md").read_text()
    assert "| foof | 12 |" in text and "hooks left on the model" in text
