"""Adaptive speculation: each step, the draft plan with the most expected tokens per second.

The candidates are plain decoding, a chain of the first k drafting heads (k = 1 .. J), and, for
parallel heads, sparse draft trees of a few sizes. A plan's value is

    expected tokens per step / seconds per step,

the seconds from `StepCosts` (measured on this machine), the expected tokens from running acceptance
statistics, decayed so that a change of text is followed within tens of steps:

    chain of k drafts:  1 + sum_{j=1..k} prod_{d<=j} a_d          a_d = P(draft d accepted | d reached)
    tree:               1 + sum_{nodes} prod_{d} h_{d, r_d}        h_{d,r} = P(the head's r-th guess is
                                                                            right | depth d reached)

(the tree formula assumes the heads err independently, as Medusa's sparse trees do).

Deciding. Drafting must beat plain decoding by DRAFT_MARGIN, not by noise in the estimates. Once it
does, the choice among drafting plans is optimistic about the deeper heads in proportion to how
little they have been seen (EXPLORE), so each gets tried rather than sitting at the prior. A step
ages only the statistics of the heads it used. Once a plan has a few timed steps, their measured
cost replaces the calibrated one, until the plan has not run for OBSERVED_MAX_AGE timed steps.

Probing. While plain decoding wins, and some drafting plan could win if its drafts were all
accepted, the policy probes now and then, at intervals that double while
probing finds nothing (FIRST_PROBE_INTERVAL up to MAX_PROBE_INTERVAL steps, times a one-draft
chain's cost relative to a plain step, or a shadow probe's extra cost). A probe is a one-draft chain or, where the heads keep no cache and
decoding is greedy, a shadow step: a plain step that also scores the first head's guess against
the token it chooses, the same evidence at a fraction of the cost. Probing goes on while a
one-draft chain would pay for itself, so one lucky guess is not all the evidence a predictable
stretch of text gets. New text (`new_text`) is probed at its first step where probes are cheap
(NEW_TEXT_PROBE_MAX_EXTRA), and the statistics of earlier texts then weigh less (NEW_TEXT_WEIGHT):
predictability varies more between texts than within one. A lone row's probe schedule then starts
afresh; a static batch of several rows keeps its own.

Every plan is lossless, so the choice changes speed only, never the output.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from multitoken.decoding import RANKS_TRACKED, DraftPlan, StepRecord
from multitoken.draft_tree import DraftTree, sparse_tree
from multitoken.step_costs import StepCosts

DECAY = 0.9
"""Weight the statistics keep per step: about the last 10 steps' worth of rows count."""
PRIOR_RATE = 0.35
"""Acceptance assumed before anything is observed (worth PRIOR_WEIGHT rows, always)."""
PRIOR_WEIGHT = 2.0
DRAFT_MARGIN = 0.2
"""Drafting is chosen (and a probe goes on) only when expected to beat plain decoding by this share:
estimated costs and rates are noisy, switching plans has costs no step timing sees (caches, the
policy's own work), and a wrong choice to draft costs more than a wrong choice not to. At 0.1 the
demo's self-distilled heads lost 12% at batch 32 on a CPU; at 0.2 they break even there."""
STATIC_BATCH_YIELD = 0.7
"""The share of the speed its rows' statistics promise that drafting realized in a static batch of
several rows (generate(), not the server): the batch's time is its slowest row's, and rows that draft
well finish early, leaving the last ones to decode at a small batch's price per row where lockstep
plain decoding kept every row at the whole batch's. Measured on the demo model at batch 8 and 32
(BENCHMARKS.md, fourth pass). Drafting there must beat plain decoding by (1 + DRAFT_MARGIN) / this."""
EXPLORE = 0.5
"""Optimism of the deeper heads' rates, per 1 / sqrt(rows seen) (see `AcceptanceStats.chain_rates`)."""
NEW_TEXT_WEIGHT = 0.3
"""Weight the statistics keep when new text starts: how predictable text is varies more between texts
than within one."""
FIRST_PROBE_INTERVAL = 32
MAX_PROBE_INTERVAL = 256
"""Steps between probes, times the probe's cost (see `DraftPolicy._probe_spacing`); the interval
doubles from FIRST to MAX while probes find nothing."""
NEW_TEXT_PROBE_MAX_EXTRA = 0.5
"""New text is probed at its first step only where a probe costs at most this share of a plain step
beyond the step itself (shadow probes; one-draft chains where a block costs little more than one
position). Costlier probes keep their schedule: the one-draft chain of random `tiny` transformer heads,
whose cache must first catch up on the new prompt, cost 2.8 plain steps on a CPU, and one such probe
per generate() call of 128 tokens cost 1.4% of the time."""
SHADOW_PROBE_EXTRA = 0.25
"""Extra cost of a shadow probe, in plain steps, until its steps have been timed."""
MIN_PROBE_EXTRA = 0.1
TREE_SIZES = (4, 8, 16)
"""Non-root nodes of the sparse trees considered."""
OBSERVED_WINDOW = 32
"""Measured steps kept per plan and batch size."""
OBSERVED_MAX_AGE = 1024
"""Timed steps after which a plan's measured cost, if the plan has not run since, gives way to the
calibrated one again (and its old timings are dropped when it next runs): a burst of noise while a
rarely chosen plan ran would otherwise set its price for good, and with it how often probes come."""
OBSERVED_MIN = 8
"""Measured steps of a plan (and of the plain step) before they replace its calibrated cost: on a
busy CPU one step's time varies by half of itself, so a median of fewer misleads more than the
calibration. A plan's first step at each batch size (kernels warming up to a new shape) is not kept."""
COST_REFRESH_STEPS = 16
"""Timed steps between re-readings of the measured costs."""
TREE_REFRESH_STEPS = 16
"""Steps between rebuilds of the sparse trees from the rank statistics."""


@dataclass
class AcceptanceStats:
    """Decayed counts: per depth, rows that reached it and rows whose draft was accepted there.

    Rates add a fixed prior of PRIOR_WEIGHT rows (PRIOR_RATE at rank 0, a quarter as much per rank
    after), so a depth that is rarely reached is not judged on one or two rows.
    """

    n_heads: int
    chain_reached: list[float] = field(init=False)
    chain_accepted: list[float] = field(init=False)
    rank_reached: list[float] = field(init=False)
    rank_hits: list[list[float]] = field(init=False)

    def __post_init__(self) -> None:
        J = self.n_heads
        self.chain_reached, self.chain_accepted = [0.0] * J, [0.0] * J
        self.rank_reached, self.rank_hits = [0.0] * J, [[0.0] * RANKS_TRACKED for _ in range(J)]

    def scale(self, factor: float) -> None:
        """Multiply every count by `factor`: the rates stay, the weight of their evidence shrinks."""
        for values in (self.chain_reached, self.chain_accepted, self.rank_reached, *self.rank_hits):
            values[:] = [v * factor for v in values]

    def decay(self, depths: int) -> None:
        """Age the counts of the first `depths` depths, those a step just gave new evidence on; the
        deeper heads' counts wait, unaged, for a plan that uses them."""
        for values in (self.chain_reached, self.chain_accepted, self.rank_reached):
            values[:depths] = [v * DECAY for v in values[:depths]]
        for hits in self.rank_hits[:depths]:
            hits[:] = [h * DECAY for h in hits]

    def add(self, record: StepRecord) -> None:
        if record.plan.tree is None:
            for d, (reached, accepted) in enumerate(zip(record.reached_J, record.accepted_J, strict=True)):
                self.chain_reached[d] += reached
                self.chain_accepted[d] += accepted
        for d, hits in enumerate(record.rank_hits_JR):
            self.rank_reached[d] += record.reached_J[d]
            for r, h in enumerate(hits):
                self.rank_hits[d][r] += h

    def chain_rates(self, explore: float = 0.0) -> list[float]:
        """a_d: acceptance of the chain draft at depth d given the drafts before it were accepted.

        With `explore` > 0, the rates of the deeper heads (d >= 2) are optimistic, raised by
        explore / sqrt(rows seen + PRIOR_WEIGHT) (an upper confidence bound), so that a head with
        little evidence gets tried; the first head's rate, which decides between drafting and plain
        decoding, stays as observed.
        """
        rates = []
        for d in range(self.n_heads):
            if self.rank_reached[d] > self.chain_reached[d]:  # rank-0 hits measure the same thing
                hits, reached = self.rank_hits[d][0], self.rank_reached[d]
            else:
                hits, reached = self.chain_accepted[d], self.chain_reached[d]
            rate = (hits + PRIOR_WEIGHT * PRIOR_RATE) / (reached + PRIOR_WEIGHT)
            if d > 0:
                rate = min(1.0, rate + explore / math.sqrt(reached + PRIOR_WEIGHT))
            rates.append(rate)
        return rates

    def rank_rates(self) -> list[list[float]]:
        """h_{d,r}: the r-th guess of the head at depth d is right, given depth d was reached."""
        return [
            [
                (h + PRIOR_WEIGHT * PRIOR_RATE * 0.25**r) / (self.rank_reached[d] + PRIOR_WEIGHT)
                for r, h in enumerate(self.rank_hits[d])
            ]
            for d in range(self.n_heads)
        ]


def expected_chain_tokens(rates: Sequence[float], n_drafts: int) -> float:
    """1 + sum_{j<=k} prod_{d<=j} a_d: tokens a row gains per step from a chain of k drafts."""
    total, survive = 1.0, 1.0
    for a in rates[:n_drafts]:
        survive *= a
        total += survive
    return total


def expected_tree_tokens(rank_rates: Sequence[Sequence[float]], tree: DraftTree) -> float:
    """1 + sum over nodes of the product of its ranks' hit rates."""
    total = 1.0
    for path in tree.paths:
        p = 1.0
        for d, r in enumerate(path):
            p *= rank_rates[d][r] if r < len(rank_rates[d]) else 0.0
        total += p
    return total


@functools.cache
def _stand_in_trees(n_heads: int, n_ranks: int, device: str) -> tuple[DraftPlan, ...]:
    """Trees of each size to time: what heads right 60% of the time at rank 0 would give."""
    stand_in = [[0.6 * 0.5**r for r in range(n_ranks)] for _ in range(n_heads)]
    return tuple(
        DraftPlan.of_tree(sparse_tree(stand_in, size).tensors(device), f"tree{size}") for size in TREE_SIZES
    )


class DraftPolicy:
    """Picks each step's plan; `observe` feeds it the step's record and measured time."""

    def __init__(self, n_heads: int, costs: StepCosts, *, trees: bool, device, vocab_size: int) -> None:
        self.n_heads, self.costs, self.trees, self.device = n_heads, costs, trees, device
        self.n_ranks = min(RANKS_TRACKED, vocab_size)
        self.stats = AcceptanceStats(n_heads)
        self.chains = [DraftPlan.chain(k) for k in range(n_heads + 1)]
        self.tree_plans: list[tuple[DraftTree, DraftPlan]] = []
        self._tree_cache: dict[tuple, DraftPlan] = {}
        self.steps = 0
        self.probe_interval = FIRST_PROBE_INTERVAL
        self.steps_since_drafting = 0
        self.probing = False
        self.probe_accepted = False
        """At the last probe a one-draft chain would have paid for itself: probe again next step."""
        self.new_text_pending = False
        """`new_text` was called and no step has been chosen since."""
        self.shadow_probes = False
        """Probe with shadow steps (a plain step scoring the first head's guess, `DraftPlan.shadow_probe`)
        instead of one-draft chains: for heads without a cache, in greedy decoding (generate sets it)."""
        self.shadow = DraftPlan.shadow_probe()
        self.static_batch = False
        """The rows decode as one static batch that ends with its slowest row (generate sets it): at
        several rows, drafting must beat plain decoding by more (STATIC_BATCH_YIELD)."""
        self.plan_counts: Counter[str] = Counter()
        self.observed: dict[tuple[str, int], deque[float]] = {}
        """Recent measured step times by (plan, batch size)."""
        self._observed_at: dict[tuple[str, int], int] = {}
        """The count of timed steps when each (plan, batch size) last ran."""
        self._best_cache: tuple[int, DraftPlan] | None = None
        self._seconds_cache: dict[tuple[str, int], float | None] = {}
        self._probe_cache: dict[tuple[int, bool, bool], tuple[bool, float, float]] = {}
        self._timed_steps = 0
        self._trees_stale = trees and n_heads > 0
        self.calibration_seconds = 0.0
        """Seconds spent measuring step costs when this policy was made (0 when they were cached)."""

    def candidate_plans(self) -> list[DraftPlan]:
        """Every plan whose cost must be known: plain, each chain, and trees of each size."""
        if self.trees and self.n_heads:
            return [*self.chains, *_stand_in_trees(self.n_heads, self.n_ranks, str(self.device))]
        return list(self.chains)

    def _refresh_trees(self) -> None:
        rates = [row[: self.n_ranks] for row in self.stats.rank_rates()]
        self.tree_plans = []
        for size in TREE_SIZES:
            tree = sparse_tree(rates, size)
            key = tree.paths
            if key not in self._tree_cache:
                self._tree_cache[key] = DraftPlan.of_tree(tree.tensors(self.device), f"tree{size}")
            self.tree_plans.append((tree, self._tree_cache[key]))

    def values(self, batch_size: int, explore: float = 0.0) -> dict[str, tuple[float, DraftPlan]]:
        """Expected tokens per second of each plan whose cost is known (chains with the deeper heads'
        rates raised by `explore`, see `AcceptanceStats.chain_rates`)."""
        rates = self.stats.chain_rates(explore)
        out = {}
        for plan in self.chains:
            seconds = self.step_seconds(plan.name, batch_size)
            if seconds:
                out[plan.name] = (expected_chain_tokens(rates, plan.n_drafts) / seconds, plan)
        if self.tree_plans:
            rank_rates = self.stats.rank_rates()
            for tree, plan in self.tree_plans:
                seconds = self.step_seconds(plan.name, batch_size)
                if seconds:
                    out[plan.name] = (expected_tree_tokens(rank_rates, tree) / seconds, plan)
        return out

    def _best(self, batch_size: int) -> DraftPlan:
        """The plan of most expected tokens per second (cached until the statistics change)."""
        if self._best_cache is None or self._best_cache[0] != batch_size:
            values = self.values(batch_size)
            plain = self.chains[0].name
            if plain in values:  # drafting must beat plain decoding by a margin, not by noise
                values[plain] = (values[plain][0] * self.margin(batch_size), values[plain][1])
            best = max(values.values(), key=lambda v: v[0])[1] if values else self.chains[-1]
            if best.n_heads:  # drafting pays as observed; which plan, optimism about deep heads decides
                drafting = [v for v in self.values(batch_size, EXPLORE).values() if v[1].n_heads]
                best = max(drafting, key=lambda v: v[0])[1]
            self._best_cache = (batch_size, best)
        return self._best_cache[1]

    def choose(self, batch_size: int) -> DraftPlan:
        if self._trees_stale and self.steps % TREE_REFRESH_STEPS == 0:
            self._refresh_trees()
            self._trees_stale, self._best_cache = False, None
            self._probe_cache.clear()
        self.steps += 1
        best = self._best(batch_size)
        self.probing = False
        plain_now = best.n_heads == 0 and self.n_heads > 0
        could_pay, spacing, extra = self._probe_terms(batch_size) if plain_now else (False, 0.0, 0.0)
        if could_pay:
            self.steps_since_drafting += 1
            new_text_probe = self.new_text_pending and extra <= NEW_TEXT_PROBE_MAX_EXTRA
            if new_text_probe and self.margin(batch_size) == 1 + DRAFT_MARGIN:
                # A lone row's new text may well draft: probe on the first schedule again. A static
                # batch of several rows, which must promise more, keeps the spacing it learned.
                self.probe_interval = FIRST_PROBE_INTERVAL
            due = self.steps_since_drafting >= self.probe_interval * spacing
            if due or self.probe_accepted or new_text_probe:
                best, self.probing = self.shadow if self.shadow_probes else self.chains[1], True
                self.steps_since_drafting = 0
        else:
            self.steps_since_drafting = 0
            self.probe_interval = FIRST_PROBE_INTERVAL
        self.new_text_pending = False
        self.plan_counts[best.name] += 1
        return best

    def _probe_terms(self, batch_size: int) -> tuple[bool, float, float]:
        """(drafting_could_pay, _probe_spacing, _probe_extra) at this batch size, kept between cost
        updates: a plain step would otherwise spend 1-2% of a small model's time recomputing them."""
        key = (batch_size, self.static_batch, self.shadow_probes)
        if key not in self._probe_cache:
            terms = (
                self.drafting_could_pay(batch_size),
                self._probe_spacing(batch_size),
                self._probe_extra(batch_size),
            )
            self._probe_cache[key] = terms
        return self._probe_cache[key]

    def margin(self, batch_size: int) -> float:
        """How many times plain decoding's expected speed drafting must beat: 1 + DRAFT_MARGIN, divided
        by STATIC_BATCH_YIELD in a static batch of several rows."""
        if self.static_batch and batch_size > 1:
            return (1 + DRAFT_MARGIN) / STATIC_BATCH_YIELD
        return 1 + DRAFT_MARGIN

    def drafting_could_pay(self, batch_size: int) -> bool:
        """Whether some drafting plan would beat plain decoding by the margin if every draft were
        accepted (a plan with k levels of drafts commits at most k + 1 tokens a row). Where none could,
        say heads whose caches make one draft cost twice a plain step, probing only costs time."""
        plain = self.step_seconds(self.chains[0].name, batch_size)
        if not plain:
            return True
        for plan in [*self.chains[1:], *(plan for _, plan in self.tree_plans)]:
            seconds = self.step_seconds(plan.name, batch_size)
            if seconds is None or (1 + plan.n_drafts) * plain / seconds > self.margin(batch_size):
                return True
        return False

    def step_seconds(self, plan_name: str, batch_size: int) -> float | None:
        """A plan's seconds per step (see `_step_seconds`), cached between cost updates."""
        key = (plan_name, batch_size)
        if key not in self._seconds_cache:
            self._seconds_cache[key] = self._step_seconds(plan_name, batch_size)
        return self._seconds_cache[key]

    def _step_seconds(self, plan_name: str, batch_size: int) -> float | None:
        """A plan's seconds per step: the calibrated cost, corrected by the steps this policy has timed.

        Once a plan and the plain step have OBSERVED_MIN timed steps each at this batch size, the
        median ratio of the two replaces the calibrated ratio (real steps can differ from the
        calibration's: other trees, other cache lengths), anchored on the calibrated plain step,
        while neither has gone OBSERVED_MAX_AGE timed steps without running.
        """
        calibrated = self.costs.seconds(plan_name, batch_size)
        plain_name = self.chains[0].name
        ratio = self._measured_ratio(plan_name, batch_size) if plan_name != plain_name else None
        plain = self.costs.seconds(plain_name, batch_size)
        return ratio * plain if ratio is not None and plain else calibrated

    def _measured_ratio(self, plan_name: str, batch_size: int) -> float | None:
        """Median timed step of a plan over that of the plain step, once each has OBSERVED_MIN."""
        key, plain_key = (plan_name, batch_size), (self.chains[0].name, batch_size)
        seen, seen_plain = self.observed.get(key), self.observed.get(plain_key)
        if not seen or not seen_plain or len(seen) < OBSERVED_MIN or len(seen_plain) < OBSERVED_MIN:
            return None
        if self._stale(key) or self._stale(plain_key):
            return None
        return statistics.median(seen) / statistics.median(seen_plain)

    def _stale(self, key: tuple[str, int]) -> bool:
        """Whether a plan's timings are more than OBSERVED_MAX_AGE timed steps old."""
        return self._timed_steps - self._observed_at.get(key, self._timed_steps) > OBSERVED_MAX_AGE

    def new_text(self) -> None:
        """New prompts may be more predictable: probe at the first step where probes are cheap (a probe
        that pays starts a streak), with the earlier texts' statistics weighing less. A lone row then
        probes on the first schedule again; a static batch of several rows keeps the spacing earlier
        texts taught (restarting it cost each batch-8 call of 128 tokens about five probes, 1% of its
        time, for drafting that had to promise 1.71x)."""
        self.new_text_pending = True
        self.stats.scale(NEW_TEXT_WEIGHT)

    def _probe_spacing(self, batch_size: int) -> float:
        """Steps between probes per unit of probe_interval. A one-draft chain: its cost in plain steps,
        so costly heads are probed rarely. A shadow probe (a plain step plus one head): its extra cost
        in plain steps (SHADOW_PROBE_EXTRA until timed, at least MIN_PROBE_EXTRA), so probing costs at
        most 1 / probe_interval of plain decoding, and cheap probes come often."""
        if not self.shadow_probes:
            return self._draft_cost(batch_size)
        ratio = self._measured_ratio(self.shadow.name, batch_size)
        return max(MIN_PROBE_EXTRA, ratio - 1 if ratio is not None else SHADOW_PROBE_EXTRA)

    def _probe_extra(self, batch_size: int) -> float:
        """What a probe costs beyond a plain step, in plain steps (it commits a token as a plain step does)."""
        if self.shadow_probes:
            return self._probe_spacing(batch_size)
        return self._draft_cost(batch_size) - 1

    def _draft_cost(self, batch_size: int) -> float:
        """A one-draft chain's cost relative to a plain step."""
        plain = self.step_seconds(self.chains[0].name, batch_size)
        chain1 = self.step_seconds(self.chains[1].name, batch_size)
        return max(1.0, chain1 / plain) if plain and chain1 else 1.0

    def observe(self, record: StepRecord, batch_size: int, seconds: float | None = None) -> None:
        """Fold a step's acceptance, and its measured time when given, into the statistics.

        A plain step carries no acceptance evidence: decaying every count alike would leave every
        rate as it was.
        """
        if seconds is not None:
            key = (record.plan.name, batch_size)
            if key not in self.observed or self._stale(key):
                # A plan's first step at a batch size (or after a long pause) warms up its kernels.
                self.observed[key] = deque(maxlen=OBSERVED_WINDOW)
            else:
                self.observed[key].append(seconds)
            self._timed_steps += 1
            self._observed_at[key] = self._timed_steps
            if self._timed_steps % COST_REFRESH_STEPS == 0:  # costs are re-read now and then
                self._seconds_cache.clear()
                self._probe_cache.clear()
                self._best_cache = None
        self.probe_accepted = False
        if not any(record.reached_J):  # no row reached a draft: no evidence (plain steps, last tokens)
            return
        self.stats.decay(len(record.reached_J))
        self.stats.add(record)
        self._best_cache = None
        self._trees_stale = self.trees
        if self.probing and self._best(batch_size).n_heads == 0:
            # Probe again only if a one-draft chain would have paid for itself here.
            gained = 1 + record.accepted_J[0] / max(record.reached_J[0], 1)
            self.probe_accepted = gained > self._draft_cost(batch_size) * self.margin(batch_size)
            if not self.probe_accepted:
                # Probing found nothing worth drafting: wait twice as long before the next probe.
                self.probe_interval = min(2 * self.probe_interval, MAX_PROBE_INTERVAL)


__all__ = [
    "AcceptanceStats",
    "DraftPolicy",
    "expected_chain_tokens",
    "expected_tree_tokens",
]
