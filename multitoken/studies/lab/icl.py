"""`multitoken lab icl`: in-context learning, and overriding semantic priors (Wei et al. 2023).

Wei et al. ("Larger language models do in-context learning differently") flip a fraction of the
exemplar labels of a few-shot prompt and find that small models keep answering with the label they
learned in pretraining (accuracy stays flat), while large ones follow the flipped labels (accuracy falls
below chance); with semantically-unrelated labels (foo/bar) small models lose more than large ones.
Tasks, prompts and flips are in icl_tasks.py.

Our models learn a prior and in-context copying from a synthetic pretraining mixture (byte tokens):
- prior documents: `item -> label` lines with the true labels, so each seen item gets its label
  (memorised for sentiment and category, a spelling rule for parity and case);
- in-context documents: the same lines with a label pair drawn per document, mostly fresh nonsense words
  shaped like foo/bar, so only reading the context predicts them: which label earlier lines of the
  query's class carry. A line repeats an earlier item of its document 30% of the time (bursty documents
  make copying pay off sooner, as in Chan et al. 2022).
Why this mix: documents that reverse a task's own labels exist (own_label_share / 2 of the in-context
ones) but are rare, so the prior is strong and a flipped prompt really pits it against the context: a
model that copies weakly keeps its prior, one that reads the context follows the flips. Every document
is consistent (one label per class), so none looks like a partly flipped prompt, and foo/bar never
occur in pretraining. The harness (icl_tasks.py) scores any `LabelScorer`; `ModelScorer` is the real one.

Models: n_future = 1 and 2 at two sizes, with the same seed, data and budget. Every model keeps at
least two blocks on its next-token path (parameter matching moves blocks from the trunk to the heads),
since copying from context takes two.

Any checkpoint (`--checkpoint`) runs the same prompts with its own tokenizer, scored by its next-token
head. Dimension legend: B batch, T positions, V vocabulary.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from tqdm import tqdm

from multitoken.checkpoint import load_checkpoint
from multitoken.data.shards import PrepareConfig, prepare
from multitoken.errors import UserError
from multitoken.studies import runs as study
from multitoken.studies.corpora.icl_tasks import (
    CONDITIONS,
    FLIP_FRACTIONS,
    SUL,
    SUL_LABELS,
    TASK_NAMES,
    ZERO_SHOT,
    Mixture,
    Prompt,
    build_conditions,
    builtin_tasks,
    evaluate,
    flip_condition,
    flips_per_class,
    pretraining_documents,
    split_items,
)
from multitoken.studies.report import Report
from multitoken.studies.runs import (
    ModelBudget,
    final_validation,
    pick_scale,
    print_table,
    resolve_device,
)

QUESTION = (
    "Do small models override what they learned in pretraining when the in-context labels say otherwise, "
    "and does that change with size or multi-token prediction?"
)
"""What the report answers."""
N_FUTURE = (1, 2)
"""Heads compared."""
VAL_FRACTION = 0.05
"""Share of pretraining documents kept for the validation loss."""


# ---- scoring with a model ---------------------------------------------------------------------------


class ModelScorer:
    """LabelScorer of a MultiTokenLM and its tokenizer: `<eos> prompt candidate`, scored by head 1."""

    def __init__(self, model, tokenizer, batch_size: int = 32, progress: bool = False):
        if tokenizer is None:
            raise UserError("the checkpoint has no tokenizer, so the ICL prompts can't be encoded")
        if model.config.head_offsets[0] != 1:
            raise UserError(
                f"the model's first head predicts token t+{model.config.head_offsets[0]}; "
                "ICL scoring needs a next-token head"
            )
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.progress = batch_size, progress

    def sequence(self, prompt: str, candidate: str) -> tuple[list[int], int]:
        """Token ids of `<eos> prompt candidate` and how many of them are the candidate's."""
        context = [self.tokenizer.eos_id, *self.tokenizer.encode(prompt)]
        continuation = self.tokenizer.encode(candidate)
        if not continuation:
            raise UserError(f"the label {candidate!r} encodes to no tokens with this checkpoint's tokenizer")
        ids = context + continuation
        config = self.model.config
        if len(ids) > config.max_seq_len:
            raise UserError(
                f"an ICL prompt takes {len(ids)} tokens but the model's max_seq_len is {config.max_seq_len}; "
                "pass a smaller --shots"
            )
        if max(ids) >= config.vocab_size:
            raise UserError(
                f"the tokenizer produces id {max(ids)} but the model has only {config.vocab_size} tokens"
            )
        return ids, len(continuation)

    @torch.no_grad()
    def label_logprobs(self, prompts: list[str], candidates: list[list[str]]) -> list[list[float]]:
        flat = [(i, j, *self.sequence(p, c)) for i, (p, cs) in enumerate(zip(prompts, candidates, strict=True))
                for j, c in enumerate(cs)]  # fmt: skip
        flat.sort(key=lambda row: len(row[2]))
        scores = [[0.0] * len(cs) for cs in candidates]
        device = next(self.model.parameters()).device
        starts = range(0, len(flat), self.batch_size)
        for start in tqdm(starts, desc="scoring", disable=not self.progress, leave=False):
            batch = flat[start : start + self.batch_size]
            width = max(len(ids) for _, _, ids, _ in batch)
            rows = [ids + [self.tokenizer.eos_id] * (width - len(ids)) for _, _, ids, _ in batch]
            tokens_BT = torch.tensor(rows, device=device)
            logp_BTV = F.log_softmax(self.model.next_token_logits(tokens_BT).float(), dim=-1)
            for b, (i, j, ids, n) in enumerate(batch):
                end = len(ids)
                targets = tokens_BT[b, end - n : end]
                scores[i][j] = float(logp_BTV[b, end - n - 1 : end - 1].gather(-1, targets[:, None]).sum())
        return scores


# ---- scales and training -----------------------------------------------------------------------------


@dataclass(kw_only=True)
class IclScale:
    """Data, models and evaluation of one scale."""

    sizes: dict[str, ModelBudget]
    """Model widths by name, each with its training budget (the same for every n)."""
    mixture: Mixture
    """Pretraining mixture."""
    n_documents: int
    """Pretraining documents generated (windows are drawn from them at random)."""
    held_out: float
    """Share of each rule task's items held out of pretraining (and asked as queries)."""
    shots: int
    """Exemplars per class (k)."""
    n_prompts: int
    """Prompts per task and condition."""
    max_seq_len: int = 256
    """Context of the trained models."""


MIXTURE = Mixture(prior_share=0.4, own_label_share=0.2, lines=(8, 16), repeat_share=0.3)
"""40% prior documents; a fifth of the in-context ones use the task's own labels (half of those reversed);
a line repeats an earlier item of its document 30% of the time (burstiness, which speeds up copying)."""

SCALES = {
    "debug": IclScale(
        sizes={
            "dim32": ModelBudget(dim=32, n_layers=3, n_heads=2, max_steps=4, batch_size=4, seq_len=128),
            "dim48": ModelBudget(dim=48, n_layers=3, n_heads=2, max_steps=4, batch_size=4, seq_len=128),
        },
        mixture=MIXTURE, n_documents=300, held_out=0.2, shots=2, n_prompts=4, max_seq_len=128,
    ),
    "small": IclScale(
        sizes={
            "dim32": ModelBudget(dim=32, n_layers=3, n_heads=2, max_steps=3000, batch_size=8, seq_len=256,
                                 lr=3e-3),
            "dim64": ModelBudget(dim=64, n_layers=3, n_heads=4, max_steps=3000, batch_size=8, seq_len=256,
                                 lr=3e-3),
        },
        mixture=MIXTURE, n_documents=40_000, held_out=0.2, shots=4, n_prompts=64,
    ),
}  # fmt: skip
"""debug: seconds (tests); small: about 15 minutes on a 2-core CPU (4 models). In-context copying appears
in the dim-64 model after about 2,000 steps of batch 8 x 256 bytes at lr 3e-3 (not within 400 steps of
batch 32 x 128 at dim 128, which learns only the prior), so the small scale buys steps with narrow models."""


def prepare_corpus(root: Path, preset: IclScale, seed: int) -> Path:
    """Write the pretraining mixture as JSONL under root/corpus and prepare it (byte tokens) in root/data."""
    tasks = builtin_tasks()
    split = split_items(tasks, seed, preset.held_out)
    documents = pretraining_documents(tasks, split, preset.mixture, preset.n_documents, seed)
    corpus = root / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    (corpus / "documents.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    config = PrepareConfig(
        source=str(corpus), tokenizer="byte", out=str(root / "data"), val_fraction=VAL_FRACTION, seed=seed
    )
    return prepare(config)


@dataclass
class IclModel:
    """One evaluated model."""

    label: str
    """e.g. `dim64 n=2`."""
    size: str
    """Size name (`checkpoint` for --checkpoint)."""
    n_future: int
    """Heads."""
    path: Path
    """Run or checkpoint directory."""


def train_models(root: Path, preset: IclScale, seed: int, device: str, progress: bool) -> list[IclModel]:
    """Train (or resume, or reuse) every size x n_future model on the same data with the same seed."""
    data = prepare_corpus(root, preset, seed)
    models = []
    for size, budget in preset.sizes.items():
        for n in N_FUTURE:
            label = f"{size} n={n}"
            out = root / "runs" / f"{size}-n{n}"
            print(f"{label}: {out}")
            model = budget.model_fields(n, preset.max_seq_len)
            run_dir = budget.train(
                data=data, out=out, model=model, seed=seed, device=device, progress=progress
            )
            models.append(IclModel(label, size, n, run_dir))
    return models


def score_model(
    model_info: IclModel, conditions: dict[str, list[Prompt]], device: str, progress: bool
) -> dict[str, Any]:
    """Load a model with its tokenizer and evaluate every condition."""
    model, tokenizer = load_checkpoint(model_info.path, device)
    scorer = ModelScorer(model, tokenizer, progress=progress)
    result: dict[str, Any] = {
        "size": model_info.size,
        "n_future": model_info.n_future,
        "params": model.num_params(),
        "config": f"dim {model.config.dim}, {model.config.n_layers} blocks "
        f"({model.config.n_trunk_layers} trunk), {model.config.n_heads} attention heads",
    }
    if (model_info.path / "metrics.jsonl").is_file():
        result["val_loss"] = final_validation(model_info.path)["val_loss"]
    result["conditions"] = evaluate(scorer, conditions)
    return result


def run_icl(
    out: str,
    scale: str,
    checkpoint: str | None,
    shots: int | None,
    seed: int,
    device: str,
    command: list[str],
) -> dict[str, Any]:
    """Train (or read --checkpoint), evaluate every condition, write the report; the results."""
    preset = pick_scale(scale, SCALES)
    shots = preset.shots if shots is None else shots
    if not 1 <= shots <= 16:
        raise UserError(f"--shots must be between 1 and 16, got {shots}")
    device = resolve_device(device)
    root = Path(out)
    progress = scale != "debug"
    if checkpoint:
        model, _ = load_checkpoint(checkpoint, "cpu")
        models = [IclModel(f"checkpoint n={model.config.n_future}", "checkpoint", model.config.n_future,
                           Path(checkpoint))]  # fmt: skip
    else:
        models = train_models(root, preset, seed, device, progress)
    conditions = build_conditions(shots, preset.n_prompts, seed, preset.held_out)
    results = {
        "shots": shots,
        "prompts_per_condition": len(conditions[ZERO_SHOT]),
        "flip_fractions": list(FLIP_FRACTIONS),
        "models": {m.label: score_model(m, conditions, device, progress) for m in models},
    }
    write_report(root, scale, preset, results, checkpoint, seed, command)
    return results


# ---- report ------------------------------------------------------------------------------------------


def pct(result: dict[str, Any], condition: str, task: str | None = None) -> float:
    """Accuracy (%) of one model in one condition, overall or on one task."""
    scores = result["conditions"][condition]
    return 100 * (scores["accuracy"] if task is None else scores["per_task"][task])


def two_standard_errors(rates_pct: Sequence[float], n: int) -> float:
    """Two binomial standard errors (points) of a sum or difference of independent rates over n prompts."""
    return 200 * math.sqrt(sum((r / 100) * (1 - r / 100) for r in rates_pct) / max(n, 1))


def drop(result: dict[str, Any]) -> float:
    """Points lost from correct to all-flipped exemplar labels: how much the model follows the context."""
    return pct(result, flip_condition(0.0)) - pct(result, flip_condition(1.0))


def points(value: float) -> str:
    """A number of points or percent, rounded, never `-0`."""
    return str(round(value) + 0)


def flip_effect(a0: float, a100: float, n: int) -> str:
    """What flipping every exemplar label does to accuracy (a0 -> a100, %, over n prompts)."""
    if a0 - a100 > two_standard_errors([a0, a100], n):
        return "follows" if 50 - a100 > two_standard_errors([a100], n) else "partly follows"
    return "keeps its prior" if a0 - 50 > two_standard_errors([a0], n) else "at chance"


def behaviour(result: dict[str, Any], n: int) -> str:
    """What the flips do to one model, overall and, where the tasks disagree, per task."""
    true, flipped = flip_condition(0.0), flip_condition(1.0)
    effect = flip_effect(pct(result, true), pct(result, flipped), n)
    overall = {
        "follows": "follows the flipped labels, below chance",
        "partly follows": "partly follows the flipped labels",
        "keeps its prior": "keeps its prior: flat within noise",
        "at chance": "at chance with or without flips",
    }[effect]
    n_task = n // len(TASK_NAMES)
    by_task: dict[str, list[str]] = {}
    for task in TASK_NAMES:
        a0, a100 = pct(result, true, task), pct(result, flipped, task)
        by_task.setdefault(flip_effect(a0, a100, n_task), []).append(f"{task} ({points(a100)}%)")
    if len(by_task) == 1:
        return overall
    verbs = {"follows": "follows the flips on", "partly follows": "partly follows them on",
             "keeps its prior": "keeps its prior on", "at chance": "is at chance on"}  # fmt: skip
    return (
        overall
        + ": with all flipped it "
        + ", ".join(f"{verbs[e]} {' and '.join(tasks)}" for e, tasks in by_task.items())
    )


def compare(results: dict[str, Any], pairs: list[tuple[str, str]], what: str, n: int) -> str:
    """A sentence on whether the second model of each pair drops more under flips than the first, and how
    their foo/bar accuracies compare."""
    parts = []
    for first, second in pairs:
        a, b = results[first], results[second]
        gap = drop(b) - drop(a)
        rates = [pct(r, flip_condition(f)) for r in (a, b) for f in (0.0, 1.0)]
        verdict = (
            "about as much as"
            if abs(gap) <= two_standard_errors(rates, n)
            else "more than"
            if gap > 0
            else "less than"
        )
        sul_a, sul_b = pct(a, SUL), pct(b, SUL)
        sul_gap = sul_b - sul_a
        sul_verdict = ("the same within noise" if abs(sul_gap) <= two_standard_errors([sul_a, sul_b], n)
                       else "higher" if sul_gap > 0 else "lower")  # fmt: skip
        parts.append(
            f"{second} drops {verdict} {first} ({points(drop(b))} vs {points(drop(a))} points) and scores "
            f"{points(sul_b)}% vs {points(sul_a)}% with foo/bar ({sul_verdict})"
        )
    return f"{what}: " + "; ".join(parts) + "."


def above_chance(rate_pct: float, n: int) -> bool:
    """Whether an accuracy is more than two standard errors above 50%."""
    return rate_pct - 50 > two_standard_errors([50], n)


def answer_text(results: dict[str, Any], sizes: list[str]) -> str:
    """The answer paragraph, computed from this run's accuracies."""
    models = results["models"]
    n = results["prompts_per_condition"]
    true, flipped = flip_condition(0.0), flip_condition(1.0)
    learned = [label for label, r in models.items() if any(above_chance(pct(r, c), n) for c in CONDITIONS)]
    text = (
        "" if learned else "No model learned anything measurable: every accuracy is within noise of chance. "
    )
    text += "Accuracy with the true labels in context, then with all of them flipped: " + "; ".join(
        f"{label} {points(pct(r, true))}% -> {points(pct(r, flipped))}% ({behaviour(r, n)})"
        for label, r in models.items()
    )
    sul = [label for label, r in models.items() if above_chance(pct(r, SUL), n)]
    text += (
        ". With foo/bar as labels: "
        + ", ".join(f"{label} {points(pct(r, SUL))}%" for label, r in models.items())
        + (
            f" (above chance: {', '.join(sul)})"
            if sul
            else " (none above chance: no model maps classes to new labels from context)"
        )
        + "; the query alone, which measures the prior: "
        + ", ".join(f"{label} {points(pct(r, ZERO_SHOT))}%" for label, r in models.items())
        + ". "
    )
    by_key = {(r["size"], r["n_future"]): label for label, r in models.items()}
    size_pairs = [(by_key[(sizes[0], k)], by_key[(sizes[-1], k)]) for k in N_FUTURE
                  if len(sizes) > 1 and (sizes[0], k) in by_key and (sizes[-1], k) in by_key]  # fmt: skip
    n_pairs = [(by_key[(s, 1)], by_key[(s, m)]) for s in sizes for m in N_FUTURE[1:]
               if (s, 1) in by_key and (s, m) in by_key]  # fmt: skip
    if size_pairs:
        text += compare(models, size_pairs, "By size", n) + " "
    if n_pairs:
        text += compare(models, n_pairs, "By heads", n) + " "
    text += (
        f"Each accuracy is over {n} prompts ({n // len(TASK_NAMES)} per task, {results['shots']} exemplars "
        f"per class), so differences within about {points(two_standard_errors([50], n))} points are noise "
        f"({points(two_standard_errors([50], n // len(TASK_NAMES)))} for one task)."
    )
    return text


def follower_scores(fraction: float, shots: int) -> tuple[float, float]:
    """Accuracy and true-label probability (%) of a model that copies the labels of the query's class in
    context: it answers with their majority (ties halve the credit), in proportion to their counts."""
    flips = flips_per_class(fraction, shots)
    accuracy = 100.0 if 2 * flips < shots else 50.0 if 2 * flips == shots else 0.0
    return accuracy, 100 * (shots - flips) / shots


def plot_flips(report: Report, results: dict[str, Any], sizes: list[str], scale: str) -> None:
    """Accuracy and answer probability against the flipped share, one line per model, with references."""
    fig, axes = report.figure(1, 2, width=6.0)
    colours = dict(zip(sizes, ("tab:blue", "tab:orange", "tab:green", "tab:red"), strict=False))
    xs = [100 * f for f in FLIP_FRACTIONS]
    shots = results["shots"]
    for ax, key, ylabel in (
        (axes[0][0], "accuracy", "accuracy on the true label (%)"),
        (axes[0][1], "answer_probability", "probability of the true label (%)"),
    ):
        for label, r in results["models"].items():
            ys = [100 * r["conditions"][flip_condition(f)][key] for f in FLIP_FRACTIONS]
            solid = r["n_future"] == 1
            ax.plot(xs, ys, marker="o" if solid else "s", markersize=6 if solid else 4, label=label,
                    color=colours.get(r["size"], "tab:purple"), linestyle="-" if solid else "--")  # fmt: skip
        ax.axhline(50, color="grey", linestyle=":", label="chance")
        ax.plot(xs, [100] * len(xs), color="0.75", linewidth=1, label="prior only (reference)")
        follow = [follower_scores(f, shots)[key != "accuracy"] for f in FLIP_FRACTIONS]
        ax.plot(xs, follow, color="0.75", linewidth=1, linestyle="-.", label="copies the context (reference)")
        ax.set_xlabel("exemplar labels flipped (%)")
        ax.set_ylabel(ylabel)
        ax.set_xticks(xs)
        ax.set_ylim(-3, 103)
    axes[0][0].legend(fontsize=8)
    axes[0][0].set_title(f"Flipped labels, {scale} scale, {shots} exemplars per class")
    axes[0][1].set_title("Same prompts: probability renormalised over the two labels")
    report.save_figure(
        fig,
        "flipped_labels.png",
        "Accuracy against the share of flipped exemplar labels; n = 1 solid, n = 2 dashed (square markers)",
    )


def _accuracy_bars_axes(ax, groups: Sequence[str], xlabel: str, ylabel: str) -> None:
    """Axes of grouped accuracy bars: one tick per group, 0-100% with room above for the legend, and the
    50% chance line."""
    ax.axhline(50, color="grey", linestyle=":", label="chance")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 125)
    ax.set_yticks(range(0, 101, 20))


def plot_sul(report: Report, results: dict[str, Any]) -> None:
    """Grouped bars per model: zero-shot, true labels in context, foo/bar labels."""
    fig, ax = report.figure()
    groups = ((ZERO_SHOT, "query alone (prior)"), (flip_condition(0.0), "true labels in context"),
              (SUL, "foo/bar labels in context"))  # fmt: skip
    labels = list(results["models"])
    width = 0.8 / len(groups)
    for g, (condition, name) in enumerate(groups):
        xs = [i + (g - (len(groups) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, [pct(results["models"][m], condition) for m in labels], width, label=name)
    _accuracy_bars_axes(
        ax, labels, "model (width, heads)", "accuracy on the label the query's class carries (%)"
    )
    ax.set_title("Semantically-unrelated labels (foo/bar) against the true labels")
    ax.legend(fontsize=8, ncol=2, loc="upper center")
    report.save_figure(
        fig, "unrelated_labels.png", "Accuracy with no exemplars, true-label exemplars and foo/bar exemplars"
    )


def plot_tasks(report: Report, results: dict[str, Any]) -> None:
    """Per task, bars per model: accuracy with all exemplar labels flipped, and with foo/bar labels."""
    fig, axes = report.figure(1, 2, width=6.0)
    labels = list(results["models"])
    width = 0.8 / len(labels)
    for ax, condition, title in (
        (axes[0][0], flip_condition(1.0), "All exemplar labels flipped: accuracy on the true label"),
        (axes[0][1], SUL, "foo/bar labels: accuracy on the label of the query's class"),
    ):
        for m, label in enumerate(labels):
            xs = [t + (m - (len(labels) - 1) / 2) * width for t in range(len(TASK_NAMES))]
            values = [pct(results["models"][label], condition, task) for task in TASK_NAMES]
            ax.bar_label(ax.bar(xs, values, width, label=label), fmt="%.0f", fontsize=6)
        _accuracy_bars_axes(
            ax, TASK_NAMES, "task (sentiment, category: memorised; parity, case: rules)", "accuracy (%)"
        )
        ax.set_title(title, fontsize=10)
    axes[0][0].legend(fontsize=8, ncol=3, loc="upper center")
    report.save_figure(fig, "by_task.png", "Per task: 100%-flipped accuracy (0% = follows the context, 100% = "
                       "keeps the prior) and foo/bar accuracy")  # fmt: skip


def tables(results: dict[str, Any]) -> list[tuple[str, list[str], list[list]]]:
    """(caption, header, rows): accuracy per model and condition, then per model and task."""
    models = results["models"]
    header = ["model", "params", "val loss (nats/token)", "zero-shot (%)",
              *[f"{round(100 * f)}% flipped (%)" for f in FLIP_FRACTIONS], "foo/bar (%)"]  # fmt: skip
    rows = [
        [label, f"{r['params']:,}", r.get("val_loss", "-"), *[round(pct(r, c), 1) for c in CONDITIONS]]
        for label, r in models.items()
    ]
    task_header = ["model", "task", "zero-shot (%)", "0% flipped (%)", "100% flipped (%)", "foo/bar (%)"]
    task_rows = [[label, task, *[round(pct(r, c, task), 1) for c in (ZERO_SHOT, flip_condition(0.0), flip_condition(1.0), SUL)]]
                 for label, r in models.items() for task in TASK_NAMES]  # fmt: skip
    n = results["prompts_per_condition"]
    return [
        (
            f"Accuracy on the true label (foo/bar: on the label of the query's class), {n} prompts per condition",
            header,
            rows,
        ),
        (f"Accuracy per task, {n // len(TASK_NAMES)} prompts per task and condition", task_header, task_rows),
    ]


def write_report(
    root: Path,
    scale: str,
    preset: IclScale,
    results: dict[str, Any],
    checkpoint: str | None,
    seed: int,
    command: list[str],
) -> Path:
    """report.md, the plots and results.json under `root`; the main table on stdout."""
    report = Report(root, title="In-context learning against semantic priors (flipped and foo/bar labels)",
                    question=QUESTION)  # fmt: skip
    sizes = list(preset.sizes) if not checkpoint else ["checkpoint"]
    plot_flips(report, results, sizes, scale)
    plot_sul(report, results)
    plot_tasks(report, results)
    for caption, header, rows in tables(results):
        report.add_table(header, rows, caption)
    mixture = preset.mixture
    details = {
        "scale": scale,
        "seed": f"{seed} (held-out items, prompts, data order and initialisation)",
        "tasks": "sentiment (positive/negative), category (animal/food): memorised; parity (even/odd of "
        "3-digit numbers), case (upper/lower of 4-letter strings): rules, asked on items held out of pretraining",
        "prompt": f"{results['shots']} exemplars per class as `item -> label` lines, then `query ->`; "
        "candidates ` label` scored by summed log-probability under the next-token head, after `<eos>`",
        "flips": "round(f * k) exemplars of each class get the other label (nested sets: 25% within 50%...); "
        "the answer is always the true label; ties share credit",
        "SUL": f"labels {'/'.join(SUL_LABELS)}, assigned to the classes at random per prompt",
    }
    if checkpoint:
        details["checkpoint"] = checkpoint
    else:
        details["pretraining"] = (
            f"{preset.n_documents:,} documents of {mixture.lines[0]}-{mixture.lines[1]} lines: "
            f"{mixture.prior_share:.0%} with the true labels, the rest with a label pair drawn per document "
            f"({mixture.own_label_share:.0%} of them the task's own labels in random order, else new nonsense "
            f"words); a line repeats an earlier item of its document {mixture.repeat_share:.0%} of the time"
        )
        for size, budget in preset.sizes.items():
            details[f"training {size}"] = (
                f"{budget.max_steps} steps x {budget.batch_size} x {budget.seq_len} bytes, lr {budget.lr}, "
                "the same for n = 1 and 2"
            )
    for label, r in results["models"].items():
        details[f"model {label}"] = f"{r['params']:,} parameters, {r['config']}, n_future {r['n_future']}"
    path = report.write(answer_text(results, sizes), results, command=command, details=details)
    caption, header, rows = tables(results)[0]
    print_table(f"icl: {caption}", header, rows)
    return path


@dataclass
class IclOptions:
    """Flags of `multitoken lab icl` (in the order of its --help: a checkpoint and shots before the seed)."""

    out: str = "reports/lab/icl"
    """report directory (data and trained runs go under it; complete runs are reused)."""
    scale: Literal["debug", "small"] = "small"
    """debug (seconds) or small (about 15 minutes on a 2-core CPU); with --checkpoint: prompts and shots."""
    checkpoint: str | None = None
    """evaluate this checkpoint or run directory (with its own tokenizer) instead of training."""
    shots: int | None = None
    """exemplars per class (default: 2 at debug, 4 at small)."""
    seed: int = 0
    """seed of the items held out, the prompts, the data and every model's initialisation."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""


def icl_cli(options: IclOptions) -> None:
    """Do models override their pretraining priors when in-context labels are flipped? (Wei et al. 2023)

    Trains n=1 and n=2 byte-level models at two sizes on a mixture of documents stating item labels
    (sentiment, animal/food, parity, upper/lower case) and few-shot documents with arbitrary label words,
    then scores k-shot prompts with 0-100% of the exemplar labels flipped and with foo/bar labels.
    """
    command = study.options_command(("lab", "icl"), options)
    run_icl(
        options.out, options.scale, options.checkpoint, options.shots, options.seed, options.device, command
    )
    print(f"wrote {Path(options.out) / 'report.md'}")
