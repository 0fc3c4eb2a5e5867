"""A row's text as its tokens arrive: held back while it may end inside a character or a stop string.

OpenAI returns the text before the first stop string (the stop string itself is left out); streaming
must never send text that a later stop string would have cut, nor half of a multi-byte character.
"""

from __future__ import annotations

from collections.abc import Sequence


class IncrementalText:
    """Decodes a growing list of token ids; `add()` returns the text that is safe to send now."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0

    def text(self) -> str:
        """The whole text so far, cut before the first stop string."""
        return self._cut(self.tokenizer.decode(self.ids))

    def _cut(self, text: str) -> str:
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return text[: min(cuts)] if cuts else text

    def add(self, ids: Sequence[int]) -> str:
        """Append ids; the new text that no later token can change."""
        self.ids.extend(ids)
        full = self.tokenizer.decode(self.ids)
        text = self._cut(full)
        # Until a stop string appears, hold back what could be the start of one.
        end = len(text.rstrip("\ufffd")) - self.hold if len(text) == len(full) else len(text)
        return self._take(text, end)

    def finish(self) -> str:
        """Everything not sent yet (the row is done)."""
        text = self.text()
        return self._take(text, len(text))

    def _take(self, text: str, end: int) -> str:
        if end <= self.sent:
            return ""
        out, self.sent = text[self.sent : end], end
        return out
