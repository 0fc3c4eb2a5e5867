"""One interface over byte-level, trained-BPE and tiktoken tokenizers.

Text always round-trips exactly: `decode(encode(s)) == s`. `encode` treats special-token strings
that occur inside the text as plain text, so a document can never inject an `<|endoftext|>`; append
`eos_id` yourself where a document ends.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from multitoken.errors import UserError

EOS = "<|endoftext|>"
"""Document separator."""
PAD = "<|pad|>"
"""Padding token (byte and trained-BPE tokenizers only)."""
SPECIALS = (EOS, PAD)

HF_FILE = "tokenizer.json"
GENERATION_CONFIG = "generation_config.json"
"""A transformers model's generation config; a checkpoint imported from one carries it for its EOS ids."""
TIKTOKEN_FILE = "tokenizer.tiktoken"
TIKTOKEN_CONFIG = "tokenizer_config.json"

# The cl100k_base split pattern (GPT-4).
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte value to the printable character the ByteLevel alphabet uses for it."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    return dict(sorted(chars.items()))


class Tokenizer:
    """A Hugging Face `tokenizers.Tokenizer` (byte-level or BPE) behind the project's tokenizer interface."""

    kind: str
    """Which kind: byte, bpe or tiktoken."""
    vocab_size: int
    """Number of ids, specials included."""
    eos_id: int
    """Id of `<|endoftext|>`, the document separator."""
    pad_id: int | None
    """Id of `<|pad|>`, or None when the tokenizer has none."""

    def __init__(self, hf: tokenizers.Tokenizer, kind: str | None = None, eos_id: int | None = None):
        self.hf = hf
        # Special-token strings inside the input are encoded as ordinary text.
        self.hf.encode_special_tokens = True
        if eos_id is None:
            eos_id = hf.token_to_id(EOS)
        if eos_id is None:
            raise UserError(f"tokenizer has no {EOS} token")
        self.eos_id = eos_id
        self.pad_id = hf.token_to_id(PAD)
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self.kind = kind or _guess_kind(hf)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without any special tokens added."""
        if self.kind == "byte":
            return list(text.encode("utf-8"))  # same ids as the HF model, much faster
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], specials: bool = False) -> list[list[int]]:
        """Token ids of each text, encoded in parallel. With `specials`, special-token strings in the text
        become their ids (for trusted text such as a chat template's rendering)."""
        if self.kind == "byte":
            return [list(text.encode("utf-8")) for text in texts]
        if not specials:
            return [enc.ids for enc in self.hf.encode_batch_fast(texts, add_special_tokens=False)]
        self.hf.encode_special_tokens = False
        try:
            return [enc.ids for enc in self.hf.encode_batch_fast(texts, add_special_tokens=False)]
        finally:
            self.hf.encode_special_tokens = True

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens are written out as their strings."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, directory: str | os.PathLike) -> None:
        """Write `directory/tokenizer.json`, and a generation config naming the EOS id when that is not
        the `<|endoftext|>` token (an imported model's tokenizer)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(directory / HF_FILE))
        if self.hf.token_to_id(EOS) != self.eos_id:
            (directory / GENERATION_CONFIG).write_text(json.dumps({"eos_token_id": self.eos_id}) + "\n")

    def fingerprint(self) -> str:
        """A sha256 that changes whenever the tokenizer's behaviour may change."""
        import hashlib

        return hashlib.sha256(self.hf.to_str().encode()).hexdigest()


def _guess_kind(hf: tokenizers.Tokenizer) -> str:
    """Kind "byte" for exactly the `byte_tokenizer()` layout, else "bpe"."""
    config = json.loads(hf.to_str())
    model = config["model"]
    byte_vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    is_byte = (
        model.get("type") == "BPE"
        and not model.get("merges")
        and model.get("vocab") == byte_vocab
        and config.get("normalizer") is None
        and (config.get("pre_tokenizer") or {}).get("type") == "ByteLevel"
    )
    return "byte" if is_byte else "bpe"


def byte_tokenizer() -> Tokenizer:
    """256 byte tokens with id == byte value, then `<|endoftext|>` (256) and `<|pad|>` (257)."""
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(list(SPECIALS))
    return Tokenizer(hf, kind="byte")


MAX_VOCAB_SIZE = 1 << 24
"""Largest BPE vocabulary we train (16.8M, far past any model's): larger sizes abort inside the Rust trainer."""


def check_bpe_vocab_size(vocab_size: int) -> None:
    """UserError unless a byte-level BPE of `vocab_size` ids can be trained."""
    minimum = 256 + len(SPECIALS)
    if vocab_size < minimum:
        raise UserError(f"vocab_size {vocab_size} is too small: byte-level BPE needs at least {minimum}")
    if vocab_size > MAX_VOCAB_SIZE:
        raise UserError(f"vocab_size {vocab_size} is too large: at most {MAX_VOCAB_SIZE:,} ids")


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer of at most `vocab_size` ids (256 bytes + 2 specials + merges).

    The vocabulary can come out smaller when the corpus runs out of pairs to merge; read `vocab_size`.
    """
    check_bpe_vocab_size(vocab_size)
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf, kind="bpe")


class TiktokenTokenizer(Tokenizer):
    """A tiktoken BPE from a local `.tiktoken` ranks file, plus an `<|endoftext|>` special after the ranks."""

    def __init__(self, ranks: dict[bytes, int], pattern: str = CL100K_PATTERN, name: str = "local"):
        import tiktoken

        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise UserError(f"tiktoken ranks lack {len(missing)} single-byte tokens (e.g. byte {missing[0]})")
        self.ranks = ranks
        self.pattern = pattern
        self.eos_id = max(ranks.values()) + 1
        self.pad_id = None
        self.kind = "tiktoken"
        self.enc = tiktoken.Encoding(
            name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={EOS: self.eos_id}
        )
        self.vocab_size = self.enc.n_vocab

    @classmethod
    def from_file(cls, path: str | os.PathLike, pattern: str = CL100K_PATTERN) -> TiktokenTokenizer:
        """Load a ranks file: one `base64(token) rank` pair per line."""
        return cls(read_tiktoken_ranks(path), pattern=pattern, name=Path(path).stem)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without any special tokens added."""
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], specials: bool = False) -> list[list[int]]:
        """Token ids of each text, encoded in parallel threads; `specials` parses special-token strings."""
        threads = os.cpu_count() or 1
        if specials:
            return self.enc.encode_batch(texts, num_threads=threads, allowed_special="all")
        return self.enc.encode_ordinary_batch(texts, num_threads=threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; `<|endoftext|>` is written out as its string."""
        return self.enc.decode([int(i) for i in ids], errors="replace")

    def save(self, directory: str | os.PathLike) -> None:
        """Write `directory/tokenizer.tiktoken` (ranks) and `directory/tokenizer_config.json`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / TIKTOKEN_FILE).write_bytes(self._ranks_bytes())
        config = {"kind": "tiktoken", "pattern": self.pattern, "special_tokens": {EOS: self.eos_id}}
        (directory / TIKTOKEN_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    def fingerprint(self) -> str:
        """A sha256 that changes whenever the tokenizer's behaviour may change."""
        import hashlib

        return hashlib.sha256(self._ranks_bytes() + self.pattern.encode()).hexdigest()

    def _ranks_bytes(self) -> bytes:
        lines = [base64.b64encode(tok) + b" " + str(rank).encode() for tok, rank in self._sorted_ranks()]
        return b"\n".join(lines) + b"\n"

    def _sorted_ranks(self) -> list[tuple[bytes, int]]:
        return sorted(self.ranks.items(), key=lambda item: item[1])


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a `.tiktoken` ranks file (the format of `tiktoken.load.load_tiktoken_bpe`).

    Parsed here because `load_tiktoken_bpe` caches by path in a temp dir and can return stale contents.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"tokenizer {path} is missing or unreadable: {e.strerror}") from None
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise UserError(f"tokenizer {path} line {n} is not 'base64-token rank'") from None
    if not ranks:
        raise UserError(f"tokenizer {path} is empty")
    if len(set(ranks.values())) != len(ranks):
        raise UserError(f"tokenizer {path} gives the same rank to two tokens")
    return ranks


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer from a directory written by `save` (a checkpoint, or a run directory: its newest
    checkpoint's), a `tokenizer.json`, or a `.tiktoken` file."""
    path = Path(path)
    has_files = any((path / name).is_file() for name in (TIKTOKEN_FILE, HF_FILE))
    if path.is_dir() and not has_files and (path / "checkpoints").is_dir():
        from multitoken.checkpoint import resolve_checkpoint  # a run directory: its newest checkpoint's

        path = resolve_checkpoint(path)
    if path.is_dir():
        if (path / TIKTOKEN_FILE).is_file():
            return _load_tiktoken_dir(path)
        if (path / HF_FILE).is_file():
            return _load_hf(path / HF_FILE, _generation_eos(path / GENERATION_CONFIG))
        raise UserError(f"tokenizer directory {path} holds neither {HF_FILE} nor {TIKTOKEN_FILE}")
    if not path.is_file():
        raise UserError(f"tokenizer {path} is missing")
    if path.suffix == ".tiktoken":
        return TiktokenTokenizer.from_file(path)
    return _load_hf(path)


def _generation_eos(path: Path) -> int | None:
    """The (first) eos_token_id of a transformers generation_config.json, or None without one."""
    if not path.is_file():
        return None
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        raise UserError(f"generation config {path} is not valid JSON") from None
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return eos if isinstance(eos, int) else None


def _load_hf(path: Path, eos_id: int | None = None) -> Tokenizer:
    try:
        hf = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"tokenizer {path} is not a valid tokenizer.json: {first_line}") from None
    return Tokenizer(hf, eos_id=eos_id)


def _load_tiktoken_dir(directory: Path) -> TiktokenTokenizer:
    pattern = CL100K_PATTERN
    config_path = directory / TIKTOKEN_CONFIG
    if config_path.is_file():
        try:
            pattern = json.loads(config_path.read_text()).get("pattern", CL100K_PATTERN)
        except (json.JSONDecodeError, AttributeError):
            raise UserError(f"tokenizer config {config_path} is not valid JSON") from None
    return TiktokenTokenizer.from_file(directory / TIKTOKEN_FILE, pattern=pattern)
