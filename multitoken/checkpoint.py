"""Checkpoint directories: plain safetensors weights, config, tokenizer and trainer state, written atomically.

Layout of a run directory:
    run/checkpoints/step_000100/{config.json, model.safetensors, tokenizer.json, trainer_state.pt}
    run/checkpoints/latest          text file naming the newest complete checkpoint

A checkpoint is written into a temporary sibling directory and renamed into place, then `latest` is
replaced atomically, so a crash or Ctrl-C at any moment leaves the last good checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file as read_safetensors
from safetensors.torch import load_model as load_safetensors
from safetensors.torch import save_model as save_safetensors

from multitoken.config import ModelConfig
from multitoken.errors import UserError
from multitoken.model import MultiTokenLM

CHECKPOINTS = "checkpoints"
LATEST = "latest"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAINER_STATE = "trainer_state.pt"
REQUIRED_FILES = (CONFIG, WEIGHTS)


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: MultiTokenLM,
    tokenizer: Any | None = None,
    trainer_state: dict[str, Any] | None = None,
    keep: int = 0,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write checkpoint `step` under run_dir/checkpoints atomically, point `latest` at it, prune to `keep`."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    # One process writes a run's checkpoints: what a crashed save left half-written is garbage now.
    for leftover in [*root.glob(".tmp-step_*"), *root.glob(".old-step_*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    model.config.save(tmp / CONFIG)
    save_safetensors(plain_module(model), str(tmp / WEIGHTS))
    if tokenizer is not None:
        tokenizer.save(tmp)
    if trainer_state is not None:
        torch.save(trainer_state, tmp / TRAINER_STATE)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    _fsync_files(tmp)
    if final.exists():  # re-saving the same step (e.g. interrupt right after a periodic save)
        old = root / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _write_atomic(root / LATEST, final.name + "\n")
    if keep > 0:
        prune_checkpoints(root, keep)
    return final


def prune_checkpoints(root: Path, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints; never the one `latest` names."""
    latest = _read_latest(root)
    steps = _step_dirs(root)
    for old in steps[:-keep]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a run directory, its checkpoints/ folder, or a step directory."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    for root in (path / CHECKPOINTS, path):
        latest = _read_latest(root)
        if latest:
            path = root / latest
            break
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise UserError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    return path


def find_latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = Path(run_dir) / CHECKPOINTS
    latest = _read_latest(root)
    return root / latest if latest and (root / latest / WEIGHTS).is_file() else None


def load_model(path: str | Path, device: str | torch.device = "cpu") -> MultiTokenLM:
    """The model of a checkpoint, in eval mode."""
    ckpt = resolve_checkpoint(path)
    model = MultiTokenLM(ModelConfig.load(ckpt / CONFIG))
    load_weights(model, ckpt)
    return model.to(device).eval()


def check_config(config: ModelConfig, ckpt: str | Path) -> None:
    """Refuse a checkpoint whose model config differs from `config`."""
    ckpt = Path(ckpt)
    saved = ModelConfig.load(ckpt / CONFIG)
    if saved != config:
        diffs = [
            f"{k} {getattr(saved, k)!r} vs {getattr(config, k)!r}"
            for k in saved.to_dict()
            if getattr(saved, k) != getattr(config, k)
        ]
        raise UserError(f"checkpoint {ckpt} does not match the model: {'; '.join(diffs)}")


def load_weights(model: MultiTokenLM, ckpt: str | Path) -> None:
    """Load a checkpoint's weights into `model`, refusing one whose config differs."""
    ckpt = Path(ckpt)
    check_config(model.config, ckpt)
    missing, unexpected = load_safetensors(plain_module(model), str(ckpt / WEIGHTS), strict=False)
    if missing or unexpected:
        raise UserError(
            f"checkpoint {ckpt} weights do not match: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )


TIED_NAMES = ("tok_embeddings.weight", "output.weight")


def read_weights(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's weights by parameter name, on CPU, without building a model.

    The file holds tied embeddings once; both names are returned, sharing one tensor, as a tied
    model's `state_dict()` has them.
    """
    ckpt = Path(ckpt)
    state = read_safetensors(str(ckpt / WEIGHTS))
    if ModelConfig.load(ckpt / CONFIG).tie_embeddings:
        weight = next(state[name] for name in TIED_NAMES if name in state)
        state.update(dict.fromkeys(TIED_NAMES, weight))
    return state


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer) from a checkpoint or run directory. The tokenizer is None if none was saved."""
    from multitoken.tokenizer import load_tokenizer

    ckpt = resolve_checkpoint(path)
    model = load_model(ckpt, device)
    has_tokenizer = any((ckpt / name).exists() for name in ("tokenizer.json", "tokenizer.tiktoken"))
    return model, (load_tokenizer(ckpt) if has_tokenizer else None)


def load_trainer_state(ckpt: str | Path, mmap: bool = False) -> dict[str, Any]:
    """The trainer state of a checkpoint; with `mmap`, tensors are read from the file only when used."""
    path = Path(ckpt) / TRAINER_STATE
    if not path.is_file():
        raise UserError(f"checkpoint {ckpt} has no trainer state to resume from")
    return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)


def plain_module(model: torch.nn.Module) -> torch.nn.Module:
    """The underlying module of a compiled or DDP-wrapped model, so keys carry no wrapper prefixes."""
    while hasattr(model, "_orig_mod") or hasattr(model, "module"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


def _read_latest(root: Path) -> str | None:
    """The checkpoint `latest` names; if it names none (a crash between two renames of a re-save),
    the newest complete step directory."""
    try:
        name = (root / LATEST).read_text().strip()
    except OSError:
        return None
    if name and (root / name).is_dir():
        return name
    complete = [p for p in _step_dirs(root) if (p / WEIGHTS).is_file()]
    return complete[-1].name if complete else None


def _step_dirs(root: Path) -> list[Path]:
    """Checkpoint directories, oldest step first (by number: step_1000000 comes after step_999000)."""
    dirs = [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[5:]))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_files(directory: Path) -> None:
    """Flush every file of a checkpoint to disk before it is renamed into place."""
    for file in directory.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())


def write_json(path: str | Path, values: dict[str, Any]) -> None:
    """Write a JSON file atomically."""
    _write_atomic(Path(path), json.dumps(values, indent=2, default=str) + "\n")
