"""The draft policy replayed on recorded acceptance: how close it comes to the best fixed plan, without noise.

In greedy decoding with drafting heads that read only the last committed trunk output (linear and
medusa heads), what a step accepts depends only on where the row stands: each head's guess there and
the plain greedy continuation. So one plain decode of each prompt and one forward pass over the
result record, for every position, the rank of the right token under each head. Any sequence of
plans can then be replayed on paper: the default policy (`DraftPolicy`, fed each step's record and,
as its measured time, the step cost), and every fixed plan. Costs come from the step-cost cache
(measured at first use, as generate() does) unless `--costs` gives them relative to a plain step.

The figure is, per prompt, plain steps x plain cost / replayed cost: the speedup the policy's choices
would give if steps cost exactly that. Its gap to the best fixed plan in hindsight is what the policy
loses by not knowing the text in advance; its gap to a measured speedup (benchmarks/decode.py) is
what timing noise and costs that differ from the table lose.

    python benchmarks/policy_replay.py --checkpoint runs/demo-heads --code-prompts-from data/stdlib-demo
    python benchmarks/policy_replay.py ... --costs chain1=1.26,chain2=1.40,chain3=1.50 --batch-sizes 1,8
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import machine_description, markdown_table, today

from multitoken.checkpoint import load_checkpoint
from multitoken.config import RESIDUAL_HEAD_STYLES
from multitoken.data.prompts import code_prompts
from multitoken.decoding import RANKS_TRACKED, DraftPlan, StepRecord
from multitoken.draft_policy import DraftPolicy
from multitoken.generate import adaptive_policy, generate
from multitoken.step_costs import batch_bucket


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", default="runs/demo-heads", help="a model with linear or medusa heads")
    parser.add_argument(
        "--code-prompts-from", default="data/stdlib-demo", help="prepared dataset (val headers)"
    )
    parser.add_argument("--n-prompts", type=int, default=28)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", default="1")
    parser.add_argument(
        "--costs", default="", help="plan=ratio to a plain step, comma-separated (default: cached)"
    )
    parser.add_argument(
        "--probe-cost", type=float, default=1.08, help="a shadow probe's cost, in plain steps"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (for measured costs)")
    return parser.parse_args()


@torch.no_grad()
def record_ranks(model, prompt_ids: list[int], max_new_tokens: int) -> tuple[int, int, list[list[int]]]:
    """(prompt length, new tokens, ranks_JT): ranks_JT[j][t] is the rank of the token at t + 2 + j under
    drafting head j + 1 at position t (RANKS_TRACKED for anything lower), along the plain greedy text."""
    new = generate(model, [prompt_ids], max_new_tokens, speculative=False).tokens[0]
    tokens_1T = torch.tensor([prompt_ids + new])
    T = tokens_1T.shape[1]
    rope = model.rope_context(tokens_1T, None)
    h_1TD = model.trunk_forward(tokens_1T, rope)
    ranks_JT = []
    for j in range(model.config.n_future - 1):
        z_1TD = model.head_forward(j + 1, h_1TD, rope, model.head_tokens(j + 1, tokens_1T))
        logits_TV = model.logits(z_1TD)[0]
        ranks = [RANKS_TRACKED] * T
        for t in range(T - 2 - j):
            right = logits_TV[t, tokens_1T[0, t + 2 + j]]
            ranks[t] = min(int((logits_TV[t] > right).sum()), RANKS_TRACKED)
        ranks_JT.append(ranks)
    return len(prompt_ids), len(new), ranks_JT


def accepted(ranks_JT: list[list[int]], t: int, plan: DraftPlan, tree_paths) -> int:
    """Drafts a plan standing at position t gets accepted: the longest run of right guesses (a chain), or
    the deepest tree node whose path is the right tokens' ranks."""
    if plan.tree is None:
        a = 0
        while a < plan.n_drafts and ranks_JT[a][t] == 0:
            a += 1
        return a
    path, depth = (), 0
    for j in range(len(ranks_JT)):
        path += (ranks_JT[j][t],)
        if path not in tree_paths:
            break
        depth = j + 1
    return depth


def replay(recorded, batch_size: int, policy: DraftPolicy | None, fixed: DraftPlan | None, cost) -> tuple:
    """Per group of `batch_size` prompts, the replayed speedup over plain; and the plans' step counts."""
    speedups, plans = [], {}
    for first in range(0, len(recorded), batch_size):
        group = recorded[first : first + batch_size]
        if policy is not None and first:
            policy.new_text()
        pos = [n_prompt - 1 for n_prompt, _, _ in group]
        left = [n_new - 1 for _, n_new, _ in group]  # prefill chose the first token
        seconds, plain_steps = 0.0, max(left)
        while any(n > 0 for n in left):
            plan = fixed or policy.choose(batch_size)
            plans[plan.name] = plans.get(plan.name, 0) + 1
            J = 1 if plan.shadow else plan.n_heads
            reached, hits = [0] * J, [0] * J
            rank_hits = [[0] * RANKS_TRACKED for _ in range(J)]
            paths = (
                None if plan.tree is None else next(set(t.paths) for t, p in policy.tree_plans if p is plan)
            )
            for b, (_, _, ranks_JT) in enumerate(group):
                if left[b] <= 0:
                    continue
                t = pos[b]
                if plan.shadow:  # a plain step scoring the first head's guess
                    if left[b] >= 2:
                        reached[0] += 1
                        hits[0] += ranks_JT[0][t] == 0
                    a = 0
                else:
                    limit = min(J, left[b] - 1)
                    a = min(accepted(ranks_JT, t, plan, paths), limit)
                    for j in range(limit):
                        reached[j] += j <= a
                        hits[j] += j < a
                        if j <= a and ranks_JT[j][t] < RANKS_TRACKED:
                            rank_hits[j][ranks_JT[j][t]] += 1
                pos[b] += a + 1
                left[b] -= a + 1
            step = cost(plan)
            seconds += step
            if policy is not None:
                record = StepRecord(plan, [], [])
                if J and (plan.n_heads or plan.shadow):
                    record.reached_J, record.accepted_J, record.proposed_J = reached, hits, reached
                    record.rank_hits_JR = [] if plan.shadow else rank_hits
                policy.observe(record, batch_size, step)
        speedups.append(plain_steps * cost(DraftPlan.chain(0)) / seconds)
    return speedups, plans


def fresh_policy(model, batch_size: int, overrides: dict[str, str], probe_cost: float) -> DraftPolicy:
    """The default policy as generate() makes it, its step costs overridden (ratios to a plain step)."""
    policy = adaptive_policy(model, batch_size)
    policy.shadow_probes = True  # what generate() sets for greedy rows and uncached heads
    table = policy.costs.table.setdefault(batch_bucket(batch_size), {})
    plain = table["plain"]
    table.update({name: float(ratio) * plain for name, ratio in overrides.items()})
    table.setdefault("probe", probe_cost * plain)
    return policy


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_checkpoint(args.checkpoint, device="cpu")
    model = model.eval()
    if model.config.head_style not in RESIDUAL_HEAD_STYLES or model.config.n_future < 2:
        raise SystemExit("replay needs drafting heads without a cache (linear, medusa or conditioned)")
    prompts = [tokenizer.encode(p) for p in code_prompts(args.code_prompts_from, args.n_prompts)]
    recorded = [record_ranks(model, ids, args.max_new_tokens) for ids in prompts]
    overrides = dict(kv.split("=") for kv in args.costs.split(",") if kv)
    J = model.config.n_future - 1
    print(f"# The draft policy replayed on recorded acceptance ({today()})")
    print(f"checkpoint {args.checkpoint}, {len(prompts)} code prompts, {args.max_new_tokens} new tokens, greedy; "
          f"{machine_description('cpu')}\n")  # fmt: skip
    rows = []
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        costs = fresh_policy(model, batch_size, overrides, args.probe_cost).costs

        def cost(plan, costs=costs, batch_size=batch_size):
            return costs.seconds(plan.name, batch_size)

        candidates = {
            "default (policy)": None,
            **{p.name: p for p in (DraftPlan.chain(k) for k in range(1, J + 1))},
        }
        for name, fixed in candidates.items():
            policy = fresh_policy(model, batch_size, overrides, args.probe_cost) if fixed is None else None
            speedups, plans = replay(recorded, batch_size, policy, fixed, cost)
            steps = sum(plans.values())
            mix = ", ".join(f"{p} {c / steps:.0%}" for p, c in sorted(plans.items(), key=lambda kv: -kv[1]))
            rows.append([batch_size, name, f"{statistics.median(speedups):.2f}x", f"{statistics.mean(speedups):.2f}x",
                         f"{min(speedups):.2f}-{max(speedups):.2f}x", mix])  # fmt: skip
        table = costs.table[batch_bucket(batch_size)]
        print(f"batch {batch_size} step costs / plain: "
              + ", ".join(f"{k} {v / table['plain']:.2f}" for k, v in sorted(table.items())))  # fmt: skip
    print()
    print(markdown_table(["batch", "plans", "median speedup", "mean", "range", "steps by plan"], rows))


if __name__ == "__main__":
    main()
