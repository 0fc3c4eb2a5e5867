"""Plain decoding with attention over the cache slots in use, against attention over the whole cache.

Decoding steps attend to the first max(position) + block slots of the static KV cache (outside
compiled passes), not to all of it. This measures what that saves: plain greedy decoding of random
prompts, the two variants alternating in one process (the whole-cache variant patches the bound
away), median of the repeats. Outputs are compared too: they must be identical.

    python benchmarks/attention_window.py --preset tiny --batch-sizes 1,8,32 --max-new-tokens 128,512
"""

from __future__ import annotations

import argparse
from statistics import median
from unittest import mock

import torch
from common import add_random_model_args, machine_description, markdown_table, random_model, today

from multitoken.decoding import DecodeBatch
from multitoken.generate import generate
from multitoken.studies.measure import interleaved_times, paired_ratio


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_random_model_args(parser, preset="tiny", vocab_size=4096)
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--max-new-tokens", default="128,512", help="comma-separated: one row per value")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="cpu")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    model = random_model(args, n_future=1)
    rows = []
    for new in (int(v) for v in args.max_new_tokens.split(",")):
        if args.prompt_len + new > model.config.max_seq_len:
            raise SystemExit(f"--prompt-len + {new} exceeds the model's context {model.config.max_seq_len}")
        for batch in (int(v) for v in args.batch_sizes.split(",")):
            gen = torch.Generator().manual_seed(args.seed)
            prompts = torch.randint(0, args.vocab_size, (batch, args.prompt_len), generator=gen).tolist()
            outputs = {}

            def decode(variant: str, prompts=prompts, new=new, outputs=outputs) -> None:
                if variant == "whole cache":
                    with mock.patch.object(DecodeBatch, "key_bound", lambda self, end, block: None):
                        outputs[variant] = generate(model, prompts, new, speculative=False).tokens
                else:
                    outputs[variant] = generate(model, prompts, new, speculative=False).tokens

            fns = {v: (lambda v=v: decode(v)) for v in ("used slots", "whole cache")}
            times = interleaved_times(fns, args.repeats, "cpu")
            used, whole = times["used slots"].seconds(args.clock), times["whole cache"].seconds(args.clock)
            rows.append([
                batch, args.prompt_len + new, f"{median(whole) * 1e3:.0f}", f"{median(used) * 1e3:.0f}",
                f"{paired_ratio(whole, used):.2f}x", outputs["used slots"] == outputs["whole cache"],
            ])  # fmt: skip
    print(f"# Attention over the slots in use ({today()})")
    print(f"{args.preset} random model, n_future=1, float32, {machine_description('cpu')}, {args.clock} clock, "
          f"median of {args.repeats}")  # fmt: skip
    headers = ["batch", "cache length", "whole cache ms", "used slots ms", "speedup", "identical"]
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
