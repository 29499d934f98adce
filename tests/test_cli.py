"""foof.cli: the ``foof`` command, run in-process (and once as ``python -m foof``)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

import foof.cli
import foof.data
import foof.data.mnist
from foof.cli import build_parser, main
from foof.models import MODELS
from foof.optim.registry import OPTIMIZERS

SUMMARY = re.compile(
    r"^foof: final train loss \d+\.\d{4} \| test acc [01]\.\d{4} \| \d+\.\d s \| results -> (.+)$"
)


@pytest.fixture(autouse=True)
def no_download(tmp_path, monkeypatch):
    """The CLI loads with download=True; in tests a missing dataset must fail, not fetch."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def refuse(name, cache_dir=None):
        raise foof.data.DataError(f"refusing to download {name} in tests")

    monkeypatch.setattr(foof.data.mnist, "download_dataset", refuse)
    monkeypatch.setattr(foof.cli, "download_dataset", refuse)


def tiny_args(data_dir, *extra):
    return [
        "train",
        "--model",
        "logistic",
        "--dataset",
        "mnist",
        "--subset",
        "200",
        "--epochs",
        "1",
        "--lr",
        "0.01",
        "--data-dir",
        str(data_dir),
        "--no-progress",
        *extra,
    ]


def test_train_writes_results_and_prints_one_summary_line(data_dir, tmp_path, capsys):
    out = tmp_path / "sub" / "run.json"
    assert main(tiny_args(data_dir, "--out", str(out), "--seed", "3")) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    match = SUMMARY.match(lines[0])
    assert match, lines[0]
    assert match.group(1) == str(out)
    results = json.loads(out.read_text())
    assert results["complete"] and results["config"]["seed"] == 3
    assert results["config"]["lr"] == 0.01 and results["config"]["momentum"] == 0.9
    assert results["config"]["subset"] == 200 and len(results["steps"]["loss"]) == 2


def test_default_output_path_and_options(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = tiny_args(
        data_dir,
        "--model",
        "mlp",
        "--model-option",
        "hidden=[8]",
        "--optimizer",
        "adam",
        "--batch-size",
        "0",
    )
    assert main(args) == 0
    path = tmp_path / "runs" / "adam-mlp-mnist-seed0.json"
    results = json.loads(path.read_text())
    assert results["config"]["model_options"] == {"hidden": [8]}
    assert results["config"]["batch_size"] is None and len(results["steps"]["loss"]) == 1
    assert "results -> runs/adam-mlp-mnist-seed0.json" in capsys.readouterr().out


def test_autoencoder_summary_reports_test_loss(data_dir, tmp_path, capsys):
    args = tiny_args(data_dir, "--model", "autoencoder", "--model-option", "encoder=[4]")
    assert main([*args, "--out", str(tmp_path / "ae.json"), "--lr", "1e-4"]) == 0
    assert "| test loss " in capsys.readouterr().out


def test_choices_come_from_the_registries():
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    choices = {a.dest: tuple(a.choices) for a in train._actions if a.choices}
    assert choices["optimizer"] == tuple(OPTIMIZERS)
    assert choices["model"] == tuple(MODELS)


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--optimizer", "lbfgs"], "invalid choice: 'lbfgs'"),
        (["train", "--epochs", "-1"], "must be >= 0"),
        (["train", "--subset", "many"], "expected an integer"),
        (["train", "--optimizer-option", "novalue"], "expected KEY=VALUE"),
        (["data"], "required"),
    ],
)
def test_bad_arguments_exit_2_with_argparse_message(args, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_data_is_a_clean_error(tmp_path, capsys):
    (tmp_path / "nothing").mkdir()  # a directory without the data (a missing one: see below)
    args = tiny_args(tmp_path / "nothing", "--out", str(tmp_path / "r.json"))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("foof: error: refusing to download mnist")
    assert not (tmp_path / "r.json").exists()


def test_corrupt_data_is_a_clean_error(tmp_path, capsys):
    (tmp_path / "mnist.npz").write_bytes(b"garbage")
    assert main(tiny_args(tmp_path, "--out", str(tmp_path / "r.json"))) == 2
    err = capsys.readouterr().err
    assert err.startswith("foof: error: cannot read") and str(tmp_path / "mnist.npz") in err


def test_unwritable_output_fails_before_training(data_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(tiny_args(data_dir, "--out", str(blocker / "r.json"))) == 2
    assert "foof: error: cannot write results to" in capsys.readouterr().err
    assert main(tiny_args(data_dir, "--out", str(tmp_path))) == 2
    assert "is a directory" in capsys.readouterr().err


def test_hyperparameter_the_optimizer_rejects_is_a_clean_error(data_dir, tmp_path, capsys):
    args = tiny_args(data_dir, "--ema-decay", "0.9", "--out", str(tmp_path / "r.json"))
    assert main(args) == 2
    assert "foof: error: optimizer 'sgd' rejects" in capsys.readouterr().err


def test_data_info_lists_sources_and_caveats(data_dir, capsys):
    assert main(["data", "info", "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert str(data_dir / "fashion-mnist.npz") in out and str(data_dir / "mnist-10k.npz") in out
    assert "caveats:" in out


def test_data_download_skips_files_already_in_the_cache(tmp_path, capsys):
    cache = tmp_path / "c"
    cache.mkdir()
    for name in ("fashion-mnist.npz", "mnist-10k.npz"):
        np.savez(cache / name, x=np.zeros(1))
    assert main(["data", "download", "--cache-dir", str(cache)]) == 0
    assert capsys.readouterr().out.count("already in") == 2
    assert (
        main(["data", "download", "--dataset", "mnist", "--cache-dir", str(cache), "--force"]) == 2
    )
    assert "refusing to download mnist" in capsys.readouterr().err


def test_python_dash_m_foof():
    result = subprocess.run(
        [sys.executable, "-m", "foof", "train", "--model", "vgg"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "invalid choice: 'vgg'" in result.stderr


def test_curvature_flags_reach_the_optimizer(tmp_path, monkeypatch, data_dir, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "kfac.json"
    args = [
        "train",
        "--optimizer",
        "kfac",
        "--dataset",
        "fashion-mnist",
        "--model",
        "logistic",
        "--subset",
        "100",
        "--epochs",
        "1",
        "--batch-size",
        "50",
        "--data-dir",
        str(data_dir),
        "--fisher",
        "full",
        "--damping-mode",
        "standard",
        "--inv-warmup",
        "5",
        "--no-second-factor",
        "--out",
        str(out),
        "--no-progress",
    ]
    # standard damping with second_factor=False is refused by KFAC itself, as a usage error
    assert main(args) == 2
    assert "second_factor=False is defined for heuristic damping only" in capsys.readouterr().err
    args.remove("--no-second-factor")
    assert main(args) == 0
    options = json.loads(out.read_text())["config"]["optimizer_options"]
    assert options["fisher"] == "full" and options["damping_mode"] == "standard"
    assert options["inv_warmup"] == 5


def test_flag_for_another_optimizer_is_a_usage_error(tmp_path, capsys):
    code = main(
        ["train", "--optimizer", "foof", "--block-diagonal", "--out", str(tmp_path / "x.json")]
    )
    assert code == 2
    assert "--block-diagonal applies to --optimizer natural" in capsys.readouterr().err
    code = main(
        ["train", "--optimizer", "sgd", "--inv-warmup", "3", "--out", str(tmp_path / "x.json")]
    )
    assert code == 2
    assert "--inv-warmup applies to --optimizer foof or kfac" in capsys.readouterr().err


def test_app_d6_training_details_are_train_flags(data_dir, tmp_path, capsys):
    out = tmp_path / "run.json"
    args = ["--augment", "--momentum-delay", "1", "--polyak-decay", "0.9", "--out", str(out)]
    assert main(tiny_args(data_dir, *args)) == 0
    config = json.loads(out.read_text())["config"]
    assert config["augment"] is True and config["momentum_delay"] == 1
    assert config["polyak_decay"] == 0.9
    assert main(tiny_args(data_dir, "--polyak-decay", "1.5", "--out", str(out))) == 2
    assert "polyak_decay" in capsys.readouterr().err


def test_a_missing_data_directory_is_an_error_not_a_fallback_to_the_cache(
    data_dir, tmp_path, monkeypatch, capsys
):
    cache = tmp_path / "cache" / "foof"  # the data is in the cache (see no_download)
    cache.mkdir(parents=True)
    (cache / "mnist-10k.npz").symlink_to(data_dir / "mnist-10k.npz")
    monkeypatch.delenv("FOOF_DATA", raising=False)
    out = tmp_path / "r.json"
    assert main(tiny_args(tmp_path / "nonexistent", "--out", str(out))) == 2
    err = capsys.readouterr().err
    assert err.startswith("foof: error: data directory") and "does not exist" in err
    assert not out.exists()
    assert main(["data", "info", "--data-dir", str(tmp_path / "nonexistent")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_subset_larger_than_the_data_exits_2_with_one_line(data_dir, tmp_path, capsys):
    args = tiny_args(data_dir, "--subset", "10000000", "--out", str(tmp_path / "r.json"))
    assert main(args) == 2
    err = capsys.readouterr().err
    one_line = r"foof: error: subset=10000000 exceeds the \d+ training images of mnist\n"
    assert re.fullmatch(one_line, err)


@pytest.mark.parametrize(
    ("optimizer", "flag"), [("sgd", "--damping"), ("adam", "--damping"), ("adam", "--momentum")]
)
def test_an_option_that_does_not_apply_warns(data_dir, tmp_path, capsys, optimizer, flag):
    args = tiny_args(data_dir, "--optimizer", optimizer, flag, "0.5")
    assert main([*args, "--out", str(tmp_path / "r.json")]) == 0
    err = capsys.readouterr().err
    assert f"foof: warning: {flag} does not apply to --optimizer {optimizer}; ignored" in err


def test_a_diverged_run_exits_3_unless_allowed(data_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    args = tiny_args(data_dir, "--lr", "1e30", "--out", str(out))
    assert main(args) == 3
    captured = capsys.readouterr()
    assert "diverged at step" in captured.out  # the summary still says what happened
    assert "foof: error: the run diverged at step" in captured.err
    assert "--allow-divergence" in captured.err
    assert json.loads(out.read_text())["diverged"] is True  # and the results are kept
    assert main([*args, "--allow-divergence"]) == 0
    assert "error" not in capsys.readouterr().err


def test_fallback_flags_reach_the_optimizer_options(data_dir, tmp_path):
    out = tmp_path / "fallback.json"
    args = tiny_args(data_dir, "--optimizer", "foof", "--damping", "1.0", "--init-batches", "0")
    flags = ["--fallback", "adamw", "--fallback-lr", "1e-4", "--fallback-weight-decay", "0"]
    assert main([*args, *flags, "--out", str(out)]) == 0
    options = json.loads(out.read_text())["config"]["optimizer_options"]
    assert options["fallback"] == "adamw"
    assert options["fallback_options"] == {"lr": 1e-4, "weight_decay": 0.0}
    assert main([*args, "--fallback-lr", "1e-4", "--out", str(out)]) == 2
