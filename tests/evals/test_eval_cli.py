"""`multitoken eval ...` end to end: loss, HumanEval generation and scoring, MBPP, bad input (exit 2)."""

import dataclasses
import json

import pytest
import torch

from multitoken import ModelConfig, MultiTokenLM
from multitoken.checkpoint import save_checkpoint
from multitoken.cli import main
from multitoken.evals.code_tasks import load_humaneval
from multitoken.tokenizer import byte_tokenizer

from helpers import make_dataset


def _checkpoint(run_dir, tokenizer=True, vocab_size=258):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=vocab_size, dim=32, n_layers=3, n_heads=2, n_future=2, max_seq_len=1024)
    save_checkpoint(run_dir, 1, MultiTokenLM(config), byte_tokenizer() if tokenizer else None)
    return str(run_dir)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("run"))


def _fails(argv, capsys, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_eval_commands_have_help(capsys):
    for name in ("loss", "humaneval", "mbpp", "lm-eval"):
        try:
            code = main(["eval", name, "--help"])
        except SystemExit as exit_info:
            code = exit_info.code
        assert code == 0
        assert "--checkpoint" in capsys.readouterr().out


def test_eval_loss(tmp_path, run, capsys):
    data = make_dataset(tmp_path, n_docs=12)
    out = tmp_path / "loss.json"
    args = ["eval", "loss", "--checkpoint", run, "--data", str(data), "--seq-len", "32", "--max-windows", "2"]
    assert main([*args, "--device", "cpu", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "bits/byte" in printed and "+2" in printed
    report = json.loads(out.read_text())
    assert report["windows"] == 2 and report["bits_per_byte"] > 0 and len(report["heads"]) == 2


def test_eval_loss_refuses_another_tokenizer(tmp_path, capsys):
    data = make_dataset(tmp_path, n_docs=12)
    other = _checkpoint(tmp_path / "other", vocab_size=300)
    _fails(["eval", "loss", "--checkpoint", other, "--data", str(data)], capsys, "tokenizers differ")
    _fails(["eval", "loss", "--data", str(data)], capsys, "--checkpoint is required")


def test_eval_humaneval_generates_and_scores(tmp_path, run, capsys):
    out = tmp_path / "humaneval"
    argv = ["eval", "humaneval", "--checkpoint", run, "--limit", "2", "--max-new-tokens", "16"]
    assert main([*argv, "--out", str(out), "--device", "cpu", "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "pass@1     0.0000" in printed and "tokens per forward" in printed
    assert json.loads((out / "summary.json").read_text())["n_tasks"] == 2
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in rows] == ["HumanEval/0", "HumanEval/1"]
    assert all({"completion", "passed", "result"} <= set(r) and r["passed"] is False for r in rows)


def test_eval_humaneval_scores_a_samples_file(tmp_path, capsys):
    samples = tmp_path / "canonical.jsonl"
    rows = [{"task_id": t.task_id, "completion": t.canonical_solution} for t in load_humaneval()[:3]]
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = tmp_path / "summary.json"
    assert (
        main(["eval", "humaneval", "--samples", str(samples), "--workers", "2", "--json", str(summary)]) == 0
    )
    assert "pass@1     1.0000" in capsys.readouterr().out
    assert json.loads(summary.read_text())["n_passed"] == 3
    results = (tmp_path / "canonical.jsonl_results.jsonl").read_text().splitlines()
    assert len(results) == 3 and all(json.loads(r)["passed"] for r in results)
    # Scoring again rewrites our own results file; a file of the user's at that path is left alone.
    assert main(["eval", "humaneval", "--samples", str(samples), "--workers", "2"]) == 0
    capsys.readouterr()
    (tmp_path / "canonical.jsonl_results.jsonl").write_text("my notes\n")
    _fails(["eval", "humaneval", "--samples", str(samples)], capsys, "is not a results file written by")
    assert (tmp_path / "canonical.jsonl_results.jsonl").read_text() == "my notes\n"


def test_eval_mbpp_scores_a_samples_file(tmp_path, capsys):
    data = tmp_path / "mbpp.jsonl"
    record = {"task_id": 2, "text": "Add one.", "code": "def f(x):\n    return x + 1\n"}
    data.write_text(json.dumps({**record, "test_list": ["assert f(1) == 2"], "test_setup_code": ""}) + "\n")
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps({"task_id": 2, "completion": record["code"]}) + "\n")
    assert main(["eval", "mbpp", "--samples", str(samples), "--data", str(data), "--workers", "1"]) == 0
    assert "pass@1     1.0000" in capsys.readouterr().out


def test_eval_code_bad_input(tmp_path, run, capsys):
    bare = _checkpoint(tmp_path / "bare", tokenizer=False)
    _fails(
        ["eval", "humaneval", "--checkpoint", bare, "--limit", "1"],
        capsys,
        f"checkpoint {bare} has no tokenizer",
    )
    _fails(
        ["eval", "humaneval", "--checkpoint", run, "--k", "1,10"], capsys, "k=10 needs at least 10 samples"
    )
    _fails(["eval", "humaneval"], capsys, "give exactly one of --checkpoint")
    missing = str(tmp_path / "nope.jsonl")
    _fails(["eval", "mbpp", "--checkpoint", run, "--data", missing], capsys, "MBPP data file not found")
    _fails(["eval", "humaneval", "--samples", missing], capsys, "samples file not found")
    _fails(["eval", "humaneval", "--checkpoint", str(tmp_path / "none")], capsys, "does not exist")
    _fails(
        ["eval", "humaneval", "--samples", missing, "--timeout-s", "0"], capsys, "timeout_s must be positive"
    )
    loss = ["eval", "loss", "--checkpoint", run, "--data", missing]
    _fails([*loss, "--batch-size", "0"], capsys, "batch_size must be at least 1")
    _fails([*loss, "--seq-len", "1"], capsys, "seq_len must be at least 2")


def test_code_benchmark_flags_parse_to_the_values_the_parameters_had():
    from multitoken.evals.cli import DEFAULT_WORKERS

    from helpers import parsed_options

    before = dict(checkpoint=None, samples=None, data=None, n_samples=1, temperature=0.0, top_p=0.95,
                  max_new_tokens=256, limit=None, k=None, out=None, batch_size=8, seed=0, speculative=None,
                  workers=DEFAULT_WORKERS, timeout_s=10.0, device="auto", json=None)  # fmt: skip
    given = dict(checkpoint="run", samples="s.jsonl", data="d.jsonl", n_samples=4, temperature=0.5, top_p=0.9,
                 max_new_tokens=32, limit=3, k=[1, 2], out="o", batch_size=2, seed=7, speculative=False,
                 workers=1, timeout_s=2.5, device="cpu", json="j.json")  # fmt: skip
    flags = ["--checkpoint", "run", "--samples", "s.jsonl", "--data", "d.jsonl", "--n-samples", "4",
             "--temperature", "0.5", "--top-p", "0.9", "--max-new-tokens", "32", "--limit", "3", "--k", "1,2",
             "--out", "o", "--batch-size", "2", "--seed", "7", "--no-speculative", "--workers", "1",
             "--timeout-s", "2.5", "--device", "cpu", "--json", "j.json"]  # fmt: skip
    for name in ("humaneval", "mbpp"):
        assert dataclasses.asdict(parsed_options(["eval", name])) == before
        assert list(dataclasses.asdict(parsed_options(["eval", name, *flags])).items()) == list(given.items())


def test_code_benchmark_counts_must_be_at_least_one(run, capsys):
    for flag in ("--n-samples", "--batch-size", "--max-new-tokens"):
        name = flag[2:].replace("-", "_")
        _fails(
            ["eval", "humaneval", "--checkpoint", run, flag, "0"], capsys, f"{name} must be at least 1, got 0"
        )
