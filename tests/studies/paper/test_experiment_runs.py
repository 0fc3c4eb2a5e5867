"""Every experiment end to end at --scale debug through the command line, and its bad-input errors."""

import json

import pytest

from multitoken.cli import main

EXPECTED = {
    "polynomial": ("exact_match.png", {"n1", "n2", "n4", "n1-3x"}, "exact_match_by_ops"),
    "induction": (
        "induction_accuracy.png",
        {"d16-n1", "d16-n2", "d32-n1", "d32-n2", "d16-n1-s1", "d16-n2-s1", "d32-n1-s1", "d32-n2-s1"},
        "accuracy_repeated",
    ),
    "bytes": ("bytes.png", {"n1", "n8"}, "bits_per_byte"),
    "nsweep": ("nsweep.png", {"n1", "n2", "n4", "n6", "n8"}, "speculative"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_debug_run_writes_report(name, tmp_path, capsys):
    out = tmp_path / name
    assert main(["experiment", name, "--scale", "debug", "--out", str(out), "--device", "cpu"]) == 0
    plot, variants, key = EXPECTED[name]
    report = (out / "report.md").read_text()
    lines = report.splitlines()
    assert lines[0].startswith("# ") and lines[2].startswith("**Question.**")
    assert lines[4].startswith("**Answer (this run).**") and f"]({plot})" in lines[6]
    assert (out / plot).stat().st_size > 1000
    results = json.loads((out / "results.json").read_text())
    assert set(results["results"]) == variants
    assert all(key in r for r in results["results"].values())
    assert "| n" in capsys.readouterr().out or name == "induction"
    for variant in variants:
        assert (out / "runs" / variant / "checkpoints" / "latest").exists()
    if name == "polynomial":  # a second run reuses the trained models
        mtime = (out / "runs" / "n1" / "metrics.jsonl").stat().st_mtime
        assert main(["experiment", name, "--scale", "debug", "--out", str(out), "--device", "cpu"]) == 0
        assert (out / "runs" / "n1" / "metrics.jsonl").stat().st_mtime == mtime


@pytest.mark.parametrize(
    "argv, message",
    [
        (["experiment", "polynomial", "--scale", "huge"], "unknown scale 'huge'"),
        (["experiment", "polynomial", "--loss", "bytes"], "unknown loss 'bytes'"),
        (["experiment", "polynomial", "--encoding", "words"], "unknown encoding 'words'"),
        (["experiment", "polynomial", "--max-steps", "-5"], "positive count"),
        (["experiment", "polynomial", "--n-train", "-1"], "positive count"),
        (["experiment", "polynomial", "--max-steps", "abc"], "invalid int value"),
        (
            ["experiment", "induction", "--scale", "debug", "--corpus", "nowhere", "--names", "nofile"],
            "nofile",
        ),
        (["experiment", "induction", "--scale", "debug", "--corpus", "x"], "give both"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, message, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_unknown_experiment(capsys):
    assert main(["experiment", "nope"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_polynomial_budget_overrides_reach_every_model(tmp_path):
    out = tmp_path / "poly"
    argv = ["experiment", "polynomial", "--scale", "debug", "--max-steps", "4", "--n-train", "1000"]
    assert main([*argv, "--out", str(out), "--device", "cpu"]) == 0
    for variant in ("n1", "n2", "n4", "n1-3x"):
        assert json.loads((out / "runs" / variant / "train_config.json").read_text())["max_steps"] == 4
    assert len((out / "corpus" / "problems.jsonl").read_text().splitlines()) == 1000
