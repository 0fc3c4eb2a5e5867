"""`multitoken lab surprisal`: tokens carry very different amounts of information (Jason Wei, 2023).

Surprisal of a token is -log2 p(token | context) in bits (the loss in base 2); entropy is the entropy
in bits of the model's predictive distribution at that point. Head i of an MTP model predicts the token
`head_offsets[i]` ahead, so under head i a token's surprisal comes from the position that many back.

Dimension legend: W windows, T positions, N heads.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from multitoken.checkpoint import load_checkpoint
from multitoken.data.loader import TokenDataset
from multitoken.errors import UserError
from multitoken.studies import runs as study
from multitoken.studies import scoring
from multitoken.studies.lab.tagging import token_pieces
from multitoken.studies.report import Report

QUESTION = (
    "Do all tokens carry the same information? How is surprisal (bits) spread over the tokens of a text, "
    "and what share of the loss do the most surprising tokens carry?"
)
LN2 = math.log(2)


@dataclass
class TextSurprisal:
    """Per-token surprisal and entropy of one model over a text, aligned to the tokens themselves."""

    ids_T: list[int]
    """The tokens, in order (windows concatenated)."""
    surprisal_TN: Tensor
    """Bits of token t under head i (NaN where head i made no prediction of it, e.g. window starts)."""
    entropy_TN: Tensor
    """Entropy (bits) of head i's distribution when it predicted token t."""
    offsets: list[int]
    """head_offsets of the model."""


def score_text(model, tokens_WT: Tensor, sep_id: int | None = None) -> TextSurprisal:
    """Surprisal and entropy of every token of every window, shifted so row t describes token t."""
    scores = scoring.token_scores(model, tokens_WT, sep_id=sep_id)
    offsets = list(model.config.head_offsets)
    W, T, N = scores.loss_BTN.shape
    surprisal_WTN = torch.full((W, T, N), torch.nan)
    entropy_WTN = torch.full((W, T, N), torch.nan)
    for i, k in enumerate(offsets):
        if k < T:
            surprisal_WTN[:, k:, i] = scores.loss_BTN[:, : T - k, i] / LN2
            entropy_WTN[:, k:, i] = scores.entropy_BTN[:, : T - k, i] / LN2
    return TextSurprisal(
        tokens_WT.reshape(-1).tolist(),
        surprisal_WTN.reshape(W * T, N),
        entropy_WTN.reshape(W * T, N),
        offsets,
    )


def top_share(values: Tensor, fraction: float = 0.1) -> float:
    """Share of the total carried by the largest `fraction` of the (finite) values, in (0, 1]."""
    finite = values[torch.isfinite(values)].double()
    if finite.numel() == 0 or finite.sum() <= 0:
        raise ValueError("no positive values to share")
    k = max(1, math.ceil(fraction * finite.numel()))
    return float(finite.sort(descending=True).values[:k].sum() / finite.sum())


def head_summary(text: TextSurprisal, head: int) -> dict[str, float]:
    """Mean, median and spread of one head's surprisal, and the top-10% share of its loss."""
    s = text.surprisal_TN[:, head]
    s = s[torch.isfinite(s)]
    e = text.entropy_TN[:, head]
    e = e[torch.isfinite(e)]
    return {
        "tokens": int(s.numel()),
        "mean_bits": float(s.mean()),
        "median_bits": float(s.median()),
        "p90_bits": float(s.quantile(0.9)),
        "mean_entropy_bits": float(e.mean()),
        "top10_share": top_share(s, 0.1),
        "bottom50_share": 1.0 - top_share(s, 0.5),
    }


# ---- rendering ---------------------------------------------------------------------------------------


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Printable text of each token (invalid UTF-8 pieces shown with the replacement character)."""
    specials = {tokenizer.eos_id: "<|endoftext|>"}
    return [
        specials.get(i) or piece.decode("utf-8", errors="replace")
        for i, piece in zip(ids, token_pieces(tokenizer, ids), strict=True)
    ]


def _color(bits: float, vmax: float) -> str:
    """A white-to-red colour for a surprisal; grey when there is none."""
    if not math.isfinite(bits):
        return "#dddddd"
    x = min(max(bits / vmax, 0.0), 1.0)
    return f"rgb(255,{int(255 * (1 - 0.85 * x))},{int(255 * (1 - x))})"


def render_html(text: TextSurprisal, pieces: list[str], title: str, vmax: float) -> str:
    """An HTML page: one section per head, every token coloured by surprisal, details on hover."""
    sections = []
    for head, offset in enumerate(text.offsets):
        spans = []
        for t, piece in enumerate(pieces):
            bits = float(text.surprisal_TN[t, head])
            ent = float(text.entropy_TN[t, head])
            tip = (
                f"surprisal {bits:.2f} bits, entropy {ent:.2f} bits"
                if math.isfinite(bits)
                else "no prediction"
            )
            shown = html.escape(piece).replace("\n", "↵<br>")
            spans.append(f'<span style="background:{_color(bits, vmax)}" title="{tip}">{shown}</span>')
        summary = head_summary(text, head)
        sections.append(
            f"<h2>Head {head + 1} (predicts t+{offset}): mean {summary['mean_bits']:.2f} bits/token, "
            f"top 10% of tokens carry {100 * summary['top10_share']:.0f}% of the loss</h2>"
            f'<pre class="text">{"".join(spans)}</pre>'
        )
    legend = (
        f"White = 0 bits, red = {vmax:.1f}+ bits of surprisal; grey = not predicted (window start). "
        "Hover a token for its surprisal and the entropy of the prediction."
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em} pre.text{white-space:pre-wrap;font-size:13px;"
        "line-height:1.6} span{border-radius:2px}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{legend}</p>{''.join(sections)}</body></html>\n"
    )


def _strip_chart(
    report: Report, name: str, text: TextSurprisal, pieces: list[str], label: str, vmax: float, n: int
) -> None:
    """The first `n` tokens drawn as coloured boxes, wrapped like text."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap, Normalize
    from matplotlib.patches import Rectangle

    width_chars, rows, x, y = 140, [], 0, 0
    for t, piece in enumerate(pieces[:n]):
        shown = piece.replace("\n", "↵").replace("\t", "→") or "∅"
        if x + len(shown) > width_chars and x > 0:
            x, y = 0, y + 1
        rows.append((x, y, shown, float(text.surprisal_TN[t, 0])))
        x += len(shown)
        if "\n" in piece:
            x, y = 0, y + 1
    n_lines = y + 1
    fig, ax = report.figure(width=11, height=0.28 * n_lines + 1.4)
    cmap = LinearSegmentedColormap.from_list("surprisal", ["#ffffff", "#ffd9b3", "#d62728"])
    for x, y, shown, bits in rows:
        color = cmap(min(bits / vmax, 1.0)) if math.isfinite(bits) else "#dddddd"
        ax.add_patch(Rectangle((x, -y - 0.9), len(shown), 0.8, color=color, lw=0))
        ax.text(x, -y - 0.5, shown, family="monospace", fontsize=8.3, va="center", ha="left")
    ax.set_xlim(0, width_chars)
    ax.set_ylim(-n_lines - 0.2, 0.2)
    ax.axis("off")
    ax.set_title(f"{label}: surprisal of the first {len(rows)} tokens (next-token head)")
    mappable = plt.cm.ScalarMappable(norm=Normalize(0, vmax), cmap=cmap)
    fig.colorbar(mappable, ax=ax, orientation="horizontal", fraction=0.05, pad=0.02, label="surprisal (bits)")
    report.save_figure(
        fig, name, f"{label}: the first {len(rows)} tokens coloured by surprisal (grey: no prediction)"
    )


def _plot_distribution(report: Report, texts: dict[str, TextSurprisal]) -> None:
    import numpy as np

    fig, axes = report.figure(1, 2, width=6.0, height=4.3)
    ax_hist, ax_cum = axes[0, 0], axes[0, 1]
    vmax = max(float(np.nanmax(t.surprisal_TN.numpy())) for t in texts.values())
    bins = np.linspace(0, vmax + 1e-6, 40)
    for label, text in texts.items():
        for head, offset in enumerate(text.offsets):
            s = text.surprisal_TN[:, head]
            s = s[torch.isfinite(s)].numpy()
            name = label if len(text.offsets) == 1 else f"{label} head {head + 1} (t+{offset})"
            ax_hist.hist(s, bins=bins, histtype="step", lw=1.4, label=name)
            desc = np.sort(s)[::-1]
            ax_cum.plot(np.arange(1, len(desc) + 1) / len(desc), np.cumsum(desc) / desc.sum(), label=name)
    ax_hist.set_yscale("log")
    ax_hist.set(xlabel="surprisal (bits)", ylabel="tokens (log scale)", title="Distribution of surprisal")
    ax_cum.plot([0, 1], [0, 1], color="grey", ls=":", lw=0.8, label="every token equal")
    ax_cum.axvline(0.1, color="grey", ls="--", lw=0.8)
    ax_cum.set(
        xlabel="fraction of tokens, most surprising first",
        ylabel="fraction of total loss",
        title="How concentrated the loss is",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    ax_hist.legend(fontsize=7)
    ax_cum.legend(fontsize=7, loc="lower right")
    report.save_figure(
        fig,
        "surprisal_distribution.png",
        "Surprisal histogram (log y) and the share of the total loss carried by the most surprising tokens "
        "(dashed: the top 10%)",
    )


# ---- the experiment ----------------------------------------------------------------------------------


def read_text_tokens(path: str, tokenizer, max_tokens: int) -> Tensor:
    """Tokens of a text file (at most `max_tokens`)."""
    try:
        content = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"text file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read text file {path}: {err}") from None
    ids = tokenizer.encode(content)[:max_tokens]
    if len(ids) < 2:
        raise UserError(f"text file {path} has fewer than 2 tokens")
    return torch.tensor(ids, dtype=torch.long)


def run_surprisal(options: study.LabOptions, text: str | None = None, show_tokens: int = 300) -> Path:
    """Run the experiment; returns the path of report.md."""
    if text and not Path(text).is_file():
        raise UserError(f"text file {text} does not exist")
    runs, data = study.lab_runs(options, "python-stdlib")
    sizes, device = options.sizes, study.pick_device(options.device)
    seq_len = min(sizes.seq_len, *(run.config.max_seq_len for run in runs))
    n_tokens = sizes.eval_windows * seq_len
    if text:
        _, tokenizer = load_checkpoint(runs[0].final)
        tokenizer = tokenizer or TokenDataset(data, "val").tokenizer()
        stream_S = read_text_tokens(text, tokenizer, n_tokens)
        sep_id = tokenizer.eos_id
    else:
        stream_S, dataset = scoring.val_stream(data, n_tokens)
        tokenizer, sep_id = dataset.tokenizer(), dataset.eos_id
    chunks = [stream_S[i : i + seq_len] for i in range(0, stream_S.numel(), seq_len)]
    pieces = token_texts(tokenizer, stream_S.tolist())

    report = Report(options.out, "Tokens carry very different information", QUESTION)
    texts: dict[str, TextSurprisal] = {}
    for run in runs:
        model = study.load_run_model(run, run.final, device)
        parts = [score_text(model, chunk.unsqueeze(0), sep_id) for chunk in chunks]
        texts[run.label] = TextSurprisal(
            stream_S.tolist(),
            torch.cat([p.surprisal_TN for p in parts]),
            torch.cat([p.entropy_TN for p in parts]),
            parts[0].offsets,
        )
    finite = torch.cat([t.surprisal_TN[:, 0] for t in texts.values()])
    vmax = float(finite[torch.isfinite(finite)].quantile(0.98))
    _plot_distribution(report, texts)
    for run in runs:
        safe = run.label.replace("=", "")
        _strip_chart(
            report, f"surprisal_text_{safe}.png", texts[run.label], pieces, run.label, vmax, show_tokens
        )
        page = render_html(texts[run.label], pieces, f"Surprisal under {run.label}", vmax)
        (Path(options.out) / f"surprisal_{safe}.html").write_text(page, encoding="utf-8")

    results: dict[str, Any] = {"units": "bits", "tokens": len(pieces)}
    rows = []
    for run in runs:
        t = texts[run.label]
        heads = {f"head{i + 1}": head_summary(t, i) for i in range(len(t.offsets))}
        results[run.label] = {
            "offsets": t.offsets,
            "heads": heads,
            "html": f"surprisal_{run.label.replace('=', '')}.html",
        }
        for i, (name, h) in enumerate(heads.items()):
            rows.append(
                [
                    run.label,
                    f"{name} (t+{t.offsets[i]})",
                    h["tokens"],
                    h["mean_bits"],
                    h["median_bits"],
                    h["p90_bits"],
                    h["mean_entropy_bits"],
                    f"{100 * h['top10_share']:.1f}%",
                    f"{100 * h['bottom50_share']:.1f}%",
                ]
            )
    report.add_table(
        [
            "model",
            "head",
            "tokens",
            "mean bits",
            "median bits",
            "90th pct bits",
            "mean entropy bits",
            "top 10% share",
            "bottom 50% share",
        ],
        rows,
        "Surprisal per model and head (bits); shares of the head's total loss",
    )
    details = study.run_details(runs, options, data)
    details["text"] = text or f"first {len(pieces):,} tokens of the validation split, in windows of {seq_len}"
    details["pages"] = ", ".join(f"surprisal_{run.label.replace('=', '')}.html" for run in runs)
    return report.write(_answer(runs, results, len(pieces)), results, options.command, details=details)


def _answer(runs, results, n_tokens: int) -> str:
    first = results[runs[0].label]["heads"]["head1"]
    parts = [
        f"Over {n_tokens:,} tokens, the {runs[0].label} model's "
        f"surprisal averages {first['mean_bits']:.2f} bits/token "
        f"but the median token costs only {first['median_bits']:.2f} "
        "bits: the 10% most surprising tokens carry "
        f"{100 * first['top10_share']:.0f}% of the total loss, while the least surprising half carry "
        f"{100 * first['bottom50_share']:.0f}%."
    ]
    for run in runs:
        heads = results[run.label]["heads"]
        if len(heads) > 1:
            desc = ", ".join(
                f"head {i + 1} (t+{k}) {h['mean_bits']:.2f} bits, top-10% share {100 * h['top10_share']:.0f}%"
                for i, (k, h) in enumerate(zip(results[run.label]["offsets"], heads.values(), strict=True))
            )
            parts.append(f"Per head of the {run.label} model: {desc}.")
    if len(runs) > 1:
        parts.append(
            "Next-token head by model: "
            + ", ".join(f"{r.label} {results[r.label]['heads']['head1']['mean_bits']:.2f} bits" for r in runs)
            + "."
        )
    parts.append("Open the HTML pages to see which tokens are hard (hover for entropy).")
    return " ".join(parts)


@dataclass
class SurprisalOptions(study.LabOptions):
    """Flags of `multitoken lab surprisal`."""

    out: str = "reports/lab/surprisal"
    text: str | None = None
    """A UTF-8 text file to score (default: a slice of the validation split)."""
    show_tokens: int = 300
    """Tokens drawn in the PNG strip chart."""


def surprisal_cli(options: SurprisalOptions) -> None:
    """Tokens carry very different information: per-token surprisal and entropy, as HTML and plots.

    Trains an n=1 and an n=2 model unless --checkpoint is given, scores a text (--text FILE, or a
    validation slice) token by token in bits, and writes coloured HTML pages, PNGs, report.md and
    results.json to --out.
    """
    options = options.recorded(("lab", "surprisal"))
    print(f"wrote {run_surprisal(options, options.text, options.show_tokens)}")


__all__ = ["TextSurprisal", "render_html", "run_surprisal", "score_text", "surprisal_cli", "top_share"]
