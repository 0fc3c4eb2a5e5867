"""`multitoken experiment nsweep`: n in {1, 2, 4, 6, 8} on a BPE code corpus, parameter-matched.

Every model has the same number of blocks (extra heads take theirs from the trunk). Measured: next-token
validation loss, every head's top-1 accuracy, self-speculative tokens per forward, training step time
and peak memory (CUDA max allocated, or the RSS high-water mark on CPU).
"""

from __future__ import annotations

from pathlib import Path

from multitoken.studies.paper.code_runs import CodeScale, NsweepOptions, run_code_study
from multitoken.studies.report import Report
from multitoken.studies.runs import print_table, resolve_device

N_FUTURE = (1, 2, 4, 6, 8)
"""Heads swept."""
QUESTION = (
    "With the block count fixed, how do next-token loss, per-head accuracy, self-speculative tokens "
    "per forward, step time and memory change as the number of heads n grows from 1 to 8?"
)
"""What the report answers."""

SCALES = {
    "debug": CodeScale(dim=32, n_layers=8, n_heads=2, max_steps=8, batch_size=4, seq_len=64, max_documents=30,
                       vocab_size=400, n_prompts=2, prompt_len=16, max_new_tokens=16),
    "small": CodeScale(dim=128, n_layers=8, n_heads=4, max_steps=250, batch_size=16, seq_len=128,
                       max_documents=400, vocab_size=4096, n_prompts=16, prompt_len=64, max_new_tokens=64),
    "medium": CodeScale(dim=512, n_layers=12, n_heads=8, max_steps=10_000, batch_size=64, seq_len=1024,
                        max_documents=0, vocab_size=8192, n_prompts=64, prompt_len=128, max_new_tokens=128, lr=1e-3),
    "large": CodeScale(dim=1024, n_layers=16, n_heads=16, max_steps=30_000, batch_size=128, seq_len=2048,
                       max_documents=0, vocab_size=32768, n_prompts=128, prompt_len=256, max_new_tokens=256, lr=6e-4),
}  # fmt: skip


def nsweep(options: NsweepOptions) -> dict:
    """Sweep the number of heads n in {1, 2, 4, 6, 8} on code (BPE), with the block count held fixed."""
    root, preset, results = run_code_study(options, SCALES, "bpe", N_FUTURE)
    _write_report(root, options.scale, preset, results, resolve_device(options.device))
    return results


def _write_report(root: Path, scale: str, preset: CodeScale, results: dict, device: str) -> None:
    report = Report(root, title="Number of predicted tokens n on code (BPE)", question=QUESTION)
    rs = list(results.values())
    ns = [r["n_future"] for r in rs]
    fig, axes = report.figure(2, 2, width=5.5, height=4.0)
    axes[0][0].plot(ns, [r["val_loss"] for r in rs], marker="o")
    axes[0][0].set_xlabel("heads n")
    axes[0][0].set_ylabel("next-token validation loss (nats)")
    axes[0][0].set_title("Next-token loss")
    for r in rs:
        acc = r["val_acc_per_head"]
        axes[0][1].plot(
            range(1, len(acc) + 1), [100 * a for a in acc], marker=".", label=f"n = {r['n_future']}"
        )
    axes[0][1].set_xlabel("head (future offset, tokens)")
    axes[0][1].set_ylabel("validation top-1 accuracy (%)")
    axes[0][1].set_title("Per-head accuracy")
    axes[0][1].legend(fontsize=8)
    axes[1][0].plot(
        ns, [r["speculative"]["tokens_per_forward"] for r in rs], marker="o", label="tokens per forward"
    )
    axes[1][0].plot(ns, [r["speculative"]["speedup"] for r in rs], marker="s", label="wall-clock speedup (x)")
    axes[1][0].set_xlabel("heads n")
    axes[1][0].set_ylabel("tokens per forward / speedup (x)")
    axes[1][0].set_title("Self-speculative decoding")
    axes[1][0].legend(fontsize=8)
    base_step = rs[0]["step_seconds"]
    axes[1][1].plot(ns, [r["step_seconds"] / base_step for r in rs], marker="o", color="tab:red")
    axes[1][1].set_xlabel("heads n")
    axes[1][1].set_ylabel("training step time relative to n = 1", color="tab:red")
    memory_ax = axes[1][1].twinx()
    memory_ax.plot(ns, [r["peak_memory_increase_mib"] for r in rs], marker="s", color="tab:green")
    memory_ax.set_ylabel("peak memory over start of training (MiB)", color="tab:green")
    axes[1][1].set_title("Training cost")
    report.save_figure(fig, "nsweep.png", "Loss, per-head accuracy, speculative decoding and cost against n")
    header = ["n", "params", "val loss (nats)", "bits per byte", "head-1 acc (%)", "tokens/forward", "speedup (x)",
              "step time (s)", "step time vs n=1", "peak memory (MiB)", "peak over start (MiB)"]  # fmt: skip
    rows = [
        [r["n_future"], r["params"], r["val_loss"], r["bits_per_byte"], 100 * r["val_acc_per_head"][0],
         r["speculative"]["tokens_per_forward"], r["speculative"]["speedup"], r["step_seconds"],
         r["step_seconds"] / base_step, r["peak_memory_mib"], r["peak_memory_increase_mib"]]
        for r in rs
    ]  # fmt: skip
    report.add_table(header, rows, "Per n (same blocks, seed, data and steps)")
    best = min(rs, key=lambda r: r["val_loss"])
    fastest = max(rs, key=lambda r: r["speculative"]["tokens_per_forward"])
    answer = (
        f"Lowest next-token loss: n = {best['n_future']} ({best['val_loss']:.3f} nats; n = 1: {rs[0]['val_loss']:.3f}). "
        f"Most tokens per forward: n = {fastest['n_future']} ({fastest['speculative']['tokens_per_forward']:.2f}, "
        f"{fastest['speculative']['speedup']:.2f}x wall-clock). Step time at n = {ns[-1]} is "
        f"{rs[-1]['step_seconds'] / base_step:.2f}x that of n = 1 (paper, Table S5: 1.22x for n = 4 at 0.3B)."
        + (" Debug-scale step times are noise (see details)." if scale == "debug" else "")
    )
    memory_note = (
        ("torch.cuda.max_memory_allocated" if device.startswith("cuda") else "RSS high-water mark (VmHWM)")
        + " of the process that trained the run (each run trains in a fresh process), and its increase over the start"
    )
    report.write(
        answer,
        results,
        details={
            "scale": scale,
            "model": f"dim {preset.dim}, {preset.n_layers} blocks in total for every n, BPE vocab {preset.vocab_size}",
            "training": f"{preset.max_steps} steps x {preset.batch_size} x {preset.seq_len} tokens",
            "peak memory": memory_note,
            "step time": "median over logged steps of batch tokens / tokens per second"
            + (
                "; at --scale debug a run is a few millisecond steps of a tiny model, so one scheduling hiccup "
                "on a shared machine can make a ratio 10-20x: do not read step times from a debug report"
                if scale == "debug"
                else ""
            ),
            "validation": f"evaluate_loss on up to {preset.eval_windows} windows of {preset.seq_len} tokens",
        },
    )
    print_table("nsweep: n = 1, 2, 4, 6, 8", header, rows)
