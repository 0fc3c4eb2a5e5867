"""A row's text as its tokens arrive: held back while it may end inside a character or a stop string.

OpenAI returns the text before the first stop string (the stop string itself is left out); streaming
must never send text that a later stop string would have cut, nor half of a multi-byte character.

New tokens are decoded with a little left context, not the whole text again (TGI's and vLLM's
incremental detokenization): decode(ids[prefix:]) minus decode(ids[prefix:read]), kept only once it
ends on a whole character. A stream of n tokens then costs O(n), not O(n^2), to decode.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"
"""What a decoder writes for bytes that are not (yet) a whole UTF-8 character."""


class IncrementalText:
    """Decodes a growing list of token ids; `add()` returns the text that is safe to send now."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0
        self._decoded = ""
        """The text of ids[:_read], whole characters only."""
        self._prefix = 0
        self._read = 0

    def text(self) -> str:
        """The whole text so far, cut before the first stop string (one full decode)."""
        return self._cut(self.tokenizer.decode(self.ids))

    def _cut(self, text: str) -> str:
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return text[: min(cuts)] if cuts else text

    def add(self, ids: Sequence[int]) -> str:
        """Append ids; the new text that no later token can change."""
        self.ids.extend(ids)
        self._advance()
        text = self._cut(self._decoded)
        # Until a stop string appears, hold back what could be the start of one.
        end = len(text) - self.hold if len(text) == len(self._decoded) else len(text)
        return self._take(text, end)

    def _advance(self) -> None:
        """Decode the tokens after `_read`, with ids[_prefix:_read] as context, once they end on a
        whole character."""
        context = self.tokenizer.decode(self.ids[self._prefix : self._read])
        new = self.tokenizer.decode(self.ids[self._prefix :])
        if len(new) > len(context) and not new.endswith(REPLACEMENT):
            self._decoded += new[len(context) :]
            self._prefix, self._read = self._read, len(self.ids)

    def finish(self) -> str:
        """Everything not sent yet (the row is done)."""
        text = self.text()
        return self._take(text, len(text))

    def _take(self, text: str, end: int) -> str:
        if end <= self.sent:
            return ""
        out, self.sent = text[self.sent : end], end
        return out
