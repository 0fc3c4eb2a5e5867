"""Streamed text equals the whole decode: split characters, stop strings, any chunking, any tokenizer."""

from __future__ import annotations

import random

import pytest

from multitoken.serve.text import IncrementalText
from multitoken.tokenizer import byte_tokenizer, train_bpe

TEXTS = [
    "def add(a, b):\n    return a + b  # somme\n",
    "naïve café — ünïcødé, 日本語のテキスト, emoji 🙂🙂 and tabs\t\tend",
    "print('STOP here') then more text after the stop",
]


@pytest.fixture(scope="module")
def tokenizers():
    bpe = train_bpe(TEXTS * 20 + ["a b c d e f g"] * 10, 300)
    return {"bytes": byte_tokenizer(), "bpe": bpe}


def _streamed(tokenizer, ids, chunk_sizes, stop=()):
    text, out, at = IncrementalText(tokenizer, stop), [], 0
    for size in chunk_sizes:
        out.append(text.add(ids[at : at + size]))
        at += size
    out.append(text.add(ids[at:]))
    out.append(text.finish())
    return out, text


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
@pytest.mark.parametrize("stop", [(), ("STOP",), ("\n    ", "🙂")])
def test_streamed_text_is_the_whole_text_cut_at_the_first_stop(tokenizers, kind, stop):
    tokenizer, rng = tokenizers[kind], random.Random(0)
    for source in TEXTS:
        ids = tokenizer.encode(source)
        for _ in range(5):
            sizes = [rng.randint(1, 4) for _ in range(len(ids))]
            pieces, text = _streamed(tokenizer, ids, sizes, stop)
            whole = tokenizer.decode(ids)
            cuts = [i for i in (whole.find(s) for s in stop) if i >= 0]
            assert "".join(pieces) == (whole[: min(cuts)] if cuts else whole) == text.text()
            assert all("\ufffd" not in piece for piece in pieces)  # never half a character


def test_a_character_split_over_tokens_waits_for_its_last_byte():
    tokenizer = byte_tokenizer()
    ids = tokenizer.encode("é!")  # two bytes for é, then !
    text = IncrementalText(tokenizer)
    assert text.add(ids[:1]) == ""
    assert text.add(ids[1:2]) == "é"
    assert text.add(ids[2:]) == "!"
    assert text.finish() == ""


def test_decoding_cost_grows_with_the_new_tokens_not_the_text(tokenizers):
    tokenizer = tokenizers["bytes"]
    decoded = []

    class Counting:
        def decode(self, ids):
            decoded.append(len(ids))
            return tokenizer.decode(ids)

    text = IncrementalText(Counting())
    for token in tokenizer.encode("x" * 500):
        text.add([token])
    assert max(decoded) <= 2  # each add decodes its token with one token of context
