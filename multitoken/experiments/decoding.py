"""Held-out prompts and the self-speculative decoding measurement shared by `bytes` and `nsweep`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from multitoken.data.loader import TokenDataset
from multitoken.generate import generate


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
    """Decode each prompt greedily, plainly and self-speculatively (when the model has several heads)."""
    model.eval()
    generate(model, prompts[:1], min(4, max_new_tokens), speculative=False)  # warm up kernels and allocator
    plain_s = spec_s = 0.0
    new = row_forwards = 0
    same = 0
    multi_head = model.config.n_future > 1 and model.config.head_offsets[:2] == [1, 2]
    depth = len(model.config.head_offsets) - 1 if multi_head else 0
    reached_J, accepted_J = np.zeros(depth, dtype=np.int64), np.zeros(depth, dtype=np.int64)
    for prompt in prompts:
        plain = generate(model, [prompt], max_new_tokens, speculative=False)
        plain_s += plain.stats.seconds
        spec = generate(model, [prompt], max_new_tokens, speculative=True) if multi_head else plain
        spec_s += spec.stats.seconds
        new += spec.stats.new_tokens
        row_forwards += spec.stats.row_forwards
        if multi_head:
            reached_J[: len(spec.stats.drafts_reached)] += spec.stats.drafts_reached
            accepted_J[: len(spec.stats.drafts_accepted)] += spec.stats.drafts_accepted
        same += spec.tokens == plain.tokens
    total_new = max(new, 1)
    return SpeculativeResult(
        tokens_per_forward=new / max(row_forwards, 1),
        speedup=plain_s / spec_s if multi_head and spec_s > 0 else 1.0,
        plain_tokens_per_s=total_new / plain_s if plain_s else 0.0,
        speculative_tokens_per_s=total_new / spec_s if spec_s else 0.0,
        acceptance_per_head=(accepted_J / np.maximum(reached_J, 1)).tolist(),
        identical=same / max(len(prompts), 1),
    )
