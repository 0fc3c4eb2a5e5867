import base64

import pytest

from multitoken.errors import UserError
from multitoken.tokenizer import (
    EOS,
    TiktokenTokenizer,
    Tokenizer,
    byte_tokenizer,
    load_tokenizer,
    train_bpe,
)

SAMPLES = [
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "héllo wörld — naïve café",
    "中文字符和日本語のテキスト",
    "emoji 🙂🚀 and flags 🇫🇷 and ZWJ 👩‍💻",
    "tabs\tand\nnewlines\r\n  and   spaces \n\n\t\t",
    "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}  # comment\n",
    "   leading and trailing   ",
    "literal <|endoftext|> and <|pad|> inside text",
    "",
]


def synthetic_corpus() -> list[str]:
    words = ["alpha", "beta", "gamma", "delta", "the", "and", "return", "def", "café", "数据"]
    return [" ".join(words[(i * 7 + j) % len(words)] for j in range(40)) + "\n" for i in range(50)]


def tiny_ranks_file(path) -> None:
    """All 256 single bytes plus a few merges, in tiktoken's base64-and-rank format."""
    tokens = [bytes([b]) for b in range(256)] + [b"th", b"he", b"the", b" the", b"in", b"ing", b"  "]
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % rank for rank, t in enumerate(tokens)))


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_bpe(synthetic_corpus(), vocab_size=400)


@pytest.fixture(scope="module")
def tiktoken_tok(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tik") / "tiny.tiktoken"
    tiny_ranks_file(path)
    return load_tokenizer(path)


@pytest.fixture(params=["byte", "bpe", "tiktoken"])
def tokenizer(request, bpe, tiktoken_tok) -> Tokenizer:
    return {"byte": byte_tokenizer(), "bpe": bpe, "tiktoken": tiktoken_tok}[request.param]


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


def test_encode_batch_matches_encode(tokenizer):
    assert tokenizer.encode_batch(SAMPLES) == [tokenizer.encode(s) for s in SAMPLES]


def test_save_load_gives_identical_ids(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert type(loaded) is type(tokenizer)
    assert (loaded.kind, loaded.vocab_size, loaded.eos_id, loaded.pad_id) == (
        tokenizer.kind,
        tokenizer.vocab_size,
        tokenizer.eos_id,
        tokenizer.pad_id,
    )
    assert loaded.fingerprint() == tokenizer.fingerprint()
    for text in SAMPLES:
        assert loaded.encode(text) == tokenizer.encode(text)


def test_specials_in_text_are_plain_text(tokenizer):
    assert tokenizer.eos_id not in tokenizer.encode(f"a{EOS}b")
    assert tokenizer.decode([*tokenizer.encode("a"), tokenizer.eos_id]) == "a" + EOS


def test_byte_ids_are_byte_values():
    tok = byte_tokenizer()
    text = "aé中🙂\x00\xff"
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.encode(text) == tok.hf.encode(text, add_special_tokens=False).ids  # fast path == HF model
    assert (tok.vocab_size, tok.eos_id, tok.pad_id, tok.kind) == (258, 256, 257, "byte")
    assert tok.decode(list(b"plain ascii")) == "plain ascii"


def test_byte_tokenizer_json_loads_as_byte(tmp_path):
    byte_tokenizer().save(tmp_path)
    assert load_tokenizer(tmp_path / "tokenizer.json").kind == "byte"


def test_trained_bpe_compresses(bpe):
    text = synthetic_corpus()[0]
    assert bpe.kind == "bpe" and bpe.pad_id is not None
    assert len(bpe.encode(text)) < len(text.encode()) / 2


def test_tiktoken_uses_merges_and_eos_after_ranks(tiktoken_tok):
    assert isinstance(tiktoken_tok, TiktokenTokenizer)
    assert tiktoken_tok.encode("the") == [258]
    assert tiktoken_tok.eos_id == 263 and tiktoken_tok.vocab_size == 264 and tiktoken_tok.pad_id is None


def test_vocab_size_too_small():
    with pytest.raises(UserError, match="vocab_size 100 is too small"):
        train_bpe(["abc"], vocab_size=100)


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="missing"):
        load_tokenizer(tmp_path / "nope.json")
    with pytest.raises(UserError, match="holds neither"):
        load_tokenizer(tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match=r"not a valid tokenizer\.json"):
        load_tokenizer(tmp_path / "bad.json")
    (tmp_path / "bad.tiktoken").write_text("this is not base64 ranks\n")
    with pytest.raises(UserError, match="line 1"):
        load_tokenizer(tmp_path / "bad.tiktoken")
    (tmp_path / "short.tiktoken").write_bytes(base64.b64encode(b"a") + b" 0\n")
    with pytest.raises(UserError, match="single-byte"):
        load_tokenizer(tmp_path / "short.tiktoken")
