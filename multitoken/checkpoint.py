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
import pickle
import re
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
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
    try:
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
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        disk_error = isinstance(err, (OSError, SafetensorError))
        if disk_error or (isinstance(err, RuntimeError) and "writ" in str(err).lower()):
            kept = _read_latest(root)
            raise UserError(
                f"could not save checkpoint {final.name} in {root}: {_reason(err)}; "
                + (f"the last good checkpoint {kept} is intact" if kept else "no earlier checkpoint exists")
            ) from None
        raise
    if final.exists():  # re-saving the same step (e.g. interrupt right after a periodic save)
        old = root / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    write_text_atomic(root / LATEST, final.name + "\n")  # if this fails, `latest` names the previous step
    if keep > 0:
        prune_checkpoints(root, keep)
    return final


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError):
        return err.strerror or str(err)
    return str(err).splitlines()[0] if str(err) else type(err).__name__


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
    config = ModelConfig.load(ckpt / CONFIG)
    with torch.device("meta"):  # check names and shapes before allocating a model of an edited size
        check_weights(ckpt, MultiTokenLM(config).state_dict())
    model = MultiTokenLM(config)
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
    """Load a checkpoint's weights into `model`, refusing one whose config, names or shapes differ."""
    ckpt = Path(ckpt)
    check_config(model.config, ckpt)
    check_weights(ckpt, plain_module(model).state_dict())
    try:
        load_safetensors(plain_module(model), str(ckpt / WEIGHTS), strict=False)
    except (SafetensorError, OSError, RuntimeError) as err:
        raise UserError(f"checkpoint weights {ckpt / WEIGHTS} are unreadable: {_reason(err)}") from None


def weight_shapes(ckpt: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a weights file's header; UserError for a file that is not safetensors."""
    path = Path(ckpt) / WEIGHTS
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(
            f"checkpoint weights {path} are not a readable safetensors file: {_reason(err)}"
        ) from None


def check_weights(ckpt: str | Path, expected: dict[str, torch.Tensor]) -> None:
    """Refuse a weights file whose tensor names or shapes differ from `expected` (a state_dict)."""
    shapes = weight_shapes(ckpt)
    tied = [n for n in TIED_NAMES if n in expected and n not in shapes]
    if len(tied) == 1 and all(n in shapes or n in tied for n in TIED_NAMES if n in expected):
        expected = {k: v for k, v in expected.items() if k != tied[0]}  # tied weights are stored once
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"checkpoint {ckpt} weights do not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    wrong = [
        f"{name} {list(shapes[name])} vs {list(t.shape)}"
        for name, t in expected.items()
        if tuple(t.shape) != shapes[name]
    ]
    if wrong:
        raise UserError(
            f"checkpoint {ckpt} weights do not match its config.json ({len(wrong)} shapes differ: {wrong[0]})"
        )


TIED_NAMES = ("tok_embeddings.weight", "output.weight")


def read_weights(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's weights by parameter name, on CPU, without building a model.

    The file holds tied embeddings once; both names are returned, sharing one tensor, as a tied
    model's `state_dict()` has them.
    """
    ckpt = Path(ckpt)
    config = ModelConfig.load(ckpt / CONFIG)
    with torch.device("meta"):
        check_weights(ckpt, MultiTokenLM(config).state_dict())
    try:
        state = read_safetensors(str(ckpt / WEIGHTS))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise UserError(f"checkpoint weights {ckpt / WEIGHTS} are unreadable: {_reason(err)}") from None
    if config.tie_embeddings:
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
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise UserError(
            f"trainer state {path} is unreadable (truncated or not ours): {_reason(err)}"
        ) from None
    missing = [k for k in ("optimizer", "step", "torch_rng") if not isinstance(state, dict) or k not in state]
    if missing:
        raise UserError(f"trainer state {path} lacks {', '.join(missing)}")
    return state


def plain_module(model: torch.nn.Module) -> torch.nn.Module:
    """The underlying module of a compiled or DDP-wrapped model, so keys carry no wrapper prefixes."""
    while hasattr(model, "_orig_mod") or hasattr(model, "module"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


STEP_NAME = re.compile(r"step_\d+")
_warned_dangling: set[Path] = set()


def _read_latest(root: Path) -> str | None:
    """The checkpoint `latest` names; if it names none (a crash between two renames of a re-save, or
    an edited file), the newest complete step directory, said once in a line on stderr."""
    try:
        name = (root / LATEST).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        name = None
        if not (root / LATEST).exists():
            return None
    if name and STEP_NAME.fullmatch(name) and (root / name).is_dir():
        return name
    complete = [p for p in _step_dirs(root) if (p / WEIGHTS).is_file()]
    fallback = complete[-1].name if complete else None
    if root not in _warned_dangling:
        _warned_dangling.add(root)
        shown = repr(name[:40]) if name is not None else "an unreadable name"
        print(
            f"multitoken: warning: {root / LATEST} names {shown}, which is not a checkpoint; "
            + (f"using the newest complete one, {fallback}" if fallback else "no complete checkpoint found"),
            file=sys.stderr,
        )
    return fallback


def checkpoint_steps(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, directory) of every complete checkpoint (its config written) of a run, oldest first."""
    return [(int(p.name[5:]), p) for p in _step_dirs(Path(run_dir) / CHECKPOINTS) if (p / CONFIG).is_file()]


def _step_dirs(root: Path) -> list[Path]:
    """Checkpoint directories, oldest step first (by number: step_1000000 comes after step_999000)."""
    dirs = [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[5:]))


def _write_atomic(path: Path, text: str) -> None:
    """Replace `path` by `text` through a synced temporary sibling; nothing is left behind on failure."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_files(directory: Path) -> None:
    """Flush every file of a checkpoint to disk before it is renamed into place."""
    for file in directory.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())


def write_json(path: str | Path, values: dict[str, Any]) -> None:
    """Write a JSON file atomically; a full disk or an unwritable folder is one UserError line."""
    write_text_atomic(path, json.dumps(values, indent=2, default=str) + "\n")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace a text file atomically; UserError (nothing changed) when it cannot be written."""
    try:
        _write_atomic(Path(path), text)
    except OSError as err:
        raise UserError(f"cannot write {path}: {_reason(err)}") from None
