"""Model configuration and named presets."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from multitoken.errors import UserError, check_at_least

HeadStyle = Literal["transformer", "linear", "sequential", "medusa", "conditioned"]
HEAD_STYLES = ("transformer", "linear", "sequential", "medusa", "conditioned")
RESIDUAL_HEAD_STYLES = ("linear", "medusa", "conditioned")
"""Styles whose next-token head is the trunk output itself and whose drafting heads are x + SiLU(W u + b),
without attention: nothing to cache, and they stack into one matmul (`multitoken.draft_heads`)."""


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
    """transformer: one block per head (the paper); linear: Medusa's x + SiLU(Wx); sequential: DeepSeek-V3's MTP
    modules; medusa: x + SiLU(Wx + b) on the trunk's normed output, as vLLM's Medusa speculator runs it;
    conditioned: x + SiLU(W [x; e]), linear heads that also read the embedding e of the next token (known
    when drafting: the token just chosen), Hydra's first draft head, still drafting in parallel."""
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
    rope_scaling: dict[str, Any] | None = None
    """RoPE frequency scaling; None is plain RoPE. Llama 3.1's: {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}."""
    head_dim: int | None = None
    """Width of each attention head; None means dim // n_heads (Qwen3 sets it apart)."""
    attention_bias: bool = False
    """Biases on the query, key and value projections (Qwen2)."""
    qk_norm: bool = False
    """RMSNorm over each query and key head before RoPE (Qwen3)."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of linear and embedding weights."""

    def __post_init__(self) -> None:
        check_at_least(
            self, 1, "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "multiple_of", "n_future"
        )
        if self.n_future > self.n_layers:  # before head_offsets is built from it
            raise UserError(
                f"n_future={self.n_future} heads need at least as many layers, got n_layers={self.n_layers}"
            )
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
        if self.head_dim is None:
            if self.n_heads < 1 or self.dim % self.n_heads:
                raise UserError(f"dim={self.dim} must be divisible by n_heads={self.n_heads}")
            self.head_dim = self.dim // self.n_heads
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
        if self.head_dim < 2 or self.head_dim % 2:
            raise UserError(f"head dimension {self.head_dim} must be a positive even number for RoPE")
        if self.rope_scaling is not None:
            validate_rope_scaling(self.rope_scaling)
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}")
        if len(self.head_offsets) != self.n_future:
            raise UserError(f"head_offsets has {len(self.head_offsets)} entries but n_future={self.n_future}")
        if any(o < 1 for o in self.head_offsets) or sorted(set(self.head_offsets)) != self.head_offsets:
            raise UserError(f"head_offsets must be increasing positive integers, got {self.head_offsets}")
        if self.head_style == "conditioned" and self.head_offsets[0] != 1:
            raise UserError("conditioned heads read the next token: the first head's offset must be 1")
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
        for name in ("norm_eps", "rope_theta", "init_std"):
            if not getattr(self, name) > 0 or not math.isfinite(getattr(self, name)):
                raise UserError(f"{name} must be a positive finite number, got {getattr(self, name)}")
        if self.n_trunk_layers < 0:
            raise UserError(f"n_layers={self.n_layers} leaves no room for {self.n_future} heads")

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
        from multitoken.files import read_json

        values = read_json(path, "model config")
        try:
            return cls.from_dict(values)
        except UserError as err:
            raise UserError(f"{path}: {err}") from None


LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def validate_rope_scaling(scaling: dict[str, Any]) -> None:
    """Raise UserError unless `scaling` is a complete Llama 3.1 ("llama3") RoPE scaling, the one we support."""
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise UserError(f"rope scaling {kind!r} is not supported; only 'llama3' (Llama 3.1+)")
    missing = [k for k in LLAMA3_ROPE_KEYS if k not in scaling]
    if missing:
        raise UserError(f"llama3 rope scaling lacks {', '.join(missing)}")
    if not all(isinstance(scaling[k], (int, float)) and scaling[k] > 0 for k in LLAMA3_ROPE_KEYS):
        raise UserError(f"llama3 rope scaling values must be positive numbers, got {scaling}")
    if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise UserError("llama3 rope scaling needs high_freq_factor > low_freq_factor")


def dataclass_from_dict(cls: type, values: Any, what: str = "config"):
    """`cls(**values)` after checking every value against its field's type; UserError naming any
    unknown field or wrongly typed value (the one gate for YAML, JSON and programmatic configs)."""
    if not isinstance(values, dict):
        raise UserError(f"{what} must be a mapping of field: value, got {type(values).__name__}")
    unknown = sorted(set(map(str, values)) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise UserError(f"unknown {what} field(s): {', '.join(unknown)}")
    hints = typing.get_type_hints(cls)
    return cls(
        **{name: coerce_value(value, hints[name], f"{what} field {name}") for name, value in values.items()}
    )


def strip_optional(tp: Any) -> Any:
    """`X` for `X | None` (or Optional[X]); any other type as it is."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


TRUE_WORDS = ("true", "yes")
FALSE_WORDS = ("false", "no")


def parse_bool(value: Any, what: str = "value") -> bool:
    """A real boolean, or the words true/false/yes/no (any case); anything else is a UserError."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in TRUE_WORDS:
            return True
        if lowered in FALSE_WORDS:
            return False
    raise UserError(f"{what} must be true or false, got {value!r}")


def parse_number(value: Any, tp: type, what: str = "value") -> int | float:
    """An int or a finite float from a number or its text (YAML reads `1e-3` as a string); NaN and
    infinities are refused, since no setting means them."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text) if tp is float else int(text)
        except ValueError:
            try:
                value = float(text)  # "1e6" for an int field
            except ValueError:
                raise UserError(f"{what} must be {tp.__name__}, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{what} must be {tp.__name__}, got {value!r}")
    if not math.isfinite(value):
        raise UserError(f"{what} must be a finite number, got {value!r}")
    if tp is int and not float(value).is_integer():
        raise UserError(f"{what} must be int, got {value!r}")
    return tp(value)


def coerce_value(value: Any, annotation: Any, what: str = "value") -> Any:
    """`value` as the type `annotation` names (int, float, bool, str, Literal, list[...], dict, optional),
    or a UserError saying what was expected."""
    if value is None:
        if type(None) in typing.get_args(annotation) or annotation is Any:
            return None
        raise UserError(f"{what} must not be empty (null)")
    tp = strip_optional(annotation)
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp is bool:
        return parse_bool(value, what)
    if tp in (int, float):
        return parse_number(value, tp, what)
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise UserError(f"{what} must be text, got {value!r}")
        return str(value)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise UserError(f"{what} must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if origin is list or tp is list:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{what} must be a list, got {value!r}")
        args = typing.get_args(tp)
        return [coerce_value(v, args[0], what) for v in value] if args else list(value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"{what} must be a mapping, got {value!r}")
        return dict(value)
    return value


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


__all__ = ["HEAD_STYLES", "PRESETS", "RESIDUAL_HEAD_STYLES", "ModelConfig", "preset_config"]
