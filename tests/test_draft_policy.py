"""The adaptive draft policy: decisions on stub models with known acceptance, and lossless plan switching."""

import itertools
import time

import pytest
import torch
from test_generate import PROMPTS, agreeing_model
from test_speculative import PARAMS, chi2_pvalue, exact_laws, make_stub, peaky, sample_counts

from multitoken.decoding import DraftPlan, StepRecord
from multitoken.draft_policy import (
    COST_REFRESH_STEPS,
    FIRST_PROBE_INTERVAL,
    OBSERVED_MAX_AGE,
    OBSERVED_MIN,
    DraftPolicy,
    expected_chain_tokens,
    expected_tree_tokens,
)
from multitoken.draft_tree import DraftTree
from multitoken.generate import generate, shared_policy
from multitoken.step_costs import StepCosts, step_clock

from conftest import tiny_model

# A machine where drafting pays when drafts are accepted: each extra position costs 10% of a step.
COSTS = {1: {"plain": 1.0, "chain1": 1.1, "chain2": 1.2, "chain3": 1.3}}


# A CPU at batch 1: a draft costs 30-40% of a step, so one accepted probe is not enough evidence.
CPU_COSTS = {1: {"plain": 1.0, "chain1": 1.35, "chain2": 1.6, "chain3": 1.75}}


def stub_policy(n_heads=3, trees=False, costs=COSTS):
    table = {b: dict(row) for b, row in costs.items()}
    return DraftPolicy(n_heads, StepCosts(table), trees=trees, device="cpu", vocab_size=100)


def plan_sequence(policy, model, prompt, n_new, accepted=None):
    """The plan of every step of one generate() call, by wrapping the policy's choice (and, into
    `accepted`, the drafts each step accepted)."""
    seen = []
    choose, observe = policy.choose, policy.observe

    def recording(batch_size):
        plan = choose(batch_size)
        seen.append(plan.name)
        return plan

    def observing(record, batch_size, seconds=None):
        if accepted is not None:
            accepted.append(record.n_accepted[0])
        observe(record, batch_size, seconds)

    policy.choose, policy.observe = recording, observing
    out = generate(model, [prompt], n_new, policy=policy, seed=0)  # a seed: plans ignore timings
    policy.choose, policy.observe = choose, observe
    return out, seen


def test_expected_tokens_formulas():
    assert expected_chain_tokens([0.5, 0.5, 0.5], 0) == 1.0
    assert expected_chain_tokens([0.5, 0.5, 0.5], 2) == pytest.approx(1 + 0.5 + 0.25)
    tree = DraftTree.from_paths([(0,), (1,), (0, 0)])
    rates = [[0.5, 0.2], [0.4, 0.1]]
    assert expected_tree_tokens(rates, tree) == pytest.approx(1 + 0.5 + 0.2 + 0.5 * 0.4)
    # A chain is the tree of rank-0 paths.
    chain = DraftTree.from_paths([(0,), (0, 0)])
    assert expected_tree_tokens(rates, chain) == pytest.approx(expected_chain_tokens([0.5, 0.4], 2))


def test_never_accepted_heads_lead_to_plain_steps():
    stub = make_stub(1, 4, lambda b, i, t: False, S=360)
    prompt = stub.seq_BS[0, :3].tolist()
    out, plans = plan_sequence(stub_policy(), stub, prompt, 300)
    assert out.tokens == [stub.seq_BS[0, 3:303].tolist()]
    first_plain = plans.index("plain")
    assert first_plain <= 8  # a few drafting steps, then plain
    later = plans[first_plain:]
    drafting = [i for i, name in enumerate(later) if name != "plain"]
    # Only probes draft now, with one draft, at intervals that double (32, 64, 128 steps, times the
    # probe's 1.1x cost): 3 in ~295 steps.
    assert len(drafting) == 3
    assert all(later[i] == "chain1" for i in drafting)
    gaps = [b - a for a, b in itertools.pairwise(drafting)]
    assert gaps == sorted(gaps) and gaps[-1] >= 1.9 * gaps[0]


def test_always_accepted_heads_lead_to_the_deepest_chain():
    stub = make_stub(1, 4, lambda b, i, t: True, S=160)
    prompt = stub.seq_BS[0, :3].tolist()
    out, plans = plan_sequence(stub_policy(), stub, prompt, 100)
    assert out.tokens == [stub.seq_BS[0, 3:103].tolist()]
    depths = [int(name.removeprefix("chain")) for name in plans]
    assert depths == sorted(depths) and set(plans[4:]) == {"chain3"}  # deeper as evidence comes in
    assert out.stats.tokens_per_forward > 3.5


def test_a_change_in_acceptance_is_followed():
    """Heads right for the first 60 positions, wrong after: deep chains, then plain within a few steps."""
    stub = make_stub(1, 4, lambda b, i, t: t < 60, S=260)
    prompt = stub.seq_BS[0, :3].tolist()
    out, plans = plan_sequence(stub_policy(), stub, prompt, 200)
    assert out.tokens == [stub.seq_BS[0, 3:203].tolist()]
    switch = next(i for i, name in enumerate(plans) if name == "plain")
    shallower = next(i for i, name in enumerate(plans) if i >= 4 and name != "chain3")
    assert shallower > 10 and all(name == "chain3" for name in plans[4:shallower])
    assert switch - shallower <= 15  # backs off through shorter chains to plain
    tail = plans[switch:]
    assert tail.count("plain") >= len(tail) - 5  # only probes draft now

    # And back: heads wrong at first, right later; probes find out and drafting resumes.
    stub = make_stub(1, 4, lambda b, i, t: t >= 40, S=260)
    out, plans = plan_sequence(stub_policy(), stub, stub.seq_BS[0, :3].tolist(), 200)
    assert out.tokens == [stub.seq_BS[0, 3:203].tolist()]
    assert "plain" in plans[:20] and plans[-10:].count("chain3") >= 8


class CyclingPolicy(DraftPolicy):
    """Switches plan every step, through every chain length and a tree: each switch must be lossless."""

    def __init__(self, n_heads, trees):
        super().__init__(n_heads, StepCosts(), trees=trees, device="cpu", vocab_size=97)
        self.cycle = [DraftPlan.chain(k) for k in range(n_heads + 1)]
        if trees:
            tree = DraftTree.from_widths([3] + [1] * (n_heads - 1))
            self.cycle.append(DraftPlan.of_tree(tree.tensors("cpu"), "tree"))

    def choose(self, batch_size):
        self.steps += 1
        return self.cycle[self.steps % len(self.cycle)]


@pytest.mark.parametrize("style", ["transformer", "linear", "sequential"])
def test_switching_plans_every_step_keeps_greedy_output(style):
    trees = style != "sequential"
    for model in (tiny_model(5, n_future=4, head_style=style).double().eval(), agreeing_model(style, 4)):
        plain = generate(model, PROMPTS, 23, speculative=False, return_logits=True)
        mixed = generate(model, PROMPTS, 23, policy=CyclingPolicy(3, trees), return_logits=True)
        assert mixed.tokens == plain.tokens
        for a, b in zip(mixed.logits, plain.logits, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert mixed.stats.tokens_per_forward > 1.3 and len(mixed.stats.plans) == len(
        CyclingPolicy(3, trees).cycle
    )


@pytest.mark.parametrize("style", ["transformer", "linear"])
def test_switching_plans_keeps_the_sampling_law(style):
    model = peaky(style)
    law12, law23 = exact_laws(model)
    c12, c23, stats = sample_counts(model, None, policy=CyclingPolicy(2, True))
    assert chi2_pvalue(c12, law12) > 1e-3
    assert chi2_pvalue(c23, law23) > 1e-3
    assert len(stats.plans) >= 3
    assert PARAMS.temperature > 0


def test_measured_steps_replace_the_calibrated_costs():
    policy = stub_policy()
    record = StepRecord(DraftPlan.chain(1), [[1, 2]], [1], reached_J=[1], accepted_J=[1], proposed_J=[1])
    plain = StepRecord(DraftPlan.chain(0), [[1]], [0])
    assert policy.step_seconds("chain1", 1) == 1.1  # calibrated, until enough steps are timed
    policy.observe(plain, 1, 0.002)
    policy.observe(record, 1, 1.0)  # a plan's first step warms its kernels up: not kept
    for _ in range(OBSERVED_MIN):
        policy.observe(plain, 1, 0.002)
        assert policy.step_seconds("chain1", 1) == 1.1
        policy.observe(record, 1, 0.006)  # chain1 really costs 3x a plain step here
    policy._seconds_cache.clear()
    assert policy.step_seconds("chain1", 1) == pytest.approx(3.0)
    assert policy.step_seconds("chain1", 8) is None  # other batch sizes keep their own figures


def test_measured_costs_of_a_plan_not_run_for_long_give_way_to_the_calibration():
    """A burst of noise while a rarely chosen plan ran must not set its price for good."""
    policy = stub_policy()
    record = StepRecord(DraftPlan.chain(1), [[1, 2]], [1], reached_J=[1], accepted_J=[1], proposed_J=[1])
    plain = StepRecord(DraftPlan.chain(0), [[1]], [0])
    for _ in range(OBSERVED_MIN + 1):
        policy.observe(plain, 1, 0.002)
        policy.observe(record, 1, 0.006)  # timed during a burst: 3x a plain step
    policy._seconds_cache.clear()
    assert policy.step_seconds("chain1", 1) == pytest.approx(3.0)
    for _ in range(OBSERVED_MAX_AGE + COST_REFRESH_STEPS):  # a long stretch without chain1
        policy.observe(plain, 1, 0.002)
    assert policy.step_seconds("chain1", 1) == 1.1  # the calibrated cost again
    for _ in range(OBSERVED_MIN + 1):  # chain1 runs again: only its new timings count
        policy.observe(plain, 1, 0.002)
        policy.observe(record, 1, 0.0024)
    policy._seconds_cache.clear()
    assert policy.step_seconds("chain1", 1) == pytest.approx(1.2)


def test_default_policy_measures_costs_once_and_reuses_them(tmp_path, monkeypatch):
    monkeypatch.setenv("MULTITOKEN_CACHE_DIR", str(tmp_path))
    model = tiny_model(1, n_future=3, head_style="linear").eval()
    first = generate(model, PROMPTS, 6)
    assert first.stats.calibration_seconds > 0 and (tmp_path / "step_costs.json").is_file()
    again = generate(model, PROMPTS, 6)  # the model's shared policy: nothing to measure
    assert again.stats.calibration_seconds == 0 and again.tokens == first.tokens
    assert shared_policy(model, 4)[0] is shared_policy(model, 4)[0]
    same_shape = tiny_model(1, n_future=3, head_style="linear").eval()  # a new policy reads the file
    assert generate(same_shape, PROMPTS, 6, seed=0).stats.calibration_seconds == 0
    (tmp_path / "step_costs.json").write_text("not json")  # a damaged cache is measured again
    assert generate(same_shape, PROMPTS, 6, seed=0).stats.calibration_seconds > 0


def test_unseeded_calls_share_what_the_policy_learned():
    """Heads that never pay: the first call explores, later calls on the same model start where it left."""
    stub = make_stub(1, 4, lambda b, i, t: False, S=200)
    prompt = stub.seq_BS[0, :3].tolist()
    policy = stub_policy()
    first = generate(stub, [prompt], 60, policy=policy)
    later = generate(stub, [prompt], 60, policy=policy)
    assert first.tokens == later.tokens
    assert later.stats.plans.get("plain", 0) > first.stats.plans.get("plain", 0)


def chain1_record(accepted: bool) -> StepRecord:
    return StepRecord(DraftPlan.chain(1), [[0]], [int(accepted)], reached_J=[1], accepted_J=[int(accepted)])


def test_a_probe_goes_on_while_its_drafts_are_accepted():
    """One accepted probe is too little evidence to draft, but enough to probe again at the next step."""
    policy = stub_policy(costs=CPU_COSTS)
    for _ in range(20):  # a long stretch of rejected drafts
        policy.observe(chain1_record(False), 1)
    plans = [policy.choose(1).name for _ in range(60)]
    # One probe on schedule: after 32 x 1.35 (a one-draft step's cost) plain steps.
    assert plans.count("chain1") == 1 and plans[43] == "chain1"
    policy.probing = True  # the next probe, accepted
    policy.observe(chain1_record(True), 1)
    assert policy.values(1)["plain"][0] > policy.values(1)["chain1"][0]  # plain still looks best
    for _ in range(3):  # yet it probes again while the probes are accepted
        assert policy.choose(1).name == "chain1"
        policy.observe(chain1_record(True), 1)
    assert policy.values(1)["chain1"][0] > policy.values(1)["plain"][0]  # by now drafting pays
    assert policy.choose(1).name != "plain"


def test_new_text_is_probed_at_its_first_step():
    stub = make_stub(1, 4, lambda b, i, t: False, S=260)
    policy = stub_policy(costs=CPU_COSTS)
    _, plans = plan_sequence(policy, stub, stub.seq_BS[0, :3].tolist(), 100)
    assert plans[-8:] == ["plain"] * 8  # settled on plain decoding, probes far apart
    policy.new_text()
    _, plans = plan_sequence(policy, stub, stub.seq_BS[0, :3].tolist(), 30)
    assert plans[0] == "chain1" and plans[1:5] == ["plain"] * 4  # rejected: no streak


def probe_steps(policy, batch_size: int, n_steps: int) -> list[int]:
    """Steps (of n_steps chosen by the policy) that probed; every probe's drafts rejected."""
    probes = []
    for step in range(n_steps):
        plan = policy.choose(batch_size)
        if plan.n_drafts:
            probes.append(step)
            rows = [[0]] * batch_size
            policy.observe(
                StepRecord(plan, rows, [0] * batch_size, [batch_size], [0], [batch_size]), batch_size
            )
    return probes


def test_new_text_restarts_the_probe_schedule_for_a_lone_row_only():
    """Probes that found nothing spread out. New text is probed at once; a lone row then probes on the
    first schedule again (its text may well draft), while generate()'s static batch of 8 rows, where
    drafting must promise 1.71x, keeps the spacing earlier texts taught."""
    for batch_size, static in ((1, False), (8, True)):
        policy = stub_policy(costs={batch_size: CPU_COSTS[1]})
        policy.static_batch = static
        probes = probe_steps(policy, batch_size, 1500)
        assert (
            policy.probe_interval > 2 * FIRST_PROBE_INTERVAL
            and probes[-1] - probes[-2] > 2 * FIRST_PROBE_INTERVAL
        )
        policy.new_text()
        probes = probe_steps(policy, batch_size, 4 * FIRST_PROBE_INTERVAL)  # spacing then 64 x 1.35 (lone)
        assert probes[0] == 0 and len(probes) == (1 if static else 2)


def test_new_text_is_probed_at_once_only_where_a_probe_is_cheap():
    """A probe costing 0.35 plain steps more is spent on new text at once; one costing 1.8 (cached heads
    catching up on a new prompt) is not: a short call would pay it every time."""
    for chain1, at_once in ((1.35, True), (2.8, False)):
        policy = stub_policy(costs={1: {"plain": 1.0, "chain1": chain1, "chain2": 1.5, "chain3": 1.6}})
        policy.new_text()
        assert (policy.choose(1).name == "chain1") == at_once
        assert policy.choose(1).name == "plain"


def test_a_step_ages_only_the_heads_it_used():
    """Deep heads seen right keep their record through a stretch of one-draft chains."""
    policy = stub_policy()
    deep = StepRecord(DraftPlan.chain(3), [[0] * 4], [3], reached_J=[1, 1, 1], accepted_J=[1, 1, 1])
    for _ in range(10):
        policy.observe(deep, 1)
    before = policy.stats.chain_rates()
    for _ in range(30):
        policy.observe(chain1_record(True), 1)
    after = policy.stats.chain_rates()
    assert after[1:] == before[1:] and after[1] > 0.8
    assert policy.choose(1).name == "chain3"


def test_deep_heads_without_evidence_get_tried():
    """The first head right every time, the others never tried: the policy tries the deepest chain."""
    policy = stub_policy(costs=CPU_COSTS)
    for _ in range(20):
        policy.observe(chain1_record(True), 1)
    observed = policy.values(1)  # deeper heads at the prior rate: one draft looks best
    assert max(observed, key=lambda name: observed[name][0]) == "chain1"
    assert policy.choose(1).name == "chain3"  # optimism about heads never seen


def test_new_text_weighs_the_old_texts_statistics_less():
    """After a long stretch of rejected drafts, two accepted probes on new text are enough to draft."""
    policy = stub_policy(costs=CPU_COSTS)
    for _ in range(40):
        policy.observe(chain1_record(False), 1)
    policy.new_text()
    for _ in range(2):
        assert policy.choose(1).name == "chain1"  # the new-text probe, then the streak
        policy.observe(chain1_record(True), 1)
    assert policy.values(1)["chain1"][0] > policy.values(1)["plain"][0]


def test_a_probe_that_costs_more_than_it_gains_does_not_go_on():
    """Drafts always accepted, but a one-draft step costs 2.5 plain steps: no streak of probes (the
    three-draft chain could still pay, so probing goes on at all)."""
    policy = stub_policy(costs={1: {"plain": 1.0, "chain1": 2.5, "chain2": 2.8, "chain3": 3.0}})
    for _ in range(20):
        policy.observe(chain1_record(True), 1)
    assert policy.choose(1).name == "plain"  # accepted, yet not worth it
    policy.new_text()  # a probe costing 1.5 plain steps more is not spent on new text at once
    plans = [policy.choose(1).name]
    while plans[-1] != "chain1":
        plans.append(policy.choose(1).name)
    assert len(plans) > FIRST_PROBE_INTERVAL  # on schedule: 32 x 2.5 steps after the last
    policy.observe(chain1_record(True), 1)
    assert policy.choose(1).name == "plain"


def test_heads_that_cannot_pay_even_when_always_right_are_never_probed():
    """Each chain of k drafts costs more than k + 1 plain steps over the margin: no probe, not even
    on new text, and plain decoding throughout."""
    costs = {1: {"plain": 1.0, "chain1": 2.1, "chain2": 2.9, "chain3": 3.6}}  # the debug model's heads
    policy = stub_policy(costs=costs)
    policy.new_text()
    assert [policy.choose(1).name for _ in range(400)] == ["plain"] * 400
    policy = stub_policy(costs={1: {**costs[1], "chain3": 3.2}})  # now 4 tokens could pay for 3.2
    assert "chain1" in [policy.choose(1).name for _ in range(400)]


def test_generate_decodes_plainly_without_the_policy_where_no_plan_could_pay():
    stub = make_stub(1, 4, lambda b, i, t: True, S=160)
    prompt = stub.seq_BS[0, :3].tolist()
    policy = stub_policy(costs={1: {"plain": 1.0, "chain1": 2.1, "chain2": 2.9, "chain3": 3.6}})
    out, plans = plan_sequence(policy, stub, prompt, 50)
    assert plans == [] and out.tokens == [stub.seq_BS[0, 3:53].tolist()]  # never asked
    assert set(out.stats.plans) == {"plain"}


def test_probes_are_shadow_steps_where_the_batch_allows():
    policy = stub_policy(costs=CPU_COSTS)
    policy.shadow_probes = True
    for _ in range(20):
        policy.observe(chain1_record(False), 1)
    plans = [policy.choose(1) for _ in range(12)]
    probes = [i for i, p in enumerate(plans) if p.n_heads or p.shadow]
    # As shadow steps, on the schedule of their extra cost (a quarter of a plain step until timed).
    assert probes == [7] and plans[7].shadow


def test_steps_are_timed_on_cpu_time_only_with_one_thread():
    """CPU time adds up every thread's work, so with several threads it would overstate wide steps."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert step_clock(torch.device("cpu")) is time.process_time
        torch.set_num_threads(2)
        assert step_clock(torch.device("cpu")) is time.perf_counter
    finally:
        torch.set_num_threads(threads)


def test_a_static_batch_of_several_rows_drafts_only_for_a_larger_gain():
    """generate()'s batch ends with its slowest row, so at several rows drafting must beat plain by more;
    the server's rows come and go (static_batch off), and one row is its own batch."""
    costs = {b: {"plain": 1.0, "chain1": 1.3, "chain2": 1.5, "chain3": 1.6} for b in (1, 8)}

    def record(accepted, reached, hits):
        return StepRecord(
            DraftPlan.chain(3), [[1]] * 8, accepted, reached_J=reached, accepted_J=hits, proposed_J=[8, 8, 8]
        )

    # Each head right half the time: 1.875 tokens a step, 1.17x plain at chain3's cost of 1.6.
    accepted_half = record([1] * 8, [8, 4, 2], [4, 2, 1])
    good = record([3] * 8, [8, 8, 8], [8, 8, 7])  # about 3.7 tokens a step: 2.3x
    # About 2.5 tokens a step: 1.5x plain at chain3's cost, enough alone, not in a static batch.
    middling = record([2] * 8, [8, 6, 4], [6, 4, 2])
    for evidence, static, batch_size, drafts in [
        (accepted_half, False, 8, False),  # 1.17x does not clear the margin of 1.2 anywhere
        (good, False, 8, True),
        (good, True, 1, True),
        (good, True, 8, True),  # 2.3x clears even a static batch's margin
        (middling, False, 8, True),
        (middling, True, 1, True),
        (middling, True, 8, False),
    ]:
        policy = stub_policy(costs=costs)
        policy.static_batch = static
        for _ in range(30):
            policy.observe(evidence, batch_size)
        assert (policy.choose(batch_size).n_heads > 0) == drafts, (static, batch_size)


def test_a_policy_without_drafting_heads_decodes_plainly():
    policy = stub_policy(n_heads=0, costs={1: {"plain": 1.0}})
    policy.new_text()
    assert [policy.choose(1).name for _ in range(50)] == ["plain"] * 50
