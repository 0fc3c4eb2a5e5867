"""Tree drafts: several candidate continuations verified in one forward pass (Medusa's tree attention).

A chain of drafts (blockwise parallel decoding) stops at the first wrong guess. A tree holds several
guesses per future position: node (r_1, ..., r_d) is the path that takes the r_1-th most likely draft of
the head with offset 2, then the r_2-th of the head with offset 3, and so on. Every node is fed to the
model at once, each attending to the committed cache and to its own ancestors only, so each node's
next-token logits are exactly those of its path. Greedy verification keeps the deepest node whose every
token equals the next-token head's argmax after its parent: the output stays token for token that of
plain greedy decoding. Sampled verification tries each node's children in rank order against the
residual distribution, so samples follow exactly the law of plain sampling. Drafting heads are
parallel (transformer or linear style), as in Medusa.

Cache layout of one step, row b at committed length pos_B[b]: node i (node 0 is the pending token, the
root) is written to slot pos_B[b] + i with RoPE position pos_B[b] + depth(i). After verification the
accepted path's keys and values are copied to slots pos_B[b] + 0 .. depth: at most `depth + 1` entries
per layer, the only copy decoding ever makes (chains roll back by moving positions alone).

Dimension letters: B batch, T tree nodes (root included), P path positions (tree depth + 1),
J drafting heads, V vocabulary, S cache slots.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from multitoken.errors import UserError
from multitoken.sampling import SamplingParams, sample, sampling_probs


@dataclass(frozen=True)
class DraftTree:
    """A fixed tree of draft paths; build it with `from_paths`, `from_widths` or `sparse_tree`."""

    paths: tuple[tuple[int, ...], ...]
    """Every non-root node as its path of ranks, ordered by depth (parents before children)."""

    @classmethod
    def from_paths(cls, paths: Sequence[Sequence[int]]) -> DraftTree:
        """A tree from its nodes' rank paths, e.g. [(0,), (1,), (0, 0)]; every prefix must be a node too."""
        nodes = sorted({tuple(int(r) for r in p) for p in paths}, key=lambda p: (len(p), p))
        if not nodes:
            raise UserError("a draft tree needs at least one node")
        present = set(nodes)
        for path in nodes:
            if not path or min(path) < 0:
                raise UserError(f"draft tree path {list(path)} must be a non-empty list of ranks >= 0")
            if len(path) > 1 and path[:-1] not in present:
                raise UserError(f"draft tree path {list(path)} has no parent {list(path[:-1])} in the tree")
        return cls(tuple(nodes))

    @classmethod
    def from_widths(cls, widths: Sequence[int]) -> DraftTree:
        """The full tree with widths[d] children per node at depth d: [4, 2] has 4 + 8 nodes."""
        if not widths or min(widths) < 1:
            raise UserError(f"draft tree widths must be positive integers, got {list(widths)}")
        levels = [list(itertools.product(*(range(w) for w in widths[: d + 1]))) for d in range(len(widths))]
        return cls.from_paths([p for level in levels for p in level])

    @classmethod
    def parse(cls, spec: str) -> DraftTree:
        """`--draft-tree` syntax: comma-separated widths per depth, e.g. "4,2,1"."""
        try:
            widths = [int(w) for w in spec.split(",")]
        except ValueError:
            raise UserError(f"--draft-tree takes widths per depth such as 4,2,1, got {spec!r}") from None
        return cls.from_widths(widths)

    @property
    def depth(self) -> int:
        """Longest path: the most drafts one step can accept."""
        return len(self.paths[-1])

    @property
    def n_nodes(self) -> int:
        """Nodes fed to the model per step, the root included."""
        return len(self.paths) + 1

    def widths(self) -> list[int]:
        """Per depth, how many ranks of that head's drafts the tree uses (max rank + 1)."""
        return [1 + max(p[d] for p in self.paths if len(p) > d) for d in range(self.depth)]

    def tensors(self, device) -> TreeTensors:
        return TreeTensors.build(self, device)


@dataclass
class TreeTensors:
    """A DraftTree's index tables on a device."""

    parent_T: Tensor
    """Parent node of each node; the root is its own parent."""
    depth_T: Tensor
    """Depth of each node: 0 for the root, d for a path of d ranks."""
    rank_T: Tensor
    """Rank of a node's token among its head's drafts (0 for the root)."""
    ancestor_TT: Tensor
    """ancestor_TT[i, j]: node j is node i or one of its ancestors (what node i attends to)."""
    path_TP: Tensor
    """path_TP[i, d]: node i's ancestor at depth d, or node i itself for d beyond its depth."""
    children_TC: Tensor
    """children_TC[i]: node i's children in rank order, padded with -1."""
    levels: list[Tensor]
    """levels[d - 1]: the nodes at depth d (kept here so a step never asks the device for them)."""
    top_k: int
    """Drafts per head the tree reads: the highest rank + 1."""

    @classmethod
    def build(cls, tree: DraftTree, device) -> TreeTensors:
        index = {(): 0} | {p: i + 1 for i, p in enumerate(tree.paths)}
        nodes = [(), *tree.paths]
        parent = [index[p[:-1]] if p else 0 for p in nodes]
        ancestor = [[p[: len(q)] == q and len(q) <= len(p) for q in nodes] for p in nodes]
        path = [[index[p[: min(d, len(p))]] for d in range(tree.depth + 1)] for p in nodes]
        children = [[index[q] for q in tree.paths if q[:-1] == p] for p in nodes]  # paths are rank-sorted
        width = max(len(c) for c in children)
        return cls(
            parent_T=torch.tensor(parent, device=device),
            depth_T=torch.tensor([len(p) for p in nodes], device=device),
            rank_T=torch.tensor([p[-1] if p else 0 for p in nodes], device=device),
            ancestor_TT=torch.tensor(ancestor, device=device),
            path_TP=torch.tensor(path, device=device),
            children_TC=torch.tensor([c + [-1] * (width - len(c)) for c in children], device=device),
            levels=[
                torch.tensor([i for i, p in enumerate(nodes) if len(p) == d], device=device)
                for d in range(1, tree.depth + 1)
            ],
            top_k=max(tree.widths()),
        )


def sparse_tree(rank_accuracy: Sequence[Sequence[float]], n_nodes: int) -> DraftTree:
    """The `n_nodes` paths most likely to be accepted, given each head's accuracy by rank (Medusa's sparse tree).

    `rank_accuracy[d][r]` is how often the r-th most likely draft of the head with offset d + 2 is the
    right token. Assuming heads err independently, a path is accepted with the product of its ranks'
    accuracies; since extending a path never raises that product, the best n paths form a tree.
    """
    if n_nodes < 1:
        raise UserError(f"a draft tree needs at least one node, got n_nodes={n_nodes}")
    heap = [(-rank_accuracy[0][r], (r,)) for r in range(len(rank_accuracy[0]))]
    heapq.heapify(heap)
    chosen: list[tuple[int, ...]] = []
    while heap and len(chosen) < n_nodes:
        neg_prob, path = heapq.heappop(heap)
        chosen.append(path)
        if len(path) < len(rank_accuracy):
            for r, acc in enumerate(rank_accuracy[len(path)]):
                heapq.heappush(heap, (neg_prob * acc, (*path, r)))
    return DraftTree.from_paths(chosen)


@torch.no_grad()
def measure_rank_accuracy(model, tokens_BT: Tensor, depth: int, max_rank: int) -> list[list[float]]:
    """For the heads with offsets 2 .. depth + 1: how often the r-th most likely token is the right one.

    `tokens_BT` is held-out text; returns `rank_accuracy[d][r]` for `sparse_tree`.
    """
    rope = model.rope_context(tokens_BT, None)
    h_BTD = model.trunk_forward(tokens_BT, rope)
    accuracy = []
    for d in range(depth):
        offset = d + 2
        z_BTD = model.head_forward(d + 1, h_BTD, rope, model.head_tokens(d + 1, tokens_BT))[:, :-offset]
        top_BTR = model.logits(z_BTD).topk(max_rank, dim=-1).indices
        hits_BTR = top_BTR == tokens_BT[:, offset:].unsqueeze(-1)
        accuracy.append(hits_BTR.float().mean((0, 1)).tolist())
    return accuracy


def tree_candidates(next_B: Tensor, draft_logits_BJV: Tensor, tree: TreeTensors) -> Tensor:
    """Tokens of every node, (B, T): the pending token at the root, node (.., r) at depth d the r-th draft of head d + 1."""
    top_BJK = draft_logits_BJV.topk(tree.top_k, dim=-1).indices
    head_T = (tree.depth_T - 1).clamp(min=0)
    tokens_BT = top_BJK[:, head_T, tree.rank_T]
    tokens_BT[:, 0] = next_B
    return tokens_BT


def tree_positions(pos_B: Tensor, tree: TreeTensors, cache_len: int, max_seq_len: int):
    """(slots_BT, rope_pos_BT, mask_B1TS) for feeding the tree to rows whose committed length is pos_B."""
    T = tree.depth_T.shape[0]
    slots_BT = pos_B.unsqueeze(1) + torch.arange(T, device=pos_B.device)
    rope_pos_BT = (pos_B.unsqueeze(1) + tree.depth_T).clamp(max=max_seq_len - 1)
    key_S = torch.arange(cache_len, device=pos_B.device)
    mask_BTS = (key_S.view(1, 1, -1) < pos_B.view(-1, 1, 1)).expand(-1, T, -1).clone()
    mask_BTS.scatter_(2, slots_BT.unsqueeze(1).expand(-1, T, -1), tree.ancestor_TT.expand(len(pos_B), -1, -1))
    return slots_BT, rope_pos_BT, mask_BTS.unsqueeze(1)


def accept_tree_greedy(
    logits_BTV: Tensor, tokens_BT: Tensor, max_drafts_B: Tensor, tree: TreeTensors
) -> tuple[Tensor, Tensor, Tensor]:
    """The deepest node whose path the next-token head confirms, at most `max_drafts_B` deep.

    A node is confirmed when its token is the argmax after its parent and its parent is confirmed.
    Children of one node hold distinct tokens, so at most one child per node is confirmed: the confirmed
    nodes form one path. Returns (n_accepted_B, path_BP: the path's node per depth, bonus_B: the
    argmax after its last node).
    """
    target_BT = logits_BTV.argmax(-1)
    ok_BT = (tokens_BT == target_BT[:, tree.parent_T]) & (tree.depth_T <= max_drafts_B.unsqueeze(1))
    confirmed_BT = torch.zeros_like(ok_BT)
    confirmed_BT[:, 0] = True
    for level_L in tree.levels:
        confirmed_BT[:, level_L] = ok_BT[:, level_L] & confirmed_BT[:, tree.parent_T[level_L]]
    n_accepted_B, last_B = (confirmed_BT * tree.depth_T).max(1)
    bonus_B = target_BT.gather(1, last_B.unsqueeze(1)).squeeze(1)
    return n_accepted_B, tree.path_TP[last_B], bonus_B


def accept_tree_sampled(
    logits_BTV: Tensor,
    tokens_BT: Tensor,
    max_drafts_B: Tensor,
    tree: TreeTensors,
    params: SamplingParams,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Lossless sampling through the tree: the output is distributed exactly as plain sampling.

    The drafts are fixed candidates (point masses), so at the current node each child x is tried in rank
    order and kept with probability r(x), where r is the next-token distribution p there with the
    already rejected siblings removed and renormalised: x1 is kept with probability p(x1), x2 with
    p(x2) / (1 - p(x1)), ..., so each token comes out with probability p(x), as in SpecInfer's
    multi-draft verification. A kept child becomes the current node; after the last one the bonus token
    is drawn from r. Returns (n_accepted_B, path_BP, bonus_B) like `accept_tree_greedy`.
    """
    p_BTV = sampling_probs(logits_BTV, params)
    B = tokens_BT.shape[0]
    rows_B = torch.arange(B, device=tokens_BT.device)
    node_B = torch.zeros_like(rows_B)
    n_accepted_B = torch.zeros_like(rows_B)
    descending_B = torch.ones(B, dtype=torch.bool, device=tokens_BT.device)
    r_BV = p_BTV[:, 0].clone()
    path = [node_B]
    for depth in range(1, len(tree.levels) + 1):
        kept_B = torch.zeros_like(descending_B)
        for child_rank in range(tree.children_TC.shape[1]):
            child_B = tree.children_TC[node_B, child_rank]
            tried_B = descending_B & ~kept_B & (child_B >= 0) & (depth <= max_drafts_B)
            token_B = tokens_BT[rows_B, child_B.clamp(min=0)]
            u_B = torch.rand(B, device=tokens_BT.device, generator=generator)
            keep_B = tried_B & (u_B < r_BV[rows_B, token_B])
            rejected_B = tried_B & ~keep_B
            r_BV[rows_B[rejected_B], token_B[rejected_B]] = 0.0
            r_BV = torch.where(rejected_B.unsqueeze(1), _normalised(r_BV, p_BTV[rows_B, node_B]), r_BV)
            node_B = torch.where(keep_B, child_B, node_B)
            r_BV = torch.where(keep_B.unsqueeze(1), p_BTV[rows_B, node_B], r_BV)
            kept_B |= keep_B
        n_accepted_B = n_accepted_B + kept_B
        descending_B &= kept_B
        path.append(node_B)
    return n_accepted_B, torch.stack(path, dim=1), sample(r_BV, generator)


def _normalised(r_BV: Tensor, fallback_BV: Tensor) -> Tensor:
    """r / sum(r); rows left with no mass (only by rounding) fall back to the node's p."""
    total_B1 = r_BV.sum(-1, keepdim=True)
    return torch.where(total_B1 > 0, r_BV / total_B1.clamp(min=1e-30), fallback_BV)


def commit_path(model, pos_B: Tensor, path_BP: Tensor, attention_modules: list | None = None) -> None:
    """Move the accepted path's keys and values from their node slots to consecutive slots from pos_B.

    Entries past a row's accepted depth copy the last accepted node again: they land beyond the committed
    length, where they are masked until overwritten. `attention_modules` (default: all) are the layers
    whose caches the tree's forward pass wrote.
    """
    rows_B1 = torch.arange(len(pos_B), device=pos_B.device).unsqueeze(1)
    src_BP = pos_B.unsqueeze(1) + path_BP
    dst_BP = pos_B.unsqueeze(1) + torch.arange(path_BP.shape[1], device=pos_B.device)
    for attn in model.attention_modules() if attention_modules is None else attention_modules:
        cache = attn.kv_cache
        cache.k_cache_BSKE[rows_B1, dst_BP] = cache.k_cache_BSKE[rows_B1, src_BP]
        cache.v_cache_BSKE[rows_B1, dst_BP] = cache.v_cache_BSKE[rows_B1, src_BP]


__all__ = [
    "DraftTree",
    "TreeTensors",
    "accept_tree_greedy",
    "accept_tree_sampled",
    "commit_path",
    "measure_rank_accuracy",
    "sparse_tree",
    "tree_candidates",
    "tree_positions",
]
