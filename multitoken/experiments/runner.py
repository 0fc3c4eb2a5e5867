"""Shared plumbing of the experiments: scales, training variants side by side, reading run metrics.

A variant's run lives in `<out>/runs/<variant>`. A complete run (its latest checkpoint is at max_steps)
is reused as is, a partial one is resumed, so re-running an experiment only rebuilds the report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import resource
import sys
import time
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from multitoken import checkpoint as ckpt_io
from multitoken.devices import resolve_device
from multitoken.errors import UserError
from multitoken.report import format_table
from multitoken.train import RESUME_MUTABLE, TRAIN_CONFIG, TrainConfig, train
from multitoken.train_log import METRICS

SCALES = ("debug", "small", "medium", "large")
"""debug: seconds (tests); small: a CPU in about 30 minutes; medium and large: GPU budgets."""
RUN_STATS = "experiment_stats.json"
"""Per-run file with what only the training process could measure (peak memory, wall time)."""

T = TypeVar("T")


@dataclass(kw_only=True)
class Budget:
    """Training budget shared by every experiment's scales."""

    n_layers: int
    """Blocks in total, the same for every n (parameter-matched)."""
    max_steps: int
    """Optimizer steps per model."""
    batch_size: int
    """Sequences per step."""
    seq_len: int
    """Tokens per training window."""
    lr: float = 2e-3
    """Peak learning rate."""

    def train_config(
        self,
        *,
        data: str | Path,
        out: str | Path,
        model: dict[str, Any],
        seed: int,
        device: str,
        progress: bool,
        checkpoints: int = 4,
    ) -> TrainConfig:
        """One variant's TrainConfig: 5% warmup, `checkpoints` evenly spaced checkpoints all kept, no TensorBoard."""
        return TrainConfig(
            data=str(data),
            out=str(out),
            preset="debug",
            model=model,
            batch_size=self.batch_size,
            seq_len=self.seq_len,
            max_steps=self.max_steps,
            warmup_steps=max(1, self.max_steps // 20),
            lr=self.lr,
            save_every=max(1, self.max_steps // checkpoints),
            keep=0,
            tensorboard=False,
            val_every=0,
            log_every=10,
            seed=seed,
            device=device,
            progress=progress,
        )


@dataclass(kw_only=True)
class ModelBudget(Budget):
    """A budget for one model width."""

    dim: int
    """Model width."""
    n_heads: int
    """Attention heads."""

    def model_fields(self, n_future: int, max_seq_len: int) -> dict[str, Any]:
        """ModelConfig overrides for this width with n_future heads (plain multi-head attention)."""
        return dict(
            dim=self.dim,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            n_kv_heads=self.n_heads,
            n_future=n_future,
            max_seq_len=max_seq_len,
        )


def pick_scale(scale: str, presets: Mapping[str, T]) -> T:
    """The preset of `scale`; UserError naming the choices for an unknown one."""
    if scale not in presets:
        raise UserError(f"unknown scale {scale!r}; choose one of {', '.join(presets)}")
    return presets[scale]


def run_steps(run_dir: str | Path) -> int:
    """Step of the run's latest complete checkpoint, 0 when there is none."""
    latest = ckpt_io.find_latest(run_dir)
    return int(latest.name.split("_")[-1]) if latest is not None else 0


def _same_run(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    mine = cfg.to_dict()
    return sorted(k for k in mine if k not in RESUME_MUTABLE and saved.get(k) != mine[k])


def train_variant(cfg: TrainConfig, isolated: bool = False) -> Path:
    """Train `cfg` into `cfg.out`, resume it if partial, or reuse it if complete; returns the run directory.

    Writes RUN_STATS (peak memory during training, wall time) beside the checkpoints. `isolated` trains
    in a fresh (spawned) process, so the peak memory is this run's alone and not the high-water mark
    of every earlier run in this process (on CPU the RSS peak can't be reset below what is resident).
    """
    run_dir = Path(cfg.out)
    saved_path = run_dir / TRAIN_CONFIG
    if saved_path.exists():
        diffs = _same_run(json.loads(saved_path.read_text()), cfg)
        if diffs:
            raise UserError(
                f"{run_dir} holds a different run (differs in {', '.join(diffs)}); "
                "delete it or choose another --out"
            )
    done = run_steps(run_dir)
    if done >= cfg.max_steps:
        return run_dir
    if done == 0 and saved_path.exists():
        # Started but never checkpointed: nothing to lose, start over.
        saved_path.unlink()
        (run_dir / METRICS).unlink(missing_ok=True)
    cfg = dataclasses.replace(cfg, resume=done > 0)
    if isolated:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            stats = pool.submit(_train_measured, cfg, torch.get_num_threads()).result()
    else:
        stats = _train_measured(cfg)
    ckpt_io.write_json(run_dir / RUN_STATS, stats)
    return run_dir


def _train_measured(cfg: TrainConfig, threads: int | None = None) -> dict[str, float]:
    """Train `cfg` and measure it: peak memory (absolute and over the start) and wall time."""
    if threads is not None:
        torch.set_num_threads(threads)
    device = torch.device(resolve_device(cfg.device))
    reset_peak_memory(device)
    baseline = current_memory_mib(device)
    started = time.perf_counter()
    train(cfg)
    peak = peak_memory_mib(device)
    return {
        "peak_memory_mib": peak,
        "peak_memory_increase_mib": peak - baseline,
        "train_seconds": time.perf_counter() - started,
    }


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    """Lines of the run's metrics.jsonl."""
    path = Path(run_dir) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def final_validation(run_dir: str | Path) -> dict[str, float]:
    """The last logged metrics that hold a validation (the final one at max_steps)."""
    for metrics in reversed(read_metrics(run_dir)):
        if "val_loss" in metrics:
            return metrics
    raise UserError(f"{run_dir} has no validation in {METRICS}; delete it and re-run")


def run_stats(run_dir: str | Path) -> dict[str, float]:
    """RUN_STATS of a run (empty when the run predates it)."""
    path = Path(run_dir) / RUN_STATS
    return json.loads(path.read_text()) if path.exists() else {}


def median_step_seconds(run_dir: str | Path, tokens_per_step: int) -> float:
    """Median seconds per optimizer step from the logged tokens/s, the first logged step left out."""
    rates = [m["tokens_per_s"] for m in read_metrics(run_dir)[1:] if "tokens_per_s" in m]
    rates = rates or [m["tokens_per_s"] for m in read_metrics(run_dir) if "tokens_per_s" in m]
    rates.sort()
    return tokens_per_step / rates[len(rates) // 2] if rates else float("nan")


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window: CUDA peak stats, or the process's RSS high-water mark (Linux)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # not Linux: ru_maxrss keeps the whole process's high-water mark
        Path(f"/proc/{os.getpid()}/clear_refs").write_text("5")


def current_memory_mib(device: torch.device) -> float:
    """Allocated CUDA memory, or the resident set size (Linux; 0 elsewhere), in MiB."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_memory_mib(device: torch.device) -> float:
    """Peak allocated CUDA memory, or peak RSS (VmHWM, else ru_maxrss), in MiB since reset_peak_memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    """The experiment's summary table on stdout."""
    print(f"\n{title}\n{format_table(header, rows)}", flush=True)
