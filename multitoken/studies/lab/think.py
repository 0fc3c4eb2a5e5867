"""`multitoken lab think`: does a scratchpad help a small LM add, and does multi-token prediction change that?

Byte-level models learn d-digit addition (both operands have d digits) in three formats, at the same
training-token budget (same steps, batch and window), with n = 1 and n = 2 heads:

    direct      95+17=112
    reversed    95+17=211                        answer digits least-significant first, as carries flow
    scratchpad  95+17=5+7=2 c1;9+1+1=1 c1;=112   one step per digit, least-significant first

A scratchpad step is `x+y=s cC` for the units digit and `x+y+c=s cC` afterwards: the operand digits,
the incoming carry, the sum digit and the outgoing carry; after the last step, `=` and the answer.
Greedy continuations of `a+b=` on held-out pairs are scored by exact match of the final answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from multitoken.checkpoint import load_model
from multitoken.generate import generate
from multitoken.studies import runs as study
from multitoken.studies.corpora.arithmetic import (
    completion,
    document,
    extract_answer,
    held_out_pairs,
    prepare_format,
    prompt,
    train_pairs,
)
from multitoken.studies.report import Report
from multitoken.studies.runs import (
    ModelBudget,
    final_validation,
    pick_scale,
    print_table,
    resolve_device,
)
from multitoken.tokenizer import byte_tokenizer

FORMATS = ("direct", "reversed", "scratchpad")
"""Answer formats compared."""
N_FUTURE = (1, 2)
"""Heads compared."""
QUESTION = (
    "Does giving the model time to think (a scratchpad) help it compute, and does multi-token prediction "
    "change that?"
)
"""What the report answers."""


@dataclass(kw_only=True)
class ThinkScale(ModelBudget):
    """Budget of one scale."""

    digits: tuple[int, int]
    """Digits per operand, inclusive range (trained and tested)."""
    n_train: int
    """Training problems per format (the token budget, not this, is what is matched)."""
    n_test: int
    """Held-out test problems per digit count (at most a quarter of the possible pairs)."""


SCALES = {
    "debug": ThinkScale(digits=(1, 2), dim=32, n_layers=2, n_heads=2, max_steps=8, batch_size=4, seq_len=64,
                        n_train=400, n_test=4),
    "small": ThinkScale(digits=(1, 4), dim=96, n_layers=4, n_heads=4, max_steps=300, batch_size=32,
                        seq_len=128, n_train=60_000, n_test=50),
}  # fmt: skip
"""debug: seconds (tests); small: about 15 minutes on a 2-core CPU (estimated, 6 models)."""


# ---- formats -------------------------------------------------------------------------------------------


# ---- scoring -------------------------------------------------------------------------------------------


@torch.no_grad()
def exact_match(model, fmt: str, pairs: list[tuple[int, int]], batch_size: int = 64) -> float:
    """Fraction of pairs whose greedy continuation of `a+b=` stops (EOS) with the right final answer."""
    tokenizer = byte_tokenizer()
    correct = 0
    for first in range(0, len(pairs), batch_size):
        batch = pairs[first : first + batch_size]
        prompts = [[tokenizer.eos_id, *tokenizer.encode(prompt(a, b))] for a, b in batch]
        budget = max(len(completion(fmt, a, b)) for a, b in batch) + 4
        out = generate(model, prompts, budget, eos_id=tokenizer.eos_id, speculative=False)
        for (a, b), tokens, reason in zip(batch, out.tokens, out.finish_reasons, strict=True):
            correct += reason == "eos" and extract_answer(fmt, tokenizer.decode(tokens)) == str(a + b)
    return correct / max(len(pairs), 1)


def mean(values: list[float]) -> float:
    """Arithmetic mean (0 for none)."""
    return sum(values) / len(values) if values else 0.0


# ---- training ------------------------------------------------------------------------------------------


def train_one(
    root: Path, data: Path, fmt: str, n: int, preset: ThinkScale, seed: int, device: str, progress: bool
) -> Path:
    """Train (or resume, or reuse) the model of one format and head count; returns its run directory."""
    return preset.train(
        data=data,
        out=root / "runs" / f"{fmt}-n{n}",
        model=preset.model_fields(n, max_seq_len=256),
        seed=seed,
        device=device,
        progress=progress,
    )


def run_think(out: str, scale: str, seed: int, device: str, command: list[str]) -> dict[str, dict]:
    """Prepare the three formats, train n = 1 and 2 on each, score them, write the report; the results."""
    preset = pick_scale(scale, SCALES)
    device = resolve_device(device)
    root = Path(out)
    tests = held_out_pairs(seed + 1, preset.digits, preset.n_test)
    held_out = {pair for pairs in tests.values() for pair in pairs}
    pairs = train_pairs(seed, preset.digits, preset.n_train, held_out)
    tokens = preset.max_steps * preset.batch_size * preset.seq_len
    results: dict[str, dict] = {}
    for fmt in FORMATS:
        data = prepare_format(root, fmt, pairs, seed)
        doc_tokens = mean([len(document(fmt, a, b)) + 1 for a, b in pairs])
        for n in N_FUTURE:
            run_dir = train_one(root, data, fmt, n, preset, seed, device, scale != "debug")
            model = load_model(run_dir, device)
            model.eval()
            by_digits = {d: exact_match(model, fmt, test) for d, test in tests.items()}
            results[f"{fmt}-n{n}"] = {
                "format": fmt,
                "n_future": n,
                "params": model.num_params(),
                "val_loss": final_validation(run_dir)["val_loss"],
                "train_tokens": tokens,
                "problems_seen": tokens / doc_tokens,
                "exact_match_by_digits": by_digits,
                "exact_match_mean": mean(list(by_digits.values())),
            }
    write_report(root, scale, preset, results, tests, command)
    return results


# ---- report --------------------------------------------------------------------------------------------


def plot(report: Report, results: dict[str, dict], scale: str, preset: ThinkScale) -> None:
    """Exact match vs digits: one colour per format, n = 1 solid and n = 2 dashed."""
    fig, ax = report.figure()
    colours = dict(zip(FORMATS, ("tab:blue", "tab:orange", "tab:green"), strict=True))
    for r in results.values():
        digits = sorted(r["exact_match_by_digits"])
        ax.plot(
            digits,
            [100 * r["exact_match_by_digits"][d] for d in digits],
            marker="o",
            color=colours[r["format"]],
            linestyle="-" if r["n_future"] == 1 else "--",
            label=f"{r['format']}, n = {r['n_future']}",
        )
    ax.set_xlabel("digits per operand")
    ax.set_ylabel("greedy exact match on held-out sums (%)")
    ax.set_xticks(range(preset.digits[0], preset.digits[1] + 1))
    ax.set_ylim(-2, 102)
    ax.set_title(f"Addition with and without a scratchpad, {scale} scale (equal training tokens)")
    ax.legend()
    report.save_figure(fig, "think.png", "Exact match by digits per operand; n = 1 solid, n = 2 dashed")


def table(results: dict[str, dict], preset: ThinkScale) -> tuple[list[str], list[list]]:
    """Header and rows: one row per format and n, exact match per digit count and on average."""
    digits = list(range(preset.digits[0], preset.digits[1] + 1))
    header = [
        "format",
        "n",
        "val loss (nats)",
        "problems seen",
        *[f"{d} digit{'s' * (d > 1)} (%)" for d in digits],
        "mean (%)",
    ]
    rows = [
        [r["format"], r["n_future"], r["val_loss"], round(r["problems_seen"]),
         *[100 * r["exact_match_by_digits"][d] for d in digits], 100 * r["exact_match_mean"]]
        for r in results.values()
    ]  # fmt: skip
    return header, rows


LEARNED_THRESHOLD = 10.0
"""Mean exact match (%) below which the report says that no format was learned."""


def _two_standard_errors(a_pct: float, b_pct: float, n: int) -> float:
    """Two binomial standard errors (in points) of the difference of two exact-match rates over n problems."""
    a, b = a_pct / 100, b_pct / 100
    return 200 * ((a * (1 - a) + b * (1 - b)) / max(n, 1)) ** 0.5


def answer_text(results: dict[str, dict], preset: ThinkScale, tests: dict[int, list]) -> str:
    """The answer paragraph, computed from the exact-match numbers."""
    top = preset.digits[1]

    def em(fmt: str, n: int) -> float:
        return 100 * results[f"{fmt}-n{n}"]["exact_match_mean"]

    def em_top(fmt: str, n: int) -> float:
        return 100 * results[f"{fmt}-n{n}"]["exact_match_by_digits"][top]

    n_test = sum(len(pairs) for pairs in tests.values())
    sizes = sorted({len(pairs) for pairs in tests.values()})
    size_text = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
    ratio = results["scratchpad-n1"]["problems_seen"] / results["direct-n1"]["problems_seen"]
    parts = []
    for n in N_FUTURE:
        scores = {fmt: em(fmt, n) for fmt in FORMATS}
        leaders = [fmt for fmt in FORMATS if scores[fmt] == max(scores.values())]
        best = leaders[0] if len(leaders) == 1 else "a tie of " + " and ".join(leaders)
        gap = em("scratchpad", n) - em("direct", n)
        noise = _two_standard_errors(em("scratchpad", n), em("direct", n), n_test)
        verdict = "makes no difference beyond noise" if abs(gap) <= noise else "helps" if gap > 0 else "hurts"
        parts.append(
            f"with n={n}, mean exact match is "
            + ", ".join(f"{fmt} {em(fmt, n):.1f}%" for fmt in FORMATS)
            + f" (best: {best}); the scratchpad {verdict} ({gap:+.1f} points over direct; at {top} digits "
            f"{em_top('scratchpad', n):.1f}% vs {em_top('direct', n):.1f}%, reversed {em_top('reversed', n):.1f}%)"
        )
    change = (em("scratchpad", 2) - em("direct", 2)) - (em("scratchpad", 1) - em("direct", 1))
    mtp = [f"{fmt} {em(fmt, 2) - em(fmt, 1):+.1f}" for fmt in FORMATS]
    best_mean = max(em(fmt, n) for fmt in FORMATS for n in N_FUTURE)
    lead = (
        f"No format was learned at this budget (the best mean exact match is {best_mean:.1f}%). "
        if best_mean < LEARNED_THRESHOLD
        else ""
    )
    return (
        lead + "W" + "; ".join(parts)[1:] + ". "
        f"Going from n=1 to n=2 changes the scratchpad's advantage by {change:+.1f} points "
        f"(n=2 minus n=1 per format: {', '.join(mtp)} points). "
        f"Every model saw the same number of training tokens, so the scratchpad models saw about "
        f"{ratio:.2f}x as many problems as the direct ones; {size_text} held-out problems per digit count, "
        "so differences of a few points are noise."
    )


def write_report(
    root: Path, scale: str, preset: ThinkScale, results: dict[str, dict], tests: dict, command: list[str]
) -> Path:
    """report.md, think.png and results.json under `root`; the summary table on stdout."""
    report = Report(
        root, title="Time to think: a scratchpad for addition, with and without MTP", question=QUESTION
    )
    plot(report, results, scale, preset)
    header, rows = table(results, preset)
    report.add_table(header, rows, "Greedy exact match on held-out sums, by digits per operand")
    path = report.write(
        answer_text(results, preset, tests),
        results,
        command=command,
        details={
            "scale": scale,
            "formats": "direct `95+17=112`; reversed `95+17=211`; scratchpad `95+17=5+7=2 c1;9+1+1=1 c1;=112`",
            "model": f"dim {preset.dim}, {preset.n_layers} blocks, {preset.n_heads} heads, byte tokens",
            "training": f"{preset.max_steps} steps x {preset.batch_size} x {preset.seq_len} tokens per model "
            f"(equal for every format), operands of {preset.digits[0]}-{preset.digits[1]} digits",
            "scoring": "greedy continuation of `a+b=`, must end with EOS; answer after the last `=` "
            "(scratchpad) or reversed back (reversed)",
        },
    )
    print_table("think: exact match (%)", header, rows)
    return path


@dataclass
class ThinkOptions(study.StudyOptions):
    """Flags of `multitoken lab think`."""

    out: str = "reports/lab/think"
    scale: Literal["debug", "small"] = "small"
    """debug (seconds) or small (about 15 minutes on a 2-core CPU)."""
    seed: int = 0
    """seed of the problems and of every model's initialisation."""


def think_cli(options: ThinkOptions) -> None:
    """Does a scratchpad help a small LM add, and does multi-token prediction change that?

    Trains n=1 and n=2 byte-level models on d-digit addition written directly (12+34=46), with the
    answer reversed (12+34=64) or with a per-digit scratchpad (12+34=2+4=6 c0;1+3+0=4 c0;=46), all at the
    same training-token budget, and scores greedy exact match on held-out sums per number of digits.
    """
    command = study.options_command(("lab", "think"), options)
    run_think(options.out, options.scale, options.seed, options.device, command)
    print(f"wrote {Path(options.out) / 'report.md'}")
