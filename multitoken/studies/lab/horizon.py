"""`multitoken lab horizon`: how predictable is the token k positions ahead, k = 1, 2, 4, ..., 512?

A frozen model's trunk reads the context x_{<=t}; for each k a light probe learns to predict x_{t+k} from
the trunk output h_t alone:

    logits_V = e^g_k U norm(W_k h_t) + b_k     W_k (D x D, from identity), a gain g_k and b_k trained; U, norm frozen

(the model's own final norm and unembedding U). The probe is trained on positions of the training split
and scored on the validation split, against the unigram baseline: the cross-entropy of the training
split's token frequencies on the same validation targets. Where the probe's loss meets the baseline,
the context no longer tells anything about the token k ahead that a probe this light can read.

Dimension legend: P positions (probe examples), D model width, V vocabulary, S stream positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from multitoken.errors import UserError
from multitoken.studies import runs as study
from multitoken.studies.report import Report

QUESTION = (
    "How much does a trained model's state at position t tell about the token k positions ahead, for "
    "k = 1, 2, 4, ... up to hundreds of tokens, compared with knowing only token frequencies?"
)


def horizons(max_k: int) -> list[int]:
    """1, 2, 4, ... up to max_k (and max_k itself when it is no power of two)."""
    if max_k < 1:
        raise UserError(f"max-k must be at least 1, got {max_k}")
    ks = [1 << i for i in range(max_k.bit_length()) if 1 << i <= max_k]
    return ks + ([max_k] if ks[-1] != max_k else [])


@torch.no_grad()
def trunk_states(model, stream_S: Tensor, seq_len: int, batch_size: int = 8) -> Tensor:
    """`h_SD`: the trunk output at every position of the stream, read in consecutive windows of seq_len.

    The first position of each window sees no earlier context; positions in the stream's tail that do not
    fill a window are dropped (the returned S is a multiple of seq_len).
    """
    n = stream_S.numel() // seq_len
    if n == 0:
        raise UserError(f"the text has {stream_S.numel()} tokens, fewer than one window of {seq_len}")
    device = next(model.parameters()).device
    tokens_WT = stream_S[: n * seq_len].view(n, seq_len)
    parts = []
    for start in range(0, n, batch_size):
        chunk_BT = tokens_WT[start : start + batch_size].to(device)
        rope = model.rope_context(chunk_BT, None)
        parts.append(model.trunk_forward(chunk_BT, rope).float().flatten(0, 1))
    return torch.cat(parts)


def unigram_log_probs(tokens: Tensor, vocab_size: int) -> Tensor:
    """log p_V of token frequencies with add-one smoothing."""
    counts_V = torch.bincount(tokens, minlength=vocab_size).double() + 1.0
    return (counts_V / counts_V.sum()).log().float()


class Probe(torch.nn.Module):
    """logits = e^g U norm(W h) + b with the model's frozen norm and unembedding U; W starts at identity, g at 0.

    The gain lets the probe sharpen or flatten its distribution: the norm fixes the scale of W h.
    """

    def __init__(self, model, bias_V: Tensor):
        super().__init__()
        dim = model.config.dim
        self.linear = torch.nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(dim))
        self.bias_V = torch.nn.Parameter(bias_V.clone())
        self.gain = torch.nn.Parameter(torch.zeros(()))
        self.norm, self.output = model.norm, model.output

    def forward(self, h_PD: Tensor) -> Tensor:
        return self.gain.exp() * self.output(self.norm(self.linear(h_PD))) + self.bias_V

    def param_groups(self, lr: float) -> list[dict]:
        """AdamW groups: the gain moves on a log scale, so it gets a larger step (0.05) to reach any scale."""
        return [{"params": [self.linear.weight, self.bias_V], "lr": lr}, {"params": [self.gain], "lr": 0.05}]


def fit_probe(
    model,
    h_PD: Tensor,
    targets_P: Tensor,
    bias_V: Tensor,
    steps: int,
    batch_size: int = 1024,
    lr: float = 3e-3,
) -> Probe:
    """Train one probe on (h_PD, targets_P) with AdamW, the model frozen; minibatches drawn with a fixed seed."""
    probe = Probe(model, bias_V)
    optimizer = torch.optim.AdamW(probe.param_groups(lr), weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx_P = torch.randint(0, h_PD.shape[0], (min(batch_size, h_PD.shape[0]),), generator=generator)
        idx_P = idx_P.to(h_PD.device)
        loss = F.cross_entropy(probe(h_PD[idx_P]), targets_P[idx_P])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return probe


@torch.no_grad()
def mean_nll(log_probs_fn, h_PD: Tensor, targets_P: Tensor, batch_size: int = 4096) -> float:
    """Mean -log p(target) in nats over all positions."""
    total = 0.0
    for s in range(0, h_PD.shape[0], batch_size):
        logits_PV = log_probs_fn(h_PD[s : s + batch_size])
        total += float(F.cross_entropy(logits_PV, targets_P[s : s + batch_size], reduction="sum"))
    return total / h_PD.shape[0]


def horizon_losses(
    model, train_S: Tensor, val_S: Tensor, seq_len: int, ks: list[int], steps: int
) -> dict[int, dict[str, float]]:
    """Per k: the probe's validation loss and the unigram baseline on the same targets (nats)."""
    vocab, device = model.config.vocab_size, next(model.parameters()).device
    for p in model.parameters():
        p.requires_grad_(False)
    h_train_SD, h_val_SD = trunk_states(model, train_S, seq_len), trunk_states(model, val_S, seq_len)
    train_S, val_S = train_S.to(device), val_S.to(device)
    unigram_V = unigram_log_probs(train_S, vocab)
    out = {}
    for k in ks:
        n_train, n_val = (
            min(h_train_SD.shape[0], train_S.numel() - k),
            min(h_val_SD.shape[0], val_S.numel() - k),
        )
        if n_train < 1 or n_val < 1:
            raise UserError(
                f"the text is too short to look {k} tokens ahead; lower --max-k or give more text"
            )
        targets_train_P, targets_val_P = train_S[k : k + n_train], val_S[k : k + n_val]
        probe = fit_probe(model, h_train_SD[:n_train], targets_train_P, unigram_V, steps)
        out[k] = {
            "probe": mean_nll(probe, h_val_SD[:n_val], targets_val_P),
            "unigram": float(-unigram_V[targets_val_P].double().mean()),
            "positions": n_val,
        }
    return out


@dataclass
class HorizonOptions(study.LabOptions):
    """Flags of `multitoken lab horizon`."""

    out: str = "reports/lab/horizon"
    n_future: list[int] = field(default_factory=lambda: [1], metadata=study.NOT_A_FLAG)
    """One next-token model."""
    max_k: int = 512
    """The farthest horizon; k runs over the powers of two up to it."""
    tokens: int = 65536
    """Tokens of each split read (probe training on train, scoring on val)."""
    probe_steps: int = 300
    """AdamW steps per probe."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tokens < 2:
            raise UserError(f"tokens must be at least 2, got {self.tokens}")
        if self.probe_steps < 1:
            raise UserError(f"probe-steps must be at least 1, got {self.probe_steps}")
        horizons(self.max_k)


def run_horizon(options: study.LabOptions, max_k: int, tokens: int, steps: int) -> Path:
    """Train (or read) a model, probe it at every horizon k; returns report.md."""
    ks = horizons(max_k)
    runs, data = study.lab_runs(options, "python-stdlib")
    device = study.pick_device(options.device)
    from multitoken.data.loader import TokenDataset

    train, val = TokenDataset(data, "train"), TokenDataset(data, "val")
    train_S = torch.from_numpy(train.window(0, min(tokens, train.n_tokens))).long()
    val_S = torch.from_numpy(val.window(0, min(tokens, val.n_tokens))).long()
    results: dict[str, dict] = {}
    for run in runs:
        model = study.load_run_model(run, run.final, device)
        seq_len = min(options.sizes.seq_len, model.config.max_seq_len)
        results[run.label] = {
            str(k): v for k, v in horizon_losses(model, train_S, val_S, seq_len, ks, steps).items()
        }
    report = Report(options.out, "How far ahead can a model see? Token k ahead vs unigram", QUESTION)
    fig, ax = report.figure()
    for label, r in results.items():
        ax.plot(
            ks, [r[str(k)]["probe"] / math.log(2) for k in ks], marker="o", label=f"{label}: probe on h_t"
        )
    first = next(iter(results.values()))
    ax.plot(
        ks,
        [first[str(k)]["unigram"] / math.log(2) for k in ks],
        ls="--",
        color="0.4",
        label="unigram baseline",
    )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k: how many tokens ahead")
    ax.set_ylabel("validation loss (bits per token)")
    ax.set_title("Predictability of the token k ahead")
    ax.legend(fontsize=8)
    report.save_figure(
        fig, "horizon.png", "Probe loss on the token k ahead, with the unigram entropy baseline"
    )
    rows = []
    for label, r in results.items():
        for k in ks:
            v = r[str(k)]
            gain = 1 - v["probe"] / v["unigram"]
            rows.append(
                [label, k, v["probe"] / math.log(2), v["unigram"] / math.log(2), f"{100 * gain:.1f}%"]
            )
    report.add_table(
        ["model", "k", "probe (bits)", "unigram (bits)", "below unigram"], rows, "Loss per horizon"
    )
    details = study.run_details(runs, options, data)
    details["probes"] = (
        f"one per k: W (D x D, from identity), a gain and a bias over the frozen final norm and unembedding, {steps} "
        f"AdamW steps of 1024 positions from {train_S.numel():,} training tokens; scored on {val_S.numel():,} "
        "validation tokens; the trunk reads consecutive windows of "
        f"{min(options.sizes.seq_len, runs[0].config.max_seq_len)} tokens"
    )
    return report.write(_answer(results, ks), results, options.command, details=details)


def _answer(results: dict, ks: list[int]) -> str:
    parts = []
    for label, r in results.items():
        gains = {k: 1 - r[str(k)]["probe"] / r[str(k)]["unigram"] for k in ks}
        parts.append(
            f"{label}: the token 1 ahead costs {r['1']['probe'] / math.log(2):.2f} bits against "
            f"{r['1']['unigram'] / math.log(2):.2f} for the unigram baseline ({100 * gains[1]:.0f}% below); at k = "
            f"{ks[-1]} the probe is {100 * gains[ks[-1]]:.1f}% below the baseline"
        )
    return "; ".join(parts) + ". What is left far ahead is topic: which tokens this file or page uses."


def horizon_cli(options: HorizonOptions) -> None:
    """Predictability of the token k ahead (k = 1, 2, 4, ..., max-k) from a frozen trunk, vs unigram entropy.

    Trains a next-token model unless --checkpoint is given, fits one light probe per k on the frozen trunk's
    output, and writes report.md, results.json and a plot of loss against k with the unigram baseline.
    """
    options = options.recorded(("lab", "horizon"))
    print(f"wrote {run_horizon(options, options.max_k, options.tokens, options.probe_steps)}")
