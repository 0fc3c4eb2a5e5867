"""Per-token scores of every head over the validation split's evaluation windows.

Dimension legend: B batch, T positions, N heads, V vocabulary, W windows, S stream positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from multitoken.data.loader import TokenDataset, eval_window_starts
from multitoken.errors import UserError
from multitoken.loss import IGNORE_INDEX, build_targets


def val_stream(data: Path, n_tokens: int) -> tuple[Tensor, Any]:
    """The first `n_tokens` of the validation split (fewer if shorter) as `stream_S`, and the dataset."""
    dataset = TokenDataset(data, "val")
    n = min(n_tokens, dataset.n_tokens)
    if n < 2:
        raise UserError(f"the validation split of {data} is too short to evaluate on")
    return torch.from_numpy(dataset.window(0, n)), dataset


def windows(stream_S: Tensor, seq_len: int, count: int | None = None) -> tuple[Tensor, list[int]]:
    """`count` non-overlapping windows `tokens_WT` spread evenly over the stream (default: as many as fit),
    and their start offsets: the windows `TokenDataset.eval_windows` reads."""

    available = stream_S.numel() // seq_len
    if available == 0:
        raise UserError(
            f"the evaluation text has {stream_S.numel()} tokens, fewer than one window of {seq_len}"
        )
    starts = [int(s) for s in eval_window_starts(stream_S.numel(), seq_len, count)]
    return torch.stack([stream_S[s : s + seq_len] for s in starts]), starts


@dataclass
class TokenScores:
    """Per-position scores of every head, in nats; positions without a target hold NaN / IGNORE_INDEX."""

    loss_BTN: Tensor
    """-log p(target) of head i at position t."""
    correct_BTN: Tensor
    """Whether head i's top-1 prediction at t is its target."""
    entropy_BTN: Tensor
    """Entropy of head i's predictive distribution at t."""
    targets_BTN: Tensor
    """Target token ids (IGNORE_INDEX where none)."""

    @property
    def valid_BTN(self) -> Tensor:
        return self.targets_BTN != IGNORE_INDEX


@torch.no_grad()
def token_scores(model, tokens_BT: Tensor, sep_id: int | None = None, batch_size: int = 8) -> TokenScores:
    """Loss, top-1 correctness and entropy of every head at every position (works with stub models too)."""
    offsets = model.config.head_offsets
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    parts = []
    for start in range(0, tokens_BT.shape[0], batch_size):
        chunk_BT = tokens_BT[start : start + batch_size].to(device)
        targets_BTN = build_targets(chunk_BT, offsets, sep_id=sep_id)
        logits_BTNV = model(chunk_BT).float()
        logp_BTNV = F.log_softmax(logits_BTNV, dim=-1)
        valid_BTN = targets_BTN != IGNORE_INDEX
        picked_BTN = logp_BTNV.gather(-1, targets_BTN.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        loss_BTN = torch.where(valid_BTN, -picked_BTN, torch.nan)
        correct_BTN = (logp_BTNV.argmax(-1) == targets_BTN) & valid_BTN
        entropy_BTN = -(logp_BTNV.exp() * logp_BTNV).sum(-1)
        entropy_BTN = torch.where(valid_BTN, entropy_BTN, torch.nan)
        parts.append((loss_BTN.cpu(), correct_BTN.cpu(), entropy_BTN.cpu(), targets_BTN.cpu()))
    return TokenScores(*(torch.cat(group) for group in zip(*parts, strict=True)))
