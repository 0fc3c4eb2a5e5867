"""Trainer: setup -> fit -> validate -> save. Single process, or data parallel or FSDP2 under torchrun.

The global batch (`batch_size` sequences per optimizer step) is a function of (seed, step) only and is
split across ranks and micro-batches; every head's loss is normalised by its target count over the
whole global batch, so results do not depend on the number of processes or micro-batches.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
import typing
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from multitoken import checkpoint as ckpt_io
from multitoken.config import ModelConfig, coerce_value, dataclass_from_dict, preset_config
from multitoken.data.loader import TokenDataset
from multitoken.distributed import Dist
from multitoken.errors import UserError
from multitoken.files import check_output_parent, read_json
from multitoken.loss import IGNORE_INDEX, build_targets, head_metrics, multi_token_backward
from multitoken.model import Block, MultiTokenLM
from multitoken.restyle_heads import is_drafting_head, load_with_new_heads, restyled_config
from multitoken.train_log import check_metrics

TRAIN_CONFIG = "train_config.json"
MAX_TOKENS_PER_STEP = 1 << 30
"""Most tokens in one global batch (1.07B, 100x the largest published LLM batches): the batch of a step
is built whole in memory, so larger values would only exhaust it."""


@dataclass
class TrainConfig:
    """A training run. Model shape comes from `preset`, with any ModelConfig field overridden in `model`."""

    data: str = "data/stdlib"
    """Directory written by `multitoken prepare`."""
    out: str = "runs/default"
    """Run directory: checkpoints, metrics.jsonl, TensorBoard logs."""
    preset: str = "tiny"
    """Named model shape: debug, tiny, small, 125m, 350m, 1b, 7b."""
    model: dict[str, Any] = field(default_factory=dict)
    """ModelConfig fields overriding the preset (n_future, head_style, dim, ...)."""
    batch_size: int = 32
    """Global batch in sequences per optimizer step, split across ranks and micro-batches."""
    micro_batch_size: int = 0
    """Sequences per forward/backward on one rank; 0 means the whole per-rank share (no accumulation)."""
    seq_len: int = 256
    """Tokens per training sequence."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak, reached by cosine decay."""
    warmup_steps: int = 100
    """Linear warmup steps."""
    max_steps: int = 2000
    """Optimizer steps in the whole run."""
    decay_steps: int = 0
    """Steps of the warmup + cosine schedule; 0 means max_steps. Resuming with a larger max_steps keeps the
    run's schedule (the extra steps run at the final learning rate) unless you pass this."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (not on norms or embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables."""
    seed: int = 1337
    """Seed for initialisation and for the data order."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (cuda when available)."""
    dtype: str = "auto"
    """float32 or bfloat16 autocast; auto means bfloat16 on CUDA and float32 on CPU."""
    compile: bool = False
    """torch.compile each block (GPU)."""
    fsdp: bool = False
    """Shard parameters, gradients and optimizer state over the torchrun processes (FSDP2); needs 2 or more."""
    memory_efficient: bool = True
    """Run heads' forward/backward one at a time (the paper's memory-efficient schedule)."""
    chunk_size: int = 2048
    """Positions per cross-entropy chunk, so full (tokens x vocab) logits never exist at once."""
    log_every: int = 10
    """Steps between metrics.jsonl lines."""
    val_every: int = 200
    """Steps between validations; 0 disables (a final validation still runs)."""
    val_batches: int = 8
    """Validation batches of batch_size sequences."""
    save_every: int = 500
    """Steps between checkpoints; a final one is always saved."""
    keep: int = 3
    """Checkpoints to keep; 0 keeps all."""
    resume: bool = False
    """Continue the run in `out` from its latest checkpoint."""
    tensorboard: bool = True
    """Also log to TensorBoard under out/tb."""
    progress: bool = True
    """Show a progress bar."""
    init_from: str | None = None
    """Start from this checkpoint's weights and model shape (e.g. one `multitoken import` wrote); model flags are
    refused, but for --head-style with --train heads: new linear, medusa or conditioned heads on the same trunk."""
    train: Literal["all", "heads"] = "all"
    """all: train every parameter; heads: freeze the next-token path (embeddings, trunk, first head, norm,
    unembedding) and train only the extra heads, so the next-token logits stay exactly the base's."""
    distill: bool = False
    """Self-distillation (needs --train heads): head k learns the frozen base's own next-token
    distribution at t + k - 1 from the same forward pass instead of the data's token t + k; no labels."""
    distill_top_k: int = 0
    """With --distill: soft targets over the full vocabulary (0), or only the base's top-k entries,
    renormalised to sum to 1 (the tail's mass is dropped)."""
    loss_after: str = ""
    """Score only the target tokens that follow this text (one token) in their document, e.g. "=" before
    an answer; every head keeps the same target tokens, and validation scores them alone. Empty: all."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"{f.name} must be a finite number, got {value}")
        positive = ("batch_size", "seq_len", "max_steps", "log_every", "chunk_size", "val_batches")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise UserError(f"lr must be positive, got {self.lr}")
        non_negative = (
            "micro_batch_size",
            "warmup_steps",
            "weight_decay",
            "grad_clip",
            "seed",
            "decay_steps",
        )
        non_negative += ("val_every", "save_every", "keep")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UserError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.train not in ("all", "heads"):
            raise UserError(f"train must be all or heads, got {self.train!r}")
        if self.distill and self.train != "heads":
            raise UserError("--distill trains heads toward the frozen base's predictions: add --train heads")
        if self.distill_top_k < 0:
            raise UserError(f"distill_top_k must be >= 0, got {self.distill_top_k}")
        if self.fsdp and (self.init_from is not None or self.train != "all"):
            raise UserError("--init-from and --train heads do not run under --fsdp yet")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise UserError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if not isinstance(self.model, dict):
            raise UserError(f"model must be a mapping of ModelConfig fields, got {self.model!r}")
        unknown = sorted(set(self.model) - {f.name for f in dataclasses.fields(ModelConfig)})
        if unknown:
            raise UserError(f"unknown model config field(s): {', '.join(unknown)}")
        hints = typing.get_type_hints(ModelConfig)
        self.model = {k: coerce_value(v, hints[k], f"model field {k}") for k, v in self.model.items()}
        if self.batch_size * self.seq_len > MAX_TOKENS_PER_STEP:
            raise UserError(
                f"batch_size={self.batch_size} x seq_len={self.seq_len} is more than "
                f"{MAX_TOKENS_PER_STEP:,} tokens per step"
            )

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The model this run trains, for a dataset of `vocab_size` tokens: the --init-from checkpoint's,
        or the preset's with the model overrides."""
        if self.init_from is not None:
            config = ModelConfig.load(ckpt_io.resolve_checkpoint(self.init_from) / ckpt_io.CONFIG)
            others = sorted(set(self.model) - {"head_style"})
            if others:
                raise UserError(
                    f"--init-from takes the model from {self.init_from}; drop {', '.join(others)}"
                )
            if self.model.get("head_style", config.head_style) != config.head_style:
                if self.train != "heads":
                    raise UserError(
                        "--head-style with --init-from gives the model new heads: add --train heads"
                    )
                config = restyled_config(config, self.model["head_style"])
            if vocab_size > config.vocab_size:
                raise UserError(
                    f"the data's tokenizer has {vocab_size} ids, more than the model's {config.vocab_size}: "
                    f"prepare the data with the tokenizer of {self.init_from}"
                )
        else:
            config = preset_config(self.preset, **{**self.model, "vocab_size": vocab_size})
        if self.train == "heads" and config.n_future < 2:
            raise UserError("--train heads needs a model with extra heads (n_future >= 2); this one has 1")
        if self.seq_len > config.max_seq_len:
            raise UserError(
                f"seq_len={self.seq_len} is longer than the model's context, max_seq_len={config.max_seq_len} "
                f"(preset {self.preset}); use a shorter --seq-len or pass --max-seq-len {self.seq_len}"
            )
        if max(config.head_offsets) >= self.seq_len:
            raise UserError(
                f"head offset {max(config.head_offsets)} reaches past every window of seq_len={self.seq_len}: "
                "that head would never see a target"
            )
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        return dataclass_from_dict(cls, values)


# Fields that may differ between a run and its resumption without changing what is trained.
RESUME_MUTABLE = {
    "out",  # a run directory may be moved or copied and resumed where it now lives
    "decay_steps",
    "resume",
    "max_steps",
    "log_every",
    "val_every",
    "save_every",
    "keep",
    "progress",
    "tensorboard",
    "device",
    "fsdp",
}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at decay_steps (0: max_steps),
    constant after."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    horizon = cfg.decay_steps or cfg.max_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, horizon - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: MultiTokenLM, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, with weight decay on matrices other than the embedding."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.dim() >= 2 and "tok_embeddings" not in n]
    no_decay = [p for n, p in trainable if p.dim() < 2 or "tok_embeddings" in n]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def _compile_blocks(model: MultiTokenLM) -> None:
    """torch.compile each transformer block in place, so state_dict keys stay plain."""
    for module in model.modules():
        if isinstance(module, Block):
            module.compile()


def freeze_next_token_path(model: MultiTokenLM) -> None:
    """Stop gradients to every parameter the next-token logits depend on; only extra heads stay trainable."""
    for name, param in model.named_parameters():
        param.requires_grad_(is_drafting_head(name))


class NonFiniteLoss(UserError):
    """A step's loss or gradient norm was NaN or infinite; the step was not applied."""


class Trainer:
    """Owns one run: model, optimizer, data, logging and checkpoints."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.dist = Dist.from_env(cfg.device)
        self.device = self.dist.device
        if cfg.fsdp and self.dist.world_size < 2:
            raise UserError(
                "--fsdp shards over processes: launch with torchrun --nproc_per_node N (N >= 2), or pass --no-fsdp"
            )
        self.sharded = cfg.fsdp
        self.run_dir = Path(cfg.out)
        check_output_parent(self.run_dir / TRAIN_CONFIG, "run directory")
        self.train_data = TokenDataset(cfg.data, "train")
        self.val_data = TokenDataset(cfg.data, "val")
        self.tokenizer = self.train_data.tokenizer()
        self.loss_after_id = self._marker_id(cfg.loss_after)
        self.model_config = cfg.model_config(self.train_data.vocab_size)
        if cfg.init_from is not None:
            self._check_init_tokenizer(ckpt_io.resolve_checkpoint(cfg.init_from))
        for split, data in (("training", self.train_data), ("validation", self.val_data)):
            if cfg.seq_len > data.n_tokens - 1:
                raise UserError(f"{split} data has {data.n_tokens} tokens, too few for seq_len={cfg.seq_len}")
        self.rows_per_rank, self.micro_rows = self._split_batch()
        self._untrained_heads_N = torch.tensor([w == 0 for w in self.model_config.loss_weights])
        self.autocast_dtype = self._autocast_dtype()
        self.step = 0
        self.saved_step = -1  # the step of this run's newest checkpoint
        self._stop_requested = False

        torch.manual_seed(cfg.seed)
        if self.sharded:
            from multitoken import fsdp

            # Only rank 0 holds the full model, and only while its weights are sent to every rank's shards.
            self.model = fsdp.build_sharded_model(
                self.model_config,
                self.device,
                self.dist.world_size,
                self.dist.is_main,
                compile_blocks=_compile_blocks if cfg.compile else None,
                initialise=not (cfg.resume and ckpt_io.find_latest(self.run_dir) is not None),
            )
        else:
            self.model = MultiTokenLM(self.model_config).to(self.device)
            if cfg.init_from is not None:
                source = ckpt_io.resolve_checkpoint(cfg.init_from)
                if ModelConfig.load(source / ckpt_io.CONFIG).head_style != self.model_config.head_style:
                    load_with_new_heads(self.model, source)
                else:
                    ckpt_io.load_weights(self.model, source)
            if cfg.train == "heads":
                freeze_next_token_path(self.model)
            if cfg.compile:
                _compile_blocks(self.model)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self._prepare_run_dir()

    # ---- setup ----------------------------------------------------------------------------------

    def _check_init_tokenizer(self, ckpt: Path) -> None:
        """Refuse data tokenized otherwise than the --init-from checkpoint's text."""
        from multitoken.tokenizer import load_tokenizer

        if not any((ckpt / name).is_file() for name in ("tokenizer.json", "tokenizer.tiktoken")):
            return  # a checkpoint without a tokenizer: the vocabulary size was checked
        if self.tokenizer is not None and load_tokenizer(ckpt).fingerprint() != self.tokenizer.fingerprint():
            raise UserError(
                f"the data in {self.cfg.data} was tokenized with another tokenizer than {self.cfg.init_from}'s; "
                f"prepare it with --tokenizer {self.cfg.init_from}"
            )

    def _split_batch(self) -> tuple[int, int]:
        world = self.dist.world_size
        if self.cfg.batch_size % world:
            raise UserError(f"batch_size={self.cfg.batch_size} must be divisible by the {world} processes")
        rows = self.cfg.batch_size // world
        micro = self.cfg.micro_batch_size or rows
        if rows % micro:
            raise UserError(f"per-process batch {rows} must be divisible by micro_batch_size={micro}")
        return rows, micro

    def _autocast_dtype(self) -> torch.dtype | None:
        wanted = self.cfg.dtype
        if wanted == "auto":
            wanted = "bfloat16" if self.device.type == "cuda" else "float32"
        return torch.bfloat16 if wanted == "bfloat16" else None

    def _prepare_run_dir(self) -> None:
        """Refuse to clobber another run; on --resume, load the latest checkpoint. Every check runs before
        anything on disk is written."""
        saved_path = self.run_dir / TRAIN_CONFIG
        latest = ckpt_io.find_latest(self.run_dir)
        if self.cfg.resume:
            if latest is None:
                never_saved = saved_path.exists()  # it stopped before its first checkpoint
                hint = " (the run stopped before its first save: start it again without --resume)"
                raise UserError(
                    f"nothing to resume in {self.run_dir}: no checkpoint found{hint if never_saved else ''}"
                )
            saved = self._check_same_run(saved_path)
            self._load_state(latest)
            check_metrics(self.run_dir, self.dist.is_main)
            self._keep_schedule(saved)
            # Keep the run's config as resumed (e.g. a new max_steps), so a later --resume continues it.
            self.dist.barrier()
            if self.dist.is_main:
                ckpt_io.write_json(saved_path, {**self.cfg.to_dict(), "resume": False})
            self.dist.barrier()
            return
        if latest is not None:
            raise UserError(
                f"{self.run_dir} already holds a run; pass --resume to continue it, or choose another --out"
            )
        if saved_path.exists():
            # A run that stopped before its first checkpoint: the same run may start over, another may not.
            self._check_same_run(saved_path)
        self.dist.barrier()  # every rank has checked before rank 0 writes
        if self.dist.is_main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise UserError(f"cannot create run directory {self.run_dir}: {err.strerror}") from None
            ckpt_io.write_json(saved_path, self.cfg.to_dict())
        self.dist.barrier()

    def _check_same_run(self, saved_path: Path) -> dict[str, Any]:
        """The saved run config, after refusing one that describes a different run."""
        if not saved_path.exists():
            return {}
        saved = read_json(saved_path, "run config")
        mine = self.cfg.to_dict()
        # A field newer than the saved run's config had its default there.
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        diffs = sorted(k for k in mine if k not in RESUME_MUTABLE and saved.get(k, defaults[k]) != mine[k])
        if diffs:
            raise UserError(
                f"{self.run_dir} holds a different run (differs in {', '.join(diffs)}); choose another --out"
            )
        return saved

    def _keep_schedule(self, saved: dict[str, Any]) -> None:
        """A resumed run with a new max_steps keeps its learning-rate schedule, and says so."""
        cfg = self.cfg
        old_steps = saved.get("max_steps")
        if not isinstance(old_steps, int) or old_steps == cfg.max_steps or cfg.decay_steps:
            return
        cfg.decay_steps = saved.get("decay_steps") or old_steps
        if self.dist.is_main:
            print(
                f"max_steps {old_steps} -> {cfg.max_steps}: the learning rate keeps this run's schedule "
                f"(cosine to step {cfg.decay_steps}, then {cfg.lr * cfg.min_lr_ratio:.3g}); "
                f"pass --decay-steps {cfg.max_steps} to stretch it instead"
            )

    def _load_state(self, latest: Path) -> None:
        if self.sharded:
            state = self._load_sharded_state(latest)
        else:
            ckpt_io.load_weights(self.model, latest)
            state = ckpt_io.load_trainer_state(latest)
            self.optimizer.load_state_dict(state["optimizer"])
        self.step = self.saved_step = state["step"]
        torch.set_rng_state(state["torch_rng"])
        if self.dist.is_main:
            print(f"resuming {self.run_dir} from step {self.step}")

    def _load_sharded_state(self, latest: Path) -> dict[str, Any]:
        """Rank 0 reads the full weights and optimizer state; FSDP scatters them. Returns the trainer state."""
        from multitoken import fsdp

        ckpt_io.check_config(self.model_config, latest)  # on every rank, so a mismatch stops them all
        main = self.dist.is_main
        state = ckpt_io.load_trainer_state(latest, mmap=not main)  # other ranks read only step and RNG
        model_state = ckpt_io.read_weights(latest) if main else {}
        fsdp.load_full_state(self.model, self.optimizer, model_state, state["optimizer"] if main else {})
        return state

    # ---- one optimizer step ---------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        """One optimizer step over the global batch; returns the step's metrics."""
        cfg, dist, model = self.cfg, self.dist, self.model
        global_BT = self.train_data.batch_for(
            cfg.seed, self.step, cfg.batch_size, cfg.seq_len, 0, cfg.batch_size
        )
        targets_BTN = build_targets(
            global_BT,
            self.model_config.head_offsets,
            sep_id=self.train_data.eos_id,
            loss_after_id=self.loss_after_id,
        )
        row_counts_BN = (targets_BTN != IGNORE_INDEX).sum(dim=1)
        counts_N = row_counts_BN.sum(dim=0).to(self.device)
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sums_N = torch.zeros(self.model_config.n_future, dtype=torch.float64)
        first_row = dist.rank * self.rows_per_rank
        for start in range(first_row, first_row + self.rows_per_rank, self.micro_rows):
            tokens_BT = global_BT[start : start + self.micro_rows].to(self.device)
            with self._autocast():
                losses = multi_token_backward(
                    model,
                    tokens_BT,
                    memory_efficient=cfg.memory_efficient,
                    chunk_size=cfg.chunk_size,
                    sep_id=self.train_data.eos_id,
                    normalizer_N=counts_N,
                    targets_BTN=targets_BTN[start : start + self.micro_rows].to(self.device),
                    distill=cfg.distill,
                    distill_top_k=cfg.distill_top_k,
                )
            micro_counts_N = row_counts_BN[start : start + self.micro_rows].sum(dim=0)
            losses_N = torch.tensor(losses, dtype=torch.float64)
            losses_N[self._untrained_heads_N] = 0.0  # reported as NaN; a diverged head stays NaN
            loss_sums_N += losses_N * micro_counts_N
        if not self.sharded:  # FSDP has reduce-scattered them during backward
            dist.all_reduce_grads(model)
        loss_sums_N = dist.all_reduce_sum(loss_sums_N)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        if self.sharded:
            grad_norm = grad_norm.full_tensor()  # a DTensor over the shards
        if not (torch.isfinite(loss_sums_N).all() and math.isfinite(float(grad_norm))):
            self.optimizer.zero_grad(set_to_none=True)  # the weights stay those of the last good step
            raise NonFiniteLoss(
                f"the loss became non-finite at step {self.step + 1} (loss sums {loss_sums_N.tolist()}, "
                f"gradient norm {float(grad_norm):.4g})"
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        head_losses = (loss_sums_N / counts_N.cpu().clamp(min=1)).tolist()
        weights = self.model_config.loss_weights
        metrics = {"loss": sum(w * h for w, h in zip(weights, head_losses, strict=True) if w > 0), "lr": lr}
        metrics["grad_norm"] = float(grad_norm)
        for i, h in enumerate(head_losses):
            if weights[i] > 0:
                metrics[f"{'distill' if cfg.distill and i > 0 else 'loss'}_head{i + 1}"] = h
        return metrics

    def _marker_id(self, text: str) -> int | None:
        """The token id of --loss-after's text; None when it is empty."""
        if not text:
            return None
        ids = self.tokenizer.encode(text)
        if len(ids) != 1:
            raise UserError(
                f"--loss-after {text!r} must be one token of the data's tokenizer, got {len(ids)}"
            )
        return ids[0]

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ---- validation -----------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Next-token val loss, and loss and top-1 accuracy of every head, on fixed validation windows."""
        cfg, n = self.cfg, self.model_config.n_future
        self.model.eval()
        sums = torch.zeros(3, n, dtype=torch.float64)
        windows = list(
            self.val_data.eval_windows(
                cfg.seq_len,
                cfg.val_batches * cfg.batch_size,
                batch_size=self.micro_rows,
                rank=self.dist.rank,
                world_size=self.dist.world_size,
            )
        )
        # Under FSDP every rank must run the sharded forward equally often: one short of windows scores
        # a dummy batch and drops the result.
        n_batches = self.dist.max_over_ranks(len(windows)) if self.sharded else len(windows)
        dummy_BT = torch.zeros(1, cfg.seq_len, dtype=torch.long)
        for index in range(n_batches):
            tokens_BT = windows[index] if index < len(windows) else dummy_BT
            with self._autocast():
                loss_N, correct_N, count_N = head_metrics(
                    self.model,
                    tokens_BT.to(self.device),
                    sep_id=self.val_data.eos_id,
                    chunk_size=cfg.chunk_size,
                    loss_after_id=self.loss_after_id,
                )
            if index < len(windows):
                sums += torch.stack([loss_N, correct_N.double(), count_N.double()])
        sums = self.dist.all_reduce_sum(sums)
        if self.sharded:
            self.model.reshard()  # the root keeps its gathered weights after a forward
        self.model.train()
        loss_N, acc_N = sums[0] / sums[2].clamp(min=1), sums[1] / sums[2].clamp(min=1)
        metrics = {"val_loss": loss_N[0].item()}
        for i in range(n):
            metrics[f"val_loss_head{i + 1}"] = loss_N[i].item()
            metrics[f"val_acc_head{i + 1}"] = acc_N[i].item()
        return metrics

    # ---- checkpoints and the loop ---------------------------------------------------------------

    def save(self) -> Path | None:
        """Rank 0 writes a checkpoint; under FSDP every rank first helps gather the full state."""
        model, optimizer_state = self.model, self.optimizer.state_dict()
        if self.sharded:
            from multitoken import fsdp

            model_state = fsdp.full_model_state(self.model)
            optimizer_state = fsdp.full_optimizer_state(self.model, self.optimizer)
            model = fsdp.unsharded_copy(self.model_config, model_state) if self.dist.is_main else None
        state = {
            "optimizer": optimizer_state,
            "step": self.step,
            "torch_rng": torch.get_rng_state(),
        }
        state["train_config"] = self.cfg.to_dict()
        path = None
        if self.dist.is_main:
            path = ckpt_io.save_checkpoint(
                self.run_dir, self.step, model, self.tokenizer, state, keep=self.cfg.keep
            )
        self.dist.barrier()
        self.saved_step = self.step
        return path

    def _request_stop(self, signum, frame) -> None:
        if self._stop_requested:  # the second signal: stop now, without waiting for the step to end
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_DFL)
            raise KeyboardInterrupt(
                f"stopped at once by a second {signal.Signals(signum).name} during step {self.step + 1}; "
                f"{self._last_checkpoint_text()}"
            )
        self._stop_requested = True

    def _last_checkpoint_text(self) -> str:
        latest = ckpt_io.find_latest(self.run_dir)
        return f"the last checkpoint is {latest}" if latest else "no checkpoint was saved"

    def fit(self) -> dict[str, float]:
        """Train to max_steps (or until SIGINT/SIGTERM, which saves and returns). Returns the last metrics.

        A step whose loss or gradient norm is NaN or infinite stops the run at once (no tolerance: that
        step is not applied and nothing is saved), so the newest checkpoint is always a finite one.
        """
        from multitoken.train_log import TrainLogger

        cfg = self.cfg
        previous = {s: signal.signal(s, self._request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        logger = TrainLogger(self.run_dir, cfg, self.step, enabled=self.dist.is_main)
        tokens_per_step = cfg.batch_size * cfg.seq_len
        last: dict[str, float] = {}
        try:
            self.model.train()
            while self.step < cfg.max_steps:
                started = time.perf_counter()
                try:
                    metrics = self.train_step()
                except NonFiniteLoss as err:
                    raise NonFiniteLoss(
                        f"{err}; stopped without saving: {self._last_checkpoint_text()}"
                    ) from None
                elapsed = time.perf_counter() - started
                metrics["tokens_per_s"] = tokens_per_step / elapsed
                at_end = self.step == cfg.max_steps
                if (cfg.val_every and self.step % cfg.val_every == 0) or at_end:
                    metrics.update(self.validate())
                logger.log(self.step, metrics, force=at_end or "val_loss" in metrics)
                last = metrics
                if cfg.save_every and self.step % cfg.save_every == 0 and not at_end:
                    self.save()
                if self.dist.any_flag(self._stop_requested):
                    logger.write(f"interrupted at step {self.step}: saving a checkpoint")
                    break
            if self.step != self.saved_step:  # an interrupt right after a periodic save has nothing new
                self.save()
            logger.write(f"saved step {self.step} in {ckpt_io.find_latest(self.run_dir)}")
        finally:
            logger.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return last


def train(cfg: TrainConfig) -> dict[str, float]:
    """Train a multi-token-prediction model on prepared data, or resume a run with --resume.

    The model shape comes from --preset, with any field (--n-future, --head-style, --dim, ...)
    overridden. The run folder (--out) gets metrics.jsonl, TensorBoard logs and checkpoints written
    atomically; Ctrl-C or SIGTERM saves a checkpoint and stops (a second one stops at once).
    Returns the last logged metrics.
    """
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:
        trainer.dist.shutdown()


def resolve_cli_config(explicit: dict[str, Any]) -> TrainConfig:
    """Config for `multitoken train`: with --resume, the saved run's config under the given overrides."""
    values = dict(explicit)
    if values.get("resume"):
        saved_path = Path(values.get("out", TrainConfig.out)) / TRAIN_CONFIG
        if saved_path.exists():
            saved = read_json(saved_path, "run config")
            saved_model = saved.get("model") or {}
            if not isinstance(saved_model, dict):
                raise UserError(f"run config {saved_path}: field model must be a mapping")
            values = {**saved, **values, "model": {**saved_model, **values.get("model", {})}}
    return TrainConfig.from_dict(values)


__all__ = ["TrainConfig", "Trainer", "lr_at", "resolve_cli_config", "train"]
