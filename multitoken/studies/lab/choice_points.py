"""`multitoken lab choice-points`: how much weight next-token and n-token losses put on choice points (§5.1).

A choice point is a position t where the next-token head is unsure what comes next (its entropy at t is
high) but, once that token is chosen, the continuation is settled (its entropy at t+1 is low): the
token at t+1 decides what follows. The paper argues that n-token prediction weights such positions
more: an error there also spoils the n-1 predictions of the tokens it decides, so the loss terms that
read the hidden state at t (head i predicts x_{t+i}) are large together.

Measured on one trained model with n heads, at each position t of validation windows:

    next-token loss weight  w1(t) = l_1(t)                 (head 1 only)
    n-token loss weight     wn(t) = sum_i l_i(t)           (every head reads the trunk state h_t)
    gradient weight         g(t)  = || dL / dh_t ||        for L = sum_t w1(t) or sum_t wn(t)

and the share of the total that choice points carry, next to the share of positions they are.

Dimension legend: B batch (windows), T positions, N heads, V vocabulary, D model width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from multitoken.errors import UserError
from multitoken.loss import IGNORE_INDEX, build_targets
from multitoken.studies import runs as study
from multitoken.studies import scoring
from multitoken.studies.report import Report, stacked_bars

QUESTION = (
    "Do multi-token losses put more weight on choice points (uncertain tokens that settle what follows) "
    "than the next-token loss does (paper §5.1)?"
)
CLASSES = ("choice points", "uncertain, no branch", "other")


def mark_positions(entropy_BT: Tensor, high: float, low: float) -> dict[str, Tensor]:
    """Boolean masks of the position classes from the next-token head's entropy `entropy_BT` (NaN: none).

    choice points: entropy(t) >= high and entropy(t+1) <= low; uncertain, no branch: entropy(t) >= high
    and entropy(t+1) > low; other: every remaining position with both entropies defined.
    """
    now_BT, then_BT = entropy_BT[:, :-1], entropy_BT[:, 1:]
    defined_BT = now_BT.isfinite() & then_BT.isfinite()
    choice_BT = defined_BT & (now_BT >= high) & (then_BT <= low)
    branchless_BT = defined_BT & (now_BT >= high) & (then_BT > low)
    pad_BT = torch.zeros_like(entropy_BT[:, :1], dtype=torch.bool)
    masks = {
        "choice points": choice_BT,
        "uncertain, no branch": branchless_BT,
        "other": defined_BT & ~choice_BT & ~branchless_BT,
    }
    return {k: torch.cat([m_BT, pad_BT], dim=1) for k, m_BT in masks.items()}


def shares(weight_BT: Tensor, masks: dict[str, Tensor]) -> dict[str, float]:
    """Share of the total weight (over the union of the masks) that each class carries."""
    total = sum(float(weight_BT[m_BT].sum()) for m_BT in masks.values())
    return {k: float(weight_BT[m_BT].sum()) / total for k, m_BT in masks.items()}


def head_losses_and_grads(model, tokens_BT: Tensor, sep_id: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """(loss_BTN, gradnorm1_BT, gradnormN_BT): every head's loss at every position (NaN where no target),
    and the norm of the gradient at the trunk output h_t of the head-1 loss and of the all-heads loss."""
    if model.config.head_style == "sequential":
        raise UserError("choice-points needs parallel heads (transformer or linear), not sequential ones")
    rope = model.rope_context(tokens_BT, None)
    with torch.no_grad():
        h_BTD = model.trunk_forward(tokens_BT, rope)
    h_BTD.requires_grad_(True)
    targets_BTN = build_targets(tokens_BT, model.config.head_offsets, sep_id=sep_id)
    losses, grads = [], []
    for i in range(model.config.n_future):
        logits_BTV = model.logits(model.head_forward(i, h_BTD, rope, model.head_tokens(i, tokens_BT))).float()
        loss_BT = F.cross_entropy(logits_BTV.transpose(1, 2), targets_BTN[..., i], reduction="none")
        (grad_BTD,) = torch.autograd.grad(loss_BT.sum(), h_BTD)
        losses.append(torch.where(targets_BTN[..., i] != IGNORE_INDEX, loss_BT.detach(), torch.nan))
        grads.append(grad_BTD)
    gradnorm1_BT = grads[0].norm(dim=-1)
    gradnormN_BT = torch.stack(grads).sum(0).norm(dim=-1)
    return torch.stack(losses, dim=-1), gradnorm1_BT, gradnormN_BT


def measure(model, tokens_WT: Tensor, sep_id: int | None, quantiles: tuple[float, float]) -> dict:
    """Shares of positions, loss weight and gradient weight of each class, next-token vs all heads."""
    scores = scoring.token_scores(model, tokens_WT, sep_id=sep_id)
    entropy_BT = scores.entropy_BTN[..., 0]
    finite = entropy_BT[entropy_BT.isfinite()]
    high, low = (float(finite.quantile(q)) for q in (quantiles[1], quantiles[0]))
    parts = [head_losses_and_grads(model, tokens_WT[i : i + 8], sep_id) for i in range(0, len(tokens_WT), 8)]
    loss_BTN, grad1_BT, gradn_BT = (torch.cat(group) for group in zip(*parts, strict=True))
    complete_BT = loss_BTN.isfinite().all(-1)  # every head has a target: compare like with like
    masks = {k: m_BT & complete_BT for k, m_BT in mark_positions(entropy_BT, high, low).items()}
    n = model.config.n_future
    return {
        "n_heads": n,
        "entropy_thresholds_nats": {"high": high, "low": low},
        "positions": shares(torch.ones_like(entropy_BT), masks),
        "loss next-token": shares(loss_BTN[..., 0].nan_to_num(), masks),
        f"loss {n}-token": shares(loss_BTN.nan_to_num().sum(-1), masks),
        "gradient next-token": shares(grad1_BT, masks),
        f"gradient {n}-token": shares(gradn_BT, masks),
        "counts": {k: int(m_BT.sum()) for k, m_BT in masks.items()},
    }


def run_choice_points(options: study.LabOptions, quantiles: tuple[float, float]) -> Path:
    """Train (or read) a multi-head model and measure the weights of choice points; returns report.md."""
    n = options.n_future[0]
    # Parameter-matched heads take their blocks from the trunk: keep at least two trunk blocks, so the
    # "trunk output" is a computed state and not the embeddings.
    fields = {"n_future": n, "n_layers": max(n + 2, options.sizes.model.get("n_layers", n))}
    runs, data = study.lab_runs(options, study.ENGLISH_SOURCE, extra_runs={f"n={n}": fields})
    # A next-token checkpoint (n=1) is measured too: its "1-token" columns are its next-token ones, the
    # baseline for the next-token shares of a multi-head model.
    device = study.pick_device(options.device)
    seq_len = min(options.sizes.seq_len, *(run.config.max_seq_len for run in runs))
    stream_S, dataset = scoring.val_stream(data, options.sizes.eval_windows * seq_len)
    tokens_WT, _ = scoring.windows(stream_S, seq_len)
    results = {}
    for run in runs:
        model = study.load_run_model(run, run.final, device)
        results[run.label] = measure(model, tokens_WT.to(device), dataset.eos_id, quantiles)
    report = Report(options.out, "Choice points under next-token and multi-token losses (§5.1)", QUESTION)
    _plot(report, results)
    rows = []
    for label, r in results.items():
        n = r["n_heads"]
        for k in CLASSES:
            rows.append([label, k, r["counts"][k], f"{100 * r['positions'][k]:.1f}%",
                         f"{100 * r['loss next-token'][k]:.1f}%", f"{100 * r[f'loss {n}-token'][k]:.1f}%",
                         f"{100 * r['gradient next-token'][k]:.1f}%", f"{100 * r[f'gradient {n}-token'][k]:.1f}%"])  # fmt: skip
    report.add_table(
        ["model", "positions", "count", "share of positions", "next-token loss", "n-token loss",
         "next-token gradient", "n-token gradient"],
        rows,
        "Share of the total loss and of the gradient at the trunk output carried by each class",
    )  # fmt: skip
    details = study.run_details(runs, options, data)
    details["marking"] = (
        f"choice point: next-token entropy at t at or above its {100 * quantiles[1]:.0f}th percentile and at t+1 "
        f"at or below its {100 * quantiles[0]:.0f}th percentile; {tokens_WT.shape[0]} windows of {seq_len}"
    )
    return report.write(_answer(results), results, options.command, details=details)


def _plot(report: Report, results: dict) -> None:
    fig, axes = report.figure(1, len(results), width=6)
    axes = [axes] if len(results) == 1 else list(axes[0])
    for ax, (label, r) in zip(axes, results.items(), strict=True):
        n = r["n_heads"]
        columns = [
            "positions",
            "loss next-token",
            f"loss {n}-token",
            "gradient next-token",
            f"gradient {n}-token",
        ]
        colors = ("tab:red", "tab:orange", "0.8")
        parts = [
            (k, [100 * r[c][k] for c in columns], color) for k, color in zip(CLASSES, colors, strict=True)
        ]
        stacked_bars(ax, [c.replace(" ", "\n") for c in columns], parts)
        ax.set_ylabel("share (%)")
        ax.set_title(f"{label}: who carries the loss")
        ax.legend(fontsize=8)
    report.save_figure(
        fig, "choice_points.png", "Shares of positions, loss and gradient by class of position"
    )


def _answer(results: dict) -> str:
    parts = []
    for label, r in results.items():
        n, k = r["n_heads"], "choice points"
        shares = f"{label}: choice points are {100 * r['positions'][k]:.1f}% of positions and carry "
        if n == 1:  # a next-token model: its shares are the baseline
            parts.append(
                shares + f"{100 * r['loss next-token'][k]:.1f}% of the next-token loss "
                f"({100 * r['gradient next-token'][k]:.1f}% of the gradient at the trunk output)"
            )
            continue
        parts.append(
            shares + f"{100 * r['loss next-token'][k]:.1f}% of the next-token loss but "
            f"{100 * r[f'loss {n}-token'][k]:.1f}% of the {n}-token loss ({100 * r['gradient next-token'][k]:.1f}% vs "
            f"{100 * r[f'gradient {n}-token'][k]:.1f}% of the gradient at the trunk output)"
        )
    return "; ".join(parts) + "."


@dataclass
class ChoicePointsOptions(study.LabOptions):
    """Flags of `multitoken lab choice-points`."""

    out: str = "reports/lab/choice-points"
    n_future: list[int] = field(default_factory=lambda: [4])
    """Heads of the model trained here, at least 2 (ignored with --checkpoint)."""
    high_quantile: float = 0.8
    """Entropy quantile at or above which the next token is uncertain."""
    low_quantile: float = 0.5
    """Entropy quantile at or below which the token after it is settled."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.low_quantile <= self.high_quantile < 1:
            raise UserError(
                f"need 0 < low-quantile <= high-quantile < 1, got {self.low_quantile} and {self.high_quantile}"
            )
        if len(self.n_future) != 1 or self.n_future[0] < 2:
            raise UserError(
                f"n-future must be one number, at least 2 to compare with next-token loss, got {self.n_future}"
            )


def choice_points_cli(options: ChoicePointsOptions) -> None:
    """Choice points (paper §5.1): the share of next-token vs n-token loss and gradient they carry.

    Trains an n-head model unless --checkpoint is given (any model with parallel heads; with n=1 only the
    next-token shares mean anything),
    marks choice points from its next-token entropy, and writes report.md, results.json and a plot.
    The default corpus is pydoc-english.
    """
    options = options.recorded(("lab", "choice-points"))
    print(f"wrote {run_choice_points(options, (options.low_quantile, options.high_quantile))}")
