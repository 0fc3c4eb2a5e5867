"""Turning logits into tokens: temperature, top-k, top-p (nucleus) and seeded sampling.

Dimension letters: X any leading dimensions, V vocabulary.
"""

from __future__ import annotations

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


def sampling_probs(logits_XV: Tensor, params: SamplingParams) -> Tensor:
    """The distribution that plain sampling draws from: softmax(logits / T) with top-k and top-p applied.

    Works in float32 whatever the model's dtype. Greedy params give the one-hot of the argmax.
    """
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


def sample(probs_XV: Tensor, generator: torch.Generator | None) -> Tensor:
    """One token per distribution, by the exponential race (argmax of p / Exp(1)): no host sync."""
    noise_XV = torch.empty_like(probs_XV).exponential_(1.0, generator=generator)
    return (probs_XV / noise_XV).argmax(-1)


def choose(
    logits_XV: Tensor, params: SamplingParams, generator: torch.Generator | None
) -> tuple[Tensor, Tensor | None]:
    """Pick a token from logits: (token_X, probs_XV); greedy gives the argmax and no probs."""
    if params.greedy:
        return logits_XV.argmax(-1), None
    probs_XV = sampling_probs(logits_XV, params)
    return sample(probs_XV, generator), probs_XV


__all__ = ["SamplingParams", "choose", "sample", "sampling_probs"]
