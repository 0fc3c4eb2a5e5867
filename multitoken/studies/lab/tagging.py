"""Tag every token of a token stream with the kind of prediction task it is.

Each document (the stream split at the end-of-text token) is decoded once, cut into units (Python's
own `tokenize` tokens for code; words, numbers and punctuation for text), and each model token is
mapped to the unit covering its first character, or, when that character lies between units (the
leading space of a BPE token like " return"), the unit covering its first non-blank character.
Kinds that depend on the context ("identifier seen before", "repeated word") are decided per
evaluation window: seen earlier *in the same window*, i.e. in what the model could attend to.
"""

from __future__ import annotations

import bisect
import io
import keyword
import re
import tokenize
from dataclasses import dataclass

import torch
from torch import Tensor

from multitoken.tokenizer import bytes_to_unicode

CODE_TAGS = (
    "keyword",
    "identifier (seen)",
    "identifier (new)",
    "operator/bracket",
    "whitespace",
    "number",
    "string",
    "comment",
    "other",
)
"""Kinds of code token; "identifier (seen)" is copyable from earlier in the window."""
TEXT_TAGS = (
    "punctuation",
    "function word",
    "capitalised name",
    "repeated word",
    "number",
    "whitespace",
    "other",
)
"""Kinds of English-text token."""
SPECIAL_TAG = "end of document"
"""The document separator (and any other special token)."""

_FUNCTION_WORDS_TEXT = """a an the and or but nor so yet if then than because as of in on at to for from by
    with without about
    into onto over under between through during before after above below up down out off again is are was
    were be been being am do does did have has had having will would shall should can could may might must
    i me my mine you your yours he him his she her hers it its we us our ours they them their theirs this
    that these those who whom whose which what where when why how not no all any each every some such
    there here own same too very just only also both either neither other another"""
FUNCTION_WORDS = frozenset(_FUNCTION_WORDS_TEXT.split())
"""Closed-class English words (articles, prepositions, pronouns, auxiliaries, conjunctions)."""

_CODE_KIND = {
    tokenize.OP: "operator/bracket",
    tokenize.NUMBER: "number",
    tokenize.STRING: "string",
    tokenize.COMMENT: "comment",
    tokenize.NEWLINE: "whitespace",
    tokenize.NL: "whitespace",
    tokenize.INDENT: "whitespace",
    tokenize.DEDENT: "whitespace",
}
for _name in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END"):  # Python 3.12+
    if hasattr(tokenize, _name):
        _CODE_KIND[getattr(tokenize, _name)] = "string"

_CODE_FALLBACK = re.compile(
    r"(?P<name>[A-Za-z_]\w*)|(?P<number>\d[\w.]*)|(?P<comment>#[^\n]*)"
    r"|(?P<string>'[^'\n]*'?|\"[^\"\n]*\"?)|(?P<space>\s+)|(?P<op>.)",
    re.S,
)
_TEXT_UNITS = re.compile(
    r"(?P<word>[^\W\d_]+(?:'[^\W\d_]+)?)|(?P<number>\d+(?:[.,]\d+)*)|(?P<space>\s+)|(?P<punct>.)", re.S
)


@dataclass
class Unit:
    """A span of a document's text with its kind (before context-dependent refinement)."""

    start: int
    """First character."""
    end: int
    """One past the last character."""
    kind: str
    """Code: keyword, name, operator/bracket, ...; text: word, number, punctuation, whitespace."""
    text: str
    """The characters themselves."""


# ---- bytes and characters ---------------------------------------------------------------------------


def token_pieces(tokenizer, ids: list[int]) -> list[bytes]:
    """The bytes each token contributes to the decoded text (b"" for special tokens)."""
    specials = {tokenizer.eos_id, getattr(tokenizer, "pad_id", None)}
    if tokenizer.kind == "byte":
        return [b"" if i in specials else bytes([i]) for i in ids]
    if tokenizer.kind == "tiktoken":
        return [b"" if i in specials else tokenizer.enc.decode_single_token_bytes(i) for i in ids]
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    pieces = []
    for i in ids:
        piece = tokenizer.hf.id_to_token(int(i)) if i not in specials else ""
        if piece and all(c in byte_of for c in piece):
            pieces.append(bytes(byte_of[c] for c in piece))
        else:
            pieces.append(b"" if i in specials else tokenizer.decode([i]).encode())
    return pieces


def decode_with_offsets(pieces: list[bytes]) -> tuple[str, list[int], list[int]]:
    """(text, first character of each token, character length of each token); bad UTF-8 stays 1 char/byte."""
    text = b"".join(pieces).decode("utf-8", errors="surrogateescape")
    char_of_byte = []
    for index, char in enumerate(text):
        char_of_byte += [index] * len(char.encode("utf-8", errors="surrogateescape"))
    char_of_byte.append(len(text))
    starts, lengths, byte_pos = [], [], 0
    for piece in pieces:
        first = char_of_byte[byte_pos]
        byte_pos += len(piece)
        starts.append(first)
        lengths.append(max(0, char_of_byte[byte_pos] - first) if piece else 0)
    return text, starts, lengths


# ---- units -------------------------------------------------------------------------------------------


def code_units(text: str) -> list[Unit]:
    """Python `tokenize` tokens of `text`; where tokenize gives up, a simple regex lexer takes over."""
    line_starts = [0]
    for line in text.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))
    units: list[Unit] = []
    resume = 0
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.ENDMARKER:
                break
            start = line_starts[tok.start[0] - 1] + tok.start[1]
            end = line_starts[min(tok.end[0] - 1, len(line_starts) - 1)] + tok.end[1]
            if end <= start:
                continue  # DEDENT and the empty NEWLINE at end of file
            if tok.type == tokenize.NAME:
                kind = "keyword" if keyword.iskeyword(tok.string) else "name"
            else:
                kind = _CODE_KIND.get(tok.type, "other")
            units.append(Unit(start, end, kind, text[start:end]))
            resume = end
    except (tokenize.TokenError, SyntaxError):
        units += _fallback_code_units(text, resume)
    return units


def _fallback_code_units(text: str, start: int) -> list[Unit]:
    kinds = {"name": "name", "number": "number", "comment": "comment", "string": "string"}
    kinds |= {"space": "whitespace", "op": "operator/bracket"}
    units = []
    for match in _CODE_FALLBACK.finditer(text, start):
        kind = kinds[match.lastgroup]
        if kind == "name" and keyword.iskeyword(match.group()):
            kind = "keyword"
        units.append(Unit(match.start(), match.end(), kind, match.group()))
    return units


def text_units(text: str) -> list[Unit]:
    """Words, numbers, punctuation marks and whitespace runs; capitalised words not starting a sentence
    are kind "name"."""
    units = []
    for match in _TEXT_UNITS.finditer(text):
        kind = {"word": "word", "number": "number", "space": "whitespace", "punct": "punctuation"}[
            match.lastgroup
        ]
        word = match.group()
        if kind == "word" and word[0].isupper() and not _sentence_start(text, match.start()):
            kind = "name"
        units.append(Unit(match.start(), match.end(), kind, word))
    return units


def _sentence_start(text: str, index: int) -> bool:
    """True at the start of the text, of a paragraph, or after . ! ? (quotes and brackets skipped)."""
    j = index - 1
    while j >= 0 and text[j] in " \t\"'([":
        j -= 1
    if j < 0 or text[j] in ".!?:":
        return True
    return text[j] == "\n" and (j == 0 or text[j - 1] == "\n" or text[j - 1] in ".!?:")


def covering_units(units: list[Unit], text: str, starts: list[int], lengths: list[int]) -> list[int]:
    """Index of the unit each token maps to (-1: none, e.g. an all-blank token between units)."""
    unit_starts = [u.start for u in units]
    out = []
    for start, length in zip(starts, lengths, strict=True):
        found = _unit_at(units, unit_starts, start) if length else -1
        if found < 0 or units[found].kind == "whitespace":
            chunk = text[start : start + length]
            offset = len(chunk) - len(chunk.lstrip())
            if offset < len(chunk):
                found = _unit_at(units, unit_starts, start + offset)
        out.append(found)
    return out


def _unit_at(units: list[Unit], unit_starts: list[int], char: int) -> int:
    i = bisect.bisect_right(unit_starts, char) - 1
    return i if i >= 0 and units[i].start <= char < units[i].end else -1


# ---- tagging a stream --------------------------------------------------------------------------------


@dataclass
class StreamTags:
    """Per-token unit info of a token stream, from which window-dependent tags are derived."""

    domain: str
    """code or text."""
    kind_S: list[str]
    """Context-free kind of each token's unit (or "special" / "whitespace")."""
    key_S: list[str | None]
    """The identifier or word each token belongs to (None otherwise), for the seen-before test."""
    unit_S: list[int]
    """A stream-wide id of each token's unit (-1 none), so a unit's tokens share one decision."""

    @property
    def tags(self) -> tuple[str, ...]:
        return (*(CODE_TAGS if self.domain == "code" else TEXT_TAGS), SPECIAL_TAG)


def tag_stream(stream_S: Tensor, tokenizer, domain: str) -> StreamTags:
    """Decode each document of the stream once and record every token's unit."""
    ids = [int(i) for i in stream_S.tolist()]
    kind_S: list[str] = []
    key_S: list[str | None] = []
    unit_S: list[int] = []
    next_unit = 0
    doc_start = 0
    for pos in range(len(ids) + 1):
        if pos < len(ids) and ids[pos] != tokenizer.eos_id:
            continue
        doc = ids[doc_start:pos]
        kinds, keys, units = _tag_document(doc, tokenizer, domain)
        unit_S += [u + next_unit if u >= 0 else -1 for u in units]
        next_unit += (max(units) + 1) if units else 0
        kind_S += kinds
        key_S += keys
        if pos < len(ids):
            kind_S.append("special")
            key_S.append(None)
            unit_S.append(-1)
        doc_start = pos + 1
    return StreamTags(domain, kind_S, key_S, unit_S)


def _tag_document(ids: list[int], tokenizer, domain: str) -> tuple[list[str], list[str | None], list[int]]:
    pieces = token_pieces(tokenizer, ids)
    text, starts, lengths = decode_with_offsets(pieces)
    units = code_units(text) if domain == "code" else text_units(text)
    which = covering_units(units, text, starts, lengths)
    kinds, keys = [], []
    for index, start, length in zip(which, starts, lengths, strict=True):
        chunk = text[start : start + length]
        if index < 0:
            kinds.append("whitespace" if chunk.strip() == "" and chunk else "other")
            keys.append(None)
            continue
        unit = units[index]
        kinds.append(unit.kind)
        key = unit.text if unit.kind in ("name", "word") else None
        keys.append(key.lower() if key is not None and domain == "text" else key)
    return kinds, keys, which


def window_tags(tags: StreamTags, start: int, length: int) -> list[str]:
    """Final tag of each token of stream[start : start + length], with "seen before" decided in the window."""
    seen: set[str] = set()
    decided: dict[int, bool] = {}
    out = []
    for pos in range(start, start + length):
        kind, key, unit = tags.kind_S[pos], tags.key_S[pos], tags.unit_S[pos]
        repeat = False
        if key is not None:
            if unit not in decided:
                decided[unit] = key in seen
                seen.add(key)
            repeat = decided[unit]
        out.append(_final_tag(tags.domain, kind, key, repeat))
    return out


def _final_tag(domain: str, kind: str, key: str | None, repeat: bool) -> str:
    if kind == "special":
        return SPECIAL_TAG
    if domain == "code":
        if kind == "name":
            return "identifier (seen)" if repeat else "identifier (new)"
        return kind if kind in CODE_TAGS else "other"
    if kind in ("punctuation", "number", "whitespace"):
        return kind
    if kind in ("word", "name") and key in FUNCTION_WORDS:
        return "function word"
    if kind == "name":
        return "capitalised name"
    if kind == "word":
        return "repeated word" if repeat else "other"
    return "other"


def tag_windows(tags: StreamTags, starts: list[int], seq_len: int) -> Tensor:
    """Tag index `tag_WT` of every token of the windows starting at `starts` (indices into `tags.tags`)."""
    index = {name: i for i, name in enumerate(tags.tags)}
    rows = [[index[t] for t in window_tags(tags, start, seq_len)] for start in starts]
    return torch.tensor(rows, dtype=torch.long)
