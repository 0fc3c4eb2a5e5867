"""Addition problems `a+b=` and their answers in three formats, as byte-level corpora (lab think, emergence).

    direct      95+17=112
    reversed    95+17=211                        answer digits least-significant first, as carries flow
    scratchpad  95+17=5+7=2 c1;9+1+1=1 c1;=112   one step per digit, least-significant first

A scratchpad step is `x+y=s cC` for the units digit and `x+y+c=s cC` afterwards: the operand digits,
the incoming carry, the sum digit and the outgoing carry; after the last step, `=` and the answer.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from multitoken.data.shards import PrepareConfig, prepare

VAL_FRACTION = 0.05
"""Share of training problems kept for the validation loss (enough for a window even at debug scale)."""


def prompt(a: int, b: int) -> str:
    """The text the model continues: `a+b=`."""
    return f"{a}+{b}="


def scratchpad_steps(a: int, b: int) -> str:
    """Per-digit steps, least-significant first: `x+y=s cC` then `x+y+c=s cC`, each followed by `;`."""
    width = max(len(str(a)), len(str(b)))
    da, db = str(a).zfill(width)[::-1], str(b).zfill(width)[::-1]
    steps, carry = [], 0
    for i, (x, y) in enumerate(zip(da, db, strict=True)):
        total = int(x) + int(y) + carry
        lhs = f"{x}+{y}" if i == 0 else f"{x}+{y}+{carry}"
        carry = total // 10
        steps.append(f"{lhs}={total % 10} c{carry};")
    return "".join(steps)


def completion(fmt: str, a: int, b: int) -> str:
    """What follows the prompt `a+b=` in format `fmt`."""
    answer = str(a + b)
    if fmt == "direct":
        return answer
    if fmt == "reversed":
        return answer[::-1]
    if fmt == "scratchpad":
        return f"{scratchpad_steps(a, b)}={answer}"
    raise ValueError(f"unknown format {fmt!r}")


def document(fmt: str, a: int, b: int) -> str:
    """One training line: prompt and completion."""
    return prompt(a, b) + completion(fmt, a, b)


def extract_answer(fmt: str, text: str) -> str:
    """The final answer in a completion, written most-significant first (inverse of `completion`)."""
    if fmt == "reversed":
        return text[::-1]
    if fmt == "scratchpad":
        return text.rsplit("=", 1)[-1]
    return text


# ---- problems ------------------------------------------------------------------------------------------


def number_range(d: int) -> tuple[int, int]:
    """Inclusive range of d-digit numbers (0-9 for d = 1)."""
    return (0 if d == 1 else 10 ** (d - 1)), 10**d - 1


def random_pair(rng: random.Random, d: int) -> tuple[int, int]:
    """Two uniform d-digit numbers."""
    low, high = number_range(d)
    return rng.randint(low, high), rng.randint(low, high)


def held_out_pairs(seed: int, digits: tuple[int, int], n_test: int) -> dict[int, list[tuple[int, int]]]:
    """Per digit count, distinct pairs (at most a quarter of all pairs of that size) held out of training."""
    rng = random.Random(seed)
    tests: dict[int, list[tuple[int, int]]] = {}
    for d in range(digits[0], digits[1] + 1):
        low, high = number_range(d)
        want = min(n_test, (high - low + 1) ** 2 // 4)
        chosen: dict[tuple[int, int], None] = {}
        while len(chosen) < want:
            chosen[random_pair(rng, d)] = None
        tests[d] = list(chosen)
    return tests


def train_pairs(seed: int, digits: tuple[int, int], n: int, held_out: set[tuple[int, int]]) -> list[tuple]:
    """`n` pairs with a digit count uniform in `digits`, none of them in `held_out` (repeats allowed)."""
    rng = random.Random(seed)
    pairs: list[tuple[int, int]] = []
    while len(pairs) < n:
        pair = random_pair(rng, rng.randint(*digits))
        if pair not in held_out:
            pairs.append(pair)
    return pairs


def prepare_format(root: Path, fmt: str, pairs: list[tuple[int, int]], seed: int) -> Path:
    """Byte-level dataset of one format: a JSONL corpus of one line per problem, prepared under root/data."""
    corpus = root / "corpus" / fmt
    corpus.mkdir(parents=True, exist_ok=True)
    lines = (json.dumps({"text": document(fmt, a, b)}) + "\n" for a, b in pairs)
    (corpus / "problems.jsonl").write_text("".join(lines))
    config = PrepareConfig(
        source=str(corpus),
        tokenizer="byte",
        out=str(root / "data" / fmt),
        val_fraction=VAL_FRACTION,
        seed=seed,
    )
    return prepare(config)
