"""The residual drafting heads of a step, run as one matmul.

Drafting heads without a cache (linear, medusa, conditioned styles) each compute, at a row's last
committed position,

    z_j = x + SiLU(W_j u + b_j)          x = h (medusa: norm(h)),  u = x (conditioned: [x; e(pending)])

and a step that drafts with heads 1..n runs them all on the same x and u. Stacking their weights
W = [W_1; ...; W_n] turns n small matmuls (and n embedding lookups, concatenations, SiLUs and adds)
into one of each: a three-draft step's drafting costs a quarter less on a CPU (BENCHMARKS.md, sixth
pass). `model.head_forward` stays the reference that tests hold this to.

Dimension letters: B rows, D model width, J drafting heads, X head input width (D, or 2D conditioned).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from multitoken.config import RESIDUAL_HEAD_STYLES


class FusedDraftHeads:
    """Drafting heads 1..J of a model as one stacked weight; `states(h_BD, next_B, n)` runs the first n.

    The stacked copy is made at first use and again whenever a head's weight or bias changes (its
    version counter or storage), so training between generations is safe. It keeps the model's modules,
    not the model: `for_model` caches one per model without keeping the model alive.
    """

    def __init__(self, model) -> None:
        if model.config.head_style not in RESIDUAL_HEAD_STYLES:
            raise ValueError(
                f"{model.config.head_style} heads cannot be fused: they are not x + SiLU(W u + b)"
            )
        self.style = model.config.head_style
        self.heads, self.norm, self.tok_embeddings = model.heads, model.norm, model.tok_embeddings
        self._stacked: tuple[Tensor, Tensor | None] | None = None
        self._key: tuple | None = None

    @staticmethod
    def for_model(model) -> FusedDraftHeads:
        """The model's FusedDraftHeads, made at first use."""
        fused = _BY_MODEL.get(model)
        if fused is None:
            fused = _BY_MODEL[model] = FusedDraftHeads(model)
        return fused

    def _weights(self) -> tuple[Tensor, Tensor | None]:
        """(W_JD_X, b_JD): every drafting head's weight and bias, stacked, remade if one changed."""
        projections = [head.proj for head in self.heads[1:]]  # read anew: a head may have been replaced
        params = [p for proj in projections for p in (proj.weight, proj.bias) if p is not None]
        key = tuple((p._version, p.data_ptr()) for p in params)
        if key != self._key:
            weight = torch.cat([proj.weight.detach() for proj in projections])
            biases = [proj.bias for proj in projections]
            bias = torch.cat([b.detach() for b in biases]) if biases[0] is not None else None
            self._stacked, self._key = (weight, bias), key
        return self._stacked

    def states(self, h_BD: Tensor, next_B: Tensor, n: int) -> Tensor:
        """z_BJD: the outputs of drafting heads 1..n (head_forward(j, ...) for j = 1..n) at one
        position per row, from the trunk output h_BD there and the pending token next_B after it."""
        weight_JD_X, bias_JD = self._weights()
        D = h_BD.shape[-1]
        x_BD = self.norm(h_BD) if self.style == "medusa" else h_BD
        u_BX = torch.cat([x_BD, self.tok_embeddings(next_B)], dim=-1) if self.style == "conditioned" else x_BD
        bias = bias_JD[: n * D] if bias_JD is not None else None
        y_BJD = F.linear(u_BX, weight_JD_X[: n * D], bias).view(-1, n, D)
        return x_BD.unsqueeze(1) + F.silu(y_BJD)


_BY_MODEL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

__all__ = ["FusedDraftHeads"]
