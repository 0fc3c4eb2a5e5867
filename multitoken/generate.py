"""Batched decoding with a static KV cache: greedy, sampling, and self-speculative decoding.

`generate()` drives the decoding steps of `multitoken.decoding` for a fixed batch: one prefill, then one
step per forward pass until every row is done. Every row keeps its own cache position, so prompts of
different lengths need no left padding and rows accept different numbers of drafted tokens per step.
By default (`speculative=None`) a `DraftPolicy` picks each step's draft plan from measured step costs
and running acceptance: plain decoding where drafting does not pay, chains or trees where it does.

Dimension letters: B batch, T block positions, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from multitoken.decoding import DecodeBatch, DraftPlan, StepRecord, decode_step, prefill
from multitoken.draft_policy import DraftPolicy
from multitoken.draft_tree import DraftTree
from multitoken.errors import UserError
from multitoken.row_output import RowOutput
from multitoken.sampling import SamplingParams
from multitoken.speculative import draft_depth
from multitoken.step_costs import StepCosts, batch_bucket, step_clock

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
    """Wall-clock time of the call, prefill included (the cost calibration excluded)."""
    tokens_per_s: float = 0.0
    """new_tokens / seconds."""
    plans: dict[str, int] = field(default_factory=dict)
    """Decoding steps run under each draft plan ("plain", "chain3", "tree8", ...)."""
    calibration_seconds: float = 0.0
    """Time spent measuring step costs on first use of this machine and model shape (not in seconds)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def count_drafts(
        self, proposed_J: Sequence[int], reached_J: Sequence[int], accepted_J: Sequence[int]
    ) -> None:
        """Add a step's (or a call's) draft counts, per drafting head."""
        for j in range(len(reached_J)):
            self.drafts_proposed[j] += proposed_J[j]
            self.drafts_reached[j] += reached_J[j]
            self.drafts_accepted[j] += accepted_J[j]

    def derive(self) -> GenerationStats:
        """Fill in the fields computed from the counters: tokens_per_forward, acceptance_per_head and
        tokens_per_s."""
        self.tokens_per_forward = self.new_tokens / max(self.row_forwards, 1)
        self.acceptance_per_head = [
            a / r if r else 0.0 for a, r in zip(self.drafts_accepted, self.drafts_reached, strict=True)
        ]
        self.tokens_per_s = self.new_tokens / self.seconds if self.seconds > 0 else 0.0
        return self


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
    if speculative not in (None, True, False):
        raise UserError(f"speculative must be None (adaptive), True or False, got {speculative!r}")
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
    if draft_depth(config) < 2:
        raise UserError(f"a draft tree needs drafting heads: {SPECULATIVE_HINT}")
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


COMPILE_CACHE_BUCKET = 256
"""With compile, KV caches are a multiple of this long (or the whole context)."""


def cache_length(longest_prompt: int, max_new_tokens: int, max_seq_len: int, compile: bool) -> int:
    """Positions of the KV cache for a call; compiled calls round up, so other lengths reuse the graph."""
    length = longest_prompt + max_new_tokens
    if compile:
        length = min(-(-length // COMPILE_CACHE_BUCKET) * COMPILE_CACHE_BUCKET, max_seq_len)
    return length


CALIBRATION_CACHE_LEN = 256
"""Cache positions of the calibration steps (attention cost grows with it; a typical length)."""


def adaptive_policy(model, batch_size: int, costs: StepCosts | None = None) -> DraftPolicy:
    """A DraftPolicy for this model, with step costs loaded from the cache file or measured now."""
    config = model.config
    policy = DraftPolicy(
        draft_depth(config) - 1,
        costs if costs is not None else StepCosts.load(model),
        trees=config.head_style != "sequential",
        device=next(model.parameters()).device,
        vocab_size=config.vocab_size,
    )
    policy.calibration_seconds = calibrate_for(policy, model, batch_size)
    return policy


def calibrate_for(policy: DraftPolicy, model, batch_size: int) -> float:
    """Measure (and cache) the policy's step costs at this batch size and every smaller batch bucket
    (a batch shrinks as its rows finish) where they are unknown; the seconds spent."""
    plans = policy.candidate_plans()
    names = [p.name for p in plans]
    cache_len = min(CALIBRATION_CACHE_LEN, model.config.max_seq_len)
    seconds, bucket = 0.0, batch_bucket(batch_size)
    while bucket >= 1:
        if not policy.costs.knows(names, bucket):
            seconds += policy.costs.calibrate(model, bucket, plans, cache_len)
        bucket //= 2
    if seconds:
        policy.costs.save(model)
    return seconds


_SHARED_POLICIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def shared_policy(model, batch_size: int) -> tuple[DraftPolicy, float]:
    """The policy unseeded generate() calls on this model share, so what one call learned (acceptance,
    real step costs, how long since drafting paid) carries over to the next: (policy, calibration
    seconds spent now)."""
    policy = _SHARED_POLICIES.get(model)
    if policy is None:
        policy = _SHARED_POLICIES[model] = adaptive_policy(model, batch_size)
        return policy, policy.calibration_seconds
    policy.new_text()
    return policy, calibrate_for(policy, model, batch_size)


def _fixed_plan(model, speculative, draft_tree: DraftTree | None, device) -> DraftPlan | None:
    """The one plan of a forced mode, or None for the adaptive policy."""
    if speculative is False or draft_depth(model.config) < 2:
        return DraftPlan.chain(0)
    if draft_tree is not None:
        return DraftPlan.of_tree(draft_tree.tensors(device), f"tree{draft_tree.n_nodes - 1}")
    if speculative is True:
        return DraftPlan.chain(draft_depth(model.config) - 1)
    return None


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
    policy: DraftPolicy | None = None,
) -> GenerationResult:
    """Continue each prompt (a list of token ids) by up to `max_new_tokens` tokens.

    temperature 0 is greedy decoding; otherwise tokens are sampled from softmax(logits / temperature)
    restricted by `top_k` and `top_p`, reproducibly when `seed` is given.

    `speculative=None` (the default) lets a DraftPolicy choose each step's plan among plain decoding,
    chains of the drafting heads and draft trees, by expected tokens per second on this machine (step
    costs measured once and cached, see `multitoken.step_costs`); `True` always drafts with every
    drafting head (a chain, or `draft_tree`), `False` never drafts. Every plan is lossless: greedy
    output is token for token that of plain greedy decoding (up to floating-point ties), and sampling
    draws from exactly the distribution of plain sampling, though not the same tokens for a given seed.
    Unseeded calls on a model share one policy, so what one call learned carries over to the next;
    a seeded call starts from a fresh one. `policy` passes a DraftPolicy of your own.

    A row ends at `eos_id` (not included in its tokens), after a stop string (kept; needs `tokenizer`),
    or after max_new_tokens. `on_tokens(row, new_ids)` is called as tokens are accepted, for streaming.
    With `compile`, the verification pass is compiled with torch.compile (inductor; CUDA graphs on a
    GPU). The first call of each shape compiles (tens of seconds); cache lengths are rounded up to a
    multiple of COMPILE_CACHE_BUCKET so that later calls with other prompt lengths reuse it.
    """
    params = SamplingParams(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
    _check_inputs(model, prompt_ids, max_new_tokens, params, speculative, stop_strings, tokenizer, draft_tree)
    device = next(model.parameters()).device
    B = len(prompt_ids)
    fixed = _fixed_plan(model, speculative, draft_tree, device)
    calibration = 0.0
    if fixed is None and policy is None:
        # A seeded call starts from a fresh policy, so its plans (and so its samples) depend on
        # nothing but the seed; unseeded calls share the model's policy and what it has learned.
        if seed is None:
            policy, calibration = shared_policy(model, B)
        else:
            policy = adaptive_policy(model, B)
            calibration = policy.calibration_seconds
    start_time = time.perf_counter()
    clock = step_clock(device)  # what the step costs were measured with
    generator = None
    if not params.greedy:
        generator = torch.Generator(device=device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
    n_heads = fixed.n_heads if fixed is not None else draft_depth(model.config) - 1
    if policy is not None:
        policy.static_batch = True  # this call's rows end together, with the slowest
    if policy is not None and not policy.drafting_could_pay(B):
        # No plan could beat plain decoding here even if every draft were accepted: decode plainly,
        # without the policy's work per step (the stats still name the model's heads, unused).
        fixed, policy = DraftPlan.chain(0), None
    rows = [RowOutput(max_new_tokens, eos_id, stop_strings, tokenizer, return_logits) for _ in range(B)]
    stats = GenerationStats(
        draft_offsets=list(range(2, n_heads + 2)),
        drafts_proposed=[0] * n_heads,
        drafts_reached=[0] * n_heads,
        drafts_accepted=[0] * n_heads,
    )
    plans: Counter[str] = Counter()
    cache_len = cache_length(
        max(len(p) for p in prompt_ids), max_new_tokens, model.config.max_seq_len, compile
    )
    plans_used = [fixed] if fixed is not None else policy.candidate_plans()
    largest_tree = max((p.block for p in plans_used if p.tree is not None), default=0)
    batch = DecodeBatch(
        model,
        B,
        cache_len,
        extra_slots=largest_tree,
        compile=compile,
        generator=generator,
    )
    # Forced drafting fills the cached drafting heads over the prompt at once; the adaptive policy
    # lets them catch up lazily, when (and if) it first drafts.
    batch.sampling, batch.n_rows, batch.prefill_heads = params, B, fixed is not None and fixed.n_heads > 0
    batch.track_ranks = policy is not None and policy.trees
    if policy is not None:  # probe by scoring guesses in plain steps where that is exact and cheap
        policy.shadow_probes = batch.shadow_probes_exact(B)
    try:
        if max_new_tokens > 0:
            _emit(rows, prefill(batch, prompt_ids, keep_logits=return_logits), on_tokens)
            stats.forward_passes, stats.row_forwards = 1, B
        live = _still_running(batch, rows, list(range(B)))  # batch row i decodes rows[live[i]]
        while live:
            budget = [rows[r].budget for r in live]
            plan = fixed if fixed is not None else policy.choose(len(live))
            step_start = clock()
            record = decode_step(batch, plan, budget, keep_logits=return_logits)
            if policy is not None:
                # Timings steer the plans; with a seed the plans must not depend on them.
                policy.observe(record, len(live), clock() - step_start if seed is None else None)
            plans[plan.name] += 1
            stats.forward_passes += 1
            stats.row_forwards += sum(r > 0 for r in budget)
            if not plan.shadow:  # a shadow probe's guesses are not drafts
                stats.count_drafts(record.proposed_J, record.reached_J, record.accepted_J)
            _emit(rows, record, on_tokens, live)
            live = _still_running(batch, rows, live)
    finally:
        batch.close()

    stats.new_tokens = sum(row.generated for row in rows)
    stats.plans = dict(plans)
    stats.calibration_seconds = calibration
    stats.seconds = time.perf_counter() - start_time
    stats.derive()
    tokens = [row.tokens for row in rows]
    text = [tokenizer.decode(t) for t in tokens] if tokenizer is not None else None
    logits = (
        [torch.cat(row.logits) if row.logits else torch.empty(0) for row in rows] if return_logits else None
    )
    return GenerationResult(tokens, [row.reason for row in rows], stats, text, logits)


def _emit(rows: list[RowOutput], record: StepRecord, on_tokens, live: Sequence[int] | None = None) -> None:
    """Hand a step's committed tokens to each row (batch row b decodes rows[live[b]]), and stream what
    the rows keep."""
    for b, new in enumerate(record.tokens):
        row = live[b] if live is not None else b
        if not new or rows[row].done:
            continue
        logits_TV = record.logits_BTV[b] if record.logits_BTV is not None else None
        kept = rows[row].add(new, logits_TV)
        if on_tokens is not None and kept:
            on_tokens(row, kept)


def _still_running(batch: DecodeBatch, rows: list[RowOutput], live: list[int]) -> list[int]:
    """The rows of `live` not yet done, the done ones dropped from the batch.

    A step costs what its batch rows cost, done or not, and a static batch runs until its slowest row
    is done: with drafting, the least predictable rows finish long after the rest, and would decode at
    the whole batch's price. The last running rows fill the holes, so each leaving row moves one row's
    caches at most. Compiled steps keep their batch (static shapes), until every row is done.
    """
    done = {i for i, r in enumerate(live) if rows[r].done}
    if not done or (batch.compiled and len(done) < len(live)):
        return live
    n = len(live) - len(done)
    movers = iter(i for i in range(n, len(live)) if i not in done)  # running rows past the new end
    keep = [next(movers) if i in done else i for i in range(n)]
    if n:
        batch.keep_rows(keep)
    return [live[i] for i in keep]


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
        total.count_drafts(part.drafts_proposed, part.drafts_reached, part.drafts_accepted)
    total.plans = dict(sum((Counter(part.plans) for part in parts), Counter()))
    total.calibration_seconds = sum(part.calibration_seconds for part in parts)
    return total.derive()


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
    if stats.plans:
        steps = sum(stats.plans.values())
        shares = ", ".join(f"{name} {count / steps:.0%}" for name, count in sorted(stats.plans.items()))
        lines.append(f"decoding steps by draft plan: {shares}")
    return "\n".join(lines)


__all__ = ["GenerationResult", "GenerationStats", "format_stats", "generate", "merge_stats"]
