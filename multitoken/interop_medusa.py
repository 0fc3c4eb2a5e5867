"""Extra heads out to vLLM's Medusa speculator: a `config.json` and a `model.safetensors`.

vLLM (`vllm/model_executor/models/medusa.py`) runs, for each Medusa head h on the base model's final
*normed* hidden state x:

    for each of its num_hidden_layers layers:  x = x + SiLU(blocks.{h}.layers.{l}(x))
    logits_h = lm_heads.{h}(x)

where each layer is a Linear(hidden, hidden) with a bias when `medusa_fc_bias` is true. Medusa head h
proposes the token h + 2 ahead of the position (head 0 the one after the base's own next token). Our
medusa head style computes exactly this with one layer per head and the base's unembedding as every
lm_head, so `heads[h + 1]` becomes Medusa head h; the other styles put the shared norm after the
head, which no Medusa checkpoint can express.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from multitoken.errors import UserError
from multitoken.model import MultiTokenLM


def check_medusa_exportable(model: MultiTokenLM) -> None:
    """UserError naming why `model`'s heads are not vLLM Medusa heads; None when they are."""
    config = model.config
    if config.head_style != "medusa":
        raise UserError(
            f"--format medusa needs heads of --head-style medusa (x + SiLU(Wx + b) on the normed trunk "
            f"output); this checkpoint's heads are {config.head_style}"
        )
    if config.n_future < 2:
        raise UserError("--format medusa needs extra heads (n_future >= 2); this checkpoint has only one")
    if config.head_offsets != list(range(1, config.n_future + 1)):
        raise UserError(
            f"--format medusa needs heads predicting consecutive tokens 1..n; these have offsets "
            f"{config.head_offsets}"
        )


def to_medusa(model: MultiTokenLM) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The config.json fields and the tensors of a vLLM Medusa checkpoint for `model`'s extra heads."""
    check_medusa_exportable(model)
    config = model.config
    medusa_config = {
        "model_type": "medusa",
        "architectures": ["MedusaModel"],
        "num_heads": config.n_future - 1,
        "num_hidden_layers": 1,
        "hidden_size": config.dim,
        "vocab_size": config.vocab_size,
        "truncated_vocab_size": config.vocab_size,
        "medusa_fc_bias": True,
        "torch_dtype": str(model.output.weight.dtype).removeprefix("torch."),
    }
    tensors: dict[str, Tensor] = {}
    with torch.no_grad():
        for h, head in enumerate(model.heads[1:]):
            tensors[f"blocks.{h}.layers.0.weight"] = head.proj.weight.detach().clone().contiguous()
            tensors[f"blocks.{h}.layers.0.bias"] = head.proj.bias.detach().clone().contiguous()
            tensors[f"lm_heads.{h}.weight"] = model.output.weight.detach().clone().contiguous()
    return medusa_config, tensors
