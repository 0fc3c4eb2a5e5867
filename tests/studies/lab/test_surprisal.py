"""lab surprisal: log V at initialisation, the top-10% share, the HTML page, the command end to end."""

from __future__ import annotations

import html
import json
import math

import pytest
import torch

from multitoken.cli import main
from multitoken.config import ModelConfig
from multitoken.data.shards import PrepareConfig, prepare
from multitoken.model import MultiTokenLM
from multitoken.studies.lab.surprisal import head_summary, render_html, score_text, token_texts, top_share
from multitoken.tokenizer import byte_tokenizer

TEXT = "The cat sat on the mat. The dog ate the bone, and then <b>it</b> slept & dreamt.\n"


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab_surprisal")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"doc{i}.txt").write_text(TEXT * (4 + i))
    return prepare(
        PrepareConfig(source=str(corpus), tokenizer="byte", out=str(root / "data"), val_fraction=0.25)
    )


def test_surprisal_at_initialisation_is_log2_vocab_bits():
    V = 512
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=V, dim=32, n_layers=3, n_heads=2, n_future=2, init_std=1e-4, max_seq_len=64
    )
    model = MultiTokenLM(config).eval()
    stream_WT = torch.randint(0, V, (4, 64))
    text = score_text(model, stream_WT)
    for head in range(2):
        summary = head_summary(text, head)
        assert summary["mean_bits"] == pytest.approx(math.log2(V), rel=0.02)
        assert summary["mean_entropy_bits"] == pytest.approx(math.log2(V), rel=0.02)
    # head i describes token t from position t - offset: the first `offset` tokens of a window have none
    assert torch.isnan(text.surprisal_TN[:2, 1]).all() and torch.isfinite(text.surprisal_TN[2:64, 1]).all()


def test_top_share_is_in_0_1():
    assert top_share(torch.ones(100)) == pytest.approx(0.1)
    assert top_share(torch.tensor([10.0] + [0.0] * 99)) == 1.0
    values = torch.rand(1000).pow(4)
    assert 0.1 < top_share(values) <= 1.0
    assert top_share(torch.tensor([1.0, float("nan"), 2.0]), 0.5) == pytest.approx(2 / 3)


def test_html_contains_every_token():
    tok = byte_tokenizer()
    ids = tok.encode(TEXT)
    torch.manual_seed(0)
    model = MultiTokenLM(
        ModelConfig(vocab_size=tok.vocab_size, dim=16, n_layers=2, n_heads=2, max_seq_len=128)
    )
    text = score_text(model.eval(), torch.tensor([ids]))
    pieces = token_texts(tok, ids)
    page = render_html(text, pieces, "test", vmax=8.0)
    spans = page.count("<span ")
    assert spans == len(ids)
    for piece in pieces:
        assert html.escape(piece).replace("\n", "↵<br>") in page
    assert "<b>it</b>" not in page  # escaped


def test_lab_surprisal_end_to_end(text_data, tmp_path):
    out = tmp_path / "surprisal"
    text_file = tmp_path / "story.txt"
    text_file.write_text(TEXT * 2)
    argv = ["lab", "surprisal", "--out", str(out), "--data", str(text_data), "--text", str(text_file)]
    assert main([*argv, "--show-tokens", "80", "--no-progress", "--scale", "debug"]) == 0
    for name in ("report.md", "results.json", "surprisal_distribution.png", "surprisal_text_n1.png"):
        assert (out / name).is_file(), name
    page = (out / "surprisal_n2.html").read_text()
    assert page.count("<span ") == 2 * len(byte_tokenizer().encode(TEXT * 2))  # two heads
    results = json.loads((out / "results.json").read_text())["results"]
    for label in ("n=1", "n=2"):
        for head in results[label]["heads"].values():
            assert 0 < head["top10_share"] <= 1
    assert set(results["n=2"]["heads"]) == {"head1", "head2"}


def test_lab_surprisal_missing_text_exits_2(tmp_path, capsys):
    assert (
        main(
            [
                "lab",
                "surprisal",
                "--out",
                str(tmp_path),
                "--text",
                str(tmp_path / "missing.txt"),
                "--scale",
                "debug",
            ]
        )
        == 2
    )
    assert "missing.txt" in capsys.readouterr().err
