"""What every study shares: scales and training budgets, training a variant (or reusing it), reading a
run's metrics and checkpoints, preparing a study's data, and the options of the lab's CLI commands.

A variant's run lives in `<out>/runs/<variant>`. A complete run (its latest checkpoint is at max_steps)
is reused as is, a partial one is resumed, so re-running a study only rebuilds the report. A lab study
either trains its own small models (one per `n_future`, same seed and budget, every checkpoint kept so it
can follow what is learned when) or reads an existing `--checkpoint`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import multiprocessing
import time
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch

from multitoken import checkpoint as ckpt_io
from multitoken.checkpoint import CONFIG, checkpoint_steps, load_checkpoint, resolve_checkpoint
from multitoken.config import ModelConfig
from multitoken.data.shards import PrepareConfig, prepare, read_meta
from multitoken.devices import resolve_device
from multitoken.errors import UserError
from multitoken.model import MultiTokenLM
from multitoken.studies.measure import current_memory_mib, peak_memory_mib, reset_peak_memory
from multitoken.studies.report import format_table
from multitoken.train import RESUME_MUTABLE, TRAIN_CONFIG, TrainConfig, train
from multitoken.train_log import METRICS

RUN_STATS = "experiment_stats.json"
"""Per-run file with what only the training process could measure (peak memory, wall time)."""
ENGLISH_SOURCE = "pydoc-english"
"""Built-in offline English corpus: the topic pages of the Python documentation shipped in `pydoc_data`."""

T = TypeVar("T")


# ---- budgets -----------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Budget:
    """A training budget; every study's scale is one."""

    max_steps: int
    """Optimizer steps per model."""
    batch_size: int
    """Sequences per step."""
    seq_len: int
    """Tokens per training window."""
    lr: float = 2e-3
    """Peak learning rate."""
    warmup_steps: int | None = None
    """Linear warmup steps (None: 5% of max_steps)."""
    save_every: int | None = None
    """Steps between kept checkpoints (None: `checkpoints` evenly spaced ones)."""
    log_every: int = 10
    """Steps between logged metrics."""
    val_batches: int | None = None
    """Batches of the final validation (None: the trainer's default)."""

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
        """One variant's TrainConfig: every checkpoint kept, one validation at the end, no TensorBoard."""
        extra = {} if self.val_batches is None else {"val_batches": self.val_batches}
        return TrainConfig(
            data=str(data),
            out=str(out),
            preset="debug",
            model=model,
            batch_size=self.batch_size,
            seq_len=self.seq_len,
            max_steps=self.max_steps,
            warmup_steps=self.warmup_steps if self.warmup_steps is not None else max(1, self.max_steps // 20),
            lr=self.lr,
            save_every=self.save_every or max(1, self.max_steps // checkpoints),
            keep=0,
            tensorboard=False,
            val_every=0,
            log_every=self.log_every,
            seed=seed,
            device=device,
            progress=progress,
            **extra,
        )

    def train(self, *, isolated: bool = False, **config: Any) -> Path:
        """Train (or resume, or reuse) one variant of `train_config(**config)`; its run directory."""
        return train_variant(self.train_config(**config), isolated=isolated)


@dataclass(kw_only=True)
class ModelBudget(Budget):
    """A budget for one model width."""

    dim: int
    """Model width."""
    n_layers: int
    """Blocks in total, the same for every n (parameter-matched)."""
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


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    """The experiment's summary table on stdout."""
    print(f"\n{title}\n{format_table(header, rows)}", flush=True)


@dataclass
class StudyOptions:
    """Flags most studies take: where to write, at which scale, with which seed, on which device.

    A study's options subclass it with their own report directory and scales (and texts where theirs
    differ); the fields are the flags.
    """

    out: str = "reports"
    """report directory (prepared data and trained runs go under it; complete runs are reused)."""
    scale: str = "small"
    """debug (seconds) or small (minutes on a CPU)."""
    seed: int = 0
    """seed of every model's initialisation and data order."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""


# ---- the lab's scales, options and runs ----------------------------------------------------------------


@dataclass(kw_only=True)
class LabScale(Budget):
    """Sizes of one lab scale: data and model on top of the training budget."""

    max_documents: int
    """Documents of the corpus to use (0: all)."""
    tokenizer: str
    """byte or bpe."""
    vocab_size: int
    """BPE vocabulary size (ignored for bytes)."""
    model: dict[str, Any]
    """ModelConfig fields of the trained models (on top of the `debug` preset)."""
    eval_windows: int
    """Validation windows each evaluation reads."""
    val_fraction: float
    """Documents held out for validation."""
    val_batches: int | None = 1
    """Batches of the final validation."""


LAB_SCALES: dict[str, LabScale] = {
    "debug": LabScale(max_documents=12, tokenizer="byte", vocab_size=258,
                      model=dict(dim=32, n_layers=2, n_heads=2, n_kv_heads=2, max_seq_len=64), batch_size=4,
                      seq_len=64, max_steps=6, save_every=2, warmup_steps=2, lr=3e-3, log_every=1,
                      eval_windows=4, val_fraction=0.2),
    "small": LabScale(max_documents=800, tokenizer="bpe", vocab_size=2048,
                      model=dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=4, max_seq_len=256), batch_size=16,
                      seq_len=256, max_steps=400, save_every=40, warmup_steps=40, lr=2e-3, log_every=20,
                      eval_windows=32, val_fraction=0.05),
    "medium": LabScale(max_documents=0, tokenizer="bpe", vocab_size=4096,
                       model=dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=8, max_seq_len=256), batch_size=64,
                       seq_len=256, max_steps=3000, save_every=150, warmup_steps=150, lr=1e-3, log_every=150,
                       eval_windows=64, val_fraction=0.02),
}  # fmt: skip
"""debug: seconds (tests); small: ~5-10 min per experiment on a laptop CPU; medium: ~50M tokens per model,
meant for a GPU (untested on CPU beyond a smoke run)."""


NOT_A_FLAG = {"flag": False}
"""Field metadata of an options field that the command line does not offer (see `multitoken.cli`)."""


@dataclass
class LabOptions:
    """What every lab study takes: where to write, what to train or read, and on which data.

    Each study's command subclasses it with its own report directory and flags; the fields are the flags.
    """

    out: str = "reports/lab"
    """Report directory (trained runs and prepared data go under it too)."""
    scale: Literal["debug", "small", "medium"] = "small"
    """debug (seconds), small (minutes on a CPU) or medium (~50M tokens per model, for a GPU)."""
    checkpoint: str | None = None
    """Measure this checkpoint or run directory (all its checkpoints) instead of training."""
    data: str | None = None
    """Prepared data directory to train and evaluate on (default: prepare --source)."""
    source: str | None = None
    """Corpus to prepare: python-stdlib, pydoc-english (offline English) or a path (default: the study's)."""
    n_future: list[int] = field(default_factory=lambda: [1, 2])
    """Models to train side by side, one per number of heads, e.g. 1,2."""
    seed: int = 0
    """Seed of initialisation and data order (the same for every model)."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""
    progress: bool = True
    """Show progress bars."""
    command: list[str] | None = field(default=None, metadata=NOT_A_FLAG)
    """The command line to record in the report (default: this process's arguments)."""

    def __post_init__(self) -> None:
        if self.scale not in LAB_SCALES:
            raise UserError(f"unknown scale {self.scale!r}; choose one of {', '.join(LAB_SCALES)}")
        if not self.n_future or any(n < 1 for n in self.n_future):
            raise UserError(f"n_future must be positive integers, got {self.n_future}")

    @property
    def sizes(self) -> LabScale:
        return LAB_SCALES[self.scale]

    def recorded(self, path: tuple[str, ...]) -> LabOptions:
        """These options with `command` set to the `multitoken PATH ...` line that reproduces them."""
        return dataclasses.replace(self, command=options_command(path, self))


@dataclass
class LabRun:
    """One model of an experiment: its label and checkpoints by training step."""

    label: str
    """Short name for plots, e.g. "n=2"."""
    checkpoints: list[tuple[int, Path]]
    """(step, checkpoint directory), ascending; step 0 may be a re-created initialisation (path None)."""
    config: ModelConfig
    """The model's shape."""
    init_seed: int | None = None
    """Seed that re-creates the step-0 model, when known."""

    @property
    def final(self) -> Path:
        return self.checkpoints[-1][1]

    def steps(self) -> list[int]:
        return [s for s, _ in self.checkpoints]


def options_command(path: tuple[str, ...], options: Any) -> list[str]:
    """The `multitoken PATH ...` command that reproduces a study's options dataclass (its flags, in field
    order, only where they differ from the defaults)."""
    flags = [f.name for f in dataclasses.fields(options) if f.metadata != NOT_A_FLAG]
    defaults = type(options)()
    values = {name: getattr(options, name) for name in flags}
    return flags_line(path, values, {name: getattr(defaults, name) for name in flags})


def flags_line(path: tuple[str, ...], values: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    """`multitoken PATH --flag value ...` for every value that differs from its default."""
    argv = ["multitoken", *path]
    for name, value in values.items():
        if value == defaults.get(name, inspect.Parameter.empty):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, list):
            argv += [flag, ",".join(str(v) for v in value)]
        else:
            argv += [flag, str(value)]
    return argv


def pick_device(device: str) -> torch.device:
    """The torch device of a --device flag (auto: CUDA when present)."""
    return torch.device(resolve_device(device))


# ---- data -------------------------------------------------------------------------------------------


def english_corpus(directory: Path) -> Path:
    """Write the `pydoc_data` topic pages (plain English documentation, offline) as .txt documents."""
    from pydoc_data.topics import topics

    directory.mkdir(parents=True, exist_ok=True)
    for name, text in sorted(topics.items()):
        path = directory / f"{name}.txt"
        if not path.exists():
            path.write_text(text)
    return directory


def resolve_source(source: str, root: Path) -> str:
    """The source string `prepare` understands; the built-in English corpus is written under `root`."""
    if source == ENGLISH_SOURCE:
        return str(english_corpus(root / "english_corpus"))
    return source


def prepare_data(source: str, root: Path, sizes: LabScale, tokenizer: str | None = None) -> Path:
    """Prepare `source` under root/data (reused when it already holds the same dataset)."""
    name = "data" if tokenizer is None else "data-checkpoint-tokenizer"
    config = PrepareConfig(
        source=resolve_source(source, root),
        out=str(root / name),
        tokenizer=tokenizer or sizes.tokenizer,
        vocab_size=sizes.vocab_size,
        val_fraction=sizes.val_fraction,
        max_documents=sizes.max_documents,
    )
    return prepare(config)


def guess_domain(source: str) -> str:
    """code for Python sources (python-stdlib, .py files, a directory mostly of .py files), else text."""
    source = source or ""
    if source == "python-stdlib" or source.endswith(".py"):
        return "code"
    path = Path(source)
    if path.is_dir():
        files = [f for f in path.rglob("*") if f.is_file()]
        return "code" if files and 2 * sum(f.suffix == ".py" for f in files) > len(files) else "text"
    return "text"


def dataset_source(data: str | Path) -> str:
    return str(read_meta(data).get("source", ""))


def train_or_reuse(
    options: LabOptions, data: Path, run_dir: Path, label: str, model: dict[str, Any]
) -> LabRun:
    """Train one lab model into run_dir, resume it, or reuse the finished identical run found there."""
    sizes = options.sizes
    print(f"{label}: {run_dir}")
    sizes.train(
        data=data,
        out=run_dir,
        model={**sizes.model, **model},
        seed=options.seed,
        device=options.device,
        progress=options.progress,
    )
    return read_run(run_dir, label)


def read_run(path: str | Path, label: str | None = None) -> LabRun:
    """A LabRun from a run directory (all its checkpoints) or a single checkpoint directory."""
    path = Path(path)
    ckpt = resolve_checkpoint(path)
    steps = checkpoint_steps(path) or [(_step_of(ckpt), ckpt)]
    config = ModelConfig.load(ckpt / CONFIG)
    seed = None
    train_config_path = path / "train_config.json"
    if train_config_path.is_file():
        seed = json.loads(train_config_path.read_text()).get("seed")
    if seed is not None and steps[0][0] > 0:
        steps = [(0, None), *steps]
    return LabRun(label or f"n={config.n_future}", steps, config, seed)


def _step_of(ckpt: Path) -> int:
    name = ckpt.name
    return int(name.split("_")[1]) if name.startswith("step_") and name[5:].isdigit() else 0


def load_run_model(run: LabRun, path: Path | None, device: torch.device) -> MultiTokenLM:
    """A checkpoint's model, or (path None) the run's initialisation re-created from its seed."""
    if path is None:
        torch.manual_seed(run.init_seed)
        return MultiTokenLM(run.config).to(device).eval()
    model, _ = load_checkpoint(path, device)
    return model


def lab_runs(
    options: LabOptions, default_source: str, extra_runs: dict[str, dict[str, Any]] | None = None
) -> tuple[list[LabRun], Path]:
    """The experiment's models and its prepared data: from --checkpoint, or trained here (one per n_future).

    `extra_runs` adds controls (label -> ModelConfig overrides), trained with the same budget and seed.
    """
    root = Path(options.out)
    if options.checkpoint:
        run = read_run(options.checkpoint)
        if options.data:
            data = Path(options.data)
        else:
            ckpt = resolve_checkpoint(options.checkpoint)
            if not any((ckpt / n).exists() for n in ("tokenizer.json", "tokenizer.tiktoken")):
                raise UserError(
                    f"checkpoint {ckpt} has no tokenizer; pass --data prepared with its tokenizer"
                )
            data = prepare_data(options.source or default_source, root, options.sizes, tokenizer=str(ckpt))
        check_data_matches(run, data)
        return [run], data
    data = (
        Path(options.data)
        if options.data
        else prepare_data(options.source or default_source, root, options.sizes)
    )
    runs = []
    wanted = {f"n={n}": {"n_future": n} for n in options.n_future} | (extra_runs or {})
    for label, model in wanted.items():
        safe = label.replace("=", "").replace(" ", "_").replace(",", "")
        runs.append(train_or_reuse(options, data, root / "runs" / safe, label, model))
    return runs, data


def check_data_matches(run: LabRun, data: Path) -> None:
    meta = read_meta(data)
    if meta["vocab_size"] != run.config.vocab_size:
        raise UserError(
            f"{data} was tokenized with vocab_size {meta['vocab_size']} but the checkpoint has "
            f"{run.config.vocab_size}: the tokenizers differ"
        )


def run_details(runs: list[LabRun], options: LabOptions, data: Path) -> dict[str, Any]:
    """Provenance lines for a report: model sizes, seeds, scale and data."""
    details: dict[str, Any] = {"scale": options.scale, "seed": options.seed, "data": str(data)}
    for run in runs:
        c = run.config
        with torch.device("meta"):
            params = MultiTokenLM(c).num_params()
        details[f"model {run.label}"] = (
            f"{params:,} parameters, dim {c.dim}, {c.n_layers} layers ({c.n_trunk_layers} trunk), "
            f"{c.n_heads} attention heads, n_future {c.n_future} "
            f"({c.head_style} heads), vocab {c.vocab_size}, "
            f"checkpoints at steps {run.steps()}"
        )
    if not options.checkpoint:
        s = options.sizes
        details["training"] = (
            f"{s.max_steps} steps x {s.batch_size} sequences x {s.seq_len} tokens, lr {s.lr}, "
            f"same seed and data order for every model"
        )
    return details
