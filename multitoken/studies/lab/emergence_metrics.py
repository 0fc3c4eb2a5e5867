"""Metrics of `lab emergence`: one discontinuous (exact match), three continuous, their chance levels.

Every metric scores the answer of a multi-token problem (a digit string followed by EOS) given its prompt:

- exact match: the greedy continuation stops at EOS with exactly the answer (all or nothing);
- answer log-prob: teacher-forced sum of log p(answer token) under the next-token head, EOS included;
- per-token accuracy: teacher-forced top-1 accuracy on the answer's digit tokens (EOS left out);
- token edit distance: Levenshtein distance between the greedy answer and the true one, in tokens.

Dimension legend: B problems, T positions, V vocabulary, A answer positions.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from multitoken.generate import generate

DIGITS = "0123456789"
"""Alphabet of the answers; the random baselines guess uniformly over it (and EOS for the log-prob)."""
FLOOR_FACTOR = 5.0
"""Exact match has left the floor once it reaches this many times max(resolution, random baseline)."""


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance: fewest insertions, deletions and substitutions turning `a` into `b`."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        current = [i]
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


# ---- teacher-forced scores -----------------------------------------------------------------------


@dataclass
class ForcedScores:
    """Teacher-forced scores of each answer token under the next-token head, right-padded to A."""

    logprob_BA: Tensor
    """log p(answer token a | prompt, answer tokens before a); 0 where there is no token."""
    correct_BA: Tensor
    """Whether the head's top-1 prediction is the answer token."""
    mask_BA: Tensor
    """Where row b has an answer token a."""


@torch.no_grad()
def forced_scores(
    model, prompts: list[list[int]], answers: list[list[int]], batch_size: int = 64, pad_id: int = 0
) -> ForcedScores:
    """Score `answers[b]` as the continuation of `prompts[b]`, in right-padded batches of full sequences.

    Right padding changes nothing before it (attention is causal and positions start at 0 in every row),
    so each row's scores are those of the row alone.
    """
    device = next(model.parameters()).device
    width = max(len(a) for a in answers)
    parts = []
    for first in range(0, len(prompts), batch_size):
        rows = list(
            zip(prompts[first : first + batch_size], answers[first : first + batch_size], strict=True)
        )
        T = max(len(p) + len(a) for p, a in rows)
        tokens_BT = torch.full((len(rows), T), pad_id, dtype=torch.long)
        for b, (p, a) in enumerate(rows):
            tokens_BT[b, : len(p) + len(a)] = torch.tensor(p + a)
        prompt_len_B = torch.tensor([len(p) for p, _ in rows])
        answer_len_B = torch.tensor([len(a) for _, a in rows])
        # The logits at position t predict token t + 1: answer token a of row b comes from len(p) - 1 + a.
        pos_BA = prompt_len_B[:, None] - 1 + torch.arange(width)
        mask_BA = torch.arange(width) < answer_len_B[:, None]
        pos_BA = torch.where(mask_BA, pos_BA, 0)
        targets_BA = tokens_BT.gather(1, torch.where(mask_BA, pos_BA + 1, 0))
        logits_BTV = model(tokens_BT.to(device))[:, :, 0].float().cpu()
        logits_BAV = logits_BTV.gather(1, pos_BA[:, :, None].expand(-1, -1, logits_BTV.shape[-1]))
        logp_BAV = F.log_softmax(logits_BAV, dim=-1)
        logprob_BA = logp_BAV.gather(-1, targets_BA[:, :, None]).squeeze(-1)
        correct_BA = (logp_BAV.argmax(-1) == targets_BA) & mask_BA
        parts.append((torch.where(mask_BA, logprob_BA, 0.0), correct_BA, mask_BA))
    return ForcedScores(*(torch.cat(group) for group in zip(*parts, strict=True)))


# ---- all metrics of one model --------------------------------------------------------------------


@dataclass
class Problem:
    """A prompt and its answer, as token ids (the answer without EOS)."""

    prompt: list[int]
    """Token ids the model continues (starting with EOS, as a document does in the training stream)."""
    answer: list[int]
    """Token ids of the true answer, EOS not included."""


def score_problems(model, problems: list[Problem], eos_id: int, batch_size: int = 64) -> dict[str, float]:
    """The four metrics of one model on `problems`, means over problems; also the log-prob per answer token
    and `all_tokens_correct` (every answer token and EOS teacher-forced top-1: greedy exact match, up to ties).
    """
    prompts = [p.prompt for p in problems]
    budget = max(len(p.answer) for p in problems) + 2  # room to overshoot, so a missing EOS costs distance
    exact, distance = [], []
    for first in range(0, len(problems), batch_size):
        batch = problems[first : first + batch_size]
        out = generate(model, prompts[first : first + batch_size], budget, eos_id=eos_id, speculative=False)
        for problem, tokens, reason in zip(batch, out.tokens, out.finish_reasons, strict=True):
            exact.append(float(reason == "eos" and tokens == problem.answer))
            distance.append(float(edit_distance(tokens, problem.answer)))
    forced = forced_scores(model, prompts, [[*p.answer, eos_id] for p in problems], batch_size, pad_id=eos_id)
    answer_tokens_B = forced.mask_BA.sum(1)
    digits_mask_BA = forced.mask_BA & (torch.arange(forced.mask_BA.shape[1]) < answer_tokens_B[:, None] - 1)
    logprob_B = forced.logprob_BA.sum(1)
    return {
        "exact_match": mean(exact),
        "answer_logprob": logprob_B.mean().item(),
        "token_logprob": (logprob_B / answer_tokens_B).mean().item(),
        "token_accuracy": (forced.correct_BA & digits_mask_BA).sum().item() / digits_mask_BA.sum().item(),
        "edit_distance": mean(distance),
        "all_tokens_correct": forced.correct_BA.sum(1).eq(answer_tokens_B).float().mean().item(),
    }


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean (0 for none)."""
    return sum(values) / len(values) if values else 0.0


def r_squared(observed: Sequence[float], predicted: Sequence[float]) -> float:
    """1 - residual / total sum of squares of `observed` around `predicted` (NaN if observed is constant)."""
    centre = mean(observed)
    total = sum((o - centre) ** 2 for o in observed)
    residual = sum((o - p) ** 2 for o, p in zip(observed, predicted, strict=True))
    return 1 - residual / total if total > 0 else math.nan


# ---- chance levels and resolution ----------------------------------------------------------------


def random_edit_distance(answers: list[str], alphabet: str, samples: int, seed: int) -> float:
    """Monte-Carlo mean edit distance between each answer and uniform random strings of its length."""
    rng = random.Random(seed)
    total = 0
    for answer in answers:
        for _ in range(samples):
            guess = "".join(rng.choice(alphabet) for _ in answer)
            total += edit_distance(guess, answer)
    return total / (len(answers) * samples)


def random_baselines(answers: list[str], samples: int = 200, seed: int = 0) -> dict[str, float]:
    """Each metric for a guesser that knows the answer's length and writes uniform random digits.

    Exact match is the mean of 10^-L; per-token accuracy 1/10; the answer log-prob is that of a uniform
    guess over the ten digits and EOS, -(L + 1) log 11; the edit distance is estimated by Monte Carlo with
    `samples` seeded random strings per answer.
    """
    k = len(DIGITS)
    return {
        "exact_match": mean([k ** -len(a) for a in answers]),
        "answer_logprob": -mean([len(a) + 1 for a in answers]) * math.log(k + 1),
        "token_logprob": -math.log(k + 1),
        "token_accuracy": 1 / k,
        "edit_distance": random_edit_distance(answers, DIGITS, samples, seed),
    }


def resolution(answers: list[str]) -> dict[str, float]:
    """The smallest nonzero value the test set can show: 1/n for exact match, 1/(digit tokens) per token."""
    return {"exact_match": 1 / len(answers), "token_accuracy": 1 / sum(len(a) for a in answers)}


# ---- reading the curves --------------------------------------------------------------------------


def floor_threshold(random_em: float, resolution_em: float, factor: float = FLOOR_FACTOR) -> float:
    """Exact match at or above which it has left the floor (chance and resolution, times `factor`)."""
    return factor * max(random_em, resolution_em)


def first_at_least(values: Sequence[float], threshold: float) -> int | None:
    """Index of the first value at or above `threshold` (None if there is none)."""
    return next((i for i, v in enumerate(values) if v >= threshold), None)


def steepest_rise(values: Sequence[float]) -> int | None:
    """Index i of the largest rise values[i] - values[i - 1] (None if nothing rises)."""
    rises = [(b - a, i) for i, (a, b) in enumerate(itertools.pairwise(values), start=1)]
    best = max(rises, default=(0.0, None), key=lambda r: r[0])
    return best[1] if best[0] > 0 else None


def share_of_gain(values: Sequence[float], index: int, start: float) -> float:
    """(values[index] - start) / (values[-1] - start): how much of the gain from `start` was made by `index`."""
    total = values[-1] - start
    return (values[index] - start) / total if abs(total) > 1e-12 else math.nan


def summarise(
    curves: dict[str, list[float]], threshold: float, baselines: dict[str, float]
) -> dict[str, Any]:
    """Final values of a model's curves, where its exact match jumped, and what the other metrics did then.

    Exact match leaves the floor at the first checkpoint at or above `threshold`; once it has, the jump is
    the interval of its steepest rise. Shares are of each metric's gain over its random baseline at the
    last checkpoint: made within the jump interval, and made before it.
    """
    steps, exact = curves["step"], curves["exact_match"]
    floor = first_at_least(exact, threshold)
    jump = steepest_rise(exact) if floor is not None else None
    summary: dict[str, Any] = {name: values[-1] for name, values in curves.items() if name != "step"}
    summary |= {
        "floor_step": steps[floor] if floor is not None else None,
        "jump_step": steps[jump] if jump is not None else None,
        "jump_from_step": steps[jump - 1] if jump is not None else None,
        "share_in_jump": {},
        "share_before_jump": {},
    }
    if jump is not None:
        for name, start in baselines.items():
            if name in curves:
                values = curves[name]
                summary["share_in_jump"][name] = share_of_gain(values, jump, start) - share_of_gain(
                    values, jump - 1, start
                )
                summary["share_before_jump"][name] = share_of_gain(values, jump - 1, start)
    return summary
