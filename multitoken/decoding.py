"""Decoding steps over the rows of a static KV cache: prefill, then one verification step per draft plan.

`generate()` drives these steps for a fixed batch; the server's scheduler drives the same functions for
rows that join (a prefill into free cache rows) and leave (`DecodeBatch.keep_rows`) between steps. There
is no other decoding code: every forward pass of generation happens here.

A decoding step, for every live row at once:
  1. draft: the drafting heads read the trunk output at the row's last committed position and propose
     the tokens after the pending one (a chain of the first k heads, or the top guesses for a tree);
  2. verify: one forward pass of the trunk and next-token head over [pending token, drafts...];
  3. accept: the longest prefix of drafts that plain decoding would have produced (greedy), or that
     speculative sampling keeps (sampled), and the next pending token after it;
  4. commit: advance each row's position. A chain rolls back rejected drafts by not advancing;
     a tree copies its accepted path's keys and values into place.

Drafting is lazy: the drafting heads run only in steps that draft, and only the heads the plan uses.
Heads with a KV cache of their own (transformer and sequential styles) first catch up on the positions
committed since they last ran, from the trunk outputs kept in `h_hist_BSD`; at most CATCH_UP_WINDOW
positions, so a long stretch of plain decoding leaves older positions of their caches stale, which can
only make drafts worse, never change the output.

Dimension letters: B rows, T block positions, G catch-up positions, D model width, V vocabulary,
J drafting heads, R ranks, S cache slots.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from multitoken.config import RESIDUAL_HEAD_STYLES
from multitoken.cpu_linear import pack_linears, unpack_linears
from multitoken.draft_tree import (
    TreeTensors,
    accept_tree_greedy,
    accept_tree_sampled,
    commit_path,
    tree_candidates,
    tree_positions,
)
from multitoken.sampling import RowSampling, SamplingParams, choose
from multitoken.speculative import accept_greedy, accept_sampled, draft_depth, propose_drafts

CATCH_UP_WINDOW = 32
"""Most positions a cached drafting head catches up on before it drafts again."""
RANKS_TRACKED = 8
"""Ranks of each drafting head's guesses whose hit rates a step reports (for tree plans)."""


# ---- plans and records -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DraftPlan:
    """What one step verifies: nothing (plain), a chain of the first `n_drafts` heads, or a tree."""

    n_drafts: int = 0
    """Chain length; 0 is a plain step."""
    tree: TreeTensors | None = None
    """A tree of drafts instead of a chain (parallel heads only)."""
    name: str = "plain"
    """How stats name the plan: "plain", "chain2", "tree8", ..."""
    shadow: bool = False
    """A plain step that also runs the first drafting head and scores its guess against the token the
    step chooses: the evidence of a one-draft chain at a fraction of its cost (heads without a cache)."""

    @classmethod
    def chain(cls, n_drafts: int) -> DraftPlan:
        return cls(n_drafts, None, f"chain{n_drafts}" if n_drafts else "plain")

    @classmethod
    def shadow_probe(cls) -> DraftPlan:
        return cls(0, None, "probe", shadow=True)

    @classmethod
    def of_tree(cls, tree: TreeTensors, name: str) -> DraftPlan:
        return cls(len(tree.levels), tree, name)

    @property
    def n_heads(self) -> int:
        """Drafting heads the plan reads (offsets 2 .. n_heads + 1)."""
        return self.n_drafts

    @property
    def block(self) -> int:
        """Positions verified per row: the pending token plus every draft (tree nodes included)."""
        return 1 + (self.n_drafts if self.tree is None else int(self.tree.depth_T.shape[0]) - 1)


@dataclass
class StepRecord:
    """What one step did, on the host: per row the tokens it committed, and counts for stats."""

    plan: DraftPlan
    tokens: list[list[int]]
    """Per row: the tokens this step adds to the row's output, its accepted drafts and then the token
    chosen after them (which becomes the pending token); empty for rows given no budget."""
    n_accepted: list[int]
    """Per row: drafts accepted."""
    reached_J: list[int] = field(default_factory=list)
    """Per drafting head (depth 1..J of the plan): rows whose drafts up to that depth were all accepted."""
    accepted_J: list[int] = field(default_factory=list)
    """Per drafting head: rows that accepted the draft at that depth."""
    proposed_J: list[int] = field(default_factory=list)
    """Per drafting head: drafts placed in the block (a tree's nodes at that depth count each)."""
    rank_hits_JR: list[list[int]] = field(default_factory=list)
    """Per drafting head and rank r < RANKS_TRACKED: rows that reached the depth and whose right token
    was the head's r-th guess (parallel heads; empty for sequential ones)."""
    logits_BTV: Tensor | None = None
    """Next-token logits behind each committed token, (B, n_accepted + 1, V) padded; with keep_logits."""


# ---- the batch ---------------------------------------------------------------------------------------


class DecodeBatch:
    """Rows being decoded, one per KV-cache row, and the device state of each.

    Row b is cache row b: its pending token `next_B[b]` (chosen, not yet in the cache) goes at position
    `pos_B[b]`, the number of tokens committed to the cache. The drafting heads read trunk outputs that
    steps keep for them (`history`).
    `pos` and `synced` mirror positions on the host, so no step reads the device to size its blocks.
    """

    def __init__(
        self,
        model,
        capacity: int,
        cache_len: int,
        *,
        extra_slots: int = 0,
        compile: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        self.model, self.capacity, self.cache_len, self.extra_slots = model, capacity, cache_len, extra_slots
        self.device = next(model.parameters()).device
        self.n_heads = draft_depth(model.config) - 1
        # Residual heads have no attention: they read the trunk output at the last committed position
        # (conditioned ones the pending token too) and keep no cache.
        self.cached_heads = model.config.head_style not in RESIDUAL_HEAD_STYLES
        self.sequential = model.config.head_style == "sequential"
        # Real positions stay below cache_len - 1: padding and finished rows write to that spare slot.
        self.scratch = cache_len - 1
        self.generator = generator
        self.compiled = compile
        self.forward, self.forward_tree = _compiled_steps(self.device.type) if compile else _EAGER_STEPS
        model.setup_caches(capacity, cache_len, extra_slots=extra_slots)
        # On a CPU, blocks of many rows take oneDNN where MKL is slow; the unembedding is routed a step
        # at a time (`route_large_matrices`). Compiled passes leave it to inductor.
        self.packs_linears = self.device.type == "cpu" and not compile
        # The trunk's matrices are packed for the rows of a full chain step; a wrapper costs a little on
        # every call, and trees, rarely chosen where rows are few, keep MKL.
        max_rows = capacity * (1 + self.n_heads)
        self.routed_linears = pack_linears(model, max_rows) if self.packs_linears else []
        self.n_rows = 0
        """Rows in use, for the caller's bookkeeping (a step's rows are those its budget covers)."""
        B, S, dev = capacity, cache_len + extra_slots, self.device
        self.next_B = torch.zeros(B, dtype=torch.long, device=dev)
        self.pos_B = torch.zeros(B, dtype=torch.long, device=dev)
        # What drafting reads back: nothing (no drafting heads), the trunk output at each row's last
        # committed position (linear heads, no cache), or at every position (cached heads), and for
        # sequential heads the committed tokens too. Trunk outputs are allocated in the trunk's dtype.
        self.history = "none" if not self.n_heads else ("full" if self.cached_heads else "last")
        self.tok_hist_BS = torch.zeros(B, S if self.sequential else 0, dtype=torch.long, device=dev)
        self.h_hist_BSD: Tensor | None = None
        self.h_last_BD: Tensor | None = None
        self.track_ranks = False
        """Report each drafting head's hit rate by rank (what draft trees need): a few more operations."""
        self._arange_T = torch.arange(64, device=dev)
        self.synced_BJ = torch.zeros(B, max(self.n_heads, 1), dtype=torch.long, device=dev)
        self.pos: list[int] = [0] * B
        self.synced: list[list[int]] = [[0] * max(self.n_heads, 1) for _ in range(B)]
        self.row_greedy: list[bool] = [True] * capacity
        self.sampling = SamplingParams()
        self.prefill_heads = self.n_heads > 0
        """Run the cached drafting heads over prompts at prefill (off when the caller never drafts)."""

    @functools.cached_property
    def verify_attention(self) -> list:
        """Attention layers of the trunk and the next-token head: the caches a verification pass writes."""
        model = self.model
        return [m for mod in (*model.trunk, model.heads[0]) for m in mod.modules() if hasattr(m, "kv_cache")]

    def close(self) -> None:
        """Free the KV caches, and the packed weights of `pack_linears`."""
        self.model.clear_caches()
        if self.packs_linears:
            unpack_linears(self.model)

    def route_large_matrices(self, rows: int) -> None:
        """Send a step's calls of the large matrices (the unembedding, drafts included) through oneDNN
        when the step feeds 2 rows or more, else through MKL: one copy of each weight stays in the cache
        (see `multitoken.cpu_linear`)."""
        for forward in self.routed_linears:
            forward.route(rows >= 2)

    def keep_rows(self, keep: Sequence[int]) -> None:
        """Keep only the rows `keep`, in that order, as rows 0 .. len(keep) - 1 (their caches move too).

        The rows after them are free for new rows (`prefill` with first_row = len(keep)).
        """
        n = len(keep)
        moved = [i for i in range(n) if keep[i] != i]  # rows already in place are not copied
        to_M = torch.tensor(moved, dtype=torch.long, device=self.device)
        from_M = torch.tensor([keep[i] for i in moved], dtype=torch.long, device=self.device)
        for attn in self.model.attention_modules():
            cache = attn.kv_cache
            cache.k_cache_BSKE[to_M] = cache.k_cache_BSKE[from_M]
            cache.v_cache_BSKE[to_M] = cache.v_cache_BSKE[from_M]
        for name in ("next_B", "pos_B", "tok_hist_BS", "h_hist_BSD", "h_last_BD", "synced_BJ"):
            tensor = getattr(self, name)
            if tensor is not None:
                tensor[to_M] = tensor[from_M]
        self.pos[:n] = [self.pos[i] for i in keep]
        self.synced[:n] = [list(self.synced[i]) for i in keep]
        if isinstance(self.sampling, RowSampling):
            for tensor in (self.sampling.temperature_B, self.sampling.top_k_B, self.sampling.top_p_B):
                tensor[to_M] = tensor[from_M]
        self.row_greedy[:n] = [self.row_greedy[i] for i in keep]
        self.n_rows = n

    def resize(self, cache_len: int) -> None:
        """Give every row `cache_len` cache positions, keeping what the first min(old, new) hold.

        For a server whose rows come and go: attention reads the whole cache, so a batch sized for its
        longest live row (not the model's context) decodes faster. Shrinking is safe only when every
        live row's prompt plus budget fits the new length; growing is always safe (the old spare slot
        becomes an ordinary position, written before any query attends to it).
        """
        keep = min(cache_len, self.cache_len)
        old = [(a, a.kv_cache.k_cache_BSKE, a.kv_cache.v_cache_BSKE) for a in self.model.attention_modules()]
        self.model.setup_caches(self.capacity, cache_len, extra_slots=self.extra_slots)
        for attn, k_BSKE, v_BSKE in old:
            attn.kv_cache.k_cache_BSKE[:, :keep] = k_BSKE[:, :keep]
            attn.kv_cache.v_cache_BSKE[:, :keep] = v_BSKE[:, :keep]
        S = cache_len + self.extra_slots
        for name in ("tok_hist_BS", "h_hist_BSD"):
            tensor = getattr(self, name)
            if tensor is not None and tensor.shape[1] > 0:
                grown = tensor.new_zeros((tensor.shape[0], S, *tensor.shape[2:]))
                grown[:, :keep] = tensor[:, :keep]
                setattr(self, name, grown)
        self.cache_len, self.scratch = cache_len, cache_len - 1

    @property
    def sampling(self) -> SamplingParams | RowSampling:
        """Shared settings (generate) or one per cache row (the server: assign, or `set_sampling`)."""
        return self._sampling

    @sampling.setter
    def sampling(self, value: SamplingParams | RowSampling) -> None:
        self._sampling = value
        if isinstance(value, RowSampling):  # one device read here, none per step
            greedy = (value.temperature_B == 0).tolist()
        else:
            greedy = [value.greedy] * self.capacity
        self.row_greedy[: len(greedy)] = greedy

    def shadow_probes_exact(self, n_rows: int) -> bool:
        """Whether a shadow probe (`DraftPlan.shadow_probe`) of rows 0 .. n_rows - 1 scores exactly
        what a one-draft chain would accept: drafting heads without a cache, and greedy rows."""
        return self.history == "last" and all(self.row_greedy[:n_rows])

    def key_bound(self, end: int, block: int) -> int | None:
        """Cache slots that rows 0 .. end - 1 attend to when each feeds `block` positions from its own:
        max(pos) + block, so attention costs what the text's length does, not the cache's. None for
        compiled passes, whose shapes stay static."""
        if self.compiled:
            return None
        return min(max(self.pos[:end]) + block, self.cache_len)

    def live_sampling(self, rows: slice) -> SamplingParams | RowSampling:
        """The sampling settings of some rows, knowing on the host whether they are all greedy."""
        if not isinstance(self.sampling, RowSampling):
            return self.sampling
        return self.sampling.rows(rows, all(self.row_greedy[rows]))

    def set_sampling(self, row: int, params: SamplingParams) -> None:
        """Give cache row `row` its own sampling settings (before its prefill)."""
        if not isinstance(self.sampling, RowSampling):
            self.sampling = RowSampling.build([self.sampling] * self.capacity, self.device)
        self.row_greedy[row] = params.greedy
        self.sampling.temperature_B[row] = params.temperature
        self.sampling.top_k_B[row] = params.top_k
        self.sampling.top_p_B[row] = params.top_p


# ---- forward passes (compiled together when asked) -----------------------------------------------------


def _verify_forward(model, tokens_BT: Tensor, pos_BT: Tensor, first_row: int = 0, n_keys: int | None = None):
    """Trunk and next-token head over a block at per-row cache positions: (h_BTD, logits_BTV)."""
    rope = model.rope_context(tokens_BT, pos_BT, first_row=first_row, n_keys=n_keys)
    h_BTD = model.trunk_forward(tokens_BT, rope)
    return h_BTD, model.logits(model.head_forward(0, h_BTD, rope))


def _verify_tree(model, tokens_BT: Tensor, slots_BT: Tensor, rope_pos_BT: Tensor, mask_B1TS: Tensor):
    """`_verify_forward` over a draft tree's nodes, each attending to its ancestors only."""
    rope = model.rope_context(tokens_BT, slots_BT, rope_pos_BT=rope_pos_BT, mask_B1TS=mask_B1TS)
    h_BTD = model.trunk_forward(tokens_BT, rope)
    return h_BTD, model.logits(model.head_forward(0, h_BTD, rope))


_EAGER_STEPS = (_verify_forward, _verify_tree)

COMPILE_RECOMPILE_LIMIT = 64
"""Compiled verification passes kept per process (each batch size, block size and cache length is one)."""


@functools.cache
def _compiled_steps(device_type: str):
    """The verification passes compiled once per process, so repeated generate() calls reuse them.

    On CUDA "reduce-overhead" replays the pass as a CUDA graph, as gpt-fast does; the static KV cache is
    updated in place inside it. Shapes are static within a call (batch, block, cache length).
    """
    mode = "reduce-overhead" if device_type == "cuda" else None
    dynamo_config = torch._dynamo.config
    # Named cache_size_limit before torch 2.7.
    limit_name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"

    def compiled(step):
        compiled_step = torch.compile(step, dynamic=False, fullgraph=True, mode=mode)

        def run(*args):
            with dynamo_config.patch({limit_name: COMPILE_RECOMPILE_LIMIT}):
                return compiled_step(*args)

        return run

    return compiled(_verify_forward), compiled(_verify_tree)


# ---- prefill -----------------------------------------------------------------------------------------


@torch.no_grad()
def prefill(
    batch: DecodeBatch,
    chunks: Sequence[Sequence[int]],
    *,
    first_row: int = 0,
    start: Sequence[int] | None = None,
    final: bool = True,
    keep_logits: bool = False,
) -> StepRecord | None:
    """Write prompt tokens into cache rows first_row, first_row + 1, ...; choose each row's first token.

    Row i receives `chunks[i]` at positions start[i] .. (0 by default). A long prompt can come in several
    calls (chunked prefill, so running rows keep decoding in between); only the `final` call chooses the
    first new token, from the next-token head at the prompt's last position, and returns its record.
    Rows of different lengths are padded, the padding written to the spare slot.
    """
    model, dev = batch.model, batch.device
    B = len(chunks)
    starts = list(start) if start is not None else [0] * B
    lengths = [len(c) for c in chunks]
    longest = max(lengths)
    batch.route_large_matrices(B * longest)
    tokens_BT = torch.zeros(B, longest, dtype=torch.long, device=dev)
    for b, chunk in enumerate(chunks):
        tokens_BT[b, : lengths[b]] = torch.tensor(list(chunk), dtype=torch.long)
    arange_T = torch.arange(longest, device=dev)
    start_B = torch.tensor(starts, device=dev)
    length_B = torch.tensor(lengths, device=dev)
    pos_BT = torch.where(arange_T < length_B.unsqueeze(1), start_B.unsqueeze(1) + arange_T, batch.scratch)
    rows = slice(first_row, first_row + B)
    n_keys = None if batch.compiled else max(s + n for s, n in zip(starts, lengths, strict=True))
    rope = model.rope_context(tokens_BT, pos_BT, first_row=first_row, n_keys=n_keys)
    h_BTD = model.trunk_forward(tokens_BT, rope)
    z_BTD = model.head_forward(0, h_BTD, rope)  # every position: a cached next-token head fills its cache
    rows_B = torch.arange(B, device=dev)
    _keep_history(batch, rows, h_BTD, tokens_BT, pos_BT, rows_B, length_B - 1)
    batch.pos_B[rows] = start_B + length_B
    for b in range(B):
        batch.pos[first_row + b] = starts[b] + lengths[b]
        if starts[b] == 0:  # a new row: its drafting heads have seen nothing yet
            batch.synced[first_row + b] = [0] * batch.synced_BJ.shape[1]
            batch.synced_BJ[first_row + b] = 0
    sampling = batch.live_sampling(rows)
    last_logits_BV = model.logits(z_BTD[rows_B, length_B - 1])  # the prompt's other logits are not needed
    next_B = choose(last_logits_BV, sampling, batch.generator)[0] if final else None
    if batch.prefill_heads and batch.cached_heads and batch.n_heads and (final or not batch.sequential):
        # Fill the cached drafting heads' KV caches over the prompt now, in one batched pass.
        if batch.sequential:
            propose_drafts(
                model,
                h_BTD,
                rope,
                tokens_BT,
                length_B - 1,
                next_B,
                batch.n_heads + 1,
                sampling,
                batch.generator,
            )
        else:
            for i in range(1, batch.n_heads + 1):
                model.head_forward(i, h_BTD, rope)
        for b in range(B):
            batch.synced[first_row + b] = [batch.pos[first_row + b]] * batch.n_heads
        batch.synced_BJ[rows] = batch.pos_B[rows].unsqueeze(1)
    if not final:
        return None
    batch.next_B[rows] = next_B
    tokens = [[t] for t in next_B.tolist()]
    return StepRecord(
        DraftPlan(),
        tokens,
        [0] * B,
        logits_BTV=last_logits_BV.unsqueeze(1) if keep_logits else None,
    )


# ---- drafting ----------------------------------------------------------------------------------------


def _keep_history(batch, rows: slice, h_BTD, tokens_BT, pos_BT, rows_B, last_B) -> None:
    """Keep what the drafting heads will read: trunk outputs at the block's positions, or at `last_B`."""
    if batch.history == "none":
        return
    if batch.history == "last":
        if batch.h_last_BD is None:
            batch.h_last_BD = h_BTD.new_zeros(batch.capacity, h_BTD.shape[-1])
        batch.h_last_BD[rows] = h_BTD[rows_B, last_B]
        return
    if batch.h_hist_BSD is None:
        shape = (batch.capacity, batch.cache_len + batch.extra_slots, h_BTD.shape[-1])
        batch.h_hist_BSD = h_BTD.new_zeros(shape)
    rows_B1 = rows_B.unsqueeze(1)
    batch.h_hist_BSD[rows][rows_B1, pos_BT] = h_BTD
    if batch.sequential:
        batch.tok_hist_BS[rows][rows_B1, pos_BT] = tokens_BT


def _catch_up_block(batch: DecodeBatch, n_heads: int, n: int):
    """Positions the first `n_heads` cached drafting heads must (re)read: (pos_BG, last_B).

    Every position since the slowest of them last ran (at most CATCH_UP_WINDOW); the last committed
    position is always included, since it is the one that drafts.
    """
    starts = [
        max(min(min(synced[:n_heads]), p - 1), p - CATCH_UP_WINDOW)
        for synced, p in zip(batch.synced[:n], batch.pos[:n], strict=True)
    ]
    G = max(p - s for p, s in zip(batch.pos[:n], starts, strict=True))
    start_B = torch.tensor(starts, device=batch.device)
    pos_BG = start_B.unsqueeze(1) + torch.arange(G, device=batch.device)
    pos_BG = torch.where(pos_BG < batch.pos_B[:n].unsqueeze(1), pos_BG, batch.scratch)
    return pos_BG, batch.pos_B[:n] - 1 - start_B


def _draft(batch: DecodeBatch, plan: DraftPlan, n: int, sampling):
    """(drafts_BJ, q_BJV, draft_logits_BJV) for the plan, from each row's last committed position.

    Parallel heads give logits (a chain picks from them, a tree takes their top ranks); sequential heads
    draft as a chain, each head fed the previous one's choice.
    """
    model, k = batch.model, plan.n_heads
    if batch.history == "last":
        # heads without a cache read the last committed position (conditioned ones the pending token too)
        z_BJD = model.drafting_states(batch.h_last_BD[:n], batch.next_B[:n], k)
    else:
        pos_BG, last_B = _catch_up_block(batch, k, n)
        rows_B1 = torch.arange(n, device=batch.device).unsqueeze(1)
        h_BGD = batch.h_hist_BSD[:n][rows_B1, pos_BG]
        tokens_BG = batch.tok_hist_BS[:n][rows_B1, pos_BG] if batch.sequential else pos_BG
        rope = model.rope_context(tokens_BG, pos_BG, n_keys=batch.key_bound(n, 0))
        for b in range(n):
            batch.synced[b][:k] = [batch.pos[b]] * k
        batch.synced_BJ[:n, :k] = batch.pos_B[:n].unsqueeze(1)
        if batch.sequential:
            drafts_BJ, q_BJV = propose_drafts(
                model, h_BGD, rope, tokens_BG, last_B, batch.next_B[:n], k + 1, sampling, batch.generator
            )
            return drafts_BJ, q_BJV, None
        rows_B = rows_B1.squeeze(1)
        z_BJD = torch.stack([model.head_forward(i, h_BGD, rope)[rows_B, last_B] for i in range(1, k + 1)], 1)
    logits_BJV = model.logits(z_BJD)
    if plan.tree is not None:
        return None, None, logits_BJV
    drafts_X, q_XV = choose(logits_BJV.flatten(0, 1), _per_draft(sampling, k), batch.generator)
    q_BJV = None if q_XV is None else q_XV.view(n, k, -1)
    return drafts_X.view(n, k), q_BJV, logits_BJV


def _per_draft(sampling, k: int):
    """Row sampling settings repeated for each of a row's k drafts (flattened row-major)."""
    if isinstance(sampling, RowSampling):
        index = torch.arange(len(sampling.temperature_B), device=sampling.temperature_B.device)
        return sampling.rows(index.repeat_interleave(k), sampling.all_greedy)
    return sampling


def _rank_hits(logits_BJV: Tensor, truth_BJ: Tensor, reached_BJ: Tensor) -> Tensor:
    """(J, R) counts of rows that reached depth j and whose right token was head j's r-th guess."""
    R = min(RANKS_TRACKED, logits_BJV.shape[-1])
    top_BJR = logits_BJV.topk(R, dim=-1).indices
    hit_BJR = (top_BJR == truth_BJ.unsqueeze(-1)) & reached_BJ.unsqueeze(-1)
    return hit_BJR.sum(0)


# ---- one decoding step --------------------------------------------------------------------------------


@torch.no_grad()
def decode_step(
    batch: DecodeBatch, plan: DraftPlan, budget: Sequence[int], *, keep_logits: bool = False
) -> StepRecord:
    """One step of rows 0 .. len(budget) - 1 under `plan`; row b may commit at most budget[b] tokens.

    A row with budget 0 (finished, or waiting) is fed to the spare slot and left unchanged. Every step
    makes one device-to-host copy.
    """
    batch.route_large_matrices(len(budget) * plan.block)
    if plan.tree is not None:
        return _tree_step(batch, plan, budget, keep_logits)
    n, dev, model, k = len(budget), batch.device, batch.model, plan.n_drafts
    sampling = batch.live_sampling(slice(0, n))
    next_B, pos_B = batch.next_B[:n], batch.pos_B[:n]
    arange_T = batch._arange_T[: k + 1]
    if min(budget) > k:  # the common case: every row takes the whole block
        n_drafts_B, active_B = None, None
        pos_BT = pos_B.unsqueeze(1) + arange_T
    else:
        n_block_B = torch.tensor([min(k + 1, max(r, 0)) for r in budget], device=dev)
        n_drafts_B, active_B = (n_block_B - 1).clamp(min=0), n_block_B > 0
        pos_BT = torch.where(arange_T < n_block_B.unsqueeze(1), pos_B.unsqueeze(1) + arange_T, batch.scratch)
    if k:
        drafts_BJ, q_BJV, draft_logits_BJV = _draft(batch, plan, n, sampling)
        block_BT = torch.cat([next_B.unsqueeze(1), drafts_BJ], dim=1)
    else:
        drafts_BJ, q_BJV, draft_logits_BJV = next_B.new_zeros(n, 0), None, None
        block_BT = next_B.unsqueeze(1)
    h_BTD, logits_BTV = batch.forward(model, block_BT, pos_BT, 0, batch.key_bound(n, k + 1))
    # The first head's guess for the token this plain step chooses, from the last committed position.
    guess_B = _shadow_guess(batch, n) if plan.shadow else None
    if sampling.greedy:
        n_acc_B, bonus_B = accept_greedy(logits_BTV, drafts_BJ, n_drafts_B)
    else:
        n_acc_B, bonus_B = accept_sampled(logits_BTV, drafts_BJ, q_BJV, n_drafts_B, sampling, batch.generator)
    rows_B = torch.arange(n, device=dev)
    _keep_history(batch, slice(0, n), h_BTD, block_BT, pos_BT, rows_B, n_acc_B)
    if active_B is None:
        batch.pos_B[:n] = pos_B + n_acc_B + 1
        batch.next_B[:n] = bonus_B
    else:
        batch.pos_B[:n] = pos_B + (n_acc_B + 1) * active_B
        batch.next_B[:n] = torch.where(active_B, bonus_B, next_B)
    ranks = None
    if batch.track_ranks and draft_logits_BJV is not None:
        # The right token at each depth: the accepted drafts, then the bonus.
        depth_J = arange_T[1:]
        accepted_BJ = depth_J <= n_acc_B.unsqueeze(1)
        reached_BJ = depth_J <= n_acc_B.unsqueeze(1) + 1
        if n_drafts_B is not None:
            reached_BJ &= depth_J <= n_drafts_B.unsqueeze(1)
        truth_BJ = torch.where(accepted_BJ, drafts_BJ, bonus_B.unsqueeze(1))
        ranks = _rank_hits(draft_logits_BJV, truth_BJ, reached_BJ)
    return _record(
        batch, plan, budget, n_acc_B, bonus_B, drafts_BJ, ranks, logits_BTV if keep_logits else None, guess_B
    )


def _shadow_guess(batch: DecodeBatch, n: int) -> Tensor:
    """The +2 head's greedy guess, from each row's last committed position, of the token after the
    pending one (needs the kept last trunk outputs of uncached heads)."""
    if batch.history != "last" or batch.h_last_BD is None:
        raise ValueError("a shadow probe needs drafting heads without a cache (linear styles)")
    model = batch.model
    return model.logits(model.head_forward(1, batch.h_last_BD[:n], None, batch.next_B[:n])).argmax(-1)


def _tree_step(batch: DecodeBatch, plan: DraftPlan, budget: Sequence[int], keep_logits: bool) -> StepRecord:
    n, dev, model, tree = len(budget), batch.device, batch.model, plan.tree
    sampling = batch.live_sampling(slice(0, n))
    depth = len(tree.levels)
    n_block_B = torch.tensor([min(depth + 1, max(r, 0)) for r in budget], device=dev)
    n_drafts_B = (n_block_B - 1).clamp(min=0)
    _, _, draft_logits_BJV = _draft(batch, plan, n, sampling)
    next_B, pos_B = batch.next_B[:n], batch.pos_B[:n]
    nodes_BT = tree_candidates(next_B, draft_logits_BJV, tree)
    placement = tree_positions(pos_B, tree, model.cache_len(), model.config.max_seq_len)
    h_BTD, logits_BTV = batch.forward_tree(model, nodes_BT, *placement)
    if sampling.greedy:
        n_acc_B, path_BP, bonus_B = accept_tree_greedy(logits_BTV, nodes_BT, n_drafts_B, tree)
    else:
        n_acc_B, path_BP, bonus_B = accept_tree_sampled(
            logits_BTV, nodes_BT, n_drafts_B, tree, sampling, batch.generator
        )
    commit_path(model, pos_B, path_BP, batch.verify_attention)
    rows_B = torch.arange(n, device=dev)
    rows_B1 = rows_B.unsqueeze(1)
    active_B = n_block_B > 0
    # The accepted path's trunk outputs and tokens, at the positions it now holds.
    path_pos_BP = pos_B.unsqueeze(1) + batch._arange_T[: depth + 1]
    path_pos_BP = torch.where(active_B.unsqueeze(1), path_pos_BP, batch.scratch)
    path_tokens_BP = nodes_BT.gather(1, path_BP)
    _keep_history(batch, slice(0, n), h_BTD[rows_B1, path_BP], path_tokens_BP, path_pos_BP, rows_B, n_acc_B)
    # Finished rows keep their length, so their scratch nodes stay inside the cache.
    batch.pos_B[:n] = pos_B + (n_acc_B + 1) * active_B
    batch.next_B[:n] = torch.where(active_B, bonus_B, next_B)
    candidates_BJ = path_tokens_BP[:, 1:]
    ranks = None
    if batch.track_ranks:
        depth_J = batch._arange_T[1 : depth + 1]
        accepted_BJ = depth_J <= n_acc_B.unsqueeze(1)
        reached_BJ = (depth_J <= n_drafts_B.unsqueeze(1)) & (depth_J <= n_acc_B.unsqueeze(1) + 1)
        truth_BJ = torch.where(accepted_BJ, candidates_BJ, bonus_B.unsqueeze(1))
        ranks = _rank_hits(draft_logits_BJV, truth_BJ, reached_BJ)
    step_logits_BTV = logits_BTV[rows_B1, path_BP] if keep_logits else None
    return _record(batch, plan, budget, n_acc_B, bonus_B, candidates_BJ, ranks, step_logits_BTV)


def _record(
    batch, plan, budget, n_acc_B, bonus_B, candidates_BJ, ranks_JR, logits_BTV, guess_B=None
) -> StepRecord:
    """The step's one device-to-host copy, and the host-side bookkeeping it feeds."""
    n, k = len(budget), candidates_BJ.shape[1]
    parts = [n_acc_B, bonus_B, candidates_BJ.flatten()] + ([] if ranks_JR is None else [ranks_JR.flatten()])
    values = torch.cat([*parts, *([] if guess_B is None else [guess_B])]).tolist()
    if guess_B is not None:
        guesses, values = values[-n:], values[:-n]
    n_acc, bonus, candidates = values[:n], values[n : 2 * n], values[2 * n : 2 * n + n * k]
    record = StepRecord(plan, [], [], logits_BTV=logits_BTV)
    per_depth = [1] * k if plan.tree is None else [len(level) for level in plan.tree.levels]
    proposed, reached, accepted = [0] * k, [0] * k, [0] * k
    for b in range(n):
        if budget[b] <= 0:
            record.tokens.append([])
            record.n_accepted.append(0)
            continue
        a = n_acc[b]
        record.tokens.append([*candidates[b * k : b * k + a], bonus[b]])
        record.n_accepted.append(a)
        batch.pos[b] += a + 1
        drafted = min(k, budget[b] - 1)
        for j in range(drafted):
            proposed[j] += per_depth[j]
            reached[j] += j <= a
            accepted[j] += j < a
    if k:
        record.proposed_J, record.reached_J, record.accepted_J = proposed, reached, accepted
    if guess_B is not None:  # a shadow probe: what a one-draft chain would have accepted
        judged = [b for b in range(n) if budget[b] >= 2]
        hits = sum(guesses[b] == bonus[b] for b in judged)
        record.proposed_J, record.reached_J, record.accepted_J = [len(judged)], [len(judged)], [hits]
    if ranks_JR is not None:
        flat = values[2 * n + n * k :]
        R = len(flat) // k
        record.rank_hits_JR = [flat[j * R : (j + 1) * R] for j in range(k)]
    return record


__all__ = ["CATCH_UP_WINDOW", "DecodeBatch", "DraftPlan", "StepRecord", "decode_step", "prefill"]
