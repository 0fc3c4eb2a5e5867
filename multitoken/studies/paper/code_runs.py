"""Training and measuring next-token and multi-token models on a code corpus (`bytes` and `nsweep`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multitoken.checkpoint import load_checkpoint
from multitoken.data.loader import TokenDataset
from multitoken.data.shards import PrepareConfig, prepare
from multitoken.evals.perplexity import evaluate_loss
from multitoken.studies.paper.decoding import held_out_prompts, measure_speculative
from multitoken.studies.runs import ModelBudget, median_step_seconds, pick_scale, resolve_device, run_stats


@dataclass(kw_only=True)
class CodeScale(ModelBudget):
    """Model and budget of one scale of a code experiment."""

    max_documents: int
    """Corpus documents used (0: all)."""
    vocab_size: int = 0
    """BPE vocabulary (0 for bytes)."""
    n_prompts: int
    """Held-out prompts decoded to measure self-speculative decoding."""
    prompt_len: int
    """Tokens per prompt."""
    max_new_tokens: int
    """Tokens generated per prompt."""
    eval_windows: int = 256
    """Validation windows of seq_len tokens scored for loss, accuracy and bits per byte (at most)."""


def prepare_code(root: Path, corpus: str, tokenizer: str, scale: CodeScale, seed: int) -> Path:
    """Tokenize the corpus into root/data (reused when it already holds the same dataset)."""
    return prepare(
        PrepareConfig(
            source=corpus,
            tokenizer=tokenizer,
            vocab_size=scale.vocab_size,
            out=str(root / "data"),
            val_fraction=0.02,
            max_documents=scale.max_documents,
            seed=seed,
        )
    )


def run_code_variant(
    root: Path, data: Path, scale: CodeScale, n: int, seed: int, device: str, progress: bool
) -> dict[str, Any]:
    """Train (or reuse) the n-head model in its own process and measure it: validation loss, bits per byte and
    per-head accuracy (`evaluate_loss` on up to `eval_windows` windows), step time, peak memory, speculation."""
    run_dir = scale.train(
        isolated=True,
        data=data,
        out=root / "runs" / f"n{n}",
        model=scale.model_fields(n, max_seq_len=max(scale.seq_len, scale.prompt_len + scale.max_new_tokens)),
        seed=seed,
        device=device,
        progress=progress,
    )
    stats = run_stats(run_dir)
    model, tokenizer = load_checkpoint(run_dir, device)
    val = evaluate_loss(model, TokenDataset(data, "val"), scale.seq_len, scale.eval_windows, tokenizer)
    prompts = held_out_prompts(str(data), scale.n_prompts, scale.prompt_len)
    spec = measure_speculative(model, prompts, scale.max_new_tokens)
    return {
        "n_future": n,
        "params": model.num_params(),
        "val_loss": val.loss,
        "bits_per_byte": val.bits_per_byte,
        "val_loss_per_head": [head.loss for head in val.heads],
        "val_acc_per_head": [head.accuracy for head in val.heads],
        "val_tokens": val.tokens,
        "step_seconds": median_step_seconds(run_dir, scale.batch_size * scale.seq_len),
        "peak_memory_mib": stats.get("peak_memory_mib", float("nan")),
        "peak_memory_increase_mib": stats.get("peak_memory_increase_mib", float("nan")),
        "speculative": dataclasses.asdict(spec),
    }


@dataclass
class CodeStudyOptions:
    """Flags of the code studies (`experiment bytes`, `experiment nsweep`)."""

    out: str = "reports/code"
    """Report directory; runs go under OUT/runs/nN and are reused when complete."""
    scale: str = "small"
    """debug (seconds), small (a CPU, ~30 min), medium or large (GPU)."""
    seed: int = 0
    """Seed of the data split, of the BPE tokenizer's corpus and of every model's initialisation."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""
    corpus: str = "python-stdlib"
    """Code corpus: python-stdlib, or a directory, glob or file."""


@dataclass
class BytesOptions(CodeStudyOptions):
    """Flags of `multitoken experiment bytes`."""

    out: str = "reports/bytes"


@dataclass
class NsweepOptions(CodeStudyOptions):
    """Flags of `multitoken experiment nsweep`."""

    out: str = "reports/nsweep"


def run_code_study(
    options: CodeStudyOptions, scales: dict[str, CodeScale], tokenizer: str, n_futures: tuple[int, ...]
) -> tuple[Path, CodeScale, dict[str, dict[str, Any]]]:
    """Prepare the corpus with `tokenizer` and train and measure one model per n; (root, preset, results)."""
    preset = pick_scale(options.scale, scales)
    device = resolve_device(options.device)
    root, seed, progress = Path(options.out), options.seed, options.scale != "debug"
    data = prepare_code(root, options.corpus, tokenizer, preset, seed)
    results = {f"n{n}": run_code_variant(root, data, preset, n, seed, device, progress) for n in n_futures}
    return root, preset, results
