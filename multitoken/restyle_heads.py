"""New drafting heads, of another residual style, on a trained model (`train --init-from R --train heads
--head-style S`).

The residual styles (linear, medusa, conditioned) share the next-token path, trunk -> norm -> output, and
differ only in their drafting heads, x + SiLU(W x'). So a model trained with one of them takes heads of
another with every other weight unchanged. The new heads start as the next-token head (W zero), as heads
added on import do, except that linear heads become conditioned ones computing what they computed:
W [x; e] with W = [W_linear, 0] is W_linear x (and back, dropping the token's columns).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from multitoken.checkpoint import CONFIG, plain_module, read_weights
from multitoken.config import RESIDUAL_HEAD_STYLES, ModelConfig
from multitoken.errors import UserError
from multitoken.model import MultiTokenLM


def restyled_config(config: ModelConfig, head_style: str) -> ModelConfig:
    """`config` with drafting heads of `head_style`; UserError unless both styles are residual."""
    if head_style == config.head_style:
        return config
    if config.head_style not in RESIDUAL_HEAD_STYLES or head_style not in RESIDUAL_HEAD_STYLES:
        raise UserError(
            f"new heads on a trained model change {', '.join(RESIDUAL_HEAD_STYLES)} heads into one another, "
            f"not {config.head_style} into {head_style}"
        )
    return dataclasses.replace(config, head_style=head_style)


def is_drafting_head(name: str) -> bool:
    """Whether parameter `name` belongs to a head other than the next-token head (heads.0)."""
    return name.startswith("heads.") and not name.startswith("heads.0.")


@torch.no_grad()
def load_with_new_heads(model: MultiTokenLM, ckpt: str | Path) -> None:
    """Load checkpoint `ckpt` into `model`, whose drafting heads are of another residual style."""
    ckpt = Path(ckpt)
    saved = ModelConfig.load(ckpt / CONFIG)
    if restyled_config(saved, model.config.head_style) != model.config:
        raise UserError(f"checkpoint {ckpt} does not match the model beyond its head style")
    weights = read_weights(ckpt)  # checked against the checkpoint's own config
    module = plain_module(model)
    module.load_state_dict(
        {name: w for name, w in weights.items() if not is_drafting_head(name)}, strict=False
    )
    old, new, dim = saved.head_style, model.config.head_style, model.config.dim
    for index, head in list(enumerate(module.heads))[1:]:
        head.proj.weight.zero_()
        if head.proj.bias is not None:
            head.proj.bias.zero_()
        weight_OI = weights[f"heads.{index}.proj.weight"]
        if (old, new) == ("linear", "conditioned"):
            head.proj.weight[:, :dim] = weight_OI
        elif (old, new) == ("conditioned", "linear"):
            head.proj.weight.copy_(weight_OI[:, :dim])


__all__ = ["is_drafting_head", "load_with_new_heads", "restyled_config"]
