import base64
import json
from pathlib import Path

import numpy as np
import pytest

from multitoken.data.loader import TokenDataset
from multitoken.data.shards import PrepareConfig, prepare, token_dtype
from multitoken.errors import UserError
from multitoken.tokenizer import Tokenizer, load_tokenizer


@pytest.fixture
def corpus(tmp_path) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()
    words = ["alpha", "beta", "gamma", "delta", "return", "def", "café", "数据", "🙂", "\t", "\n"]
    for i in range(40):
        (root / f"doc{i:02d}.txt").write_text(
            " ".join(words[(i * 5 + j * 3) % len(words)] for j in range(30 + i))
        )
    return root


def cfg(corpus: Path, out: Path, **kw) -> PrepareConfig:
    return PrepareConfig(
        **{"source": str(corpus), "out": str(out), "vocab_size": 300, "val_fraction": 0.2, **kw}
    )


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_prepare_is_byte_identical(corpus, tmp_path):
    a = prepare(cfg(corpus, tmp_path / "a", shard_tokens=500))
    b = prepare(cfg(corpus, tmp_path / "b", shard_tokens=500))
    files = snapshot(a)
    assert files == snapshot(b)
    assert {"meta.json", "tokenizer.json", "train_00000.bin", "train_00001.bin", "val_00000.bin"} <= set(
        files
    )
    assert not list(tmp_path.glob(".*tmp*"))  # no temp dirs left behind


def test_shards_hold_documents_with_eos(corpus, tmp_path):
    out = prepare(cfg(corpus, tmp_path / "out", tokenizer="byte", shard_tokens=300))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 258 and meta["eos_id"] == 256
    tok = load_tokenizer(out)
    docs = {"train": [], "val": []}
    for split in docs:
        info = meta["splits"][split]
        assert info["documents"] >= 1
        assert all(0 < s["tokens"] <= 300 and s["bytes"] == 2 * s["tokens"] for s in info["shards"])
        ids = np.concatenate([np.fromfile(out / s["file"], dtype="<u2") for s in info["shards"]])
        assert len(ids) == info["tokens"] and ids[-1] == 256
        docs[split] = tok.decode(ids.tolist()).split("<|endoftext|>")[:-1]
        assert len(docs[split]) == info["documents"]
    originals = sorted(p.read_text() for p in corpus.iterdir())
    assert sorted(docs["train"] + docs["val"]) == originals


def test_split_is_deterministic_and_nonempty(corpus, tmp_path):
    metas = []
    for name, seed, frac in [("a", 0, 0.001), ("b", 0, 0.001), ("c", 0, 0.999), ("d", 1, 0.5), ("e", 2, 0.5)]:
        out = prepare(cfg(corpus, tmp_path / name, tokenizer="byte", seed=seed, val_fraction=frac))
        metas.append(json.loads((out / "meta.json").read_text())["splits"])
    assert metas[0] == metas[1]
    for splits in metas:
        assert splits["train"]["documents"] >= 1 and splits["val"]["documents"] >= 1
        assert splits["train"]["documents"] + splits["val"]["documents"] == 40
    assert metas[0]["val"]["documents"] == 1 and metas[2]["train"]["documents"] == 1
    assert metas[3] != metas[4]  # the seed changes the split


def test_token_dtype_follows_vocab_size(corpus, tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    ranks = [bytes([b]) for b in range(256)] + [b"alpha"]
    lines = [base64.b64encode(t) + b" %d" % r for r, t in enumerate(ranks[:-1])] + [
        base64.b64encode(b"alpha") + b" 70000"
    ]
    (tmp_path / "big.tiktoken").write_bytes(b"\n".join(lines) + b"\n")
    out = prepare(cfg(corpus, tmp_path / "out", tokenizer=str(tmp_path / "big.tiktoken")))
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["dtype"], meta["vocab_size"], meta["eos_id"], meta["tokenizer"]) == (
        "uint32",
        70002,
        70001,
        "tiktoken",
    )
    ids = np.fromfile(out / "train_00000.bin", dtype="<u4")
    assert ids.max() == 70001 and 70000 in ids
    assert load_tokenizer(out).encode("alpha beta") == load_tokenizer(tmp_path / "big.tiktoken").encode(
        "alpha beta"
    )


def test_reuses_same_dataset(corpus, tmp_path, capsys):
    out = prepare(cfg(corpus, tmp_path / "out", tokenizer="byte"))
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert prepare(cfg(corpus, tmp_path / "out", tokenizer="byte")) == out
    assert "reusing" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_refuses_to_overwrite(corpus, tmp_path):
    out = prepare(cfg(corpus, tmp_path / "out", tokenizer="byte"))
    before = snapshot(out)
    with pytest.raises(UserError, match="already exists"):
        prepare(cfg(corpus, tmp_path / "out", tokenizer="byte", seed=1))
    (corpus / "new.txt").write_text("a new document changes the fingerprint")
    with pytest.raises(UserError, match="already exists"):
        prepare(cfg(corpus, tmp_path / "out", tokenizer="byte"))
    assert snapshot(out) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="already exists"):
        prepare(cfg(corpus, other, tokenizer="byte"))
    assert snapshot(other) == {"notes.txt": b"keep me"}


def test_fills_empty_existing_directory(corpus, tmp_path):
    (tmp_path / "out").mkdir()
    assert (prepare(cfg(corpus, tmp_path / "out", tokenizer="byte")) / "meta.json").is_file()


def test_truncated_shard(corpus, tmp_path):
    out = prepare(cfg(corpus, tmp_path / "out", tokenizer="byte"))
    shard = out / "train_00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(UserError, match=r"train_00000\.bin is truncated"):
        TokenDataset(out, "train")
    with pytest.raises(UserError, match="truncated"):
        prepare(cfg(corpus, tmp_path / "out", tokenizer="byte"))


def test_ids_outside_vocab(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(Tokenizer, "encode_batch", lambda self, texts: [[self.vocab_size + 5] for _ in texts])
    with pytest.raises(UserError, match="outside its vocab_size"):
        prepare(cfg(corpus, tmp_path / "out", tokenizer="byte"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # nothing left behind


def test_bad_inputs(corpus, tmp_path):
    with pytest.raises(UserError, match="val_fraction"):
        prepare(cfg(corpus, tmp_path / "out", val_fraction=0.0))
    with pytest.raises(UserError, match="is missing"):
        prepare(cfg(tmp_path / "nope", tmp_path / "out"))
    with pytest.raises(UserError, match="vocab_size 10 is too small"):
        prepare(cfg(corpus, tmp_path / "out", vocab_size=10))
    with pytest.raises(UserError, match="at least 2"):
        prepare(cfg(corpus, tmp_path / "out", tokenizer="byte", max_documents=1))
    assert not (tmp_path / "out").exists()


def test_corpus_changing_during_prepare(corpus, tmp_path, monkeypatch):
    from multitoken.data import shards

    calls = []

    def growing(source, skipped=None, chat=None):
        calls.append(source)
        return iter([f"doc {i}" for i in range(5 + len(calls))])

    monkeypatch.setattr(shards, "iter_documents", growing)
    with pytest.raises(UserError, match="changed while it was being prepared"):
        prepare(cfg(corpus, tmp_path / "out", tokenizer="byte"))
    assert not (tmp_path / "out").exists()
