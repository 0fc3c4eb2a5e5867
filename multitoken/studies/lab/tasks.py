"""`multitoken lab tasks`: next-token prediction is massively multi-task (Jason Wei, 2023).

Every target token of a validation slice is tagged with its kind of task (tagging.py); the loss is
split by tag (mean loss, and share of the total: the shares add up to the total loss exactly), each
tag's loss is followed across training checkpoints, every head of an MTP model is broken down the
same way, and minimal-pair probes (probes.py) are scored per family.

Dimension legend: W windows, T positions, N heads, G tags.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm import tqdm

from multitoken.studies import runs as study
from multitoken.studies import scoring
from multitoken.studies.corpora.probes import builtin_probes, family_accuracy, load_probes, score_probes
from multitoken.studies.lab.tagging import tag_stream, tag_windows
from multitoken.studies.report import Report

QUESTION = (
    "Is next-token prediction one task or many? How is the loss spread over kinds of token, when is each "
    "kind learned, and which kinds can the far heads of a multi-token model predict?"
)
TAG_STREAM_WINDOWS = 20
"""Evaluation windows are spread over the first this-many-times-their-length validation tokens."""


@dataclass
class TagStats:
    """Loss of one head split by the tag of its target token."""

    tags: tuple[str, ...]
    """Tag names, indexing the arrays below."""
    count_G: Tensor
    """Targets per tag."""
    loss_sum_G: Tensor
    """Summed cross-entropy (nats) per tag."""
    correct_G: Tensor
    """Top-1 correct predictions per tag."""

    @property
    def total_count(self) -> int:
        return int(self.count_G.sum())

    @property
    def total_loss(self) -> float:
        """Mean loss over every target (nats per token)."""
        return float(self.loss_sum_G.sum() / max(self.total_count, 1))

    @property
    def mean_loss_G(self) -> Tensor:
        return self.loss_sum_G / self.count_G.clamp(min=1)

    @property
    def accuracy_G(self) -> Tensor:
        return self.correct_G / self.count_G.clamp(min=1)

    @property
    def contribution_G(self) -> Tensor:
        """Each tag's part of the total loss (nats per token); these add up to `total_loss`."""
        return self.loss_sum_G / max(self.total_count, 1)

    @property
    def share_G(self) -> Tensor:
        """Fraction of the total loss carried by each tag; adds up to 1."""
        return self.loss_sum_G / self.loss_sum_G.sum().clamp(min=1e-30)

    def to_dict(self) -> dict[str, Any]:
        rows = {}
        for g, tag in enumerate(self.tags):
            rows[tag] = {
                "count": int(self.count_G[g]),
                "mean_loss": float(self.mean_loss_G[g]),
                "accuracy": float(self.accuracy_G[g]),
                "contribution": float(self.contribution_G[g]),
                "share": float(self.share_G[g]),
            }
        return {"total_loss": self.total_loss, "targets": self.total_count, "tags": rows}


def tag_breakdown(
    scores: scoring.TokenScores, tag_WT: Tensor, tags: tuple[str, ...], head: int, offset: int
) -> TagStats:
    """Split head `head`'s losses by the tag of its target, which sits `offset` positions ahead."""
    W, T = tag_WT.shape
    target_tag_WT = torch.full((W, T), -1, dtype=torch.long)
    target_tag_WT[:, : T - offset] = tag_WT[:, offset:]
    valid_WT = scores.valid_BTN[..., head] & (target_tag_WT >= 0)
    tag_M = target_tag_WT[valid_WT]
    loss_M = scores.loss_BTN[..., head][valid_WT].double()
    correct_M = scores.correct_BTN[..., head][valid_WT].double()
    n = len(tags)
    return TagStats(
        tags,
        torch.bincount(tag_M, minlength=n).double(),
        torch.zeros(n, dtype=torch.float64).index_add_(0, tag_M, loss_M),
        torch.zeros(n, dtype=torch.float64).index_add_(0, tag_M, correct_M),
    )


def half_learned_step(steps: list[int], losses: list[float]) -> int | None:
    """First step by which a loss curve has made half of its total drop (None if it never drops)."""
    drop = losses[0] - min(losses)
    if drop <= 1e-9:
        return None
    return next(s for s, loss in zip(steps, losses, strict=True) if losses[0] - loss >= 0.5 * drop)


def run_tasks(
    options: study.LabOptions, domain: Literal["auto", "code", "text"] = "auto", probes: str | None = None
) -> Path:
    """Run the experiment; returns the path of report.md."""
    default_source = study.ENGLISH_SOURCE if domain == "text" else "python-stdlib"
    extra_probes = load_probes(probes) if probes else []  # fail on a bad file before training
    runs, data = study.lab_runs(options, default_source)
    if domain == "auto":
        domain = study.guess_domain(options.source or study.dataset_source(data))
    sizes, device = options.sizes, study.pick_device(options.device)
    seq_len = min(sizes.seq_len, *(run.config.max_seq_len for run in runs))
    stream_S, dataset = scoring.val_stream(data, TAG_STREAM_WINDOWS * sizes.eval_windows * seq_len)
    tokens_WT, starts = scoring.windows(stream_S, seq_len, sizes.eval_windows)
    tokenizer = dataset.tokenizer()
    tags = tag_stream(stream_S, tokenizer, domain)
    tag_WT = tag_windows(tags, starts, seq_len)
    probe_set = builtin_probes(domain) + extra_probes

    curves, finals, probe_results = {}, {}, {}
    for run in runs:
        steps, per_step = [], []
        bar = tqdm(run.checkpoints, desc=f"scoring {run.label} checkpoints", disable=not options.progress)
        for step, path in bar:
            model = study.load_run_model(run, path, device)
            scores = scoring.token_scores(model, tokens_WT, sep_id=dataset.eos_id)
            steps.append(step)
            per_step.append(tag_breakdown(scores, tag_WT, tags.tags, 0, run.config.head_offsets[0]))
        heads = [
            tag_breakdown(scores, tag_WT, tags.tags, i, k) for i, k in enumerate(run.config.head_offsets)
        ]
        curves[run.label] = (steps, per_step)
        finals[run.label] = heads
        probe_results[run.label] = score_probes(model, tokenizer, probe_set)

    report = Report(options.out, "Next-token prediction is massively multi-task", QUESTION)
    present = [g for g, _ in enumerate(tags.tags) if finals[runs[0].label][0].count_G[g] > 0]
    _plot_curves(report, runs, curves, present)
    _plot_breakdown(report, runs, finals, present)
    mtp = [run for run in runs if run.config.n_future > 1]
    if mtp:
        _plot_heads(report, mtp[0], finals[mtp[0].label], present)
    _plot_probes(report, runs, probe_results)
    results = _results(runs, curves, finals, probe_results)
    answer = _answer(runs, curves, finals, probe_results, present, domain)
    _tables(report, runs, finals, probe_results, present)
    details = study.run_details(runs, options, data)
    details["tagging"] = (
        f"{domain} tagger on {tokens_WT.numel():,} validation "
        f"tokens ({tokens_WT.shape[0]} windows of {seq_len}); "
        "a token takes the kind of the unit covering its "
        "first (non-blank) character; 'seen'/'repeated' means "
        "seen earlier in the same window"
    )
    details["probes"] = f"{len(probe_set)} pairs ({'built-in + ' + probes if probes else 'built-in'} set)"
    return report.write(answer, results, options.command, details=details)


# ---- plots ------------------------------------------------------------------------------------------


def _plot_curves(report: Report, runs, curves, present: list[int]) -> None:
    import matplotlib.pyplot as plt

    fig, axes = report.figure(len(runs), 2, width=6.5, height=4.0)
    axes = axes.reshape(len(runs), 2)
    colors = plt.get_cmap("tab10")
    for row, run in enumerate(runs):
        steps, stats = curves[run.label]
        for color, g in enumerate(present):
            tag = stats[0].tags[g]
            losses = [float(s.mean_loss_G[g]) for s in stats]
            axes[row, 0].plot(steps, losses, marker="o", ms=3, color=colors(color % 10), label=tag)
            drop = losses[0] - min(losses)
            learned = [(losses[0] - x) / drop if drop > 1e-9 else 0.0 for x in losses]
            axes[row, 1].plot(steps, learned, marker="o", ms=3, color=colors(color % 10), label=tag)
        axes[row, 0].set(
            xlabel="training step", ylabel="mean loss (nats/token)", title=f"{run.label}: loss per kind"
        )
        axes[row, 1].set(
            xlabel="training step",
            ylabel="fraction of the loss drop made",
            title=f"{run.label}: when each kind is learned",
        )
        axes[row, 1].axhline(0.5, color="grey", lw=0.8, ls="--")
    axes[0, 1].legend(fontsize=7, loc="lower right")
    report.save_figure(
        fig,
        "tag_curves.png",
        "Next-token loss of each kind of target token across training (left), and the fraction of each "
        "kind's eventual loss drop made by each step (right; step 0 is the initialisation)",
    )


def _plot_breakdown(report: Report, runs, finals, present: list[int]) -> None:
    import numpy as np

    fig, axes = report.figure(1, 2, width=6.5, height=4.5)
    x = np.arange(len(present))
    width = 0.8 / len(runs)
    for r, run in enumerate(runs):
        stats = finals[run.label][0]
        axes[0, 0].bar(x + r * width, [float(stats.mean_loss_G[g]) for g in present], width, label=run.label)
        axes[0, 1].bar(
            x + r * width, [100 * float(stats.share_G[g]) for g in present], width, label=run.label
        )
    names = [finals[runs[0].label][0].tags[g] for g in present]
    for ax, ylabel in zip(axes[0], ("mean loss (nats/token)", "share of total loss (%)"), strict=True):
        ax.set_xticks(x + 0.4 - width / 2, names, rotation=40, ha="right", fontsize=8)
        ax.set(ylabel=ylabel, xlabel="kind of target token")
        ax.set_ylim(0, ax.get_ylim()[1] * 1.2)
        ax.legend(title="model", ncols=len(runs), loc="upper left")
    axes[0, 0].set_title("How hard each kind is")
    axes[0, 1].set_title("How much of the loss each kind carries")
    report.save_figure(fig, "tag_loss.png", "Next-token loss by kind of target token at the final checkpoint")


def _plot_heads(report: Report, run, heads: list[TagStats], present: list[int]) -> None:
    import numpy as np

    fig, axes = report.figure(1, 2, width=5.5, height=0.45 * len(present) + 2)
    names = [heads[0].tags[g] for g in present]
    offsets = run.config.head_offsets
    for ax, what, unit in ((axes[0, 0], "loss", "nats/token"), (axes[0, 1], "accuracy", "top-1")):
        grid = np.array(
            [[float((h.mean_loss_G if what == "loss" else h.accuracy_G)[g]) for h in heads] for g in present]
        )
        image = ax.imshow(grid, aspect="auto", cmap="viridis_r" if what == "loss" else "viridis")
        ax.set_xticks(range(len(heads)), [f"head {i + 1}\n(t+{k})" for i, k in enumerate(offsets)])
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set(xlabel="output head (predicted offset)", title=f"{run.label}: {what} per kind and head")
        for (i, j), value in np.ndenumerate(grid):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white")
        fig.colorbar(image, ax=ax, label=f"{what} ({unit})")
    report.save_figure(
        fig, "per_head.png", "Which kinds of token each head of the multi-token model can and can't predict"
    )


def _plot_probes(report: Report, runs, probe_results) -> None:
    import numpy as np

    families = list(family_accuracy(probe_results[runs[0].label]))
    fig, ax = report.figure(width=8, height=4.5)
    x = np.arange(len(families))
    width = 0.8 / len(runs)
    for r, run in enumerate(runs):
        acc = family_accuracy(probe_results[run.label])
        ax.bar(x + r * width, [100 * acc[f][0] for f in families], width, label=run.label)
    ax.axhline(50, color="grey", ls="--", lw=0.8, label="chance")
    ax.set_xticks(x + 0.4 - width / 2, families, rotation=35, ha="right", fontsize=8)
    ax.set(ylabel="pairs where the correct continuation wins (%)", xlabel="probe family", ylim=(0, 105))
    ax.set_title("Minimal-pair probes: log p(correct) > log p(distractor)")
    ax.legend()
    report.save_figure(fig, "probes.png", "Minimal-pair probe accuracy per family, final checkpoint")


# ---- tables, results and the answer ------------------------------------------------------------------


def _tables(report: Report, runs, finals, probe_results, present: list[int]) -> None:
    header = ["kind", "% of targets"]
    for run in runs:
        header += [f"loss {run.label}", f"share {run.label}"]
    first = finals[runs[0].label][0]
    rows = []
    for g in present:
        row: list[Any] = [first.tags[g], f"{100 * float(first.count_G[g]) / first.total_count:.1f}"]
        for run in runs:
            stats = finals[run.label][0]
            row += [float(stats.mean_loss_G[g]), f"{100 * float(stats.share_G[g]):.1f}%"]
        rows.append(row)
    total = ["all", "100.0"]
    for run in runs:
        total += [finals[run.label][0].total_loss, "100.0%"]
    report.add_table(
        header, [*rows, total], "Next-token loss (nats/token) and share of total loss by kind of target"
    )
    for run in runs:
        if run.config.n_future > 1:
            heads = finals[run.label]
            hdr = ["kind"] + [f"head {i + 1} loss / acc" for i in range(len(heads))]
            body = [
                [heads[0].tags[g]]
                + [f"{float(h.mean_loss_G[g]):.3f} / {float(h.accuracy_G[g]):.2f}" for h in heads]
                for g in present
            ]
            report.add_table(hdr, body, f"{run.label}: loss (nats) and top-1 accuracy per head and kind")
    families = list(family_accuracy(probe_results[runs[0].label]))
    rows = []
    for family in families:
        row = [family, family_accuracy(probe_results[runs[0].label])[family][1]]
        row += [f"{100 * family_accuracy(probe_results[run.label])[family][0]:.0f}%" for run in runs]
        rows.append(row)
    report.add_table(
        ["probe family", "pairs", *(run.label for run in runs)], rows, "Minimal-pair probe accuracy"
    )


def _results(runs, curves, finals, probe_results) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for run in runs:
        steps, stats = curves[run.label]
        out[run.label] = {
            "heads": {f"head{i + 1}": h.to_dict() for i, h in enumerate(finals[run.label])},
            "curves": {
                "steps": steps,
                "mean_loss": {
                    tag: [float(s.mean_loss_G[g]) for s in stats] for g, tag in enumerate(stats[0].tags)
                },
                "total_loss": [s.total_loss for s in stats],
            },
            "probes": {
                "families": {
                    f: {"accuracy": a, "pairs": n}
                    for f, (a, n) in family_accuracy(probe_results[run.label]).items()
                },
                "pairs": [
                    {
                        "where": r.probe.where,
                        "family": r.probe.family,
                        "logp_correct": r.logp_correct,
                        "logp_distractor": r.logp_distractor,
                    }
                    for r in probe_results[run.label]
                ],
            },
        }
    return out


def _answer(runs, curves, finals, probe_results, present: list[int], domain: str) -> str:
    first = finals[runs[0].label][0]
    tag = first.tags
    by_share = sorted(present, key=lambda g: -float(first.share_G[g]))
    by_loss = sorted(present, key=lambda g: float(first.mean_loss_G[g]))
    parts = [
        f"On {first.total_count:,} {domain} validation targets "
        f"the {runs[0].label} model's next-token loss is "
        f"{first.total_loss:.3f} nats/token, made of very different tasks: mean loss ranges from "
        f"{float(first.mean_loss_G[by_loss[0]]):.2f} ({tag[by_loss[0]]}) to "
        f"{float(first.mean_loss_G[by_loss[-1]]):.2f} "
        f"({tag[by_loss[-1]]}), and the largest shares of the loss are "
        + ", ".join(f"{tag[g]} {100 * float(first.share_G[g]):.0f}%" for g in by_share[:3])
        + "."
    ]
    steps, stats = curves[runs[0].label]
    if len(steps) > 2:
        halves = {}
        for g in present:
            half = half_learned_step(steps, [float(s.mean_loss_G[g]) for s in stats])
            if half is not None:
                halves[tag[g]] = half
        if halves:
            early = min(halves, key=halves.get)
            late = max(halves, key=halves.get)
            if halves[early] == halves[late]:
                parts.append(f"Every kind makes half its loss drop by step {halves[early]} (of {steps[-1]}).")
            else:
                parts.append(
                    f"Kinds are learned at different times: {early} makes half its loss drop by step "
                    f"{halves[early]}, {late} only by step {halves[late]} (of {steps[-1]})."
                )
    for run in runs:
        heads = finals[run.label]
        if len(heads) > 1:
            far = heads[-1]
            ratio = {
                g: float(far.mean_loss_G[g] - heads[0].mean_loss_G[g]) for g in present if far.count_G[g] > 0
            }
            worst, best = max(ratio, key=ratio.get), min(ratio, key=ratio.get)
            parts.append(
                f"In the {run.label} model the farthest head "
                f"(t+{run.config.head_offsets[-1]}) loses most against "
                f"head 1 on {tag[worst]} (+{ratio[worst]:.2f} nats) "
                f"and least on {tag[best]} ({ratio[best]:+.2f})."
            )
    if len(runs) > 1:
        parts.append(
            "Next-token loss by model: "
            + ", ".join(f"{run.label} {finals[run.label][0].total_loss:.3f}" for run in runs)
            + "."
        )
    probe_acc = []
    for run in runs:
        results = probe_results[run.label]
        probe_acc.append(f"{run.label} {100 * sum(r.right for r in results) / len(results):.0f}%")
    parts.append(f"Minimal-pair probes overall (chance 50%): {', '.join(probe_acc)}.")
    return " ".join(parts)


@dataclass
class TasksOptions(study.LabOptions):
    """Flags of `multitoken lab tasks`."""

    out: str = "reports/lab/tasks"
    source: str | None = None
    """Corpus to prepare: python-stdlib, pydoc-english (offline English), or a path (default: by --domain)."""
    domain: Literal["auto", "code", "text"] = "auto"
    """code or text tagger; auto guesses from the source."""
    probes: str | None = None
    """Extra minimal-pair probes, a JSONL file of {"family", "prefix", "correct", "distractor"}."""


def tasks_cli(options: TasksOptions) -> None:
    """Next-token prediction is massively multi-task: loss by kind of token, across training and heads.

    Trains an n=1 and an n=2 model (same seed and budget, every checkpoint kept) unless --checkpoint is
    given, tags every validation target with its kind (code: keyword, identifier seen/new, operator,
    whitespace, number, string, comment; text: punctuation, function word, name, repeated word, number),
    and writes report.md, PNG plots and results.json to --out.
    """
    options = options.recorded(("lab", "tasks"))
    path = run_tasks(options, options.domain, options.probes)
    print(f"wrote {path}")


__all__ = ["TagStats", "half_learned_step", "run_tasks", "tag_breakdown", "tasks_cli"]
