"""lab think: the three addition formats on hand-checked sums, answer extraction, the command end to end."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest

from multitoken.cli import main
from multitoken.studies.corpora.arithmetic import (
    completion,
    document,
    extract_answer,
    held_out_pairs,
    train_pairs,
)
from multitoken.studies.lab import think
from multitoken.studies.lab.think import FORMATS
from multitoken.tokenizer import byte_tokenizer


@pytest.mark.parametrize(
    "a, b, fmt, expected",
    [
        (12, 34, "direct", "12+34=46"),
        (12, 34, "reversed", "12+34=64"),
        (12, 34, "scratchpad", "12+34=2+4=6 c0;1+3+0=4 c0;=46"),
        (95, 17, "direct", "95+17=112"),
        (95, 17, "reversed", "95+17=211"),
        (95, 17, "scratchpad", "95+17=5+7=2 c1;9+1+1=1 c1;=112"),
        (7, 5, "scratchpad", "7+5=7+5=2 c1;=12"),
        (3, 4, "reversed", "3+4=7"),
        (909, 191, "scratchpad", "909+191=9+1=0 c1;0+9+1=0 c1;9+1+1=1 c1;=1100"),
        (909, 191, "reversed", "909+191=0011"),
    ],
)
def test_formats_on_hand_checked_sums(a, b, fmt, expected):
    assert document(fmt, a, b) == expected
    assert "\n" not in expected


def test_extraction_inverts_every_format():
    rng = random.Random(0)
    pairs = [
        (95, 17),
        (0, 0),
        (9, 9),
        (999, 1),
        *[(rng.randint(0, 9999), rng.randint(0, 9999)) for _ in range(200)],
    ]
    for fmt in FORMATS:
        for a, b in pairs:
            assert extract_answer(fmt, completion(fmt, a, b)) == str(a + b), (fmt, a, b)


def test_test_pairs_are_held_out_and_sized_by_digits():
    tests = held_out_pairs(1, (1, 2), 40)
    assert len(tests[1]) == 25 and len(tests[2]) == 40  # at most a quarter of the 100 one-digit pairs
    assert all(0 <= a <= 9 and 0 <= b <= 9 for a, b in tests[1])
    assert all(10 <= a <= 99 and 10 <= b <= 99 for a, b in tests[2])
    held_out = {p for pairs in tests.values() for p in pairs}
    assert not held_out & set(train_pairs(0, (1, 2), 2000, held_out))


def test_debug_run_writes_report(tmp_path, capsys):
    out = tmp_path / "think"
    assert main(["lab", "think", "--scale", "debug", "--out", str(out), "--device", "cpu"]) == 0
    lines = (out / "report.md").read_text().splitlines()
    assert lines[0].startswith("# ") and lines[2].startswith("**Question.**")
    assert lines[4].startswith("**Answer (this run).**") and "](think.png)" in lines[6]
    assert (out / "think.png").stat().st_size > 1000
    results = json.loads((out / "results.json").read_text())
    assert set(results["results"]) == {f"{fmt}-n{n}" for fmt in FORMATS for n in (1, 2)}
    train_tokens = {r["train_tokens"] for r in results["results"].values()}
    assert len(train_tokens) == 1  # equal token budgets
    for r in results["results"].values():
        assert set(r["exact_match_by_digits"]) == {"1", "2"}
        assert 0 <= r["exact_match_mean"] <= 1
    assert "think: exact match" in capsys.readouterr().out
    assert results["command"].startswith("multitoken lab think") and "--scale debug" in results["command"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_exact_match_scores_the_extracted_answer(fmt, monkeypatch):
    tokenizer = byte_tokenizer()

    def fake_generate(model, prompts, max_new_tokens, eos_id, speculative):
        """An oracle that is right on a+b with a < 50 and drops the last character otherwise."""
        texts = []
        for ids in prompts:
            a, b = (int(x) for x in tokenizer.decode(ids[1:]).rstrip("=").split("+"))
            text = completion(fmt, a, b)
            assert len(text) <= max_new_tokens
            texts.append(text if a < 50 else text[:-1])
        return SimpleNamespace(
            tokens=[tokenizer.encode(t) for t in texts], finish_reasons=["eos"] * len(texts)
        )

    monkeypatch.setattr(think, "generate", fake_generate)
    assert think.exact_match(None, fmt, [(12, 34), (95, 17), (49, 51), (70, 1)]) == 0.5
