"""Time to first token: prefill of one prompt and the choice of its first new token, plain decoding.

    python benchmarks/prefill.py --preset small --vocab-size 32000 --prompt-lens 128,512

Random weights (a prefill's cost does not depend on them), median of the repeats.
"""

from __future__ import annotations

import argparse
from statistics import median

import torch
from common import add_random_model_args, machine_description, markdown_table, random_model, today

from multitoken.generate import generate
from multitoken.studies.measure import interleaved_times


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_random_model_args(parser, preset="small", vocab_size=32000)
    parser.add_argument("--prompt-lens", default="128,512")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    model = random_model(args, n_future=1)
    prompts = {
        T: torch.randint(0, args.vocab_size, (1, T)).tolist() for T in map(int, args.prompt_lens.split(","))
    }
    fns = {T: (lambda p=p: generate(model, p, 1, speculative=False)) for T, p in prompts.items()}
    times = interleaved_times(fns, args.repeats, "cpu")
    print(f"# Time to first token ({today()})")
    print(f"random {args.preset} model, vocab {args.vocab_size}, float32, {machine_description('cpu')}, "
          f"wall clock, median of {args.repeats}\n")  # fmt: skip
    rows = [[T, f"{median(times[T].seconds('wall')) * 1e3:.0f}"] for T in prompts]
    print(markdown_table(["prompt tokens", "ms"], rows))


if __name__ == "__main__":
    main()
