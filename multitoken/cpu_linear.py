"""Inference matmuls on a CPU through oneDNN with prepacked weights, where MKL is slow.

On a CPU, MKL's float32 GEMM for a few rows costs nearly in proportion to the rows: a verification
block of 4 tokens through the demo model's unembedding (4096 x 192) costs 2.6x one token. oneDNN with
the weight packed once for it (what inductor's freezing does) costs the same for 1 to 4 rows, but
about 10 us more per call, so it pays

  - on large matrices from two rows (the unembedding: 2.6x cheaper at 4 rows). At one row the two cost
    the same, but a step that mixes them (a one-row draft, a two-row verification) reads two copies of
    the weight and loses the cache: so the decoding step routes every unembedding of a step one way,
    by its verification block's rows (`PackedLinearForward.route`);
  - on the trunk's small matrices once rows x outputs reach ONEDNN_MIN_OUTPUTS (a batch of rows
    verifying drafts).

Figures: BENCHMARKS.md, "Fourth pass". Decoding packs its model's linear layers
(`pack_linears`); training never sees the packed path, which runs only without autograd, on a CPU, in
float32, outside torch.compile.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ONEDNN_MIN_OUTPUTS = 6144
"""Rows x output features from which oneDNN beats MKL on the trunk's matrices (measured, 2-core EPYC)."""
ROUTED_MIN_WEIGHTS = 1 << 18
"""Weight elements from which oneDNN beats MKL from two rows on (the unembedding; a wide model's
feed-forward matrices): such layers are routed a step at a time (`PackedLinearForward.route`)."""


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's prepacked linear."""
    ops = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and all(
        hasattr(ops, name) for name in ("_reorder_linear_weight", "_linear_pointwise")
    )


def pack_weight(weight: Tensor) -> Tensor:
    """The weight in oneDNN's blocked layout, for any number of rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


class PackedLinearForward:
    """An nn.Linear's forward that takes oneDNN with a packed copy of the weight where that is faster.

    The copy is made at first use and again whenever the weight changes (its version counter or
    storage), so training between generations is safe; it is not pickled or deep-copied.
    """

    def __init__(self, linear: nn.Linear) -> None:
        self.linear = linear
        self.routed = linear.weight.numel() >= ROUTED_MIN_WEIGHTS
        """A large matrix (the unembedding): routed a whole step at a time (`route`)."""
        min_rows = 2 if self.routed else -(-ONEDNN_MIN_OUTPUTS // linear.out_features)
        self.min_numel = min_rows * linear.in_features
        """Input elements from which oneDNN is used."""
        self._packed: Tensor | None = None
        self._packed_key: tuple[int, int] | None = None

    def route(self, onednn: bool) -> None:
        """Send every call through oneDNN (`onednn`) or through MKL, until routed again."""
        self.min_numel = 0 if onednn else 1 << 62

    def __call__(self, x: Tensor) -> Tensor:
        linear = self.linear
        if x.numel() < self.min_numel:  # the common case first: a plain step's few rows
            return F.linear(x, linear.weight, linear.bias)
        weight, bias = linear.weight, linear.bias
        if (
            x.dtype != torch.float32
            or weight.dtype != torch.float32
            or x.device.type != "cpu"
            or torch.is_grad_enabled()
            or torch.compiler.is_compiling()
        ):
            return F.linear(x, weight, bias)
        key = (weight._version, weight.data_ptr())
        if key != self._packed_key:
            self._packed = pack_weight(weight)
            self._packed_key = key
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self._packed, bias, "none", [], "")

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_packed": None, "_packed_key": None}

    def __deepcopy__(self, memo: dict) -> PackedLinearForward:
        # The module being copied is not filled in yet: take its copy from the memo, read nothing of it.
        twin = PackedLinearForward.__new__(PackedLinearForward)
        twin.__dict__.update(self.__getstate__(), linear=copy.deepcopy(self.linear, memo))
        return twin


def pack_linears(model: nn.Module, max_rows: int) -> list[PackedLinearForward]:
    """Give each nn.Linear of `model` that oneDNN can speed up at up to `max_rows` rows a call a
    PackedLinearForward, and take it from the others (a few python operations a call are not free on
    a plain step's small matrices); returns the large ones' (the unembedding's), for `route`.
    A layer packed before gets its packed copy back (packing a 32000 x 768 unembedding takes ~50 ms).
    A no-op without oneDNN."""
    if not onednn_available():
        return []
    routed = []
    for module in model.modules():
        if type(module) is not nn.Linear:
            continue
        pays = (
            module.weight.numel() >= ROUTED_MIN_WEIGHTS
            or max_rows * module.out_features >= ONEDNN_MIN_OUTPUTS
        )
        if pays and not isinstance(module.__dict__.get("forward"), PackedLinearForward):
            module.forward = module.__dict__.pop(KEPT, None) or PackedLinearForward(module)
        elif not pays:
            _set_aside(module)
        if pays and module.forward.routed:
            routed.append(module.forward)
    return routed


def unpack_linears(model: nn.Module, keep_packed: bool = True) -> None:
    """Undo `pack_linears`: every nn.Linear forwards through F.linear again. With `keep_packed` the packed
    copies stay with the layers for the next `pack_linears` (memory: one more copy of those weights)."""
    for module in model.modules():
        _set_aside(module)
        if not keep_packed:
            module.__dict__.pop(KEPT, None)


KEPT = "_multitoken_packed_forward"
"""Where an unpacked layer keeps its PackedLinearForward (and packed weight) for the next packing."""


def _set_aside(module: nn.Module) -> None:
    if isinstance(module.__dict__.get("forward"), PackedLinearForward):
        module.__dict__[KEPT] = module.__dict__.pop("forward")


__all__ = ["PackedLinearForward", "onednn_available", "pack_linears", "pack_weight", "unpack_linears"]
