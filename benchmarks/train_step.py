"""Training-step cost of multi-token prediction: peak memory, step time, transformers, throughput.

    python benchmarks/train_step.py                                  # every CPU benchmark, a few minutes
    python benchmarks/train_step.py --benchmarks memory --json mem.json
    python benchmarks/train_step.py --device cuda --preset 125m --dtype bfloat16 --compile \\
        --benchmarks throughput --batch-size 8 --seq-len 2048 --peak-tflops 989

Benchmarks (`--benchmarks`, comma-separated):
  memory      peak memory of one forward+backward step: n=4 memory-efficient over n=1, and naive n=4
              over memory-efficient n=4. Each variant runs in a fresh subprocess; on CPU the figure is the
              growth of the peak RSS during the step, on CUDA torch.cuda.max_memory_allocated.
  time        step time (forward+backward) of parameter-matched n=4 over n=1, with the unembedding's
              share measured alongside and the ratio the FLOP count predicts.
  hf          our n=1 step over transformers' LlamaForCausalLM (forward with labels + backward), same
              weights.
  throughput  training tokens/s (forward+backward+AdamW) of a preset at n=1 and n=4, with MFU on CUDA.

memory, time and hf use the "ratio shape" (--dim, --n-layers, --n-heads, --vocab-size, --seq-len,
--batch-size); throughput uses --preset with the --tp-* sizes. Timings alternate between the variants
and report medians of --repeats. Prints markdown tables; --json FILE also writes every figure.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import machine_description, markdown_table, today

from multitoken.config import ModelConfig, preset_config
from multitoken.devices import resolve_device
from multitoken.loss import multi_token_backward
from multitoken.model import MultiTokenLM
from multitoken.studies.measure import (
    Timings,
    current_memory_mib,
    interleaved_times,
    paired_ratio,
    peak_memory_mib,
    reset_peak_memory,
    sync,
)

ALL_BENCHMARKS = ("memory", "time", "hf", "throughput")
# (name, n_future, memory_efficient) for the memory benchmark.
MEMORY_VARIANTS = (("n=1", 1, True), ("n=4", 4, True), ("n=4 naive", 4, False), ("n=1 naive", 1, False))
TARGETS = {"memory": 1.05, "time": 1.05, "hf": 1.0}
TIMING_HEADERS = ["median wall ms", "median CPU ms", "wall range ms"]


# ---- arguments ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--benchmarks", default=",".join(ALL_BENCHMARKS), help="comma-separated subset")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (CUDA when available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="autocast dtype")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (as the trainer)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant (median reported)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE", help="also write every figure to this JSON file")
    shape = parser.add_argument_group("ratio shape (memory, time, hf)")
    shape.add_argument("--dim", type=int, default=256)
    shape.add_argument("--n-layers", type=int, default=6, help="blocks in total, trunk plus heads")
    shape.add_argument("--n-heads", type=int, default=8, help="attention heads per block")
    shape.add_argument("--vocab-size", type=int, default=32000)
    shape.add_argument("--seq-len", type=int, default=1024)
    shape.add_argument("--batch-size", type=int, default=1)
    shape.add_argument("--chunk-size", type=int, default=2048, help="cross-entropy chunk (positions)")
    tput = parser.add_argument_group("throughput")
    tput.add_argument("--preset", default="tiny", help="model preset for the throughput benchmark")
    tput.add_argument("--tp-vocab-size", type=int, default=8192)
    tput.add_argument("--tp-seq-len", type=int, default=256)
    tput.add_argument("--tp-batch-size", type=int, default=8)
    tput.add_argument(
        "--peak-tflops", type=float, help="accelerator peak for MFU, e.g. 989 for H100 bf16 dense"
    )
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.benchmarks = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    unknown = sorted(set(args.benchmarks) - set(ALL_BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(ALL_BENCHMARKS)}")
    args.device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def ratio_config(args: argparse.Namespace, n_future: int) -> ModelConfig:
    """The ratio shape with `n_future` parameter-matched transformer heads."""
    return ModelConfig(
        vocab_size=args.vocab_size,
        dim=args.dim,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        n_future=n_future,
        max_seq_len=args.seq_len,
    )


def shape_line(config: ModelConfig, batch: int, seq_len: int) -> str:
    trunk, heads = config.n_trunk_layers, config.n_future
    return (
        f"dim {config.dim}, {config.n_layers} blocks ({trunk} trunk + {heads} head), {config.n_heads} heads, "
        f"V {config.vocab_size}, B {batch}, T {seq_len}"
    )


def ratio_clock(args: argparse.Namespace) -> str:
    """Ratios use process CPU time on CPU (robust to a shared machine's other jobs), wall time on CUDA."""
    return "wall" if args.device.startswith("cuda") else "cpu"


def timing_rows(times: dict[str, Timings]) -> list[list[object]]:
    """One row per variant: median wall ms, median CPU ms, and the spread of wall times."""
    return [
        [
            name,
            f"{1000 * statistics.median(t.wall_s):.0f}",
            f"{1000 * statistics.median(t.cpu_s):.0f}",
            f"{1000 * min(t.wall_s):.0f}-{1000 * max(t.wall_s):.0f}",
        ]
        for name, t in times.items()
    ]


# ---- building blocks ---------------------------------------------------------------------------------


def build_model(config: ModelConfig, args: argparse.Namespace, seed: int | None = None) -> MultiTokenLM:
    """A random model on the device, in float32 weights; blocks compiled with --compile."""
    torch.manual_seed(args.seed if seed is None else seed)
    model = MultiTokenLM(config).to(args.device)
    if args.compile:
        for module in model.modules():
            if type(module).__name__ == "Block":
                module.compile()
    return model


def random_tokens(vocab_size: int, batch: int, seq_len: int, device: str, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq_len), generator=generator).to(device)


def autocast(args: argparse.Namespace):
    """bfloat16 autocast when asked for, as the trainer does; a no-op context for float32."""
    enabled = args.dtype == "bfloat16"
    return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=enabled)


def ours_step(
    model: MultiTokenLM, tokens_BT: torch.Tensor, args: argparse.Namespace, memory_efficient: bool = True
) -> Callable[[], object]:
    """One forward+backward through multi_token_backward, gradients reset first."""

    def step():
        model.zero_grad(set_to_none=True)
        with autocast(args):
            return multi_token_backward(
                model, tokens_BT, memory_efficient=memory_efficient, chunk_size=args.chunk_size
            )

    return step


def unembedding_step(model: MultiTokenLM, tokens_BT: torch.Tensor, args: argparse.Namespace):
    """Forward+backward of one head's final norm, unembedding and cross-entropy on (B*T, D) states.

    This is the part of a step that n=4 repeats four times; timing it alone says how much of the
    n=4 overhead is the extra logits.
    """
    B, T = tokens_BT.shape
    z_MD = torch.randn(B * (T - 1), model.config.dim, device=args.device, requires_grad=True)
    target_M = tokens_BT[:, 1:].reshape(-1)

    def step():
        model.zero_grad(set_to_none=True)
        with autocast(args):
            for start in range(0, target_M.numel(), args.chunk_size):
                logits_CV = model.logits(z_MD[start : start + args.chunk_size])
                F.cross_entropy(logits_CV.float(), target_M[start : start + args.chunk_size]).backward()

    return step


def flops_per_token(model: MultiTokenLM) -> int:
    """6 x the matmul parameters each token passes through: the unembedding counts once per head.

    The input embedding is a lookup (no FLOPs); attention's T-dependent FLOPs are left out, as in the
    usual 6N estimate.
    """
    config = model.config
    embedding_ids = {id(model.tok_embeddings.weight), id(model.output.weight)}
    body = sum(p.numel() for p in model.parameters() if id(p) not in embedding_ids)
    return 6 * (body + config.n_future * config.vocab_size * config.dim)


# ---- memory ------------------------------------------------------------------------------------------


def memory_worker(args: argparse.Namespace) -> dict:
    """Run in a fresh process: peak memory one step adds, over the model and a short warm-up step.

    The warm-up uses a 16-token sequence, so its high-water mark stays far below the real step's and
    the step's peak is a fresh high-water mark. The figure covers activations, logits and gradients;
    the weights are in the baseline.
    """
    spec = json.loads(args.memory_worker)
    model = build_model(ratio_config(args, spec["n_future"]), args)
    step = ours_step(model, random_tokens(args.vocab_size, 1, 16, args.device, args.seed), args, spec["me"])
    step()
    model.zero_grad(set_to_none=True)
    gc.collect()
    tokens_BT = random_tokens(args.vocab_size, args.batch_size, args.seq_len, args.device, args.seed)
    step = ours_step(model, tokens_BT, args, spec["me"])
    device = torch.device(args.device)
    sync(device)
    reset_peak_memory(device)
    base_mib, high_water_before_mib = current_memory_mib(device), peak_memory_mib(device)
    step()
    sync(device)
    peak_mib = peak_memory_mib(device)
    return {"peak_bytes": (peak_mib - base_mib) * 2**20, "fresh_peak": peak_mib > high_water_before_mib}


def run_memory_variant(args: argparse.Namespace, n_future: int, memory_efficient: bool) -> dict:
    """Start a fresh interpreter for one variant, so no earlier allocation hides its peak.

    glibc's malloc gets a fixed mmap threshold, so large tensors are mapped and unmapped on free
    and the resident size follows the memory in use.
    """
    spec = json.dumps({"n_future": n_future, "me": memory_efficient})
    passthrough = [
        *("--device", args.device, "--dtype", args.dtype, "--seed", str(args.seed)),
        *(("--threads", str(args.threads)) if args.threads else ()),
        *("--dim", str(args.dim), "--n-layers", str(args.n_layers), "--n-heads", str(args.n_heads)),
        *("--vocab-size", str(args.vocab_size), "--seq-len", str(args.seq_len)),
        *("--batch-size", str(args.batch_size), "--chunk-size", str(args.chunk_size)),
    ]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    command = [sys.executable, os.path.abspath(__file__), *passthrough, "--memory-worker", spec]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"memory worker failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench_memory(args: argparse.Namespace) -> dict:
    """Peak step memory of every variant in MiB, and the two ratios."""
    logits_mib = args.batch_size * args.seq_len * args.vocab_size * 4 / 2**20
    rows, peaks = [], {}
    for name, n_future, memory_efficient in MEMORY_VARIANTS:
        result = run_memory_variant(args, n_future, memory_efficient)
        peaks[name] = result["peak_bytes"] / 2**20
        note = "" if result["fresh_peak"] else " (not a fresh high-water mark: lower bound)"
        rows.append([name, "memory-efficient" if memory_efficient else "naive", f"{peaks[name]:.0f}{note}"])
    ratio_n4 = peaks["n=4"] / peaks["n=1"]
    ratio_naive = peaks["n=4 naive"] / peaks["n=4"]
    print("## Peak memory of one training step\n")
    print(shape_line(ratio_config(args, 4), args.batch_size, args.seq_len))
    print(f"one float32 logits tensor (B*T*V) = {logits_mib:.0f} MiB\n")
    print(markdown_table(["variant", "loss path", "peak step memory (MiB)"], rows))
    print(
        f"\nn=4 / n=1 (memory-efficient): **{ratio_n4:.3f}** (target <= {TARGETS['memory']})  \n"
        f"naive n=4 / memory-efficient n=4: **{ratio_naive:.2f}**\n"
    )
    return {"peak_mib": peaks, "n4_over_n1": ratio_n4, "naive_over_efficient": ratio_naive}


# ---- step time ---------------------------------------------------------------------------------------


def bench_time(args: argparse.Namespace) -> dict:
    """n=4 over n=1 step time, both parameter-matched, with the unembedding's cost beside them."""
    tokens_BT = random_tokens(args.vocab_size, args.batch_size, args.seq_len, args.device, args.seed)
    models = {n: build_model(ratio_config(args, n), args) for n in (1, 4)}
    fns = {
        "n=1": ours_step(models[1], tokens_BT, args),
        "n=4": ours_step(models[4], tokens_BT, args),
        "unembedding+CE, one head": unembedding_step(models[1], tokens_BT, args),
    }
    times = interleaved_times(fns, args.repeats, args.device)
    clock = ratio_clock(args)
    n1_s, n4_s = (
        statistics.median(times["n=1"].seconds(clock)),
        statistics.median(times["n=4"].seconds(clock)),
    )
    unembedding_s = statistics.median(times["unembedding+CE, one head"].seconds(clock))
    ratio = paired_ratio(times["n=4"].seconds(clock), times["n=1"].seconds(clock))
    flop_ratio = flops_per_token(models[4]) / flops_per_token(models[1])
    explained = (3 * unembedding_s) / (n4_s - n1_s)
    print("## Step time, parameter-matched n=4 over n=1\n")
    print(shape_line(models[4].config, args.batch_size, args.seq_len) + f", {args.repeats} repeats\n")
    print(markdown_table(["step (forward+backward)", *TIMING_HEADERS], timing_rows(times)))
    print(
        f"\nn=4 / n=1 ({clock} time, median of paired ratios): **{ratio:.2f}** "
        f"(target <= {TARGETS['time']}); the FLOP model predicts {flop_ratio:.2f}  \n"
        f"3 x (unembedding+CE of one head) = {1000 * 3 * unembedding_s:.0f} ms of the "
        f"{1000 * (n4_s - n1_s):.0f} ms n=4 adds ({100 * explained:.0f}%)\n"
    )
    return {
        "times": {name: vars(t) for name, t in times.items()},
        "clock": clock,
        "n4_over_n1": ratio,
        "flop_ratio": flop_ratio,
        "extra_logits_share_of_overhead": explained,
    }


def predicted_ratios() -> list[list[object]]:
    """FLOP-model n=4/n=1 step-time ratios at the paper's scales (V = 32000, parameter-matched)."""
    rows = []
    for name in ("125m", "350m", "1b", "7b"):
        configs = [preset_config(name, vocab_size=32000, n_future=n) for n in (1, 4)]
        with torch.device("meta"):
            flops = [flops_per_token(MultiTokenLM(c)) for c in configs]
        rows.append([name, f"{flops[1] / flops[0]:.3f}"])
    return rows


# ---- transformers ------------------------------------------------------------------------------------


def bench_hf(args: argparse.Namespace) -> dict:
    """Our n=1 step (memory-efficient and naive loss) over LlamaForCausalLM's, same weights and batch."""
    from multitoken.interop import to_hf_llama

    tokens_BT = random_tokens(args.vocab_size, args.batch_size, args.seq_len, args.device, args.seed)
    model = build_model(ratio_config(args, 1), args)
    hf_model = to_hf_llama(model).to(args.device).train()

    def hf_step():
        hf_model.zero_grad(set_to_none=True)
        with autocast(args):
            loss = hf_model(input_ids=tokens_BT, labels=tokens_BT).loss
        loss.backward()

    fns = {
        "ours (memory-efficient loss)": ours_step(model, tokens_BT, args),
        "ours (naive loss)": ours_step(model, tokens_BT, args, memory_efficient=False),
        "transformers": hf_step,
    }
    times = interleaved_times(fns, args.repeats, args.device)
    clock = ratio_clock(args)
    ratios = {
        name: paired_ratio(t.seconds(clock), times["transformers"].seconds(clock))
        for name, t in times.items()
    }
    print("## Our n=1 training step against transformers LlamaForCausalLM\n")
    print(shape_line(model.config, args.batch_size, args.seq_len) + f", {args.repeats} repeats\n")
    rows = [[*row, f"{ratios[row[0]]:.3f}"] for row in timing_rows(times)]
    print(markdown_table(["forward+backward", *TIMING_HEADERS, f"over transformers ({clock})"], rows))
    ratio = ratios["ours (memory-efficient loss)"]
    print(f"\nours / transformers: **{ratio:.3f}** (target <= {TARGETS['hf']})\n")
    return {"times": {name: vars(t) for name, t in times.items()}, "clock": clock, "over_hf": ratios}


# ---- throughput --------------------------------------------------------------------------------------


def train_step(model: MultiTokenLM, tokens_BT: torch.Tensor, args: argparse.Namespace):
    """forward+backward+AdamW, as a training loop runs it (fused AdamW on CUDA)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=args.device.startswith("cuda"))
    step = ours_step(model, tokens_BT, args)

    def full_step():
        step()
        optimizer.step()

    return full_step


def bench_throughput(args: argparse.Namespace) -> dict:
    """Training tokens/s of the preset at n=1 and n=4, and MFU when --peak-tflops is given."""
    batch, seq_len = args.tp_batch_size, args.tp_seq_len
    tokens_BT = random_tokens(args.tp_vocab_size, batch, seq_len, args.device, args.seed)
    models = {
        n: build_model(preset_config(args.preset, vocab_size=args.tp_vocab_size, n_future=n), args)
        for n in (1, 4)
    }
    fns = {f"n={n}": train_step(model, tokens_BT, args) for n, model in models.items()}
    times = interleaved_times(fns, args.repeats, args.device, warmup=2 if args.compile else 1)
    rows, results = [], {}
    for n, model in models.items():
        wall_tok_s = batch * seq_len / statistics.median(times[f"n={n}"].wall_s)
        cpu_tok_s = batch * seq_len / statistics.median(times[f"n={n}"].cpu_s)
        flops = flops_per_token(model)
        mfu = flops * wall_tok_s / (args.peak_tflops * 1e12) if args.peak_tflops else None
        results[f"n={n}"] = {
            "tokens_per_s": wall_tok_s,
            "tokens_per_cpu_s": cpu_tok_s,
            "flops_per_token": flops,
            "mfu": mfu,
            "times": vars(times[f"n={n}"]),
        }
        mfu_cell = f"{100 * mfu:.1f}%" if mfu is not None else "-"
        rows.append(
            [
                f"n={n}",
                f"{model.num_params() / 1e6:.1f}M",
                f"{wall_tok_s:,.0f}",
                f"{cpu_tok_s:,.0f}",
                mfu_cell,
            ]
        )
    print(f"## Training throughput, preset {args.preset}\n")
    print(
        f"{shape_line(models[4].config, batch, seq_len)}; forward+backward+AdamW, {args.dtype}"
        f"{', compiled blocks' if args.compile else ''}, median of {args.repeats}\n"
    )
    print(markdown_table(["heads", "params", "tokens/s (wall)", "tokens per CPU-second", "MFU"], rows))
    print(
        "\nMFU = 6 x (block parameters + n x V x D) x tokens/s / peak FLOP/s"
        f"{f' ({args.peak_tflops:g} TFLOP/s)' if args.peak_tflops else ' (pass --peak-tflops)'}\n"
    )
    return results


# ---- main --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.memory_worker:
        print(json.dumps(memory_worker(args)))
        return
    print(f"# Training-step benchmark\n\n{machine_description(args.device)}, {args.dtype}, {today()}\n")
    benches = {"memory": bench_memory, "time": bench_time, "hf": bench_hf, "throughput": bench_throughput}
    results = {"machine": machine_description(args.device), "date": today(), "args": vars(args)}
    for name in args.benchmarks:
        results[name] = benches[name](args)
    if "time" in args.benchmarks:
        print("FLOP-model n=4 / n=1 at larger presets (V 32000, parameter-matched):\n")
        print(markdown_table(["preset", "predicted n=4 / n=1"], predicted_ratios()) + "\n")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
