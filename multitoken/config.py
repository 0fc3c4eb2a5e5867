"""Model configuration and named presets."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from multitoken.errors import UserError

HeadStyle = Literal["transformer", "linear", "sequential"]
HEAD_STYLES = ("transformer", "linear", "sequential")


@dataclass
class ModelConfig:
    """Shape of a multi-token-prediction decoder: a shared trunk, `n_future` heads, one unembedding."""

    vocab_size: int = 8192
    """Number of token ids the embedding and unembedding hold."""
    dim: int = 256
    """Width of the residual stream (d_model)."""
    n_layers: int = 6
    """Transformer blocks in total, trunk plus transformer heads when parameter-matched."""
    n_heads: int = 8
    """Attention heads per block (query heads)."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None means n_heads (plain multi-head attention)."""
    n_future: int = 1
    """Number of output heads; head i predicts the token `head_offsets[i]` steps ahead."""
    head_style: HeadStyle = "transformer"
    """transformer: one block per head (the paper); linear: Medusa's x + SiLU(Wx); sequential: DeepSeek-V3's MTP modules."""
    head_offsets: list[int] | None = None
    """Future offset each head predicts; None means 1..n_future. Far-future heads like [1, 2, 4, 8] are allowed."""
    param_matched: bool = True
    """Take the extra heads' blocks from the trunk so the block count stays n_layers; False stacks them on top."""
    loss_weights: list[float] | None = None
    """Per-head loss weight; None means all 1.0. DeepSeek's lambda: [1, 0.3, 0.3]; train on the 3rd token only: [0, 0, 1]."""
    max_seq_len: int = 1024
    """Longest context the RoPE tables and KV caches are built for."""
    tie_embeddings: bool = False
    """Share the token embedding matrix with the unembedding."""
    ffn_hidden: int | None = None
    """Hidden width of the SwiGLU MLP; None means 8/3 * dim rounded up to a multiple of `multiple_of`."""
    multiple_of: int = 64
    """Rounding for the derived MLP width."""
    norm_eps: float = 1e-5
    """Epsilon of RMSNorm."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding frequencies."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of linear and embedding weights."""

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_offsets is None:
            self.head_offsets = list(range(1, self.n_future + 1))
        else:
            self.head_offsets = [int(o) for o in self.head_offsets]
        if self.loss_weights is None:
            self.loss_weights = [1.0] * self.n_future
        else:
            self.loss_weights = [float(w) for w in self.loss_weights]
        if self.ffn_hidden is None:
            hidden = int(2 * 4 * self.dim / 3)
            self.ffn_hidden = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        self.validate()

    def validate(self) -> None:
        """Raise UserError with a plain message for any inconsistent field."""
        if self.n_future < 1:
            raise UserError(f"n_future must be at least 1, got {self.n_future}")
        if self.head_style not in HEAD_STYLES:
            raise UserError(f"head_style must be one of {', '.join(HEAD_STYLES)}, got {self.head_style!r}")
        if self.n_future > self.n_layers:
            raise UserError(
                f"n_future={self.n_future} heads need at least as many layers, got n_layers={self.n_layers}"
            )
        if self.vocab_size < 2 or self.dim < 1 or self.n_heads < 1:
            raise UserError("vocab_size must be at least 2, and dim and n_heads at least 1")
        if self.dim % self.n_heads:
            raise UserError(f"dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if (self.dim // self.n_heads) % 2:
            raise UserError(f"head dimension dim/n_heads={self.dim // self.n_heads} must be even for RoPE")
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}")
        if len(self.head_offsets) != self.n_future:
            raise UserError(f"head_offsets has {len(self.head_offsets)} entries but n_future={self.n_future}")
        if any(o < 1 for o in self.head_offsets) or sorted(set(self.head_offsets)) != self.head_offsets:
            raise UserError(f"head_offsets must be increasing positive integers, got {self.head_offsets}")
        if self.head_style == "sequential" and self.head_offsets != list(range(1, self.n_future + 1)):
            raise UserError("sequential heads predict consecutive tokens: head_offsets must be 1..n_future")
        if len(self.loss_weights) != self.n_future:
            raise UserError(f"loss_weights has {len(self.loss_weights)} entries but n_future={self.n_future}")
        if any(w < 0 for w in self.loss_weights) or not any(w > 0 for w in self.loss_weights):
            raise UserError(
                f"loss_weights must be non-negative with at least one positive, got {self.loss_weights}"
            )
        if self.max_seq_len < 1:
            raise UserError(f"max_seq_len must be positive, got {self.max_seq_len}")
        if self.n_trunk_layers < 0:
            raise UserError(f"n_layers={self.n_layers} leaves no room for {self.n_future} heads")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_trunk_layers(self) -> int:
        """Blocks in the shared trunk.

        Transformer heads own one block each; the next-token head's block is always one of the n_layers.
        Linear and sequential styles keep the next-token path in the trunk; when parameter-matched, the
        extra heads' blocks (sequential) are taken from the trunk.
        """
        extra = self.n_future - 1
        if self.head_style == "transformer":
            return self.n_layers - 1 - (extra if self.param_matched else 0)
        if self.head_style == "sequential":
            return self.n_layers - (extra if self.param_matched else 0)
        return self.n_layers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        return dataclass_from_dict(cls, values, "model config")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"cannot read model config {path}: {err}") from err
        return cls.from_dict(values)


def dataclass_from_dict(cls: type, values: dict[str, Any], what: str = "config"):
    """`cls(**values)`, with a UserError naming any field `cls` does not have."""
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise UserError(f"unknown {what} field(s): {', '.join(unknown)}")
    hints = typing.get_type_hints(cls)
    return cls(**{name: _as_field_type(name, value, hints[name], what) for name, value in values.items()})


def strip_optional(tp: Any) -> Any:
    """`X` for `X | None` (or Optional[X]); any other type as it is."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _as_field_type(name: str, value: Any, annotation: Any, what: str) -> Any:
    """A YAML or JSON value as its int or float field wants it (YAML reads `1e-3` as a string)."""
    if value is None and type(None) in typing.get_args(annotation):
        return None
    tp = strip_optional(annotation)
    if tp not in (int, float):
        return value
    if isinstance(value, str):
        try:
            value = float(value) if tp is float else int(value)
        except ValueError:
            raise UserError(f"{what} field {name} must be {tp.__name__}, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{what} field {name} must be {tp.__name__}, got {value!r}")
    if tp is int and not float(value).is_integer():
        raise UserError(f"{what} field {name} must be int, got {value!r}")
    return tp(value)


# Shapes only; vocab_size comes from the data. `debug` runs in seconds on a CPU, `tiny`/`small` in minutes.
PRESETS: dict[str, dict[str, Any]] = {
    "debug": dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256),
    "tiny": dict(dim=192, n_layers=6, n_heads=6, n_kv_heads=2, max_seq_len=512),
    "small": dict(dim=384, n_layers=8, n_heads=6, n_kv_heads=2, max_seq_len=1024),
    "125m": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, max_seq_len=2048),
    "350m": dict(dim=1024, n_layers=24, n_heads=16, n_kv_heads=16, max_seq_len=2048),
    "1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, max_seq_len=2048, ffn_hidden=8192),
    "7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, max_seq_len=4096, ffn_hidden=11008),
}


def preset_config(name: str, **overrides: Any) -> ModelConfig:
    """A ModelConfig from a named preset, with any field overridden."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    values = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    return ModelConfig.from_dict(values)


__all__ = ["HEAD_STYLES", "PRESETS", "ModelConfig", "preset_config"]
