"""Turning logits into tokens: temperature, top-k, top-p (nucleus) and seeded sampling.

Dimension letters: B rows of a batch, X any leading dimensions, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    """How a distribution over the next token is shaped before drawing from it."""

    temperature: float = 0.0
    """0 means greedy (argmax); otherwise logits are divided by it."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose probability reaches top_p; 1.0 keeps all."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class RowSampling:
    """Sampling settings per row of a batch, so requests with different settings decode together.

    A row with temperature 0 is greedy: its distribution is the one-hot of the argmax, which speculative
    sampling then accepts and rejects exactly as greedy verification does.
    """

    temperature_B: Tensor
    top_k_B: Tensor
    top_p_B: Tensor
    all_greedy: bool | None = None
    """Whether every row is greedy, when the caller knows it (else `greedy` reads the device)."""

    @classmethod
    def build(cls, params: Sequence[SamplingParams], device) -> RowSampling:
        return cls(
            torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
            torch.tensor([p.top_k for p in params], dtype=torch.long, device=device),
            torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            all(p.greedy for p in params),
        )

    @property
    def greedy(self) -> bool:
        """Every row greedy: then the argmax paths apply."""
        if self.all_greedy is None:
            return bool((self.temperature_B == 0).all())
        return self.all_greedy

    def rows(self, index, all_greedy: bool | None = None) -> RowSampling:
        """Some rows' settings; `all_greedy` as known for those rows (a subset of greedy rows is greedy)."""
        if all_greedy is None and self.all_greedy:
            all_greedy = True
        return RowSampling(self.temperature_B[index], self.top_k_B[index], self.top_p_B[index], all_greedy)


def sampling_probs(logits_XV: Tensor, params: SamplingParams | RowSampling) -> Tensor:
    """The distribution that plain sampling draws from: softmax(logits / T) with top-k and top-p applied.

    Works in float32 whatever the model's dtype. Greedy params give the one-hot of the argmax. With
    RowSampling the first dimension of `logits_XV` is the row.
    """
    if isinstance(params, RowSampling):
        return _row_sampling_probs(logits_XV, params)
    logits_XV = logits_XV.float()
    if params.greedy:
        return torch.zeros_like(logits_XV).scatter_(-1, logits_XV.argmax(-1, keepdim=True), 1.0)
    logits_XV = logits_XV / params.temperature
    if 0 < params.top_k < logits_XV.shape[-1]:
        kth_X1 = torch.topk(logits_XV, params.top_k, dim=-1).values[..., -1:]
        logits_XV = logits_XV.masked_fill(logits_XV < kth_X1, float("-inf"))
    probs_XV = torch.softmax(logits_XV, dim=-1)
    if params.top_p < 1.0:
        sorted_XV, order_XV = torch.sort(probs_XV, dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already reach top_p; the top token always stays.
        drop_sorted_XV = (sorted_XV.cumsum(-1) - sorted_XV) >= params.top_p
        drop_XV = drop_sorted_XV.scatter(-1, order_XV, drop_sorted_XV)
        probs_XV = probs_XV.masked_fill(drop_XV, 0.0)
        probs_XV = probs_XV / probs_XV.sum(-1, keepdim=True)
    return probs_XV


def _row_sampling_probs(logits_BXV: Tensor, rows: RowSampling) -> Tensor:
    """`sampling_probs` with each row's own temperature, top-k and top-p (same formulas, per row)."""
    logits_BXV = logits_BXV.float()
    per_row = (-1,) + (1,) * (logits_BXV.dim() - 1)
    temperature_BX1 = rows.temperature_B.view(per_row)
    greedy_BX1 = temperature_BX1 == 0
    scaled_BXV = logits_BXV / torch.where(greedy_BX1, 1.0, temperature_BX1)
    V = logits_BXV.shape[-1]
    sorted_BXV = torch.sort(scaled_BXV, dim=-1, descending=True).values
    k_BX1 = torch.where(rows.top_k_B > 0, rows.top_k_B.clamp(max=V), V).view(per_row)
    kth_BX1 = sorted_BXV.gather(-1, (k_BX1 - 1).expand(*scaled_BXV.shape[:-1], 1))
    probs_BXV = torch.softmax(scaled_BXV.masked_fill(scaled_BXV < kth_BX1, float("-inf")), dim=-1)
    sorted_BXV, order_BXV = torch.sort(probs_BXV, dim=-1, descending=True)
    top_p_BX1 = rows.top_p_B.view(per_row)
    drop_sorted_BXV = ((sorted_BXV.cumsum(-1) - sorted_BXV) >= top_p_BX1) & (top_p_BX1 < 1.0)
    probs_BXV = probs_BXV.masked_fill(drop_sorted_BXV.scatter(-1, order_BXV, drop_sorted_BXV), 0.0)
    probs_BXV = probs_BXV / probs_BXV.sum(-1, keepdim=True)
    one_hot_BXV = torch.zeros_like(probs_BXV).scatter_(-1, logits_BXV.argmax(-1, keepdim=True), 1.0)
    return torch.where(greedy_BX1, one_hot_BXV, probs_BXV)


def sample(probs_XV: Tensor, generator: torch.Generator | None) -> Tensor:
    """One token per distribution, by the exponential race (argmax of p / Exp(1)): no host sync."""
    noise_XV = torch.empty_like(probs_XV).exponential_(1.0, generator=generator)
    return (probs_XV / noise_XV).argmax(-1)


def choose(
    logits_XV: Tensor, params: SamplingParams | RowSampling, generator: torch.Generator | None
) -> tuple[Tensor, Tensor | None]:
    """Pick a token from logits: (token_X, probs_XV); greedy gives the argmax and no probs."""
    if params.greedy:
        return logits_XV.argmax(-1), None
    probs_XV = sampling_probs(logits_XV, params)
    return sample(probs_XV, generator), probs_XV


__all__ = ["RowSampling", "SamplingParams", "choose", "sample", "sampling_probs"]
