"""Tasks, prompts, pretraining mixture and scoring harness of `multitoken lab icl` (Wei et al. 2023).

Four binary classification tasks over closed item sets, each with a fixed "true" label per class:

    sentiment  happy -> positive / awful -> negative    memorised (the label is not in the spelling)
    category   horse -> animal / bread -> food           memorised
    parity     417 -> odd / 302 -> even                   a rule of the spelling (last digit)
    case       QWRT -> upper / qwrt -> lower              a rule of the spelling

A prompt is k exemplars per class, one `item -> label` line each in random order, then the query
`item ->`; the candidates are the two label continuations (` positive`, ` negative`). In the flipped
protocol round(f * k) exemplars of each class carry the other class's label; the query's answer is
always its true label, so a model that copies the in-context mapping perfectly scores 0% at f = 1.
Semantically-unrelated labels (SUL) replace the two labels by `foo`/`bar` (which class gets `foo` is
random per prompt); the answer is the label the query's class carries in context.

Items of the rule tasks are split: a share is held out of every pretraining document and only asked as
queries, so their prior is the learned rule and not a memorised pair. Memorised tasks can only have a
prior for items seen in pretraining; their queries are seen items.

The harness scores any `LabelScorer` (a model, or the mock models of the tests): accuracy (a tie for the
top score shares the credit) and the answer's probability renormalised over the candidates.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

ARROW = " ->"
"""Between an item and its label; a prompt ends with it."""
SUL_LABELS = ("foo", "bar")
"""The semantically-unrelated label pair (never a label of any pretraining document)."""
FLIP_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
"""Fractions of exemplar labels flipped (Wei et al. 2023)."""
ITEM_SEED = 1234
"""Seed of the generated item lists (fixed, so every run and checkpoint sees the same tasks)."""

# Space-separated words of the memorised tasks' classes.
POSITIVE = (
    "happy joyful great good nice lovely kind brave calm glad bright cheerful gentle honest proud "
    "superb wonderful excellent pleasant charming delightful friendly generous graceful hopeful "
    "merry polite sunny sweet warm wise fine"
)
NEGATIVE = (
    "sad awful bad terrible nasty cruel angry bitter gloomy rude harsh grim lousy mean dreadful "
    "horrible miserable painful selfish shabby sour spiteful stupid tragic ugly upset vile weak "
    "wicked grumpy dull foul"
)
ANIMALS = (
    "horse dog cat cow sheep goat tiger lion zebra camel mouse rabbit eagle otter whale shark "
    "monkey panda wolf fox bear deer snake frog duck goose owl crow seal moose llama hyena"
)
FOODS = (
    "bread apple rice pasta cheese butter bacon salad soup pizza cookie cake bagel melon lemon "
    "grape pear peach mango onion carrot potato tomato garlic honey jam toast noodle muffin olive "
    "donut waffle"
)


@dataclass(frozen=True)
class Task:
    """A binary classification task: items of two classes and the true label of each class."""

    name: str
    """Short name."""
    labels: tuple[str, str]
    """True label of class 0 and class 1."""
    items: tuple[tuple[str, ...], tuple[str, ...]]
    """Items of class 0 and class 1 (disjoint)."""
    rule: bool
    """The label follows from the item's spelling, so held-out items can have a (generalised) prior."""

    def label_of(self, item: str) -> str:
        """The true label of an item of this task."""
        return self.labels[0] if item in self.items[0] else self.labels[1]


def _letter_strings(rng: random.Random, count: int, length: int) -> list[str]:
    """`count` distinct random lowercase strings of `length` letters."""
    seen: dict[str, None] = {}
    while len(seen) < count:
        seen["".join(rng.choice("bcdfghjklmnpqrstvwxz") for _ in range(length))] = None
    return list(seen)


def builtin_tasks() -> list[Task]:
    """sentiment, category, parity and case (item lists fixed by ITEM_SEED)."""
    rng = random.Random(ITEM_SEED)
    strings = _letter_strings(rng, 600, 4)
    numbers = [str(n) for n in range(100, 1000)]
    return [
        Task(
            "sentiment",
            ("positive", "negative"),
            (tuple(POSITIVE.split()), tuple(NEGATIVE.split())),
            rule=False,
        ),
        Task("category", ("animal", "food"), (tuple(ANIMALS.split()), tuple(FOODS.split())), rule=False),
        Task(
            "parity",
            ("even", "odd"),
            (tuple(n for n in numbers if int(n) % 2 == 0), tuple(n for n in numbers if int(n) % 2)),
            rule=True,
        ),
        Task(
            "case",
            ("upper", "lower"),
            (tuple(s.upper() for s in strings[:300]), tuple(strings[300:])),
            rule=True,
        ),
    ]


# ---- item split --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ItemSplit:
    """Per task and class: items that pretraining documents and exemplars use, and query items."""

    seen: dict[str, tuple[list[str], list[str]]]
    """Items of pretraining documents (and of every exemplar)."""
    queries: dict[str, tuple[list[str], list[str]]]
    """Items asked as queries: held-out items for rule tasks, seen items otherwise."""


def split_items(tasks: list[Task], seed: int, held_out: float) -> ItemSplit:
    """Hold `held_out` of each rule task's items (per class) out of pretraining; they become its queries."""
    rng = random.Random(f"icl-split-{seed}")
    seen, queries = {}, {}
    for task in tasks:
        pairs = []
        for items in task.items:
            shuffled = list(items)
            rng.shuffle(shuffled)
            n_out = round(held_out * len(shuffled)) if task.rule else 0
            pairs.append((shuffled[n_out:], shuffled[:n_out] or shuffled[n_out:]))
        seen[task.name] = (pairs[0][0], pairs[1][0])
        queries[task.name] = (pairs[0][1], pairs[1][1])
    return ItemSplit(seen, queries)


# ---- prompts -----------------------------------------------------------------------------------------


def line(item: str, label: str) -> str:
    """One exemplar: `item -> label` and a newline."""
    return f"{item}{ARROW} {label}\n"


@dataclass(frozen=True)
class Prompt:
    """One evaluation prompt: the text the model continues and the candidates it chooses between."""

    task: str
    """Task name."""
    text: str
    """Exemplar lines, then `query ->`."""
    candidates: tuple[str, ...]
    """Continuations scored against each other (` positive`, ` negative`)."""
    answer: int
    """Index of the right candidate."""


@dataclass(frozen=True)
class BasePrompt:
    """The exemplar items and the query of one prompt, before labels are written."""

    task: Task
    exemplars: list[tuple[str, int]]
    """(item, class) in prompt order, k per class."""
    query: tuple[str, int]
    """(item, class)."""
    flip_order: list[int]
    """Exemplar indices in the order they get flipped, alternating classes (nested flip sets)."""
    foo_class: int
    """Which class carries `foo` under SUL."""


def base_prompts(task: Task, split: ItemSplit, shots: int, count: int, seed: int) -> list[BasePrompt]:
    """`count` prompts of a task with `shots` exemplars per class; queries alternate between classes."""
    prompts = []
    for i in range(count):
        rng = random.Random(f"icl-prompt-{seed}-{task.name}-{i}")
        query_class = i % 2
        query = rng.choice(split.queries[task.name][query_class])
        exemplars = []
        for cls in (0, 1):
            pool = [item for item in split.seen[task.name][cls] if item != query]
            exemplars += [(item, cls) for item in rng.sample(pool, shots)]
        rng.shuffle(exemplars)
        by_class = [[j for j, (_, c) in enumerate(exemplars) if c == cls] for cls in (0, 1)]
        for indices in by_class:
            rng.shuffle(indices)
        flip_order = [j for pair in zip(*by_class, strict=True) for j in pair]
        prompts.append(BasePrompt(task, exemplars, (query, query_class), flip_order, rng.randrange(2)))
    return prompts


def flips_per_class(fraction: float, shots: int) -> int:
    """Exemplars flipped per class at a flip fraction: round(f * k), halves rounded up."""
    return int(fraction * shots + 0.5)


def flipped_prompt(base: BasePrompt, fraction: float) -> Prompt:
    """The prompt with round(f * k) exemplar labels of each class flipped; the answer is the true label."""
    labels = base.task.labels
    flipped = set(base.flip_order[: 2 * flips_per_class(fraction, len(base.exemplars) // 2)])
    text = "".join(
        line(item, labels[1 - cls] if j in flipped else labels[cls])
        for j, (item, cls) in enumerate(base.exemplars)
    )
    query, query_class = base.query
    return Prompt(base.task.name, text + query + ARROW, tuple(" " + label for label in labels), query_class)


def sul_prompt(base: BasePrompt) -> Prompt:
    """The prompt with `foo`/`bar` as labels; the answer is what the query's class carries in context."""
    mapping = {base.foo_class: SUL_LABELS[0], 1 - base.foo_class: SUL_LABELS[1]}
    text = "".join(line(item, mapping[cls]) for item, cls in base.exemplars)
    query, query_class = base.query
    answer = SUL_LABELS.index(mapping[query_class])
    return Prompt(base.task.name, text + query + ARROW, tuple(" " + label for label in SUL_LABELS), answer)


def zero_shot_prompt(base: BasePrompt) -> Prompt:
    """The query alone, with the task's labels: measures the prior without any exemplar."""
    query, query_class = base.query
    return Prompt(
        base.task.name, query + ARROW, tuple(" " + label for label in base.task.labels), query_class
    )


# ---- pretraining mixture -----------------------------------------------------------------------------


@dataclass
class Mixture:
    """The pretraining documents: a share states true labels, the rest are in-context mappings to copy."""

    prior_share: float
    """Share of documents whose lines carry the true labels (the prior)."""
    own_label_share: float
    """Share of in-context documents labelled with the task's own labels, assigned at random per document."""
    lines: tuple[int, int]
    """Lines per document, inclusive range."""
    repeat_share: float = 0.0
    """Chance that a line repeats an item already in its document (copying its label is plain induction)."""


def nonsense_pair(rng: random.Random, exclude: set[str]) -> tuple[str, str]:
    """Two distinct pronounceable words shaped like `foo` and `bar` (consonant, vowel, any letter; some with
    a 4th letter), none in `exclude`: new words to copy, of the same shape as the SUL labels."""
    words: list[str] = []
    while len(words) < 2:
        word = rng.choice("bdfgklmnprstvwz") + rng.choice("aeiou") + rng.choice("bdgklmnoprstxz")
        word += rng.choice(["", "", "a", "o", "y"])
        if word not in exclude and word not in words:
            words.append(word)
    return words[0], words[1]


def pretraining_documents(
    tasks: list[Task], split: ItemSplit, mixture: Mixture, n_documents: int, seed: int
) -> list[str]:
    """The pretraining corpus: prior documents (true labels) and in-context documents (a label pair per
    document: fresh nonsense words, or with probability `own_label_share` the task's own labels assigned
    at random). Every document is consistent: one label per class. Items come from `split.seen` only."""
    taken = {label for task in tasks for label in task.labels} | set(SUL_LABELS)
    taken |= {item.lower() for task in tasks for items in task.items for item in items}
    rng = random.Random(f"icl-corpus-{seed}")
    documents = []
    for _ in range(n_documents):
        task = rng.choice(tasks)
        if rng.random() < mixture.prior_share:
            labels = task.labels
        elif rng.random() < mixture.own_label_share:
            labels = tuple(rng.sample(task.labels, 2))
        else:
            labels = nonsense_pair(rng, taken)
        used: list[tuple[str, int]] = []
        for _ in range(rng.randint(*mixture.lines)):
            if used and rng.random() < mixture.repeat_share:
                used.append(rng.choice(used))
            else:
                cls = rng.randrange(2)
                used.append((rng.choice(split.seen[task.name][cls]), cls))
        documents.append("".join(line(item, labels[cls]) for item, cls in used))
    return documents


# ---- the harness: conditions and scores, for any scorer ---------------------------------------------


ZERO_SHOT = "zero-shot"
SUL = "SUL"


def flip_condition(fraction: float) -> str:
    """Name of a flipped-label condition, e.g. `flip 25%`."""
    return f"flip {round(100 * fraction)}%"


TASK_NAMES = tuple(task.name for task in builtin_tasks())
"""Built-in tasks, in report order."""
CONDITIONS = (ZERO_SHOT, *(flip_condition(f) for f in FLIP_FRACTIONS), SUL)
"""Every evaluated condition: the query alone, the flipped-label prompts, the foo/bar prompts."""


class LabelScorer(Protocol):
    """What the harness needs of a model: how likely each candidate continuation of each prompt is."""

    def label_logprobs(self, prompts: list[str], candidates: list[list[str]]) -> list[list[float]]:
        """Summed log-probability (nats) of each candidate continuation of each prompt."""
        ...


def choice_credit(scores: Sequence[float], answer: int) -> float:
    """1 when the answer scores highest, 1/m when it ties m ways for the top, else 0."""
    best = max(scores)
    tied = [i for i, s in enumerate(scores) if s == best]
    return 1 / len(tied) if answer in tied else 0.0


def answer_probability(scores: Sequence[float], answer: int) -> float:
    """Probability of the answer renormalised over the candidates."""
    best = max(scores)
    if best == -math.inf:
        return 1 / len(scores)
    weights = [math.exp(s - best) for s in scores]
    return weights[answer] / sum(weights)


def build_conditions(shots: int, n_prompts: int, seed: int, held_out: float) -> dict[str, list[Prompt]]:
    """The prompts of every condition: `n_prompts` per task, the same exemplars and query across conditions."""
    tasks = builtin_tasks()
    split = split_items(tasks, seed, held_out)
    bases = [b for task in tasks for b in base_prompts(task, split, shots, n_prompts, seed)]
    conditions = {ZERO_SHOT: [zero_shot_prompt(b) for b in bases]}
    conditions |= {flip_condition(f): [flipped_prompt(b, f) for b in bases] for f in FLIP_FRACTIONS}
    conditions[SUL] = [sul_prompt(b) for b in bases]
    return conditions


def evaluate(scorer: LabelScorer, conditions: dict[str, list[Prompt]]) -> dict[str, dict[str, Any]]:
    """Per condition: accuracy (ties share credit), mean answer probability, per-task accuracy, prompts."""
    prompts = [p for group in conditions.values() for p in group]
    scores = scorer.label_logprobs([p.text for p in prompts], [list(p.candidates) for p in prompts])
    results, start = {}, 0
    for name, group in conditions.items():
        credit = [choice_credit(s, p.answer) for p, s in zip(group, scores[start:], strict=False)]
        prob = [answer_probability(s, p.answer) for p, s in zip(group, scores[start:], strict=False)]
        start += len(group)
        per_task: dict[str, list[float]] = {}
        for p, c in zip(group, credit, strict=True):
            per_task.setdefault(p.task, []).append(c)
        results[name] = {
            "accuracy": mean(credit),
            "answer_probability": mean(prob),
            "per_task": {task: mean(values) for task, values in per_task.items()},
            "prompts": len(group),
        }
    return results


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean (0 for none)."""
    return sum(values) / len(values) if values else 0.0
