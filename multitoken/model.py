"""A Llama-style decoder with n future-token heads on a shared trunk.

Dimension legend:
    B  batch                      T  query positions in this call
    S  key positions (cache)      D  model width (dim)
    H  query heads                K  key/value heads (GQA)
    E  per-head width (head_dim)  F  MLP hidden width
    N  output heads (n_future)    V  vocabulary

Layout: tok_embeddings -> trunk blocks -> heads[i] -> norm -> output. Head i at position t predicts
token t + head_offsets[i]. With n_future = 1 and the transformer head style this is exactly a
Llama: trunk = layers[:-1], heads[0] = layers[-1]. The medusa style moves the norm before the heads
(tok_embeddings -> trunk -> norm -> heads[i] -> output), as vLLM's Medusa speculator computes them.
The conditioned style's heads also read the embedding of the token at t + 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multitoken.config import ModelConfig
from multitoken.draft_heads import FusedDraftHeads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x_BTD: Tensor) -> Tensor:
        x_float = x_BTD.float()
        normed = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x_BTD) * self.weight


def rope_tables(
    head_dim: int, max_seq_len: int, theta: float, scaling: dict | None = None
) -> tuple[Tensor, Tensor]:
    """cos and sin of shape (max_seq_len, head_dim), in the rotate-half layout that HF Llama uses.

    inv_freq_i = theta^(-2i/E), rescaled by `llama3_inv_freq` when `scaling` is Llama 3.1's.
    """
    inv_freq_E2 = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling is not None:
        inv_freq_E2 = llama3_inv_freq(inv_freq_E2, scaling)
    angles_SE2 = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq_E2)
    angles_SE = torch.cat([angles_SE2, angles_SE2], dim=-1)
    return angles_SE.cos(), angles_SE.sin()


def llama3_inv_freq(inv_freq_E2: Tensor, scaling: dict) -> Tensor:
    """Llama 3.1's RoPE scaling, as transformers' `_compute_llama3_parameters` computes it.

    With wavelength w = 2 pi / f, L = original_max_position_embeddings: f is kept when w < L / high,
    divided by `factor` when w > L / low, and in between blended with s = (L / w - low) / (high - low):
    (1 - s) f / factor + s f.
    """
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
    wavelen_E2 = 2 * math.pi / inv_freq_E2
    scaled_E2 = torch.where(wavelen_E2 > low_freq_wavelen, inv_freq_E2 / factor, inv_freq_E2)
    smooth_E2 = (old_context_len / wavelen_E2 - low) / (high - low)
    smoothed_E2 = (1 - smooth_E2) * scaled_E2 / factor + smooth_E2 * scaled_E2
    is_medium_E2 = ~(wavelen_E2 < high_freq_wavelen) * ~(wavelen_E2 > low_freq_wavelen)
    return torch.where(is_medium_E2, smoothed_E2, scaled_E2)


def apply_rope(x_BHTE: Tensor, cos_BTE: Tensor, sin_BTE: Tensor) -> Tensor:
    half = x_BHTE.shape[-1] // 2
    rotated_BHTE = torch.cat([-x_BHTE[..., half:], x_BHTE[..., :half]], dim=-1)
    cos_B1TE, sin_B1TE = cos_BTE.unsqueeze(1), sin_BTE.unsqueeze(1)
    return (x_BHTE.float() * cos_B1TE + rotated_BHTE.float() * sin_B1TE).type_as(x_BHTE)


class KVCache(nn.Module):
    """Static, preallocated keys and values, written in place at each row's own positions.

    Rolling back rejected draft tokens needs no copy: the caller just doesn't advance its position,
    and stale entries beyond a query's position are masked out until they are overwritten.
    """

    def __init__(
        self, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype, device
    ) -> None:
        super().__init__()
        shape = (batch_size, max_seq_len, n_kv_heads, head_dim)
        self.register_buffer("k_cache_BSKE", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache_BSKE", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(
        self, input_pos_BT: Tensor, k_BKTE: Tensor, v_BKTE: Tensor, first_row: int = 0
    ) -> tuple[Tensor, Tensor]:
        """Write this call's keys/values to cache rows first_row.. and return those rows as (B, K, S, E) views."""
        rows = slice(first_row, first_row + k_BKTE.shape[0])
        k_cache_BSKE, v_cache_BSKE = self.k_cache_BSKE[rows], self.v_cache_BSKE[rows]
        rows_B1 = torch.arange(k_BKTE.shape[0], device=input_pos_BT.device).unsqueeze(1)
        k_cache_BSKE[rows_B1, input_pos_BT] = k_BKTE.transpose(1, 2).to(k_cache_BSKE.dtype)
        v_cache_BSKE[rows_B1, input_pos_BT] = v_BKTE.transpose(1, 2).to(v_cache_BSKE.dtype)
        return k_cache_BSKE.transpose(1, 2), v_cache_BSKE.transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        bias = config.attention_bias
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=bias)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=bias)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=bias)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        if config.qk_norm:  # Qwen3: RMSNorm over each head's width, before RoPE
            self.q_norm = RMSNorm(config.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.norm_eps)
        self.kv_cache: KVCache | None = None

    def queries_keys(self, x_BTD: Tensor, rope: RopeContext) -> tuple[Tensor, Tensor]:
        """Rotated queries and keys: RoPE(norm(x Wq + bq)), RoPE(norm(x Wk + bk)), norm only with qk_norm."""
        B, T, _ = x_BTD.shape
        q_BTHE = self.wq(x_BTD).view(B, T, self.n_heads, self.head_dim)
        k_BTKE = self.wk(x_BTD).view(B, T, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q_BTHE, k_BTKE = self.q_norm(q_BTHE), self.k_norm(k_BTKE)
        q_BHTE = apply_rope(q_BTHE.transpose(1, 2), rope.cos_BTE, rope.sin_BTE)
        k_BKTE = apply_rope(k_BTKE.transpose(1, 2), rope.cos_BTE, rope.sin_BTE)
        return q_BHTE, k_BKTE

    def forward(self, x_BTD: Tensor, rope: RopeContext) -> Tensor:
        B, T, _ = x_BTD.shape
        q_BHTE, k_BKTE = self.queries_keys(x_BTD, rope)
        v_BKTE = self.wv(x_BTD).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope.input_pos_BT is not None and self.kv_cache is not None:
            k_BKTE, v_BKTE = self.kv_cache.update(rope.input_pos_BT, k_BKTE, v_BKTE, rope.first_row)
            if rope.n_keys is not None:  # the slots past every query are masked anyway: skip them
                k_BKTE, v_BKTE = k_BKTE[:, :, : rope.n_keys], v_BKTE[:, :, : rope.n_keys]
        # CUDA's fused kernels take either a mask or grouped KV heads, not both (then SDPA falls back to
        # the math kernel, which materialises the scores): with a mask there, expand the KV heads first.
        expand_kv = rope.mask_B1TS is not None and q_BHTE.device.type == "cuda"
        y_BHTE = attend(q_BHTE, k_BKTE, v_BKTE, rope.mask_B1TS, expand_kv)
        return self.wo(y_BHTE.transpose(1, 2).reshape(B, T, -1))


def attend(
    q_BHTE: Tensor, k_BKSE: Tensor, v_BKSE: Tensor, mask_B1TS: Tensor | None, expand_kv: bool
) -> Tensor:
    """Causal attention (or under `mask_B1TS`), with H query heads sharing K key/value heads.

    `expand_kv` repeats each KV head for its query heads instead of asking SDPA for grouped attention.
    """
    n_rep = q_BHTE.shape[1] // k_BKSE.shape[1]
    if expand_kv and n_rep > 1:
        k_BKSE = k_BKSE.repeat_interleave(n_rep, dim=1)
        v_BKSE = v_BKSE.repeat_interleave(n_rep, dim=1)
    return F.scaled_dot_product_attention(
        q_BHTE,
        k_BKSE,
        v_BKSE,
        attn_mask=mask_B1TS,
        is_causal=mask_B1TS is None,
        enable_gqa=k_BKSE.shape[1] != q_BHTE.shape[1],
    )


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x_BTD: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x_BTD)) * self.w3(x_BTD))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = SwiGLU(config.dim, config.ffn_hidden)

    def forward(self, x_BTD: Tensor, rope: RopeContext) -> Tensor:
        h_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), rope)
        return h_BTD + self.mlp(self.ffn_norm(h_BTD))


class LinearHead(nn.Module):
    """Medusa's residual head x + SiLU(W x + b) (b only with `bias`, as in the medusa style).

    W starts random, N(0, init_std) like the trunk's matrices, so a model trained from scratch starts with
    heads that differ; `from_hf` zeroes W instead, so heads added to a pretrained model start as the
    identity (the next-token head), as Medusa does.
    """

    def __init__(self, config: ModelConfig, bias: bool = False) -> None:
        super().__init__()
        self.proj = nn.Linear(config.dim, config.dim, bias=bias)

    def forward(self, x_BTD: Tensor, rope: RopeContext) -> Tensor:
        return x_BTD + F.silu(self.proj(x_BTD))


class ConditionedHead(nn.Module):
    """A linear head that also reads the next token: x_t + SiLU(W [x_t; e(token_{t+1})]).

    When drafting, the token after the last committed position is already chosen (the pending token), so
    every drafting head may read it at no cost and still draft in parallel: Hydra's first head (Ankner et
    al., 2024), without its dependence on earlier drafts. Zero W gives the next-token head, as LinearHead.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(2 * config.dim, config.dim, bias=False)

    def forward(self, x_BTD: Tensor, next_emb_BTD: Tensor, rope: RopeContext) -> Tensor:
        return x_BTD + F.silu(self.proj(torch.cat([x_BTD, next_emb_BTD], dim=-1)))


class SequentialHead(nn.Module):
    """DeepSeek-V3's MTP module: Block(W [RMSNorm(h_prev); RMSNorm(emb(next token))])."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.hidden_norm = RMSNorm(config.dim, config.norm_eps)
        self.embed_norm = RMSNorm(config.dim, config.norm_eps)
        self.proj = nn.Linear(2 * config.dim, config.dim, bias=False)
        self.block = Block(config)

    def forward(self, h_prev_BTD: Tensor, next_emb_BTD: Tensor, rope: RopeContext) -> Tensor:
        x_BTD = self.proj(torch.cat([self.hidden_norm(h_prev_BTD), self.embed_norm(next_emb_BTD)], dim=-1))
        return self.block(x_BTD, rope)


class Identity(nn.Module):
    """The next-token head of the linear and sequential styles: the trunk output itself."""

    def forward(self, x_BTD: Tensor, rope: RopeContext) -> Tensor:
        return x_BTD


class RopeContext:
    """Per-call position data shared by every block: RoPE rows, cache positions and the attention mask."""

    def __init__(
        self,
        cos_BTE: Tensor,
        sin_BTE: Tensor,
        input_pos_BT: Tensor | None,
        mask_B1TS: Tensor | None,
        first_row: int = 0,
        n_keys: int | None = None,
    ):
        self.cos_BTE, self.sin_BTE = cos_BTE, sin_BTE
        self.input_pos_BT, self.mask_B1TS = input_pos_BT, mask_B1TS
        self.first_row = first_row
        """Cache row of the call's first row: a call may cover any run of consecutive cache rows."""
        self.n_keys = n_keys
        """Attend to the first n_keys cache slots only (None: all); no query sees past them."""


class MultiTokenLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.trunk = nn.ModuleList(Block(config) for _ in range(config.n_trunk_layers))
        self.heads = nn.ModuleList(self._make_head(i) for i in range(config.n_future))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.init_buffers()
        self._cache_len: int | None = None
        self.reset_parameters()

    def init_buffers(self) -> None:
        """(Re)compute the RoPE tables: non-persistent buffers, in no state dict, so redone after `to_empty`."""
        c = self.config
        cos_SE, sin_SE = rope_tables(c.head_dim, c.max_seq_len, c.rope_theta, c.rope_scaling)
        device = self.tok_embeddings.weight.device
        self.register_buffer("rope_cos_SE", cos_SE.to(device), persistent=False)
        self.register_buffer("rope_sin_SE", sin_SE.to(device), persistent=False)

    def _make_head(self, index: int) -> nn.Module:
        style = self.config.head_style
        if style == "transformer":
            return Block(self.config)
        if index == 0:
            return Identity()
        if style == "sequential":
            return SequentialHead(self.config)
        if style == "conditioned":
            return ConditionedHead(self.config)
        return LinearHead(self.config, bias=style == "medusa")

    @torch.no_grad()
    def reset_parameters(self, only: set[str] | None = None) -> None:
        """GPT-2 style init: N(0, init_std), residual output projections scaled by 1/sqrt(2 * n_layers).

        Biases start at zero, norms at one. `only` limits it to those parameter names.
        """
        std = self.config.init_std
        for name, param in self.named_parameters():
            if only is not None and name not in only:
                continue
            if name.endswith("norm.weight"):
                nn.init.ones_(param)
            if name.endswith(".bias"):
                nn.init.zeros_(param)
            if param.dim() < 2:
                continue
            if name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(param, 0.0, std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(param, 0.0, std)

    # ---- positions and caches -------------------------------------------------------------------

    def rope_context(
        self,
        tokens_BT: Tensor,
        input_pos_BT: Tensor | None,
        *,
        rope_pos_BT: Tensor | None = None,
        mask_B1TS: Tensor | None = None,
        first_row: int = 0,
        n_keys: int | None = None,
    ) -> RopeContext:
        """Without input_pos: a plain causal pass from position 0. With it: per-row positions into the cache.

        By default a token's cache slot is also its RoPE position and it sees every slot up to its own.
        Tree drafts, whose sibling nodes share a position, give `rope_pos_BT` and `mask_B1TS` instead.
        The call's rows are cache rows first_row, first_row + 1, ... `n_keys` (> every input position)
        limits attention to the first n_keys slots, so its cost follows the text's length, not the
        cache's; None keeps every slot (static shapes, for compiled passes).
        """
        T = tokens_BT.shape[1]
        if input_pos_BT is None:
            cos_TE, sin_TE = self.rope_cos_SE[:T], self.rope_sin_SE[:T]
            return RopeContext(cos_TE.unsqueeze(0), sin_TE.unsqueeze(0), None, None)
        rope_pos_BT = input_pos_BT if rope_pos_BT is None else rope_pos_BT
        cos_BTE, sin_BTE = self.rope_cos_SE[rope_pos_BT], self.rope_sin_SE[rope_pos_BT]
        if mask_B1TS is None:
            key_pos_S = torch.arange(n_keys or self.cache_len(), device=tokens_BT.device)
            mask_B1TS = key_pos_S.view(1, 1, 1, -1) <= input_pos_BT.unsqueeze(1).unsqueeze(-1)
        return RopeContext(cos_BTE, sin_BTE, input_pos_BT, mask_B1TS, first_row, n_keys)

    def attention_modules(self) -> list[Attention]:
        return [m for m in self.modules() if isinstance(m, Attention)]

    def setup_caches(
        self, batch_size: int, max_seq_len: int | None = None, dtype=None, extra_slots: int = 0
    ) -> None:
        """Allocate a static KV cache for every attention layer: trunk, transformer and sequential heads.

        `extra_slots` adds scratch slots past the last position, for tree drafts' sibling nodes.
        """
        max_seq_len = max_seq_len or self.config.max_seq_len
        if max_seq_len > self.config.max_seq_len:
            raise ValueError(
                f"cache of {max_seq_len} positions exceeds max_seq_len={self.config.max_seq_len}"
            )
        max_seq_len += extra_slots
        dtype = dtype or self.output.weight.dtype
        device = self.output.weight.device
        for attn in self.attention_modules():
            attn.kv_cache = KVCache(batch_size, max_seq_len, attn.n_kv_heads, attn.head_dim, dtype, device)
        self._cache_len = max_seq_len

    def clear_caches(self) -> None:
        for attn in self.attention_modules():
            attn.kv_cache = None
        self._cache_len = None

    def cache_len(self) -> int:
        if self._cache_len is None:
            raise RuntimeError("input_pos given but no KV cache: call setup_caches() first")
        return self._cache_len

    # ---- forward pieces -------------------------------------------------------------------------

    def trunk_forward(self, tokens_BT: Tensor, rope: RopeContext) -> Tensor:
        """Embeddings through the shared trunk: the hidden state every head starts from."""
        h_BTD = self.tok_embeddings(tokens_BT)
        for block in self.trunk:
            h_BTD = block(h_BTD, rope)
        return h_BTD

    def head_forward(
        self, index: int, h_BTD: Tensor, rope: RopeContext, next_tokens_BT: Tensor | None = None
    ) -> Tensor:
        """Head `index`'s output, which `logits` turns into logits (pre-norm, except in the medusa style).

        Parallel styles take the trunk output `h_BTD`; medusa heads take it normed, conditioned heads also
        the tokens at t + 1. Sequential heads take the previous depth's output and the tokens at t + index,
        as in DeepSeek-V3. `head_tokens` gives the `next_tokens_BT` a head reads from a known sequence.
        """
        head = self.heads[index]
        if self.config.head_style == "medusa":
            return head(self.norm(h_BTD), rope)
        if isinstance(head, SequentialHead | ConditionedHead):
            if next_tokens_BT is None:
                raise ValueError(f"a {self.config.head_style} head needs the tokens it reads (head_tokens)")
            return head(h_BTD, self.tok_embeddings(next_tokens_BT), rope)
        return head(h_BTD, rope)

    def drafting_states(self, h_BD: Tensor, next_B: Tensor, n: int) -> Tensor:
        """z_BJD: drafting heads 1..n of a residual style at one position per row, from the trunk output
        there and the pending token after it; each is head_forward(j, h_BD, None, next_B), computed
        for all n heads in one stacked matmul (`multitoken.draft_heads`). For decoding: the stacked
        weights are a detached copy, so no gradient reaches the heads through it."""
        return FusedDraftHeads.for_model(self).states(h_BD, next_B, n)

    def head_tokens(self, index: int, tokens_BT: Tensor) -> Tensor | None:
        """The tokens head `index` reads at each position of the sequence `tokens_BT`, if any: those at
        t + index (sequential) or t + 1 (conditioned); the last positions, past the end, read token 0."""
        if index == 0 or self.config.head_style not in ("sequential", "conditioned"):
            return None
        return shift_left(tokens_BT, index if self.config.head_style == "sequential" else 1)

    def head_states(self, h_BTD: Tensor, tokens_BT: Tensor, rope: RopeContext) -> list[Tensor]:
        """Every head's pre-norm output for a sequence whose future tokens are known (training, scoring)."""
        if self.config.head_style != "sequential":
            return [
                self.head_forward(i, h_BTD, rope, self.head_tokens(i, tokens_BT))
                for i in range(self.config.n_future)
            ]
        states = [self.head_forward(0, h_BTD, rope)]
        for k in range(1, self.config.n_future):
            states.append(self.head_forward(k, states[-1], rope, self.head_tokens(k, tokens_BT)))
        return states

    def logits(self, z_BTD: Tensor) -> Tensor:
        """Shared final norm and unembedding (the medusa style's heads come after the norm)."""
        if self.config.head_style == "medusa":
            return self.output(z_BTD)
        return self.output(self.norm(z_BTD))

    def next_token_logits(self, tokens_BT: Tensor) -> Tensor:
        """`logits_BTV` of the next-token head alone, without a cache (the other heads are not run)."""
        rope = self.rope_context(tokens_BT, None)
        return self.logits(self.head_forward(0, self.trunk_forward(tokens_BT, rope), rope))

    def forward(self, tokens_BT: Tensor, input_pos_BT: Tensor | None = None) -> Tensor:
        """Logits of every head, shape (B, T, N, V). For inspection and tests; training never needs them all."""
        rope = self.rope_context(tokens_BT, input_pos_BT)
        h_BTD = self.trunk_forward(tokens_BT, rope)
        return torch.stack([self.logits(z) for z in self.head_states(h_BTD, tokens_BT, rope)], dim=2)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.tok_embeddings.weight.numel()
        return total


def shift_left(tokens_BT: Tensor, k: int) -> Tensor:
    """tokens[:, t + k] at position t; the last k positions, which have no such token, repeat token 0."""
    if k == 0:
        return tokens_BT
    pad_BK = torch.zeros_like(tokens_BT[:, :k])
    return torch.cat([tokens_BT[:, k:], pad_BK], dim=1)
