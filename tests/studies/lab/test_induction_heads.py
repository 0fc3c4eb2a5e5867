"""lab induction-heads: target positions, recomputed attention, scores, the copying stub, end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from multitoken.cli import main
from multitoken.config import ModelConfig
from multitoken.data.shards import PrepareConfig, prepare
from multitoken.model import Attention
from multitoken.studies.lab.induction_heads import (
    attention_patterns,
    attention_probs,
    attention_sites,
    copy_losses,
    head_scores,
    icl_positions,
    prefix_match_targets,
    repeated_random_tokens,
    rise_step,
)

from conftest import tiny_model


def test_prefix_match_targets():
    assert prefix_match_targets(torch.tensor([5, 6, 7, 5, 6, 7])).tolist() == [-1, -1, -1, 1, 2, 3]
    assert prefix_match_targets(torch.tensor([1, 2, 1, 1])).tolist() == [-1, -1, 1, 3]


def test_repeated_random_tokens():
    g = torch.Generator().manual_seed(0)
    tokens_BT, period_B = repeated_random_tokens(3, 20, list(range(2, 50)), g)
    assert (period_B == 10).all() and torch.equal(tokens_BT[:, :10], tokens_BT[:, 10:])
    assert all(len(set(row[:10].tolist())) == 10 for row in tokens_BT)  # distinct, so targets are unambiguous
    targets = prefix_match_targets(tokens_BT[0])
    assert targets[10:].tolist() == list(range(1, 11))
    tokens_BT, period_B = repeated_random_tokens(8, 40, list(range(2, 200)), g, random_period=True)
    for row, period in zip(tokens_BT, period_B.tolist(), strict=True):
        assert 10 <= period <= 20 and torch.equal(row[period:], row[: 40 - period])
    assert len(set(period_B.tolist())) > 1


@pytest.mark.parametrize("style", ["transformer", "sequential"])
def test_recomputed_attention_reproduces_the_module_output(style):
    model = tiny_model(n_future=2, head_style=style).eval()
    tokens_BT = torch.randint(0, 97, (2, 24))
    sites = attention_sites(model)
    names = [s.name for s in sites]
    assert names[0] == "trunk.0" and names[-1] == "heads.1"
    outputs, hooks = {}, []
    for site in sites:

        def hook(module: Attention, args, output, name=site.name):
            x_BTD, rope = args
            probs_BHTS = attention_probs(module, x_BTD, rope)
            B, T, _ = x_BTD.shape
            v_BKTE = module.wv(x_BTD).view(B, T, module.n_kv_heads, module.head_dim).transpose(1, 2)
            v_BHTE = v_BKTE.repeat_interleave(module.n_heads // module.n_kv_heads, dim=1)
            mine = module.wo((probs_BHTS @ v_BHTE).transpose(1, 2).reshape(B, T, -1))
            outputs[name] = (mine, output)

        hooks.append(site.module.register_forward_hook(hook))
    with torch.no_grad():
        model(tokens_BT)
    for h in hooks:
        h.remove()
    assert set(outputs) == set(names)
    for mine, theirs in outputs.values():
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4)


def test_scores_of_a_random_model_are_in_0_1_and_named_per_head():
    model = tiny_model(n_future=2).eval()
    g = torch.Generator().manual_seed(1)
    tokens_BT, period_B = repeated_random_tokens(2, 32, list(range(97)), g)
    patterns = attention_patterns(model, tokens_BT)
    for attn_BHTS in patterns.values():
        torch.testing.assert_close(attn_BHTS.sum(-1), torch.ones(attn_BHTS.shape[:-1]))
        assert attn_BHTS.triu(1).abs().max() == 0  # causal
    scores = head_scores(patterns, tokens_BT, period_B)
    assert "trunk.0.h0" in scores and "heads.1.h3" in scores and len(scores) == 6 * 4
    assert all(0 <= p <= 1 and 0 <= q <= 1 for p, q in scores.values())


def test_hand_built_patterns_score_one():
    tokens_BT = torch.tensor([[3, 4, 5, 6, 3, 4, 5, 6]])
    period_B = torch.tensor([4])
    T = 8
    induction = torch.zeros(1, 1, T, T)
    previous = torch.zeros(1, 1, T, T)
    targets = prefix_match_targets(tokens_BT[0])
    for i in range(T):
        induction[0, 0, i, targets[i] if targets[i] >= 0 else 0] = 1
        previous[0, 0, i, max(i - 1, 0)] = 1
    scores = head_scores({"trunk.1": induction, "trunk.0": previous}, tokens_BT, period_B)
    assert scores["trunk.1.h0"][0] == 1.0
    assert scores["trunk.0.h0"] == (0.0, 1.0)


class PerfectCopier(torch.nn.Module):
    """A stub that predicts the token after the previous occurrence of the current token."""

    def __init__(self, vocab: int):
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab, dim=8, n_layers=1, n_heads=1, max_seq_len=256)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, tokens_BT):
        B, T = tokens_BT.shape
        logits_BTNV = torch.zeros(B, T, 1, self.config.vocab_size)
        for b in range(B):
            targets = prefix_match_targets(tokens_BT[b])
            for t in range(T):
                if targets[t] >= 0:
                    logits_BTNV[b, t, 0, tokens_BT[b, targets[t]]] = 30.0
        return logits_BTNV


def test_a_perfect_copier_has_a_high_behavioural_score():
    V = 64
    g = torch.Generator().manual_seed(0)
    for random_period in (False, True):
        tokens_BT, period_B = repeated_random_tokens(4, 48, list(range(V)), g, random_period=random_period)
        first, repeat = copy_losses(PerfectCopier(V), tokens_BT, period_B)
        assert first == pytest.approx(math.log(V), rel=1e-3)
        assert repeat < 1e-3


def test_icl_positions_and_rise_step():
    assert icl_positions(512) == (50, 500, 16)
    early, late, width = icl_positions(64)
    assert early - width >= 1 and late + width <= 64
    assert rise_step([0, 1, 2, 3], [0.0, 0.1, 0.6, 0.8]) == 2
    assert rise_step([0, 1], [0.2, 0.21]) is None


@pytest.fixture(scope="module")
def code_data(tmp_path_factory):
    import inspect
    import textwrap

    root = tmp_path_factory.mktemp("lab_induction")
    corpus = root / "corpus"
    corpus.mkdir()
    for module in (textwrap, json.decoder, json.encoder):
        (corpus / f"{module.__name__}.py").write_text(inspect.getsource(module)[:20000])
    return prepare(
        PrepareConfig(source=str(corpus), tokenizer="byte", out=str(root / "data"), val_fraction=0.3)
    )


def test_lab_induction_heads_end_to_end(code_data, tmp_path):
    out = tmp_path / "induction"
    assert (
        main(
            [
                "lab",
                "induction-heads",
                "--out",
                str(out),
                "--data",
                str(code_data),
                "--no-progress",
                "--scale",
                "debug",
            ]
        )
        == 0
    )
    for name in ("report.md", "results.json", "phase_change.png", "heads.png", "heads_over_training.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results["runs"]) == {"n=1", "n=2", "1 layer"}
    final = results["runs"]["n=1"][-1]
    assert "trunk.0.h0" in final["heads"] and "heads.0.h1" in final["heads"]
    assert all(0 <= h["prefix"] <= 1 for h in final["heads"].values())
    assert [m["step"] for m in results["runs"]["1 layer"]] == [0, 2, 4, 6]
