"""Generate completions for HumanEval or MBPP with a checkpoint, run them in the sandbox, report pass@k.

Samples of all problems are decoded in batches by `multitoken.generate.generate` (self-speculatively
when the model has draft heads), stopped at the task's stop sequences, and scored with the same
sandbox and pass@k estimator as `score_samples`.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from multitoken.errors import UserError, check_at_least
from multitoken.evals.code_tasks import CodeTask, truncate_at_stops
from multitoken.evals.passk import DEFAULT_KS, mean_pass_at_k
from multitoken.evals.score_samples import execute_completions, tally
from multitoken.generate import GenerationStats, format_stats, generate, merge_stats


@dataclass
class DecodeConfig:
    """How completions are sampled."""

    n_samples: int = 1
    """Completions per problem."""
    temperature: float = 0.0
    """0 is greedy decoding (then the n samples of a problem are identical)."""
    top_p: float = 0.95
    """Nucleus sampling mass, when temperature > 0."""
    max_new_tokens: int = 256
    """Most tokens per completion (fewer when the prompt leaves less room in the context)."""
    batch_size: int = 8
    """Rows decoded together."""
    seed: int = 0
    """Sampling seed; batch b uses seed + b."""
    speculative: bool | None = None
    """Draft with the extra heads: None whenever the model has them."""

    def __post_init__(self) -> None:
        check_at_least(self, 1, "n_samples", "batch_size", "max_new_tokens")


@dataclass
class Sample:
    """One completion of one problem, and its verdict once scored."""

    task_id: str
    """Benchmark id of the problem."""
    completion: str
    """Generated text, cut at the task's first stop sequence."""
    finish_reason: str = ""
    """Why decoding ended: eos, stop, length, or no_room (the prompt fills the context)."""
    passed: bool = False
    """Whether the tests passed."""
    result: str = ""
    """Sandbox verdict: "passed", "failed: ...", "timed out", ..."""


@dataclass
class CodegenReport:
    """Outcome of a benchmark run."""

    benchmark: str
    """humaneval or mbpp."""
    pass_at_k: dict[int, float]
    """Unbiased pass@k averaged over problems."""
    n_tasks: int
    """Problems evaluated."""
    n_samples: int
    """Completions in total."""
    n_passed: int
    """Completions that passed."""
    stats: GenerationStats = field(default_factory=GenerationStats)
    """Decoding counters (tokens per forward, acceptance per head, speed) over all batches."""
    samples_path: str | None = None
    """JSONL of every completion with its verdict, when written."""

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "pass_at_k": {str(k): v for k, v in self.pass_at_k.items()}}


def choose_ks(ks: Sequence[int] | None, n_samples: int) -> list[int]:
    """The requested ks (each must be <= n_samples, else UserError), or the defaults that fit."""
    chosen = [k for k in DEFAULT_KS if k <= n_samples] if ks is None else sorted(set(ks))
    mean_pass_at_k([(n_samples, 0)], chosen)  # raises for k > n or k < 1
    return chosen


def generate_samples(
    model, tokenizer, tasks: Sequence[CodeTask], decode: DecodeConfig, progress: bool = True
) -> tuple[list[Sample], GenerationStats]:
    """`decode.n_samples` completions per task, in task order, with the merged decoding stats.

    Rows are grouped by how many new tokens fit after their prompt, so a long prompt shortens only its
    own completions; a prompt that fills the context gets an empty completion (finish_reason no_room).
    """
    context = model.config.max_seq_len
    # Greedy samples are all equal: decode each problem once and copy it.
    copies = decode.n_samples if decode.temperature == 0 else 1
    per_task = 1 if decode.temperature == 0 else decode.n_samples
    prompts = [tokenizer.encode(t.prompt) for t in tasks]
    groups: dict[int, list[tuple[int, int]]] = defaultdict(list)  # room -> [(task index, sample index)]
    for i, ids in enumerate(prompts):
        room = min(decode.max_new_tokens, context - len(ids))
        for j in range(per_task):
            groups[max(room, 0)].append((i, j))
    outputs: dict[tuple[int, int], tuple[str, str]] = {}
    parts: list[GenerationStats] = []
    bar = _progress(sum(len(rows) for rows in groups.values()), progress)
    batch_index = 0
    for room, rows in sorted(groups.items(), reverse=True):
        if room == 0:
            outputs.update({row: ("", "no_room") for row in rows})
            bar.update(len(rows))
            continue
        for first in range(0, len(rows), decode.batch_size):
            batch = rows[first : first + decode.batch_size]
            stops = sorted({s for i, _ in batch for s in tasks[i].stop_sequences})
            result = generate(
                model,
                [prompts[i] for i, _ in batch],
                room,
                temperature=decode.temperature,
                top_p=decode.top_p,
                speculative=decode.speculative,
                eos_id=tokenizer.eos_id,
                seed=decode.seed + batch_index,
                stop_strings=stops,
                tokenizer=tokenizer,
            )
            batch_index += 1
            parts.append(result.stats)
            for (i, j), text, reason in zip(batch, result.text, result.finish_reasons, strict=True):
                outputs[(i, j)] = (truncate_at_stops(text, tasks[i].stop_sequences), reason)
            bar.update(len(batch))
    bar.close()
    samples = []
    for i, task in enumerate(tasks):
        for j in range(per_task):
            completion, reason = outputs[(i, j)]
            samples += [Sample(task.task_id, completion, reason) for _ in range(copies)]
    return samples, merge_stats(parts)


def score_in_sandbox(
    samples: list[Sample],
    tasks: dict[str, CodeTask],
    ks: Sequence[int],
    *,
    workers: int = 4,
    timeout_s: float = 10.0,
    progress: bool = True,
) -> tuple[dict[int, float], int]:
    """Run every sample's program with its tests, fill in `passed`/`result`; return (pass@k, n passed).

    A program that crashes or hangs the sandbox worker fails; the others still run.
    """
    results = execute_completions(
        [(tasks[s.task_id], s.completion) for s in samples],
        workers=workers,
        timeout_s=timeout_s,
        progress="sandbox" if progress else None,
    )
    for sample, res in zip(samples, results, strict=True):
        sample.passed, sample.result = res.passed, res.result
    pass_k, counts = tally([s.task_id for s in samples], results, ks)
    return pass_k, sum(c for _, c in counts.values())


def run_codegen(
    model,
    tokenizer,
    benchmark: str,
    tasks: Sequence[CodeTask],
    decode: DecodeConfig,
    ks: Sequence[int] | None = None,
    out: str | Path | None = None,
    *,
    workers: int = 4,
    timeout_s: float = 10.0,
    progress: bool = True,
) -> CodegenReport:
    """Generate, score and (with `out`) write every completion as JSONL; pass@k by the unbiased estimator."""
    if not tasks:
        raise UserError(f"no {benchmark} tasks to evaluate")
    chosen = choose_ks(ks, decode.n_samples)  # fail before any decoding
    samples, stats = generate_samples(model, tokenizer, tasks, decode, progress)
    by_id = {t.task_id: t for t in tasks}
    pass_k, n_passed = score_in_sandbox(
        samples, by_id, chosen, workers=workers, timeout_s=timeout_s, progress=progress
    )
    if out is not None:
        write_samples(out, samples)
    return CodegenReport(
        benchmark=benchmark,
        pass_at_k=pass_k,
        n_tasks=len(tasks),
        n_samples=len(samples),
        n_passed=n_passed,
        stats=stats,
        samples_path=None if out is None else str(out),
    )


def write_samples(path: str | Path, samples: Sequence[Sample]) -> None:
    """One JSON object per completion: task_id, completion, finish_reason, passed, result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(asdict(s)) + "\n")


def format_codegen(report: CodegenReport) -> str:
    """A small plain-text table: pass@k, then the decoding stats."""
    rows = [
        ("benchmark", report.benchmark),
        ("tasks", str(report.n_tasks)),
        ("samples", f"{report.n_samples} ({report.n_passed} passed)"),
    ]
    rows += [(f"pass@{k}", f"{v:.4f}") for k, v in sorted(report.pass_at_k.items())]
    width = max(len(name) for name, _ in rows)
    table = "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
    return table + "\n" + format_stats(report.stats)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="generating", unit="sample", file=sys.stderr)
