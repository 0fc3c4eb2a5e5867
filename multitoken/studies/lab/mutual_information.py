"""`multitoken lab mutual-information`: the paper's §5.2 argument, measured on a trained 2-head model.

At a position t with context C = x_{<=t}, call the next token X = x_{t+1} and the one after Y = x_{t+2}.
A 2-head model estimates, as cross-entropies (nats, averaged over positions):

    H(X)   = -log p_head1(x_{t+1} | C)              next-token loss
    H(Y)   = -log p_head2(x_{t+2} | C)              second-token loss
    H(Y|X) = -log p_head1(x_{t+2} | C, x_{t+1})     the next-token head one step later (teacher-forced)
    I(X;Y) = H(Y) - H(Y|X)                          what X tells about Y, given C
    H(X|Y) = H(X) - I(X;Y)

so next-token training minimises H(X) = H(X|Y) + I(X;Y), while 2-token training minimises
H(X) + H(Y) = H(X|Y) + 2 I(X;Y) + H(Y|X): the mutual information between the next two tokens counts
twice. Tokens whose value matters for what follows (I large) get more weight than tokens that are
merely uncertain (H(X|Y) large).

Dimension legend: B batch (windows), T positions, V vocabulary, K Markov states.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from multitoken.errors import UserError
from multitoken.studies import runs as study
from multitoken.studies import scoring
from multitoken.studies.report import Report, stacked_bars

NATS_PER_BIT = math.log(2)
QUESTION = (
    "How does the 2-token loss weight the next-token entropy H(X), the mutual information I(X;Y) between "
    "the next two tokens and the remainder H(Y|X), compared with next-token training (paper §5.2)?"
)
TERMS = ("H(X)", "H(Y)", "H(Y|X)", "I(X;Y)", "H(X|Y)")


def information_terms(loss1_BT: Tensor, loss2_BT: Tensor) -> dict[str, float]:
    """The §5.2 terms in nats from per-position losses of head 1 (target t+1) and head 2 (target t+2).

    H(X) = mean loss1[t], H(Y) = mean loss2[t], H(Y|X) = mean loss1[t+1] over the positions t where all
    three exist (NaN marks a missing target); I(X;Y) = H(Y) - H(Y|X); H(X|Y) = H(X) - I(X;Y).
    """
    hx_BT, hy_BT, hyx_BT = loss1_BT[:, :-1], loss2_BT[:, :-1], loss1_BT[:, 1:]
    valid_BT = hx_BT.isfinite() & hy_BT.isfinite() & hyx_BT.isfinite()
    if not valid_BT.any():
        raise UserError("no position has both of its next two tokens in the evaluation windows")
    hx, hy, hyx = (float(v_BT[valid_BT].double().mean()) for v_BT in (hx_BT, hy_BT, hyx_BT))
    mi = hy - hyx
    return {
        "H(X)": hx,
        "H(Y)": hy,
        "H(Y|X)": hyx,
        "I(X;Y)": mi,
        "H(X|Y)": hx - mi,
        "positions": int(valid_BT.sum()),
    }


def loss_decomposition(terms: dict[str, float]) -> dict[str, dict[str, float]]:
    """Each loss as a sum of H(X|Y), I(X;Y) and H(Y|X) (coefficients and nats), and the share of each part.

    next-token: H(X) = H(X|Y) + I(X;Y);  2-token: H(X) + H(Y) = H(X|Y) + 2 I(X;Y) + H(Y|X).
    """
    parts = {
        "next-token": {"H(X|Y)": 1, "I(X;Y)": 1, "H(Y|X)": 0},
        "2-token": {"H(X|Y)": 1, "I(X;Y)": 2, "H(Y|X)": 1},
    }
    out = {}
    for loss, coefficients in parts.items():
        nats = {name: c * terms[name] for name, c in coefficients.items()}
        total = sum(nats.values())
        out[loss] = {"total": total, **{f"{k} nats": v for k, v in nats.items()}}
        out[loss] |= {f"{k} share": v / total if total else float("nan") for k, v in nats.items()}
    return out


# ---- a source with known entropies --------------------------------------------------------------------


def stationary(transition_KK: Tensor) -> Tensor:
    """Stationary distribution pi of a row-stochastic matrix: pi P = pi (the eigenvector of eigenvalue 1)."""
    values, vectors = torch.linalg.eig(transition_KK.double().T)
    pi_K = vectors[:, values.real.argmax()].real
    return pi_K / pi_K.sum()


def markov_entropies(transition_KK: Tensor) -> dict[str, float]:
    """Closed-form §5.2 terms (nats) of a stationary first-order Markov chain, context = the whole past.

    H(X) = sum_i pi_i H(P_i), H(Y) = sum_i pi_i H((P^2)_i), H(Y|X) = H(X) (the chain forgets all but the
    last state), I = H(Y) - H(Y|X), H(X|Y) = H(X) - I.
    """
    p_KK = transition_KK.double()
    pi_K = stationary(p_KK)

    def rows_entropy(m_KK: Tensor) -> float:
        return float((pi_K * -(m_KK * m_KK.clamp_min(1e-300).log()).sum(-1)).sum())

    hx, hy = rows_entropy(p_KK), rows_entropy(p_KK @ p_KK)
    return {"H(X)": hx, "H(Y)": hy, "H(Y|X)": hx, "I(X;Y)": hy - hx, "H(X|Y)": 2 * hx - hy}


def sample_markov(transition_KK: Tensor, batch: int, length: int, generator: torch.Generator) -> Tensor:
    """`tokens_BT`: `batch` sequences of the chain, each started from the stationary distribution."""
    p_KK = transition_KK.double()
    tokens_BT = torch.empty(batch, length, dtype=torch.long)
    tokens_BT[:, 0] = torch.multinomial(stationary(p_KK).expand(batch, -1), 1, generator=generator)[:, 0]
    for t in range(1, length):
        tokens_BT[:, t] = torch.multinomial(p_KK[tokens_BT[:, t - 1]], 1, generator=generator)[:, 0]
    return tokens_BT


# ---- the experiment -------------------------------------------------------------------------------------


def model_terms(model, tokens_WT: Tensor, sep_id: int | None) -> dict[str, float]:
    """The §5.2 terms of a model whose first two heads predict t+1 and t+2, on windows `tokens_WT`."""
    offsets = tuple(model.config.head_offsets)
    if len(offsets) < 2 or offsets[:2] != (1, 2):
        raise UserError(
            f"mutual-information needs heads predicting t+1 and t+2; this model predicts {list(offsets)}"
        )
    scores = scoring.token_scores(model, tokens_WT, sep_id=sep_id)
    return information_terms(scores.loss_BTN[..., 0], scores.loss_BTN[..., 1])


def run_mutual_information(options: study.LabOptions) -> Path:
    """Train (or read) 2-head models, measure the §5.2 terms on validation windows; returns report.md."""
    runs, data = study.lab_runs(options, study.ENGLISH_SOURCE)
    device = study.pick_device(options.device)
    seq_len = min(options.sizes.seq_len, *(run.config.max_seq_len for run in runs))
    stream_S, dataset = scoring.val_stream(data, options.sizes.eval_windows * seq_len)
    tokens_WT, _ = scoring.windows(stream_S, seq_len)
    results: dict[str, dict] = {}
    for run in runs:
        model = study.load_run_model(run, run.final, device)
        terms = model_terms(model, tokens_WT, dataset.eos_id)
        results[run.label] = {"terms_nats": terms, "losses": loss_decomposition(terms)}
    report = Report(options.out, "Next-token and 2-token losses, term by term (§5.2)", QUESTION)
    _plot(report, results)
    rows = []
    for label, r in results.items():
        t = r["terms_nats"]
        rows.append([label, *(t[k] / NATS_PER_BIT for k in TERMS), t["positions"]])
    report.add_table(["model", *(f"{k} (bits)" for k in TERMS), "positions"], rows, "Estimated terms")
    rows = []
    for label, r in results.items():
        for loss, d in r["losses"].items():
            rows.append([label, loss, d["total"] / NATS_PER_BIT,
                         *(f"{100 * d[f'{k} share']:.1f}%" for k in ("H(X|Y)", "I(X;Y)", "H(Y|X)"))])  # fmt: skip
    report.add_table(
        ["model", "loss", "total (bits)", "H(X|Y) share", "I(X;Y) share", "H(Y|X) share"],
        rows,
        "How each loss splits into the three parts",
    )
    details = study.run_details(runs, options, data)
    details["evaluation"] = f"{tokens_WT.shape[0]} validation windows of {seq_len} tokens"
    details["estimator"] = (
        "cross-entropies of the heads; H(Y|X) is the next-token head one position later (teacher forcing); "
        "checked against a Markov chain's closed-form entropies in tests/studies/lab/test_mutual_information.py"
    )
    return report.write(_answer(results), results, options.command, details=details)


def _plot(report: Report, results: dict[str, dict]) -> None:
    fig, axes = report.figure(1, len(results), width=5.5)
    axes = [axes] if len(results) == 1 else list(axes[0])
    for ax, (label, r) in zip(axes, results.items(), strict=True):
        losses = r["losses"]
        names = ("next-token", "2-token")
        parts = [
            (part, [losses[name][f"{part} nats"] / NATS_PER_BIT for name in names], color)
            for part, color in (("H(X|Y)", "tab:gray"), ("I(X;Y)", "tab:red"), ("H(Y|X)", "tab:blue"))
        ]
        stacked_bars(ax, ["next-token loss", "2-token loss"], parts)
        ax.set_ylabel("bits per position")
        ax.set_title(f"{label}: the loss split into parts")
        ax.legend(fontsize=8)
    report.save_figure(
        fig, "mutual_information.png", "Next-token vs 2-token loss as H(X|Y) + k I(X;Y) + H(Y|X)"
    )


def _answer(results: dict[str, dict]) -> str:
    parts = []
    for label, r in results.items():
        t, d = r["terms_nats"], r["losses"]
        parts.append(
            f"{label}: H(X) {t['H(X)'] / NATS_PER_BIT:.3f} bits, H(Y) {t['H(Y)'] / NATS_PER_BIT:.3f}, "
            f"H(Y|X) {t['H(Y|X)'] / NATS_PER_BIT:.3f}, so I(X;Y) {t['I(X;Y)'] / NATS_PER_BIT:.3f} and "
            f"H(X|Y) {t['H(X|Y)'] / NATS_PER_BIT:.3f}; I(X;Y) is {100 * d['next-token']['I(X;Y) share']:.0f}% "
            f"of the next-token loss and {100 * d['2-token']['I(X;Y) share']:.0f}% of the 2-token loss"
        )
    return (
        "; ".join(parts) + ". Next-token training sees the information the next token shares with the one "
        "after it once; 2-token training sees it twice, and adds H(Y|X), which the next-token head also "
        "pays one position later: the extra weight falls on tokens that matter for what follows."
    )


@dataclass
class MutualInformationOptions(study.LabOptions):
    """Flags of `multitoken lab mutual-information`."""

    out: str = "reports/lab/mutual-information"
    n_future: list[int] = field(default_factory=lambda: [2], metadata=study.NOT_A_FLAG)
    """One 2-head model."""


def mutual_information_cli(options: MutualInformationOptions) -> None:
    """What 2-token prediction weighs: H(X), H(Y), H(Y|X), I(X;Y) and H(X|Y) of a 2-head model (paper §5.2).

    Trains a 2-head model unless --checkpoint is given (any model whose first heads predict t+1 and t+2),
    estimates the terms as cross-entropies on validation windows, and writes report.md, results.json and
    a plot to --out. The default corpus is pydoc-english.
    """
    options = options.recorded(("lab", "mutual-information"))
    print(f"wrote {run_mutual_information(options)}")
