"""Tokenize a corpus once into flat binary shards plus `meta.json`.

Layout of a prepared directory:
- `train_00000.bin`, ..., `val_00000.bin`, ...: raw little-endian token ids (uint16 when the vocabulary fits,
  else uint32); the documents of a split concatenated, each followed by `eos_id`. A split's shards are one
  stream cut every `shard_tokens` tokens, so documents may cross shard boundaries.
- the tokenizer (`tokenizer.json`, or `tokenizer.tiktoken` + `tokenizer_config.json`).
- `meta.json`: settings, vocabulary facts and the shard list with token counts and byte sizes.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from multitoken.data.chat import ChatText, chat_renderer, no_template_error
from multitoken.data.sources import ChatWithoutTemplate, describe_skipped, iter_documents, source_fingerprint
from multitoken.errors import UserError
from multitoken.files import check_output_parent, read_json
from multitoken.tokenizer import Tokenizer, byte_tokenizer, check_bpe_vocab_size, load_tokenizer, train_bpe

FORMAT_VERSION = 1
META_FILE = "meta.json"
SPLITS = ("train", "val")
SETTINGS_KEYS = (
    "format_version",
    "source_fingerprint",
    "tokenizer",
    "tokenizer_fingerprint",
    "requested_vocab_size",
    "val_fraction",
    "seed",
    "shard_tokens",
    "max_documents",
)
"""meta.json keys that must match for an existing directory to be reused."""
ENCODE_BATCH_CHARS = 4_000_000


@dataclass
class PrepareConfig:
    """How to turn a text corpus into token shards."""

    source: str = "python-stdlib"
    """Corpus: python-stdlib, shakespeare, a directory/glob/file, or hf:NAME[:SPLIT] (see data/sources.py);
    chats.jsonl:messages renders chat conversations with the --tokenizer checkpoint's chat template."""
    out: str = "data/stdlib"
    """Output directory; must not exist yet unless it holds this same dataset."""
    tokenizer: str = "bpe"
    """Tokenizer: bpe (trained on the train split), byte, or a tokenizer.json / directory / .tiktoken path."""
    vocab_size: int = 8192
    """Size of the BPE vocabulary, specials included (tokenizer="bpe" only)."""
    val_fraction: float = 0.01
    """Fraction of documents held out for validation; each split gets at least one."""
    seed: int = 0
    """Seed of the document-level train/val split."""
    shard_tokens: int = 50_000_000
    """Most tokens per shard file."""
    max_documents: int = 0
    """Use only the first this many documents; 0 means all."""


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest little-endian unsigned dtype that holds ids below `vocab_size`."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def _split_score(text: str, seed: int) -> float:
    """Uniform in [0, 1) from a hash of (seed, document content); below val_fraction means validation."""
    digest = hashlib.sha256(f"{seed}\0".encode() + text.encode("utf-8", errors="surrogatepass")).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def read_meta(directory: str | os.PathLike) -> dict:
    """The `meta.json` of a prepared directory, checked field by field; UserError when missing or not ours."""
    path = Path(directory) / META_FILE
    if not path.exists():
        raise UserError(f"{directory} is not a prepared dataset: {META_FILE} is missing")
    meta = read_json(path, "dataset description")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} is not a format-{FORMAT_VERSION} multitoken dataset")
    _check_meta(path, meta)
    return meta


def _check_meta(path: Path, meta: dict) -> None:
    """Refuse a meta.json whose fields could make the loader read ids wrongly (an edited dtype, say)."""

    def bad(what: str) -> UserError:
        return UserError(f"{path} is damaged: {what}; prepare the data again")

    def is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    vocab = meta.get("vocab_size")
    if not is_int(vocab) or vocab < 2:
        raise bad(f"vocab_size {vocab!r} is not an integer of at least 2")
    if meta.get("dtype") != token_dtype(vocab).name:
        raise bad(
            f"dtype {meta.get('dtype')!r} is not the {token_dtype(vocab).name} of a {vocab}-id vocabulary"
        )
    for key in ("eos_id", "pad_id"):
        value = meta.get(key)
        if not (value is None and key == "pad_id") and not (is_int(value) and 0 <= value < vocab):
            raise bad(f"{key} {value!r} is not an id below vocab_size {vocab}")
    splits = meta.get("splits")
    if not isinstance(splits, dict):
        raise bad("splits is not a mapping")
    for split, info in splits.items():
        shards = info.get("shards") if isinstance(info, dict) else None
        if not isinstance(shards, list):
            raise bad(f"split {split!r} has no list of shards")
        for shard in shards:
            name = shard.get("file") if isinstance(shard, dict) else None
            tokens = shard.get("tokens") if isinstance(shard, dict) else None
            if not isinstance(name, str) or Path(name).name != name or not name.endswith(".bin"):
                raise bad(f"split {split!r} names a shard file {name!r} outside the directory")
            if not is_int(tokens) or tokens < 0:
                raise bad(f"shard {name} has a token count of {tokens!r}")


def check_shard_files(directory: str | os.PathLike, meta: dict, split: str) -> list[Path]:
    """Paths of a split's shards after checking each file's size against meta.json."""
    if split not in meta.get("splits", {}):
        raise UserError(f"{directory} has no {split!r} split (has: {', '.join(meta.get('splits', {}))})")
    itemsize = np.dtype(meta["dtype"]).itemsize
    paths = []
    for shard in meta["splits"][split]["shards"]:
        path = Path(directory) / shard["file"]
        expected = shard["tokens"] * itemsize
        if not path.is_file():
            raise UserError(f"shard {path} is missing")
        size = path.stat().st_size
        if size < expected:
            raise UserError(f"shard {path} is truncated: {size} bytes, expected {expected}")
        if size > expected:
            raise UserError(f"shard {path} is longer than meta.json says: {size} bytes, expected {expected}")
        paths.append(path)
    return paths


def prepare(cfg: PrepareConfig) -> Path:
    """Turn a text corpus into token shards that `multitoken train` reads.

    Reads the corpus (the Python standard library, Shakespeare, your own files or a Hugging Face
    dataset), trains a BPE tokenizer on it or uses the one you name, splits documents into train and
    validation, and writes the token ids and the tokenizer to --out. Running it again with the same
    settings reuses the folder.
    """
    _check_config(cfg)
    out = Path(cfg.out)
    given = _given_tokenizer(cfg.tokenizer)
    settings = {
        "format_version": FORMAT_VERSION,
        "source_fingerprint": source_fingerprint(cfg.source),
        "tokenizer": given.kind if given else "bpe",
        **({"tokenizer_fingerprint": given.fingerprint()} if given else {}),
        "requested_vocab_size": None if given else cfg.vocab_size,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "shard_tokens": cfg.shard_tokens,
        "max_documents": cfg.max_documents,
    }
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        if _holds_same_dataset(out, settings):
            print(f"{out} already holds this prepared dataset; reusing it")
            return out
        raise UserError(f"{out} already exists and holds something else; choose another output or delete it")

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as err:
        raise UserError(f"cannot write {out}: {err.strerror or err}") from None
    try:
        tmp.chmod(0o777 & ~_current_umask())  # mkdtemp makes it private; give it normal permissions
        meta = _write_dataset(cfg, tmp, settings, given)
        if out.is_dir():
            out.rmdir()  # empty; anything else was rejected above
        os.rename(tmp, out)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise UserError(f"could not write {out}: {err.strerror or err}; nothing was written") from None
        raise
    summary = ", ".join(f"{s} {meta['splits'][s]['tokens']:,} tokens" for s in SPLITS)
    print(f"wrote {out}: {summary}, vocab {meta['vocab_size']}")
    return out


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_config(cfg: PrepareConfig) -> None:
    if not 0 < cfg.val_fraction < 1:
        raise UserError(f"val_fraction must be between 0 and 1 (exclusive), got {cfg.val_fraction}")
    if cfg.shard_tokens < 1:
        raise UserError(f"shard_tokens must be at least 1, got {cfg.shard_tokens}")
    if cfg.max_documents < 0:
        raise UserError(f"max_documents must be 0 (all) or more, got {cfg.max_documents}")
    if cfg.seed < 0:
        raise UserError(f"seed must be 0 or more, got {cfg.seed}")
    if cfg.tokenizer == "bpe":
        check_bpe_vocab_size(cfg.vocab_size)
    check_output_parent(cfg.out, "prepared data")


def _given_tokenizer(spec: str) -> Tokenizer | None:
    """The tokenizer named by `spec`, or None when one must be trained ("bpe")."""
    if spec == "bpe":
        return None
    if spec == "byte":
        return byte_tokenizer()
    return load_tokenizer(spec)


def _holds_same_dataset(out: Path, settings: dict) -> bool:
    try:
        meta = read_meta(out)
    except UserError:
        return False
    if any(meta.get(key) != value for key, value in settings.items()):
        return False
    for split in SPLITS:
        check_shard_files(out, meta, split)  # damaged copy of this dataset: say which shard
    return True


def _documents(cfg: PrepareConfig, skipped: collections.Counter | None = None) -> Iterator[str]:
    chat = chat_renderer(cfg.tokenizer)
    try:
        for i, doc in enumerate(iter_documents(cfg.source, skipped=skipped, chat=chat)):
            if cfg.max_documents and i >= cfg.max_documents:
                return
            yield doc
    except ChatWithoutTemplate as err:
        raise no_template_error(str(err), cfg.tokenizer) from None


def _assign_splits(cfg: PrepareConfig) -> np.ndarray:
    """Boolean `is_val_D` per document, with at least one document on each side."""
    skipped: collections.Counter = collections.Counter()
    scores_D = np.array([_split_score(doc, cfg.seed) for doc in _documents(cfg, skipped)], dtype=np.float64)
    if skipped:
        print(f"skipped {describe_skipped(skipped)} in {cfg.source}: not text documents")
    if len(scores_D) < 2:
        raise UserError(
            f"corpus {cfg.source} has {len(scores_D)} document; a train/val split needs at least 2"
        )
    is_val_D = scores_D < cfg.val_fraction
    if not is_val_D.any():
        is_val_D[np.argmin(scores_D)] = True
    if is_val_D.all():
        is_val_D[np.argmax(scores_D)] = False
    return is_val_D


def _documents_with_split(cfg: PrepareConfig, is_val_D: np.ndarray) -> Iterator[tuple[str, bool]]:
    """Documents again, each with its split; UserError if the corpus changed since `_assign_splits`."""
    docs = _documents(cfg)
    for is_val in is_val_D:
        doc = next(docs, None)
        if doc is None:
            break
        yield doc, bool(is_val)
    else:
        if next(docs, None) is None:
            return
    raise UserError(f"corpus {cfg.source} changed while it was being prepared")


def _write_dataset(cfg: PrepareConfig, directory: Path, settings: dict, given: Tokenizer | None) -> dict:
    is_val_D = _assign_splits(cfg)
    if given is None:
        train_docs = (doc for doc, is_val in _documents_with_split(cfg, is_val_D) if not is_val)
        tokenizer = train_bpe(train_docs, cfg.vocab_size)
    else:
        tokenizer = given
    tokenizer.save(directory)
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {split: _ShardWriter(directory, split, dtype, cfg.shard_tokens) for split in SPLITS}
    n_docs = {split: 0 for split in SPLITS}

    def flush(batch: list[str], splits: list[str]) -> None:
        chat = [isinstance(doc, ChatText) for doc in batch]
        plain_docs = [d for d, c in zip(batch, chat, strict=True) if not c]
        chat_docs = [d for d, c in zip(batch, chat, strict=True) if c]
        encoded = iter(tokenizer.encode_batch(plain_docs) if plain_docs else [])
        encoded_chat = iter(tokenizer.encode_batch(chat_docs, specials=True) if chat_docs else [])
        for is_chat, split in zip(chat, splits, strict=True):
            ids = next(encoded_chat if is_chat else encoded)
            ids_N = np.array([*ids, tokenizer.eos_id], dtype=np.int64)
            if ids_N.max() >= tokenizer.vocab_size or ids_N.min() < 0:
                bad = int(ids_N[(ids_N >= tokenizer.vocab_size) | (ids_N < 0)][0])
                raise UserError(f"tokenizer produced id {bad}, outside its vocab_size {tokenizer.vocab_size}")
            writers[split].write(ids_N.astype(dtype))
            n_docs[split] += 1

    batch: list[str] = []
    splits: list[str] = []
    chars = 0
    with tqdm(total=len(is_val_D), desc="tokenizing", unit="doc", disable=None) as bar:
        for doc, is_val in _documents_with_split(cfg, is_val_D):
            batch.append(doc)
            splits.append("val" if is_val else "train")
            chars += len(doc)
            if chars >= ENCODE_BATCH_CHARS:
                flush(batch, splits)
                bar.update(len(batch))
                batch, splits, chars = [], [], 0
        flush(batch, splits)
        bar.update(len(batch))

    meta = {
        **settings,
        "tokenizer_fingerprint": tokenizer.fingerprint(),
        "source": cfg.source,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
        "splits": {},
    }
    for split in SPLITS:
        shards = writers[split].close()
        meta["splits"][split] = {
            "documents": n_docs[split],
            "tokens": sum(s["tokens"] for s in shards),
            "shards": shards,
        }
    (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


class _ShardWriter:
    """Appends token ids to `{split}_{index:05d}.bin` files of at most `shard_tokens` each."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.file = None

    def write(self, ids_N: np.ndarray) -> None:
        pos = 0
        while pos < len(ids_N):
            if self.file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._next_file()
            take = min(self.shard_tokens - self.shards[-1]["tokens"], len(ids_N) - pos)
            self.file.write(ids_N[pos : pos + take].tobytes())
            self.shards[-1]["tokens"] += take
            pos += take

    def _next_file(self) -> None:
        if self.file is not None:
            self.file.close()
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self.file = open(self.directory / name, "wb")  # noqa: SIM115 - closed in _next_file/close
        self.shards.append({"file": name, "tokens": 0, "bytes": 0})

    def close(self) -> list[dict]:
        if self.file is not None:
            self.file.close()
            self.file = None
        for shard in self.shards:
            shard["bytes"] = shard["tokens"] * self.dtype.itemsize
        return self.shards
