"""Held-out prompts and the self-speculative decoding measurement shared by `bytes` and `nsweep`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from multitoken.data.loader import TokenDataset
from multitoken.generate import generate, merge_stats
from multitoken.speculative import draft_depth


@dataclass
class SpeculativeResult:
    """Self-speculative against plain greedy decoding of the same prompts, one prompt at a time."""

    tokens_per_forward: float
    """New tokens per forward pass under self-speculative decoding (1.0 for a one-head model)."""
    speedup: float
    """Wall-clock time of plain greedy decoding over that of self-speculative decoding."""
    plain_tokens_per_s: float
    """Throughput of plain greedy decoding."""
    speculative_tokens_per_s: float
    """Throughput of self-speculative decoding."""
    acceptance_per_head: list[float]
    """Per drafting head (offsets 2..n): accepted / judged drafts."""
    identical: float
    """Fraction of prompts where both decodings produced the same tokens (greedy: expected 1.0)."""


def held_out_prompts(data: str, n_prompts: int, prompt_len: int) -> list[list[int]]:
    """The first `prompt_len` tokens of up to `n_prompts` validation documents long enough to hold them."""
    dataset = TokenDataset(data, "val")
    tokens_N = dataset.window(0, dataset.n_tokens)
    ends = np.flatnonzero(tokens_N == dataset.eos_id)
    starts = np.concatenate([[0], ends + 1])[: len(ends)]
    prompts = [
        tokens_N[s : s + prompt_len].tolist() for s, e in zip(starts, ends, strict=True) if e - s > prompt_len
    ]
    if not prompts:  # short documents: cut windows from the stream instead
        prompts = [
            tokens_N[i : i + prompt_len].tolist() for i in range(0, dataset.n_tokens - prompt_len, prompt_len)
        ]
    return prompts[:n_prompts]


@torch.no_grad()
def measure_speculative(model, prompts: list[list[int]], max_new_tokens: int) -> SpeculativeResult:
    """Decode each prompt greedily, plainly and self-speculatively (when the model has drafting heads)."""
    model.eval()
    generate(model, prompts[:1], min(4, max_new_tokens), speculative=False)  # warm up kernels and allocator
    multi_head = draft_depth(model.config) > 1
    plain_parts, spec_parts, same = [], [], 0
    for prompt in prompts:
        plain = generate(model, [prompt], max_new_tokens, speculative=False)
        spec = generate(model, [prompt], max_new_tokens, speculative=True) if multi_head else plain
        plain_parts.append(plain.stats)
        spec_parts.append(spec.stats)
        same += spec.tokens == plain.tokens
    plain_total, spec_total = merge_stats(plain_parts), merge_stats(spec_parts)
    new = max(spec_total.new_tokens, 1)
    return SpeculativeResult(
        tokens_per_forward=spec_total.tokens_per_forward,
        speedup=plain_total.seconds / spec_total.seconds if multi_head and spec_total.seconds > 0 else 1.0,
        plain_tokens_per_s=new / plain_total.seconds if plain_total.seconds else 0.0,
        speculative_tokens_per_s=new / spec_total.seconds if spec_total.seconds else 0.0,
        acceptance_per_head=spec_total.acceptance_per_head,
        identical=same / max(len(prompts), 1),
    )
