"""Moving weights between `transformers` Llama models and MultiTokenLM."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from multitoken.config import ModelConfig
from multitoken.errors import UserError
from multitoken.model import MultiTokenLM

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM

# Our block's parameter names -> HF LlamaDecoderLayer's.
_BLOCK_KEYS = {
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w3.weight": "mlp.up_proj.weight",
    "mlp.w2.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


def config_from_hf(
    hf_config: LlamaConfig, *, n_future: int = 1, head_style: str = "transformer"
) -> ModelConfig:
    """A ModelConfig with the HF Llama's shape; extra heads stack on top of all its layers."""
    rope = getattr(hf_config, "rope_parameters", None) or {
        "rope_type": "default",
        "rope_theta": hf_config.rope_theta,
    }
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"rope scaling {rope.get('rope_type')!r} is not supported; only plain RoPE")
    if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
        raise UserError("Llama models with attention or MLP biases are not supported")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise UserError(
            f"Llama models with hidden_act {hf_config.hidden_act!r} are not supported; only silu (SwiGLU)"
        )
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    if head_dim * hf_config.num_attention_heads != hf_config.hidden_size:
        raise UserError("Llama models whose head_dim * num_heads != hidden_size are not supported")
    return ModelConfig(
        vocab_size=hf_config.vocab_size,
        dim=hf_config.hidden_size,
        n_layers=hf_config.num_hidden_layers,
        n_heads=hf_config.num_attention_heads,
        n_kv_heads=hf_config.num_key_value_heads,
        n_future=n_future,
        head_style=head_style,
        param_matched=False,
        max_seq_len=hf_config.max_position_embeddings,
        tie_embeddings=bool(hf_config.tie_word_embeddings),
        ffn_hidden=hf_config.intermediate_size,
        norm_eps=hf_config.rms_norm_eps,
        rope_theta=float(rope["rope_theta"]),
    )


def from_hf_llama(
    model_or_dir: LlamaForCausalLM | str | Path, n_future: int = 1, head_style: str = "transformer"
) -> MultiTokenLM:
    """Build a MultiTokenLM holding a `transformers` Llama's weights.

    The Llama's layers become the trunk plus the next-token head. With n_future > 1, extra transformer
    heads start as copies of its last layer (linear heads start as the identity), ready for Medusa-style
    or multi-token fine-tuning.
    """
    hf_model = _load_hf(model_or_dir)
    config = config_from_hf(hf_model.config, n_future=n_future, head_style=head_style)
    model = MultiTokenLM(config)
    hf_state = hf_model.state_dict()
    n_hf = hf_model.config.num_hidden_layers
    # Our blocks on the next-token path, in order: trunk blocks, then heads[0] when it is a block.
    path_blocks = list(model.trunk) + ([model.heads[0]] if head_style == "transformer" else [])
    if len(path_blocks) != n_hf:
        raise RuntimeError(f"layer mismatch: {len(path_blocks)} blocks for {n_hf} HF layers")
    state = {
        "tok_embeddings.weight": hf_state["model.embed_tokens.weight"],
        "norm.weight": hf_state["model.norm.weight"],
    }
    state["output.weight"] = hf_state.get("lm_head.weight", hf_state["model.embed_tokens.weight"])
    prefixes = [f"trunk.{i}." for i in range(len(model.trunk))] + (
        ["heads.0."] if head_style == "transformer" else []
    )
    for layer, prefix in enumerate(prefixes):
        for ours, theirs in _BLOCK_KEYS.items():
            state[prefix + ours] = hf_state[f"model.layers.{layer}.{theirs}"]
    if head_style == "transformer":
        for i in range(1, n_future):
            for ours, theirs in _BLOCK_KEYS.items():
                state[f"heads.{i}.{ours}"] = hf_state[f"model.layers.{n_hf - 1}.{theirs}"].clone()
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = {
        k for k in model.state_dict() if k.startswith("heads.") and not k.startswith("heads.0.")
    }
    if unexpected or set(missing) - allowed_missing:
        raise RuntimeError(
            f"weight mapping failed: missing {sorted(set(missing) - allowed_missing)}, unexpected {unexpected}"
        )
    return model


def to_hf_llama(model: MultiTokenLM) -> LlamaForCausalLM:
    """The next-token path of a model as a `transformers` LlamaForCausalLM.

    That path is the trunk and the next-token head: one more block in the transformer style, none in
    the linear and sequential styles, whose next-token head is the trunk output itself.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = model.config
    head_block = config.head_style == "transformer"
    if config.head_offsets[0] != 1:
        raise UserError(f"this model has no next-token head (head_offsets {config.head_offsets})")
    hf_config = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        intermediate_size=config.ffn_hidden,
        num_hidden_layers=config.n_trunk_layers + head_block,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_embeddings,
    )
    hf_model = LlamaForCausalLM(hf_config)
    ours = model.state_dict()
    state = {
        "model.embed_tokens.weight": ours["tok_embeddings.weight"],
        "model.norm.weight": ours["norm.weight"],
    }
    state["lm_head.weight"] = ours["output.weight"]
    prefixes = [f"trunk.{i}." for i in range(len(model.trunk))] + ["heads.0."] * head_block
    for layer, prefix in enumerate(prefixes):
        for key, theirs in _BLOCK_KEYS.items():
            state[f"model.layers.{layer}.{theirs}"] = ours[prefix + key]
    hf_model.load_state_dict(state, strict=not config.tie_embeddings)
    return hf_model.to(model.output.weight.dtype)


def _load_hf(model_or_dir) -> LlamaForCausalLM:
    if not isinstance(model_or_dir, (str, Path)):
        return model_or_dir
    from transformers import LlamaForCausalLM

    path = Path(model_or_dir)
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a transformers model directory (no config.json)")
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
