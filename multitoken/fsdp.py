"""FSDP2 (`fully_shard`) for MultiTokenLM: sharding, the memory-efficient loss's schedule, full state dicts.

Only rank 0 builds the full model, initialised as one process initialises it; every rank shards a copy
built on the meta device, materialises its shards and receives rank 0's weights in them.

Units: each trunk block, each head with parameters, and the root, which keeps what is left: the token
embeddings, the final norm and the unembedding (one parameter when tied, so ties need no grouping).

The memory-efficient loss never calls `model.forward`: it calls `trunk_forward`, then each head, then
`logits` chunk by chunk, with one backward per head and a last one through the trunk. So:
- `trunk_forward` is registered as an FSDP forward method: there the root lazily initialises and
  all-gathers its parameters, which it keeps after forward, as a root does;
- every backward ends in FSDP's final callback, which would reduce-scatter and reshard the root after
  the first head's backward; the root is held instead (no gradient sync, no reshard after backward)
  from the trunk forward until the gradient reaches the trunk output, so its gradients accumulate
  locally over all heads and chunks and are reduce-scattered once per micro-batch;
- gradients are summed, not averaged, over ranks: each rank's loss is already its share of the global
  mean (as in `Dist.all_reduce_grads`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

from multitoken.config import ModelConfig
from multitoken.model import MultiTokenLM

FULL_TO_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)
FROM_RANK0 = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)


def build_sharded_model(
    config: ModelConfig,
    device: torch.device,
    world_size: int,
    is_main: bool,
    compile_blocks=None,
    initialise: bool = True,
) -> MultiTokenLM:
    """The model, sharded over all ranks on `device`, with the weights a one-process run starts from.

    Every rank must call it, right after seeding as a one-process run does: rank 0 initialises the full
    model on CPU (and frees it on return); no other rank ever holds more than its shards.
    `compile_blocks(model)`, when given, runs before sharding, as torchtitan orders compile and FSDP.
    With `initialise=False` (a resumed run, whose checkpoint is loaded next) the shards are left
    uninitialised and no rank builds the full model.
    """
    full_state = MultiTokenLM(config).state_dict() if is_main and initialise else {}
    with torch.device("meta"):
        model = MultiTokenLM(config)
    if compile_blocks is not None:
        compile_blocks(model)
    shard_model(model, device, world_size)
    model.to_empty(device=device)
    model.init_buffers()
    if initialise:
        set_model_state_dict(model, full_state, options=FROM_RANK0)
    return model


def shard_model(model: MultiTokenLM, device: torch.device, world_size: int) -> MultiTokenLM:
    """Shard `model` in place over all ranks (parameters, then gradients and optimizer state follow).

    Build the optimizer afterwards: its parameters must be the sharded ones.
    """
    mesh = init_device_mesh(device.type, (world_size,))
    units = [*model.trunk, *(head for head in model.heads if any(True for _ in head.parameters()))]
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    register_fsdp_forward_method(model, "trunk_forward")
    _hold_root_until_trunk_backward(model)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model


def _hold_root_until_trunk_backward(model: MultiTokenLM) -> None:
    """Make `trunk_forward` keep the root gathered, with local gradients, until the trunk backward.

    Under grad, the trunk output gets a hook that fires when its gradient is ready: only the last
    backward of a micro-batch reaches it (head backwards stop at detached copies), so FSDP's final
    callback of that backward reduce-scatters the root's gradients, accumulated over every head and
    chunk, and reshards it. The naive loss's single backward reaches it too (there `model.forward`
    calls `trunk_forward` inside the root's own forward, which FSDP allows).
    """
    sharded_trunk_forward = model.trunk_forward

    def trunk_forward(tokens_BT: torch.Tensor, rope: Any) -> torch.Tensor:
        h_BTD = sharded_trunk_forward(tokens_BT, rope)
        if h_BTD.requires_grad:
            _hold_root(model, True)
            h_BTD.register_hook(lambda grad_BTD: _hold_root(model, False))
        return h_BTD

    model.trunk_forward = trunk_forward


def _hold_root(model: FSDPModule, hold: bool) -> None:
    model.set_requires_gradient_sync(not hold, recurse=False)
    model.set_reshard_after_backward(not hold, recurse=False)


# ---- full (unsharded) state, in the single-process checkpoint format --------------------------------


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU, on rank 0 (empty elsewhere). Every rank must call it."""
    return get_model_state_dict(model, options=FULL_TO_RANK0)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state on rank 0 as `optimizer.state_dict()` of an unsharded run gives it
    (parameters numbered, not named), empty elsewhere. Every rank must call it."""
    named = get_optimizer_state_dict(model, optimizer, options=FULL_TO_RANK0)
    if not named:
        return {}
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    groups = [{**group, "params": [index[n] for n in group["params"]]} for group in named["param_groups"]]
    return {"state": {index[n]: s for n, s in named["state"].items()}, "param_groups": groups}


def load_full_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
) -> None:
    """Load full weights and optimizer state (as `optimizer.state_dict()` numbers them) held by rank 0
    into the sharded model and optimizer; other ranks pass empty dicts. Every rank must call it."""
    set_model_state_dict(model, model_state, options=FROM_RANK0)
    named: dict[str, Any] = {}
    if optimizer_state:
        names = _param_names(model, optimizer)
        groups = [{**g, "params": [names[i] for i in g["params"]]} for g in optimizer_state["param_groups"]]
        named = {"state": {names[i]: s for i, s in optimizer_state["state"].items()}, "param_groups": groups}
    # Not strict: parameters that never had a gradient (heads of loss weight 0) have no saved state.
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_optimizer_state_dict(model, optimizer, named, options=options)


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the order `optimizer.state_dict()` numbers them."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def unsharded_copy(model_config: ModelConfig, model_state: dict[str, torch.Tensor]) -> MultiTokenLM:
    """A plain model made of `model_state`'s tensors (no copy, ties restored), to save as usual.

    Built on the meta device, so no time goes into a random initialisation; its RoPE tables
    (non-persistent buffers, never saved) stay on the meta device: use it for saving only.
    """
    # A gathered tensor may be a view of a padded buffer; safetensors saves only tensors owning theirs.
    owned = {name: t if _owns_storage(t) else t.clone() for name, t in model_state.items()}
    with torch.device("meta"):
        plain = MultiTokenLM(model_config)
    plain.load_state_dict(owned, assign=True)
    if model_config.tie_embeddings:
        plain.output.weight = plain.tok_embeddings.weight
    return plain


def _owns_storage(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() == t.numel() * t.element_size()
