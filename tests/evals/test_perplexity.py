"""Loss, bits per byte and per-head accuracy on token shards, checked against a direct computation."""

import math

import pytest
import torch
import torch.nn.functional as F

from multitoken import ModelConfig, MultiTokenLM
from multitoken.data.loader import TokenDataset
from multitoken.errors import UserError
from multitoken.evals.perplexity import check_tokenizer_matches, evaluate_loss, token_byte_lengths
from multitoken.loss import IGNORE_INDEX, build_targets
from multitoken.tokenizer import TiktokenTokenizer, byte_tokenizer, train_bpe

from helpers import make_dataset

TEXTS = ["héllo wörld, naïve café 日本語 🙂", "def f(x):\n    return x + 1\n", "ünïcödé 🙂🙂 日本 ¿qué?"]


def _tiktoken() -> TiktokenTokenizer:
    ranks = {bytes([b]): b for b in range(256)}
    # Multi-byte pieces, two of them only part of a UTF-8 character.
    for piece in (b"he", b"ll", b"\xe6\x97", b"\xf0\x9f", b"re"):
        ranks[piece] = len(ranks)
    return TiktokenTokenizer(ranks)


@pytest.mark.parametrize("kind", ["byte", "bpe", "tiktoken"])
def test_token_byte_lengths_sum_to_utf8_length(kind):
    tokenizer = {"byte": byte_tokenizer, "bpe": lambda: train_bpe(TEXTS * 10, 320), "tiktoken": _tiktoken}[
        kind
    ]()
    lengths_V = token_byte_lengths(tokenizer)
    assert lengths_V.shape == (tokenizer.vocab_size,)
    assert lengths_V[tokenizer.eos_id] == 0
    for text in [*TEXTS, "新しい 😀 text"]:
        ids = tokenizer.encode(text)
        assert int(lengths_V[ids].sum()) == len(text.encode("utf-8"))
    if kind == "bpe":
        # Byte-level BPE of non-ASCII text merges pieces that are only part of a character.
        partial = [i for i in range(tokenizer.vocab_size) if "\ufffd" in tokenizer.decode([i])]
        assert partial, "expected some partial-UTF-8 pieces"


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), n_docs=12)


def _model(vocab_size: int, **overrides) -> MultiTokenLM:
    torch.manual_seed(0)
    values = dict(vocab_size=vocab_size, dim=32, n_layers=3, n_heads=2, n_future=2, max_seq_len=64)
    return MultiTokenLM(ModelConfig(**{**values, **overrides})).eval()


def test_evaluate_loss_matches_direct_computation(shard):
    dataset = TokenDataset(shard, "val")
    model = _model(dataset.vocab_size)
    report = evaluate_loss(
        model, dataset, seq_len=32, max_windows=3, tokenizer=byte_tokenizer(), batch_size=2
    )

    tokens_BT = torch.cat(list(dataset.eval_windows(32, 3)))
    with torch.no_grad():
        logits_BTNV = model(tokens_BT)
    targets_BTN = build_targets(tokens_BT, [1, 2], sep_id=dataset.eos_id, pad_id=dataset.pad_id)
    for i, head in enumerate(report.heads):
        valid = targets_BTN[..., i] != IGNORE_INDEX
        logits_MV, target_M = logits_BTNV[:, :, i][valid], targets_BTN[..., i][valid]
        assert head.offset == i + 1 and head.targets == int(valid.sum())
        assert head.loss == pytest.approx(F.cross_entropy(logits_MV, target_M).item(), rel=1e-5)
        assert head.accuracy == pytest.approx((logits_MV.argmax(-1) == target_M).float().mean().item())
    assert report.windows == 3 and report.tokens == 3 * 31
    assert report.loss == report.heads[0].loss
    assert report.perplexity == pytest.approx(math.exp(report.loss))
    # Byte tokenizer: one byte per target, except the separator, which counts none.
    next_target_BT = tokens_BT[:, 1:]
    assert report.bytes == int((next_target_BT != dataset.eos_id).sum())
    assert report.bits_per_byte == pytest.approx(report.loss * report.tokens / math.log(2) / report.bytes)


def test_evaluate_loss_without_tokenizer_has_no_bpb(shard):
    dataset = TokenDataset(shard, "val")
    report = evaluate_loss(_model(dataset.vocab_size), dataset, seq_len=16, max_windows=1)
    assert report.bits_per_byte is None and report.bytes is None
    assert math.isfinite(report.loss)


def test_mismatched_tokenizer_is_refused(shard):
    dataset = TokenDataset(shard, "val")
    with pytest.raises(UserError, match="vocab_size"):
        check_tokenizer_matches(_model(dataset.vocab_size + 5), dataset, None, "checkpoint X")
    check_tokenizer_matches(_model(dataset.vocab_size), dataset, byte_tokenizer(), "checkpoint X")
    dataset.meta = {**dataset.meta, "tokenizer_fingerprint": "0" * 64}  # same size, other tokenizer
    with pytest.raises(UserError, match="fingerprints differ"):
        check_tokenizer_matches(_model(dataset.vocab_size), dataset, byte_tokenizer(), "checkpoint X")


def test_bad_window_settings(shard):
    dataset = TokenDataset(shard, "val")
    model = _model(dataset.vocab_size)
    with pytest.raises(UserError, match="context"):
        evaluate_loss(model, dataset, seq_len=65, max_windows=1)
    with pytest.raises(UserError, match="max_windows"):
        evaluate_loss(model, dataset, seq_len=16, max_windows=0)
