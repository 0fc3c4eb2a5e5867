"""The command line: YAML configs with overrides, and one-line errors with exit status 2 for bad input."""

import json

import numpy as np
import pytest

from multitoken.cli import main

from helpers import make_corpus, make_dataset, read_metrics

TRAIN = [
    "--preset",
    "debug",
    "--batch-size",
    "2",
    "--seq-len",
    "16",
    "--max-steps",
    "2",
    "--warmup-steps",
    "1",
    "--log-every",
    "1",
    "--device",
    "cpu",
]
QUIET = ["--no-tensorboard", "--no-progress", "--val-every", "0"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("cli"))


@pytest.fixture(scope="module")
def trained_run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "n2"
    assert main(["train", "--data", str(dataset), "--n-future", "2", *TRAIN, *QUIET, "--out", str(out)]) == 0
    return out


def fails_with(capsys, argv, message):
    """Run the CLI, expect exit 2 and exactly one stderr line containing `message`."""
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert message in err, err
    assert "Traceback" not in err


def snapshot(directory):
    return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_yaml_config_with_command_line_override(dataset, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"data: {dataset}\npreset: debug\nn_future: 3\nhead_offsets: [1, 2, 4]\nbatch_size: 2\nseq_len: 16\n"
        "max_steps: 3\nwarmup_steps: 1\nlr: 0.01\ntensorboard: false\nprogress: false\nval_every: 0\nlog_every: 1\n"
    )
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--lr", "3e-4", "--out", str(out)]) == 0
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["lr"] == 3e-4 and saved["model"] == {"n_future": 3, "head_offsets": [1, 2, 4]}
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]


def test_resume_continues_from_the_saved_config(trained_run, capsys):
    assert main(["train", "--out", str(trained_run), "--resume", "--max-steps", "3", *QUIET]) == 0
    assert [m["step"] for m in read_metrics(trained_run)] == [1, 2, 3]


def test_missing_and_empty_corpus(tmp_path, capsys):
    fails_with(
        capsys, ["prepare", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "d")], "is missing"
    )
    (tmp_path / "empty").mkdir()
    fails_with(
        capsys, ["prepare", "--source", str(tmp_path / "empty"), "--out", str(tmp_path / "d")], "is empty"
    )
    assert not (tmp_path / "d").exists()


def test_token_ids_at_or_above_the_vocabulary(tmp_path, capsys):
    data = make_dataset(tmp_path)
    shard = data / "train_00000.bin"
    ids = np.fromfile(shard, dtype=np.uint16)
    ids[5] = 300  # the byte tokenizer has 258 ids
    ids.tofile(shard)
    fails_with(capsys, ["train", "--data", str(data), *TRAIN, "--out", str(tmp_path / "r")], "300")
    assert not (tmp_path / "r").exists()


def test_truncated_shard(tmp_path, capsys):
    data = make_dataset(tmp_path)
    shard = data / "train_00000.bin"
    shard.write_bytes(shard.read_bytes()[:-3])
    fails_with(capsys, ["train", "--data", str(data), *TRAIN, "--out", str(tmp_path / "r")], "truncated")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--n-future", "0"], "n_future must be at least 1"),
        (["--n-future", "5"], "need at least as many layers"),
        (["--preset", "huge"], "unknown preset 'huge'"),
        (["--no-such-field", "1"], "unrecognized arguments: --no-such-field"),
        (["--head-style", "tree"], "invalid choice: 'tree'"),
        (["--batch-size", "three"], "invalid int value"),
        (["--device", "gpu"], "unknown device 'gpu'"),
        (["--device", "cuda:99"], "device 'cuda:99' is not available here"),
    ],
)
def test_bad_model_and_config_fields(dataset, tmp_path, capsys, flags, message):
    fails_with(
        capsys, ["train", "--data", str(dataset), *TRAIN, *flags, "--out", str(tmp_path / "r")], message
    )
    assert not (tmp_path / "r").exists()


def test_unknown_field_in_yaml(dataset, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("preset: debug\nlearning_rate: 0.1\n")
    fails_with(
        capsys,
        ["train", "--config", str(config), "--data", str(dataset)],
        "unknown config field(s): learning_rate",
    )


def test_yaml_value_of_the_wrong_type(dataset, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("preset: debug\nlr: fast\n")
    fails_with(
        capsys,
        ["train", "--config", str(config), "--data", str(dataset)],
        "config field lr must be float, got 'fast'",
    )


def test_resume_with_nothing_to_resume(dataset, tmp_path, capsys):
    fails_with(
        capsys,
        ["train", "--data", str(dataset), "--out", str(tmp_path / "r"), "--resume"],
        "nothing to resume",
    )


def test_output_directory_holding_another_run_is_left_alone(dataset, trained_run, capsys):
    before = snapshot(trained_run)
    argv = ["train", "--data", str(dataset), *TRAIN, "--out", str(trained_run)]
    fails_with(capsys, argv, "already holds a run")
    fails_with(capsys, [*argv, "--n-future", "3", "--resume"], "holds a different run (differs in model)")
    assert snapshot(trained_run) == before


def test_checkpoint_whose_config_does_not_match(trained_run, tmp_path, capsys):
    from multitoken.checkpoint import find_latest, load_weights
    from multitoken.config import ModelConfig
    from multitoken.errors import UserError
    from multitoken.model import MultiTokenLM

    latest = find_latest(trained_run)
    config = ModelConfig.load(latest / "config.json")
    other = MultiTokenLM(
        ModelConfig(**{**config.to_dict(), "n_future": 1, "head_offsets": None, "loss_weights": None})
    )
    with pytest.raises(UserError, match="does not match the model: n_future 2 vs 1"):
        load_weights(other, latest)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--prompt", ""], "empty"),
        (["--prompt", "x" * 300], "exceeds the model's context of 256 tokens"),
        (["--prompt", "x", "--temperature", "-1"], "temperature must be a finite number >= 0"),
        (["--prompt", "x", "--temperature", "nan"], "--temperature: must be a finite number"),
        (["--prompt", "x", "--device", "gpu"], "unknown device 'gpu'"),
        (["--prompt", "x", "--device", "cuda:99"], "device 'cuda:99' is not available here"),
        (["--prompt", "x", "--draft-tree", "300"], "the vocabulary has only"),
        (["--prompt", "x", "--top-p", "1.5"], "top_p"),
        (["--prompt", "x", "--top-k", "-2"], "top_k"),
    ],
)
def test_bad_generation_input(trained_run, capsys, flags, message):
    fails_with(capsys, ["generate", "--checkpoint", str(trained_run), *flags], message)


def test_speculative_on_a_single_head_model_says_what_to_do(dataset, tmp_path, capsys):
    out = tmp_path / "n1"
    assert main(["train", "--data", str(dataset), *TRAIN, *QUIET, "--out", str(out)]) == 0
    base = ["generate", "--checkpoint", str(out), "--prompt", "x", "--max-new-tokens", "2"]
    fails_with(capsys, [*base, "--speculative", "on"], "--speculative on: this model has one head")
    fails_with(capsys, [*base, "--speculative", "maybe"], "invalid choice: 'maybe'")
    assert main([*base, "--no-speculative"]) == 0 and main([*base, "--speculative", "off"]) == 0
    assert main([*base, "--speculative", "auto"]) == 0  # auto decodes plainly: nothing to draft with


def test_missing_or_incomplete_checkpoint(trained_run, tmp_path, capsys):
    fails_with(
        capsys, ["generate", "--checkpoint", str(tmp_path / "none"), "--prompt", "x"], "does not exist"
    )
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    fails_with(capsys, ["generate", "--checkpoint", str(broken), "--prompt", "x"], "incomplete")


def test_help_lists_fields_with_their_docstrings(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--n-future" in out and "--batch-size" in out and "Global batch in sequences" in out


def test_make_corpus_helper_is_what_the_tests_think(tmp_path):
    assert len(list(make_corpus(tmp_path / "c", 3).iterdir())) == 3


def test_stop_strings_are_taken_whole(monkeypatch):
    """--stop is free text: a comma inside one is content, and repeated flags add strings."""
    import functools
    import importlib

    generate_module = importlib.import_module("multitoken.generate_cli")
    seen = {}

    @functools.wraps(generate_module.generate_cli)  # the same flags, without decoding anything
    def record(**kwargs):
        seen.update(kwargs)

    monkeypatch.setattr(generate_module, "generate_cli", record)
    argv = ["generate", "--checkpoint", "c", "--prompt", "x", "--stop", "a, b", ",", "--stop", "\n\n"]
    assert main(argv) == 0
    assert seen["stop"] == ["a, b", ",", "\n\n"]


def _leaf_parsers(parser):
    """Every subcommand's parser, found through argparse's subparser actions."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                    yield from _leaf_parsers(sub)
                else:
                    yield sub


def test_help_is_written_for_users_whole_and_once():
    from multitoken.cli import build_parser, commands, param_docs

    parser = build_parser(commands())
    assert "subcommands mapped" not in parser.format_help()
    leaves = list(_leaf_parsers(parser))
    assert len(leaves) >= 15
    for sub in leaves:
        text = sub.format_help()
        assert "(default: None)" not in text and "Args:" not in text, sub.prog
        assert ") (default:" not in text.replace("\n", " "), sub.prog  # one default, not two
        assert "`cfg" not in text, sub.prog  # no developer text
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert (
                    text.count(action.option_strings[0] + " ") + text.count(action.option_strings[0] + "\n")
                    >= 1
                )
    train_help = next(s for s in leaves if s.prog.endswith(" train")).format_help()
    assert "(default: set by --preset)" in " ".join(train_help.split()).rsplit("--dim DIM", 1)[1][:120]

    def documented(x: int, y: int) -> None:
        """Args:
        x: the first line
            goes on here.
        y: short.
        """

    assert param_docs(documented) == {"x": "the first line goes on here.", "y": "short."}


def test_version_and_no_abbreviations(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("multitoken ")
    fails_with(capsys, ["train", "--n-futur", "2"], "unrecognized arguments: --n-futur")


def test_a_missing_extra_is_one_line_naming_the_pip_install(monkeypatch, tmp_path, capsys):
    import sys
    from pathlib import Path

    from multitoken.cli import missing_extra

    for name, extra in [("matplotlib.pyplot", "studies"), ("transformers", "hf"), ("lm_eval.api", "evals")]:
        assert missing_extra(ModuleNotFoundError(name=name)) == extra
    assert missing_extra(ModuleNotFoundError(name="multitoken.nowhere")) is None
    module, extra = "scipy", "studies"
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, module, None)
    assert main(["--help"]) == 0  # the other commands stay usable
    capsys.readouterr()
    csv = Path(__file__).resolve().parents[1] / "examples" / "chinchilla.csv"
    flags = ["--n-col", "Model Size", "--flop-col", "Training FLOP", "--out", str(tmp_path / "r")]
    assert main(["lab", "scaling", "fit", str(csv), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"multitoken lab scaling fit needs 'pip install multitoken[{extra}]' ({module} is missing)"


def test_a_missing_module_of_no_extra_is_not_hidden(monkeypatch):
    from multitoken import cli

    def broken(*args):
        raise ModuleNotFoundError("No module named 'multitoken.nowhere'", name="multitoken.nowhere")

    monkeypatch.setattr(cli, "commands", broken)
    with pytest.raises(ModuleNotFoundError):
        main(["--help"])
