"""Moving weights between `transformers` causal LMs (Llama, Mistral, Qwen2, Qwen3) and MultiTokenLM.

The four families are one computation with switches: Qwen2 adds q/k/v biases, Qwen3 a per-head RMSNorm
on q and k before RoPE, Llama 3.1 scales the RoPE frequencies. A directory is read tensor by tensor
from its memory-mapped safetensors shards, so a model is never held twice.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from multitoken.config import ModelConfig
from multitoken.errors import UserError
from multitoken.model import ConditionedHead, LinearHead, MultiTokenLM

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")

# Our block's parameter names -> HF decoder layer's.
_BLOCK_KEYS = {
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "attn.wq.bias": "self_attn.q_proj.bias",
    "attn.wk.bias": "self_attn.k_proj.bias",
    "attn.wv.bias": "self_attn.v_proj.bias",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w3.weight": "mlp.up_proj.weight",
    "mlp.w2.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older checkpoints saved


def config_from_hf(
    hf_config: PretrainedConfig,
    *,
    n_future: int = 1,
    head_style: str = "transformer",
    architecture: str | None = None,
) -> ModelConfig:
    """A ModelConfig with the HF model's shape; extra heads stack on top of all its layers.

    UserError (one line) for an architecture or feature we do not compute: MoE and other families,
    a sliding window that is actually used, RoPE types other than plain and llama3, biases other than
    Qwen2's q/k/v ones, activations other than SiLU.
    """
    arch = _architecture(hf_config, architecture)
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    rope_theta = float(rope.pop("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise UserError(f"{arch}: rope scaling {rope_type!r} is not supported; only plain RoPE and 'llama3'")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise UserError(f"{arch}: partial rotary embeddings are not supported")
    max_pos = hf_config.max_position_embeddings
    window = getattr(hf_config, "sliding_window", None)
    layer_types = getattr(hf_config, "layer_types", None) or ["sliding_attention"]
    if window is not None and window < max_pos and "sliding_attention" in layer_types:
        raise UserError(
            f"{arch}: sliding-window attention (window {window} < {max_pos} positions) is not supported"
        )
    qwen2 = arch == "Qwen2ForCausalLM"
    if not qwen2 and getattr(hf_config, "attention_bias", False):
        raise UserError(f"{arch}: attention biases (including o_proj's) are not supported")
    if getattr(hf_config, "mlp_bias", False):
        raise UserError(f"{arch}: MLP biases are not supported")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise UserError(f"{arch}: hidden_act {hf_config.hidden_act!r} is not supported; only silu (SwiGLU)")
    return ModelConfig(
        vocab_size=hf_config.vocab_size,
        dim=hf_config.hidden_size,
        n_layers=hf_config.num_hidden_layers,
        n_heads=hf_config.num_attention_heads,
        n_kv_heads=getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads,
        head_dim=getattr(hf_config, "head_dim", None),
        n_future=n_future,
        head_style=head_style,
        param_matched=False,
        max_seq_len=max_pos,
        tie_embeddings=bool(hf_config.tie_word_embeddings),
        ffn_hidden=hf_config.intermediate_size,
        norm_eps=hf_config.rms_norm_eps,
        rope_theta=rope_theta,
        rope_scaling=rope if rope_type == "llama3" else None,
        attention_bias=qwen2,
        qk_norm=arch == "Qwen3ForCausalLM",
    )


def from_hf(
    src: PreTrainedModel | str | Path,
    *,
    n_future: int = 1,
    head_style: str = "transformer",
    dtype: torch.dtype | str | None = None,
) -> MultiTokenLM:
    """Build a MultiTokenLM holding a `transformers` Llama, Mistral, Qwen2 or Qwen3 model's weights.

    `src` is a model object or a local `transformers` directory (read shard by shard from safetensors).
    The HF layers become the trunk plus the next-token head. With n_future > 1, extra transformer heads
    start as copies of its last layer (linear heads start as the identity, sequential ones at random),
    ready for Medusa-style or multi-token fine-tuning. `dtype` (default float32) is the weights' type.
    """
    dtype = _dtype(dtype)
    if isinstance(src, (str, Path)):
        path = Path(src)
        hf_config = _read_hf_config(path)
        tensors = _directory_tensors(path)
    else:
        hf_config = src.config
        tensors = iter(src.state_dict().items())
    arch = type(src).__name__ if not isinstance(src, (str, Path)) else None
    config = config_from_hf(hf_config, n_future=n_future, head_style=head_style, architecture=arch)
    arch = _architecture(hf_config, arch)
    with torch.device("meta"):
        model = MultiTokenLM(config)
    model.to_empty(device="cpu")
    model.to(dtype)
    if config.tie_embeddings:  # to_empty gives each name its own storage
        model.output.weight = model.tok_embeddings.weight
    model.init_buffers()
    targets = _targets(model, hf_config.num_hidden_layers)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    with torch.no_grad():
        for name, tensor in tensors:
            if name not in targets:
                if name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and config.tie_embeddings):
                    continue
                raise UserError(f"{arch}: unexpected weight {name!r}; not a model we map")
            for ours in targets[name]:
                if tuple(params[ours].shape) != tuple(tensor.shape):
                    raise UserError(
                        f"weight {name} has shape {list(tensor.shape)}, expected {list(params[ours].shape)}"
                    )
                params[ours].copy_(tensor)
                loaded.add(ours)
    needed = {ours for names in targets.values() for ours in names}
    if needed - loaded:
        raise UserError(f"the model lacks weights for {sorted(needed - loaded)[:3]}")
    model.reset_parameters(only=set(params) - loaded)  # heads the HF model has no weights for
    with torch.no_grad():
        for head in model.heads:
            # x + SiLU(0) = x: a new residual head starts as the next-token one
            if isinstance(head, LinearHead | ConditionedHead):
                head.proj.weight.zero_()
    return model.eval()


from_hf_llama = from_hf
"""The importer's first name, from when it read only Llama models."""


def to_hf(model: MultiTokenLM) -> PreTrainedModel:
    """The next-token path of a model as a `transformers` model: Qwen3 with q/k norms, Qwen2 with
    attention biases, else Llama (which computes Mistral without a sliding window too).

    That path is the trunk and the next-token head: one more block in the transformer style, none in
    the other styles, whose next-token head is the trunk output itself.
    """
    import transformers

    config = model.config
    if config.head_offsets[0] != 1:
        raise UserError(f"this model has no next-token head (head_offsets {config.head_offsets})")
    if config.qk_norm and config.attention_bias:
        raise UserError("no transformers family has both q/k norms and q/k/v biases")
    head_block = config.head_style == "transformer"
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rope = {**config.rope_scaling, "rope_theta": config.rope_theta}
    common = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        intermediate_size=config.ffn_hidden,
        num_hidden_layers=config.n_trunk_layers + head_block,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        rope_parameters=rope,
        tie_word_embeddings=config.tie_embeddings,
    )
    if config.qk_norm:
        hf_config = transformers.Qwen3Config(**common, attention_bias=False)
        cls = transformers.Qwen3ForCausalLM
    elif config.attention_bias:
        hf_config = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    else:
        hf_config = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    hf_config.architectures = [cls.__name__]
    hf_model = cls(hf_config)
    ours = model.state_dict()
    state = {
        "model.embed_tokens.weight": ours["tok_embeddings.weight"],
        "model.norm.weight": ours["norm.weight"],
    }
    state["lm_head.weight"] = ours["output.weight"]
    prefixes = [f"trunk.{i}." for i in range(len(model.trunk))] + ["heads.0."] * head_block
    for layer, prefix in enumerate(prefixes):
        for key, theirs in _BLOCK_KEYS.items():
            if prefix + key in ours:
                state[f"model.layers.{layer}.{theirs}"] = ours[prefix + key]
    hf_model.load_state_dict(state, strict=not config.tie_embeddings)
    return hf_model.to(model.output.weight.dtype).eval()


to_hf_llama = to_hf


# ---- reading ---------------------------------------------------------------------------------------


def _architecture(hf_config: PretrainedConfig, known: str | None = None) -> str:
    """The supported class name of a model (`known`, else its config's `architectures`), or UserError."""
    archs = [known] if known else getattr(hf_config, "architectures", None) or []
    arch = archs[0] if archs else f"model_type {getattr(hf_config, 'model_type', '?')!r}"
    if arch not in ARCHITECTURES:
        raise UserError(f"architecture {arch} is not supported; supported: {', '.join(ARCHITECTURES)}")
    return arch


def _targets(model: MultiTokenLM, n_hf_layers: int) -> dict[str, list[str]]:
    """HF weight name -> our parameter names it fills (extra transformer heads copy the last layer)."""
    params = dict(model.named_parameters())
    blocks = [f"trunk.{i}." for i in range(len(model.trunk))]
    if model.config.head_style == "transformer":
        blocks.append("heads.0.")
    if len(blocks) != n_hf_layers:
        raise RuntimeError(f"layer mismatch: {len(blocks)} blocks for {n_hf_layers} HF layers")
    targets = {"model.embed_tokens.weight": ["tok_embeddings.weight"], "model.norm.weight": ["norm.weight"]}
    if not model.config.tie_embeddings:
        targets["lm_head.weight"] = ["output.weight"]
    extra = [f"heads.{i}." for i in range(1, model.config.n_future)] * (
        model.config.head_style == "transformer"
    )
    for layer, prefix in enumerate(blocks):
        copies = [prefix] + (extra if layer == n_hf_layers - 1 else [])
        for ours, theirs in _BLOCK_KEYS.items():
            if prefix + ours in params:
                targets[f"model.layers.{layer}.{theirs}"] = [p + ours for p in copies]
    return targets


def _read_hf_config(path: Path) -> PretrainedConfig:
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a transformers model directory (no config.json)")
    try:
        values = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path / 'config.json'} is unreadable: {err}") from None
    archs = values.get("architectures") or []
    if not archs or archs[0] not in ARCHITECTURES:  # before transformers, which may not know it
        shown = archs[0] if archs else f"model_type {values.get('model_type')!r}"
        raise UserError(f"architecture {shown} is not supported; supported: {', '.join(ARCHITECTURES)}")
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def _directory_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every weight of a `transformers` directory, one memory-mapped shard at a time."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise UserError(f"{path} holds no safetensors weights (model.safetensors or its index)")
    for shard in shards:
        with safe_open(str(path / shard), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, f.get_tensor(name)


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    known = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in known:
        raise UserError(f"dtype must be one of {', '.join(known)}, got {dtype!r}")
    return known[dtype]
