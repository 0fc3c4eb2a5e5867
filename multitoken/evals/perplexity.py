"""Loss, perplexity, bits per byte and per-head accuracy of a model on a token shard.

Bits per byte (bpb) makes byte-level and BPE models comparable: the total next-token cross-entropy in
bits divided by the number of UTF-8 bytes that the predicted tokens stand for. Special tokens (the
document separator) count as zero bytes but their loss is kept, so every model pays for predicting
where a document ends.

Dimension letters: B batch, T positions, N heads, V vocabulary.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from multitoken.data.loader import TokenDataset
from multitoken.errors import UserError
from multitoken.loss import IGNORE_INDEX, build_targets, head_metrics
from multitoken.tokenizer import SPECIALS, Tokenizer, bytes_to_unicode


@dataclass
class HeadReport:
    """Cross-entropy and top-1 accuracy of one head."""

    offset: int
    """Which future token the head predicts: 1 is the next token."""
    loss: float
    """Mean cross-entropy in nats over the head's targets."""
    accuracy: float
    """Fraction of targets that are the head's most likely token."""
    targets: int
    """Number of targets scored."""


@dataclass
class LossReport:
    """What `evaluate_loss` measured."""

    seq_len: int
    """Window length in tokens."""
    windows: int
    """Windows evaluated."""
    tokens: int
    """Next-token targets scored (seq_len - 1 per window, padding excluded)."""
    loss: float
    """Mean next-token cross-entropy in nats (NaN when the model has no next-token head)."""
    perplexity: float
    """exp(loss)."""
    bits_per_byte: float | None
    """Total next-token cross-entropy in bits per UTF-8 byte of the targets; None without a tokenizer."""
    bytes: int | None
    """UTF-8 bytes the next-token targets decode to; None without a tokenizer."""
    heads: list[HeadReport] = field(default_factory=list)
    """Every head, in model order."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """Raw UTF-8 byte length of every token id, shape (V,); special tokens count 0.

    Exact for byte, byte-level BPE and tiktoken tokenizers: a byte-level piece that is part of a
    multi-byte character still counts its raw bytes. Other tokenizer.json models fall back to the
    length of each token decoded alone, which can miscount partial characters.
    """
    V = tokenizer.vocab_size
    lengths_V = np.zeros(V, dtype=np.int64)
    if tokenizer.kind == "tiktoken":
        special_ids = {tokenizer.eos_id}
        for i in range(V):
            if i not in special_ids:
                with contextlib.suppress(KeyError):  # ids missing from the ranks stay 0
                    lengths_V[i] = len(tokenizer.enc.decode_single_token_bytes(i))
        return lengths_V
    hf = tokenizer.hf
    special_ids = {i for i, t in hf.get_added_tokens_decoder().items() if t.special}
    special_ids |= {i for s in SPECIALS if (i := hf.token_to_id(s)) is not None}
    byte_of_char = {c: b for b, c in bytes_to_unicode().items()}
    byte_level = _decoder_type(hf) == "ByteLevel"
    for piece, i in hf.get_vocab(with_added_tokens=True).items():
        if i in special_ids or i >= V:
            continue
        if byte_level and all(c in byte_of_char for c in piece):
            lengths_V[i] = len(piece)  # one alphabet character per raw byte
        else:
            lengths_V[i] = len(hf.decode([i], skip_special_tokens=False).encode("utf-8"))
    return lengths_V


def _decoder_type(hf) -> str | None:
    decoder = json.loads(hf.to_str()).get("decoder") or {}
    return decoder.get("type")


def check_tokenizer_matches(model, dataset: TokenDataset, tokenizer: Tokenizer | None, name: str) -> None:
    """UserError unless the model (and its tokenizer, when known) was made for the dataset's tokens."""
    if model.config.vocab_size != dataset.vocab_size:
        raise UserError(
            f"{name} has vocab_size {model.config.vocab_size} but {dataset.directory} was tokenized with "
            f"vocab_size {dataset.vocab_size}: the tokenizers differ"
        )
    expected = dataset.meta.get("tokenizer_fingerprint")
    if tokenizer is not None and expected and tokenizer.fingerprint() != expected:
        raise UserError(
            f"{name}'s tokenizer differs from the one {dataset.directory} was tokenized with "
            "(tokenizer fingerprints differ)"
        )


@torch.no_grad()
def evaluate_loss(
    model,
    dataset: TokenDataset,
    seq_len: int,
    max_windows: int | None,
    tokenizer: Tokenizer | None = None,
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> LossReport:
    """Next-token loss, perplexity and bits per byte, and every head's loss and accuracy, on `dataset`.

    Windows are non-overlapping, spread evenly over the split (`TokenDataset.eval_windows`); a head's
    targets never cross a document separator. bits_per_byte needs `tokenizer`.
    """
    if seq_len > model.config.max_seq_len:
        raise UserError(f"seq_len {seq_len} exceeds the model's context of {model.config.max_seq_len}")
    if max_windows is not None and max_windows < 1:
        raise UserError(f"max_windows must be at least 1, got {max_windows}")
    device = next(model.parameters()).device
    offsets = model.config.head_offsets
    N = len(offsets)
    lengths_V = torch.from_numpy(token_byte_lengths(tokenizer)) if tokenizer is not None else None
    loss_N = torch.zeros(N, dtype=torch.float64)
    correct_N = torch.zeros(N, dtype=torch.long)
    count_N = torch.zeros(N, dtype=torch.long)
    n_bytes, n_windows = 0, 0
    batches = dataset.eval_windows(seq_len, max_windows, batch_size=batch_size)
    if progress:
        from tqdm import tqdm

        available = len(dataset) // seq_len
        total = available if max_windows is None else min(max_windows, available)
        batches = tqdm(batches, total=math.ceil(total / batch_size), desc="eval loss", unit="batch")
    model.eval()
    for tokens_BT in batches:
        sums = head_metrics(model, tokens_BT.to(device), sep_id=dataset.eos_id, pad_id=dataset.pad_id)
        loss_N += sums[0]
        correct_N += sums[1]
        count_N += sums[2]
        n_windows += tokens_BT.shape[0]
        if lengths_V is not None:
            target_BT = build_targets(tokens_BT, [1], sep_id=dataset.eos_id, pad_id=dataset.pad_id)[..., 0]
            n_bytes += int(lengths_V[target_BT[target_BT != IGNORE_INDEX]].sum())

    heads = [
        HeadReport(
            offset=offsets[i],
            loss=_ratio(float(loss_N[i]), int(count_N[i])),
            accuracy=_ratio(float(correct_N[i]), int(count_N[i])),
            targets=int(count_N[i]),
        )
        for i in range(N)
    ]
    first = offsets.index(1) if 1 in offsets else None
    loss = heads[first].loss if first is not None else float("nan")
    tokens = heads[first].targets if first is not None else 0
    bpb = None
    if lengths_V is not None:
        total_nats = float(loss_N[first]) if first is not None else float("nan")
        bpb = total_nats / math.log(2) / n_bytes if n_bytes > 0 else float("nan")
    return LossReport(
        seq_len=seq_len,
        windows=n_windows,
        tokens=tokens,
        loss=loss,
        perplexity=math.exp(loss) if loss < 700 else float("inf"),
        bits_per_byte=bpb,
        bytes=n_bytes if lengths_V is not None else None,
        heads=heads,
    )


def _ratio(numerator: float, denominator: int) -> float:
    return numerator / denominator if denominator > 0 else float("nan")


def format_report(report: LossReport) -> str:
    """A small plain-text table of a LossReport."""
    bpb = "n/a (no tokenizer)" if report.bits_per_byte is None else f"{report.bits_per_byte:.4f}"
    lines = [
        f"windows      {report.windows} x {report.seq_len} tokens ({report.tokens} next-token targets)",
        f"loss         {report.loss:.4f} nats/token",
        f"perplexity   {report.perplexity:.3f}",
        f"bits/byte    {bpb}" + ("" if report.bytes is None else f" over {report.bytes} bytes"),
        "",
        f"{'head':>4}  {'offset':>6}  {'loss':>8}  {'top-1 acc':>9}  {'targets':>8}",
    ]
    for i, h in enumerate(report.heads):
        lines.append(f"{i:>4}  {'+' + str(h.offset):>6}  {h.loss:>8.4f}  {h.accuracy:>9.4f}  {h.targets:>8}")
    return "\n".join(lines)
