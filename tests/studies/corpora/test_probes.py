"""Minimal-pair probes: scoring with stub models, malformed files, the built-in sets."""

from __future__ import annotations

import json

import pytest
import torch

from multitoken.config import ModelConfig
from multitoken.errors import UserError
from multitoken.studies.corpora.probes import (
    Probe,
    builtin_probes,
    encode_pair,
    family_accuracy,
    load_probes,
    parse_probes,
    score_probes,
)
from multitoken.tokenizer import byte_tokenizer

# ---- probes ------------------------------------------------------------------------------------------


class PreferByte(torch.nn.Module):
    """A stub LM over bytes that puts a high logit on one byte value everywhere."""

    def __init__(self, favourite: str):
        super().__init__()
        self.config = ModelConfig(vocab_size=258, dim=8, n_layers=1, n_heads=1, max_seq_len=64)
        self.favourite = ord(favourite)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, tokens_BT):
        logits_BTNV = torch.zeros(*tokens_BT.shape, 1, 258)
        logits_BTNV[..., self.favourite] = 10.0
        return logits_BTNV


def _probes() -> list[Probe]:
    lines = [
        json.dumps({"family": f"f{i % 2}", "prefix": "abc" * i, "correct": "xx", "distractor": "yy"})
        for i in range(6)
    ]
    return parse_probes("\n".join(["# comment", "", *lines]), "mine.jsonl")


def test_probes_score_a_stub_that_prefers_correct_or_distractor():
    tok = byte_tokenizer()
    right = score_probes(PreferByte("x"), tok, _probes())
    wrong = score_probes(PreferByte("y"), tok, _probes())
    assert all(r.right for r in right) and not any(r.right for r in wrong)
    assert family_accuracy(right) == {"f0": (1.0, 3), "f1": (1.0, 3)}
    assert family_accuracy(wrong) == {"f0": (0.0, 3), "f1": (0.0, 3)}


def test_probe_longer_than_the_context_is_a_user_error():
    long = parse_probes(
        json.dumps({"family": "f", "prefix": "a" * 100, "correct": "x", "distractor": "y"}), "p"
    )
    with pytest.raises(UserError, match="context"):
        score_probes(PreferByte("x"), byte_tokenizer(), long)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"family": "f", "prefix": "a", "correct": "b", "distractor": "c"}\n{broken', "bad.jsonl:2"),
        ('{"family": "f", "prefix": "a", "correct": "b"}', "distractor"),
        ("[1, 2]", "JSON object"),
        ('{"family": "f", "prefix": "a", "correct": "b", "distractor": "b"}', "different"),
        ("", "no probes"),
    ],
)
def test_malformed_probe_files_are_user_errors(tmp_path, text, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        load_probes(path)
    with pytest.raises(UserError, match="does not exist"):
        load_probes(tmp_path / "missing.jsonl")


def test_builtin_probe_sets_are_well_formed():
    for domain in ("code", "text"):
        probes = builtin_probes(domain)
        families = family_accuracy([type("R", (), {"probe": p, "right": True})() for p in probes])
        assert len(probes) >= 40 and len(families) >= 8


def test_encode_pair_splits_the_joint_encoding():
    tok = byte_tokenizer()
    assert encode_pair(tok, "ab", "cd") == ([97, 98], [99, 100])
