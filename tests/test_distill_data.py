"""`multitoken distill-data`: a corpus of the model's own continuations, equal to plain generate() output."""

import json

import numpy as np
import pytest
import torch

from multitoken.checkpoint import save_checkpoint
from multitoken.cli import main
from multitoken.config import preset_config
from multitoken.data.loader import TokenDataset
from multitoken.data.prompts import file_prompts
from multitoken.distill_data import DistillDataConfig, data_windows, distill_data
from multitoken.generate import generate
from multitoken.model import MultiTokenLM

from helpers import make_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("distill-data"))


@pytest.fixture(scope="module")
def base(data, tmp_path_factory):
    """A random debug-size model with two heads, saved with the data's tokenizer."""
    dataset = TokenDataset(data, "train")
    torch.manual_seed(0)
    model = MultiTokenLM(preset_config("debug", vocab_size=dataset.vocab_size, n_future=2)).eval()
    out = tmp_path_factory.mktemp("base") / "run"
    save_checkpoint(out, 0, model, tokenizer=dataset.tokenizer())
    return out, model, dataset.tokenizer()


def test_the_corpus_is_the_models_own_greedy_continuations(data, base, tmp_path):
    run, model, tokenizer = base
    out = tmp_path / "self.jsonl"
    cfg = DistillDataConfig(
        checkpoint=str(run), out=str(out), from_data=str(data), n_prompts=5, prompt_tokens=6,
        max_new_tokens=9, batch_size=2, device="cpu",
    )  # fmt: skip
    distill_data(cfg)
    texts = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    windows = data_windows(data, 5, 6, seed=0)
    assert len(texts) == 5
    for window, text in zip(windows, texts, strict=True):  # one prompt at a time: batching changes nothing
        new = generate(model, [window], 9, speculative=False, eos_id=tokenizer.eos_id).tokens[0]
        assert text == tokenizer.decode(window + new)


def test_windows_are_slices_of_the_train_split_drawn_by_the_seed(data):
    train = TokenDataset(data, "train")
    stream = train.window(0, train.n_tokens).tolist()
    windows = data_windows(data, 8, 5, seed=3)
    assert windows == data_windows(data, 8, 5, seed=3) and windows != data_windows(data, 8, 5, seed=4)
    for window in windows:
        assert len(window) == 5
        assert any(stream[i : i + 5] == window for i in np.flatnonzero(np.array(stream) == window[0]))


def test_prompt_files_text_and_jsonl(tmp_path):
    (tmp_path / "p.txt").write_text("def f(\n\n  class A:\n")
    assert file_prompts(tmp_path / "p.txt") == ["def f(", "  class A:"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a\\nb"}\n{"prompt": "c"}\n')
    assert file_prompts(tmp_path / "p.jsonl") == ["a\nb", "c"]


def test_a_prompt_file_continues_each_prompt(base, tmp_path):
    run, model, tokenizer = base
    (tmp_path / "p.txt").write_text("the cat\nsat on\n")
    out = tmp_path / "self.jsonl"
    assert main(["distill-data", "--checkpoint", str(run), "--prompt-file", str(tmp_path / "p.txt"),
                 "--max-new-tokens", "4", "--out", str(out), "--device", "cpu"]) == 0  # fmt: skip
    texts = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    for prompt, text in zip(["the cat", "sat on"], texts, strict=True):
        ids = tokenizer.encode(prompt)
        new = generate(model, [ids], 4, speculative=False, eos_id=tokenizer.eos_id).tokens[0]
        assert text == tokenizer.decode(ids + new)


def test_bad_input_is_one_line_and_writes_nothing(data, base, tmp_path, capsys):
    run, _, _ = base
    (tmp_path / "bad.jsonl").write_text('{"text": "no prompt key"}\n')
    out = tmp_path / "out.jsonl"
    (tmp_path / "kept.jsonl").write_text("mine\n")
    common = ["distill-data", "--checkpoint", str(run), "--device", "cpu"]
    cases = [
        ([*common, "--out", str(out)], "exactly one of --prompt-file and --from-data"),
        ([*common, "--out", str(out), "--from-data", str(data), "--prompt-file", "x"], "exactly one of"),
        ([*common, "--out", str(tmp_path / "out.txt"), "--from-data", str(data)], "must name a .jsonl file"),
        (
            [*common, "--out", str(out), "--from-data", str(data), "--n-prompts", "0"],
            "--n-prompts must be >= 1",
        ),
        ([*common, "--out", str(out), "--prompt-file", str(tmp_path / "bad.jsonl")], 'a "prompt" string'),
        ([*common, "--out", str(out), "--prompt-file", str(tmp_path / "none.txt")], "does not exist"),
        (
            [*common, "--out", str(out), "--from-data", str(data), "--prompt-kind", "code"],
            "no function headers",
        ),
        ([*common, "--out", str(tmp_path / "kept.jsonl"), "--from-data", str(data)], "already exists"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "kept.jsonl"]
    assert (tmp_path / "kept.jsonl").read_text() == "mine\n"
