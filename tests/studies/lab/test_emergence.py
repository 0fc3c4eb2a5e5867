"""lab emergence: edit distance, batched teacher-forced scores against an unbatched reference, baselines,
an oracle that scores perfectly, jump detection on synthetic curves, every scale's configs, end to end."""

from __future__ import annotations

import itertools
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from multitoken.cli import main
from multitoken.errors import UserError
from multitoken.studies.lab import emergence_metrics as em
from multitoken.studies.lab.emergence import (
    N_FUTURE,
    SCALES,
    addition_problems,
    answer_text,
    run_emergence,
)
from multitoken.tokenizer import byte_tokenizer

from conftest import tiny_model


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ("kitten", "sitting", 3),
        ("", "abc", 3),
        ("abc", "", 3),
        ("112", "112", 0),
        ("112", "12", 1),  # one deletion
        ("12", "21", 2),  # no transpositions in Levenshtein
        ("1100", "110", 1),
        ("99", "198", 2),  # insert 1, substitute 9 -> 8
        ([5, 6, 7], [5, 7], 1),  # token lists, not only strings
    ],
)
def test_edit_distance_on_hand_checked_cases(a, b, expected):
    assert em.edit_distance(a, b) == expected
    assert em.edit_distance(b, a) == expected


def test_batched_forced_scores_match_an_unbatched_reference():
    model = tiny_model(n_future=2).eval()
    g = torch.Generator().manual_seed(0)
    lengths = [(3, 2), (7, 4), (1, 1), (5, 3), (2, 5)]  # (prompt, answer): ragged, so rows are padded
    prompts = [torch.randint(0, 97, (p,), generator=g).tolist() for p, _ in lengths]
    answers = [torch.randint(0, 97, (a,), generator=g).tolist() for _, a in lengths]
    scores = em.forced_scores(model, prompts, answers, batch_size=2, pad_id=3)
    assert scores.logprob_BA.shape == (5, 5)
    for b, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        with torch.no_grad():
            logp_TV = F.log_softmax(model(torch.tensor([prompt + answer]))[0, :, 0].float(), dim=-1)
        for j, token in enumerate(answer):
            position = len(prompt) - 1 + j
            torch.testing.assert_close(
                scores.logprob_BA[b, j], logp_TV[position, token], atol=1e-5, rtol=1e-5
            )
            assert scores.correct_BA[b, j] == (logp_TV[position].argmax() == token)
        assert scores.mask_BA[b].tolist() == [j < len(answer) for j in range(5)]
        assert (scores.logprob_BA[b, len(answer) :] == 0).all() and not scores.correct_BA[
            b, len(answer) :
        ].any()


def test_scores_along_the_models_own_greedy_continuation():
    """Teacher forcing on the model's greedy tokens is top-1 everywhere; no EOS follows, so no exact match."""
    from multitoken.generate import generate

    model = tiny_model(n_future=1).eval()
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    greedy = generate(model, prompts, 5, speculative=False).tokens
    eos_id = next(i for i in range(97) if all(i not in row for row in greedy))
    problems = [em.Problem(p, row[:3]) for p, row in zip(prompts, greedy, strict=True)]
    scores = em.score_problems(model, problems, eos_id=eos_id)
    assert scores["token_accuracy"] == 1.0
    assert scores["exact_match"] == 0.0 and scores["all_tokens_correct"] == 0.0
    assert scores["edit_distance"] == 2.0  # the greedy answer runs 2 tokens past the 3 true ones
    assert scores["answer_logprob"] < 0 and scores["token_logprob"] == pytest.approx(
        scores["answer_logprob"] / 4
    )


class Oracle(nn.Module):
    """Teacher-forced logits that put all the mass on the token that really comes next."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))
        self.vocab_size = vocab_size

    def forward(self, tokens_BT):
        return 100.0 * F.one_hot(tokens_BT.roll(-1, dims=1), self.vocab_size).float()[:, :, None]


@pytest.mark.parametrize("wrong_every", [0, 2])
def test_an_oracle_scores_perfectly_and_a_digit_dropper_does_not(wrong_every, monkeypatch):
    tokenizer = byte_tokenizer()
    pairs = [(12, 34), (95, 17), (49, 51), (70, 99)]
    problems = addition_problems(pairs)
    assert [tokenizer.decode(p.prompt[1:]) for p in problems] == ["12+34=", "95+17=", "49+51=", "70+99="]
    assert [tokenizer.decode(p.answer) for p in problems] == ["46", "112", "100", "169"]

    def fake_generate(model, prompts, max_new_tokens, eos_id, speculative):
        """Greedy answers: the true sum, with the last digit dropped on every `wrong_every`-th problem."""
        texts = []
        for i, ids in enumerate(prompts):
            a, b = (int(x) for x in tokenizer.decode(ids[1:]).rstrip("=").split("+"))
            texts.append(str(a + b)[:-1] if wrong_every and i % wrong_every == 0 else str(a + b))
            assert len(texts[-1]) <= max_new_tokens
        return SimpleNamespace(
            tokens=[tokenizer.encode(t) for t in texts], finish_reasons=["eos"] * len(texts)
        )

    monkeypatch.setattr(em, "generate", fake_generate)
    scores = em.score_problems(Oracle(tokenizer.vocab_size), problems, eos_id=tokenizer.eos_id)
    assert scores["token_accuracy"] == 1.0 and scores["all_tokens_correct"] == 1.0
    assert -1e-6 < scores["answer_logprob"] <= 0
    if wrong_every:
        assert scores["exact_match"] == 0.5 and scores["edit_distance"] == 0.5
    else:
        assert scores["exact_match"] == 1.0 and scores["edit_distance"] == 0.0


def test_random_baselines_and_resolution():
    answers = ["12", "345"]
    base = em.random_baselines(answers, samples=3000, seed=0)
    assert base["token_accuracy"] == 0.1
    assert base["exact_match"] == pytest.approx((1e-2 + 1e-3) / 2)
    assert base["answer_logprob"] == pytest.approx(-3.5 * math.log(11))
    assert em.resolution(answers) == {"exact_match": 0.5, "token_accuracy": 0.2}
    # The Monte-Carlo edit distance against the exact mean over all 100 two-digit guesses.
    guesses = ["".join(g) for g in itertools.product(em.DIGITS, repeat=2)]
    exact = sum(em.edit_distance(guess, "12") for guess in guesses) / len(guesses)
    assert em.random_edit_distance(["12"], em.DIGITS, 3000, seed=1) == pytest.approx(exact, abs=0.03)
    # Two letters, answer "ab": guesses aa, ab, ba, bb are 1, 0, 2, 1 edits away.
    assert em.random_edit_distance(["ab"], "ab", 4000, seed=2) == pytest.approx(1.0, abs=0.05)
    assert 1.5 < base["edit_distance"] < 3  # almost every digit is wrong, some alignments save one


def test_jump_detection_on_synthetic_curves():
    assert em.floor_threshold(0.001, 0.005) == pytest.approx(0.025)
    assert em.first_at_least([0.0, 0.0, 0.01, 0.3, 0.6], 0.025) == 3
    assert em.first_at_least([0.0, 0.02, 0.01], 0.025) is None
    assert em.steepest_rise([0.0, 0.1, 0.5, 0.6]) == 2
    assert em.steepest_rise([0.3, 0.2, 0.2]) is None
    assert em.share_of_gain([0.1, 0.5, 0.9], 1, start=0.1) == pytest.approx(0.5)
    assert em.share_of_gain([0.0, 0.5, 0.9], 1, start=0.1) == pytest.approx(0.5)  # gain over the guess
    assert math.isnan(em.share_of_gain([0.3, 0.3], 0, start=0.3))
    assert em.r_squared([0.0, 0.5, 1.0], [0.0, 0.5, 1.0]) == 1.0
    assert em.r_squared([0.0, 0.5, 1.0], [0.5, 0.5, 0.5]) == 0.0  # predicting the mean explains nothing
    assert math.isnan(em.r_squared([0.2, 0.2], [0.1, 0.3]))

    curves = {
        "step": [0, 10, 20, 30, 40],
        "exact_match": [0.0, 0.0, 0.03, 0.4, 0.8],
        "token_accuracy": [0.0, 0.5, 0.7, 0.8, 0.9],
        "answer_logprob": [-20.0, -10.0, -6.0, -4.0, -2.0],
        "edit_distance": [4.0, 2.0, 1.5, 0.8, 0.2],
    }
    baselines = {"exact_match": 0.0, "token_accuracy": 0.1, "answer_logprob": -8.0, "edit_distance": 2.2}
    summary = em.summarise(curves, threshold=0.025, baselines=baselines)
    assert summary["floor_step"] == 20  # first at or above 2.5%
    assert summary["jump_from_step"] == 30 and summary["jump_step"] == 40  # +40 points, the steepest rise
    assert summary["exact_match"] == 0.8 and summary["token_accuracy"] == 0.9
    assert summary["share_in_jump"]["exact_match"] == pytest.approx(0.5)
    assert summary["share_in_jump"]["token_accuracy"] == pytest.approx(0.1 / 0.8)
    assert summary["share_before_jump"]["token_accuracy"] == pytest.approx(0.7 / 0.8)
    assert summary["share_before_jump"]["answer_logprob"] == pytest.approx(4 / 6)
    assert summary["share_before_jump"]["edit_distance"] == pytest.approx(1.4 / 2.0)
    flat = em.summarise({**curves, "exact_match": [0.0, 0.02, 0.0, 0.01, 0.02]}, 0.025, baselines)
    assert flat["floor_step"] is None and flat["jump_step"] is None and flat["share_in_jump"] == {}

    models = {
        f"d{dim}-L2-n{n}": {
            "dim": dim, "n_layers": 2, "n_heads": 2, "n_future": n, "params": 1000 * dim, "curves": curves,
            "final": em.summarise(curves if dim == 64 else {**curves, "exact_match": [0.0] * 5}, 0.025, baselines),
        }
        for dim in (32, 64) for n in N_FUTURE
    }  # fmt: skip
    results = {
        "models": models,
        "baselines": em.random_baselines(["12", "345"], samples=10),
        "resolution": {"exact_match": 0.005, "token_accuracy": 0.001},
        "floor_threshold": 0.025,
        "n_test": 200,
        "mean_answer_digits": 2.5,
    }
    text = answer_text(results)
    assert "best model, d64-L2-n1, left the exact-match floor" in text and "at step 20" in text
    assert "between steps 30 and 40 (40.0% -> 80.0%, 50% of its whole gain" in text
    assert "per-token accuracy made 12% of its gain" in text and "already made 88%" in text
    assert "2 of 4 models left the floor" in text and "d32-L2 0.0% vs 0.0%" in text
    assert (
        "R^2 = " in text and "rose steeply in the same interval too" in text
    )  # 50% vs at most 33% of the gain: the middle band


@pytest.mark.parametrize("scale", list(SCALES))
def test_every_scale_builds_valid_configs(scale, tmp_path):
    preset = SCALES[scale]
    assert len(preset.sizes) >= 2 and preset.n_test <= (9 * 10 ** (preset.digits - 1)) ** 2 // 4
    for budget in preset.budgets():
        for n in N_FUTURE:
            model = budget.model_fields(n, max_seq_len=preset.seq_len)
            cfg = budget.train_config(
                data=tmp_path, out=tmp_path, model=model, seed=0, device="cpu", progress=False
            )
            assert cfg.model_config(vocab_size=258).n_future == n


def test_debug_run_writes_report(tmp_path, capsys):
    out = tmp_path / "emergence"
    assert main(["lab", "emergence", "--scale", "debug", "--out", str(out), "--device", "cpu"]) == 0
    lines = (out / "report.md").read_text().splitlines()
    assert lines[0].startswith("# ") and lines[2].startswith("**Question.**")
    assert lines[4].startswith("**Answer (this run).**") and "](emergence_steps.png)" in lines[6]
    for name in ("emergence_steps.png", "emergence_params.png", "exact_vs_token.png"):
        assert (out / name).stat().st_size > 1000
    payload = json.loads((out / "results.json").read_text())
    assert payload["command"].startswith("multitoken lab emergence") and "--scale debug" in payload["command"]
    results, preset = payload["results"], SCALES["debug"]
    assert results["n_test"] == preset.n_test and results["resolution"]["exact_match"] == 1 / preset.n_test
    assert set(results["models"]) == {f"d{d}-L{b}-n{n}" for d, b, _ in preset.sizes for n in N_FUTURE}
    for m in results["models"].values():
        c = m["curves"]
        assert c["step"] == [0, 2, 4, 6, 8]  # the initialisation and every kept checkpoint
        assert all(0 <= v <= 1 for v in c["exact_match"] + c["token_accuracy"])
        assert all(v < 0 for v in c["answer_logprob"]) and all(v >= 0 for v in c["edit_distance"])
        assert m["final"]["token_accuracy"] == c["token_accuracy"][-1] and m["params"] > 0
    assert "emergence: final metrics" in capsys.readouterr().out


def test_bad_input_is_one_line_and_status_2(tmp_path, capsys):
    assert main(["lab", "emergence", "--scale", "huge", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "huge" in err
    with pytest.raises(UserError, match="unknown scale 'huge'"):
        run_emergence(str(tmp_path), "huge", 0, "cpu", [])
