"""Training step of heads on a frozen base (`train --train heads [--distill]`) against a full step.

    python benchmarks/heads_step.py --threads 1                     # CPU, the `small` preset, a minute
    python benchmarks/heads_step.py --device cuda --preset 125m --seq-len 1024 --batch-size 8

Variants, one optimizer step each (forward, backward, AdamW): `full` trains every parameter of an
n-head model (the step of training MTP from scratch); `heads` freezes the next-token path (trunk under
no_grad, optimizer over the extra heads); `heads+distill` adds self-distillation (soft targets from the
next-token head); `full n=1` is the base's own step (a model with one head). Step time: medians of --repeats, the variants alternating; the ratio to `full` is the median of
back-to-back pairs of process CPU time, which a busy shared machine disturbs less than wall time. Peak memory: each variant
in a fresh process, the growth of the peak RSS (CPU) or of max_memory_allocated (CUDA) over one step.
Prints a markdown table; --json FILE also writes the figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from statistics import median

import torch
from common import machine_description, markdown_table, today

from multitoken.config import preset_config
from multitoken.devices import resolve_device
from multitoken.loss import multi_token_backward
from multitoken.model import MultiTokenLM
from multitoken.studies.measure import (
    current_memory_mib,
    interleaved_times,
    paired_ratio,
    peak_memory_mib,
    reset_peak_memory,
    sync,
)
from multitoken.train import freeze_next_token_path

# name -> (heads, what trains, distill); heads None means --n-future.
VARIANTS = {
    "full": (None, "all", False),
    "heads": (None, "heads", False),
    "heads+distill": (None, "heads", True),
    "full n=1": (1, "all", False),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--n-future", type=int, default=4)
    parser.add_argument("--head-style", default="linear")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.device = str(resolve_device(args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def make_step(args: argparse.Namespace, variant: str):
    """A closure running one optimizer step of `variant` on a batch (a fixed random one by default)."""
    n_future, train, distill = VARIANTS[variant]
    torch.manual_seed(args.seed)
    config = preset_config(
        args.preset,
        vocab_size=args.vocab_size,
        n_future=n_future or args.n_future,
        head_style=args.head_style,
    )
    model = MultiTokenLM(config).to(args.device)
    if train == "heads":
        freeze_next_token_path(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    fixed_BT = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=args.device)

    def step(tokens_BT: torch.Tensor = fixed_BT) -> None:
        multi_token_backward(model, tokens_BT, distill=distill)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def memory_worker(args: argparse.Namespace) -> dict:
    """In a fresh process: the peak memory one step adds over the model and its optimizer state.

    A warm-up step on a 16-token batch allocates the optimizer state; then the peak window is reset
    (CUDA peak stats, or the RSS high-water mark through /proc/self/clear_refs) and read back after
    the measured step (`multitoken.studies.measure`).
    """
    step = make_step(args, args.memory_worker)
    step(torch.randint(0, args.vocab_size, (1, 16), device=args.device))
    gc.collect()
    device = torch.device(args.device)
    sync(device)
    reset_peak_memory(device)
    base_mib = current_memory_mib(device)
    step()
    sync(device)
    return {"peak_bytes": (peak_memory_mib(device) - base_mib) * 2**20}


def peak_mib(args: argparse.Namespace, variant: str) -> float:
    passthrough = [a for a in sys.argv[1:] if a != "--json" and not a.endswith(".json")]
    command = [sys.executable, os.path.abspath(__file__), *passthrough, "--memory-worker", variant]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"memory worker failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"] / 2**20


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.memory_worker:
        print(json.dumps(memory_worker(args)))
        return
    steps = {name: make_step(args, name) for name in VARIANTS}
    times = interleaved_times(steps, args.repeats, args.device)
    peaks = {name: peak_mib(args, name) for name in VARIANTS}
    rows = []
    for name in VARIANTS:
        wall, cpu = times[name].wall_s, times[name].cpu_s
        rows.append(
            [
                name,
                f"{median(wall) * 1e3:.0f}",
                f"{median(cpu) * 1e3:.0f}",
                f"{paired_ratio(cpu, times['full'].cpu_s):.2f}",
                f"{peaks[name]:.0f}",
                f"{peaks[name] / peaks['full']:.2f}",
            ]
        )
    print(f"## Heads on a frozen base: one training step ({today()})\n")
    print(
        f"preset {args.preset}, n_future={args.n_future} {args.head_style} heads, vocab {args.vocab_size}, "
        f"batch {args.batch_size} x {args.seq_len} tokens; {machine_description(args.device)}\n"
    )
    headers = [
        "variant",
        "median wall ms",
        "median CPU ms",
        "CPU time / full",
        "peak step MiB",
        "memory / full",
    ]
    print(markdown_table(headers, rows))
    if args.json:
        figures = {
            n: {"wall_s": times[n].wall_s, "cpu_s": times[n].cpu_s, "peak_mib": peaks[n]} for n in VARIANTS
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
