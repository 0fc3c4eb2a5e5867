"""Process-group plumbing for torchrun: rank and device, gradient all-reduce, small collectives.

Gradients are all-reduced by hand rather than through DistributedDataParallel: the memory-efficient
loss runs one backward per head and chunk, and DDP's reducer expects exactly one backward per forward.
Sharded training (FSDP2) lives in `fsdp.py`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from multitoken.devices import resolve_device

BUCKET_BYTES = 64 * 2**20


@dataclass
class Dist:
    """This process's place in the job; a world of one when not launched by torchrun."""

    rank: int = 0
    """Global rank of this process."""
    world_size: int = 1
    """Number of processes."""
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    """Device this process computes on."""

    @classmethod
    def from_env(cls, device: str = "auto") -> Dist:
        """Read torchrun's environment; initialise the process group (NCCL on GPU, gloo on CPU)."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        resolved = torch.device(resolve_device(device))
        if resolved.type == "cuda" and resolved.index is None:
            resolved = torch.device("cuda", local_rank if world_size > 1 else 0)
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        if world_size > 1 and not torch_dist.is_initialized():
            torch_dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
        return cls(rank=rank, world_size=world_size, device=resolved)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch_dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of `tensor` over ranks (returned on the tensor's original device)."""
        if self.world_size == 1:
            return tensor
        reduced = tensor.to(self.device).clone()
        torch_dist.all_reduce(reduced)
        return reduced.to(tensor.device)

    def all_reduce_grads(self, model: torch.nn.Module) -> None:
        """Sum gradients over ranks, in flat buckets (each rank's loss is already a share of the global mean)."""
        if self.world_size == 1:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        bucket: list[torch.Tensor] = []
        size = 0
        for grad in [*grads, None]:
            if grad is not None:
                bucket.append(grad)
                size += grad.numel() * grad.element_size()
            if bucket and (grad is None or size >= BUCKET_BYTES):
                flat = _flatten_dense_tensors(bucket)
                torch_dist.all_reduce(flat)
                for g, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket), strict=True):
                    g.copy_(reduced)
                bucket, size = [], 0

    def max_over_ranks(self, value: int) -> int:
        """The largest of every rank's `value`."""
        if self.world_size == 1:
            return value
        reduced = torch.tensor([value], device=self.device)
        torch_dist.all_reduce(reduced, op=torch_dist.ReduceOp.MAX)
        return int(reduced.item())

    def any_flag(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any rank (e.g. a stop request)."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX)
        return bool(value.item())

    def shutdown(self) -> None:
        if self.world_size > 1 and torch_dist.is_initialized():
            torch_dist.destroy_process_group()
