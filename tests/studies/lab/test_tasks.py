"""lab tasks: tag shares add up, the code and text taggers, minimal-pair probes, the command end to end."""

from __future__ import annotations

import inspect
import json
import keyword
import shutil
import textwrap

import pytest
import torch

from multitoken.cli import main
from multitoken.config import ModelConfig
from multitoken.data.shards import PrepareConfig, prepare
from multitoken.model import MultiTokenLM
from multitoken.studies import runs as study
from multitoken.studies import scoring
from multitoken.studies.lab.tagging import (
    CODE_TAGS,
    decode_with_offsets,
    tag_stream,
    tag_windows,
    token_pieces,
    window_tags,
)
from multitoken.studies.lab.tasks import half_learned_step, tag_breakdown
from multitoken.tokenizer import byte_tokenizer, train_bpe


@pytest.fixture(scope="module")
def code_data(tmp_path_factory):
    """A byte-level dataset of a few standard-library modules."""
    root = tmp_path_factory.mktemp("lab_tasks")
    corpus = root / "corpus"
    corpus.mkdir()
    for module in (textwrap, keyword, inspect):
        (corpus / f"{module.__name__}.py").write_text(inspect.getsource(module)[:20000])
    return prepare(
        PrepareConfig(source=str(corpus), tokenizer="byte", out=str(root / "data"), val_fraction=0.3)
    )


# ---- shares ------------------------------------------------------------------------------------------


def test_tag_shares_add_up_to_the_total_loss():
    torch.manual_seed(0)
    model = MultiTokenLM(
        ModelConfig(vocab_size=50, dim=32, n_layers=3, n_heads=2, n_future=2, max_seq_len=32)
    )
    tokens_WT = torch.randint(0, 50, (3, 32))
    tokens_WT[1, 10] = 7  # a separator, so some targets are ignored
    scores = scoring.token_scores(model, tokens_WT, sep_id=7)
    tag_WT = torch.randint(0, 5, (3, 32))
    tags = tuple(f"t{i}" for i in range(5))
    for head, offset in enumerate(model.config.head_offsets):
        stats = tag_breakdown(scores, tag_WT, tags, head, offset)
        valid = scores.valid_BTN[..., head]
        total = float(scores.loss_BTN[..., head][valid].double().mean())
        assert stats.total_count == int(valid.sum())
        assert abs(float(stats.contribution_G.sum()) - total) < 1e-6
        assert abs(stats.total_loss - total) < 1e-6
        assert abs(float(stats.share_G.sum()) - 1.0) < 1e-6


def test_half_learned_step():
    assert half_learned_step([0, 10, 20, 30], [4.0, 3.5, 2.1, 2.0]) == 20
    assert half_learned_step([0, 10], [2.0, 2.0]) is None


# ---- taggers -----------------------------------------------------------------------------------------

SNIPPET = 'def area(width, height):\n    # scale it\n    return width * height + 1.5\nlabel = "hi"\n'


def _tags_by_char(text: str, domain: str) -> list[tuple[str, str]]:
    tok = byte_tokenizer()
    ids = tok.encode(text)
    tags = tag_stream(torch.tensor(ids), tok, domain)
    return list(zip(text, window_tags(tags, 0, len(ids)), strict=True))


def test_code_tagger_tags_a_snippet():
    tagged = _tags_by_char(SNIPPET, "code")

    def tag_at(needle: str, occurrence: int = 0) -> str:
        index = -1
        for _ in range(occurrence + 1):
            index = SNIPPET.index(needle, index + 1)
        return tagged[index][1]

    assert tag_at("def") == "keyword"
    assert tag_at("area") == "identifier (new)"
    assert tag_at("width") == "identifier (new)"
    assert tag_at("width", 1) == "identifier (seen)"  # copyable from the signature
    assert tag_at("return") == "keyword"
    assert tag_at("(") == "operator/bracket" and tag_at("*") == "operator/bracket"
    assert tag_at("1.5") == "number"
    assert tag_at('"hi"') == "string"
    assert tag_at("# scale") == "comment" and tag_at("scale") == "comment"
    assert tag_at("\n") == "whitespace" and tag_at("    #") == "whitespace"
    # every token of an identifier shares the decision of its first token
    assert {t for c, t in tagged[SNIPPET.index("width", 40) : SNIPPET.index("width", 40) + 5]} == {
        "identifier (seen)"
    }


def test_code_tagger_survives_broken_code_and_bpe_tokens():
    tok = train_bpe([SNIPPET * 20], 300)
    broken = 'x = (1, "unterminated\n    y = [\n'
    ids = tok.encode(SNIPPET + broken)
    pieces = token_pieces(tok, ids)
    assert b"".join(pieces) == (SNIPPET + broken).encode()
    text, _starts, lengths = decode_with_offsets(pieces)
    assert text == SNIPPET + broken and sum(lengths) == len(text)
    tags = tag_stream(torch.tensor(ids), tok, "code")
    assert set(window_tags(tags, 0, len(ids))) <= set(CODE_TAGS)
    assert tag_windows(tags, [0], len(ids)).shape == (1, len(ids))


def test_text_tagger_tags_a_sentence():
    text = "the cat saw Alice. the cat ran, 3 times.\n"
    tagged = _tags_by_char(text, "text")
    at = {needle: tagged[text.index(needle)][1] for needle in ("the", "cat", "Alice", ".", ",", "3", "times")}
    assert at == {
        "the": "function word",
        "cat": "other",
        "Alice": "capitalised name",
        ".": "punctuation",
        ",": "punctuation",
        "3": "number",
        "times": "other",
    }
    assert tagged[text.index("cat", 10)][1] == "repeated word"
    assert tagged[text.index(" ")][1] == "whitespace"


def test_document_separator_has_its_own_tag():
    tok = byte_tokenizer()
    ids = [*tok.encode("x = 1\n"), tok.eos_id, *tok.encode("y = 2\n")]
    tags = window_tags(tag_stream(torch.tensor(ids), tok, "code"), 0, len(ids))
    assert tags[6] == "end of document" and tags[7] == "identifier (new)"


# ---- end to end --------------------------------------------------------------------------------------


def test_lab_tasks_end_to_end(code_data, tmp_path):
    out = tmp_path / "tasks"
    probes = tmp_path / "extra.jsonl"
    probes.write_text(
        json.dumps({"family": "mine", "prefix": "x = (1", "correct": ")", "distractor": "]"}) + "\n"
    )
    argv = [
        "lab",
        "tasks",
        "--out",
        str(out),
        "--data",
        str(code_data),
        "--probes",
        str(probes),
        "--no-progress",
        "--scale",
        "debug",
    ]
    assert main(argv) == 0
    for name in ("report.md", "results.json", "tag_curves.png", "tag_loss.png", "per_head.png", "probes.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())["results"]
    for label in ("n=1", "n=2"):
        head1 = results[label]["heads"]["head1"]
        assert abs(sum(t["share"] for t in head1["tags"].values()) - 1) < 1e-6
        assert abs(sum(t["contribution"] for t in head1["tags"].values()) - head1["total_loss"]) < 1e-6
        assert results[label]["curves"]["steps"][0] == 0
        assert "mine" in results[label]["probes"]["families"]
    report = (out / "report.md").read_text()
    assert report.startswith("# Next-token") and "multitoken lab tasks" in report

    # the same on an existing checkpoint, without training
    again = tmp_path / "again"
    ckpt = out / "runs" / "n2"
    assert (
        main(
            [
                "lab",
                "tasks",
                "--out",
                str(again),
                "--checkpoint",
                str(ckpt),
                "--data",
                str(code_data),
                "--no-progress",
                "--scale",
                "debug",
            ]
        )
        == 0
    )
    assert (again / "per_head.png").is_file()

    # a checkpoint without its tokenizer needs --data
    bare = tmp_path / "bare"
    shutil.copytree(study.checkpoint_steps(ckpt)[-1][1], bare)
    (bare / "tokenizer.json").unlink()
    assert (
        main(
            [
                "lab",
                "tasks",
                "--out",
                str(tmp_path / "bare_out"),
                "--checkpoint",
                str(bare),
                "--scale",
                "debug",
            ]
        )
        == 2
    )


def test_lab_bad_input_exits_2(code_data, tmp_path, capsys):
    assert main(["lab", "no-such-experiment"]) == 2
    assert (
        main(
            [
                "lab",
                "tasks",
                "--out",
                str(tmp_path),
                "--probes",
                str(tmp_path / "nope.jsonl"),
                "--scale",
                "debug",
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert (
        main(
            [
                "lab",
                "tasks",
                "--out",
                str(tmp_path),
                "--checkpoint",
                str(tmp_path / "nope"),
                "--scale",
                "debug",
            ]
        )
        == 2
    )
