"""Bad input under attack: every file kind we read and every numeric flag, corrupted in every way we can
think of, must give exit status 2, one line on stderr, no traceback, and leave the disk as it was.

Each file kind has one loader (checkpoint.py, config.py, train.py, train_log.py, data/, evals/); these
tests feed each loader, through the commands that read it, the same classes of damage: empty, cut
in half, garbage bytes, non-UTF-8 text, JSON of the wrong shape and JSON of the wrong types.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from multitoken.cli import main

from helpers import make_dataset

TRAIN = [
    "--preset",
    "debug",
    "--n-future",
    "2",
    "--batch-size",
    "2",
    "--seq-len",
    "16",
    "--warmup-steps",
    "1",
]
QUIET = ["--no-tensorboard", "--no-progress", "--val-every", "0", "--log-every", "1", "--device", "cpu"]

GARBAGE = bytes(range(256)) * 4  # every byte value: not UTF-8, not JSON, not safetensors, not a pickle


def corruptions(data: bytes, json_file: bool) -> dict[str, bytes]:
    """The damage done to a file whose good contents are `data`."""
    found = {
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "garbage": GARBAGE,
        "non-utf8": b"\xff\xfe" + data[2:],
    }
    if json_file:
        found["wrong-shape"] = b"[1, 2, 3]\n"
        found["scalar"] = b'"just a string"\n'
    return found


def tree_hash(*roots: Path) -> str:
    """One digest of every file's path and bytes under `roots`."""
    h = hashlib.sha256()
    for root in roots:
        for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
            h.update(str(path).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def refused(capsys, argv: list[str], *roots: Path, message: str = "") -> str:
    """Run the CLI: exit 2, one stderr line (warnings aside), no traceback, nothing under `roots` changed."""
    before = tree_hash(*roots)
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if "warning:" not in line]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    assert message in lines[0], err
    assert tree_hash(*roots) == before, f"{argv} changed files on disk"
    return lines[0]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("bad-input"))


@pytest.fixture(scope="module")
def good_run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("good") / "run"
    argv = ["train", "--data", str(dataset), *TRAIN, *QUIET, "--max-steps", "2", "--save-every", "1"]
    assert main([*argv, "--out", str(out)]) == 0
    return out


@pytest.fixture
def run(good_run, tmp_path):
    """A private copy of a finished two-step run, to damage."""
    copy = tmp_path / "run"
    shutil.copytree(good_run, copy)
    return copy


def step_dir(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def readers(run: Path, dataset: Path) -> dict[str, list[str]]:
    """The commands that read a checkpoint."""
    return {
        "generate": ["generate", "--checkpoint", str(run), "--prompt", "the", "--max-new-tokens", "2"],
        "eval-loss": ["eval", "loss", "--checkpoint", str(run), "--data", str(dataset), "--max-windows", "1"],
        "resume": ["train", "--out", str(run), "--resume", "--max-steps", "3", *QUIET],
    }


CHECKPOINT_FILES = {"model.safetensors": False, "config.json": True, "tokenizer.json": True}


@pytest.mark.parametrize("name", sorted(CHECKPOINT_FILES))
@pytest.mark.parametrize("kind", ["empty", "truncated", "garbage", "non-utf8", "wrong-shape", "scalar"])
@pytest.mark.parametrize("command", ["generate", "eval-loss", "resume"])
def test_a_damaged_checkpoint_file(run, dataset, capsys, name, kind, command):
    path = step_dir(run) / name
    damage = corruptions(path.read_bytes(), json_file=CHECKPOINT_FILES[name])
    if kind not in damage:
        pytest.skip(f"{name} is not JSON")
    if name == "tokenizer.json" and command == "resume":
        pytest.skip("a resumed run reads its tokenizer from the data, not the checkpoint")
    path.write_bytes(damage[kind])
    refused(capsys, readers(run, dataset)[command], run, dataset)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"vocab_size": 300}, "match"),
        ({"dim": 128}, "match"),
        ({"n_layers": 5}, "match"),
        ({"dim": "wide"}, "field dim must be int"),
        ({"tie_embeddings": "maybe"}, "tie_embeddings must be true or false"),
        ({"n_kv_heads": 0}, "n_kv_heads must be at least 1"),
        ({"norm_eps": -1.0}, "norm_eps"),
        ({"head_style": 3}, "head_style"),
        ({"colour": "red"}, "unknown model config field"),
    ],
)
@pytest.mark.parametrize("command", ["generate", "eval-loss", "resume"])
def test_an_edited_config_json(run, dataset, capsys, edit, message, command):
    path = step_dir(run) / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    refused(capsys, readers(run, dataset)[command], run, dataset, message=message)


def test_weights_with_renamed_keys_name_what_is_missing(run, dataset, capsys):
    from safetensors.torch import load_file, save_file

    path = step_dir(run) / "model.safetensors"
    state = load_file(str(path))
    state["renamed.weight"] = state.pop("norm.weight")
    save_file(state, str(path))
    line = refused(capsys, readers(run, dataset)["generate"], run, message="weights do not match")
    assert "norm.weight" in line and "renamed.weight" in line


@pytest.mark.parametrize("kind", ["empty", "truncated", "garbage", "non-utf8"])
def test_a_damaged_trainer_state(run, capsys, kind):
    path = step_dir(run) / "trainer_state.pt"
    path.write_bytes(corruptions(path.read_bytes(), json_file=False)[kind])
    refused(capsys, ["train", "--out", str(run), "--resume", *QUIET], run, message="trainer state")


@pytest.mark.parametrize("kind", ["empty", "truncated", "garbage", "non-utf8", "wrong-shape", "scalar"])
def test_a_damaged_train_config(run, capsys, kind):
    path = run / "train_config.json"
    path.write_bytes(corruptions(path.read_bytes(), json_file=True)[kind])
    refused(capsys, ["train", "--out", str(run), "--resume", *QUIET], run, message="train_config.json")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"lr": "fast"}, "lr must be float"),
        ({"lr": "nan"}, "finite"),
        ({"batch_size": 2.5}, "batch_size must be int"),
        ({"model": [1, 2]}, "model"),
        ({"memory_efficient": "maybe"}, "memory_efficient must be true or false"),
        ({"preset": ["debug"]}, "preset must be text"),
        ({"unknown_field": 1}, "unknown config field"),
    ],
)
def test_wrong_types_in_train_config(run, capsys, edit, message):
    path = run / "train_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    refused(capsys, ["train", "--out", str(run), "--resume", *QUIET], run, message=message)


@pytest.mark.parametrize("middle", [b'{"step": 1, "lo\n', b"\xff\xfe\n", b"[1]\n", b'{"loss": 1}\n'])
def test_metrics_damaged_before_the_last_line_are_refused(run, capsys, middle):
    path = run / "metrics.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + middle + b"".join(lines[1:]))
    refused(
        capsys, ["train", "--out", str(run), "--resume", "--max-steps", "3", *QUIET], run, message="line 2"
    )


def test_a_cut_off_last_metrics_line_is_dropped_with_a_warning(run, capsys):
    path = run / "metrics.jsonl"
    good = path.read_text()
    path.write_text(good + '{"step": 3, "loss')  # a crash or a full disk during a log write
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "3", *QUIET]) == 0
    err = capsys.readouterr().err
    assert "metrics.jsonl line 3 is cut off; dropping it" in err and "Traceback" not in err
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert path.read_text().startswith(good)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"dtype": "uint32"}, "dtype 'uint32'"),
        ({"dtype": "float64"}, "dtype"),
        ({"vocab_size": "many"}, "vocab_size"),
        ({"eos_id": 10**6}, "eos_id"),
        ({"splits": [1]}, "splits"),
        ({"splits": {"train": {"shards": [{"file": "../../etc/passwd", "tokens": 4}]}}}, "outside"),
        ({"format_version": 99}, "format-1"),
    ],
)
def test_an_edited_meta_json(dataset, tmp_path, capsys, edit, message):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    path = data / "meta.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    argv = ["train", "--data", str(data), *TRAIN, *QUIET, "--max-steps", "1", "--out", str(tmp_path / "r")]
    refused(capsys, argv, data, tmp_path, message=message)


@pytest.mark.parametrize("kind", ["empty", "truncated", "garbage", "non-utf8", "wrong-shape", "scalar"])
@pytest.mark.parametrize("command", ["train", "eval-loss"])
def test_a_damaged_meta_json(dataset, good_run, tmp_path, capsys, kind, command):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    path = data / "meta.json"
    path.write_bytes(corruptions(path.read_bytes(), json_file=True)[kind])
    argv = {
        "train": [
            "train",
            "--data",
            str(data),
            *TRAIN,
            *QUIET,
            "--max-steps",
            "1",
            "--out",
            str(tmp_path / "r"),
        ],
        "eval-loss": ["eval", "loss", "--checkpoint", str(good_run), "--data", str(data)],
    }[command]
    refused(capsys, argv, data, tmp_path, message="meta.json")


@pytest.mark.parametrize("kind", ["empty", "truncated", "garbage", "longer"])
def test_a_damaged_token_shard(dataset, tmp_path, capsys, kind):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    path = data / "train_00000.bin"
    good = path.read_bytes()
    path.write_bytes(
        {
            "empty": b"",
            "truncated": good[: len(good) // 2],
            "garbage": b"\xff" * len(good),
            "longer": good + b"\0\0",
        }[kind]
    )
    argv = ["train", "--data", str(data), *TRAIN, *QUIET, "--max-steps", "1", "--out", str(tmp_path / "r")]
    refused(capsys, argv, data, tmp_path, message="shard")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"", "--data"),  # an empty file is no config: the defaults apply, and data/stdlib is missing
        (b"\xff\xfe\x00garbage", "not UTF-8"),
        (b"lr: [unclosed", "not valid YAML"),
        (b"- a list\n- of things\n", "must be a mapping"),
        (b"resume: maybe\n", "resume must be true or false"),
        (b"lr: .inf\n", "finite"),
        (b"lr: .nan\n", "finite"),
        (b"seq_len: 1.5\n", "seq_len must be int"),
        (b"head_style: tree\n", "head_style must be one of"),
        (b"head_offsets: 3\n", "head_offsets must be a list"),
        (b"model: [1]\n", "model must be a mapping"),
        (b"tie_embeddings: 'no please'\n", "tie_embeddings must be true or false"),
    ],
)
def test_a_bad_yaml_run_config(dataset, tmp_path, capsys, text, message):
    config = tmp_path / "run.yaml"
    config.write_bytes(text)
    argv = ["train", "--config", str(config), "--out", str(tmp_path / "r"), *QUIET]
    if message != "--data":
        argv += ["--data", str(dataset)]
    line = refused(capsys, argv, tmp_path)
    assert message in line or (message == "--data" and "not a prepared dataset" in line), line


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("false", False),
        ('"false"', False),
        ("'no'", False),
        ("No", False),
        ("true", True),
        ('"yes"', True),
    ],
)
def test_yaml_booleans_mean_what_they_say(dataset, tmp_path, capsys, text, expect):
    """A quoted "false" is false: it once resumed a run and built tied embeddings."""
    config = tmp_path / "run.yaml"
    config.write_text(f"tie_embeddings: {text}\ntensorboard: {text}\n")
    out = tmp_path / "r"
    argv = ["train", "--config", str(config), "--data", str(dataset), *TRAIN, "--max-steps", "1"]
    assert main([*argv, "--no-progress", "--device", "cpu", "--out", str(out)]) == 0
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["model"]["tie_embeddings"] is expect and saved["tensorboard"] is expect
    assert (out / "tb").exists() is expect
    config_json = json.loads((step_dir(out) / "config.json").read_text())
    assert config_json["tie_embeddings"] is expect


def test_a_quoted_false_resume_does_not_resume(good_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    config = tmp_path / "run.yaml"
    config.write_text('resume: "false"\n')
    refused(capsys, ["train", "--config", str(config), "--out", str(run), *QUIET], run, message="--resume")


@pytest.mark.parametrize(
    "kind", ["empty", "garbage", "non-utf8", "wrong-shape", "no-completion", "unknown-task"]
)
def test_a_bad_samples_file(tmp_path, capsys, kind):
    path = tmp_path / "samples.jsonl"
    path.write_bytes(
        {
            "empty": b"",
            "garbage": GARBAGE,
            "non-utf8": b'{"task_id": "HumanEval/0", "completion": "\xff"}\n',
            "wrong-shape": b"[1, 2]\n",
            "no-completion": b'{"task_id": "HumanEval/0"}\n',
            "unknown-task": b'{"task_id": "Nope/1", "completion": "x"}\n',
        }[kind]
    )
    refused(capsys, ["eval", "humaneval", "--samples", str(path), "--workers", "1"], tmp_path)


@pytest.mark.parametrize("kind", ["empty", "garbage", "wrong-shape", "missing-fields"])
def test_bad_mbpp_data(good_run, tmp_path, capsys, kind):
    path = tmp_path / "mbpp.jsonl"
    path.write_bytes(
        {"empty": b"", "garbage": GARBAGE, "wrong-shape": b"[1]\n", "missing-fields": b'{"task_id": 1}\n'}[
            kind
        ]
    )
    argv = ["eval", "mbpp", "--checkpoint", str(good_run), "--data", str(path), "--out", str(tmp_path / "o")]
    refused(capsys, argv, tmp_path, good_run)


def test_eval_refuses_an_output_folder_it_did_not_write(good_run, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "samples.jsonl").write_text("my own notes\n")
    argv = ["eval", "mbpp", "--checkpoint", str(good_run), "--limit", "1", "--out", str(out)]
    refused(capsys, argv, tmp_path, message="did not write")


def test_the_latest_pointer_dangling_falls_back_and_says_so(run, capsys):
    (run / "checkpoints" / "latest").write_text("step_999999\n")
    argv = ["generate", "--checkpoint", str(run), "--prompt", "the", "--max-new-tokens", "2"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "names 'step_999999', which is not a checkpoint; using the newest complete one, step_000002" in err


# ---- numeric flags -------------------------------------------------------------------------------

ZERO, NEGATIVE, HUGE, NAN, INF = "0", "-1", "1e15", "nan", "inf"

TRAIN_FLAGS = {
    # flag: the values that must be refused (others, like --warmup-steps 0, are meaningful)
    "--batch-size": [ZERO, NEGATIVE, HUGE, NAN, INF],
    "--micro-batch-size": [NEGATIVE, NAN, "3"],
    "--seq-len": [ZERO, NEGATIVE, HUGE, NAN, "100000"],
    "--lr": [ZERO, NEGATIVE, NAN, INF, "-inf"],
    "--min-lr-ratio": [NEGATIVE, "1.5", NAN, INF],
    "--warmup-steps": [NEGATIVE, NAN, INF],
    "--max-steps": [ZERO, NEGATIVE, NAN, INF],
    "--decay-steps": [NEGATIVE, NAN],
    "--weight-decay": [NEGATIVE, NAN, INF],
    "--beta1": [NEGATIVE, "1", NAN],
    "--beta2": ["1.5", NAN, INF],
    "--grad-clip": [NEGATIVE, NAN, INF],
    "--seed": [NEGATIVE, NAN],
    "--chunk-size": [ZERO, NEGATIVE],
    "--log-every": [ZERO, NEGATIVE],
    "--val-every": [NEGATIVE],
    "--val-batches": [ZERO, NEGATIVE],
    "--save-every": [NEGATIVE],
    "--keep": [NEGATIVE],
    "--n-future": [ZERO, NEGATIVE, HUGE],
    "--dim": [ZERO, NEGATIVE, "63"],
    "--n-layers": [ZERO, NEGATIVE],
    "--n-heads": [ZERO, NEGATIVE],
    "--n-kv-heads": [ZERO, NEGATIVE, "3"],
    "--max-seq-len": [ZERO, NEGATIVE, "8"],
    "--norm-eps": [ZERO, NEGATIVE, NAN, INF],
    "--rope-theta": [ZERO, NEGATIVE, NAN],
    "--init-std": [NEGATIVE, NAN],
    "--ffn-hidden": [ZERO, NEGATIVE],
    "--multiple-of": [ZERO, NEGATIVE],
}


@pytest.mark.parametrize(("flag", "value"), [(f, v) for f, vs in TRAIN_FLAGS.items() for v in vs])
def test_a_bad_train_number(dataset, tmp_path, capsys, flag, value):
    argv = ["train", "--data", str(dataset), *TRAIN, *QUIET, "--max-steps", "1", "--out", str(tmp_path / "r")]
    refused(capsys, [*argv, flag, value], dataset, tmp_path)


PREPARE_FLAGS = {
    "--vocab-size": [ZERO, NEGATIVE, "99999999999", NAN],
    "--val-fraction": [ZERO, NEGATIVE, "1", NAN, INF],
    "--shard-tokens": [ZERO, NEGATIVE, NAN],
    "--max-documents": [NEGATIVE, NAN],
    "--seed": [NEGATIVE, INF],
}


@pytest.mark.parametrize(("flag", "value"), [(f, v) for f, vs in PREPARE_FLAGS.items() for v in vs])
def test_a_bad_prepare_number(dataset, tmp_path, capsys, flag, value):
    argv = ["prepare", "--source", str(dataset), "--tokenizer", "bpe", "--out", str(tmp_path / "d")]
    refused(capsys, [*argv, flag, value], tmp_path)


EVAL_FLAGS = {
    "loss": {
        "--batch-size": [ZERO, NEGATIVE, NAN],
        "--seq-len": ["1", NEGATIVE, "100000"],
        "--max-windows": [NEGATIVE, NAN],
    },
    "humaneval": {
        "--n-samples": [ZERO, NEGATIVE],
        "--temperature": [NEGATIVE, NAN, INF],
        "--top-p": [ZERO, NEGATIVE, "1.5", NAN],
        "--max-new-tokens": [ZERO, NEGATIVE],
        "--limit": [ZERO, NEGATIVE],
        "--batch-size": [ZERO, NEGATIVE],
        "--workers": [ZERO, NEGATIVE],
        "--timeout-s": [ZERO, NEGATIVE, NAN, INF],
    },
}


@pytest.mark.parametrize(
    ("command", "flag", "value"),
    [(c, f, v) for c, fs in EVAL_FLAGS.items() for f, vs in fs.items() for v in vs],
)
def test_a_bad_eval_number(good_run, dataset, tmp_path, capsys, command, flag, value):
    argv = ["eval", command, "--checkpoint", str(good_run), "--device", "cpu"]
    argv += ["--data", str(dataset)] if command == "loss" else ["--limit", "1", "--out", str(tmp_path / "o")]
    refused(capsys, [*argv, flag, value], good_run, dataset, tmp_path)


# ---- paths ---------------------------------------------------------------------------------------


def test_output_paths_whose_folder_cannot_exist_are_refused_before_the_work(
    dataset, good_run, tmp_path, capsys
):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    inside = str(blocker / "sub" / "x")
    refused(capsys, ["prepare", "--source", str(dataset), "--tokenizer", "byte", "--out", inside], tmp_path)
    argv = ["train", "--data", str(dataset), *TRAIN, *QUIET, "--max-steps", "1", "--out", inside]
    refused(capsys, argv, tmp_path, dataset)
    argv = ["eval", "loss", "--checkpoint", str(good_run), "--data", str(dataset), "--json", inside]
    refused(capsys, argv, tmp_path, good_run)


def test_prepare_skips_files_that_are_not_text_and_says_why(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("some text here\n" * 20)
    (corpus / "b.txt").write_text("more text there\n" * 20)
    (corpus / "records.jsonl").write_text('{"id": 1, "body": "no text field"}\n')
    (corpus / "binary.txt").write_bytes(GARBAGE)
    out = tmp_path / "d"
    assert main(["prepare", "--source", str(corpus), "--tokenizer", "byte", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "skipped 2 files (1 .jsonl without a string 'text' field, 1 not UTF-8 text)" in printed
    (corpus / "a.txt").unlink()
    (corpus / "b.txt").unlink()
    refused(
        capsys,
        ["prepare", "--source", str(corpus), "--tokenizer", "byte", "--out", str(tmp_path / "e")],
        tmp_path,
        message="has no text documents: skipped 2 files",
    )


def test_a_moved_run_resumes_where_it_now_lives(good_run, tmp_path, capsys):
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(good_run, moved)
    assert main(["train", "--out", str(moved), "--resume", "--max-steps", "3", *QUIET]) == 0
    assert json.loads((moved / "train_config.json").read_text())["out"] == str(moved)
    assert (moved / "checkpoints" / "step_000003").is_dir()


JSONL_PROMPTS = b'{"prompt": "def add(a, b):"}\n'  # truncated, it ends mid-object


@pytest.mark.parametrize("kind", [*corruptions(JSONL_PROMPTS, json_file=True), "no-prompt-key"])
def test_a_bad_jsonl_prompt_file(good_run, tmp_path, capsys, kind):
    path = tmp_path / "prompts.jsonl"
    damaged = {**corruptions(JSONL_PROMPTS, json_file=True), "no-prompt-key": b'{"text": "def f("}\n'}
    path.write_bytes(damaged[kind])
    argv = ["generate", "--checkpoint", str(good_run), "--prompt-file", str(path), "--max-new-tokens", "2"]
    refused(capsys, argv, tmp_path, good_run)


@pytest.mark.parametrize("kind", ["empty", "blank-lines", "garbage", "non-utf8", "a-folder"])
def test_a_bad_prompt_file(good_run, tmp_path, capsys, kind):
    path = tmp_path / "prompts.txt"
    if kind == "a-folder":
        path.mkdir()
    else:
        path.write_bytes(
            {"empty": b"", "blank-lines": b"\n  \n", "garbage": GARBAGE, "non-utf8": b"def f(\xff\n"}[kind]
        )
    argv = ["generate", "--checkpoint", str(good_run), "--prompt-file", str(path), "--max-new-tokens", "2"]
    refused(capsys, argv, tmp_path, good_run)
