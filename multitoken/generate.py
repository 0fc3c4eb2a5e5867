"""Batched decoding with a static KV cache: greedy, sampling, and self-speculative decoding.

Every row keeps its own cache position, so prompts of different lengths need no left padding and rows
accept different numbers of drafted tokens per step. Plain decoding is the same loop with no drafts.

Dimension letters: B batch, T block positions, D model width, V vocabulary, J drafts per step.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from multitoken.devices import resolve_device
from multitoken.draft_tree import (
    DraftTree,
    accept_tree_greedy,
    accept_tree_sampled,
    commit_path,
    tree_candidates,
    tree_positions,
)
from multitoken.errors import UserError
from multitoken.sampling import SamplingParams, choose
from multitoken.speculative import (
    accept_greedy,
    accept_sampled,
    draft_depth,
    parallel_draft_logits,
    propose_drafts,
)

SPECULATIVE_HINT = "this model has one head; use --no-speculative or train with --n-future > 1"


@dataclass
class GenerationStats:
    """Counters of one generate() call.

    A forward pass is one batched call of the model: the prefill, and each decoding step (trunk and
    next-token head over a block of one pending token plus its drafts, and the drafting heads). Plain
    decoding therefore has tokens_per_forward == 1 exactly, and speculative decoding at most the depth.
    """

    new_tokens: int = 0
    """Tokens generated over all rows, an EOS that ended a row included."""
    forward_passes: int = 0
    """Batched model calls, the prefill included."""
    row_forwards: int = 0
    """Sum over rows of the forward passes in which the row was still generating."""
    tokens_per_forward: float = 0.0
    """new_tokens / row_forwards: tokens a row gains per forward pass, on average."""
    draft_offsets: list[int] = field(default_factory=list)
    """Offset of each drafting head (2..k); empty for plain decoding."""
    drafts_proposed: list[int] = field(default_factory=list)
    """Per drafting head: drafts placed in a verification block."""
    drafts_reached: list[int] = field(default_factory=list)
    """Per drafting head: drafts whose predecessors in the block were all accepted, so they were judged."""
    drafts_accepted: list[int] = field(default_factory=list)
    """Per drafting head: drafts accepted."""
    acceptance_per_head: list[float] = field(default_factory=list)
    """Per drafting head: accepted / reached, the acceptance rate given that the head's turn came."""
    seconds: float = 0.0
    """Wall-clock time of the call, prefill included."""
    tokens_per_s: float = 0.0
    """new_tokens / seconds."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class GenerationResult:
    """What generate() returns: new tokens per row, optional text and logits, and stats."""

    tokens: list[list[int]]
    """New token ids per row, without the prompt and without a final EOS."""
    finish_reasons: list[str]
    """Per row: "eos", "stop" (a stop string appeared; it is kept in tokens and text) or "length"."""
    stats: GenerationStats
    """Counters and speed."""
    text: list[str] | None = None
    """tokenizer.decode(tokens[row]) per row, when a tokenizer was given."""
    logits: list[Tensor] | None = None
    """Per row, (len(tokens[row]), V) next-token logits that produced each token, with return_logits."""


def _check_inputs(
    model,
    prompt_ids,
    max_new_tokens,
    params: SamplingParams,
    speculative,
    stop_strings,
    tokenizer,
    draft_tree,
):
    config = model.config
    if isinstance(prompt_ids, torch.Tensor):
        raise UserError("prompt_ids must be a list of token-id lists, not a tensor: pass tensor.tolist()")
    if not prompt_ids:
        raise UserError("no prompts given")
    for i, prompt in enumerate(prompt_ids):
        if isinstance(prompt, (str, bytes)) or not hasattr(prompt, "__len__"):
            raise UserError(
                f"prompt {i} is {type(prompt).__name__}, not a list of token ids: prompt_ids is a batch, "
                "one list per prompt (encode text with the tokenizer first)"
            )
        if not all(isinstance(t, numbers.Integral) for t in prompt):
            raise UserError(f"prompt {i} holds something other than integer token ids")
        if len(prompt) == 0:
            raise UserError(f"prompt {i} is empty: give at least one token")
        if min(prompt) < 0 or max(prompt) >= config.vocab_size:
            bad = next(t for t in prompt if not 0 <= t < config.vocab_size)
            raise UserError(
                f"prompt {i} has token id {bad} outside the vocabulary 0..{config.vocab_size - 1}"
            )
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    longest = max(len(p) for p in prompt_ids)
    if longest + max_new_tokens > config.max_seq_len:
        raise UserError(
            f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} = {longest + max_new_tokens} "
            f"exceeds the model's context of {config.max_seq_len} tokens"
        )
    if not math.isfinite(params.temperature) or params.temperature < 0:
        raise UserError(f"temperature must be a finite number >= 0, got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {params.top_p}")
    if params.top_k < 0:
        raise UserError(f"top_k must be >= 0, got {params.top_k}")
    if config.head_offsets[0] != 1:
        raise UserError(
            f"this model has no next-token head (head_offsets {config.head_offsets}); cannot decode"
        )
    if speculative and draft_depth(config) < 2:
        raise UserError(SPECULATIVE_HINT)
    if isinstance(stop_strings, str):
        raise UserError("stop_strings must be a list of strings, not one string")
    if stop_strings and not all(stop_strings):
        raise UserError("a stop string is empty: every stop string needs at least one character")
    if stop_strings and tokenizer is None:
        raise UserError("stop strings need a tokenizer to decode the generated tokens")
    if draft_tree is not None:
        _check_tree(config, draft_tree, speculative)


def _check_tree(config, tree: DraftTree, speculative) -> None:
    if speculative is False:
        raise UserError("a draft tree is a way of speculating: drop --no-speculative or the tree")
    if max(tree.widths()) > config.vocab_size:
        raise UserError(
            f"the draft tree tries {max(tree.widths())} drafts at one depth but the vocabulary has only "
            f"{config.vocab_size} tokens"
        )
    if config.head_style == "sequential":
        raise UserError(
            "draft trees need parallel heads (transformer or linear); sequential heads draft in a chain"
        )
    if tree.depth > draft_depth(config) - 1:
        raise UserError(
            f"the draft tree is {tree.depth} deep but this model has {draft_depth(config) - 1} drafting "
            f"heads (offsets 2..{draft_depth(config)}); use at most that many widths"
        )


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _forward_block(model, tokens_BT: Tensor, pos_BT: Tensor, n_parallel_heads: int):
    """Trunk and next-token head over a block: (trunk output, next-token logits, parallel draft heads' states)."""
    rope = model.rope_context(tokens_BT, pos_BT)
    return _forward_heads(model, tokens_BT, rope, n_parallel_heads)


def _forward_tree(model, tokens_BT: Tensor, slots_BT: Tensor, rope_pos_BT: Tensor, mask_B1TS, n_heads: int):
    """`_forward_block` over the nodes of a draft tree, each attending to its ancestors only."""
    rope = model.rope_context(tokens_BT, slots_BT, rope_pos_BT=rope_pos_BT, mask_B1TS=mask_B1TS)
    return _forward_heads(model, tokens_BT, rope, n_heads)


def _forward_heads(model, tokens_BT: Tensor, rope, n_parallel_heads: int):
    h_BTD = model.trunk_forward(tokens_BT, rope)
    logits_BTV = model.logits(model.head_forward(0, h_BTD, rope))
    states = [model.head_forward(i, h_BTD, rope) for i in range(1, n_parallel_heads + 1)]
    return h_BTD, logits_BTV, states


COMPILE_CACHE_BUCKET = 256
"""With compile, KV caches are a multiple of this long (or the whole context)."""


def cache_length(longest_prompt: int, max_new_tokens: int, max_seq_len: int, compile: bool) -> int:
    """Positions of the KV cache for a call; compiled calls round up, so other lengths reuse the graph."""
    length = longest_prompt + max_new_tokens
    if compile:
        length = min(-(-length // COMPILE_CACHE_BUCKET) * COMPILE_CACHE_BUCKET, max_seq_len)
    return length


COMPILE_RECOMPILE_LIMIT = 64
"""Compiled decoding steps kept per process (each batch size, block size and cache length is one)."""


@functools.cache
def _compiled_step(device_type: str):
    """The decoding steps (chain, tree) compiled once per process, so repeated generate() calls reuse them.

    On CUDA "reduce-overhead" replays the step as a CUDA graph, as gpt-fast does; the static KV cache is
    updated in place inside it. Shapes are static within a call (batch, block, cache length).
    """
    mode = "reduce-overhead" if device_type == "cuda" else None
    dynamo_config = torch._dynamo.config
    # Named cache_size_limit before torch 2.7.
    limit_name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"

    def compiled(step):
        compiled_step = torch.compile(step, dynamic=False, fullgraph=True, mode=mode)

        def run(*args):
            # One graph per (batch, block, cache length): more than dynamo's default of 8 per function.
            with dynamo_config.patch({limit_name: COMPILE_RECOMPILE_LIMIT}):
                return compiled_step(*args)

        return run

    return compiled(_forward_block), compiled(_forward_tree)


class _Rows:
    """Per-row host-side bookkeeping: accepted tokens, stop conditions and streaming."""

    def __init__(self, n_rows, max_new_tokens, eos_id, stop_strings, tokenizer, on_tokens, keep_logits):
        self.tokens: list[list[int]] = [[] for _ in range(n_rows)]
        self.logits: list[list[Tensor]] = [[] for _ in range(n_rows)]
        self.reasons = ["length"] * n_rows
        self.done = [max_new_tokens == 0] * n_rows
        self.generated = [0] * n_rows  # tokens generated, a final EOS included
        self.max_new_tokens, self.eos_id = max_new_tokens, eos_id
        self.stop_strings, self.tokenizer, self.on_tokens = list(stop_strings or []), tokenizer, on_tokens
        self.keep_logits = keep_logits

    def add(self, row: int, new: list[int], logits_TV: Tensor | None) -> None:
        """Append a step's accepted tokens to a row, cut at EOS or a stop string, and stream them."""
        hit_eos = self.eos_id is not None and self.eos_id in new
        if hit_eos:
            new = new[: new.index(self.eos_id)]
        kept = self._cut_at_stop(row, new) if self.stop_strings and new else None
        if kept is not None:
            new = new[:kept]
            self.done[row], self.reasons[row] = True, "stop"
        elif hit_eos:
            self.done[row], self.reasons[row] = True, "eos"
            self.generated[row] += 1
        self.generated[row] += len(new)
        self.tokens[row].extend(new)
        if self.keep_logits and logits_TV is not None:
            self.logits[row].append(logits_TV[: len(new)].float().cpu())
        if len(self.tokens[row]) >= self.max_new_tokens:
            self.done[row] = True
        if self.on_tokens is not None and new:
            self.on_tokens(row, new)

    def _cut_at_stop(self, row: int, new: list[int]) -> int | None:
        """Number of `new` tokens to keep so the text ends with the first stop string, or None."""
        old = self.tokens[row]
        longest = max(len(s) for s in self.stop_strings)
        # A stop string can start at most `longest` characters before the old text's end.
        start = max(len(self.tokenizer.decode(old)) - longest, 0)
        if not any(s in self.tokenizer.decode(old + new)[start:] for s in self.stop_strings):
            return None
        for kept in range(1, len(new) + 1):
            if any(s in self.tokenizer.decode(old + new[:kept])[start:] for s in self.stop_strings):
                return kept
        return len(new)


@torch.no_grad()
def generate(
    model,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    speculative: bool | None = None,
    eos_id: int | None = None,
    seed: int | None = None,
    stop_strings: Sequence[str] | None = None,
    tokenizer=None,
    on_tokens: Callable[[int, list[int]], None] | None = None,
    return_logits: bool = False,
    compile: bool = False,
    draft_tree: DraftTree | None = None,
) -> GenerationResult:
    """Continue each prompt (a list of token ids) by up to `max_new_tokens` tokens.

    temperature 0 is greedy decoding; otherwise tokens are sampled from softmax(logits / temperature)
    restricted by `top_k` and `top_p`, reproducibly when `seed` is given. `speculative=None` drafts with
    the extra heads whenever the model has heads with offsets 1, 2, ... k for k > 1, True insists, False
    never drafts. Greedy speculative decoding returns exactly the tokens of plain greedy decoding (up to
    floating-point ties); speculative sampling draws from exactly the same distribution as plain sampling,
    though not the same tokens for a given seed.

    `draft_tree` (parallel heads) verifies a tree of several drafts per future position in each forward
    pass instead of one chain, greedy or sampled, with the same guarantees; see `multitoken.draft_tree`.

    A row ends at `eos_id` (not included in its tokens), after a stop string (kept; needs `tokenizer`),
    or after max_new_tokens. `on_tokens(row, new_ids)` is called as tokens are accepted, for streaming.
    With `compile`, the decoding step is compiled with torch.compile (inductor; CUDA graphs on a GPU).
    The first call of each shape compiles (tens of seconds); cache lengths are rounded up to a multiple
    of COMPILE_CACHE_BUCKET so that later calls with other prompt lengths reuse the compiled step.
    """
    start_time = time.perf_counter()
    params = SamplingParams(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
    _check_inputs(model, prompt_ids, max_new_tokens, params, speculative, stop_strings, tokenizer, draft_tree)
    config = model.config
    depth = draft_depth(config) if speculative is not False else 1
    device = _model_device(model)
    tree = draft_tree.tensors(device) if draft_tree is not None else None
    if draft_tree is not None:
        depth = draft_tree.depth + 1
    n_drafts = depth - 1
    sequential = config.head_style == "sequential"
    n_parallel = 0 if sequential else n_drafts
    generator = None
    if not params.greedy:
        generator = torch.Generator(device=device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)

    B = len(prompt_ids)
    rows = _Rows(B, max_new_tokens, eos_id, stop_strings, tokenizer, on_tokens, return_logits)
    stats = GenerationStats(
        draft_offsets=list(range(2, depth + 1)),
        drafts_proposed=[0] * n_drafts,
        drafts_reached=[0] * n_drafts,
        drafts_accepted=[0] * n_drafts,
    )
    # Drafts a verification pass holds per drafting head: one in a chain, the tree's nodes at that depth.
    drafts_per_head = [1] * n_drafts if tree is None else [len(level) for level in tree.levels]
    forward, forward_tree = _forward_block, _forward_tree
    if compile:
        forward, forward_tree = _compiled_step(device.type)

    lengths = [len(p) for p in prompt_ids]
    longest = max(lengths)
    cache_len = cache_length(longest, max_new_tokens, config.max_seq_len, compile)
    # Real positions stay below cache_len - 1 (see the step below); padding writes to that spare slot.
    scratch = cache_len - 1
    # A tree's nodes occupy one slot each past a row's committed length.
    extra_slots = 0 if tree is None else draft_tree.n_nodes
    model.setup_caches(B, cache_len, extra_slots=extra_slots)
    try:
        if max_new_tokens > 0:
            # ---- prefill: every row at its own positions, padding sent to the spare slot ----
            tokens_BT = torch.zeros(B, longest, dtype=torch.long, device=device)
            for b, prompt in enumerate(prompt_ids):
                tokens_BT[b, : len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)
            length_B = torch.tensor(lengths, device=device)
            arange_T = torch.arange(longest, device=device)
            pos_BT = torch.where(arange_T < length_B.unsqueeze(1), arange_T, scratch)
            rope = model.rope_context(tokens_BT, pos_BT)
            h_BTD = model.trunk_forward(tokens_BT, rope)
            z_BTD = model.head_forward(0, h_BTD, rope)  # over every position, to fill its cache
            last_B = length_B - 1
            logits_BV = model.logits(z_BTD[torch.arange(B, device=device), last_B])
            next_B, _ = choose(logits_BV, params, generator)
            if tree is None:
                drafts_BJ, q_BJV = propose_drafts(
                    model, h_BTD, rope, tokens_BT, last_B, next_B, depth, params, generator
                )
            else:
                draft_logits_BJV = parallel_draft_logits(model, h_BTD, rope, last_B, depth)
            stats.forward_passes, stats.row_forwards = 1, B
            for b, token in enumerate(next_B.tolist()):
                rows.add(b, [token], logits_BV[b : b + 1])
            pos_B = length_B.clone()  # each row's pending token (next_B) goes at this position

        # ---- decode: block = [pending token, drafts...], verified by the next-token head ----
        arange_T = torch.arange(depth, device=device)
        while not all(rows.done):
            active = [not d for d in rows.done]
            budget = [max_new_tokens - len(t) if a else 0 for t, a in zip(rows.tokens, active, strict=True)]
            # A row emits at most n_block tokens this step, so it never overshoots max_new_tokens.
            n_block_B = torch.tensor([min(depth, r) for r in budget], device=device)
            n_drafts_B = (n_block_B - 1).clamp(min=0)
            if tree is None:
                block_BT = torch.cat([next_B.unsqueeze(1), drafts_BJ], dim=1)
                pos_BT = torch.where(
                    arange_T < n_block_B.unsqueeze(1), pos_B.unsqueeze(1) + arange_T, scratch
                )
                h_BTD, logits_BTV, states = forward(model, block_BT, pos_BT, n_parallel)
                if params.greedy:
                    n_acc_B, next_B = accept_greedy(logits_BTV, drafts_BJ, n_drafts_B)
                else:
                    n_acc_B, next_B = accept_sampled(
                        logits_BTV, drafts_BJ, q_BJV, n_drafts_B, params, generator
                    )
                candidates_BJ, step_logits_BTV = drafts_BJ, logits_BTV
                if n_drafts:
                    # Only sequential heads run again here; parallel heads' states came with the forward pass.
                    rope = model.rope_context(block_BT, pos_BT) if sequential else None
                    drafts_BJ, q_BJV = propose_drafts(
                        model, h_BTD, rope, block_BT, n_acc_B, next_B, depth, params, generator, states
                    )
                pos_B = pos_B + n_acc_B + 1
            else:
                nodes_BT = tree_candidates(next_B, draft_logits_BJV, tree)
                placement = tree_positions(pos_B, tree, model.cache_len(), config.max_seq_len)
                h_BTD, logits_BTV, states = forward_tree(model, nodes_BT, *placement, n_drafts)
                if params.greedy:
                    n_acc_B, path_BP, next_B = accept_tree_greedy(logits_BTV, nodes_BT, n_drafts_B, tree)
                else:
                    n_acc_B, path_BP, next_B = accept_tree_sampled(
                        logits_BTV, nodes_BT, n_drafts_B, tree, params, generator
                    )
                commit_path(model, pos_B, path_BP)
                draft_logits_BJV = parallel_draft_logits(model, h_BTD, None, path_BP[:, -1], depth, states)
                candidates_BJ = nodes_BT.gather(1, path_BP)[:, 1:]
                step_logits_BTV = (
                    logits_BTV[torch.arange(B, device=device).unsqueeze(1), path_BP]
                    if return_logits
                    else logits_BTV
                )
                # Finished rows keep their length, so their scratch nodes stay inside the cache.
                pos_B = pos_B + (n_acc_B + 1) * (n_block_B > 0)
            stats.forward_passes += 1
            # One device-to-host copy per step.
            host = torch.cat([n_acc_B.unsqueeze(1), next_B.unsqueeze(1), candidates_BJ], dim=1).tolist()
            n_acc, bonus, old = [r[0] for r in host], [r[1] for r in host], [r[2:] for r in host]
            for b in range(B):
                if not active[b]:
                    continue
                stats.row_forwards += 1
                for j in range(min(depth, budget[b]) - 1):
                    stats.drafts_proposed[j] += drafts_per_head[j]
                    stats.drafts_reached[j] += j <= n_acc[b]
                    stats.drafts_accepted[j] += j < n_acc[b]
                rows.add(b, [*old[b][: n_acc[b]], bonus[b]], step_logits_BTV[b, : n_acc[b] + 1])
    finally:
        model.clear_caches()

    stats.new_tokens = sum(rows.generated)
    stats.tokens_per_forward = stats.new_tokens / max(stats.row_forwards, 1)
    stats.acceptance_per_head = [
        a / r if r else 0.0 for a, r in zip(stats.drafts_accepted, stats.drafts_reached, strict=True)
    ]
    stats.seconds = time.perf_counter() - start_time
    stats.tokens_per_s = stats.new_tokens / stats.seconds if stats.seconds > 0 else 0.0
    text = [tokenizer.decode(t) for t in rows.tokens] if tokenizer is not None else None
    logits = (
        [torch.cat(chunks) if chunks else torch.empty(0) for chunks in rows.logits] if return_logits else None
    )
    return GenerationResult(rows.tokens, rows.reasons, stats, text, logits)


def merge_stats(parts: Sequence[GenerationStats]) -> GenerationStats:
    """Stats of several generate() calls (e.g. batches of one prompt file) taken together."""
    total = GenerationStats(draft_offsets=list(parts[0].draft_offsets) if parts else [])
    n = len(total.draft_offsets)
    total.drafts_proposed, total.drafts_reached, total.drafts_accepted = [0] * n, [0] * n, [0] * n
    for part in parts:
        total.new_tokens += part.new_tokens
        total.forward_passes += part.forward_passes
        total.row_forwards += part.row_forwards
        total.seconds += part.seconds
        for j in range(n):
            total.drafts_proposed[j] += part.drafts_proposed[j]
            total.drafts_reached[j] += part.drafts_reached[j]
            total.drafts_accepted[j] += part.drafts_accepted[j]
    total.tokens_per_forward = total.new_tokens / max(total.row_forwards, 1)
    total.acceptance_per_head = [
        a / r if r else 0.0 for a, r in zip(total.drafts_accepted, total.drafts_reached, strict=True)
    ]
    total.tokens_per_s = total.new_tokens / total.seconds if total.seconds > 0 else 0.0
    return total


def format_stats(stats: GenerationStats) -> str:
    """A few human-readable lines."""
    lines = [
        f"new tokens: {stats.new_tokens} in {stats.seconds:.2f}s ({stats.tokens_per_s:.1f} tokens/s)",
        f"forward passes: {stats.forward_passes} (tokens per forward per row: {stats.tokens_per_forward:.2f})",
    ]
    if stats.draft_offsets:
        rates = ", ".join(
            f"+{o}: {r:.2f}" for o, r in zip(stats.draft_offsets, stats.acceptance_per_head, strict=True)
        )
        lines.append(f"draft acceptance per head (given the previous drafts were accepted): {rates}")
    return "\n".join(lines)


class _TextStream:
    """Prints the prompt, then the row's text as its tokens arrive, holding back an incomplete character."""

    def __init__(self, tokenizer, out, prompt: str) -> None:
        self.tokenizer, self.out, self.prompt = tokenizer, out, prompt
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, row: int, new_ids: list[int]) -> None:
        if self.prompt is not None:  # printed only once generation has started (input was valid)
            self.out.write(self.prompt)
            self.prompt = None
        self.ids.extend(new_ids)
        text = self.tokenizer.decode(self.ids)
        end = len(text.rstrip("\ufffd"))
        if end > self.printed:
            self.out.write(text[self.printed : end])
            self.out.flush()
            self.printed = end

    def finish(self) -> None:
        text = self.tokenizer.decode(self.ids)
        self.out.write((self.prompt or "") + text[self.printed :] + "\n")
        self.out.flush()


def _read_prompts(prompt: str | None, prompt_file: str | None) -> list[str]:
    if (prompt is None) == (prompt_file is None):
        raise UserError("give exactly one of --prompt and --prompt-file")
    if prompt is not None:
        return [prompt]
    path = Path(prompt_file)
    if not path.is_file():
        raise UserError(f"prompt file {path} does not exist")
    prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompt file {path} has no non-blank lines")
    return prompts


def generate_cli(
    checkpoint: str,
    prompt: str | None = None,
    prompt_file: str | None = None,
    max_new_tokens: int = 200,
    batch_size: int = 1,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    speculative: bool | None = None,
    seed: int | None = None,
    stats: bool = False,
    stats_json: str | None = None,
    device: str = "auto",
    stop: list[str] | None = None,
    compare_plain: bool = False,
    draft_tree: str | None = None,
    compile: bool = False,
) -> None:
    """Continue text prompts with a trained checkpoint, streaming the text as it is accepted.

    Decoding is greedy unless --temperature > 0 (then --top-k / --top-p / --seed apply). Models trained
    with --n-future > 1 decode self-speculatively by default: the extra heads draft tokens that the
    next-token head verifies, giving exactly the greedy output in fewer forward passes (or, when
    sampling, exactly the same distribution); --no-speculative turns it off.

    Args:
        checkpoint: checkpoint or run directory.
        prompt: the text to continue.
        prompt_file: a text file with one prompt per line (blank lines skipped), decoded in batches.
        max_new_tokens: most tokens to generate per prompt.
        batch_size: prompts decoded together, with --prompt-file.
        temperature: 0 for greedy decoding, else the sampling temperature.
        top_k: sample among the k most likely tokens only (0: all).
        top_p: sample among the most likely tokens holding this much probability (1: all).
        speculative: draft with the extra heads (default: whenever the model has them).
        seed: random seed for sampling.
        stats: print tokens per forward, acceptance per head and speed to stderr.
        stats_json: write the stats as JSON to this file.
        device: cpu, cuda, cuda:N or auto.
        stop: stop strings, each taken whole (commas included); a continuation ends after the first
            one it produces.
        compare_plain: also decode without drafting; report the speedup and whether the outputs match.
        draft_tree: verify a tree of drafts per step, given as widths per depth: 4,2,1
            tries the top 4 drafts of the +2 head, after each the top 2 of the +3 head, then the top +4.
        compile: compile the decoding step with torch.compile: the first batch waits tens of seconds
            to compile, later steps run faster (CUDA graphs on a GPU).
    """
    from multitoken.checkpoint import load_checkpoint

    texts = _read_prompts(prompt, prompt_file)
    tree = DraftTree.parse(draft_tree) if draft_tree is not None else None
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    model, tokenizer = load_checkpoint(checkpoint, device=resolve_device(device))
    if tokenizer is None:
        raise UserError(f"checkpoint {checkpoint} has no tokenizer, so text prompts cannot be encoded")
    model.eval()
    parts: list[GenerationStats] = []
    plain_parts: list[GenerationStats] = []
    same_output = True
    for first in range(0, len(texts), batch_size):
        batch = texts[first : first + batch_size]
        ids = [tokenizer.encode(t) for t in batch]
        stream = _TextStream(tokenizer, sys.stdout, batch[0]) if len(batch) == 1 else None

        def run(speculative_mode, tree_mode, on_tokens=None, ids=ids, first=first):
            return generate(
                model,
                ids,
                max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                speculative=speculative_mode,
                eos_id=tokenizer.eos_id,
                seed=None if seed is None else seed + first,
                stop_strings=stop,
                tokenizer=tokenizer,
                on_tokens=on_tokens,
                draft_tree=tree_mode,
                compile=compile,
            )

        result = run(speculative, tree, stream)
        separator = "---\n" if len(texts) > 1 else ""
        if stream is not None:
            stream.finish()
            sys.stdout.write(separator)
        else:
            for text, completion in zip(batch, result.text, strict=True):
                sys.stdout.write(f"{text}{completion}\n{separator}")
        parts.append(result.stats)
        if compare_plain:
            plain = run(False, None)
            plain_parts.append(plain.stats)
            same_output &= plain.tokens == result.tokens
    total = merge_stats(parts)
    if stats:
        print(format_stats(total), file=sys.stderr)
    if compare_plain:
        plain_total = merge_stats(plain_parts)
        speedup = plain_total.seconds / total.seconds if total.seconds > 0 else float("nan")
        same = "identical" if same_output else "different (expected when sampling)"
        print(
            f"plain decoding: {plain_total.tokens_per_s:.1f} tokens/s; speedup over plain: {speedup:.2f}x; "
            f"outputs {same}",
            file=sys.stderr,
        )
    if stats_json:
        record = {
            "checkpoint": str(checkpoint),
            "prompts": len(texts),
            "batch_size": batch_size,
            **total.to_dict(),
        }
        if compare_plain:
            record["plain"] = merge_stats(plain_parts).to_dict()
            record["identical_to_plain"] = same_output
        Path(stats_json).write_text(json.dumps(record, indent=2) + "\n")
