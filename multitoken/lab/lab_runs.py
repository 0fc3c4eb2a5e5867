"""Shared plumbing of the lab experiments: scales, data, small training runs with checkpoints, scoring.

An experiment either trains its own small models (one per `n_future`, same seed and budget, every
checkpoint kept so it can follow what is learned when) or reads an existing `--checkpoint`.

Dimension legend: B batch, T positions, N heads, V vocabulary, W windows, S stream positions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from multitoken.checkpoint import CONFIG, checkpoint_steps, load_checkpoint, resolve_checkpoint
from multitoken.config import ModelConfig
from multitoken.errors import UserError
from multitoken.loss import IGNORE_INDEX, build_targets
from multitoken.model import MultiTokenLM

ENGLISH_SOURCE = "pydoc-english"
"""Built-in offline English corpus: the topic pages of the Python documentation shipped in `pydoc_data`."""


@dataclass
class LabScale:
    """Sizes of one lab scale: data, model and training budget."""

    max_documents: int
    """Documents of the corpus to use (0: all)."""
    tokenizer: str
    """byte or bpe."""
    vocab_size: int
    """BPE vocabulary size (ignored for bytes)."""
    model: dict[str, Any]
    """ModelConfig fields of the trained models (on top of the `debug` preset)."""
    batch_size: int
    """Sequences per optimizer step."""
    seq_len: int
    """Tokens per training and evaluation window."""
    max_steps: int
    """Optimizer steps per run."""
    save_every: int
    """Steps between kept checkpoints."""
    warmup_steps: int
    """Linear warmup steps."""
    lr: float
    """Peak learning rate."""
    eval_windows: int
    """Validation windows each evaluation reads."""
    val_fraction: float
    """Documents held out for validation."""


SCALES: dict[str, LabScale] = {
    "debug": LabScale(
        max_documents=12,
        tokenizer="byte",
        vocab_size=258,
        model=dict(dim=32, n_layers=2, n_heads=2, n_kv_heads=2, max_seq_len=64),
        batch_size=4,
        seq_len=64,
        max_steps=6,
        save_every=2,
        warmup_steps=2,
        lr=3e-3,
        eval_windows=4,
        val_fraction=0.2,
    ),
    "small": LabScale(
        max_documents=800,
        tokenizer="bpe",
        vocab_size=2048,
        model=dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=4, max_seq_len=256),
        batch_size=16,
        seq_len=256,
        max_steps=400,
        save_every=40,
        warmup_steps=40,
        lr=2e-3,
        eval_windows=32,
        val_fraction=0.05,
    ),
    "medium": LabScale(
        max_documents=0,
        tokenizer="bpe",
        vocab_size=4096,
        model=dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=8, max_seq_len=256),
        batch_size=64,
        seq_len=256,
        max_steps=3000,
        save_every=150,
        warmup_steps=150,
        lr=1e-3,
        eval_windows=64,
        val_fraction=0.02,
    ),
}
"""debug: seconds (tests); small: ~5-10 min per experiment on a laptop CPU; medium: ~50M tokens per model,
meant for a GPU (untested on CPU beyond a smoke run)."""


@dataclass
class LabOptions:
    """What every lab experiment takes: where to write, what to train or read, and on which data."""

    out: str
    """Report directory; trained runs and prepared data go under it too."""
    scale: str = "debug"
    """debug (seconds), small (minutes on a CPU) or medium (a GPU)."""
    checkpoint: str | None = None
    """Read this checkpoint or run directory instead of training."""
    data: str | None = None
    """Prepared data directory to evaluate (and train) on; default: prepare `source`."""
    source: str | None = None
    """Corpus to prepare when `data` is not given (default per experiment)."""
    n_future: list[int] = field(default_factory=lambda: [1, 2])
    """Models to train side by side, one per number of heads."""
    seed: int = 0
    """Seed of initialisation and data order (the same for every model)."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""
    progress: bool = True
    """Show progress bars."""
    command: list[str] | None = None
    """The command line to record in the report (default: this process's arguments)."""

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise UserError(f"unknown scale {self.scale!r}; choose one of {', '.join(SCALES)}")
        if not self.n_future or any(n < 1 for n in self.n_future):
            raise UserError(f"n_future must be positive integers, got {self.n_future}")

    @property
    def sizes(self) -> LabScale:
        return SCALES[self.scale]


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


def command_line(path: tuple[str, ...], function, values: dict[str, Any]) -> list[str]:
    """The `multitoken ...` command reproducing a call of a CLI function (flags only where not default)."""
    import inspect

    argv = ["multitoken", *path]
    for name, param in inspect.signature(function).parameters.items():
        value = values[name]
        if value == param.default:
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
    from multitoken.experiments.runner import resolve_device

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
    from multitoken.data.shards import PrepareConfig, prepare

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
    from multitoken.data.shards import read_meta

    return str(read_meta(data).get("source", ""))


# ---- training ----------------------------------------------------------------------------------------


def train_config(options: LabOptions, data: Path, run_dir: Path, model: dict[str, Any]):
    """The TrainConfig of one lab run: every checkpoint kept."""
    from multitoken.train import TrainConfig

    sizes = options.sizes
    return TrainConfig(
        data=str(data),
        out=str(run_dir),
        preset="debug",
        model={**sizes.model, **model},
        batch_size=sizes.batch_size,
        seq_len=sizes.seq_len,
        max_steps=sizes.max_steps,
        warmup_steps=sizes.warmup_steps,
        lr=sizes.lr,
        save_every=sizes.save_every,
        keep=0,
        val_every=0,
        val_batches=1,
        log_every=max(1, sizes.max_steps // 20),
        seed=options.seed,
        device=options.device,
        tensorboard=False,
        progress=options.progress,
    )


def train_or_reuse(
    options: LabOptions, data: Path, run_dir: Path, label: str, model: dict[str, Any]
) -> LabRun:
    """Train one lab model into run_dir, resume it, or reuse the finished identical run found there."""
    from multitoken.experiments.runner import train_variant

    print(f"{label}: {run_dir}")
    train_variant(train_config(options, data, run_dir, model))
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
    from multitoken.data.shards import read_meta

    meta = read_meta(data)
    if meta["vocab_size"] != run.config.vocab_size:
        raise UserError(
            f"{data} was tokenized with vocab_size {meta['vocab_size']} but the checkpoint has "
            f"{run.config.vocab_size}: the tokenizers differ"
        )


# ---- evaluation data and per-token scores ------------------------------------------------------------


def val_stream(data: Path, n_tokens: int) -> tuple[Tensor, Any]:
    """The first `n_tokens` of the validation split (fewer if shorter) as `stream_S`, and the dataset."""
    from multitoken.data.loader import TokenDataset

    dataset = TokenDataset(data, "val")
    n = min(n_tokens, dataset.n_tokens)
    if n < 2:
        raise UserError(f"the validation split of {data} is too short to evaluate on")
    return torch.from_numpy(dataset.window(0, n)), dataset


def windows(stream_S: Tensor, seq_len: int, count: int | None = None) -> tuple[Tensor, list[int]]:
    """`count` non-overlapping windows `tokens_WT` spread evenly over the stream (default: as many as fit),
    and their start offsets: the windows `TokenDataset.eval_windows` reads."""
    from multitoken.data.loader import eval_window_starts

    available = stream_S.numel() // seq_len
    if available == 0:
        raise UserError(
            f"the evaluation text has {stream_S.numel()} tokens, fewer than one window of {seq_len}"
        )
    starts = [int(s) for s in eval_window_starts(stream_S.numel(), seq_len, count)]
    return torch.stack([stream_S[s : s + seq_len] for s in starts]), starts


@dataclass
class TokenScores:
    """Per-position scores of every head, in nats; positions without a target hold NaN / IGNORE_INDEX."""

    loss_BTN: Tensor
    """-log p(target) of head i at position t."""
    correct_BTN: Tensor
    """Whether head i's top-1 prediction at t is its target."""
    entropy_BTN: Tensor
    """Entropy of head i's predictive distribution at t."""
    targets_BTN: Tensor
    """Target token ids (IGNORE_INDEX where none)."""

    @property
    def valid_BTN(self) -> Tensor:
        return self.targets_BTN != IGNORE_INDEX


@torch.no_grad()
def token_scores(model, tokens_BT: Tensor, sep_id: int | None = None, batch_size: int = 8) -> TokenScores:
    """Loss, top-1 correctness and entropy of every head at every position (works with stub models too)."""
    offsets = model.config.head_offsets
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    parts = []
    for start in range(0, tokens_BT.shape[0], batch_size):
        chunk_BT = tokens_BT[start : start + batch_size].to(device)
        targets_BTN = build_targets(chunk_BT, offsets, sep_id=sep_id)
        logits_BTNV = model(chunk_BT).float()
        logp_BTNV = F.log_softmax(logits_BTNV, dim=-1)
        valid_BTN = targets_BTN != IGNORE_INDEX
        picked_BTN = logp_BTNV.gather(-1, targets_BTN.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        loss_BTN = torch.where(valid_BTN, -picked_BTN, torch.nan)
        correct_BTN = (logp_BTNV.argmax(-1) == targets_BTN) & valid_BTN
        entropy_BTN = -(logp_BTNV.exp() * logp_BTNV).sum(-1)
        entropy_BTN = torch.where(valid_BTN, entropy_BTN, torch.nan)
        parts.append((loss_BTN.cpu(), correct_BTN.cpu(), entropy_BTN.cpu(), targets_BTN.cpu()))
    return TokenScores(*(torch.cat(group) for group in zip(*parts, strict=True)))


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
