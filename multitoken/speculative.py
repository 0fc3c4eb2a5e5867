"""Self-speculative decoding pieces: which heads draft, how drafts are proposed, and how they are verified.

Blockwise parallel decoding (Stern et al. 2018) for greedy decoding, and lossless speculative sampling
(Leviathan et al. 2023; Chen et al. 2023) for temperature > 0. The next-token head verifies; the heads
with offsets 2..k draft.

Dimension letters: B batch, T block positions, D model width, V vocabulary,
J drafts per step (draft depth - 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from multitoken.config import ModelConfig
from multitoken.sampling import RowSampling, SamplingParams, choose, sample, sampling_probs


def draft_depth(config: ModelConfig) -> int:
    """Number of heads usable for decoding: the run of offsets 1, 2, ..., k. With [1, 2, 4, 8] it is 2."""
    depth = 0
    while depth < len(config.head_offsets) and config.head_offsets[depth] == depth + 1:
        depth += 1
    return depth


def accept_greedy(
    logits_BTV: Tensor, drafts_BJ: Tensor, n_drafts_B: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Longest prefix of drafts equal to the next-token head's argmax, and the token after it.

    `logits_BTV[:, t]` is the next-token head at block position t; draft j sits at block position j + 1
    and is checked against the argmax at position j. Only the first `n_drafts_B` drafts of a row count
    (all of them when None). Returns (n_accepted_B, bonus_B).
    """
    J = drafts_BJ.shape[1]
    if J == 0:  # a plain step
        target_B = logits_BTV[:, 0].argmax(-1)
        return torch.zeros_like(target_B), target_B
    target_BT = logits_BTV.argmax(-1)
    ok_BJ = drafts_BJ == target_BT[:, :J]
    if n_drafts_B is not None:
        ok_BJ &= torch.arange(J, device=drafts_BJ.device) < n_drafts_B.unsqueeze(1)
    n_accepted_B = ok_BJ.long().cumprod(1).sum(1)
    return n_accepted_B, target_BT.gather(1, n_accepted_B.unsqueeze(1)).squeeze(1)


def accept_sampled(
    logits_BTV: Tensor,
    drafts_BJ: Tensor,
    q_BJV: Tensor | None,
    n_drafts_B: Tensor | None,
    params: SamplingParams | RowSampling,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """Speculative sampling: keep draft x with probability min(1, p(x) / q(x)), in order.

    At the first rejection the token is drawn from normalize(max(p - q, 0)); when every draft is kept,
    the bonus token is drawn from p. The result is distributed exactly as plain sampling from p, where p
    is `sampling_probs(logits)` of the next-token head. `n_drafts_B` None means every draft counts.
    Returns (n_accepted_B, bonus_B).
    """
    p_BTV = sampling_probs(logits_BTV, params)
    B, J = drafts_BJ.shape
    if n_drafts_B is None:
        n_drafts_B = torch.full((B,), J, device=drafts_BJ.device)
    rows_B = torch.arange(B, device=drafts_BJ.device)
    if J == 0:
        return torch.zeros_like(rows_B), sample(p_BTV[:, 0], generator)
    p_draft_BJ = p_BTV[:, :J].gather(-1, drafts_BJ.unsqueeze(-1)).squeeze(-1)
    q_draft_BJ = q_BJV.gather(-1, drafts_BJ.unsqueeze(-1)).squeeze(-1)
    u_BJ = torch.rand(B, J, device=drafts_BJ.device, generator=generator)
    valid_BJ = torch.arange(J, device=drafts_BJ.device) < n_drafts_B.unsqueeze(1)
    ok_BJ = (u_BJ * q_draft_BJ < p_draft_BJ) & valid_BJ
    n_accepted_B = ok_BJ.long().cumprod(1).sum(1)

    p_next_BV = p_BTV[rows_B, n_accepted_B]
    q_next_BV = q_BJV[rows_B, n_accepted_B.clamp(max=J - 1)]
    residual_BV = (p_next_BV - q_next_BV).clamp(min=0)
    rejected_B = n_accepted_B < n_drafts_B
    # p == q leaves no residual, and then rejection has probability 0: fall back to p for rounding.
    usable_B = rejected_B & (residual_BV.sum(-1) > 0)
    dist_BV = torch.where(usable_B.unsqueeze(1), residual_BV, p_next_BV)
    dist_BV = dist_BV / dist_BV.sum(-1, keepdim=True)
    return n_accepted_B, sample(dist_BV, generator)


def propose_drafts(
    model,
    h_BTD: Tensor,
    rope,
    tokens_BT: Tensor,
    last_B: Tensor,
    next_B: Tensor,
    depth: int,
    params: SamplingParams,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor | None]:
    """Sequential heads' drafts for the depth - 1 tokens after `next_B`, from block position `last_B`.

    `h_BTD` is the trunk output over the block `tokens_BT`, `last_B` each row's last accepted block
    position and `next_B` the token chosen after it by the next-token head. The heads run as a chain
    over the whole block, head k taking head k-1's output and the token k steps ahead: the accepted
    block tokens, then `next_B`, then the drafts chosen so far. Running every head over the whole block
    also writes its KV cache at each position the block commits. (A head's entry at position t is built
    from the token at t + k, which is still a draft when t is among the last k - 1 committed positions;
    those entries are not rewritten later. This can only change how good later drafts are, never the
    verified output.) Parallel heads draft in one unembedding call instead (`decoding._draft`).

    Returns (drafts_BJ, q_BJV): the drafts and, when sampling, the distributions they were drawn from.
    """
    if model.config.head_style != "sequential":
        raise ValueError(f"propose_drafts chains sequential heads, not {model.config.head_style} ones")
    B, T = tokens_BT.shape
    if depth < 2:
        return tokens_BT.new_zeros(B, 0), None
    rows_B = torch.arange(B, device=tokens_BT.device)
    # Tokens at block positions 0 .. T + depth - 1, with next_B written just after the last accepted one.
    ext_BX = torch.cat([tokens_BT, tokens_BT.new_zeros(B, depth)], dim=1)
    ext_BX[rows_B, last_B + 1] = next_B
    z_BTD = h_BTD  # the sequential style's next-token head is the trunk output itself
    drafts, dists = [], []
    for i in range(1, depth):
        z_BTD = model.head_forward(i, z_BTD, rope, ext_BX[:, i : i + T])
        draft_B, q_BV = choose(model.logits(z_BTD[rows_B, last_B]), params, generator)
        ext_BX[rows_B, last_B + 1 + i] = draft_B
        drafts.append(draft_B)
        dists.append(q_BV)
    q_BJV = None if params.greedy else torch.stack(dists, dim=1)
    return torch.stack(drafts, dim=1), q_BJV


__all__ = ["accept_greedy", "accept_sampled", "draft_depth", "propose_drafts"]
