"""Multi-token loss: L = sum_i w_i * mean_t CE(head_i(t), token t + offset_i).

The memory-efficient path (the paper's §2 and Fig. S11) runs the trunk once, then each head's forward
and backward in turn from the detached trunk output, then one backward through the trunk. Within a
head, cross-entropy is chunked over positions, so at most (chunk_size, V) logits exist at a time.
Peak memory goes from O(N V) to O(V) per position.

Self-distillation (`distill=True`) swaps the hard labels of the extra heads for soft targets: head i
(offset k) at position t learns the next-token head's distribution at position t + k - 1 from the same
forward pass, p = softmax(logits_head1(t + k - 1)), with loss H(p, q_i) = -sum_v p(v) log q_i(v), the
KL divergence up to p's entropy (a constant for the heads). The teacher logits of a chunk are computed
under no_grad, so the chunking keeps memory at two (chunk, V) blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from multitoken.model import MultiTokenLM

IGNORE_INDEX = -100
DEFAULT_CHUNK_SIZE = 2048


def after_marker(tokens_BT: Tensor, marker_id: int, sep_id: int | None = None) -> Tensor:
    """Bool (B, T): token t follows a `marker_id` token of its own document (one at s < t with no
    separator at s+1 .. t-1). A document's end separator counts as following its marker; a window that
    starts after the marker has nothing marked until the next document's marker.

        last_m(t) = max{s < t : x_s = marker},  last_sep(t) = max{s < t : x_s = sep}  (-1 if none)
        scored(t) = last_m(t) > last_sep(t)
    """
    B, T = tokens_BT.shape
    index_BT = torch.arange(T, device=tokens_BT.device).expand(B, T)
    none_BT = torch.full_like(index_BT, -1)

    def last_before(hit_BT: Tensor) -> Tensor:
        last_BT = torch.where(hit_BT, index_BT, none_BT).cummax(dim=1).values  # last hit at s <= t
        return torch.cat([none_BT[:, :1], last_BT[:, :-1]], dim=1)  # at s < t

    last_sep_BT = last_before(tokens_BT == sep_id) if sep_id is not None else none_BT
    return last_before(tokens_BT == marker_id) > last_sep_BT


def build_targets(
    tokens_BT: Tensor,
    offsets: list[int],
    *,
    sep_id: int | None = None,
    pad_id: int | None = None,
    loss_after_id: int | None = None,
) -> Tensor:
    """Targets of shape (B, T, N): head i's target at position t is tokens[t + offsets[i]].

    Positions without a target are IGNORE_INDEX: past the end of the window, padding, and targets
    beyond a document separator (a head may predict the separator itself, never the next document).
    With `loss_after_id`, only target tokens that follow that marker in their document are kept (e.g.
    the answer after "="), the same target tokens for every head: head i keeps target t + offsets[i]
    exactly when `after_marker` holds there, whatever the position t that predicts it.
    """
    B, T = tokens_BT.shape
    scored_BT = after_marker(tokens_BT, loss_after_id, sep_id) if loss_after_id is not None else None
    targets_BTN = torch.full((B, T, len(offsets)), IGNORE_INDEX, dtype=torch.long, device=tokens_BT.device)
    if sep_id is not None:
        seps_seen_BT = (tokens_BT == sep_id).long().cumsum(dim=1)
    for i, k in enumerate(offsets):
        if k >= T:
            continue
        target_BT = tokens_BT[:, k:].clone()
        if sep_id is not None and k > 1:
            # A separator at t+1 .. t+k-1 means the target lies in the next document.
            crosses_BT = seps_seen_BT[:, k - 1 : T - 1] != seps_seen_BT[:, : T - k]
            target_BT[crosses_BT] = IGNORE_INDEX
        if pad_id is not None:
            target_BT[(target_BT == pad_id) | (tokens_BT[:, : T - k] == pad_id)] = IGNORE_INDEX
        if scored_BT is not None:
            target_BT[~scored_BT[:, k:]] = IGNORE_INDEX
        targets_BTN[:, : T - k, i] = target_BT
    return targets_BTN


def target_counts(targets_BTN: Tensor) -> Tensor:
    """Number of real targets per head, shape (N,)."""
    return (targets_BTN != IGNORE_INDEX).sum(dim=(0, 1))


def soft_cross_entropy(student_logits_CV: Tensor, teacher_logits_CV: Tensor, top_k: int = 0) -> Tensor:
    """Sum over rows of H(p, q) = -sum_v p(v) log q(v), with q = softmax(student), p = softmax(teacher).

    top_k > 0 truncates p to its top_k most probable entries, renormalised to sum to 1 (the tail's mass
    is dropped, not lumped). Gradients flow to the student only; the teacher is a constant.
    """
    teacher_CV = teacher_logits_CV.detach().float()
    log_q_CV = F.log_softmax(student_logits_CV.float(), dim=-1)
    if 0 < top_k < teacher_CV.shape[-1]:
        top_CK, index_CK = teacher_CV.topk(top_k, dim=-1)
        p_CK = F.softmax(top_CK, dim=-1)
        return -(p_CK * log_q_CV.gather(-1, index_CK)).sum()
    return -(F.softmax(teacher_CV, dim=-1) * log_q_CV).sum()


def teacher_index(target_BT: Tensor, offset: int) -> tuple[Tensor, Tensor]:
    """Flat positions of head targets and of their teachers: (valid_M, teacher_M) into B*T.

    A head of offset k with a target at t is distilled from the next-token distribution at t + k - 1,
    which lies in the same window whenever the hard target t + k does.
    """
    valid_M = (target_BT.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
    return valid_M, valid_M + (offset - 1)


def _head_distill_backward(
    model: MultiTokenLM,
    z_BTD: Tensor,
    z_next_BTD: Tensor,
    target_BT: Tensor,
    offset: int,
    scale: float,
    chunk_size: int,
    top_k: int,
) -> Tensor:
    """Backward of scale * sum soft CE against the next-token head's distribution, chunked; returns the sum.

    `z_next_BTD` is the next-token head's pre-norm state (the teacher, no gradient needed).
    """
    valid_M, teacher_M = teacher_index(target_BT, offset)
    z_MD = z_BTD.reshape(-1, z_BTD.shape[-1]).index_select(0, valid_M)
    z_teacher_MD = z_next_BTD.detach().reshape(-1, z_BTD.shape[-1]).index_select(0, teacher_M)
    z_detached_MD = z_MD.detach().requires_grad_()
    loss_sum = torch.zeros((), device=z_BTD.device)
    for start in range(0, valid_M.numel(), chunk_size):
        with torch.no_grad():
            teacher_CV = model.logits(z_teacher_MD[start : start + chunk_size])
        chunk_loss = soft_cross_entropy(
            model.logits(z_detached_MD[start : start + chunk_size]), teacher_CV, top_k
        )
        del teacher_CV
        (chunk_loss * scale).backward()
        loss_sum += chunk_loss.detach()
    if z_detached_MD.grad is not None:
        z_MD.backward(z_detached_MD.grad)
    return loss_sum


def _head_backward(
    model: MultiTokenLM, z_BTD: Tensor, target_BT: Tensor, scale: float, chunk_size: int
) -> Tensor:
    """Backward of scale * sum CE for one head, chunked over its valid positions; returns the CE sum.

    A head with nothing to train (the next-token head on a frozen base) only measures its loss.
    """
    valid_M = (target_BT.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
    z_MD = z_BTD.reshape(-1, z_BTD.shape[-1]).index_select(0, valid_M)
    target_M = target_BT.reshape(-1).index_select(0, valid_M)
    trains = z_MD.requires_grad or any(p.requires_grad for p in model.output.parameters())
    z_detached_MD = z_MD.detach().requires_grad_(trains)
    loss_sum = torch.zeros((), device=z_BTD.device)
    for start in range(0, target_M.numel(), chunk_size):
        # No name for the logits: autograd frees them during backward instead of keeping a chunk alive.
        with torch.set_grad_enabled(trains):
            chunk_loss = F.cross_entropy(
                model.logits(z_detached_MD[start : start + chunk_size]).float(),
                target_M[start : start + chunk_size],
                reduction="sum",
            )
        if trains:
            (chunk_loss * scale).backward()
        loss_sum += chunk_loss.detach()
    if z_detached_MD.grad is not None:
        z_MD.backward(z_detached_MD.grad)
    return loss_sum


def multi_token_backward(
    model: MultiTokenLM,
    tokens_BT: Tensor,
    *,
    memory_efficient: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    sep_id: int | None = None,
    pad_id: int | None = None,
    normalizer_N: Tensor | None = None,
    loss_scale: float = 1.0,
    targets_BTN: Tensor | None = None,
    distill: bool = False,
    distill_top_k: int = 0,
) -> list[float]:
    """Forward and backward for one batch; gradients accumulate in `.grad`. Returns per-head mean losses.

    Each head's loss is its cross-entropy sum divided by `normalizer_N[i]` (default: its number of
    targets in this batch), weighted by `config.loss_weights[i]` and scaled by `loss_scale`. Passing the
    target counts of the whole global batch makes gradients independent of how it is split across
    micro-batches and ranks. Heads with weight 0 are skipped and reported as NaN. A caller that already
    built this batch's `targets_BTN` (with `build_targets`) may pass them in.

    With `distill`, heads after the first learn the next-token head's distribution at t + k - 1 instead
    of token t + k (see the module docstring; `distill_top_k` truncates it), at the positions where the
    hard target exists; the first head keeps its hard-label loss.
    """
    config = model.config
    if targets_BTN is None:
        targets_BTN = build_targets(tokens_BT, config.head_offsets, sep_id=sep_id, pad_id=pad_id)
    counts_N = target_counts(targets_BTN)
    if normalizer_N is None:
        normalizer_N = counts_N
    normalizer_N = normalizer_N.clamp(min=1).tolist()
    weights = config.loss_weights
    if not memory_efficient:
        return _naive_backward(
            model, tokens_BT, targets_BTN, counts_N, normalizer_N, loss_scale, distill, distill_top_k
        )

    rope = model.rope_context(tokens_BT, None)
    h_BTD = model.trunk_forward(tokens_BT, rope)
    sequential = config.head_style == "sequential"
    # Roots are where head gradients are gathered: the trunk output, or every depth of the sequential chain.
    roots = model.head_states(h_BTD, tokens_BT, rope) if sequential else [h_BTD]
    # A frozen trunk (training heads only) built no graph: its roots gather no gradient either.
    detached_roots = [r.detach().requires_grad_(r.requires_grad) for r in roots]

    losses: list[float] = []
    teacher_BTD = None  # the next-token head's state, computed once when distilling
    for i in range(config.n_future):
        if weights[i] == 0:
            losses.append(float("nan"))
            continue
        root = detached_roots[i if sequential else 0]
        z_BTD = root if sequential else model.head_forward(i, root, rope, model.head_tokens(i, tokens_BT))
        scale = loss_scale * weights[i] / normalizer_N[i]
        if distill and i > 0:
            if teacher_BTD is None:
                with torch.no_grad():
                    teacher_BTD = roots[0] if sequential else model.head_forward(0, roots[0], rope)
            offset = config.head_offsets[i]
            loss_sum = _head_distill_backward(
                model, z_BTD, teacher_BTD, targets_BTN[..., i], offset, scale, chunk_size, distill_top_k
            )
        else:
            loss_sum = _head_backward(model, z_BTD, targets_BTN[..., i], scale, chunk_size)
        losses.append(loss_sum.item() / max(int(counts_N[i]), 1))

    pairs = [(r, d.grad) for r, d in zip(roots, detached_roots, strict=True) if d.grad is not None]
    if pairs:
        torch.autograd.backward([r for r, _ in pairs], [g for _, g in pairs])
    return losses


def _naive_backward(
    model, tokens_BT, targets_BTN, counts_N, normalizer_N, loss_scale, distill=False, distill_top_k=0
) -> list[float]:
    """Reference path: all heads' full logits at once, one summed loss, one backward."""
    logits_BTNV = model(tokens_BT)
    total = torch.zeros((), device=tokens_BT.device)
    losses = []
    for i, weight in enumerate(model.config.loss_weights):
        if weight == 0:
            losses.append(float("nan"))
            continue
        if distill and i > 0:
            k, T = model.config.head_offsets[i], tokens_BT.shape[1]
            valid_BT = targets_BTN[..., i] != IGNORE_INDEX
            teacher_BTV = torch.zeros_like(logits_BTNV[:, :, 0])
            teacher_BTV[:, : T - k + 1] = logits_BTNV[:, k - 1 :, 0]  # position t gets t + k - 1's
            loss_sum = soft_cross_entropy(
                logits_BTNV[:, :, i][valid_BT], teacher_BTV[valid_BT], distill_top_k
            )
        else:
            loss_sum = F.cross_entropy(
                logits_BTNV[:, :, i].flatten(0, 1).float(), targets_BTN[..., i].flatten(), reduction="sum"
            )
        total = total + weight * loss_sum / normalizer_N[i]
        losses.append(loss_sum.item() / max(int(counts_N[i]), 1))
    (total * loss_scale).backward()
    return losses


@torch.no_grad()
def head_metrics(
    model: MultiTokenLM,
    tokens_BT: Tensor,
    *,
    sep_id: int | None = None,
    pad_id: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    loss_after_id: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-head sums for evaluation: (CE sum, top-1 correct, target count), each shape (N,); the
    targets `build_targets` keeps (with `loss_after_id`, only those after the marker)."""
    config = model.config
    targets_BTN = build_targets(
        tokens_BT, config.head_offsets, sep_id=sep_id, pad_id=pad_id, loss_after_id=loss_after_id
    )
    rope = model.rope_context(tokens_BT, None)
    states = model.head_states(model.trunk_forward(tokens_BT, rope), tokens_BT, rope)
    loss_N = torch.zeros(config.n_future, dtype=torch.float64)
    correct_N = torch.zeros(config.n_future, dtype=torch.long)
    for i, z_BTD in enumerate(states):
        target_M = targets_BTN[..., i].reshape(-1)
        valid_M = (target_M != IGNORE_INDEX).nonzero().squeeze(1)
        z_MD = z_BTD.reshape(-1, z_BTD.shape[-1]).index_select(0, valid_M)
        target_M = target_M.index_select(0, valid_M)
        for start in range(0, target_M.numel(), chunk_size):
            logits_CV = model.logits(z_MD[start : start + chunk_size]).float()
            target_C = target_M[start : start + chunk_size]
            loss_N[i] += F.cross_entropy(logits_CV, target_C, reduction="sum").item()
            correct_N[i] += (logits_CV.argmax(-1) == target_C).sum().item()
    return loss_N, correct_N, target_counts(targets_BTN).cpu()
