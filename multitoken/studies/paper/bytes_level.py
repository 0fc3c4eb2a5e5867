"""`multitoken experiment bytes`: byte-level next-token (n = 1) against 8-token (n = 8) prediction on code.

Measures bits per byte of the next-token head and self-speculative decoding on held-out code prompts
(tokens per forward pass and wall-clock speedup over plain greedy decoding; paper: 7.04 tokens per
forward and 6.39x at 7B).
"""

from __future__ import annotations

from pathlib import Path

from multitoken.studies.paper.code_runs import BytesOptions, CodeScale, run_code_study
from multitoken.studies.report import Report
from multitoken.studies.runs import print_table

N_FUTURE = (1, 8)
"""Heads compared."""

SCALES = {
    "debug": CodeScale(dim=32, n_layers=8, n_heads=2, max_steps=10, batch_size=4, seq_len=64, max_documents=30,
                       n_prompts=2, prompt_len=32, max_new_tokens=16),
    "small": CodeScale(dim=128, n_layers=10, n_heads=4, max_steps=600, batch_size=16, seq_len=256,
                       max_documents=0, n_prompts=16, prompt_len=128, max_new_tokens=128),
    "medium": CodeScale(dim=512, n_layers=12, n_heads=8, max_steps=10_000, batch_size=64, seq_len=1024,
                        max_documents=0, n_prompts=64, prompt_len=256, max_new_tokens=256, lr=1e-3),
    "large": CodeScale(dim=1024, n_layers=16, n_heads=16, max_steps=30_000, batch_size=128, seq_len=2048,
                       max_documents=0, n_prompts=128, prompt_len=512, max_new_tokens=512, lr=6e-4),
}  # fmt: skip


def bytes_experiment(options: BytesOptions) -> dict:
    """Byte-level models on code: n = 8 against n = 1, bits per byte and self-speculative speedup."""
    root, preset, results = run_code_study(options, SCALES, "byte", N_FUTURE)
    _write_report(root, options.scale, preset, results)
    return results


def _write_report(root: Path, scale: str, preset: CodeScale, results: dict) -> None:
    report = Report(
        root,
        title="Byte-level multi-token prediction on code",
        question=(
            "At the byte level, does predicting n = 8 future bytes keep next-byte quality (bits per byte) "
            "while letting self-speculative decoding emit several bytes per forward pass?"
        ),
    )
    fig, (axes,) = report.figure(1, 2, width=5.5)
    names = [f"n = {r['n_future']}" for r in results.values()]
    axes[0].bar(names, [r["bits_per_byte"] for r in results.values()], color=["tab:blue", "tab:orange"])
    axes[0].set_ylabel("next-byte validation loss (bits per byte)")
    axes[0].set_title("Next-byte quality")
    multi = results[f"n{N_FUTURE[-1]}"]
    acc = multi["speculative"]["acceptance_per_head"]
    axes[1].plot(range(2, 2 + len(acc)), [100 * a for a in acc], marker="o", color="tab:orange")
    axes[1].set_xlabel("drafting head (future offset, bytes)")
    axes[1].set_ylabel("drafts accepted when reached (%)")
    axes[1].set_ylim(0, 100)
    axes[1].set_title(
        f"n = {N_FUTURE[-1]}: {multi['speculative']['tokens_per_forward']:.2f} bytes per forward, "
        f"{multi['speculative']['speedup']:.2f}x"
    )
    report.save_figure(fig, "bytes.png", "Bits per byte of each model, and acceptance of each drafting head")
    header = ["n", "params", "bits per byte", "bytes per forward", "speedup (x)", "greedy-identical (%)"]
    rows = [
        [r["n_future"], r["params"], r["bits_per_byte"], r["speculative"]["tokens_per_forward"],
         r["speculative"]["speedup"], 100 * r["speculative"]["identical"]]
        for r in results.values()
    ]  # fmt: skip
    report.add_table(header, rows, "Bits per byte and self-speculative decoding on held-out code prompts")
    base = results["n1"]
    answer = (
        f"n = {N_FUTURE[-1]} gets {multi['bits_per_byte']:.3f} bits per byte against {base['bits_per_byte']:.3f} "
        f"for n = 1, and decodes {multi['speculative']['tokens_per_forward']:.2f} bytes per forward pass "
        f"({multi['speculative']['speedup']:.2f}x wall-clock over plain greedy decoding, batch 1, "
        f"{preset.n_prompts} prompts x {preset.max_new_tokens} bytes). Paper at 7B: 7.04 bytes per forward, 6.39x."
    )
    report.write(
        answer,
        results,
        details={
            "scale": scale,
            "model": f"dim {preset.dim}, {preset.n_layers} blocks in total, byte tokens",
            "training": f"{preset.max_steps} steps x {preset.batch_size} x {preset.seq_len} bytes",
            "bits per byte": f"next-token cross-entropy in bits over the UTF-8 bytes of the targets, on up to "
            f"{preset.eval_windows} validation windows (end-of-document tokens: their loss counts, zero bytes)",
        },
    )
    print_table("bytes: n = 8 vs n = 1", header, rows)
