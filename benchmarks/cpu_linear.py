"""oneDNN with prepacked weights for blocks of rows on a CPU, against MKL: matmuls, steps, whole decodes.

Decoding packs a model's linear layers for oneDNN where that pays (`multitoken.cpu_linear`). This
measures it three ways, the variants alternating in one process, medians of the repeats:
  1. one matmul per shape of the model and row count (MKL's F.linear against oneDNN's packed linear);
  2. one decoding step per plan (plain, chains of 1..J drafts), relative to MKL's plain step;
  3. whole greedy decodes (plain, and always drafting) of code prompts, with outputs compared.
"MKL" patches `pack_linears` away, so everything goes through F.linear as before.

    python benchmarks/cpu_linear.py --checkpoint runs/demo-heads --code-prompts-from data/stdlib-demo
    python benchmarks/cpu_linear.py --preset tiny          # random weights: steps and matmuls only
"""

from __future__ import annotations

import argparse
import contextlib
from statistics import median
from unittest import mock

import torch
import torch.nn.functional as F
from common import add_random_model_args, machine_description, markdown_table, today
from decode import bench_step_costs

from multitoken.config import preset_config
from multitoken.cpu_linear import onednn_available, pack_weight
from multitoken.data.prompts import code_prompts
from multitoken.decoding import DraftPlan
from multitoken.generate import generate
from multitoken.model import MultiTokenLM
from multitoken.speculative import draft_depth
from multitoken.studies.measure import interleaved_times, paired_ratio

VARIANTS = ("MKL", "oneDNN")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", help="checkpoint or run directory; default: a random model")
    add_random_model_args(parser, preset="tiny", vocab_size=4096)
    parser.add_argument("--code-prompts-from", help="prepared dataset whose val function headers are prompts")
    parser.add_argument("--n-prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--rows", default="1,2,4,8,32,128", help="row counts of the matmul table")
    parser.add_argument("--steps", type=int, default=40, help="timed decoding steps per plan and repeat")
    return parser.parse_args()


def matmul_rows(model, row_counts: list[int], repeats: int) -> list[list[object]]:
    """Microseconds per call of each distinct linear shape of the model, MKL and oneDNN."""
    shapes = sorted({tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)})
    rows = []
    for out_features, in_features in shapes:
        weight = torch.randn(out_features, in_features)
        packed = pack_weight(weight)
        for n in row_counts:
            x_ND = torch.randn(n, in_features)
            calls = max(20, 20_000 // max(n * out_features // 1024, 1))

            def mkl(x_ND=x_ND, weight=weight, calls=calls):
                for _ in range(calls):
                    F.linear(x_ND, weight)

            def onednn(x_ND=x_ND, packed=packed, calls=calls):
                for _ in range(calls):
                    torch.ops.mkldnn._linear_pointwise(x_ND, packed, None, "none", [], "")

            fns = {"MKL": mkl, "oneDNN": onednn}
            t = interleaved_times(fns, repeats, "cpu")
            mkl_us, onednn_us = (median(t[v].seconds("wall")) / calls * 1e6 for v in VARIANTS)
            rows.append([
                f"{in_features} -> {out_features}", n, f"{mkl_us:.1f}", f"{onednn_us:.1f}", f"{mkl_us / onednn_us:.2f}x"
            ])  # fmt: skip
    return rows


def mkl_only():
    """A context in which decoding packs nothing: every matmul through F.linear (MKL)."""
    return mock.patch("multitoken.decoding.pack_linears", lambda model, max_rows: [])


def step_rows(model, batch_sizes: list[int], steps: int, repeats: int) -> list[list[object]]:
    """Per batch size and variant: MKL's plain step in ms, and each plan's step relative to it
    (decode.py's step timing, `steps` alternating steps per plan, once per repeat and variant)."""
    plans = [DraftPlan.chain(k).name for k in range(draft_depth(model.config))]
    rows = []
    for batch_size in batch_sizes:
        ms = {(v, p): [] for v in VARIANTS for p in plans}
        for _ in range(repeats):
            for variant in VARIANTS:
                with mkl_only() if variant == "MKL" else contextlib.nullcontext():
                    costs = bench_step_costs(model, batch_size, steps, "cpu", "wall")
                for p in plans:
                    ms[variant, p].append(costs[p] * costs["plain_ms"])
        base = median(ms["MKL", "plain"])
        for variant in VARIANTS:
            cells = [f"{median(ms[variant, p]) / base:.2f}" for p in plans]
            rows.append([batch_size, variant, f"{median(ms[variant, 'plain']):.2f}", *cells])
    return rows


def decode_rows(model, prompts: list[list[int]], batch_sizes, new: int, repeats: int) -> list[list[object]]:
    rows = []
    for batch_size in batch_sizes:
        batch = (prompts * batch_size)[:batch_size]
        outputs = {}

        def run(variant, speculative, batch=batch, outputs=outputs):
            if variant == "MKL":
                with mkl_only():
                    outputs[variant, speculative] = generate(
                        model, batch, new, speculative=speculative
                    ).tokens
            else:
                outputs[variant, speculative] = generate(model, batch, new, speculative=speculative).tokens

        fns = {(v, s): (lambda v=v, s=s: run(v, s)) for v in VARIANTS for s in (False, True)}
        t = interleaved_times(fns, repeats, "cpu")
        wall = {k: t[k].seconds("wall") for k in fns}
        identical = all(outputs[v, s] == outputs["MKL", False] for v, s in fns)
        rows.append([
            batch_size, f"{median(wall['MKL', False]) * 1e3:.0f}", f"{median(wall['oneDNN', False]) * 1e3:.0f}",
            f"{paired_ratio(wall['MKL', False], wall['oneDNN', False]):.2f}x",
            f"{paired_ratio(wall['MKL', False], wall['MKL', True]):.2f}x",
            f"{paired_ratio(wall['oneDNN', False], wall['oneDNN', True]):.2f}x", identical,
        ])  # fmt: skip
    return rows


def main() -> None:
    args = parse_args()
    if not onednn_available():
        raise SystemExit("this torch build has no oneDNN packed linear: nothing to compare")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.checkpoint:
        from multitoken.checkpoint import load_checkpoint

        model, tokenizer = load_checkpoint(args.checkpoint, device="cpu")
        what = f"checkpoint {args.checkpoint}"
    else:
        config = preset_config(args.preset, vocab_size=args.vocab_size, n_future=4, head_style="linear")
        model, tokenizer, what = MultiTokenLM(config), None, f"random {args.preset} model, linear heads"
    model = model.float().eval()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    print(f"# oneDNN for blocks of rows, against MKL ({today()})")
    print(f"{what}, float32, {machine_description('cpu')}, wall clock, median of {args.repeats}\n")
    headers = ["shape (in -> out)", "rows", "MKL us", "oneDNN us", "MKL / oneDNN"]
    print(markdown_table(headers, matmul_rows(model, [int(r) for r in args.rows.split(",")], args.repeats)))
    plans = [DraftPlan.chain(k).name for k in range(draft_depth(model.config))]
    print(f"\nOne decoding step, relative to MKL's plain step ({args.steps} steps a repeat)\n")
    headers = ["batch", "matmuls", "plain ms", *plans]
    print(markdown_table(headers, step_rows(model, batch_sizes, args.steps, args.repeats)))
    if args.code_prompts_from and tokenizer is not None:
        prompts = [tokenizer.encode(p) for p in code_prompts(args.code_prompts_from, args.n_prompts)]
        print(f"\nWhole greedy decodes, {args.max_new_tokens} new tokens a row\n")
        headers = ["batch", "plain ms, MKL", "plain ms, oneDNN", "plain: oneDNN speedup",
                   "always-draft speedup, MKL", "always-draft speedup, oneDNN", "identical"]  # fmt: skip
        print(
            markdown_table(
                headers, decode_rows(model, prompts, batch_sizes, args.max_new_tokens, args.repeats)
            )
        )


if __name__ == "__main__":
    main()
