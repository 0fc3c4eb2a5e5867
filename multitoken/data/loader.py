"""Read prepared token shards and sample training batches.

Sampling contract: the global batch of optimizer step `step` depends only on (seed, step, global_batch,
seq_len). Its window starts come from `np.random.default_rng([seed, step])`, uniform over
[0, n_tokens - seq_len]. Rank r, micro-step m take rows [(m * world_size + r) * b, ... + b) of it, so
runs that differ only in world size or gradient accumulation see the same tokens per step, and a run
resumed at step s continues exactly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from multitoken.data.shards import check_shard_files, read_meta
from multitoken.errors import UserError
from multitoken.tokenizer import Tokenizer, load_tokenizer

VALIDATE_ON_OPEN_TOKENS = 1 << 24
"""Splits up to this many tokens have their ids range-checked when opened."""


def eval_window_starts(n_tokens: int, seq_len: int, count: int | None = None) -> np.ndarray:
    """Starts of `count` non-overlapping windows spread evenly over `n_tokens` (None: all that fit).

    With A = n_tokens // seq_len whole windows and C = min(count, A) of them kept, window i starts at
    floor(i (A - 1) / max(C - 1, 1)) * seq_len: the first and the last whole window, evenly between.
    """
    available = n_tokens // seq_len
    count = available if count is None else min(count, available)
    # Floor of evenly spaced positions: strictly increasing because count <= available.
    index_W = np.arange(count, dtype=np.int64) * (available - 1) // max(count - 1, 1)
    return index_W * seq_len


class TokenDataset:
    """One split of a prepared directory, as a single read-only stream of token ids."""

    def __init__(self, directory: str | os.PathLike, split: str = "train"):
        self.directory = Path(directory)
        self.split = split
        self.meta: dict = read_meta(self.directory)
        self.vocab_size: int = self.meta["vocab_size"]
        self.eos_id: int = self.meta["eos_id"]
        self.pad_id: int | None = self.meta["pad_id"]
        dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        paths = check_shard_files(self.directory, self.meta, split)
        counts = [shard["tokens"] for shard in self.meta["splits"][split]["shards"]]
        # Empty shards cannot be memory-mapped and hold nothing; leave them out.
        self.shard_paths = [p for p, n in zip(paths, counts, strict=True) if n > 0]
        self.shards = [np.memmap(p, dtype=dtype, mode="r") for p in self.shard_paths]
        self.shard_offsets = np.cumsum([0, *(len(s) for s in self.shards)])
        self.n_tokens = int(self.shard_offsets[-1])
        if self.n_tokens == 0:
            raise UserError(f"{self.directory} {split} split holds no tokens")
        if self.n_tokens <= VALIDATE_ON_OPEN_TOKENS:
            self.validate_ids()

    def __len__(self) -> int:
        return self.n_tokens

    def tokenizer(self) -> Tokenizer:
        """The tokenizer these ids came from."""
        return load_tokenizer(self.directory)

    def validate_ids(self, chunk_tokens: int = 1 << 24) -> None:
        """Scan every shard; UserError naming the first id >= vocab_size."""
        for path, shard in zip(self.shard_paths, self.shards, strict=True):
            for start in range(0, len(shard), chunk_tokens):
                chunk = shard[start : start + chunk_tokens]
                if chunk.max() >= self.vocab_size:
                    pos = int(np.argmax(chunk >= self.vocab_size))
                    raise UserError(
                        f"shard {path} has token id {int(chunk[pos])} at position {start + pos}, "
                        f"but vocab_size is {self.vocab_size}"
                    )

    def window(self, index: int, length: int) -> np.ndarray:
        """Tokens [index, index + length) of the split as int64, read across shard boundaries."""
        if index < 0 or length < 0 or index + length > self.n_tokens:
            raise IndexError(f"window [{index}, {index + length}) is outside [0, {self.n_tokens})")
        window_T = np.empty(length, dtype=np.int64)
        shard = int(np.searchsorted(self.shard_offsets, index, side="right")) - 1
        filled = 0
        while filled < length:
            local = index + filled - int(self.shard_offsets[shard])
            take = min(length - filled, len(self.shards[shard]) - local)
            window_T[filled : filled + take] = self.shards[shard][local : local + take]
            filled += take
            shard += 1
        return window_T

    def _check_seq_len(self, seq_len: int) -> None:
        if seq_len < 1:
            raise UserError(f"seq_len must be at least 1, got {seq_len}")
        if self.n_tokens < seq_len + 1:
            raise UserError(
                f"{self.split} split of {self.directory} has {self.n_tokens} tokens, "
                f"too few for windows of {seq_len} (needs at least {seq_len + 1})"
            )

    def global_batch_starts(self, seed: int, step: int, global_batch: int, seq_len: int) -> np.ndarray:
        """Window start offsets `starts_B` of the whole batch of optimizer step `step`."""
        self._check_seq_len(seq_len)
        rng = np.random.default_rng([seed, step])
        return rng.integers(0, self.n_tokens - seq_len + 1, size=global_batch, dtype=np.int64)

    def batch_for(
        self, seed: int, step: int, global_batch: int, seq_len: int, row_start: int, row_end: int
    ) -> torch.Tensor:
        """Rows [row_start, row_end) of step `step`'s global batch: int64 `tokens_BT` (rows, seq_len)."""
        if not 0 <= row_start <= row_end <= global_batch:
            raise ValueError(f"rows [{row_start}, {row_end}) are outside a global batch of {global_batch}")
        starts_B = self.global_batch_starts(seed, step, global_batch, seq_len)[row_start:row_end]
        tokens_BT = np.empty((len(starts_B), seq_len), dtype=np.int64)
        for row, start in enumerate(starts_B):
            tokens_BT[row] = self.window(int(start), seq_len)
        return torch.from_numpy(tokens_BT)

    def random_windows(
        self,
        *,
        seed: int,
        step: int,
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        micro_step: int = 0,
        grad_accum: int = 1,
    ) -> torch.Tensor:
        """This rank's micro-batch `tokens_BT` (batch_size, seq_len) of the step's global batch.

        The global batch has batch_size * world_size * grad_accum rows; see the module docstring.
        """
        if not (0 <= rank < world_size and 0 <= micro_step < grad_accum):
            raise ValueError(
                f"rank {rank}/{world_size} or micro_step {micro_step}/{grad_accum} is out of range"
            )
        row_start = (micro_step * world_size + rank) * batch_size
        global_batch = batch_size * world_size * grad_accum
        return self.batch_for(seed, step, global_batch, seq_len, row_start, row_start + batch_size)

    def eval_windows(
        self,
        seq_len: int,
        max_windows: int | None = None,
        *,
        batch_size: int = 1,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[torch.Tensor]:
        """Deterministic non-overlapping windows, spread evenly over the split, as int64 batches (b, seq_len).

        At most `max_windows` in total (None: all `n_tokens // seq_len`); rank r gets every world_size-th one.
        """
        self._check_seq_len(seq_len)
        starts_W = eval_window_starts(self.n_tokens, seq_len, max_windows)[rank::world_size]
        for first in range(0, len(starts_W), batch_size):
            rows = [self.window(int(s), seq_len) for s in starts_W[first : first + batch_size]]
            yield torch.from_numpy(np.stack(rows))
