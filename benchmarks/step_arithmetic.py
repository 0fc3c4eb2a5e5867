"""How much of a speculative step's extra cost is arithmetic, and so what no host-side work can remove.

A chain step of k drafts runs the trunk and the unembedding over k + 1 rows where a plain step runs
one, unembeds the drafts, and takes more argmaxes. This script records the arithmetic operations of one
decoding step per plan (matmuls, attention, argmax/topk; `ARITHMETIC_OPS`), replays them alone, in the
step's order, and sets the result against the measured steps (decode.py's step table):

    floor = (plain step + arithmetic(plan) - arithmetic(plain)) / plain step

is what the plan's step would cost, relative to a plain step, if everything but its arithmetic were
free of extra cost. Replayed alone the operations find their weights in the cache more often than in
a step, so the floor is optimistic.

    python benchmarks/step_arithmetic.py --checkpoint runs/demo-heads --threads 1 --clock cpu
    python benchmarks/step_arithmetic.py --preset tiny --head-style linear      # random weights
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import add_random_model_args, machine_description, markdown_table, random_model, today
from decode import STEP_STREAK, bench_step_costs, record_each_plan, timed
from torch.utils._python_dispatch import TorchDispatchMode

from multitoken.speculative import draft_depth

ARITHMETIC_OPS = frozenset(
    {
        "mm",
        "addmm",
        "bmm",
        "baddbmm",
        "_linear_pointwise",  # oneDNN's prepacked linear (multitoken.cpu_linear)
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "argmax",
        "topk",
    }
)
"""Operator names (without their namespace) whose cost grows with the rows a step verifies or drafts."""


class _ArithmeticRecorder(TorchDispatchMode):
    """Keeps every call of an `ARITHMETIC_OPS` operator that runs inside it, with its arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.name.split("::")[-1] in ARITHMETIC_OPS:
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", help="checkpoint or run directory; default: a random model")
    add_random_model_args(parser, preset="tiny", vocab_size=4096)
    parser.add_argument("--n-future", type=int, default=4, help="heads of the random model")
    parser.add_argument("--head-style", default="linear", help="head style of the random model")
    parser.add_argument("--batch-sizes", default="1")
    parser.add_argument("--position", type=int, default=256, help="cached tokens when a step is recorded")
    parser.add_argument("--steps", type=int, default=200, help="timed steps and replays per plan")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    return parser.parse_args()


def record_steps(model, batch_size: int, position: int) -> dict[str, list[tuple]]:
    """The arithmetic calls of one decoding step per chain length, `position` tokens into each row."""
    depth = draft_depth(model.config)
    recorders = record_each_plan(model, batch_size, _ArithmeticRecorder, prompt_len=position - depth - 1)
    return {name: recorder.calls for name, recorder in recorders.items()}


def replay_seconds(calls: dict[str, list[tuple]], repeats: int, device: str, clock: str) -> dict[str, float]:
    """Median seconds to run each plan's recorded calls in order: streaks of STEP_STREAK timed runs after
    an untimed one, the plans taking turns, as `bench_step_costs` times the steps."""

    def run(plan_calls):
        for func, args, kwargs in plan_calls:
            func(*args, **kwargs)

    seconds = {name: [] for name in calls}
    for _ in range(-(-repeats // STEP_STREAK)):
        for name, plan_calls in calls.items():
            for i in range(STEP_STREAK + 1):
                took = timed(lambda c=plan_calls: run(c), device, clock)[0]
                if i:
                    seconds[name].append(took)
    return {name: statistics.median(s) for name, s in seconds.items()}


def by_operator(calls: dict[str, list[tuple]]) -> dict[str, dict[str, list[tuple]]]:
    """Each plan's calls split by operator name, for a breakdown: {operator: {plan: calls}}."""
    names = sorted(
        {func._schema.name.split("::")[-1] for plan_calls in calls.values() for func, _, _ in plan_calls}
    )
    return {
        name: {
            plan: [c for c in plan_calls if c[0]._schema.name.endswith("::" + name)]
            for plan, plan_calls in calls.items()
        }
        for name in names
    }


def main() -> None:
    args = parse_args()
    if args.checkpoint:
        from multitoken.checkpoint import load_model

        torch.set_num_threads(args.threads)
        model = load_model(args.checkpoint, "cpu").eval()
        description = f"checkpoint {args.checkpoint}"
    else:
        model = random_model(args, n_future=args.n_future, head_style=args.head_style)
        description = f"random {args.preset} model, {args.head_style} heads, vocab {args.vocab_size}"
    print(f"# Arithmetic of a decoding step ({today()})\n")
    print(
        f"{description}; {machine_description('cpu')}; {args.clock} clock; recorded {args.position} tokens in\n"
    )
    with torch.no_grad():
        for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
            measured = bench_step_costs(model, batch_size, args.steps, "cpu", args.clock)
            plain_s = measured["plain_ms"] / 1e3
            calls = record_steps(model, batch_size, args.position)
            arithmetic = replay_seconds(calls, args.steps, "cpu", args.clock)
            rows = []
            for name, plan_calls in calls.items():
                extra_s = arithmetic[name] - arithmetic["plain"]
                rows.append(
                    [
                        name,
                        len(plan_calls),
                        f"{measured[name]:.2f}x",
                        f"{arithmetic[name] * 1e6:.0f}",
                        f"{extra_s * 1e6:+.0f}",
                        f"{1 + extra_s / plain_s:.2f}x",
                    ]
                )
            print(f"## Batch {batch_size}: plain step {measured['plain_ms']:.2f} ms\n")
            headers = ["plan", "arithmetic calls", "step / plain", "arithmetic us", "over plain us", "floor"]
            print(markdown_table(headers, rows) + "\n")
            rows = []
            for operator, op_calls in by_operator(calls).items():
                seconds = replay_seconds(op_calls, args.steps, "cpu", args.clock)
                extra = [f"{(seconds[n] - seconds['plain']) * 1e6:+.0f}" for n in list(calls)[1:]]
                rows.append([operator, *extra])
            print("Over a plain step's arithmetic, by operator (us):\n")
            print(markdown_table(["operator", *list(calls)[1:]], rows) + "\n")
    print("floor: the step / plain ratio if the plan added nothing to a plain step but its arithmetic.")


if __name__ == "__main__":
    main()
