"""`multitoken lab induction-heads`: induction heads and in-context learning (Olsson et al., 2022).

Measures, at every training checkpoint:
- behavioural: next-token loss on the first copy of a random token sequence r versus on its repeat
  in [r; r] (an induction mechanism copies the repeat almost for free);
- in-context-learning (ICL) score on natural validation text: the loss of the token at position
  round(500/512 T) minus that at round(50/512 T), each averaged over +-max(1, T/32) positions and over
  many windows, with T the evaluation window (Olsson et al. use tokens 500 and 50 of a 512 context);
  negative means later tokens are predicted better thanks to the context. Its standard error over
  windows is reported with it;
- per attention head, on [r; r]: the prefix-matching score (mean attention from a query in the repeat
  to the token right after the previous occurrence of the query's token) and the previous-token score
  (mean attention to position i - 1).
Controls: a 1-layer model (no earlier layer to compose with, so no induction heads), and repeats with a
random period per row (a head attending at a fixed distance scores on [r; r] but not there). A layer-0
head with a high prefix-matching score is flagged in the report.

Attention heads are named `trunk.L.hH` (trunk block L) and `heads.I.hH` (output head I's block).
Dimension legend: B batch, T positions (S keys), H heads, K key/value heads, E head width, D model width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from multitoken.model import Attention
from multitoken.studies import runs as study
from multitoken.studies import scoring
from multitoken.studies.report import Report

QUESTION = (
    "Do our models form induction heads, and does in-context learning improve when they do? Does "
    "multi-token prediction make them form earlier in small models?"
)
ICL_WINDOWS_FACTOR = 8
"""The ICL score reads this many times the scale's evaluation windows (it is a noisy difference of losses)."""
HIGH_PREFIX_SCORE = 0.3
"""Prefix-matching score from which a head counts as an induction head (and in layer 0, as suspicious)."""


# ---- attention patterns ------------------------------------------------------------------------------


@dataclass
class AttentionSite:
    """One attention module of the model."""

    name: str
    """Block name: trunk.L or heads.I."""
    layer: int
    """Depth of its block along the path from the embeddings (0 = first block)."""
    module: Attention
    """The module."""


def attention_sites(model) -> list[AttentionSite]:
    """Every attention module (trunk blocks, then transformer or sequential heads) with its name and depth."""
    n_trunk = model.config.n_trunk_layers
    sequential = model.config.head_style == "sequential"
    sites = []
    for name, module in model.named_modules():
        if not isinstance(module, Attention):
            continue
        parts = name.split(".")
        block = f"{parts[0]}.{parts[1]}"
        index = int(parts[1])
        layer = index if parts[0] == "trunk" else n_trunk + (index if sequential else 0)
        sites.append(AttentionSite(block, layer, module))
    return sites


def attention_probs(module: Attention, x_BTD: Tensor, rope) -> Tensor:
    """softmax(Q K^T / sqrt(E)) with RoPE and the causal mask, from the module's weights: (B, H, T, T)."""
    T = x_BTD.shape[1]
    q_BHTE, k_BKTE = (t.float() for t in module.queries_keys(x_BTD, rope))
    k_BHTE = k_BKTE.repeat_interleave(module.n_heads // module.n_kv_heads, dim=1)
    scores_BHTS = q_BHTE @ k_BHTE.transpose(-1, -2) / math.sqrt(module.head_dim)
    causal_TS = torch.ones(T, T, dtype=torch.bool, device=x_BTD.device).tril()
    return scores_BHTS.masked_fill(~causal_TS, float("-inf")).softmax(dim=-1)


@torch.no_grad()
def attention_patterns(model, tokens_BT: Tensor) -> dict[str, Tensor]:
    """Attention probabilities (B, H, T, T) of every attention module, keyed by block name."""
    patterns: dict[str, Tensor] = {}
    hooks = []
    for site in attention_sites(model):

        def hook(module, args, name=site.name):
            patterns[name] = attention_probs(module, args[0], args[1]).cpu()

        hooks.append(site.module.register_forward_pre_hook(hook))
    try:
        rope = model.rope_context(tokens_BT, None)
        model.head_states(model.trunk_forward(tokens_BT, rope), tokens_BT, rope)
    finally:
        for handle in hooks:
            handle.remove()
    return patterns


# ---- sequences and scores ----------------------------------------------------------------------------


def repeated_random_tokens(
    n_rows: int, seq_len: int, vocab: list[int], generator: torch.Generator, random_period: bool = False
) -> tuple[Tensor, Tensor]:
    """Rows that repeat a random sequence r: `tokens_BT` and the period `period_B` (where the repeat starts).

    Fixed period: [r; r] with |r| = seq_len // 2. Random period: |r| uniform in [seq_len/4, seq_len/2], r
    repeated until the row is full. Tokens of r are distinct when the vocabulary allows it.
    """
    pool_V = torch.tensor(vocab, dtype=torch.long)
    tokens_BT = torch.empty(n_rows, seq_len, dtype=torch.long)
    period_B = torch.empty(n_rows, dtype=torch.long)
    for row in range(n_rows):
        period = seq_len // 2
        if random_period:
            period = int(torch.randint(max(2, seq_len // 4), seq_len // 2 + 1, (1,), generator=generator))
        if period <= len(vocab):
            r = pool_V[torch.randperm(len(vocab), generator=generator)[:period]]
        else:
            r = pool_V[torch.randint(len(vocab), (period,), generator=generator)]
        tokens_BT[row] = r.repeat(seq_len // period + 1)[:seq_len]
        period_B[row] = period
    return tokens_BT, period_B


def prefix_match_targets(tokens_T: Tensor) -> Tensor:
    """For each position i, the position after the most recent earlier occurrence of token i (-1: none)."""
    last_seen: dict[int, int] = {}
    targets = []
    for i, token in enumerate(tokens_T.tolist()):
        targets.append(last_seen[token] + 1 if token in last_seen else -1)
        last_seen[token] = i
    return torch.tensor(targets, dtype=torch.long)


def head_scores(
    patterns: dict[str, Tensor], tokens_BT: Tensor, period_B: Tensor
) -> dict[str, tuple[float, float]]:
    """(prefix-matching, previous-token) score of every head `block.hH`, both in [0, 1].

    Prefix matching averages over queries in the repeat (i >= period) that have a previous occurrence;
    previous-token averages over every query i >= 1.
    """
    B, T = tokens_BT.shape
    targets_BT = torch.stack([prefix_match_targets(row) for row in tokens_BT])
    positions_T = torch.arange(T)
    in_repeat_BT = positions_T.unsqueeze(0) >= period_B.unsqueeze(1)
    valid_BT = in_repeat_BT & (targets_BT >= 0)
    out = {}
    for name, attn_BHTS in patterns.items():
        H = attn_BHTS.shape[1]
        to_target_BHT = attn_BHTS.gather(
            -1, targets_BT.clamp(min=0)[:, None, :, None].expand(B, H, T, 1)
        ).squeeze(-1)
        prefix_H = (to_target_BHT * valid_BT[:, None]).sum(dim=(0, 2)) / valid_BT.sum().clamp(min=1)
        prev_BHT = attn_BHTS[:, :, positions_T[1:], positions_T[:-1]]
        prev_H = prev_BHT.mean(dim=(0, 2))
        for h in range(H):
            out[f"{name}.h{h}"] = (float(prefix_H[h]), float(prev_H[h]))
    return out


@torch.no_grad()
def copy_losses(model, tokens_BT: Tensor, period_B: Tensor) -> tuple[float, float]:
    """Mean next-token loss (nats) on the first copy (targets 1 .. period-1) and the repeat (> period)."""
    scores = scoring.token_scores(model, tokens_BT)
    loss_BT = scores.loss_BTN[..., 0]
    target_pos_T = torch.arange(1, tokens_BT.shape[1] + 1)
    first_BT = target_pos_T.unsqueeze(0) < period_B.unsqueeze(1)
    repeat_BT = target_pos_T.unsqueeze(0) > period_B.unsqueeze(1)
    valid_BT = torch.isfinite(loss_BT)
    first = loss_BT[first_BT & valid_BT].mean()
    repeat = loss_BT[repeat_BT & valid_BT].mean()
    return float(first), float(repeat)


def icl_positions(seq_len: int) -> tuple[int, int, int]:
    """(early, late, half-width): target indices ~50/512 and ~500/512 of the window, averaged over +-width."""
    early = max(1, round(seq_len * 50 / 512))
    late = min(seq_len - 1, round(seq_len * 500 / 512))
    width = max(1, seq_len // 32)
    return early, late, width


@torch.no_grad()
def icl_score(model, tokens_WT: Tensor, sep_id: int | None = None) -> tuple[float, float]:
    """Loss at a late position minus loss at an early one (nats; negative = the context helps), and its
    standard error over windows."""
    scores = scoring.token_scores(model, tokens_WT, sep_id=sep_id)
    loss_WT = scores.loss_BTN[..., 0]  # position t predicts target t + 1
    early, late, width = icl_positions(tokens_WT.shape[1])

    def around(index: int) -> Tensor:
        lo, hi = max(1, index - width), min(tokens_WT.shape[1] - 1, index + width)
        return torch.nanmean(loss_WT[:, lo - 1 : hi].double(), dim=1)

    diff_W = around(late) - around(early)
    diff_W = diff_W[torch.isfinite(diff_W)]
    stderr = float(diff_W.std() / math.sqrt(diff_W.numel())) if diff_W.numel() > 1 else float("nan")
    return float(diff_W.mean()), stderr


# ---- the experiment ----------------------------------------------------------------------------------


@dataclass
class Measurement:
    """Everything measured on one checkpoint."""

    step: int
    """Training step."""
    icl: float
    """ICL score (nats)."""
    icl_stderr: float
    """Its standard error over windows."""
    loss_first: float
    """Loss on the first copy of r (fixed period)."""
    loss_repeat: float
    """Loss on the repeat (fixed period)."""
    loss_first_random: float
    """Loss on the first copy (random period)."""
    loss_repeat_random: float
    """Loss on the repeat (random period)."""
    heads: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Head -> (prefix-matching, previous-token), fixed period."""
    heads_random: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Head -> (prefix-matching, previous-token), random period."""

    @property
    def copy_gain(self) -> float:
        return self.loss_first - self.loss_repeat

    @property
    def copy_gain_random(self) -> float:
        return self.loss_first_random - self.loss_repeat_random

    def max_prefix(self, random: bool = False) -> tuple[str, float]:
        scores = self.heads_random if random else self.heads
        name = max(scores, key=lambda h: scores[h][0])
        return name, scores[name][0]


def measure(model, step: int, natural_WT: Tensor, sep_id, fixed, random) -> Measurement:
    """All scores of one model."""
    device = next(model.parameters()).device
    first, repeat = copy_losses(model, *fixed)
    first_r, repeat_r = copy_losses(model, *random)
    return Measurement(
        step,
        *icl_score(model, natural_WT, sep_id),
        first,
        repeat,
        first_r,
        repeat_r,
        head_scores(attention_patterns(model, fixed[0].to(device)), *fixed),
        head_scores(attention_patterns(model, random[0].to(device)), *random),
    )


def rise_step(steps: list[int], values: list[float], min_rise: float = 0.05) -> int | None:
    """First step where a rising curve has made half its rise above the start (None: it never rises)."""
    rise = max(values) - values[0]
    if rise < min_rise:
        return None
    return next(s for s, v in zip(steps, values, strict=True) if v - values[0] >= 0.5 * rise)


def layer_of(run: study.LabRun) -> dict[str, int]:
    """Block name -> depth for a run's model shape."""
    with torch.device("meta"):
        from multitoken.model import MultiTokenLM

        return {site.name: site.layer for site in attention_sites(MultiTokenLM(run.config))}


def run_induction_heads(options: study.LabOptions, one_layer_control: bool = True) -> Path:
    """Run the experiment; returns the path of report.md."""
    controls = {"1 layer": {"n_layers": 1, "n_future": 1}} if one_layer_control else {}
    runs, data = study.lab_runs(options, "python-stdlib", controls)
    sizes, device = options.sizes, study.pick_device(options.device)
    seq_len = min(sizes.seq_len, *(run.config.max_seq_len for run in runs))
    stream_S, dataset = scoring.val_stream(data, 20 * sizes.eval_windows * seq_len)
    natural_WT, _ = scoring.windows(stream_S, seq_len, ICL_WINDOWS_FACTOR * sizes.eval_windows)
    specials = {dataset.eos_id, dataset.pad_id}
    vocab = [i for i in range(runs[0].config.vocab_size) if i not in specials]
    generator = torch.Generator().manual_seed(options.seed + 1)
    n_rows = max(4, sizes.eval_windows // 2)
    fixed = repeated_random_tokens(n_rows, seq_len, vocab, generator)
    random = repeated_random_tokens(n_rows, seq_len, vocab, generator, random_period=True)

    history: dict[str, list[Measurement]] = {}
    for run in runs:
        history[run.label] = []
        for step, path in tqdm(run.checkpoints, desc=f"scoring {run.label}", disable=not options.progress):
            model = study.load_run_model(run, path, device)
            history[run.label].append(measure(model, step, natural_WT, dataset.eos_id, fixed, random))

    report = Report(options.out, "Induction heads and in-context learning", QUESTION)
    _plot_phase_change(report, runs, history)
    _plot_heads(report, runs, history)
    _plot_head_history(report, runs, history)
    warnings = _layer0_warnings(runs, history)
    results = {
        "definitions": {
            "icl_positions": dict(zip(("early", "late", "half_width"), icl_positions(seq_len), strict=True)),
            "high_prefix_score": HIGH_PREFIX_SCORE,
            "sequences": (
                f"{n_rows} rows of {seq_len} random tokens, fixed period {seq_len // 2} and random period"
            ),
        },
        "warnings": warnings,
        "runs": {
            run.label: [
                {
                    "step": m.step,
                    "icl": m.icl,
                    "icl_stderr": m.icl_stderr,
                    "loss_first": m.loss_first,
                    "loss_repeat": m.loss_repeat,
                    "loss_first_random": m.loss_first_random,
                    "loss_repeat_random": m.loss_repeat_random,
                    "heads": {h: {"prefix": p, "previous": q} for h, (p, q) in m.heads.items()},
                    "heads_random_period": {
                        h: {"prefix": p, "previous": q} for h, (p, q) in m.heads_random.items()
                    },
                }
                for m in history[run.label]
            ]
            for run in runs
        },
    }
    _table(report, runs, history)
    if warnings:
        report.add_table(["warning"], [[w] for w in warnings], "Warnings: suspicious layer-0 heads")
    answer = _answer(runs, history, warnings)
    details = study.run_details(runs, options, data)
    early, late, width = icl_positions(seq_len)
    details["ICL score"] = (
        f"loss of target token {late} minus token {early} (each averaged over +-{width} positions) in "
        f"{natural_WT.shape[0]} validation windows of {seq_len} tokens"
    )
    details["random sequences"] = results["definitions"]["sequences"]
    if warnings:
        details["WARNING"] = " | ".join(warnings)
    return report.write(answer, results, options.command, details=details)


def _layer0_warnings(runs, history) -> list[str]:
    warnings = []
    for run in runs:
        layers = layer_of(run)
        final = history[run.label][-1]
        for head, (prefix, _) in final.heads.items():
            block = head.rsplit(".", 1)[0]
            if layers[block] == 0 and prefix >= HIGH_PREFIX_SCORE:
                random_score = final.heads_random[head][0]
                warnings.append(
                    f"{run.label}: layer-0 head {head} has prefix-matching score {prefix:.2f} "
                    f"({random_score:.2f} with a random repeat "
                    "period); a first-layer head cannot compose with "
                    "a previous-token head, so this is likely a positional shortcut, not induction"
                )
    return warnings


def _plot_phase_change(report: Report, runs, history) -> None:
    import numpy as np

    fig, axes = report.figure(1, 3, width=4.6, height=4.0)
    ax_icl, ax_prefix, ax_copy = axes[0]
    for index, run in enumerate(runs):
        ms = history[run.label]
        steps = [m.step for m in ms]
        color = f"C{index}"
        icl = [m.icl for m in ms]
        ax_icl.plot(steps, icl, marker="o", ms=3, color=color, label=run.label)
        icl_W, se_W = np.array(icl), np.array([m.icl_stderr for m in ms])
        ax_icl.fill_between(steps, icl_W - se_W, icl_W + se_W, color=color, alpha=0.15)
        ax_prefix.plot(
            steps, [m.max_prefix()[1] for m in ms], marker="o", ms=3, color=color, label=f"{run.label}"
        )
        ax_prefix.plot(
            steps,
            [m.max_prefix(True)[1] for m in ms],
            ls="--",
            color=color,
            label=f"{run.label}, random period",
        )
        ax_copy.plot(steps, [m.copy_gain for m in ms], marker="o", ms=3, color=color, label=run.label)
        ax_copy.plot(
            steps, [m.copy_gain_random for m in ms], ls="--", color=color, label=f"{run.label}, random period"
        )
    ax_icl.axhline(0, color="grey", lw=0.8)
    ax_icl.set(
        xlabel="training step", ylabel="late minus early loss (nats)", title="In-context-learning score"
    )
    ax_prefix.axhline(HIGH_PREFIX_SCORE, color="grey", ls=":", lw=0.8)
    ax_prefix.set(
        xlabel="training step", ylabel="attention to the induction target", title="Max prefix-matching score"
    )
    ax_prefix.set_ylim(0, 1)
    ax_copy.axhline(0, color="grey", lw=0.8)
    ax_copy.set(
        xlabel="training step", ylabel="loss on 1st copy minus repeat (nats)", title="Copying random tokens"
    )
    for ax in axes[0]:
        ax.legend(fontsize=7)
    report.save_figure(
        fig,
        "phase_change.png",
        "Across training: ICL score (lower is better; band: +-1 standard "
        "error), the best head's prefix-matching score, and how much "
        "cheaper the repeat of a random sequence is than its first copy (dashed: random repeat period)",
    )


def _plot_heads(report: Report, runs, history) -> None:
    fig, ax = report.figure(width=6.5, height=5.0)
    for index, run in enumerate(runs):
        layers = layer_of(run)
        heads = history[run.label][-1].heads
        for head, (prefix, prev) in heads.items():
            layer0 = layers[head.rsplit(".", 1)[0]] == 0
            ax.scatter(prev, prefix, color=f"C{index}", marker="s" if layer0 else "o", s=30, alpha=0.8)
            if prefix >= 0.5 * HIGH_PREFIX_SCORE:
                ax.annotate(
                    f"{run.label} {head}",
                    (prev, prefix),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        ax.scatter([], [], color=f"C{index}", label=run.label)
    ax.scatter([], [], color="grey", marker="s", label="layer-0 head")
    ax.axhline(HIGH_PREFIX_SCORE, color="grey", ls=":", lw=0.8)
    ax.set(
        xlabel="previous-token score (attention to i-1)",
        ylabel="prefix-matching score (attention to induction target)",
        title="Every attention head at the final checkpoint",
        xlim=(-0.02, 1.02),
        ylim=(-0.02, 1.02),
    )
    ax.legend(fontsize=8)
    report.save_figure(
        fig, "heads.png", "Prefix-matching vs previous-token score of every head (fixed-period [r; r])"
    )


def _plot_head_history(report: Report, runs, history) -> None:
    import numpy as np

    fig, axes = report.figure(
        1, len(runs), width=4.5, height=0.25 * max(len(history[r.label][-1].heads) for r in runs) + 2
    )
    for ax, run in zip(axes[0], runs, strict=True):
        ms = history[run.label]
        names = list(ms[-1].heads)
        grid = np.array([[m.heads[h][0] for m in ms] for h in names])
        image = ax.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ticks = list(range(0, len(ms), max(1, len(ms) // 6)))
        ax.set_xticks(ticks, [ms[i].step for i in ticks])
        ax.set(xlabel="training step", ylabel="attention head", title=f"{run.label}")
    fig.colorbar(image, ax=axes[0][-1], label="prefix-matching score")
    report.save_figure(fig, "heads_over_training.png", "Prefix-matching score of every head across training")


def _table(report: Report, runs, history) -> None:
    rows = []
    for run in runs:
        first, last = history[run.label][0], history[run.label][-1]
        head, score = last.max_prefix()
        rows.append(
            [
                run.label,
                f"{first.step} -> {last.step}",
                f"{first.icl:+.3f} -> {last.icl:+.3f} ± {last.icl_stderr:.3f}",
                f"{last.loss_first:.2f} / {last.loss_repeat:.2f}",
                f"{last.loss_first_random:.2f} / {last.loss_repeat_random:.2f}",
                f"{head} {score:.2f}",
                f"{last.heads_random[head][0]:.2f}",
                _when(
                    rise_step(
                        [m.step for m in history[run.label]], [m.copy_gain_random for m in history[run.label]]
                    )
                ),
            ]
        )
    report.add_table(
        [
            "model",
            "steps",
            "ICL score (nats)",
            "loss 1st copy / repeat",
            "same, random period",
            "best prefix-matching head",
            "its score, random period",
            "step copying rises",
        ],
        rows,
        "Start and end of training",
    )


def _answer(runs, history, warnings: list[str]) -> str:
    parts = []
    for run in runs:
        ms = history[run.label]
        last = ms[-1]
        head, score = last.max_prefix()
        rise = rise_step([m.step for m in ms], [m.copy_gain_random for m in ms])
        parts.append(
            f"{run.label}: ICL score {ms[0].icl:+.2f} -> {last.icl:+.2f} ± "
            f"{last.icl_stderr:.2f} nats; repeat of a random sequence costs "
            f"{last.loss_repeat_random:.2f} vs {last.loss_first_random:.2f} "
            "nats on the first copy (random period); "
            f"best head {head} prefix-matching {score:.2f} ({last.heads_random[head][0]:.2f} random period)"
            + (f"; copying rises by step {rise}." if rise is not None else "; copying never rises.")
        )
    induction = [run.label for run in runs if history[run.label][-1].max_prefix(True)[1] >= HIGH_PREFIX_SCORE]
    verdict = (
        f"Induction heads (prefix-matching >= {HIGH_PREFIX_SCORE} with a random period) formed in: "
        + (", ".join(induction) if induction else "none of the models in this run")
        + "."
    )
    mtp = [r for r in runs if r.config.n_future > 1]
    ntp = [r for r in runs if r.config.n_future == 1 and r.config.n_layers > 1]
    if mtp and ntp:
        a, b = ntp[0].label, mtp[0].label
        rise_a = rise_step([m.step for m in history[a]], [m.copy_gain_random for m in history[a]])
        rise_b = rise_step([m.step for m in history[b]], [m.copy_gain_random for m in history[b]])
        verdict += (
            " Copying of random repeats rises (half its gain) "
            f"{_when(rise_a)} for {a} and {_when(rise_b)} for {b} "
            "(same seed and budget)."
        )
    if warnings:
        verdict += f" Warning: {len(warnings)} layer-0 head(s) score high (see below)."
    return " ".join([verdict, *parts])


def _when(step: int | None) -> str:
    return "never" if step is None else f"by step {step}"


@dataclass
class InductionHeadsOptions(study.LabOptions):
    """Flags of `multitoken lab induction-heads`."""

    out: str = "reports/lab/induction-heads"
    seed: int = 0
    """Seed of initialisation, data order and the random sequences."""
    one_layer_control: bool = True
    """Also train a 1-layer model, which cannot form induction heads."""


def induction_heads_cli(options: InductionHeadsOptions) -> None:
    """Induction heads and in-context learning: per-head prefix-matching and ICL scores over training.

    Trains n=1 and n=2 models and a 1-layer control (same seed and budget, every checkpoint kept) unless
    --checkpoint is given, then measures every checkpoint and writes report.md, PNGs and results.json.
    """
    options = options.recorded(("lab", "induction-heads"))
    print(f"wrote {run_induction_heads(options, options.one_layer_control and not options.checkpoint)}")


__all__ = [
    "attention_patterns",
    "attention_probs",
    "copy_losses",
    "head_scores",
    "icl_score",
    "induction_heads_cli",
    "prefix_match_targets",
    "repeated_random_tokens",
    "run_induction_heads",
]
