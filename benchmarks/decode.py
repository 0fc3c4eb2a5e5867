"""Decoding speed: plain vs self-speculative greedy decoding, and ours vs `transformers` generate().

    python benchmarks/decode.py --checkpoint runs/demo --code-prompts-from data/stdlib-demo --batch-sizes 1,8,32
    python benchmarks/decode.py --preset debug --max-new-tokens 32        # random weights, seconds
    python benchmarks/decode.py --checkpoint runs/demo --draft-trees "3;4,2" \
        --sparse-trees 8,16 --calibrate-data data/stdlib-demo                # chains against draft trees

Every ratio is measured side by side in one run: the repeats alternate between the methods, and each
figure is the median of the repeats. A repeat decodes --n-prompts prompts at every batch size: at batch
B, ceil(n / B) calls of B rows (8 prompts: 8 calls of one row, one of 8 rows, one of 32 rows). "auto" is the default decoding (`speculative=None`: the adaptive
draft policy); "chain" always drafts with every head. The step-cost table times decoding steps of
each plan against a plain step, in streaks of steps as generation runs them. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from multitoken.config import preset_config
from multitoken.data.prompts import code_prompts
from multitoken.decoding import DecodeBatch, DraftPlan, decode_step, prefill
from multitoken.draft_tree import DraftTree, measure_rank_accuracy, sparse_tree
from multitoken.generate import cache_length, generate, merge_stats
from multitoken.model import Attention, MultiTokenLM
from multitoken.speculative import draft_depth
from multitoken.studies import measure


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="checkpoint or run directory; default: a random model")
    parser.add_argument("--preset", default="debug", help="shape of the random model")
    parser.add_argument("--n-future", type=int, default=4, help="heads of the random model")
    parser.add_argument("--head-style", default="transformer", help="head style of the random model")
    parser.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the random model")
    parser.add_argument(
        "--prompt-file", help="one text prompt per line (needs a checkpoint with a tokenizer)"
    )
    parser.add_argument(
        "--code-prompts-from", help="prepared dataset: use the function headers of its val split as prompts"
    )
    parser.add_argument("--prompt-len", type=int, default=32, help="tokens per random prompt")
    parser.add_argument(
        "--n-prompts", type=int, default=8, help="prompts per repeat: at batch B, ceil(n / B) calls of B rows"
    )
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--hf-batch-sizes", default="1,8", help="batch sizes for the transformers comparison")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decoding step (inductor on CPU, CUDA graphs on GPU)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: time this process's CPU use, which other jobs on a shared machine do not inflate "
        "(use with --threads 1 on CPU)",
    )
    parser.add_argument(
        "--draft-trees",
        default="",
        help='draft trees to compare, widths per depth separated by ";", e.g. "3;4,2"',
    )
    parser.add_argument(
        "--sparse-trees", default="", help="node counts of sparse trees to compare, e.g. 8,16"
    )
    parser.add_argument(
        "--peak-bandwidth-gbs",
        type=float,
        help="memory bandwidth peak (H100 SXM: 3350): report the share used",
    )
    parser.add_argument(
        "--calibrate-data", help="prepared dataset whose val split calibrates the sparse trees"
    )
    return parser.parse_args()


def load_model(args, device: str):
    """(model, tokenizer, description)."""
    if args.checkpoint:
        from multitoken.checkpoint import load_checkpoint

        model, tokenizer = load_checkpoint(args.checkpoint, device=device)
        return model, tokenizer, f"checkpoint {args.checkpoint}"
    torch.manual_seed(args.seed)
    config = preset_config(
        args.preset, vocab_size=args.vocab_size, n_future=args.n_future, head_style=args.head_style
    )
    model = MultiTokenLM(config).to(device)
    return (
        model,
        None,
        f"RANDOM {args.preset} model (random weights rarely accept drafts: speedups are meaningless)",
    )


def make_prompt_batches(args, model, tokenizer, batch_size: int) -> list[list[list[int]]]:
    """The calls of one repeat at `batch_size`: ceil(n_prompts / batch_size) batches of prompts, the
    prompts taken in order (cycling when there are fewer)."""
    n_rows = batch_size * -(-args.n_prompts // batch_size)
    if args.prompt_file or args.code_prompts_from:
        if tokenizer is None:
            raise SystemExit("text prompts need a checkpoint with a tokenizer")
        texts = read_prompt_texts(args)
        prompts = [tokenizer.encode(texts[i % len(texts)]) for i in range(n_rows)]
    else:
        gen = torch.Generator().manual_seed(args.seed)
        prompts = torch.randint(0, model.config.vocab_size, (n_rows, args.prompt_len), generator=gen).tolist()
    return [prompts[i : i + batch_size] for i in range(0, n_rows, batch_size)]


def read_prompt_texts(args) -> list[str]:
    """Lines of --prompt-file, or the first function headers ("def name(") of a dataset's val split."""
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            return [line for line in f.read().splitlines() if line.strip()]
    largest = max(int(b) for b in [*args.batch_sizes.split(","), *args.hf_batch_sizes.split(",")])
    return code_prompts(args.code_prompts_from, max(args.n_prompts, largest))


"""`--clock cpu` times this process's CPU use (with one thread: its own work, not other jobs')."""


def timed(fn, device: str, clock: str = "wall"):
    """(seconds on `clock`, wall or cpu, result) of one call of `fn`."""
    wall, cpu, out = measure.timed(fn, device)
    return (wall if clock == "wall" else cpu), out


def decoders(args, model) -> dict[str, dict]:
    """generate() settings to compare: plain, the chain of drafts, and each requested draft tree."""
    methods = {
        "plain": dict(speculative=False),
        "auto (default)": dict(speculative=None),
        "chain": dict(speculative=True),
    }
    for spec in filter(None, args.draft_trees.split(";")):
        tree = DraftTree.parse(spec)
        methods[f"tree {spec} ({tree.n_nodes - 1} nodes)"] = dict(draft_tree=tree)
    if args.sparse_trees:
        if not args.calibrate_data:
            raise SystemExit("--sparse-trees needs --calibrate-data (a prepared dataset's val split)")
        accuracy = calibrate(args, model)
        print(
            f"rank accuracy per drafting head (calibration): {[[round(a, 3) for a in h] for h in accuracy]}\n"
        )
        for n_nodes in [int(n) for n in args.sparse_trees.split(",")]:
            methods[f"sparse tree, {n_nodes} nodes"] = dict(draft_tree=sparse_tree(accuracy, n_nodes))
    return methods


def calibrate(args, model) -> list[list[float]]:
    """Per drafting head, how often its r-th most likely token is right, on held-out windows."""
    from multitoken.data.loader import TokenDataset

    data = TokenDataset(args.calibrate_data, split="val")
    seq_len = min(256, model.config.max_seq_len)
    windows = [torch.from_numpy(data.window(i * seq_len, seq_len).astype("int64")) for i in range(32)]
    depth = draft_depth(model.config) - 1
    device = next(model.parameters()).device
    return measure_rank_accuracy(model, torch.stack(windows).to(device), depth, max_rank=8)


def bench_decoders(args, model, batches, device, methods: dict[str, dict]) -> dict[str, dict]:
    """Median seconds of each decoding method over the batches, the methods alternating within each
    repeat, plus stats."""

    def run(kwargs):
        calls = [generate(model, b, args.max_new_tokens, compile=args.compile, **kwargs) for b in batches]
        return [row for call in calls for row in call.tokens], merge_stats([call.stats for call in calls])

    for kwargs in methods.values():
        run(kwargs)  # warm-up (and compilation)
    seconds = {name: [] for name in methods}
    outputs = {}
    order = list(methods.items())
    for repeat in range(args.repeats):  # the order flips every repeat: no method always follows another
        for name, kwargs in order if repeat % 2 == 0 else order[::-1]:
            t, outputs[name] = timed(lambda kwargs=kwargs: run(kwargs), device, args.clock)
            seconds[name].append(t)
    plain_s = statistics.median(seconds["plain"])
    results = {}
    for name in methods:
        (tokens, stats), median_s = outputs[name], statistics.median(seconds[name])
        speedup, tpf = plain_s / median_s, stats.tokens_per_forward
        results[name] = {
            "tok_s": stats.new_tokens / median_s,
            "tokens_per_forward": tpf,
            "acceptance": stats.acceptance_per_head,
            "speedup": speedup,
            "efficiency": speedup / tpf,
            "identical": tokens == outputs["plain"][0],
        }
    return results


class _OpCounter(TorchDispatchMode):
    """Counts the tensor operations (aten calls) that run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def record_each_plan(
    model, batch_size: int, mode_factory, prompt_len: int = 4
) -> dict[str, TorchDispatchMode]:
    """One decoding step per chain length, each run inside a fresh `mode_factory()` dispatch mode after
    a step of the same plan (drafting heads caught up, caches warm), `prompt_len` tokens into the text:
    {plan name: its mode}."""
    depth = draft_depth(model.config)
    cache_len = min(prompt_len + 2 * depth + 2, model.config.max_seq_len)
    batch = DecodeBatch(model, batch_size, cache_len)
    prompts = torch.randint(0, model.config.vocab_size, (batch_size, prompt_len)).tolist()
    modes = {}
    try:
        for k in range(depth):
            prefill(batch, prompts)
            plan = DraftPlan.chain(k)
            decode_step(batch, plan, [depth] * batch_size)
            with mode_factory() as mode:
                decode_step(batch, plan, [depth] * batch_size)
            modes[plan.name] = mode
    finally:
        batch.close()
    return modes


def step_operations(model, batch_size: int) -> dict[str, int]:
    """Tensor operations of one decoding step per chain length (each step makes one host sync)."""
    return {name: counter.count for name, counter in record_each_plan(model, batch_size, _OpCounter).items()}


STEP_STREAK = 10
"""Timed steps of one plan in a row in the step table, after one untimed step: generation runs a plan
for streaks of steps, and a plain step right after a drafting one finds part of its weights evicted
(on the demo model at batch 1 on a CPU, 1.33 ms against 1.12 ms in a streak)."""


def bench_step_costs(model, batch_size: int, steps: int, device: str, clock: str) -> dict[str, float]:
    """Median seconds of one decoding step per chain length, relative to a plain step: each plan runs
    streaks of STEP_STREAK timed steps after an untimed one, the plans taking turns, until each has
    `steps` timed steps."""
    depth = draft_depth(model.config)
    plans = [DraftPlan.chain(k) for k in range(depth)]
    cache_len = min(512, model.config.max_seq_len)
    batch = DecodeBatch(model, batch_size, cache_len)
    prompts = torch.randint(0, model.config.vocab_size, (batch_size, 16)).tolist()
    seconds = {plan.name: [] for plan in plans}
    try:
        prefill(batch, prompts)
        for _ in range(-(-steps // STEP_STREAK)):
            for plan in plans:
                for i in range(STEP_STREAK + 1):
                    if max(batch.pos) + depth + 1 >= cache_len - 1:
                        prefill(batch, prompts)
                    took = timed(
                        lambda plan=plan: decode_step(batch, plan, [depth] * batch_size), device, clock
                    )[0]
                    if i:
                        seconds[plan.name].append(took)
    finally:
        batch.close()
    plain = statistics.median(seconds["plain"])
    return {name: statistics.median(s) / plain for name, s in seconds.items()} | {"plain_ms": plain * 1e3}


def bytes_per_plain_step(model, prompt_len: int, max_new_tokens: int, batch_size: int, compiled: bool) -> int:
    """Bytes one plain decoding step reads: the next-token path's weights, and every row's whole KV cache.

    The cache is static, and attention reads all its slots (masking the unused ones), as in gpt-fast.
    """
    path = [*model.trunk, model.heads[0], model.norm, model.output]
    params = {id(p): p for module in path for p in module.parameters()}  # tied weights counted once
    weight_bytes = sum(p.numel() * p.element_size() for p in params.values())
    cache_len = cache_length(prompt_len, max_new_tokens, model.config.max_seq_len, compiled)
    layers = sum(isinstance(m, Attention) for module in path for m in module.modules())
    c, element = model.config, next(model.parameters()).element_size()
    kv_bytes = layers * 2 * batch_size * cache_len * c.n_kv_heads * c.head_dim * element
    return weight_bytes + kv_bytes


def bench_bandwidth(args, model, tokenizer, device) -> None:
    """Batch-1 plain decoding: tokens/s and the share of peak memory bandwidth it reads at."""
    batches = make_prompt_batches(args, model, tokenizer, 1)
    r = bench_decoders(args, model, batches, device, {"plain": dict(speculative=False)})["plain"]
    prompt_len = max(len(batch[0]) for batch in batches)
    step_bytes = bytes_per_plain_step(model, prompt_len, args.max_new_tokens, 1, args.compile)
    gbs = step_bytes * r["tok_s"] / 1e9
    print("## Memory bandwidth of plain decoding, batch 1\n")
    print("| tok/s | MB read per step | GB/s | peak GB/s | fraction of peak |")
    print("|---|---|---|---|---|")
    peak = args.peak_bandwidth_gbs
    print(f"| {r['tok_s']:.0f} | {step_bytes / 1e6:.1f} | {gbs:.1f} | {peak:g} | {gbs / peak:.2f} |\n")


def bench_hf(args, model, hf_model, batches, device, speculative: bool) -> dict:
    """Median seconds of our greedy decoding (plain or speculative) and transformers' generate(), alternating.

    transformers gets the same prompts left-padded, with an attention mask (our decoding needs no padding).
    """
    n = args.max_new_tokens

    def ours():
        calls = [generate(model, b, n, speculative=speculative, compile=args.compile) for b in batches]
        return [row for call in calls for row in call.tokens]

    def hf_call(prompts):
        longest = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (longest - len(p)) + list(p) for p in prompts], device=device)
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = hf_model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
        )
        return out[:, longest:].tolist()

    def hf():
        return [row for b in batches for row in hf_call(b)]

    ours(), hf()
    ours_s, hf_s, a, b = [], [], None, None
    for _ in range(args.repeats):
        t, a = timed(ours, device, args.clock)
        ours_s.append(t)
        t, b = timed(hf, device, args.clock)
        hf_s.append(t)
    new_tokens = sum(len(batch) for batch in batches) * n
    return {
        "ours_tok_s": new_tokens / statistics.median(ours_s),
        "hf_tok_s": new_tokens / statistics.median(hf_s),
        "speedup": statistics.median(hf_s) / statistics.median(ours_s),
        "identical": a == b,
    }


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, description = load_model(args, device)
    model = model.to(dtype=getattr(torch, args.dtype)).eval()
    config = model.config
    depth = draft_depth(config)
    machine = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu"
    print(f"# Decoding benchmark\n\n{description}")
    print(
        f"n_future={config.n_future} offsets={config.head_offsets} style={config.head_style} "
        f"draft depth={depth}, {model.num_params() / 1e6:.1f}M params, {args.dtype}, {device} ({machine}), "
        f"{args.max_new_tokens} new tokens, median of {args.repeats}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {args.clock} clock, "
        f"our decoding step {'compiled' if args.compile else 'eager'} (transformers always eager)\n"
    )

    if depth > 1:
        print("## Plain vs self-speculative greedy decoding\n")
        methods = decoders(args, model)
        print(
            "| batch | method | tok/s | tokens/forward | acceptance per head | speedup | efficiency | identical |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
            batches = make_prompt_batches(args, model, tokenizer, batch_size)
            for name, r in bench_decoders(args, model, batches, device, methods).items():
                acc = " / ".join(f"{a:.2f}" for a in r["acceptance"]) or "-"
                print(
                    f"| {batch_size} | {name} | {r['tok_s']:.0f} | {r['tokens_per_forward']:.2f} | {acc} "
                    f"| {r['speedup']:.2f}x | {r['efficiency']:.2f} | {r['identical']} |"
                )
        print("\nspeedup = plain time / method's time; efficiency = speedup / tokens per forward.\n")
        print(
            f"## One decoding step per chain length, relative to a plain step (median of 200, streaks of {STEP_STREAK})\n"
        )
        names = [DraftPlan.chain(k).name for k in range(depth)]
        ops = step_operations(model, 1)
        print("Tensor operations per step at batch 1: " + ", ".join(f"{n} {c}" for n, c in ops.items()))
        print("(one device-to-host copy per step, whatever the plan)\n")
        print(f"| batch | plain ms | {' | '.join(names[1:])} |")
        print("|---|---|" + "---|" * (depth - 1))
        for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
            r = bench_step_costs(model, batch_size, 200, device, args.clock)
            print(
                f"| {batch_size} | {r['plain_ms']:.2f} | "
                + " | ".join(f"{r[n]:.2f}x" for n in names[1:])
                + " |"
            )
        print()
    else:
        print("(one drafting head: no speculative comparison)\n")

    if args.peak_bandwidth_gbs:
        bench_bandwidth(args, model, tokenizer, device)
    if args.no_hf:
        return
    from multitoken.interop import to_hf_llama

    hf_model = to_hf_llama(model).to(device).eval()
    print("## Our greedy decoding vs transformers generate() (same weights, next-token path)\n")
    print("| batch | ours | ours tok/s | transformers tok/s | ours / transformers | identical tokens |")
    print("|---|---|---|---|---|---|")
    for batch_size in [int(b) for b in args.hf_batch_sizes.split(",")]:
        batches = make_prompt_batches(args, model, tokenizer, batch_size)
        for speculative in (False, True)[: 1 + (depth > 1)]:
            r = bench_hf(args, model, hf_model, batches, device, speculative)
            print(
                f"| {batch_size} | {'speculative' if speculative else 'plain'} | {r['ours_tok_s']:.0f} "
                f"| {r['hf_tok_s']:.0f} | {r['speedup']:.2f}x | {r['identical']} |"
            )


if __name__ == "__main__":
    main()
