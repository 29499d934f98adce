"""``foof bench --suite lm``: the corpus loader and the quick mode end to end (no timings)."""

import gzip

import pytest

from foof.benchmarks.lm import GPT, lr_multiplier, quick_lm_config, run_lm
from foof.data.text import load_text_corpus, split_files


def write_corpus(directory, files):
    text = b"".join(f"<<<FILE f{i}.rst>>>\n".encode() + body for i, body in enumerate(files))
    with gzip.open(directory / "python-docs-3.11.txt.gz", "wb") as handle:
        handle.write(text)


def test_the_split_is_by_file_every_tenth_held_out(tmp_path):
    files = [f"file {i} body\n".encode() for i in range(21)]
    write_corpus(tmp_path, files)
    split = load_text_corpus(tmp_path)
    assert (split.train_files, split.val_files) == (18, 3)
    assert bytes(split.val.tolist()) == files[0] + files[10] + files[20]
    assert split_files(b"<<<FILE a>>>\nxy\n<<<FILE b>>>\nz") == [b"xy\n", b"z"]


def test_a_missing_corpus_says_where_it_looked_and_how_to_fix_it(tmp_path, monkeypatch):
    monkeypatch.delenv("FOOF_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="FOOF_DATA.*--data-dir"):
        load_text_corpus(tmp_path / "nowhere")


def test_schedule_warms_up_then_decays_to_the_floor():
    assert lr_multiplier(0, 100, 10) == pytest.approx(0.1)
    assert lr_multiplier(9, 100, 10) == pytest.approx(1.0)
    assert lr_multiplier(100, 100, 10) == pytest.approx(0.1)


def test_quick_mode_trains_every_method_and_writes_the_report(tmp_path):
    from foof.data.text import find_corpus

    try:
        find_corpus()
    except FileNotFoundError:
        pytest.skip("the corpus is not in FOOF_DATA")
    results = run_lm(quick_lm_config(), tmp_path)
    assert set(results["methods"]) == {"adamw", "muon", "foof", "kfac"}
    for entry in results["methods"].values():
        assert entry["final_val_loss"] < 5.6  # below uniform over bytes, log 256 = 5.55
    assert results["methods"]["adamw"]["mean_ratio"] == pytest.approx(1.0)
    assert (tmp_path / "lm-cpu.md").is_file() and (tmp_path / "lm-cpu.json").is_file()
    assert "time to AdamW's final loss" in (tmp_path / "lm-cpu.md").read_text()
    assert (
        sum(p.numel() for p in GPT(width=32, layers=2, heads=2, context=32).parameters())
        == (results["parameters"])
    )
